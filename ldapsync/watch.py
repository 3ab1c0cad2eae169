"""Follow the directory: syncrepl push, persistent search, or polling, into a Mirror.

This is the I/O side. The syncrepl protocol logic is in the sans-I/O `syncrepl` module;
here ldap3 messages are translated into its input messages and its events applied to the
Mirror, an in-memory copy of the directory keyed by entryUUID. A Follower runs in its own
thread, reconnects with exponential backoff and jitter across `uri`, and tells the agent
"the directory changed" through a callback; it never raises out of its thread.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ldap3
import structlog
from ldap3.core.exceptions import LDAPException
from tenacity import Retrying, retry_if_not_exception_type, stop_never, wait_exponential_jitter

from ldapsync import ldapsource, ldifsource, psearch, syncrepl
from ldapsync.config import Config, LdapSource, LdifSource
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry, sort_entries
from ldapsync.errors import LdapsyncError, SourceError
from ldapsync.fileio import fsync_dir, write_atomic
from ldapsync.state import State, sha256

log = structlog.get_logger(__name__)

PSEARCH_OID = "2.16.840.1.113730.3.4.3"
FOLLOW_FILE = "follow.json"
FOLLOW_SNAPSHOT = "follow-snapshot.json"


class Stopped(Exception):
    """The agent asked the follower to stop."""


class ConnectionLost(SourceError):
    """The stream ended or the connection died; reconnect."""


class Mirror:
    """The directory as last seen, plus the sync cookie that goes with exactly this state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._rejections: dict[str, list[Rejection]] = {}
        self.cookie: bytes | None = None
        self.source = "ldap"
        self.changes = 0  # entries changed since start, for status

    def load(self, snapshot: Snapshot, cookie: bytes | None) -> None:
        with self._lock:
            self._entries = {(e.uuid or e.dn): e for e in snapshot.entries}
            self._rejections = {}
            for r in snapshot.rejections:
                key = next((k for k, e in self._entries.items() if e.dn == r.dn), r.dn)
                self._rejections.setdefault(key, []).append(r)
            self.cookie = cookie
            self.source = snapshot.source

    def replace_all(self, snapshot: Snapshot) -> bool:
        """Install a full read; True if the content differs from what was mirrored."""
        with self._lock:
            before = Snapshot(sort_entries(self._entries.values()), self.source).digest()
        changed = before != snapshot.digest()
        self.load(snapshot, None)
        return changed

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._entries)

    def upsert(self, key: str, dn: str, raw: Mapping[str, Iterable[bytes]], wanted: Iterable[str]) -> None:
        rejections: list[Rejection] = []
        entry = make_entry(dn, {k: list(v) for k, v in raw.items()}, wanted, rejections, uuid=key)
        with self._lock:
            self._entries[key] = entry
            self._rejections[key] = rejections
            self.changes += 1

    def delete(self, key: str) -> bool:
        with self._lock:
            self._rejections.pop(key, None)
            if self._entries.pop(key, None) is not None:
                self.changes += 1
                return True
            return False

    def delete_dn(self, dn: str) -> bool:
        with self._lock:
            key = next((k for k, e in self._entries.items() if e.dn.lower() == dn.lower()), None)
        return self.delete(key) if key is not None else False

    def set_cookie(self, cookie: bytes | None) -> None:
        """None forgets the cookie: the next connection does a full refresh."""
        with self._lock:
            self.cookie = cookie

    def snapshot(self) -> tuple[Snapshot, bytes | None]:
        """A consistent (snapshot, cookie) pair: persisting both lets a restart resume."""
        with self._lock:
            rejections = tuple(r for rs in self._rejections.values() for r in rs)
            return Snapshot(sort_entries(self._entries.values()), self.source, rejections), self.cookie

    def __len__(self) -> int:
        return len(self._entries)


def fingerprint(config: Config) -> str:
    """What the cookie is valid for: another base, filter or attribute set needs a full read."""
    src = config.source
    doc = [
        getattr(src, "base_dn", None),
        getattr(src, "filter", None),
        getattr(src, "scope", None),
        config.attributes.ldap_attributes(),
    ]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def save_follow_state(
    state: State, config: Config, snapshot: Snapshot, cookie: bytes | None, *, reuse: Path | None = None
) -> None:
    """Persist (snapshot, cookie) so a restart resumes; the cheap cases avoid a 15 MB write.

    Unchanged directory: only the cookie moves. `reuse`: a generation's snapshot.json with
    these exact bytes (state.record writes snapshot.to_json()), hard-linked instead of copied.
    """
    fp = fingerprint(config)
    digest = snapshot.digest()
    saved = state.read_json(FOLLOW_FILE)
    target = state.root / FOLLOW_SNAPSHOT
    unchanged = saved.get("fingerprint") == fp and saved.get("snapshot_digest") == digest and target.exists()
    if unchanged and state.trusted(FOLLOW_FILE, FOLLOW_SNAPSHOT):  # else rewrite what is not ours
        sha = str(saved.get("snapshot_sha256"))
    else:
        data = snapshot.to_json()
        sha = sha256(data)
        if reuse is not None and reuse.is_file():
            tmp = target.with_name(f".{target.name}.link")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(reuse, tmp)
            os.replace(tmp, target)
            fsync_dir(state.root)
        else:
            write_atomic(target, data)
    doc = {
        "fingerprint": fp,
        "cookie": base64.b64encode(cookie).decode() if cookie else None,
        "snapshot_sha256": sha,
        "snapshot_digest": digest,
        "time": time.time(),
    }
    state.write_json(FOLLOW_FILE, doc)


def load_follow_state(state: State, config: Config) -> tuple[Snapshot, bytes | None] | None:
    """The persisted mirror and cookie, or None if absent, damaged, not ours or for another search."""
    if not state.trusted(FOLLOW_FILE, FOLLOW_SNAPSHOT):
        return None
    doc = state.read_json(FOLLOW_FILE)
    if not doc:
        return None
    if doc.get("fingerprint") != fingerprint(config):
        log.info("search changed since the cookie was saved; starting with a full read")
        return None
    try:
        data = (state.root / FOLLOW_SNAPSHOT).read_bytes()
        if sha256(data) != doc.get("snapshot_sha256"):
            raise ValueError("snapshot does not match its hash")
        snapshot = Snapshot.from_json(data)
        cookie = base64.b64decode(doc["cookie"]) if doc.get("cookie") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("saved sync state unusable; starting with a full read", error=str(e))
        return None
    return snapshot, cookie


@dataclass(slots=True)
class FollowerStatus:
    server: str | None = None
    method: str | None = None
    connected: bool = False
    last_change: float | None = None
    refresh_entries: int = 0  # entries received in the last refresh (small = resumed by cookie)
    error: str | None = None
    heartbeat: float = 0.0


Notify = Callable[[str], None]  # "changed" | "synced" | "error"


class Follower(threading.Thread):
    """Keeps the Mirror current and calls notify() on every change; reconnects forever."""

    def __init__(self, config: Config, mirror: Mirror, notify: Notify, *, method: str | None = None):
        super().__init__(name="ldapsync-follower", daemon=True)
        self.config = config
        self.mirror = mirror
        self.notify = notify
        self.status = FollowerStatus(heartbeat=time.monotonic())
        self._halt = threading.Event()
        self._forced_method = method
        self._conn: ldap3.Connection | None = None

    def stop(self) -> None:
        self._halt.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(LDAPException, OSError):
                conn.unbind()

    @property
    def stopping(self) -> bool:
        return self._halt.is_set()

    def beat(self) -> None:
        self.status.heartbeat = time.monotonic()
        if self._halt.is_set():
            raise Stopped

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.beat()
            self._halt.wait(min(1.0, max(0.0, end - time.monotonic())))
        self.beat()

    def run(self) -> None:
        src = self.config.source
        try:
            if isinstance(src, LdifSource):
                self._follow_ldif(src)
                return
            retrying = Retrying(
                retry=retry_if_not_exception_type(Stopped),
                wait=wait_exponential_jitter(initial=0.5, max=self.config.agent.reconnect_max, jitter=1.0),
                stop=stop_never,
                sleep=self.sleep,
                before_sleep=self._before_sleep,
                reraise=True,
            )
            retrying(self._follow_ldap, src)
        except Stopped:
            pass
        except Exception as e:  # the agent's watchdog notices a dead follower
            log.exception("follower crashed", error=str(e))
            self.status.error = f"follower crashed: {e}"
            self.notify("error")

    def _before_sleep(self, retry_state: Any) -> None:
        if self._halt.is_set():  # stop() closed the connection: not a directory failure worth a warning
            raise Stopped
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if exc is not None and not isinstance(exc, (LdapsyncError, LDAPException, OSError)):
            log.error("unexpected error in the follower", error=repr(exc), exc_info=exc)
        self.status.connected = False
        self.status.error = str(exc)
        delay = retry_state.next_action.sleep if retry_state.next_action else 0
        log.warning("directory connection failed; retrying", error=str(exc), retry_in=round(delay, 2))
        self.notify("error")

    # -- methods --------------------------------------------------------------------------
    def _follow_ldap(self, src: LdapSource) -> None:
        self.beat()
        method = self._forced_method or src.watch
        if method == "auto":
            method = self._detect(src)
        self.status.method = method
        if method == "syncrepl":
            self._follow_syncrepl(src)
        elif method == "psearch":
            self._follow_psearch(src)
        else:
            self._follow_poll(src)

    def _detect(self, src: LdapSource) -> str:
        connected = ldapsource.connect(src)
        try:
            conn = connected.conn
            conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["supportedControl"])
            controls: set[str] = set()
            for item in conn.response or ():
                for v in (item.get("raw_attributes") or {}).get("supportedControl", []):
                    controls.add(v.decode() if isinstance(v, bytes) else str(v))
        finally:
            connected.conn.unbind()
        method = (
            "syncrepl" if syncrepl.SYNC_REQUEST_OID in controls else "psearch" if PSEARCH_OID in controls else "poll"
        )
        log.info("change detection chosen from the root DSE", method=method, server=connected.uri)
        return method

    def _stream_connection(self, src: LdapSource) -> tuple[ldap3.Connection, str]:
        password = ldapsource.bind_password(src)
        errors = []
        for uri in src.uris:
            self.beat()
            conn = None
            try:
                if src.start_tls and uri.lower().startswith("ldap://"):
                    _probe_start_tls(uri, src)
                server = ldapsource._server(uri, src)
                conn = ldap3.Connection(
                    server,
                    user=src.bind_dn,
                    password=password,
                    authentication=ldap3.SIMPLE if src.bind_dn else ldap3.ANONYMOUS,
                    client_strategy=ldap3.ASYNC_STREAM,
                    check_names=False,
                    read_only=True,
                    auto_referrals=False,
                )
                conn.open(read_server_info=False)
                # step by step, not auto_bind: an async StartTLS "succeeds" even when the handshake failed
                if src.start_tls and uri.lower().startswith("ldap://"):
                    conn.start_tls(read_server_info=False)
                    if not conn.tls_started:
                        failure = getattr(server.tls, "failure", None) or conn.last_error or "no TLS"
                        raise SourceError(f"StartTLS failed: {failure}")
                if not conn.bind(read_server_info=False):
                    raise SourceError(
                        f"bind as {src.bind_dn or 'anonymous'} failed: {(conn.result or {}).get('description')}"
                    )
            except (LDAPException, OSError, SourceError) as e:
                if conn is not None:
                    ldapsource._abandon(conn)
                errors.append(f"{uri}: {e}")
                continue
            _keepalive(conn)
            return conn, uri
        raise SourceError("no LDAP server could be used: " + "; ".join(errors))

    @contextlib.contextmanager
    def _stream(self, src: LdapSource) -> Iterator[tuple[ldap3.Connection, str]]:
        """A bound streaming connection, registered so stop() can break a blocking read."""
        conn, uri = self._stream_connection(src)
        self._conn = conn
        try:
            yield conn, uri
        finally:
            self._conn = None
            with contextlib.suppress(LDAPException, OSError):
                conn.unbind()

    def _items(self, ps: Any, conn: ldap3.Connection, uri: str) -> Iterator[dict[str, Any]]:
        """Messages of a streaming search, forever; a dead connection ends it with ConnectionLost.

        Wakes every second to beat (the agent's watchdog, and stop()) and to notice a receiver
        thread that died without a message.
        """
        while True:
            self.beat()
            item = ps.next(block=True, timeout=1.0)
            if item is not None:
                yield item
            elif conn.closed or not _receiver_alive(conn):
                raise ConnectionLost(f"{uri}: connection closed")

    def _follow_syncrepl(self, src: LdapSource) -> None:
        with self._stream(src) as (conn, uri):
            wanted = self.config.attributes.ldap_attributes()
            consumer = syncrepl.SyncConsumer(known=self.mirror.keys(), cookie=self.mirror.cookie)
            control = (syncrepl.SYNC_REQUEST_OID, True, consumer.request(syncrepl.Mode.REFRESH_AND_PERSIST))
            ps = conn.extend.standard.persistent_search(
                src.base_dn,
                src.filter,
                search_scope=ldapsource.SCOPES[src.scope],
                dereference_aliases=ldap3.DEREF_NEVER,
                attributes=wanted,
                controls=[control],
                changes_only=False,
                streaming=False,
            )
            self.status.server, self.status.connected, self.status.error = uri, True, None
            resumed = consumer.cookie is not None
            log.info("following the directory", method="syncrepl", server=uri, resume=resumed)
            self.mirror.source = f"ldap:{uri}"
            refreshing, received = True, 0
            for item in self._items(ps, conn, uri):
                message = _to_syncrepl(item)
                try:
                    events = consumer.receive(message)
                except syncrepl.SyncProtocolError as e:
                    consumer.abandon()
                    raise ConnectionLost(f"{uri}: sync protocol error: {e}") from e
                changed = False
                for ev in events:
                    if isinstance(ev, syncrepl.EntryChanged):
                        self.mirror.upsert(ev.uuid, ev.dn, ev.attributes, wanted)
                        changed, received = True, received + 1
                    elif isinstance(ev, syncrepl.EntryDeleted):
                        changed = self.mirror.delete(ev.uuid) or changed
                    elif isinstance(ev, syncrepl.CookieChanged):
                        self.mirror.set_cookie(ev.cookie)
                    elif isinstance(ev, syncrepl.RefreshComplete):
                        refreshing = False
                        self.status.refresh_entries = received
                        log.info("refresh complete", server=uri, received=received, entries=len(self.mirror))
                        self.notify("synced")
                    elif isinstance(ev, syncrepl.RefreshRequired):
                        log.warning("server refused the cookie; doing a full refresh", server=uri)
                        self.mirror.set_cookie(None)  # else every reconnect offers the refused cookie again
                        raise ConnectionLost(f"{uri}: e-syncRefreshRequired")
                    elif isinstance(ev, syncrepl.SearchFinished):
                        if refreshing and resumed and ev.result_code != 0:
                            # OpenLDAP refuses a cookie from its future (slapd restored from a backup)
                            # with unwillingToPerform, not e-syncRefreshRequired: same remedy.
                            log.warning(
                                "server refused the cookie; doing a full refresh",
                                server=uri,
                                result=ev.result_code,
                                message=ev.message,
                            )
                            self.mirror.set_cookie(None)
                        raise ConnectionLost(f"{uri}: sync search ended: {ev.message} ({ev.result_code})")
                if changed and not refreshing:
                    self.status.last_change = time.time()
                    self.notify("changed")

    def _follow_psearch(self, src: LdapSource) -> None:
        with self._stream(src) as (conn, uri):
            wanted = self.config.attributes.ldap_attributes()
            ps = conn.extend.standard.persistent_search(
                src.base_dn,
                src.filter,
                search_scope=ldapsource.SCOPES[src.scope],
                dereference_aliases=ldap3.DEREF_NEVER,
                attributes=wanted,
                changes_only=True,
                notifications=True,
                streaming=False,
            )
            consumer = psearch.PsearchConsumer()
            # psearch has no cookie: after (re)connecting, a full read compared by content.
            snapshot = ldapsource.read(src, self.config.attributes)
            changed = self.mirror.replace_all(snapshot)
            self.status.server, self.status.connected, self.status.error = uri, True, None
            self.status.refresh_entries = len(snapshot.entries)
            log.info("following the directory", method="psearch", server=uri, entries=len(snapshot.entries))
            self.notify("synced" if not changed else "changed")
            for item in self._items(ps, conn, uri):
                for ev in consumer.receive(psearch.from_ldap3(item)):
                    if isinstance(ev, psearch.Upsert):
                        if ev.previous_dn:
                            self.mirror.delete_dn(ev.previous_dn)
                        self.mirror.delete_dn(ev.dn)
                        key = _uuid_of(ev.attributes) or ev.dn.lower()
                        self.mirror.upsert(key, ev.dn, ev.attributes, wanted)
                    elif isinstance(ev, psearch.Delete):
                        self.mirror.delete_dn(ev.dn)
                    elif isinstance(ev, psearch.Finished):
                        raise ConnectionLost(f"{uri}: persistent search ended: {ev.message} ({ev.result_code})")
                    self.status.last_change = time.time()
                    self.notify("changed")

    def _follow_poll(self, src: LdapSource) -> None:
        last_csn: str | None = None
        while True:
            csn = _context_csn(src)
            if csn is None or csn != last_csn:
                snapshot = ldapsource.read(src, self.config.attributes)
                changed = self.mirror.replace_all(snapshot)
                self.mirror.source = snapshot.source
                self.status.server = snapshot.source.removeprefix("ldap:")
                self.status.connected, self.status.error = True, None
                self.status.refresh_entries = len(snapshot.entries)
                if changed:
                    self.status.last_change = time.time()
                    log.info("directory changed", method="poll", entries=len(snapshot.entries))
                self.notify("changed" if changed else "synced")
                last_csn = csn
            self.sleep(src.poll_interval)

    def _follow_ldif(self, src: LdifSource) -> None:
        """An LDIF source is polled by mtime/size; cheap, and works on any filesystem."""
        last: tuple[float, int] | None = None
        self.status.method, self.status.server = "ldif", str(src.path)
        while True:
            try:
                st = src.path.stat()
                sig = (st.st_mtime, st.st_size)
            except OSError as e:
                self.status.error = str(e)
                self.notify("error")
                self.sleep(1.0)
                continue
            if sig != last:
                try:
                    snapshot = ldifsource.read(src, self.config.attributes)
                except SourceError as e:
                    self.status.error = str(e)
                    log.error("LDIF source unreadable", error=str(e))
                    self.notify("error")
                else:
                    changed = self.mirror.replace_all(snapshot)
                    self.mirror.source = snapshot.source
                    self.status.connected, self.status.error = True, None
                    if changed:
                        self.status.last_change = time.time()
                    self.notify("changed" if changed else "synced")
                last = sig
            self.sleep(0.5)


def _probe_start_tls(uri: str, src: LdapSource) -> None:
    """StartTLS on a plain synchronous connection first, so a server that refuses it (or
    fails the handshake) is reported at once and clearly: ldap3's asynchronous StartTLS
    only times out after 20 s when the server says no."""
    probe = ldap3.Connection(ldapsource._server(uri, src), check_names=False, read_only=True, auto_referrals=False)
    try:
        probe.open(read_server_info=False)
        if not probe.start_tls(read_server_info=False):
            raise SourceError(f"StartTLS failed: {(probe.result or {}).get('description')}")
    except LDAPException as e:
        raise SourceError(f"StartTLS failed: {e}") from e
    finally:
        ldapsource._abandon(probe)


def _keepalive(conn: ldap3.Connection) -> None:
    """Half-open TCP (a server that vanished without FIN) is noticed within ~1 minute.

    The stream socket also becomes blocking: ldap3 leaves the connect timeout on it, and its
    receiver thread treats a recv timeout as end of stream, so a quiet directory dropped the
    stream every `timeout` seconds (and a change in the reconnect gap waited for backoff).
    Setting ldap3's receive_timeout instead would make that thread spin on a closed socket.
    """
    sock = getattr(conn, "socket", None)
    if sock is None:
        return
    try:
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        pass


def _receiver_alive(conn: ldap3.Connection) -> bool:
    receiver = getattr(conn.strategy, "receiver", None)
    return receiver is None or receiver.is_alive()


def _to_syncrepl(item: Mapping[str, Any]) -> syncrepl.Message:
    kind = item.get("type")
    controls = {oid: c.get("value") or b"" for oid, c in (item.get("controls") or {}).items()}
    if kind == "searchResEntry":
        return syncrepl.SearchEntry(item["dn"], item.get("raw_attributes") or {}, controls)
    if kind == "intermediateResponse":
        return syncrepl.IntermediateResponse(item.get("responseName"), item.get("responseValue"))
    if kind == "searchResRef":
        return syncrepl.SearchReference(tuple(item.get("uri") or ()))
    return syncrepl.SearchDone(
        int(item.get("result", 80)), str(item.get("message") or item.get("description") or ""), controls
    )


def _uuid_of(attributes: Mapping[str, Iterable[bytes]]) -> str | None:
    for name, values in attributes.items():
        if name.lower() == "entryuuid":
            for v in values:
                return v.decode("ascii", "replace")
    return None


def _context_csn(src: LdapSource) -> str | None:
    """The suffix's contextCSN (syncprov keeps it), or None where the server has none."""
    try:
        connected = ldapsource.connect(src)
    except SourceError:
        raise
    conn = connected.conn
    try:
        conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["namingContexts"])
        contexts = [
            (v.decode() if isinstance(v, bytes) else str(v))
            for item in conn.response or ()
            for v in (item.get("raw_attributes") or {}).get("namingContexts", [])
        ]
        base = src.base_dn.lower()
        suffix = next((c for c in sorted(contexts, key=len, reverse=True) if base.endswith(c.lower())), None)
        if suffix is None:
            return None
        conn.search(suffix, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["contextCSN"])
        for item in conn.response or ():
            values = (item.get("raw_attributes") or {}).get("contextCSN", [])
            if values:
                return b";".join(sorted(v if isinstance(v, bytes) else str(v).encode() for v in values)).decode()
        return None
    except LDAPException as e:
        raise SourceError(f"{connected.uri}: contextCSN check failed: {e}") from e
    finally:
        with contextlib.suppress(LDAPException, OSError):
            conn.unbind()


def follow_state_path(state: State) -> Path:
    return state.root / FOLLOW_FILE
