"""ldapsync benchmarks: full sync vs. the shell baseline, and the live agent.

    python -m bench                       # 1k, 10k, 100k users, 3 repetitions
    python -m bench --sizes 1000 --reps 1 # quick run
    python -m bench --only restart,rss,warm,cold  # some parts only (the baseline always runs)
    python -m bench --profile             # also cProfile `--once` and one agent rebuild at the largest size

Every size gets its own throwaway slapd (ldapsync/testing/slapd.py) loaded with `slapadd -q`; ldapsync
binds as the non-root service account. Times are wall clock; peak RSS is the largest
process's ru_maxrss from wait4() (for a pipeline: its largest member). The baseline runs in
the same process loop, interleaved with ldapsync, so machine load hits both alike, and every
ratio is to the baseline (or to `--once`) measured in the same run. Rows with a target say
whether it is met or by how much it is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bench import generate  # noqa: E402
from ldapsync.testing.slapd import BASE_LDIF, DEFAULT_DB_MAX_SIZE, Slapd  # noqa: E402

AGENT_PY = REPO / "ldapsync" / "agent.py"
PY = sys.executable
POSTMAP = shutil.which("postmap", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])) or "postmap"


# ------------------------------------------------------------------------------ helpers
@dataclass
class Sample:
    """Repeated measurements of one metric."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self, fmt: str) -> str:
        if len(self.values) < 2:
            return "n=1"
        return f"{fmt.format(min(self.values))}-{fmt.format(max(self.values))} (n={len(self.values)})"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 50 samples is the maximum)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
    return ordered[k]


@dataclass(frozen=True, slots=True)
class Target:
    """A limit at 100k and at 1M users; smaller directories are held to 100k's, larger to 1M's."""

    at_100k: float
    at_1m: float
    unit: str  # appended to the number: "x baseline", " MiB", " s"

    def limit(self, n: int) -> tuple[float, str]:
        """(limit, its label) for a directory of n users."""
        value = self.at_100k if n <= 100_000 else self.at_1m
        label = f"≤ {value:g}{self.unit}"
        if self.at_100k != self.at_1m and n not in (100_000, 1_000_000):
            label += " (100k's)" if n <= 100_000 else " (1M's)"
        return value, label

    def judge(self, n: int, value: float) -> tuple[str, str]:
        """(target cell, verdict cell): "met", or "missed by N.Nx" (value / limit)."""
        limit, label = self.limit(n)
        return label, "met" if value <= limit else f"**missed by {value / limit:.1f}x**"


# The targets of the state work (docs/performance.md), and the earlier ones still in force.
VIRTUAL_ONCE_TARGET = Target(2.0, 2.0, "x baseline")
COLD_ONCE_TARGET = Target(4.0, 4.0, "x baseline")
WARM_ONCE_TARGET = Target(1.0, 0.3, "x baseline")
RESTART_TARGET = Target(0.5, 0.3, "x baseline")
ANON_RSS_TARGET = Target(120.0, 500.0, " MiB")
COLD_START_TARGET = Target(1.3, 1.3, "x `--once` all outputs")
PROPAGATION_P99_TARGET = Target(0.4, 2.0, " s")

WARM_CHANGES = 10  # changes in LDAP between two `--once` runs on one state dir

# What `--only` selects (the baseline always runs: every ratio needs it).
PARTS = {
    "cold": "`--once` from an empty state dir: virtual map only and all outputs, maps compared with the baseline's",
    "warm": f"`--once` again on the cold run's state dir: 0 changes, then {WARM_CHANGES} changes since",
    "start": "agent cold start: empty state -> installed",
    "propagation": "single changes -> installed, default debounce and debounce 0",
    "burst": "1,000 modifications in one ldapmodify -> installed, and the rebuilds",
    "rss": "agent RSS, anonymous (RssAnon) and total, steady and peak, after start/burst and after a restart",
    "idle": "agent idle CPU",
    "restart": "agent SIGTERM after a sync, one change while stopped, start -> the change installed",
}
AGENT_PARTS = frozenset({"start", "propagation", "burst", "rss", "idle", "restart"})


def parse_parts(text: str) -> frozenset[str]:
    """`--only cold,warm`: the named parts; an unknown name is an error naming the flag."""
    names = frozenset(x.strip() for x in text.split(",") if x.strip())
    unknown = sorted(names - PARTS.keys())
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}"
        )
    return names


def timed(argv: Sequence[str], *, cwd: Path | None = None, log: Path | None = None) -> tuple[float, float]:
    """Run a command; (wall seconds, peak RSS MiB of its largest process). Raises on failure."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT if log else out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log else ""
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}\n{tail}")
    return wall, usage.ru_maxrss / 1024


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"

    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"

    import ldap3
    import pyasn1

    slapd = shutil.which("slapd", path="/usr/sbin:/usr/local/sbin") or "slapd"
    return {
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "ram": mem,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "ldap3": ldap3.__version__,
        "pyasn1": pyasn1.__version__,
        "slapd": version([slapd, "-VV"]).replace("@(#) $", "").strip(" $"),
        "postfix": _postfix_version(),
        "git": subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip(),
    }


def _postfix_version() -> str:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "main.cf").touch()
        p = subprocess.run(["postconf", "-c", d, "-d", "-h", "mail_version"], capture_output=True, text=True)
        return p.stdout.strip() or "?"


# ------------------------------------------------------------------------------ fixture
@dataclass
class Site:
    """One benchmark directory: slapd, generated data, postfix config dir."""

    n: int
    root: Path
    slapd: Slapd
    data: generate.Directory
    load_seconds: float
    postfix_dir: Path

    def config(
        self, name: str, *, all_outputs: bool, debounce: float | None = None, reload_log: Path | None = None
    ) -> Path:
        """A config file with its own state/output dirs (removed first: an empty start)."""
        base = self.root / name
        shutil.rmtree(base, ignore_errors=True)
        (base / "maps").mkdir(parents=True)
        exporters = [
            "  - kind: postfix-virtual\n    name: alias\n    path: maps/alias\n    map_type: hash\n"
            "    include: [aliases, forwards]"
        ]
        if all_outputs:
            exporters += [
                '  - kind: postfix-transport\n    path: maps/transport\n    nexthop: "smtp:[srs.example.org]"',
                "  - kind: postfix-recipients\n    path: maps/recipients",
                "  - kind: postfix-sender-login\n    path: maps/sender_login",
                "  - kind: postfix-access\n    path: maps/disabled",
                '  - kind: dovecot-passwd\n    path: maps/mail-passwords\n    mode: "0640"',
            ]
        text = [
            f"domain: {generate.DOMAIN}",
            "source:",
            "  ldap:",
            f"    uri: {self.slapd.uri}",
            f"    base_dn: {self.slapd.users_dn}",
            f"    bind_dn: {self.slapd.service_dn}",
            f"    bind_password_file: {self.slapd.service_password_file}",
            "schema: ud-ldap",
            f"static: {self.root / 'static.yaml'}",
            "state_dir: state",
            "safety:\n  max_deletions: 1000000\n  max_deletion_ratio: 1.0",
            "  max_changes: 1000000\n  max_change_ratio: 1.0",
            f"postfix:\n  config_dir: {self.postfix_dir}",
            f"log:\n  level: {'info' if debounce is not None or reload_log else 'warning'}\n  format: json",
            "exporters:",
            *exporters,
        ]
        if debounce is not None:
            text.append(f"agent:\n  debounce: {debounce}")
        if reload_log is not None:
            text.append(f"hooks:\n  reload:\n    - [sh, -c, 'echo reload >> {reload_log}']")
        path = base / "ldapsync.yaml"
        path.write_text("\n".join(text) + "\n")
        return path

    def map_path(self, config: Path) -> Path:
        return config.parent / "maps" / "alias"

    @property
    def baseline_map(self) -> Path:
        return self.root / "baseline" / "alias"

    def baseline(self, log: Path) -> tuple[float, float]:
        """One run of bench/baseline.sh into an empty directory: (wall seconds, peak RSS MiB)."""
        out = self.baseline_map.parent
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        argv = [
            "sh",
            str(BENCH / "baseline.sh"),
            self.slapd.uri,
            self.slapd.service_dn,
            str(self.slapd.service_password_file),
            self.slapd.users_dn,
            str(self.root / "static.lines"),
            str(self.baseline_map),
            str(self.postfix_dir),
        ]
        return timed(argv, log=log)


def db_max_size(n: int) -> int:
    """slapd's mdb map size for n users: ~1.2 KiB each once loaded, 4 KiB leaves room for the
    copy-on-write pages of the agent runs' modifications (the file is sparse: only used pages
    take disk)."""
    return max(DEFAULT_DB_MAX_SIZE, n * 4096)


@contextlib.contextmanager
def site(n: int, root: Path, sessionlog: int | None = None) -> Iterator[Site]:
    root.mkdir(parents=True, exist_ok=True)
    data = generate.write(n, root)
    postfix_dir = root / "postfix"
    postfix_dir.mkdir(exist_ok=True)
    (postfix_dir / "main.cf").touch()
    t0 = time.perf_counter()
    slapd = Slapd(
        root / "slapd",
        ldif_files=[BASE_LDIF, data.ldif],
        db_max_size=db_max_size(n),
        load_timeout=60 * scale(n) * 5,
        sessionlog=sessionlog,
    )
    load = time.perf_counter() - t0
    with slapd:
        yield Site(n, root, slapd, data, load, postfix_dir)


# ------------------------------------------------------------------------------ (1) full sync
@dataclass
class FullSync:
    baseline_wall: Sample = field(default_factory=Sample)
    baseline_rss: Sample = field(default_factory=Sample)
    alias_wall: Sample = field(default_factory=Sample)
    alias_rss: Sample = field(default_factory=Sample)
    all_wall: Sample = field(default_factory=Sample)
    all_rss: Sample = field(default_factory=Sample)
    warm0_wall: Sample = field(default_factory=Sample)
    warm_wall: Sample = field(default_factory=Sample)
    warm_rss: Sample = field(default_factory=Sample)
    warm_check: str = ""
    equivalent: str = "?"


def record_baseline(s: Site, r: FullSync, log: Path) -> None:
    """A baseline run into the size's pooled sample: it runs right before each timed ldapsync
    run (cold, warm, restart), so the load at that moment weighs on both, and its median is
    the denominator of every ratio of that size."""
    wall, rss = s.baseline(log)
    r.baseline_wall.add(wall)
    r.baseline_rss.add(rss)


def full_sync(s: Site, reps: int, parts: frozenset[str], log: Path) -> FullSync:
    """The baseline and, with part "cold", `--once` from an empty state dir (virtual map; all
    outputs), interleaved rep by rep; then, with part "warm", `--once` again on the state the
    last cold all-outputs run left (warm_once)."""
    r = FullSync()
    cold = "cold" in parts
    s.baseline(log)  # warm-up (untimed): slapd's and the page cache's first touch
    if cold or "warm" in parts:
        timed([PY, "-m", "ldapsync", "-c", str(s.config("warm-up", all_outputs=False)), "--once"], cwd=REPO, log=log)
    ours = None
    for _ in range(reps):
        record_baseline(s, r, log)
        if not cold:
            continue
        cfg = s.config("once-alias", all_outputs=False)
        wall, rss = timed([PY, "-m", "ldapsync", "-c", str(cfg), "--once"], cwd=REPO, log=log)
        r.alias_wall.add(wall)
        r.alias_rss.add(rss)
        ours = s.map_path(cfg).read_text()
        record_baseline(s, r, log)
        cfg_all = s.config("once-all", all_outputs=True)
        wall, rss = timed([PY, "-m", "ldapsync", "-c", str(cfg_all), "--once"], cwd=REPO, log=log)
        r.all_wall.add(wall)
        r.all_rss.add(rss)
    if ours is None:
        r.equivalent = "not run (part cold not selected)"
    else:
        theirs = sorted(_sorted_targets(line) for line in s.baseline_map.read_text().splitlines())
        mine = ours.splitlines()
        if mine == theirs == s.data.expected_virtual.read_text().splitlines():
            r.equivalent = f"yes ({len(mine)} lines, identical)"
        else:
            only_b = len(set(theirs) - set(mine))
            only_l = len(set(mine) - set(theirs))
            r.equivalent = f"NO: {only_b} lines only in baseline, {only_l} only in ldapsync"
    if "warm" in parts:
        warm_once(s, r, reps, fresh=not cold, log=log)
    return r


def warm_once(s: Site, r: FullSync, reps: int, *, fresh: bool, log: Path) -> None:
    """`ldapsync --once` on a state dir an earlier `--once` of the same config left (the cron
    habit): once with no change since, once with WARM_CHANGES forwards changed by ldapmodify
    since; each installed value is then checked with `postmap -q`. It runs after the
    equivalence check, whose expected map is the generated directory's."""
    cfg = s.config("once-all", all_outputs=True) if fresh else s.root / "once-all" / "ldapsync.yaml"
    argv = [PY, "-m", "ldapsync", "-c", str(cfg), "--once"]
    if fresh:  # part cold did not leave a state dir
        timed(argv, cwd=REPO, log=log)
    pool = candidates(s.n)
    wrong: list[str] = []
    for rep in range(reps):
        record_baseline(s, r, log)
        r.warm0_wall.add(timed(argv, cwd=REPO, log=log)[0])
        changes = [
            (i, f"{generate.uid(i)}@warm{rep}-{k}.example")
            for k, i in enumerate(pool[(rep * WARM_CHANGES + k * 53) % len(pool)] for k in range(WARM_CHANGES))
        ]
        record_baseline(s, r, log)
        modify_forwards(s, changes)
        wall, rss = timed(argv, cwd=REPO, log=log)
        r.warm_wall.add(wall)
        r.warm_rss.add(rss)
        want = {key(i): v for i, v in changes}
        got = query_map(s, s.map_path(cfg), list(want))
        wrong += [k for k, v in want.items() if got.get(k) != v]
    total = reps * WARM_CHANGES
    r.warm_check = (
        f"all {total} changes installed" if not wrong else f"WRONG: {len(wrong)} of {total} not installed ({wrong[0]})"
    )


def _sorted_targets(line: str) -> str:
    """Target order within a line is not data (LDAP values are unordered; ldapsync sorts)."""
    k, _, v = line.partition("\t")
    return f"{k}\t{','.join(sorted(v.split(',')))}"


def _top(prof: Path, limit: int = 25) -> str:
    """The top functions of a cProfile dump, by own time and by cumulative time."""
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return buf.getvalue()


def profile_once(s: Site, out: Path, log: Path) -> str:
    """cProfile one `ldapsync --once` (alias map only); the top functions as text."""
    cfg = s.config("profile", all_outputs=False)
    prof = out.with_suffix(".prof")
    timed([PY, "-m", "cProfile", "-o", str(prof), "-m", "ldapsync", "-c", str(cfg), "--once"], cwd=REPO, log=log)
    text = _top(prof)
    out.write_text(text)
    return text


def profile_rebuild(s: Site, out: Path, log: Path) -> str:
    """cProfile the agent (all outputs) from one forward changed until it is installed and the
    rebuild has finished; start-up is not in it (bench/profiled.py switches on SIGUSR1/2)."""
    cfg = s.config("profile-agent", all_outputs=True)
    prof = out.with_suffix(".prof")
    agent = Agent(s, cfg, log, argv_prefix=["-m", "bench.profiled", str(prof)])
    probe = candidates(s.n)[1]
    try:
        want = stale_probe(s, probe)
        t0 = agent.start()
        agent.wait_for(want, t0, timeout=300 * scale(s.n))
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        value = f"{generate.uid(probe)}@profiled.example"
        modify_forwards(s, [(probe, value)])
        seconds = agent.wait_for({key(probe): value}, time.perf_counter(), timeout=60 * scale(s.n))
        time.sleep(max(2.0, seconds))  # the generation record and state write after the install
        agent.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not prof.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        agent.stop()
    text = f"change -> installed: {seconds:.3f} s (under the profiler)\n\n" + _top(prof)
    out.write_text(text)
    return text


def stale_probe(s: Site, probe: int) -> dict[str, str]:
    """A change made before the agent starts, to wait for: its first install is done then."""
    value = f"{generate.uid(probe)}@before-start-{time.monotonic_ns()}.example"
    modify_forwards(s, [(probe, value)])
    return {key(probe): value}


TIMEOUT_SCALE = [1.0]  # --timeout-scale: a machine much busier than usual needs longer


def scale(n: int) -> float:
    """Timeouts grow with the directory (a 1M agent start takes minutes on a busy machine)."""
    return max(1.0, n / 100_000) * TIMEOUT_SCALE[0]


# ------------------------------------------------------------------------------ (2)-(5) agent
class Agent:
    """A running `ldapsync -c CONFIG` (the live agent) and ways to watch its output."""

    def __init__(self, s: Site, config: Path, log: Path, argv_prefix: Sequence[str] = ("-m", "ldapsync")):
        self.site, self.config, self.log = s, config, log
        self.argv_prefix = list(argv_prefix)
        self.map = s.map_path(config)
        self.db = self.map.with_name(self.map.name + ".db")
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: AnonSampler | None = None

    def start(self) -> float:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [PY, *self.argv_prefix, "-c", str(self.config)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        self.sampler = AnonSampler(self.proc.pid)
        self.sampler.start()
        return t0

    def stop(self) -> None:
        """SIGTERM, and wait for the agent to exit (it finishes the sync it is in first)."""
        if self.sampler is not None:
            self.sampler.halt()
            self.sampler = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30 * scale(self.site.n))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"agent exited ({self.proc and self.proc.returncode}):\n{tail}")

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.db)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def query(self, keys: Sequence[str]) -> dict[str, str]:
        """`postmap -q - hash:MAP`: what Postfix would see for these keys now."""
        return query_map(self.site, self.map, keys)

    def wait_for(self, want: dict[str, str], since: float, timeout: float = 60.0) -> float:
        """Seconds from `since` until every key maps to its value through postmap -q."""
        last = None
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            stamp = self._stamp()
            if stamp is not None and stamp != last:
                last = stamp
                got = self.query(list(want))
                if all(got.get(k) == v for k, v in want.items()):
                    return time.perf_counter() - since
            else:
                time.sleep(0.0005)
                self.alive()
        raise TimeoutError(f"not visible after {timeout:g}s: {list(want)[:3]}...")

    def memory(self) -> Memory:
        """The agent's memory now, and its peaks since this process started."""
        assert self.proc is not None and self.sampler is not None
        status = proc_status(self.proc.pid)
        anon = status["RssAnon"]
        return Memory(
            anon=anon, anon_peak=max(anon, self.sampler.peak), total=status["VmRSS"], total_peak=status["VmHWM"]
        )

    def settle(self, quiet: float = 0.5) -> None:
        """Return once the agent used no CPU for `quiet` seconds: the trailing work of a sync
        (generation record, saved sync state) is done. A timeout scaled by size ends the wait;
        an agent that never goes quiet is measured as it is."""
        deadline = time.monotonic() + 60 * scale(self.site.n)
        last = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            self.alive()
            now = self.cpu_seconds()
            if now - last < 0.02:  # a scheduler tick or two: liveness reads, not work
                return
            last = now

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        parts = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def query_map(s: Site, path: Path, keys: Sequence[str]) -> dict[str, str]:
    """`postmap -q - hash:PATH`: what Postfix would see for these keys now."""
    p = subprocess.run(
        [POSTMAP, "-c", str(s.postfix_dir), "-q", "-", f"hash:{path}"],
        input="\n".join(keys) + "\n",
        capture_output=True,
        text=True,
    )
    found = {}
    for line in p.stdout.splitlines():
        k, _, v = line.partition("\t")
        found[k] = v
    return found


def proc_status(pid: int) -> dict[str, float]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, RssShmem...) in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[k] = int(parts[0]) / 1024
    return out


@dataclass(frozen=True, slots=True)
class Memory:
    """An agent's resident memory in MiB. Anonymous memory (RssAnon) is the process's own heap;
    the rest of the total (RssFile, RssShmem) is mapped files: a memory-mapped store's pages are
    the kernel's page cache, shared and reclaimable."""

    anon: float
    anon_peak: float  # sampled (AnonSampler): the kernel keeps no high-water mark of RssAnon
    total: float  # VmRSS
    total_peak: float  # VmHWM


class AnonSampler(threading.Thread):
    """Reads a process's RssAnon every 10 ms and keeps the largest value, until halted or the
    process is gone."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.halted = threading.Event()

    def run(self) -> None:
        while not self.halted.wait(0.01):
            try:
                anon = proc_status(self.pid)["RssAnon"]
            except (OSError, KeyError, ValueError):  # exited (a zombie has no Rss fields)
                return
            self.peak = max(self.peak, anon)

    def halt(self) -> None:
        self.halted.set()
        self.join()


def candidates(n: int) -> list[int]:
    """Active users with one external forward: changing it changes one map line."""
    return [i for i in range(n) if i % 10 in (7, 9)]


def modify_forwards(s: Site, changes: Sequence[tuple[int, str]]) -> None:
    ldif = "".join(
        f"dn: uid={generate.uid(i)},{s.slapd.users_dn}\nchangetype: modify\nreplace: emailForward\n"
        f"emailForward: {value}\n-\n\n"
        for i, value in changes
    )
    s.slapd.modify(ldif)


def key(i: int) -> str:
    return f"{generate.uid(i)}@{generate.DOMAIN}"


@dataclass
class MemorySamples:
    anon: Sample = field(default_factory=Sample)
    anon_peak: Sample = field(default_factory=Sample)
    total: Sample = field(default_factory=Sample)
    total_peak: Sample = field(default_factory=Sample)

    def add(self, m: Memory) -> None:
        self.anon.add(m.anon)
        self.anon_peak.add(m.anon_peak)
        self.total.add(m.total)
        self.total_peak.add(m.total_peak)


@dataclass
class AgentResults:
    latency: dict[str, list[float]] = field(default_factory=dict)  # debounce label -> seconds
    burst_wall: Sample = field(default_factory=Sample)
    burst_rebuilds: Sample = field(default_factory=Sample)
    initial: Sample = field(default_factory=Sample)
    memory: MemorySamples = field(default_factory=MemorySamples)  # the cold-started agent
    memory_when: str = "after cold start"
    idle_cpu: Sample = field(default_factory=Sample)
    restart: Sample = field(default_factory=Sample)
    restart_memory: MemorySamples = field(default_factory=MemorySamples)
    error: str | None = None


def latency_run(s: Site, agent: Agent, changes: int, tag: str) -> list[float]:
    pool = candidates(s.n)
    out = []
    for k in range(changes):
        i = pool[(k * 37) % len(pool)]
        value = f"{generate.uid(i)}@{tag}{k}.example"
        modify_forwards(s, [(i, value)])
        t0 = time.perf_counter()
        out.append(agent.wait_for({key(i): value}, t0, timeout=30 * scale(s.n)))
    return out


def agent_bench(
    s: Site, fs: FullSync, reps: int, changes: int, idle_seconds: float, parts: frozenset[str], log: Path
) -> AgentResults:
    """The agent (all outputs, syncrepl) from an empty state dir; what it measures is chosen
    by `parts` (its cold start always: every other part needs it). A second agent with
    debounce 0 runs for part "propagation" only (its start is a second cold-start sample).
    While the agent is stopped for a restart, a baseline run joins `fs`'s sample."""
    r = AgentResults()
    pool = candidates(s.n)
    reloads = s.root / "reloads.log"
    settings: list[tuple[str, float | None]] = [("default", None)]
    if "propagation" in parts:
        settings.append(("0", 0.0))
    for label, debounce in settings:
        cfg = s.config(f"agent-{label}", all_outputs=True, debounce=debounce, reload_log=reloads)
        agent = Agent(s, cfg, log)
        try:
            probe = pool[0]
            modify_forwards(s, [(probe, f"{generate.uid(probe)}@start-{label}.example")])  # earlier runs changed it
            t0 = agent.start()
            r.initial.add(
                agent.wait_for({key(probe): f"{generate.uid(probe)}@start-{label}.example"}, t0, 300 * scale(s.n))
            )
            # warm-up: the first live change proves the persist phase is running
            modify_forwards(s, [(probe, f"{generate.uid(probe)}@warm-{label}.example")])
            warm = {key(probe): f"{generate.uid(probe)}@warm-{label}.example"}
            agent.wait_for(warm, time.perf_counter(), 60 * scale(s.n))
            if "propagation" in parts:
                r.latency[label] = latency_run(s, agent, changes, f"lat-{label}-")
            if label != "default":
                continue
            if "burst" in parts:
                r.memory_when = "after cold start and burst"
            for rep in range(reps if "burst" in parts else 1):
                if "burst" in parts:
                    burst = [
                        (pool[j % len(pool)], f"{generate.uid(pool[j % len(pool)])}@burst{rep}-{j}.example")
                        for j in range(1000)
                    ]
                    final = {key(i): v for i, v in burst}  # last write per user wins
                    before = reloads.read_text().count("\n") if reloads.exists() else 0
                    modify_forwards(s, burst)
                    t0 = time.perf_counter()
                    r.burst_wall.add(agent.wait_for(final, t0, timeout=600 * scale(s.n)))
                    time.sleep(max(1.0, 3 * (debounce or 0.1)))  # let trailing rebuilds show
                    r.burst_rebuilds.add(reloads.read_text().count("\n") - before)
                if parts & {"rss", "idle"}:
                    agent.settle()  # steady: the trailing syncs and their records done
                if "rss" in parts:
                    r.memory.add(agent.memory())
                if "idle" in parts:
                    c0 = agent.cpu_seconds()
                    time.sleep(idle_seconds)
                    r.idle_cpu.add(100 * (agent.cpu_seconds() - c0) / idle_seconds)
            if "restart" in parts:
                for rep in range(reps):
                    agent.settle()  # stopped after a sync: its trailing work done
                    agent.stop()
                    record_baseline(s, fs, log)
                    i = pool[(rep * 11 + 5) % len(pool)]
                    value = f"{generate.uid(i)}@restart{rep}.example"
                    modify_forwards(s, [(i, value)])  # the change pending while it is down
                    t0 = agent.start()
                    r.restart.add(agent.wait_for({key(i): value}, t0, timeout=300 * scale(s.n)))
                    if "rss" in parts:
                        agent.settle()
                        r.restart_memory.add(agent.memory())
        finally:
            agent.stop()
    return r


# ------------------------------------------------------------------------------ report
def fmt_s(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def fmt_ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def fmt_mib(x: float) -> str:
    return f"{x:.0f} MiB"


def table(results: list[tuple[Site, FullSync, AgentResults | None, str | None]]) -> str:
    rows = [
        "| users | measurement | median | spread (min-max) | ratio | target | verdict / note |",
        "|---:|---|---:|---|---:|---|---|",
    ]

    def row(n: int, what: str, median: str, spread: str, ratio: str = "", target: str = "", note: str = "") -> None:
        rows.append(f"| {n:,} | {what} | {median} | {spread} | {ratio} | {target} | {note} |")

    def timed_row(
        n: int, what: str, sample: Sample, against: Sample, unit: str, goal: Target | None = None, note: str = ""
    ) -> None:
        """A wall-clock row with its ratio to `against`'s median (same run), judged by `goal`."""
        ratio = sample.median / against.median if against.values else None
        target, verdict = goal.judge(n, ratio) if goal is not None and ratio is not None else ("", "")
        row(
            n,
            what,
            fmt_s(sample.median),
            sample.spread("{:.3f}"),
            f"{ratio:.2f}x {unit}" if ratio is not None else f"n/a ({unit} not run)",
            target,
            "; ".join(x for x in (verdict, note) if x),
        )

    def memory_rows(n: int, when: str, m: MemorySamples) -> None:
        target, verdict = ANON_RSS_TARGET.judge(n, m.anon.median)
        row(
            n,
            f"agent steady anonymous RSS (RssAnon), {when} (peak, sampled every 10 ms)",
            f"{fmt_mib(m.anon.median)} ({fmt_mib(m.anon_peak.median)})",
            m.anon.spread("{:.0f}"),
            "",
            target,
            verdict,
        )
        row(
            n,
            f"agent total RSS (VmRSS: anonymous + file + shmem), {when} (peak VmHWM)",
            f"{fmt_mib(m.total.median)} ({fmt_mib(m.total_peak.median)})",
            m.total.spread("{:.0f}"),
            "",
            "",
            "mapped files' pages are page cache",
        )

    for s, fs, ag, skipped in results:
        n = s.n
        base = fs.baseline_wall
        row(
            n,
            "baseline `ldapsearch \\| awk \\| postmap` wall",
            fmt_s(base.median),
            base.spread("{:.3f}"),
            "1x",
            "",
            "one run before each timed ldapsync run (cold, warm, restart)",
        )
        if fs.alias_wall.values:
            timed_row(
                n,
                "ldapsync --once cold (empty state), virtual map, wall",
                fs.alias_wall,
                base,
                "baseline",
                VIRTUAL_ONCE_TARGET,
            )
            timed_row(
                n,
                "ldapsync --once cold (empty state), all 6 outputs, wall",
                fs.all_wall,
                base,
                "baseline",
                COLD_ONCE_TARGET,
            )
        if fs.warm0_wall.values:
            timed_row(
                n,
                "ldapsync --once warm (state of an earlier --once), 0 changes since, all outputs, wall",
                fs.warm0_wall,
                base,
                "baseline",
            )
            timed_row(
                n,
                f"ldapsync --once warm, {WARM_CHANGES} changes since (ldapmodify), all outputs, wall",
                fs.warm_wall,
                base,
                "baseline",
                WARM_ONCE_TARGET,
                fs.warm_check,
            )
        row(n, "baseline peak RSS", fmt_mib(fs.baseline_rss.median), fs.baseline_rss.spread("{:.0f}"))
        if fs.alias_rss.values:
            row(
                n,
                "ldapsync --once cold, virtual map, peak RSS",
                fmt_mib(fs.alias_rss.median),
                fs.alias_rss.spread("{:.0f}"),
            )
            row(
                n,
                "ldapsync --once cold, all 6 outputs, peak RSS",
                fmt_mib(fs.all_rss.median),
                fs.all_rss.spread("{:.0f}"),
            )
        if fs.warm_rss.values:
            row(
                n,
                f"ldapsync --once warm, {WARM_CHANGES} changes, peak RSS",
                fmt_mib(fs.warm_rss.median),
                fs.warm_rss.spread("{:.0f}"),
            )
        row(n, "maps equivalent (virtual map vs. baseline)", fs.equivalent, "")
        if ag is None:
            row(n, "agent", f"not run: {skipped}", "")
            continue
        if ag.error:
            row(n, "agent", f"FAILED: {ag.error}", "")
        for label, lat in ag.latency.items():
            if not lat:
                continue
            p99 = percentile(lat, 99)
            target, verdict = PROPAGATION_P99_TARGET.judge(n, p99) if label == "default" else ("", "")
            row(
                n,
                f"propagation, debounce {label}: p50 / p95 / p99",
                f"{fmt_ms(percentile(lat, 50))} / {fmt_ms(percentile(lat, 95))} / {fmt_ms(p99)}",
                f"{fmt_ms(min(lat))}-{fmt_ms(max(lat))} (n={len(lat)})",
                "",
                f"p99 {target}" if target else "",
                verdict,
            )
        if ag.initial.values:
            timed_row(
                n,
                "agent cold start, empty state → installed",
                ag.initial,
                fs.all_wall,
                "`--once` all outputs",
                COLD_START_TARGET,
            )
        if ag.burst_wall.values:
            row(
                n,
                "burst of 1,000 modifications → all installed",
                fmt_s(ag.burst_wall.median),
                ag.burst_wall.spread("{:.3f}"),
            )
            row(
                n,
                "burst: rebuilds (reload hook runs)",
                f"{ag.burst_rebuilds.median:.0f}",
                ag.burst_rebuilds.spread("{:.0f}"),
            )
        if ag.memory.anon.values:
            memory_rows(n, ag.memory_when, ag.memory)
        if ag.idle_cpu.values:
            row(n, "agent idle CPU", f"{ag.idle_cpu.median:.2f} %", ag.idle_cpu.spread("{:.2f}"), "", "≈ 0")
        if ag.restart.values:
            timed_row(
                n,
                "agent restart (SIGTERM after a sync, 1 change made while stopped) → change installed",
                ag.restart,
                base,
                "baseline",
                RESTART_TARGET,
            )
        if ag.restart_memory.anon.values:
            memory_rows(n, "after restart and the pending change", ag.restart_memory)
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parts_help = "\n".join(f"  {name:<12} {what}" for name, what in PARTS.items())
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"parts (--only; the baseline always runs):\n{parts_help}\n\n"
        "Every row with a target says 'met' or 'missed by N.Nx' (value / limit). Targets are given\n"
        "for 100k and 1M users; smaller directories are held to 100k's, larger ones to 1M's.",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="directory sizes (users)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (default %(default)s)")
    p.add_argument("--changes", type=int, default=50, help="single changes per propagation run (default %(default)s)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling (default %(default)s)")
    p.add_argument(
        "--only",
        type=parse_parts,
        default=frozenset(PARTS),
        metavar="PART[,PART...]",
        help="run only these parts, comma-separated (default all; listed below)",
    )
    p.add_argument("--no-agent", action="store_true", help="skip the agent's parts (start ... restart)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile `ldapsync --once` and one agent rebuild at the largest size (RESULTS/DATE-profile.md)",
    )
    p.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every wait (a very busy machine; default 1)"
    )
    p.add_argument(
        "--sessionlog",
        type=int,
        metavar="WRITES",
        help="give slapd's syncprov a session log of WRITES writes (olcSpSessionlog), so a sync "
        "resumed from a cookie gets only the changes (default: none, as in the committed results)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory (default bench/results)")
    p.add_argument(
        "--label", help="results file name suffix: RESULTS/DATE-LABEL.md instead of RESULTS/DATE.md (e.g. state-after)"
    )
    args = p.parse_args(argv)
    TIMEOUT_SCALE[0] = args.timeout_scale
    parts: frozenset[str] = args.only - AGENT_PARTS if args.no_agent else args.only
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])

    work = Path(tempfile.mkdtemp(prefix="ldapsync-bench-"))
    log = work / "bench.log"
    info = machine()
    started = datetime.now(UTC)
    results: list[tuple[Site, FullSync, AgentResults | None, str | None]] = []
    profiles: list[str] = []
    phases: list[str] = []

    def phase(what: str, since: float) -> None:
        line = f"{what}: {time.perf_counter() - since:.1f} s"
        phases.append(line)
        print(f"#   {line}", file=sys.stderr, flush=True)

    try:
        for n in args.sizes:
            print(f"# {n:,} users: generating and loading ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            with site(n, work / f"n{n}", args.sessionlog) as s:
                phase(f"{n:,} users: generate + slapadd -q (slapadd alone {s.load_seconds:.1f} s)", t)
                t = time.perf_counter()
                fs = full_sync(s, args.reps, parts, log)
                phase(f"{n:,} users: full sync x{args.reps}", t)
                if args.profile and n == max(args.sizes):
                    t = time.perf_counter()
                    profiles.append(f"## cProfile of `ldapsync --once` (virtual map), {n:,} users\n")
                    profiles.append("```\n" + profile_once(s, work / "profile-once.txt", log).strip() + "\n```\n")
                    profiles.append(f"## cProfile of one agent rebuild after one change (all outputs), {n:,} users\n")
                    try:
                        text = profile_rebuild(s, work / "profile-rebuild.txt", log)
                    except (RuntimeError, TimeoutError, OSError) as e:
                        text = f"failed: {e}"
                        print(f"#   agent profile failed: {e}", file=sys.stderr)
                    profiles.append("```\n" + text.strip() + "\n```\n")
                    phase(f"{n:,} users: profiles", t)
                ag: AgentResults | None = None
                skipped = None
                if args.no_agent:
                    skipped = "--no-agent"
                elif not parts & AGENT_PARTS:
                    skipped = "no agent part in --only"
                elif not AGENT_PY.exists():
                    skipped = "agent missing"
                else:
                    print("#   agent ...", file=sys.stderr, flush=True)
                    t = time.perf_counter()
                    try:
                        ag = agent_bench(s, fs, args.reps, args.changes, args.idle, parts, log)
                    except (RuntimeError, TimeoutError, OSError) as e:
                        ag = AgentResults(error=str(e).splitlines()[0][:200])
                        print(f"#   agent failed: {e}", file=sys.stderr)
                    phase(f"{n:,} users: agent", t)
                results.append((s, fs, ag, skipped))
    finally:
        if args.keep:
            print(f"# work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    body = table(results)
    doc = [
        f"# ldapsync benchmark {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"`{command}` (parts: {', '.join(x for x in PARTS if x in parts)}; propagation: {args.changes} changes"
        f" per setting; warm `--once`: {WARM_CHANGES} changes; syncprov session log:"
        f" {args.sessionlog if args.sessionlog is not None else 'none'})",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "Directory load (`slapadd -q`): " + ", ".join(f"{s.n:,} users {s.load_seconds:.1f} s" for s, *_ in results),
        "",
        body,
        "",
    ]
    doc += ["Durations: " + "; ".join(phases), ""]
    text = "\n".join(doc)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y-%m-%d}" + (f"-{args.label}" if args.label else "")
    out = args.out / f"{stem}.md"
    out.write_text(text)
    print(f"# written to {out}", file=sys.stderr)
    if profiles:
        prof_out = args.out / f"{stem}-profile.md"
        prof_out.write_text(f"# ldapsync profiles {started:%Y-%m-%d %H:%M} UTC\n\n" + "\n".join(profiles))
        print(f"# profiles written to {prof_out}", file=sys.stderr)
    return 0
