"""The agent's wiring driven in-process: its queue, scheduler, control socket and STATUS line.

No subprocess and no slapd: an LDIF source (the follower polls the file), texthash outputs,
a fake clock for the scheduler's time and a recording sd_notify sender. The test thread is
the agent's main thread: it advances the clock and calls `agent.step()` until what it waits
for has happened. Operators' requests come from other threads over the real control socket.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ldapsync import agent as agent_mod
from ldapsync import config as config_mod
from ldapsync import control, sync
from ldapsync import status as status_mod
from ldapsync.validate import RETIRING_GRACE

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
BASE_LDIF = REPO / "fixtures" / "ldif" / "base.ldif"


class FakeClock:
    def __init__(self, wall: float):
        self.mono = 1000.0
        self.wall = wall

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class Sender:
    """Records what the agent tells systemd."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def notify(self, message: str) -> None:
        lines = message.splitlines()
        assert all(line.split("=", 1)[0] in ("READY", "STATUS", "WATCHDOG", "STOPPING") for line in lines), (
            f"not one field per line: {message!r}"
        )
        self.messages.extend(lines)

    def statuses(self) -> list[str]:
        return [m.removeprefix("STATUS=") for m in self.messages if m.startswith("STATUS=")]


class Site:
    def __init__(self, root: Path, ldif: str):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ldif = root / "users.ldif"
        self.ldif.write_text(ldif)
        self.config = root / "ldapsync.yaml"
        self.doc: dict[str, Any] = {
            "domain": "example.org",
            "source": {"ldif": {"path": str(self.ldif), "base_dn": "ou=users,dc=example,dc=org"}},
            "state_dir": str(root / "state"),
            "exporters": [
                {"kind": "postfix-virtual", "path": str(root / "out/virtual"), "map_type": "texthash"},
                {"kind": "dovecot-passwd", "path": str(root / "out/passwd")},
            ],
            "agent": {"debounce": 0.05, "max_delay": 0.5},
        }
        self.config.write_text(yaml.safe_dump(self.doc))
        self.state = root / "state"
        self.passwd = root / "out/passwd"

    def record(self) -> status_mod.Status:
        return status_mod.load(self.state)

    def users(self) -> set[str]:
        try:
            return {line.split(":", 1)[0] for line in self.passwd.read_text().splitlines() if line}
        except FileNotFoundError:
            return set()

    def write_ldif(self, text: str) -> None:
        tmp = self.ldif.with_name(".users.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.ldif)


class Running:
    """An agent started in-process; `until()` is its main loop, run by the test."""

    def __init__(self, site: Site, clock: FakeClock):
        self.site = site
        self.clock = clock
        self.sender = Sender()
        self.agent = agent_mod.Agent(
            config_mod.load(site.config), clock=clock, notifier=agent_mod.Notifier(self.sender)
        )
        assert self.agent.start(signals=False)

    def until(self, predicate: Callable[[], Any], what: str, timeout: float = 20.0, tick: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}; STATUS: {self.sender.statuses()[-3:]}"
            self.clock.advance(tick)
            self.agent.step(wait=0.02)

    def close(self) -> None:
        self.agent.finish()


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "run"
    monkeypatch.setenv("LDAPSYNC_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def site(tmp_path: Path, runtime: Path) -> Site:
    return Site(tmp_path / "site", DEMO_LDIF.read_text())


@pytest.fixture
def running(site: Site) -> Iterator[Running]:
    r = Running(site, FakeClock(time.time()))
    try:
        r.until(lambda: site.record().result is status_mod.SyncResult.INSTALLED, "the first sync")
        yield r
    finally:
        r.close()


def asking(state_dir: Path, request: control.Request) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def ask() -> None:
        try:
            out.append(control.ask(state_dir, request, timeout=30))
        except control.ControlError as e:
            out.append(e)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread, out


def cli(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ldapsync", "-c", str(site.config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ),
    )


# -- operating the running agent -------------------------------------------------------------------
def test_a_held_change_is_approved_while_the_agent_runs_within_a_second(running: Running, site: Site) -> None:
    before = site.passwd.read_bytes()
    site.write_ldif(BASE_LDIF.read_text())  # every account gone: the guard holds it
    running.until(lambda: site.record().held, "the change to be held")
    assert site.passwd.read_bytes() == before
    assert any("HELD" in s for s in running.sender.statuses())

    thread, out = asking(site.state, control.Request("approve"))
    asked = time.monotonic()
    running.until(lambda: out, "the answer")
    took = time.monotonic() - asked
    thread.join(5)
    reply = out[0]
    assert isinstance(reply, control.Reply) and reply.ok, reply
    assert reply.message.startswith("approved held change (") and "dovecot-passwd" in reply.message
    assert took < 1.0, f"approve took {took:.2f}s"
    assert site.users() == set() and site.record().held is None
    assert not any("HELD" in s for s in running.sender.statuses()[-1:])


def test_approve_and_rollback_from_the_command_line_while_the_agent_runs(running: Running, site: Site) -> None:
    """The CLI asks the agent (the state lock is the agent's): no waiting, no 'holds lock' error."""
    first = site.record().generation
    site.write_ldif(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    running.until(lambda: site.record().generation != first, "a second generation")
    result: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(target=lambda: result.append(cli(site, "rollback", first or "")))
    thread.start()
    running.until(lambda: result, "the rollback command", timeout=60)
    proc = result[0]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"rolled back to {first}; changed: postfix-virtual")
    assert site.record().result is status_mod.SyncResult.ROLLED_BACK
    assert "bob@elsewhere.example" in (site.root / "out/virtual").read_text()
    assert any("ROLLED BACK" in s for s in running.sender.statuses())


def test_concurrent_requests_are_served_one_after_another(running: Running, site: Site) -> None:
    asked = [asking(site.state, control.Request(c)) for c in ("approve", "resync", "approve", "rollback")]
    running.until(lambda: all(out for _, out in asked), "four answers")
    replies = [out[0] for _, out in asked]
    assert [r.ok for r in replies] == [True, True, True, False], replies
    assert replies[0].message == "no held change" and "resync started" in replies[1].message
    assert "no earlier generation" in replies[3].message


def test_a_request_waits_for_the_sync_in_progress(
    running: Running, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests are carried out between syncs, never beside one."""
    original = sync.Pipeline.run
    inside = threading.Event()
    order: list[str] = []

    def slow_run(self: sync.Pipeline, **kwargs: Any) -> sync.Result:
        order.append("sync starts")
        inside.set()
        time.sleep(0.3)  # the request arrives meanwhile
        result = original(self, **kwargs)
        order.append("sync ends")
        return result

    monkeypatch.setattr(sync.Pipeline, "run", slow_run)
    original_serve = running.agent._serve
    monkeypatch.setattr(running.agent, "_serve", lambda rid: (order.append("request"), original_serve(rid))[1])
    out: list[Any] = []

    def ask_during_the_sync() -> None:
        inside.wait(20)
        out.append(control.ask(site.state, control.Request("resync"), timeout=30))

    threading.Thread(target=ask_during_the_sync).start()
    site.write_ldif(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@later.example"))
    running.until(lambda: out, "the answer")
    assert out[0].ok and order.index("request") > order.index("sync ends"), order


def test_an_agent_that_stops_answers_pending_requests(site: Site) -> None:
    r = Running(site, FakeClock(time.time()))
    thread, out = asking(site.state, control.Request("approve"))
    deadline = time.monotonic() + 10
    while not r.agent.events.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)  # the request is queued; the agent stops before carrying it out
    r.close()
    thread.join(10)
    assert out and isinstance(out[0], control.Reply) and not out[0].ok
    assert "stopping" in out[0].message
    assert control.ask(site.state, control.Request("approve"), timeout=5) is None


# -- truthful STATUS and status -------------------------------------------------------------------
def test_status_line_follows_each_change_and_names_a_rejected_config(running: Running, site: Site) -> None:
    first = running.sender.statuses()[-1]
    assert "following" in first and "last change" in first, first
    site.write_ldif(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@moved.example"))
    running.until(lambda: site.record().generation not in first, "a new generation")
    generation = site.record().generation
    assert (
        running.sender.statuses()[-1] != first and f"serving generation {generation}" in running.sender.statuses()[-1]
    )
    site.config.write_text("domain: [\n")
    running.until(lambda: "REJECTED" in running.sender.statuses()[-1], "STATUS naming the rejected config")
    line = running.sender.statuses()[-1]
    assert str(site.config) in line and "a restart would fail" in line
    assert site.record().config_error and str(site.config) in site.record().config_error
    # monitoring says so too, and `status` still shows the running agent's state
    proc = cli(site, "check", "--max-age", "900")
    assert proc.returncode == 1 and "config file rejected" in proc.stdout, proc.stdout
    proc = cli(site, "status")
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("config:         REJECTED: ") and str(site.config) in lines[0]
    assert f"agent:          running (PID {os.getpid()})" in proc.stdout
    assert "agent status:   config file REJECTED" in proc.stdout
    assert f"generation:     {site.record().generation}" in proc.stdout
    as_json = json.loads(cli(site, "status", "--json").stdout)
    assert as_json["state"]["agent"]["running"] is True and as_json["state"]["live"]["config_error"]

    site.config.write_text(yaml.safe_dump(site.doc))
    running.until(lambda: "REJECTED" not in running.sender.statuses()[-1], "the rejection cleared")
    assert site.record().config_error is None


def test_status_without_an_agent_and_a_broken_config_says_what_it_can(site: Site) -> None:
    site.config.write_text("domain: [\n")
    proc = cli(site, "status")
    assert proc.returncode == 2 and proc.stdout.startswith("config:         REJECTED: ")
    assert "state:          unknown" in proc.stdout


def test_a_quiet_agent_confirms_what_the_source_last_answered(running: Running, site: Site) -> None:
    confirmed = site.record().last_confirmed
    assert confirmed is not None
    running.until(lambda: (site.record().last_confirmed or 0) > confirmed, "a confirmation", tick=1.0)
    f = running.agent.follower
    assert f is not None and f.status.answered is not None
    assert site.record().last_confirmed <= f.status.answered  # type: ignore[operator]


# -- the day boundary ------------------------------------------------------------------------------
def test_a_quiet_agent_applies_a_retirement_at_midnight(
    tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'retiring <date>' ends its grace period at midnight: the agent rebuilds then, with no
    directory change, as a cron `--once` after midnight would."""
    day = datetime.date(2026, 12, 7)
    started = datetime.datetime.combine(day, datetime.time(23, 59, 0)).timestamp()
    clock = FakeClock(started)

    class FakeDate(datetime.date):
        @classmethod
        def today(cls) -> FakeDate:
            d = datetime.date.fromtimestamp(clock.time())
            return cls(d.year, d.month, d.day)

    monkeypatch.setattr(sync, "date", FakeDate)
    retiring = (day - RETIRING_GRACE).isoformat()  # the grace period ends with today
    ldif = DEMO_LDIF.read_text().replace("accountStatus: retiring 2020-01-01", f"accountStatus: retiring {retiring}")
    site = Site(tmp_path / "site", ldif)
    r = Running(site, clock)
    try:
        r.until(lambda: site.record().result is status_mod.SyncResult.INSTALLED, "the first sync")
        assert "rita" in site.users()
        r.until(lambda: clock.time() > started + 62, "midnight", tick=1.0)
        r.until(lambda: "rita" not in site.users(), "rita retired at midnight")
    finally:
        r.close()


def test_until_next_day_is_the_next_local_midnight() -> None:
    noon = datetime.datetime(2026, 12, 7, 12, 0, 0).timestamp()
    assert agent_mod.until_next_day(noon) == 12 * 3600 + agent_mod.DAY_MARGIN
    late = datetime.datetime(2026, 12, 7, 23, 59, 59).timestamp()
    assert agent_mod.until_next_day(late) == 1 + agent_mod.DAY_MARGIN


def test_the_status_line_tells_how_far_a_long_first_read_got(site: Site) -> None:
    """Until the first sync, systemd's STATUS says how many entries were read and how fast
    (the first refresh is staged in the mirror until it completes: counted there)."""

    def users(start: int, end: int) -> None:
        for i in range(start, end):
            agent.mirror.upsert(f"k{i}", f"uid=u{i:06d},ou=users,dc=example,dc=org", {"uid": [b"u%06d" % i]}, ["uid"])

    clock, sender = FakeClock(time.time()), Sender()
    agent = agent_mod.Agent(config_mod.load(site.config), clock=clock, notifier=agent_mod.Notifier(sender))
    assert agent.status_line() == "starting: reading the directory: 0s"
    agent.mirror.begin_refresh()  # what the follower does
    users(0, 1000)  # what it has streamed in so far
    agent._ping()
    assert sender.statuses()[-1] == "starting: reading the directory: 1,000 entries, 0s"
    clock.advance(10)
    users(1000, 21_000)
    agent._ping()
    assert sender.statuses()[-1] == "starting: reading the directory: 21,000 entries, 2,100/s, 10s"
