"""The held change: a snapshot a safety guard kept back for review, until approved or superseded.

Layout under state_dir/held: snapshot.json (the held snapshot, redacted) and meta.json (the
reason and the counts).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldapsync.directory import Snapshot
from ldapsync.errors import StateError
from ldapsync.fileio import write_atomic

HELD_DIR = "held"


@dataclass(frozen=True, slots=True)
class HeldChange:
    """A held change as read back: its snapshot and its meta.json."""

    snapshot: Snapshot
    meta: Mapping[str, Any]


class Held:
    """state_dir/held: at most one held change."""

    def __init__(self, root: Path):
        self.dir = root / HELD_DIR

    def hold(self, snapshot: Snapshot, meta: Mapping[str, Any]) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.dir / "snapshot.json", snapshot.to_json())
        write_atomic(self.dir / "meta.json", json.dumps({**meta, "time": time.time()}, indent=1).encode())

    def read(self) -> HeldChange | None:
        """The held change, None if there is none; never modifies it (readers must not write).

        An unreadable one raises StateError; the next successful sync replaces it.
        """
        try:
            snap = Snapshot.from_json((self.dir / "snapshot.json").read_bytes())
            meta = json.loads((self.dir / "meta.json").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateError(f"held change in {self.dir} unreadable: {e}") from e
        return HeldChange(snap, meta)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
