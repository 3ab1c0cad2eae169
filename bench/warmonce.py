"""A cron `--once` that resumes from the saved sync state, against a cold one and the baseline.

    python -m bench.warmonce [N] [--reps R] [--changes C] [--cold-code DIR]

One throwaway slapd with N generated users (bench.harness.site), every output configured.
Per repetition, interleaved: the shell baseline; C forwards changed and a warm `--once` of a
site kept across repetitions; a cold `--once` (empty state dir: the whole directory by
syncrepl); with `--cold-code DIR` also a cold `--once` of another source tree (e.g. an export
of main: its paged search); a warm `--once` with nothing changed. After each warm run its
text outputs must be byte for byte those of the cold run that follows it. Besides wall time
and peak RSS: slapd's CPU time during the run (/proc/PID/stat) and the bytes the sync search
brought (ldapsync's log line; a paged search logs none).
"""

from __future__ import annotations

import argparse
import json
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


Run = tuple[float, float, float, int | None]  # wall s, peak RSS MiB, slapd CPU s, bytes received


def slapd_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config(s: harness.Site, name: str) -> Path:
    """All outputs, info-level logs (the read's log line names the bytes received)."""
    path = s.config(name, all_outputs=True)
    path.write_text(path.read_text().replace("level: warning", "level: info"))
    return path


def once(s: harness.Site, config: Path, log: Path, *, code: Path | None = None) -> Run:
    argv = [harness.PY, "-m", "ldapsync", "-c", str(config), "--once"]
    start = log.stat().st_size if log.exists() else 0
    pid = s.slapd.pid
    assert pid is not None
    cpu = slapd_cpu(pid)
    old = os.environ.get("PYTHONPATH")
    if code is not None:
        os.environ["PYTHONPATH"] = str(code)
    try:
        wall, rss = harness.timed(argv, cwd=code or harness.REPO, log=log)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    cpu = slapd_cpu(pid) - cpu
    size = None
    with log.open("rb") as f:
        f.seek(start)
        for line in f.read().decode(errors="replace").splitlines():
            if line.startswith("{") and '"bytes"' in line:
                size = json.loads(line).get("bytes")
    return wall, rss, cpu, size


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.warmonce")
    p.add_argument("n", nargs="?", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--changes", type=int, default=10)
    p.add_argument("--cold-code", type=Path, default=None, help="a source tree whose cold --once is timed too")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-warmonce-"))
    log = root / "bench.log"
    results: dict[str, list[Run]] = {}

    def add(what: str, sample: Run) -> None:
        results.setdefault(what, []).append(sample)
        wall, rss, cpu, size = sample
        got = f", {size} bytes received" if size is not None else ""
        print(f"  {what}: {wall:.2f} s, {rss:.0f} MiB, slapd {cpu:.2f} s CPU{got}", flush=True)

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
            warm = config(s, "warm")
            once(s, warm, log)  # the warm site's first run is cold: it saves the state the others resume from
            pool = harness.candidates(args.n)
            for rep in range(args.reps):
                print(f"repetition {rep + 1}", flush=True)
                pid = s.slapd.pid
                assert pid is not None
                cpu = slapd_cpu(pid)
                wall, rss = harness.timed(baseline, log=log)
                add("baseline (shell)", (wall, rss, slapd_cpu(pid) - cpu, None))
                start = rep * args.changes
                changes = [(i, f"warm{rep}-{i}@elsewhere.example") for i in pool[start : start + args.changes]]
                harness.modify_forwards(s, changes)
                add(f"warm --once, {args.changes} changes", once(s, warm, log))
                cold = config(s, "cold")
                add("cold --once (this tree)", once(s, cold, log))
                if texts(warm) != texts(cold):
                    raise SystemExit("the warm run's outputs differ from the cold run's")
                if args.cold_code is not None:
                    other = config(s, "cold-other")
                    add(f"cold --once ({args.cold_code})", once(s, other, log, code=args.cold_code))
                    if texts(other) != texts(cold):
                        raise SystemExit(f"the cold run of {args.cold_code} installs other outputs")
                add("warm --once, no change", once(s, warm, log))
    finally:
        print(f"log: {log}", file=sys.stderr)
    print(f"\n{args.n} users, all outputs, {args.reps} repetitions: median (min..max)")
    print("| run | wall | peak RSS | slapd CPU | bytes received |\n|---|---|---|---|---|")
    for what, samples in results.items():
        walls = sorted(w for w, _, _, _ in samples)
        cpus = sorted(c for _, _, c, _ in samples)
        rss = max(r for _, r, _, _ in samples)
        sizes = sorted({b for _, _, _, b in samples if b is not None})
        size = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}..{sizes[-1]:,}" if sizes else "-"
        mid = len(walls) // 2
        print(
            f"| {what} | {walls[mid]:.2f} s ({walls[0]:.2f}..{walls[-1]:.2f}) | {rss:.0f} MiB "
            f"| {cpus[mid]:.2f} s | {size} |"
        )
    shutil.rmtree(root / "site", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
