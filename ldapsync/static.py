"""Static aliases and forwards from the admin's YAML file (mail.yaml).

This is trusted-but-checked admin input: a bad entry is a configuration error naming the
file and key, and fails the sync, rather than being silently dropped like bad LDAP data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ldapsync import validate
from ldapsync.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StaticEntry:
    address: str
    targets: tuple[str, ...]
    key: str  # "aliases.postmaster", to name it in messages


@dataclass(frozen=True, slots=True)
class Static:
    file: Path | None = None
    aliases: tuple[StaticEntry, ...] = field(default=())
    forwards: tuple[StaticEntry, ...] = field(default=())


def load(
    path: Path | None,
    domain: str,
    domain_aliases: tuple[str, ...],
    hosted: Mapping[str, tuple[str, ...]] | None = None,
) -> Static:
    if path is None:
        return Static()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read static file: {e.strerror}", file=path) from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", file=path) from e
    return parse(data, path, domain, domain_aliases, hosted)


def parse(
    data: object,
    path: Path,
    domain: str,
    domain_aliases: tuple[str, ...],
    hosted: Mapping[str, tuple[str, ...]] | None = None,
) -> Static:
    """Bare names are in `domain`; full addresses may be in any hosted domain (`hosted`)."""
    hosted = hosted or {}
    canon = {d: domain for d in (domain, *domain_aliases)}
    for h, alias_domains in hosted.items():
        canon.update({d: h for d in (h, *alias_domains)})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("must be a mapping with aliases: and forwards:", file=path)
    unknown = sorted(set(data) - {"aliases", "forwards"})
    if unknown:
        raise ConfigError("unknown key (expected aliases, forwards)", file=path, key=unknown[0])

    def section(name: str) -> dict[object, object]:
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError("must be a mapping of name: targets", file=path, key=name)
        return value

    def name_to_address(raw: object, key: str) -> str:
        if not isinstance(raw, str):
            raise ConfigError("names must be strings", file=path, key=key)
        try:
            if "@" not in raw:
                return f"{validate.local_part(raw).lower()}@{domain}"  # keys are lower-case, like LDAP's
            addr = validate.address(raw)
        except validate.Invalid as e:
            raise ConfigError(f"{raw!r}: {e}", file=path, key=key) from e
        local, _, dom = addr.rpartition("@")
        if dom in canon and canon[dom] != dom:
            where = domain if canon[dom] == domain else canon[dom]
            raise ConfigError(
                f"{raw!r}: name the address in {where}{' (or bare)' if where == domain else ''}; "
                "alias domains follow it",
                file=path,
                key=key,
            )
        if dom not in canon:
            where = domain if not hosted else f"a hosted domain ({', '.join([domain, *hosted])})"
            raise ConfigError(f"{raw!r} is not in {where}", file=path, key=key)
        return f"{local.lower()}@{dom}"

    def target(raw: object, key: str) -> str:
        if not isinstance(raw, str):
            raise ConfigError("targets must be strings", file=path, key=key)
        try:
            if "@" not in raw:
                return f"{validate.local_part(raw).lower()}@{domain}"
            addr = validate.address(raw)
        except validate.Invalid as e:
            raise ConfigError(f"target {raw!r}: {e}", file=path, key=key) from e
        local, _, dom = addr.rpartition("@")
        if dom in canon:
            return f"{local.lower()}@{canon[dom]}"
        return addr

    seen: dict[str, str] = {}
    out: dict[str, list[StaticEntry]] = {"aliases": [], "forwards": []}
    for name in ("aliases", "forwards"):
        for raw_name, raw_targets in section(name).items():
            key = f"{name}.{raw_name}"
            addr = name_to_address(raw_name, key)
            if addr in seen:
                raise ConfigError(f"{addr} is already defined by {seen[addr]}", file=path, key=key)
            seen[addr] = key
            if name == "forwards" and not isinstance(raw_targets, str):
                raise ConfigError("a forward is one address", file=path, key=key)
            items = [raw_targets] if isinstance(raw_targets, str) else raw_targets
            if not isinstance(items, list) or not items:
                raise ConfigError("needs one target or a non-empty list", file=path, key=key)
            targets = tuple(dict.fromkeys(target(t, f"{key}[{i}]") for i, t in enumerate(items)))
            out[name].append(StaticEntry(addr, targets, key))
    return Static(path, tuple(out["aliases"]), tuple(out["forwards"]))
