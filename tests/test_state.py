"""The state directory: crash-safe generations, pruning, damage detection, locking, modes."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from ldapsync.directory import Entry, Snapshot
from ldapsync.errors import StateError
from ldapsync.fileio import write_atomic
from ldapsync.state import State


def snap(n: int) -> Snapshot:
    entries = tuple(Entry(f"uid=u{i},ou=users,dc=example,dc=org", {"uid": (f"u{i}",)}) for i in range(n))
    return Snapshot(entries, "test")


def record(state: State, n: int, keep: int = 10) -> str:
    outputs = {"alias": f"u{n}@example.org\tx\n".encode(), "dovecot-passwd": f"u{n}:{{SSHA}}x\n".encode()}
    return state.record(state.new_generation_id(outputs), snap(n), outputs, {"source": "test"}, keep).id


@pytest.fixture
def state(tmp_path: Path) -> State:
    s = State(tmp_path / "state")
    s.ensure()
    return s


def test_ensure_creates_0700_and_refuses_group_access(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        State(tmp_path / "a" / "state").ensure()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "state").stat().st_mode) == 0o700
    for mode in (0o750, 0o705, 0o701):
        d = tmp_path / f"bad{mode:o}"
        d.mkdir()
        d.chmod(mode)
        with pytest.raises(StateError, match="chmod 0700"):
            State(d).ensure()


def test_generations_are_newest_first_even_within_one_second(state: State) -> None:
    ids = [record(state, n) for n in range(5)]  # same second: ids differ only by content hash
    assert [g.id for g in state.generations()] == ids[::-1]
    assert state.current_id() == ids[-1] and state.get() is not None and state.get().id == ids[-1]  # type: ignore[union-attr]


def test_prune_keeps_n_and_never_the_current(state: State) -> None:
    ids = [record(state, n, keep=3) for n in range(6)]
    assert [g.id for g in state.generations()] == ids[:2:-1]
    state.set_current(ids[3])  # rolled back to the oldest kept one
    record(state, 99, keep=2)
    kept = [g.id for g in state.generations()]
    assert len(kept) == 2 and kept[0] != ids[3]
    state.set_current(kept[1])
    state.prune(1)
    assert [g.id for g in state.generations()] == kept, "the current generation was pruned"


def test_generation_files_are_private_and_complete(state: State) -> None:
    gid = record(state, 3)
    gen = state.root / "generations" / gid
    for p in [gen, *gen.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    g = state.get(gid)
    assert g is not None
    g.verify()
    assert g.snapshot() == snap(3)
    assert g.output("alias") == b"u3@example.org\tx\n"
    meta = json.loads((gen / "meta.json").read_text())
    assert meta["id"] == gid and meta["source"] == "test" and set(meta["hashes"]) == {"alias", "dovecot-passwd"}


def test_an_interrupted_record_leaves_no_generation(state: State) -> None:
    class Boom(Exception):
        pass

    class BadSnapshot(Snapshot):
        def to_json(self) -> bytes:
            raise Boom

    with pytest.raises(Boom):
        state.record("20000101T000000Z-deadbeef", BadSnapshot((), "x"), {"a": b"x"}, {}, 10)
    assert state.generations() == [] and state.current_id() is None
    assert list((state.root / "generations").iterdir()) == []
    # a temp dir left by a kill -9 is cleaned by the next prune
    (state.root / "generations" / ".tmp-killed").mkdir()
    record(state, 1)
    assert not (state.root / "generations" / ".tmp-killed").exists()


@pytest.mark.parametrize(
    "damage", ["meta-garbage", "meta-wrong-id", "snapshot-truncated", "output-changed", "output-gone"]
)
def test_damaged_generations_are_detected(state: State, damage: str) -> None:
    good = record(state, 1)
    time.sleep(0.01)
    bad = record(state, 2)
    gen = state.root / "generations" / bad
    if damage == "meta-garbage":
        (gen / "meta.json").write_bytes(b"\x00{")
    elif damage == "meta-wrong-id":
        meta = json.loads((gen / "meta.json").read_text())
        (gen / "meta.json").write_text(json.dumps({**meta, "id": good}))
    elif damage == "snapshot-truncated":
        data = (gen / "snapshot.json").read_bytes()
        (gen / "snapshot.json").write_bytes(data[:-10])
    elif damage == "output-changed":
        (gen / "outputs" / "alias").write_bytes(b"evil@example.org\tx\n")
    else:
        (gen / "outputs" / "dovecot-passwd").unlink()
    lkg = state.last_good()
    assert lkg is not None and lkg.id == good, "a damaged generation was taken for last-known-good"
    if damage.startswith("meta"):
        assert [g.id for g in state.generations()] == [good]
    else:
        g = state.get(bad)
        assert g is not None
        with pytest.raises(StateError, match=bad):
            g.verify()


def test_lock_is_exclusive(state: State) -> None:
    with state.lock(), pytest.raises(StateError, match="another ldapsync"), state.lock():
        pass
    with state.lock():  # released
        pass


def test_write_atomic_and_unreadable_json(state: State) -> None:
    path = state.root / "status.json"
    write_atomic(path, b'{"a": 1}')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    state.write_json("status.json", {"a": 2})
    assert path.stat().st_ino != inode and state.read_json("status.json") == {"a": 2}
    path.write_bytes(b"\xff\x00not json")
    assert state.read_json("status.json") == {}
    path.write_text("[1, 2]")
    assert state.read_json("status.json") == {}
    assert not [p.name for p in state.root.iterdir() if p.name.startswith(".")], "temp files left"


def test_held_change_round_trip_and_damage(state: State) -> None:
    state.hold(snap(2), {"reason": "because"})
    held = state.held()
    assert held is not None and held[0] == snap(2) and held[1]["reason"] == "because"
    (state.held_dir / "snapshot.json").write_bytes(b"{trunc")
    with pytest.raises(StateError, match="held change"):
        state.held()
    assert (state.held_dir / "snapshot.json").read_bytes() == b"{trunc", "reading a held change must not remove it"
