"""Generations: what was installed, kept as last-known-good, and the directory it came from.

Layout under state_dir:
  generations/<id>/         meta.json, outputs/<name> (hard links to an earlier generation's
                            file when the bytes are the same); generations recorded before the
                            store also have snapshot.json, and still read
  store/<base>.base         a whole directory snapshot (Snapshot JSON), written once
  store/<base>.journal      appended per generation: the entries that changed (ldapsync.state.store)
  current                   id of the newest installed generation
A generation's meta.json names its base and how many bytes of the base's journal are its,
with the sha256 of both: damage to a base or a journal invalidates exactly the generations
that read it, and the directory digest is checked after rebuilding (verify). Recording a
generation appends one journal line (or, past COMPACT_RATIO of the base, writes a new base),
fsyncs it, then writes the generation directory under a temp name and renames it: a crash
leaves either no generation or a whole one; journal bytes no generation names are cut off by
the next append. Pruning removes bases and journals that no remaining generation names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ldapsync.directory import EntrySum, Snapshot
from ldapsync.errors import StateError
from ldapsync.fileio import fsync_dir, write_atomic
from ldapsync.state import store

log = structlog.get_logger(__name__)

STORE_DIR = "store"
# A journal longer than this share of its base: the next generation writes a new base. Restoring
# reads the base and the journal, recording costs the change plus, now and then, one base.
COMPACT_RATIO = 0.5
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True, slots=True)
class StoreRef:
    """Where a generation's directory data is: a base and the first `end` bytes of its journal."""

    base: str  # file name in state_dir/store
    base_sha256: str
    base_size: int
    end: int
    journal_sha256: str  # of those `end` bytes

    @property
    def journal(self) -> str:
        return self.base.removesuffix(".base") + ".journal"

    def files(self) -> tuple[str, str]:
        return self.base, self.journal

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "base_sha256": self.base_sha256,
            "base_size": self.base_size,
            "end": self.end,
            "journal_sha256": self.journal_sha256,
        }

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> StoreRef | None:
        """The reference in a generation's meta.json; None for a generation with snapshot.json."""
        doc = meta.get("store")
        if doc is None:
            return None
        try:
            ref = cls(
                str(doc["base"]),
                str(doc["base_sha256"]),
                int(doc["base_size"]),
                int(doc["end"]),
                str(doc["journal_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"store reference malformed: {e}") from e
        if "/" in ref.base or not ref.base.endswith(".base") or ref.base.startswith("."):
            raise ValueError(f"store reference names an unexpected file: {ref.base!r}")
        return ref


@dataclass(frozen=True, slots=True)
class Generation:
    id: str
    path: Path
    meta: Mapping[str, Any]

    @property
    def store_ref(self) -> StoreRef | None:
        try:
            return StoreRef.of(self.meta)
        except ValueError as e:
            raise StateError(f"generation {self.id}: {e}") from e

    def snapshot(self) -> Snapshot:
        """The directory as this generation recorded it (rebuilt from its base and journal)."""
        return self._read()[0]

    def _read(self, *, compact: bool = False) -> tuple[Snapshot, Any]:
        """(snapshot, sha256 object of the journal bytes read, None for snapshot.json)."""
        ref = self.store_ref
        try:
            if ref is None:
                return Snapshot.from_json((self.path / "snapshot.json").read_bytes()), None
            data = _store_dir(self.path).joinpath(ref.base).read_bytes()
            if len(data) != ref.base_size or sha256(data) != ref.base_sha256:
                raise StateError(f"generation {self.id}: base {ref.base} damaged (does not match its hash)")
            journal = b""
            if ref.end:
                with open(_store_dir(self.path) / ref.journal, "rb") as fh:
                    journal = fh.read(ref.end)
            hashed = hashlib.sha256(journal)
            if len(journal) != ref.end or hashed.hexdigest() != ref.journal_sha256:
                raise StateError(
                    f"generation {self.id}: journal {ref.journal} damaged "
                    f"(its first {ref.end} bytes do not match their hash)"
                )
            base = json.loads(data)
            del data
            return store.rebuild(base, store.lines(journal), compact=compact), hashed
        except StateError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise StateError(f"generation {self.id}: snapshot unreadable: {e}") from e

    def verify(self, *, files_only: bool = False) -> None:
        """Raise StateError unless snapshot and outputs are complete and match meta.json.

        `files_only`: every file against the hash meta.json recorded for it (damage on disk),
        without rebuilding the directory to compare its digest (a bug in what was recorded):
        what a sync that finds the directory unchanged checks, each time, in milliseconds."""
        ref = self.store_ref
        if files_only and ref is not None:
            self._check_files(ref)
        else:
            snap = self.snapshot()
            want = self.meta.get("snapshot_digest")
            if snap.digest() != want and (ref is not None or snap.legacy_digest() != want):
                raise StateError(f"generation {self.id}: snapshot does not match its digest")
        for name in self.meta.get("hashes", {}):
            try:
                self.output(name)
            except OSError as e:
                raise StateError(f"generation {self.id}: output {name} unreadable: {e.strerror}") from e

    def _check_files(self, ref: StoreRef) -> None:
        store_dir = _store_dir(self.path)
        try:
            with open(store_dir / ref.base, "rb") as fh:
                base, size = hashlib.sha256(), 0
                while chunk := fh.read(1 << 20):
                    base.update(chunk)
                    size += len(chunk)
            if size != ref.base_size or base.hexdigest() != ref.base_sha256:
                raise StateError(f"generation {self.id}: base {ref.base} damaged (does not match its hash)")
            journal = hashlib.sha256()
            if ref.end:
                with open(store_dir / ref.journal, "rb") as fh:
                    data = fh.read(ref.end)
                journal.update(data)
                if len(data) != ref.end:
                    raise StateError(f"generation {self.id}: journal {ref.journal} shorter than recorded")
            if journal.hexdigest() != ref.journal_sha256:
                raise StateError(
                    f"generation {self.id}: journal {ref.journal} damaged "
                    f"(its first {ref.end} bytes do not match their hash)"
                )
        except OSError as e:
            raise StateError(f"generation {self.id}: snapshot unreadable: {e}") from e

    def output(self, name: str) -> bytes:
        data = (self.path / "outputs" / name).read_bytes()
        want = self.meta.get("hashes", {}).get(name)
        if want and hashlib.sha256(data).hexdigest() != want:
            raise StateError(f"generation {self.id}: output {name} does not match its hash")
        return data


def _store_dir(generation_path: Path) -> Path:
    return generation_path.parent.parent / STORE_DIR


@dataclass(frozen=True, slots=True)
class _Tail:
    """The newest recorded generation, kept by the writer so that the next record writes what
    changed: its snapshot to diff against in memory (entries shared with whoever made it, the
    agent's mirror: not a second copy), or, when the caller lists the changes itself (the
    store's mirror), just its digest's sum. `journal` hashes the journal up to ref.end."""

    generation: str
    snapshot: Snapshot | None
    ref: StoreRef
    journal: Any  # hashlib sha256 object
    entry_sum: EntrySum


@dataclass(frozen=True, slots=True)
class Changes:
    """A snapshot's changed entry groups against generation `since` (see ldapsync.state.store)."""

    since: str
    changes: tuple[store.Change, ...]


def _lazy(snapshot: Snapshot) -> bool:
    """Whether the snapshot's entries are read on demand (a store's): not kept as the tail."""
    return not isinstance(snapshot.entries, tuple)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Generations:
    """generations/, store/ and current under one state dir; the writer keeps the newest
    recorded snapshot in memory (`_tail`) so that the next record writes only what changed."""

    def __init__(self, root: Path):
        self.root = root
        self.generations_dir = root / "generations"
        self.store_dir = root / STORE_DIR
        self._tail: _Tail | None = None

    def inherit(self, other: Generations) -> None:
        """Take over what another object of the same directory knows in memory (the last
        recorded snapshot): the agent's new pipeline after a config reload keeps recording
        changes only. Checked against the files before use, like everything kept in memory."""
        if other.root == self.root and other._tail is not None:
            self._tail = other._tail

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
        *,
        new_base: bool = False,
        changes: Changes | None = None,
    ) -> Generation:
        """Record a generation: the snapshot's changes since the previous record (a journal line,
        or a new base if there is no predecessor in memory, the journal is long, or `new_base`),
        outputs linked where the previous generation has the same bytes; then make it current.

        `changes`: what changed since generation `changes.since`, from a caller that knows
        (the agent's store): no snapshot in memory to diff against, none read from the files."""
        if hashes is None:
            hashes = {n: sha256(d) for n, d in outputs.items()}
        gens = self.generations()
        ref, journal = self._store(gid, snapshot, gens, new_base=new_base, changes=changes)
        current = self.current_id()
        previous = [g for g in gens if self._tail is not None and g.id == self._tail.generation]
        previous += [g for g in gens if g.id == current and g not in previous]
        entry_sum = snapshot.entry_sum
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.generations_dir))
        try:
            (tmp / "outputs").mkdir(mode=0o700)
            for name, data in outputs.items():
                _link_or_write(tmp / "outputs" / name, data, name, hashes[name], previous)
            full_meta = {
                **meta,
                "id": gid,
                "time": time.time(),
                "snapshot_digest": entry_sum.hexdigest(),
                "snapshot_sum": [entry_sum.count, f"{entry_sum.total:x}"],
                "store": ref.to_json(),
                "hashes": dict(hashes),
                "lines": meta.get("lines") or {n: d.count(b"\n") for n, d in outputs.items()},  # known: not recounted
            }
            _write_new(tmp / "meta.json", json.dumps(full_meta, indent=1, sort_keys=True).encode())
            fsync_dir(tmp / "outputs")
            fsync_dir(tmp)
            os.rename(tmp, self.generations_dir / gid)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kept = snapshot if not _lazy(snapshot) else None  # a store's snapshot is not held in memory
        self._tail = _Tail(gid, kept, ref, journal, entry_sum)
        fsync_dir(self.generations_dir)
        write_atomic(self.root / "current", gid.encode())
        self.prune(keep)
        return Generation(gid, self.generations_dir / gid, full_meta)

    def _store(
        self, gid: str, snapshot: Snapshot, gens: list[Generation], *, new_base: bool, changes: Changes | None
    ) -> tuple[StoreRef, Any]:
        """Put the snapshot's entries in the store: one journal line if the previous record's
        snapshot is in memory (or the caller lists the changes since it) and its files still
        hold it, else a new base."""
        self.store_dir.mkdir(mode=0o700, exist_ok=True)
        if changes is not None and not new_base and (self._tail is None or self._tail.generation != changes.since):
            self._tail = self._tail_of(changes.since, gens)  # a restart: the files say where it ends
        tail = None if new_base else self._usable_tail(gens)
        listed: Sequence[store.Change] | None = None
        if tail is not None and changes is not None and changes.since == tail.generation:
            listed = changes.changes
        elif tail is not None and tail.snapshot is not None:
            listed = store.diff(tail.snapshot.entries, snapshot.entries)
        if tail is not None and listed is not None:
            after = tail.entry_sum
            for c in listed:
                for e in c.before:
                    after = after.removed(e)
                for e in c.after:
                    after = after.added(e)
            if after != snapshot.entry_sum:  # cannot happen unless a sum or the diff is wrong
                log.error("journal line does not add up to the snapshot; writing a new base", generation=gid)
            else:
                line = store.journal_line(gid, snapshot, listed)
                if tail.ref.end + len(line) <= COMPACT_RATIO * tail.ref.base_size:
                    return self._append(tail, line)
        return self._write_base(gid, snapshot)

    def _usable_tail(self, gens: list[Generation]) -> _Tail | None:
        """The snapshot kept in memory, if the newest line of its journal is still its own."""
        t = self._tail
        if t is None:
            return None
        try:
            gen = next((g for g in gens if g.id == t.generation), None)
            if gen is None or gen.store_ref != t.ref or gen.meta.get("snapshot_digest") != t.entry_sum.hexdigest():
                return None
            for g in gens:
                ref = g.store_ref
                if ref is not None and ref.base == t.ref.base and ref.end > t.ref.end:
                    return None
            if (self.store_dir / t.ref.base).stat().st_size != t.ref.base_size:
                return None
            try:
                size = (self.store_dir / t.ref.journal).stat().st_size
            except FileNotFoundError:
                size = 0
        except (StateError, OSError):
            return None
        return t if size >= t.ref.end else None

    def _tail_of(self, gid: str, gens: list[Generation]) -> _Tail | None:
        """The tail of generation `gid` from its files (its meta, its journal's bytes), without
        reading its snapshot: for a writer that lists the changes itself."""
        gen = next((g for g in gens if g.id == gid), None)
        if gen is None:
            return None
        try:
            ref = gen.store_ref
            entry_sum = saved_sum(gen.meta)
            if ref is None or entry_sum is None:
                return None
            journal = hashlib.sha256()
            if ref.end:
                with open(self.store_dir / ref.journal, "rb") as fh:
                    left = ref.end
                    while left:
                        chunk = fh.read(min(left, 1 << 20))
                        if not chunk:
                            return None
                        journal.update(chunk)
                        left -= len(chunk)
            if journal.hexdigest() != ref.journal_sha256:
                return None
        except (StateError, OSError):
            return None
        return _Tail(gid, None, ref, journal, entry_sum)

    def _append(self, tail: _Tail, line: bytes) -> tuple[StoreRef, Any]:
        """Append `line` to the tail's journal (cutting off bytes a failed record left), fsynced."""
        path = self.store_dir / tail.ref.journal
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size != tail.ref.end:
                os.ftruncate(fd, tail.ref.end)
            written = 0
            while written < len(line):
                written += os.pwrite(fd, line[written:], tail.ref.end + written)
            os.fsync(fd)
        finally:
            os.close(fd)
        if tail.ref.end == 0:
            fsync_dir(self.store_dir)  # the journal's name
        journal = tail.journal.copy()
        journal.update(line)
        ref = StoreRef(
            tail.ref.base, tail.ref.base_sha256, tail.ref.base_size, tail.ref.end + len(line), journal.hexdigest()
        )
        return ref, journal

    def _write_base(self, gid: str, snapshot: Snapshot) -> tuple[StoreRef, Any]:
        """Write the whole snapshot as a new base (streamed, hashed on the way), fsynced."""
        name, n = f"{gid}.base", 1
        while any((self.store_dir / f).exists() for f in (name, name.removesuffix(".base") + ".journal")):
            n += 1
            name = f"{gid}.{n}.base"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.store_dir)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in snapshot.json_chunks():
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, self.store_dir / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(self.store_dir)
        return StoreRef(name, digest.hexdigest(), size, 0, EMPTY_SHA256), hashlib.sha256()

    def resume(self, gid: str) -> Snapshot:
        """Generation `gid`'s snapshot, for a mirror to carry on from (entries in the compact form).

        If gid is the newest line of its journal, later records diff against this snapshot in
        memory: the mirror and the state then share its entries. The digest's running sum is
        taken from meta.json (the base and journal matched their hashes). StateError if unusable.
        """
        gens = self.generations()
        gen = next((g for g in gens if g.id == gid), None)
        if gen is None:
            raise StateError(f"no generation {gid}")
        snapshot, journal = gen._read(compact=True)
        saved = saved_sum(gen.meta)
        if saved is not None:
            snapshot = Snapshot.with_sum(snapshot.entries, snapshot.source, snapshot.rejections, saved)
        ref = gen.store_ref
        if ref is not None and saved is not None:
            tail = _Tail(gid, snapshot, ref, journal, saved)
            self._tail, previous = tail, self._tail
            if self._usable_tail(gens) is None:
                self._tail = previous
        return snapshot

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` generations and the current one, and the store files they name."""
        current = self.current_id()
        kept = []
        for i, g in enumerate(self.generations()):
            if i < keep or g.id == current:
                kept.append(g)
                continue
            doomed = self.generations_dir / f".tmp-pruned-{g.id}"  # gone at once, even if a kill stops the removal
            try:
                os.rename(g.path, doomed)
            except OSError:
                doomed = g.path
            shutil.rmtree(doomed, ignore_errors=True)
        self.sweep()
        if not self.store_dir.is_dir():
            return
        needed = set(self._tail.ref.files()) if self._tail is not None else set()
        for g in kept:
            with contextlib.suppress(StateError):
                ref = g.store_ref
                if ref is not None:
                    needed.update(ref.files())
        for path in self.store_dir.iterdir():
            if path.name not in needed:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def sweep(self) -> None:
        """Remove what a killed record() or prune() left behind (.tmp-* generation directories
        and bases); the lock holder's job. A base no generation names goes at the next prune."""
        for leftover in self.generations_dir.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.store_dir.glob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

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


def _time(meta: Mapping[str, Any]) -> float:
    t = meta.get("time")
    return float(t) if isinstance(t, int | float) else 0.0


def saved_sum(meta: Mapping[str, Any]) -> EntrySum | None:
    """The directory digest's running sum recorded in meta.json, if it agrees with the digest."""
    raw = meta.get("snapshot_sum")
    if not isinstance(raw, list) or len(raw) != 2 or not isinstance(raw[0], int) or not isinstance(raw[1], str):
        return None
    try:
        entry_sum = EntrySum(raw[0], int(raw[1], 16))
    except ValueError:
        return None
    return entry_sum if entry_sum.hexdigest() == meta.get("snapshot_digest") else None


def _link_or_write(path: Path, data: bytes, name: str, digest: str, previous: list[Generation]) -> None:
    """A hard link to an earlier generation's output with these bytes, else a new file."""
    for g in previous:
        if g.meta.get("hashes", {}).get(name) != digest:
            continue
        source = g.path / "outputs" / name
        try:
            st = os.lstat(source)
            if stat.S_ISREG(st.st_mode) and st.st_size == len(data):
                os.link(source, path, follow_symlinks=False)
                return
        except OSError:
            continue
    _write_new(path, data)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
