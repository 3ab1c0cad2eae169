"""ldapsync benchmarks: full sync vs. the shell baseline, and the live agent.

    python -m bench                       # 1k, 10k, 100k users, 3 repetitions
    python -m bench --sizes 1000 --reps 1 # quick run
    python -m bench --profile             # also cProfile `--once` and one agent rebuild at the largest size

Every size gets its own throwaway slapd (ldapsync/testing/slapd.py) loaded with `slapadd -q`; ldapsync
binds as the non-root service account. Times are wall clock; peak RSS is the largest
process's ru_maxrss from wait4() (for a pipeline: its largest member). The baseline runs in
the same process loop, interleaved with ldapsync, so machine load hits both alike.
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


def db_max_size(n: int) -> int:
    """slapd's mdb map size for n users: ~1.2 KiB each once loaded, 4 KiB leaves room for the
    copy-on-write pages of the agent runs' modifications (the file is sparse: only used pages
    take disk)."""
    return max(DEFAULT_DB_MAX_SIZE, n * 4096)


@contextlib.contextmanager
def site(n: int, root: Path) -> Iterator[Site]:
    root.mkdir(parents=True, exist_ok=True)
    data = generate.write(n, root)
    postfix_dir = root / "postfix"
    postfix_dir.mkdir(exist_ok=True)
    (postfix_dir / "main.cf").touch()
    t0 = time.perf_counter()
    slapd = Slapd(
        root / "slapd", ldif_files=[BASE_LDIF, data.ldif], db_max_size=db_max_size(n), load_timeout=60 * scale(n) * 5
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
    equivalent: str = "?"


def full_sync(s: Site, reps: int, log: Path) -> FullSync:
    r = FullSync()
    base_dir = s.root / "baseline"
    base_dir.mkdir(exist_ok=True)
    base_map = base_dir / "alias"
    baseline = [
        "sh",
        str(BENCH / "baseline.sh"),
        s.slapd.uri,
        s.slapd.service_dn,
        str(s.slapd.service_password_file),
        s.slapd.users_dn,
        str(s.root / "static.lines"),
        str(base_map),
        str(s.postfix_dir),
    ]
    timed(baseline, log=log)  # warm-up (untimed): slapd's and the page cache's first touch
    timed([PY, "-m", "ldapsync", "-c", str(s.config("warm-up", all_outputs=False)), "--once"], cwd=REPO, log=log)
    for _ in range(reps):
        for f in base_dir.iterdir():
            f.unlink()
        wall, rss = timed(baseline, log=log)
        r.baseline_wall.add(wall)
        r.baseline_rss.add(rss)
        cfg = s.config("once-alias", all_outputs=False)
        wall, rss = timed([PY, "-m", "ldapsync", "-c", str(cfg), "--once"], cwd=REPO, log=log)
        r.alias_wall.add(wall)
        r.alias_rss.add(rss)
        ours = s.map_path(cfg).read_text()
        cfg_all = s.config("once-all", all_outputs=True)
        wall, rss = timed([PY, "-m", "ldapsync", "-c", str(cfg_all), "--once"], cwd=REPO, log=log)
        r.all_wall.add(wall)
        r.all_rss.add(rss)
    theirs = sorted(_sorted_targets(line) for line in base_map.read_text().splitlines())
    mine = ours.splitlines()
    if mine == theirs == s.data.expected_virtual.read_text().splitlines():
        r.equivalent = f"yes ({len(mine)} lines, identical)"
    else:
        only_b = len(set(theirs) - set(mine))
        only_l = len(set(mine) - set(theirs))
        r.equivalent = f"NO: {only_b} lines only in baseline, {only_l} only in ldapsync"
    return r


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

    def start(self) -> float:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [PY, *self.argv_prefix, "-c", str(self.config)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        return t0

    def stop(self) -> None:
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
        p = subprocess.run(
            [POSTMAP, "-c", str(self.site.postfix_dir), "-q", "-", f"hash:{self.map}"],
            input="\n".join(keys) + "\n",
            capture_output=True,
            text=True,
        )
        found = {}
        for line in p.stdout.splitlines():
            k, _, v = line.partition("\t")
            found[k] = v
        return found

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

    def rss(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        assert self.proc is not None
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = v
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        parts = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


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
class AgentResults:
    latency: dict[str, list[float]] = field(default_factory=dict)  # debounce label -> seconds
    burst_wall: Sample = field(default_factory=Sample)
    burst_rebuilds: Sample = field(default_factory=Sample)
    initial: Sample = field(default_factory=Sample)
    rss: Sample = field(default_factory=Sample)
    hwm: Sample = field(default_factory=Sample)
    idle_cpu: Sample = field(default_factory=Sample)
    restart: Sample = field(default_factory=Sample)
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


def agent_bench(s: Site, reps: int, changes: int, idle_seconds: float, log: Path) -> AgentResults:
    r = AgentResults()
    pool = candidates(s.n)
    reloads = s.root / "reloads.log"
    for label, debounce in (("default", None), ("0", 0.0)):
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
            r.latency[label] = latency_run(s, agent, changes, f"lat-{label}-")
            if label != "default":
                continue
            for rep in range(reps):
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
                rss, hwm = agent.rss()
                r.rss.add(rss)
                r.hwm.add(hwm)
                c0 = agent.cpu_seconds()
                time.sleep(idle_seconds)
                r.idle_cpu.add(100 * (agent.cpu_seconds() - c0) / idle_seconds)
            for rep in range(reps):
                agent.stop()
                i = pool[(rep * 11 + 5) % len(pool)]
                value = f"{generate.uid(i)}@restart{rep}.example"
                modify_forwards(s, [(i, value)])
                t0 = agent.start()
                r.restart.add(agent.wait_for({key(i): value}, t0, timeout=300 * scale(s.n)))
        finally:
            agent.stop()
    return r


# ------------------------------------------------------------------------------ report
def fmt_s(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def fmt_ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def table(results: list[tuple[Site, FullSync, AgentResults | None, str | None]], reps: int) -> str:
    rows = ["| users | measurement | median | spread (min-max) | target / note |", "|---:|---|---:|---|---|"]

    def row(n: int, what: str, median: str, spread: str, note: str = "") -> None:
        rows.append(f"| {n:,} | {what} | {median} | {spread} | {note} |")

    for s, fs, ag, skipped in results:
        n = s.n
        ratio = fs.alias_wall.median / fs.baseline_wall.median
        row(
            n,
            "baseline `ldapsearch \\| awk \\| postmap` wall",
            fmt_s(fs.baseline_wall.median),
            fs.baseline_wall.spread("{:.3f}"),
        )
        row(
            n,
            "ldapsync --once (virtual map) wall",
            fmt_s(fs.alias_wall.median),
            fs.alias_wall.spread("{:.3f}"),
            f"**{ratio:.2f}x baseline** (target ≤ 2x)",
        )
        row(
            n,
            "ldapsync --once (all 6 outputs) wall",
            fmt_s(fs.all_wall.median),
            fs.all_wall.spread("{:.3f}"),
            f"{fs.all_wall.median / fs.baseline_wall.median:.2f}x baseline",
        )
        row(n, "baseline peak RSS", f"{fs.baseline_rss.median:.0f} MiB", fs.baseline_rss.spread("{:.0f}"))
        row(
            n, "ldapsync --once (virtual map) peak RSS", f"{fs.alias_rss.median:.0f} MiB", fs.alias_rss.spread("{:.0f}")
        )
        row(n, "ldapsync --once (all 6 outputs) peak RSS", f"{fs.all_rss.median:.0f} MiB", fs.all_rss.spread("{:.0f}"))
        row(n, "maps equivalent (virtual map vs. baseline)", fs.equivalent, "")
        if ag is None:
            row(n, "agent: propagation, burst, RSS, idle CPU, restart", f"not run: {skipped}", "")
            continue
        if ag.error:
            row(n, "agent", f"FAILED: {ag.error}", "")
        for label, lat in ag.latency.items():
            if not lat:
                continue
            note = "target p99 ≤ 0.5 s" if label == "default" else ""
            row(
                n,
                f"propagation, debounce {label}: p50 / p95 / p99",
                f"{fmt_ms(percentile(lat, 50))} / {fmt_ms(percentile(lat, 95))} / {fmt_ms(percentile(lat, 99))}",
                f"{fmt_ms(min(lat))}-{fmt_ms(max(lat))} (n={len(lat)})",
                note,
            )
        if ag.initial.values:
            row(n, "agent start, empty state → installed", fmt_s(ag.initial.median), ag.initial.spread("{:.3f}"))
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
        if ag.rss.values:
            row(
                n,
                "agent steady-state RSS (peak)",
                f"{ag.rss.median:.0f} MiB ({ag.hwm.median:.0f})",
                ag.rss.spread("{:.0f}"),
                "target ≤ 150 MiB at 100k",
            )
            row(n, "agent idle CPU", f"{ag.idle_cpu.median:.2f} %", ag.idle_cpu.spread("{:.2f}"), "target ≈ 0")
        if ag.restart.values:
            row(
                n,
                "restart (cookie+state, 1 change pending) → installed",
                fmt_s(ag.restart.median),
                ag.restart.spread("{:.3f}"),
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="directory sizes (users)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (default %(default)s)")
    p.add_argument("--changes", type=int, default=50, help="single changes per propagation run (default %(default)s)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling (default %(default)s)")
    p.add_argument("--no-agent", action="store_true", help="skip (2)-(5)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile `ldapsync --once` and one agent rebuild at the largest size (RESULTS/DATE-profile.md)",
    )
    p.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every wait (a very busy machine; default 1)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory (default bench/results)")
    args = p.parse_args(argv)
    TIMEOUT_SCALE[0] = args.timeout_scale

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
            with site(n, work / f"n{n}") as s:
                phase(f"{n:,} users: generate + slapadd -q (slapadd alone {s.load_seconds:.1f} s)", t)
                t = time.perf_counter()
                fs = full_sync(s, args.reps, log)
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
                elif not AGENT_PY.exists():
                    skipped = "agent missing"
                else:
                    print("#   agent ...", file=sys.stderr, flush=True)
                    t = time.perf_counter()
                    try:
                        ag = agent_bench(s, args.reps, args.changes, args.idle, log)
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

    body = table(results, args.reps)
    doc = [
        f"# ldapsync benchmark {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"`python -m bench --sizes {' '.join(map(str, args.sizes))} --reps {args.reps}`"
        f" (propagation: {args.changes} changes per setting)",
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
    out = args.out / f"{started:%Y-%m-%d}.md"
    out.write_text(text)
    print(f"# written to {out}", file=sys.stderr)
    if profiles:
        prof_out = args.out / f"{started:%Y-%m-%d}-profile.md"
        prof_out.write_text(f"# ldapsync profiles {started:%Y-%m-%d %H:%M} UTC\n\n" + "\n".join(profiles))
        print(f"# profiles written to {prof_out}", file=sys.stderr)
    return 0
