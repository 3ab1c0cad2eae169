"""One exception tree, so callers can tell config mistakes from passing LDAP trouble."""

from __future__ import annotations

from pathlib import Path


class LdapsyncError(Exception):
    """Root of every error ldapsync raises on purpose."""


class ConfigError(LdapsyncError):
    """The configuration (or the static YAML) is wrong; retrying will not help."""

    def __init__(self, message: str, *, file: Path | str | None = None, key: str | None = None):
        self.message = message
        self.file = file
        self.key = key
        where = ": ".join(str(p) for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class SourceError(LdapsyncError):
    """The directory could not be read completely; nothing read may be installed."""


class Unreachable(SourceError):
    """No directory server answered at all (refused, timed out, dropped the connection): the
    same read may work a moment later. A server that answered and refused (bind, StartTLS, an
    answer that is not LDAP) is a plain SourceError: asking again will not help."""


class CommitError(LdapsyncError):
    """Staging or installing outputs failed; every previously installed file is untouched."""


class HookError(CommitError):
    """A hook exited non-zero or ran past its timeout."""


class StateError(LdapsyncError):
    """The state directory is unusable (unsafe permissions, corrupt generation)."""
