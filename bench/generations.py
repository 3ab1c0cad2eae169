"""`python -m bench.generations --users 100000 --changes 5`: what one change costs the agent, by phase.

In-process, no slapd: bench/generate.py's directory is read from LDIF into an agent's Mirror
(entries get entryUUIDs, the config names an LDAP source that is never contacted), a first
sync installs everything, then each change modifies one user's forward in the Mirror and runs
the agent's own sync (Agent._sync: snapshot, plan, install, generation, follow state). Printed:
medians per phase, the generation record without an in-memory predecessor (a fresh State, as
`--once` or `approve` see it), the restart (follow state loaded into a new Mirror), and the
state directory's size. Postfix's postmap must be installed.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import generate
from ldapsync import agent as agent_mod
from ldapsync import config as config_mod
from ldapsync import ldifsource, mirror, state, sync, watch
from ldapsync.config import LdifSource
from ldapsync.directory import Attributes, Entry, Snapshot

try:
    from ldapsync.state import store
except ImportError:  # before the store existed (to measure the previous version)
    store = None  # type: ignore[assignment]

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - t0)

    return wrapper


def instrument() -> None:
    """Wrap the phases of Agent._sync (class and module attributes, so every caller sees them)."""
    sync.Pipeline.plan = timed("plan (render, diff, guard)", sync.Pipeline.plan)  # type: ignore[method-assign]
    sync.Pipeline._commit = timed("install (stage, postmap, rename)", sync.Pipeline._commit)  # type: ignore[method-assign]
    state.State.record = timed("generation record", state.State.record)  # type: ignore[method-assign]
    watch.save_follow_state = timed("follow state", watch.save_follow_state)
    mirror.Mirror.snapshot = timed("mirror snapshot", mirror.Mirror.snapshot)  # type: ignore[method-assign]
    agent_mod.Agent._sync = timed("agent sync, total", agent_mod.Agent._sync)  # type: ignore[method-assign]


def write_config(root: Path, data: generate.Directory) -> Path:
    postfix = root / "postfix"
    postfix.mkdir()
    (postfix / "main.cf").touch()
    (root / "maps").mkdir()
    text = f"""domain: {generate.DOMAIN}
source:
  ldap:
    uri: ldap://127.0.0.1:1
    base_dn: {generate.USERS_DN}
schema: ud-ldap
static: {data.static_yaml}
state_dir: {root / "state"}
safety:
  max_deletions: 1000000
  max_deletion_ratio: 1.0
  max_changes: 1000000
  max_change_ratio: 1.0
postfix:
  config_dir: {postfix}
log:
  level: warning
exporters:
  - kind: postfix-virtual
    name: alias
    path: maps/alias
    include: [aliases, forwards]
  - kind: postfix-transport
    path: maps/transport
    nexthop: "smtp:[srs.example.org]"
  - kind: postfix-recipients
    path: maps/recipients
  - kind: postfix-sender-login
    path: maps/sender_login
  - kind: postfix-access
    path: maps/disabled
  - kind: dovecot-passwd
    path: maps/mail-passwords
"""
    path = root / "ldapsync.yaml"
    path.write_text(text)
    return path


def du(path: Path) -> int:
    seen: set[int] = set()
    total = 0
    for p in path.rglob("*"):
        st = p.lstat()
        if p.is_file() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.generations", description=__doc__)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument("--diff-only", type=int, metavar="N", help="only time the diff of N synthetic entries")
    args = ap.parse_args(argv)
    if args.diff_only:
        diff_costs(args.diff_only)
        return 0
    root = Path(args.dir or tempfile.mkdtemp(prefix="ldapsync-bench-gen-"))
    root.mkdir(parents=True, exist_ok=True)
    data = generate.write(args.users, root / "data")
    cfg = config_mod.load(write_config(root, data))
    os.chdir(root)
    read = ldifsource.read(LdifSource(data.ldif, generate.USERS_DN), cfg.routing.attributes)
    entries = tuple(Entry(e.dn, e.attributes, f"uuid-{i:08d}") for i, e in enumerate(read.entries))
    snapshot = Snapshot(entries, "ldap:ldap://127.0.0.1:1")

    instrument()
    agent = agent_mod.Agent(cfg)
    agent.mirror.load(snapshot, b"cookie-0")
    t0 = time.perf_counter()
    agent._sync(False)
    print(f"{args.users} users; first sync (everything installed): {time.perf_counter() - t0:.3f} s")
    TIMES.clear()

    wanted = cfg.routing.attributes.ldap_attributes()
    step = max(1, len(entries) // (args.changes + 1))
    for n in range(args.changes):
        e = entries[(n + 1) * step]
        raw: dict[str, list[bytes]] = {k: [v.encode() for v in vs] for k, vs in e.attributes.items()}
        raw["emailForward"] = [f"changed-{n}@bench.example".encode()]
        assert e.uuid is not None
        agent.mirror.upsert(e.uuid, e.dn, raw, wanted)
        agent.mirror.set_cookie(f"cookie-{n + 1}".encode())
        agent._sync(False)
        assert agent.last_result is not None and agent.last_result.status == "installed", agent.last_result

    print(f"one change -> installed, medians of {args.changes} (seconds):")
    for name, values in TIMES.items():
        print(f"  {name:<36} {statistics.median(values):8.4f}   (min {min(values):.4f}, max {max(values):.4f})")

    # a generation recorded by a process that has not recorded one before (--once, approve)
    TIMES.clear()
    e = entries[1]
    assert e.uuid is not None
    raw = {k: [v.encode() for v in vs] for k, vs in e.attributes.items()}
    raw["emailForward"] = [b"fresh-process@bench.example"]
    agent.mirror.upsert(e.uuid, e.dn, raw, wanted)
    snap, _ = agent.mirror.snapshot()
    fresh = sync.Pipeline(cfg)
    result = fresh.run(snapshot=snap)
    assert result.status == "installed", result
    print(f"  {'generation record, fresh State':<36} {TIMES['generation record'][0]:8.4f}")

    # restart: the follow state into a new mirror
    t0 = time.perf_counter()
    loaded = watch.load_follow_state(state.State(cfg.state_dir), cfg)
    t1 = time.perf_counter()
    assert loaded is not None
    m = mirror.Mirror()
    m.load(*loaded)
    t2 = time.perf_counter()
    print(f"  {'restart: load follow state':<36} {t1 - t0:8.4f}")
    print(f"  {'restart: mirror.load':<36} {t2 - t1:8.4f}")
    print(f"state dir: {du(cfg.state_dir) / 2**20:.1f} MiB on disk; {root}")
    if store is not None:
        diff_costs(len(entries))
    return 0


def diff_costs(n: int) -> None:
    """What deciding the changed entries costs: shared entries (the agent) and equal copies (a refresh)."""
    assert store is not None
    entries = tuple(
        Entry(f"uid=u{i:07d},{generate.USERS_DN}", Attributes.of({"uid": (f"u{i}",), "mail": (f"u{i}@x",)}), f"k{i}")
        for i in range(n)
    )
    changed = list(entries)
    changed[n // 2] = Entry(entries[n // 2].dn, Attributes.of({"uid": ("other",)}), entries[n // 2].uuid)
    copies = [Entry(e.dn, Attributes.of(dict(e.attributes)), e.uuid) for e in changed]
    for label, new in (("shared entries, one changed", changed), ("equal copies, one changed", copies)):
        t0 = time.perf_counter()
        found = store.diff(entries, new)
        assert len(found) == 1
        print(f"  diff of {n} entries, {label:<28} {time.perf_counter() - t0:8.4f} s")


if __name__ == "__main__":
    raise SystemExit(main())
