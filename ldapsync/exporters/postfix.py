"""Postfix lookup tables (`key<TAB>value` lines, compiled with postmap).

Keys are lower-case canonical addresses; the model guarantees keys and values hold no
whitespace, commas or specials, so one line is always one entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ldapsync.errors import ConfigError
from ldapsync.exporters import Exporter, lines
from ldapsync.model import RoutingModel

CATEGORIES = ("aliases", "forwards")


class VirtualExporter(Exporter):
    """virtual_alias_maps: aliases (incl. alias-domain rewrites) and/or forwards."""

    kind = "postfix-virtual"
    guarded_values = True
    options: ClassVar[Mapping[str, type]] = {"include": list}

    @classmethod
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        include = options.get("include", list(CATEGORIES))
        bad = [c for c in include if c not in CATEGORIES]
        if bad or not include:
            raise ConfigError(f"must be a non-empty subset of {list(CATEGORIES)}", file=file, key=f"{key}.include")

    def inputs(self, model: RoutingModel) -> object:
        # domain_rewrites() derives from the deliverable keys and the alias domains
        return (model.aliases, model.forwards, model.users.keys(), model.domain_aliases, model.domain)

    def render(self, model: RoutingModel) -> bytes:
        include = self.settings.get("include", list(CATEGORIES))
        table: dict[str, str] = {}
        if "aliases" in include:
            table.update({a: ",".join(t) for a, t in model.aliases.items()})
            table.update(model.domain_rewrites())
        if "forwards" in include:
            table.update({a: ",".join(t) for a, t in model.forwards.items()})
        return lines(dict(sorted(table.items())))


class TransportExporter(Exporter):
    """transport_maps on an MX: forwarded addresses leave through the SRS relay."""

    kind = "postfix-transport"
    guarded_values = True
    options: ClassVar[Mapping[str, type]] = {"nexthop": str}

    @classmethod
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        nexthop = options.get("nexthop")
        if not nexthop or any(c.isspace() for c in nexthop) or ":" not in nexthop:
            raise ConfigError('is required, like "smtp:[srs.example.org]"', file=file, key=f"{key}.nexthop")

    def inputs(self, model: RoutingModel) -> object:
        return model.forwards.keys()

    def render(self, model: RoutingModel) -> bytes:
        nexthop = self.settings["nexthop"]
        return lines({a: nexthop for a in model.forwards})


class RecipientsExporter(Exporter):
    """relay_recipient_maps: every deliverable address, so unknown ones fail at RCPT."""

    kind = "postfix-recipients"

    def inputs(self, model: RoutingModel) -> object:
        return (model.users.keys(), model.aliases.keys(), model.forwards.keys(), model.domain_aliases)

    def render(self, model: RoutingModel) -> bytes:
        return lines(sorted((v, "OK") for a in model.deliverable() for v in model.variants(a)))


class SenderLoginExporter(Exporter):
    """smtpd_sender_login_maps: address -> logins allowed to use it as envelope sender."""

    kind = "postfix-sender-login"

    def inputs(self, model: RoutingModel) -> object:
        return (model.sender_logins, model.domain_aliases)

    def render(self, model: RoutingModel) -> bytes:
        return lines(
            sorted((v, ",".join(logins)) for a, logins in model.sender_logins.items() for v in model.variants(a))
        )


class AccessExporter(Exporter):
    """check_recipient_access: disabled addresses are refused with their LDAP message."""

    kind = "postfix-access"
    options: ClassVar[Mapping[str, type]] = {"action": str}

    @classmethod
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        action = options.get("action", "REJECT")
        if action not in ("REJECT", "DEFER", "554", "550", "450"):
            raise ConfigError("must be REJECT, DEFER, 550, 554 or 450", file=file, key=f"{key}.action")

    def inputs(self, model: RoutingModel) -> object:
        return (model.disabled, model.domain_aliases)

    def render(self, model: RoutingModel) -> bytes:
        action = self.settings.get("action", "REJECT")
        return lines(sorted((v, f"{action} {msg}") for a, msg in model.disabled.items() for v in model.variants(a)))
