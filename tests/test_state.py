"""The state directory: crash-safe generations, pruning, damage detection, locking, modes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import siteconfig
from agentutil import AgentProcess, AgentSetup, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples
from slapd import Slapd, ssha

from ldapsync import config as config_mod
from ldapsync import validate, watch
from ldapsync.config import Config
from ldapsync.directory import REFUSED_PREFIX, Entry, Rejection, Snapshot, sort_entries
from ldapsync.errors import StateError
from ldapsync.fileio import write_atomic
from ldapsync.guard import Window
from ldapsync.state import State, lmdbstore
from ldapsync.state import generations as state_mod
from ldapsync.sync import Pipeline, rollback

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"


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


def test_generation_files_are_private_and_complete(state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "COMPACT_RATIO", 100.0)
    record(state, 2)
    gid = record(state, 3)  # a journal line after the base
    gen = state.root / "generations" / gid
    assert {p.suffix for p in state.store_dir.iterdir()} == {".base", ".journal"}
    old = os.umask(0)  # what ldapsync creates does not depend on the umask
    try:
        outputs = {"alias": b"u4@example.org\tx\n"}
        fourth = state.record(state.new_generation_id(outputs), snap(4), outputs, {}, 10, new_base=True)
        record(state, 5)  # and a new journal
    finally:
        os.umask(old)
    assert len(list(state.store_dir.glob("*.journal"))) == 2
    for p in [gen, *gen.rglob("*"), fourth.path, *fourth.path.rglob("*"), state.store_dir, *state.store_dir.iterdir()]:
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
        def json_chunks(self) -> Iterator[bytes]:
            yield b'{"entries":['
            raise Boom

    with pytest.raises(Boom):
        state.record("20000101T000000Z-deadbeef", BadSnapshot((), "x"), {"a": b"x"}, {}, 10)
    assert state.generations() == [] and state.current_id() is None
    assert list((state.root / "generations").iterdir()) == []
    assert list(state.store_dir.iterdir()) == [], "a partial base was left"
    # a temp dir or base left by a kill -9 is cleaned by the next prune
    (state.root / "generations" / ".tmp-killed").mkdir()
    (state.store_dir / ".tmp-killed").write_bytes(b'{"entries":[')
    record(state, 1)
    assert not (state.root / "generations" / ".tmp-killed").exists()
    assert not (state.store_dir / ".tmp-killed").exists()


@pytest.mark.parametrize(
    "damage", ["meta-garbage", "meta-wrong-id", "journal-truncated", "output-changed", "output-gone"]
)
def test_damaged_generations_are_detected(state: State, damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "COMPACT_RATIO", 100.0)  # a journal line even for this tiny directory
    good = record(state, 1)
    time.sleep(0.01)
    bad = record(state, 2)
    gen = state.root / "generations" / bad
    if damage == "meta-garbage":
        (gen / "meta.json").write_bytes(b"\x00{")
    elif damage == "meta-wrong-id":
        meta = json.loads((gen / "meta.json").read_text())
        (gen / "meta.json").write_text(json.dumps({**meta, "id": good}))
    elif damage == "journal-truncated":  # the line of `bad`; `good` is the base before it
        (journal,) = state.store_dir.glob("*.journal")
        journal.write_bytes(journal.read_bytes()[:-10])
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
    saved = state.held_dir / held[1]["id"] / "snapshot.json"
    saved.write_bytes(b"{trunc")
    with pytest.raises(StateError, match="held change"):
        state.held()
    assert saved.read_bytes() == b"{trunc", "reading a held change must not remove it"


# -- trust: the state dir and its files must be ours -------------------------------------------
NOBODY = pwd.getpwnam("nobody")


def test_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "state"
    State(root).ensure()
    os.chown(root, NOBODY.pw_uid, NOBODY.pw_gid)  # still 0700: only its owner can write it
    with pytest.raises(StateError) as err:
        State(root).ensure()
    assert str(root) in str(err.value) and "owned by nobody" in str(err.value)


@pytest.mark.parametrize("target", ["current", "held/meta.json", "store-base", "generation-dir", "guard.json"])
def test_a_file_in_the_state_dir_not_ours_is_refused(state: State, target: str) -> None:
    gid = record(state, 1)
    state.hold(snap(1), {"reason": "test"})
    state.save_guard_window(Window())
    path = {
        "store-base": next(state.store_dir.glob("*.base")),
        "generation-dir": state.generations_dir / gid,
    }.get(target, state.root / target)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(StateError) as err:
        State(state.root).ensure()
    assert f"{path} is owned by nobody" in str(err.value)
    os.chown(path, os.geteuid(), os.getegid())
    path.chmod(path.stat().st_mode | stat.S_IWOTH)
    with pytest.raises(StateError, match="writable by group or others"):
        State(state.root).ensure()


def follow_config(tmp_path: Path) -> Config:
    doc = {
        "domain": "example.org",
        "source": {"ldap": {"uri": "ldap://127.0.0.1:1", "base_dn": "ou=users,dc=example,dc=org"}},
        "state_dir": str(tmp_path / "state"),
        "exporters": [{"kind": "dovecot-passwd", "path": str(tmp_path / "passwd")}],
    }
    return config_mod.parse(doc, tmp_path / "ldapsync.yaml")


@pytest.mark.parametrize(
    ("saved", "name"),
    [("snapshot-file", "follow.json"), ("snapshot-file", "follow-snapshot.json"), ("generation", "follow.json")],
)
@pytest.mark.parametrize("how", ["chown-nobody", "mode-0644"])
def test_follow_cache_not_ours_or_too_open_is_ignored(tmp_path: Path, saved: str, name: str, how: str) -> None:
    cfg = follow_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    gid = record(state, 3) if saved == "generation" else None
    watch.save_follow_state(state, cfg, snap(3), b"cookie", generation=gid)
    assert (state.root / "follow-snapshot.json").exists() == (gid is None)
    assert watch.load_follow_state(state, cfg) == (snap(3), b"cookie")
    path = state.root / name
    if how == "chown-nobody":
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    else:
        path.chmod(0o644)
    assert watch.load_follow_state(state, cfg) is None, "an untrusted follow cache was used"
    State(state.root).ensure()  # a cache, ignored and rewritten: not a reason to stop


def _plant_store(state_dir: Path, password: str, owner: pwd.struct_passwd) -> None:
    """What a user who can write the state dir did: every hash in the store replaced."""
    import lmdb

    path = state_dir / lmdbstore.STORE_NAME
    env = lmdb.open(str(path), max_dbs=len(lmdbstore.INDEX_TABLES) + 2)
    with env.begin(write=True) as txn:
        db = env.open_db(b"entries", txn=txn)
        for key, value in list(txn.cursor(db=db)):
            entry = lmdbstore.decode_entry(bytes(value))
            if entry.get("mailpassword"):
                attrs = {**entry.attributes.as_dict(), "mailpassword": (password,)}  # type: ignore[attr-defined]
                txn.put(key, lmdbstore.encode_entry(Entry(entry.dn, attrs, entry.uuid)), db=db)
    env.close()
    for p in (path, *path.iterdir()):
        os.chown(p, owner.pw_uid, owner.pw_gid)


@pytest.mark.slapd
def test_a_store_planted_by_another_user_is_not_read(tmp_path: Path, slapd: Slapd) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "agent", slapd)
    with AgentProcess(setup.config) as agent:
        agent.wait_log("sync done", timeout=60)
        wait_until(lambda: setup.saved_cookie() is not None, 30)
        agent.terminate()
    good = setup.passwd.read_bytes()
    attacker = ssha("attacker")
    assert good.count(b"\n") > 10

    _plant_store(setup.state, attacker, NOBODY)
    with AgentProcess(setup.config) as agent:
        agent.wait_log("state file not trusted; ignoring it", timeout=60)
        agent.wait_log("sync done", timeout=60)
        wait_until(lambda: setup.saved_cookie() is not None, 30)
        agent.terminate()
    assert setup.passwd.read_bytes() == good
    store = setup.state / lmdbstore.STORE_NAME
    assert store.stat().st_uid == os.geteuid(), "the untrusted store was kept"
    assert attacker.encode() not in (store / "data.mdb").read_bytes()


# -- refused secrets are not kept -----------------------------------------------------------------
REFUSED = [b"hunter2", b"{PLAIN}secret", b"{FOO}bar"]  # plaintext and unknown-scheme values in hostile.ldif


def _stored_secrets(state_dir: Path) -> list[str]:
    return [
        f"{p}: {s.decode()}"
        for p in sorted(state_dir.rglob("*"))
        if p.is_file()
        for s in REFUSED
        if s in p.read_bytes()
    ]


@pytest.mark.slapd
def test_refused_passwords_are_not_stored_verbatim(tmp_path: Path, slapd: Slapd) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "agent", slapd)

    def once(check: int) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "ldapsync", "-c", str(setup.config), "--once"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == check, proc.stderr

    once(0)
    assert _stored_secrets(setup.state) == []
    gen = State(setup.state).get()
    assert gen is not None
    marker = REFUSED_PREFIX + hashlib.sha256(b"hunter2").hexdigest()
    ref = gen.store_ref
    assert ref is not None and marker.encode() in (State(setup.state).store_dir / ref.base).read_bytes()
    with pytest.raises(validate.Invalid):
        validate.password(marker)
    # a rebuild from the stored generation refuses it still: the same passwd-file
    pipeline = Pipeline(config_mod.load(setup.config))
    outputs, _ = pipeline.render(gen.snapshot(), log_problems=False)
    assert {o.name: o.data for o in outputs}["dovecot-passwd"] == setup.passwd.read_bytes()

    setup.doc["safety"] = {"max_deletions": 0}
    setup.write_config()
    slapd.modify(f"dn: uid=alice,{slapd.users_dn}\nchangetype: delete\n")
    once(4)
    assert len(list((setup.state / "held").glob("held-*/snapshot.json"))) == 1
    assert _stored_secrets(setup.state) == []

    with AgentProcess(setup.config) as agent:  # the held change again, and the store holding it
        agent.wait_log("sync done", timeout=60)
        wait_until(lambda: setup.saved_cookie() is not None, 30)
        agent.terminate()
    assert (setup.state / lmdbstore.STORE_NAME / "data.mdb").exists()
    assert _stored_secrets(setup.state) == []


def test_once_refuses_a_foreign_state_dir_and_installs_nothing(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parent.parent / "fixtures" / "ldif" / "demo.ldif"
    doc = {
        "domain": "example.org",
        "source": {"ldif": {"path": str(demo), "base_dn": "ou=users,dc=example,dc=org"}},
        "state_dir": "state",
        "exporters": [{"kind": "dovecot-passwd", "path": "passwd"}],
    }
    config = tmp_path / "ldapsync.yaml"
    config.write_text(json.dumps(doc))

    def once() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ldapsync", "-c", str(config), "--once"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    assert once().returncode == 0
    (tmp_path / "passwd").unlink()
    os.chown(tmp_path / "state", NOBODY.pw_uid, NOBODY.pw_gid)
    proc = once()
    assert proc.returncode == 1
    assert f"state_dir {tmp_path / 'state'} is owned by nobody" in proc.stderr
    assert not (tmp_path / "passwd").exists(), "a sync ran on a state dir another user controls"


# -- the store: a base plus a journal of changed entries ------------------------------------------
USERS = "ou=users,dc=example,dc=org"


def user(k: int, forward: str = "far.example", uuid: bool = True) -> Entry:
    attrs = {"uid": (f"u{k:03d}",), "emailforward": (f"u{k}@{forward}",)}
    return Entry(f"uid=u{k:03d},{USERS}", attrs, f"uuid-{k}" if uuid else None)


def directory(n: int) -> Snapshot:
    return Snapshot(sort_entries(user(k) for k in range(n)), "ldap:ldap://a")


def changed(snapshot: Snapshot, k: int, forward: str) -> Snapshot:
    """`snapshot` with user k's forward changed, sharing every other entry (as the mirror does)."""
    entries = [user(k, forward) if e.uuid == f"uuid-{k}" else e for e in snapshot.entries]
    return Snapshot(tuple(entries), snapshot.source, snapshot.rejections)


def outputs_of(snapshot: Snapshot) -> dict[str, bytes]:
    alias = "".join(
        f"{','.join(e.get('uid'))}@example.org\t{','.join(e.get('emailforward'))}\n" for e in snapshot.entries
    )
    return {"alias": alias.encode(), "static": b"postmaster@example.org\troot\n"}


def put(state: State, snapshot: Snapshot, *, keep: int = 10, new_base: bool = False) -> str:
    outputs = outputs_of(snapshot)
    return state.record(state.new_generation_id(outputs), snapshot, outputs, {}, keep, new_base=new_base).id


def store_files(state: State) -> list[str]:
    return sorted(p.name for p in state.store_dir.iterdir()) if state.store_dir.is_dir() else []


def referenced(state: State) -> set[str]:
    """The store files the generations name: their bases and the bases' journals."""
    names = set()
    for g in state.generations():
        ref = g.store_ref
        if ref is not None:
            names.update(ref.files())
    return names


def test_a_change_appends_one_journal_line_and_links_unchanged_outputs(state: State) -> None:
    one = directory(200)
    first = put(state, one)
    (base,) = store_files(state)
    two = changed(one, 17, "new.example")
    second = put(state, two)
    journal = base.removesuffix(".base") + ".journal"
    assert store_files(state) == [base, journal], "the change wrote more than a journal line"
    text = (state.store_dir / journal).read_bytes()
    assert text.count(b"\n") == 1 and b"u17@new.example" in text and b"u018" not in text
    g1, g2 = state.get(first), state.get(second)
    assert g1 is not None and g2 is not None
    assert g1.snapshot() == one and g2.snapshot() == two
    g1.verify()
    g2.verify()
    out1, out2 = g1.path / "outputs", g2.path / "outputs"
    assert (out1 / "static").stat().st_ino == (out2 / "static").stat().st_ino, "unchanged output not linked"
    assert (out1 / "alias").stat().st_ino != (out2 / "alias").stat().st_ino
    assert g2.output("alias") == outputs_of(two)["alias"]


def test_without_a_predecessor_in_memory_a_record_writes_a_new_base(state: State) -> None:
    """A new process (--once, approve) has nothing to diff against: a whole base, as before."""
    one = directory(50)
    put(state, one)
    fresh = State(state.root)
    gid = put(fresh, changed(one, 3, "x.example"))
    assert len([f for f in store_files(state) if f.endswith(".base")]) == 2
    g = fresh.get(gid)
    assert g is not None and g.snapshot() == changed(one, 3, "x.example")
    # and from then on the fresh one appends
    put(fresh, changed(changed(one, 3, "x.example"), 4, "y.example"))
    assert any(f.endswith(".journal") for f in store_files(state))


def test_the_journal_is_compacted_into_a_new_base_and_old_ones_pruned(state: State) -> None:
    snapshot = directory(40)
    put(state, snapshot, keep=3)
    bases: set[str] = set()
    for n in range(40):  # each line ~150 bytes, the base ~4 KiB: a new base every ~13 changes
        snapshot = changed(snapshot, n, f"v{n}.example")
        put(state, snapshot, keep=3)
        bases.update(f for f in store_files(state) if f.endswith(".base"))
        size = sum((state.store_dir / f).stat().st_size for f in store_files(state) if f.endswith(".journal"))
        base_size = max((state.store_dir / f).stat().st_size for f in store_files(state) if f.endswith(".base"))
        assert size <= state_mod.COMPACT_RATIO * base_size * 2
    assert len(bases) >= 3, "never compacted"
    for g in state.generations():
        g.verify()
    assert set(store_files(state)) <= referenced(state)
    assert len(state.generations()) == 3
    latest = state.get()
    assert latest is not None and latest.snapshot() == snapshot


def test_a_damaged_base_or_journal_invalidates_exactly_the_generations_reading_it(
    state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_mod, "COMPACT_RATIO", 100.0)
    snapshot = directory(30)
    old_base = [put(state, snapshot)]
    for n in range(2):
        snapshot = changed(snapshot, n, f"a{n}.example")
        old_base.append(put(state, snapshot))
    second_base = [put(state, snapshot := changed(snapshot, 5, "b.example"), new_base=True)]
    for n in range(3):
        snapshot = changed(snapshot, n + 10, f"c{n}.example")
        second_base.append(put(state, snapshot))

    def intact() -> set[str]:
        ok = set()
        for g in state.generations():
            try:
                g.verify()
            except StateError:
                continue
            ok.add(g.id)
        return ok

    assert intact() == set(old_base + second_base)
    ref = State(state.root).get(second_base[2])
    assert ref is not None and ref.store_ref is not None
    journal = state.store_dir / ref.store_ref.journal
    data = bytearray(journal.read_bytes())
    data[ref.store_ref.end - 5] ^= 0x01  # inside the second line: the generations from it on
    journal.write_bytes(bytes(data))
    assert intact() == set(old_base + second_base[:2])
    lkg = state.last_good()
    assert lkg is not None and lkg.id == second_base[1]

    base = state.store_dir / ref.store_ref.base
    data = base.read_bytes()
    assert b'"u011"' in data
    base.write_bytes(data.replace(b'"u011"', b'"u0l1"', 1))
    assert intact() == set(old_base)
    g = state.get(second_base[0])
    assert g is not None
    with pytest.raises(StateError, match=f"generation {second_base[0]}: base .* damaged"):
        g.snapshot()
    lkg = state.last_good()
    assert lkg is not None and lkg.id == old_base[-1]


def test_pruning_keeps_the_base_of_an_old_current_generation(state: State) -> None:
    snapshot = directory(20)
    rolled_back_to = put(state, snapshot)
    for n in range(4):
        snapshot = changed(snapshot, n, f"z{n}.example")
        put(state, snapshot, new_base=True)
    state.set_current(rolled_back_to)  # `ldapsync rollback`: stays, although older than `keep`
    state.prune(1)
    assert len(state.generations()) == 2
    g = state.get(rolled_back_to)
    assert g is not None and g.snapshot() == directory(20)
    g.verify()
    assert len([f for f in store_files(state) if f.endswith(".base")]) == 2  # the newest one's and its own


def test_a_journal_line_holds_markers_not_refused_secrets(tmp_path: Path) -> None:
    """The agent's journal lines carry the stored (redacted) entries, as a base does."""
    ldif = tmp_path / "users.ldif"
    hostile = (REPO / "fixtures" / "ldif" / "hostile.ldif").read_text()
    ldif.write_text(hostile)
    config = siteconfig.write_config(
        tmp_path,
        exporters=[{"kind": "dovecot-passwd", "path": "passwd"}],
        ldif=ldif,
        safety={"max_deletions": 1000, "max_changes": 1000, "max_deletion_ratio": 1.0, "max_change_ratio": 1.0},
    )
    os.chdir(tmp_path)
    pipeline = Pipeline(config_mod.load(config))
    assert pipeline.run().status == "installed"
    # the entry with the plaintext password gets a forward: its line goes to the journal
    forward = "uid: h-pw-plain\nemailForward: plain@elsewhere.example\n"
    ldif.write_text(hostile.replace("uid: h-pw-plain\n", forward))
    assert pipeline.run().status == "unchanged"  # no output changed, but the directory did
    journals = list(pipeline.state.store_dir.glob("*.journal"))
    assert journals and b"h-pw-plain" in journals[0].read_bytes()
    assert REFUSED_PREFIX.encode() in journals[0].read_bytes()
    assert _stored_secrets(pipeline.state.root) == []


# -- kill -9 at every step of a record ------------------------------------------------------------------
KILL_POINTS = ("fsync", "rename", "replace", "link", "pwrite", "ftruncate", "unlink", "rmdir", "mkdir")
KILLED, DONE = 9, 0


def _record_killed_at(state: State, step: int, gid: str, snapshot: Snapshot, *, new_base: bool) -> bool:
    """state.record in a forked child that dies (os._exit, no cleanup: as kill -9) just before
    its `step`-th file operation; a pwrite is torn (half its bytes written). True if killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            calls = 0

            def hook(name: str, real: Any) -> Any:
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    nonlocal calls
                    calls += 1
                    if calls == step:
                        if name == "pwrite":
                            real(args[0], args[1][: len(args[1]) // 2], args[2])
                        os._exit(KILLED)
                    return real(*args, **kwargs)

                return wrapper

            for name in KILL_POINTS:
                setattr(os, name, hook(name, getattr(os, name)))
            outputs = outputs_of(snapshot)
            state.record(gid, snapshot, outputs, {}, 2, new_base=new_base)
            code = DONE
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (KILLED, DONE), f"the child failed (exit {code}) at step {step}"
    return code == KILLED


def _check_store(state: State, expected: dict[str, Snapshot]) -> None:
    """Every generation verifies and holds exactly what was recorded under its id."""
    gens = state.generations()
    assert gens, "no generation left"
    for g in gens:
        g.verify()
        assert g.snapshot() == expected[g.id], g.id
    assert state.last_good() is not None


@pytest.mark.parametrize("how", ["append", "new-base", "first"])
def test_kill_at_every_step_of_a_record_leaves_the_old_or_the_new_generation(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_mod, "COMPACT_RATIO", 100.0)
    step = 1
    while True:
        state = State(tmp_path / f"step{step}")
        state.ensure()
        expected: dict[str, Snapshot] = {}
        snapshot = directory(20)
        if how != "first":
            for n in range(3):  # a base and two journal lines, the last one in memory
                snapshot = changed(snapshot, n, f"before{n}.example")
                expected[put(state, snapshot, keep=2)] = snapshot
        before = state.current_id()
        target = changed(snapshot, 7, "target.example")
        gid = state.new_generation_id(outputs_of(target))
        expected[gid] = target
        killed = _record_killed_at(state, step, gid, target, new_base=how == "new-base")
        fresh = State(state.root)
        if how != "first" or fresh.generations():
            _check_store(fresh, expected)
            assert fresh.current_id() in (before, gid)
        if not killed:
            assert fresh.current_id() == gid
            break
        # both the writer that was running (its memory from before the kill) and a new process go on
        for writer, forward in ((state, "after.example"), (State(state.root), "fresh.example")):
            target = changed(target, 9, forward)
            expected[put(writer, target, keep=2)] = target
            _check_store(State(state.root), expected)
        leftovers = [p.name for p in (*state.generations_dir.iterdir(), *state.store_dir.iterdir())]
        assert not [n for n in leftovers if n.startswith(".")], f"step {step}: litter {leftovers}"
        assert set(store_files(state)) <= referenced(state), f"step {step}: a file no generation needs"
        step += 1
    print(f"{how}: killed before each of {step - 1} file operations")
    assert step > 10, "the record has fewer file operations than expected: the kills proved little"


N_USERS = 100


def _step(previous: Snapshot, i: int) -> Snapshot:
    """Directory version i from version i-1: one user changed, or deleted every 5th step."""
    entries = {e.uuid: e for e in previous.entries}
    k = (i * 7) % N_USERS
    if i % 5 == 0:
        entries.pop(f"uuid-{k}", None)
    else:
        entries[f"uuid-{k}"] = user(k, f"v{i}.example")
    return Snapshot(sort_entries(entries.values()), f"ldap:step-{i}")


def _versions(upto: int) -> list[Snapshot]:
    out = [directory(N_USERS)]
    for i in range(1, upto + 1):
        out.append(_step(out[-1], i))
    return out


def record_forever(root: str, start: int) -> None:
    """The child of the kill -9 test: records version after version, as the agent does, and
    says on stdout when each one is recorded (the parent waits for that, not for a duration)."""
    state = State(Path(root))
    state.ensure()
    snapshot = _versions(start - 1)[-1]
    i = start
    while True:
        snapshot = _step(snapshot, i)
        outputs = outputs_of(snapshot)
        state.record(state.new_generation_id(outputs), snapshot, outputs, {"step": i}, 4, new_base=i % 23 == 0)
        print(i, flush=True)
        i += 1


def test_kill_9_while_recording_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("LDAPSYNC_CRASH_SEED", "7")))
    root = tmp_path / "state"
    start, killed, waited = 1, 0, 0
    for _ in range(int(os.environ.get("LDAPSYNC_CRASH_ITERATIONS", "12"))):
        code = f"import test_state; test_state.record_forever({str(root)!r}, {start})"
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        # a few recordings complete (however slow the machine), then the kill lands at a
        # random point of a later one
        for _ in range(rng.randint(2, 4)):
            ready, _, _ = select.select([proc.stdout], [], [], 300)
            line = proc.stdout.readline() if ready else b""
            if not line:
                proc.kill()
                _, err = proc.communicate()
                raise AssertionError(f"the recorder stopped before recording: {err.decode()}")
            waited += 1
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
        killed += 1
        state = State(root)
        gens = state.generations()
        assert gens, "nothing recorded before the kill"
        steps = [int(g.meta["step"]) for g in gens]
        versions = _versions(max(steps))
        for g in gens:
            g.verify()
            assert g.snapshot() == versions[int(g.meta["step"])]
            assert g.output("alias") == outputs_of(versions[int(g.meta["step"])])["alias"]
        lkg = state.last_good()
        assert lkg is not None and lkg.id == state.current_id()
        start = max(steps) + 1
    assert killed and start > waited >= 24, f"only {start - 1} generations recorded: the kills proved little"


# -- generations written before the store ---------------------------------------------------------
V1 = REPO / "fixtures" / "state-v1"  # written by the previous version: `ldapsync --once` twice on demo.ldif


def _v1_state(tmp_path: Path) -> State:
    root = tmp_path / "state"
    shutil.copytree(V1, root)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)
    return State(root)


def _v1_site(tmp_path: Path, ldif_text: str) -> Pipeline:
    """The site the fixture was recorded with, its state dir copied in (modes as ldapsync sets them)."""
    root = tmp_path / "state"
    shutil.copytree(V1, root)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)
    (tmp_path / "users.ldif").write_text(ldif_text)
    (tmp_path / "out").mkdir()
    doc = {
        "domain": "example.org",
        "source": {"ldif": {"path": "users.ldif", "base_dn": USERS}},
        "state_dir": "state",
        "exporters": [
            {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "map_type": "none"},
            {"kind": "dovecot-passwd", "path": "out/passwd"},
        ],
    }
    return Pipeline(config_mod.parse(doc, tmp_path / "ldapsync.yaml"))


def test_generations_written_before_the_store_still_serve(tmp_path: Path) -> None:
    v2 = DEMO_LDIF.read_text().replace("emailForward: bob@elsewhere.example", "emailForward: bob@v2.example")
    pipeline = _v1_site(tmp_path, v2)
    state = pipeline.state
    first, second = sorted(g.id for g in state.generations())
    assert state.current_id() == second
    for g in state.generations():
        assert g.store_ref is None and (g.path / "snapshot.json").exists()
        g.verify()
    current = state.get(second)
    assert current is not None and current.snapshot().entries == pipeline.read_source().entries

    # LDAP unreachable, outputs wiped: last-known-good is the old-format generation
    (tmp_path / "users.ldif").rename(tmp_path / "away.ldif")
    result = pipeline.run()
    assert result.status == "last-known-good" and result.generation == second
    assert (tmp_path / "out" / "alias").read_bytes() == current.output("alias")
    assert (tmp_path / "out" / "passwd").read_bytes() == current.output("dovecot-passwd")

    # the directory changes: a new generation in the store, beside the old ones
    (tmp_path / "away.ldif").write_text(v2.replace("bob@v2.example", "bob@v3.example"))
    (tmp_path / "away.ldif").rename(tmp_path / "users.ldif")
    result = pipeline.run()
    assert result.status == "installed" and result.generation not in (None, first, second)
    assert result.generation is not None
    new = state.get(result.generation)
    assert new is not None and new.store_ref is not None
    new.verify()
    assert rollback(pipeline, first).generation == first
    old = state.get(first)
    assert old is not None and (tmp_path / "out" / "alias").read_bytes() == old.output("alias")
    state.set_current(result.generation)
    state.prune(1)
    assert [g.id for g in state.generations()] == [result.generation]
    assert not (state.generations_dir / first).exists()


def test_a_generation_recorded_with_the_pre_sum_digest_still_verifies(tmp_path: Path) -> None:
    """Before the digest became a sum of entry hashes it was the sha256 of the snapshot JSON."""
    state = _v1_site(tmp_path, DEMO_LDIF.read_text()).state
    first, second = sorted(g.id for g in state.generations())
    one, two = state.get(first), state.get(second)
    assert one is not None and two is not None
    meta_path = one.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["snapshot_digest"] = one.snapshot().legacy_digest()
    meta_path.write_text(json.dumps(meta))
    reread = state.get(first)
    assert reread is not None
    reread.verify()
    meta["snapshot_digest"] = two.snapshot().legacy_digest()
    meta_path.write_text(json.dumps(meta))
    reread = state.get(first)
    assert reread is not None
    with pytest.raises(StateError, match="does not match its digest"):
        reread.verify()


# -- any sequence of records, prunes, compactions, restarts and rollbacks ------------------------------
# DNs equal but for case and entries without entryUUID: groups of several entries that sort as one
_names = st.sampled_from(["a", "A", "b", "c"])
_uuids = st.sampled_from([None, "", "u1", "u2"])
_values = st.lists(st.sampled_from(["x", "y", "é", "line\nbreak"]), max_size=2)
_entries = st.builds(
    lambda n, u, v: Entry(f"uid={n},{USERS}", {"uid": tuple(v)} if v else {}, u), _names, _uuids, _values
)
_edit = st.one_of(
    st.tuples(st.just("add"), _entries),
    st.tuples(st.just("remove"), st.integers(0, 20)),
    st.tuples(st.just("modify"), st.integers(0, 20), _values),
)
# a new version: edits to the last one, sharing (mirror) or copying (a full read) the rest; now and then compacted
_record = st.tuples(
    st.just("record"), st.lists(_edit, max_size=3), st.booleans(), st.integers(0, 5).map(lambda n: n == 0)
)
_steps = st.lists(
    st.one_of(
        _record,
        _record,
        _record,
        st.tuples(st.just("prune"), st.integers(1, 4)),
        st.tuples(st.just("restart")),  # a new process: nothing in memory
        st.tuples(st.just("rollback"), st.integers(0, 9)),
        st.tuples(st.just("fail"), st.integers(1, 12)),  # a record that fails at its n-th file operation
    ),
    max_size=16,
)


def _edited(snapshot: Snapshot, edits: list[Any], copy: bool, source: str) -> Snapshot:
    entries = list(snapshot.entries)
    for edit in edits:
        if edit[0] == "add":
            entries.append(edit[1])
        elif entries and edit[0] == "remove":
            del entries[edit[1] % len(entries)]
        elif entries:
            i = edit[1] % len(entries)
            entries[i] = Entry(entries[i].dn, {"uid": tuple(edit[2])}, entries[i].uuid)
    if copy:
        entries = [Entry(e.dn, dict(e.attributes), e.uuid) for e in entries]
    rejections = (Rejection(entries[0].dn, "uid", "bad"),) if entries and len(entries) % 2 else ()
    return Snapshot(sort_entries(entries), source, rejections)


class _Fail(Exception):
    pass


def _failing_at(n: int, real: Any) -> Any:
    """`real` (os.fsync), raising _Fail at its n-th call instead."""
    calls = 0

    def failing(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            raise _Fail
        real(fd)

    return failing


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_steps, ratio=st.sampled_from([0.5, 100.0, 100.0]))
def test_every_kept_generation_restores_exactly_what_was_recorded(steps: list[Any], ratio: float) -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(state_mod, "COMPACT_RATIO", ratio)
        state = State(Path(tmp) / "state")
        state.ensure()
        recorded: dict[str, Snapshot] = {}
        snapshot = Snapshot((), "s0")
        for n, step in enumerate(steps):
            if step[0] == "record":
                snapshot = _edited(snapshot, step[1], step[2], f"s{n}")
                recorded[put(state, snapshot, keep=3, new_base=step[3])] = snapshot
            elif step[0] == "prune":
                state.prune(step[1])
            elif step[0] == "restart":
                state = State(state.root)
            elif step[0] == "rollback" and state.generations():
                ids = [g.id for g in state.generations()]
                state.set_current(ids[step[1] % len(ids)])
            elif step[0] == "fail":
                mp.setattr(os, "fsync", _failing_at(step[1], os.fsync))
                snapshot = _edited(snapshot, [("modify", n, ["failed"])], False, f"s{n}")
                outputs = outputs_of(snapshot)
                gid = state.new_generation_id(outputs)
                recorded[gid] = snapshot  # a failure after the rename leaves it recorded
                with contextlib.suppress(_Fail):
                    state.record(gid, snapshot, outputs, {}, 3)
                mp.undo()
                mp.setattr(state_mod, "COMPACT_RATIO", ratio)
            gens = state.generations()
            assert state.current_id() in {None, *(g.id for g in gens)}
            for g in gens:
                assert g.snapshot() == recorded[g.id], f"step {n} {step[0]}: generation {g.id}"
                g.verify()
            if step[0] in ("record", "prune"):  # a failed record's files are gone by the next prune
                tail = state.store._tail.ref.files() if state.store._tail else ()
                assert set(store_files(state)) <= referenced(state) | set(tail)
