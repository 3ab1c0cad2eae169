"""Safety guards: should this change be held for review? Pure: no I/O, the clock is an argument.

Two questions per output, for deletions and for changed values (password hashes, routing
targets) alike:

- burst: does this one sync delete (or change) too much of what is installed?
- window: within the last `safety.window` seconds, plus this sync, does the output lose too
  much (net) of what it held at some moment of the window, or change too many values? A mass
  deletion that arrives slowly, as many small syncs, is held as surely as one that arrives at
  once.

Deletions are counted net over the window: keys that come back (an account disabled and
re-enabled, again and again) do not add up, so a flapping key never looks like a mass
deletion and `max_deletion_ratio: 1.0` really switches the ratio off. The net loss is
measured from the window's largest size (every moment of the window is a possible start of
a window): the invariant is that no span of `window` seconds ever loses more, net, than the
limits allow. Changed values are summed (a value that flaps is rewritten each time).

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
    """Installed deltas of one output, summed over one bucket of time.

    A bucket spans at most window/BUCKETS seconds from its first install, so an event leaves
    the window at most that much later than its installs: deletions and changes expire late
    (counted a little longer than due), never early, and `peak` (from installs that may have
    left the window) can only make the net loss look larger.
    """

    time: float  # the latest install in the bucket (so the bucket expires late, not early)
    size: int  # keys installed before the bucket's first install
    deleted: int
    changed: int
    peak: int = -1  # the most keys installed at any moment of the bucket; -1: `size`
    first: float = -1.0  # the first install in the bucket; -1: `time`

    @property
    def top(self) -> int:
        return max(self.size, self.peak)

    @property
    def start(self) -> float:
        return self.time if self.first < 0 else self.first


@dataclass(frozen=True, slots=True)
class Window:
    """What was installed recently, per output name."""

    events: Mapping[str, tuple[Event, ...]] = field(default_factory=dict)

    def recent(self, output: str, now: float, span: float) -> tuple[Event, ...]:
        return tuple(e for e in self.events.get(output, ()) if e.time > now - span)

    def record(self, deltas: Sequence[Delta], now: float, span: float) -> Window:
        """This window with `deltas` installed at `now`, and what fell out of it dropped.

        Additions alone are not recorded: the largest size of the window is always the size
        before some recorded deletion, or the current size, which the check sees anyway.
        """
        if span <= 0:
            return Window()
        events: dict[str, tuple[Event, ...]] = {}
        for d in deltas:
            kept = list(self.recent(d.output, now, span))
            if d.counts:
                after = d.size - d.deleted + d.added
                # the largest size this install passed through: deletions may come first
                top = max(d.size, after)
                last = kept[-1] if kept else None
                if last is not None and now - last.start < span / BUCKETS:
                    kept[-1] = Event(
                        now,
                        last.size,
                        last.deleted + d.deleted,
                        last.changed + d.changed,
                        max(last.top, top),
                        last.start,
                    )
                else:
                    kept.append(Event(now, d.size, d.deleted, d.changed, top, now))
            if kept:
                events[d.output] = tuple(kept)
        return Window(events)

    def to_json(self) -> bytes:
        doc = {
            "version": 2,
            "outputs": {
                name: [[e.time, e.size, e.deleted, e.changed, e.top, e.start] for e in evs]
                for name, evs in sorted(self.events.items())
            },
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Window:
        """Raise ValueError on anything but what to_json writes (version 2) or wrote (version 1)."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") not in (1, 2) or not isinstance(doc.get("outputs"), dict):
            raise ValueError("not a guard window (version 1 or 2)")
        width = 4 if doc["version"] == 1 else 6
        events: dict[str, tuple[Event, ...]] = {}
        for name, rows in doc["outputs"].items():
            if not isinstance(rows, list):
                raise ValueError(f"{name}: not a list of events")
            evs = []
            for row in rows:
                if not (
                    isinstance(row, list)
                    and len(row) == width
                    and all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in row)
                ):
                    raise ValueError(f"{name}: malformed event {row!r}")
                if width == 4:  # version 1 knew no additions: each event only shrank the output
                    evs.append(Event(float(row[0]), int(row[1]), int(row[2]), int(row[3])))
                else:
                    evs.append(Event(float(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]), float(row[5])))
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
    span = _duration(s.window)
    if d.deleted:  # otherwise this sync loses nothing: it is not the one to hold
        # The net loss of the worst window ending with this sync: from the largest size the
        # output had at any moment since the window's start (the size before its first
        # install, after each install, or now) to the size this sync leaves.
        peak = max(recent[0].size, d.size, *(e.top for e in recent))
        loss = peak - (d.size - d.deleted + d.added)
        hit = _limit(loss, peak, s.max_deletions, s.max_deletion_ratio, "deletions")
        if hit:
            return (
                f"{d.output}: {loss} of {peak} entries{_pct(loss, peak, hit)} would be deleted within {span} "
                f"({d.deleted} in this sync; {hit} over safety.window)"
            )
    if d.changed:
        # The size at the window's start; the current size if additions made the output larger
        # since (a ratio of a freshly filled output would otherwise be of almost nothing).
        base = max(recent[0].size, d.size)
        total = sum(e.changed for e in recent) + d.changed
        hit = _limit(total, base, s.max_changes, s.max_change_ratio, "changes")
        if hit:
            return (
                f"{d.output}: {total} of {base} values{_pct(total, base, hit)} would change within {span} "
                f"({d.changed} in this sync; {hit} over safety.window)"
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
