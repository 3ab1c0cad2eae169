"""Scenarios 1-4: real Postfix and Dovecot, configured from docs/snippets, route and
authenticate from what `ldapsync --once` installed out of a real slapd.

One stack per module (read-only scenarios); every message carries a unique token, so the
tests do not see each other's mail.
"""

from __future__ import annotations

import smtplib

import pytest
from mailstack import OUTSIDE, MailStack, deliveries, expect, rcpt_reply, send, token

pytestmark = [pytest.mark.e2e, pytest.mark.slapd]


# -- 1. aliases, alias domains, unknown recipients -----------------------------------------
def test_alias_reaches_every_target(stack: MailStack) -> None:
    tok = token()
    assert send(stack.mx.smtp, OUTSIDE, ["postmaster@example.org"], tok).refused == {}
    # postmaster: [alice, bob]; alice lives on the mailbox host, bob forwards (via SRS)
    expect(stack.mailbox, tok, {"alice@example.org"}, stack)
    expect(stack.world, tok, {"bob@elsewhere.example"}, stack)


@pytest.mark.parametrize(
    "rcpt",
    ["postmaster@host1.example.org", "postmaster@example.net", "abuse@example.net", "POSTMASTER@Example.Net"],
)
def test_alias_domain_address_reaches_the_same_place(stack: MailStack, rcpt: str) -> None:
    tok = token()
    assert send(stack.mx.smtp, OUTSIDE, [rcpt], tok).refused == {}
    expect(stack.mailbox, tok, {"alice@example.org"}, stack)
    expect(stack.world, tok, {"bob@elsewhere.example"}, stack)


@pytest.mark.parametrize("rcpt", ["alice@host1.example.org", "alice@example.net"])
def test_user_in_alias_domain_reaches_the_mailbox(stack: MailStack, rcpt: str) -> None:
    tok = token()
    assert send(stack.mx.smtp, OUTSIDE, [rcpt], tok).refused == {}
    expect(stack.mailbox, tok, {"alice@example.org"}, stack)


@pytest.mark.parametrize(
    "rcpt",
    [
        "nobody@example.org",
        "nobody@host1.example.org",
        "nobody@example.net",
        "oscar@example.org",  # retired (accountStatus inactive)
        "walter@example.net",  # memorial
    ],
)
def test_unknown_recipient_is_rejected_at_rcpt(stack: MailStack, rcpt: str) -> None:
    code, text = rcpt_reply(stack.mx.smtp, rcpt)
    assert code == 550, text
    assert "User unknown in relay recipient table" in text


# -- 2. forwards: the MX resolves them, external copies leave through the SRS host -------
def test_mx_resolves_the_forward_and_relays_the_external_copy_through_the_srs_host(stack: MailStack) -> None:
    tok = token()
    assert send(stack.mx.smtp, OUTSIDE, ["bob@host1.example.org"], tok).refused == {}
    expect(stack.world, tok, {"bob@elsewhere.example"}, stack)
    assert stack.mailbox.recipients(tok) == set()

    # the MX's virtual map took bob@host1.example.org to bob@elsewhere.example; relayhost: SRS
    mx = [d for d in deliveries(stack.mx, tok) if d.status == "sent"]
    assert [(d.to, d.orig_to, d.relay.rsplit(":", 1)[-1]) for d in mx] == [
        ("bob@elsewhere.example", "bob@host1.example.org", str(stack.srs.smtp))
    ], mx
    srs = [d for d in deliveries(stack.srs, tok) if d.status == "sent"]
    assert [(d.to, d.relay.rsplit(":", 1)[-1]) for d in srs] == [("bob@elsewhere.example", str(stack.world.port))], srs


def test_multi_valued_and_comma_separated_forwards_reach_every_address(stack: MailStack) -> None:
    tok = token()
    assert send(stack.mx.smtp, OUTSIDE, ["carol@example.org", "dave@example.net"], tok).refused == {}
    expect(stack.world, tok, {"carol@one.example", "carol@two.example", "dave@a.example", "dave@b.example"}, stack)


def test_forward_to_a_local_user_goes_from_the_mx_straight_to_the_mailbox_host(stack: MailStack) -> None:
    tok = token()
    # erin forwards to alice@example.org: resolved on the MX, which relays it to the mailbox host
    assert send(stack.mx.smtp, OUTSIDE, ["erin@example.org"], tok).refused == {}
    expect(stack.mailbox, tok, {"alice@example.org"}, stack)
    assert stack.world.recipients(tok) == set()
    assert deliveries(stack.srs, tok) == []


def test_the_srs_host_relays_for_the_mxes_only(stack: MailStack) -> None:
    """A client outside the SRS host's mynetworks (here 127.0.0.2; the MX connects from
    127.0.0.1) may not relay through it, nor send it mail for our domains: it accepts mail
    for no domain."""
    for rcpt in (OUTSIDE, "alice@example.org"):
        with smtplib.SMTP("127.0.0.1", stack.srs.smtp, "client.example.com", 30, ("127.0.0.2", 0)) as smtp:
            smtp.ehlo()
            assert smtp.mail("someone@outside.example")[0] == 250
            code, text = smtp.rcpt(rcpt)
        assert (code, text.decode()) == (554, f"5.7.1 <{rcpt}>: Recipient address rejected: Access denied")


# -- 3. disabled accounts -------------------------------------------------------------------
@pytest.mark.parametrize("rcpt", ["dora@example.org", "dora@example.net"])
def test_disabled_account_gets_the_reject_text_from_ldap(stack: MailStack, rcpt: str) -> None:
    code, text = rcpt_reply(stack.mx.smtp, rcpt)
    assert code == 554, text
    assert text.endswith("Recipient address rejected: This account has been disabled, contact admin@example.org")


# -- 4. submission: SASL through Dovecot, sender restrictions ------------------------------
def submit_as(stack: MailStack, login: str, password: str, sender: str, tok: str) -> tuple[int, str]:
    """AUTH as login, then MAIL FROM sender: the reply to RCPT (where Postfix reports it)."""
    try:
        result = send(stack.submission.submission, sender, [OUTSIDE], tok, login=(login, password), starttls=True)
    except smtplib.SMTPRecipientsRefused as e:
        code, text = e.recipients[OUTSIDE]
        return code, text.decode()
    return (250, "sent") if not result.refused else (result.refused[OUTSIDE][0], "refused")


@pytest.mark.parametrize(
    ("login", "password"),
    [
        ("alice", "alice-secret"),  # $6$ SHA512-crypt
        ("pw-md5crypt", "md5-secret"),
        ("pw-bcrypt", "bcrypt-secret"),
        ("pw-yescrypt", "yescrypt-secret"),
        ("pw-ssha", "ssha-secret"),
        ("pw-ssha512", "ssha512-secret"),
        ("pw-argon2id", "argon2id-secret"),
        ("pw-cryptprefix", "cryptprefix-secret"),  # {CRYPT}$6$ in LDAP
    ],
)
def test_dovecot_authenticates_with_the_mail_password_from_ldap(stack: MailStack, login: str, password: str) -> None:
    assert stack.dovecot.auth(login, password)
    assert not stack.dovecot.auth(login, password + "x")


@pytest.mark.parametrize(
    ("login", "password"),
    [
        ("alice", "wrong"),
        ("alice@example.org", "alice-secret"),  # the login is the uid, without the domain
        ("oscar", "oscar-secret"),  # retired
        ("dora", "dora-secret"),  # disabled
        ("h-pw-plain", "hunter2"),  # plaintext in LDAP never reaches the passwd-file
        ("webmaster", ""),  # role account without a mail password
    ],
)
def test_login_is_refused(stack: MailStack, login: str, password: str) -> None:
    assert not stack.dovecot.auth(login, password)


def test_user_submits_mail_after_sasl_auth_with_the_ldap_mail_password(stack: MailStack) -> None:
    tok = token()
    assert submit_as(stack, "alice", "alice-secret", "alice@example.org", tok) == (250, "sent")
    expect(stack.world, tok, {OUTSIDE}, stack)
    logged = stack.submission.log()
    assert "sasl_method=PLAIN, sasl_username=alice" in logged


@pytest.mark.parametrize(
    "sender",
    [
        "alice@example.org",
        "alice@host1.example.org",
        "alice@example.net",
        "postmaster@example.org",
        "abuse@example.net",
    ],
)
def test_user_may_send_as_own_address_and_aliases(stack: MailStack, sender: str) -> None:
    assert submit_as(stack, "alice", "alice-secret", sender, token()) == (250, "sent")


@pytest.mark.parametrize(
    "sender", ["bob@example.org", "bob@example.net", "carol@example.org", "alice@elsewhere.example"]
)
def test_user_is_refused_someone_elses_sender_address(stack: MailStack, sender: str) -> None:
    code, text = submit_as(stack, "alice", "alice-secret", sender, token())
    assert code == 553, text
    assert f"<{sender}>: Sender address rejected: not owned by user alice" in text


def test_unauthenticated_submission_is_refused(stack: MailStack) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
        send(stack.submission.submission, "alice@example.org", [OUTSIDE], token(), starttls=True)
    code, _text = err.value.recipients[OUTSIDE]
    assert code == 554


def test_wrong_password_fails_smtp_auth(stack: MailStack) -> None:
    # Last in the module, and one attempt with one mechanism (smtplib's login would try LOGIN
    # after PLAIN): Dovecot delays later logins from an IP that failed.
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        send(
            stack.submission.submission,
            "alice@example.org",
            [OUTSIDE],
            token(),
            login=("alice", "bob-secret"),
            mechanism="PLAIN",
            starttls=True,
        )
    assert err.value.smtp_code == 535
