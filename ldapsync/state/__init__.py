"""The state directory: generations (last-known-good), held change, lock, small records.

Layout under state_dir (0700, files 0600 -- generations hold password hashes):
  lock                 one writer per state_dir (ldapsync.state.lock)
  generations/, store/, current
                       recorded generations and the directory they came from
                       (ldapsync.state.generations, ldapsync.state.store)
  held/                a change a safety guard held back (ldapsync.state.held)
  status.json          the last attempt, for `ldapsync status` and `check`
  guard.json           what the guards' rolling window counted (see ldapsync.guard)
  follow.json          the agent's sync cookie and the snapshot it goes with (ldapsync.mirror)
Everything in it must belong to the running user (ldapsync.state.trust).

`State` is the one object callers hold: it owns one instance of each part and forwards to
them, so that the writer's in-memory knowledge (the last recorded snapshot) lives in one place.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from ldapsync.directory import Snapshot
from ldapsync.errors import StateError
from ldapsync.fileio import write_atomic
from ldapsync.guard import Window
from ldapsync.state import lock as lock_mod
from ldapsync.state import trust
from ldapsync.state.generations import COMPACT_RATIO, STORE_DIR, Changes, Generation, Generations, StoreRef, sha256
from ldapsync.state.held import Held, HeldChange, digest_of, is_held_id
from ldapsync.state.lock import LockHolder, StateLock
from ldapsync.state.trust import CACHE_FILES, untrusted

__all__ = [
    "CACHE_FILES",
    "COMPACT_RATIO",
    "GUARD_FILE",
    "STORE_DIR",
    "Generation",
    "HeldChange",
    "LockHolder",
    "State",
    "StateLock",
    "StoreRef",
    "sha256",
    "untrusted",
]

log = structlog.get_logger(__name__)

GUARD_FILE = "guard.json"


class State:
    def __init__(self, root: Path):
        self.root = root
        self.store = Generations(root)
        self.held_change = Held(root)
        self._checked = False

    @property
    def generations_dir(self) -> Path:
        return self.store.generations_dir

    @property
    def store_dir(self) -> Path:
        return self.store.store_dir

    @property
    def held_dir(self) -> Path:
        return self.held_change.dir

    def inherit(self, other: State) -> None:
        """Take over what another State of the same directory knows in memory (see Generations)."""
        self.store.inherit(other.store)

    # -- trust -------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the state dir 0700; refuse one that others can read (it holds hashes), or
        one that is not ours, or that holds files that are not ours (checked once)."""
        trust.ensure_root(self.root)
        if not self._checked:
            trust.check_contents(self.root)
            self._checked = True
        self.generations_dir.mkdir(mode=0o700, exist_ok=True)

    def trusted(self, *names: str) -> bool:
        """Whether the state dir and these files in it are ours and private; logs why not."""
        return trust.trusted(self.root, *names)

    # -- lock --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, wait: bool | float = False, role: str = "sync") -> Iterator[None]:
        """Hold state_dir/lock for a block; wait=True waits for ever, a number that many seconds."""
        with lock_mod.locked(self.root, wait=wait, role=role):
            yield

    def acquire(self, role: str, *, wait: float | None = 0.0) -> StateLock:
        """Take state_dir/lock (see ldapsync.state.lock.acquire)."""
        return lock_mod.acquire(self.root, role, wait=wait)

    def lock_holder(self) -> LockHolder | None:
        """Who holds state_dir/lock, or None if nobody; never creates, writes or waits."""
        return lock_mod.holder(self.root)

    # -- generations -------------------------------------------------------------------
    def new_generation_id(self, outputs: Mapping[str, bytes], hashes: Mapping[str, str] | None = None) -> str:
        return self.store.new_generation_id(outputs, hashes)

    def record(
        self,
        gid: str,
        snapshot: Snapshot,
        outputs: Mapping[str, bytes],
        meta: Mapping[str, Any],
        keep: int,
        hashes: Mapping[str, str] | None = None,
        *,
        new_base: bool = False,
        changes: Changes | None = None,
    ) -> Generation:
        """Record a generation and make it current (see Generations.record)."""
        return self.store.record(gid, snapshot, outputs, meta, keep, hashes, new_base=new_base, changes=changes)

    def resume(self, gid: str) -> Snapshot:
        """The snapshot of generation `gid`, or of the held change with that id, for a mirror
        to carry on from; StateError if unusable.

        A held change approved since is found in the generation that installed its content:
        the follow state that named it stays usable."""
        if is_held_id(gid):
            held = self.held_change.read()
            if held is not None and held.id == gid:
                return held.snapshot
            # approved since: the generation that installed it holds the same directory
            digest = digest_of(gid)
            same = next((g for g in self.generations() if g.meta.get("snapshot_digest") == digest), None)
            if same is None:
                raise StateError(f"no held change {gid}, and no generation with its content")
            return self.store.resume(same.id)
        return self.store.resume(gid)

    def prune(self, keep: int) -> None:
        self.store.prune(keep)

    def sweep(self) -> None:
        self.store.sweep()

    def generations(self) -> list[Generation]:
        return self.store.generations()

    def current_id(self) -> str | None:
        return self.store.current_id()

    def get(self, gid: str | None = None) -> Generation | None:
        """A generation by id, or the last-known-good one (current, else newest readable).

        A held change's id gives it as a Generation without outputs (its snapshot and digest):
        the follow state names it instead of writing the directory again.
        """
        if gid is not None and is_held_id(gid):
            try:
                meta = self.held_change.meta()
            except StateError:
                return None
            if meta is None or meta.get("id") != gid:
                return None
            return Generation(gid, self.held_dir / gid, {k: v for k, v in meta.items() if k != "hashes"})
        return self.store.get(gid)

    def last_good(self) -> Generation | None:
        return self.store.last_good()

    def set_current(self, gid: str) -> None:
        self.store.set_current(gid)

    # -- held change -------------------------------------------------------------------
    def hold(self, snapshot: Snapshot, meta: Mapping[str, Any]) -> str:
        """Keep `snapshot` as the held change; returns its id (see ldapsync.state.held)."""
        return self.held_change.hold(snapshot, meta)

    def held(self) -> tuple[Snapshot, dict[str, Any]] | None:
        """The held change, None if there is none; never modifies it (readers must not write).

        An unreadable one raises StateError; the next successful sync replaces it.
        """
        held = self.held_change.read()
        return None if held is None else (held.snapshot, dict(held.meta))

    def clear_held(self) -> None:
        self.held_change.clear()

    # -- small records -----------------------------------------------------------------
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
