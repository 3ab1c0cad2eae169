"""The long-running agent: follow the directory, debounce, rebuild, tell systemd.

One main thread owns every sync (so installs never overlap) and talks to systemd; the
Follower thread only updates the Mirror and nudges the main thread through a queue. A
config or static-file edit re-renders from the Mirror without reading LDAP; SIGHUP re-reads
the config and resyncs from LDAP; SIGTERM finishes the current sync and exits 0. Nothing
but a broken configuration at start-up stops the agent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
from ldapsync import sync, watch
from ldapsync.config import Config, LdapSource
from ldapsync.errors import ConfigError, LdapsyncError

log = structlog.get_logger(__name__)

RETRY_FAILED_SYNC = 30.0  # seconds before a failed install (disk full, postmap) is retried
FOLLOWER_STALL = 120.0  # no heartbeat for this long: stop pinging the systemd watchdog
CONFIG_SETTLE = 0.2  # quiet time after a config/static edit before it is read (editors write in steps)
# Only writes count: reading the file (opened, closed_no_write) must not trigger a reload,
# or the agent's own read of a file it was told about would trigger the next reload, forever.
_EDIT_EVENTS = frozenset(
    {EVENT_TYPE_MODIFIED, EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, EVENT_TYPE_DELETED, EVENT_TYPE_CLOSED}
)


class _ConfigWatcher(FileSystemEventHandler):
    """Posts "config" when the config file or the static file is written or replaced."""

    def __init__(self, events: queue.Queue[tuple[str, Any]], paths: set[Path]):
        self.events = events
        self.paths = {p.resolve() for p in paths}

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _EDIT_EVENTS:
            return
        for raw in (event.src_path, getattr(event, "dest_path", None)):
            if raw and Path(os.fsdecode(raw)).resolve() in self.paths:
                self.events.put(("config", None))
                return


class Agent:
    def __init__(self, config: Config, *, force_first: bool = False):
        self.config = config
        self.pipeline = sync.Pipeline(config)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.notifier = sdnotify.SystemdNotifier()
        self.mirror = watch.Mirror()
        self.follower: watch.Follower | None = None
        self.observer: Any = None
        self.watched: set[Path] = set()
        self.ready = False
        self.synced = False  # the mirror holds a complete directory
        self.force_next = force_first
        self.pending_since: float | None = None
        self.last_event = 0.0
        self.retry_at: float | None = None
        self.config_due: float | None = None  # reload the config files at this time
        self.rebuilds = 0
        self.last_result: sync.Result | None = None
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self.watchdog_interval = usec / 2e6 if usec > 0 else 10.0

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        self.pipeline.state.ensure()
        self._install_signals()
        self._restore_mirror()
        self._start_follower()
        self._watch_files()
        self.notifier.notify("STATUS=starting: reading the directory")
        try:
            self._loop()
        finally:
            self.notifier.notify("STOPPING=1")
            if self.follower is not None:
                self.follower.stop()
            if self.observer is not None:
                self.observer.stop()
        log.info("stopped")
        return 0

    def _install_signals(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.events.put(("hup" if signum == signal.SIGHUP else "term", None))

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
        self.follower = watch.Follower(self.config, self.mirror, self._notify_from_follower)
        self.follower.start()

    def _notify_from_follower(self, what: str) -> None:
        self.events.put((what, None))

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
        last_ping = 0.0
        while True:
            now = time.monotonic()
            timeout = min(self.watchdog_interval, self._time_to_rebuild(now))
            kinds: list[str] = []
            try:
                kinds.append(self.events.get(timeout=max(0.0, timeout))[0])
                # and whatever else arrived meanwhile: one rebuild serves a whole burst
                while True:
                    kinds.append(self.events.get_nowait()[0])
            except queue.Empty:
                pass
            for kind in kinds:
                if kind == "term":
                    log.info("SIGTERM: finishing", rebuilds=self.rebuilds)
                    return
                self._handle(kind)
            now = time.monotonic()
            if self.config_due is not None and self.config_due <= now:
                self.config_due = None
                self._reload_config(resync=False)
                now = time.monotonic()
            if self._time_to_rebuild(now) <= 0:
                self._rebuild()
            if now - last_ping >= self.watchdog_interval / 2 or not kinds:
                self._ping()
                last_ping = time.monotonic()

    def _time_to_rebuild(self, now: float) -> float:
        deadlines = []
        if self.pending_since is not None:
            agent = self.config.agent
            deadlines.append(min(self.last_event + agent.debounce, self.pending_since + agent.max_delay))
        if self.retry_at is not None:
            deadlines.append(self.retry_at)
        if self.config_due is not None:
            deadlines.append(self.config_due)
        return min(deadlines) - now if deadlines else float("inf")

    def _handle(self, kind: str) -> None:
        now = time.monotonic()
        if kind == "changed":
            self.synced = True
            self.last_event = now
            if self.pending_since is None:
                self.pending_since = now
        elif kind == "synced":
            self.synced = True
            self.last_event = now - self.config.agent.debounce  # a completed refresh: no need to wait
            if self.pending_since is None:
                self.pending_since = now
        elif kind == "error":
            if not self.ready:
                self._fallback()
        elif kind == "config":
            self.config_due = now + CONFIG_SETTLE  # each write restarts the wait: one reload per edit
        elif kind == "hup":
            log.info("SIGHUP: re-reading the configuration and resyncing")
            self.config_due = None
            self._reload_config(resync=True)

    def _rebuild(self) -> None:
        if not self.synced:
            self.pending_since = None
            return
        self.pending_since = None
        self.retry_at = None
        snapshot, cookie = self.mirror.snapshot()
        started = time.monotonic()
        try:
            with self.pipeline.state.lock(wait=True):
                result = self.pipeline.run(snapshot=snapshot, force=self.force_next)
            self.force_next = False
        except ConfigError as e:
            log.error("configuration error; installed files stay, fix and save the file", error=str(e))
            return
        except (LdapsyncError, OSError) as e:
            log.error("sync failed; installed files stay; will retry", error=str(e), retry_in=RETRY_FAILED_SYNC)
            self.retry_at = time.monotonic() + RETRY_FAILED_SYNC
            self.pending_since = time.monotonic()
            return
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
                reuse = None
                if result.generation:
                    reuse = self.pipeline.state.generations_dir / result.generation / "snapshot.json"
                stored = self.pipeline.redacted(snapshot)  # no refused secret on disk
                watch.save_follow_state(self.pipeline.state, self.config, stored, cookie, reuse=reuse)
            except OSError as e:
                log.error("cannot save sync state; a restart will do a full read", error=str(e))
        self._mark_ready()
        _release_memory()

    def _fallback(self) -> None:
        """LDAP unreachable before the first sync: make sure last-known-good is installed."""
        error = self.follower.status.error if self.follower else "directory unreachable"
        with self.pipeline.state.lock(wait=True):
            result = self.pipeline.fallback(error or "directory unreachable")
        if result.status != "failed" or all(spec.path.exists() for spec in self.config.exporters):
            self._mark_ready()

    def _mark_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.notifier.notify("READY=1")
            log.info("ready")
        self._ping()

    def _reload_config(self, *, resync: bool) -> None:
        try:
            new = config_mod.load(self.config.path)
            pipeline = sync.Pipeline(new)
        except ConfigError as e:
            log.error("new configuration rejected; the running one stays in force", error=str(e))
            return
        old = self.config
        self.config, self.pipeline = new, pipeline
        self._watch_files()
        source_changed = old.source != new.source or watch.fingerprint(old) != watch.fingerprint(new)
        if resync or source_changed:
            if self.follower is not None:
                self.follower.stop()
                self.follower.join(timeout=10)
            if watch.fingerprint(old) != watch.fingerprint(new):
                self.mirror = watch.Mirror()
            else:
                self.mirror.cookie = None  # full refresh; the present phase drops what is gone
            self.synced = False
            self._start_follower()
            log.info("configuration reloaded; resyncing from the directory", source_changed=source_changed)
        else:
            log.info("configuration reloaded; re-rendering from the directory in memory")
            if self.synced:
                self.pending_since = self.last_event = time.monotonic() - self.config.agent.debounce

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
        f = self.follower.status if self.follower else None
        held = self.last_result.held_reason if self.last_result and self.last_result.status == "held" else None
        if held:
            return f"change HELD for review ({held}); serving generation {self.pipeline.state.current_id()}"
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
