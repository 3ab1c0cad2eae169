"""Read the directory from LDAP with ldap3: paged, minimal attributes, never partial.

ldap3 does not raise on sizeLimitExceeded/timeLimitExceeded: it hands back the truncated
entries. Every page's result code is therefore checked, and anything but success (or a
referral we cannot follow) fails the whole read, so a truncated directory never becomes a
truncated map.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import stat
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ldap3
import structlog
import tenacity
from ldap3.core.exceptions import LDAPException, LDAPSessionTerminatedByServerError, LDAPSocketSendError
from ldap3.core.results import RESULT_CODES
from ldap3.operation.search import search_operation
from ldap3.utils.asn1 import encode as asn1_encode
from pyasn1.error import PyAsn1Error

from ldapsync import ber, pagedigest
from ldapsync.config import LdapSource
from ldapsync.directory import Entry, Rejection, Snapshot, sort_entries
from ldapsync.errors import ConfigError, SourceError, Unreachable
from ldapsync.pagedigest import decode_page
from ldapsync.schema import AttributeMap

log = structlog.get_logger(__name__)

SCOPES = {"sub": ldap3.SUBTREE, "one": ldap3.LEVEL, "base": ldap3.BASE}
SCOPE_CODES = {"base": 0, "one": 1, "sub": 2}
RECV_SIZE = 1 << 18


@dataclass(frozen=True, slots=True)
class RootDse:
    """What the follower needs from the root DSE, read once per connection."""

    controls: frozenset[str]
    naming_contexts: tuple[str, ...]

    def suffix_of(self, dn: str) -> str | None:
        """The naming context holding `dn` (the longest that ends it), or None."""
        low = dn.lower()
        return next((c for c in sorted(self.naming_contexts, key=len, reverse=True) if low.endswith(c.lower())), None)


@dataclass(frozen=True, slots=True)
class Connected:
    conn: ldap3.Connection
    uri: str
    root_dse: RootDse | None = None

    def close(self) -> None:
        _abandon(self.conn)


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


# What ldap3's decoders raise on bytes that are not LDAP (an HTTP server on the port, say)
MALFORMED = (KeyError, IndexError, ValueError, TypeError, PyAsn1Error, struct.error)


def connect(
    cfg: LdapSource,
    *,
    uris: tuple[str, ...] | None = None,
    root_dse: bool = False,
    stream: bool = False,
    raw: bool = False,
    **kwargs: Any,
) -> Connected:
    """Bind to the first server in `uris` (default: the config's, in order) that answers.

    Each failure is logged and named in the SourceError if none works, including a server
    that answers with something that is not LDAP. `root_dse` reads supportedControl and
    namingContexts once. `stream` gives the psearch follower's connection: ldap3's
    ASYNC_STREAM strategy on a blocking socket with short TCP keepalive; connect over a
    synchronous connection first where StartTLS is needed (ldap3's asynchronous StartTLS
    waits ~20 s for an answer when the server refuses it). `raw` gives a synchronous
    connection with the same keepalive whose socket the caller then reads itself (the
    syncrepl follower: its timeouts are the caller's too).
    """
    password = bind_password(cfg)
    if stream:
        kwargs.setdefault("client_strategy", ldap3.ASYNC_STREAM)
    else:
        kwargs.setdefault("receive_timeout", math.ceil(cfg.timeout))  # ldap3 packs it as a C long
    failures = []
    refused = False  # some server answered and said no: asking again will not help
    for uri in uris or cfg.uris:
        conn = None
        try:
            conn = ldap3.Connection(
                _server(uri, cfg),
                user=cfg.bind_dn,
                password=password,
                authentication=ldap3.SIMPLE if cfg.bind_dn else ldap3.ANONYMOUS,
                read_only=True,
                check_names=False,
                raise_exceptions=False,
                auto_referrals=False,
                **kwargs,
            )
            conn.open(read_server_info=False)
            # step by step, not auto_bind: an async StartTLS "succeeds" even when the handshake failed
            if (
                cfg.start_tls
                and not uri.lower().startswith(("ldaps://", "ldapi://"))
                and (not conn.start_tls(read_server_info=False) or not conn.tls_started)
            ):
                failure = getattr(conn.server.tls, "failure", None) or (conn.result or {}).get("description")
                raise SourceError(f"StartTLS failed: {failure or conn.last_error or 'no TLS'}")
            if not conn.bind(read_server_info=False):
                raise SourceError(
                    f"bind as {cfg.bind_dn or 'anonymous'} failed: {(conn.result or {}).get('description')}"
                )
            dse = _read_root_dse(conn) if root_dse else None
            if stream or raw:
                _stream_socket(conn, cfg.timeout)
            return Connected(conn, uri, dse)
        except (LDAPException, OSError, SourceError, *MALFORMED) as e:
            if conn is not None:
                _abandon(conn)  # no socket left for the GC to find
            reason = str(e) if isinstance(e, (LDAPException, OSError, SourceError)) else _not_ldap(e)
            refused = refused or not isinstance(e, (LDAPException, OSError))
            failures.append(f"{uri}: {reason}")
            log.warning("LDAP server unavailable, trying the next", uri=uri, error=reason)
    raise (SourceError if refused else Unreachable)("no LDAP server could be used: " + "; ".join(failures))


def _not_ldap(e: BaseException) -> str:
    return f"the answer is not LDAP (is this an LDAP server?): {type(e).__name__}: {e}"


def _read_root_dse(conn: ldap3.Connection) -> RootDse:
    if not conn.search(
        "", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["supportedControl", "namingContexts"]
    ):
        result = conn.result or {}
        if result.get("result") not in (0, None):
            raise SourceError(f"reading the root DSE failed: {result.get('description')}")
    raw: dict[str, list[Any]] = {}
    for item in conn.response or ():
        for name, values in (item.get("raw_attributes") or {}).items():
            raw.setdefault(name.lower(), []).extend(values)

    def texts(name: str) -> list[str]:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in raw.get(name, ())]

    return RootDse(frozenset(texts("supportedcontrol")), tuple(texts("namingcontexts")))


def alive(connected: Connected, within: float) -> bool:
    """A cheap read on `connected`: the root DSE, base scope, no attributes.

    True: answered. False: the server had closed this connection (its idle timeout, say):
    open another and ask again. SourceError: no answer within `within` seconds, or not LDAP.
    """
    conn = connected.conn
    sock = getattr(conn, "socket", None)
    if conn.closed or sock is None:
        return False
    previous = sock.gettimeout()
    try:
        sock.settimeout(within)  # shorter than the connection's receive timeout, for this read only
        ok = conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["1.1"])
    except (LDAPSessionTerminatedByServerError, LDAPSocketSendError):
        return False
    except (LDAPException, OSError, *MALFORMED) as e:
        raise SourceError(f"{connected.uri}: no answer to a liveness check within {within:g} s: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    if not ok and (conn.result or {}).get("result") != 0:
        raise SourceError(f"{connected.uri}: liveness check failed: {(conn.result or {}).get('description')}")
    return True


def context_csn(connected: Connected, base_dn: str) -> str | None:
    """The contextCSN of the suffix holding `base_dn` (syncprov keeps it), or None if it has none."""
    suffix = connected.root_dse.suffix_of(base_dn) if connected.root_dse else None
    if suffix is None:
        return None
    conn = connected.conn
    try:
        conn.search(suffix, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["contextCSN"])
    except (LDAPException, OSError, *MALFORMED) as e:
        raise SourceError(f"{connected.uri}: contextCSN check failed: {e}") from e
    for item in conn.response or ():
        values = (item.get("raw_attributes") or {}).get("contextCSN", [])
        if values:
            return b";".join(sorted(v if isinstance(v, bytes) else str(v).encode() for v in values)).decode()
    return None


def context_csn_values(connected: Connected, suffix: str, within: float) -> tuple[bytes, ...]:
    """The raw contextCSN values of `suffix` (one per provider's serverID), read within `within` s.

    Empty when the suffix has none or the read is refused (no syncprov, an ACL): the in-step
    check is then not available. SourceError: no answer in time, or the connection failed.
    """
    conn = connected.conn
    sock = getattr(conn, "socket", None)
    if conn.closed or sock is None:
        raise SourceError(f"{connected.uri}: contextCSN read: the connection is closed")
    previous = sock.gettimeout()
    try:
        sock.settimeout(within)
        conn.search(suffix, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["contextCSN"])
    except (LDAPException, OSError, *MALFORMED) as e:
        what = f"{connected.uri}: no answer to the contextCSN read of {suffix} within {within:g} s: {e}"
        raise SourceError(what) from e
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    for item in conn.response or ():
        for name, values in (item.get("raw_attributes") or {}).items():
            if name.lower() == "contextcsn":
                return tuple(v if isinstance(v, bytes) else str(v).encode() for v in values)
    return ()


def _stream_socket(conn: ldap3.Connection, timeout: float) -> None:
    """A blocking socket with TCP keepalive after `timeout` idle seconds.

    ldap3 leaves the connect timeout on the socket, and its receiver thread treats a recv
    timeout as end of stream, so a quiet directory would drop the stream every `timeout`
    seconds; setting ldap3's receive_timeout instead makes that thread spin on a closed
    socket. Keepalive finds a peer that vanished without FIN (a rebooted host, a dropped
    NAT entry); a server process that is stopped but whose kernel still answers is found by
    the follower's liveness check, not here.
    """
    sock = getattr(conn, "socket", None)
    if sock is None:
        return
    idle = max(1, math.ceil(timeout))
    with contextlib.suppress(OSError):
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def connect_in_rounds(
    cfg: LdapSource, rounds: int, *, sleep: Callable[[float], None] = time.sleep, root_dse: bool = False
) -> Connected:
    """`connect`, and while no server answers at all, every uri again after 1 s, 2 s, 4 s...
    (at most `timeout`), `rounds` times in all. For a one-shot run: a cron `--once` during a
    server restart should not fail the run. The agent asks for one round; its scheduler owns
    the retrying. A server that answered and refused is not asked again."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(rounds),
        wait=tenacity.wait_exponential(multiplier=1, min=1, max=max(1.0, cfg.timeout)),
        retry=tenacity.retry_if_exception_type(Unreachable),
        sleep=sleep,
        reraise=True,
        before_sleep=_log_round,
    )
    return retrying(connect, cfg, root_dse=root_dse)


def _log_round(state: tenacity.RetryCallState) -> None:
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("no LDAP server answered; trying them all again", round=state.attempt_number, retry_in=wait)


def read(
    cfg: LdapSource,
    attributes: AttributeMap,
    *,
    rounds: int = 1,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[int], None] | None = None,
) -> Snapshot:
    """`progress` is told the number of entries read after each page."""
    connected = connect_in_rounds(cfg, rounds, sleep=sleep)
    try:
        return search(connected, cfg, attributes, progress)
    finally:
        connected.close()


def search(
    connected: Connected, cfg: LdapSource, attributes: AttributeMap, progress: Callable[[int], None] | None = None
) -> Snapshot:
    """Read every entry under base_dn (paged); raise SourceError rather than return a partial read."""
    if connected.conn.strategy_type != ldap3.SYNC or connected.conn.closed:
        raise SourceError(f"{connected.uri}: a directory read needs an open synchronous connection")
    snapshot = _fast_search(connected, cfg, attributes.ldap_attributes(), progress)
    log.debug("read directory", uri=connected.uri, entries=len(snapshot.entries))
    return snapshot


def filter_ber(cfg: LdapSource) -> bytes:
    """The config's filter as BER, compiled by ldap3 (escaping rules and all)."""
    try:
        return ber_filter(cfg.filter)
    except (LDAPException, PyAsn1Error, ValueError, TypeError) as e:
        raise ConfigError(f"invalid LDAP filter {cfg.filter!r}: {e}", key="source.ldap.filter") from e


def ber_filter(text: str) -> bytes:
    """An LDAP filter as BER, compiled by ldap3."""
    request = search_operation("", text, ldap3.SUBTREE, ldap3.DEREF_NEVER, [], 0, 0, False, True, True)
    return bytes(asn1_encode(request["filter"]))


def _fast_search(
    connected: Connected, cfg: LdapSource, wanted: list[str], progress: Callable[[int], None] | None = None
) -> Snapshot:
    """Paged search on the bound socket, decoded with ldapsync.ber.

    While page n is decoded, the request for page n+1 is already on the wire, so slapd builds
    the next page in parallel. Any failure closes the connection: its stream is unusable.
    """
    conn, uri = connected.conn, connected.uri
    filter_bytes = filter_ber(cfg)
    scope = SCOPE_CODES[cfg.scope]
    keep = frozenset(w.lower() for w in wanted)
    entries: list[Entry] = []
    rejections: list[Rejection] = []
    sock = conn.socket
    buf = bytearray()
    pages = 0
    helper: pagedigest.Helper | None = None
    previous_timeout = sock.gettimeout()

    def send(cookie: bytes) -> int:
        mid: int = conn.server.next_message_id()
        request = ber.search_request(
            mid, cfg.base_dn, scope, 0, filter_bytes, wanted, [ber.paged_control(cfg.page_size, cookie)]
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
            cookie = (
                ber.paged_cookie(result.controls[ber.PAGED_RESULTS]) if ber.PAGED_RESULTS in result.controls else b""
            )
            page = bytes(buf[:pos])
            del buf[:pos]
            if cookie:
                mid = send(cookie)  # the server works on the next page while we decode this one
                if helper is None and pages == 1 and pagedigest.spare_core():  # more than a page, a core idle
                    helper = _start_helper(keep)
            if helper is not None:
                helper.send(page, spans)
            decode_page(page, spans, keep, entries, rejections)
            if progress is not None:
                progress(len(entries))
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
    finally:
        if helper is not None and sys.exc_info()[0] is not None:
            helper.close()
    sock.settimeout(previous_timeout)
    log.debug("paged search", uri=uri, pages=pages, digest_helper=helper is not None)
    ordered = sort_entries(entries)
    if helper is None:
        return Snapshot(ordered, f"ldap:{uri}", tuple(rejections))
    helper.finish()
    count = len(entries)
    return Snapshot.with_pending_sum(ordered, f"ldap:{uri}", tuple(rejections), lambda: helper.result(count))


def _start_helper(keep: frozenset[str]) -> pagedigest.Helper | None:
    """The digest helper process, or None if it cannot start (the digest is then computed here)."""
    try:
        return pagedigest.Helper(keep)
    except (OSError, ValueError, TypeError, RuntimeError) as e:  # TypeError: no sys.executable (embedded)
        log.debug("digest helper not started; the digest is computed in-process", error=str(e))
        return None


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
