"""Alias loops: Postfix defers mail caught in one, so the LDAP edges that close it are dropped.

Only the edges inside the cycle go: a forward `k -> y, k@elsewhere` with `y -> k` keeps
`k@elsewhere`, so the copy that leaves the loop is still delivered. A loop made of static
entries only is the admin's error and fails the sync (ConfigError naming the keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ldapsync.errors import ConfigError
from ldapsync.routing.claims import Tables
from ldapsync.routing.decisions import Decisions
from ldapsync.routing.types import Rule


def break_loops(t: Tables, static_file: object, fwd_attr: str, alias_attr: str, decide: Decisions) -> None:
    aliases, forwards = t.aliases, t.forwards
    while True:
        merged = {**forwards, **aliases}
        # Only addresses that route to another known address can be on a cycle; most
        # forwards go outside, so the graph searched is small.
        routes = {k: [x for x in v if x != k and x in merged] for k, v in merged.items()}
        routes = {k: v for k, v in routes.items() if v}
        cycles = [c for c in strongly_connected(routes) if len(c) > 1]
        if not cycles:
            break
        for cycle in cycles:
            members = sorted(cycle)
            inside = frozenset(cycle)
            from_ldap = [a for a in members if a not in t.static_keys]
            if not from_ldap:
                keys = ", ".join(t.static_keys[a] for a in members)
                raise ConfigError(f"alias loop: {' -> '.join(members)}", file=str(static_file), key=keys)
            dns = sorted({(t.owner_dn if a in forwards else t.alias_dn)[a] for a in from_ldap})
            for a in from_ldap:
                is_forward = a in forwards
                table = forwards if is_forward else aliases
                dn = (t.owner_dn if is_forward else t.alias_dn)[a]
                cut = [x for x in table[a] if x in inside and x != a]
                kept = [x for x in table[a] if x not in cut]
                others = [d for d in dns if d != dn]
                kind = "forward" if is_forward else "alias"
                reason = f"{kind} loop through {', '.join(members)}"
                if others:
                    reason += f" (with {'; '.join(others)})"
                reason += f"; {kind} to {', '.join(cut)} dropped"
                if kept:
                    reason += f", {', '.join(kept)} kept"
                decide.reject(dn, fwd_attr if is_forward else alias_attr, reason, Rule.LOOP_BROKEN, a)
                if kept:
                    table[a] = kept
                else:
                    del table[a]
    for address in [a for a in t.group_dn if a not in aliases]:  # a group edge closed a loop
        del t.group_dn[address]


def strongly_connected(routes: Mapping[str, Iterable[str]]) -> list[list[str]]:
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
