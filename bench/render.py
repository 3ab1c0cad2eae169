"""`python -m bench.render`: what one directory change costs in-process, per pipeline stage.

Builds a Pipeline from an LDIF config (fixtures/ldif/base.ldif + bench/generate.py's users,
two alias domains, all eight built-in outputs as hash maps), installs once, then applies
single-entry changes one after the other (a new forward, a new password, a disabled account,
each then undone) and times per change: Pipeline.render (the model: the incremental engine's
update, or the model module's build in an older tree without one; then the outputs), the rest of Pipeline.plan
(diff against the installed files, guards, generation id) and Pipeline.apply (commit.install: stage,
postmap, hooks, rename; then the generation and status). The snapshot's digest is kept as a
running sum, as the agent's mirror does, so the O(n) digest is not in the numbers.

Runs against whichever ldapsync is first on sys.path, so the same script measures a before
and an after tree: `PYTHONPATH=/path/to/tree python /path/to/tree/bench/render.py`.
Speed is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench import generate
from ldapsync import commit
from ldapsync import config as config_mod
from ldapsync.directory import Entry, EntrySum, Snapshot
from ldapsync.sync import Pipeline

REPO = Path(__file__).resolve().parent.parent
BASE_LDIF = REPO / "fixtures" / "ldif" / "base.ldif"
MAPS = ("virtual", "transport", "recipients", "sender_login", "access", "virtual_mailbox")


def write_config(work: Path, n: int) -> Path:
    d = generate.write(n, work / "directory")
    ldif = work / "directory.ldif"
    with ldif.open("wb") as out:
        out.write(BASE_LDIF.read_bytes().rstrip(b"\n") + b"\n\n")
        with d.ldif.open("rb") as users:
            shutil.copyfileobj(users, out)
    out_dir = work / "out"
    exporters: list[dict[str, Any]] = [
        {"kind": "postfix-virtual", "name": "virtual", "include": ["aliases", "forwards"]},
        {"kind": "postfix-transport", "name": "transport", "nexthop": "smtp:[srs.example.org]"},
        {"kind": "postfix-recipients", "name": "recipients"},
        {"kind": "postfix-sender-login", "name": "sender_login"},
        {"kind": "postfix-access", "name": "access"},
        {"kind": "postfix-virtual-mailbox", "name": "virtual_mailbox"},
        {"kind": "dovecot-passwd", "name": "passwd", "mode": "0640"},
        {"kind": "dovecot-userdb", "name": "userdb", "address_keys": True, "fields": {"quota_rule": "*:storage=1G"}},
    ]
    for e in exporters:
        e["path"] = str(out_dir / e["name"])
        if e["kind"].startswith("postfix-"):
            e["map_type"] = "hash"
    doc = {
        "domain": generate.DOMAIN,
        "domain_aliases": ["host1.example.org", "example.net"],
        "source": {"ldif": {"path": str(ldif), "base_dn": generate.USERS_DN}},
        "schema": "ud-ldap",
        "static": str(d.static_yaml),
        "state_dir": str(work / "state"),
        "mailbox": {"home_root": "/var/vmail", "uid": 5000, "gid": 5000},
        "keep_generations": 2,
        "exporters": exporters,
    }
    path = work / "ldapsync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def edits(i: int) -> list[tuple[str, Callable[[dict[str, tuple[str, ...]]], dict[str, tuple[str, ...]]]]]:
    """Changes to user i (active, no forward) that a directory sees every day; each is undone after."""
    name = generate.uid(i)

    def set_attr(attr: str, *values: str) -> Callable[[dict[str, tuple[str, ...]]], dict[str, tuple[str, ...]]]:
        return lambda a: {**a, attr: tuple(values)} if values else {k: v for k, v in a.items() if k != attr}

    return [
        ("new forward", set_attr("emailforward", f"{name}@moved.example")),
        ("password", set_attr("mailpassword", generate.HASHES[(i * 7 + 1) % len(generate.HASHES)])),
        ("disabled", set_attr("maildisablemessage", "gone")),
    ]


def run(n: int, changes: int, work: Path) -> dict[str, list[float]]:
    cfg = config_mod.load(write_config(work, n))
    pipeline = Pipeline(cfg)
    snap = pipeline.read_source()
    snap = Snapshot.with_sum(snap.entries, snap.source, snap.rejections, EntrySum.of(snap.entries))
    started = time.perf_counter()
    result = pipeline.run(snapshot=snap)
    print(f"  {n} users: first sync {time.perf_counter() - started:.2f} s ({result.status})", flush=True)
    sizes = {name: sum(1 for _ in (work / "out" / name).open("rb")) for name in (*MAPS, "passwd", "userdb")}
    print("  lines: " + ", ".join(f"{k} {v}" for k, v in sizes.items()), flush=True)

    stages = ("model", "outputs", "render", "plan (rest)", "plan")
    stages += ("install", "apply (rest)", "apply")
    timings: dict[str, list[float]] = {stage: [] for stage in stages}
    spent = {"render": 0.0, "model": 0.0, "install": 0.0}

    def timer(name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t

        return timed

    pipeline.render = timer("render", pipeline.render)  # type: ignore[method-assign]
    engine = getattr(pipeline, "engine", None)
    if engine is not None:
        engine.update = timer("model", engine.update)
    else:
        old_model: Any = importlib.import_module("ldapsync.model")  # an older tree: no engine, no routing package
        old_model.build = timer("model", old_model.build)
    commit.install = timer("install", commit.install)  # type: ignore[assignment]
    index = {e.dn: k for k, e in enumerate(snap.entries)}
    step = max(1, n // (changes + 1)) // 100 * 100 or 100
    # i % 100 == 22: active, local, no forward, and no one forwards to it (disabling it refuses only it)
    users = [i for i in range(122, n, step)][:changes]
    for count, i in enumerate(users):
        k = index[f"uid={generate.uid(i)},{generate.USERS_DN}"]
        original = dict(snap.entries[k].attributes)
        for label, edit in edits(i):
            for undo in (False, True):
                old = snap.entries[k]
                new = Entry(old.dn, original if undo else edit(original), old.uuid)
                entries = (*snap.entries[:k], new, *snap.entries[k + 1 :])
                snap = Snapshot.with_sum(entries, snap.source, snap.rejections, snap.entry_sum.removed(old).added(new))
                spent.update(dict.fromkeys(spent, 0.0))
                t0 = time.perf_counter()
                plan = pipeline.plan(snap)
                t1 = time.perf_counter()
                result = pipeline.apply(plan)
                t2 = time.perf_counter()
                if result.status != "installed":
                    raise SystemExit(f"{label} of user {i}: {result.status} {result.held_reason or ''}")
                for stage, took in (
                    ("model", spent["model"]),
                    ("outputs", spent["render"] - spent["model"]),
                    ("render", spent["render"]),
                    ("plan (rest)", t1 - t0 - spent["render"]),
                    ("plan", t1 - t0),
                    ("install", spent["install"]),
                    ("apply (rest)", t2 - t1 - spent["install"]),
                    ("apply", t2 - t1),
                ):
                    timings[stage].append(took)
        print(f"  change {count + 1}/{len(users)} done", file=sys.stderr, flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--changes", type=int, default=5, help="users changed (each: 3 edits and their undo)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    import ldapsync

    print(f"ldapsync from {Path(ldapsync.__file__).parent}, python {sys.version.split()[0]}, load {os.getloadavg()}")
    for n in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-render-{n}-"))
        try:
            timings = run(n, args.changes, work)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        print(f"{n} users, {len(timings['plan'])} single-entry changes (seconds: median, min-max):")
        for stage, values in timings.items():
            print(f"  {stage:12} {statistics.median(values):.4f}  {min(values):.4f}-{max(values):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
