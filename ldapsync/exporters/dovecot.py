"""Dovecot passwd-file of mail passwords: `login:{SCHEME}hash`, nothing else.

Only two fields are ever written, so no LDAP value can add a uid, home or extra field. With
passwords.login_by_address an account's own addresses are logins too: `address:{SCHEME}hash`
followed by the one extra field `user=<login>`, so Dovecot continues as the login (same
userdb record, same mailbox) whichever name was typed. The login and the address are
validated in the model (no ':', space, '%' or control character).
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, ClassVar

from ldapsync.errors import ConfigError
from ldapsync.exporters import Exporter, lines
from ldapsync.routing import Mailbox, RoutingModel


class PasswdExporter(Exporter):
    kind = "dovecot-passwd"
    postfix_map = False
    sensitive = True
    guarded_values = True
    separator = ":"
    default_mode = 0o640

    incremental = True

    def render(self, model: RoutingModel) -> bytes:
        if not model.login_addresses:
            return lines(sorted(model.passwords.items()), sep=self.separator)
        return lines(sorted(self.rows(model, frozenset(), model.passwords.keys())), sep=self.separator)

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        out = []
        for login in logins:
            secret = model.passwords.get(login)
            if secret is None:
                continue
            out.append((login, secret))
            # passwd-file fields: user:password:uid:gid:gecos:home:shell:extra
            out += [(a, f"{secret}::::::user={login}") for a in model.login_addresses.get(login, ())]
        return out

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        return logins

    def linked(self, model: RoutingModel, logins: AbstractSet[str] | None) -> Iterable[tuple[str, str]]:
        """An address login's line belongs to the login's record: it goes with the password."""
        for login in model.login_addresses if logins is None else logins:
            for address in model.login_addresses.get(login, ()):
                yield login, address

    def redact(self, line: str) -> str:
        login, sep, secret = line.partition(":")
        if not sep:
            return line
        scheme = secret[: secret.find("}") + 1] if secret.startswith("{") else ""
        return f"{login}:{scheme}<hash sha256:{hashlib.sha256(secret.encode()).hexdigest()[:12]}>"


USERDB_FIELDS = ("login", "domain", "home", "uid", "gid", "quota")
_FIELD_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED = ("uid", "gid", "home", "user")


class UserdbExporter(Exporter):
    """Dovecot passwd-file userdb: `login::uid:gid::home::userdb_k=v ...`, no password.

    Every value is validated in the model (numeric ids in range, a normalised home under the
    configured root, no ':', '%', space or control character), and extra fields come only
    from the admin's templates, so an LDAP value cannot add a field. Dovecot's passwd-file
    userdb reads only `userdb_`-prefixed extra fields; the prefix is added here. Dovecot
    expands `%` variables in extra fields: a `%` the admin writes in a template is a variable
    by choice, while every value put into a template is escaped (`%%`), so that what Dovecot
    reads is the value itself even if validation ever let a `%` through.
    """

    reads_passwords = False
    kind = "dovecot-userdb"
    postfix_map = False
    default_mode = 0o640
    separator = ":"  # login, then the fields: a changed home or uid is a changed value, not a new key
    guarded_values = True  # many homes or ids rewritten at once would move every mailbox
    options: ClassVar[Mapping[str, type]] = {"fields": dict, "address_keys": bool}

    @classmethod
    def validate(cls, options: Mapping[str, Any], *, file: Path, key: str) -> None:
        for name, template in options.get("fields", {}).items():
            where = f"{key}.fields.{name}"
            if not isinstance(name, str) or not _FIELD_NAME_RE.fullmatch(name) or name in _RESERVED:
                raise ConfigError(
                    f"{name!r} is not a userdb extra field name (lower-case; not uid, gid, home or user)",
                    file=file,
                    key=where,
                )
            if not isinstance(template, str) or not template:
                raise ConfigError("must be a non-empty string", file=file, key=where)
            if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in template) or not template.isascii():
                raise ConfigError(f"{template!r}: no spaces, control or non-ASCII characters", file=file, key=where)
            try:
                parts = list(string.Formatter().parse(template))
            except ValueError as e:
                raise ConfigError(f"{template!r}: {e}", file=file, key=where) from e
            for _, field_name, spec, conv in parts:
                if field_name is not None and (field_name not in USERDB_FIELDS or spec or conv):
                    allowed = ", ".join(USERDB_FIELDS)
                    raise ConfigError(
                        f"unknown placeholder {{{field_name}}} (allowed: {allowed})", file=file, key=where
                    )

    incremental = True

    def render(self, model: RoutingModel) -> bytes:
        rows: list[tuple[str, str]] = []
        by_login: dict[str, str] = {}
        for login, box in model.mailboxes.items():
            own, by_address = self._values(login, box)
            rows.append((login, own))
            by_login[login] = by_address
        if self.settings.get("address_keys"):
            # LMTP looks the recipient address up; these lines map it to the login's mailbox.
            rows += [(a, by_login[login]) for a, login in model.users.items() if login in by_login]
        return "".join(f"{k}::{v}\n" for k, v in sorted(rows)).encode("ascii")

    def rows(
        self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]
    ) -> Iterable[tuple[str, str]]:
        # An address line derives from the address (which login it is) and from the login's
        # mailbox record: either may be the one that changed.
        out: dict[str, str] = {}
        address_keys = self.settings.get("address_keys")
        for login in logins:
            box = model.mailboxes.get(login)
            if box is not None:
                own, by_address = self._values(login, box)
                out[login] = ":" + own  # the line is `login::fields`: parse() splits at the first ':'
                if address_keys and model.users.get(box.address) == login:
                    out[box.address] = ":" + by_address
        if address_keys:
            for a in addresses:
                owner = model.users.get(a)
                box = model.mailboxes.get(owner) if owner is not None else None
                if owner is not None and box is not None:
                    out[a] = ":" + self._values(owner, box)[1]
        return out.items()

    def row_keys(self, model: RoutingModel, addresses: AbstractSet[str], logins: AbstractSet[str]) -> Iterable[str]:
        yield from logins
        if self.settings.get("address_keys"):
            yield from addresses

    def linked(self, model: RoutingModel, logins: AbstractSet[str] | None) -> Iterable[tuple[str, str]]:
        if not self.settings.get("address_keys"):
            return
        for login in model.mailboxes if logins is None else logins:
            box = model.mailboxes.get(login)
            if box is not None and model.users.get(box.address) == login:
                yield login, box.address

    def _values(self, login: str, box: Mailbox) -> tuple[str, str]:
        """What follows `key::` in the login's line and in its address lines (which name the login)."""
        fields: Mapping[str, str] = self.settings.get("fields", {})
        values = {
            "login": login,
            "domain": box.address.rpartition("@")[2],
            "home": box.home,
            "uid": str(box.uid),
            "gid": str(box.gid),
            "quota": box.quota,
        }
        # A field whose template names a value the account does not have (no quota) is left out.
        escaped = {k: v.replace("%", "%%") for k, v in values.items() if v is not None}
        extra = [
            f"userdb_{name}={template.format(**escaped)}"
            for name, template in sorted(fields.items())
            if all(f in escaped for _, f, _, _ in string.Formatter().parse(template) if f)
        ]
        rest = f"{box.uid}:{box.gid}::{box.home}::"
        return rest + " ".join(extra), rest + " ".join(["userdb_user=" + escaped["login"], *extra])
