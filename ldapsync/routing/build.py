"""The routing model of a directory: a pure function of (snapshot, static file, settings, day).

The phases, in order, each in its own module:
parse (entry.py) -> claim (claims.py) -> groups (groups.py) -> statics (here) -> loops
(loops.py) -> dead targets (targets.py) -> senders (here) -> mailboxes (mailbox.py).
Dead targets come after loops: breaking a loop can leave an address without targets, and
dropping a target cannot make a loop. Every phase reports what it drops
through one Decisions object (decisions.py), which also feeds `ldapsync explain`'s trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

from ldapsync.directory import Entry, Snapshot
from ldapsync.routing.claims import Tables, claim
from ldapsync.routing.decisions import Decisions
from ldapsync.routing.entry import EntryCache, Parsed, entry_parser
from ldapsync.routing.groups import add_groups
from ldapsync.routing.loops import break_loops
from ldapsync.routing.mailbox import mailbox
from ldapsync.routing.targets import drop_dead_targets
from ldapsync.routing.types import BuildReport, Mailbox, RoutingModel, Rule, Settings, Trace
from ldapsync.static import Static


def build(
    snapshot: Snapshot,
    static: Static,
    settings: Settings,
    today: date,
    *,
    cache: EntryCache | None = None,
    trace: Trace | None = None,
) -> tuple[RoutingModel, BuildReport]:
    """`cache` (per DN, reused while the Entry object is the same) makes an agent's rebuild
    after a single change cost a lookup per unchanged entry instead of a re-validation.

    `trace`, when given, collects every decision as an Event (for `ldapsync explain`); it
    bypasses the cache, and costs nothing when absent."""
    if trace is not None:
        cache = None
    report = BuildReport(rejections=list(snapshot.rejections))
    decide = Decisions(report.rejections, trace, report.notices)
    canon = settings.canonical_domains()

    t = claim(_parse(snapshot, settings, today, cache, trace), settings, decide, report)
    if settings.groups is not None:
        add_groups(t, settings.groups, settings.domain, canon, decide)
    _add_statics(t, static, report, decide)
    attributes = settings.attributes
    break_loops(t, static.file, attributes.forward or "", attributes.alias or "", decide)
    drop_dead_targets(t, settings, canon, static.file, report, decide)

    senders = t.aliases
    if t.group_dn and not (settings.groups is not None and settings.groups.members_send_as_group):
        senders = {a: x for a, x in t.aliases.items() if a not in t.group_dn}
    sender = sender_logins(t.users, senders)
    login_addresses = _login_addresses(t) if settings.login_by_address else {}
    if login_addresses:  # whoever may send as an address may do so under either of its names
        for a, logins in sender.items():
            if any(login in login_addresses for login in logins):
                names = {*logins, *(x for login in logins for x in login_addresses.get(login, ()))}
                sender[a] = tuple(sorted(names))

    # Delivered here: no forward, or a forward that keeps a copy (lists the account itself).
    local = {
        a: login
        for a, login in t.users.items()
        if (a not in t.forwards or a in t.forwards[a]) and (a not in t.aliases or a in t.aliases[a])
    }
    mailboxes: dict[str, Mailbox] = {}
    if settings.mailbox is not None:
        for login, (addr, dn, parsed) in sorted(t.records.items()):
            box = mailbox(login, addr, dn, parsed, settings.mailbox, attributes, decide)
            if box is not None:
                mailboxes[login] = box
        for a in [a for a, login in local.items() if login not in mailboxes]:
            del local[a]

    model = RoutingModel(
        domain=settings.domain,
        domain_aliases=settings.domain_aliases,
        users=dict(sorted(t.users.items())),
        aliases={k: tuple(v) for k, v in sorted(t.aliases.items())},
        forwards={k: tuple(v) for k, v in sorted(t.forwards.items())},
        passwords=dict(sorted(t.passwords.items())),
        disabled=dict(sorted(t.disabled.items())),
        sender_logins=sender,
        hosted={d: tuple(a) for d, a in sorted(settings.hosted.items())},
        local=dict(sorted(local.items())),
        mailboxes=mailboxes,
        groups=dict(sorted(t.group_dn.items())),
        login_addresses=login_addresses,
    )
    return model, report


def _login_addresses(t: Tables) -> dict[str, tuple[str, ...]]:
    """login -> the account's own addresses it still holds (accepted, as its address or as an alias
    of it): each is unique to one account, and has an '@' that no login has."""
    out: dict[str, tuple[str, ...]] = {}
    for login, own in sorted(t.own.items()):
        primary = own[0]
        if t.users.get(primary) != login:  # its mail is refused: every target of its forward died
            continue
        out[login] = tuple(a for a in own if a == primary or t.aliases.get(a) == [primary])
    return out


def _parse(
    snapshot: Snapshot, settings: Settings, today: date, cache: EntryCache | None, trace: Trace | None
) -> list[tuple[Entry, Parsed]]:
    """Every entry parsed (from the cache where the Entry object is unchanged), oldest first."""
    parse = entry_parser(settings, today, trace)
    ordered: list[tuple[tuple[str, str, str], int, Entry, Parsed]] = []
    seen: set[str] = set()
    for i, entry in enumerate(snapshot.entries):
        hit = cache.get(entry.dn) if cache is not None else None
        if hit is not None and hit[0] is entry:
            parsed = hit[1]
        else:
            parsed = parse(entry)
            if cache is not None:
                cache[entry.dn] = (entry, parsed)
        if cache is not None:
            seen.add(entry.dn)
        ordered.append(((parsed.created, entry.dn.lower(), entry.dn), i, entry, parsed))
    if cache is not None and len(cache) > len(seen):
        for dn in [d for d in cache if d not in seen]:
            del cache[dn]
    # Sorted here, not trusted from the source: a contested login, address or alias goes to
    # the OLDER entry (createTimestamp), then to the first in DN order. Every host picks the
    # same one, and a new entry cannot take over an address by choosing a DN that sorts
    # first. (The index keeps tuples from ever comparing two entries.)
    ordered.sort()
    return [(entry, parsed) for _, _, entry, parsed in ordered]


def _add_statics(t: Tables, static: Static, report: BuildReport, decide: Decisions) -> None:
    """Static entries win over LDAP, loudly."""
    for kind, entries in (("alias", static.aliases), ("forward", static.forwards)):
        for s in entries:
            t.static_keys[s.address] = s.key
            clash = t.owner_dn.get(s.address) or t.alias_dn.get(s.address)
            if clash:
                report.warnings.append(f"{static.file}: {s.key} overrides {s.address} from LDAP entry {clash}")
            t.forwards.pop(s.address, None)
            t.aliases.pop(s.address, None)
            t.group_dn.pop(s.address, None)
            if s.address in t.disabled:
                del t.disabled[s.address]
            (t.aliases if kind == "alias" else t.forwards)[s.address] = list(s.targets)
            origin = f"{static.file}: {s.key}"
            decide.event(Rule.STATIC, s.address, origin, "", f"{kind} -> {', '.join(s.targets)}")
            if clash:
                decide.event(Rule.STATIC_OVERRIDE, s.address, origin, "", f"replaces LDAP entry {clash}")


def sender_logins(users: Mapping[str, str], aliases: Mapping[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """An account may send as itself and as every alias that delivers to it (not forwards)."""
    memo: dict[str, frozenset[str]] = {}

    def logins(addr: str, seen: frozenset[str]) -> frozenset[str]:
        if addr in memo:
            return memo[addr]
        found: set[str] = {users[addr]} if addr in users else set()
        if addr in aliases and addr not in seen:
            for x in aliases[addr]:
                if x != addr:
                    found |= logins(x, seen | {addr})
        memo[addr] = frozenset(found)
        return memo[addr]

    out: dict[str, tuple[str, ...]] = {}
    for addr in sorted(set(users) | set(aliases)):
        if addr not in aliases:  # the common case: an account sends as itself
            out[addr] = (users[addr],)
            continue
        found = logins(addr, frozenset())
        if found:
            out[addr] = tuple(sorted(found))
    return out
