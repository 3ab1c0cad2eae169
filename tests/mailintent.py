"""What mail to an address SHOULD do, from the directory and the static file alone.

The oracle for tests/test_mailflow.py (and the end-to-end tests): a small resolver written
from docs/configuration.md's routing semantics, sharing no code with ldapsync, so a mistake in
the model or in a host's configuration cannot hide in both. It knows nothing of hosts, maps or
Postfix; it answers "which mailboxes and external addresses receive one copy each" or "this
address is refused (and with which message)":

- an active account receives in its mailbox, unless it has a forward: then its mail goes to the
  forward's targets, and to its mailbox only if the forward lists the account itself (a kept
  copy); a target in our domains is followed to its own end (chains);
- a group delivers to its members: member DNs of active accounts, rfc822MailMember addresses,
  and the members of nested groups (by DN, so a group cycle just shares its members);
- a static alias or forward replaces whatever LDAP says about its address;
- a disabled account is refused with its message; retired and unknown addresses are refused;
- a dead target (disabled, retired or unknown in our domains) is dropped; an address left with
  no destination at all is refused, like an unknown one;
- a cycle through forwards, groups and aliases loses its LDAP edges inside the cycle (the
  static ones stay): the cut happens on the graph as a whole, before anything is resolved;
- every address exists in each alias domain too; addresses outside our domains (including
  subdomains such as lists.example.net) are not ours: refused by our MX.

Directory shapes come from ``Directory``, which also writes the LDIF and mail.yaml ldapsync reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml
from mailflow import Delivery

DOMAIN = "example.org"
ALIAS_DOMAINS = ("host1.example.org", "example.net")  # docs/snippets/ldapsync-*.yaml
DOMAINS = (DOMAIN, *ALIAS_DOMAINS)
OU = "ou=users,dc=example,dc=org"
GOU = "ou=groups,dc=example,dc=org"


def user_dn(login: str) -> str:
    return f"uid={login},{OU}"


def group_dn(name: str) -> str:
    return f"cn={name},{GOU}"


def canonical(address: str) -> str:
    """`name` -> name@example.org; alias domains -> example.org; others kept (lower-cased)."""
    address = address.strip().lower()
    if "@" not in address:
        return f"{address}@{DOMAIN}"
    local, _, domain = address.rpartition("@")
    return f"{local}@{DOMAIN}" if domain in DOMAINS else address


def ours(address: str) -> bool:
    return address.rpartition("@")[2] in DOMAINS


@dataclass(frozen=True)
class Account:
    login: str
    forward: tuple[str, ...] = ()  # targets as written in emailForward (bare names allowed in tests only)
    state: str = "active"  # active | disabled | retired
    message: str = ""  # mailDisableMessage when disabled


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[str, ...] = ()  # member DNs (accounts, groups, or nothing at all)
    addresses: tuple[str, ...] = ()  # rfc822MailMember values


@dataclass(frozen=True)
class Directory:
    accounts: tuple[Account, ...] = ()
    groups: tuple[Group, ...] = ()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # static: name -> targets
    forwards: Mapping[str, str] = field(default_factory=dict)  # static: name -> target

    def ldif(self) -> str:
        out = []
        for a in self.accounts:
            lines = [f"dn: {user_dn(a.login)}", "objectClass: inetOrgPerson", f"uid: {a.login}", f"cn: {a.login}"]
            lines.append(f"sn: {a.login}")
            if a.forward:
                full = [t if "@" in t else f"{t}@{DOMAIN}" for t in a.forward]
                lines.append("emailForward: " + ", ".join(full))
            if a.state == "disabled":
                lines.append(f"mailDisableMessage: {a.message or 'This account is closed'}")
            elif a.state == "retired":
                lines.append("accountStatus: inactive")
            out.append("\n".join(lines))
        for g in self.groups:
            lines = [f"dn: {group_dn(g.name)}", f"objectClass: {'groupOfNames' if g.members else 'nisMailAlias'}"]
            lines.append(f"cn: {g.name}")
            lines += [f"member: {m}" for m in g.members]
            lines += [f"rfc822MailMember: {m}" for m in g.addresses]
            out.append("\n".join(lines))
        return "\n\n".join(out) + "\n"

    def mail_yaml(self) -> str:
        doc: dict[str, object] = {}
        if self.aliases:
            doc["aliases"] = {k: list(v) for k, v in self.aliases.items()}
        if self.forwards:
            doc["forwards"] = dict(self.forwards)
        return yaml.safe_dump(doc, sort_keys=True)


@dataclass(frozen=True)
class Intent:
    address: str
    destinations: frozenset[Delivery] = frozenset()
    refused: str | None = None  # why it must be refused at RCPT: "disabled: <message>", "unknown", "not ours"
    shared: bool = False  # some destination is reached along two routes (still: one copy)

    @property
    def dead(self) -> bool:
        return self.refused is not None


class Resolver:
    """The directory's intended routing, computed once; `intend(address)` per address."""

    def __init__(self, d: Directory):
        self.static: dict[str, tuple[str, ...]] = {canonical(k): tuple(map(canonical, v)) for k, v in d.aliases.items()}
        self.static.update({canonical(k): (canonical(v),) for k, v in d.forwards.items()})
        self.accounts = {canonical(a.login): a for a in d.accounts}
        by_dn = {user_dn(a.login).lower(): a for a in d.accounts}
        groups_by_dn = {group_dn(g.name).lower(): g for g in d.groups}
        # Routing nodes: address -> (targets, from LDAP?)
        edges: dict[str, tuple[tuple[str, ...], bool]] = {}
        for g in d.groups:
            address = canonical(g.name)
            if address in self.accounts:
                continue  # the account wins (its address, whatever its state)
            members: list[str] = []
            todo, seen = [group_dn(g.name).lower()], set()
            while todo:  # nested groups by DN; a cycle just shares members
                dn = todo.pop()
                if dn in seen:
                    continue
                seen.add(dn)
                sub = groups_by_dn[dn]
                for m in sub.members:
                    if m.lower() in groups_by_dn:
                        todo.append(m.lower())
                    elif m.lower() in by_dn and by_dn[m.lower()].state == "active":
                        members.append(canonical(by_dn[m.lower()].login))
                members += [canonical(x) for x in sub.addresses]
            edges.setdefault(address, (tuple(dict.fromkeys(members)), True))
        for address, a in self.accounts.items():
            if a.state == "active" and a.forward:
                edges[address] = (tuple(dict.fromkeys(map(canonical, a.forward))), True)
        for address, targets in self.static.items():
            edges[address] = (targets, False)
        self.edges = self._cut_cycles(edges)
        self.loops_cut = sum(len(set(t)) - len(set(self.edges.get(u, ()))) for u, (t, _) in edges.items())
        self._memo: dict[str, frozenset[Delivery]] = {}

    @staticmethod
    def _cut_cycles(edges: dict[str, tuple[tuple[str, ...], bool]]) -> dict[str, tuple[str, ...]]:
        """An LDAP edge u -> v (v != u) goes when u can be reached again from v."""

        def reaches(start: str, goal: str) -> bool:
            todo, seen = [start], set()
            while todo:
                n = todo.pop()
                if n == goal:
                    return True
                if n in seen or n not in edges:
                    continue
                seen.add(n)
                todo += [t for t in edges[n][0] if t != n]
            return False

        out = {}
        for u, (targets, from_ldap) in edges.items():
            kept = [t for t in targets if t == u or not from_ldap or not reaches(t, u)]
            if kept or not from_ldap:
                out[u] = tuple(kept)
            elif u in edges and u not in out:
                out[u] = ()  # every LDAP target closed a loop: see resolve()
        return out

    def resolve(self, address: str) -> frozenset[Delivery]:
        if address in self._memo:
            return self._memo[address]
        self._memo[address] = frozenset()  # the cut graph is acyclic but for self-edges
        out: set[Delivery] = set()
        account = self.accounts.get(address)
        if not ours(address):
            out.add(Delivery("external", address))
        elif address in self.edges and (self.edges[address] or address in self.static):
            for t in self.edges[address]:
                if t == address and account is not None and account.state == "active":
                    out.add(Delivery("mailbox", account.login))  # the kept copy
                elif t != address:
                    out |= self.resolve(t)
        elif account is not None and account.state == "active":
            out.add(Delivery("mailbox", account.login))  # no forward, or none left after a loop
        self._memo[address] = frozenset(out)
        return self._memo[address]

    def paths(self, address: str) -> Counter[Delivery]:
        """How many distinct routes lead from `address` to each destination (more than one: a
        host that expands only part of the way may pass two copies on, see docs/design.md)."""
        out: Counter[Delivery] = Counter()
        account = self.accounts.get(address)
        if not ours(address):
            out[Delivery("external", address)] += 1
        elif address in self.edges and (self.edges[address] or address in self.static):
            for t in dict.fromkeys(self.edges[address]):
                if t == address and account is not None and account.state == "active":
                    out[Delivery("mailbox", account.login)] += 1
                elif t != address:
                    out.update(self.paths(t))
        elif account is not None and account.state == "active":
            out[Delivery("mailbox", account.login)] += 1
        return out

    def intend(self, address: str) -> Intent:
        address = address.lower()
        if not ours(address):
            return Intent(address, refused="not ours")
        address = canonical(address)
        account = self.accounts.get(address)
        if address not in self.static and account is not None and account.state == "disabled":
            return Intent(address, refused=f"disabled: {account.message or 'This account is closed'}")
        found = self.resolve(address)
        if not found:
            return Intent(address, refused="unknown")
        shared = any(n > 1 for n in self.paths(address).values())
        return Intent(address, found, shared=shared)
