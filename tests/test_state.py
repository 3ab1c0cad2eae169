"""The state directory: crash-safe generations, pruning, damage detection, locking, modes."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentutil import AgentProcess, AgentSetup, wait_until
from slapd import Slapd, ssha

from ldapsync import config as config_mod
from ldapsync import validate, watch
from ldapsync.config import Config
from ldapsync.directory import REFUSED_PREFIX, Entry, Snapshot
from ldapsync.errors import StateError
from ldapsync.fileio import write_atomic
from ldapsync.guard import Window
from ldapsync.state import LockHolder, State
from ldapsync.sync import Pipeline


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


def test_lock_names_its_holder_and_waits_briefly_before_refusing(state: State) -> None:
    held = state.acquire("agent")
    try:
        assert (state.root / "lock").read_text() == f"{os.getpid()} agent\n"
        assert state.lock_holder() == LockHolder(os.getpid(), "agent")
        started = time.monotonic()
        with pytest.raises(StateError, match=rf"another ldapsync agent \(PID {os.getpid()}\) holds .*lock"):
            state.acquire("once", wait=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        held.release()
    assert state.lock_holder() is None
    with state.lock(role="once"):
        assert state.lock_holder() == LockHolder(os.getpid(), "once")
        with pytest.raises(StateError, match=r"another ldapsync \(once, PID \d+\)"):
            state.acquire("rollback")


def test_lock_holder_never_creates_or_writes(tmp_path: Path) -> None:
    missing = State(tmp_path / "nothing-here")
    assert missing.lock_holder() is None
    assert not missing.root.exists()
    state = State(tmp_path / "state")
    state.ensure()
    assert state.lock_holder() is None
    assert not (state.root / "lock").exists()
    state.acquire("agent").release()
    before = (state.root / "lock").stat()
    assert state.lock_holder() is None
    after = (state.root / "lock").stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


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


# -- trust: the state dir and its files must be ours -------------------------------------------
NOBODY = pwd.getpwnam("nobody")


def test_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "state"
    State(root).ensure()
    os.chown(root, NOBODY.pw_uid, NOBODY.pw_gid)  # still 0700: only its owner can write it
    with pytest.raises(StateError) as err:
        State(root).ensure()
    assert str(root) in str(err.value) and "owned by nobody" in str(err.value)


@pytest.mark.parametrize("target", ["current", "held/meta.json", "generation-snapshot", "generation-dir", "guard.json"])
def test_a_file_in_the_state_dir_not_ours_is_refused(state: State, target: str) -> None:
    gid = record(state, 1)
    state.hold(snap(1), {"reason": "test"})
    state.save_guard_window(Window())
    path = {
        "generation-snapshot": state.generations_dir / gid / "snapshot.json",
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


@pytest.mark.parametrize("name", ["follow.json", "follow-snapshot.json"])
@pytest.mark.parametrize("how", ["chown-nobody", "mode-0644"])
def test_follow_cache_not_ours_or_too_open_is_ignored(tmp_path: Path, name: str, how: str) -> None:
    cfg = follow_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    watch.save_follow_state(state, cfg, snap(3), b"cookie")
    assert watch.load_follow_state(state, cfg) == (snap(3), b"cookie")
    path = state.root / name
    if how == "chown-nobody":
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    else:
        path.chmod(0o644)
    assert watch.load_follow_state(state, cfg) is None, "an untrusted follow cache was used"
    State(state.root).ensure()  # a cache, ignored and rewritten: not a reason to stop


def _plant_follow_state(state_dir: Path, password: str, owner: pwd.struct_passwd) -> None:
    """What a user who can write the state dir did: every hash replaced, checksums fixed up."""
    snap_path, doc_path = state_dir / "follow-snapshot.json", state_dir / "follow.json"
    data = json.loads(snap_path.read_bytes())
    for _dn, _uuid, attrs in data["entries"]:
        if "mailpassword" in attrs:
            attrs["mailpassword"] = [password]
    raw = json.dumps(data).encode()
    snap_path.unlink()  # a hard link to a generation's snapshot: do not rewrite that one
    snap_path.write_bytes(raw)
    doc = json.loads(doc_path.read_bytes())
    doc["snapshot_sha256"] = hashlib.sha256(raw).hexdigest()
    doc_path.write_text(json.dumps(doc))
    for p in (snap_path, doc_path):
        p.chmod(0o600)
        os.chown(p, owner.pw_uid, owner.pw_gid)


@pytest.mark.slapd
def test_planted_follow_state_does_not_reach_the_passwd_file_after_a_restart(tmp_path: Path, slapd: Slapd) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "agent", slapd)
    with AgentProcess(setup.config) as agent:
        agent.wait_log("sync done", timeout=60)
        wait_until(lambda: (setup.state / "follow.json").exists(), 30)
        agent.terminate()
    good = setup.passwd.read_bytes()
    attacker = ssha("attacker")
    assert good.count(b"\n") > 10

    # planted by another user: ignored, the agent reads the directory afresh
    _plant_follow_state(setup.state, attacker, NOBODY)
    with AgentProcess(setup.config) as agent:
        agent.wait_log("state file not trusted; ignoring it", timeout=60)
        agent.wait_log("sync done", timeout=60)
        wait_until(lambda: (setup.state / "follow.json").stat().st_uid == os.geteuid(), 30)
        agent.terminate()
    assert setup.passwd.read_bytes() == good
    assert (setup.state / "follow-snapshot.json").stat().st_uid == os.geteuid(), "the untrusted cache was kept"

    # planted with our own identity (the cache is trusted): the changed-hash guard holds it
    _plant_follow_state(setup.state, attacker, pwd.getpwuid(os.geteuid()))
    with AgentProcess(setup.config) as agent:
        held = agent.wait_log(
            "change held for review: run `ldapsync --dry-run` to see it, `ldapsync approve` to install it", timeout=60
        )
        agent.terminate()
    assert "values (100%) would change (max_change_ratio 0.2)" in held["reason"]
    assert setup.passwd.read_bytes() == good
    assert attacker.encode() not in setup.passwd.read_bytes()


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
    assert marker.encode() in (gen.path / "snapshot.json").read_bytes()
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
    assert (setup.state / "held" / "snapshot.json").exists()
    assert _stored_secrets(setup.state) == []

    with AgentProcess(setup.config) as agent:  # the held change again, and the follow cache
        agent.wait_log("sync done", timeout=60)
        wait_until(lambda: (setup.state / "follow-snapshot.json").exists(), 30)
        agent.terminate()
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


def test_a_generation_recorded_with_the_previous_digest_still_verifies(state: State) -> None:
    """Before the digest became a sum of entry hashes it was the sha256 of the snapshot JSON."""
    gid = record(state, 3)
    meta_path = state.generations_dir / gid / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["snapshot_digest"] = snap(3).legacy_digest()
    meta_path.write_text(json.dumps(meta))
    generation = state.get()
    assert generation is not None
    generation.verify()
    meta["snapshot_digest"] = snap(4).legacy_digest()
    meta_path.write_text(json.dumps(meta))
    generation = state.get()
    assert generation is not None
    with pytest.raises(StateError, match="does not match its digest"):
        generation.verify()
