"""Offline source: an LDIF file read through the same pipeline as LDAP.

Used for the demo, for tests, and for sites that export their directory elsewhere. The
configured LDAP filter is not evaluated here: entries below `base_dn` that carry the login
attribute are mail accounts (docs/configuration.md says so).

The RFC 2849 reader is our own (content records only): the PyPI `ldif` module is not in
Debian, and Debian's python3-ldap installs a different top-level `ldif` module under the same
name, so depending on either breaks one of the two installs (docs/deployment.md).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator

from ldapsync.config import LdifSource
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry, sort_entries
from ldapsync.errors import SourceError
from ldapsync.schema import AttributeMap

Record = tuple[str, dict[str, list[bytes]]]


class LdifSyntaxError(ValueError):
    """A line of the LDIF input is not an RFC 2849 content record line."""

    def __init__(self, line: int, message: str):
        self.line = line
        super().__init__(f"line {line}: {message}")


def read(source: LdifSource, attributes: AttributeMap) -> Snapshot:
    wanted = attributes.ldap_attributes()
    base = _dn_key(source.base_dn) if source.base_dn else None
    rejections: list[Rejection] = []
    entries: list[Entry] = []
    try:
        with open(source.path, "rb") as fh:
            try:
                for dn, raw in parse(fh):
                    key = _dn_key(dn)
                    if base is not None and key != base and not key.endswith("," + base):
                        continue
                    entries.append(make_entry(dn, raw, wanted, rejections))
            except LdifSyntaxError as e:
                raise SourceError(f"{source.path}: {e}") from e
    except OSError as e:
        raise SourceError(f"{source.path}: cannot read: {e.strerror}") from e
    return Snapshot(sort_entries(entries), f"ldif:{source.path}", tuple(rejections))


def parse(lines: Iterable[bytes]) -> Iterator[Record]:
    """(dn, {attribute: [raw values]}) per content record; raises LdifSyntaxError naming the line."""
    dn: str | None = None
    attrs: dict[str, list[bytes]] = {}
    first = True
    for number, line in _unfold(lines):
        if line is None:  # end of a record
            if dn is not None:
                yield dn, attrs
            dn, attrs = None, {}
            continue
        name, value = _attrval(number, line)
        lname = name.lower()
        if dn is None:
            if first and lname == "version":
                if value != b"1":
                    raise LdifSyntaxError(number, "only LDIF version 1 is supported")
                first = False
                continue
            if lname != "dn":
                raise LdifSyntaxError(number, f"a record must start with dn:, not {name}:")
            try:
                dn = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LdifSyntaxError(number, "the DN is not UTF-8") from e
            first = False
            continue
        if lname in ("changetype", "control"):
            raise LdifSyntaxError(number, "change records are not supported (content records only)")
        attrs.setdefault(name, []).append(value)
    if dn is not None:
        yield dn, attrs


def _unfold(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """Logical lines with the number of their first physical line; None marks a blank line."""
    current: bytes | None = None
    start = 0
    comment = False
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip(b"\r\n")
        if line.startswith(b" "):
            if comment:
                continue
            if current is None:
                raise LdifSyntaxError(number, "continuation line without a line to continue")
            current += line[1:]
            continue
        if current is not None:
            yield start, current
            current = None
        comment = line.startswith(b"#")
        if comment:
            continue
        if not line.strip():
            yield number, None
            continue
        current, start = line, number
    if current is not None:
        yield start, current


def _attrval(number: int, line: bytes) -> tuple[str, bytes]:
    name_raw, sep, rest = line.partition(b":")
    name = name_raw.decode("ascii", "replace")
    if not sep or not name or not all(c.isalnum() or c in "-;." for c in name):
        raise LdifSyntaxError(number, "not an `attribute: value` line")
    if rest.startswith(b":"):
        try:
            return name, base64.b64decode(rest[1:].strip(b" "), validate=True)
        except (binascii.Error, ValueError) as e:
            raise LdifSyntaxError(number, f"{name}: invalid base64 value") from e
    if rest.startswith(b"<"):
        raise LdifSyntaxError(number, f"{name}: URL values (:<) are not supported")
    return name, rest.lstrip(b" ")


def _dn_key(dn: str) -> str:
    return ",".join(part.strip().lower() for part in dn.split(","))
