"""The Dovecot snippets on Debian 12's stock /etc/dovecot: placed where docs/deployment.md says,
their settings are the ones Dovecot uses (`doveconf`), not Debian's defaults.

The tree is dovecot-core's own (dovecot.conf and conf.d/ from /usr/share/dovecot, which
postinst installs as /etc/dovecot), copied to a temporary directory.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import require_mail_stack
from mailstack import AUTH_SYSTEM_INCLUDE, Dovecot, dovecot_snippet_path, snippet, which

pytestmark = [pytest.mark.e2e]

MAILBOX_PACKAGES = ("dovecot-lmtpd", "dovecot-imapd")
DEBIAN_MAIL_LOCATION = "mbox:~/mail:INBOX=/var/mail/%u"  # conf.d/10-mail.conf


@pytest.fixture(autouse=True)
def _stack() -> None:
    require_mail_stack()


def dovecot(tmp: Path, names: tuple[str, ...], packages: tuple[str, ...] = MAILBOX_PACKAGES) -> Dovecot:
    return Dovecot(tmp, tmp / "etc", {dovecot_snippet_path(n): snippet(n) for n in names}, packages=packages)


def databases(server: Dovecot) -> list[tuple[str, str]]:
    """(passdb|userdb, driver) from `doveconf -n`: passdbs first, each kind in the order tried."""
    exe = which("doveconf")
    assert exe is not None
    out = subprocess.run(
        [exe, "-c", str(server.config), "-n"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return re.findall(r"^(passdb|userdb) \{[^}]*?driver = (\S+)", out, flags=re.M | re.S)


@pytest.mark.parametrize("recipe", [("dovecot-mailbox.conf",), ("dovecot-mailbox.conf", "dovecot-onehost.conf")])
def test_the_mailbox_snippet_wins_over_debians_defaults(tmp_path: Path, recipe: tuple[str, ...]) -> None:
    server = dovecot(tmp_path, recipe)
    assert server.doveconf("mail_location") == "maildir:~/Maildir"
    assert (server.doveconf("first_valid_uid"), server.doveconf("last_valid_uid")) == ("5000", "5000")
    assert server.doveconf("protocols").split() == ["imap", "lmtp"]  # dovecot-imapd, dovecot-lmtpd
    # only ldapsync's files: no PAM, no system users (auth-system.conf.ext is commented out)
    assert databases(server) == [("passdb", "passwd-file"), ("userdb", "passwd-file")]


def test_the_submission_snippet_wins_over_debians_defaults(tmp_path: Path) -> None:
    server = dovecot(tmp_path, ("dovecot-ldapsync.conf",), packages=())
    assert server.doveconf("auth_mechanisms") == "plain login"  # 10-auth.conf says plain
    assert server.doveconf("protocols").strip() == ""  # dovecot-core alone serves only auth
    assert databases(server) == [("passdb", "passwd-file"), ("userdb", "static")]


def test_the_one_host_snippet_serves_smtp_auth_from_the_mailbox_passdb(tmp_path: Path) -> None:
    server = dovecot(tmp_path, ("dovecot-mailbox.conf", "dovecot-onehost.conf"))
    assert server.doveconf("auth_mechanisms") == "plain login"
    assert (
        "/var/spool/postfix/private/auth"
        in (tmp_path / "etc" / dovecot_snippet_path("dovecot-onehost.conf")).read_text()
    )


def test_a_snippet_included_from_10_auth_conf_loses_to_debians_10_mail_conf(tmp_path: Path) -> None:
    """Why the snippets live in conf.d/99-*: 10-mail.conf is read after 10-auth.conf's includes."""
    server = Dovecot(tmp_path, tmp_path / "etc", {}, packages=MAILBOX_PACKAGES, edit_auth=False)
    conf_d = tmp_path / "etc" / "conf.d"
    (conf_d / "auth-ldapsync-mailbox.conf.ext").write_text(snippet("dovecot-mailbox.conf"))
    auth = conf_d / "10-auth.conf"
    auth.write_text(auth.read_text().replace(AUTH_SYSTEM_INCLUDE, "!include auth-ldapsync-mailbox.conf.ext"))
    assert server.doveconf("mail_location") == DEBIAN_MAIL_LOCATION


def test_without_the_10_auth_conf_edit_pam_and_system_users_come_first(tmp_path: Path) -> None:
    server = Dovecot(
        tmp_path,
        tmp_path / "etc",
        {dovecot_snippet_path("dovecot-mailbox.conf"): snippet("dovecot-mailbox.conf")},
        packages=MAILBOX_PACKAGES,
        edit_auth=False,
    )
    assert databases(server) == [
        ("passdb", "pam"),  # tried before ldapsync's passwd-file
        ("passdb", "passwd-file"),
        ("userdb", "passwd"),  # /etc/passwd answers before ldapsync's userdb
        ("userdb", "passwd-file"),
    ]


def test_stock_dovecot_does_not_start_without_its_certificate(tmp_path: Path) -> None:
    """10-ssl.conf: ssl = yes with private/dovecot.pem, which ssl-cert's snakeoil pair provides."""
    server = dovecot(tmp_path, ("dovecot-ldapsync.conf",), packages=())
    (tmp_path / "etc" / "private" / "dovecot.pem").unlink()
    with pytest.raises(RuntimeError, match=r"ssl_cert: Can't open file .*/private/dovecot\.pem"):
        server.start()
