"""The long-running agent: a thin shell around the sans-I/O Scheduler.

One main thread owns every write to the state directory and the outputs (so installs never
overlap) and talks to systemd. Everything else only posts typed events to one queue: the
Follower thread (the directory changed, a refresh completed, the connection came or went),
the config file watcher, the control socket (an operator's approve, rollback, resync),
signals. The main thread waits on that queue until the scheduler's next deadline, feeds what
arrived (stamped by the clock) into the Scheduler and carries out its decisions; every timing
rule lives in `scheduler.py`, every I/O piece is a small collaborator here (Notifier,
ConfigWatcher, control.ControlServer; the store, ldapsync.stored).

A config or static-file edit re-renders from the Mirror without reading LDAP; SIGHUP
re-reads the config and resyncs from LDAP; SIGTERM finishes the current sync and exits 0.
The agent holds the state lock for its lifetime: a second one on the same state_dir refuses
to start, and one-shot commands that would write (approve, rollback, resync) ask it over
the control socket instead. Nothing but a broken configuration at start-up stops the agent.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import datetime
import gc
import os
import queue
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import Any, Protocol

import sdnotify
import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ldapsync import config as config_mod
from ldapsync import control, progress, sync, watch
from ldapsync import scheduler as sched
from ldapsync import status as status_mod
from ldapsync.config import Config, LdapSource
from ldapsync.errors import ConfigError, LdapsyncError, StateError
from ldapsync.health import Health, clock_time
from ldapsync.state import StateLock
from ldapsync.state.lmdbstore import Store
from ldapsync.stored import StoredMirror

log = structlog.get_logger(__name__)

FOLLOWER_STALL = 120.0  # no heartbeat for this long: stop pinging the systemd watchdog
LOCK_WAIT = 1.0  # a restarting predecessor may still be exiting; then refuse to run beside it
RESYNC_AFTER_RELOAD = "configuration reloaded; resyncing from the directory"
DAY_MARGIN = 1.0  # seconds after midnight: date.today() has surely moved on
# Only writes count: reading the file (opened, closed_no_write) must not trigger a reload,
# or the agent's own read of a file it was told about would trigger the next reload, forever.
_EDIT_EVENTS = frozenset(
    {EVENT_TYPE_MODIFIED, EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, EVENT_TYPE_DELETED, EVENT_TYPE_CLOSED}
)


# -- the clock -------------------------------------------------------------------------------------
class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


def until_next_day(wall: float) -> float:
    """Seconds from `wall` (Unix time) to just after the next local midnight: the date
    `--once` and the agent call "today" (date.today(), local time) changes then."""
    now = datetime.datetime.fromtimestamp(wall)
    midnight = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time())
    return max(0.0, midnight.timestamp() - wall) + DAY_MARGIN


# -- what the queue carries ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FollowerSaid:
    """The follower `follower` reported `event` (ignored if that follower was replaced)."""

    follower: watch.Follower
    event: watch.FollowerEvent
    at: float


@dataclass(frozen=True, slots=True)
class Happened:
    """A scheduler event from the file watcher or a signal."""

    event: sched.Event


@dataclass(frozen=True, slots=True)
class Asked:
    """An operator's request from the control socket; its connection waits for the answer."""

    pending: control.Pending
    at: float


Posted = FollowerSaid | Happened | Asked


# -- the I/O collaborators -------------------------------------------------------------------------
class Notifier:
    """sd_notify: READY once, the watchdog, and the STATUS line whenever it changes."""

    def __init__(self, sender: Any = None):
        self.sender = sender if sender is not None else sdnotify.SystemdNotifier()
        self.line: str | None = None

    def ready(self, line: str) -> None:
        self.line = line
        self.sender.notify("READY=1\nSTATUS=" + line)

    def status(self, line: str) -> None:
        if line != self.line:
            self.line = line
            self.sender.notify("STATUS=" + line)

    def watchdog(self) -> None:
        self.sender.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.sender.notify("STOPPING=1")


class _EditHandler(FileSystemEventHandler):
    """Posts ConfigEdited when the config file or the static file is written or replaced."""

    def __init__(self, post: Any, clock: Clock, paths: set[Path]):
        self.post = post
        self.clock = clock
        self.paths = {p.resolve() for p in paths}

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _EDIT_EVENTS:
            return
        for raw in (event.src_path, getattr(event, "dest_path", None)):
            if raw and Path(os.fsdecode(raw)).resolve() in self.paths:
                self.post(Happened(sched.ConfigEdited(self.clock.monotonic())))
                return


class ConfigWatcher:
    """Watches the config and static files' directories (inotify, through watchdog)."""

    def __init__(self, post: Any, clock: Clock):
        self.post = post
        self.clock = clock
        self.observer: Any = None
        self.watched: set[Path] = set()

    def watch(self, config: Config) -> None:
        paths = {config.path}
        if config.static is not None:
            paths.add(config.static)
        if self.observer is not None:
            if paths == self.watched:
                return  # restarting the observer on every reload races inside watchdog (spurious error logs)
            self.observer.stop()
        self.watched = paths
        observer = Observer()
        handler = _EditHandler(self.post, self.clock, paths)
        for directory in sorted({p.parent for p in paths}):
            if directory.is_dir():
                observer.schedule(handler, str(directory), recursive=False)
        observer.daemon = True
        observer.start()
        self.observer = observer

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer = None


def _heartbeat() -> float:
    """Half of systemd's WATCHDOG_USEC, else every 10 s."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    return usec / 2e6 if usec > 0 else 10.0


def _file_stamps(config: Config) -> list[tuple[int, int, int] | None]:
    """(inode, size, mtime) of the config and static files, None if unreadable."""
    out: list[tuple[int, int, int] | None] = []
    for path in (config.path, config.static):
        try:
            st = path.stat() if path is not None else None
        except OSError:
            st = None
        out.append((st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else None)
    return out


def _timing(config: Config) -> sched.Timing:
    return sched.Timing.of(config.agent, heartbeat=_heartbeat())


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        force_first: bool = False,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.loaded_files = _file_stamps(config)  # before reading them: an edit from here on is seen
        self.pipeline = sync.Pipeline(config, follow=True)
        # SimpleQueue: put() is reentrant, so the signal handler may post while get() runs
        self.events: queue.SimpleQueue[Posted] = queue.SimpleQueue()
        self.notifier = notifier or Notifier()
        self.mirror: watch.Mirror | StoredMirror = watch.Mirror()
        self.store: Store | None = None  # an LDAP source's store, opened at start (under the lock)
        self.first_read = progress.Progress(self.clock.monotonic())  # the STATUS line until ready
        self.mirror_fingerprint = watch.fingerprint(config)
        self.follower: watch.Follower | None = None
        self.files = ConfigWatcher(self.events.put, self.clock)
        self.control: control.ControlServer | None = None
        self.pointer: Path | None = None
        self.scheduler = sched.Scheduler(_timing(config), now=self.clock.monotonic(), force_first=force_first)
        self.rebuilds = 0
        self.last_result: sync.Result | None = None
        self.follower_noted: tuple[bool, str | None] | None = None  # last (connected, error) recorded
        self.change_received: float | None = None  # wall time of the first change the next sync installs
        self.config_error: str | None = None  # the config file on disk was rejected; the running one stays
        self.requests: dict[int, control.Pending] = {}
        self.request_ids = 0
        self.resync_reason = RESYNC_AFTER_RELOAD  # what the next Resync is logged as
        self.failure: tuple[str, str] | None = None  # the last sync failure (logged once the retry is known)
        self.lock: StateLock | None = None
        self.described: Mapping[str, Any] = MappingProxyType({"pid": os.getpid()})

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        if not self.start():
            return 1
        try:
            while self.step():
                pass
        finally:
            self.finish()
        return 0

    def start(self, *, signals: bool = True) -> bool:
        """Take the lock and start the collaborators; False if another agent runs."""
        self.pipeline.state.ensure()
        try:
            self.lock = self.pipeline.state.acquire("agent", wait=LOCK_WAIT)
        except StateError as e:
            log.error("not starting: another agent runs on this state_dir", error=str(e))
            return False
        if signals:
            self._install_signals()
        self._restore_mirror()
        self._start_follower()
        self.files.watch(self.config)
        self._catch_early_edits()
        self._start_control()
        self._execute(self._feed(sched.DayScheduled(self.clock.monotonic(), self._next_day())))
        self._guarded("cannot record the configuration's state", self.pipeline.note_config, None)
        self.notifier.status("starting: reading the directory")
        return True

    def finish(self) -> None:
        self.notifier.stopping()
        if self.control is not None:
            self.control.close()
        for pending in self.requests.values():
            pending.answer(control.Reply(False, "the agent is stopping; the request was not carried out"))
        if self.follower is not None:
            self.follower.stop()
        self.files.stop()
        if self.pointer is not None:
            with contextlib.suppress(OSError):
                self.pointer.unlink()
        if self.store is not None:
            # the follower reads the store: closed under it only once it is gone (the data is
            # durable either way: every committed transaction is on disk)
            if self.follower is not None:
                self.follower.join(timeout=2)
            if self.follower is None or not self.follower.is_alive():
                self.store.close()
        if self.lock is not None:
            self.lock.release()
        log.info("stopped")

    def _install_signals(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            now = self.clock.monotonic()
            self.events.put(Happened(sched.Hangup(now) if signum == signal.SIGHUP else sched.Terminate(now)))

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)

    def _restore_mirror(self) -> None:
        """An LDAP source's mirror is the store: open it, and carry on from the installed
        outputs when they are what it rendered (no read, no build); else the first sync builds."""
        if not isinstance(self.config.source, LdapSource):
            return
        self._open_store()
        if self.store is None or not isinstance(self.mirror, StoredMirror):
            return
        if len(self.mirror) or self.mirror.cookie is not None:
            in_step = self.pipeline.resume_from_store()
            log.info(
                "resuming from the store",
                entries=len(self.mirror),
                cookie=self.mirror.cookie is not None,
                outputs="as installed" if in_step else "rebuilt at the first sync",
            )
            return
        saved = watch.load_follow_state(self.pipeline.state, self.config)  # written by an older version
        if saved is not None:
            snapshot, cookie = saved
            self.mirror.load(snapshot, cookie)
            log.info("resuming from saved sync state", entries=len(snapshot.entries), cookie=cookie is not None)

    def _open_store(self) -> None:
        """The store for the configured search, and the mirror and engine on it; a mirror in
        memory (nothing kept across a restart) if an exporter cannot splice."""
        if self.store is not None:
            self.store.close()
            self.store = None
        self.mirror_fingerprint = watch.fingerprint(self.config)
        store = Store.open(self.config.state_dir, self.mirror_fingerprint)
        if not self.pipeline.attach_store(store):
            log.warning("an exporter renders whole only: the agent keeps its copy in memory, not in the store")
            store.close()
            self.mirror = watch.Mirror()
            return
        self.store = store
        self.mirror = StoredMirror(store)

    def _start_follower(self) -> None:
        follower: watch.Follower | None = None

        def notify(event: watch.FollowerEvent) -> None:
            assert follower is not None
            self.events.put(FollowerSaid(follower, event, self.clock.monotonic()))

        follower = watch.Follower(self.config, self.mirror, notify)
        self.follower = follower
        follower.start()

    def _start_control(self) -> None:
        path = control.socket_path(self.config.state_dir)
        server = control.ControlServer(path, self._asked, self._describe)
        try:
            server.start()
        except OSError as e:
            log.error("cannot open the control socket; approve/rollback need the agent stopped", error=str(e))
            return
        self.control = server
        self.pointer = control.write_pointer(self.config.path, self.config.state_dir)

    def _asked(self, pending: control.Pending) -> None:
        self.events.put(Asked(pending, self.clock.monotonic()))

    def _catch_early_edits(self) -> None:
        """An edit between reading the files and watching them is an edit all the same."""
        if _file_stamps(self.config) != self.loaded_files:
            self.events.put(Happened(sched.ConfigEdited(self.clock.monotonic())))

    def _next_day(self) -> float:
        return self.clock.monotonic() + until_next_day(self.clock.time())

    # -- main loop ----------------------------------------------------------------------
    def step(self, *, wait: float | None = None) -> bool:
        """Wait for events (until the scheduler's deadline, or at most `wait` s), handle them and
        carry out the decisions; False once the agent is to stop."""
        deadline = self.scheduler.deadline()
        timeout = None if deadline is None else max(0.0, deadline - self.clock.monotonic())
        if wait is not None:
            timeout = wait if timeout is None else min(wait, timeout)
        posted: list[Posted] = []
        try:
            posted.append(self.events.get(timeout=timeout))
            # and whatever else arrived meanwhile: one sync serves a whole burst
            while True:
                posted.append(self.events.get_nowait())
        except queue.Empty:
            pass
        decisions: list[sched.Decision] = []
        for item in posted:
            for event in self._translate(item):
                decisions += self._feed(event)
        decisions += self.scheduler.handle(sched.Tick(self.clock.monotonic()))
        stop = self._execute(decisions)
        self._publish()
        if stop:
            log.info("SIGTERM: finishing", rebuilds=self.rebuilds)
        return not stop

    def _translate(self, item: Posted) -> list[sched.Event]:
        """The scheduler events a posted item means."""
        match item:
            case Happened(event=event):
                return [event]
            case Asked(pending=pending, at=at):
                self.request_ids += 1
                self.requests[self.request_ids] = pending
                return [sched.Requested(at, self.request_ids)]
            case FollowerSaid(follower=follower, event=event, at=at):
                if follower is not self.follower:
                    return []  # from a follower stopped by a resync
                match event:
                    case watch.Disconnected(error=error) | watch.AttemptFailed(error=error):
                        return [sched.FollowerDown(at, error or "directory unreachable")]
                    case watch.Connected():
                        return [sched.FollowerUp(at)]
                    case watch.MirrorChanged():  # a change also means the source was reached
                        return [sched.FollowerUp(at), sched.Changed(at)]
                    case watch.RefreshDone():
                        return [sched.FollowerUp(at), sched.Refreshed(at)]
        return []

    def _feed(self, event: sched.Event) -> list[sched.Decision]:
        """Record what the event says about the directory, then let the scheduler decide."""
        if isinstance(event, sched.FollowerUp):
            self._note_follower(True, None)
        elif isinstance(event, sched.FollowerDown):
            self._note_follower(False, event.error)
        elif isinstance(event, sched.Changed) and self.change_received is None:
            # for the propagation histogram: change received (in the follower) to installed
            self.change_received = self.clock.time() - (self.clock.monotonic() - event.at)
        elif isinstance(event, sched.Hangup):
            log.info("SIGHUP: re-reading the configuration and resyncing")
        decisions = self.scheduler.handle(event)
        if isinstance(event, sched.SyncFinished) and not event.ok and self.failure is not None:
            retry = self.scheduler.retry_at
            retry_in = None if retry is None else round(max(0.0, retry - event.at), 3)
            log.error(self.failure[0], error=self.failure[1], retry_in=retry_in)
        return decisions

    def _execute(self, decisions: list[sched.Decision]) -> bool:
        """Carry out decisions and their consequences in order; True if one was Stop."""
        work = collections.deque(decisions)
        stop = False
        while work:
            decision = work.popleft()
            stop = stop or isinstance(decision, sched.Stop)
            for event in self._do(decision):  # its consequences come before the rest
                work.extendleft(reversed(self._feed(event)))
        return stop

    def _do(self, decision: sched.Decision) -> list[sched.Event]:
        """Carry out one decision; the events it produced (a sync's outcome, a loaded config)."""
        match decision:
            case sched.Sync(force=force):
                return [self._sync(force)]
            case sched.Fallback(error=error):
                self._fallback(error)
            case sched.ReloadConfig():
                return [self._reload_config()]
            case sched.Resync():
                self._resync()
            case sched.Confirm():
                self._confirm()
            case sched.NotifyReady():
                line = self.status_line()
                self.notifier.ready(line)
                log.info("ready", status=line)
            case sched.Heartbeat():
                self._ping()
            case sched.ScheduleDay():
                log.info("a new day: re-evaluating date-based account states")
                return [sched.DayScheduled(self.clock.monotonic(), self._next_day())]
            case sched.Serve(request=rid):
                return self._serve(rid)
            case sched.Decline(request=rid):
                pending = self.requests.pop(rid, None)
                if pending is not None:
                    pending.answer(control.Reply(False, "the agent is stopping; the request was not carried out"))
            case sched.Stop():
                pass
        return []

    # -- carrying out decisions ---------------------------------------------------------
    def _sync(self, force: bool) -> sched.SyncFinished:
        snapshot, cookie = self.mirror.snapshot()
        started = self.clock.monotonic()
        received, self.change_received = self.change_received, None  # later changes: the next sync
        try:
            result = self.pipeline.run(snapshot=snapshot, force=force, received_at=received)
        except (LdapsyncError, OSError) as e:
            if self.change_received is None:
                self.change_received = received  # still to install: the retry measures from the first change
            what = "configuration error" if isinstance(e, ConfigError) else "sync failed"
            self.failure = (f"{what}; installed files stay; will retry", str(e))
            return sched.SyncFinished(self.clock.monotonic(), ok=False)
        finally:
            if not self.scheduler.connected and self.follower_noted is not None:
                # a sync from the mirror says nothing about LDAP: keep recording it as away
                self._note_follower(*self.follower_noted, force=True)
        self.failure = None
        self.rebuilds += 1
        self.last_result = result
        log.info(
            "sync done",
            result=result.status,
            changed=result.changed,
            seconds=round(self.clock.monotonic() - started, 3),
            entries=len(snapshot.entries),
        )
        if isinstance(self.mirror, StoredMirror):  # an LDAP source's (an LDIF file is read whole)
            try:
                self.pipeline.save(self.mirror, cookie, result)
            except (LdapsyncError, OSError) as e:  # the outputs are installed; the next sync rebuilds
                log.error("cannot write the store; the next sync is a full build", error=str(e))
            self.pipeline.last_plan = None  # its snapshot and outputs need not outlive the sync
        if self.pipeline.engine.last_full and self.pipeline.store is None:
            # Everything built so far lives until the next full build: out of the cyclic
            # collector's sight, so a change's small garbage does not make it walk millions.
            gc.freeze()
        _release_memory()
        return sched.SyncFinished(self.clock.monotonic(), ok=True, held=result.status == "held")

    def _fallback(self, error: str) -> None:
        """LDAP unreachable before the first sync: make sure last-known-good is installed."""
        try:
            self.pipeline.fallback(error)
        except (LdapsyncError, OSError) as e:
            log.error("last-known-good install failed; installed files stay", error=str(e))

    def _confirm(self) -> None:
        """Record as confirmed the moment the server last answered: the mirror had all it sent
        then, and the installed outputs were rendered from that mirror."""
        f = self.follower.status if self.follower else None
        answered = f.answered if f is not None else None
        if answered is None:
            return
        when = min(answered, self.clock.time())
        self._guarded("cannot record the confirmation", lambda: self.pipeline.note_confirmed(now=when))

    def _reload_config(self) -> sched.Event:
        try:
            new = config_mod.load(self.config.path)
            if new.state_dir != self.config.state_dir:
                raise ConfigError(
                    "cannot change while the agent runs (it holds the old one's lock): restart the agent",
                    file=new.path,
                    key="state_dir",
                )
            pipeline = sync.Pipeline(new, follow=True, store=self.store)
        except ConfigError as e:
            log.error("new configuration rejected; the running one stays in force", error=str(e))
            self.config_error = str(e)
            self._guarded("cannot record the rejected configuration", self.pipeline.note_config, self.config_error)
            return sched.ConfigRejected(self.clock.monotonic())
        old = self.config
        pipeline.state.inherit(self.pipeline.state)  # the next generation records the change only
        self.config, self.pipeline = new, pipeline
        pipeline.resume_from_store()  # other outputs or routing: the next sync builds in full
        self.config_error = None
        self._guarded("cannot record the configuration's state", self.pipeline.note_config, None)
        self.files.watch(new)
        search_changed = old.source != new.source or watch.fingerprint(old) != watch.fingerprint(new)
        if not search_changed:
            log.info("configuration reloaded; re-rendering from the directory in memory")
        return sched.ConfigLoaded(self.clock.monotonic(), _timing(new), search_changed=search_changed)

    def _resync(self) -> None:
        if self.follower is not None:
            self.follower.stop()
            self.follower.join(timeout=10)
        fingerprint = watch.fingerprint(self.config)
        if fingerprint != self.mirror_fingerprint and isinstance(self.config.source, LdapSource):
            self._open_store()  # another search: the store starts afresh
        elif fingerprint != self.mirror_fingerprint:
            self.mirror, self.mirror_fingerprint = watch.Mirror(), fingerprint
        else:
            self.mirror.set_cookie(None)  # full refresh; the present phase drops what is gone
        self._start_follower()
        log.info(self.resync_reason)
        self.resync_reason = RESYNC_AFTER_RELOAD

    # -- operators' requests (between syncs, in this thread: the only writer) --------------
    def _serve(self, rid: int) -> list[sched.Event]:
        pending = self.requests.pop(rid, None)
        if pending is None:
            return []
        request = pending.request
        events: list[sched.Event] = []
        try:
            if request.command == "approve":
                reply, events = self._approve()
            elif request.command == "rollback":
                result = sync.rollback(self.pipeline, request.generation)
                events = [sched.RolledBack(self.clock.monotonic())]
                changed = ", ".join(result.changed) or "nothing"
                reply = control.Reply(
                    True,
                    f"rolled back to {result.generation}; changed: {changed} "
                    "(in force until the next directory change)",
                    {"generation": result.generation, "changed": list(result.changed)},
                )
            elif request.command == "resync":
                self.resync_reason = "resync requested; reading the whole directory again"
                events = [sched.ResyncRequested(self.clock.monotonic())]
                reply = control.Reply(True, "resync started: the agent reads the whole directory again")
            else:  # status is answered by the control thread itself
                reply = control.Reply(False, f"{request.command!r} is not carried out by the agent's main loop")
        except (LdapsyncError, OSError) as e:
            log.error("control request failed", command=request.command, error=str(e))
            reply = control.Reply(False, str(e))
        log.info("control request done", command=request.command, ok=reply.ok, message=reply.message)
        pending.answer(reply)
        return events

    def _approve(self) -> tuple[control.Reply, list[sched.Event]]:
        held = self.pipeline.state.held()
        if held is None:
            return control.Reply(True, "no held change"), []
        snapshot, meta = held
        try:
            result = self.pipeline.run(force=True, snapshot=snapshot)
        except (LdapsyncError, OSError) as e:
            return control.Reply(False, f"installing the held change failed: {e}"), [
                sched.Approved(self.clock.monotonic(), ok=False)
            ]
        changed = ", ".join(result.changed) or "nothing"
        reply = control.Reply(
            True,
            f"approved held change ({meta.get('reason')}); changed: {changed}",
            {"generation": result.generation, "changed": list(result.changed), "reason": meta.get("reason")},
        )
        return reply, [sched.Approved(self.clock.monotonic(), ok=True)]

    # -- what the agent tells ------------------------------------------------------------
    def _note_follower(self, connected: bool, error: str | None, *, force: bool = False) -> None:
        """Record reachability in status.json when it changes (not on every reconnect attempt)."""
        if not force and self.follower_noted == (connected, error):
            return
        self.follower_noted = (connected, error)
        self._guarded("cannot record the directory's reachability", self.pipeline.note_follower, connected, error)

    def _guarded(self, what: str, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except (LdapsyncError, OSError) as e:
            log.error(what, error=str(e))

    def _ping(self) -> None:
        if self.scheduler.readiness != "ready":
            self.notifier.status(self.status_line())  # the first read's progress (sent when it changed)
        f = self.follower
        alive = f is not None and f.is_alive() and time.monotonic() - f.status.heartbeat < FOLLOWER_STALL
        if alive:
            self.notifier.watchdog()
        elif f is not None and not f.is_alive():
            log.error("follower thread died; restarting it")
            self._start_follower()

    def health(self) -> Health:
        """The same record `check` judges, from this agent's state dir."""
        return Health(
            at=self.clock.time(),
            record=status_mod.load(self.config.state_dir),
            ldap_timeout=self.config.source.timeout if isinstance(self.config.source, LdapSource) else 10.0,
            agent_pid=os.getpid(),
            config_error=self.config_error,
            generation=self.pipeline.state.current_id(),
        )

    def status_line(self, health: Health | None = None) -> str:
        """systemd's one-line status, from the health record: what is wrong first."""
        health = health or self.health()
        f = self.follower.status if self.follower else None
        following = None
        if f is not None and f.connected:
            change = "none since start" if f.last_change is None else clock_time(f.last_change)
            following = f"{f.server} ({f.method}), {len(self.mirror)} entries, last change {change}"
        retry = self.scheduler.retry_at
        retry_in = None if retry is None else max(0.0, retry - self.clock.monotonic())
        if self.scheduler.readiness != "ready" and health.record.result is None:
            # a first read of a large directory takes a minute: say how far it got
            count = max(len(self.mirror), self.mirror.staged())  # the first refresh is staged until complete
            line = self.first_read.status(self.clock.monotonic(), sync.READING, count if count else None)
            return f"starting: {line}"
        return health.status_line(following=following, retry_in=retry_in)

    def _publish(self) -> None:
        """After each step: the STATUS line (sent when it changed) and what `status` is told."""
        health = self.health()
        line = self.status_line(health)
        if self.scheduler.readiness == "ready":
            self.notifier.status(line)
        f = self.follower.status if self.follower else None
        retry = self.scheduler.retry_at
        self.described = MappingProxyType(
            {
                "pid": os.getpid(),
                "config": str(self.config.path),
                "config_error": self.config_error,
                "state_dir": str(self.config.state_dir),
                "status_line": line,
                "readiness": self.scheduler.readiness,
                "server": f.server if f else None,
                "method": f.method if f else None,
                "connected": f.connected if f else False,
                "entries": len(self.mirror),
                "failures": self.scheduler.failures,
                "retry_in": None if retry is None else round(max(0.0, retry - self.clock.monotonic()), 3),
                "rebuilds": self.rebuilds,
            }
        )

    def _describe(self) -> Mapping[str, Any]:
        return self.described  # swapped whole by the main thread: safe to hand out


def _release_memory() -> None:
    """Hand freed heap back to the OS after a rebuild's large temporaries (glibc only).

    A 100k-entry rebuild allocates tens of MiB of short-lived strings and bytes; without
    this, glibc keeps them mapped and the agent's RSS stays at its peak.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def run(config: Config, *, force_first: bool = False) -> int:
    return Agent(config, force_first=force_first).run()
