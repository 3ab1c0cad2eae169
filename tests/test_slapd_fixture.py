"""The throwaway slapd reproduces what matters to ldapsync (ACLs, limits, syncprov)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import ldap3
import pytest
from slapd import (
    BASE_LDIF,
    GENERATED_USER_PASSWORD,
    LdapEntry,
    Slapd,
    SlapdError,
    generate_users_ldif,
    parse_ldif,
)

pytestmark = pytest.mark.slapd

SIZELIMIT_EXCEEDED = 4


def _by_uid(entries: list[LdapEntry]) -> dict[str, LdapEntry]:
    return {e["uid"][0]: e for e in entries}


def test_service_account_binds_and_reads_mail_password(slapd: Slapd) -> None:
    server = ldap3.Server(slapd.uri, get_info=ldap3.NONE)
    # no `with`: ldap3's context manager leaves an auto_bind connection open
    conn = ldap3.Connection(server, slapd.service_dn, slapd.service_password, auto_bind=True)
    try:
        conn.search(slapd.users_dn, "(uid=alice)", attributes=["mailPassword", "uid"])
        assert conn.result["result"] == 0
        [entry] = conn.entries
        assert str(entry.mailPassword.value).startswith("$6$")
    finally:
        conn.unbind()
    # the same through ldapsearch, and the password file is usable as-is (ldap* -y)
    users = _by_uid(slapd.search("(uid=pw-*)", ["uid", "mailPassword"], bind="service"))
    assert users["pw-argon2id"]["mailPassword"][0].startswith("{ARGON2ID}$argon2id$")
    assert users["pw-yescrypt"]["mailPassword"][0].startswith("$y$")
    assert len(users) == 9
    assert oct(slapd.service_password_file.stat().st_mode & 0o777) == "0o600"


def test_anonymous_cannot_read_passwords(slapd: Slapd) -> None:
    entries = slapd.search("(uid=alice)", ["mailPassword", "userPassword", "uid"], bind="anonymous")
    assert [e.dn for e in entries] == [f"uid=alice,{slapd.users_dn}"]
    assert "mailPassword" not in entries[0]
    svc = slapd.search("(cn=ldapsync)", ["userPassword"], bind="anonymous")
    assert svc and "userPassword" not in svc[0]
    # and anonymous cannot even filter on it
    assert slapd.search("(mailPassword=*)", ["uid"], bind="anonymous") == []


def test_wrong_service_password_is_rejected(slapd: Slapd) -> None:
    server = ldap3.Server(slapd.uri, get_info=ldap3.NONE)
    conn = ldap3.Connection(server, slapd.service_dn, "wrong")
    try:
        assert not conn.bind()
        assert conn.result["result"] == 49  # invalidCredentials
    finally:
        conn.unbind()


def test_hostile_values_survive_the_round_trip(slapd: Slapd) -> None:
    users = _by_uid(slapd.search("(uid=*)", ["uid", "emailForward", "mailPassword"]))
    assert users["h-fwd-newline"]["emailForward"] == ["victim@example.org\nroot@example.org attacker@evil.example"]
    assert users["h-fwd-nul"]["emailForward"][0].count("\x00") == 1
    assert "bad\nuser" in users and "bad:user" in users and "bad user" in users
    assert users["carol"]["emailForward"] == ["carol@one.example", "carol@two.example"]


@pytest.mark.parametrize("paged", [False, True], ids=["plain", "paged"])
def test_default_size_limit_hits_the_service_account(slapd_factory: Callable[..., Slapd], paged: bool) -> None:
    slapd = slapd_factory(ldif_files=[], extra_ldif=_base_plus_users(600), service_unlimited=False, syncprov=False)
    args = ["-E", "pr=100/noprompt"] if paged else []
    proc = slapd.ldapsearch(*args, "(objectClass=inetOrgPerson)", "1.1", bind="service")
    assert proc.returncode == SIZELIMIT_EXCEEDED, proc.stderr
    assert len(parse_ldif(proc.stdout)) == 500
    # the rootdn is not limited: a test binding as root would hide the bug
    root = slapd.ldapsearch("(objectClass=inetOrgPerson)", "1.1", bind="root")
    assert root.returncode == 0 and len(parse_ldif(root.stdout)) == 600


def test_service_unlimited_returns_everything(slapd_factory: Callable[..., Slapd]) -> None:
    slapd = slapd_factory(ldif_files=[], extra_ldif=_base_plus_users(600))
    for args in ([], ["-E", "pr=100/noprompt"]):
        proc = slapd.ldapsearch(*args, "(objectClass=inetOrgPerson)", "uid", bind="service")
        assert proc.returncode == 0, proc.stderr
        assert len(parse_ldif(proc.stdout)) == 600
    # generated users: forward on odd numbers only, {SSHA} of GENERATED_USER_PASSWORD
    users = _by_uid(slapd.search("(|(uid=user000000)(uid=user000001))", ["uid", "emailForward", "mailPassword"]))
    assert "emailForward" not in users["user000000"]
    assert users["user000001"]["emailForward"] == ["user000001@elsewhere.example"]
    raw = base64.b64decode(users["user000001"]["mailPassword"][0].removeprefix("{SSHA}"))
    assert hashlib.sha1(GENERATED_USER_PASSWORD.encode() + raw[20:]).digest() == raw[:20]


def test_stop_start_keeps_data_and_modify_works(slapd: Slapd) -> None:
    slapd.modify(
        f"dn: uid=bob,{slapd.users_dn}\nchangetype: modify\nreplace: emailForward\nemailForward: bob@new.example\n"
    )
    slapd.modify(generate_users_ldif(1, start=42), add=True)
    slapd.modify(f"dn: uid=dave,{slapd.users_dn}\nchangetype: delete\n", ldapi=False)
    slapd.stop()
    assert not slapd.running
    slapd.start()
    users = _by_uid(slapd.search("(objectClass=ldapsyncMailAccount)", ["uid", "emailForward"]))
    assert users["bob"]["emailForward"] == ["bob@new.example"]
    assert "user000042" in users and "dave" not in users
    slapd.kill()
    slapd.restart()
    assert slapd.search("(uid=user000042)", ["uid"])


def test_modify_failure_raises_with_stderr(slapd: Slapd) -> None:
    with pytest.raises(SlapdError, match="No such object"):
        slapd.modify(f"dn: uid=nobody,{slapd.users_dn}\nchangetype: delete\n")


@pytest.mark.parametrize("syncprov", [True, False])
def test_syncprov_flag(slapd_factory: Callable[..., Slapd], syncprov: bool) -> None:
    slapd = slapd_factory(ldif_files=[], extra_ldif=_base_plus_users(3), syncprov=syncprov)
    proc = slapd.ldapsearch("-E", "!sync=ro", "(uid=user*)", "uid", bind="service")
    if syncprov:
        assert proc.returncode == 0, proc.stderr
        assert len(parse_ldif(proc.stdout)) == 3
    else:
        assert proc.returncode != 0  # critical sync control not supported


@pytest.mark.parametrize("sessionlog", [None, 500])
def test_syncprov_sessionlog_is_a_parameter(slapd_factory: Callable[..., Slapd], sessionlog: int | None) -> None:
    slapd = slapd_factory(ldif_files=[], extra_ldif=_base_plus_users(3), sessionlog=sessionlog)
    # the overlay's entry as slapd loaded it from its cn=config directory
    [overlay] = (slapd.config_dir / "cn=config" / "olcDatabase={1}mdb").glob("olcOverlay={0}syncprov.ldif")
    logs = [line for line in overlay.read_text().splitlines() if line.startswith("olcSpSessionlog:")]
    assert logs == ([] if sessionlog is None else [f"olcSpSessionlog: {sessionlog}"])
    proc = slapd.ldapsearch("-E", "!sync=ro", "(uid=user*)", "uid", bind="service")
    assert proc.returncode == 0, proc.stderr
    assert len(parse_ldif(proc.stdout)) == 3


def _base_plus_users(n: int) -> str:
    return BASE_LDIF.read_text() + "\n" + generate_users_ldif(n)


def test_database_size_is_a_parameter(slapd_factory: Callable[..., Slapd]) -> None:
    users = generate_users_ldif(2000)
    with pytest.raises(SlapdError, match="size limit reached"):
        slapd_factory(ldif_files=[BASE_LDIF], extra_ldif=users, db_max_size=1 << 20)
    slapd = slapd_factory(ldif_files=[BASE_LDIF], extra_ldif=users, db_max_size=16 << 20)
    assert [e["uid"] for e in slapd.search("(uid=user001999)", ["uid"])] == [["user001999"]]
