"""`ldapsync explain ADDRESS`: where an address goes in every output, and which rules decided it.

The routing model is rebuilt once with a trace (routing.Event per decision); the outputs'
lines come from the installed generation (what the MTA really answers) or, with --live,
from a fresh read of the directory. Nothing is written: explain is a read-only command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from ldapsync import routing, validate
from ldapsync.config import Config, ExporterSpec
from ldapsync.directory import Snapshot
from ldapsync.errors import LdapsyncError
from ldapsync.exporters import Exporter
from ldapsync.static import Static


class ExplainError(LdapsyncError):
    """The question cannot be answered (not an address, nothing installed yet)."""


@dataclass(frozen=True, slots=True)
class OutputAnswer:
    """What one configured output holds for the address: (key, value) pairs, values redacted."""

    name: str
    kind: str
    lines: tuple[tuple[str, str], ...]
    differs: bool = False  # the installed file is not what the current config renders


@dataclass(frozen=True, slots=True)
class Reference:
    """An alias, group, forward or static entry whose targets include the address."""

    address: str  # the address that routes to the one explained
    kind: str  # "alias", "group", "forward", "static alias" or "static forward"
    source: str  # the entry DN, or `file: key`
    attribute: str = ""
    dropped: str = ""  # why the reference was dropped (the address accepts no mail); "" if it stands


@dataclass(frozen=True, slots=True)
class Explanation:
    address: str
    canonical: str
    origin: str  # "generation <id>" or "live <source>"
    outputs: tuple[OutputAnswer, ...]
    events: tuple[routing.Event, ...]
    references: tuple[Reference, ...] = ()

    @property
    def found(self) -> bool:
        return any(o.lines for o in self.outputs)

    def to_json(self) -> dict[str, object]:
        return {
            "address": self.address,
            "canonical": self.canonical,
            "origin": self.origin,
            "found": self.found,
            "outputs": [
                {"name": o.name, "kind": o.kind, "entries": [{"key": k, "value": v} for k, v in o.lines]}
                | ({"differs_from_config": True} if o.differs else {})
                for o in self.outputs
            ],
            "rules": [
                {"rule": e.rule.value, "address": e.address, "source": e.source, "attribute": e.attribute}
                | {"detail": e.detail}
                for e in self.events
            ],
            "referenced_by": [
                {"address": r.address, "kind": r.kind, "source": r.source, "attribute": r.attribute}
                | ({"dropped": r.dropped} if r.dropped else {})
                for r in self.references
            ],
        }

    def render(self) -> str:
        head = self.address if self.address == self.canonical else f"{self.address} (canonical {self.canonical})"
        out = [f"{head}, from {self.origin}", "outputs:"]
        width = max((len(o.name) for o in self.outputs), default=0)
        for o in self.outputs:
            note = "  (installed file differs from the current config)" if o.differs else ""
            if not o.lines:
                out.append(f"  {o.name:<{width}}  not present{note}")
            for key, value in o.lines:
                out.append(f"  {o.name:<{width}}  {key} -> {value}{note}")
        out.append("rules:" if self.events else "rules: none (no entry, alias or static key names this address)")
        for e in self.events:
            where = f"{e.source} ({e.attribute})" if e.attribute else e.source
            out.append(f"  {e.rule.value:<20} {where}: {e.detail}" if e.detail else f"  {e.rule.value:<20} {where}")
        out.append(
            "referenced by:" if self.references else "referenced by: nothing (no alias, group, forward or static entry)"
        )
        for r in self.references:
            where = f"{r.source} ({r.attribute})" if r.attribute else r.source
            line = f"  {r.kind:<14} {r.address}  from {where}"
            out.append(line + (f"  DROPPED: {r.dropped}" if r.dropped else ""))
        return "\n".join(out) + "\n"


def normalise(address: str, config: Config) -> tuple[str, str, str | None]:
    """(address as asked, canonical address, login if the address is in our domains)."""
    settings = config.routing
    if "@" not in address:
        address = f"{address}@{settings.domain}"
    try:
        checked = validate.address(address)
    except validate.Invalid as e:
        raise ExplainError(f"{address!r} {e}") from e
    local, _, domain = checked.rpartition("@")
    canon = settings.canonical_domains()
    if domain not in canon:
        return checked, checked, None
    local = local.lower()
    # In a further hosted domain the login is whatever account owns the address (see explain).
    login = local if canon[domain] == settings.domain else None
    return f"{local}@{domain}", f"{local}@{canon[domain]}", login


def explain(
    snapshot: Snapshot,
    address: str,
    *,
    config: Config,
    static: Static,
    exporters: Sequence[tuple[ExporterSpec, Exporter]],
    origin: str,
    installed: Mapping[str, bytes] | None = None,
    today: date | None = None,
) -> Explanation:
    """Pure: the model rebuilt with a trace, and each output's lines for the address.

    `installed` (output name -> bytes of the installed generation) is what is answered from;
    an output missing there is rendered from the snapshot."""
    asked, canonical, login = normalise(address, config)
    trace: routing.Trace = []
    model, _ = routing.build(snapshot, static, config.routing, today or date.today(), trace=trace)
    login = model.users.get(canonical, login)
    keys = {asked, canonical} | ({login} if login else set())
    answers = []
    for spec, exp in exporters:
        rendered = exp.render(model)
        data = installed.get(spec.name) if installed is not None else None
        differs = data is not None and data != rendered
        answers.append(OutputAnswer(spec.name, spec.kind, _lines(data or rendered, exp, keys), differs))
    events = tuple(e for e in trace if e.address == canonical)
    return Explanation(asked, canonical, origin, tuple(answers), events, references(model, trace, canonical))


def references(model: routing.RoutingModel, trace: routing.Trace, target: str) -> tuple[Reference, ...]:
    """Every address whose targets include `target` (in the model, or dropped because `target`
    accepts no mail), with the entry or static key that routes it."""
    origin: dict[str, tuple[str, str, str]] = {}  # address -> (kind, source, attribute); later rules win
    dead: list[routing.Event] = []
    for e in trace:
        if e.rule is routing.Rule.FORWARD:
            origin[e.address] = ("forward", e.source, e.attribute)
        elif e.rule is routing.Rule.LDAP_ALIAS:
            origin[e.address] = ("alias", e.source, e.attribute)
        elif e.rule is routing.Rule.GROUP:
            origin[e.address] = ("group", e.source, e.attribute)
        elif e.rule is routing.Rule.STATIC:
            origin[e.address] = (f"static {e.detail.partition(' ')[0]}", e.source, e.attribute)
        elif e.rule is routing.Rule.TARGET_DROPPED and e.detail.startswith(f"target {target} is "):
            dead.append(e)
    out = []
    for table in (model.aliases, model.forwards):
        for address, targets in table.items():
            if target in targets and address != target:
                kind, source, attribute = origin.get(address, ("alias", "", ""))
                out.append(Reference(address, kind, source, attribute))
    for e in dead:
        kind = origin.get(e.address, ("alias", "", ""))[0]
        out.append(Reference(e.address, kind, e.source, e.attribute, e.detail))
    return tuple(sorted(out, key=lambda r: (r.address, r.kind, r.dropped)))


def _lines(data: bytes, exp: Exporter, keys: set[str]) -> tuple[tuple[str, str], ...]:
    """The (key, redacted value) pairs of an output whose key is one of `keys`."""
    sep = exp.separator  # the exporter parses its own lines (as the guards do)
    found = []
    for raw in data.decode("utf-8", "replace").splitlines():
        key, _, _ = raw.partition(sep)
        if key in keys:
            found.append((key, exp.redact(raw).partition(sep)[2]))
    return tuple(found)


def dumps(explanation: Explanation) -> str:
    return json.dumps(explanation.to_json(), indent=2, sort_keys=True) + "\n"
