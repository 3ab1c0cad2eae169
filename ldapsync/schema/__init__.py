"""Attribute presets: which LDAP attribute carries which logical field.

The routing model only speaks of logical fields (login, forward, ...); a preset maps them
onto a directory's schema so the same pipeline serves userdir-ldap and inetLocalMailRecipient
directories. The cn=config LDIF for the attributes ldapsync reads ships beside this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ldapsync.errors import ConfigError

SCHEMA_DIR = Path(__file__).parent


@dataclass(frozen=True, slots=True)
class AttributeMap:
    """Logical field -> LDAP attribute name (None: the directory has no such field)."""

    login: str
    forward: str | None = None
    alias: str | None = None
    mail_password: str | None = None
    status: str | None = None
    disable_message: str | None = None
    address: str | None = None  # the account's own address(es) in hosted domains (`mail`)
    primary_address: str | None = None  # which of those is the primary one (single-valued; optional)
    uid_number: str | None = None  # mailbox owner, for the Dovecot userdb
    gid_number: str | None = None
    home: str | None = None
    quota: str | None = None
    # Not a logical field: further attributes to request (group classification and members).
    extra: tuple[str, ...] = ()

    def ldap_attributes(self) -> list[str]:
        """The attributes a search must request, nothing more (speed, and least privilege).

        entryUUID follows deletes; createTimestamp (operational: only sent when asked for)
        decides which of two entries claiming one login or alias keeps it."""
        names = [getattr(self, f) for f in LOGICAL_FIELDS]
        return sorted({n for n in names if n} | set(self.extra) | {"entryUUID", "createTimestamp"}, key=str.lower)


PRESETS: dict[str, AttributeMap] = {
    "ud-ldap": AttributeMap(
        login="uid",
        forward="emailForward",
        mail_password="mailPassword",
        status="accountStatus",
        disable_message="mailDisableMessage",
    ),
    "inetlocalmailrecipient": AttributeMap(
        login="uid",
        forward="mailRoutingAddress",
        alias="mailLocalAddress",
        mail_password="mailPassword",
    ),
}

LOGICAL_FIELDS = tuple(f.name for f in fields(AttributeMap) if f.name != "extra")


def resolve(preset: str, overrides: Mapping[str, object], *, file: Path | None) -> AttributeMap:
    """Apply `attributes:` overrides to a preset; `custom` starts from nothing but a login."""
    if preset == "custom":
        base: dict[str, str | None] = dict.fromkeys(LOGICAL_FIELDS)
    elif preset in PRESETS:
        p = PRESETS[preset]
        base = {name: getattr(p, name) for name in LOGICAL_FIELDS}
    else:
        choices = ", ".join([*PRESETS, "custom"])
        raise ConfigError(f"unknown preset {preset!r} (one of {choices})", file=file, key="schema")
    for name, value in overrides.items():
        if name not in LOGICAL_FIELDS:
            raise ConfigError(
                f"unknown field {name!r} (one of {', '.join(LOGICAL_FIELDS)})",
                file=file,
                key=f"attributes.{name}",
            )
        if value is not None and (not isinstance(value, str) or not _is_attr_name(value)):
            raise ConfigError(f"{value!r} is not an LDAP attribute name", file=file, key=f"attributes.{name}")
        base[name] = value
    login = base.pop("login")
    if not login:
        raise ConfigError("a login attribute is required", file=file, key="attributes.login")
    return replace(AttributeMap(login=login), **base)  # type: ignore[arg-type]


def _is_attr_name(value: str) -> bool:
    return bool(value) and value[0].isalpha() and all(c.isalnum() or c == "-" for c in value)
