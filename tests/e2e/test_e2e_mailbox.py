"""The mailbox host: Postfix and Dovecot configured from docs/snippets store mail for the
accounts, aliases and groups `ldapsync --once` installed out of a real slapd, delivered over
LMTP and read back with `doveadm fetch`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_mail_stack
from mailstack import (
    DOVECOT_ETC,
    ETC_DIR,
    MAPS_DIR,
    OUTSIDE,
    POSTFIX_SPOOL,
    SNIPPETS,
    STATE_DIR,
    Dovecot,
    Postfix,
    Sink,
    Substitutions,
    dovecot_snippet_path,
    ldapsync_config,
    make_workdir,
    postmap_query,
    rcpt_reply,
    run_ldapsync,
    send,
    snippet,
    tail,
    token,
    wait_for,
    which,
)
from slapd import BASE_LDIF, DEMO_LDIF, FIXTURES, Slapd

pytestmark = [pytest.mark.e2e, pytest.mark.slapd]

VMAIL_ROOT = "/var/vmail"
VMAIL_ID = 5000  # the snippet's uid/gid: the vmail user


class MailboxHost:
    def __init__(self, workdir: Path, ldap: Slapd):
        self.workdir = workdir
        self.world = Sink(workdir, "world")
        self.maps = workdir / "maps"
        self.maps.mkdir()
        self.etc = workdir / "etc-ldapsync"
        self.etc.mkdir()
        shutil.copy(SNIPPETS / "mail.yaml", self.etc / "mail.yaml")
        secret = self.etc / "bind.secret"
        shutil.copy(ldap.service_password_file, secret)
        secret.chmod(0o600)
        # /etc/dovecot as dovecot-core ships it; ldapsync creates ldapsync/ in it, as on a real host
        self.dovecot_etc = workdir / "etc-dovecot"
        self.vmail = workdir / "vmail"
        self.vmail.mkdir()
        os.chown(self.vmail, VMAIL_ID, VMAIL_ID)  # what `install -d -o vmail -g vmail /var/vmail` does
        self.subs = Substitutions(
            {
                MAPS_DIR: str(self.maps),
                STATE_DIR: str(workdir / "state"),
                DOVECOT_ETC: str(self.dovecot_etc),
                ETC_DIR: str(self.etc),
                VMAIL_ROOT: str(self.vmail),
            }
        )
        self.config = ldapsync_config(
            "ldapsync-mailbox.yaml",
            workdir / "ldapsync.yaml",
            self.subs,
            ldap_uri=ldap.uri,
            bind_password_file=secret,
        )
        self.postfix = Postfix(
            workdir, "mailbox", world=self.world, main_cf=snippet("postfix-mailbox-main.cf", self.subs)
        )
        self.subs.pairs[POSTFIX_SPOOL] = str(self.postfix.queue_dir)
        self.dovecot = Dovecot(
            workdir,
            self.dovecot_etc,
            {dovecot_snippet_path("dovecot-mailbox.conf"): snippet("dovecot-mailbox.conf", self.subs)},
            packages=("dovecot-lmtpd", "dovecot-imapd"),
        )

    def start(self) -> None:
        self.world.start()
        self.postfix.spawn()
        self.postfix.wait_ready()
        self.dovecot.start()  # after Postfix made its queue's private/ for the LMTP socket

    def stop(self) -> None:
        self.postfix.stop()
        self.dovecot.stop()
        self.world.stop()

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        exe = which("doveadm")
        assert exe is not None
        return subprocess.run(
            [exe, "-c", str(self.dovecot.config), *args], capture_output=True, text=True, timeout=30, check=False
        )

    def inbox(self, user: str, tok: str) -> str:
        """The messages in `user`'s INBOX whose body carries `tok` (doveadm fetch)."""
        proc = self.doveadm("fetch", "-u", user, "text", "mailbox", "INBOX", "body", tok)
        assert proc.returncode == 0, f"{proc.stderr}\n{tail(self.dovecot.log_path)}"
        return proc.stdout

    def delivered(self, user: str, tok: str) -> str:
        try:
            return str(wait_for(lambda: self.inbox(user, tok), 20, f"{tok} in {user}'s INBOX"))
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.postfix.log()[-3000:]}\n{tail(self.dovecot.log_path)}") from None


@pytest.fixture(scope="module")
def ldap() -> Iterator[Slapd]:
    require_mail_stack()
    workdir = make_workdir("ldapsync-e2e-mailbox-ldap-")
    server = Slapd(workdir, ldif_files=(BASE_LDIF, DEMO_LDIF, FIXTURES / "groups.ldif"))
    server.start()
    yield server
    server.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def host(ldap: Slapd) -> Iterator[MailboxHost]:
    workdir = make_workdir("ldapsync-e2e-mailbox-")
    mailbox = MailboxHost(workdir, ldap)
    try:
        synced = run_ldapsync(mailbox.config, "--once")
        assert synced.returncode == 0, synced.stderr
        mailbox.start()
    except BaseException:
        mailbox.stop()
        raise
    yield mailbox
    mailbox.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_mail_for_an_account_is_stored_in_its_mailbox(host: MailboxHost) -> None:
    tok = token()
    assert send(host.postfix.smtp, OUTSIDE, ["alice@example.org"], tok).refused == {}
    text = host.delivered("alice", tok)
    assert f"Subject: e2e {tok}" in text
    maildir = host.vmail / "example.org" / "alice" / "Maildir"
    assert any(tok in p.read_text(errors="replace") for p in (maildir / "new").iterdir())
    assert (maildir.stat().st_uid, maildir.stat().st_gid) == (VMAIL_ID, VMAIL_ID)


def test_alias_domain_address_lands_in_the_same_mailbox(host: MailboxHost) -> None:
    tok = token()
    assert send(host.postfix.smtp, OUTSIDE, ["Alice@Example.NET"], tok).refused == {}
    assert tok in host.delivered("alice", tok)


def test_group_and_static_alias_deliver_to_every_member_mailbox(host: MailboxHost) -> None:
    tok = token()
    # staff (groups.ldif): alice, frank, and grace through the nested admins/ops groups;
    # bob only forwards, so the MX never sends his copy here (see the next test)
    assert send(host.postfix.smtp, OUTSIDE, ["staff@example.org"], tok).refused == {}
    for user in ("alice", "frank", "grace"):
        assert tok in host.delivered(user, tok)


def test_addresses_without_a_mailbox_here_are_refused_at_rcpt(host: MailboxHost) -> None:
    for rcpt in ("bob@example.org", "nobody@example.org", "dora@example.org", "oscar@example.org"):
        code, text = rcpt_reply(host.postfix.smtp, rcpt)
        assert code == 550, (rcpt, text)
    assert postmap_query(host.maps / "virtual_mailbox", "alice@example.org", host.postfix.config_dir) == (
        "example.org/alice/Maildir/"
    )


def test_login_and_userdb_lookup_agree(host: MailboxHost) -> None:
    assert host.dovecot.auth("alice", "alice-secret")
    proc = host.doveadm("user", "alice@example.org")  # what LMTP looks up
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split("\t", 1) for line in proc.stdout.splitlines()[1:])
    assert fields["user"] == "alice"
    assert fields["home"] == f"{host.vmail}/example.org/alice"
    assert (fields["uid"], fields["gid"]) == (str(VMAIL_ID), str(VMAIL_ID))
