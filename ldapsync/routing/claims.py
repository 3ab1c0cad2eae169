"""Who owns a login or an address: the older entry (createTimestamp), then the first in DN order.

The entries arrive sorted by (createTimestamp, DN) (see routing/build.py), so the first claim
seen wins: every host picks the same owner, and a new entry cannot take over an address by
choosing a DN that sorts first. The claims fill the Tables the later phases work on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ldapsync.directory import Entry
from ldapsync.routing.decisions import Decisions
from ldapsync.routing.entry import Parsed, dn_key
from ldapsync.routing.types import BuildReport, Rule, Settings


@dataclass(slots=True)
class Tables:
    """The routing being built, phase after phase (then frozen into a RoutingModel)."""

    users: dict[str, str] = field(default_factory=dict)  # address -> login (active accounts)
    owner_dn: dict[str, str] = field(default_factory=dict)  # address -> DN that claimed it
    # the claim's holder's normalised createTimestamp ("" if unknown); per claim, not per DN: a
    # rename not yet matched by its delete shows two entries with one DN
    login_created: dict[str, str] = field(default_factory=dict)
    addr_created: dict[str, str] = field(default_factory=dict)
    login_dn: dict[str, str] = field(default_factory=dict)  # login -> DN that claimed it
    forwards: dict[str, list[str]] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)  # LDAP aliases, groups, static aliases
    alias_dn: dict[str, str] = field(default_factory=dict)  # alias or group address -> DN
    alias_source: dict[str, str] = field(default_factory=dict)  # alias -> attribute it came from
    passwords: dict[str, str] = field(default_factory=dict)
    disabled: dict[str, str] = field(default_factory=dict)  # address -> reject text
    member_state: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # DN key -> (kind, address)
    group_entries: list[Entry] = field(default_factory=list)
    records: dict[str, tuple[str, str, Parsed]] = field(default_factory=dict)  # login -> (address, DN, parsed)
    group_dn: dict[str, str] = field(default_factory=dict)  # group address -> group DN
    static_keys: dict[str, str] = field(default_factory=dict)  # address -> static key that routes it
    retired: set[str] = field(default_factory=set)  # addresses of retired accounts (for the dead-target warning)
    member_attr: dict[str, dict[str, str]] = field(default_factory=dict)  # group address -> member -> attribute
    own: dict[str, tuple[str, ...]] = field(default_factory=dict)  # login -> its own addresses, primary first


def precedence(holder_created: str, created: str) -> str:
    """Why the holder of a claim keeps it, as the message says."""
    if holder_created == created:
        return "first in DN order: " + ("same createTimestamp" if created else "no createTimestamp")
    if not holder_created:
        return "it has no createTimestamp, which counts as oldest"
    return "older by createTimestamp"


def claim(
    entries: Iterable[tuple[Entry, Parsed]],
    settings: Settings,
    decide: Decisions,
    report: BuildReport,
) -> Tables:
    """Logins, own addresses and LDAP aliases, each to its oldest claimant; then aliases that
    name another account's address are dropped (an alias may not take over an account)."""
    t = Tables()
    attributes = settings.attributes
    members = settings.groups is not None
    keep_records = settings.mailbox is not None
    login_by_address = settings.login_by_address
    alias_attr = attributes.alias or ""
    addr_attr = attributes.address or ""
    fwd_attr = attributes.forward or ""
    ldap_aliases: dict[str, str] = {}  # alias -> user address
    alias_source = t.alias_source
    tracing = decide.trace is not None  # the events' texts are built only for `explain`
    for entry, parsed in entries:
        if parsed.group:  # not a mail account: the empty-directory guard must not count it
            t.group_entries.append(entry)
            report.skipped += 1
            continue
        if parsed.rejections:
            decide.rejections.extend(parsed.rejections)
        if parsed.notices:
            report.notices.extend(parsed.notices)
        member_key = dn_key(entry.dn) if members else ""
        if parsed.skipped:
            report.skipped += 1
            continue
        if parsed.retired:
            report.retired += 1
            t.retired.update(parsed.addresses)
            if member_key:
                t.member_state[member_key] = ("retired", None)
            continue
        login = parsed.login
        if login is None:
            continue
        addr = parsed.primary
        if login in t.login_dn:
            holder = t.login_dn[login]
            why = precedence(t.login_created[login], parsed.created)
            reason = f"login {login!r} already used by {holder} ({why}); entry skipped"
            decide.reject(entry.dn, attributes.login, reason, Rule.LOGIN_CONFLICT, addr, f"held by {holder} ({why})")
            continue
        if addr in t.owner_dn:
            holder = t.owner_dn[addr]
            why = precedence(t.addr_created[addr], parsed.created)
            reason = f"address {addr} already used by {holder} ({why}); entry skipped"
            detail = f"address held by {holder} ({why})"
            decide.reject(entry.dn, addr_attr, reason, Rule.LOGIN_CONFLICT, addr, detail)
            continue
        t.login_dn[login] = entry.dn
        t.owner_dn[addr] = entry.dn
        t.login_created[login] = t.addr_created[addr] = parsed.created
        if parsed.disabled is not None:
            for a in parsed.addresses:
                t.disabled.setdefault(a, parsed.disabled)
            if member_key:
                t.member_state[member_key] = ("disabled", addr)
            continue
        if member_key:
            t.member_state[member_key] = ("account", addr)
        t.users[addr] = login
        if login_by_address:
            t.own[login] = parsed.addresses
        if tracing:
            decide.event(Rule.ACCOUNT, addr, entry.dn, attributes.login, f"login {login}")
        if keep_records:
            t.records[login] = (addr, entry.dn, parsed)
        if parsed.targets:
            t.forwards[addr] = list(parsed.targets)
            if tracing:
                decide.event(Rule.FORWARD, addr, entry.dn, fwd_attr, ", ".join(parsed.targets))
        if parsed.aliases or len(parsed.addresses) > 1:
            for attr, values in ((addr_attr, parsed.addresses[1:]), (alias_attr, parsed.aliases)):
                for alias in values:
                    if alias == addr:
                        continue
                    ldap_aliases.setdefault(alias, addr)
                    alias_source.setdefault(alias, attr)
                    if ldap_aliases[alias] != addr:
                        holder = t.owner_dn[ldap_aliases[alias]]
                        why = precedence(t.addr_created[ldap_aliases[alias]], parsed.created)
                        reason = f"{alias} already claimed by {holder} ({why}); value dropped"
                        decide.reject(entry.dn, attr, reason, Rule.ALIAS_CLAIMED, alias, f"held by {holder} ({why})")
        if parsed.password is not None:
            t.passwords[login] = parsed.password
            if parsed.weak:
                report.weak_passwords += 1
            if tracing:
                scheme = parsed.password[1 : parsed.password.index("}")]
                decide.event(Rule.PASSWORD, addr, entry.dn, attributes.mail_password or "", f"{{{scheme}}}")

    # An LDAP alias may not take over an account's address.
    for alias, user in sorted(ldap_aliases.items()):
        if alias in t.owner_dn:
            reason = f"{alias} is the address of {t.owner_dn[alias]}; value dropped"
            detail = f"the address of {t.owner_dn[alias]}"
            decide.reject(t.owner_dn[user], alias_source[alias], reason, Rule.ALIAS_IS_ACCOUNT, alias, detail)
            continue
        t.aliases[alias] = [user]
        t.alias_dn[alias] = t.owner_dn[user]
        decide.event(Rule.LDAP_ALIAS, alias, t.owner_dn[user], alias_source[alias], f"-> {user}")
    return t
