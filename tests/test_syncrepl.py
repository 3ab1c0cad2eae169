"""Tests for the sans-I/O RFC 4533 codec and consumer state machine.

The literal hex vectors are worked out by hand from the RFC 4533 ASN.1 module
(IMPLICIT TAGS), not produced by our encoder, so a bug shared by encoder and decoder
cannot hide behind a round trip.
"""

from __future__ import annotations

import contextlib
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples
from pyasn1.codec.ber import decoder as ber_decoder

from ldapsync import syncrepl
from ldapsync.syncrepl import (
    E_SYNC_REFRESH_REQUIRED,
    SYNC_DONE_OID,
    SYNC_INFO_OID,
    SYNC_STATE_OID,
    CookieChanged,
    EntryChanged,
    EntryDeleted,
    EntryPresent,
    Event,
    IntermediateResponse,
    Mode,
    Phase,
    RefreshComplete,
    RefreshRequired,
    SearchDone,
    SearchEntry,
    SearchFinished,
    SearchReference,
    StateKind,
    SyncConsumer,
    SyncDone,
    SyncInfo,
    SyncInfoIdSet,
    SyncInfoNewCookie,
    SyncInfoRefreshDelete,
    SyncInfoRefreshPresent,
    SyncProtocolError,
    SyncState,
    UnknownPresent,
    decode_sync_done,
    decode_sync_info,
    decode_sync_state,
    encode_sync_done,
    encode_sync_info,
    encode_sync_request,
    encode_sync_state,
    uuid_from_str,
    uuid_to_str,
)

U1_RAW = bytes(range(16))
U1 = "00010203-0405-0607-0809-0a0b0c0d0e0f"
U2_RAW = bytes(range(16, 32))
U2 = "10111213-1415-1617-1819-1a1b1c1d1e1f"
A, B, C, D, X = (str(uuid.UUID(int=i)) for i in (0xA, 0xB, 0xC, 0xD, 0xE))


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


# ------------------------------------------------------------------ literal vectors


class TestLiteralVectors:
    def test_refresh_and_persist_without_cookie_matches_openldap(self) -> None:
        assert encode_sync_request(Mode.REFRESH_AND_PERSIST, None) == h("30 03 0a 01 03")

    def test_refresh_only_with_cookie(self) -> None:
        expected = h("30 0c 0a 01 01 04 07") + b"rid=001"
        assert encode_sync_request(Mode.REFRESH_ONLY, b"rid=001") == expected

    def test_reload_hint_is_encoded_and_default_omitted(self) -> None:
        assert encode_sync_request(Mode.REFRESH_ONLY, None, True) == h("30 06 0a 01 01 01 01 ff")
        assert encode_sync_request(Mode.REFRESH_ONLY, None, False) == h("30 03 0a 01 01")

    def test_sync_state_add_without_cookie(self) -> None:
        data = h("30 15 0a 01 01 04 10") + U1_RAW
        assert decode_sync_state(data) == SyncState(StateKind.ADD, U1, None)
        assert encode_sync_state(SyncState(StateKind.ADD, U1)) == data

    def test_sync_state_delete_with_cookie(self) -> None:
        data = h("30 19 0a 01 03 04 10") + U2_RAW + h("04 02") + b"c1"
        assert decode_sync_state(data) == SyncState(StateKind.DELETE, U2, b"c1")

    def test_sync_state_all_states(self) -> None:
        for n, kind in enumerate(StateKind):
            data = h(f"30 15 0a 01 {n:02x} 04 10") + U1_RAW
            assert decode_sync_state(data).state is kind

    def test_sync_done_variants(self) -> None:
        assert decode_sync_done(h("30 00")) == SyncDone(None, False)
        assert decode_sync_done(h("30 03 01 01 ff")) == SyncDone(None, True)
        # BER: TRUE is any non-zero octet, and a DEFAULT value may be sent explicitly.
        assert decode_sync_done(h("30 03 01 01 01")) == SyncDone(None, True)
        assert decode_sync_done(h("30 07 04 02 63 32 01 01 00")) == SyncDone(b"c2", False)
        assert encode_sync_done(SyncDone(None, True)) == h("30 03 01 01 ff")
        assert encode_sync_done(SyncDone()) == h("30 00")

    def test_sync_info_new_cookie_is_implicit_primitive_0(self) -> None:
        assert decode_sync_info(h("80 02 63 33")) == SyncInfoNewCookie(b"c3")
        assert encode_sync_info(SyncInfoNewCookie(b"c3")) == h("80 02 63 33")

    def test_sync_info_refresh_delete_defaults_to_done(self) -> None:
        assert decode_sync_info(h("a1 00")) == SyncInfoRefreshDelete(None, True)
        assert encode_sync_info(SyncInfoRefreshDelete()) == h("a1 00")

    def test_sync_info_refresh_present(self) -> None:
        assert decode_sync_info(h("a2 03 01 01 00")) == SyncInfoRefreshPresent(None, False)
        data = h("a2 07 04 02 63 34 01 01 ff")
        assert decode_sync_info(data) == SyncInfoRefreshPresent(b"c4", True)
        # DER omits the DEFAULT TRUE.
        assert encode_sync_info(SyncInfoRefreshPresent(b"c4", True)) == h("a2 04 04 02 63 34")
        assert encode_sync_info(SyncInfoRefreshPresent(None, False)) == h("a2 03 01 01 00")

    def test_sync_info_id_set(self) -> None:
        data = h("a3 29 01 01 ff 31 24 04 10") + U1_RAW + h("04 10") + U2_RAW
        assert decode_sync_info(data) == SyncInfoIdSet((U1, U2), None, True)
        assert encode_sync_info(SyncInfoIdSet((U1, U2), None, True)) == data

    def test_sync_info_empty_id_set(self) -> None:
        assert decode_sync_info(h("a3 02 31 00")) == SyncInfoIdSet((), None, False)
        assert encode_sync_info(SyncInfoIdSet(())) == h("a3 02 31 00")

    def test_explicitly_tagged_sequence_is_rejected(self) -> None:
        # [2] EXPLICIT would wrap a universal SEQUENCE: the classic wrong encoding.
        with pytest.raises(SyncProtocolError, match="unexpected tag 0x30"):
            decode_sync_info(h("a2 05 30 03 01 01 00"))
        with pytest.raises(SyncProtocolError, match="unexpected tag 0x30"):
            decode_sync_info(h("a3 04 30 02 31 00"))

    def test_untagged_sequence_is_not_a_sync_info(self) -> None:
        with pytest.raises(SyncProtocolError, match="Sync Info"):
            decode_sync_info(h("30 03 01 01 00"))


class TestDecodeErrors:
    @pytest.mark.parametrize(
        ("data", "match"),
        [
            ("", "truncated"),
            ("30", "truncated"),
            ("30 15 0a 01 01 04 10" + "00" * 10, "truncated"),
            ("30 03 0a 01 01", "required component is missing"),
            ("30 08 0a 01 01 04 03 00 00 00", "16 bytes"),
            ("30 15 0a 01 07 04 10" + "00" * 16, "out of range"),
            ("30 15 0a 01 01 04 10" + "00" * 16 + "ff", "trailing"),
            ("04 02 12 34", "unexpected tag 0x04"),
        ],
    )
    def test_bad_sync_state(self, data: str, match: str) -> None:
        with pytest.raises(SyncProtocolError, match=match):
            decode_sync_state(h(data))

    def test_bad_uuid_in_id_set(self) -> None:
        with pytest.raises(SyncProtocolError, match="16 bytes"):
            decode_sync_info(h("a3 05 31 03 04 01 00"))

    def test_sync_done_rejects_sync_info_bytes(self) -> None:
        with pytest.raises(SyncProtocolError, match="Sync Done"):
            decode_sync_done(h("a1 00"))

    def test_error_is_value_error(self) -> None:
        assert issubclass(SyncProtocolError, ValueError)

    @settings(max_examples=examples(300))
    @given(st.binary(max_size=64))
    def test_garbage_only_raises_sync_protocol_error(self, data: bytes) -> None:
        for decode in (decode_sync_state, decode_sync_done, decode_sync_info):
            with contextlib.suppress(SyncProtocolError):
                decode(data)

    @settings(max_examples=examples(200))
    @given(st.binary(min_size=1, max_size=40), st.sampled_from(["30", "a1", "a2", "a3", "80"]))
    def test_framed_garbage_only_raises_sync_protocol_error(self, body: bytes, t: str) -> None:
        data = h(t) + bytes([len(body)]) + body
        for decode in (decode_sync_state, decode_sync_done, decode_sync_info):
            with contextlib.suppress(SyncProtocolError):
                decode(data)


# ---------------------------------------------------------------------- round trips

uuids = st.uuids().map(str)
cookies = st.none() | st.binary(max_size=300)


def decode_request(data: bytes) -> tuple[int, bytes | None, bool]:
    """Decode with an independent spec-level pyasn1 call (the module has no decoder)."""
    value, rest = ber_decoder.decode(data, asn1Spec=syncrepl._SYNC_REQUEST_VALUE.clone())
    assert rest == b""
    cookie = bytes(value["cookie"]) if value["cookie"].isValue else None
    return int(value["mode"]), cookie, bool(value["reloadHint"])


class TestRoundTrips:
    @given(st.sampled_from(Mode), cookies, st.booleans())
    def test_request(self, mode: Mode, cookie: bytes | None, reload_hint: bool) -> None:
        data = encode_sync_request(mode, cookie, reload_hint)
        assert decode_request(data) == (int(mode), cookie, reload_hint)

    @given(st.sampled_from(StateKind), uuids, cookies)
    def test_state(self, kind: StateKind, u: str, cookie: bytes | None) -> None:
        value = SyncState(kind, u, cookie)
        assert decode_sync_state(encode_sync_state(value)) == value

    @given(cookies, st.booleans())
    def test_done(self, cookie: bytes | None, deletes: bool) -> None:
        value = SyncDone(cookie, deletes)
        assert decode_sync_done(encode_sync_done(value)) == value

    @given(
        st.one_of(
            st.builds(SyncInfoNewCookie, st.binary(max_size=300)),
            st.builds(SyncInfoRefreshDelete, cookies, st.booleans()),
            st.builds(SyncInfoRefreshPresent, cookies, st.booleans()),
            st.builds(
                SyncInfoIdSet,
                st.lists(uuids, unique=True, max_size=40).map(lambda xs: tuple(sorted(xs))),
                cookies,
                st.booleans(),
            ),
        )
    )
    def test_info(self, value: SyncInfo) -> None:
        assert decode_sync_info(encode_sync_info(value)) == value

    @given(st.binary(min_size=16, max_size=16))
    def test_uuid_helpers(self, raw: bytes) -> None:
        text = uuid_to_str(raw)
        assert len(text) == 36 and text == text.lower() and text.count("-") == 4
        assert uuid_from_str(text) == raw
        assert uuid_from_str(text.upper()) == raw

    def test_uuid_helpers_reject_bad_input(self) -> None:
        with pytest.raises(ValueError, match="16 bytes"):
            uuid_to_str(b"short")
        with pytest.raises(ValueError, match="not a UUID"):
            uuid_from_str("nope")

    def test_decoded_values_are_frozen(self) -> None:
        value = decode_sync_done(h("30 00"))
        with pytest.raises(AttributeError):
            value.cookie = b"x"  # type: ignore[misc]
        assert not hasattr(value, "__dict__")


class TestFastDecoders:
    """The hand-written decoders of the common shapes must agree with pyasn1 wherever they
    answer, and leave everything else (long-form lengths, mangled bytes) to it."""

    @staticmethod
    def mangle(data: bytes, how: int, at: int, byte: int) -> bytes:
        if not data:
            return data
        at %= len(data)
        if how == 0:
            return data
        if how == 1:
            return data[:at] + bytes([byte]) + data[at + 1 :]
        if how == 2:
            return data[:at]
        return data + bytes([byte])

    @settings(max_examples=400)
    @given(
        st.one_of(
            st.builds(
                lambda k, u, c: encode_sync_state(SyncState(k, u, c)), st.sampled_from(StateKind), uuids, cookies
            ),
            st.builds(lambda c: encode_sync_info(SyncInfoNewCookie(c)), st.binary(max_size=200)),
            st.builds(lambda c, d: encode_sync_info(SyncInfoRefreshDelete(c, d)), cookies, st.booleans()),
            st.builds(lambda c, d: encode_sync_info(SyncInfoRefreshPresent(c, d)), cookies, st.booleans()),
            st.builds(
                lambda us, c, d: encode_sync_info(SyncInfoIdSet(us, c, d)),
                st.lists(uuids, max_size=5).map(tuple),
                cookies,
                st.booleans(),
            ),
        ),
        st.integers(0, 3),
        st.integers(0, 10_000),
        st.integers(0, 255),
    )
    def test_fast_and_full_decoders_agree(self, data: bytes, how: int, at: int, byte: int) -> None:
        data = self.mangle(data, how, at, byte)
        for fast, full in (
            (syncrepl._fast_sync_state, syncrepl._full_sync_state),
            (syncrepl._fast_sync_info, syncrepl._full_sync_info),
        ):
            got = fast(data)
            if got is not None:
                assert full(data) == got

    def test_long_form_lengths_decode_the_same(self) -> None:
        short = encode_sync_state(SyncState(StateKind.ADD, U1, b"c"))
        long = b"\x30\x81" + short[1:]
        assert syncrepl._full_sync_state(long) == decode_sync_state(long) == decode_sync_state(short)

    def test_uuid_text_is_what_uuid_module_renders(self) -> None:
        for raw in (U1_RAW, U2_RAW, bytes(16), b"\xff" * 16):
            assert uuid_to_str(raw) == str(uuid.UUID(bytes=raw))


# -------------------------------------------------------------- consumer helpers


def entry(
    dn: str,
    state: StateKind,
    u: str,
    cookie: bytes | None = None,
    **attrs: list[bytes],
) -> SearchEntry:
    control = encode_sync_state(SyncState(state, u, cookie))
    return SearchEntry(dn, attrs, {SYNC_STATE_OID: control})


def info(value: SyncInfo) -> IntermediateResponse:
    return IntermediateResponse(SYNC_INFO_OID, encode_sync_info(value))


def done(code: int = 0, sync_done: SyncDone | None = None, message: str = "") -> SearchDone:
    controls = {} if sync_done is None else {SYNC_DONE_OID: encode_sync_done(sync_done)}
    return SearchDone(code, message, controls)


def feed(consumer: SyncConsumer, *messages: syncrepl.Message) -> list[Event]:
    events: list[Event] = []
    for m in messages:
        events += consumer.receive(m)
    return events


def started(
    known: set[str] | None = None,
    cookie: bytes | None = b"c0",
    mode: Mode = Mode.REFRESH_AND_PERSIST,
) -> SyncConsumer:
    consumer = SyncConsumer(known or set(), cookie)
    consumer.request(mode)
    return consumer


def persisting(known: set[str], cookie: bytes = b"c0") -> SyncConsumer:
    consumer = started(known, cookie)
    assert feed(consumer, info(SyncInfoRefreshDelete(None, True))) == [RefreshComplete()]
    assert consumer.phase is Phase.PERSIST
    return consumer


# ----------------------------------------------------------------------- consumer


class TestRequest:
    def test_request_sends_current_cookie(self) -> None:
        consumer = SyncConsumer({A}, b"c0")
        assert consumer.phase is Phase.IDLE
        assert consumer.request(Mode.REFRESH_AND_PERSIST) == h("30 07 0a 01 03 04 02 63 30")
        assert consumer.phase in (Phase.REFRESH,)  # a tuple: mypy over-narrows the property

    def test_request_while_running_is_refused(self) -> None:
        consumer = started()
        with pytest.raises(SyncProtocolError, match="request"):
            consumer.request(Mode.REFRESH_ONLY)

    def test_receive_before_request(self) -> None:
        with pytest.raises(SyncProtocolError, match="before request"):
            SyncConsumer().receive(done())

    def test_known_is_normalised(self) -> None:
        assert SyncConsumer({A.upper()}).known == {A}


class TestPresentPhase:
    def test_unmentioned_known_entries_are_deleted(self) -> None:
        consumer = started({A, B, C})
        events = feed(
            consumer,
            entry("uid=a", StateKind.PRESENT, A),
            entry("uid=d", StateKind.ADD, D, mail=[b"d@example.org"]),
            info(SyncInfoIdSet((B,), None, refresh_deletes=False)),
            info(SyncInfoRefreshPresent(b"c1", refresh_done=True)),
        )
        assert events == [
            EntryPresent(A, "uid=a"),
            EntryChanged(D, "uid=d", {"mail": (b"d@example.org",)}),
            EntryPresent(B, None),
            EntryDeleted(C, None),
            CookieChanged(b"c1"),
            RefreshComplete(),
        ]
        assert consumer.known == {A, B, D}
        assert consumer.cookie == b"c1"
        assert consumer.phase is Phase.PERSIST

    def test_refresh_only_ends_with_sync_done(self) -> None:
        consumer = started({A, B}, mode=Mode.REFRESH_ONLY)
        events = feed(
            consumer,
            entry("uid=b", StateKind.MODIFY, B, mail=[b"b@x"]),
            done(0, SyncDone(b"c1", refresh_deletes=False)),
        )
        assert events == [
            EntryChanged(B, "uid=b", {"mail": (b"b@x",)}),
            EntryDeleted(A, None),
            CookieChanged(b"c1"),
            RefreshComplete(),
        ]
        assert consumer.phase is Phase.DONE
        with pytest.raises(SyncProtocolError, match="after SearchDone"):
            consumer.receive(entry("uid=b", StateKind.ADD, B))

    def test_empty_present_phase_deletes_everything(self) -> None:
        # RFC 4533 3.3.2: nothing said present means nothing is left.
        consumer = started({A, B}, mode=Mode.REFRESH_ONLY)
        events = feed(consumer, done(0, SyncDone(None, refresh_deletes=False)))
        assert events == [EntryDeleted(A, None), EntryDeleted(B, None), RefreshComplete()]

    def test_cookies_are_held_back_until_refresh_completes(self) -> None:
        consumer = started({A, B})
        events = feed(
            consumer,
            entry("uid=a", StateKind.ADD, A, b"c1"),
            info(SyncInfoNewCookie(b"c2")),
        )
        assert events == [EntryChanged(A, "uid=a", {})]
        assert consumer.cookie == b"c0"
        events = feed(consumer, info(SyncInfoRefreshPresent(None, True)))
        assert events == [EntryDeleted(B, None), CookieChanged(b"c2"), RefreshComplete()]
        assert consumer.cookie == b"c2"

    def test_present_then_delete_phase(self) -> None:
        consumer = started({A, B, C}, mode=Mode.REFRESH_ONLY)
        events = feed(
            consumer,
            entry("uid=a", StateKind.PRESENT, A),
            entry("uid=b", StateKind.PRESENT, B),
            info(SyncInfoRefreshPresent(None, refresh_done=False)),
        )
        assert events[-1] == EntryDeleted(C, None)
        assert consumer.phase is Phase.REFRESH_DELETE
        events = feed(
            consumer,
            entry("uid=b", StateKind.DELETE, B),
            done(0, SyncDone(b"c1", refresh_deletes=True)),
        )
        assert events == [EntryDeleted(B, "uid=b"), CookieChanged(b"c1"), RefreshComplete()]
        assert consumer.known == {A}

    @pytest.mark.parametrize("by_entry", [True, False])
    @pytest.mark.parametrize("end", ["refreshPresent", "Sync Done"])
    def test_a_present_uuid_the_copy_does_not_hold_means_a_full_refresh(self, by_entry: bool, end: str) -> None:
        # one flipped bit in B's UUID: believed, B would be deleted at the phase's end, for good
        flipped = uuid_to_str(bytes([uuid_from_str(B)[0] ^ 0x01]) + uuid_from_str(B)[1:])
        mode = Mode.REFRESH_AND_PERSIST if end == "refreshPresent" else Mode.REFRESH_ONLY
        consumer = started({A, B, C}, cookie=b"c0", mode=mode)
        present = (
            entry("uid=b", StateKind.PRESENT, flipped)
            if by_entry
            else info(SyncInfoIdSet((flipped, C), b"c1", refresh_deletes=False))
        )
        events = feed(consumer, entry("uid=a", StateKind.PRESENT, A), present, entry("uid=d", StateKind.ADD, D))
        assert events[0] == EntryPresent(A, "uid=a") and events[-1] == EntryChanged(D, "uid=d", {})
        ending = (
            info(SyncInfoRefreshPresent(b"c2", refresh_done=True))
            if end == "refreshPresent"
            else done(0, SyncDone(b"c2", refresh_deletes=False))
        )
        assert feed(consumer, ending) == [UnknownPresent(flipped, "uid=b" if by_entry else None)]
        assert consumer.cookie is None and consumer.phase is Phase.DONE
        assert consumer.known == {A, B, C, D}, "nothing deleted"
        # the next request is a full reload: what the server does not send again is gone
        assert decode_request(consumer.request(Mode.REFRESH_AND_PERSIST))[1] is None
        events = feed(
            consumer,
            entry("uid=a", StateKind.ADD, A),
            entry("uid=b", StateKind.ADD, B),
            info(SyncInfoRefreshPresent(b"c3", refresh_done=True)),
        )
        assert events[-4:] == [EntryDeleted(C, None), EntryDeleted(D, None), CookieChanged(b"c3"), RefreshComplete()]

    def test_a_present_uuid_sent_in_full_later_in_the_phase_is_not_a_violation(self) -> None:
        """OpenLDAP's present list names every entry, also those the refresh then sends as
        added (changed since the cookie): known by the phase's end is all that counts."""
        consumer = started({A, B})
        events = feed(
            consumer,
            info(SyncInfoIdSet((A, B, D), None, refresh_deletes=False)),
            entry("uid=d", StateKind.ADD, D, mail=[b"d@example.org"]),
            info(SyncInfoRefreshPresent(b"c1", refresh_done=True)),
        )
        assert events == [
            EntryPresent(A, None),
            EntryPresent(B, None),
            EntryChanged(D, "uid=d", {"mail": (b"d@example.org",)}),
            CookieChanged(b"c1"),
            RefreshComplete(),
        ]
        assert consumer.known == {A, B, D} and consumer.cookie == b"c1"

    def test_present_entries_added_earlier_in_the_refresh_are_known(self) -> None:
        consumer = started({A})
        events = feed(
            consumer,
            entry("uid=d", StateKind.ADD, D),
            info(SyncInfoIdSet((A, D), None, refresh_deletes=False)),
            info(SyncInfoRefreshPresent(b"c1", refresh_done=True)),
        )
        assert events == [
            EntryChanged(D, "uid=d", {}),
            EntryPresent(A, None),
            EntryPresent(D, None),
            CookieChanged(b"c1"),
            RefreshComplete(),
        ]

    @settings(max_examples=examples(100))
    @given(
        st.sets(uuids, max_size=30),
        st.sets(uuids, max_size=30),
        st.sets(uuids, max_size=30),
    )
    def test_present_phase_property(self, known: set[str], unchanged: set[str], changed: set[str]) -> None:
        unchanged = (unchanged & known) - changed
        consumer = started(known)
        messages: list[syncrepl.Message] = [entry(f"uid={u}", StateKind.ADD, u) for u in sorted(changed)]
        messages.append(info(SyncInfoIdSet(tuple(sorted(unchanged)), None, False)))
        messages.append(info(SyncInfoRefreshPresent(b"c1", True)))
        events = feed(consumer, *messages)
        deleted = {e.uuid for e in events if isinstance(e, EntryDeleted)}
        assert deleted == known - unchanged - changed
        assert consumer.known == unchanged | changed
        assert events[-2:] == [CookieChanged(b"c1"), RefreshComplete()]


class TestDeletePhase:
    def test_explicit_deletes_only(self) -> None:
        consumer = started({A, B, C})
        events = feed(
            consumer,
            entry("uid=b", StateKind.DELETE, B),
            info(SyncInfoIdSet((C, X), None, refresh_deletes=True)),
            entry("uid=d", StateKind.ADD, D),
            info(SyncInfoRefreshDelete(b"c1", refresh_done=True)),
        )
        assert events == [
            EntryDeleted(B, "uid=b"),
            EntryDeleted(C, None),
            EntryDeleted(X, None),  # unknown UUIDs are passed on: deleting is idempotent
            EntryChanged(D, "uid=d", {}),
            CookieChanged(b"c1"),
            RefreshComplete(),
        ]
        assert consumer.known == {A, D}

    def test_no_changes_sync_done_without_cookie_keeps_cookie(self) -> None:
        # What OpenLDAP 2.5 sends for an up-to-date refreshOnly consumer.
        consumer = started({A, B}, b"c0", Mode.REFRESH_ONLY)
        events = feed(consumer, done(0, SyncDone(None, refresh_deletes=True)))
        assert events == [RefreshComplete()]
        assert consumer.cookie == b"c0"
        assert consumer.known == {A, B}

    def test_same_cookie_is_not_reported_again(self) -> None:
        consumer = started({A}, b"c0", Mode.REFRESH_ONLY)
        assert feed(consumer, done(0, SyncDone(b"c0", True))) == [RefreshComplete()]


class TestPersist:
    def test_changes_and_cookies(self) -> None:
        consumer = persisting({A, B})
        events = feed(
            consumer,
            entry("uid=c", StateKind.ADD, C, b"c1", mail=[b"c@x", b"c2@x"]),
            entry("uid=a", StateKind.MODIFY, A, b"c2", mail=[b"a@x"]),
            entry("uid=b", StateKind.DELETE, B, b"c3"),
            info(SyncInfoNewCookie(b"c4")),
        )
        assert events == [
            EntryChanged(C, "uid=c", {"mail": (b"c@x", b"c2@x")}),
            CookieChanged(b"c1"),
            EntryChanged(A, "uid=a", {"mail": (b"a@x",)}),
            CookieChanged(b"c2"),
            EntryDeleted(B, "uid=b"),
            CookieChanged(b"c3"),
            CookieChanged(b"c4"),
        ]
        assert consumer.known == {A, C}
        assert consumer.cookie == b"c4"

    def test_id_set_deletes_entries_known_only_by_uuid(self) -> None:
        consumer = persisting({A, B, C})
        events = feed(consumer, info(SyncInfoIdSet((A, C), b"c1", refresh_deletes=True)))
        assert events == [EntryDeleted(A, None), EntryDeleted(C, None), CookieChanged(b"c1")]
        assert consumer.known == {B}

    def test_attributes_are_immutable_tuples(self) -> None:
        consumer = persisting(set())
        (event,) = consumer.receive(entry("uid=a", StateKind.ADD, A, mail=[b"a@x"]))
        assert isinstance(event, EntryChanged)
        assert event.attributes["mail"] == (b"a@x",)
        with pytest.raises(TypeError):
            event.attributes["mail"] = ()  # type: ignore[index]

    def test_search_done_in_persist(self) -> None:
        consumer = persisting({A})
        events = feed(consumer, done(0, SyncDone(b"c9"), "bye"))
        assert events == [CookieChanged(b"c9"), SearchFinished(0, "bye")]
        assert consumer.phase is Phase.DONE
        consumer.request(Mode.REFRESH_AND_PERSIST)  # a new operation may start
        assert consumer.phase in (Phase.REFRESH,)  # a tuple: mypy over-narrows the property

    def test_cancelled(self) -> None:
        consumer = persisting({A})
        assert feed(consumer, done(118, None, "canceled")) == [SearchFinished(118, "canceled")]

    def test_references_and_foreign_intermediates_are_ignored(self) -> None:
        consumer = persisting({A})
        assert consumer.receive(SearchReference(["ldap://elsewhere/"])) == []
        assert consumer.receive(IntermediateResponse("1.2.3.4", b"\x00")) == []
        assert consumer.receive(IntermediateResponse(None, None)) == []


class TestSearchDone:
    def test_refresh_required_drops_cookie_and_reload_prunes_known(self) -> None:
        consumer = started({A, B, C}, b"stale")
        assert feed(consumer, done(E_SYNC_REFRESH_REQUIRED)) == [RefreshRequired()]
        assert consumer.cookie is None
        assert consumer.phase is Phase.DONE
        assert consumer.known == {A, B, C}
        # The reload goes out without a cookie ...
        assert consumer.request(Mode.REFRESH_ONLY) == h("30 03 0a 01 01")
        # ... and even if the server closes it as a delete phase, unmentioned entries go.
        events = feed(
            consumer,
            entry("uid=a", StateKind.ADD, A),
            done(0, SyncDone(b"c1", refresh_deletes=True)),
        )
        assert events == [
            EntryChanged(A, "uid=a", {}),
            EntryDeleted(B, None),
            EntryDeleted(C, None),
            CookieChanged(b"c1"),
            RefreshComplete(),
        ]
        assert consumer.known == {A}

    def test_refresh_required_during_persist(self) -> None:
        consumer = persisting({A})
        assert feed(consumer, done(E_SYNC_REFRESH_REQUIRED, SyncDone(b"x"))) == [RefreshRequired()]
        assert consumer.cookie is None

    def test_failed_refresh_drops_held_back_cookie(self) -> None:
        consumer = started({A, B})
        events = feed(
            consumer,
            entry("uid=a", StateKind.PRESENT, A, b"c1"),
            done(51, None, "busy"),
        )
        assert events == [EntryPresent(A, "uid=a"), SearchFinished(51, "busy")]
        assert consumer.cookie == b"c0"
        assert consumer.known == {A, B}

    def test_refresh_and_persist_ended_by_server_during_refresh(self) -> None:
        consumer = started({A, B})
        events = feed(consumer, entry("uid=a", StateKind.PRESENT, A), done(0, SyncDone(b"c1")))
        assert events == [
            EntryPresent(A, "uid=a"),
            EntryDeleted(B, None),
            CookieChanged(b"c1"),
            RefreshComplete(),
            SearchFinished(0, ""),
        ]

    def test_initial_load(self) -> None:
        consumer = SyncConsumer()
        assert consumer.request(Mode.REFRESH_AND_PERSIST) == h("30 03 0a 01 03")
        events = feed(
            consumer,
            entry("uid=a", StateKind.ADD, A),
            entry("uid=b", StateKind.ADD, B),
            info(SyncInfoRefreshPresent(b"c1", True)),
        )
        assert events == [
            EntryChanged(A, "uid=a", {}),
            EntryChanged(B, "uid=b", {}),
            CookieChanged(b"c1"),
            RefreshComplete(),
        ]


class TestIllegalSequences:
    def test_entry_without_sync_state(self) -> None:
        consumer = started()
        with pytest.raises(SyncProtocolError, match=r"uid=a.*no Sync State"):
            consumer.receive(SearchEntry("uid=a", {}, {}))

    def test_undecodable_sync_state_names_dn(self) -> None:
        consumer = started()
        bad = SearchEntry("uid=a", {}, {SYNC_STATE_OID: h("30 03 0a 01 01")})
        with pytest.raises(SyncProtocolError, match=r"uid=a.*Sync State"):
            consumer.receive(bad)

    def test_present_state_during_persist(self) -> None:
        consumer = persisting({A})
        with pytest.raises(SyncProtocolError, match=r"uid=a.*present state during persist"):
            consumer.receive(entry("uid=a", StateKind.PRESENT, A))

    def test_refresh_present_during_persist(self) -> None:
        consumer = persisting({A})
        with pytest.raises(SyncProtocolError, match="refreshPresent during persist"):
            consumer.receive(info(SyncInfoRefreshPresent(None, True)))

    def test_refresh_delete_during_persist(self) -> None:
        consumer = persisting({A})
        with pytest.raises(SyncProtocolError, match="refreshDelete during persist"):
            consumer.receive(info(SyncInfoRefreshDelete(None, True)))

    def test_present_id_set_during_persist(self) -> None:
        consumer = persisting({A})
        with pytest.raises(SyncProtocolError, match="present UUIDs during persist"):
            consumer.receive(info(SyncInfoIdSet((A,), None, False)))

    def test_delete_state_during_present_phase(self) -> None:
        consumer = started({A, B})
        consumer.receive(entry("uid=a", StateKind.PRESENT, A))
        with pytest.raises(SyncProtocolError, match=r"uid=b.*delete state.*refresh-present"):
            consumer.receive(entry("uid=b", StateKind.DELETE, B))

    def test_present_state_during_delete_phase(self) -> None:
        consumer = started({A, B})
        consumer.receive(info(SyncInfoIdSet((B,), None, True)))
        with pytest.raises(SyncProtocolError, match=r"uid=a.*present state.*refresh-delete"):
            consumer.receive(entry("uid=a", StateKind.PRESENT, A))

    def test_refresh_delete_closing_a_present_phase(self) -> None:
        consumer = started({A})
        consumer.receive(entry("uid=a", StateKind.PRESENT, A))
        with pytest.raises(SyncProtocolError, match="refreshDelete during the refresh-present"):
            consumer.receive(info(SyncInfoRefreshDelete(None, True)))

    def test_sync_done_contradicting_delete_phase(self) -> None:
        consumer = started({A}, mode=Mode.REFRESH_ONLY)
        consumer.receive(entry("uid=a", StateKind.DELETE, A))
        with pytest.raises(SyncProtocolError, match="Sync Done during the refresh-delete"):
            consumer.receive(done(0, SyncDone(None, refresh_deletes=False)))

    def test_refresh_done_info_in_refresh_only(self) -> None:
        consumer = started(mode=Mode.REFRESH_ONLY)
        with pytest.raises(SyncProtocolError, match="refreshOnly"):
            consumer.receive(info(SyncInfoRefreshPresent(None, True)))

    def test_successful_search_done_without_sync_done(self) -> None:
        consumer = started(mode=Mode.REFRESH_ONLY)
        with pytest.raises(SyncProtocolError, match="without Sync Done"):
            consumer.receive(done(0))

    def test_undecodable_sync_done(self) -> None:
        consumer = started(mode=Mode.REFRESH_ONLY)
        with pytest.raises(SyncProtocolError, match="Sync Done"):
            consumer.receive(SearchDone(0, "", {SYNC_DONE_OID: b"\x01\x02"}))

    def test_sync_info_without_value(self) -> None:
        consumer = started()
        with pytest.raises(SyncProtocolError, match="without a value"):
            consumer.receive(IntermediateResponse(SYNC_INFO_OID, None))

    def test_undecodable_sync_info(self) -> None:
        consumer = started()
        with pytest.raises(SyncProtocolError, match="Sync Info"):
            consumer.receive(IntermediateResponse(SYNC_INFO_OID, h("a2 05 30 03 01 01 00")))

    def test_message_after_search_done(self) -> None:
        consumer = persisting({A})
        consumer.receive(done(0))
        with pytest.raises(SyncProtocolError, match="IntermediateResponse received after"):
            consumer.receive(info(SyncInfoNewCookie(b"x")))

    def test_abandon_after_error_allows_a_clean_restart(self) -> None:
        consumer = started({A, B}, b"c0")
        consumer.receive(entry("uid=a", StateKind.PRESENT, A, b"c1"))
        with pytest.raises(SyncProtocolError):
            consumer.receive(entry("uid=b", StateKind.DELETE, B))
        consumer.abandon()
        assert consumer.cookie == b"c0"
        assert consumer.known == {A, B}
        assert consumer.request(Mode.REFRESH_ONLY) == h("30 07 0a 01 01 04 02 63 30")

    def test_not_a_message(self) -> None:
        consumer = started()
        with pytest.raises(TypeError):
            consumer.receive("hello")  # type: ignore[arg-type]
