"""The directory snapshot: what the source said, normalised, before any mail logic.

Sources (LDAP, LDIF, syncrepl) all produce a Snapshot; generations persist it; the routing
model is a pure function of it. Attribute names are lower-cased; values are decoded text.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True, slots=True)
class Rejection:
    """A value (or entry) dropped because it failed validation; safe to log."""

    dn: str
    attribute: str
    reason: str

    def __str__(self) -> str:
        return f"{self.dn}: {self.attribute}: {self.reason}"


Shape = tuple[tuple[str, int], ...]
# One tuple per attribute layout, shared by all entries having it, with its name -> (start, stop).
_SHAPES: dict[Shape, tuple[Shape, dict[str, tuple[int, int]]]] = {}


def _interned(shape: Shape) -> tuple[Shape, dict[str, tuple[int, int]]]:
    found = _SHAPES.get(shape)
    if found is None:
        where: dict[str, tuple[int, int]] = {}
        i = 0
        for name, count in shape:
            where[name] = (i, i + count)
            i += count
        found = _SHAPES[shape] = (shape, where)
    return found


class Attributes(Mapping[str, tuple[str, ...]]):
    """An entry's attributes without a dict per entry, for what stays in memory (the mirror).

    One shared, interned shape ((name, number of values), ...) sorted by name, and one flat
    tuple of the values: at 100k entries ~30% less than a dict of tuples. Values are not
    interned: almost all of them (logins, forwards, hashes) are unique to their entry.
    """

    __slots__ = ("_shape", "_values", "_where")

    def __init__(self, shape: Shape, values: tuple[str, ...]) -> None:
        self._shape, self._where = _interned(shape)
        self._values = values

    @classmethod
    def of(cls, attributes: Mapping[str, Sequence[str]]) -> Attributes:
        if isinstance(attributes, Attributes):
            return attributes
        shape: list[tuple[str, int]] = []
        values: list[str] = []
        for name in sorted(attributes):
            vs = attributes[name]
            shape.append((sys.intern(name), len(vs)))
            values.extend(vs)
        return cls(tuple(shape), tuple(values))

    def get(self, name: str, default: Any = ()) -> Any:
        where = self._where.get(name)
        if where is None:
            return default
        return self._values[where[0] : where[1]]

    def __getitem__(self, name: str) -> tuple[str, ...]:
        found: tuple[str, ...] | None = self.get(name, None)
        if found is None:
            raise KeyError(name)
        return found

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self._shape)

    def __len__(self) -> int:
        return len(self._shape)

    def pairs(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(name, values) sorted by name, without a lookup per name."""
        i = 0
        for n, count in self._shape:
            yield n, self._values[i : i + count]
            i += count

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        out = {}
        i = 0
        values = self._values
        for n, count in self._shape:
            out[n] = values[i : i + count]
            i += count
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Attributes):
            return self._shape == other._shape and self._values == other._values
        if isinstance(other, Mapping):
            return self.as_dict() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like the dict it replaces

    def __repr__(self) -> str:
        return repr(self.as_dict())


@dataclass(frozen=True, slots=True)
class Entry:
    dn: str
    attributes: Mapping[str, tuple[str, ...]]
    uuid: str | None = None

    def get(self, name: str | None) -> tuple[str, ...]:
        return self.attributes.get(name.lower(), ()) if name else ()


@dataclass(frozen=True, slots=True)
class SnapshotDelta:
    """The entries changed since the previous snapshot of the same mirror (key -> entry now,
    None: deleted): a consumer that saw that snapshot can skip comparing every entry."""

    origin: object  # the mirror
    since: int  # serial of the previous snapshot
    serial: int
    changed: Mapping[str, Entry | None]


@dataclass(frozen=True)
class Snapshot:
    """Not slotted: the digest is cached (an agent needs it per sync); the JSON form is not."""

    entries: tuple[Entry, ...]
    source: str
    rejections: tuple[Rejection, ...] = field(default=())

    @classmethod
    def with_sum(
        cls, entries: tuple[Entry, ...], source: str, rejections: tuple[Rejection, ...], entry_sum: EntrySum
    ) -> Snapshot:
        """A snapshot whose digest is already known (a mirror keeps it up to date per change)."""
        snapshot = cls(entries, source, rejections)
        object.__setattr__(snapshot, "entry_sum", entry_sum)  # the cached_property's value
        return snapshot

    @classmethod
    def with_pending_sum(
        cls,
        entries: tuple[Entry, ...],
        source: str,
        rejections: tuple[Rejection, ...],
        pending: Callable[[], EntrySum | None],
    ) -> Snapshot:
        """A snapshot whose digest another process is working out: `pending` gives it when it
        is first needed (None: it is computed here after all)."""
        snapshot = cls(entries, source, rejections)
        object.__setattr__(snapshot, "_pending_sum", pending)
        return snapshot

    @property
    def delta(self) -> SnapshotDelta | None:
        """Set by the mirror that made this snapshot; None when it cannot tell."""
        found: SnapshotDelta | None = vars(self).get("_delta")
        return found

    def with_delta(self, delta: SnapshotDelta) -> Snapshot:
        object.__setattr__(self, "_delta", delta)
        return self

    def json_chunks(self) -> Iterator[bytes]:
        """to_json() in pieces: a base of a million entries is written without its whole
        JSON in memory at once."""
        yield b'{"entries":['
        yield from self._entry_rows()
        rejections = [[r.dn, r.attribute, r.reason] for r in self.rejections]
        yield b"".join(
            (
                b'],"rejections":',
                json.dumps(rejections, ensure_ascii=False, separators=(",", ":")).encode(),
                b',"source":',
                json.dumps(self.source, ensure_ascii=False).encode(),
                b"}",
            )
        )

    def _entry_rows(self, rows: int = 2000) -> Iterator[bytes]:
        """The canonical entries array [[dn, uuid, {attr: [values]}], ...] without its brackets."""
        for start in range(0, len(self.entries), rows):
            chunk = [[e.dn, e.uuid, _as_dict(e.attributes)] for e in self.entries[start : start + rows]]
            text = json.dumps(chunk, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            yield (b"," if start else b"") + text[1:-1].encode()

    def to_json(self) -> bytes:
        """Canonical JSON: {"entries": [[dn, uuid, {attr: [values]}], ...], "rejections", "source"}.

        Not cached: a copy of the whole directory must not live as long as the snapshot."""
        return b"".join(self.json_chunks())

    @classmethod
    def from_json(cls, data: bytes) -> Snapshot:
        doc = json.loads(data)
        entries = tuple(
            Entry(dn, {sys.intern(k): tuple(v) for k, v in attrs.items()}, uuid) for dn, uuid, attrs in doc["entries"]
        )
        rejections = tuple(Rejection(*r) for r in doc.get("rejections", ()))
        return cls(entries, doc["source"], rejections)

    @cached_property
    def entry_sum(self) -> EntrySum:
        pending = vars(self).pop("_pending_sum", None)
        found = pending() if pending is not None else None
        return found if found is not None else EntrySum.of(self.entries)

    @cached_property
    def _digest(self) -> str:
        return self.entry_sum.hexdigest()

    def digest(self) -> str:
        """Content hash independent of the source label and of entry order: equal
        directories, equal digest, on every host (see EntrySum)."""
        return self._digest

    def legacy_digest(self) -> str:
        """sha256 of the canonical entries JSON: the digest of generations recorded before
        the digest became a sum of entry hashes (they still verify)."""
        h = hashlib.sha256(b"[")
        for chunk in self._entry_rows():
            h.update(chunk)
        h.update(b"]")
        return h.hexdigest()


def _as_dict(attributes: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return attributes.as_dict() if isinstance(attributes, Attributes) else attributes


_SUM_MASK = (1 << 512) - 1  # 512-bit terms: a collision built from chosen entries needs ~2^45 work
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def entry_hash(entry: Entry) -> int:
    """BLAKE2b-512 of the entry's canonical JSON [dn, uuid, name, [values], ...] (names sorted)."""
    attrs = entry.attributes
    pairs = attrs.pairs() if isinstance(attrs, Attributes) else sorted(attrs.items())
    doc: list[Any] = [entry.dn, entry.uuid]
    for name, values in pairs:
        doc.append(name)
        doc.append(values)
    return int.from_bytes(hashlib.blake2b(_ENCODE(doc).encode()).digest(), "big")


@dataclass(frozen=True, slots=True)
class EntrySum:
    """The directory digest as a running sum: entry hashes added modulo 2^512, with the count.

    Order-independent, so a mirror updates it per change in O(change) (take the old entry's
    hash out, put the new one's in) and it equals the digest of a fresh snapshot of the same
    entries, on any host.
    """

    count: int = 0
    total: int = 0

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> EntrySum:
        count = total = 0
        for e in entries:
            total += entry_hash(e)
            count += 1
        return cls(count, total & _SUM_MASK)

    def added(self, entry: Entry) -> EntrySum:
        return EntrySum(self.count + 1, (self.total + entry_hash(entry)) & _SUM_MASK)

    def removed(self, entry: Entry) -> EntrySum:
        return EntrySum(self.count - 1, (self.total - entry_hash(entry)) & _SUM_MASK)

    def hexdigest(self) -> str:
        return hashlib.sha256(b"%d:%x" % (self.count, self.total)).hexdigest()


REFUSED_PREFIX = "{REFUSED-SHA256}"  # no password scheme: validate.password refuses it too


def refused_marker(value: str) -> str:
    """What is kept of a refused secret: its sha256 (a change still shows), not the value."""
    if value.startswith(REFUSED_PREFIX):
        return value  # already a marker: redacting twice must give the same snapshot
    return REFUSED_PREFIX + hashlib.sha256(value.encode()).hexdigest()


def unusable_secret(value: str) -> bool:
    """Whether a mail password value is no usable hash (plaintext, unknown scheme, malformed):
    refused whatever else the entry holds, so it may be kept as its marker only."""
    from ldapsync import validate  # passlib: loaded only by who stores secrets

    try:
        validate.check_password(value)
    except validate.Invalid:
        return True
    return False


def marked_secrets(values: tuple[str, ...]) -> tuple[str, ...]:
    """The values with each unusable one replaced by its marker (the same tuple if none is)."""
    marked = tuple(refused_marker(v) if unusable_secret(v) else v for v in values)
    return values if marked == values else marked


def without_secrets(snapshot: Snapshot, attribute: str, dns: Collection[str]) -> Snapshot:
    """`snapshot` with the unusable `attribute` values of the entries `dns` (those the model
    refused a password of) replaced by markers.

    For refused secrets (a plaintext mail password): they must not be written verbatim to
    generations, held changes or the store, and a rebuild must still refuse them. A usable
    hash stays, also where the entry's password was refused for another reason (several
    values, a weak hash under `passwords.weak: refuse`), and so does every value of another
    entry with the same DN. The same object comes back when nothing changes.
    """
    name = attribute.lower()
    if not dns or not name:
        return snapshot
    entries = list(snapshot.entries)
    changed = False
    for i in _positions(entries, dns):
        e = entries[i]
        values = e.attributes.get(name)
        if not values:
            continue
        marked = marked_secrets(values)
        if marked is not values:
            entries[i] = Entry(e.dn, {**e.attributes, name: marked}, e.uuid)
            changed = True
    return Snapshot(tuple(entries), snapshot.source, snapshot.rejections) if changed else snapshot


def _positions(entries: Sequence[Entry], dns: Collection[str]) -> list[int]:
    """Where the entries with these DNs are: found by bisection when the entries are in
    snapshot order (a few refused values among a million entries), by a scan otherwise."""
    found: list[int] = []
    for dn in dns:
        key = (dn.lower(), dn, "")
        i = bisect.bisect_left(entries, key, key=entry_order)
        while i < len(entries) and entries[i].dn == dn:
            found.append(i)
            i += 1
    if len(found) < len(dns) and not _is_sorted(entries):
        return [i for i, e in enumerate(entries) if e.dn in dns]
    return sorted(found)


def _is_sorted(entries: Sequence[Entry]) -> bool:
    return all(entry_order(a) <= entry_order(b) for a, b in itertools.pairwise(entries))


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


def entry_key(e: Entry) -> str:
    """How a mirror and the model engine know an entry across changes: entryUUID, else the DN."""
    return e.uuid or e.dn


def entry_order(e: Entry) -> tuple[str, str, str]:
    """The sort key of entries: DN case-insensitively first; DNs equal but for case, or equal
    (a rename not yet matched by a delete), still ordered the same on every host."""
    return (e.dn.lower(), e.dn, e.uuid or "")


def sort_entries(entries: Iterable[Entry]) -> tuple[Entry, ...]:
    """Deterministic order: every host builds byte-identical outputs from the same data."""
    return tuple(sorted(entries, key=entry_order))
