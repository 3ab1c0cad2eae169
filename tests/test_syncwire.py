"""The syncrepl stream decoded by syncwire (ldapsync.ber) against ldap3's decoder of the same
bytes from a real slapd, whatever the chunking; malformed bytes end in WireError, never in
another exception or a message that was not sent."""

from __future__ import annotations

import contextlib
import random
import re
import socket
from collections.abc import Callable
from typing import Any

import ldap3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldap3.utils.asn1 import decode_message_fast
from slapd import Slapd

from ldapsync import ber, ldapsource, syncrepl, syncwire
from ldapsync.config import LdapSource
from ldapsync.mirror import Mirror
from ldapsync.schema import PRESETS

ATTRS = PRESETS["ud-ldap"]
WANTED = ATTRS.ldap_attributes()
BINARY_USER = (
    "dn: uid=binary,ou=users,dc=example,dc=org\nobjectClass: account\nobjectClass: ldapsyncMailAccount\n"
    "uid: binary\nmailPassword:: /+4A\nemailForward: binary@elsewhere.example\n"
)


def source(server: Slapd) -> LdapSource:
    return LdapSource(
        uris=(server.uri,),
        base_dn=server.suffix,
        bind_dn=server.service_dn,
        bind_password_file=server.service_password_file,
        timeout=5,
    )


Stage = tuple[Callable[[syncrepl.Message], bool], Callable[[], None] | None]


def capture(server: Slapd, mode: syncrepl.Mode, stages: list[Stage]) -> tuple[int, bytes]:
    """(message id, every byte slapd sent) of a sync search: read until the first stage's
    predicate holds for a message, run its action, go on with the next stage."""
    cfg = source(server)
    connected = ldapsource.connect(cfg, raw=True)
    sock: socket.socket = connected.conn.socket
    mid = connected.conn.server.next_message_id()
    request = syncrepl.SyncConsumer().request(mode)
    sock.sendall(syncwire.search_request(mid, cfg.base_dn, 2, ldapsource.filter_ber(cfg), WANTED, request))
    reader = syncwire.Reader(mid, WANTED)
    received = bytearray()
    sock.settimeout(10)
    try:
        while stages:
            data = sock.recv(65536)
            assert data, "slapd closed the sync search"
            received += data
            for m in reader.feed(data):
                if stages and stages[0][0](m):
                    _, action = stages.pop(0)
                    if action is not None:
                        action()
        return mid, bytes(received)
    finally:
        connected.close()


def by_ldap3(data: bytes) -> list[syncrepl.Message]:
    """The same bytes through ldap3's decoder, translated as the follower did before syncwire."""
    strategy = ldap3.Connection(ldap3.Server("ldap://unused.invalid"), check_names=False).strategy
    out: list[syncrepl.Message] = []
    i = 0
    while i < len(data):
        size = ber.message_length(data, i, len(data))
        item: dict[str, Any] = strategy.decode_response_fast(decode_message_fast(data[i : i + size]))
        i += size
        controls = {oid: c.get("value") or b"" for oid, c in (item.get("controls") or {}).items()}
        kind = item["type"]
        if kind == "searchResEntry":
            out.append(syncrepl.SearchEntry(item["dn"], item["raw_attributes"], controls))
        elif kind == "intermediateResponse":
            out.append(syncrepl.IntermediateResponse(item.get("responseName"), item.get("responseValue")))
        elif kind == "searchResRef":
            out.append(syncrepl.SearchReference(tuple(item.get("uri") or ())))
        else:
            out.append(syncrepl.SearchDone(int(item["result"]), str(item.get("message") or ""), controls))
    return out


def mirrored(messages: list[syncrepl.Message], mode: syncrepl.Mode) -> tuple[Mirror, list[type]]:
    """A fresh mirror after `messages` (as the follower applies them) and the event types seen."""
    consumer = syncrepl.SyncConsumer()
    consumer.request(mode)
    mirror, kinds = Mirror(), []
    for message in messages:
        for ev in consumer.receive(message):
            kinds.append(type(ev))
            if isinstance(ev, syncrepl.EntryChanged):
                mirror.upsert(ev.uuid, ev.dn, ev.attributes, WANTED)
            elif isinstance(ev, syncrepl.EntryDeleted):
                mirror.delete(ev.uuid)
            elif isinstance(ev, syncrepl.CookieChanged):
                mirror.set_cookie(ev.cookie)
    return mirror, kinds


def assert_same_mirror(ours: Mirror, theirs: Mirror) -> None:
    a, cookie_a = ours.snapshot()
    b, cookie_b = theirs.snapshot()
    assert a.entries == b.entries and cookie_a == cookie_b
    assert sorted(map(str, a.rejections)) == sorted(map(str, b.rejections))
    assert a.digest() == b.digest()


@pytest.fixture
def refresh_only(slapd: Slapd) -> tuple[int, bytes]:
    slapd.modify(BINARY_USER, add=True)
    return capture(slapd, syncrepl.Mode.REFRESH_ONLY, [(lambda m: isinstance(m, syncrepl.SearchDone), None)])


@pytest.mark.slapd
def test_refresh_decodes_to_what_ldap3_decodes(refresh_only: tuple[int, bytes]) -> None:
    """Demo and hostile data and a value that is not UTF-8: the same mirror, rejections, cookie."""
    mid, data = refresh_only
    ours = syncwire.Reader(mid, WANTED).feed(data)
    theirs = by_ldap3(data)
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    assert len(ours) > 50 and isinstance(ours[-1], syncrepl.SearchDone)
    for a, b in zip(ours, theirs, strict=True):
        if isinstance(a, syncrepl.SearchEntry):
            assert isinstance(b, syncrepl.SearchEntry) and (a.dn, a.controls) == (b.dn, b.controls)
        else:
            assert a == b
    mirror, kinds = mirrored(ours, syncrepl.Mode.REFRESH_ONLY)
    assert_same_mirror(mirror, mirrored(theirs, syncrepl.Mode.REFRESH_ONLY)[0])
    assert syncrepl.RefreshComplete in kinds and mirror.cookie
    [binary] = [e for e in mirror.snapshot()[0].entries if e.dn.startswith("uid=binary,")]
    assert "mailpassword" not in binary.attributes and binary.attributes["emailforward"]


@pytest.mark.slapd
def test_refresh_and_persist_decode_to_what_ldap3_decodes(slapd: Slapd) -> None:
    """The refresh's end (a Sync Info message), then a modify, a rename and a delete in the
    persist stage: the same mirror through either decoder."""

    def changes() -> None:
        slapd.modify(
            "dn: uid=alice,ou=users,dc=example,dc=org\nchangetype: modify\n"
            "replace: emailForward\nemailForward: alice@persist.example\n"
        )
        slapd.modify(
            "dn: uid=bob,ou=users,dc=example,dc=org\nchangetype: modrdn\nnewrdn: uid=robert\ndeleteoldrdn: 0\n"
        )
        slapd.modify(BINARY_USER, add=True)
        slapd.modify("dn: uid=binary,ou=users,dc=example,dc=org\nchangetype: delete\n")

    def binary_deleted(m: syncrepl.Message) -> bool:
        if not isinstance(m, syncrepl.SearchEntry) or not m.dn.startswith("uid=binary,"):
            return False
        return syncrepl.decode_sync_state(m.controls[syncrepl.SYNC_STATE_OID]).state is syncrepl.StateKind.DELETE

    refreshed: Stage = (lambda m: isinstance(m, syncrepl.IntermediateResponse), changes)
    mid, data = capture(slapd, syncrepl.Mode.REFRESH_AND_PERSIST, [refreshed, (binary_deleted, None)])
    ours = syncwire.Reader(mid, WANTED).feed(data)
    mirror, kinds = mirrored(ours, syncrepl.Mode.REFRESH_AND_PERSIST)
    assert_same_mirror(mirror, mirrored(by_ldap3(data), syncrepl.Mode.REFRESH_AND_PERSIST)[0])
    assert kinds.index(syncrepl.RefreshComplete) < kinds.index(syncrepl.EntryDeleted)
    entries = {e.dn: e for e in mirror.snapshot()[0].entries}
    assert entries["uid=alice,ou=users,dc=example,dc=org"].attributes["emailforward"] == ("alice@persist.example",)
    assert "uid=robert,ou=users,dc=example,dc=org" in entries and "uid=bob,ou=users,dc=example,dc=org" not in entries
    assert not any(dn.startswith("uid=binary,") for dn in entries)


@pytest.mark.slapd
def test_chunking_does_not_change_the_messages(refresh_only: tuple[int, bytes]) -> None:
    mid, data = refresh_only
    whole = syncwire.Reader(mid, WANTED).feed(data)
    rng = random.Random(4533)
    for sizes in ([1], [2, 3, 5, 7], [rng.randrange(1, 4000) for _ in range(50)]):
        reader, got, i, k = syncwire.Reader(mid, WANTED), [], 0, 0
        while i < len(data):
            n = sizes[k % len(sizes)]
            got += reader.feed(data[i : i + n])
            i, k = i + n, k + 1
        assert got == whole and reader.pending == 0


@pytest.mark.slapd
def test_mangled_bytes_end_in_wire_error_or_in_what_a_consumer_refuses(refresh_only: tuple[int, bytes]) -> None:
    """Any byte of the stream changed, or the stream cut anywhere: the reader raises WireError
    or returns messages, and the consumer then takes them or raises SyncProtocolError."""
    mid, data = refresh_only
    rng = random.Random(2026)
    for _ in range(400):
        mangled = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        try:
            messages = syncwire.Reader(mid, WANTED).feed(bytes(mangled[: rng.randrange(len(mangled) + 1)]))
        except syncwire.WireError:
            continue
        consumer = syncrepl.SyncConsumer()
        consumer.request(syncrepl.Mode.REFRESH_ONLY)
        mirror = Mirror()
        try:
            for message in messages:
                for ev in consumer.receive(message):
                    if isinstance(ev, syncrepl.EntryChanged):
                        mirror.upsert(ev.uuid, ev.dn, ev.attributes, WANTED)
        except syncrepl.SyncProtocolError:
            continue


def message(mid: int, op: int, content: bytes, controls: bytes = b"") -> bytes:
    return ber.tlv(0x30, ber.integer(0x02, mid) + ber.tlv(op, content) + (ber.tlv(0xA0, controls) if controls else b""))


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_garbage_is_a_wire_error(data: bytes) -> None:
    with contextlib.suppress(syncwire.WireError):
        syncwire.Reader(5, WANTED).feed(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (message(6, ber.SEARCH_RES_DONE, ber.integer(0x0A, 0) + b"\x04\x00\x04\x00"), "message id 6 (expected 5)"),
        (message(5, 0x61, ber.integer(0x0A, 0) + b"\x04\x00\x04\x00"), "operation 0x61"),
        (message(5, ber.INTERMEDIATE_RESP, b"\x81\x01x\x80\x01y"), "malformed intermediate response"),
        (b"\x30\x84\x10\x00\x00\x00", "not believed"),
        (b"\x31\x03\x02\x01\x05", "LDAPMessage expected"),
        (message(5, ber.SEARCH_RES_ENTRY, b"\x04\x01x\x30\x05\x30\x03\x04\x01a"), "malformed LDAP message"),
    ],
    ids=["other id", "other operation", "intermediate out of order", "huge length", "not LDAP", "malformed entry"],
)
def test_what_is_not_a_response_of_this_search_is_named(data: bytes, reason: str) -> None:
    with pytest.raises(syncwire.WireError, match=re.escape(reason)):
        syncwire.Reader(5, WANTED).feed(data)


def test_intermediate_response_name_and_value_are_optional() -> None:
    info = syncrepl.encode_sync_info(syncrepl.SyncInfoNewCookie(b"c1"))
    full = message(5, ber.INTERMEDIATE_RESP, ber.tlv(0x80, syncrepl.SYNC_INFO_OID.encode()) + ber.tlv(0x81, info))
    empty = message(5, ber.INTERMEDIATE_RESP, b"")
    assert syncwire.Reader(5, WANTED).feed(full + empty) == [
        syncrepl.IntermediateResponse(syncrepl.SYNC_INFO_OID, info),
        syncrepl.IntermediateResponse(None, None),
    ]


def test_search_request_carries_the_critical_sync_request_control() -> None:
    value = syncrepl.encode_sync_request(syncrepl.Mode.REFRESH_AND_PERSIST, b"rid=000,csn=1")
    data = syncwire.search_request(9, "ou=users,dc=example,dc=org", 2, b"\x87\x0bobjectClass", ["uid"], value)
    msg = ber.frame(data, 0, len(data))
    assert (msg.message_id, msg.op) == (9, ber.SEARCH_REQUEST)
    assert msg.controls is not None
    assert data[msg.controls[0] : msg.controls[1]] == ber.control(syncrepl.SYNC_REQUEST_OID, True, value)
