"""The syncrepl search on the wire: its request and its responses as bytes, via ldapsync.ber.

Sans-I/O like `syncrepl`: the follower sends `search_request()` on its socket and feeds every
chunk it receives to `Reader.feed`, which frames the complete LDAP messages and decodes each
into the `syncrepl` message the consumer takes. Entries are decoded the way the paged read
decodes them (only the wanted attributes, names lower-cased, values as text), so neither
ldap3's decoder nor a copy per entry stands between the socket and the mirror. Anything that
is not a well-formed response of this search raises WireError; nothing of a malformed message
is returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ldapsync import ber, syncrepl
from ldapsync.directory import Attributes

# RFC 4511 IntermediateResponse ::= [APPLICATION 25] SEQUENCE {
#     responseName [0] LDAPOID OPTIONAL, responseValue [1] OCTET STRING OPTIONAL }
_RESPONSE_NAME = 0x80
_RESPONSE_VALUE = 0x81
DEREF_NEVER = 0
MAX_MESSAGE = 1 << 28  # 256 MiB: a length beyond any entry a mail directory holds is a lie, not a wait


class WireError(ValueError):
    """The server sent something that is not a well-formed response of this search."""


def search_request(
    message_id: int,
    base: str,
    scope: int,
    filter_ber: bytes,
    attributes: Sequence[str],
    sync_request: bytes,
) -> bytes:
    """The searchRequest carrying the (critical) Sync Request control value `sync_request`."""
    control = ber.control(syncrepl.SYNC_REQUEST_OID, True, sync_request)
    return ber.search_request(message_id, base, scope, DEREF_NEVER, filter_ber, attributes, [control])


class Reader:
    """Responses of the sync search `message_id`, from bytes as they arrive.

    An entry whose values are all valid UTF-8 comes with its directory attributes, decoded
    as the paged read does (wanted ones only, names lower-cased, text values; entryUUID is
    left out: the Sync State control names the entry); an entry with a value that is not
    comes with all its raw values instead, so that whoever makes the directory entry of it
    rejects exactly those values, by name, as for any raw entry.
    """

    def __init__(self, message_id: int, wanted: Iterable[str]) -> None:
        self.message_id = message_id
        self._keep = frozenset(w.lower() for w in wanted)
        self._names: dict[bytes, str] = {}
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received but not yet a complete message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[syncrepl.Message]:
        """The messages completed by `data`, in order."""
        buf = self._buf
        buf += data
        size, pos = len(buf), 0
        try:
            while size - pos >= 2:
                length = ber.message_length(buf, pos, size)
                if length > MAX_MESSAGE:
                    raise WireError(f"an LDAP message of {length} bytes (more than {MAX_MESSAGE} is not believed)")
                if length < 0 or pos + length > size:
                    break
                pos += length
            if pos == 0:
                return []
            chunk = bytes(buf[:pos])
            del buf[:pos]
            out: list[syncrepl.Message] = []
            i = 0
            while i < pos:
                end = i + ber.message_length(chunk, i, pos)
                out.append(self._message(chunk, ber.frame(chunk, i, end)))
                i = end
            return out
        except WireError:
            raise
        except (ber.BerError, IndexError) as e:
            raise WireError(f"malformed LDAP message: {e or type(e).__name__}") from e

    def _message(self, b: bytes, msg: ber.Message) -> syncrepl.Message:
        if msg.message_id != self.message_id:
            if msg.message_id == 0 and msg.op == ber.EXTENDED_RESP:  # RFC 4511 notice of disconnection
                result = ber.decode_result(b, msg)
                raise WireError(f"server disconnected: {result.message or result.code}")
            raise WireError(f"unexpected LDAP message id {msg.message_id} (expected {self.message_id})")
        op = msg.op
        if op == ber.SEARCH_RES_ENTRY:
            return self._entry(b, msg)
        if op == ber.INTERMEDIATE_RESP:
            return _intermediate(b, msg)
        if op == ber.SEARCH_RES_DONE:
            result = ber.decode_result(b, msg)
            controls = {oid: value or b"" for oid, value in result.controls.items()}
            return syncrepl.SearchDone(result.code, result.message, controls)
        if op == ber.SEARCH_RES_REF:
            return syncrepl.SearchReference(ber.referral_urls(b, msg))
        raise WireError(f"unexpected LDAP operation 0x{op:02x} in a search response")

    def _entry(self, b: bytes, msg: ber.Message) -> syncrepl.SearchEntry:
        dn, attrs, bad = ber.decode_entry(b, msg.start, msg.end, self._keep, self._names)
        state = _sync_state(b, msg.controls) if msg.controls is not None else None
        if state is not None:
            controls = {syncrepl.SYNC_STATE_OID: state}
        else:
            controls = {oid: value or b"" for oid, value in ber.decode_controls(b, msg).items()}
        if bad:
            return syncrepl.SearchEntry(dn, _raw_attributes(b, msg.start, msg.end), controls)
        attrs.pop("entryuuid", None)
        return syncrepl.SearchEntry(dn, Attributes.of(attrs), controls)


_SYNC_STATE_OID = ber.tlv(0x04, syncrepl.SYNC_STATE_OID.encode("ascii"))


def _sync_state(b: bytes, controls: tuple[int, int]) -> bytes | None:
    """The value of the one control every sync entry carries, if it is the only one, else
    None (then the general control decoder reads them all)."""
    start, end = controls
    tag, s, e = ber.header(b, start, end)
    if tag != 0x30 or e != end or not b.startswith(_SYNC_STATE_OID, s):
        return None
    i = s + len(_SYNC_STATE_OID)
    if i < e and b[i] == 0x01:  # criticality
        _, _, i = ber.header(b, i, e)
    if i >= e:
        return None
    tag, vs, ve = ber.header(b, i, e)
    return b[vs:ve] if tag == 0x04 and ve == e else None


def _intermediate(b: bytes, msg: ber.Message) -> syncrepl.IntermediateResponse:
    name: str | None = None
    value: bytes | None = None
    i = msg.start
    while i < msg.end:
        tag, s, e = ber.header(b, i, msg.end)
        if tag == _RESPONSE_NAME and name is None and value is None:
            name = b[s:e].decode("ascii", "replace")
        elif tag == _RESPONSE_VALUE and value is None:
            value = b[s:e]
        else:
            raise WireError(f"malformed intermediate response (element 0x{tag:02x})")
        i = e
    return syncrepl.IntermediateResponse(name, value)


def _raw_attributes(b: bytes, start: int, end: int) -> dict[str, list[bytes]]:
    """searchResEntry content -> {name as sent: raw values}; the structure is already checked."""
    _, _, i = ber.header(b, start, end)  # objectName
    _, i, end = ber.header(b, i, end)  # attribute list
    out: dict[str, list[bytes]] = {}
    while i < end:
        _, s, aend = ber.header(b, i, end)
        _, ns, ne = ber.header(b, s, aend)
        _, j, vend = ber.header(b, ne, aend)
        values = out.setdefault(b[ns:ne].decode("latin-1"), [])
        while j < vend:
            _, vs, ve = ber.header(b, j, vend)
            values.append(b[vs:ve])
            j = ve
        i = aend
    return out
