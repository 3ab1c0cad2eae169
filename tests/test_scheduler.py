"""The agent's scheduler with invented timestamps: no clock, no threads, no processes."""

from __future__ import annotations

import collections
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from ldapsync import config as config_mod
from ldapsync.scheduler import (
    CONFIRM_EVERY,
    Approved,
    Changed,
    ConfigEdited,
    ConfigLoaded,
    ConfigRejected,
    Confirm,
    DayScheduled,
    Decision,
    Decline,
    Event,
    Fallback,
    FollowerDown,
    FollowerUp,
    Hangup,
    Heartbeat,
    NotifyReady,
    Refreshed,
    ReloadConfig,
    Requested,
    Resync,
    ResyncRequested,
    RolledBack,
    ScheduleDay,
    Scheduler,
    Serve,
    Stop,
    Sync,
    SyncFinished,
    Terminate,
    Tick,
    Timing,
)

T = Timing(
    debounce=0.1,
    max_delay=2.0,
    retry_initial=1.0,
    retry_max=8.0,
    heartbeat=1000.0,
    ready_within=60.0,
    confirm_every=30.0,
)


def work(decisions: list[Decision]) -> list[Decision]:
    """Decisions without the periodic watchdog heartbeat."""
    return [d for d in decisions if not isinstance(d, Heartbeat)]


def synced(timing: Timing = T, *, at: float = 0.0) -> Scheduler:
    """A scheduler past its first, successful sync, follower connected."""
    s = Scheduler(timing, now=at)
    s.handle(FollowerUp(at))
    assert work(s.handle(Refreshed(at))) == [Sync()]
    assert work(s.handle(SyncFinished(at, ok=True))) == [NotifyReady()]
    return s


# -- debounce and max_delay ---------------------------------------------------------------------
def test_a_burst_inside_the_debounce_gives_one_sync() -> None:
    s = synced()
    assert s.handle(Changed(10.0)) == []
    assert s.handle(Changed(10.05)) == []
    assert s.deadline() == pytest.approx(10.15)
    assert work(s.handle(Tick(10.149))) == []
    assert work(s.handle(Tick(10.15))) == [Sync()]
    assert work(s.handle(Tick(10.3))) == []  # nothing pending while the sync runs


def test_a_steady_stream_of_changes_is_synced_within_max_delay() -> None:
    s = synced()
    syncs = []
    t = 10.0
    while t < 15.0:
        for d in s.handle(Changed(t)):
            if isinstance(d, Sync):
                syncs.append(t)
                s.handle(SyncFinished(t, ok=True))
        t = round(t + 0.05, 2)
    assert syncs == [12.0, 14.05], "one sync per max_delay while changes keep coming"


def test_a_complete_refresh_is_synced_at_once() -> None:
    s = Scheduler(T, now=0.0)
    assert s.deadline() == T.ready_within  # nothing to do but wait for the directory
    assert work(s.handle(Refreshed(3.0))) == [Sync()]


def test_nothing_is_synced_before_the_mirror_is_complete() -> None:
    s = Scheduler(T, now=0.0)
    s.handle(ConfigEdited(0.0))
    assert work(s.handle(Tick(0.2))) == [ReloadConfig()]
    assert work(s.handle(ConfigLoaded(0.2, T))) == []


# -- failure backoff ---------------------------------------------------------------------------
def test_failed_sync_is_retried_after_the_backoff_not_in_a_loop() -> None:
    """The agent used to retry a failing sync (refusing check hook) every few milliseconds."""
    s = synced()
    s.handle(Changed(10.0))
    attempts = []
    now = 10.0
    while now < 40.0:
        now = s.deadline() or math.inf
        for d in work(s.handle(Tick(now))):
            if isinstance(d, Sync):
                attempts.append(now)
                now += 0.004  # a check hook refuses within milliseconds
                s.handle(SyncFinished(now, ok=False))
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(attempts)]
    assert gaps[:5] == [1.004, 2.004, 4.004, 8.004, 8.004], gaps  # doubling, capped at retry_max
    assert len(attempts) <= 7


def test_a_failed_sync_holds_new_changes_until_the_backoff_expires() -> None:
    s = synced()
    s.handle(Changed(0.5))
    assert work(s.handle(Tick(0.6))) == [Sync()]
    assert s.handle(SyncFinished(1.0, ok=False)) == []
    assert s.retry_at == 2.0
    assert s.handle(Changed(1.01)) == []
    assert work(s.handle(Tick(1.2))) == []
    assert work(s.handle(Tick(1.99))) == []
    assert s.deadline() == 2.0
    assert work(s.handle(Tick(2.0))) == [Sync()]


def test_backoff_resets_after_a_success() -> None:
    s = synced()
    s.handle(Refreshed(1.0))
    s.handle(SyncFinished(1.0, ok=False))
    assert work(s.handle(Tick(2.0))) == [Sync()]
    s.handle(SyncFinished(2.0, ok=False))
    assert s.retry_at == 4.0 and s.failures == 2
    assert work(s.handle(Tick(4.0))) == [Sync()]
    s.handle(SyncFinished(4.0, ok=True))
    assert (s.failures, s.retry_at) == (0, None)
    assert work(s.handle(Changed(5.0))) == []
    assert work(s.handle(Tick(5.1))) == [Sync()]
    s.handle(SyncFinished(5.1, ok=False))
    assert s.retry_at == pytest.approx(6.1), "the first failure after a success waits retry_initial again"


def test_a_held_change_is_not_a_failure() -> None:
    s = synced()
    s.handle(Refreshed(1.0))
    assert work(s.handle(SyncFinished(1.5, ok=True, held=True))) == []
    assert s.retry_at is None
    assert work(s.handle(Tick(100.0))) == [], "a held change waits for the next change or approval"


def test_a_newly_loaded_config_ends_the_backoff() -> None:
    """A config edit is usually the fix for a failing sync: try it at once."""
    s = synced()
    s.handle(Refreshed(1.0))
    for _ in range(3):
        s.handle(SyncFinished(s.deadline() or 0.0, ok=False))
        s.handle(Tick(s.deadline() or 0.0))
    assert s.failures == 3
    now = 20.0
    s.handle(SyncFinished(now, ok=False))
    s.handle(ConfigEdited(now + 0.1))
    assert work(s.handle(Tick(now + 0.3))) == [ReloadConfig()]
    assert work(s.handle(ConfigLoaded(now + 0.3, T))) == [Sync()]
    assert s.failures == 0


def test_backoff_values_and_config_keys(tmp_path: Path) -> None:
    assert [Timing(retry_initial=0.5, retry_max=3).backoff(n) for n in range(1, 6)] == [0.5, 1, 2, 3, 3]
    assert Timing().backoff(10_000) == Timing().retry_max
    path = tmp_path / "c.yaml"
    path.write_text(
        "domain: example.org\nsource: {ldif: {path: x.ldif}}\nstate_dir: st\n"
        "exporters: [{kind: postfix-virtual, path: virtual}]\n"
        "agent: {debounce: 0.3, max_delay: 4, retry_initial: 2, retry_max: 120}\n"
    )
    cfg = config_mod.load(path)
    t = Timing.of(cfg.agent, heartbeat=5.0)
    assert (t.debounce, t.max_delay, t.retry_initial, t.retry_max, t.heartbeat) == (0.3, 4.0, 2.0, 120.0, 5.0)
    path.write_text(path.read_text().replace("retry_max: 120", "retry_max: 1"))
    with pytest.raises(config_mod.ConfigError, match=r"agent\.retry_max.*>= retry_initial"):
        config_mod.load(path)


# -- readiness --------------------------------------------------------------------------------
def test_ready_after_a_successful_first_sync() -> None:
    s = Scheduler(T, now=0.0)
    assert s.readiness == "starting"
    assert work(s.handle(Refreshed(1.0))) == [Sync()]
    assert s.readiness == "starting"
    assert work(s.handle(SyncFinished(2.0, ok=True))) == [NotifyReady()]
    assert s.readiness == "ready"


def test_ready_even_if_the_first_sync_fails() -> None:
    """systemd must not kill an agent that serves the installed (last-known-good) maps."""
    s = Scheduler(T, now=0.0)
    s.handle(Refreshed(1.0))
    assert work(s.handle(SyncFinished(2.0, ok=False))) == [NotifyReady()]
    assert work(s.handle(Tick(3.0))) == [Sync()]
    assert work(s.handle(SyncFinished(3.5, ok=True))) == [], "READY only once"


def test_directory_down_before_any_sync_falls_back_then_is_ready() -> None:
    s = Scheduler(T, now=0.0)
    assert work(s.handle(FollowerDown(0.5, "connection refused"))) == [Fallback("connection refused"), NotifyReady()]
    assert work(s.handle(FollowerDown(1.5, "connection refused"))) == [], "the fallback runs once"
    assert work(s.handle(Refreshed(9.0))) == [Sync()]
    assert work(s.handle(SyncFinished(9.5, ok=True))) == []


def test_a_directory_that_never_answers_still_gets_ready() -> None:
    s = Scheduler(T, now=100.0)
    assert s.deadline() == 160.0
    assert work(s.handle(Tick(159.0))) == []
    assert work(s.handle(Tick(160.0))) == [Fallback("the directory has not answered within 60 s"), NotifyReady()]
    assert s.deadline() == 100.0 + T.heartbeat


def test_a_first_read_still_streaming_is_ready_without_a_failure() -> None:
    """A million entries take longer than the READY deadline: connected is not unreachable."""
    s = Scheduler(T, now=100.0)
    s.handle(FollowerUp(100.5))
    assert work(s.handle(Tick(160.0))) == [NotifyReady()]
    assert work(s.handle(Refreshed(230.0))) == [Sync()]
    assert work(s.handle(SyncFinished(260.0, ok=True))) == []


def test_no_fallback_once_the_mirror_is_complete() -> None:
    s = Scheduler(T, now=0.0)
    s.handle(Changed(1.0))  # the sync is due after the debounce
    assert work(s.handle(FollowerDown(1.01, "gone"))) == []
    assert work(s.handle(Tick(1.1))) == [Sync()]


# -- config edits, SIGHUP, resync ------------------------------------------------------------------
def test_config_edits_settle_then_reload_once_and_rerender() -> None:
    s = synced()
    s.handle(ConfigEdited(10.0))
    s.handle(ConfigEdited(10.1))  # the editor writes in steps: each restarts the wait
    assert s.deadline() == pytest.approx(10.3)
    assert work(s.handle(Tick(10.25))) == []
    assert work(s.handle(Tick(10.3))) == [ReloadConfig()]
    assert work(s.handle(ConfigLoaded(10.31, T))) == [Sync()], "re-rendered from the mirror at once"
    assert work(s.handle(Tick(11.0))) == []


def test_config_reload_comes_before_a_due_sync() -> None:
    s = synced()
    s.handle(Changed(10.0))
    s.handle(ConfigEdited(10.0))
    assert work(s.handle(Tick(10.5))) == [ReloadConfig()]
    assert work(s.handle(ConfigRejected(10.5))) == [Sync()]


def test_new_timing_applies_after_a_reload() -> None:
    s = synced()
    s.handle(ConfigEdited(10.0))
    s.handle(Tick(10.2))
    slow = Timing(debounce=5.0, max_delay=30.0, heartbeat=1000.0)
    s.handle(ConfigLoaded(10.2, slow))
    s.handle(SyncFinished(10.3, ok=True))
    s.handle(Changed(11.0))
    assert s.deadline() == pytest.approx(16.0)


def test_sighup_reloads_and_resyncs_even_with_a_rejected_config() -> None:
    s = synced()
    assert work(s.handle(Hangup(10.0))) == [ReloadConfig()]
    assert work(s.handle(ConfigLoaded(10.0, T))) == [Resync()]
    assert work(s.handle(Tick(20.0))) == [], "no sync until the new refresh is complete"
    assert work(s.handle(Refreshed(21.0))) == [Sync()]
    s.handle(SyncFinished(21.0, ok=True))
    assert work(s.handle(Hangup(30.0))) == [ReloadConfig()]
    assert work(s.handle(ConfigRejected(30.0))) == [Resync()]


def test_changed_search_resyncs_and_drops_what_was_pending() -> None:
    s = synced()
    s.handle(Changed(10.0))
    s.handle(ConfigEdited(10.0))
    assert work(s.handle(Tick(10.2))) == [ReloadConfig()]
    assert work(s.handle(ConfigLoaded(10.2, T, search_changed=True))) == [Resync()]
    assert work(s.handle(Tick(15.0))) == []


# -- stop ---------------------------------------------------------------------------------------
def test_terminate_wins_over_everything_pending() -> None:
    s = synced()
    s.handle(Changed(10.0))
    s.handle(ConfigEdited(10.0))
    s.handle(Hangup(10.0))
    assert s.handle(Terminate(10.01)) == [Stop()]
    assert s.deadline() is None
    for event in (Tick(12.0), Refreshed(12.0), SyncFinished(12.0, ok=False), FollowerDown(12.0, "x")):
        assert s.handle(event) == []


# -- confirmation and heartbeat ----------------------------------------------------------------
def test_quiet_connected_agent_confirms_periodically() -> None:
    s = synced(Timing(confirm_every=30.0, heartbeat=1000.0))
    assert s.deadline() == 30.0
    assert work(s.handle(Tick(30.0))) == [Confirm()]
    assert s.deadline() == 60.0
    s.handle(Changed(50.0))
    assert work(s.handle(Tick(50.1))) == [Sync()]
    assert work(s.handle(Tick(65.0))) == [], "not while a sync runs"
    s.handle(SyncFinished(66.0, ok=True))  # a successful sync is itself a confirmation
    assert s.deadline() == 96.0


@pytest.mark.parametrize(
    "spoil",
    [
        [FollowerDown(1.0, "gone")],
        [Changed(1.0)],
        [Refreshed(1.0), SyncFinished(1.0, ok=False)],
        [Refreshed(1.0), SyncFinished(1.0, ok=True, held=True)],
    ],
    ids=["disconnected", "change-pending", "last-sync-failed", "change-held"],
)
def test_no_confirmation_unless_connected_in_step_and_idle(spoil: list[Event]) -> None:
    s = synced(Timing(confirm_every=30.0, heartbeat=1000.0, retry_max=1000.0, retry_initial=1000.0))
    for event in spoil:
        s.handle(event)
    decisions = [d for t in range(2, 100) for d in s.handle(Tick(float(t)))]
    assert Confirm() not in decisions


def test_heartbeat_every_interval() -> None:
    s = Scheduler(Timing(heartbeat=5.0), now=0.0)
    assert s.deadline() == 5.0
    assert s.handle(Tick(4.9)) == []
    assert s.handle(Tick(5.0)) == [Heartbeat()]
    assert s.deadline() == 10.0


def test_force_applies_until_a_sync_succeeds() -> None:
    s = Scheduler(T, now=0.0, force_first=True)
    assert work(s.handle(Refreshed(0.0))) == [Sync(force=True)]
    s.handle(SyncFinished(0.1, ok=False))
    assert work(s.handle(Tick(1.1))) == [Sync(force=True)]
    s.handle(SyncFinished(1.2, ok=True))
    s.handle(Changed(2.0))
    assert work(s.handle(Tick(2.1))) == [Sync(force=False)]


# -- invariants over random event sequences --------------------------------------------------------
KINDS = ["changed", "changed", "changed", "refreshed", "up", "down", "edit", "hangup", "tick", "terminate"]


@dataclass
class Trace:
    """What a model of the agent's shell saw: (time, decision or delivered event)."""

    items: list[tuple[float, object]] = field(default_factory=list)
    stopped_at: float | None = None


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Timing, list[Event], list[tuple[float, bool, bool]], list[bool]]:
    debounce = draw(st.sampled_from([0.0, 0.05, 0.1, 0.5]))
    timing = Timing(
        debounce=debounce,
        max_delay=draw(st.sampled_from([0.2, 1.0, 2.0])),
        retry_initial=draw(st.sampled_from([0.5, 1.0, 3.0])),
        retry_max=draw(st.sampled_from([3.0, 10.0])),
        heartbeat=draw(st.sampled_from([1.0, 10.0])),
        confirm_every=draw(st.sampled_from([2.0, 30.0])),
        ready_within=draw(st.sampled_from([5.0, 60.0])),
    )
    events: list[Event] = []
    t = 0.0
    for _ in range(draw(st.integers(1, 40))):
        t += draw(st.sampled_from([0.0, 0.01, 0.04, 0.09, 0.3, 1.0, 2.5, 7.0]))
        kind = draw(st.sampled_from(KINDS[:-1] if len(events) < 3 else KINDS))
        events.append(
            {
                "changed": Changed(t),
                "refreshed": Refreshed(t),
                "up": FollowerUp(t),
                "down": FollowerDown(t, "gone"),
                "edit": ConfigEdited(t),
                "hangup": Hangup(t),
                "tick": Tick(t),
                "terminate": Terminate(t),
            }[kind]
        )
    outcomes = draw(
        st.lists(
            st.tuples(st.sampled_from([0.0, 0.01, 0.5, 3.0]), st.booleans(), st.booleans()), min_size=1, max_size=30
        )
    )
    search_changes = draw(st.lists(st.booleans(), min_size=1, max_size=10))
    return timing, events, outcomes, search_changes


def shell(
    timing: Timing, events: list[Event], outcomes: list[tuple[float, bool, bool]], search_changes: list[bool]
) -> tuple[Scheduler, Trace]:
    """The agent's loop with a fake clock: wait for the deadline or the next event, feed, execute.

    A sync takes its drawn duration; events that arrive meanwhile are delivered after it,
    with their own timestamps, as the real queue does.
    """
    s = Scheduler(timing, now=0.0)
    trace = Trace()
    now, i, n_sync, n_reload = 0.0, 0, 0, 0
    horizon = (events[-1].at if events else 0.0) + 30.0
    while now < horizon:
        dl = s.deadline()
        assert dl is not None
        wake = max(now, dl)
        if i < len(events) and events[i].at <= wake:
            wake = max(now, events[i].at)
        now = wake
        decisions: list[Decision] = []
        while i < len(events) and events[i].at <= now:
            trace.items.append((now, events[i]))
            decisions += s.handle(events[i])
            i += 1
        decisions += s.handle(Tick(now))
        if Stop() in decisions:
            trace.stopped_at = now
            break
        queue = collections.deque(decisions)
        while queue:
            d = queue.popleft()
            trace.items.append((now, d))
            if isinstance(d, Sync):
                duration, ok, held = outcomes[n_sync % len(outcomes)]
                n_sync += 1
                now += duration
                done = SyncFinished(now, ok=ok, held=held and ok)
                trace.items.append((now, done))
                queue.extendleft(reversed(s.handle(done)))
            elif isinstance(d, ReloadConfig):
                loaded = ConfigLoaded(now, timing, search_changed=search_changes[n_reload % len(search_changes)])
                n_reload += 1
                trace.items.append((now, loaded))
                queue.extendleft(reversed(s.handle(loaded)))
    # whatever was not delivered before Stop gets no decision either
    for event in events[i:]:
        assert s.handle(event) == []
    return s, trace


@settings(max_examples=examples(200), deadline=None)
@given(scenarios())
def test_invariants(scenario: tuple[Timing, list[Event], list[tuple[float, bool, bool]], list[bool]]) -> None:
    timing, events, outcomes, search_changes = scenario
    s, trace = shell(timing, events, outcomes, search_changes)
    items = trace.items
    eps = 1e-9

    # no sync sooner than the backoff after a failure (a newly loaded config ends the backoff);
    # the backoff doubles per consecutive failure and resets after a success
    failures = 0
    not_before = -math.inf
    for t, item in items:
        if isinstance(item, SyncFinished):
            if item.ok:
                failures, not_before = 0, -math.inf
            else:
                failures += 1
                not_before = item.at + timing.backoff(failures)
        elif isinstance(item, ConfigLoaded):
            failures, not_before = 0, -math.inf
        elif isinstance(item, Sync):
            assert t >= not_before - eps, f"sync at {t} during the backoff until {not_before}"

    # a change on a healthy agent (no failure outstanding) is synced within max_delay of its
    # arrival, or at once if it was delivered late because a sync was running
    healthy = True
    for k, (t, item) in enumerate(items):
        if isinstance(item, SyncFinished):
            healthy = item.ok
        elif isinstance(item, ConfigLoaded):
            healthy = True
        if not (isinstance(item, Changed | Refreshed) and healthy):
            continue
        bound = max(t, item.at + timing.max_delay)
        if trace.stopped_at is not None and trace.stopped_at <= bound + eps:
            continue
        later = [(u, x) for u, x in items[k + 1 :] if u <= bound + eps]
        if any(isinstance(x, Resync) for _, x in later):
            continue  # a full resync replaces what was pending
        assert any(isinstance(x, Sync) for _, x in later), f"change at {item.at} not synced by {bound}"

    # READY exactly once: right after the first attempt (a finished sync or a fallback), or at
    # the READY deadline while the follower is connected (a first read still streaming)
    ready = [k for k, (_, x) in enumerate(items) if isinstance(x, NotifyReady)]
    attempts = [k for k, (_, x) in enumerate(items) if isinstance(x, SyncFinished | Fallback)]
    assert len(ready) <= 1
    if ready and (not attempts or ready[0] < attempts[0]):
        at = items[ready[0]][0]
        assert at >= timing.ready_within - eps, f"READY at {at} before the deadline and before any attempt"
        follower = [x for _, x in items[: ready[0]] if isinstance(x, FollowerUp | FollowerDown)]
        assert follower and isinstance(follower[-1], FollowerUp), "READY before an attempt needs a connected follower"
    elif attempts:
        assert ready, "an attempt was made but READY never sent"
        first = attempts[0]
        assert ready[0] > first
        assert all(isinstance(x, Fallback | SyncFinished | NotifyReady) for _, x in items[first : ready[0] + 1])
    else:
        assert not ready

    # stop always wins: nothing is decided after Terminate
    if trace.stopped_at is not None:
        assert s.deadline() is None
        assert s.handle(Tick(trace.stopped_at + 100)) == []
        assert s.handle(Refreshed(trace.stopped_at + 100)) == []


@settings(max_examples=examples(200), deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=0.099), min_size=1, max_size=30),
    st.sampled_from([0.1, 0.5]),
)
def test_a_burst_with_gaps_under_the_debounce_gives_one_sync(gaps: list[float], debounce: float) -> None:
    timing = Timing(debounce=debounce, max_delay=100.0, heartbeat=1000.0)
    s = synced(timing)
    t, syncs = 10.0, 0
    for gap in gaps:
        t += gap
        syncs += work(s.handle(Tick(t))).count(Sync())
        syncs += work(s.handle(Changed(t))).count(Sync())
    assert syncs == 0
    assert s.deadline() == pytest.approx(t + debounce)
    assert work(s.handle(Tick(t + debounce))) == [Sync()]


# -- the day boundary ----------------------------------------------------------------------------
def test_a_quiet_agent_rebuilds_when_the_day_changes() -> None:
    """Date-based rules (retiring <date>) apply at midnight without any directory change."""
    s = synced(Timing(confirm_every=1e6, heartbeat=1e6))
    s.handle(DayScheduled(1.0, rollover=500.0))
    assert s.deadline() == 500.0
    assert work(s.handle(Tick(499.9))) == []
    assert work(s.handle(Tick(500.0))) == [ScheduleDay(), Sync()]
    s.handle(SyncFinished(500.5, ok=True))
    assert work(s.handle(Tick(1000.0))) == [], "one rebuild per day, until the shell names the next"
    s.handle(DayScheduled(1000.0, rollover=86900.0))
    assert s.deadline() == 86900.0


def test_the_day_boundary_waits_for_a_complete_mirror() -> None:
    s = Scheduler(T, now=0.0)
    s.handle(DayScheduled(0.0, rollover=5.0))
    assert work(s.handle(Tick(5.0))) == [ScheduleDay()], "nothing to rebuild before the first refresh"
    s.handle(FollowerUp(6.0))
    assert work(s.handle(Refreshed(6.0))) == [Sync()]


# -- operators' requests -------------------------------------------------------------------------
def test_a_request_is_served_at_once_between_syncs() -> None:
    s = synced()
    assert work(s.handle(Requested(5.0, request=1))) == [Serve(1)]


def test_a_request_during_a_sync_waits_for_it_to_finish() -> None:
    s = synced()
    s.handle(Changed(5.0))
    assert work(s.handle(Tick(5.1))) == [Sync()]
    assert work(s.handle(Requested(5.2, request=7))) == []
    assert work(s.handle(Requested(5.3, request=8))) == []
    assert work(s.handle(SyncFinished(6.0, ok=True))) == [Serve(7), Serve(8)]


def test_requests_not_served_are_declined_at_stop() -> None:
    s = synced()
    s.handle(Changed(5.0))
    s.handle(Tick(5.1))
    s.handle(Requested(5.2, request=3))
    assert s.handle(Terminate(5.3)) == [Decline(3), Stop()]


def test_an_approved_change_is_in_step_and_a_later_change_is_synced_as_usual() -> None:
    s = synced(Timing(debounce=0.1, confirm_every=10.0, heartbeat=1000.0))
    s.handle(Changed(1.0))
    s.handle(Tick(1.1))
    s.handle(SyncFinished(1.2, ok=True, held=True))
    assert work(s.handle(Approved(3.0, ok=True))) == []
    assert work(s.handle(Tick(13.0))) == [Confirm()], "the approved install is the mirror: confirmed"
    s.handle(Changed(14.0))
    assert work(s.handle(Tick(14.1))) == [Sync()]


def test_a_rollback_is_not_confirmed_and_a_resync_request_restarts_the_follower() -> None:
    s = synced()
    s.handle(RolledBack(1.0))
    decisions = [d for t in range(2, 100) for d in s.handle(Tick(float(t)))]
    assert Confirm() not in decisions
    assert work(s.handle(ResyncRequested(100.0))) == [Resync()]


def test_a_quiet_agent_confirms_well_within_the_smallest_warning_age() -> None:
    """`check --max-age 60` warns at 30 s: a healthy agent confirms more often than that."""
    assert CONFIRM_EVERY <= 10.0
    s = synced(Timing(heartbeat=1000.0))
    confirms = [t for t in range(1, 600) if Confirm() in s.handle(Tick(float(t)))]
    gaps = [b - a for a, b in itertools.pairwise([0, *confirms])]
    assert confirms and max(gaps) <= CONFIRM_EVERY


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["request", "change", "tick", "finish", "terminate"]), st.floats(0.0, 0.5)),
        max_size=60,
    )
)
def test_every_request_is_served_once_between_syncs_or_declined(steps: list[tuple[str, float]]) -> None:
    s = synced()
    t, next_id = 1.0, 0
    syncing = False
    served: list[int] = []
    asked: list[int] = []

    def take(decisions: list[Decision]) -> None:
        nonlocal syncing
        for d in decisions:
            if isinstance(d, Sync):
                syncing = True
            elif isinstance(d, Serve | Decline):
                assert not (isinstance(d, Serve) and syncing), "a request served beside a sync"
                served.append(d.request)

    for kind, gap in steps:
        t += gap
        if kind == "request":
            next_id += 1
            asked.append(next_id)
            take(s.handle(Requested(t, next_id)))
        elif kind == "change":
            take(s.handle(Changed(t)))
        elif kind == "finish" and syncing:
            syncing = False
            take(s.handle(SyncFinished(t, ok=True)))
        elif kind == "terminate":
            take(s.handle(Terminate(t)))
            break
        take(s.handle(Tick(t)))
    else:
        if syncing:
            syncing = False
            take(s.handle(SyncFinished(t, ok=True)))
        take(s.handle(Terminate(t + 1)))
    assert sorted(served) == asked, "each request answered exactly once"
