"""When the agent syncs, reloads, confirms and stops: a sans-I/O state machine.

The agent's shell feeds timestamped events (a change arrived, the follower connected or
lost the directory, a sync finished, the config file was written, a signal) and carries
out the decisions that come back; `deadline()` says when to call again with a Tick. There
is no clock, thread or I/O here, so every timing rule (debounce, max_delay, the failure
backoff, the config settle time, readiness, stop) is tested with invented timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ldapsync.config import Agent as AgentConfig

CONFIG_SETTLE = 0.2  # quiet time after a config/static edit before it is read (editors write in steps)
CONFIRM_EVERY = 10.0  # how often a quiet, connected agent records "installed outputs match LDAP": well
# under the smallest useful warning age of `ldapsync check` (half of its minimum --max-age)
READY_WITHIN = 60.0  # READY by then whatever the directory does (systemd's start timeout); a
# directory that has not answered is a failure (last-known-good), one still streaming a large
# first read is not


@dataclass(frozen=True, slots=True)
class Timing:
    """Every interval the scheduler uses, in seconds."""

    debounce: float = 0.1
    max_delay: float = 2.0
    retry_initial: float = 1.0
    retry_max: float = 60.0
    settle: float = CONFIG_SETTLE
    confirm_every: float = CONFIRM_EVERY
    heartbeat: float = 10.0
    ready_within: float = READY_WITHIN

    @classmethod
    def of(cls, agent: AgentConfig, *, heartbeat: float = 10.0) -> Timing:
        return cls(
            debounce=agent.debounce,
            max_delay=agent.max_delay,
            retry_initial=agent.retry_initial,
            retry_max=agent.retry_max,
            heartbeat=heartbeat,
        )

    def backoff(self, failures: int) -> float:
        """Wait before retry number `failures` (1, 2, ...): doubling from retry_initial, capped."""
        return min(self.retry_max, self.retry_initial * 2.0 ** min(failures - 1, 64))


# -- events ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Changed:
    """The follower applied a change to the mirror (the mirror is complete)."""

    at: float


@dataclass(frozen=True, slots=True)
class Refreshed:
    """A complete refresh arrived: the mirror is the directory now, no reason to wait."""

    at: float


@dataclass(frozen=True, slots=True)
class FollowerUp:
    at: float


@dataclass(frozen=True, slots=True)
class FollowerDown:
    at: float
    error: str


@dataclass(frozen=True, slots=True)
class SyncFinished:
    """ok=False: the sync failed (hook, postmap, disk, config); held: a guard held the change."""

    at: float
    ok: bool
    held: bool = False


@dataclass(frozen=True, slots=True)
class ConfigEdited:
    at: float


@dataclass(frozen=True, slots=True)
class ConfigLoaded:
    """The shell loaded the new config; search_changed: the mirror is for another search."""

    at: float
    timing: Timing
    search_changed: bool = False


@dataclass(frozen=True, slots=True)
class ConfigRejected:
    """The new config did not load; the running one stays."""

    at: float


@dataclass(frozen=True, slots=True)
class Hangup:
    at: float


@dataclass(frozen=True, slots=True)
class Terminate:
    at: float


@dataclass(frozen=True, slots=True)
class Tick:
    at: float


@dataclass(frozen=True, slots=True)
class DayScheduled:
    """The shell's calendar: the next day (the date the model calls "today") starts at `rollover`.

    Date-based rules (an account retired from a date on) change with the day even when the
    directory does not: at `rollover` the mirror is rebuilt, and ScheduleDay asks for the next.
    """

    at: float
    rollover: float


@dataclass(frozen=True, slots=True)
class Requested:
    """An operator's request over the control socket (approve, rollback, resync, status)."""

    at: float
    request: int  # the shell's handle for it


@dataclass(frozen=True, slots=True)
class Approved:
    """The shell installed a held change as an operator asked; ok=False: that install failed."""

    at: float
    ok: bool


@dataclass(frozen=True, slots=True)
class RolledBack:
    """The shell reinstalled an earlier generation: what is installed is not the directory's answer."""

    at: float


@dataclass(frozen=True, slots=True)
class ResyncRequested:
    """An operator asked for a full refresh from the directory."""

    at: float


Event = (
    Changed
    | Refreshed
    | FollowerUp
    | FollowerDown
    | SyncFinished
    | ConfigEdited
    | ConfigLoaded
    | ConfigRejected
    | Hangup
    | Terminate
    | Tick
    | DayScheduled
    | Requested
    | Approved
    | RolledBack
    | ResyncRequested
)


# -- decisions ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sync:
    """Render the mirror and install it; answer with SyncFinished."""

    force: bool = False


@dataclass(frozen=True, slots=True)
class Fallback:
    """No sync yet and the directory is away: make sure last-known-good is installed."""

    error: str


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    """Read the config files; answer with ConfigLoaded or ConfigRejected."""


@dataclass(frozen=True, slots=True)
class Resync:
    """Restart the follower with a full refresh (the mirror waits for it)."""


@dataclass(frozen=True, slots=True)
class Confirm:
    """Record that the installed outputs match LDAP now (connected, nothing pending)."""


@dataclass(frozen=True, slots=True)
class NotifyReady:
    """Tell systemd READY=1: sent once, after the first attempt, whatever its result."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Ping the systemd watchdog and refresh the STATUS line."""


@dataclass(frozen=True, slots=True)
class ScheduleDay:
    """Tell me when the next day starts (answer with DayScheduled)."""


@dataclass(frozen=True, slots=True)
class Serve:
    """Carry out an operator's request now: no sync runs (answer approve with Approved, ...)."""

    request: int


@dataclass(frozen=True, slots=True)
class Decline:
    """Answer an operator's request with "the agent is stopping": it was not carried out."""

    request: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Exit: nothing else is decided after this."""


Decision = (
    Sync | Fallback | ReloadConfig | Resync | Confirm | NotifyReady | Heartbeat | ScheduleDay | Serve | Decline | Stop
)


class Scheduler:
    """The agent's timing rules as a pure state machine.

    A change is synced `debounce` after the last one of a burst, and never later than
    `max_delay` after the first, unless a sync is running or a failure's backoff holds it:
    after a failed sync nothing is synced before the backoff (doubling from
    `retry_initial`, capped at `retry_max`) expires; the failed sync is retried then even
    without a new change. A success or a newly loaded config resets the backoff.
    """

    def __init__(self, timing: Timing, *, now: float, force_first: bool = False):
        self.timing = timing
        self._started = now
        self._stopped = False
        self._synced = False  # the mirror holds a complete directory
        self._dirty_since: float | None = None  # first change not yet synced
        self._last_change = now
        self._syncing = False
        self._force = force_first
        self._failures = 0
        self._retry_at: float | None = None
        self._config_due: float | None = None
        self._resync_after_reload = False
        self._connected = False
        self._attempted = False  # a sync or a fallback has run
        self._ready = False
        self._in_step = False  # the last sync succeeded and installed what the mirror holds
        self._last_confirm: float | None = None
        self._next_heartbeat = now + timing.heartbeat
        self._day_at: float | None = None  # when the next day starts (None: not known yet)
        self._requests: list[int] = []  # operators' requests waiting for the running sync

    # -- what the shell may read -------------------------------------------------------------
    @property
    def readiness(self) -> str:
        return "ready" if self._ready else "starting"

    @property
    def failures(self) -> int:
        """Consecutive failed syncs (0 after a success)."""
        return self._failures

    @property
    def retry_at(self) -> float | None:
        """When a failed sync is retried, or None."""
        return self._retry_at

    @property
    def connected(self) -> bool:
        return self._connected

    # -- the state machine -----------------------------------------------------------------
    def handle(self, event: Event) -> list[Decision]:
        """Apply one event; the decisions to carry out now, in order."""
        if self._stopped:
            return []
        at = event.at
        out: list[Decision] = []
        match event:
            case Terminate():
                self._stopped = True
                declined: list[Decision] = [Decline(r) for r in self._requests]
                self._requests = []
                return [*declined, Stop()]
            case Changed():
                self._synced = True
                self._mark_dirty(at, at)
            case Refreshed():
                self._synced = True
                self._mark_dirty(at, at - self.timing.debounce)
            case FollowerUp():
                self._connected = True
            case FollowerDown(error=error):
                self._connected = False
                if not self._attempted and not self._syncing and not self._synced:
                    out += self._fallback(error)
            case SyncFinished(ok=ok, held=held):
                self._syncing = False
                if ok:
                    self._failures, self._retry_at = 0, None
                    self._force = False
                    self._in_step = not held
                    if self._in_step:
                        self._last_confirm = at
                else:
                    self._failures += 1
                    self._retry_at = at + self.timing.backoff(self._failures)
                    self._in_step = False
                    if self._synced and self._dirty_since is None:
                        self._dirty_since = at  # retried when the backoff expires, change or not
                out += self._attempt_done()
            case ConfigEdited():
                self._config_due = at + self.timing.settle  # each write restarts the wait
            case Hangup():
                self._config_due = None
                self._resync_after_reload = True
                out.append(ReloadConfig())
            case ConfigLoaded(timing=timing, search_changed=search_changed):
                self.timing = timing
                self._failures, self._retry_at = 0, None  # a new config deserves a prompt try
                if self._resync_after_reload or search_changed:
                    out += self._resync()
                elif self._synced:
                    self._mark_dirty(at, at - self.timing.debounce)
            case ConfigRejected():
                if self._resync_after_reload:
                    out += self._resync()
            case DayScheduled(rollover=rollover):
                self._day_at = rollover
            case Requested(request=request):
                self._requests.append(request)
            case Approved(ok=ok):
                # The held snapshot was the mirror when it was held; a change since then made the
                # mirror dirty and is synced as usual (guarded again), so nothing more to do here.
                if ok:
                    self._failures, self._retry_at = 0, None
                    self._force = False
                    self._in_step = True
                    self._last_confirm = at
                out += self._attempt_done()
            case RolledBack():
                self._in_step = False  # an earlier generation is installed: nothing to confirm
            case ResyncRequested():
                out += self._resync()
            case Tick():
                pass
        return out + self._due(at)

    def deadline(self) -> float | None:
        """When handle(Tick(...)) must be called next, or None for "only on an event"."""
        if self._stopped:
            return None
        times = [self._next_heartbeat]
        if self._config_due is not None:
            times.append(self._config_due)
        due = self._sync_due()
        if due is not None:
            times.append(due)
        if self._awaiting_first():
            times.append(self._started + self.timing.ready_within)
        confirm = self._confirm_due()
        if confirm is not None:
            times.append(confirm)
        if self._day_at is not None:
            times.append(self._day_at)
        if self._requests and not self._syncing:
            times.append(self._started)  # now
        return min(times)

    # -- internals ---------------------------------------------------------------------------
    def _mark_dirty(self, at: float, last_change: float) -> None:
        if self._dirty_since is None:
            self._dirty_since = at
        self._last_change = last_change

    def _sync_due(self) -> float | None:
        if not self._synced or self._dirty_since is None or self._syncing:
            return None
        due = min(self._last_change + self.timing.debounce, self._dirty_since + self.timing.max_delay)
        return due if self._retry_at is None else max(due, self._retry_at)

    def _confirm_due(self) -> float | None:
        if not (self._in_step and self._connected and self._synced) or self._syncing or self._dirty_since is not None:
            return None
        return self._started if self._last_confirm is None else self._last_confirm + self.timing.confirm_every

    def _awaiting_first(self) -> bool:
        """Nothing attempted and nothing about to be: the mirror is not complete yet."""
        return not self._attempted and not self._syncing and not self._synced

    def _fallback(self, error: str) -> list[Decision]:
        return [Fallback(error), *self._attempt_done()]

    def _attempt_done(self) -> list[Decision]:
        self._attempted = True
        if self._ready:
            return []
        self._ready = True
        return [NotifyReady()]

    def _resync(self) -> list[Decision]:
        self._resync_after_reload = False
        self._synced = False
        self._dirty_since = None
        self._in_step = False
        return [Resync()]

    def _due(self, at: float) -> list[Decision]:
        out: list[Decision] = []
        if not self._syncing:  # between syncs, never beside one
            out += [Serve(r) for r in self._requests]
            self._requests = []
        if self._day_at is not None and at >= self._day_at:
            self._day_at = None
            out.append(ScheduleDay())
            if self._synced:  # rebuild: the model's "today" moved on
                self._mark_dirty(at, at - self.timing.debounce)
        if self._config_due is not None and at >= self._config_due:
            self._config_due = None
            out.append(ReloadConfig())  # the sync that follows uses the new config
        else:
            due = self._sync_due()
            if due is not None and at >= due:
                self._dirty_since = None
                self._syncing = True
                out.append(Sync(force=self._force))
        if self._awaiting_first() and at >= self._started + self.timing.ready_within:
            if self._connected:  # answering, still streaming a large first read: not a failure
                out += self._attempt_done()
            else:
                out += self._fallback(f"the directory has not answered within {self.timing.ready_within:g} s")
        confirm = self._confirm_due()
        if confirm is not None and at >= confirm:
            self._last_confirm = at
            out.append(Confirm())
        if at >= self._next_heartbeat:
            self._next_heartbeat = at + self.timing.heartbeat
            out.append(Heartbeat())
        return out
