"""The whole mail system, as docs/deployment.md builds it on stock Debian 12, delivers every
address of a directory with every routing shape exactly where the intent says, once.

MX, SRS, mailbox and submission hosts are separate real Postfix instances (Debian's main.cf
and master.cf plus the docs' snippets), the mailbox host hands mail to a stock Dovecot over
LMTP, and an SMTP sink is the Internet. `ldapsync --once` feeds every host from one
throwaway slapd. One tagged message goes to every address through the MX (and a few through
the submission host); then every queue must drain, and each message must have reached each
of its final destinations exactly once, or have been refused at RCPT: nothing accepted and
bounced, nothing looping, nothing deferred.
"""

from __future__ import annotations

import imaplib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import systemdata as sd
from conftest import require_mail_stack
from mailstack import SNIPPETS, _insecure_tls, hash_password, make_workdir
from wholesystem import MAILBOX, MX, SRS, SUBMISSION, Expected, Run, System, mismatches, run_mail

from ldapsync.testing.slapd import BASE_LDIF, Slapd

pytestmark = [pytest.mark.e2e, pytest.mark.slapd]

PASSWORD = "plain1-secret"
SUBMITTED = ("keep1@example.org", "g-outer@example.org", "in2@example.org", "friend@far.example")


def expected(address: str) -> Expected:
    """The intent (tests/e2e/systemdata.py) as what the mail system must do."""
    if address.startswith("submit:"):
        address = address.removeprefix("submit:")
        if sd.shape(address) not in sd.INTENT:
            return Expected(250, frozenset({f"internet:{address}"}))
    outcome = sd.addresses()[address]
    if outcome.reject is None:
        return Expected(250, outcome.destinations)
    if outcome is sd.DEAD:
        return Expected(5)  # refused; with the disabled account's text where one is the reason
    disable = {a.uid: a.disable for a in sd.ACCOUNTS if a.disable}
    return Expected(outcome.reject, text=disable.get(sd.shape(address), ""))


@dataclass
class Result:
    system: System
    run: Run
    warnings: dict[str, str]


def whole_system(recipes: tuple, entry: str, submit_host: str) -> Iterator[Result]:
    """Build, sync, start, send everything, drain; yield what happened; tear down."""
    require_mail_stack()
    workdir = make_workdir(f"ldapsync-e2e-{entry}-")
    ldap = Slapd(workdir / "ldap", ldif_files=(BASE_LDIF,), extra_ldif=sd.ldif(hash_password(PASSWORD)))
    ldap.start()
    system = System(
        workdir,
        recipes,
        ldap_uri=ldap.uri,
        bind_password_file=ldap.service_password_file,
        static_text=sd.static_file((SNIPPETS / "mail.yaml").read_text()),
        entry=entry,
    )
    try:
        warnings = system.sync()
        system.start()
        run = run_mail(
            system, sd.addresses(), SUBMITTED, login=(sd.SENDER_LOGIN, PASSWORD), submit_host=submit_host
        )
        yield Result(system, run, warnings)
    finally:
        system.stop()
        ldap.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def result() -> Iterator[Result]:
    yield from whole_system((MX, SRS, MAILBOX, SUBMISSION), "mx", "submission")


def check(result: Result, addresses: list[str]) -> None:
    observed = result.run.by_address()
    wrong = mismatches({a: expected(a) for a in addresses}, observed)
    assert not wrong, (
        f"{len(wrong)} of {len(addresses)} addresses went wrong:\n  " + "\n  ".join(wrong) + "\n" + result.system.logs()
    )


def test_every_address_reaches_each_final_destination_exactly_once(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) not in sd.DEAD_TARGET_SHAPES])


def test_an_address_whose_targets_are_dead_is_refused_at_rcpt_and_live_targets_stay(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) in sd.DEAD_TARGET_SHAPES])


def test_submitted_mail_to_our_addresses_follows_the_same_routes(result: Result) -> None:
    check(result, [f"submit:{a}" for a in SUBMITTED])


def test_no_host_bounced_deferred_or_looped_anything(result: Result) -> None:
    assert result.system.problems_in_logs() == []


def test_the_mailbox_host_serves_imap_over_starttls_with_the_ldap_mail_password(result: Result) -> None:
    host = result.system.hosts["mailbox"]
    assert host.dovecot is not None
    tag = next(t for t, a in result.run.tags.items() if a == "plain1@example.org")
    with imaplib.IMAP4("127.0.0.1", host.dovecot.imap) as imap:
        imap.starttls(ssl_context=_insecure_tls())
        imap.login(sd.SENDER_LOGIN, PASSWORD)
        imap.select("INBOX", readonly=True)
        status, found = imap.search(None, "BODY", tag)
    assert status == "OK" and len(found[0].split()) == 1
