"""Exporter plugins: each renders the routing model into the bytes of one output file.

Exporters are found through the `ldapsync.exporters` entry-point group (built-ins are
registered there too), so a site can add a format without patching ldapsync.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from ldapsync.errors import ConfigError
from ldapsync.model import RoutingModel

GROUP = "ldapsync.exporters"


class Exporter(ABC):
    """Renders one output. Subclasses declare their extra config keys in `options`."""

    kind: ClassVar[str]
    postfix_map: ClassVar[bool] = True  # has a map_type and is compiled with postmap
    sensitive: ClassVar[bool] = False  # holds secrets: diffs are redacted
    # Values are secrets or routing targets: the guards hold a sync that rewrites many of them.
    guarded_values: ClassVar[bool] = False
    separator: ClassVar[str] = "\t"  # between key and value in every line render() writes
    default_mode: ClassVar[int] = 0o644
    options: ClassVar[Mapping[str, type]] = {}

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

    def inputs(self, model: RoutingModel) -> object:
        """What render() reads from the model, compared with == to skip an unchanged render.

        Must cover everything render() uses (the exporter's own settings are fixed for its
        lifetime). The default, the whole model, is always safe.
        """
        return model

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


@cache
def _registry() -> dict[str, type[Exporter]]:
    found: dict[str, type[Exporter]] = {}
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.load()
    if not found:  # running from a source tree that was never installed
        from ldapsync.exporters import dovecot, postfix

        for mod in (postfix, dovecot):
            for obj in vars(mod).values():
                if isinstance(obj, type) and issubclass(obj, Exporter) and getattr(obj, "kind", None):
                    found[obj.kind] = obj
    return found


def exporter_class(kind: str, *, file: Path | None = None, key: str | None = None) -> type[Exporter]:
    registry = _registry()
    if kind not in registry:
        raise ConfigError(f"unknown exporter kind {kind!r} (one of {', '.join(sorted(registry))})", file=file, key=key)
    return registry[kind]


def lines(pairs: Mapping[str, str] | list[tuple[str, str]], sep: str = "\t") -> bytes:
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return "".join(f"{k}{sep}{v}\n" for k, v in items).encode("utf-8")
