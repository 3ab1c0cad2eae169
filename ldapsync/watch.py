"""Follow the directory: syncrepl push, persistent search, or polling, into a Mirror.

This is the I/O side. The syncrepl protocol logic is in the sans-I/O `syncrepl` module;
here ldap3 messages are translated into its input messages and its events applied to the
Mirror, an in-memory copy of the directory keyed by entryUUID. A Follower runs in its own
thread, connects through ldapsource.connect (failover across `uri`), checks that a quiet
server still answers, reconnects with exponential backoff and jitter (reset once a connection
worked), and tells the agent what happened through a callback, as typed events
(MirrorChanged, RefreshDone, AttemptFailed, Connected, Disconnected); it never raises out of
its thread.
"""

from __future__ import annotations

import contextlib
import gc
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import ldap3
import structlog
from ldap3.core.exceptions import LDAPException
from ldap3.core.results import RESULT_CODES

from ldapsync import instep, ldapsource, ldifsource, psearch, syncrepl, syncwire
from ldapsync.config import Config, LdapSource, LdifSource
from ldapsync.errors import LdapsyncError, SourceError
from ldapsync.mirror import FOLLOW_FILE as FOLLOW_FILE  # re-exported: the agent and tests use them from here
from ldapsync.mirror import FOLLOW_SNAPSHOT as FOLLOW_SNAPSHOT
from ldapsync.mirror import Mirror as Mirror
from ldapsync.mirror import fingerprint as fingerprint
from ldapsync.mirror import follow_state_path as follow_state_path
from ldapsync.mirror import load_follow_state as load_follow_state
from ldapsync.mirror import save_follow_state as save_follow_state
from ldapsync.stored import StoredMirror

log = structlog.get_logger(__name__)

PSEARCH_OID = "2.16.840.1.113730.3.4.3"
CHECK_IDLE_MAX = 60.0  # seconds the check connection may idle while the stream is busy
RECV_SIZE = 1 << 18
REFRESH_FREEZE = 16384  # entries received between two gc.freeze() during a refresh


class Stopped(Exception):
    """The agent asked the follower to stop."""


class ConnectionLost(SourceError):
    """The stream ended or the connection died; reconnect."""


@dataclass(slots=True)
class FollowerStatus:
    server: str | None = None
    method: str | None = None
    connected: bool = False
    last_change: float | None = None
    error: str | None = None
    heartbeat: float = 0.0
    answered: float | None = None  # time.time() the copy was last known in step (data, a refresh, a check)
    in_step: float | None = None  # time.time() of the last contextCSN read our cookie had caught up with


# -- what the follower tells the agent ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MirrorChanged:
    """Changes were applied to the mirror (one event per chunk received: a burst is one wake-up)."""

    kind: ClassVar[str] = "changed"


@dataclass(frozen=True, slots=True)
class RefreshDone:
    """A complete refresh arrived: the mirror is the directory now."""

    kind: ClassVar[str] = "synced"


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """One attempt failed (each one; the LDIF source has no connection to lose)."""

    error: str
    kind: ClassVar[str] = "error"


@dataclass(frozen=True, slots=True)
class Connected:
    """Connected and following `server`: once per connection."""

    server: str
    kind: ClassVar[str] = "up"


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection failed or was lost: once per outage, until the next Connected."""

    error: str
    kind: ClassVar[str] = "down"


FollowerEvent = MirrorChanged | RefreshDone | AttemptFailed | Connected | Disconnected
Notify = Callable[[FollowerEvent], None]


class Backoff:
    """Reconnect delays: exponential with jitter, capped; `reset()` after a connection that worked.

    Without the reset, delays grew over the agent's lifetime: after a few outages a short
    server restart was followed only a minute later.
    """

    def __init__(
        self, cap: float, *, initial: float = 0.5, jitter: float = 1.0, rng: Callable[[], float] = random.random
    ):
        self.cap, self.initial, self.jitter, self.rng = cap, initial, jitter, rng
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return float(min(self.cap, self.initial * 2 ** min(self.failures - 1, 32) + self.jitter * self.rng()))

    def reset(self) -> None:
        self.failures = 0


class Follower(threading.Thread):
    """Keeps the Mirror current and calls notify() on every change; reconnects forever.

    Each connection is a pair on one server: a synchronous check connection (StartTLS, bind,
    the root DSE, full reads, and a liveness read whenever the stream has been quiet for half
    of `timeout`) and, for syncrepl and psearch, the stream. A server that stops answering (a
    stopped process keeps its TCP connections open) fails the liveness read, so it is noticed
    within about `timeout`; the next attempt tries the URIs in order again. A syncrepl follower
    also compares the suffix's contextCSN with its cookie (`_check_step`): an answer confirms
    the copy only as far as it has caught up with the server.
    """

    def __init__(self, config: Config, mirror: Mirror | StoredMirror, notify: Notify, *, method: str | None = None):
        super().__init__(name="ldapsync-follower", daemon=True)
        self.config = config
        self.mirror = mirror
        self.notify = notify
        self.status = FollowerStatus(heartbeat=time.monotonic())
        self._halt = threading.Event()
        self._forced_method = method
        self._conn: ldap3.Connection | None = None
        self._check: ldapsource.Connected | None = None  # the synchronous connection beside the stream
        self._lost: str | None = None  # the server of the connection that failed last
        self._again: str | None = None  # a server to ask again first (it only needs a full refresh)
        self._up: bool | None = None  # None: no attempt yet
        self._worked = False  # this connection completed a refresh: the backoff starts over
        self._step: _StepWatch | None = None  # the syncrepl in-step check of this connection
        self._false_alarms = instep.FalseAlarms()  # servers whose contextCSN moves without our changes
        self._unconfirmed = False  # the in-step check saw the server ahead: what it answers confirms nothing

    def stop(self) -> None:
        self._halt.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(LDAPException, OSError):
                conn.unbind()

    def _answered(self, when: float | None = None) -> None:
        """The server answered and nothing is known to be missing: the agent may confirm `when`
        (now by default). Not while the in-step check has seen the server ahead of our copy."""
        if not self._unconfirmed:
            self.status.answered = time.time() if when is None else when

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
            backoff = Backoff(self.config.agent.reconnect_max)
            while True:
                try:
                    self._follow_ldap(src)
                except Stopped:
                    raise
                except Exception as e:  # a directory problem never ends the follower
                    if self._halt.is_set():  # stop() closed the connection: not a directory failure
                        raise Stopped from e
                    if self._worked:
                        backoff.reset()
                        self._worked = False
                    self._failed(e, backoff.next())
        except Stopped:
            pass
        except Exception as e:  # the agent's watchdog notices a dead follower
            log.exception("follower crashed", error=str(e))
            self.status.error = f"follower crashed: {e}"
            self.notify(AttemptFailed(self.status.error))

    def _failed(self, exc: Exception, delay: float) -> None:
        if not isinstance(exc, (LdapsyncError, LDAPException, OSError)):
            log.error("unexpected error in the follower", error=repr(exc), exc_info=exc)
        self.status.connected = False
        self.status.error = str(exc)
        log.warning("directory connection failed; retrying", error=str(exc), retry_in=round(delay, 2))
        if self._up is not False:
            self._up = False
            self.notify(Disconnected(str(exc)))
        self.notify(AttemptFailed(str(exc)))
        self.sleep(delay)

    def _following(self, uri: str) -> None:
        """Connected to `uri` and following: "up" once per connection."""
        self.status.server, self.status.connected, self.status.error = uri, True, None
        self._answered()
        if self._up is not True:
            self._up = True
            self.notify(Connected(uri))

    # -- methods --------------------------------------------------------------------------
    def _follow_ldap(self, src: LdapSource) -> None:
        self.beat()
        uris = src.uris
        if self._again in uris:
            uris = (self._again, *(u for u in uris if u != self._again))
        elif self._lost in uris and len(uris) > 1:  # the server just lost is tried last, not first
            uris = (*(u for u in uris if u != self._lost), self._lost)
        self._lost = self._again = None
        self._step, self._unconfirmed = None, False
        check = self._check = ldapsource.connect(src, uris=uris, root_dse=True)
        self._lost = check.uri  # until it works out: a failure from here on is this server's
        try:
            method = self._forced_method or src.watch
            if method == "auto":
                method = _method(check)
            self.status.method = method
            if method == "syncrepl":
                self._follow_syncrepl(src, check)
            elif method == "psearch":
                self._follow_psearch(src, check)
            else:
                self._follow_poll(src, check)
        finally:
            if self.mirror.abandon_refresh():  # lost, refused or stopped mid-refresh: nothing of it stays
                log.info("refresh not complete; the copy stays as it was before it", server=check.uri)
            if self._check is not None:
                self._check.close()
                self._check = None

    @contextlib.contextmanager
    def _stream(self, src: LdapSource, check: ldapsource.Connected) -> Iterator[ldap3.Connection]:
        """A bound streaming connection to the check connection's server, registered so
        stop() can break a blocking read."""
        self.beat()
        stream = ldapsource.connect(src, uris=(check.uri,), stream=True)
        self._conn = stream.conn
        try:
            yield stream.conn
        finally:
            self._conn = None
            stream.close()

    def _items(self, ps: Any, conn: ldap3.Connection, uri: str) -> Iterator[dict[str, Any]]:
        """Messages of a streaming search, forever; a dead connection ends it with ConnectionLost.

        Wakes at least every second to beat (the agent's watchdog, and stop()) and to notice a
        receiver thread that died without a message. When nothing arrived for half of
        `timeout`, a liveness read on the check connection must be answered within the other
        half: a frozen server is noticed within about `timeout`.
        """
        quiet = max(0.5, check_timeout(self.config) / 2)
        heard = checked = time.monotonic()
        while True:
            self.beat()
            item = ps.next(block=True, timeout=min(1.0, quiet))
            now = time.monotonic()
            if item is not None:
                heard = now
                self._answered()
                yield item
            elif conn.closed or not _receiver_alive(conn):
                raise ConnectionLost(f"{uri}: connection closed")
            # a busy stream proves the server alive, but the check connection must not idle out
            if now - max(heard, checked) >= quiet or now - checked >= CHECK_IDLE_MAX:
                self._check_alive()
                checked = time.monotonic()

    def _check_alive(self, *, confirm: bool = True) -> None:
        """ConnectionLost unless the server answers a liveness read within half of `timeout`.

        A check connection the server closed (an idle timeout shorter than ours) is replaced
        by a new one to the same server, which must answer. `confirm=False`: the in-step
        check that follows decides whether the answer confirms the copy.
        """
        check = self._check
        assert check is not None and isinstance(self.config.source, LdapSource)
        within = max(0.5, self.config.source.timeout / 2)
        try:
            if not ldapsource.alive(check, within):
                check.close()
                self._check = check = ldapsource.connect(self.config.source, uris=(check.uri,))
                if not ldapsource.alive(check, within):
                    raise SourceError(f"{check.uri}: the server closed a new connection at once")
        except SourceError as e:
            raise ConnectionLost(str(e)) from e
        if confirm:
            self._answered()

    def _check_step(self, step: _StepWatch) -> None:
        """Read the suffix's contextCSN and compare it with our cookie's CSN set (instep).

        In step: confirm as of the read. The server ahead: confirm only as far as our copy
        has caught up. Still ahead past the grace: a change never reached us; drop the
        cookie and refresh fully from the same server. No contextCSN, or a cookie without
        CSNs: nothing to compare, the liveness read confirms as before.
        """
        check = self._check
        assert check is not None and isinstance(self.config.source, LdapSource)
        within = max(0.5, self.config.source.timeout / 2)
        wall, now = time.time(), time.monotonic()
        try:
            values = ldapsource.context_csn_values(check, step.suffix, within)
        except SourceError as e:
            raise ConnectionLost(str(e)) from e
        step.checked = time.monotonic()
        server = instep.csn_set(values)
        for value in server.malformed:
            if value not in step.warned:
                step.warned.add(value)
                log.warning(
                    "the server's contextCSN holds a value that is not a CSN; it is not compared",
                    server=step.uri,
                    dn=step.suffix,
                    attribute="contextCSN",
                    value=value,
                )
        if not server.by_sid or not step.ours:
            if not step.told_unavailable:
                step.told_unavailable = True
                why = "the suffix has no readable contextCSN" if not server.by_sid else "the cookie carries no CSN"
                log.info("in-step check not available; an answer confirms", server=step.uri, dn=step.suffix, why=why)
            self._unconfirmed = False
            self._answered(wall)
            return
        verdict = step.rule.observe(server.by_sid, step.ours, now)
        if isinstance(verdict, instep.InStep):
            self._unconfirmed = False
            self._answered(wall)
            self.status.in_step = wall
        elif isinstance(verdict, instep.Pending):
            if verdict.caught_up_to is not None:
                self._unconfirmed = False
                self._answered(wall - (now - verdict.caught_up_to))
            self._unconfirmed = True
        else:
            log.warning(
                "the server's contextCSN stays ahead of this copy's cookie: a change never reached "
                "this copy; doing a full refresh",
                server=step.uri,
                sid=verdict.sid,
                ours=str(verdict.ours),
                server_csn=str(verdict.server),
                behind_for=round(now - verdict.since, 1),
            )
            self._false_alarms.called_out(step.uri, self.mirror.content())
            self.mirror.set_cookie(None)
            self._again = step.uri
            raise ConnectionLost(
                f"{step.uri}: out of step: contextCSN {verdict.server} for sid {verdict.sid:03x}, "
                f"this copy's cookie {verdict.ours}"
            )

    def _follow_syncrepl(self, src: LdapSource, check: ldapsource.Connected) -> None:
        """RFC 4533 refreshAndPersist on a socket of our own: requests and responses are
        encoded and decoded by syncwire (ldapsync.ber), the protocol decided by syncrepl."""
        uri = check.uri
        with self._raw_stream(src, check) as stream:
            wanted = self.config.routing.attributes.ldap_attributes()
            consumer = syncrepl.SyncConsumer(known=self.mirror.keys(), cookie=self.mirror.cookie)
            mid = stream.conn.server.next_message_id()
            request = consumer.request(syncrepl.Mode.REFRESH_AND_PERSIST)
            scope = ldapsource.SCOPE_CODES[src.scope]
            sock = stream.conn.socket
            try:
                sock.sendall(
                    syncwire.search_request(mid, src.base_dn, scope, ldapsource.filter_ber(src), wanted, request)
                )
            except OSError as e:
                raise ConnectionLost(f"{uri}: sending the sync search failed: {e}") from e
            reader = syncwire.Reader(mid, wanted)
            self.status.server = uri
            resumed = consumer.cookie is not None
            suffix = check.root_dse.suffix_of(src.base_dn) if check.root_dse else None
            step = None
            if suffix is not None and not self._false_alarms.trusted(uri):
                log.info(
                    "in-step check not available; an answer confirms",
                    server=uri,
                    why="a full refresh it asked for found this copy complete",
                )
            elif suffix is not None:
                step = self._step = _StepWatch(uri, suffix, check_timeout(self.config), consumer.cookie)
            else:
                log.info(
                    "in-step check not available; an answer confirms",
                    server=uri,
                    why=f"the root DSE names no naming context holding {src.base_dn}",
                )
            log.info("following the directory", method="syncrepl", server=uri, resume=resumed)
            # staged until complete, a sync meanwhile takes the content before it (abandoned in
            # _follow_ldap if the connection ends first)
            self.mirror.begin_refresh()
            refreshing, received = True, 0
            for data in self._received(sock, uri):
                try:
                    messages = reader.feed(data)
                except syncwire.WireError as e:
                    consumer.abandon()
                    raise ConnectionLost(f"{uri}: {e}") from e
                changed = False
                for message in messages:
                    try:
                        events = consumer.receive(message)
                    except syncrepl.SyncProtocolError as e:
                        consumer.abandon()
                        raise ConnectionLost(f"{uri}: sync protocol error: {e}") from e
                    for ev in events:
                        if isinstance(ev, syncrepl.EntryChanged):
                            self.mirror.upsert(ev.uuid, ev.dn, ev.attributes, wanted)
                            changed, received = True, received + 1
                            if refreshing and not received % REFRESH_FREEZE:
                                # the mirrored entries stay: out of the cyclic collector's sight, or it
                                # walks the whole growing mirror again and again (a fifth of a refresh)
                                gc.freeze()
                        elif isinstance(ev, syncrepl.EntryDeleted):
                            changed = self.mirror.delete(ev.uuid) or changed
                        elif isinstance(ev, syncrepl.CookieChanged):
                            self.mirror.set_cookie(ev.cookie)
                            if step is not None:
                                step.note_cookie(ev.cookie)
                        elif isinstance(ev, syncrepl.RefreshComplete):
                            refreshing = False
                            self.mirror.commit_refresh()  # its changes and its cookie, all at once
                            self.mirror.source = f"ldap:{uri}"
                            if step is not None:
                                step.persisting = True
                                step.rule.reset()
                            self._following(uri)
                            self._worked = True
                            log.info("refresh complete", server=uri, received=received, entries=len(self.mirror))
                            if self._false_alarms.refreshed(uri, self.mirror.content()):
                                log.warning(
                                    "the full refresh the in-step check asked for found this copy complete: "
                                    "the server's contextCSN moves for writes this search does not see "
                                    "(a server that sends no cookie for them); in-step check off for it",
                                    server=uri,
                                )
                            self.notify(RefreshDone())
                            changed = False  # what the refresh brought is in that sync
                        elif isinstance(ev, syncrepl.RefreshRequired):
                            log.warning("server refused the cookie; doing a full refresh", server=uri)
                            self.mirror.set_cookie(None)  # else every reconnect offers the refused cookie again
                            raise ConnectionLost(f"{uri}: e-syncRefreshRequired")
                        elif isinstance(ev, syncrepl.UnknownPresent):
                            log.warning(
                                "the server's present list names an entry this copy does not hold "
                                "(a protocol violation); doing a full refresh",
                                server=uri,
                                uuid=ev.uuid,
                                dn=ev.dn,
                            )
                            self.mirror.set_cookie(None)
                            self._again = uri
                            raise ConnectionLost(f"{uri}: present list names unknown entryUUID {ev.uuid}")
                        elif isinstance(ev, syncrepl.SearchFinished):
                            message_text = ev.message or _result_name(ev.result_code)
                            if refreshing and resumed and ev.result_code != 0:
                                # OpenLDAP refuses a cookie from its future (slapd restored from a backup)
                                # with unwillingToPerform, not e-syncRefreshRequired: same remedy.
                                log.warning(
                                    "server refused the cookie; doing a full refresh",
                                    server=uri,
                                    result=ev.result_code,
                                    message=message_text,
                                )
                                self.mirror.set_cookie(None)
                            raise ConnectionLost(f"{uri}: sync search ended: {message_text} ({ev.result_code})")
                # one notification per chunk received: a burst of changes is one wake-up of the agent
                if changed and not refreshing:
                    self.status.last_change = time.time()
                    self.notify(MirrorChanged())

    @contextlib.contextmanager
    def _raw_stream(self, src: LdapSource, check: ldapsource.Connected) -> Iterator[ldapsource.Connected]:
        """A bound connection to the check connection's server whose socket the follower
        reads itself; registered so stop() can break a read."""
        self.beat()
        stream = ldapsource.connect(src, uris=(check.uri,), raw=True)
        self._conn = stream.conn
        try:
            yield stream
        finally:
            self._conn = None
            stream.close()

    def _received(self, sock: socket.socket, uri: str) -> Iterator[bytes]:
        """What the server sends, chunk by chunk, forever; a closed connection is ConnectionLost.

        The same watch as `_items`: a beat at least every second, and after half of `timeout`
        without a byte a liveness read on the check connection (see there). In the persist
        phase each liveness read, and at least one read every `timeout` on a busy stream,
        is followed by the in-step check (`_check_step`).
        """
        quiet = max(0.5, check_timeout(self.config) / 2)
        heard = checked = time.monotonic()
        try:
            sock.settimeout(min(1.0, quiet))
        except OSError as e:
            raise ConnectionLost(f"{uri}: {e}") from e
        while True:
            self.beat()
            try:
                data: bytes | None = sock.recv(RECV_SIZE)
            except TimeoutError:
                data = None
            except OSError as e:
                raise ConnectionLost(f"{uri}: connection lost: {e}") from e
            now = time.monotonic()
            if data is not None:
                if not data:
                    raise ConnectionLost(f"{uri}: connection closed")
                heard = now
                self._answered()
                yield data
                now = time.monotonic()  # the chunk was applied: its cookie is ours
            step = self._step if self._step is not None and self._step.persisting else None
            due = step is not None and now - step.checked >= 2 * quiet
            if now - max(heard, checked) >= quiet or now - checked >= CHECK_IDLE_MAX or due:
                self._check_alive(confirm=step is None)
                if step is not None:
                    self._check_step(step)
                checked = time.monotonic()

    def _follow_psearch(self, src: LdapSource, check: ldapsource.Connected) -> None:
        uri = check.uri
        with self._stream(src, check) as conn:
            wanted = self.config.routing.attributes.ldap_attributes()
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
            snapshot = ldapsource.search(check, src, self.config.routing.attributes)
            changed = self.mirror.replace_all(snapshot)
            self._following(uri)
            self._worked = True
            log.info("following the directory", method="psearch", server=uri, entries=len(snapshot.entries))
            self.notify(RefreshDone() if not changed else MirrorChanged())
            for item in self._items(ps, conn, uri):
                for ev in consumer.receive(psearch.from_ldap3(item)):
                    if isinstance(ev, psearch.Upsert):
                        # delete by DN, then add: staged, so that no sync sees the entry missing
                        self.mirror.begin_refresh()
                        if ev.previous_dn:
                            self.mirror.delete_dn(ev.previous_dn)
                        self.mirror.delete_dn(ev.dn)
                        key = _uuid_of(ev.attributes) or ev.dn.lower()
                        self.mirror.upsert(key, ev.dn, ev.attributes, wanted)
                        self.mirror.commit_refresh()
                    elif isinstance(ev, psearch.Delete):
                        self.mirror.delete_dn(ev.dn)
                    elif isinstance(ev, psearch.Finished):
                        raise ConnectionLost(f"{uri}: persistent search ended: {ev.message} ({ev.result_code})")
                    self.status.last_change = time.time()
                    self.notify(MirrorChanged())

    def _follow_poll(self, src: LdapSource, check: ldapsource.Connected) -> None:
        """Read when the suffix's contextCSN moved (every time where there is none).

        Each poll connects afresh (an idle connection would meet the server's idle timeout);
        the connection that chose the method serves the first poll.
        """
        last_csn: str | None = None
        connected: ldapsource.Connected | None = check
        while True:
            if connected is None:
                self.beat()
                connected = ldapsource.connect(src, root_dse=True)
            try:
                csn = ldapsource.context_csn(connected, src.base_dn)
                if csn is None or csn != last_csn:
                    snapshot = ldapsource.search(connected, src, self.config.routing.attributes)
                    changed = self.mirror.replace_all(snapshot)
                    self.mirror.source = snapshot.source
                    self._following(connected.uri)
                    if changed:
                        self.status.last_change = time.time()
                        log.info("directory changed", method="poll", entries=len(snapshot.entries))
                    self.notify(MirrorChanged() if changed else RefreshDone())
                    last_csn = csn
                self._following(connected.uri)
                self._worked = True
            finally:
                connected.close()
                connected = None
            self.sleep(src.poll_interval)

    def _follow_ldif(self, src: LdifSource) -> None:
        """An LDIF source is polled by mtime/size; cheap, and works on any filesystem."""
        last: tuple[float, int] | None = None
        self.status.method, self.status.server = "ldif", str(src.path)
        while True:
            try:
                st = src.path.stat()
                sig = (st.st_mtime, st.st_size)
                if self.status.connected:
                    self._answered()
            except OSError as e:
                self.status.error = str(e)
                self.notify(AttemptFailed(str(e)))
                self.sleep(1.0)
                continue
            if sig != last:
                try:
                    snapshot = ldifsource.read(src, self.config.routing.attributes)
                except SourceError as e:
                    self.status.error = str(e)
                    log.error("LDIF source unreadable", error=str(e))
                    self.notify(AttemptFailed(str(e)))
                else:
                    changed = self.mirror.replace_all(snapshot)
                    self.mirror.source = snapshot.source
                    self.status.connected, self.status.error = True, None
                    if changed:
                        self.status.last_change = time.time()
                    self.notify(MirrorChanged() if changed else RefreshDone())
                last = sig
            self.sleep(0.5)


class _StepWatch:
    """The in-step check of one syncrepl connection: the suffix whose contextCSN is read,
    our CSN set (merged from every cookie: a persist-phase cookie names one sid), the rule."""

    __slots__ = ("checked", "ours", "persisting", "rule", "suffix", "told_unavailable", "uri", "warned")

    def __init__(self, uri: str, suffix: str, grace: float, cookie: bytes | None) -> None:
        self.uri, self.suffix = uri, suffix
        self.rule = instep.StepCheck(grace)
        self.ours: dict[int, instep.Csn] = {}
        self.persisting = False
        self.checked = time.monotonic()
        self.warned: set[str] = set()  # malformed values already warned about
        self.told_unavailable = False
        self.note_cookie(cookie)

    def note_cookie(self, cookie: bytes | None) -> None:
        csns = instep.cookie_csns(cookie)
        self.ours = instep.merge(self.ours, csns.by_sid)
        for value in csns.malformed:
            if value not in self.warned:
                self.warned.add(value)
                log.warning(
                    "the server's sync cookie holds a CSN that is not one; it is not compared",
                    server=self.uri,
                    value=value,
                )


def check_timeout(config: Config) -> float:
    return config.source.timeout if isinstance(config.source, LdapSource) else 10.0


def _method(check: ldapsource.Connected) -> str:
    controls = check.root_dse.controls if check.root_dse else frozenset()
    method = "syncrepl" if syncrepl.SYNC_REQUEST_OID in controls else "psearch" if PSEARCH_OID in controls else "poll"
    log.info("change detection chosen from the root DSE", method=method, server=check.uri)
    return method


def _receiver_alive(conn: ldap3.Connection) -> bool:
    receiver = getattr(conn.strategy, "receiver", None)
    return receiver is None or receiver.is_alive()


def _result_name(code: int) -> str:
    """The result code's name (what ldap3 called its description), for a result without a message."""
    return str(RESULT_CODES.get(code, "unknown result"))


def _uuid_of(attributes: Mapping[str, Iterable[bytes]]) -> str | None:
    for name, values in attributes.items():
        if name.lower() == "entryuuid":
            for v in values:
                return v.decode("ascii", "replace")
    return None
