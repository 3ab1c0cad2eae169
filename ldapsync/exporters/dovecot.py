"""Dovecot passwd-file of mail passwords: `login:{SCHEME}hash`, nothing else.

Only two fields are ever written, so no LDAP value can add a uid, home or extra field.
"""

from __future__ import annotations

import hashlib

from ldapsync.exporters import Exporter, lines
from ldapsync.model import RoutingModel


class PasswdExporter(Exporter):
    kind = "dovecot-passwd"
    postfix_map = False
    sensitive = True
    guarded_values = True
    separator = ":"
    default_mode = 0o640

    def inputs(self, model: RoutingModel) -> object:
        return model.passwords

    def render(self, model: RoutingModel) -> bytes:
        return lines(model.passwords, sep=self.separator)

    def redact(self, line: str) -> str:
        login, sep, secret = line.partition(":")
        if not sep:
            return line
        scheme = secret[: secret.find("}") + 1] if secret.startswith("{") else ""
        return f"{login}:{scheme}<hash sha256:{hashlib.sha256(secret.encode()).hexdigest()[:12]}>"
