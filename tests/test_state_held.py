"""The held change: written once, read back whole or refused, referenced by the follow state,
and replaced so that a kill -9 at any point leaves the old or the new one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_state import follow_config

from ldapsync import mirror
from ldapsync.directory import Entry, Rejection, Snapshot
from ldapsync.errors import StateError
from ldapsync.state import State, held

TESTS = Path(__file__).resolve().parent


def snap(n: int, source: str = "test") -> Snapshot:
    entries = tuple(
        Entry(f"uid=u{i},ou=users,dc=example,dc=org", {"uid": (f"u{i}",), "mail": (f"u{i}@example.org",)})
        for i in range(n)
    )
    return Snapshot(entries, source, (Rejection("uid=u0,ou=users,dc=example,dc=org", "mail", "why"),))


@pytest.fixture
def state(tmp_path: Path) -> State:
    s = State(tmp_path / "state")
    s.ensure()
    return s


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_a_held_change_round_trips_with_its_id_digest_and_sum(state: State) -> None:
    hid = state.hold(snap(5), {"reason": "because", "counts": {"alias": "+5"}})
    assert hid.startswith("held-" + snap(5).digest() + "-") and held.digest_of(hid) == snap(5).digest()
    got = state.held_change.read()
    assert got is not None and got.id == hid
    assert got.snapshot == snap(5) and got.meta["reason"] == "because" and got.meta["counts"] == {"alias": "+5"}
    assert vars(got.snapshot)["entry_sum"] == snap(5).entry_sum, "the saved running sum is taken, not recomputed"
    assert sorted(files(state.held_dir)) == sorted(["meta.json", f"{hid}/snapshot.json"])


def test_holding_another_change_replaces_the_first_and_removes_its_snapshot(state: State) -> None:
    first = state.hold(snap(3), {"reason": "one"})
    second = state.hold(snap(4), {"reason": "two"})
    assert first != second
    assert sorted(files(state.held_dir)) == sorted(["meta.json", f"{second}/snapshot.json"])
    assert state.held() == (snap(4), state.held_change.meta())


def test_holding_the_same_change_again_does_not_rewrite_its_snapshot(state: State) -> None:
    hid = state.hold(snap(3), {"reason": "one"})
    saved = state.held_dir / hid / "snapshot.json"
    before = os.stat(saved)
    assert state.hold(snap(3), {"reason": "again"}) == hid
    after = os.stat(saved)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    meta = state.held_change.meta()
    assert meta is not None and meta["reason"] == "again"


def test_the_same_entries_with_other_rejections_are_another_file_beside_the_held_one(state: State) -> None:
    """Replacing must never remove the file meta.json names: same entries (same digest) but
    other rejections are another snapshot file, written beside it before meta.json switches."""
    first = snap(3)
    other = Snapshot(first.entries, first.source, (Rejection("uid=u1,ou=users,dc=example,dc=org", "mail", "x"),))
    assert first.digest() == other.digest() and first.to_json() != other.to_json()
    a = state.hold(first, {"reason": "a"})
    b = state.hold(other, {"reason": "b"})
    assert a != b and held.digest_of(a) == held.digest_of(b)
    assert state.held() == (other, state.held_change.meta())


@pytest.mark.parametrize("damage", ["truncated", "missing", "other-id", "bad-meta"])
def test_a_damaged_held_change_is_refused_naming_the_held_dir_and_left_alone(state: State, damage: str) -> None:
    hid = state.hold(snap(3), {"reason": "x"})
    saved = state.held_dir / hid / "snapshot.json"
    if damage == "truncated":
        saved.write_bytes(saved.read_bytes()[:-10])
    elif damage == "missing":
        saved.unlink()
    elif damage == "other-id":
        meta = json.loads((state.held_dir / "meta.json").read_bytes())
        (state.held_dir / "meta.json").write_text(json.dumps({**meta, "id": "../generations"}))
    else:
        (state.held_dir / "meta.json").write_bytes(b"{not json")
    before = files(state.root)
    with pytest.raises(StateError, match=f"held change in {state.held_dir}"):
        state.held()
    assert files(state.root) == before, "reading a held change must not change it"
    assert state.get(hid) is None or damage in ("truncated", "missing")


def test_a_held_change_in_the_layout_before_ids_still_reads(state: State) -> None:
    state.held_dir.mkdir(mode=0o700)
    (state.held_dir / "snapshot.json").write_bytes(snap(2).to_json())
    (state.held_dir / "meta.json").write_text(json.dumps({"reason": "old", "time": 1.0}))
    got = state.held_change.read()
    assert got is not None and got.id is None and got.snapshot == snap(2)
    assert state.held() is not None
    hid = state.hold(snap(3), {"reason": "new"})  # replaces it, old files gone
    assert sorted(files(state.held_dir)) == sorted(["meta.json", f"{hid}/snapshot.json"])


def test_clear_removes_it(state: State) -> None:
    state.hold(snap(3), {"reason": "x"})
    state.clear_held()
    assert state.held() is None and not state.held_dir.exists()


def test_the_follow_state_names_the_held_change_instead_of_a_second_copy(tmp_path: Path) -> None:
    """Holding a change and saving the agent's follow state writes the directory once."""
    cfg = follow_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    big = snap(300)
    hid = state.hold(big, {"reason": "mass change"})
    mirror.save_follow_state(state, cfg, big, b"cookie-1", generation=hid)
    assert not (state.root / mirror.FOLLOW_SNAPSHOT).exists()
    assert json.loads((state.root / mirror.FOLLOW_FILE).read_bytes())["generation"] == hid
    written = sum(files(state.root).values())
    assert written < 1.2 * len(big.to_json()), f"{written} bytes for a {len(big.to_json())}-byte directory"
    restarted = State(state.root)
    assert mirror.load_follow_state(restarted, cfg) == (big, b"cookie-1")


def test_the_follow_state_of_a_held_change_survives_its_approval(tmp_path: Path) -> None:
    """Approving installs the held snapshot as a generation and removes the held change: a
    restart resumes from that generation (same content), not with a full read."""
    cfg = follow_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    hid = state.hold(snap(5), {"reason": "x"})
    mirror.save_follow_state(state, cfg, snap(5), b"cookie-5", generation=hid)
    outputs = {"dovecot-passwd": b"u0:x\n"}
    state.record(state.new_generation_id(outputs), snap(5), outputs, {}, 3)
    state.clear_held()
    assert mirror.load_follow_state(State(state.root), cfg) == (snap(5), b"cookie-5")
    state.record(state.new_generation_id({"dovecot-passwd": b"u1:x\n"}), snap(6), {"dovecot-passwd": b"u1:x\n"}, {}, 1)
    assert mirror.load_follow_state(State(state.root), cfg) is None, "content gone: a full read, not a wrong mirror"


def test_a_held_id_is_not_a_generation_to_roll_back_to(state: State) -> None:
    hid = state.hold(snap(2), {"reason": "x"})
    assert state.store.get(hid) is None and hid not in [g.id for g in state.generations()]
    gen = state.get(hid)
    assert gen is not None and gen.snapshot() == snap(2) and gen.meta["snapshot_digest"] == snap(2).digest()


def hold_forever(root: str, start: int) -> None:
    """The child of the kill -9 test: replaces and clears the held change, over and over."""
    state = State(Path(root))
    state.ensure()
    versions = [snap(400, "a"), snap(401, "b"), snap(402, "c")]
    i = start
    print("ready", flush=True)
    while True:
        if i % 7 == 6:
            state.clear_held()
        else:
            v = versions[i % 3]
            state.hold(v, {"reason": v.source})
        i += 1


def test_kill_9_while_holding_leaves_the_old_or_the_new_held_change(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("LDAPSYNC_CRASH_SEED", "7")))
    root = tmp_path / "state"
    State(root).ensure()
    expected = {v.source: v for v in (snap(400, "a"), snap(401, "b"), snap(402, "c"))}
    seen: set[str | None] = set()
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_state_held; "
        f"test_state_held.hold_forever({str(root)!r}, int(sys.argv[1]))"
    )
    for i in range(25):
        with subprocess.Popen(
            [sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, text=True, start_new_session=True
        ) as proc:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0, 0.1))  # a few holds each way on a busy machine
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        state = State(root)
        got = state.held_change.read()  # raises if half of one is left
        if got is None:
            seen.add(None)
            continue
        reason = got.meta["reason"]
        assert got.snapshot == expected[reason], f"kill {i}: meta.json of {reason} with another snapshot"
        assert got.id is not None and held.digest_of(got.id) == expected[reason].digest()
        seen.add(reason)
        leftovers = [p.name for p in (root / "held").iterdir() if p.name not in ("meta.json", got.id)]
        state.hold(got.snapshot, dict(got.meta))  # the next holder sweeps what a kill left
        assert [p.name for p in (root / "held").iterdir() if p.name not in ("meta.json", got.id)] == [], leftovers
    assert len(seen) >= 2, f"the kills always hit the same state ({seen}): the test would prove little"
