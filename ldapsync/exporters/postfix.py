"""Postfix lookup tables (`key<TAB>value` lines, compiled with postmap).

Keys are lower-case canonical addresses; the model guarantees keys and values hold no
whitespace, commas or specials, so one line is always one entry.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, ClassVar

from ldapsync.errors import ConfigError
from ldapsync.exporters import Exporter, lines
from ldapsync.routing import RoutingModel

CATEGORIES = ("aliases", "forwards")


class VirtualExporter(Exporter):
    """virtual_alias_maps: aliases (incl. alias-domain rewrites) and/or forwards."""

    reads_passwords = False
    kind = "postfix-virtual"
    guarded_values = True
    options: ClassVar[Mapping[str, type]] = {"include": list}

    @classmethod
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        include = options.get("include", list(CATEGORIES))
        bad = [c for c in include if c not in CATEGORIES]
        if bad or not include:
            raise ConfigError(f"must be a non-empty subset of {list(CATEGORIES)}", file=file, key=f"{key}.include")

    incremental = True

    def render(self, model: RoutingModel) -> bytes:
        include = self.settings.get("include", list(CATEGORIES))
        table: dict[str, str] = {}
        if "aliases" in include:
            table.update({a: ",".join(t) for a, t in model.aliases.items()})
            table.update(model.domain_rewrites())
        if "forwards" in include:
            table.update({a: ",".join(t) for a, t in model.forwards.items()})
        return lines(dict(sorted(table.items())))

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        include = self.settings.get("include", list(CATEGORIES))
        aliases, forwards = "aliases" in include, "forwards" in include
        for a in addresses:
            row: dict[str, str] = {}  # the same precedence as render(): forwards last
            if aliases:
                if a in model.aliases:
                    row[a] = ",".join(model.aliases[a])
                if a in model.users or a in model.aliases or a in model.forwards:  # deliverable: rewrites
                    row.update((v, a) for v in model.variants(a)[1:])
            if forwards and a in model.forwards:
                row[a] = ",".join(model.forwards[a])
            yield from row.items()

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        for a in addresses:
            yield from model.variants(a)


class TransportExporter(Exporter):
    """transport_maps on an MX: forwarded addresses leave through the SRS relay."""

    reads_passwords = False
    kind = "postfix-transport"
    guarded_values = True
    options: ClassVar[Mapping[str, type]] = {"nexthop": str}

    @classmethod
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        nexthop = options.get("nexthop")
        if not nexthop or any(c.isspace() for c in nexthop) or ":" not in nexthop:
            raise ConfigError('is required, like "smtp:[srs.example.org]"', file=file, key=f"{key}.nexthop")

    incremental = True

    def render(self, model: RoutingModel) -> bytes:
        nexthop = self.settings["nexthop"]
        return lines([(a, nexthop) for a in sorted(model.forwards)])

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        nexthop = self.settings["nexthop"]
        return [(a, nexthop) for a in addresses if a in model.forwards]

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        return addresses


class RecipientsExporter(Exporter):
    """relay_recipient_maps: every deliverable address, so unknown ones fail at RCPT."""

    reads_passwords = False
    kind = "postfix-recipients"

    incremental = True

    def render(self, model: RoutingModel) -> bytes:
        return lines(sorted((v, "OK") for a in model.deliverable() for v in model.variants(a)))

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        for a in addresses:
            if a in model.users or a in model.aliases or a in model.forwards:
                yield from ((v, "OK") for v in model.variants(a))

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        for a in addresses:
            yield from model.variants(a)


class SenderLoginExporter(Exporter):
    """smtpd_sender_login_maps: address -> logins allowed to use it as envelope sender."""

    reads_passwords = False
    kind = "postfix-sender-login"

    incremental = True

    def render(self, model: RoutingModel) -> bytes:
        return lines(
            sorted((v, ",".join(logins)) for a, logins in model.sender_logins.items() for v in model.variants(a))
        )

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        for a in addresses:
            if a in model.sender_logins:
                value = ",".join(model.sender_logins[a])
                yield from ((v, value) for v in model.variants(a))

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        for a in addresses:
            yield from model.variants(a)


class AccessExporter(Exporter):
    """check_recipient_access: disabled addresses are refused with their LDAP message."""

    reads_passwords = False
    kind = "postfix-access"
    options: ClassVar[Mapping[str, type]] = {"action": str}

    @classmethod
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        action = options.get("action", "REJECT")
        if action not in ("REJECT", "DEFER", "554", "550", "450"):
            raise ConfigError("must be REJECT, DEFER, 550, 554 or 450", file=file, key=f"{key}.action")

    incremental = True

    def render(self, model: RoutingModel) -> bytes:
        action = self.settings.get("action", "REJECT")
        return lines(sorted((v, f"{action} {msg}") for a, msg in model.disabled.items() for v in model.variants(a)))

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        action = self.settings.get("action", "REJECT")
        for a in addresses:
            if a in model.disabled:
                value = f"{action} {model.disabled[a]}"
                yield from ((v, value) for v in model.variants(a))

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        for a in addresses:
            yield from model.variants(a)


DEFAULT_MAILBOX_PATH = "{domain}/{login}/Maildir/"
_PATH_LITERAL_RE = re.compile(r"[A-Za-z0-9_+=@./-]*")
PATH_FIELDS = ("login", "domain", "local")


class VirtualMailboxExporter(Exporter):
    """virtual_mailbox_maps: accounts whose mail is stored on this host -> their mailbox path.

    An account is local when it has no forward, or a forward that lists its own address
    ("keep a copy"). The path is relative to virtual_mailbox_base; a trailing '/' means
    Maildir (Postfix virtual(8)). With an LMTP transport only the keys matter.
    """

    reads_passwords = False
    kind = "postfix-virtual-mailbox"
    guarded_values = True  # many paths rewritten at once would move every mailbox
    options: ClassVar[Mapping[str, type]] = {"path_template": str}

    @classmethod
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        template = options.get("path_template", DEFAULT_MAILBOX_PATH)
        where = f"{key}.path_template"
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as e:
            raise ConfigError(f"{template!r}: {e}", file=file, key=where) from e
        for literal, field_name, spec, conv in parts:
            if not _PATH_LITERAL_RE.fullmatch(literal):
                raise ConfigError(
                    f"{template!r}: only letters, digits and ._+=@/- outside placeholders", file=file, key=where
                )
            if field_name is not None and (field_name not in PATH_FIELDS or spec or conv):
                raise ConfigError(
                    f"unknown placeholder {{{field_name}}} (allowed: {', '.join(PATH_FIELDS)})", file=file, key=where
                )
        sample = template.format(login="l", domain="d", local="p")
        if sample.startswith("/") or any(p in (".", "..") for p in sample.rstrip("/").split("/")) or "//" in sample:
            raise ConfigError(
                f"{template!r} must be relative to virtual_mailbox_base, without '.', '..' or '//'",
                file=file,
                key=where,
            )
        if not any(f in template for f in ("{login}", "{local}")):
            raise ConfigError(f"{template!r} must contain {{login}} or {{local}}", file=file, key=where)

    incremental = True

    def render(self, model: RoutingModel) -> bytes:
        return lines(self._rows(model, sorted(model.local)))

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        return self._rows(model, addresses)

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        return addresses

    def _rows(self, model: RoutingModel, addresses: Iterable[str]) -> list[tuple[str, str]]:
        template = self.settings.get("path_template", DEFAULT_MAILBOX_PATH)
        out = []
        for address in addresses:
            login = model.local.get(address)
            if login is not None:
                local, _, domain = address.rpartition("@")
                out.append((address, template.format(login=login, domain=domain, local=local)))
        return out
