"""The long-running agent: a thin shell around the sans-I/O Scheduler.

One main thread owns every sync (so installs never overlap) and talks to systemd; the
Follower thread only updates the Mirror and posts events to a queue. The main thread waits
on that queue until the scheduler's next deadline, feeds what arrived (stamped with
time.monotonic()) into the Scheduler and carries out its decisions; every timing rule lives
in `scheduler.py`. A config or static-file edit re-renders from the Mirror without reading
LDAP; SIGHUP re-reads the config and resyncs from LDAP; SIGTERM finishes the current sync and
exits 0. The agent holds the state lock for its lifetime: a second one on the same state_dir
refuses to start. Nothing but a broken configuration at start-up stops the agent.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import os
import queue
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

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
from ldapsync import scheduler as sched
from ldapsync import sync, watch
from ldapsync.config import Config, LdapSource
from ldapsync.errors import ConfigError, LdapsyncError, StateError
from ldapsync.state import StateLock

log = structlog.get_logger(__name__)

FOLLOWER_STALL = 120.0  # no heartbeat for this long: stop pinging the systemd watchdog
LOCK_WAIT = 1.0  # a restarting predecessor may still be exiting; then refuse to run beside it
# Only writes count: reading the file (opened, closed_no_write) must not trigger a reload,
# or the agent's own read of a file it was told about would trigger the next reload, forever.
_EDIT_EVENTS = frozenset(
    {EVENT_TYPE_MODIFIED, EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, EVENT_TYPE_DELETED, EVENT_TYPE_CLOSED}
)

# What the queue carries: (the follower that posted it, or None) and a scheduler event.
Posted = tuple[watch.Follower | None, sched.Event]


class _ConfigWatcher(FileSystemEventHandler):
    """Posts ConfigEdited when the config file or the static file is written or replaced."""

    def __init__(self, events: queue.SimpleQueue[Posted], paths: set[Path]):
        self.events = events
        self.paths = {p.resolve() for p in paths}

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _EDIT_EVENTS:
            return
        for raw in (event.src_path, getattr(event, "dest_path", None)):
            if raw and Path(os.fsdecode(raw)).resolve() in self.paths:
                self.events.put((None, sched.ConfigEdited(time.monotonic())))
                return


def _heartbeat() -> float:
    """Half of systemd's WATCHDOG_USEC, else every 10 s (the STATUS line is refreshed too)."""
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
    def __init__(self, config: Config, *, force_first: bool = False):
        self.config = config
        self.loaded_files = _file_stamps(config)  # before reading them: an edit from here on is seen
        self.pipeline = sync.Pipeline(config, follow=True)
        # SimpleQueue: put() is reentrant, so the signal handler may post while get() runs
        self.events: queue.SimpleQueue[Posted] = queue.SimpleQueue()
        self.notifier = sdnotify.SystemdNotifier()
        self.mirror = watch.Mirror()
        self.mirror_fingerprint = watch.fingerprint(config)
        self.follower: watch.Follower | None = None
        self.observer: Any = None
        self.watched: set[Path] = set()
        self.scheduler = sched.Scheduler(_timing(config), now=time.monotonic(), force_first=force_first)
        self.rebuilds = 0
        self.last_result: sync.Result | None = None
        self.sync_error: str | None = None  # the last sync failed with this; None after a success
        self.follower_noted: tuple[bool, str | None] | None = None  # last (connected, error) recorded
        self.change_received: float | None = None  # wall time of the first change the next sync installs
        self.lock: StateLock | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        self.pipeline.state.ensure()
        try:
            self.lock = self.pipeline.state.acquire("agent", wait=LOCK_WAIT)
        except StateError as e:
            log.error("not starting: another agent runs on this state_dir", error=str(e))
            return 1
        try:
            self._install_signals()
            self._restore_mirror()
            self._start_follower()
            self._watch_files()
            self._catch_early_edits()
            self.notifier.notify("STATUS=starting: reading the directory")
            try:
                self._loop()
            finally:
                self.notifier.notify("STOPPING=1")
                if self.follower is not None:
                    self.follower.stop()
                if self.observer is not None:
                    self.observer.stop()
        finally:
            self.lock.release()
        log.info("stopped")
        return 0

    def _install_signals(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            now = time.monotonic()
            self.events.put((None, sched.Hangup(now) if signum == signal.SIGHUP else sched.Terminate(now)))

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)

    def _restore_mirror(self) -> None:
        if not isinstance(self.config.source, LdapSource):
            return
        saved = watch.load_follow_state(self.pipeline.state, self.config)
        if saved is not None:
            snapshot, cookie = saved
            self.mirror.load(snapshot, cookie)
            log.info("resuming from saved sync state", entries=len(snapshot.entries), cookie=cookie is not None)

    def _start_follower(self) -> None:
        follower: watch.Follower | None = None

        def notify(what: str) -> None:
            now = time.monotonic()
            if what in ("down", "error"):  # "error": each failed attempt (the LDIF source has no "down")
                error = (follower.status.error if follower else None) or "directory unreachable"
                self.events.put((follower, sched.FollowerDown(now, error)))
            elif what == "up":
                self.events.put((follower, sched.FollowerUp(now)))
            elif what in ("changed", "synced"):
                # a change or a complete refresh also means the source was reached (LDIF has no "up")
                self.events.put((follower, sched.FollowerUp(now)))
                self.events.put((follower, sched.Refreshed(now) if what == "synced" else sched.Changed(now)))

        follower = watch.Follower(self.config, self.mirror, notify)
        self.follower = follower
        follower.start()

    def _catch_early_edits(self) -> None:
        """An edit between reading the files and watching them is an edit all the same."""
        if _file_stamps(self.config) != self.loaded_files:
            self.events.put((None, sched.ConfigEdited(time.monotonic())))

    def _watch_files(self) -> None:
        paths = {self.config.path}
        if self.config.static is not None:
            paths.add(self.config.static)
        if self.observer is not None:
            if paths == self.watched:
                return  # restarting the observer on every reload races inside watchdog (spurious error logs)
            self.observer.stop()
        self.watched = paths
        observer = Observer()
        handler = _ConfigWatcher(self.events, paths)
        for directory in sorted({p.parent for p in paths}):
            if directory.is_dir():
                observer.schedule(handler, str(directory), recursive=False)
        observer.daemon = True
        observer.start()
        self.observer = observer

    # -- main loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            deadline = self.scheduler.deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            posted: list[Posted] = []
            try:
                posted.append(self.events.get(timeout=timeout))
                # and whatever else arrived meanwhile: one sync serves a whole burst
                while True:
                    posted.append(self.events.get_nowait())
            except queue.Empty:
                pass
            decisions: list[sched.Decision] = []
            for source, event in posted:
                if source is not None and source is not self.follower:
                    continue  # from a follower stopped by a resync
                decisions += self._feed(event)
            decisions += self.scheduler.handle(sched.Tick(time.monotonic()))
            if any(isinstance(d, sched.Stop) for d in decisions):
                log.info("SIGTERM: finishing", rebuilds=self.rebuilds)
                return
            self._execute(decisions)

    def _feed(self, event: sched.Event) -> list[sched.Decision]:
        """Record what the event says about the directory, then let the scheduler decide."""
        if isinstance(event, sched.FollowerUp):
            self._note_follower(True, None)
        elif isinstance(event, sched.FollowerDown):
            self._note_follower(False, event.error)
        elif isinstance(event, sched.Changed) and self.change_received is None:
            # for the propagation histogram: change received (in the follower) to installed
            self.change_received = time.time() - (time.monotonic() - event.at)
        elif isinstance(event, sched.Hangup):
            log.info("SIGHUP: re-reading the configuration and resyncing")
        return self.scheduler.handle(event)

    def _execute(self, decisions: list[sched.Decision]) -> None:
        work = collections.deque(decisions)
        while work:
            decision = work.popleft()
            for event in self._do(decision):  # its consequences come before the rest
                work.extendleft(reversed(self._feed(event)))

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
                self._guarded("cannot record the confirmation", self.pipeline.note_confirmed)
            case sched.NotifyReady():
                self.notifier.notify("READY=1\nSTATUS=" + self.status_line())
                log.info("ready", status=self.status_line())
            case sched.Heartbeat():
                self._ping()
            case sched.Stop():
                pass
        return []

    # -- carrying out decisions ---------------------------------------------------------
    def _sync(self, force: bool) -> sched.SyncFinished:
        snapshot, cookie = self.mirror.snapshot()
        started = time.monotonic()
        received, self.change_received = self.change_received, None  # later changes: the next sync
        try:
            result = self.pipeline.run(snapshot=snapshot, force=force, received_at=received)
        except (LdapsyncError, OSError) as e:
            if self.change_received is None:
                self.change_received = received  # still to install: the retry measures from the first change
            self.sync_error = str(e)
            retry_in = self.scheduler.timing.backoff(self.scheduler.failures + 1)
            what = "configuration error" if isinstance(e, ConfigError) else "sync failed"
            log.error(f"{what}; installed files stay; will retry", error=str(e), retry_in=round(retry_in, 3))
            return sched.SyncFinished(time.monotonic(), ok=False)
        finally:
            if not self.scheduler.connected and self.follower_noted is not None:
                # a sync from the mirror says nothing about LDAP: keep recording it as away
                self._note_follower(*self.follower_noted, force=True)
        self.sync_error = None
        self.rebuilds += 1
        self.last_result = result
        log.info(
            "sync done",
            result=result.status,
            changed=result.changed,
            seconds=round(time.monotonic() - started, 3),
            entries=len(snapshot.entries),
        )
        if isinstance(self.config.source, LdapSource):
            try:
                stored = self.pipeline.redacted(snapshot)  # no refused secret on disk
                state = self.pipeline.state
                watch.save_follow_state(state, self.config, stored, cookie, generation=result.generation)
            except OSError as e:
                log.error("cannot save sync state; a restart will do a full read", error=str(e))
        if self.pipeline.engine.last_full:
            # Everything built so far lives until the next full build: out of the cyclic
            # collector's sight, so a change's small garbage does not make it walk millions.
            gc.freeze()
        _release_memory()
        return sched.SyncFinished(time.monotonic(), ok=True, held=result.status == "held")

    def _fallback(self, error: str) -> None:
        """LDAP unreachable before the first sync: make sure last-known-good is installed."""
        try:
            result = self.pipeline.fallback(error)
        except (LdapsyncError, OSError) as e:
            log.error("last-known-good install failed; installed files stay", error=str(e))
            self.sync_error = str(e)
            return
        if result.status == "failed" and result.generation is None:
            # no generation to serve (or restoring one failed); an unreachable directory alone is not a sync error
            self.sync_error = result.error

    def _reload_config(self) -> sched.Event:
        try:
            new = config_mod.load(self.config.path)
            if new.state_dir != self.config.state_dir:
                raise ConfigError(
                    "cannot change while the agent runs (it holds the old one's lock): restart the agent",
                    file=new.path,
                    key="state_dir",
                )
            pipeline = sync.Pipeline(new, follow=True)
        except ConfigError as e:
            log.error("new configuration rejected; the running one stays in force", error=str(e))
            return sched.ConfigRejected(time.monotonic())
        old = self.config
        pipeline.state.inherit(self.pipeline.state)  # the next generation records the change only
        self.config, self.pipeline = new, pipeline
        self._watch_files()
        search_changed = old.source != new.source or watch.fingerprint(old) != watch.fingerprint(new)
        if not search_changed:
            log.info("configuration reloaded; re-rendering from the directory in memory")
        return sched.ConfigLoaded(time.monotonic(), _timing(new), search_changed=search_changed)

    def _resync(self) -> None:
        if self.follower is not None:
            self.follower.stop()
            self.follower.join(timeout=10)
        fingerprint = watch.fingerprint(self.config)
        if fingerprint != self.mirror_fingerprint:
            self.mirror, self.mirror_fingerprint = watch.Mirror(), fingerprint
        else:
            self.mirror.set_cookie(None)  # full refresh; the present phase drops what is gone
        self._start_follower()
        log.info("configuration reloaded; resyncing from the directory")

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
        f = self.follower
        alive = f is not None and f.is_alive() and time.monotonic() - f.status.heartbeat < FOLLOWER_STALL
        if alive:
            self.notifier.notify("WATCHDOG=1")
        elif f is not None and not f.is_alive():
            log.error("follower thread died; restarting it")
            self._start_follower()
        self.notifier.notify("STATUS=" + self.status_line())

    def status_line(self) -> str:
        """systemd's one-line status: what is wrong first, else what the agent follows."""
        serving = f"serving generation {self.pipeline.state.current_id() or 'none'}"
        if self.sync_error is not None:
            retry = self.scheduler.retry_at
            when = "" if retry is None else f"; retry in {max(0.0, retry - time.monotonic()):.0f}s"
            return f"sync FAILED ({self.sync_error}); {serving}{when}"
        f = self.follower.status if self.follower else None
        held = self.last_result.held_reason if self.last_result and self.last_result.status == "held" else None
        if held:
            return f"change HELD for review ({held}); {serving}"
        if f is None or not f.connected:
            err = f.error if f else None
            return f"directory unreachable ({err or 'connecting'}); serving installed maps"
        age = "never" if f.last_change is None else f"{time.time() - f.last_change:.0f}s ago"
        return f"following {f.server} ({f.method}), {len(self.mirror)} entries, last change {age}"


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
