"""state_dir/lock: one writer per state directory.

The agent holds it for its lifetime, one-shot commands (sync, approve, rollback) per run; the
holder writes "PID ROLE" into the file so that a refused command can say who holds it. The
kernel drops an flock when its holder dies, so a kill -9 never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ldapsync.errors import StateError

LOCK_FILE = "lock"
LOCK_POLL = 0.05  # seconds between attempts while waiting for another holder


@dataclass(frozen=True, slots=True)
class LockHolder:
    """The process holding state_dir/lock, as it wrote itself into the file."""

    pid: int | None
    role: str | None

    @classmethod
    def parse(cls, data: bytes) -> LockHolder:
        fields = data.decode("ascii", "replace").split()
        pid = int(fields[0]) if fields and fields[0].isdigit() else None
        return cls(pid, fields[1] if len(fields) > 1 else None)


class StateLock:
    """state_dir/lock, held by this process until release() (or exit: the kernel drops it)."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def describe(holder: LockHolder | None) -> str:
    if holder is None or holder.pid is None:
        return "another ldapsync"
    if holder.role == "agent":
        return f"another ldapsync agent (PID {holder.pid})"
    return f"another ldapsync ({holder.role + ', ' if holder.role else ''}PID {holder.pid})"


def acquire(root: Path, role: str, *, wait: float | None = 0.0) -> StateLock:
    """Take root/lock (flock) and write "PID ROLE" into it.

    wait: seconds to wait for another holder (None: for ever); then StateError naming the
    holder's PID and role.
    """
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise StateError(f"{describe(holder(root))} holds {path}") from None
                time.sleep(LOCK_POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return StateLock(fd, path)


@contextlib.contextmanager
def locked(root: Path, *, wait: bool | float = False, role: str = "sync") -> Iterator[None]:
    """Hold root/lock for a block; wait=True waits for ever, a number that many seconds."""
    held = acquire(root, role, wait=None if wait is True else float(wait))
    try:
        yield
    finally:
        held.release()


def holder(root: Path) -> LockHolder | None:
    """Who holds root/lock, or None if nobody; never creates, writes or waits."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{root / LOCK_FILE}: {e.strerror}") from e
    try:
        try:  # a shared lock is granted only if no writer holds it; released at once
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockHolder.parse(os.pread(fd, 256, 0))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
