"""Mail groups: an entry's name(s) become an alias to its members, nested groups flattened.

Nested groups are expanded here, not left to Postfix, so a cycle is found and reported once
(every group on it gets the members of all of them) instead of looping in the MTA. A group
address an account or LDAP alias already holds stays the account's.
"""

from __future__ import annotations

from collections.abc import Mapping

from ldapsync import validate
from ldapsync.directory import Entry
from ldapsync.routing.claims import Tables
from ldapsync.routing.decisions import Decisions
from ldapsync.routing.entry import dn_key, group_address, show
from ldapsync.routing.loops import strongly_connected
from ldapsync.routing.types import GroupSettings, Rule


def add_groups(t: Tables, settings: GroupSettings, domain: str, canon: Mapping[str, str], decide: Decisions) -> None:
    """Each group address not held by an account becomes an alias to the group's members."""
    if not t.group_entries:
        return
    resolved = resolve_groups(t.group_entries, settings, t.member_state, domain, canon, decide)
    for address, (dn, targets, disabled) in resolved.items():
        claimed = t.owner_dn.get(address) or t.alias_dn.get(address)
        if claimed:
            reason = f"{address} is an address of {claimed}; the account wins, group address dropped"
            decide.reject(dn, settings.name_attribute, reason, Rule.GROUP_LOST, address)
            continue
        if not targets:  # every member is disabled: the group is rejected with the first one's message
            message = next((t.disabled[d] for d in disabled if d in t.disabled), None)
            if message is not None:
                t.disabled.setdefault(address, message)
            continue
        t.aliases[address] = [m for m, _ in targets]
        t.member_attr[address] = dict(targets)
        t.alias_dn[address] = t.group_dn[address] = dn
        decide.event(Rule.GROUP, address, dn, settings.name_attribute, ", ".join(t.aliases[address]))


def resolve_groups(
    entries: list[Entry],
    settings: GroupSettings,
    member_state: Mapping[str, tuple[str, str | None]],
    domain: str,
    canon: Mapping[str, str],
    decide: Decisions,
) -> dict[str, tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]]]:
    """group address -> (DN, (member address, attribute it came from) for every member with nested
    groups flattened, the disabled members' addresses when that leaves no member)."""
    by_key = {dn_key(e.dn): e for e in entries}
    direct: dict[str, dict[str, str]] = {}  # group key -> member address -> attribute
    disabled: dict[str, set[str]] = {}  # group key -> disabled members' addresses
    nested: dict[str, list[str]] = {}
    names: dict[str, list[str]] = {}
    name_attr = settings.name_attribute.lower()

    def as_address(value: str) -> str:
        return group_address(value, domain, canon)

    for key, entry in sorted(by_key.items(), key=lambda kv: (kv[1].dn.lower(), kv[1].dn)):
        dn = entry.dn
        own: list[str] = []
        for value in sorted(entry.attributes.get(name_attr, ())):
            try:
                address = as_address(value)
            except validate.Invalid as e:
                decide.reject(dn, settings.name_attribute, f"{show(value)} {e}; value dropped")
                continue
            if address.rpartition("@")[2] not in canon.values():
                decide.reject(dn, settings.name_attribute, f"{show(value)} is not in a hosted domain; value dropped")
                continue
            own.append(address)
        names[key] = own
        members: dict[str, str] = {}
        gone: set[str] = set()
        subgroups: list[str] = []
        for attr in settings.member_attributes:
            for value in entry.attributes.get(attr.lower(), ()):
                member = dn_key(value)
                if member in by_key:
                    subgroups.append(member)
                    continue
                kind, account = member_state.get(member, ("unknown", None))
                if kind == "account" and account is not None:
                    members.setdefault(account, attr)
                else:
                    if kind == "disabled" and account is not None:
                        gone.add(account)
                        # for explain's "referenced by" of the member's address; the warning names the DN
                        decide.event(Rule.TARGET_DROPPED, own, dn, attr, f"target {account} is disabled; dropped")
                    what = "not a mail account or group" if kind == "unknown" else kind
                    decide.reject(dn, attr, f"member {show(value)} is {what}; skipped", Rule.GROUP_MEMBER_SKIPPED, own)
        for attr in settings.address_attributes:
            for value in entry.attributes.get(attr.lower(), ()):
                try:
                    members.setdefault(as_address(value), attr)
                except validate.Invalid as e:
                    decide.reject(dn, attr, f"{show(value)} {e}; value dropped")
        direct[key] = members
        disabled[key] = gone
        nested[key] = sorted(set(subgroups))

    for cycle in strongly_connected(nested):
        if len(cycle) > 1 or cycle[0] in nested.get(cycle[0], ()):
            dns = [by_key[k].dn for k in sorted(cycle)]
            attr = settings.member_attributes[0]
            for k in sorted(cycle):
                reason = f"group cycle through {'; '.join(dns)}; each gets the members of all, no loop installed"
                decide.reject(by_key[k].dn, attr, reason, Rule.GROUP_CYCLE, names[k])

    out: dict[str, tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]]] = {}
    for key in sorted(by_key, key=lambda k: (by_key[k].dn.lower(), by_key[k].dn)):
        if not names[key]:
            continue
        reach: set[str] = set()
        todo = [key]
        while todo:
            k = todo.pop()
            if k in reach:
                continue
            reach.add(k)
            todo.extend(nested.get(k, ()))
        targets: dict[str, str] = {}
        for k in sorted(reach):
            for member, attr in direct[k].items():
                targets.setdefault(member, attr)
        for own_address in names[key]:
            targets.pop(own_address, None)
        dn = by_key[key].dn
        silenced: tuple[str, ...] = ()
        if not targets:
            decide.reject(dn, settings.name_attribute, "no deliverable member; group skipped")
            silenced = tuple(sorted(set().union(*(disabled[k] for k in reach))))
            if not silenced:
                continue
        for address in names[key]:
            if address in out:
                reason = f"{address} already claimed by group {out[address][0]}; value dropped"
                decide.reject(dn, settings.name_attribute, reason)
                continue
            out[address] = (dn, tuple(sorted(targets.items())), silenced)
    return out
