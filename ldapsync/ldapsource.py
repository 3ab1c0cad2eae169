"""Read the directory from LDAP with ldap3: paged, minimal attributes, never partial.

ldap3 does not raise on sizeLimitExceeded/timeLimitExceeded: it hands back the truncated
entries. Every page's result code is therefore checked, and anything but success (or a
referral we cannot follow) fails the whole read, so a truncated directory never becomes a
truncated map.
"""

from __future__ import annotations

import contextlib
import math
import ssl
import stat
from dataclasses import dataclass
from typing import Any

import ldap3
import structlog
from ldap3.core.exceptions import LDAPException
from ldap3.core.results import RESULT_CODES
from ldap3.operation.search import search_operation
from ldap3.utils.asn1 import encode as asn1_encode
from pyasn1.error import PyAsn1Error

from ldapsync import ber
from ldapsync.config import LdapSource
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry, sort_entries
from ldapsync.errors import ConfigError, SourceError
from ldapsync.schema import AttributeMap

log = structlog.get_logger(__name__)

PAGED_RESULTS = "1.2.840.113556.1.4.319"
SCOPES = {"sub": ldap3.SUBTREE, "one": ldap3.LEVEL, "base": ldap3.BASE}
SCOPE_CODES = {"base": 0, "one": 1, "sub": 2}
RECV_SIZE = 1 << 18


@dataclass(frozen=True, slots=True)
class Connected:
    conn: ldap3.Connection
    uri: str


def bind_password(cfg: LdapSource) -> str | None:
    if cfg.bind_password_file is None:
        return None
    try:
        st = cfg.bind_password_file.stat()
        text = cfg.bind_password_file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            f"cannot read {cfg.bind_password_file}: {e.strerror}", key="source.ldap.bind_password_file"
        ) from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "bind password file is readable by group or others",
            path=str(cfg.bind_password_file),
            mode=oct(stat.S_IMODE(st.st_mode)),
        )
    return text.rstrip("\r\n")


class _Tls(ldap3.Tls):  # type: ignore[misc]  # ldap3 ships no type information
    """ldap3.Tls with the handshake and the host name check done by the ssl module.

    ldap3 checks the name itself after the handshake, with the deprecated ssl.match_hostname,
    and on a mismatch drops the wrapped socket unclosed. On async connections (the live
    agent's stream) its receiver thread runs the StartTLS handshake: a failure there killed
    the thread and left the caller waiting ~20 s for "no response". Here it is kept in
    ``failure`` and the caller sees ``tls_started`` False (the plain socket is gone with it).
    Only what _server sets (validate, ca_certs_file) is honoured.
    """

    failure: Exception | None = None

    def wrap_socket(self, connection: ldap3.Connection, do_handshake: bool = False) -> None:
        context = ssl.create_default_context(cafile=self.ca_certs_file)
        if self.validate == ssl.CERT_NONE:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        connection.socket = context.wrap_socket(
            connection.socket, server_hostname=connection.server.host, do_handshake_on_connect=do_handshake
        )

    def _start_tls(self, connection: ldap3.Connection) -> bool:
        try:
            return bool(super()._start_tls(connection))
        except LDAPException as e:
            if connection.strategy.sync:
                raise
            self.failure = e
            return False


def _server(uri: str, cfg: LdapSource) -> ldap3.Server:
    tls = None
    if uri.lower().startswith("ldaps://") or cfg.start_tls:
        if not cfg.tls_verify:
            log.warning("TLS certificate verification is disabled", uri=uri)
        tls = _Tls(
            validate=ssl.CERT_REQUIRED if cfg.tls_verify else ssl.CERT_NONE,
            ca_certs_file=str(cfg.ca_file) if cfg.ca_file else None,
        )
    return ldap3.Server(uri, get_info=ldap3.NONE, connect_timeout=cfg.timeout, tls=tls)


def connect(cfg: LdapSource, **kwargs: Any) -> Connected:
    """Bind to the first server in `uri` order that answers; name each failure otherwise."""
    password = bind_password(cfg)
    failures = []
    for uri in cfg.uris:
        conn = None
        try:
            conn = ldap3.Connection(
                _server(uri, cfg),
                user=cfg.bind_dn,
                password=password,
                authentication=ldap3.SIMPLE if cfg.bind_dn else ldap3.ANONYMOUS,
                receive_timeout=math.ceil(cfg.timeout),  # ldap3 packs it as a C long
                read_only=True,
                check_names=False,
                raise_exceptions=False,
                auto_referrals=False,
                **kwargs,
            )
            conn.open()
            if cfg.start_tls and not uri.lower().startswith(("ldaps://", "ldapi://")) and not conn.start_tls():
                raise SourceError(f"StartTLS failed: {conn.result.get('description')}")
            if not conn.bind():
                raise SourceError(f"bind as {cfg.bind_dn or 'anonymous'} failed: {conn.result.get('description')}")
            return Connected(conn, uri)
        except (LDAPException, OSError, SourceError) as e:
            if conn is not None:
                _abandon(conn)  # no socket left for the GC to find
            failures.append(f"{uri}: {e}")
            log.warning("LDAP server unavailable, trying the next", uri=uri, error=str(e))
    raise SourceError("no LDAP server could be used: " + "; ".join(failures))


def read(cfg: LdapSource, attributes: AttributeMap) -> Snapshot:
    connected = connect(cfg)
    try:
        return search(connected, cfg, attributes)
    finally:
        with contextlib.suppress(LDAPException, OSError):
            connected.conn.unbind()


def search(connected: Connected, cfg: LdapSource, attributes: AttributeMap) -> Snapshot:
    """Read every entry under base_dn (paged); raise SourceError rather than return a partial read."""
    wanted = attributes.ldap_attributes()
    if connected.conn.strategy_type == ldap3.SYNC and not connected.conn.closed:
        snapshot = _fast_search(connected, cfg, wanted)
    else:
        snapshot = _ldap3_search(connected, cfg, wanted)
    log.debug("read directory", uri=connected.uri, entries=len(snapshot.entries))
    return snapshot


def _filter_ber(cfg: LdapSource) -> bytes:
    """The config's filter as BER, compiled by ldap3 (escaping rules and all)."""
    try:
        request = search_operation(
            cfg.base_dn, cfg.filter, SCOPES[cfg.scope], ldap3.DEREF_NEVER, [], 0, 0, False, True, True
        )
        return bytes(asn1_encode(request["filter"]))
    except (LDAPException, PyAsn1Error, ValueError, TypeError) as e:
        raise ConfigError(f"invalid LDAP filter {cfg.filter!r}: {e}", key="source.ldap.filter") from e


def _fast_search(connected: Connected, cfg: LdapSource, wanted: list[str]) -> Snapshot:
    """Paged search on the bound socket, decoded with ldapsync.ber.

    While page n is decoded, the request for page n+1 is already on the wire, so slapd builds
    the next page in parallel. Any failure closes the connection: its stream is unusable.
    """
    conn, uri = connected.conn, connected.uri
    filter_ber = _filter_ber(cfg)
    scope = SCOPE_CODES[cfg.scope]
    keep = frozenset(w.lower() for w in wanted)
    entries: list[Entry] = []
    rejections: list[Rejection] = []
    sock = conn.socket
    buf = bytearray()
    pages = 0
    previous_timeout = sock.gettimeout()

    def send(cookie: bytes) -> int:
        mid: int = conn.server.next_message_id()
        request = ber.search_request(
            mid, cfg.base_dn, scope, 0, filter_ber, wanted, [ber.paged_control(cfg.page_size, cookie)]
        )
        sock.sendall(request)
        return mid

    try:
        sock.settimeout(cfg.timeout)  # per recv, like ldap3's receive_timeout
        mid = send(b"")
        while True:
            spans: list[tuple[int, int]] = []
            pos, done = 0, None
            while done is None:
                pos, msg = ber.scan(buf, pos, len(buf), mid, spans)
                if msg is None:
                    data = sock.recv(RECV_SIZE)
                    if not data:
                        raise SourceError(f"{uri}: connection closed by the server during the search")
                    buf += data
                    continue
                if msg.message_id == 0 and msg.op == ber.EXTENDED_RESP:
                    result = ber.decode_result(buf, msg)
                    raise SourceError(f"{uri}: server disconnected: {result.message or result.code}")
                if msg.message_id != mid:
                    raise SourceError(f"{uri}: unexpected LDAP message id {msg.message_id} (expected {mid})")
                if msg.op == ber.SEARCH_RES_REF:
                    urls = ", ".join(ber.referral_urls(buf, msg))
                    raise SourceError(f"{uri}: referral to {urls} cannot be followed; refusing a partial read")
                if msg.op == ber.SEARCH_RES_DONE:
                    done = msg
                elif msg.op != ber.INTERMEDIATE_RESP:
                    raise SourceError(f"{uri}: unexpected LDAP operation 0x{msg.op:02x} in a search response")
            result = ber.decode_result(buf, done)
            pages += 1
            if result.code != 0:
                raise SourceError(
                    f"{uri}: search of {cfg.base_dn} failed after {len(entries) + len(spans)} entries: "
                    f"{RESULT_CODES.get(result.code, 'unknown')} ({result.code}) {result.message}".rstrip()
                )
            cookie = ber.paged_cookie(result.controls[PAGED_RESULTS]) if PAGED_RESULTS in result.controls else b""
            page = bytes(buf[:pos])
            del buf[:pos]
            if cookie:
                mid = send(cookie)  # the server works on the next page while we decode this one
            _decode_page(page, spans, keep, entries, rejections)
            if not cookie:
                break
        if buf:
            raise SourceError(f"{uri}: unexpected data after the last page")
    except SourceError:
        _abandon(conn)
        raise
    except (ber.BerError, IndexError) as e:
        _abandon(conn)
        raise SourceError(f"{uri}: malformed LDAP response after {len(entries)} entries: {e}") from e
    except OSError as e:
        _abandon(conn)
        raise SourceError(f"{uri}: search failed after {pages} page(s), {len(entries)} entries: {e}") from e
    sock.settimeout(previous_timeout)
    log.debug("paged search", uri=uri, pages=pages)
    return Snapshot(sort_entries(entries), f"ldap:{uri}", tuple(rejections))


def _decode_page(
    page: bytes,
    spans: list[tuple[int, int]],
    keep: frozenset[str],
    entries: list[Entry],
    rejections: list[Rejection],
) -> None:
    decode_entry = ber.decode_entry
    append = entries.append
    names: dict[bytes, str] = {}
    for start, end in spans:
        dn, attrs, bad = decode_entry(page, start, end, keep, names)
        uuids = attrs.pop("entryuuid", None)
        for name in bad:
            if name.lower() != "entryuuid":
                rejections.append(Rejection(dn, name, "value is not valid UTF-8"))
        append(Entry(dn, attrs, uuids[-1] if uuids else None))


def _abandon(conn: ldap3.Connection) -> None:
    """The stream is mid-response or broken: close the socket so nobody reads garbage.

    ldap3 keeps the socket of a failed open() (and unbind() skips a "closed" connection),
    so it is closed here too.
    """
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()
    sock = getattr(conn, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def _ldap3_search(connected: Connected, cfg: LdapSource, wanted: list[str]) -> Snapshot:
    """The generic path, for connections whose strategy reads the socket itself (async)."""
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
                search_scope=SCOPES[cfg.scope],
                dereference_aliases=ldap3.DEREF_NEVER,
                attributes=wanted,
                paged_size=cfg.page_size,
                paged_cookie=cookie,
            )
            if conn.strategy.sync:
                result, response = conn.result or {}, conn.response or []
            else:  # async strategies return a message id
                response, result = conn.get_response(sent)
        except (LDAPException, OSError) as e:
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
        control = (result.get("controls") or {}).get(PAGED_RESULTS)
        cookie = control["value"]["cookie"] if control else None
        if not cookie:
            break
    return Snapshot(sort_entries(entries), f"ldap:{uri}", tuple(rejections))
