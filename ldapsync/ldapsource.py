"""Read the directory from LDAP with ldap3: paged, minimal attributes, never partial.

ldap3 does not raise on sizeLimitExceeded/timeLimitExceeded: it hands back the truncated
entries. Every page's result code is therefore checked, and anything but success (or a
referral we cannot follow) fails the whole read, so a truncated directory never becomes a
truncated map.
"""

from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass
from typing import Any

import ldap3
import structlog
from ldap3.core.exceptions import LDAPException

from ldapsync.config import LdapSource
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry, sort_entries
from ldapsync.errors import ConfigError, SourceError
from ldapsync.schema import AttributeMap

log = structlog.get_logger(__name__)

PAGED_RESULTS = "1.2.840.113556.1.4.319"
SCOPES = {"sub": ldap3.SUBTREE, "one": ldap3.LEVEL, "base": ldap3.BASE}


@dataclass(frozen=True, slots=True)
class Connected:
    conn: ldap3.Connection
    uri: str


def bind_password(cfg: LdapSource) -> str | None:
    if cfg.bind_password_file is None:
        return None
    try:
        st = cfg.bind_password_file.stat()
        text = cfg.bind_password_file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            f"cannot read {cfg.bind_password_file}: {e.strerror}", key="source.ldap.bind_password_file"
        ) from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "bind password file is readable by group or others",
            path=str(cfg.bind_password_file),
            mode=oct(stat.S_IMODE(st.st_mode)),
        )
    return text.rstrip("\r\n")


def _server(uri: str, cfg: LdapSource) -> ldap3.Server:
    tls = None
    if uri.lower().startswith("ldaps://") or cfg.start_tls:
        if not cfg.tls_verify:
            log.warning("TLS certificate verification is disabled", uri=uri)
        tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED if cfg.tls_verify else ssl.CERT_NONE,
            ca_certs_file=str(cfg.ca_file) if cfg.ca_file else None,
        )
    return ldap3.Server(uri, get_info=ldap3.NONE, connect_timeout=cfg.timeout, tls=tls)


def connect(cfg: LdapSource, **kwargs: Any) -> Connected:
    """Bind to the first server in `uri` order that answers; name each failure otherwise."""
    password = bind_password(cfg)
    failures = []
    for uri in cfg.uris:
        try:
            conn = ldap3.Connection(
                _server(uri, cfg),
                user=cfg.bind_dn,
                password=password,
                authentication=ldap3.SIMPLE if cfg.bind_dn else ldap3.ANONYMOUS,
                receive_timeout=cfg.timeout,
                read_only=True,
                check_names=False,
                raise_exceptions=False,
                auto_referrals=False,
                **kwargs,
            )
            conn.open()
            if cfg.start_tls and not uri.lower().startswith(("ldaps://", "ldapi://")) and not conn.start_tls():
                raise SourceError(f"StartTLS failed: {conn.result.get('description')}")
            if not conn.bind():
                raise SourceError(f"bind as {cfg.bind_dn or 'anonymous'} failed: {conn.result.get('description')}")
            return Connected(conn, uri)
        except (LDAPException, OSError, SourceError) as e:
            failures.append(f"{uri}: {e}")
            log.warning("LDAP server unavailable, trying the next", uri=uri, error=str(e))
    raise SourceError("no LDAP server could be used: " + "; ".join(failures))


def read(cfg: LdapSource, attributes: AttributeMap) -> Snapshot:
    connected = connect(cfg)
    try:
        return search(connected, cfg, attributes)
    finally:
        try:
            connected.conn.unbind()
        except (LDAPException, OSError):
            pass


def search(connected: Connected, cfg: LdapSource, attributes: AttributeMap) -> Snapshot:
    conn, uri = connected.conn, connected.uri
    wanted = attributes.ldap_attributes()
    rejections: list[Rejection] = []
    entries: list[Entry] = []
    cookie: bytes | None = None
    pages = 0
    while True:
        try:
            conn.search(
                cfg.base_dn,
                cfg.filter,
                search_scope=SCOPES[cfg.scope],
                dereference_aliases=ldap3.DEREF_NEVER,
                attributes=wanted,
                paged_size=cfg.page_size,
                paged_cookie=cookie,
            )
        except (LDAPException, OSError) as e:
            raise SourceError(f"{uri}: search failed after {pages} page(s), {len(entries)} entries: {e}") from e
        result = conn.result or {}
        code = result.get("result")
        if code != 0:
            raise SourceError(
                f"{uri}: search of {cfg.base_dn} failed after {len(entries)} entries: "
                f"{result.get('description')} ({code}) {result.get('message') or ''}".rstrip()
            )
        pages += 1
        for item in conn.response or ():
            kind = item.get("type")
            if kind == "searchResEntry":
                entries.append(make_entry(item["dn"], item["raw_attributes"], wanted, rejections))
            elif kind == "searchResRef":
                raise SourceError(f"{uri}: referral to {item.get('uri')} cannot be followed; refusing a partial read")
        control = (result.get("controls") or {}).get(PAGED_RESULTS)
        cookie = control["value"]["cookie"] if control else None
        if not cookie:
            break
    log.debug("read directory", uri=uri, entries=len(entries), pages=pages)
    return Snapshot(sort_entries(entries), f"ldap:{uri}", tuple(rejections))
