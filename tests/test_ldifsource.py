"""The offline LDIF source: same Snapshot as LDAP would give, errors naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldapsync import ldifsource, schema
from ldapsync.config import LdifSource
from ldapsync.errors import SourceError

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
BASE_LDIF = REPO / "fixtures" / "ldif" / "base.ldif"
ATTRS = schema.resolve("ud-ldap", {}, file=Path("test.yaml"))


def test_reads_demo_with_only_the_mapped_attributes() -> None:
    snap = ldifsource.read(LdifSource(DEMO_LDIF, "ou=users,dc=example,dc=org"), ATTRS)
    assert snap.source == f"ldif:{DEMO_LDIF}"
    dns = [e.dn for e in snap.entries]
    assert "uid=alice,ou=users,dc=example,dc=org" in dns and dns == sorted(dns, key=str.lower)
    wanted = {a.lower() for a in ATTRS.ldap_attributes()}
    for e in snap.entries:
        assert set(e.attributes) <= wanted, e.dn  # cn, sn, objectClass are not carried along
    carol = next(e for e in snap.entries if e.dn.startswith("uid=carol,"))
    assert len(carol.get("emailForward")) == 2


def test_base_dn_limits_the_entries(tmp_path: Path) -> None:
    ldif = tmp_path / "all.ldif"
    ldif.write_text(BASE_LDIF.read_text() + "\n" + DEMO_LDIF.read_text())
    everything = ldifsource.read(LdifSource(ldif), ATTRS)
    users = ldifsource.read(LdifSource(ldif, "OU=Users, dc=example,dc=org"), ATTRS)  # DN compared normalised
    assert any("ou=services" in e.dn for e in everything.entries)
    assert not any("ou=services" in e.dn for e in users.entries)
    assert {e.dn for e in users.entries} >= {
        e.dn for e in everything.entries if e.dn.endswith(",ou=users,dc=example,dc=org")
    }


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=str(tmp_path / "nope.ldif")):
        ldifsource.read(LdifSource(tmp_path / "nope.ldif"), ATTRS)


def test_malformed_ldif_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ldif"
    bad.write_text(
        "dn: uid=a,ou=users,dc=example,dc=org\nuid: a\n\ndn: uid=b,ou=users,dc=example,dc=org\nuid:: !!!notbase64\n"
    )
    with pytest.raises(SourceError) as err:
        ldifsource.read(LdifSource(bad), ATTRS)
    assert str(bad) in str(err.value) and "line" in str(err.value)


def test_invalid_utf8_value_is_rejected_not_decoded(tmp_path: Path) -> None:
    ldif = tmp_path / "u.ldif"
    ldif.write_text("dn: uid=x,ou=users,dc=example,dc=org\nuid: x\nemailForward:: /w==\n")  # b"\xff"
    snap = ldifsource.read(LdifSource(ldif), ATTRS)
    assert snap.entries[0].get("emailForward") == ()
    assert [(r.dn, r.attribute) for r in snap.rejections] == [("uid=x,ou=users,dc=example,dc=org", "emailForward")]


def test_rfc2849_folding_base64_comments_and_version() -> None:
    text = (
        b"version: 1\r\n"
        b"# a comment\n"
        b"#  folded comment\n"
        b"dn: uid=f,ou=users,\n"
        b" dc=example,dc=org\n"
        b"uid:f\n"
        b"emailForward:: Zm9yd2FyZEBleGFtcGxlLm5ldA==\n"
        b"description: a long\n"
        b"  value\n"
        b"\n\n"
        b"dn:: dWlkPWfDvCxkYz1vcmc=\n"
        b"cn;lang-de: G\xc3\xbc\n"
    )
    assert list(ldifsource.parse(text.splitlines(keepends=True))) == [
        (
            "uid=f,ou=users,dc=example,dc=org",
            {"uid": [b"f"], "emailForward": [b"forward@example.net"], "description": [b"a long value"]},
        ),
        ("uid=gü,dc=org", {"cn;lang-de": ["Gü".encode()]}),
    ]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (b"uid: a\n", 1, "must start with dn:"),
        (b"dn: uid=a\nchangetype: add\nuid: a\n", 2, "change records are not supported"),
        (b"dn: uid=a\nuid:< file:///etc/shadow\n", 2, "URL values"),
        (b"dn: uid=a\n\n dangling\n", 3, "continuation line"),
        (b"version: 2\ndn: uid=a\n", 1, "version 1"),
        (b"dn: uid=a\nno colon here\n", 2, "not an `attribute: value` line"),
    ],
)
def test_what_is_not_a_content_record_is_an_error_naming_the_line(text: bytes, line: int, message: str) -> None:
    with pytest.raises(ldifsource.LdifSyntaxError, match=message) as err:
        list(ldifsource.parse(text.splitlines(keepends=True)))
    assert err.value.line == line
