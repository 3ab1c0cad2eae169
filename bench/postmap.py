"""`python -m bench.postmap`: a full `postmap` against an incremental update of a copy, per map type.

For each map type (hash, btree, lmdb, cdb) and size (default 100k and 1M lines of a virtual map):
the time of `postmap TYPE:map` from the text (what every install does today), and the time of
what an incremental install would do instead: copy the installed compiled map into the
staging directory, then `postmap -i -r` one changed line and `postmap -d` one removed key on
the copy (all it takes after a single-entry change). Also the compiled file's size. Medians
of --reps runs; the files live in a temporary directory on the same filesystem as /tmp.
Speed is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}


def write_map(path: Path, n: int) -> None:
    with path.open("w") as out:
        for i in range(n):
            out.write(f"user{i:07d}@example.org\tuser{i:07d}@elsewhere.example,user{i:07d}@two.example\n")


def timed(argv: list[str], stdin: str | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    return time.perf_counter() - t, proc


def measure(conf: Path, work: Path, map_type: str, n: int, reps: int) -> dict[str, str]:
    source = work / f"map-{n}"
    if not source.exists():
        write_map(source, n)
    compiled = source.with_name(source.name + SUFFIX[map_type])
    full: list[float] = []
    for _ in range(reps):
        compiled.unlink(missing_ok=True)
        took, proc = timed(["postmap", "-c", str(conf), f"{map_type}:{source}"])
        if proc.returncode:
            raise SystemExit(f"postmap {map_type}: {proc.stderr}")
        full.append(took)
    incremental: list[float] = []
    copy = work / "staged"
    staged = copy.with_name(copy.name + SUFFIX[map_type])
    note = ""
    for r in range(reps):
        staged.unlink(missing_ok=True)
        t = time.perf_counter()
        shutil.copyfile(compiled, staged)
        fd = os.open(staged, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        line = f"user{r:07d}@example.org\tuser{r:07d}@moved.example\n"
        add = subprocess.run(
            ["postmap", "-c", str(conf), "-i", "-r", f"{map_type}:{copy}"], input=line, capture_output=True, text=True
        )
        delete = subprocess.run(
            ["postmap", "-c", str(conf), "-d", f"user{n - 1 - r:07d}@example.org", f"{map_type}:{copy}"],
            capture_output=True,
            text=True,
        )
        took = time.perf_counter() - t
        if add.returncode or delete.returncode:
            note = (add.stderr or delete.stderr).strip().splitlines()[-1]
            break
        query = subprocess.run(
            ["postmap", "-c", str(conf), "-q", f"user{r:07d}@example.org", f"{map_type}:{copy}"],
            capture_output=True,
            text=True,
        )
        assert query.stdout.strip() == f"user{r:07d}@moved.example", query
        incremental.append(took)
    return {
        "full": f"{statistics.median(full):.3f} s",
        "copy + -i + -d": f"{statistics.median(incremental):.3f} s" if incremental else f"fails: {note}",
        "size": f"{compiled.stat().st_size / 2**20:.1f} MiB",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--types", nargs="+", default=list(SUFFIX))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    version = subprocess.run(["postconf", "-d", "mail_version"], capture_output=True, text=True).stdout.strip()
    print(f"{version}, load {os.getloadavg()}, nproc {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="bench-postmap-") as tmp:
        work = Path(tmp)
        conf = work / "conf"
        conf.mkdir()
        (conf / "main.cf").write_text("")
        os.utime(conf / "main.cf", (time.time() - 3600, time.time() - 3600))  # postfix waits on a fresh main.cf
        print("| lines | map type | full postmap | copy + postmap -i -r + postmap -d | compiled size |")
        print("|---:|---|---:|---:|---:|")
        for n in args.sizes:
            for map_type in args.types:
                row = measure(conf, work, map_type, n, args.reps)
                print(f"| {n:,} | {map_type} | {row['full']} | {row['copy + -i + -d']} | {row['size']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
