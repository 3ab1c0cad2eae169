"""What each generation changed: the `snapshots` summary and `ldapsync diff` between two generations.

A generation's meta.json records, per output, the keys its install added, removed and changed
(`delta`, measured against what was installed then). Generations recorded before that was kept
are summarised by comparing their outputs with the next older generation's, by key, with the
exporter's parser; what cannot be told (the oldest generation, an output no configured exporter
parses, an unreadable output) shows as `?`. Read-only: nothing here writes.

`ldapsync diff` shows the outputs of two generations as a unified diff, each line redacted
exactly as `ldapsync --dry-run` redacts it (the exporter's own `redact`); an output the current
config no longer names is shown with every value replaced by a digest, since nothing says
whether it holds secrets.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ldapsync import commit
from ldapsync import delta as delta_mod
from ldapsync.delta import Delta
from ldapsync.errors import LdapsyncError, StateError
from ldapsync.exporters import Exporter
from ldapsync.state import Generation, State

Parse = Callable[[bytes], Mapping[str, str]]


class HistoryError(LdapsyncError):
    """A generation named on the command line that the state dir does not have."""


@dataclass(frozen=True, slots=True)
class Summary:
    """One generation as `snapshots` lists it; a delta of None could not be told."""

    generation: Generation
    current: bool
    deltas: Mapping[str, Delta | None]


def summaries(state: State, parsers: Mapping[str, Parse]) -> list[Summary]:
    """Every readable generation, newest first, with what it changed per output (`parsers`:
    output name -> its exporter's parser, in config order)."""
    gens = state.generations()
    current = state.current_id()
    out = []
    for i, gen in enumerate(gens):
        older = gens[i + 1] if i + 1 < len(gens) else None
        out.append(Summary(gen, gen.id == current, _deltas(gen, older, parsers)))
    return out


def _deltas(gen: Generation, older: Generation | None, parsers: Mapping[str, Parse]) -> dict[str, Delta | None]:
    saved = gen.meta.get("hashes", {})
    names = [n for n in parsers if n in saved] + sorted(set(saved) - set(parsers))  # config order first
    recorded = delta_mod.mapping(gen.meta.get("delta"))
    if recorded is not None:
        return {n: recorded.get(n) for n in names}
    deltas: dict[str, Delta | None] = {}
    for name in names:
        parse = parsers.get(name)
        if older is None or parse is None:
            deltas[name] = None
            continue
        try:
            before = older.output(name) if name in older.meta.get("hashes", {}) else b""
            deltas[name] = delta_mod.compare(before, gen.output(name), parse)
        except (OSError, StateError):
            deltas[name] = None
    return deltas


def snapshots(state: State, parsers: Mapping[str, Parse]) -> str:
    """The `snapshots` listing: one line per generation, `*` on the installed one."""
    rows = summaries(state, parsers)
    if not rows:
        return "no generations yet\n"
    lines = []
    for row in rows:
        g = row.generation
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_time(g)))
        changed = [f"{name} {'?' if d is None else d}" for name, d in row.deltas.items() if d is None or not d.empty]
        what = ", ".join(changed) if changed else "no output changed"
        lines.append(f"{'*' if row.current else ' '} {g.id}  {when}  {g.meta.get('source', '?')}  {what}\n")
    return "".join(lines)


def _time(g: Generation) -> float:
    t = g.meta.get("time")
    return float(t) if isinstance(t, int | float) else 0.0


def pick(state: State, old: str | None, new: str | None) -> tuple[Generation, Generation]:
    """The two generations `ldapsync diff [OLD] [NEW]` compares; default: the one before the
    installed one, and the installed one."""
    gens = state.generations()
    by_id = {g.id: g for g in gens}
    current = state.current_id()

    def get(gid: str) -> Generation:
        gen = by_id.get(gid)
        if gen is None:
            raise HistoryError(f"no generation {gid!r} (see `ldapsync snapshots`)")
        return gen

    if new is None and current not in by_id:
        raise HistoryError("no installed generation: name two generations (see `ldapsync snapshots`)")
    installed = get(new) if new is not None else by_id[current or ""]
    if old is not None:
        return get(old), installed
    ids = [g.id for g in gens]  # newest first
    older = ids[ids.index(installed.id) + 1 :]
    if not older:
        raise HistoryError(f"no generation before {installed.id} to compare with")
    return by_id[older[0]], installed


def diff(old: Generation, new: Generation, exporters: Sequence[tuple[str, Exporter]]) -> dict[str, str]:
    """Output name -> unified diff of `old`'s bytes against `new`'s, redacted as the dry run does;
    only outputs that differ. The configured outputs first, in config order."""
    known = dict(exporters)
    old_names, new_names = list(old.meta.get("hashes", {})), list(new.meta.get("hashes", {}))
    names = [n for n, _ in exporters if n in old_names or n in new_names]
    names += sorted({*old_names, *new_names} - set(names))
    out = {}
    for name in names:
        a = old.output(name) if name in old_names else b""
        b = new.output(name) if name in new_names else b""
        if a == b:
            continue
        exp = known.get(name)
        redact = _redact_unknown if exp is None else exp.redact if exp.sensitive else None
        out[name] = commit.unified_diff(
            a,
            b,
            fromfile=f"{old.id}/{name}" if name in old_names else "/dev/null",
            tofile=f"{new.id}/{name}" if name in new_names else "/dev/null",
            redact=redact,
        )
    return out


def _redact_unknown(line: str) -> str:
    """For an output no configured exporter describes: keep the key (up to the first tab, colon
    or space), replace the rest by a short digest that still moves when the value does."""
    cut = min((i for i in (line.find("\t"), line.find(":"), line.find(" ")) if i >= 0), default=-1)
    if cut < 0:
        return f"<sha256:{hashlib.sha256(line.encode()).hexdigest()[:12]}>"
    rest = line[cut + 1 :]
    return f"{line[: cut + 1]}<value sha256:{hashlib.sha256(rest.encode()).hexdigest()[:12]}>"
