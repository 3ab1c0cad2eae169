"""How one output changed, by key: added, removed, changed. Pure: no I/O.

One count for every place that reports a change — the dry run, a held change, the
`installed` log event, the status record, the metrics and each generation's meta — so that
they agree, and a count means what its name says: keys, not lines of the file. It is worked
out once, where the old and the new lines are both known: by the renderer while it splices
(ldapsync.render), otherwise by comparing the two versions' differing lines with the
exporter's own parser (compare()).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("added", "removed", "changed")  # the metrics' `kind` label, the JSON keys


@dataclass(frozen=True, slots=True)
class Delta:
    """Keys added, removed, and kept with another value, in one output."""

    added: int = 0
    removed: int = 0
    changed: int = 0

    def __str__(self) -> str:
        return f"+{self.added} -{self.removed} ~{self.changed}"

    def __add__(self, other: Delta) -> Delta:
        return Delta(self.added + other.added, self.removed + other.removed, self.changed + other.changed)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_json(self) -> dict[str, int]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}

    @classmethod
    def from_json(cls, doc: object) -> Delta | None:
        """What to_json wrote; None for anything else (a record from an older version)."""
        if not isinstance(doc, dict):
            return None
        values = [doc.get(k) for k in KINDS]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            return None
        return cls(*(int(v) for v in values if v is not None))


def compare(old: bytes, new: bytes, parse: Callable[[bytes], Mapping[str, str]]) -> Delta:
    """Two versions of an output compared by key; `parse` is its exporter's line parser.

    Only the lines that differ are parsed: after a small change that is a handful, not the
    100k lines of a large passwd-file. Against nothing, the new version is parsed as it is.
    """
    if not old:  # nothing installed (a first run): every key is new, none to match
        return Delta(len(parse(new)))
    old_lines, new_lines = set(old.split(b"\n")), set(new.split(b"\n"))
    gone = parse(b"\n".join(old_lines - new_lines))
    came = parse(b"\n".join(new_lines - old_lines))
    removed = changed = 0
    for key, value in gone.items():
        now = came.get(key)
        if now is None:
            removed += 1
        elif now != value:
            changed += 1
    return Delta(len(came) - (len(gone) - removed), removed, changed)


def mapping(doc: object) -> dict[str, Delta] | None:
    """A {output: delta} JSON object as written by to_json; None if it is not one."""
    if not isinstance(doc, dict):
        return None
    out: dict[str, Delta] = {}
    for name, value in doc.items():
        d = Delta.from_json(value)
        if d is None:
            return None
        out[str(name)] = d
    return out


def to_json(deltas: Mapping[str, Delta]) -> dict[str, Any]:
    return {name: d.to_json() for name, d in sorted(deltas.items())}
