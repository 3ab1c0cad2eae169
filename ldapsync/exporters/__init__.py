"""Exporter plugins: each renders the routing model into the bytes of one output file.

Exporters are found through the `ldapsync.exporters` entry-point group, so a site can add a
format without patching ldapsync. The built-ins are always present (their own entry points
are recognised, not counted twice); a kind registered twice, or a plugin that fails to
import, is not an Exporter or declares another kind, is a ConfigError naming the plugin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, ClassVar

from ldapsync.errors import ConfigError
from ldapsync.routing import RoutingModel

GROUP = "ldapsync.exporters"


class Exporter(ABC):
    """Renders one output. Subclasses declare their extra config keys in `options`."""

    kind: ClassVar[str]
    postfix_map: ClassVar[bool] = True  # has a map_type and is compiled with postmap
    sensitive: ClassVar[bool] = False  # holds secrets: diffs are redacted
    # Values are secrets or routing targets: the guards hold a sync that rewrites many of them.
    guarded_values: ClassVar[bool] = False
    separator: ClassVar[str] = "\t"  # between key and value in every line render() writes
    # Renders mail password hashes: when no configured exporter does, they are not even read.
    reads_passwords: ClassVar[bool] = True
    default_mode: ClassVar[int] = 0o644
    options: ClassVar[Mapping[str, type]] = {}
    # Implements rows() and row_keys(), and render() writes one `key + separator + value` line
    # per key, sorted by key: after a change the renderer splices lines instead of rendering whole.
    incremental: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any]):
        self.settings = dict(options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        for name, value in options.items():
            if name not in cls.options:
                allowed = ", ".join(sorted(cls.options)) or "none"
                raise ConfigError(f"unknown key for {cls.kind} (extra keys: {allowed})", file=file, key=f"{key}.{name}")
            if not isinstance(value, cls.options[name]):
                raise ConfigError(f"must be of type {cls.options[name].__name__}", file=file, key=f"{key}.{name}")
        cls.validate(options, file=file, key=key)

    @classmethod  # noqa: B027 (an optional hook, not abstract)
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        """Check option values beyond their type."""

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        """The (key, value) lines of render(model) that derive from these model keys, in any order.

        `addresses` are keys of the model's address tables, `logins` of `passwords` and
        `mailboxes`. A line is `key + separator + value`, so the value is what parse() returns.
        Only exporters with `incremental` implement it (with row_keys()): after a change, the
        renderer rewrites just these lines instead of calling render() (ldapsync.render).
        """
        raise NotImplementedError(f"{self.kind} renders whole")

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        """Every key a line derived from these model keys can have, whatever their values (a
        superset is fine): the lines the renderer drops before adding rows(). No two model keys
        may give a line the same key. Lines keyed by a value of another model key's record are
        linked() instead. The default: each address in its domain and alias domains, each login.
        """
        for address in addresses:
            yield from model.variants(address)
        yield from logins

    def linked(self, model: RoutingModel, logins: AbstractSet[str] | None) -> Iterable[tuple[str, str]]:
        """(login, key) of the lines rows() gives for a login but keyed by something its record
        holds (the userdb's address lines); None: every login. The renderer remembers them, so
        it can drop them when the record changes or goes. Empty by default."""
        return ()

    @abstractmethod
    def render(self, model: RoutingModel) -> bytes:
        """The complete file content, deterministic for the same model."""

    def redact(self, line: str) -> str:
        """A line as it may be shown in a diff or log."""
        return line

    def parse(self, data: bytes) -> dict[str, str]:
        """Key -> value of each line of this exporter's output: what the guards compare."""
        sep = self.separator
        out: dict[str, str] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            if line:
                key, _, value = line.partition(sep)
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class _Candidate:
    """One registration of an exporter kind: a built-in class, or an entry point to load."""

    value: str  # "module:Class", for messages and to recognise the built-ins' own entry points
    origin: str
    entry_point: EntryPoint | None = None
    cls: type[Exporter] | None = None

    def load(self, kind: str, file: Path | None, key: str | None) -> type[Exporter]:
        if self.cls is not None:
            return self.cls
        assert self.entry_point is not None
        plugin = f"exporter plugin {kind!r} ({self.value}, {self.origin})"
        try:
            obj = self.entry_point.load()
        except Exception as e:  # a plugin's import can fail any way it likes
            raise ConfigError(f"{plugin} cannot be loaded: {type(e).__name__}: {e}", file=file, key=key) from e
        if not (isinstance(obj, type) and issubclass(obj, Exporter)):
            raise ConfigError(f"{plugin} is not a subclass of ldapsync's Exporter", file=file, key=key)
        if getattr(obj, "kind", None) != kind:
            raise ConfigError(f"{plugin} declares kind {getattr(obj, 'kind', None)!r}", file=file, key=key)
        return obj


def _builtins() -> dict[str, _Candidate]:
    """Always there, whether or not the package metadata is (a source tree never installed)."""
    from ldapsync.exporters import dovecot, postfix

    found: dict[str, _Candidate] = {}
    for mod in (postfix, dovecot):
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, Exporter) and getattr(obj, "kind", None):
                found[obj.kind] = _Candidate(f"{obj.__module__}:{obj.__qualname__}", "built in", cls=obj)
    return found


@cache
def _registry() -> dict[str, tuple[_Candidate, ...]]:
    """Every registration per kind. Plugins load only when a config asks for their kind, so a
    broken plugin nobody uses cannot stop the agent."""
    found = {kind: [c] for kind, c in _builtins().items()}
    for ep in entry_points(group=GROUP):
        origin = f"from {ep.dist.name}" if ep.dist is not None else "plugin"
        known = found.setdefault(ep.name, [])
        if not any(c.value == ep.value for c in known):  # the built-ins are registered there too
            known.append(_Candidate(ep.value, origin, entry_point=ep))
    return {kind: tuple(cs) for kind, cs in found.items()}


def exporter_class(kind: str, *, file: Path | None = None, key: str | None = None) -> type[Exporter]:
    registry = _registry()
    if kind not in registry:
        raise ConfigError(f"unknown exporter kind {kind!r} (one of {', '.join(sorted(registry))})", file=file, key=key)
    candidates = registry[kind]
    if len(candidates) > 1:
        names = " and ".join(f"{c.value} ({c.origin})" for c in candidates)
        raise ConfigError(f"exporter kind {kind!r} is registered more than once: {names}", file=file, key=key)
    return candidates[0].load(kind, file, key)


def lines(pairs: Mapping[str, str] | list[tuple[str, str]], sep: str = "\t") -> bytes:
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return "".join(f"{k}{sep}{v}\n" for k, v in items).encode("utf-8")
