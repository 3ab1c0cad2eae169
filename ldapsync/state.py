"""The state directory: generations (last-known-good), held changes, sync cookie, status.

Layout under state_dir (0700, files 0600 -- generations hold password hashes):
  lock                      flock: one writer per state_dir (the agent for its lifetime); "PID ROLE"
  generations/<id>/         meta.json, snapshot.json, outputs/<name>
  current                   id of the newest installed generation
  held/                     a change a safety guard held back: meta.json, snapshot.json
  status.json               the last attempt, for `ldapsync status` and `check`
  guard.json                what the guards' rolling window counted (see ldapsync.guard)
Every file is written to a temp name, fsynced and renamed; a generation directory is
complete before it gets its name, so a crash leaves either no generation or a whole one.

Trust: ldapsync runs as root and installs what it reads from here (last-known-good, held
changes), so the directory and everything in it must belong to the running user. Anything
else is refused with the path and its owner; the follow cache is ignored instead (its
reader falls back to a full read).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ldapsync.directory import Snapshot
from ldapsync.errors import StateError
from ldapsync.fileio import fsync_dir, write_atomic
from ldapsync.guard import Window

log = structlog.get_logger(__name__)

GUARD_FILE = "guard.json"
# Caches with their own reader that re-verifies them (and ignores them if untrusted): the
# follow state of ldapsync.watch. Everything else in the state dir is refused if not ours.
CACHE_FILES = frozenset({"follow.json", "follow-snapshot.json"})


def untrusted(path: Path, *, private: bool = False) -> str | None:
    """Why `path` in the state dir must not be trusted, or None (also when it does not exist).

    Not ours, a symlink, or writable by others; with `private`, any group/other access.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by {_user(st.st_uid)}, not by {_user(os.geteuid())} (the user ldapsync runs as)"
    too_open = (stat.S_IRWXG | stat.S_IRWXO) if private else (stat.S_IWGRP | stat.S_IWOTH)
    if st.st_mode & too_open:
        how = "accessible" if private else "writable"
        return f"{path} is {how} by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


LOCK_FILE = "lock"
LOCK_POLL = 0.05  # seconds between attempts while waiting for another holder


@dataclass(frozen=True, slots=True)
class Generation:
    id: str
    path: Path
    meta: Mapping[str, Any]

    def snapshot(self) -> Snapshot:
        try:
            return Snapshot.from_json((self.path / "snapshot.json").read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateError(f"generation {self.id}: snapshot unreadable: {e}") from e

    def verify(self) -> None:
        """Raise StateError unless snapshot and outputs are complete and match meta.json."""
        snap = self.snapshot()
        want = self.meta.get("snapshot_digest")
        if snap.digest() != want and snap.legacy_digest() != want:
            raise StateError(f"generation {self.id}: snapshot does not match its digest")
        for name in self.meta.get("hashes", {}):
            try:
                self.output(name)
            except OSError as e:
                raise StateError(f"generation {self.id}: output {name} unreadable: {e.strerror}") from e

    def output(self, name: str) -> bytes:
        data = (self.path / "outputs" / name).read_bytes()
        want = self.meta.get("hashes", {}).get(name)
        if want and hashlib.sha256(data).hexdigest() != want:
            raise StateError(f"generation {self.id}: output {name} does not match its hash")
        return data


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


def _describe(holder: LockHolder | None) -> str:
    if holder is None or holder.pid is None:
        return "another ldapsync"
    if holder.role == "agent":
        return f"another ldapsync agent (PID {holder.pid})"
    return f"another ldapsync ({holder.role + ', ' if holder.role else ''}PID {holder.pid})"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class State:
    def __init__(self, root: Path):
        self.root = root
        self.generations_dir = root / "generations"
        self._checked = False

    def ensure(self) -> None:
        """Create the state dir 0700; refuse one that others can read (it holds hashes), or
        one that is not ours, or that holds files that are not ours (checked once)."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.root.stat()
        except OSError as e:
            raise StateError(f"state_dir {self.root}: {e.strerror}") from e
        if st.st_uid != os.geteuid():
            raise StateError(
                f"state_dir {self.root} is owned by {_user(st.st_uid)}, not by {_user(os.geteuid())} "
                "(the user ldapsync runs as): another user could plant what ldapsync installs; "
                "remove it or chown -R it"
            )
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StateError(
                f"state_dir {self.root} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); it holds password hashes: chmod 0700 it"
            )
        if not self._checked:
            self._check_contents()
            self._checked = True
        self.generations_dir.mkdir(mode=0o700, exist_ok=True)

    def _check_contents(self) -> None:
        for top, dirs, files in os.walk(self.root):
            here = Path(top)
            for name in [*dirs, *files]:
                if here == self.root and name in CACHE_FILES:
                    continue
                problem = untrusted(here / name)
                if problem:
                    raise StateError(f"state_dir: {problem}; remove it or chown it")

    def trusted(self, *names: str) -> bool:
        """Whether the state dir and these files in it are ours and private; logs why not."""
        for path in (self.root, *(self.root / n for n in names)):
            problem = untrusted(path, private=True)
            if problem:
                log.error("state file not trusted; ignoring it", problem=problem)
                return False
        return True

    @contextlib.contextmanager
    def lock(self, *, wait: bool | float = False, role: str = "sync") -> Iterator[None]:
        """Hold state_dir/lock for a block; wait=True waits for ever, a number that many seconds."""
        held = self.acquire(role, wait=None if wait is True else float(wait))
        try:
            yield
        finally:
            held.release()

    def acquire(self, role: str, *, wait: float | None = 0.0) -> StateLock:
        """Take state_dir/lock (flock) and write "PID ROLE" into it; one writer per state dir.

        wait: seconds to wait for another holder (None: for ever); then StateError naming the
        holder's PID and role. The agent holds it for its lifetime, one-shot commands per run.
        """
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            deadline = None if wait is None else time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise StateError(f"{_describe(self.lock_holder())} holds {path}") from None
                    time.sleep(LOCK_POLL)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return StateLock(fd, path)

    def lock_holder(self) -> LockHolder | None:
        """Who holds state_dir/lock, or None if nobody; never creates, writes or waits."""
        try:
            fd = os.open(self.root / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"{self.root / LOCK_FILE}: {e.strerror}") from e
        try:
            try:  # a shared lock is granted only if no writer holds it; released at once
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return LockHolder.parse(os.pread(fd, 256, 0))
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    # -- generations ---------------------------------------------------------------
    def new_generation_id(self, outputs: Mapping[str, bytes], hashes: Mapping[str, str] | None = None) -> str:
        """`hashes` (output name -> sha256), when the caller has them, saves hashing again."""
        if hashes is None:
            hashes = {n: sha256(d) for n, d in outputs.items()}
        digest = sha256(b"".join(hashes[n].encode() for n in sorted(hashes)))[:8]
        base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{digest}"
        gid, n = base, 1
        while (self.generations_dir / gid).exists():
            n += 1
            gid = f"{base}.{n}"
        return gid

    def record(
        self,
        gid: str,
        snapshot: Snapshot,
        outputs: Mapping[str, bytes],
        meta: Mapping[str, Any],
        keep: int,
        hashes: Mapping[str, str] | None = None,
    ) -> Generation:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.generations_dir))
        try:
            (tmp / "outputs").mkdir(mode=0o700)
            for name, data in outputs.items():
                _write_new(tmp / "outputs" / name, data)
            _write_new(tmp / "snapshot.json", snapshot.to_json())
            full_meta = {
                **meta,
                "id": gid,
                "time": time.time(),
                "snapshot_digest": snapshot.digest(),
                "hashes": dict(hashes) if hashes is not None else {n: sha256(d) for n, d in outputs.items()},
                "lines": {n: d.count(b"\n") for n, d in outputs.items()},
            }
            _write_new(tmp / "meta.json", json.dumps(full_meta, indent=1, sort_keys=True).encode())
            fsync_dir(tmp / "outputs")
            fsync_dir(tmp)
            os.rename(tmp, self.generations_dir / gid)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.generations_dir)
        write_atomic(self.root / "current", gid.encode())
        self.prune(keep)
        return Generation(gid, self.generations_dir / gid, full_meta)

    def prune(self, keep: int) -> None:
        current = self.current_id()
        for g in self.generations()[keep:]:
            if g.id != current:
                shutil.rmtree(g.path, ignore_errors=True)
        self.sweep()

    def sweep(self) -> None:
        """Remove what a killed record() left behind (its .tmp-* directory); the lock holder's job."""
        for leftover in self.generations_dir.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def generations(self) -> list[Generation]:
        """Readable generations, newest first; a damaged one is reported and skipped."""
        out: list[Generation] = []
        if not self.generations_dir.is_dir():
            return out
        for path in sorted(self.generations_dir.iterdir(), reverse=True):
            if path.name.startswith("."):
                continue
            try:
                meta = json.loads((path / "meta.json").read_bytes())
                if meta.get("id") != path.name:
                    raise ValueError("id does not match directory name")
            except (OSError, ValueError) as e:
                log.error("damaged generation ignored", generation=path.name, error=str(e))
                continue
            out.append(Generation(path.name, path, meta))
        # ids sort by second only (the rest is a content hash): the recorded time orders them
        out.sort(key=lambda g: (_time(g.meta), g.id), reverse=True)
        return out

    def current_id(self) -> str | None:
        try:
            return (self.root / "current").read_text().strip() or None
        except FileNotFoundError:
            return None

    def get(self, gid: str | None = None) -> Generation | None:
        """A generation by id, or the last-known-good one (current, else newest readable)."""
        gens = self.generations()
        if gid is not None:
            return next((g for g in gens if g.id == gid), None)
        current = self.current_id()
        return next((g for g in gens if g.id == current), gens[0] if gens else None)

    def last_good(self) -> Generation | None:
        """The current generation if intact, else the newest intact one; damage is logged."""
        gens = self.generations()
        current = self.current_id()
        for g in sorted(gens, key=lambda g: g.id != current):
            try:
                g.verify()
            except StateError as e:
                log.error("damaged generation skipped", generation=g.id, error=str(e))
                continue
            return g
        return None

    def set_current(self, gid: str) -> None:
        write_atomic(self.root / "current", gid.encode())

    # -- held changes, status, cookie ---------------------------------------------------
    @property
    def held_dir(self) -> Path:
        return self.root / "held"

    def hold(self, snapshot: Snapshot, meta: Mapping[str, Any]) -> None:
        self.held_dir.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.held_dir / "snapshot.json", snapshot.to_json())
        write_atomic(self.held_dir / "meta.json", json.dumps({**meta, "time": time.time()}, indent=1).encode())

    def held(self) -> tuple[Snapshot, dict[str, Any]] | None:
        """The held change, None if there is none; never modifies it (readers must not write).

        An unreadable one raises StateError; the next successful sync replaces it.
        """
        try:
            snap = Snapshot.from_json((self.held_dir / "snapshot.json").read_bytes())
            meta = json.loads((self.held_dir / "meta.json").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateError(f"held change in {self.held_dir} unreadable: {e}") from e
        return snap, meta

    def clear_held(self) -> None:
        shutil.rmtree(self.held_dir, ignore_errors=True)

    # -- the guards' window ---------------------------------------------------------------
    def guard_window(self) -> Window:
        """What the guards counted recently; empty (logged) if missing or unreadable."""
        try:
            return Window.from_json((self.root / GUARD_FILE).read_bytes())
        except FileNotFoundError:
            return Window()
        except (OSError, ValueError) as e:
            log.error("guard window unreadable; counting from now", file=GUARD_FILE, error=str(e))
            return Window()

    def save_guard_window(self, window: Window) -> None:
        write_atomic(self.root / GUARD_FILE, window.to_json())

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.root / name).read_bytes())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("state file unreadable; starting it afresh", file=name, error=str(e))
            return {}

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        write_atomic(self.root / name, json.dumps(data, indent=1, sort_keys=True).encode())


def _time(meta: Mapping[str, Any]) -> float:
    t = meta.get("time")
    return float(t) if isinstance(t, int | float) else 0.0


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
