"""The directory snapshot: what the source said, normalised, before any mail logic.

Sources (LDAP, LDIF, syncrepl) all produce a Snapshot; generations persist it; the routing
model is a pure function of it. Attribute names are lower-cased; values are decoded text.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True, slots=True)
class Rejection:
    """A value (or entry) dropped because it failed validation; safe to log."""

    dn: str
    attribute: str
    reason: str

    def __str__(self) -> str:
        return f"{self.dn}: {self.attribute}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Entry:
    dn: str
    attributes: Mapping[str, tuple[str, ...]]
    uuid: str | None = None

    def get(self, name: str | None) -> tuple[str, ...]:
        return self.attributes.get(name.lower(), ()) if name else ()


@dataclass(frozen=True)
class Snapshot:
    """Not slotted: the JSON form and digest are cached, an agent needs both per sync."""

    entries: tuple[Entry, ...]
    source: str
    rejections: tuple[Rejection, ...] = field(default=())

    @cached_property
    def entries_json(self) -> bytes:
        """Canonical JSON of the entries: [[dn, uuid, {attr: [values]}], ...]."""
        rows = [[e.dn, e.uuid, e.attributes] for e in self.entries]
        return json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        rejections = [[r.dn, r.attribute, r.reason] for r in self.rejections]
        return b"".join(
            (
                b'{"entries":',
                self.entries_json,
                b',"rejections":',
                json.dumps(rejections, ensure_ascii=False, separators=(",", ":")).encode(),
                b',"source":',
                json.dumps(self.source, ensure_ascii=False).encode(),
                b"}",
            )
        )

    @classmethod
    def from_json(cls, data: bytes) -> Snapshot:
        doc = json.loads(data)
        entries = tuple(
            Entry(dn, {sys.intern(k): tuple(v) for k, v in attrs.items()}, uuid) for dn, uuid, attrs in doc["entries"]
        )
        rejections = tuple(Rejection(*r) for r in doc.get("rejections", ()))
        return cls(entries, doc["source"], rejections)

    @cached_property
    def _digest(self) -> str:
        return hashlib.sha256(self.entries_json).hexdigest()

    def digest(self) -> str:
        """Content hash independent of the source label: equal directories, equal digest."""
        return self._digest


REFUSED_PREFIX = "{REFUSED-SHA256}"  # no password scheme: validate.password refuses it too


def refused_marker(value: str) -> str:
    """What is kept of a refused secret: its sha256 (a change still shows), not the value."""
    if value.startswith(REFUSED_PREFIX):
        return value  # already a marker: redacting twice must give the same snapshot
    return REFUSED_PREFIX + hashlib.sha256(value.encode()).hexdigest()


def without_secrets(snapshot: Snapshot, attribute: str, dns: Collection[str]) -> Snapshot:
    """`snapshot` with the `attribute` values of the entries `dns` replaced by markers.

    For refused secrets (a plaintext mail password): they must not be written verbatim to
    generations, held changes or the follow cache, and a rebuild must still refuse them.
    The same object comes back when nothing changes.
    """
    name = attribute.lower()
    if not dns or not name:
        return snapshot
    entries = list(snapshot.entries)
    changed = False
    for i, e in enumerate(entries):
        values = e.attributes.get(name)
        if e.dn not in dns or not values:
            continue
        marked = tuple(refused_marker(v) for v in values)
        if marked != values:
            entries[i] = Entry(e.dn, {**e.attributes, name: marked}, e.uuid)
            changed = True
    return Snapshot(tuple(entries), snapshot.source, snapshot.rejections) if changed else snapshot


def make_entry(
    dn: str,
    raw: Mapping[str, Sequence[bytes | str]],
    wanted: Iterable[str] | None,
    rejections: list[Rejection],
    uuid: str | None = None,
) -> Entry:
    """Decode one entry's values, keeping only `wanted` attributes; bad UTF-8 is rejected."""
    keep = {w.lower() for w in wanted} if wanted is not None else None
    attrs: dict[str, tuple[str, ...]] = {}
    for name, values in raw.items():
        lname = sys.intern(name.lower())  # one copy of each attribute name, not one per entry
        if lname == "entryuuid":
            for v in values:
                uuid = v.decode("ascii", "replace") if isinstance(v, bytes) else v
            continue
        if keep is not None and lname not in keep:
            continue
        decoded = []
        for v in values:
            if isinstance(v, str):
                decoded.append(v)
                continue
            try:
                decoded.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                rejections.append(Rejection(dn, name, "value is not valid UTF-8"))
        if decoded:
            attrs[lname] = tuple(decoded)
    return Entry(dn, attrs, uuid)


def sort_entries(entries: Iterable[Entry]) -> tuple[Entry, ...]:
    """Deterministic order: every host builds byte-identical outputs from the same data."""
    return tuple(sorted(entries, key=lambda e: (e.dn.lower(), e.dn)))  # DNs equal but for case: still total
