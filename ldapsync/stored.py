"""The agent's mirror on the store: the directory in LMDB, only what changed in memory.

A StoredMirror answers like ldapsync.mirror.Mirror (the follower writes into it the same
way), but keeps in the process only the entries changed since the store was last written:
`pending` (since the last snapshot) and `inflight` (handed to a sync that has not written
the store yet). Its snapshots are relative to the store: their delta lists every entry
that differs from it, with the entry it replaces, and their entries are read from the
store only if something needs all of them (a full build, a held change's copy). After a
sync the agent writes the delta to the store in one transaction (`written`), and a failed
sync's delta is simply handed out again with the next one.

A change the follower makes wholesale (a full read, a refresh without a cookie) replaces
the content: the next snapshot carries every entry, and the store is rewritten from it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

from ldapsync.directory import (
    Attributes,
    Entry,
    EntrySum,
    Rejection,
    Snapshot,
    SnapshotDelta,
    entry_key,
    entry_order,
    make_entry,
    marked_secrets,
    refused_marker,
)
from ldapsync.mirror import Staging, compact
from ldapsync.routing.stored import StoredEngine
from ldapsync.state.generations import Changes
from ldapsync.state.lmdbstore import Store, Writer
from ldapsync.state.store import Change

Changed = dict[str, Entry | None]


@dataclass(frozen=True, slots=True)
class StoreDelta:
    """What a snapshot changes against the store: key -> (entry stored, entry now); None: absent."""

    changes: Mapping[str, tuple[Entry | None, Entry | None]]
    serial: int  # the store's write serial the changes are relative to


class StoredEntries(Sequence[Entry]):
    """A snapshot's entries, in snapshot order: the store's with the delta applied (or a whole
    content), read only when first needed, then held by this object (so by the snapshot, not
    by the mirror)."""

    def __init__(self, store: Store, delta: StoreDelta | None, full: Mapping[str, Entry] | None, count: int):
        self.store = store
        self.delta = delta  # None: `full` is the whole content, the store is not its base
        self.full = full
        self._count = count
        self._entries: tuple[Entry, ...] | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def loaded(self) -> bool:
        return self._entries is not None

    def _load(self) -> tuple[Entry, ...]:
        if self._entries is None:
            if self.full is not None:
                entries = list(self.full.values())
            else:
                assert self.delta is not None
                changes = self.delta.changes
                with self.store.reading() as view:
                    entries = [e for k, e in view.entries() if k not in changes]
                entries += [new for _, new in changes.values() if new is not None]
            entries.sort(key=entry_order)
            self._entries = tuple(entries)
        return self._entries

    @overload
    def __getitem__(self, i: int) -> Entry: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Entry]: ...
    def __getitem__(self, i: int | slice) -> Entry | Sequence[Entry]:
        return self._load()[i]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._load())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StoredEntries):
            other = other._load()
        return self._load() == other

    __hash__ = None  # type: ignore[assignment]


Redacted = list[tuple[Entry, Entry]]  # (entry as read, entry as stored)


def redact_stored(snapshot: Snapshot, attribute: str, dns: set[str]) -> tuple[Snapshot, Redacted] | None:
    """`snapshot` (a StoredMirror's) with `attribute` of the entries `dns` replaced by refused
    markers, its sum adjusted, and which entries were replaced; without reading the store:
    the store holds only redacted entries, so only changed ones can need it. None: not such
    a snapshot (the caller redacts the entries themselves)."""
    entries = snapshot.entries
    if not isinstance(entries, StoredEntries):
        return None
    replaced: Redacted = []
    entry_sum = snapshot.entry_sum
    if entries.delta is None:
        assert entries.full is not None
        full = dict(entries.full)
        for key, e in entries.full.items():
            if e.dn in dns:
                marked = _redact(e, attribute)
                if marked is not e:
                    full[key] = marked
                    replaced.append((e, marked))
                    entry_sum = entry_sum.removed(e).added(marked)
        if not replaced:
            return snapshot, replaced
        stored = StoredEntries(entries.store, None, full, len(full))
        return Snapshot.with_sum(stored, snapshot.source, snapshot.rejections, entry_sum), replaced
    delta = entries.delta
    changes = dict(delta.changes)
    for key, (old, new) in delta.changes.items():
        if new is None or new.dn not in dns:
            continue
        marked = _redact(new, attribute)
        if marked is not new:
            changes[key] = (old, marked)
            replaced.append((new, marked))
            entry_sum = entry_sum.removed(new).added(marked)
    if not replaced:
        return snapshot, replaced
    out = Snapshot.with_sum(
        StoredEntries(entries.store, StoreDelta(changes, delta.serial), None, len(entries)),
        snapshot.source,
        snapshot.rejections,
        entry_sum,
    )
    if snapshot.delta is not None:
        d = snapshot.delta
        out.with_delta(SnapshotDelta(d.origin, d.since, d.serial, {k: new for k, (_, new) in changes.items()}))
    return out, replaced


def _redact(entry: Entry, attribute: str) -> Entry:
    values = entry.get(attribute)
    if not values:
        return entry
    marked = marked_secrets(values)
    if marked is values:
        return entry
    attrs = entry.attributes.as_dict() if isinstance(entry.attributes, Attributes) else dict(entry.attributes)
    attrs[attribute.lower()] = marked
    return Entry(entry.dn, Attributes.of(attrs), entry.uuid)


class _Stage:
    """A refresh in progress: its changes (key -> entry, None: deleted) and cookie."""

    __slots__ = ("changes", "cookie", "has_cookie")

    def __init__(self) -> None:
        self.changes: dict[str, Entry | None] = {}
        self.cookie: bytes | None = None
        self.has_cookie = False


class StoredMirror(Staging):
    """The directory as last seen: the store, plus the changes not written to it yet.

    `_changes` holds, for every entry that differs from the store's, (entry stored, entry
    now). A wholesale change (`replace_all`) makes `_full` the content until a snapshot of it
    is handed out; from then `_base` stands in for the store until the store holds it."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        with store.reading() as view:
            self.cookie: bytes | None = view.cookie()
            self.source: str = view.meta("source", "ldap")
            self._serial: int = view.meta("serial", 0)
            stored_sum = view.entry_sum()
            self._rejections = tuple(Rejection(*r) for r in view.meta("rejections", []))
            if stored_sum is None or stored_sum.count != view.count():
                stored_sum = EntrySum.of(e for _, e in view.entries())
        self._sum = stored_sum
        self._changes: dict[str, tuple[Entry | None, Entry | None]] = {}
        self._full: dict[str, Entry] | None = None
        self._base: dict[str, Entry] | None = None
        self._stage: _Stage | None = None  # a refresh in progress (see begin_refresh)

    @property
    def serial(self) -> int:
        return self._serial

    def _stored(self, key: str) -> Entry | None:
        if self._base is not None:
            return self._base.get(key)
        with self.store.reading() as view:
            return view.entry(key)

    def _current(self, key: str) -> Entry | None:
        if self._full is not None:
            return self._full.get(key)
        if key in self._changes:
            return self._changes[key][1]
        return self._stored(key)

    # -- the follower's side (Mirror's interface) -------------------------------------------
    def keys(self) -> set[str]:
        with self._lock:
            if self._full is not None:
                return set(self._full)
            if self._base is not None:
                out = set(self._base)
            else:
                with self.store.reading() as view:
                    out = set(view.keys())
            for k, (_, e) in self._changes.items():
                if e is None:
                    out.discard(k)
                else:
                    out.add(k)
            return out

    def upsert(self, key: str, dn: str, raw: Mapping[str, Sequence[bytes]] | Attributes, wanted: Iterable[str]) -> None:
        rejections: list[Rejection] = []
        if isinstance(raw, Attributes):
            entry = Entry(dn, raw, key)
        else:
            entry = compact(make_entry(dn, raw, wanted, rejections, uuid=key))
        with self._lock:
            if self._stage is not None:
                self._stage.changes[key] = entry
            else:
                self._set(key, entry)

    def delete(self, key: str) -> bool:
        """Delete `key`; False if it was not there (in a refresh: as the refresh sees it)."""
        with self._lock:
            stage = self._stage
            if stage is not None:
                existed = (stage.changes[key] if key in stage.changes else self._current(key)) is not None
                stage.changes[key] = None
                return existed
            if self._current(key) is None:
                return False
            self._set(key, None)
            return True

    # -- a staged refresh (as ldapsync.mirror.Mirror: nothing of a refresh shows until it completes)
    def begin_refresh(self) -> None:
        """Upserts, deletes and cookies are staged from now on; readers see the content and
        cookie as they were. An unfinished stage is dropped first."""
        with self._lock:
            self._stage = _Stage()

    def commit_refresh(self) -> None:
        """The refresh completed: its changes and cookie become the content, at once."""
        with self._lock:
            stage, self._stage = self._stage, None
            if stage is None:
                return
            if stage.has_cookie:
                self.cookie = stage.cookie
            empty = self._full is None and self._base is None and not self._changes and self._sum.count == 0
            if empty:  # a first read: the stage is the content, the store is written whole from it
                self._full = {k: e for k, e in stage.changes.items() if e is not None}
                self._sum = EntrySum.of(self._full.values())
                return
            for key, entry in stage.changes.items():
                current = self._current(key)
                if entry is None and current is None:
                    continue
                if entry is not None and current is not None and entry == current:
                    continue
                self._set(key, entry)

    def delete_dn(self, dn: str) -> bool:
        low = dn.lower()
        with self._lock:
            if self._stage is not None:
                found = next((k for k, e in self._stage.changes.items() if e is not None and e.dn.lower() == low), None)
                if found is not None:
                    self._stage.changes[found] = None
                    return True
            if self._full is not None:
                found = next((k for k, e in self._full.items() if e.dn.lower() == low), None)
            else:
                found = next((k for k, (_, e) in self._changes.items() if e is not None and e.dn.lower() == low), None)
                if found is None:
                    stored: Iterable[tuple[str, Entry]]
                    if self._base is not None:
                        stored = self._base.items()
                        found = next((k for k, e in stored if e.dn.lower() == low and k not in self._changes), None)
                    else:
                        with self.store.reading() as view:
                            found = next(
                                (k for k, e in view.entries() if e.dn.lower() == low and k not in self._changes), None
                            )
            if found is None:
                return False
            if self._stage is not None and found in self._stage.changes:
                staged = self._stage.changes[found]
                if staged is None or staged.dn.lower() != low:  # deleted or renamed in the refresh
                    return False
            if self._stage is not None:
                self._stage.changes[found] = None
            else:
                self._set(found, None)
            return True

    def _set(self, key: str, entry: Entry | None) -> None:
        if self._full is not None:
            old = self._full.pop(key, None)
            if entry is not None:
                self._full[key] = entry
        else:
            if key in self._changes:
                stored, old = self._changes[key]
            else:
                stored = old = self._stored(key)
                if entry is not None and entry == stored:  # a full refresh sends what is stored
                    return
            self._changes[key] = (stored, entry)
        if old is not None:
            self._sum = self._sum.removed(old)
        if entry is not None:
            self._sum = self._sum.added(entry)

    def content(self) -> EntrySum:
        with self._lock:
            return self._sum

    def replace_all(self, snapshot: Snapshot) -> bool:
        """Install a full read; True if the content differs from what was mirrored."""
        entry_sum: EntrySum = vars(snapshot).get("entry_sum") or EntrySum.of(snapshot.entries)
        with self._lock:
            self._stage = None
            before = self._sum
            self._full = {entry_key(e): compact(e) for e in snapshot.entries}
            self._changes = {}
            self._sum = entry_sum
            self._rejections = snapshot.rejections
            self.cookie = None
            self.source = snapshot.source
        return before != entry_sum

    def load(self, snapshot: Snapshot, cookie: bytes | None) -> None:
        self.replace_all(snapshot)
        self.set_cookie(cookie)

    def __len__(self) -> int:
        with self._lock:
            return self._sum.count

    # -- the agent's side ---------------------------------------------------------------------
    def snapshot(self) -> tuple[Snapshot, bytes | None]:
        """(snapshot, cookie): every difference from the store goes with it, and again with
        the next one until `written` says the store has it."""
        with self._lock:
            if self._full is not None:
                self._base, self._full = self._full, None  # changes from now on are against it
            if self._base is not None:
                content = dict(self._base)
                for key, (_, new) in self._changes.items():
                    if new is None:
                        content.pop(key, None)
                    else:
                        content[key] = new
                entries = StoredEntries(self.store, None, content, len(content))
                snapshot = Snapshot.with_sum(entries, self.source, self._rejections, self._sum)  # type: ignore[arg-type]
                return snapshot, self.cookie
            changes = {k: v for k, v in self._changes.items() if v[0] is not v[1]}
            delta = StoreDelta(changes, self._serial)
            entries = StoredEntries(self.store, delta, None, self._sum.count)
            snapshot = Snapshot.with_sum(entries, self.source, self._rejections, self._sum)  # type: ignore[arg-type]
            snapshot.with_delta(
                SnapshotDelta(self.store, self._serial, self._serial + 1, {k: new for k, (_, new) in changes.items()})
            )
            return snapshot, self.cookie

    def written(self, serial: int, snapshot: Snapshot) -> None:
        """The store now holds `snapshot` (one of ours, possibly redacted) at write `serial`:
        what it carried is settled; later changes stay, now against the store."""
        entries = snapshot.entries
        assert isinstance(entries, StoredEntries)
        with self._lock:
            self._serial = serial
            if entries.delta is None:
                assert entries.full is not None
                stored = entries.full
                base = self._base or {}
                for k, e in stored.items():
                    b = base.get(k)
                    if b is not None and b is not e and k not in self._changes:
                        self._sum = self._sum.removed(b).added(e)  # stored redacted
                changes: dict[str, tuple[Entry | None, Entry | None]] = {}
                for k, (_, now) in self._changes.items():
                    st = stored.get(k)
                    if st is now:
                        continue
                    if st is not None and now is not None and _redacted_from(st, now):
                        self._sum = self._sum.removed(now).added(st)
                        continue
                    changes[k] = (st, now)
                self._changes = changes
                self._base = None
            else:
                for key, (_, new) in entries.delta.changes.items():
                    if key not in self._changes:
                        continue
                    _, now = self._changes[key]
                    if now is new:
                        del self._changes[key]
                    elif now is not None and new is not None and _redacted_from(new, now):
                        # stored redacted: the mirror holds what the store holds, and sums it
                        del self._changes[key]
                        self._sum = self._sum.removed(now).added(new)
                    else:
                        self._changes[key] = (new, now)


def _redacted_from(stored: Entry, entry: Entry) -> bool:
    """Whether `stored` is `entry` with some values replaced by their refused markers."""
    if (stored.dn, stored.uuid) != (entry.dn, entry.uuid):
        return False
    a, b = stored.attributes, entry.attributes
    if set(a) != set(b):
        return False
    for name in a:
        x, y = a[name], b[name]
        if x != y and (len(x) != len(y) or any(u != v and u != refused_marker(v) for u, v in zip(x, y, strict=True))):
            return False
    return True


def save(
    mirror: StoredMirror,
    snapshot: Snapshot,
    cookie: bytes | None,
    engine: StoredEngine | None,
    outputs: Mapping[str, str],
    generation: str | None,
) -> int:
    """Write a sync into the store in one transaction: the snapshot's entries (its delta, or
    all of them), the engine's index and counts, the cookie that goes with exactly these
    entries, the digest, and the hashes of the outputs rendered from them; then tell the
    mirror. Returns the store's new write serial.

    `snapshot` is one of `mirror`'s (as a plan stores it: redacted); `engine` None: the
    engine's state is unknown (the next update is a full build)."""
    entries = snapshot.entries
    if not isinstance(entries, StoredEntries) or entries.store is not mirror.store:
        raise ValueError("not a snapshot of this store's mirror")
    serial = mirror.serial + 1

    def work(w: Writer) -> None:
        if entries.delta is None:
            assert entries.full is not None
            full = entries.full
            w.clear_entries()
            w.put_entries((k, full[k]) for k in sorted(full))
        else:
            for key, (_, new) in entries.delta.changes.items():
                if new is None:
                    if w.entry(key) is not None:
                        w.delete_entry(key)
                else:
                    w.put_entry(key, new)
        if engine is not None:
            engine.commit(w)
        else:
            w.set_meta("engine", None)
        w.set_cookie(cookie)
        w.set_entry_sum(snapshot.entry_sum)
        w.set_meta("source", snapshot.source)
        w.set_meta("rejections", [[r.dn, r.attribute, r.reason] for r in snapshot.rejections])
        w.set_meta("outputs", dict(outputs))
        w.set_meta("generation", generation)
        w.set_meta("serial", serial)

    mirror.store.write(work)
    if engine is not None:
        engine.pending = None
    mirror.written(serial, snapshot)
    return serial


def of_store(snapshot: Snapshot, store: Store) -> bool:
    """Whether the snapshot is `store`'s content plus a delta (a StoredMirror's)."""
    entries = snapshot.entries
    return isinstance(entries, StoredEntries) and entries.store is store and entries.delta is not None


def changes(snapshot: Snapshot, store: Store) -> Changes | None:
    """The snapshot's changed entry groups against the generation the store's content was
    recorded as, for a journal line; None if the store's content is no recorded generation."""
    entries = snapshot.entries
    if not isinstance(entries, StoredEntries) or entries.store is not store or entries.delta is None:
        return None
    with store.reading() as view:
        since = view.meta("generation")
        if not isinstance(since, str) or view.meta("serial", 0) != entries.delta.serial:
            return None
    groups: dict[tuple[str, str], tuple[list[Entry], list[Entry]]] = {}
    for old, new in entries.delta.changes.values():
        if old is not None:
            groups.setdefault((old.dn, old.uuid or ""), ([], []))[0].append(old)
        if new is not None:
            groups.setdefault((new.dn, new.uuid or ""), ([], []))[1].append(new)
    listed = tuple(Change(dn, uuid, tuple(before), tuple(after)) for (dn, uuid), (before, after) in groups.items())
    return Changes(since, listed)
