"""A one-shot run that resumes: the saved mirror caught up by one syncrepl refreshOnly.

Cron users run `ldapsync --once` every few minutes. Each run used to read the whole directory
although the state dir holds the last run's directory and the sync cookie that goes with
exactly it (the store, ldapsync.state.lmdbstore; a follow state, mirror.save_follow_state,
from an older version). Here a one-shot run opens it as a StoredMirror, asks the server for
what changed since the cookie (RFC 4533 refreshOnly, the same sans-I/O consumer and wire code
as the agent's follower, on the run's one connection), and hands the pipeline the caught-up
snapshot: the engine on the store builds what changed, and the run installs exactly what a
full read would; then the store takes the run's changes and cookie in one transaction.

The refresh is applied all-or-nothing: its events are collected and applied only once the
server has ended it successfully, so a refresh cut short never leaves a half-changed copy
paired with either cookie. Anything that makes resuming doubtful is a full read instead:
no store (or follow state), or one that is damaged or for another search; a server that
refuses the cookie (e-syncRefreshRequired, or unwillingToPerform for a cookie from its
future); a protocol violation. A full read is a cookieless refreshOnly that asks for no
attribute (it brings the cookie the next run resumes from) followed by the paged search,
whose entries decode faster than the refresh's; where the server offers no syncrepl or that
refresh fails, the paged search alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from ldapsync import ldapsource, syncrepl, syncwire
from ldapsync.config import Config, LdapSource
from ldapsync.directory import Snapshot
from ldapsync.errors import LdapsyncError, SourceError, StateError
from ldapsync.mirror import Mirror, fingerprint, follow_state_path, load_follow_state, save_follow_state
from ldapsync.state import State
from ldapsync.state.lmdbstore import Store
from ldapsync.status import SyncResult
from ldapsync.stored import StoredMirror
from ldapsync.sync import READING, Pipeline, Result

log = structlog.get_logger(__name__)

RECV_SIZE = 1 << 18
# a sync whose result these name installed (or already had) the snapshot the run read: saved,
# so the next run resumes from it. A held one is not: the next run resumes from the last
# installed content and its cookie, sees the same change again and holds it again -- and if
# what looked like a mass deletion was entries hidden for a while (an ACL edit, which moves
# no CSN and is never sent by syncrepl), the next run finds its old copy still right.
SAVED_AFTER = frozenset({SyncResult.INSTALLED, SyncResult.UNCHANGED})


# No entry has the nil UUID; entryUUID is indexed (the server snippet's olcDbIndex), so the
# server finds that at once.
NO_ENTRY = "(entryUUID=00000000-0000-0000-0000-000000000000)"


class RefreshFailed(Exception):
    """The refresh gave no answer this copy can trust; the message says why. A full read follows."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one read of the directory brought."""

    snapshot: Snapshot
    cookie: bytes | None  # None: no syncrepl answer (paged search); nothing is saved
    resumed: bool  # caught up from the saved follow state
    received: int  # entries the server sent in full
    deleted: int  # entries the refresh removed from the saved copy
    mirror: Mirror | StoredMirror | None = None  # the copy caught up (its store is saved to)


class OneShot:
    """The reader of a one-shot run (Pipeline.reader) and the saver of what it read.

    `resume`: start from the saved follow state if it is usable (`resync` asks for a full
    read). The outcome of the read is kept for `save()`, which a run that writes state calls
    after the sync; a dry run never calls it.
    """

    def __init__(self, pipeline: Pipeline, *, resume: bool = True, store: Store | None = None) -> None:
        """`store`: the state dir's store (ldapsync.state.lmdbstore), which the pipeline builds
        on: the run resumes from its cookie and writes what it read back to it."""
        assert isinstance(pipeline.config.source, LdapSource)
        self.pipeline = pipeline
        self.store = store
        self.config: Config = pipeline.config
        self.source: LdapSource = pipeline.config.source
        self.resume = resume
        self.outcome: Outcome | None = None
        self._conn: ldapsource.Connected | None = None  # the connection of the read under way

    # -- reading ----------------------------------------------------------------------------
    def read(self) -> Snapshot:
        """The directory's content now; SourceError when no server can be read."""
        self.outcome = None
        src = self.source
        connected = self._conn = ldapsource.connect_in_rounds(src, src.connect_rounds, root_dse=True)
        try:
            controls = connected.root_dse.controls if connected.root_dse is not None else frozenset()
            if syncrepl.SYNC_REQUEST_OID not in controls:
                log.info(
                    "the server offers no syncrepl (no syncprov): reading the whole directory", server=connected.uri
                )
                outcome = self._paged()
            else:
                outcome = self._synced()
        finally:
            self._conn.close()
            self._conn = None
        self.outcome = outcome
        return outcome.snapshot

    @property
    def _connected(self) -> ldapsource.Connected:
        assert self._conn is not None, "only during read()"
        return self._conn

    def _mirror(self) -> Mirror | StoredMirror:
        """An empty copy, or the store's content without its cookie (a full refresh against
        it: the server's present list then says what is gone)."""
        if self.store is None:
            return Mirror()
        mirror = StoredMirror(self.store)
        mirror.set_cookie(None)
        return mirror

    def _resumable(self) -> Mirror | StoredMirror | None:
        """The copy to resume from: the store with its cookie, else the follow state."""
        if self.store is not None and self.resume:
            stored = StoredMirror(self.store)
            if stored.cookie is not None:
                return stored
        saved = self._saved()
        if saved is None:
            return None
        mirror: Mirror | StoredMirror = Mirror() if self.store is None else StoredMirror(self.store)
        mirror.load(*saved)
        return mirror

    def _synced(self) -> Outcome:
        """Resume if the store or the follow state allows, else (or if that fails) a full read."""
        uri = self._connected.uri
        mirror = self._resumable()
        if mirror is not None:
            try:
                return self._refresh(mirror)
            except RefreshFailed as e:
                log.warning(
                    "could not resume from the saved sync state; reading the whole directory",
                    server=uri,
                    reason=str(e),
                )
                self._reconnect()
        try:
            return self._fresh()
        except RefreshFailed as e:
            log.warning(
                "the syncrepl refresh for a cookie failed; reading the whole directory with a paged search",
                server=uri,
                reason=str(e),
            )
            self._reconnect()
            return self._paged()

    def _saved(self) -> tuple[Snapshot, bytes | None] | None:
        """The follow state if there is one to resume from (load_follow_state logs why not)."""
        state: State = self.pipeline.state
        if not self.resume:
            log.info("full read asked for: the saved sync state is not used")
            return None
        try:
            present = follow_state_path(state).exists()
        except OSError as e:  # a dry run by a user who may not read the state dir
            log.warning("saved sync state not readable: reading the whole directory", error=str(e))
            return None
        if not present:
            log.info("no saved sync state: reading the whole directory")
            return None
        saved = load_follow_state(state, self.config)
        if saved is None:
            log.warning("saved sync state not usable (see above): reading the whole directory")
            return None
        if saved[1] is None:
            log.info("saved sync state has no cookie: reading the whole directory")
            return None
        return saved

    def _reconnect(self) -> None:
        """A fresh connection, to the same server first: after a failed refresh the stream
        may still carry the rest of an answer nobody will read."""
        old = self._connected
        old.close()
        uris = (old.uri, *(u for u in self.source.uris if u != old.uri))
        self._conn = ldapsource.connect(self.source, uris=uris)

    def _paged(self) -> Outcome:
        report = self.pipeline.progress
        snapshot = ldapsource.search(
            self._connected, self.source, self.config.routing.attributes, lambda n: report(READING, n)
        )
        return Outcome(snapshot, None, resumed=False, received=len(snapshot.entries), deleted=0)

    def _refresh(self, mirror: Mirror | StoredMirror) -> Outcome:
        """One refreshOnly from `mirror`'s cookie, applied to it once complete.

        RefreshFailed when the server's answer cannot be used (the connection may then hold
        unread data); SourceError when the connection fails.
        """
        uri = self._connected.uri
        wanted = self.config.routing.attributes.ldap_attributes()
        try:
            consumer = syncrepl.SyncConsumer(known=mirror.keys(), cookie=mirror.cookie)
        except (ValueError, syncrepl.SyncProtocolError) as e:
            raise RefreshFailed(f"the saved copy holds an entry without an entryUUID: {e}") from e
        events: list[syncrepl.EntryChanged | syncrepl.EntryDeleted] = []
        received, size = self._exchange(consumer, wanted, events)
        deleted = _apply(mirror, events, wanted)
        if mirror.keys() != consumer.known:
            raise RefreshFailed("after the refresh this copy and the server disagree on which entries exist")
        mirror.set_cookie(consumer.cookie)
        mirror.source = f"ldap:{uri}"
        snapshot, cookie = mirror.snapshot()
        log.info(
            "resumed from the saved sync state",
            server=uri,
            received=received,
            deleted=deleted,
            entries=len(snapshot.entries),
            bytes=size,
        )
        return Outcome(snapshot, cookie, resumed=True, received=received, deleted=deleted, mirror=mirror)

    def _exchange(
        self,
        consumer: syncrepl.SyncConsumer,
        wanted: list[str],
        events: list[syncrepl.EntryChanged | syncrepl.EntryDeleted] | None,
        *,
        search_filter: bytes | None = None,
    ) -> tuple[int, int]:
        """Send the consumer's refreshOnly (the configured search, or `search_filter`) and
        read the answer to its end: (entries sent in full, bytes); the changes go to `events`
        (None: counted, not kept)."""
        connected = self._connected
        src, uri = self.source, connected.uri
        request = consumer.request(syncrepl.Mode.REFRESH_ONLY)
        mid = connected.conn.server.next_message_id()
        scope = ldapsource.SCOPE_CODES[src.scope]
        flt = ldapsource.filter_ber(src) if search_filter is None else search_filter
        message = syncwire.search_request(mid, src.base_dn, scope, flt, wanted, request)
        reader = syncwire.Reader(mid, wanted)
        sink: list[syncrepl.EntryChanged | syncrepl.EntryDeleted] = [] if events is None else events
        received = size = 0
        report = self.pipeline.progress
        sock = connected.conn.socket
        try:
            sock.settimeout(src.timeout)  # per recv, as the paged search
            sock.sendall(message)
            complete = False
            while not complete:
                data = sock.recv(RECV_SIZE)
                if not data:
                    raise SourceError(f"{uri}: connection closed by the server during the sync refresh")
                size += len(data)
                try:
                    messages = reader.feed(data)
                except syncwire.WireError as e:
                    raise RefreshFailed(str(e)) from e
                for msg in messages:
                    if complete:
                        raise RefreshFailed("the server sent more after the end of the refresh")
                    complete, entries = self._take(consumer, msg, sink)
                    received += entries
                if events is None:
                    sink.clear()
                else:
                    report(READING, received)
            if reader.pending:
                raise RefreshFailed("the server sent more after the end of the refresh")
        except OSError as e:
            connected.close()  # the stream is mid-answer: nobody may read it
            raise SourceError(f"{uri}: sync refresh failed after {received} entries: {e}") from e
        return received, size

    def _fresh(self) -> Outcome:
        """A full read that the next run can resume from: a refresh that matches no entry
        gives the cookie (a cookie is a CSN of the database, whatever the search), then the
        paged search (faster to decode than a refresh's entries) reads the directory. The
        content is as new as the cookie or newer; the next run, resuming from the cookie with
        the configured search, gets again what changed in between, which changes nothing."""
        uri = self._connected.uri
        consumer = syncrepl.SyncConsumer()
        _, size = self._exchange(consumer, ["1.1"], None, search_filter=ldapsource.ber_filter(NO_ENTRY))
        if consumer.cookie is None:
            raise RefreshFailed("the server ended the refresh without a cookie")
        outcome = self._paged()
        mirror = self._mirror()
        mirror.replace_all(outcome.snapshot)
        mirror.set_cookie(consumer.cookie)
        mirror.source = f"ldap:{uri}"
        snapshot, cookie = mirror.snapshot()
        log.info("read the whole directory", server=uri, entries=len(snapshot.entries), cookie_bytes=size)
        return Outcome(snapshot, cookie, resumed=False, received=outcome.received, deleted=0, mirror=mirror)

    @staticmethod
    def _take(
        consumer: syncrepl.SyncConsumer,
        message: syncrepl.Message,
        events: list[syncrepl.EntryChanged | syncrepl.EntryDeleted],
    ) -> tuple[bool, int]:
        """Feed one message; collect its changes: (the refresh is complete, entries sent in full)."""
        try:
            out = consumer.receive(message)
        except syncrepl.SyncProtocolError as e:
            raise RefreshFailed(f"sync protocol error: {e}") from e
        complete, entries = False, 0
        for ev in out:
            if isinstance(ev, syncrepl.EntryChanged):
                events.append(ev)
                entries += 1
            elif isinstance(ev, syncrepl.EntryDeleted):
                events.append(ev)
            elif isinstance(ev, syncrepl.RefreshComplete):
                complete = True
            elif isinstance(ev, syncrepl.RefreshRequired):
                raise RefreshFailed("the server refused the cookie (e-syncRefreshRequired)")
            elif isinstance(ev, syncrepl.UnknownPresent):
                raise RefreshFailed(f"the present list names entryUUID {ev.uuid}, which this copy does not hold")
            elif isinstance(ev, syncrepl.SearchFinished):
                code = ev.result_code
                raise RefreshFailed(f"the sync search ended: {ev.message or 'no message'} (result {code})")
        return complete, entries

    # -- saving -----------------------------------------------------------------------------
    def save(self, result: Result) -> None:
        """Save what this run read with its cookie, so the next run resumes from it.

        Only after a sync that leaves that snapshot as the directory's content (installed,
        unchanged, held), and only with a cookie: without one the previous follow state, a
        consistent pair of its own, stays.
        """
        outcome = self.outcome
        if outcome is None or outcome.cookie is None or result.status not in SAVED_AFTER:
            return
        pipeline = self.pipeline
        if isinstance(outcome.mirror, StoredMirror):
            try:
                pipeline.save(outcome.mirror, outcome.cookie, result)
            except (LdapsyncError, OSError) as e:
                log.error("cannot write the store; the next run reads the whole directory", error=str(e))
            return
        try:
            stored = pipeline.redacted(outcome.snapshot)  # no refused secret on disk
            save_follow_state(
                pipeline.state, self.config, stored, outcome.cookie, generation=result.generation or result.held_id
            )
        except OSError as e:
            log.error("cannot save sync state; the next run reads the whole directory", error=str(e))


def _apply(
    mirror: Mirror | StoredMirror, events: list[syncrepl.EntryChanged | syncrepl.EntryDeleted], wanted: list[str]
) -> int:
    """Apply a completed refresh's changes in order; the number of entries deleted."""
    deleted = 0
    for ev in events:
        if isinstance(ev, syncrepl.EntryChanged):
            mirror.upsert(ev.uuid, ev.dn, ev.attributes, wanted)
        elif mirror.delete(ev.uuid):
            deleted += 1
    return deleted


@contextlib.contextmanager
def resuming(pipeline: Pipeline, *, resume: bool = True, write: bool = True) -> Iterator[OneShot | None]:
    """`pipeline`'s reads resume from the store (or a follow state an older version saved),
    and it builds on the store, for the block; None for a source with nothing to resume (an
    LDIF file). `write`: the caller holds the state lock and saves what it read (OneShot.save);
    else (a dry run) the store is only read, and never rebuilt."""
    if not isinstance(pipeline.config.source, LdapSource):
        yield None
        return
    config = pipeline.config
    store: Store | None = None
    if write:
        try:
            pipeline.state.ensure()
            store = Store.open(config.state_dir, fingerprint(config))
        except StateError as e:  # not ours and not removable: a full read, the log says why
            log.error("store not usable; this run does not resume from it", error=str(e))
    else:
        store = Store.open_readonly(config.state_dir, fingerprint(config))
    try:
        if store is not None and not pipeline.attach_store(store):
            store.close()
            store = None
        one_shot = OneShot(pipeline, resume=resume, store=store)
        pipeline.reader = one_shot.read
        if store is not None:
            pipeline.resume_from_store()
        yield one_shot
    finally:
        if store is not None:
            store.close()


def run_once(pipeline: Pipeline, *, force: bool = False, resume: bool = True) -> Result:
    """A one-shot sync (the caller holds the state lock) that resumes from the store and
    writes what it read back to it: with nothing changed it reads no entry and builds
    nothing, after a few changes it builds what they touch."""
    with resuming(pipeline, resume=resume) as one_shot:
        result = pipeline.run(force=force)
        if one_shot is not None:
            one_shot.save(result)
        return result
