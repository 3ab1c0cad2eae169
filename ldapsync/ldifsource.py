"""Offline source: an LDIF file read through the same pipeline as LDAP.

Used for the demo, for tests, and for sites that export their directory elsewhere. The
configured LDAP filter is not evaluated here: entries below `base_dn` that carry the login
attribute are mail accounts (docs/configuration.md says so).
"""

from __future__ import annotations

import ldif

from ldapsync.config import LdifSource
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry, sort_entries
from ldapsync.errors import SourceError
from ldapsync.schema import AttributeMap


def read(source: LdifSource, attributes: AttributeMap) -> Snapshot:
    wanted = attributes.ldap_attributes()
    base = _dn_key(source.base_dn) if source.base_dn else None
    rejections: list[Rejection] = []
    entries: list[Entry] = []
    try:
        with open(source.path, "rb") as fh:
            parser = ldif.LDIFParser(fh, encoding=None)
            try:
                for dn, raw in parser.parse():
                    key = _dn_key(dn)
                    if base is not None and key != base and not key.endswith("," + base):
                        continue
                    entries.append(make_entry(dn, raw, wanted, rejections))
            except ValueError as e:
                raise SourceError(f"{source.path}: line {parser.line_counter}: {e}") from e
    except OSError as e:
        raise SourceError(f"{source.path}: cannot read: {e.strerror}") from e
    return Snapshot(sort_entries(entries), f"ldif:{source.path}", tuple(rejections))


def _dn_key(dn: str) -> str:
    return ",".join(part.strip().lower() for part in dn.split(","))
