"""state_dir/lock: exclusive, names its holder, waits a bounded time, never written by readers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldapsync.errors import StateError
from ldapsync.state import lock


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "state"
    r.mkdir(mode=0o700)
    return r


def test_lock_is_exclusive(root: Path) -> None:
    with lock.locked(root), pytest.raises(StateError, match="another ldapsync"), lock.locked(root):
        pass
    with lock.locked(root):  # released
        pass


def test_lock_names_its_holder_and_waits_briefly_before_refusing(root: Path) -> None:
    held = lock.acquire(root, "agent")
    try:
        assert (root / "lock").read_text() == f"{os.getpid()} agent\n"
        assert lock.holder(root) == lock.LockHolder(os.getpid(), "agent")
        started = time.monotonic()
        with pytest.raises(StateError, match=rf"another ldapsync agent \(PID {os.getpid()}\) holds .*lock"):
            lock.acquire(root, "once", wait=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        held.release()
    assert lock.holder(root) is None
    with lock.locked(root, role="once"):
        assert lock.holder(root) == lock.LockHolder(os.getpid(), "once")
        with pytest.raises(StateError, match=r"another ldapsync \(once, PID \d+\)"):
            lock.acquire(root, "rollback")


def test_lock_holder_never_creates_or_writes(tmp_path: Path, root: Path) -> None:
    missing = tmp_path / "nothing-here"
    assert lock.holder(missing) is None
    assert not missing.exists()
    assert lock.holder(root) is None
    assert not (root / "lock").exists()
    lock.acquire(root, "agent").release()
    before = (root / "lock").stat()
    assert lock.holder(root) is None
    after = (root / "lock").stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_a_dead_holder_leaves_no_stale_lock(root: Path) -> None:
    """The kernel drops an flock with its process: a kill -9 never blocks the next writer."""
    code = (
        "import sys, time; from pathlib import Path; from ldapsync.state import lock; "
        "lock.acquire(Path(sys.argv[1]), 'agent'); print('held', flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "held\n"
            assert lock.holder(root) == lock.LockHolder(proc.pid, "agent")
        finally:
            proc.kill()
            proc.wait()
    assert lock.holder(root) is None
    lock.acquire(root, "once").release()


@pytest.mark.parametrize(
    ("data", "holder", "text"),
    [
        (b"123 agent\n", lock.LockHolder(123, "agent"), "another ldapsync agent (PID 123)"),
        (b"77 once\n", lock.LockHolder(77, "once"), "another ldapsync (once, PID 77)"),
        (b"77\n", lock.LockHolder(77, None), "another ldapsync (PID 77)"),
        (b"", lock.LockHolder(None, None), "another ldapsync"),
        (b"\xff garbage", lock.LockHolder(None, "garbage"), "another ldapsync"),
    ],
)
def test_holder_is_parsed_and_described_whatever_the_file_holds(
    data: bytes, holder: lock.LockHolder, text: str
) -> None:
    assert lock.LockHolder.parse(data) == holder
    assert lock.describe(holder) == text
