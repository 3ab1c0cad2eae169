"""The safety guards: bursts and slow drips of deletions and changed values are held.

The rules are pure (ldapsync.guard, fake clock); the sync-level tests drive the real CLI on
an LDIF source, as cron or systemd would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples
from slapd import generate_users_ldif, generated_user_hash, ssha

from ldapsync import config as config_mod
from ldapsync import guard
from ldapsync.config import Safety
from ldapsync.errors import ConfigError
from ldapsync.exporters.dovecot import PasswdExporter
from ldapsync.exporters.postfix import AccessExporter, RecipientsExporter, TransportExporter, VirtualExporter
from ldapsync.guard import Delta, Window

REPO = Path(__file__).resolve().parent.parent
BASE_LDIF = REPO / "fixtures" / "ldif" / "base.ldif"
HOUR = 3600.0
EXIT_HELD = 4


def table(n: int, value: str = "v") -> dict[str, str]:
    return {f"user{i:06d}": value for i in range(n)}


def drip(
    safety: Safety, size: int, per_sync: int, every: float, *, changed: bool = False, syncs: int = 1000
) -> tuple[int, str | None]:
    """Install `per_sync` deletions (or changes) every `every` seconds until held.

    Returns (how many were installed, the reason of the hold or None).
    """
    window, now, installed = Window(), 1_000_000.0, 0
    for _ in range(syncs):
        if not changed and size - installed < per_sync:
            return installed, None
        d = Delta("passwd", size - (0 if changed else installed), *((0, per_sync) if changed else (per_sync, 0)))
        reason = guard.check([d], window, safety, now, accounts=size, entries=size)
        if reason:
            return installed, reason
        window = window.record([d], now, safety.window)
        installed += per_sync
        now += every
    return installed, None


# -- the rules, pure -------------------------------------------------------------------------------
def test_delta_counts_deleted_added_and_changed_keys() -> None:
    old = {"a": "1", "b": "2", "c": "3"}
    new = {"a": "1", "b": "9", "d": "4", "e": "5"}
    assert guard.delta("x", old, new, values=True) == Delta("x", 3, deleted=1, changed=1, added=2)
    assert guard.delta("x", old, new, values=False) == Delta("x", 3, deleted=1, changed=0, added=2)


@pytest.mark.parametrize(
    ("safety", "delta", "reason"),
    [
        (
            Safety(),
            Delta("alias", 5000, deleted=501),
            "alias: 501 of 5000 entries would be deleted (max_deletions 500)",
        ),
        (
            Safety(max_deletions=10_000),
            Delta("alias", 100, deleted=21),
            "alias: 21 of 100 entries (21%) would be deleted (max_deletion_ratio 0.2)",
        ),
        (
            Safety(),
            Delta("dovecot-passwd", 225, changed=225),
            "dovecot-passwd: 225 of 225 values (100%) would change (max_change_ratio 0.2)",
        ),
        (
            Safety(max_change_ratio=1.0),
            Delta("dovecot-passwd", 50_000, changed=1001),
            "dovecot-passwd: 1001 of 50000 values would change (max_changes 1000)",
        ),
    ],
)
def test_a_burst_is_held_with_a_reason_naming_the_limit(safety: Safety, delta: Delta, reason: str) -> None:
    assert guard.check([delta], Window(), safety, 0.0, accounts=1, entries=1) == reason


def test_small_changes_and_new_outputs_pass() -> None:
    safety = Safety()
    few = [Delta("a", 5, deleted=2), Delta("b", 5, changed=4), Delta("c", 0, added=10_000)]
    assert guard.check(few, Window(), safety, 0.0, accounts=5, entries=5) is None
    assert guard.check(few, Window(), safety, 0.0, accounts=0, entries=3) == (
        "the directory returned no mail accounts (3 entries)"
    )
    assert guard.check(few, Window(), Safety(allow_empty=True), 0.0, accounts=0, entries=3) is None


def test_slow_drip_of_deletions_is_held_within_the_window() -> None:
    # 3,000 of 5,000 users deleted at 100 per second: each sync alone is harmless.
    installed, reason = drip(Safety(), 5000, per_sync=100, every=1.0)
    assert installed == 500, "the window must stop the drip at max_deletions"
    assert reason == (
        "passwd: 600 of 5000 entries would be deleted within 6h "
        "(100 in this sync; max_deletions 500 over safety.window)"
    )
    # the ratio limit over the window, against the size at the window's start
    installed, reason = drip(Safety(max_deletions=100_000), 5000, per_sync=100, every=60.0)
    assert installed == 1000
    assert reason is not None and "1100 of 5000 entries (22%) would be deleted within 6h" in reason
    assert "max_deletion_ratio 0.2 over safety.window" in reason


def test_slow_drip_of_changed_values_is_held_within_the_window() -> None:
    installed, reason = drip(Safety(), 225, per_sync=20, every=600.0, changed=True)
    assert installed == 40  # 40 of 225 is 18%; the third sync would make it 27%
    assert reason is not None and "60 of 225 values (27%) would change within 6h" in reason


def test_a_drip_slower_than_the_window_passes() -> None:
    # 100 deletions every 2 hours for 40 hours: at most 4 syncs (400 of 3,000 or more) in 6 hours
    installed, reason = drip(Safety(), 5000, per_sync=100, every=2 * HOUR, syncs=20)
    assert (installed, reason) == (2000, None)


def test_window_zero_checks_each_sync_alone() -> None:
    installed, reason = drip(Safety(window=0), 5000, per_sync=100, every=1.0, syncs=30)
    assert (installed, reason) == (3000, None), "without a window, the drip of the burst test passes"


def test_the_window_base_is_the_larger_of_start_and_current_size() -> None:
    safety = Safety()
    # a fresh output filled by additions: 30 deletions of 5,000 is normal business
    w = Window().record([Delta("a", 0, deleted=0, added=5000)], 0.0, safety.window)
    w = w.record([Delta("a", 5000, deleted=5)], 1.0, safety.window)
    assert guard.check([Delta("a", 4995, deleted=30)], w, safety, 2.0, accounts=1, entries=1) is None


def test_a_sync_that_deletes_nothing_is_not_held_by_earlier_installs() -> None:
    w = Window().record([Delta("a", 1000, deleted=400, changed=400)], 0.0, HOUR)
    stricter = Safety(max_deletions=10, max_changes=10, window=HOUR)
    assert guard.check([Delta("a", 600, added=3)], w, stricter, 1.0, accounts=1, entries=1) is None
    assert guard.check([Delta("a", 600, deleted=1)], w, stricter, 1.0, accounts=1, entries=1) is not None
    assert guard.check([Delta("a", 600, deleted=1)], w, stricter, HOUR + 1, accounts=1, entries=1) is None


def test_window_is_bounded_and_round_trips_through_json() -> None:
    w, now = Window(), 0.0
    for _ in range(10_000):  # an agent installing one deletion every 0.1 s for 1000 s
        w = w.record([Delta("a", 100_000, deleted=1), Delta("b", 5, added=1)], now, HOUR)
        now += 0.1
    events = w.events["a"]
    assert len(events) <= guard.BUCKETS + 1
    assert sum(e.deleted for e in events) == 10_000
    assert "b" not in w.events, "additions are not recorded"
    assert Window.from_json(w.to_json()) == w
    for bad in (
        b"[]",
        b'{"version": 3, "outputs": {}}',
        b'{"version": 1, "outputs": {"a": [[1, 2, 3]]}}',
        b'{"version": 2, "outputs": {"a": [[1, 2, 3, 4]]}}',
    ):
        with pytest.raises(ValueError):
            Window.from_json(bad)
    # the window an older version wrote still counts
    old = Window.from_json(b'{"version": 1, "outputs": {"a": [[10.0, 1000, 400, 0]]}}')
    assert old.events["a"][0].top == 1000
    loose = Safety(max_deletion_ratio=1.0, window=HOUR)
    reason = guard.check([Delta("a", 600, deleted=200)], old, loose, 11.0, accounts=1, entries=1)
    assert reason is not None and "600 of 1000 entries" in reason


def test_a_long_run_of_close_installs_does_not_stay_in_one_bucket_forever() -> None:
    # one deletion every 30 s (closer than window/BUCKETS) for 7 hours: at most the last
    # 6 h (720 deletions) plus one bucket may count, not all 840
    safety = Safety(max_deletions=100_000, max_deletion_ratio=1.0)
    w, now = Window(), 0.0
    for _ in range(840):
        w = w.record([Delta("a", 100_000, deleted=1)], now, safety.window)
        now += 30.0
    counted = sum(e.deleted for e in w.recent("a", now, safety.window))
    assert 720 <= counted <= 720 + safety.window / guard.BUCKETS / 30 + 1


@settings(max_examples=examples(200), deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=4 * HOUR), st.integers(min_value=0, max_value=300)), max_size=60
    )
)
def test_installed_deletions_in_any_window_never_exceed_max_deletions(syncs: list[tuple[float, int]]) -> None:
    safety = Safety(max_deletions=500, max_deletion_ratio=1.0, window=HOUR)
    window, now, installed, size = Window(), 0.0, [], 1_000_000
    for gap, deleted in syncs:
        now += gap
        d = Delta("a", size, deleted=deleted)
        if guard.check([d], window, safety, now, accounts=1, entries=1) is None:
            window = window.record([d], now, safety.window)
            installed.append((now, deleted))
            size -= deleted
    for t, _ in installed:
        assert sum(n for u, n in installed if t - HOUR < u <= t) <= safety.max_deletions


def flap(safety: Safety, keys: int, cycles: int, every: float) -> list[str]:
    """Disable every key of a `keys`-key output, then re-enable them, `cycles` times.

    Returns the reasons of the syncs that were held (a held sync installs nothing).
    """
    window, now, size, held = Window(), 1_000_000.0, keys, []
    for _ in range(cycles):
        for d in (Delta("access", size, deleted=keys), Delta("access", 0, added=keys)):
            reason = guard.check([d], window, safety, now, accounts=keys, entries=keys)
            if reason:
                held.append(reason)
            else:
                window = window.record([d], now, safety.window)
                size = d.size - d.deleted + d.added
            now += every
    return held


def test_keys_that_flap_are_netted_out_of_the_window() -> None:
    # two accounts disabled and re-enabled six times in six hours: at most 2 of 2 are gone at once
    assert flap(Safety(max_deletion_ratio=1.0), keys=2, cycles=6, every=HOUR / 2) == []
    # the same with 200 keys: each sync loses 200 of 200 (the burst check holds it; the window
    # does not make it worse: never "1200 of 200")
    held = flap(Safety(max_deletion_ratio=1.0, max_deletions=150), keys=200, cycles=3, every=HOUR)
    assert held == ["access: 200 of 200 entries would be deleted (max_deletions 150)"] * 3
    # with the ratio switched off and room for one cycle, flapping is never held
    assert flap(Safety(max_deletion_ratio=1.0, max_deletions=200), keys=200, cycles=6, every=HOUR / 2) == []


def test_the_net_loss_is_measured_from_the_windows_largest_size() -> None:
    safety = Safety(max_deletions=100, max_deletion_ratio=1.0, window=HOUR)
    w = Window().record([Delta("a", 1000, deleted=80)], 0.0, HOUR)  # 1000 -> 920
    w = w.record([Delta("a", 920, added=80)], 600.0, HOUR)  # additions alone: 1000 again
    # from 1000 (after the re-adds) to 920: 80 net, although 160 were deleted in the hour
    assert guard.check([Delta("a", 1000, deleted=80)], w, safety, 1200.0, accounts=1, entries=1) is None
    w = w.record([Delta("a", 1000, deleted=80)], 1200.0, HOUR)  # 920
    # 30 more from 920: 110 net below the 1000 of the window -> held
    assert guard.check([Delta("a", 920, deleted=30)], w, safety, 1800.0, accounts=1, entries=1) == (
        "a: 110 of 1000 entries would be deleted within 1h (30 in this sync; max_deletions 100 over safety.window)"
    )
    # new keys in the same sync offset its deletions (the burst check still counts them)
    assert guard.check([Delta("a", 920, deleted=30, added=30)], w, safety, 1800.0, accounts=1, entries=1) is None


@settings(max_examples=examples(300), deadline=None)
@given(
    st.integers(min_value=0, max_value=3000),
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=2 * HOUR),
            st.integers(min_value=0, max_value=400),
            st.integers(min_value=0, max_value=400),
        ),
        max_size=60,
    ),
    st.sampled_from([0.2, 0.5, 1.0]),
)
def test_net_deletions_in_any_window_never_exceed_the_limits(
    start: int, syncs: list[tuple[float, int, int]], ratio: float
) -> None:
    """Whatever deletions and additions are installed, no span of `window` seconds loses more
    (from any moment of it to its end) than max_deletions, or than the ratio of the size it
    started with."""
    safety = Safety(max_deletions=500, max_deletion_ratio=ratio, window=HOUR)
    window, now, size = Window(), 0.0, start
    history = [(-1.0, size)]  # (time, size after the install)
    for gap, deleted, added in syncs:
        now += gap
        d = Delta("a", size, deleted=min(deleted, size), added=added)
        if guard.check([d], window, safety, now, accounts=1, entries=1) is None:
            window = window.record([d], now, safety.window)
            size = d.size - d.deleted + d.added
            history.append((now, size))
    for i, (t, end) in enumerate(history):
        # every window (t - HOUR, t]: its start size is the size after the last install <= t - HOUR,
        # and every install inside it starts a shorter window
        starts = [s for u, s in history[:i] if u > t - HOUR]
        starts += [next(s for u, s in reversed(history[: i + 1]) if u <= t - HOUR or u < 0)]
        for begin in starts:
            loss = begin - end
            assert loss <= safety.max_deletions
            assert loss <= guard.RATIO_FLOOR or loss <= ratio * begin


# -- key parsing belongs to the exporter ---------------------------------------------------------
def test_each_exporter_parses_its_own_lines() -> None:
    passwd = PasswdExporter({}).parse(b"alice:{SSHA}abc=\nbob:{CRYPT}$6$s$h\n")
    assert passwd == {"alice": "{SSHA}abc=", "bob": "{CRYPT}$6$s$h"}
    virtual = VirtualExporter({}).parse(b"a@example.org\tb@example.org,c@example.net\n")
    assert virtual == {"a@example.org": "b@example.org,c@example.net"}
    access = AccessExporter({}).parse(b"x@example.org\tREJECT gone: ask the helpdesk\n")
    assert access == {"x@example.org": "REJECT gone: ask the helpdesk"}
    assert [cls.guarded_values for cls in (PasswdExporter, VirtualExporter, TransportExporter)] == [True] * 3
    assert not RecipientsExporter.guarded_values and not AccessExporter.guarded_values


# -- through the CLI ---------------------------------------------------------------------------------
class Site:
    """A tmp dir with an LDIF source we rewrite, the usual outputs and a state dir."""

    def __init__(self, root: Path, **top: Any):
        self.root = root
        self.ldif = root / "users.ldif"
        self.config = root / "ldapsync.yaml"
        doc = {
            "domain": "example.org",
            "domain_aliases": ["example.net"],
            "source": {"ldif": {"path": str(self.ldif), "base_dn": "ou=users,dc=example,dc=org"}},
            "state_dir": "state",
            "exporters": [
                {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "map_type": "texthash"},
                {"kind": "postfix-recipients", "path": "out/recipients", "map_type": "texthash"},
                {"kind": "dovecot-passwd", "path": "out/passwd"},
            ],
            **top,
        }
        self.config.write_text(yaml.safe_dump(doc))

    def users(self, n: int, start: int = 0, *, password: str | None = None, forward: str | None = None) -> None:
        text = BASE_LDIF.read_text() + "\n" + generate_users_ldif(n, start)
        if password is not None:
            text = text.replace(generated_user_hash(), password)
        if forward is not None:
            text = text.replace("@elsewhere.example", forward)
        self.ldif.write_text(text)

    def run(self, *args: str, check: int) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "ldapsync", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        return proc

    def out(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((self.root / "out").iterdir())}


def test_many_small_deletions_end_held_and_approve_starts_a_new_window(tmp_path: Path) -> None:
    site = Site(tmp_path)  # default safety: max_deletion_ratio 0.2 over 6 h
    site.users(100)
    site.run("--once", check=0)
    for remaining in (95, 90, 85, 80):  # 5 at a time: no single sync is suspicious
        site.users(remaining)
        site.run("--once", check=0)
    assert site.out()["passwd"].count(b"\n") == 80
    good = site.out()

    site.users(75)
    proc = site.run("--once", check=EXIT_HELD)
    # alias: 50 forwards + 100 example.net rewrites at the start; 38 of them gone by now
    assert "alias: 38 of 150 entries (25%) would be deleted within 6h (8 in this sync" in proc.stderr
    assert site.out() == good, "a held change reached the outputs"

    site.run("approve", check=0)
    assert site.out()["passwd"].count(b"\n") == 75
    site.users(70)  # the admin looked at the result: counting starts again
    site.run("--once", check=0)
    assert site.out()["passwd"].count(b"\n") == 70


def test_accounts_disabled_and_re_enabled_again_and_again_are_not_held(tmp_path: Path) -> None:
    # a 2-key access map flapping six times: never more than 2 of 2 keys gone at once
    site = Site(
        tmp_path,
        safety={"max_deletion_ratio": 1.0},
        domain_aliases=[],
        exporters=[
            {"kind": "postfix-access", "path": "out/access", "map_type": "texthash"},
            {"kind": "postfix-recipients", "path": "out/recipients", "map_type": "texthash"},
        ],
    )
    users = BASE_LDIF.read_text() + "\n" + generate_users_ldif(20)
    disabled = users
    for uid in ("user000003", "user000004"):
        disabled = disabled.replace(f"uid: {uid}\n", f"uid: {uid}\nmailDisableMessage: {uid} is on leave\n")
    site.ldif.write_text(users)
    site.run("--once", check=0)
    for _ in range(6):
        site.ldif.write_text(disabled)
        site.run("--once", check=0)
        assert site.out()["access"].count(b"\n") == 2
        site.ldif.write_text(users)
        site.run("--once", check=0)
        assert site.out()["access"] == b""


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"password": ssha("attacker")},
            "dovecot-passwd: 225 of 225 values (100%) would change (max_change_ratio 0.2)",
        ),
        ({"forward": "@attacker.example"}, "alias: 112 of 337 values (33%) would change (max_change_ratio 0.2)"),
    ],
)
def test_rewriting_password_hashes_or_forwards_is_held(tmp_path: Path, change: dict[str, str], reason: str) -> None:
    site = Site(tmp_path)
    site.users(225)
    site.run("--once", check=0)
    good = site.out()

    site.users(225, **change)
    proc = site.run("--once", check=EXIT_HELD)
    assert reason in proc.stderr
    assert site.out() == good
    site.run("approve", check=0)
    assert site.out() != good


def test_safety_keys_are_read_and_checked(tmp_path: Path) -> None:
    def parse(**safety: Any) -> Safety:
        doc = {
            "domain": "example.org",
            "source": {"ldif": str(tmp_path / "x.ldif")},
            "state_dir": "state",
            "exporters": [{"kind": "dovecot-passwd", "path": "passwd"}],
            "safety": safety,
        }
        return config_mod.parse(doc, tmp_path / "ldapsync.yaml").safety

    assert parse() == Safety(500, 0.2, False, 1000, 0.2, 21600.0)
    assert parse(max_changes=5, max_change_ratio=0.5, window=0) == Safety(max_changes=5, max_change_ratio=0.5, window=0)
    for key, value, message in [
        ("max_change_ratio", 1.5, "between 0 and 1"),
        ("max_changes", -1, ">= 0"),
        ("window", -5, ">= 0"),
        ("window", "6h", "must be of type float"),
    ]:
        with pytest.raises(ConfigError, match=rf"ldapsync.yaml: safety.{key}: .*{message}"):
            parse(**{key: value})


def test_diff_parses_only_the_lines_that_differ() -> None:
    installed = b"".join(b"u%03d:{SSHA}h%03d\n" % (i, i) for i in range(100))
    new = installed.replace(b"u001:{SSHA}h001\n", b"").replace(b"{SSHA}h002", b"{SSHA}x") + b"u999:{SSHA}n\n"
    seen: list[int] = []

    def parse(data: bytes) -> dict[str, str]:
        seen.append(data.count(b"\n") + 1)
        return PasswdExporter({}).parse(data)

    assert guard.diff("p", installed, new, parse, values=True) == Delta("p", 100, deleted=1, changed=1, added=1)
    assert max(seen) <= 3
    assert guard.diff("p", installed, installed, parse, values=True) == Delta("p", 100)
