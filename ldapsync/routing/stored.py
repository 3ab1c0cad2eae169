"""The routing engine on the store: a change costs its component, and nothing stays in memory.

The same rule as routing/incremental.py (the model is the union of what routing.build gives
for each component of entries linked by shared names), with the index of names and the
entries in the store (ldapsync.state.lmdbstore) instead of in the process. A change reads
the entries of its component from the store, builds that part once as it was and once as
it is, and hands both parts on: the renderers splice the lines the old part gave for the
new part's (ModelChange.before), so no whole model is kept either. The index updates and
the problem counts wait in `pending` until the agent writes them to the store together
with the entries and the cookie (commit), in one transaction.

A full build (the first one, a new day, a change reaching a large part of the directory,
another routing configuration, a snapshot that is not the store's plus a delta) reads every
entry, builds the whole model in memory as routing.build does, and files every entry's
names anew; the memory goes once the sync is done.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

from ldapsync.directory import Entry, Rejection, Snapshot, entry_key, entry_order
from ldapsync.routing.build import build
from ldapsync.routing.entry import EntryCache, Names, Parsed, entry_names, entry_parser
from ldapsync.routing.incremental import FULL_FRACTION, Counts, linked, static_names, static_subset, swap
from ldapsync.routing.types import BuildReport, ModelChange, RoutingModel, Settings
from ldapsync.state.lmdbstore import INDEX_TABLES, Store, View, Writer
from ldapsync.static import Static


def counts_json(c: Counts) -> dict[str, Any]:
    return {
        "rejections": [[r.dn, r.attribute, r.reason, n] for r, n in c.rejections.items()],
        "warnings": [[w, n] for w, n in c.warnings.items()],
        "notices": [[r.dn, r.attribute, r.reason, n] for r, n in c.notices.items()],
        "retired": c.retired,
        "skipped": c.skipped,
        "weak": c.weak,
    }


def counts_from_json(doc: dict[str, Any]) -> Counts:
    return Counts(
        Counter({Rejection(d, a, r): n for d, a, r, n in doc["rejections"]}),
        Counter({w: n for w, n in doc["warnings"]}),
        Counter({Rejection(d, a, r): n for d, a, r, n in doc["notices"]}),
        int(doc["retired"]),
        int(doc["skipped"]),
        int(doc["weak"]),
    )


@dataclass(slots=True)
class Pending:
    """What the last update would write to the store (StoredEngine.commit)."""

    full: bool
    names: dict[str, tuple[Names | None, Names | None]]  # key -> (filed now, to file); full: (None, names)
    counts: Counts
    day: date


class StoredEngine:
    """Routing model + report for successive snapshots of a StoredMirror."""

    def __init__(self, settings: Settings, static: Static, store: Store) -> None:
        self.settings = settings
        self.static = static
        self.store = store
        self._canon = settings.canonical_domains()
        self._statics, self._static_entries = static_names(static)
        self.fingerprint = _fingerprint(settings, static)
        self.last_full = True
        self.pending: Pending | None = None
        self._force_full = False

    def reset(self) -> None:
        """Forget what the last update computed: nothing of it reaches the store."""
        self.pending = None

    def force_full(self) -> None:
        """The next update is a full build (the renderers lost step with the store)."""
        self._force_full = True
        self.pending = None

    # -- the one entry point ---------------------------------------------------------------
    def update(self, snapshot: Snapshot, today: date) -> tuple[RoutingModel, BuildReport, ModelChange]:
        self.pending = None
        try:
            with self.store.reading() as view:
                stored = self._stored_state(view, today)
                delta = _store_delta(snapshot, self.store, view)
                if stored is None or delta is None or self._force_full:
                    return self._full(snapshot, today)
                return self._partial(view, snapshot, today, delta, stored)
        except BaseException:
            self.pending = None
            raise

    def _stored_state(self, view: View, today: date) -> Counts | None:
        doc = view.meta("engine")
        if not isinstance(doc, dict) or doc.get("fingerprint") != self.fingerprint:
            return None
        if doc.get("day") != today.isoformat():
            return None  # retirement dates: a new day is a full build
        try:
            return counts_from_json(doc["counts"])
        except (KeyError, TypeError, ValueError):
            return None

    # -- full build ------------------------------------------------------------------------
    def _full(self, snapshot: Snapshot, today: date) -> tuple[RoutingModel, BuildReport, ModelChange]:
        self._force_full = False
        cache: EntryCache = {}
        routing, report = build(snapshot, self.static, self.settings, today, cache=cache)
        self.last_full = True
        entries = snapshot.entries
        names: dict[str, tuple[Names | None, Names | None]] = {}
        parse = entry_parser(self.settings, today)
        for e in entries:
            hit = cache.get(e.dn)
            parsed = hit[1] if hit is not None and hit[0] is e else parse(e)
            names[entry_key(e)] = (None, entry_names(e, parsed, self.settings, self._canon))
        if len(names) == len(entries):  # keys repeat (not a directory a store can hold): no pending
            counts = Counts.of(report, len(snapshot.rejections))
            self.pending = Pending(True, names, counts, today)
        return routing, report, ModelChange(full=True)

    # -- a change: its components ----------------------------------------------------------
    def _partial(
        self,
        view: View,
        snapshot: Snapshot,
        today: date,
        delta: dict[str, tuple[Entry | None, Entry | None]],
        counts: Counts,
    ) -> tuple[RoutingModel, BuildReport, ModelChange]:
        parse = entry_parser(self.settings, today)
        parsed: dict[int, Parsed] = {}  # by id(entry), for the entries this change reads

        def parsed_of(e: Entry) -> Parsed:
            p = parsed.get(id(e))
            if p is None:
                p = parsed[id(e)] = parse(e)
            return p

        def names_of(e: Entry) -> Names:
            return entry_names(e, parsed_of(e), self.settings, self._canon)

        stored: dict[str, Entry | None] = {}

        def stored_entry(key: str) -> Entry | None:
            if key not in stored:
                stored[key] = view.entry(key)
            return stored[key]

        old_names = {k: names_of(old) for k, (old, _) in delta.items() if old is not None}
        new_names = {k: names_of(new) for k, (_, new) in delta.items() if new is not None}

        def unchanged_names(key: str) -> list[Names]:
            if key in self._statics:
                return [self._statics[key]]
            e = stored_entry(key)
            return [names_of(e)] if e is not None else []

        limit = max(64, view.count() // FULL_FRACTION)
        component = linked(delta, old_names, new_names, unchanged_names, lambda n: _neighbours(view, n), limit)
        if component is None:
            return self._full(snapshot, today)

        old_part: list[Entry] = []
        new_part: list[Entry] = []
        for k in component:
            if k in delta:
                old, new = delta[k]
                if old is not None:
                    old_part.append(old)
                if new is not None:
                    new_part.append(new)
            elif k not in self._statics:
                e = stored_entry(k)
                if e is not None:
                    old_part.append(e)
                    new_part.append(e)
        old_part.sort(key=entry_order)
        new_part.sort(key=entry_order)
        static = static_subset(self.static, self._static_entries, component)
        s = self.settings
        old_cache = {e.dn: (e, parsed_of(e)) for e in old_part}
        new_cache = {e.dn: (e, parsed_of(e)) for e in new_part}
        old_model, old_report = build(Snapshot(tuple(old_part), snapshot.source), static, s, today, cache=old_cache)
        new_model, new_report = build(Snapshot(tuple(new_part), snapshot.source), static, s, today, cache=new_cache)

        counts.swap(old_report, new_report)  # a copy of the stored counts: the store keeps its own

        addresses: set[str] = set()
        logins: set[str] = set()
        for model in (old_model, new_model):
            for table in (model.users, model.aliases, model.forwards, model.disabled, model.sender_logins):
                addresses.update(table)
            addresses.update(model.local)
            addresses.update(model.groups)
            logins.update(model.passwords)
            logins.update(model.mailboxes)
            logins.update(model.login_addresses)
            logins.update(model.users.values())
        self.pending = Pending(False, {k: (old_names.get(k), new_names.get(k)) for k in delta}, counts, today)
        self.last_full = False
        return (
            new_model,
            counts.report(snapshot),
            ModelChange(frozenset(addresses), frozenset(logins), before=old_model),
        )

    def stored_as(self, replaced: Iterable[tuple[Entry, Entry]]) -> None:
        """Entries of the last update go to the store in another form (a refused password
        replaced by its marker): count their problems as that form gives them, so the counts
        match what a later change rebuilds from the store. Only the entry's own reasons
        differ (the value is refused either way): its parse is swapped, nothing else."""
        p = self.pending
        if p is None:
            return
        parse = entry_parser(self.settings, p.day)
        for before, after in replaced:
            was, now = parse(before), parse(after)
            swap(p.counts.rejections, was.rejections, now.rejections)
            swap(p.counts.notices, was.notices, now.notices)

    # -- the store -------------------------------------------------------------------------
    def commit(self, w: Writer) -> None:
        """Write what the last update decided (in the caller's transaction, which also holds
        the entries it was about): the index and the problem counts; if the update did not
        finish, that nothing is known, and the next update is a full build."""
        p = self.pending
        if p is None:
            w.set_meta("engine", None)
            return
        if p.full:
            for table in INDEX_TABLES:
                w.clear_table(table)
            every = [*self._statics.items(), *((k, n) for k, (_, n) in p.names.items() if n is not None)]
            for field_name, table, _ in _PAIRS:
                w.file_many(table, ((name, key) for key, names in every for name in getattr(names, field_name)))
            w.set_meta("engine", self._record(p))
            return
        for key, (old, new) in p.names.items():
            if old is not None:
                _unfile(w, key, old)
            if new is not None:
                _file(w, key, new)
        w.set_meta("engine", self._record(p))

    def _record(self, p: Pending) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "day": p.day.isoformat(), "counts": counts_json(p.counts)}


def _store_delta(snapshot: Snapshot, store: Store, view: View) -> dict[str, tuple[Entry | None, Entry | None]] | None:
    """The snapshot's changes against the store, if it is the store's content plus them."""
    from ldapsync.stored import StoredEntries  # the mirror's side of the same store

    entries = snapshot.entries
    if not isinstance(entries, StoredEntries) or entries.store is not store or entries.delta is None:
        return None
    if entries.delta.serial != view.meta("serial", 0):
        return None
    return dict(entries.delta.changes)


_PAIRS = (
    ("logins", "logins", ("logins",)),
    ("addresses", "addresses", ("addresses", "to_addresses")),
    ("dns", "dns", ("dns", "to_dns")),
    ("to_addresses", "to_addresses", ("addresses",)),
    ("to_dns", "to_dns", ("dns",)),
)


def _neighbours(view: View, names: Names) -> Iterator[str]:
    """Keys whose routing may depend on an entry with these names, or it on them."""
    for field_name, _, tables in _PAIRS:
        for name in getattr(names, field_name):
            for table in tables:
                yield from view.holders(table, name)


def _file(w: Writer, key: str, names: Names) -> None:
    for field_name, table, _ in _PAIRS:
        held: Iterable[str] = getattr(names, field_name)
        w.file(table, held, key)


def _unfile(w: Writer, key: str, names: Names) -> None:
    for field_name, table, _ in _PAIRS:
        held: Iterable[str] = getattr(names, field_name)
        w.unfile(table, held, key)


def _fingerprint(settings: Settings, static: Static) -> str:
    """What the index and counts depend on besides the entries: settings and static data."""
    doc = [repr(settings), repr(static.aliases), repr(static.forwards), str(static.file)]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]
