"""The routing model kept up to date change by change; routing.build stays the reference.

Entries decide each other's routing only through names they share: a login two entries want,
an address (own, alias, group name) one claims and another claims too or routes to (forward
target, alias or group member), a DN a group lists as a member. Those links split the
directory into components, and the model is the union of what routing.build gives for each
component on its own. So after a change the engine finds the component(s) the changed
entries belong to, before and after the change (a breadth-first walk over an index of
claimed and referenced names), runs routing.build on just those entries (once as they were,
once as they are), and swaps the old part of the model for the new one. Conflicts, loops,
groups, static overrides and sender logins are decided by the same code as a full build,
over the same entries, in the same order.

Whether an address is accepted can depend on its targets (a forward or alias whose every target
in our domains is disabled, retired or unknown is dropped, routing/targets.py): the same
links carry that, since a target is a name one entry routes to and another claims (or, once it
exists, will claim), so the entries along a chain are one component.

The index over-approximates (an entry claims every name it could hold, won or not): a bigger
component costs time, never correctness. When a change reaches a large part of the
directory, on a new day (retirement dates) or on the first snapshot, the engine falls back to
one full build. tests/test_incremental.py checks with hypothesis that the result always
equals a full build of the final directory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from ldapsync.directory import Entry, Rejection, Snapshot, entry_key, entry_order
from ldapsync.routing.build import build
from ldapsync.routing.entry import EntryCache, Names, Parsed, entry_names, entry_parser
from ldapsync.routing.types import BuildReport, ModelChange, RoutingModel, Settings
from ldapsync.static import Static, StaticEntry

FULL_FRACTION = 4  # a change whose components hold more than 1/FULL_FRACTION of the entries: full build
_STATIC = "\x00static:"  # keys of the static entries in the index (never an entry key: not a DN or UUID)

# The model's tables keyed by address, and those keyed by login.
ADDRESS_TABLES = ("users", "aliases", "forwards", "disabled", "sender_logins", "local", "groups")
LOGIN_TABLES = ("passwords", "mailboxes", "login_addresses")


class _Index:
    """name -> the keys claiming it, and -> the keys routing to it (a str for one, a set for more)."""

    __slots__ = ("addresses", "dns", "logins", "to_addresses", "to_dns")

    def __init__(self) -> None:
        self.logins: dict[str, Any] = {}
        self.addresses: dict[str, Any] = {}
        self.dns: dict[str, Any] = {}
        self.to_addresses: dict[str, Any] = {}
        self.to_dns: dict[str, Any] = {}

    def _pairs(self, names: Names) -> tuple[tuple[dict[str, Any], tuple[str, ...]], ...]:
        return (
            (self.logins, names.logins),
            (self.addresses, names.addresses),
            (self.dns, names.dns),
            (self.to_addresses, names.to_addresses),
            (self.to_dns, names.to_dns),
        )

    def add(self, key: str, names: Names) -> None:
        for table, held in self._pairs(names):
            for name in held:
                found = table.get(name)
                if found is None:
                    table[name] = key
                elif isinstance(found, set):
                    found.add(key)
                elif found != key:
                    table[name] = {found, key}

    def remove(self, key: str, names: Names) -> None:
        for table, held in self._pairs(names):
            for name in held:
                found = table.get(name)
                if found == key:
                    del table[name]
                elif isinstance(found, set):
                    found.discard(key)
                    if len(found) == 1:
                        table[name] = next(iter(found))

    def neighbours(self, names: Names) -> Iterator[str]:
        """Keys whose routing may depend on an entry with these names, or it on them."""
        for name in names.logins:
            yield from _keys(self.logins.get(name))
        for name in names.addresses:
            yield from _keys(self.addresses.get(name))
            yield from _keys(self.to_addresses.get(name))
        for name in names.dns:
            yield from _keys(self.dns.get(name))
            yield from _keys(self.to_dns.get(name))
        for name in names.to_addresses:
            yield from _keys(self.addresses.get(name))
        for name in names.to_dns:
            yield from _keys(self.dns.get(name))


def _keys(held: Any) -> Iterable[str]:
    if held is None:
        return ()
    if isinstance(held, set):
        return held
    return (held,)


class Engine:
    """Routing model + report for successive snapshots, each change costing its components."""

    def __init__(self, settings: Settings, static: Static, *, index: bool = True) -> None:
        """`index=False`: every update is a full build, without the index (a one-shot run)."""
        self.settings = settings
        self.index = index
        self.static = static
        self._canon = settings.canonical_domains()
        self._statics, self._static_entries = static_names(static)
        self.last_full = True  # whether the last update was a full build (for tests and the log)
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next update is a full build."""
        self._day: date | None = None
        self._parse: Callable[[Entry], Parsed] | None = None
        self._entries: dict[str, Entry] = {}
        self._cache: EntryCache = {}  # per DN, reused while the Entry object is the same
        self._index = _Index()
        self._model: RoutingModel | None = None
        self._seen: tuple[object, int] | None = None  # (mirror, serial) of the last snapshot built
        self._exact = True  # False: keys repeat in the snapshot, every update is a full build
        self._counts = Counts()

    # -- the one entry point ---------------------------------------------------------------
    def update(self, snapshot: Snapshot, today: date) -> tuple[RoutingModel, BuildReport, ModelChange]:
        """The model of `snapshot`, with which of its keys may differ from the previous model.

        The model returned is updated in place by the next call: its tables iterate in no
        particular order (exporters sort)."""
        try:
            if self._model is None or today != self._day or not self._exact or not self.index:
                return self._full(snapshot, today)
            changed = self._delta(snapshot)
            if changed is None:
                changed = self._changes(snapshot)
            if changed is None:
                return self._full(snapshot, today)
            if not changed:
                self.last_full = False
                return self._model, self._report(snapshot), ModelChange()
            return self._partial(snapshot, today, changed)
        except BaseException:
            self.reset()  # half-applied state must never be built on
            raise
        finally:
            delta = snapshot.delta
            self._seen = (delta.origin, delta.serial) if delta is not None and self._model is not None else None

    # -- full build: the reference, plus the index ------------------------------------------
    def _full(self, snapshot: Snapshot, today: date) -> tuple[RoutingModel, BuildReport, ModelChange]:
        self.reset()
        routing, report = build(snapshot, self.static, self.settings, today, cache=self._cache if self.index else None)
        self._model = routing
        self.last_full = True
        if not self.index:
            return routing, report, ModelChange(full=True)
        parse = self._parser(today)
        entries: dict[str, Entry] = {}
        index = self._index
        cache = self._cache
        for e in snapshot.entries:
            key = entry_key(e)
            entries[key] = e
            hit = cache.get(e.dn)
            parsed = hit[1] if hit is not None and hit[0] is e else parse(e)
            index.add(key, self._names(e, parsed))
        for key, names in self._statics.items():
            index.add(key, names)
        self._exact = len(entries) == len(snapshot.entries)
        self._entries = entries
        self._day = today
        known = len(snapshot.rejections)
        self._counts = Counts.of(report, known)
        return routing, self._report(snapshot), ModelChange(full=True)

    def _parser(self, today: date) -> Callable[[Entry], Parsed]:
        if self._parse is None or self._day != today:
            self._parse = entry_parser(self.settings, today)
        return self._parse

    # -- what changed ----------------------------------------------------------------------
    def _limit(self) -> int:
        """Entries a change may reach before one full build is cheaper than piecewise work."""
        return max(64, len(self._entries) // FULL_FRACTION)

    def _delta(self, snapshot: Snapshot) -> dict[str, Entry | None] | None:
        """What changed, as the mirror says, if this engine saw the snapshot it is relative to."""
        delta = snapshot.delta
        if delta is None or self._seen != (delta.origin, delta.since):
            return None
        entries = self._entries
        if len(delta.changed) > self._limit():
            return None
        changed = {k: e for k, e in delta.changed.items() if e is not None or k in entries}
        size = len(entries) + sum(1 for k, e in changed.items() if e is not None and k not in entries)
        size -= sum(1 for k, e in changed.items() if e is None)
        if size != len(snapshot.entries):  # not the delta of this snapshot after all: compare every entry
            return None
        return changed

    def _changes(self, snapshot: Snapshot) -> dict[str, Entry | None] | None:
        """key -> new entry (None: deleted) for every entry not the same object as before.

        None when the change is too large to be worth doing piecewise (or keys repeat)."""
        entries = self._entries
        limit = self._limit()
        changed: dict[str, Entry | None] = {}
        kept = 0
        for e in snapshot.entries:
            key = entry_key(e)
            old = entries.get(key)
            if old is e:
                kept += 1
                continue
            if key in changed:
                return None  # a key twice
            changed[key] = e
            if old is not None:
                kept += 1
            if len(changed) > limit:
                return None
        if kept != len(entries):  # some keys are gone
            present = {entry_key(e) for e in snapshot.entries}
            for key in entries:
                if key not in present:
                    changed[key] = None
            if len(changed) > limit:
                return None
        return changed

    def _names(self, entry: Entry, parsed: Parsed) -> Names:
        return entry_names(entry, parsed, self.settings, self._canon)

    def _names_of(self, key: str) -> Names:
        static = self._statics.get(key)
        if static is not None:
            return static
        entry = self._entries[key]
        return self._names(entry, self._parsed_of(entry))

    def _parsed_of(self, entry: Entry) -> Parsed:
        hit = self._cache.get(entry.dn)
        if hit is not None and hit[0] is entry:
            return hit[1]
        assert self._parse is not None
        return self._parse(entry)  # the DN is shared with another entry (a rename under way)

    # -- a change: rebuild its components --------------------------------------------------
    def _partial(
        self, snapshot: Snapshot, today: date, changed: dict[str, Entry | None]
    ) -> tuple[RoutingModel, BuildReport, ModelChange]:
        assert self._model is not None
        entries = self._entries
        parse = self._parser(today)
        new_parsed = {k: parse(e) for k, e in changed.items() if e is not None}
        old_names = {k: self._names_of(k) for k in changed if k in entries}
        new_names = {k: self._names(e, new_parsed[k]) for k, e in changed.items() if e is not None}

        component = linked(
            changed, old_names, new_names, lambda k: [self._names_of(k)], self._index.neighbours, self._limit()
        )
        if component is None:
            return self._full(snapshot, today)

        old_part = [entries[k] for k in component if k in entries]
        new_part = [e for k in component if (e := changed[k] if k in changed else entries.get(k)) is not None]
        old_part.sort(key=entry_order)
        new_part.sort(key=entry_order)
        static = static_subset(self.static, self._static_entries, component)
        old_cache = {e.dn: (e, self._parsed_of(e)) for e in old_part}
        new_cache = {e.dn: (e, new_parsed.get(entry_key(e)) or self._parsed_of(e)) for e in new_part}
        s = self.settings
        old_model, old_report = build(Snapshot(tuple(old_part), snapshot.source), static, s, today, cache=old_cache)
        new_model, new_report = build(Snapshot(tuple(new_part), snapshot.source), static, s, today, cache=new_cache)

        # Nothing is changed above this line: an exception leaves the engine as it was.
        routing = self._model
        addresses: set[str] = set()
        logins: set[str] = set()
        for names_set, tables in ((addresses, ADDRESS_TABLES), (logins, LOGIN_TABLES)):
            for name in tables:
                table: dict[str, Any] = getattr(routing, name)
                old_t: Mapping[str, Any] = getattr(old_model, name)
                new_t: Mapping[str, Any] = getattr(new_model, name)
                for k in old_t:
                    if k not in new_t:
                        del table[k]
                table.update(new_t)
                names_set.update(old_t)
                names_set.update(new_t)
        logins.update(old_model.users.values())
        logins.update(new_model.users.values())
        self._counts.swap(old_report, new_report)

        for key, entry in changed.items():
            if key in old_names:
                self._index.remove(key, old_names[key])
            if entry is None:
                del entries[key]
                continue
            self._index.add(key, new_names[key])
            entries[key] = entry
            self._cache[entry.dn] = (entry, new_parsed[key])
        self.last_full = False
        return routing, self._report(snapshot), ModelChange(frozenset(addresses), frozenset(logins))

    def _report(self, snapshot: Snapshot) -> BuildReport:
        return self._counts.report(snapshot)


@dataclass(slots=True)
class Counts:
    """The problems of the whole directory, kept as counts so that a change swaps its own part's."""

    rejections: Counter[Rejection] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    notices: Counter[Rejection] = field(default_factory=Counter)
    retired: int = 0
    skipped: int = 0
    weak: int = 0

    @classmethod
    def of(cls, report: BuildReport, known: int) -> Counts:
        """A full build's report (its first `known` rejections are the snapshot's own)."""
        return cls(
            Counter(report.rejections[known:]),
            Counter(report.warnings),
            Counter(report.notices),
            report.retired,
            report.skipped,
            report.weak_passwords,
        )

    def swap(self, old: BuildReport, new: BuildReport) -> None:
        """A part's problems as it was replaced by its problems as it is, in O(part)."""
        swap(self.rejections, old.rejections, new.rejections)
        swap(self.warnings, old.warnings, new.warnings)
        swap(self.notices, old.notices, new.notices)
        self.retired += new.retired - old.retired
        self.skipped += new.skipped - old.skipped
        self.weak += new.weak_passwords - old.weak_passwords

    def report(self, snapshot: Snapshot) -> BuildReport:
        """The report of the whole directory; problems in a fixed order (not the build's)."""
        return BuildReport(
            rejections=[*snapshot.rejections, *sorted(self.rejections.elements(), key=problem_order)],
            warnings=sorted(self.warnings.elements()),
            notices=sorted(self.notices.elements(), key=problem_order),
            retired=self.retired,
            skipped=self.skipped,
            weak_passwords=self.weak,
        )


def linked(
    changed: Collection[str],
    old_names: Mapping[str, Names],
    new_names: Mapping[str, Names],
    names_of: Callable[[str], list[Names]],
    neighbours: Callable[[Names], Iterable[str]],
    limit: int,
) -> set[str] | None:
    """Every key linked to a changed entry, before or after the change, transitively (the
    part a change rebuilds); None once it holds more than `limit` keys (a full build is cheaper).

    `names_of`: the names of an unchanged key; `neighbours`: the keys an index files under
    names an entry claims or routes to (both engines' indexes answer the same question)."""
    component = set(changed)
    todo = list(changed)
    while todo:
        key = todo.pop()
        if key in changed:
            names = [n for n in (old_names.get(key), new_names.get(key)) if n is not None]
        else:
            names = names_of(key)
        for n in names:
            for other in neighbours(n):
                if other not in component:
                    component.add(other)
                    todo.append(other)
        if len(component) > limit:
            return None
    return component


StaticNames = dict[str, Names]
StaticEntries = dict[str, tuple[str, StaticEntry]]


def static_names(static: Static) -> tuple[StaticNames, StaticEntries]:
    """The static entries under keys of their own in the index (never an entry's key)."""
    names: StaticNames = {}
    entries: StaticEntries = {}
    for kind, group in (("alias", static.aliases), ("forward", static.forwards)):
        for s in group:
            key = f"{_STATIC}{len(names)}"
            names[key] = Names(addresses=(s.address,), to_addresses=s.targets)
            entries[key] = (kind, s)
    return names, entries


def static_subset(static: Static, entries: StaticEntries, keys: Iterable[str]) -> Static:
    """The static entries among `keys`, in the file's order."""
    chosen = sorted((int(k[len(_STATIC) :]), k) for k in keys if k.startswith(_STATIC))
    picked = [entries[k] for _, k in chosen]
    return Static(
        static.file,
        tuple(s for kind, s in picked if kind == "alias"),
        tuple(s for kind, s in picked if kind == "forward"),
    )


def swap(counter: Counter[Any], old: Iterable[Any], new: Iterable[Any]) -> None:
    """Replace a component's old problems by its new ones, in O(change)."""
    old = list(old)
    counter.subtract(old)
    counter.update(new)
    for problem in old:
        if counter[problem] <= 0:
            del counter[problem]


def problem_order(r: Rejection) -> tuple[str, str, str, str]:
    return (r.dn.lower(), r.dn, r.attribute, r.reason)
