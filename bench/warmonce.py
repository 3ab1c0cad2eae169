"""A cron `--once` that resumes from the saved sync state, against a cold one and the baseline.

    python -m bench.warmonce [N] [--reps R] [--changes C] [--cold-code DIR]

One throwaway slapd with N generated users (bench.harness.site), every output configured.
Per repetition, interleaved: the shell baseline; a cold `--once` (empty state dir: the whole
directory by syncrepl); with `--cold-code DIR` also a cold `--once` of another source tree
(e.g. an export of main: its paged search); then C forwards changed and a warm `--once` of a
site kept across repetitions, and a warm `--once` with nothing changed. After each warm run
its text outputs must be byte for byte those of the cold run that follows it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import harness

TEXT = ("alias", "transport", "recipients", "sender_login", "disabled", "mail-passwords")


def texts(config: Path) -> dict[str, bytes]:
    maps = config.parent / "maps"
    return {name: (maps / name).read_bytes() for name in TEXT}


def once(config: Path, log: Path, *, code: Path | None = None) -> tuple[float, float]:
    argv = [harness.PY, "-m", "ldapsync", "-c", str(config), "--once"]
    if code is None:
        return harness.timed(argv, cwd=harness.REPO, log=log)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(code)
    try:
        return harness.timed(argv, cwd=code, log=log)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.warmonce")
    p.add_argument("n", nargs="?", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--changes", type=int, default=10)
    p.add_argument("--cold-code", type=Path, default=None, help="a source tree whose cold --once is timed too")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-warmonce-"))
    log = root / "bench.log"
    results: dict[str, list[tuple[float, float]]] = {}

    def add(what: str, sample: tuple[float, float]) -> None:
        results.setdefault(what, []).append(sample)
        print(f"  {what}: {sample[0]:.2f} s, {sample[1]:.0f} MiB", flush=True)

    try:
        with harness.site(args.n, root / "site") as s:
            print(f"{args.n} users loaded in {s.load_seconds:.0f} s", flush=True)
            base_dir = s.root / "baseline"
            base_dir.mkdir(exist_ok=True)
            baseline = [
                "sh",
                str(harness.BENCH / "baseline.sh"),
                s.slapd.uri,
                s.slapd.service_dn,
                str(s.slapd.service_password_file),
                s.slapd.users_dn,
                str(s.root / "static.lines"),
                str(base_dir / "alias"),
                str(s.postfix_dir),
            ]
            harness.timed(baseline, log=log)  # warm-up: slapd's and the page cache's first touch
            warm = s.config("warm", all_outputs=True)
            once(warm, log)  # the warm site's first run is cold: it saves the state the others resume from
            pool = harness.candidates(args.n)
            for rep in range(args.reps):
                print(f"repetition {rep + 1}", flush=True)
                add("baseline (shell)", harness.timed(baseline, log=log))
                start = rep * args.changes
                changes = [(i, f"warm{rep}-{i}@elsewhere.example") for i in pool[start : start + args.changes]]
                harness.modify_forwards(s, changes)
                add(f"warm --once, {args.changes} changes", once(warm, log))
                cold = s.config("cold", all_outputs=True)
                add("cold --once (this tree)", once(cold, log))
                if texts(warm) != texts(cold):
                    raise SystemExit("the warm run's outputs differ from the cold run's")
                if args.cold_code is not None:
                    other = s.config("cold-other", all_outputs=True)
                    add(f"cold --once ({args.cold_code})", once(other, log, code=args.cold_code))
                    if texts(other) != texts(cold):
                        raise SystemExit(f"the cold run of {args.cold_code} installs other outputs")
                add("warm --once, no change", once(warm, log))
    finally:
        print(f"log: {log}", file=sys.stderr)
    print(f"\n{args.n} users, all outputs, {args.reps} repetitions: median wall (min..max), peak RSS")
    for what, samples in results.items():
        walls = sorted(w for w, _ in samples)
        rss = max(r for _, r in samples)
        print(f"| {what} | {walls[len(walls) // 2]:.2f} s ({walls[0]:.2f}..{walls[-1]:.2f}) | {rss:.0f} MiB |")
    shutil.rmtree(root / "site", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
