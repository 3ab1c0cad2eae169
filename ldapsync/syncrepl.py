"""Sans-I/O RFC 4533 (syncrepl) codec and consumer state machine.

Nothing here touches a socket or an LDAP library: the I/O layer decodes the LDAP
envelope (ldap3 hands unknown controls back as raw bytes), wraps each message in one of
the input dataclasses below and feeds it to :class:`SyncConsumer.receive`, which returns
the events to apply to the mail maps.  Keeping the protocol logic pure makes the
present-phase and cookie rules testable byte for byte without a slapd.

The RFC 4533 ASN.1 module is ``DEFINITIONS IMPLICIT TAGS``: the context tags of
``syncInfoValue`` *replace* the universal tag (``80``/``a1``/``a2``/``a3``), they do
not wrap it.  Getting that wrong is the classic syncrepl codec bug.
"""

from __future__ import annotations

import enum
import re
import uuid as _uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

from pyasn1.codec.ber import decoder as _ber_decoder
from pyasn1.codec.der import encoder as _der_encoder
from pyasn1.error import SubstrateUnderrunError
from pyasn1.type import constraint, namedtype, namedval, tag, univ

from ldapsync.directory import Attributes

__all__ = [
    "E_SYNC_REFRESH_REQUIRED",
    "SYNC_DONE_OID",
    "SYNC_INFO_OID",
    "SYNC_REQUEST_OID",
    "SYNC_STATE_OID",
    "CookieChanged",
    "EntryChanged",
    "EntryDeleted",
    "EntryPresent",
    "Event",
    "IntermediateResponse",
    "Message",
    "Mode",
    "Phase",
    "RefreshComplete",
    "RefreshRequired",
    "SearchDone",
    "SearchEntry",
    "SearchFinished",
    "SearchReference",
    "StateKind",
    "SyncConsumer",
    "SyncDone",
    "SyncInfo",
    "SyncInfoIdSet",
    "SyncInfoNewCookie",
    "SyncInfoRefreshDelete",
    "SyncInfoRefreshPresent",
    "SyncProtocolError",
    "SyncState",
    "UnknownPresent",
    "decode_sync_done",
    "decode_sync_info",
    "decode_sync_state",
    "encode_sync_done",
    "encode_sync_info",
    "encode_sync_request",
    "encode_sync_state",
    "uuid_from_str",
    "uuid_to_str",
]

SYNC_REQUEST_OID = "1.3.6.1.4.1.4203.1.9.1.1"
SYNC_STATE_OID = "1.3.6.1.4.1.4203.1.9.1.2"
SYNC_DONE_OID = "1.3.6.1.4.1.4203.1.9.1.3"
SYNC_INFO_OID = "1.3.6.1.4.1.4203.1.9.1.4"
E_SYNC_REFRESH_REQUIRED = 4096


class SyncProtocolError(ValueError):
    """The server (or the I/O layer) sent something RFC 4533 does not allow here.

    The only exception this module raises for bad input, so callers need one ``except``
    to decide to drop the connection and resync.
    """


class Mode(enum.IntEnum):
    """syncRequestValue.mode; the values are the ENUMERATED wire values."""

    REFRESH_ONLY = 1
    REFRESH_AND_PERSIST = 3


class StateKind(enum.IntEnum):
    """syncStateValue.state; the values are the ENUMERATED wire values."""

    PRESENT = 0
    ADD = 1
    MODIFY = 2
    DELETE = 3


# --------------------------------------------------------------------------- UUIDs


def uuid_to_str(b: bytes) -> str:
    """Render a 16-byte syncUUID (entryUUID) the way slapd shows entryUUID (as uuid.UUID does)."""
    if len(b) != 16:
        raise ValueError(f"syncUUID must be 16 bytes, got {len(b)}")
    h = bytes(b).hex()  # once per entry of a refresh: a third of the time of str(uuid.UUID(...))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def uuid_from_str(s: str) -> bytes:
    """Inverse of :func:`uuid_to_str`; accepts any form :class:`uuid.UUID` accepts."""
    try:
        return _uuid.UUID(s).bytes
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a UUID: {s!r}") from exc


# --------------------------------------------------------------------- ASN.1 types


# Module-level spec instances rather than subclasses: pyasn1 ships no type stubs and
# mypy --strict refuses to subclass Any.
_COOKIE = univ.OctetString()
_UUID = univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(16, 16))
_MODE = univ.Enumerated().subtype(
    namedValues=namedval.NamedValues(("refreshOnly", 1), ("refreshAndPersist", 3)),
    subtypeSpec=constraint.SingleValueConstraint(1, 3),
)
_STATE = univ.Enumerated().subtype(
    namedValues=namedval.NamedValues(("present", 0), ("add", 1), ("modify", 2), ("delete", 3)),
    subtypeSpec=constraint.SingleValueConstraint(0, 1, 2, 3),
)

_SYNC_REQUEST_VALUE = univ.Sequence(
    componentType=namedtype.NamedTypes(
        namedtype.NamedType("mode", _MODE),
        namedtype.OptionalNamedType("cookie", _COOKIE),
        namedtype.DefaultedNamedType("reloadHint", univ.Boolean(False)),
    )
)
_SYNC_STATE_VALUE = univ.Sequence(
    componentType=namedtype.NamedTypes(
        namedtype.NamedType("state", _STATE),
        namedtype.NamedType("entryUUID", _UUID),
        namedtype.OptionalNamedType("cookie", _COOKIE),
    )
)
_SYNC_DONE_VALUE = univ.Sequence(
    componentType=namedtype.NamedTypes(
        namedtype.OptionalNamedType("cookie", _COOKIE),
        namedtype.DefaultedNamedType("refreshDeletes", univ.Boolean(False)),
    )
)


def _ctx(n: int, constructed: bool) -> tag.Tag:
    fmt = tag.tagFormatConstructed if constructed else tag.tagFormatSimple
    return tag.Tag(tag.tagClassContext, fmt, n)


def _refresh_phase(n: int) -> Any:
    """Body shared by refreshDelete [1] and refreshPresent [2]."""
    return univ.Sequence(
        componentType=namedtype.NamedTypes(
            namedtype.OptionalNamedType("cookie", _COOKIE),
            namedtype.DefaultedNamedType("refreshDone", univ.Boolean(True)),
        ),
        tagSet=univ.Sequence.tagSet.tagImplicitly(_ctx(n, True)),
    )


# IMPLICIT TAGS: each alternative's own tag is replaced by the context tag.
_SYNC_INFO_VALUE = univ.Choice(
    componentType=namedtype.NamedTypes(
        namedtype.NamedType("newcookie", _COOKIE.subtype(implicitTag=_ctx(0, False))),
        namedtype.NamedType("refreshDelete", _refresh_phase(1)),
        namedtype.NamedType("refreshPresent", _refresh_phase(2)),
        namedtype.NamedType(
            "syncIdSet",
            univ.Sequence(
                componentType=namedtype.NamedTypes(
                    namedtype.OptionalNamedType("cookie", _COOKIE),
                    namedtype.DefaultedNamedType("refreshDeletes", univ.Boolean(False)),
                    namedtype.NamedType("syncUUIDs", univ.SetOf(componentType=_UUID)),
                ),
                tagSet=univ.Sequence.tagSet.tagImplicitly(_ctx(3, True)),
            ),
        ),
    )
)


# ------------------------------------------------------------------ decoded values


@dataclass(frozen=True, slots=True)
class SyncState:
    """Decoded Sync State control (attached to every entry of a sync search)."""

    state: StateKind
    uuid: str
    cookie: bytes | None = None


@dataclass(frozen=True, slots=True)
class SyncDone:
    """Decoded Sync Done control (attached to the SearchResultDone)."""

    cookie: bytes | None = None
    refresh_deletes: bool = False


@dataclass(frozen=True, slots=True)
class SyncInfoNewCookie:
    """Sync Info ``newcookie``: the server only moved the cookie forward."""

    cookie: bytes


@dataclass(frozen=True, slots=True)
class SyncInfoRefreshDelete:
    """Sync Info ``refreshDelete``: a delete phase ended."""

    cookie: bytes | None = None
    refresh_done: bool = True


@dataclass(frozen=True, slots=True)
class SyncInfoRefreshPresent:
    """Sync Info ``refreshPresent``: a present phase ended."""

    cookie: bytes | None = None
    refresh_done: bool = True


@dataclass(frozen=True, slots=True)
class SyncInfoIdSet:
    """Sync Info ``syncIdSet``: present UUIDs, or deleted ones if ``refresh_deletes``."""

    uuids: tuple[str, ...]
    cookie: bytes | None = None
    refresh_deletes: bool = False


SyncInfo: TypeAlias = SyncInfoNewCookie | SyncInfoRefreshDelete | SyncInfoRefreshPresent | SyncInfoIdSet


# ------------------------------------------------------------------------ encoders


def _set_cookie(value: Any, cookie: bytes | None) -> None:
    if cookie is not None:
        value["cookie"] = bytes(cookie)


def encode_sync_request(mode: Mode, cookie: bytes | None, reload_hint: bool = False) -> bytes:
    """BER (in fact DER) value of the Sync Request control to put on the search."""
    value = _SYNC_REQUEST_VALUE.clone()
    value["mode"] = int(Mode(mode))
    _set_cookie(value, cookie)
    value["reloadHint"] = bool(reload_hint)
    return bytes(_der_encoder.encode(value))


def encode_sync_state(state: SyncState) -> bytes:
    """Server side of the Sync State control; used by tests and fake servers."""
    value = _SYNC_STATE_VALUE.clone()
    value["state"] = int(state.state)
    value["entryUUID"] = uuid_from_str(state.uuid)
    _set_cookie(value, state.cookie)
    return bytes(_der_encoder.encode(value))


def encode_sync_done(done: SyncDone) -> bytes:
    """Server side of the Sync Done control; used by tests and fake servers."""
    value = _SYNC_DONE_VALUE.clone()
    _set_cookie(value, done.cookie)
    value["refreshDeletes"] = bool(done.refresh_deletes)
    return bytes(_der_encoder.encode(value))


def encode_sync_info(info: SyncInfo) -> bytes:
    """Server side of the Sync Info intermediate response value."""
    choice = _SYNC_INFO_VALUE.clone()
    if isinstance(info, SyncInfoNewCookie):
        choice["newcookie"] = bytes(info.cookie)
    elif isinstance(info, SyncInfoRefreshDelete | SyncInfoRefreshPresent):
        name = "refreshDelete" if isinstance(info, SyncInfoRefreshDelete) else "refreshPresent"
        body = choice.componentType[name].asn1Object.clone()
        _set_cookie(body, info.cookie)
        body["refreshDone"] = bool(info.refresh_done)
        choice[name] = body
    else:
        body = choice.componentType["syncIdSet"].asn1Object.clone()
        _set_cookie(body, info.cookie)
        body["refreshDeletes"] = bool(info.refresh_deletes)
        uuids = body["syncUUIDs"]
        for i, u in enumerate(info.uuids):
            uuids[i] = uuid_from_str(u)
        choice["syncIdSet"] = body
    return bytes(_der_encoder.encode(choice))


# ------------------------------------------------------------------------ decoders


def _explain(exc: Exception) -> str:
    """Condense a pyasn1 error (whose text embeds whole schema reprs) to its gist."""
    text = str(exc)
    if not text or isinstance(exc, SubstrateUnderrunError):  # pyasn1 0.4.8 says "2-octet short"
        return "truncated value"
    if "not in asn1Spec" in text:
        m = re.search(r"tags (\d+):(\d+):(\d+)", text)
        if m and int(m[3]) < 31:
            return f"unexpected tag 0x{int(m[1]) | int(m[2]) | int(m[3]):02x}"
        return "unexpected tag"
    if "ValueSizeConstraint" in text:
        return "size constraint violated (a syncUUID must be 16 bytes)"
    if "SingleValueConstraint" in text:
        return "ENUMERATED or BOOLEAN value out of range"
    if "uninitialized components" in text:
        return "a required component is missing"
    return text.splitlines()[0][:100]


def _decode(data: bytes, spec: Any, what: str) -> Any:
    """Decode exactly one value; any pyasn1 failure becomes SyncProtocolError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SyncProtocolError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        value, rest = _ber_decoder.decode(bytes(data), asn1Spec=spec)
    except Exception as exc:  # pyasn1 raises a zoo of types on garbage; never leak them
        head = bytes(data)[:64].hex()
        raise SyncProtocolError(f"undecodable {what} ({head}): {_explain(exc)}") from None
    if rest:
        raise SyncProtocolError(f"{what}: {len(rest)} trailing bytes after the value")
    return value


def _opt_cookie(value: Any) -> bytes | None:
    cookie = value["cookie"]
    return bytes(cookie) if cookie.isValue else None


# The fast decoders below read the plain definite-length shapes servers send (every entry of a
# refresh carries a Sync State control: pyasn1 took most of a refresh's time). Whatever they do
# not recognise returns None and goes to pyasn1, which decodes any other valid BER and words
# the error for invalid input, so the two can only differ in speed.
_STATES = tuple(StateKind)  # indexed by the wire value 0..3


def _tlv(b: bytes, i: int, end: int, tag: int) -> tuple[int, int] | None:
    """(content start, content end) of the `tag` element at b[i] within `end`, else None."""
    if i + 2 > end or b[i] != tag:
        return None
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if not 0 < k <= 4 or i + k > end:
            return None
        n = int.from_bytes(b[i : i + k], "big")
        i += k
    return (i, i + n) if i + n <= end else None


def _fast_bool(b: bytes, i: int, end: int) -> tuple[bool, int] | None:
    """(value, index after it) of a BOOLEAN at b[i] (non-zero is TRUE in BER), else None."""
    v = _tlv(b, i, end, 0x01)
    return None if v is None or v[1] - v[0] != 1 else (b[v[0]] != 0, v[1])


def _fast_cookie(b: bytes, i: int, end: int) -> tuple[bytes | None, int]:
    """(cookie, index after it) of an optional OCTET STRING cookie at b[i]."""
    c = _tlv(b, i, end, 0x04)
    return (None, i) if c is None else (b[c[0] : c[1]], c[1])


def _fast_sync_state(b: bytes) -> SyncState | None:
    if type(b) is not bytes:
        return None
    n = len(b)
    if n == 23 and b[0] == 0x30 and b[1] == 21 and b[2] == 0x0A and b[3] == 1 and b[5] == 0x04 and b[6] == 16:
        if b[4] <= 3:  # what slapd sends with every entry of a refresh: state and UUID, no cookie
            return SyncState(_STATES[b[4]], uuid_to_str(b[7:23]))
        return None
    seq = _tlv(b, 0, n, 0x30)
    if seq is None or seq[1] != n:
        return None
    state = _tlv(b, seq[0], n, 0x0A)
    if state is None or state[1] - state[0] != 1 or b[state[0]] > 3:
        return None
    uid = _tlv(b, state[1], n, 0x04)
    if uid is None or uid[1] - uid[0] != 16:
        return None
    cookie, i = _fast_cookie(b, uid[1], n)
    if i != n:
        return None
    return SyncState(_STATES[b[state[0]]], uuid_to_str(b[uid[0] : uid[1]]), cookie)


def _fast_phase_end(b: bytes, i: int, end: int) -> tuple[bytes | None, bool] | None:
    """refreshDelete/refreshPresent content: (cookie, refreshDone), else None."""
    cookie, i = _fast_cookie(b, i, end)
    done = True
    if i < end:
        flag = _fast_bool(b, i, end)
        if flag is None:
            return None
        done, i = flag
    return (cookie, done) if i == end else None


def _fast_id_set(b: bytes, i: int, end: int) -> SyncInfoIdSet | None:
    cookie, i = _fast_cookie(b, i, end)
    deletes = False
    if i < end and b[i] == 0x01:
        flag = _fast_bool(b, i, end)
        if flag is None:
            return None
        deletes, i = flag
    uuids = _tlv(b, i, end, 0x31)
    if uuids is None or uuids[1] != end:
        return None
    out = []
    i, end = uuids
    while i < end:  # SET OF syncUUID: 04 10 and 16 bytes each
        if i + 18 > end or b[i] != 0x04 or b[i + 1] != 0x10:
            return None
        out.append(uuid_to_str(b[i + 2 : i + 18]))
        i += 18
    return SyncInfoIdSet(tuple(out), cookie, deletes)


def _fast_sync_info(b: bytes) -> SyncInfo | None:
    if type(b) is not bytes or len(b) < 2:
        return None
    n = len(b)
    tag = b[0]
    body = _tlv(b, 0, n, tag)
    if body is None or body[1] != n:
        return None
    s, e = body
    if tag == 0x80:
        return SyncInfoNewCookie(b[s:e])
    if tag in (0xA1, 0xA2):
        phase = _fast_phase_end(b, s, e)
        if phase is None:
            return None
        return SyncInfoRefreshDelete(*phase) if tag == 0xA1 else SyncInfoRefreshPresent(*phase)
    if tag == 0xA3:
        return _fast_id_set(b, s, e)
    return None


def decode_sync_state(data: bytes) -> SyncState:
    """Decode a Sync State control value."""
    return _fast_sync_state(data) or _full_sync_state(data)


def _full_sync_state(data: bytes) -> SyncState:
    value = _decode(data, _SYNC_STATE_VALUE.clone(), "Sync State control")
    return SyncState(
        state=StateKind(int(value["state"])),
        uuid=uuid_to_str(bytes(value["entryUUID"])),
        cookie=_opt_cookie(value),
    )


def decode_sync_done(data: bytes) -> SyncDone:
    """Decode a Sync Done control value."""
    value = _decode(data, _SYNC_DONE_VALUE.clone(), "Sync Done control")
    return SyncDone(cookie=_opt_cookie(value), refresh_deletes=bool(value["refreshDeletes"]))


def decode_sync_info(data: bytes) -> SyncInfo:
    """Decode a Sync Info intermediate response value into one of the variants."""
    return _fast_sync_info(data) or _full_sync_info(data)


def _full_sync_info(data: bytes) -> SyncInfo:
    value = _decode(data, _SYNC_INFO_VALUE.clone(), "Sync Info message")
    name = value.getName()
    body = value.getComponent()
    if name == "newcookie":
        return SyncInfoNewCookie(cookie=bytes(body))
    if name == "refreshDelete":
        return SyncInfoRefreshDelete(_opt_cookie(body), bool(body["refreshDone"]))
    if name == "refreshPresent":
        return SyncInfoRefreshPresent(_opt_cookie(body), bool(body["refreshDone"]))
    if name == "syncIdSet":
        return SyncInfoIdSet(
            uuids=tuple(uuid_to_str(bytes(u)) for u in body["syncUUIDs"]),
            cookie=_opt_cookie(body),
            refresh_deletes=bool(body["refreshDeletes"]),
        )
    raise SyncProtocolError(f"Sync Info message: unknown choice {name!r}")  # pragma: no cover


# ------------------------------------------------------------------ input messages


@dataclass(frozen=True, slots=True)
class SearchEntry:
    """A SearchResultEntry; ``controls`` maps control OID to its raw value.

    ``attributes`` are raw values, copied into an immutable mapping of tuples, or the entry's
    directory attributes as the I/O layer already decoded them (immutable: passed on as they are).
    """

    dn: str
    attributes: Mapping[str, Sequence[bytes]] | Attributes = field(default_factory=dict)
    controls: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SearchReference:
    """A SearchResultReference (continuation URIs)."""

    uris: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class IntermediateResponse:
    """An IntermediateResponse; Sync Info messages arrive as these."""

    name: str | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class SearchDone:
    """The SearchResultDone; ``controls`` maps control OID to its raw value."""

    result_code: int
    message: str = ""
    controls: Mapping[str, bytes] = field(default_factory=dict)


Message: TypeAlias = SearchEntry | SearchReference | IntermediateResponse | SearchDone


# -------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class EntryChanged:
    """An entry was added or modified: replace everything known about ``uuid``."""

    uuid: str
    dn: str
    attributes: Mapping[str, tuple[bytes, ...]] | Attributes


@dataclass(frozen=True, slots=True)
class EntryPresent:
    """During a refresh, ``uuid`` still exists unchanged (``dn`` None if sent by UUID only)."""

    uuid: str
    dn: str | None


@dataclass(frozen=True, slots=True)
class EntryDeleted:
    """``uuid`` is gone (deleted, renamed out of scope, or missing from a present phase).

    ``dn`` is None when the server named it by UUID only or the consumer inferred it.
    """

    uuid: str
    dn: str | None


@dataclass(frozen=True, slots=True)
class CookieChanged:
    """Everything emitted before this is covered by ``cookie``: persist both together."""

    cookie: bytes


@dataclass(frozen=True, slots=True)
class RefreshComplete:
    """The refresh stage ended: local content is now a faithful copy."""


@dataclass(frozen=True, slots=True)
class RefreshRequired:
    """e-syncRefreshRequired (4096): the cookie was dropped; call request() again."""


@dataclass(frozen=True, slots=True)
class UnknownPresent:
    """A present phase ended naming ``uuid`` present, which the local copy does not hold and
    the refresh did not send either.

    A protocol violation: a present list names entries the consumer has (RFC 4533 3.3.1), or
    (OpenLDAP lists every entry) entries the same refresh sends in full; so the list is corrupt
    or tampered with. Believed, it would delete the entry that was meant at the end of the
    phase, under a valid cookie, for good. It cannot be repaired (which entry was meant?): the
    consumer has dropped its cookie and abandoned the operation, deleting nothing; say so and
    call request() again, which is a full refresh.
    """

    uuid: str
    dn: str | None


@dataclass(frozen=True, slots=True)
class SearchFinished:
    """The search ended other than by a successful refreshOnly refresh."""

    result_code: int
    message: str


Event: TypeAlias = (
    EntryChanged
    | EntryPresent
    | EntryDeleted
    | CookieChanged
    | RefreshComplete
    | RefreshRequired
    | UnknownPresent
    | SearchFinished
)


# ------------------------------------------------------------------- state machine


class Phase(enum.Enum):
    """Where the consumer is in the sync operation."""

    IDLE = "idle"  # no request issued yet
    REFRESH = "refresh"  # refresh stage, phase not yet known (only add entries so far)
    REFRESH_PRESENT = "refresh-present"
    REFRESH_DELETE = "refresh-delete"
    PERSIST = "persist"
    DONE = "done"  # SearchDone received; request() starts a new operation


_REFRESH_PHASES = frozenset({Phase.REFRESH, Phase.REFRESH_PRESENT, Phase.REFRESH_DELETE})


class SyncConsumer:
    """RFC 4533 consumer state machine for one directory follow.

    Cookies seen during a refresh are held back and emitted (as one CookieChanged, just
    before RefreshComplete) only once the refresh has completed: a present phase decides
    its deletions only at its end, so persisting an earlier cookie and then crashing would
    lose those deletions forever.  In the persist stage every cookie is emitted right after
    the change it covers.
    """

    def __init__(self, known: Iterable[str] = (), cookie: bytes | None = None) -> None:
        # a mirror's keys are in the canonical form already (they came from uuid_to_str or
        # from slapd's own entryUUID text): only another form is parsed
        canonical = _CANONICAL_UUID.fullmatch
        self._known: set[str] = {u if canonical(u) else uuid_to_str(uuid_from_str(u)) for u in known}
        self._cookie = cookie
        self._phase = Phase.IDLE
        self._mode = Mode.REFRESH_ONLY
        self._reload = False
        self._pending_cookie: bytes | None = None
        self._seen_phase: set[str] = set()  # present/add/modify in the current phase
        self._seen_refresh: set[str] = set()  # ... in the whole refresh stage
        self._unknown: dict[str, str | None] = {}  # named present, not held, not sent (yet): uuid -> dn

    @property
    def cookie(self) -> bytes | None:
        """Last cookie emitted as CookieChanged (the one request() sends)."""
        return self._cookie

    @property
    def known(self) -> frozenset[str]:
        """UUIDs the consumer believes the local copy holds."""
        return frozenset(self._known)

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def mode(self) -> Mode:
        return self._mode

    def request(self, mode: Mode, reload_hint: bool = False) -> bytes:
        """Start a sync operation; return the Sync Request control value to send.

        Without a cookie the refresh is a full reload, so every known UUID the server
        does not mention is deleted at the end whatever phases the server uses.
        """
        if self._phase not in (Phase.IDLE, Phase.DONE):
            raise SyncProtocolError(f"request() while a sync operation is in {self._phase.value}")
        self._mode = Mode(mode)
        self._phase = Phase.REFRESH
        self._reload = self._cookie is None
        self._pending_cookie = None
        self._seen_phase = set()
        self._seen_refresh = set()
        self._unknown = {}
        return encode_sync_request(self._mode, self._cookie, reload_hint)

    def abandon(self) -> None:
        """Forget an unfinished operation (search abandoned, or a SyncProtocolError).

        The cookie and known set stay as of the last emitted events, so the next
        request() safely redoes whatever the abandoned refresh had not committed.
        """
        self._phase = Phase.DONE if self._phase is not Phase.IDLE else Phase.IDLE
        self._pending_cookie = None

    def receive(self, message: Message) -> list[Event]:
        """Feed one decoded LDAP message; return the events it implies, in order."""
        if self._phase in (Phase.IDLE, Phase.DONE):
            what = "before request()" if self._phase is Phase.IDLE else "after SearchDone"
            raise SyncProtocolError(f"{type(message).__name__} received {what}")
        if isinstance(message, SearchEntry):
            return self._entry(message)
        if isinstance(message, SearchReference):
            return []  # referrals are not chased; they carry nothing for the maps
        if isinstance(message, IntermediateResponse):
            return self._intermediate(message)
        if isinstance(message, SearchDone):
            return self._done(message)
        raise TypeError(f"not a syncrepl message: {message!r}")

    # -- helpers -------------------------------------------------------------

    @property
    def _refreshing(self) -> bool:
        return self._phase in _REFRESH_PHASES

    def _enter(self, phase: Phase, why: str) -> None:
        """Pin the undetermined refresh phase; contradicting evidence is a protocol error."""
        other = Phase.REFRESH_DELETE if phase is Phase.REFRESH_PRESENT else Phase.REFRESH_PRESENT
        if self._phase is other:
            raise SyncProtocolError(f"{why} during the {self._phase.value} phase")
        self._phase = phase

    def _take_cookie(self, cookie: bytes | None) -> list[Event]:
        if cookie is None:
            return []
        if self._refreshing:
            self._pending_cookie = cookie
            return []
        return self._commit_cookie(cookie)

    def _commit_cookie(self, cookie: bytes | None) -> list[Event]:
        if cookie is None or cookie == self._cookie:
            return []
        self._cookie = cookie
        return [CookieChanged(cookie)]

    def _seen(self, uuid: str) -> None:
        self._known.add(uuid)
        if self._refreshing:
            self._seen_phase.add(uuid)
            self._seen_refresh.add(uuid)
            self._unknown.pop(uuid, None)

    def _delete(self, uuid: str, dn: str | None) -> EntryDeleted:
        self._known.discard(uuid)
        self._seen_phase.discard(uuid)
        self._seen_refresh.discard(uuid)
        return EntryDeleted(uuid, dn)

    def _unknown_present(self, uuid: str, dn: str | None) -> list[Event]:
        """A present list named an entry we do not hold: no cookie, no operation (see UnknownPresent)."""
        self._cookie = None
        self._pending_cookie = None
        self._phase = Phase.DONE
        self._seen_phase, self._seen_refresh, self._unknown = set(), set(), {}
        return [UnknownPresent(uuid, dn)]

    def _present(self, uuid: str, dn: str | None) -> list[Event]:
        """`uuid` named present: known, or to be sent in full before the phase ends."""
        if uuid in self._known:
            self._seen(uuid)
            return [EntryPresent(uuid, dn)]
        self._unknown.setdefault(uuid, dn)
        return []

    def _end_phase(self, present: bool) -> list[Event]:
        """Close a refresh phase; a present phase deletes every known UUID it did not name,
        unless it named one the copy does not hold (see UnknownPresent)."""
        events: list[Event] = []
        if present and self._unknown:
            uuid = min(self._unknown)
            return self._unknown_present(uuid, self._unknown[uuid])
        if present:
            missing = sorted(self._known - self._seen_phase)
            events = [self._delete(u, None) for u in missing]
        self._seen_phase = set()
        return events

    def _end_refresh(self) -> list[Event]:
        events: list[Event] = []
        if self._reload:
            events += [self._delete(u, None) for u in sorted(self._known - self._seen_refresh)]
        events += self._commit_cookie(self._pending_cookie)
        self._pending_cookie = None
        self._seen_phase, self._seen_refresh = set(), set()  # a set of every UUID: not needed in persist
        events.append(RefreshComplete())
        self._phase = Phase.PERSIST if self._mode is Mode.REFRESH_AND_PERSIST else Phase.DONE
        return events

    # -- messages ------------------------------------------------------------

    def _entry(self, msg: SearchEntry) -> list[Event]:
        raw = msg.controls.get(SYNC_STATE_OID)
        if raw is None:
            raise SyncProtocolError(f"entry {msg.dn!r} has no Sync State control")
        try:
            st = decode_sync_state(raw)
        except SyncProtocolError as exc:
            raise SyncProtocolError(f"entry {msg.dn!r}: {exc}") from None
        events: list[Event]
        if st.state is StateKind.PRESENT:
            if not self._refreshing:
                raise SyncProtocolError(f"entry {msg.dn!r} in present state during persist stage")
            self._enter(Phase.REFRESH_PRESENT, f"entry {msg.dn!r} in present state")
            events = self._present(st.uuid, msg.dn)
        elif st.state is StateKind.DELETE:
            if self._refreshing:
                self._enter(Phase.REFRESH_DELETE, f"entry {msg.dn!r} in delete state")
            events = [self._delete(st.uuid, msg.dn)]
        else:
            self._seen(st.uuid)
            given = msg.attributes
            attrs: Mapping[str, tuple[bytes, ...]] | Attributes
            if isinstance(given, Attributes):
                attrs = given
            else:
                attrs = MappingProxyType({k: tuple(bytes(v) for v in vs) for k, vs in given.items()})
            events = [EntryChanged(st.uuid, msg.dn, attrs)]
        return events + self._take_cookie(st.cookie)

    def _intermediate(self, msg: IntermediateResponse) -> list[Event]:
        if msg.name != SYNC_INFO_OID:
            return []  # not ours (RFC 4511 lets other extensions interleave these)
        if msg.value is None:
            raise SyncProtocolError("Sync Info message without a value")
        info = decode_sync_info(msg.value)
        if isinstance(info, SyncInfoNewCookie):
            return self._take_cookie(info.cookie)
        if isinstance(info, SyncInfoIdSet):
            return self._id_set(info)
        name = "refreshPresent" if isinstance(info, SyncInfoRefreshPresent) else "refreshDelete"
        if not self._refreshing:
            raise SyncProtocolError(f"Sync Info {name} during persist stage")
        if info.refresh_done and self._mode is Mode.REFRESH_ONLY:
            raise SyncProtocolError(f"Sync Info {name} with refreshDone in refreshOnly mode (expected SearchDone)")
        present = isinstance(info, SyncInfoRefreshPresent)
        self._enter(Phase.REFRESH_PRESENT if present else Phase.REFRESH_DELETE, f"Sync Info {name}")
        events = self._end_phase(present)
        if self._phase is Phase.DONE:  # the phase named an entry the copy does not hold
            return events
        if info.cookie is not None:
            self._pending_cookie = info.cookie
        if info.refresh_done:
            return events + self._end_refresh()
        # RFC 4533 3.3.1: a present phase may be followed by a delete phase.
        self._phase = Phase.REFRESH_DELETE if present else Phase.REFRESH
        return events

    def _id_set(self, info: SyncInfoIdSet) -> list[Event]:
        events: list[Event] = []
        if info.refresh_deletes:
            if self._refreshing:
                self._enter(Phase.REFRESH_DELETE, "Sync Info syncIdSet of deleted UUIDs")
            events = [self._delete(u, None) for u in info.uuids]
        else:
            if not self._refreshing:
                raise SyncProtocolError("Sync Info syncIdSet of present UUIDs during persist stage")
            self._enter(Phase.REFRESH_PRESENT, "Sync Info syncIdSet of present UUIDs")
            events = [ev for u in info.uuids for ev in self._present(u, None)]
        return events + self._take_cookie(info.cookie)

    def _done(self, msg: SearchDone) -> list[Event]:
        refreshing = self._refreshing
        if msg.result_code == E_SYNC_REFRESH_REQUIRED:
            self._phase = Phase.DONE
            self._cookie = None
            self._pending_cookie = None
            return [RefreshRequired()]
        raw = msg.controls.get(SYNC_DONE_OID)
        done = decode_sync_done(raw) if raw is not None else None
        if msg.result_code != 0 or not refreshing:
            # A failed refresh drops the held-back cookie, so a retry redoes this refresh.
            self._phase = Phase.DONE
            self._pending_cookie = None
            events: list[Event] = []
            if not refreshing and done is not None:
                events += self._commit_cookie(done.cookie)
            return [*events, SearchFinished(msg.result_code, msg.message)]
        if done is None:
            raise SyncProtocolError("successful SearchDone during refresh without Sync Done control")
        present = not done.refresh_deletes
        self._enter(Phase.REFRESH_PRESENT if present else Phase.REFRESH_DELETE, "Sync Done")
        events = self._end_phase(present)
        if self._phase is Phase.DONE:  # the phase named an entry the copy does not hold
            return events
        if done.cookie is not None:
            self._pending_cookie = done.cookie
        events += self._end_refresh()
        self._phase = Phase.DONE
        if self._mode is Mode.REFRESH_AND_PERSIST:
            events.append(SearchFinished(msg.result_code, msg.message))
        return events
