"""Bytes written to hold a change and save the agent's follow state, at N entries.

    python -m bench.held [N]

Counts what the process passes to write(2) (/proc/self/io wchar) while a held change is
recorded (State.hold) and the follow state saved for it (mirror.save_follow_state), the two
writes an agent makes when a guard holds a change; and lists the files left in the state dir.
Works with code that returns no held id (the follow state then writes its own snapshot copy),
so the same script measures before and after.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import generate
from ldapsync import config as config_mod
from ldapsync import mirror
from ldapsync.directory import Entry, Snapshot
from ldapsync.state import State


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar")


def directory(n: int) -> Snapshot:
    entries = []
    for i in range(n):
        uid = generate.uid(i)
        attrs = {
            "uid": (uid,),
            "cn": (f"{generate.FIRST[i % len(generate.FIRST)]} {generate.LAST[i % len(generate.LAST)]}",),
            "mail": (f"{uid}@{generate.DOMAIN}",),
            "userPassword": (generate.HASHES[i % len(generate.HASHES)],),
            "objectClass": ("inetOrgPerson", "posixAccount"),
        }
        if i % 2:
            attrs["emailForward"] = (f"{uid}@elsewhere.example",)
        entries.append(Entry(f"uid={uid},{generate.USERS_DN}", attrs, f"{i:08x}-0000-4000-8000-000000000000"))
    return Snapshot(tuple(sorted(entries, key=lambda e: e.dn)), "ldap")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    n = int(args[0]) if args else 10_000
    snapshot = directory(n)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        doc = {
            "domain": generate.DOMAIN,
            "source": {"ldap": {"uri": "ldap://127.0.0.1:1", "base_dn": generate.USERS_DN}},
            "state_dir": str(root / "state"),
            "exporters": [{"kind": "dovecot-passwd", "path": str(root / "passwd")}],
        }
        cfg = config_mod.parse(doc, root / "ldapsync.yaml")
        state = State(cfg.state_dir)
        state.ensure()
        snapshot.digest()  # hashing is not writing: out of the measurement
        before = wchar()
        held_id = state.hold(snapshot, {"reason": "bench", "source": "ldap", "counts": {}})
        mirror.save_follow_state(state, cfg, snapshot, b"cookie", generation=held_id)
        written = wchar() - before
        files = {str(p.relative_to(state.root)): p.stat().st_size for p in state.root.rglob("*") if p.is_file()}
        print(f"{n} entries, directory JSON {len(snapshot.to_json())} bytes: {written} bytes written")
        for name, size in sorted(files.items()):
            print(f"  {name}: {size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
