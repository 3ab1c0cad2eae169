"""Safety guards: should this change be held for review? Pure: no I/O, the clock is an argument.

Two questions per output, for deletions and for changed values (password hashes, routing
targets) alike:

- burst: does this one sync delete (or change) too much of what is installed?
- window: do the installs of the last `safety.window` seconds, plus this one, add up to too
  much of the output's size at the window's start? A mass deletion that arrives slowly, as
  many small syncs, is held as surely as one that arrives at once.

The window is a list of installed deltas per output (bucketed, so its size is bounded),
persisted by the caller in state_dir. `approve` and `--force` start a new window: the admin
has looked at the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ldapsync import delta as keys
from ldapsync.config import Safety

RATIO_FLOOR = 10  # the ratio limits ignore tiny changes: 2 of 5 users is not a mass deletion
BUCKETS = 64  # installs closer than window/BUCKETS share one event: the window stays small


@dataclass(frozen=True, slots=True)
class Delta:
    """How one sync would change one output, by key."""

    output: str
    size: int  # keys installed now
    deleted: int = 0
    changed: int = 0  # keys whose value changes; counted only where values are guarded
    added: int = 0

    @property
    def counts(self) -> bool:
        """Whether the guards' window records it (additions alone are normal business)."""
        return bool(self.deleted or self.changed)


def delta(output: str, old: Mapping[str, str], new: Mapping[str, str], *, values: bool) -> Delta:
    """Compare the installed and the new key -> value tables of one output."""
    deleted = changed = 0
    for key, value in old.items():
        now = new.get(key)
        if now is None:
            deleted += 1
        elif values and now != value:
            changed += 1
    return Delta(output, len(old), deleted, changed, len(new) - (len(old) - deleted))


def diff(
    output: str, installed: bytes, new: bytes, parse: Callable[[bytes], Mapping[str, str]], *, values: bool
) -> Delta:
    """Compare two versions of an output file; `parse` is its exporter's line parser (only the
    lines that differ are parsed: ldapsync.delta.compare)."""
    d = keys.compare(installed, new, parse)
    return Delta(output, installed.count(b"\n"), d.removed, d.changed if values else 0, d.added)


@dataclass(frozen=True, slots=True)
class Event:
    """Installed deltas of one output, summed over one bucket of time."""

    time: float  # the latest install in the bucket (so the bucket expires late, not early)
    size: int  # keys installed before the bucket's first install
    deleted: int
    changed: int


@dataclass(frozen=True, slots=True)
class Window:
    """What was installed recently, per output name."""

    events: Mapping[str, tuple[Event, ...]] = field(default_factory=dict)

    def recent(self, output: str, now: float, span: float) -> tuple[Event, ...]:
        return tuple(e for e in self.events.get(output, ()) if e.time > now - span)

    def record(self, deltas: Sequence[Delta], now: float, span: float) -> Window:
        """This window with `deltas` installed at `now`, and what fell out of it dropped."""
        if span <= 0:
            return Window()
        events: dict[str, tuple[Event, ...]] = {}
        for d in deltas:
            kept = list(self.recent(d.output, now, span))
            if d.counts:
                last = kept[-1] if kept else None
                if last is not None and now - last.time < span / BUCKETS:
                    kept[-1] = Event(now, last.size, last.deleted + d.deleted, last.changed + d.changed)
                else:
                    kept.append(Event(now, d.size, d.deleted, d.changed))
            if kept:
                events[d.output] = tuple(kept)
        return Window(events)

    def to_json(self) -> bytes:
        doc = {
            "version": 1,
            "outputs": {
                name: [[e.time, e.size, e.deleted, e.changed] for e in evs] for name, evs in sorted(self.events.items())
            },
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Window:
        """Raise ValueError on anything but what to_json writes."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("outputs"), dict):
            raise ValueError("not a guard window (version 1)")
        events: dict[str, tuple[Event, ...]] = {}
        for name, rows in doc["outputs"].items():
            if not isinstance(rows, list):
                raise ValueError(f"{name}: not a list of events")
            evs = []
            for row in rows:
                if not (
                    isinstance(row, list)
                    and len(row) == 4
                    and all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in row)
                ):
                    raise ValueError(f"{name}: malformed event {row!r}")
                evs.append(Event(float(row[0]), int(row[1]), int(row[2]), int(row[3])))
            events[str(name)] = tuple(evs)
        return cls(events)


def check(
    deltas: Sequence[Delta], window: Window, safety: Safety, now: float, *, accounts: int, entries: int
) -> str | None:
    """Why this change must be held for review, or None.

    `accounts`: entries that are mail accounts; `entries`: all entries the source returned.
    """
    if accounts <= 0 and not safety.allow_empty:
        return f"the directory returned no mail accounts ({entries} entries)"
    for d in deltas:
        reason = _burst(d, safety) or _window(d, window.recent(d.output, now, safety.window), safety)
        if reason:
            return reason
    return None


def _limit(count: int, base: int, most: int, ratio: float, what: str) -> str | None:
    """Which limit `count` of `base` breaks ("max_deletions 500"), or None."""
    if count > most:
        return f"max_{what} {most}"
    if count > RATIO_FLOOR and base > 0 and count / base > ratio:
        return f"max_{what[:-1]}_ratio {ratio:g}"
    return None


def _burst(d: Delta, s: Safety) -> str | None:
    if d.size <= 0:
        return None  # a new output: nothing to delete or change
    hit = _limit(d.deleted, d.size, s.max_deletions, s.max_deletion_ratio, "deletions")
    if hit:
        return f"{d.output}: {d.deleted} of {d.size} entries{_pct(d.deleted, d.size, hit)} would be deleted ({hit})"
    hit = _limit(d.changed, d.size, s.max_changes, s.max_change_ratio, "changes")
    if hit:
        return f"{d.output}: {d.changed} of {d.size} values{_pct(d.changed, d.size, hit)} would change ({hit})"
    return None


def _window(d: Delta, recent: tuple[Event, ...], s: Safety) -> str | None:
    if not recent:
        return None  # nothing installed in the window: the burst check said it all
    # The size at the window's start; the current size if additions made the output larger
    # since (a ratio of a freshly filled output would otherwise be of almost nothing).
    base = max(recent[0].size, d.size)
    span = _duration(s.window)
    for count, total, most, ratio, what, verb in (
        (d.deleted, sum(e.deleted for e in recent), s.max_deletions, s.max_deletion_ratio, "deletions", "be deleted"),
        (d.changed, sum(e.changed for e in recent), s.max_changes, s.max_change_ratio, "changes", "change"),
    ):
        if not count:
            continue  # this sync adds nothing to the sum: it is not the one to hold
        hit = _limit(total + count, base, most, ratio, what)
        if hit:
            noun = "entries" if what == "deletions" else "values"
            pct = _pct(total + count, base, hit)
            return (
                f"{d.output}: {total + count} of {base} {noun}{pct} would {verb} within {span} "
                f"({count} in this sync; {hit} over safety.window)"
            )
    return None


def _pct(count: int, base: int, hit: str) -> str:
    return f" ({count / base:.0%})" if "ratio" in hit else ""


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}min"
    return f"{seconds:g}s"
