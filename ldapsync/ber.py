"""Just enough LDAP BER (RFC 4511 §5.1) to run a paged search fast, in pure Python.

ldap3 decodes every searchResEntry into dicts of formatted values (pyasn1 or its "fast"
decoder plus per-attribute formatting): at 100k entries that is most of a full sync. Here a
search response is framed straight from the socket buffer and each entry is decoded in one
tight loop into exactly what the Snapshot needs. LDAP BER is the restricted form (definite
lengths, primitive strings), so anything else is rejected as malformed, never guessed at.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# protocolOp tags ([APPLICATION n], constructed unless noted)
SEARCH_REQUEST = 0x63
SEARCH_RES_ENTRY = 0x64
SEARCH_RES_DONE = 0x65
SEARCH_RES_REF = 0x73
EXTENDED_RESP = 0x78
INTERMEDIATE_RESP = 0x79
CONTROLS = 0xA0  # [0] Controls in LDAPMessage
REFERRAL = 0xA3  # [3] Referral in LDAPResult

PAGED_RESULTS = "1.2.840.113556.1.4.319"


class BerError(ValueError):
    """The bytes are not a well-formed LDAP message."""


# ------------------------------------------------------------------------------ encoding
def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + _len(len(value)) + value


def integer(tag: int, n: int) -> bytes:
    """INTEGER/ENUMERATED (non-negative: all LDAP uses here)."""
    if n < 0:
        raise ValueError("negative integers are not needed in LDAP requests")
    return tlv(tag, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def control(oid: str, critical: bool, value: bytes | None) -> bytes:
    body = tlv(0x04, oid.encode("ascii"))
    if critical:
        body += b"\x01\x01\xff"
    if value is not None:
        body += tlv(0x04, value)
    return tlv(0x30, body)


def paged_control(size: int, cookie: bytes, critical: bool = False) -> bytes:
    """RFC 2696 pagedResultsControl: realSearchControlValue ::= SEQUENCE {size, cookie}."""
    return control(PAGED_RESULTS, critical, tlv(0x30, integer(0x02, size) + tlv(0x04, cookie)))


def search_request(
    message_id: int,
    base: str,
    scope: int,
    deref: int,
    filter_ber: bytes,
    attributes: Sequence[str],
    controls: Iterable[bytes] = (),
    size_limit: int = 0,
    time_limit: int = 0,
) -> bytes:
    """A whole LDAPMessage carrying a SearchRequest; `filter_ber` is the encoded Filter."""
    body = (
        tlv(0x04, base.encode("utf-8"))
        + integer(0x0A, scope)
        + integer(0x0A, deref)
        + integer(0x02, size_limit)
        + integer(0x02, time_limit)
        + b"\x01\x01\x00"  # typesOnly FALSE
        + filter_ber
        + tlv(0x30, b"".join(tlv(0x04, a.encode("utf-8")) for a in attributes))
    )
    message = integer(0x02, message_id) + tlv(SEARCH_REQUEST, body)
    ctrls = b"".join(controls)
    if ctrls:
        message += tlv(CONTROLS, ctrls)
    return tlv(0x30, message)


# ------------------------------------------------------------------------------ decoding
def header(b: bytes | bytearray, i: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the TLV at b[i]; it must fit before `end`."""
    if i + 2 > end:
        raise BerError("truncated element")
    tag = b[i]
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or i + k > end:
            raise BerError("indefinite or oversized length")
        n = int.from_bytes(b[i : i + k], "big")
        i += k
    if i + n > end:
        raise BerError("element longer than its container")
    return tag, i, i + n


def message_length(b: bytes | bytearray, i: int, end: int) -> int:
    """Total size of the LDAPMessage starting at b[i], or -1 if its header is incomplete."""
    if end - i < 2:
        return -1
    if b[i] != 0x30:
        raise BerError(f"LDAPMessage expected, got tag 0x{b[i]:02x}")
    n = b[i + 1]
    if n < 0x80:
        return 2 + n
    k = n & 0x7F
    if k == 0 or k > 4:
        raise BerError("indefinite or oversized LDAPMessage length")
    if end - i < 2 + k:
        return -1
    return 2 + k + int.from_bytes(b[i + 2 : i + 2 + k], "big")


@dataclass(frozen=True, slots=True)
class Message:
    """One framed LDAPMessage: its id, protocolOp tag and where the parts are in `data`."""

    message_id: int
    op: int
    start: int  # protocolOp content
    end: int
    controls: tuple[int, int] | None  # [0] Controls content span


def frame(b: bytes | bytearray, i: int, end: int) -> Message:
    """Split the LDAPMessage occupying exactly b[i:end] into id, op and controls."""
    tag, s, e = header(b, i, end)
    if tag != 0x30 or e != end:
        raise BerError("LDAPMessage is not a SEQUENCE of the framed size")
    tag, s2, e2 = header(b, s, e)
    if tag != 0x02 or not 1 <= e2 - s2 <= 4:
        raise BerError("bad messageID")
    mid = int.from_bytes(b[s2:e2], "big", signed=True)
    op, os_, oe = header(b, e2, e)
    controls = None
    if oe < e:
        ctag, cs, ce = header(b, oe, e)
        if ctag != CONTROLS or ce != e:
            raise BerError("unexpected data after protocolOp")
        controls = (cs, ce)
    return Message(mid, op, os_, oe, controls)


def decode_entry(
    b: bytes, start: int, end: int, keep: frozenset[str] | None, names: dict[bytes, str]
) -> tuple[str, dict[str, tuple[str, ...]], list[str]]:
    """searchResEntry content -> (DN, {lower-case name: UTF-8 values}, names with bad values).

    Only attributes in `keep` (lower-case; None: all) are decoded. A value that is not
    valid UTF-8 is left out and its attribute name listed (as the server spelled it), so the
    caller can reject it by name. `names` caches raw type -> lower-case name across calls. This is the hot loop of a
    full read: lengths are decoded inline, and nothing is built that is not returned.
    """
    i = start
    # objectName LDAPDN
    if b[i] != 0x04:
        raise BerError("searchResEntry without objectName")
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(b[i : i + k], "big")
        i += k
    if i + n > end:
        raise BerError("objectName longer than the entry")
    dn = b[i : i + n].decode("utf-8", "backslashreplace")
    i += n
    # attributes PartialAttributeList ::= SEQUENCE OF PartialAttribute
    if i >= end or b[i] != 0x30:
        raise BerError("searchResEntry without attribute list")
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(b[i : i + k], "big")
        i += k
    if i + n != end:
        raise BerError("attribute list does not end with the entry")
    attrs: dict[str, tuple[str, ...]] = {}
    bad: list[str] = []
    while i < end:
        # PartialAttribute ::= SEQUENCE { type AttributeDescription, vals SET OF value }
        if b[i] != 0x30:
            raise BerError("malformed attribute")
        n = b[i + 1]
        i += 2
        if n & 0x80:
            k = n & 0x7F
            n = int.from_bytes(b[i : i + k], "big")
            i += k
        aend = i + n
        if aend > end or b[i] != 0x04:
            raise BerError("malformed attribute type")
        n = b[i + 1]
        i += 2
        if n & 0x80:
            k = n & 0x7F
            n = int.from_bytes(b[i : i + k], "big")
            i += k
        raw_name = b[i : i + n]
        name = names.get(raw_name)
        if name is None:
            name = names[raw_name] = raw_name.decode("latin-1").lower()
        i += n
        if i >= aend or b[i] != 0x31:
            raise BerError("malformed attribute values")
        n = b[i + 1]
        i += 2
        if n & 0x80:
            k = n & 0x7F
            n = int.from_bytes(b[i : i + k], "big")
            i += k
        if i + n != aend:
            raise BerError("attribute values do not end with the attribute")
        if keep is not None and name not in keep:
            i = aend
            continue
        values: list[str] = []
        while i < aend:
            if b[i] != 0x04:
                raise BerError("attribute value is not an OCTET STRING")
            n = b[i + 1]
            i += 2
            if n & 0x80:
                k = n & 0x7F
                n = int.from_bytes(b[i : i + k], "big")
                i += k
            j = i + n
            if j > aend:
                raise BerError("attribute value longer than its attribute")
            try:
                values.append(b[i:j].decode("utf-8"))
            except UnicodeDecodeError:
                bad.append(raw_name.decode("latin-1"))  # as the server spells it, for messages
            i = j
        if values:
            old = attrs.get(name)
            attrs[name] = tuple(values) if old is None else old + tuple(values)
    if i != end:
        raise BerError("attribute list overruns the entry")
    return dn, attrs, bad


@dataclass(frozen=True, slots=True)
class Result:
    """An LDAPResult (e.g. searchResDone) and the message's controls."""

    code: int
    matched_dn: str
    message: str
    referrals: tuple[str, ...]
    controls: dict[str, bytes | None]


def decode_result(b: bytes | bytearray, msg: Message) -> Result:
    tag, s, e = header(b, msg.start, msg.end)
    if tag != 0x0A or not 1 <= e - s <= 4:
        raise BerError("bad resultCode")
    code = int.from_bytes(b[s:e], "big")
    tag, s, e2 = header(b, e, msg.end)
    if tag != 0x04:
        raise BerError("bad matchedDN")
    matched = bytes(b[s:e2]).decode("utf-8", "backslashreplace")
    tag, s, e3 = header(b, e2, msg.end)
    if tag != 0x04:
        raise BerError("bad diagnosticMessage")
    text = bytes(b[s:e3]).decode("utf-8", "backslashreplace")
    referrals: list[str] = []
    i = e3
    if i < msg.end:
        tag, s, e4 = header(b, i, msg.end)
        if tag == REFERRAL:
            j = s
            while j < e4:
                _, vs, ve = header(b, j, e4)
                referrals.append(bytes(b[vs:ve]).decode("utf-8", "backslashreplace"))
                j = ve
    return Result(code, matched, text, tuple(referrals), decode_controls(b, msg))


def decode_controls(b: bytes | bytearray, msg: Message) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    if msg.controls is None:
        return out
    i, end = msg.controls
    while i < end:
        tag, s, e = header(b, i, end)
        if tag != 0x30:
            raise BerError("malformed control")
        t, os_, oe = header(b, s, e)
        if t != 0x04:
            raise BerError("control without OID")
        oid = bytes(b[os_:oe]).decode("ascii", "replace")
        value = None
        j = oe
        while j < e:
            t, vs, ve = header(b, j, e)
            if t == 0x04:
                value = bytes(b[vs:ve])
            elif t != 0x01:
                raise BerError("malformed control")
            j = ve
        out[oid] = value
        i = e
    return out


def paged_cookie(value: bytes | None) -> bytes:
    """The cookie of an RFC 2696 response control value (b'' when the search is complete)."""
    if value is None:
        raise BerError("paged results control without a value")
    tag, s, e = header(value, 0, len(value))
    if tag != 0x30:
        raise BerError("malformed paged results value")
    tag, _, e2 = header(value, s, e)
    if tag != 0x02:
        raise BerError("malformed paged results size")
    tag, s3, e3 = header(value, e2, e)
    if tag != 0x04:
        raise BerError("malformed paged results cookie")
    return bytes(value[s3:e3])


def referral_urls(b: bytes | bytearray, msg: Message) -> tuple[str, ...]:
    """searchResRef ::= SEQUENCE OF URI (the op content is the list of URIs)."""
    out = []
    i = msg.start
    while i < msg.end:
        _, s, e = header(b, i, msg.end)
        out.append(bytes(b[s:e]).decode("utf-8", "backslashreplace"))
        i = e
    return tuple(out)


def scan(
    b: bytes | bytearray, i: int, end: int, message_id: int, entries: list[tuple[int, int]]
) -> tuple[int, Message | None]:
    """Frame the complete messages in b[i:end]: searchResEntry content spans of `message_id`
    are appended to `entries`; the first other message stops the scan and is returned framed.

    Returns (offset after the last consumed message, that message or None if the data ran
    out first). Entries are only located here; decode_entry() decodes them later.
    """
    while True:
        if end - i < 2:
            return i, None
        if b[i] != 0x30:
            raise BerError(f"LDAPMessage expected, got tag 0x{b[i]:02x}")
        n = b[i + 1]
        j = i + 2
        if n & 0x80:
            k = n & 0x7F
            if k == 0 or k > 4:
                raise BerError("indefinite or oversized LDAPMessage length")
            if end - i < 2 + k:
                return i, None
            n = int.from_bytes(b[j : j + k], "big")
            j += k
        mend = j + n
        if mend > end:
            return i, None
        if b[j] != 0x02 or not 1 <= b[j + 1] <= 4:
            raise BerError("bad messageID")
        ln = b[j + 1]
        mid = int.from_bytes(b[j + 2 : j + 2 + ln], "big")
        j += 2 + ln
        if mid != message_id or b[j] != SEARCH_RES_ENTRY:
            return mend, frame(b, i, mend)
        n = b[j + 1]
        j += 2
        if n & 0x80:
            k = n & 0x7F
            if k == 0 or k > 4:
                raise BerError("indefinite or oversized length")
            n = int.from_bytes(b[j : j + k], "big")
            j += k
        if j + n > mend:
            raise BerError("searchResEntry longer than its message")
        entries.append((j, j + n))
        i = mend
