"""The LDAP server side of docs/deployment.md: docs/snippets/slapd-ldapsync.ldif, applied
with ldapmodify to a directory that lacks it, is what makes ldapsync work there: size limit,
syncprov, and read access to everything the roles search (accounts and groups), even where
no generic read rule exists."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mailstack import SNIPPETS, run_ldapsync
from slapd import BASE_LDIF, DEMO_LDIF, FIXTURES, Slapd, generate_users_ldif, ssha

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


# A directory that lets nobody read anything but their own entry (no generic "to * by * read"):
# whatever the service account can read there, the snippet granted.
LOCKED_DOWN = """\
dn: olcDatabase={1}mdb,cn=config
changetype: modify
replace: olcAccess
olcAccess: {0}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {1}to * by self read by * none
"""
READER_DN = "cn=reader,ou=services,dc=example,dc=org"  # another bind DN: must not see mailPassword
READER_PASSWORD = "reader-secret"


def search_as(server: Slapd, dn: str, password: str, *args: str) -> str:
    proc = subprocess.run(
        ["ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-x", "-H", server.uri, "-D", dn, "-w", password,
         "-b", server.suffix, *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode in (0, 32), proc.stderr
    return proc.stdout


def test_server_snippet_lets_the_service_account_read_every_roles_search_base_and_no_one_else_passwords(
    slapd_factory: Callable[..., Slapd], tmp_path: Path
) -> None:
    server = slapd_factory(
        ldif_files=(BASE_LDIF, DEMO_LDIF, FIXTURES / "groups.ldif"), syncprov=False, service_unlimited=False
    )
    server.modify(f"dn: {READER_DN}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n"
                  f"cn: reader\nuserPassword: {ssha(READER_PASSWORD)}\n", add=True)  # fmt: skip
    server.modify_config(LOCKED_DOWN)
    # the roles' configuration (docs/snippets/ldapsync-mx.yaml): the whole base, groups included
    role = yaml.safe_load((SNIPPETS / "ldapsync-mx.yaml").read_text())
    cfg = tmp_path / "ldapsync.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "domain": role["domain"],
                "source": {
                    "ldap": {
                        "uri": server.uri,
                        "bind_dn": role["source"]["ldap"]["bind_dn"],
                        "bind_password_file": str(server.service_password_file),
                        "base_dn": role["source"]["ldap"]["base_dn"],
                    }
                },
                "groups": role["groups"],
                "state_dir": str(tmp_path / "state"),
                "exporters": [
                    {"kind": "postfix-recipients", "path": str(tmp_path / "recipients"), "map_type": "texthash"},
                    {"kind": "dovecot-passwd", "path": str(tmp_path / "mail-passwords")},
                ],
            }
        )
    )
    assert server.search("(cn=staff)", ["member"], bind="service") == []  # locked down: nothing readable

    server.modify_config((SNIPPETS / "slapd-ldapsync.ldif").read_text())

    staff = server.search("(cn=staff)", ["member"], bind="service")
    assert staff and len(staff[0].get("member")) == 6  # groups: readable as the roles search them
    synced = run_ldapsync(cfg, "--once")
    assert synced.returncode == 0, synced.stderr
    recipients = (tmp_path / "recipients").read_text()
    assert "staff@example.org\t" in recipients and "announce@example.org\t" in recipients
    assert "alice@example.org\t" in recipients
    assert "alice:" in (tmp_path / "mail-passwords").read_text()
    # mailPassword: the service account only
    assert "mailPassword" not in search_as(server, READER_DN, READER_PASSWORD, "(uid=alice)", "mailPassword")
    anon = server.search("(uid=alice)", ["mailPassword"], bind="anonymous")
    assert not anon or "mailPassword" not in anon[0]
