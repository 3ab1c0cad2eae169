"""The live agent as a real process against a real slapd: what a mail host relies on.

Each test runs `python -m ldapsync -c CONFIG` (no --once) bound as the service account,
changes the directory with ldapmodify and checks the installed lmdb map with the real
`postmap -q`. Waits are bounded polls; the agent's JSON log lines (stderr) tell which path
it took (cookie resume vs. full refresh, syncrepl vs. poll).
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from agentutil import (
    AgentProcess,
    AgentSetup,
    Ds389,
    NotifyListener,
    file_states,
    postmap_path,
    set_stored_cookie,
    wait_until,
)
from slapd import BASE_LDIF, BIND_SECRET, SERVICE_DN, Slapd, generate_users_ldif, generated_user_hash

from ldapsync import status as status_mod

pytestmark = [
    pytest.mark.slapd,
    pytest.mark.skipif(postmap_path() is None, reason="postfix not installed (postmap)"),
]

FAST = {"debounce": 0.05, "max_delay": 1.0, "reconnect_max": 1.0}
EXTRA_USERS = 200  # makes a full refresh (>= 250 entries) easy to tell from a cookie resume
USERS = "ou=users,dc=example,dc=org"

Agents = Callable[..., AgentProcess]


@pytest.fixture
def agents() -> Iterator[Agents]:
    """Start agents for a test; every one still running is killed at teardown."""
    started: list[AgentProcess] = []

    def start(setup: AgentSetup, env: dict[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(setup.config, env=env)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


@pytest.fixture
def big_slapd(slapd_factory: Callable[..., Slapd]) -> Slapd:
    return slapd_factory(extra_ldif=generate_users_ldif(EXTRA_USERS))


def set_forward(uid: str, forward: str) -> str:
    return f"dn: uid={uid},{USERS}\nchangetype: modify\nreplace: emailForward\nemailForward: {forward}\n"


def user_ldif(uid: str, forward: str) -> str:
    return (
        f"dn: uid={uid},{USERS}\nchangetype: add\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncMailAccount\n"
        f"uid: {uid}\ncn: {uid}\nsn: {uid}\nemailForward: {forward}\nmailPassword: {generated_user_hash()}\n"
    )


def start_ready(agents: Agents, setup: AgentSetup, env: dict[str, str] | None = None) -> AgentProcess:
    """An agent that has installed its first sync (bob's forward is in the map)."""
    agent = agents(setup, env)
    agent.wait_log("sync done", timeout=20)
    setup.wait_map("bob@example.org", "bob@elsewhere.example")
    return agent


def no_errors(agent: AgentProcess, since: int = 0, allow: tuple[str, ...] = ()) -> None:
    bad = [r for r in agent.errors(since) if r.get("event") not in allow]
    assert not bad, f"unexpected errors: {bad}"


def test_follows_add_modify_rename_delete(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    agent = start_ready(agents, setup)
    assert agent.find("change detection chosen from the root DSE", method="syncrepl")
    assert agent.find("following the directory", method="syncrepl")

    slapd.modify(user_ldif("newbie", "newbie@far.example"))
    setup.wait_map("newbie@example.org", "newbie@far.example", timeout=5)
    wait_until(lambda: "newbie" in setup.passwd_users(), 5, what="newbie in the passwd-file")

    slapd.modify(set_forward("newbie", "newbie@near.example"))
    setup.wait_map("newbie@example.org", "newbie@near.example", timeout=5)

    slapd.modify(f"dn: uid=newbie,{USERS}\nchangetype: modrdn\nnewrdn: uid=renamed\ndeleteoldrdn: 1\n")
    setup.wait_map("renamed@example.org", "newbie@near.example", timeout=5)
    assert setup.postmap_q("newbie@example.org") is None
    wait_until(lambda: {"renamed"} == {"renamed", "newbie"} & setup.passwd_users(), 5, what="renamed in passwd")

    slapd.modify(f"dn: uid=renamed,{USERS}\nchangetype: delete\n")
    setup.wait_map("renamed@example.org", None, timeout=5)
    wait_until(lambda: "renamed" not in setup.passwd_users(), 5, what="renamed gone from passwd")
    assert setup.postmap_q("bob@example.org") == "bob@elsewhere.example"
    assert agent.alive
    no_errors(agent)


def test_quiet_directory_keeps_one_stream_and_a_change_is_fast(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    """A stream idle for longer than `timeout` must stay up (ldap3 used to end it on a recv timeout)."""
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST, timeout=1)
    agent = start_ready(agents, setup)
    time.sleep(2.5)  # quiet for 2.5 x timeout
    assert len(agent.find("following the directory")) == 1
    assert not agent.find("directory connection failed; retrying")
    # pushed over the stream that stayed up: far sooner than a poll (60 s) or a reconnect would
    # bring it; how fast exactly is measured in bench/, not asserted on a busy machine
    slapd.modify(set_forward("bob", "bob@quick.example"))
    setup.wait_map("bob@example.org", "bob@quick.example", timeout=10)
    assert len(agent.find("following the directory")) == 1
    # the change is timed from the follower receiving it to installed (the first full refresh is not)
    wait_until(lambda: status_mod.load(setup.state).propagation.count == 1, 10, what="propagation observed once")
    assert status_mod.load(setup.state).propagation.total < 60
    no_errors(agent)


def test_burst_of_modifications_causes_few_rebuilds(big_slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    """Agent defaults (debounce 0.1 s, max_delay 2 s): 200 modifications, one or a few installs."""
    setup = AgentSetup.for_slapd(tmp_path / "a", big_slapd, agent=None)
    setup.doc["safety"] = {"max_change_ratio": 1.0}  # rewriting most forwards is deliberate here
    setup.write_config()
    agent = start_ready(agents, setup)
    assert setup.reloads() == 1
    mark = agent.mark()

    uids = [f"user{i:06d}" for i in range(EXTRA_USERS)]
    big_slapd.modify("\n".join(set_forward(uid, f"{uid}@burst.example") for uid in uids))
    setup.wait_map(f"{uids[-1]}@example.org", f"{uids[-1]}@burst.example", timeout=10)
    time.sleep(2.5)  # max_delay + margin: a trailing rebuild would have happened by now

    lines = dict(line.split("\t", 1) for line in setup.virtual.read_text().splitlines())
    assert all(lines[f"{uid}@example.org"] == f"{uid}@burst.example" for uid in uids)
    assert setup.postmap_q(f"{uids[0]}@example.org") == f"{uids[0]}@burst.example"
    rebuilds = len(agent.find("sync done", since=mark))
    reloads = setup.reloads() - 1
    assert 1 <= reloads <= 3, f"{reloads} reloads for one burst"
    assert rebuilds <= 3, f"{rebuilds} rebuilds for one burst"
    no_errors(agent)


def test_slapd_down_agent_stays_up_then_catches_up_by_cookie(big_slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", big_slapd, agent=FAST)
    agent = start_ready(agents, setup)
    first = agent.wait_log("refresh complete")
    assert first["received"] == first["entries"] >= EXTRA_USERS  # no cookie yet: a full refresh
    before = file_states(setup.output_files())
    port = big_slapd.port

    mark = agent.mark()
    big_slapd.kill()
    agent.wait_log("directory connection failed; retrying", since=mark)
    assert agent.alive
    assert file_states(setup.output_files()) == before, "maps changed while LDAP was away"

    # changes made while the agent is disconnected: freeze it so it cannot reconnect early
    agent.pause()
    big_slapd.start()
    assert big_slapd.port == port, "slapd came back on another port"
    big_slapd.modify(set_forward("bob", "bob@while-away.example") + "\n" + set_forward("user000007", "u7@away.example"))
    mark = agent.mark()
    agent.resume()
    setup.wait_map("bob@example.org", "bob@while-away.example", timeout=10)
    setup.wait_map("user000007@example.org", "u7@away.example", timeout=5)
    resumed = agent.wait_log("refresh complete", since=mark)
    assert resumed["entries"] >= EXTRA_USERS
    assert resumed["received"] <= 3, f"cookie resume should not be a full refresh: {resumed}"
    assert agent.find("following the directory", since=mark, resume=True)
    no_errors(agent)


def test_restart_resumes_from_persisted_cookie(big_slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", big_slapd, agent=FAST)
    agent = start_ready(agents, setup)
    rc, seconds = agent.terminate()
    assert rc == 0
    assert seconds < 5, f"SIGTERM took {seconds:.1f}s"

    big_slapd.modify(set_forward("bob", "bob@while-down.example"))
    again = agents(setup)
    resumed = again.wait_log("resuming from the store")
    assert resumed["cookie"] is True and resumed["entries"] >= EXTRA_USERS
    assert resumed["outputs"] == "as installed"  # no build at the start: the change costs its part
    setup.wait_map("bob@example.org", "bob@while-down.example", timeout=10)
    refresh = again.wait_log("refresh complete")
    assert refresh["received"] <= 2, f"restart did a full refresh: {refresh}"
    assert refresh["entries"] == resumed["entries"]
    no_errors(again)


def test_refused_cookie_falls_back_to_a_full_refresh(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    """A cookie the server cannot honour (here: from its future, as after restoring slapd from a
    backup) gets e-syncRefreshRequired; the agent must drop it and do one full refresh."""
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    agent = start_ready(agents, setup)
    assert agent.terminate()[0] == 0
    cookie = setup.saved_cookie()
    assert cookie is not None
    future = re.sub(r"csn=\d{14}", "csn=20991231000000", cookie)
    assert future != cookie, cookie
    set_stored_cookie(setup.state, future.encode())

    slapd.modify(set_forward("bob", "bob@restored.example"))
    again = agents(setup)
    again.wait_log("server refused the cookie; doing a full refresh", timeout=10)
    setup.wait_map("bob@example.org", "bob@restored.example", timeout=10)
    full = again.wait_log("refresh complete")
    assert full["received"] == full["entries"]
    assert len(again.find("server refused the cookie; doing a full refresh")) == 1
    wait_until(lambda: setup.saved_cookie() not in (None, future), 5, what="the new, valid cookie saved")


@pytest.mark.parametrize("syncprov", [False, True], ids=["no-syncprov-full-compare", "contextCSN"])
def test_poll_mode_follows_changes(
    slapd_factory: Callable[..., Slapd], agents: Agents, tmp_path: Path, syncprov: bool
) -> None:
    server = slapd_factory(syncprov=syncprov)
    setup = AgentSetup.for_slapd(tmp_path / "a", server, agent=FAST, watch="poll", poll_interval=0.2)
    agent = start_ready(agents, setup)
    server.modify(set_forward("bob", "bob@polled.example"))
    setup.wait_map("bob@example.org", "bob@polled.example", timeout=5)
    server.modify(f"dn: uid=carol,{USERS}\nchangetype: delete\n")
    setup.wait_map("carol@example.org", None, timeout=5)
    assert agent.find("directory changed", method="poll")
    assert not agent.find("refresh complete")  # no syncrepl involved
    no_errors(agent)


@pytest.mark.parametrize(("syncprov", "method"), [(True, "syncrepl"), (False, "poll")])
def test_watch_auto_picks_method_from_root_dse(
    slapd_factory: Callable[..., Slapd], agents: Agents, tmp_path: Path, syncprov: bool, method: str
) -> None:
    server = slapd_factory(syncprov=syncprov)
    setup = AgentSetup.for_slapd(tmp_path / "a", server, agent=FAST)
    agent = start_ready(agents, setup)
    chosen = agent.wait_log("change detection chosen from the root DSE")
    assert chosen["method"] == method
    assert chosen["server"] == server.uri


def test_sd_notify_ready_after_maps_watchdog_and_status(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    with NotifyListener(on_ready=lambda: all(p.exists() for p in setup.output_files())) as notify:
        agent = agents(setup, {**notify.env, "WATCHDOG_USEC": "1000000"})
        notify.wait("READY=1", timeout=20)
        assert notify.ready_check is True, "READY=1 was sent before the maps were installed"
        assert len(notify.lines("READY=1")) == 1
        notify.wait("WATCHDOG=1", count=4, timeout=5)
        pings = notify.times("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 1.0, f"watchdog pings further apart than WATCHDOG_USEC: {gaps}"
        wait_until(
            lambda: any("following" in s and slapd.uri in s for s in notify.lines("STATUS=")),
            5,
            what="a 'following <server>' STATUS line",
        )
        status = [s for s in notify.lines("STATUS=") if "following" in s][-1]
        assert "syncrepl" in status and "entries" in status and "last change" in status

        rc, _ = agent.terminate()
        assert rc == 0
        notify.wait("STOPPING=1", timeout=2)


def test_config_and_static_edits(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST, static={"aliases": {"postmaster": ["alice"]}})
    agent = start_ready(agents, setup)
    setup.wait_map("postmaster@example.org", "alice@example.org")

    # a config edit that does not parse: reported, the running config stays, LDAP still followed
    mark = agent.mark()
    setup.write_config("domain: [unclosed\n")
    rejected = agent.wait_log("new configuration rejected; the running one stays in force", since=mark)
    assert str(setup.config) in rejected["error"]
    slapd.modify(set_forward("bob", "bob@after-bad-config.example"))
    setup.wait_map("bob@example.org", "bob@after-bad-config.example", timeout=5)
    # one edit, one report: the agent's own reading of the file must not count as an edit
    assert len(agent.find("new configuration rejected; the running one stays in force", since=mark)) == 1
    mark = agent.mark()
    setup.write_config()
    agent.wait_log("configuration reloaded; re-rendering from the directory in memory", since=mark)

    # same for the static file: the old aliases stay in force
    mark = agent.mark()
    setup.write_static("aliases: [unclosed\n")
    rejected = agent.wait_log("new configuration rejected; the running one stays in force", since=mark)
    assert str(setup.static) in rejected["error"]
    slapd.modify(set_forward("bob", "bob@after-bad-static.example"))
    setup.wait_map("bob@example.org", "bob@after-bad-static.example", timeout=5)
    assert setup.postmap_q("postmaster@example.org") == "alice@example.org"

    # with LDAP gone, a static edit still re-renders: from the mirror, not from LDAP
    mark = agent.mark()
    slapd.stop()
    agent.wait_log("directory connection failed; retrying", since=mark)
    setup.write_static({"aliases": {"postmaster": ["alice"], "sales": ["bob", "carol"]}})
    setup.wait_map("sales@example.org", "bob@example.org,carol@example.org", timeout=5)
    assert agent.find("configuration reloaded; re-rendering from the directory in memory", since=mark)
    assert setup.postmap_q("bob@example.org") == "bob@after-bad-static.example"
    assert agent.alive


def test_sighup_rereads_config_and_does_a_full_resync(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    agent = start_ready(agents, setup)
    first = agent.wait_log("refresh complete")
    mark = agent.mark()
    agent.signal(signal.SIGHUP)
    agent.wait_log("SIGHUP: re-reading the configuration and resyncing", since=mark)
    agent.wait_log("configuration reloaded; resyncing from the directory", since=mark)
    again = agent.wait_log("refresh complete", since=mark)
    assert again["received"] == again["entries"] == first["entries"], "SIGHUP must not resume by cookie"
    slapd.modify(set_forward("bob", "bob@after-hup.example"))
    setup.wait_map("bob@example.org", "bob@after-hup.example", timeout=5)
    assert agent.alive
    no_errors(agent)


def test_ldap_unreachable_at_start_keeps_installed_maps(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    first = start_ready(agents, setup)
    assert first.terminate()[0] == 0
    before = file_states(setup.output_files())
    port = slapd.port
    slapd.stop()

    with NotifyListener() as notify:
        agent = agents(setup, notify.env)
        notify.wait("READY=1", timeout=20)  # the installed files are current: ready to serve
        agent.wait_log("directory connection failed; retrying")
        assert agent.alive
        assert file_states(setup.output_files()) == before
        # the STATUS datagram may still be on its way when the log line is read
        wait_until(lambda: any("unreachable" in s for s in notify.lines("STATUS=")), 10, what="STATUS unreachable")

        slapd.start()
        assert slapd.port == port, "slapd came back on another port"
        slapd.modify(set_forward("bob", "bob@back.example"))
        setup.wait_map("bob@example.org", "bob@back.example", timeout=15)
    rc, seconds = agent.terminate()
    assert (rc, seconds < 5) == (0, True)


def test_sigterm_exits_zero_promptly_while_ldap_is_away(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent={**FAST, "reconnect_max": 30})
    agent = start_ready(agents, setup)
    mark = agent.mark()
    slapd.stop()
    agent.wait_log("directory connection failed; retrying", since=mark)
    rc, seconds = agent.terminate()
    assert rc == 0
    assert seconds < 3, f"SIGTERM took {seconds:.1f}s while reconnecting"
    stopped: dict[str, Any] = agent.wait_log("stopped", since=mark)
    assert stopped["level"] == "info"


def test_follows_389_ds_via_persistent_search(ds389: Ds389, agents: Agents, tmp_path: Path) -> None:
    """389-ds offers psearch but not syncrepl: auto picks psearch and every kind of change arrives."""
    secret = tmp_path / "bind.secret"
    secret.write_text(BIND_SECRET.read_text().strip())
    secret.chmod(0o600)
    setup = AgentSetup.create(tmp_path / "a", ds389.uri, bind_dn=SERVICE_DN, bind_password_file=secret, agent=FAST)
    agent = agents(setup)
    setup.wait_map("user000001@example.org", "user000001@elsewhere.example", timeout=20)
    assert agent.find("change detection chosen from the root DSE")[0]["method"] == "psearch"
    assert agent.find("following the directory", method="psearch")
    assert {"user000000", "user000005"} <= setup.passwd_users()

    ds389.modify(set_forward("user000001", "u1@moved.example"))
    setup.wait_map("user000001@example.org", "u1@moved.example", timeout=5)
    ds389.modify(user_ldif("newbie", "newbie@far.example"))
    setup.wait_map("newbie@example.org", "newbie@far.example", timeout=5)
    ds389.modify(f"dn: uid=newbie,{USERS}\nchangetype: modrdn\nnewrdn: uid=renamed\ndeleteoldrdn: 1\n")
    setup.wait_map("renamed@example.org", "newbie@far.example", timeout=5)
    assert setup.postmap_q("newbie@example.org") is None
    ds389.modify(f"dn: uid=renamed,{USERS}\nchangetype: delete\n")
    setup.wait_map("renamed@example.org", None, timeout=5)
    wait_until(
        lambda: "renamed" not in setup.passwd_users() and "user000003" in setup.passwd_users(),
        5,
        what="passwd-file follows the delete",
    )
    no_errors(agent)


def test_follows_group_membership_changes(slapd_factory: Callable[..., Slapd], agents: Agents, tmp_path: Path) -> None:
    """Groups come through the same syncrepl stream as accounts: a new member is installed live."""
    from slapd import DEMO_LDIF, FIXTURES, SUFFIX

    server = slapd_factory(ldif_files=(BASE_LDIF, DEMO_LDIF, FIXTURES / "groups.ldif"))
    setup = AgentSetup.for_slapd(tmp_path / "a", server, agent=FAST, base_dn="dc=example,dc=org")
    setup.doc["groups"] = {"base_dn": "ou=groups,dc=example,dc=org"}
    setup.write_config()
    agent = start_ready(agents, setup)
    setup.wait_map("ops@example.org", "bob@example.org,grace@example.org", timeout=5)
    server.modify(f"dn: cn=ops,ou=groups,{SUFFIX}\nchangetype: modify\nadd: member\nmember: uid=carol,{USERS}\n")
    setup.wait_map("ops@example.org", "bob@example.org,carol@example.org,grace@example.org", timeout=5)
    # the nested group follows: admins and ops are on one cycle and share their members
    everyone = "alice@example.org,bob@example.org,carol@example.org,frank@example.org,grace@example.org"
    setup.wait_map("staff@example.org", everyone, timeout=5)
    assert agent.alive


# -- failures, readiness, single instance, reachability ------------------------------------------
def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m ldapsync -c CONFIG ARGS...`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "ldapsync", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=str(config.parent),
    )


def timed_cli(config: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """cli() and how many seconds it took."""
    started = time.monotonic()
    proc = cli(config, *args)
    return proc, time.monotonic() - started


def refusing_check_hook(setup: AgentSetup) -> Path:
    """A check hook that counts its runs in a file and refuses every install."""
    runs = setup.root / "check-runs.log"
    setup.doc["hooks"]["check"] = [["sh", "-c", f"echo run >> '{runs}'; echo 'map looks wrong' >&2; exit 3"]]
    setup.write_config()
    return runs


def count_runs(runs: Path) -> int:
    try:
        return runs.read_text().count("run")
    except FileNotFoundError:
        return 0


def test_failed_sync_is_retried_after_the_backoff(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    """A refusing check hook used to be re-run every few milliseconds (250 times in 10 s)."""
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)  # agent.retry_initial: default 1 s
    runs = refusing_check_hook(setup)
    agent = agents(setup)
    failed = agent.wait_log("sync failed; installed files stay; will retry", timeout=20)
    assert failed["retry_in"] >= 1.0 and "map looks wrong" in failed["error"]
    first = time.monotonic()
    time.sleep(3.0)
    n = count_runs(runs)
    assert 1 <= n <= 3, f"{n} check-hook runs within {time.monotonic() - first:.1f}s of the first failure"
    assert not setup.virtual.exists(), "a refused install must not be installed"
    retries = [r["retry_in"] for r in agent.find("sync failed; installed files stay; will retry")]
    assert retries == sorted(retries) and len(set(retries)) == len(retries), f"backoff must grow: {retries}"
    assert agent.alive


def test_ready_and_status_when_the_first_sync_fails(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    """systemd would kill and restart an agent that never says READY, although it serves the installed maps."""
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    refusing_check_hook(setup)
    with NotifyListener() as notify:
        agent = agents(setup, notify.env)
        notify.wait("READY=1", timeout=20)
        failed = [s for s in notify.lines("STATUS=") if "FAILED" in s]
        assert failed, f"STATUS never said the sync failed: {notify.lines('STATUS=')}"
        assert "map looks wrong" in failed[0] and "retry in" in failed[0]
        assert agent.find("sync failed; installed files stay; will retry")
        assert len(notify.lines("READY=1")) == 1
        assert agent.alive


def test_single_instance_per_state_dir(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    first = start_ready(agents, setup)
    pid = str(first.proc.pid)

    second = agents(setup)
    assert second.proc.wait(20) != 0, "a second agent on the same state_dir must refuse to start"
    refused = second.wait_log("not starting: another agent runs on this state_dir")
    assert f"PID {pid}" in refused["error"] and str(setup.state / "lock") in refused["error"]
    assert first.alive

    # --once waits for the agent's lock and cannot get it; approve and rollback are answered by
    # the agent itself (its one writer carries them out), side by side and at once
    commands = (["--once"], ["approve"], ["rollback"])
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        results = dict(
            zip(map(tuple, commands), pool.map(lambda a: timed_cli(setup.config, *a), commands), strict=True)
        )
    proc, took = results[("--once",)]
    assert proc.returncode == 1, f"--once: rc={proc.returncode}\n{proc.stderr}"
    assert f"ldapsync agent (PID {pid})" in proc.stderr, f"--once must name the agent's PID:\n{proc.stderr}"
    assert took >= 4.0, "--once should wait a little for the lock first"
    proc, took = results[("approve",)]
    assert (proc.returncode, proc.stdout) == (0, "no held change\n"), proc.stderr
    proc, took = results[("rollback",)]
    assert proc.returncode == 1 and "the agent answered: no earlier generation" in proc.stderr, proc.stderr
    assert took < 4.0, "the agent answers at once"

    status = json.loads(cli(setup.config, "status", "--json").stdout)
    assert status["agent"] == {"running": True, "pid": int(pid), "lock": {"pid": int(pid), "role": "agent"}}
    assert f"running (PID {pid})" in cli(setup.config, "status").stdout

    assert first.terminate()[0] == 0
    status = json.loads(cli(setup.config, "status", "--json").stdout)
    assert status["agent"]["running"] is False and status["agent"]["lock"] is None
    assert cli(setup.config, "--once").returncode == 0


def _state_file(path: Path) -> bool:
    return path.is_file() and path.name != "lock.mdb"


def test_read_only_commands_neither_wait_for_the_lock_nor_write(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    agent = start_ready(agents, setup)
    time.sleep(0.5)  # let the agent finish its bookkeeping after the first sync
    agent.pause()  # nothing of the agent's may move while we look
    try:
        # but for LMDB's table of readers (lock.mdb): a reader of the store takes a slot in it
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in setup.state.rglob("*") if _state_file(p)}
        for args in (["status"], ["status", "--json"], ["snapshots"], ["--dry-run"], ["check", "--max-age", "900"]):
            started = time.monotonic()
            proc = cli(setup.config, *args)
            assert proc.returncode in (0, 1), f"{args}: rc={proc.returncode}\n{proc.stderr}"
            assert time.monotonic() - started < 4.0, f"{args} waited for the agent's lock"
        after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in setup.state.rglob("*") if _state_file(p)}
        assert after == before, "a read-only command wrote to the state dir"
    finally:
        agent.resume()


def test_ldap_reachable_follows_the_follower(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    """status.json and `ldapsync status` say the directory is away within ~timeout, and clear it after."""
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST, timeout=1)
    prom = setup.root / "ldapsync.prom"
    setup.doc["metrics"] = {"textfile": str(prom)}
    setup.write_config()
    agent = start_ready(agents, setup)
    status_file = setup.state / "status.json"

    def metric() -> float | None:
        found = re.search(r"^ldapsync_ldap_reachable(?:\{[^}]*\})? (\S+)$", prom.read_text(), re.MULTILINE)
        return float(found.group(1)) if found else None

    def status() -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(status_file.read_text())
        return doc

    wait_until(lambda: status().get("ldap_reachable") is True, 5, what="ldap_reachable true")
    port = slapd.port
    mark = agent.mark()
    slapd.stop()
    wait_until(lambda: status().get("ldap_reachable") is False, 5, what="ldap_reachable false with slapd down")
    time.sleep(1.5)  # longer than the configured timeout: still away, and the agent still up
    down = json.loads(cli(setup.config, "status", "--json").stdout)
    assert down["ldap_reachable"] is False
    assert down["follower_error"], f"no error recorded: {down}"
    # monitoring agrees: away for longer than `timeout` is WARNING, naming LDAP (not "OK, confirmed")
    proc = cli(setup.config, "check", "--max-age", "900")
    assert proc.returncode == 1 and "LDAP unreachable for" in proc.stdout, proc.stdout
    wait_until(lambda: metric() == 0, 5, what="ldapsync_ldap_reachable 0")
    assert agent.alive and agent.find("directory connection failed; retrying", since=mark)

    slapd.start()
    assert slapd.port == port
    wait_until(lambda: status().get("ldap_reachable") is True, 15, what="ldap_reachable true after slapd returns")
    up = json.loads(cli(setup.config, "status", "--json").stdout)
    assert up["ldap_reachable"] is True
    assert cli(setup.config, "check", "--max-age", "900").returncode == 0
    assert not up["follower_error"] and not up["error"], f"error not cleared: {up}"
    wait_until(lambda: metric() == 1, 5, what="ldapsync_ldap_reachable 1")


def test_a_static_edit_before_the_file_watcher_starts_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are read when the agent is built and watched only once it runs: an edit in
    between must still reach the scheduler, as the watcher would have reported it."""
    from ldapsync import agent as agent_mod
    from ldapsync import config as config_mod
    from ldapsync import scheduler as sched_mod

    static = tmp_path / "mail.yaml"
    static.write_text("aliases: {postmaster: [alice]}\n")
    (tmp_path / "d.ldif").write_text("")
    conf = tmp_path / "ldapsync.yaml"
    conf.write_text(
        "domain: example.org\nsource: {ldif: d.ldif}\nstatic: mail.yaml\nstate_dir: state\n"
        "exporters: [{kind: postfix-virtual, path: out/virtual, map_type: texthash}]\n"
    )
    with NotifyListener() as listener:  # systemd's socket, as under the unit
        monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
        quiet = agent_mod.Agent(config_mod.load(conf))
        quiet._catch_early_edits()
        assert quiet.events.empty()
        edited = agent_mod.Agent(config_mod.load(conf))
        static.write_text("aliases: {postmaster: [alice], sales: [bob]}\n")
        edited._catch_early_edits()
        posted = edited.events.get_nowait()
        assert isinstance(posted, agent_mod.Happened) and isinstance(posted.event, sched_mod.ConfigEdited)
        for agent in (quiet, edited):
            agent.notifier.sender.socket.close()  # the process's lifetime, not a test's


def test_a_held_change_is_approved_while_the_agent_runs(slapd: Slapd, agents: Agents, tmp_path: Path) -> None:
    """`approve` used to wait 5 s for the agent's lock and fail: the admin had to stop the service."""
    setup = AgentSetup.for_slapd(tmp_path / "a", slapd, agent=FAST)
    setup.doc["safety"] = {"max_deletions": 1}
    setup.write_config()
    agent = start_ready(agents, setup)
    slapd.modify(user_ldif("leaving1", "l1@far.example") + "\n" + user_ldif("leaving2", "l2@far.example"))
    wait_until(lambda: {"leaving1", "leaving2"} <= setup.passwd_users(), 5, what="two new users installed")
    mark = agent.mark()
    slapd.modify(f"dn: uid=leaving1,{USERS}\nchangetype: delete\n\ndn: uid=leaving2,{USERS}\nchangetype: delete\n")
    agent.wait_log("change held for review: run `ldapsync --dry-run` to see it, `ldapsync approve` to install it", mark)
    assert {"leaving1", "leaving2"} <= setup.passwd_users(), "a held change is not installed"

    proc, took = timed_cli(setup.config, "approve")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("approved held change (") and "dovecot-passwd" in proc.stdout, proc.stdout
    assert not {"leaving1", "leaving2"} & setup.passwd_users(), "installed by the time approve answers"
    assert took < 4.0, f"approve took {took:.1f}s (it must not wait for the lock)"
    done = agent.wait_log("control request done", mark, command="approve")
    assert done["ok"] is True
    status = json.loads(cli(setup.config, "status", "--json").stdout)
    assert status["held"] is None and status["live"]["pid"] == agent.proc.pid
    assert agent.alive
    no_errors(
        agent,
        mark,
        allow=("change held for review: run `ldapsync --dry-run` to see it, `ldapsync approve` to install it",),
    )
