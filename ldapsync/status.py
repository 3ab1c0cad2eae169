"""The status record: what the last sync did and what is installed, for `status`, `check` and metrics.

One typed record in `state_dir/status.json`. Only the sync's apply step and the agent's
follower notes write it; `ldapsync status`, `ldapsync check` and the metrics textfile read
it. Loading never fails: a missing or damaged file reads as "nothing known yet", and old
files (written before this record existed) are read as far as they go.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

from ldapsync import delta as delta_mod
from ldapsync.delta import Delta
from ldapsync.fileio import write_atomic

log = structlog.get_logger(__name__)

FILE = "status.json"


class SyncResult(StrEnum):
    """The outcome of one attempt; its value is what status.json and the metrics show."""

    INSTALLED = "installed"  # new outputs are installed
    UNCHANGED = "unchanged"  # the installed outputs already match the directory
    HELD = "held"  # a safety guard held the change for review; installed outputs stay
    FAILED = "failed"  # the directory could not be read, or installing failed; installed outputs stay
    LAST_KNOWN_GOOD = "last-known-good"  # the directory could not be read; missing outputs came from a generation
    ROLLED_BACK = "rolled-back"  # an admin reinstalled an earlier generation
    DRY_RUN = "dry-run"  # nothing was installed or recorded

    @property
    def confirms(self) -> bool:
        """The installed outputs are known to match the directory after this result."""
        return self in (SyncResult.INSTALLED, SyncResult.UNCHANGED)


# Upper bounds (seconds) of the propagation-time histogram: a debounced agent takes about a
# second, a check hook or a 100k-entry render tens of seconds, a backoff minutes.
PROPAGATION_BUCKETS: tuple[float, ...] = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, math.inf)


@dataclass(frozen=True, slots=True)
class OutputState:
    """One installed output as the last successful sync left it."""

    lines: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observation counts per bucket of PROPAGATION_BUCKETS (not cumulative), their sum and count."""

    counts: tuple[int, ...] = (0,) * len(PROPAGATION_BUCKETS)
    total: float = 0.0

    def observe(self, value: float) -> Histogram:
        index = next(i for i, bound in enumerate(PROPAGATION_BUCKETS) if value <= bound)
        counts = tuple(n + (i == index) for i, n in enumerate(self.counts))
        return Histogram(counts, self.total + value)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip(PROPAGATION_BUCKETS, self.counts, strict=True):
            running += n
            out.append(("+Inf" if math.isinf(bound) else repr(bound), float(running)))
        return out


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Status:
    """Everything `status`, `check` and the metrics know; times are Unix seconds."""

    result: SyncResult | None = None
    last_attempt: float | None = None
    last_success: float | None = None  # last sync that ended installed or unchanged
    last_confirmed: float | None = None  # installed outputs last known to match the directory
    duration: float | None = None  # of the last sync that got as far as installing
    ldap_reachable: bool | None = None
    follower_connected: bool | None = None  # None: no follower (cron, --once)
    follower_error: str | None = None
    ldap_lost: float | None = None  # the agent's follower lost the directory then; None while connected
    config_error: str | None = None  # the agent rejected the config file on disk (it runs the previous one)
    error: str | None = None  # why the last attempt failed; None after a success
    source: str | None = None
    held: str | None = None  # why a change is held for review
    rejected: int = 0  # LDAP values rejected by validation in the last sync that read LDAP
    weak_passwords: int = 0  # passwd-file lines with an unsalted digest or DES-CRYPT (passwords.weak: warn)
    outputs: Mapping[str, OutputState] = field(default_factory=_empty)
    generation: str | None = None
    reload_pending: tuple[str, ...] = ()
    reload_error: str | None = None
    metrics_error: str | None = None
    syncs: Mapping[str, int] = field(default_factory=_empty)  # attempts by SyncResult value
    propagation: Histogram = field(default_factory=Histogram)
    # keys added/removed/changed per output: by the last install that changed something, and
    # summed over every install (the counter behind ldapsync_keys_changed_total)
    last_changes: Mapping[str, Delta] = field(default_factory=_empty)
    changes_total: Mapping[str, Delta] = field(default_factory=_empty)

    def installed(self, changes: Mapping[str, Delta]) -> Status:
        """This record after an install that changed `changes` (none: the record as it is)."""
        if not changes:
            return self
        total = dict(self.changes_total)
        for name, d in changes.items():
            total[name] = total.get(name, Delta()) + d
        return replace(self, last_changes=MappingProxyType(dict(changes)), changes_total=MappingProxyType(total))

    def counted(self, result: SyncResult) -> Status:
        syncs = dict(self.syncs)
        syncs[result.value] = syncs.get(result.value, 0) + 1
        return replace(self, syncs=MappingProxyType(syncs))

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "result": None if self.result is None else self.result.value,
            "last_attempt": self.last_attempt,
            "last_success": self.last_success,
            "last_confirmed": self.last_confirmed,
            "duration": self.duration,
            "ldap_reachable": self.ldap_reachable,
            "follower_connected": self.follower_connected,
            "follower_error": self.follower_error,
            "ldap_lost": self.ldap_lost,
            "config_error": self.config_error,
            "error": self.error,
            "source": self.source,
            "held": self.held,
            "rejected": self.rejected,
            "weak_passwords": self.weak_passwords,
            "outputs": {n: {"lines": o.lines, "sha256": o.sha256} for n, o in sorted(self.outputs.items())},
            "generation": self.generation,
            "reload_pending": list(self.reload_pending),
            "reload_error": self.reload_error,
            "metrics_error": self.metrics_error,
            "syncs": dict(sorted(self.syncs.items())),
            "propagation": {"counts": list(self.propagation.counts), "sum": self.propagation.total},
            "last_changes": delta_mod.to_json(self.last_changes),
            "changes_total": delta_mod.to_json(self.changes_total),
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Status:
        """Parse leniently: a field of the wrong type reads as unknown, not as an error."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        result = _result(doc.get("result"))
        outputs = {}
        raw = doc.get("outputs")
        if isinstance(raw, dict):
            for name, o in raw.items():
                if isinstance(o, dict) and isinstance(o.get("lines"), int) and isinstance(o.get("sha256"), str):
                    outputs[str(name)] = OutputState(o["lines"], o["sha256"])
        elif isinstance(doc.get("counts"), dict) and isinstance(doc.get("hashes"), dict):  # the older layout
            for name, n in doc["counts"].items():
                digest = doc["hashes"].get(name)
                if isinstance(n, int) and isinstance(digest, str):
                    outputs[str(name)] = OutputState(n, digest)
        syncs = {str(k): v for k, v in _dict(doc.get("syncs")).items() if isinstance(v, int) and v >= 0}
        prop = _dict(doc.get("propagation"))
        counts = prop.get("counts")
        histogram = Histogram()
        if (
            isinstance(counts, list)
            and len(counts) == len(PROPAGATION_BUCKETS)
            and all(isinstance(n, int) and n >= 0 for n in counts)
        ):
            histogram = Histogram(tuple(counts), _num(prop.get("sum")) or 0.0)
        last_success = _num(doc.get("last_success"))
        confirmed = _num(doc.get("last_confirmed")) if "last_confirmed" in doc else last_success
        pending = doc.get("reload_pending")
        return cls(
            result=result,
            last_attempt=_num(doc.get("last_attempt")),
            last_success=last_success,
            last_confirmed=confirmed,
            duration=_num(doc.get("duration")),
            ldap_reachable=_bool(doc.get("ldap_reachable")),
            follower_connected=_bool(doc.get("follower_connected")),
            follower_error=_str(doc.get("follower_error")),
            ldap_lost=_num(doc.get("ldap_lost")),
            config_error=_str(doc.get("config_error")),
            error=_str(doc.get("error")),
            source=_str(doc.get("source")),
            held=_str(doc.get("held")),
            rejected=doc["rejected"] if isinstance(doc.get("rejected"), int) else 0,
            weak_passwords=doc["weak_passwords"] if isinstance(doc.get("weak_passwords"), int) else 0,
            outputs=MappingProxyType(outputs),
            generation=_str(doc.get("generation")),
            reload_pending=tuple(str(p) for p in pending) if isinstance(pending, list) else (),
            reload_error=_str(doc.get("reload_error")),
            metrics_error=_str(doc.get("metrics_error")),
            syncs=MappingProxyType(syncs),
            propagation=histogram,
            last_changes=MappingProxyType(delta_mod.mapping(doc.get("last_changes")) or {}),
            changes_total=MappingProxyType(delta_mod.mapping(doc.get("changes_total")) or {}),
        )


def load(state_dir: Path) -> Status:
    """The record in `state_dir`; a missing or damaged one reads as empty (and is never rewritten here)."""
    path = state_dir / FILE
    try:
        return Status.from_json(path.read_bytes())
    except FileNotFoundError:
        return Status()
    except (OSError, ValueError) as e:
        log.error("status file unreadable; treating it as empty", file=str(path), error=str(e))
        return Status()


def save(state_dir: Path, status: Status) -> None:
    write_atomic(state_dir / FILE, status.to_json())


def _result(value: object) -> SyncResult | None:
    if value == "error":  # what older versions recorded for a failed attempt
        return SyncResult.FAILED
    try:
        return SyncResult(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
