"""The LDAP server side of docs/deployment.md: docs/snippets/slapd-ldapsync.ldif, applied
with ldapmodify to a directory that lacks it, is what makes ldapsync work there."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mailstack import SNIPPETS, run_ldapsync
from slapd import Slapd, generate_users_ldif

pytestmark = [pytest.mark.slapd]


def config(tmp: Path, server: Slapd) -> Path:
    path = tmp / "ldapsync.yaml"
    path.write_text(
        f"""\
domain: example.org
source:
  ldap:
    uri: {server.uri}
    bind_dn: "{server.service_dn}"
    bind_password_file: {server.service_password_file}
    base_dn: {server.users_dn}
state_dir: {tmp / "state"}
exporters:
  - kind: postfix-recipients
    path: {tmp / "recipients"}
    map_type: texthash
  - kind: dovecot-passwd
    path: {tmp / "mail-passwords"}
"""
    )
    return path


def sync_refresh(server: Slapd) -> int:
    """ldapsearch with a critical RFC 4533 refreshOnly control, as the service account."""
    return server.ldapsearch("-E", "!sync=ro", "-s", "base", "(objectClass=*)", "1.1", base=server.users_dn).returncode


def test_server_snippet_lifts_the_size_limit_and_adds_syncprov(
    slapd_factory: Callable[..., Slapd], tmp_path: Path
) -> None:
    server = slapd_factory(syncprov=False, service_unlimited=False, extra_ldif=generate_users_ldif(600))
    tmp = tmp_path
    cfg = config(tmp, server)
    before = run_ldapsync(cfg, "--once")
    assert before.returncode == 1, before.stderr  # 500 entries max: the sync must fail, not truncate
    assert not (tmp / "recipients").exists()
    assert sync_refresh(server) != 0  # no syncprov yet: the critical sync control is refused

    server.modify_config((SNIPPETS / "slapd-ldapsync.ldif").read_text())

    after = run_ldapsync(cfg, "--once")
    assert after.returncode == 0, after.stderr
    recipients = (tmp / "recipients").read_text().splitlines()
    assert len([r for r in recipients if r.startswith("user")]) == 600
    assert "alice:" in (tmp / "mail-passwords").read_text()  # the ACL lets the service read mailPassword
    assert sync_refresh(server) == 0  # syncprov answers a refreshOnly as the service account
    anon = server.search("(uid=alice)", ["mailPassword"], bind="anonymous")
    assert anon and "mailPassword" not in anon[0]
