"""The routing model: who exists, where each address goes, who may send as what.

A pure function of (directory snapshot, static YAML, settings). Exporters only render it,
so every output agrees with every other, and every host computes the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date

from ldapsync import validate
from ldapsync.directory import Entry, Rejection, Snapshot
from ldapsync.errors import ConfigError
from ldapsync.schema import LOGICAL_FIELDS, AttributeMap
from ldapsync.static import Static

DEFAULT_DISABLED_MESSAGE = "This address is disabled"


@dataclass(frozen=True, slots=True)
class RoutingModel:
    domain: str
    domain_aliases: tuple[str, ...]
    users: Mapping[str, str]  # canonical address -> login (active accounts)
    aliases: Mapping[str, tuple[str, ...]]  # canonical alias address -> targets
    forwards: Mapping[str, tuple[str, ...]]  # canonical address -> targets
    passwords: Mapping[str, str]  # login -> {SCHEME}hash
    disabled: Mapping[str, str]  # canonical address -> reject text
    sender_logins: Mapping[str, tuple[str, ...]]  # canonical address -> logins

    def variants(self, address: str) -> list[str]:
        """The address in the domain and in every alias domain."""
        local = address.rpartition("@")[0]
        return [address, *(f"{local}@{d}" for d in self.domain_aliases)]

    def domain_rewrites(self) -> dict[str, str]:
        """alias-domain address -> canonical address, for every known address."""
        out: dict[str, str] = {}
        if not self.domain_aliases:
            return out
        for addr in self.deliverable():
            for v in self.variants(addr)[1:]:
                out[v] = addr
        return out

    def deliverable(self) -> list[str]:
        """Canonical addresses that accept mail, sorted."""
        return sorted(set(self.users) | set(self.aliases) | set(self.forwards))

    def counts(self) -> dict[str, int]:
        return {
            "users": len(self.users),
            "aliases": len(self.aliases),
            "forwards": len(self.forwards),
            "passwords": len(self.passwords),
            "disabled": len(self.disabled),
        }


@dataclass(slots=True)
class BuildReport:
    rejections: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    retired: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What one entry says, validated: a pure function of the entry and the settings."""

    login: str | None = None  # None: not a mail account (or skipped, see rejections)
    retired: bool = False
    disabled: str | None = None
    targets: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    password: str | None = None
    rejections: tuple[Rejection, ...] = ()
    skipped: bool = False  # no login attribute at all


EntryCache = dict[str, tuple[Entry, _Parsed]]


def build(
    snapshot: Snapshot,
    static: Static,
    *,
    domain: str,
    domain_aliases: tuple[str, ...],
    attributes: AttributeMap,
    today: date,
    cache: EntryCache | None = None,
) -> tuple[RoutingModel, BuildReport]:
    """`cache` (per DN, reused while the Entry object is the same) makes an agent's rebuild
    after a single change cost a lookup per unchanged entry instead of a re-validation."""
    report = BuildReport(rejections=list(snapshot.rejections))
    rej = report.rejections
    ours = frozenset({domain, *domain_aliases})
    names = _lower_names(attributes)

    users: dict[str, str] = {}
    owner_dn: dict[str, str] = {}  # address -> DN that claimed it
    forwards: dict[str, list[str]] = {}
    ldap_aliases: dict[str, str] = {}  # alias -> user address
    passwords: dict[str, str] = {}
    disabled: dict[str, str] = {}
    alias_attr = attributes.alias or ""
    fwd_attr = attributes.forward or ""
    seen: set[str] = set()

    # Sorted here, not trusted from the source: duplicate logins and contested aliases go to
    # the first entry, and every host must pick the same one.
    for entry in sorted(snapshot.entries, key=lambda e: (e.dn.lower(), e.dn)):
        hit = cache.get(entry.dn) if cache is not None else None
        if hit is not None and hit[0] is entry:
            parsed = hit[1]
        else:
            parsed = _parse_entry(entry, attributes, names, domain, ours, today)
            if cache is not None:
                cache[entry.dn] = (entry, parsed)
        if cache is not None:
            seen.add(entry.dn)
        rej.extend(parsed.rejections)
        if parsed.skipped:
            report.skipped += 1
            continue
        if parsed.retired:
            report.retired += 1
            continue
        login = parsed.login
        if login is None:
            continue
        addr = f"{login}@{domain}"
        if addr in owner_dn:
            rej.append(
                Rejection(
                    entry.dn, attributes.login, f"login {login!r} already used by {owner_dn[addr]}; entry skipped"
                )
            )
            continue
        owner_dn[addr] = entry.dn
        if parsed.disabled is not None:
            disabled[addr] = parsed.disabled
            continue
        users[addr] = login
        if parsed.targets:
            forwards[addr] = list(parsed.targets)
        for alias in parsed.aliases:
            if alias != addr:
                ldap_aliases.setdefault(alias, addr)
                if ldap_aliases[alias] != addr:
                    rej.append(Rejection(entry.dn, alias_attr, f"{alias} already claimed; value dropped"))
        if parsed.password is not None:
            passwords[login] = parsed.password
    if cache is not None and len(cache) > len(seen):
        for dn in [d for d in cache if d not in seen]:
            del cache[dn]

    # An LDAP alias may not take over an account's address.
    aliases: dict[str, list[str]] = {}
    alias_dn: dict[str, str] = {}
    for alias, user in sorted(ldap_aliases.items()):
        if alias in owner_dn:
            reason = f"{alias} is the address of {owner_dn[alias]}; value dropped"
            rej.append(Rejection(owner_dn[user], alias_attr, reason))
            continue
        aliases[alias] = [user]
        alias_dn[alias] = owner_dn[user]

    # Static entries win over LDAP, loudly.
    static_keys: dict[str, str] = {}
    for kind, entries in (("alias", static.aliases), ("forward", static.forwards)):
        for s in entries:
            static_keys[s.address] = s.key
            clash = owner_dn.get(s.address) or alias_dn.get(s.address)
            if clash:
                report.warnings.append(f"{static.file}: {s.key} overrides {s.address} from LDAP entry {clash}")
            forwards.pop(s.address, None)
            aliases.pop(s.address, None)
            if s.address in disabled:
                del disabled[s.address]
            (aliases if kind == "alias" else forwards)[s.address] = list(s.targets)

    _break_loops(aliases, forwards, static_keys, owner_dn, alias_dn, static.file, rej, fwd_attr, alias_attr)

    sender = _sender_logins(users, aliases)
    model = RoutingModel(
        domain=domain,
        domain_aliases=domain_aliases,
        users=dict(sorted(users.items())),
        aliases={k: tuple(v) for k, v in sorted(aliases.items())},
        forwards={k: tuple(v) for k, v in sorted(forwards.items())},
        passwords=dict(sorted(passwords.items())),
        disabled=dict(sorted(disabled.items())),
        sender_logins=sender,
    )
    return model, report


def _lower_names(attributes: AttributeMap) -> dict[str, str]:
    """Logical field -> lower-cased attribute name ('' if unmapped), computed once per build."""
    return {f: (getattr(attributes, f) or "").lower() for f in LOGICAL_FIELDS}


def _parse_entry(
    entry: Entry, attributes: AttributeMap, names: dict[str, str], domain: str, ours: frozenset[str], today: date
) -> _Parsed:
    rej: list[Rejection] = []
    attrs = entry.attributes
    logins = attrs.get(names["login"], ())
    if not logins:
        return _Parsed(skipped=True)
    if len(logins) > 1:
        return _Parsed(rejections=(Rejection(entry.dn, attributes.login, "multi-valued login; entry skipped"),))
    try:
        login = validate.login(logins[0])
    except validate.Invalid as e:
        return _Parsed(rejections=(Rejection(entry.dn, attributes.login, f"{e}; entry skipped"),))
    if any(validate.is_retired(s, today) for s in attrs.get(names["status"], ())):
        return _Parsed(login=login, retired=True)
    messages = attrs.get(names["disable_message"], ())
    if len(messages) > 1:
        messages = tuple(sorted(messages))  # LDAP values are unordered
    if messages:
        try:
            message = validate.disable_message(messages[0])
        except validate.Invalid as e:
            rej.append(Rejection(entry.dn, attributes.disable_message or "", f"{e}; default text used"))
            message = DEFAULT_DISABLED_MESSAGE
        return _Parsed(login=login, disabled=message, rejections=tuple(rej))

    def canonical(addr: str) -> str:
        local, _, dom = addr.rpartition("@")
        return f"{local.lower()}@{domain}" if dom in ours else addr

    fwd_attr = attributes.forward or ""
    alias_attr = attributes.alias or ""
    targets: list[str] = []
    for value in attrs.get(names["forward"], ()):
        # "a@x, b@y" is a list (userdir-ldap); spaces around commas are not data.
        for part in value.split(","):
            candidate = part.strip(" ")
            if not candidate:
                continue
            try:
                targets.append(canonical(validate.address(candidate)))
            except validate.Invalid as e:
                rej.append(Rejection(entry.dn, fwd_attr, f"{_show(part)} {e}; value dropped"))
    aliases: list[str] = []
    for value in attrs.get(names["alias"], ()):
        try:
            alias = validate.address(value)
        except validate.Invalid as e:
            rej.append(Rejection(entry.dn, alias_attr, f"{_show(value)} {e}; value dropped"))
            continue
        if alias.rpartition("@")[2] not in ours:
            rej.append(Rejection(entry.dn, alias_attr, f"{_show(value)} is not in {domain}; value dropped"))
            continue
        aliases.append(canonical(alias))
    password = None
    hashes = attrs.get(names["mail_password"], ())
    if len(hashes) > 1:
        rej.append(Rejection(entry.dn, attributes.mail_password or "", "multi-valued; no password"))
    elif hashes:
        try:
            password = validate.password(hashes[0])
        except validate.Invalid as e:
            rej.append(Rejection(entry.dn, attributes.mail_password or "", f"{e}; no password"))
    return _Parsed(
        login=login,
        targets=tuple(targets) if len(targets) < 2 else tuple(sorted(set(targets))),  # unordered in LDAP
        aliases=tuple(aliases),
        password=password,
        rejections=tuple(rej),
    )


def _show(value: str) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "...'"


def _break_loops(
    aliases: dict[str, list[str]],
    forwards: dict[str, list[str]],
    static_keys: Mapping[str, str],
    owner_dn: Mapping[str, str],
    alias_dn: Mapping[str, str],
    static_file: object,
    rej: list[Rejection],
    fwd_attr: str,
    alias_attr: str,
) -> None:
    """Postfix defers mail caught in an alias loop; drop the LDAP edges that close one."""
    while True:
        merged = {**forwards, **aliases}
        # Only addresses that route to another known address can be on a cycle; most
        # forwards go outside, so the graph searched is small.
        routes = {k: [t for t in v if t != k and t in merged] for k, v in merged.items()}
        routes = {k: v for k, v in routes.items() if v}
        cycles = [c for c in _strongly_connected(routes) if len(c) > 1]
        if not cycles:
            return
        for cycle in cycles:
            members = sorted(cycle)
            from_ldap = [a for a in members if a not in static_keys]
            if not from_ldap:
                keys = ", ".join(static_keys[a] for a in members)
                raise ConfigError(f"alias loop: {' -> '.join(members)}", file=str(static_file), key=keys)
            for a in from_ldap:
                if a in forwards:
                    reason = f"forward loop through {', '.join(members)}; forward dropped"
                    rej.append(Rejection(owner_dn[a], fwd_attr, reason))
                    del forwards[a]
                else:
                    reason = f"alias loop through {', '.join(members)}; alias dropped"
                    rej.append(Rejection(alias_dn[a], alias_attr, reason))
                    del aliases[a]


def _strongly_connected(routes: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (100k-entry directories would blow the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(routes):
        if root in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(root, iter([t for t in routes[root] if t in routes and t != root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter([t for t in routes[child] if t in routes and t != child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == node:
                            break
                    out.append(component)
    return out


def _sender_logins(users: Mapping[str, str], aliases: Mapping[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """An account may send as itself and as every alias that delivers to it (not forwards)."""
    memo: dict[str, frozenset[str]] = {}

    def logins(addr: str, seen: frozenset[str]) -> frozenset[str]:
        if addr in memo:
            return memo[addr]
        found: set[str] = {users[addr]} if addr in users else set()
        if addr in aliases and addr not in seen:
            for t in aliases[addr]:
                if t != addr:
                    found |= logins(t, seen | {addr})
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
