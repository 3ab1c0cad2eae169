"""Incremental rendering: after a model change, rewrite only the lines that derive from it.

An exporter with `incremental` writes one `key<separator>value` line per key, sorted by key.
Its last output is then its own index: a line is found by binary search over the bytes (keys
never contain the separator or a newline), so a 100k-line map needs no per-line structure in
memory. For a ModelChange the renderer drops every line the changed model keys may have
produced (Exporter.row_keys, plus the lines a login's record links to), adds what
Exporter.rows gives for them now, and joins the untouched stretches of the old bytes around
the edits. The result is byte-for-byte what render() gives for the new model
(tests/test_render.py checks this for random directories and changes); a change too large to
be worth splicing, a change of domains, or an exporter that is not incremental is rendered
whole.

Pure: no I/O. The +added -removed ~changed counts against the previous bytes come for free,
so a plan need not re-parse an installed file that is exactly the previous output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ldapsync.exporters import Exporter
from ldapsync.routing import ModelChange, RoutingModel

FULL = ModelChange(full=True)
SPLICE_MIN = 256  # changed model keys always spliced up to this many ...
SPLICE_SHARE = 8  # ... and up to one per this many lines of the output; more: render whole


@dataclass(frozen=True, slots=True)
class Edit:
    """How spliced bytes differ from the bytes they were spliced from, line by line."""

    base: bytes
    base_sha256: str
    added: int = 0  # keys
    removed: int = 0
    changed: int = 0  # keys whose value changed
    gone: tuple[str, ...] = ()  # the keys removed
    put: tuple[bytes, ...] = ()  # the lines added or changed, with their newline


@dataclass(frozen=True, slots=True)
class Rendered:
    """One output's bytes; `edit` says how they differ from the previous ones (None: unknown)."""

    data: bytes
    sha256: str
    lines: int  # in data
    edit: Edit | None = None


Linked = str | tuple[str, ...]  # one key (the usual case: no tuple per login in memory) or several


def _links(pairs: Iterable[tuple[str, str]]) -> dict[str, Linked]:
    out: dict[str, Linked] = {}
    for login, key in pairs:
        had = out.get(login)
        out[login] = key if had is None else (*_keys(had), key)
    return out


def _keys(linked: Linked | None) -> tuple[str, ...]:
    return () if linked is None else (linked,) if isinstance(linked, str) else linked


def diff_models(old: RoutingModel, new: RoutingModel) -> ModelChange:
    """Every key whose value differs between two models: the reference the model engine's changes
    are tested against (tests/test_render.py), O(model size). Two distinct objects: the engine
    updates its model in place."""
    if (old.domain, old.domain_aliases, dict(old.hosted)) != (new.domain, new.domain_aliases, dict(new.hosted)):
        return FULL
    addresses: set[str] = set()
    for a, b in (
        (old.users, new.users),
        (old.aliases, new.aliases),
        (old.forwards, new.forwards),
        (old.disabled, new.disabled),
        (old.sender_logins, new.sender_logins),
        (old.local, new.local),
        (old.groups, new.groups),
    ):
        addresses.update(_differing(a, b))
    logins = _differing(old.passwords, new.passwords) | _differing(old.mailboxes, new.mailboxes)
    return ModelChange(frozenset(addresses), frozenset(logins))


def _differing(a: Mapping[str, object], b: Mapping[str, object]) -> set[str]:
    if a is b:
        return set()
    # a set operation on the items: the comparing runs in C
    return {k for k, _ in a.items() ^ b.items()}


class WholeModelNeeded(Exception):
    """Given only the changed part of the model, the renderer cannot splice: build it whole."""


class Renderer:
    """Renders one exporter's output, splicing the previous one when given what changed.

    Holds the previous output, its domains and, for exporters that link lines to a login's
    record, those links (unless `links` is off: then every change names its part's model
    before, ModelChange.before, and the links come from that); render() must see every model,
    in order (a missed model makes the next change relative to the wrong previous one: pass
    FULL then).
    """

    __slots__ = ("_data", "_domains", "_keep_links", "_lines", "_links", "_sha256", "exporter")

    def __init__(self, exporter: Exporter, *, links: bool = True):
        self.exporter = exporter
        self._data: bytes | None = None
        self._sha256 = ""
        self._lines = 0
        self._domains: object = None
        self._links: dict[str, Linked] = {}
        self._keep_links = links

    @property
    def sha256(self) -> str | None:
        """Of the last output, None before the first."""
        return self._sha256 if self._data is not None else None

    def restore(self, data: bytes, model_domains: RoutingModel) -> None:
        """Carry on from `data`, this exporter's output of a model with these domains (a
        restart, from the installed file the store says it rendered); links must be off."""
        assert not self._keep_links
        self._data, self._sha256 = data, hashlib.sha256(data).hexdigest()
        self._lines = data.count(b"\n")
        self._domains = _domains(model_domains)

    def render(self, model: RoutingModel, change: ModelChange = FULL) -> Rendered:
        exp = self.exporter
        domains = _domains(model)
        data = self._data
        part = change.before is not None  # `model` is only the changed part
        if data is None or change.full or domains != self._domains:
            return self._whole(model, domains, part)
        unchanged = Rendered(data, self._sha256, self._lines, Edit(data, self._sha256))
        if not change.addresses and not change.logins:
            return unchanged
        if not exp.incremental or (
            # many keys for few lines: a whole render from the whole model is cheaper, but only
            # a model that is whole (a part's would need a full build first: splice it)
            not part and len(change.addresses) + len(change.logins) > max(SPLICE_MIN, self._lines // SPLICE_SHARE)
        ):
            return self._whole(model, domains, part)
        spliced = self._splice(data, model, change)
        if spliced is None:
            return self._whole(model, domains, part)
        if spliced.data is data:
            return unchanged
        edit = Edit(data, self._sha256, spliced.added, spliced.removed, spliced.changed, spliced.gone, spliced.put)
        self._data, self._sha256 = spliced.data, hashlib.sha256(spliced.data).hexdigest()
        self._lines += spliced.added - spliced.removed
        return Rendered(spliced.data, self._sha256, self._lines, edit)

    def _whole(self, model: RoutingModel, domains: object, part: bool = False) -> Rendered:
        exp = self.exporter
        if part:
            raise WholeModelNeeded(f"{exp.kind}: this change cannot be spliced")
        data = exp.render(model)
        self._data, self._sha256, self._domains = data, hashlib.sha256(data).hexdigest(), domains
        self._lines = data.count(b"\n")
        self._links = _links(exp.linked(model, None)) if exp.incremental and self._keep_links else {}
        return Rendered(data, self._sha256, self._lines)

    def _splice(self, data: bytes, model: RoutingModel, change: ModelChange) -> Splice | None:
        """The new bytes and their edits; None if only a whole render is safe."""
        exp = self.exporter
        # Only canonical addresses and logins (no '@') can be model keys; anything else a change
        # names would only make row_keys() drop another key's line (an alias-domain variant).
        hosted = {model.domain, *model.hosted}
        addresses = frozenset(a for a in change.addresses if a.rpartition("@")[2] in hosted)
        logins = frozenset(login for login in change.logins if "@" not in login)
        drop = set(exp.row_keys(model, addresses, logins))
        links = self._links
        relinked: dict[str, Linked] = {}
        if logins:
            if change.before is not None:  # the part's old model says what its records linked
                for _, key in exp.linked(change.before, logins):
                    drop.add(key)
            for login in logins:
                drop.update(_keys(links.get(login)))
            relinked = _links(exp.linked(model, logins))
            for keys in relinked.values():
                drop.update(_keys(keys))
        rows = dict(exp.rows(model, addresses, logins))
        if not rows.keys() <= drop or (data and not data.endswith(b"\n")):
            return None  # the exporter broke its contract (or the bytes are not its output)
        out = splice(data, exp.separator, sorted(drop), rows)
        if out is None:
            return None
        if self._keep_links:
            for login in logins:
                links.pop(login, None)
            links.update(relinked)
        return out


def _domains(model: RoutingModel) -> object:
    return (model.domain, model.domain_aliases, tuple(model.hosted.items()))


@dataclass(frozen=True, slots=True)
class Splice:
    """What splice() made: the new bytes, and which lines it removed, added or changed."""

    data: bytes
    added: int
    removed: int
    changed: int
    gone: tuple[str, ...]  # keys removed
    put: tuple[bytes, ...]  # lines added or changed


def splice(data: bytes, separator: str, keys: Iterable[str], rows: Mapping[str, str]) -> Splice | None:
    """`data` (sorted `key<separator>value` lines) with the lines of `keys` (sorted) replaced by
    `rows` (a key missing from `rows` loses its line).

    The same bytes object comes back when no line changes; None if a key holds the separator
    or a newline (it could not be found again)."""
    sep = separator.encode()
    pieces: list[bytes] = []
    kept = 0  # data[:kept] is already in pieces
    lo = 0
    added = changed = 0
    gone: list[str] = []
    put: list[bytes] = []
    for key in keys:
        k = key.encode()
        if sep in k or b"\n" in k:
            return None
        start, end = _find(data, k, sep, lo)
        value = rows.get(key)
        line = b"".join((k, sep, value.encode(), b"\n")) if value is not None else b""
        if start < end:  # the key has a line
            lo = end
            if value is not None and data[start:end] == line:
                continue
            if value is None:
                gone.append(key)
            else:
                changed += 1
                put.append(line)
            pieces += (data[kept:start], line)
            kept = end
        else:
            lo = start
            if value is not None:
                added += 1
                put.append(line)
                pieces += (data[kept:start], line)
                kept = start
    if not pieces:
        return Splice(data, 0, 0, 0, (), ())
    pieces.append(data[kept:])
    return Splice(b"".join(pieces), added, len(gone), changed, tuple(gone), tuple(put))


def _find(data: bytes, key: bytes, sep: bytes, lo: int) -> tuple[int, int]:
    """(start, end) of key's line in data[lo:], or (offset, offset) where it would go.

    `lo` is the start of a line (or len(data)); lines are sorted by key."""
    hi = len(data)
    while lo < hi:
        mid = (lo + hi) // 2
        start = data.rfind(b"\n", lo, mid) + 1 or lo  # the line holding byte `mid`
        end = data.index(b"\n", start) + 1
        stop = data.find(sep, start, end)
        found = data[start : stop if stop >= 0 else end - 1]
        if found < key:
            lo = end
        elif found > key:
            hi = start
        else:
            return start, end
    return lo, lo
