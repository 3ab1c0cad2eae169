"""Run admin hooks (check hooks on staged files, reload hooks after install).

No shell: argv lists only. Each hook runs in its own session (so its own process group)
with stdin closed and stdout+stderr on one pipe. Bounds that hold whatever the hook does:

- time: at ``timeout`` the hook's process group and every process still holding its output
  pipe are killed, and reading stops at the deadline even if a detached descendant
  (``setsid cmd &``) could keep the pipe open forever;
- leftovers: when the hook itself exits, the same kill sweeps away what it left behind, so
  the hook's own exit status decides and a lingering child cannot stall the sync;
- memory: only the last ``OUTPUT_CAP`` bytes of output are kept; how much was dropped is
  logged.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from ldapsync.errors import HookError

log = structlog.get_logger(__name__)

OUTPUT_CAP = 64 * 1024  # bytes of a hook's output kept (the tail)
DRAIN_GRACE = 1.0  # seconds to read what killed leftovers wrote before their pipe closes
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class HookRun:
    """What one hook did: exit status (None if killed at the timeout) and its output tail."""

    returncode: int | None
    output: bytes
    dropped: int  # bytes of earlier output not kept
    killed: int  # leftover processes killed after the hook exited or timed out

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace").strip()


def run(commands: Sequence[Sequence[str]], env: Mapping[str, str], timeout: float, *, phase: str) -> None:
    """Run each command in order; raise HookError on the first failure."""
    for argv in commands:
        full_env = {**os.environ, **env, "LDAPSYNC_PHASE": phase}
        res = run_one(argv, full_env, timeout, phase=phase)
        name = " ".join(argv)
        output = f": {res.text[-500:]}" if res.text else ""
        dropped = f" ({res.dropped} earlier bytes of output dropped)" if res.dropped else ""
        if res.returncode is None:
            raise HookError(f"{phase} hook {name} timed out after {timeout:g}s{output}{dropped}")
        if res.returncode != 0:
            raise HookError(f"{phase} hook {name} exited {res.returncode}{output}{dropped}")
        log.info(
            "hook ok",
            phase=phase,
            hook=argv[0],
            output=res.text[-200:] or None,
            **({"output_dropped_bytes": res.dropped} if res.dropped else {}),
            **({"leftovers_killed": res.killed} if res.killed else {}),
        )


def run_one(argv: Sequence[str], env: Mapping[str, str], timeout: float, *, phase: str = "hook") -> HookRun:
    """Run one hook within `timeout` seconds; never waits longer than that plus DRAIN_GRACE."""
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        raise HookError(f"{phase} hook {argv[0]}: cannot run: {e.strerror}") from e
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    tail = _Tail(OUTPUT_CAP)
    killed = 0
    try:
        eof = _read_until(fd, tail, deadline, lambda: _exited(proc.pid))
        exited = _exited(proc.pid)
        while eof and not exited and time.monotonic() < deadline:  # output closed, exit imminent
            time.sleep(0.005)
            exited = _exited(proc.pid)
        # The hook exited or its time is up: whatever is left of it goes, before the zombie
        # is reaped (a reaped pid could be reused as a process group id).
        killed = _kill_leftovers(proc.pid, None if eof else fd)
        if not eof:
            eof = _read_until(fd, tail, time.monotonic() + DRAIN_GRACE / 2, lambda: False)
            if not eof:
                killed += _kill_leftovers(proc.pid, fd)
                _read_until(fd, tail, time.monotonic() + DRAIN_GRACE / 2, lambda: False)
        proc.wait()
    finally:
        proc.stdout.close()
        if proc.returncode is None:  # an exception above: never leave the hook running
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if killed:
        log.warning("killed processes a hook left behind", phase=phase, hook=argv[0], processes=killed)
    return HookRun(proc.returncode if exited else None, tail.data(), tail.dropped, killed)


def _exited(pid: int) -> bool:
    """True once `pid` has exited, without reaping it."""
    res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return res is not None


def _read_until(fd: int, tail: _Tail, deadline: float, done: Callable[[], bool]) -> bool:
    """Read `fd` into `tail` until EOF (True), `done()` or the deadline (False)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.05))
        if ready:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                return True
            if chunk:
                tail.add(chunk)
        if done():
            # the hook exited: take what is buffered, then stop waiting on its descendants
            # (briefly: a leftover child may go on writing as fast as we read)
            stop = min(deadline, time.monotonic() + 0.1)
            while time.monotonic() < stop:
                try:
                    chunk = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    return False
                if not chunk:
                    return True
                tail.add(chunk)
            return False


def _kill_leftovers(pgid: int, pipe_fd: int | None) -> int:
    """SIGKILL the hook's process group and every process holding its output pipe.

    At EOF (pipe_fd None) nobody holds the pipe, so /proc need not be searched.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if pipe_fd is None:
        return 0
    me = os.getpid()
    killed = 0
    for pid in _pipe_holders(pipe_fd):
        if pid in (me, pgid):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _pipe_holders(pipe_fd: int) -> set[int]:
    """Pids of processes with the other end of our pipe open (found through /proc)."""
    target = f"pipe:[{os.fstat(pipe_fd).st_ino}]"
    holders: set[int] = set()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return holders
    for pid in pids:
        try:
            with os.scandir(f"/proc/{pid}/fd") as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if os.readlink(entry.path) == target:
                            holders.add(pid)
                            break
        except OSError:
            continue
    return holders


class _Tail:
    """The last `cap` bytes written to it, and how many bytes before them were dropped."""

    __slots__ = ("_buf", "_cap", "dropped")

    def __init__(self, cap: int):
        self._buf = bytearray()
        self._cap = cap
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self._buf += chunk
        excess = len(self._buf) - self._cap
        if excess > 0:
            del self._buf[:excess]
            self.dropped += excess

    def data(self) -> bytes:
        return bytes(self._buf)
