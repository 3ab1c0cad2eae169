"""The held change: a snapshot a safety guard kept back for review, until approved or superseded.

Layout under state_dir/held:
  <id>/snapshot.json   the held snapshot (redacted), written once
  meta.json            names <id>, with the snapshot's sha256 and directory digest, the reason
                       and the counts; written atomically after the snapshot
The id is "held-", the directory digest (Snapshot.digest) and a prefix of the file's sha256
(held_id): the agent's follow state names it (follow.json "generation") instead of writing
the directory a second time, and a restart resumes from it -- or, once it was approved, from
the generation that installed that digest.
Replacing a held change writes the new snapshot, then swaps meta.json, then removes the old
snapshot: a kill -9 at any step leaves meta.json naming a whole snapshot, the old or the new.
A held change written before this layout (held/snapshot.json, no id in meta.json) still reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldapsync.directory import Snapshot
from ldapsync.errors import StateError
from ldapsync.fileio import fsync_dir, write_atomic
from ldapsync.state.generations import saved_sum

HELD_DIR = "held"
PREFIX = "held-"


@dataclass(frozen=True, slots=True)
class HeldChange:
    """A held change as read back: its snapshot, its meta.json, and its id (None: old layout)."""

    id: str | None
    snapshot: Snapshot
    meta: Mapping[str, Any]


def is_held_id(name: str) -> bool:
    return name.startswith(PREFIX)


def held_id(digest: str, sha: str) -> str:
    """The directory digest (what a generation that installs it records) and a prefix of the
    snapshot file's sha256 (the same entries with other rejections are another file)."""
    return f"{PREFIX}{digest}-{sha[:16]}"


def digest_of(hid: str) -> str:
    """The directory digest in a held change's id."""
    return hid.removeprefix(PREFIX).split("-", 1)[0]


class Held:
    """state_dir/held: at most one held change."""

    def __init__(self, root: Path):
        self.dir = root / HELD_DIR

    def hold(self, snapshot: Snapshot, meta: Mapping[str, Any]) -> str:
        """Keep `snapshot` as the held change (replacing one held before); returns its id.

        Holding the same snapshot again rewrites only meta.json (the reason may have changed).
        """
        data = snapshot.to_json()
        sha = hashlib.sha256(data).hexdigest()
        entry_sum = snapshot.entry_sum
        hid = held_id(entry_sum.hexdigest(), sha)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        target = self.dir / hid
        if not _intact(target / "snapshot.json", sha):
            shutil.rmtree(target, ignore_errors=True)  # a kill's leftover, or damaged
            tmp = self.dir / f".tmp-{hid}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o700)
            fd = os.open(tmp / "snapshot.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            os.rename(tmp, target)
            fsync_dir(self.dir)
        doc = {
            **meta,
            "id": hid,
            "time": time.time(),
            "snapshot_sha256": sha,
            "snapshot_digest": entry_sum.hexdigest(),
            "snapshot_sum": [entry_sum.count, f"{entry_sum.total:x}"],
        }
        write_atomic(self.dir / "meta.json", json.dumps(doc, indent=1, sort_keys=True).encode())
        self._remove_others(hid)
        return hid

    def _remove_others(self, keep: str) -> None:
        for path in self.dir.iterdir():
            if path.name in (keep, "meta.json"):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def meta(self) -> dict[str, Any] | None:
        """meta.json of the held change, None if there is none; StateError if unreadable."""
        try:
            doc = json.loads((self.dir / "meta.json").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"held change in {self.dir} unreadable: {e}") from e
        if not isinstance(doc, dict):
            raise StateError(f"held change in {self.dir} unreadable: meta.json is not an object")
        return doc

    def read(self) -> HeldChange | None:
        """The held change, None if there is none; never modifies it (readers must not write).

        An unreadable or damaged one raises StateError; the next successful sync replaces it.
        """
        meta = self.meta()
        if meta is None:
            return None
        hid = meta.get("id")
        try:
            if hid is None:  # written before held changes had an id
                snapshot = Snapshot.from_json((self.dir / "snapshot.json").read_bytes())
                return HeldChange(None, snapshot, meta)
            if not isinstance(hid, str) or not is_held_id(hid) or "/" in hid:
                raise ValueError(f"meta.json names an unexpected snapshot: {hid!r}")
            data = (self.dir / hid / "snapshot.json").read_bytes()
            if hashlib.sha256(data).hexdigest() != meta.get("snapshot_sha256"):
                raise ValueError("snapshot does not match its hash")
            snapshot = Snapshot.from_json(data)
        except FileNotFoundError as e:
            raise StateError(f"held change in {self.dir} unreadable: {e.filename} is missing") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateError(f"held change in {self.dir} unreadable: {e}") from e
        saved = saved_sum(meta)
        if saved is not None:  # the file matched its hash: the sum saved with it is its sum
            snapshot = Snapshot.with_sum(snapshot.entries, snapshot.source, snapshot.rejections, saved)
        return HeldChange(hid, snapshot, meta)

    def clear(self) -> None:
        """Remove the held change: meta.json first, so a kill leaves none rather than half of one."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / "meta.json")
        shutil.rmtree(self.dir, ignore_errors=True)


def _intact(path: Path, sha: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha
    except OSError:
        return False
