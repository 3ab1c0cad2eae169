"""Dead targets: a target in our domains that accepts no mail is dropped, wherever it comes from.

Static aliases and forwards, LDAP forwards, LDAP aliases and group members all route to
addresses; one that is in one of our domains (the domain, its alias domains, the hosted
domains and theirs) but is disabled, retired or unknown would make Postfix accept mail and
then bounce it. Such a target is dropped with a warning naming the source (static file and
key, or DN and attribute) and the target. An address left with no target is not accepted
at all (no recipients, virtual or transport line); when a dropped target was a disabled
account, the address is rejected at RCPT with that account's message instead. This can
cascade (an alias to an account whose only forward is dead), so it runs to a fixpoint; it
runs after loops are broken, because breaking a loop can leave an address without targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ldapsync.routing.claims import Tables
from ldapsync.routing.decisions import Decisions
from ldapsync.routing.types import BuildReport, Rule, Settings


def drop_dead_targets(
    t: Tables,
    settings: Settings,
    canon: Mapping[str, str],
    static_file: Path | None,
    report: BuildReport,
    decide: Decisions,
) -> None:
    """Drop every dead target in our domains from `t`, then every address left without one."""
    aliases, forwards, users = t.aliases, t.forwards, t.users
    attributes = settings.attributes
    groups = settings.groups
    group_attr = groups.member_attributes[0] if groups is not None and groups.member_attributes else ""
    removed: set[str] = set()
    dropped: dict[str, list[str]] = {}  # address -> its dropped targets

    def alive(x: str) -> bool:
        return x in users or x in aliases or x in forwards

    def state(x: str) -> str:
        if x in t.disabled:
            return "disabled"
        if x in t.retired:
            return "retired"
        if x in removed:
            return "not accepted (no target left)"
        return "unknown"

    def source(a: str, x: str) -> tuple[str | None, str, str]:
        """(static key, or None and the DN and attribute) that routes `a` to `x`."""
        key = t.static_keys.get(a)
        if key is not None:
            return key, "", ""
        if a in forwards:
            return None, t.owner_dn[a], attributes.forward or ""
        if a in t.group_dn:
            return None, t.group_dn[a], t.member_attr.get(a, {}).get(x, group_attr)
        return None, t.alias_dn[a], t.alias_source.get(a, attributes.alias or "")

    def tell(where: tuple[str | None, str, str], a: str, reason: str, rule: Rule) -> None:
        key, dn, attr = where
        if key is not None:
            report.warnings.append(f"{static_file}: {key}: {reason}")
            decide.event(rule, a, f"{static_file}: {key}", "", reason)
        else:
            decide.reject(dn, attr, reason, rule, a)

    # Who routes to each target in our domains (targets are canonical: the domain is a key of canon).
    pointing: dict[str, list[str]] = {}
    for table in (forwards, aliases):
        for a, targets in table.items():
            for x in targets:
                if x != a and x.rpartition("@")[2] in canon:
                    pointing.setdefault(x, []).append(a)
    todo = sorted(x for x in pointing if not alive(x))
    while todo:
        x = todo.pop()
        for a in sorted(pointing.get(x, ())):
            table = forwards if a in forwards else aliases
            left = table.get(a)
            if left is None or x not in left:
                continue
            where = source(a, x)
            left.remove(x)
            dropped.setdefault(a, []).append(x)
            tell(where, a, f"target {x} is {state(x)}; dropped", Rule.TARGET_DROPPED)
            if left:
                continue
            del table[a]
            users.pop(a, None)
            t.group_dn.pop(a, None)
            removed.add(a)
            verdict = f"{a} has no target left; not accepted"
            disabled = sorted(d for d in dropped[a] if d in t.disabled)
            if disabled and a not in t.disabled:
                t.disabled[a] = t.disabled[disabled[0]]
                verdict += f", rejected with the message of {disabled[0]}"
            tell(where, a, verdict, Rule.NO_TARGET)
            todo.append(a)
