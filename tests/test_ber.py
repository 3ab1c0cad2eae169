"""The fast read path: ldapsync.ber's codec, and ldapsource's paged search built on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ldap3
import pytest
from ldap3.operation.search import search_operation
from ldap3.protocol.convert import build_controls_list
from ldap3.protocol.rfc2696 import paged_search_control
from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
from ldap3.utils.asn1 import encode as asn1_encode
from slapd import Slapd, generate_users_ldif

from ldapsync import ber, ldapsource
from ldapsync.config import LdapSource
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry, sort_entries
from ldapsync.errors import ConfigError, SourceError
from ldapsync.schema import AttributeMap

KEEP = frozenset({"uid", "emailforward", "mailpassword", "entryuuid"})


def entry_op(dn: bytes, attrs: list[tuple[bytes, list[bytes]]]) -> bytes:
    """searchResEntry content, encoded independently of the decoder under test."""
    body = b"".join(
        ber.tlv(0x30, ber.tlv(0x04, name) + ber.tlv(0x31, b"".join(ber.tlv(0x04, v) for v in values)))
        for name, values in attrs
    )
    return ber.tlv(0x04, dn) + ber.tlv(0x30, body)


def message(mid: int, op: int, content: bytes, controls: bytes = b"") -> bytes:
    return ber.tlv(0x30, ber.integer(0x02, mid) + ber.tlv(op, content) + (ber.tlv(0xA0, controls) if controls else b""))


def done(code: int = 0, text: bytes = b"", cookie: bytes | None = b"") -> tuple[bytes, bytes]:
    """searchResDone content and its controls."""
    result = ber.integer(0x0A, code) + ber.tlv(0x04, b"") + ber.tlv(0x04, text)
    ctrl = b"" if cookie is None else ber.paged_control(0, cookie)
    return result, ctrl


def decode(content: bytes, keep: frozenset[str] | None = KEEP) -> tuple[str, dict[str, tuple[str, ...]], list[str]]:
    return ber.decode_entry(content, 0, len(content), keep, {})


# ------------------------------------------------------------------------------ codec
def test_entry_values_multi_valued_large_and_non_ascii_survive() -> None:
    big = b"x" * 200_000  # three-byte long-form lengths at every level
    content = entry_op(
        "uid=zoë,ou=users,dc=example,dc=org".encode(),
        [
            (b"uid", [b"zo\xc3\xab"]),
            (b"emailForward", [b"a@x.example", b"b@y.example", big]),
            (b"mailPassword", [b"{SSHA}abc"]),
            (b"entryUUID", [b"6f1c0e2a-0000-4000-8000-000000000001"]),
        ],
    )
    dn, attrs, bad = decode(content)
    assert dn == "uid=zoë,ou=users,dc=example,dc=org"
    assert attrs == {
        "uid": ("zoë",),
        "emailforward": ("a@x.example", "b@y.example", big.decode()),
        "mailpassword": ("{SSHA}abc",),
        "entryuuid": ("6f1c0e2a-0000-4000-8000-000000000001",),
    }
    assert bad == []


def test_invalid_utf8_values_are_dropped_and_named_the_rest_kept() -> None:
    content = entry_op(b"uid=bin,dc=x", [(b"emailForward", [b"ok@x.example", b"\xff\xfe\x00bad", b"\xc3"])])
    _, attrs, bad = decode(content)
    assert attrs == {"emailforward": ("ok@x.example",)}
    assert bad == ["emailForward", "emailForward"]


def test_only_wanted_attributes_are_decoded_names_case_folded() -> None:
    content = entry_op(
        b"uid=a,dc=x",
        [(b"UID", [b"a"]), (b"jpegPhoto", [b"\xff\xd8\xff binary"]), (b"cn;lang-de", [b"A"]), (b"EmailForward", [])],
    )
    _, attrs, bad = decode(content)
    assert attrs == {"uid": ("a",)}  # binary photo never decoded, option subtypes not confused
    assert bad == []
    assert decode(content, None)[1]["cn;lang-de"] == ("A",)


def test_a_repeated_attribute_keeps_all_values() -> None:
    content = entry_op(b"uid=a,dc=x", [(b"emailForward", [b"a@x"]), (b"emailforward", [b"b@x"])])
    assert decode(content)[1] == {"emailforward": ("a@x", "b@x")}


@pytest.mark.parametrize(
    "content",
    [
        b"",  # nothing
        b"\x04\x05uid=a",  # no attribute list
        b"\x04\x7fuid=a\x30\x00",  # DN longer than the entry
        entry_op(b"dn", [(b"uid", [b"a"])])[:-1],  # truncated value
        b"\x04\x02dn" + b"\x30\x07" + b"\x30\x05\x04\x01a\x30\x00",  # values not a SET
        b"\x04\x02dn" + b"\x30\x0b" + b"\x30\x09\x04\x03uid\x31\x02\x02\x00",  # value not an OCTET STRING
    ],
)
def test_malformed_entries_are_rejected(content: bytes) -> None:
    with pytest.raises((ber.BerError, IndexError)):
        ber.decode_entry(content, 0, len(content), KEEP, {})


def test_search_request_is_byte_identical_to_ldap3s_encoding() -> None:
    """Same bytes as ldap3 would send: the hand-rolled encoder cannot drift from the protocol."""
    base, filt, attrs, cookie = (
        "ou=users,dc=example,dc=org",
        "(&(objectClass=*)(uid=a\\2a*))",
        ["uid", "entryUUID"],
        b"\x01\x02",
    )
    request = search_operation(base, filt, ldap3.SUBTREE, ldap3.DEREF_NEVER, attrs, 0, 0, False, True, True)
    msg = LDAPMessage()
    msg["messageID"] = MessageID(7)
    msg["protocolOp"] = ProtocolOp().setComponentByName("searchRequest", request)
    msg["controls"] = build_controls_list([paged_search_control(False, 1000, cookie)])
    expected = bytes(asn1_encode(msg))
    filter_ber = bytes(asn1_encode(request["filter"]))
    ours = ber.search_request(7, base, 2, 0, filter_ber, attrs, [ber.paged_control(1000, cookie)])
    assert ours == expected


def test_scan_frames_the_same_stream_whatever_the_chunking() -> None:
    entries = [entry_op(f"uid=u{i},dc=x".encode(), [(b"uid", [f"u{i}".encode()])]) for i in range(50)]
    result, ctrl = done(cookie=b"next")
    stream = b"".join(message(3, ber.SEARCH_RES_ENTRY, e) for e in entries) + message(
        3, ber.SEARCH_RES_DONE, result, ctrl
    )
    for chunk in (1, 2, 7, 64, len(stream)):
        buf, pos, spans, msg = bytearray(), 0, [], None
        for k in range(0, len(stream), chunk):
            buf += stream[k : k + chunk]
            pos, msg = ber.scan(buf, pos, len(buf), 3, spans)
            if msg is not None:
                break
        assert msg is not None and msg.op == ber.SEARCH_RES_DONE and pos == len(stream)
        page = bytes(buf)
        assert [ber.decode_entry(page, s, e, KEEP, {})[0] for s, e in spans] == [f"uid=u{i},dc=x" for i in range(50)]
        res = ber.decode_result(page, msg)
        assert (res.code, ber.paged_cookie(res.controls[ber.PAGED_RESULTS])) == (0, b"next")


def test_scan_stops_at_a_message_of_another_id_or_kind() -> None:
    e = message(3, ber.SEARCH_RES_ENTRY, entry_op(b"uid=a", [(b"uid", [b"a"])]))
    ref = message(3, ber.SEARCH_RES_REF, ber.tlv(0x04, b"ldap://other/dc=x"))
    notice = message(0, ber.EXTENDED_RESP, ber.integer(0x0A, 52) + ber.tlv(0x04, b"") + ber.tlv(0x04, b"bye"))
    for stray, op in ((ref, ber.SEARCH_RES_REF), (notice, ber.EXTENDED_RESP)):
        stream = e + stray
        spans: list[tuple[int, int]] = []
        _, msg = ber.scan(stream, 0, len(stream), 3, spans)
        assert msg is not None and msg.op == op and len(spans) == 1
    assert ber.referral_urls(e + ref, ber.scan(e + ref, 0, len(e + ref), 3, [])[1]) == ("ldap://other/dc=x",)  # type: ignore[arg-type]


def test_result_with_error_and_referral_is_decoded() -> None:
    content = (
        ber.integer(0x0A, 10)
        + ber.tlv(0x04, b"dc=x")
        + ber.tlv(0x04, b"go away")
        + ber.tlv(0xA3, ber.tlv(0x04, b"ldap://b/"))
    )
    m = message(9, ber.SEARCH_RES_DONE, content)
    res = ber.decode_result(m, ber.frame(m, 0, len(m)))
    assert (res.code, res.matched_dn, res.message, res.referrals, res.controls) == (
        10,
        "dc=x",
        "go away",
        ("ldap://b/",),
        {},
    )


# ------------------------------------------------------------------------------ against slapd
ATTRS = AttributeMap(
    login="uid",
    forward="emailForward",
    alias="mailLocalAddress",
    mail_password="mailPassword",
    status="accountStatus",
    disable_message="mailDisableMessage",
)


def source(server: Slapd, **kw: object) -> LdapSource:
    cfg = LdapSource(
        uris=(server.uri,),
        base_dn=server.suffix,
        bind_dn=server.service_dn,
        bind_password_file=server.service_password_file,
        timeout=5,
    )
    return dataclasses.replace(cfg, **kw)  # type: ignore[arg-type]


def ldap3_search(connected: ldapsource.Connected, cfg: LdapSource, wanted: list[str]) -> Snapshot:
    """The same paged search decoded by ldap3 (its async strategy reads the socket itself)."""
    conn, uri = connected.conn, connected.uri
    rejections: list[Rejection] = []
    entries: list[Entry] = []
    cookie: bytes | None = None
    pages = 0
    while True:
        try:
            sent = conn.search(
                cfg.base_dn,
                cfg.filter,
                search_scope=ldapsource.SCOPES[cfg.scope],
                dereference_aliases=ldap3.DEREF_NEVER,
                attributes=wanted,
                paged_size=cfg.page_size,
                paged_cookie=cookie,
            )
            if conn.strategy.sync:
                result, response = conn.result or {}, conn.response or []
            else:  # async strategies return a message id
                response, result = conn.get_response(sent)
        except (ldap3.core.exceptions.LDAPException, OSError) as e:
            raise SourceError(f"{uri}: search failed after {pages} page(s), {len(entries)} entries: {e}") from e
        code = result.get("result")
        if code != 0:
            raise SourceError(
                f"{uri}: search of {cfg.base_dn} failed after {len(entries)} entries: "
                f"{result.get('description')} ({code}) {result.get('message') or ''}".rstrip()
            )
        pages += 1
        for item in response or ():
            kind = item.get("type")
            if kind == "searchResEntry":
                entries.append(make_entry(item["dn"], item["raw_attributes"], wanted, rejections))
            elif kind == "searchResRef":
                raise SourceError(f"{uri}: referral to {item.get('uri')} cannot be followed; refusing a partial read")
        control = (result.get("controls") or {}).get(ber.PAGED_RESULTS)
        cookie = control["value"]["cookie"] if control else None
        if not cookie:
            break
    return Snapshot(sort_entries(entries), f"ldap:{uri}", tuple(rejections))


def via_ldap3(cfg: LdapSource) -> Snapshot:
    """The same search through ldap3's own decoder."""
    connected = ldapsource.connect(cfg, client_strategy=ldap3.ASYNC)
    try:
        return ldap3_search(connected, cfg, ATTRS.ldap_attributes())
    finally:
        connected.conn.unbind()


@pytest.mark.slapd
def test_fast_path_reads_exactly_what_ldap3_reads(slapd: Slapd) -> None:
    """Demo + hostile data (invalid UTF-8, huge and odd values): same entries, same rejections."""
    slapd.modify(  # octetString syntax: slapd stores any bytes, here invalid UTF-8 next to a good value
        "dn: uid=binary,ou=users,dc=example,dc=org\nobjectClass: account\nobjectClass: ldapsyncMailAccount\n"
        "uid: binary\nmailPassword:: /+4A\nemailForward: binary@elsewhere.example\n",
        add=True,
    )
    cfg = source(slapd, page_size=3)
    fast = ldapsource.read(cfg, ATTRS)
    slow = via_ldap3(cfg)
    assert fast == slow
    assert len(fast.entries) > 20 and all(e.uuid for e in fast.entries)
    [binary] = [e for e in fast.entries if e.dn.startswith("uid=binary,")]
    assert binary.attributes == {"uid": ("binary",), "emailforward": ("binary@elsewhere.example",)}
    assert [(r.dn, r.attribute) for r in fast.rejections] == [(binary.dn, "mailPassword")]


@pytest.mark.slapd
def test_page_size_does_not_change_the_result(slapd_factory: Callable[..., Slapd]) -> None:
    server = slapd_factory(extra_ldif=generate_users_ldif(600))
    small = ldapsource.read(source(server, page_size=7), ATTRS)
    large = ldapsource.read(source(server, page_size=100000), ATTRS)
    assert small == large
    assert sum(1 for e in small.entries if e.dn.startswith("uid=user")) == 600


@pytest.mark.slapd
def test_size_limit_on_a_later_page_fails_the_whole_read(slapd_factory: Callable[..., Slapd]) -> None:
    server = slapd_factory(extra_ldif=generate_users_ldif(600), service_unlimited=False)
    with pytest.raises(SourceError, match=r"sizeLimitExceeded \(4\)"):
        ldapsource.read(source(server, page_size=100), ATTRS)


@pytest.mark.slapd
def test_connection_is_reusable_after_a_fast_search(slapd: Slapd) -> None:
    cfg = source(slapd)
    connected = ldapsource.connect(cfg)
    try:
        first = ldapsource.search(connected, cfg, ATTRS)
        assert ldapsource.search(connected, cfg, ATTRS) == first
        assert connected.conn.search(slapd.suffix, "(uid=alice)", attributes=["uid"]) and connected.conn.entries
    finally:
        connected.conn.unbind()


@pytest.mark.slapd
def test_bad_filter_names_the_config_key(slapd: Slapd) -> None:
    with pytest.raises(ConfigError, match=r"source\.ldap\.filter"):
        ldapsource.read(source(slapd, filter="(uid=a"), ATTRS)


@pytest.mark.slapd
def test_referral_fails_the_read(slapd: Slapd) -> None:
    slapd.modify(
        "dn: ou=elsewhere,dc=example,dc=org\nobjectClass: referral\nobjectClass: extensibleObject\n"
        "ou: elsewhere\nref: ldap://other.example/ou=elsewhere,dc=example,dc=org\n",
        add=True,
    )
    with pytest.raises(SourceError, match=r"referral to ldap://other\.example"):
        ldapsource.read(source(slapd), ATTRS)
