"""Safety: guards, last-known-good, generations, rollback, state-dir hygiene, reload retry.

Driven through the real CLI (`python -m ldapsync`), as cron or systemd would run it, so exit
codes and what lands on disk are what an admin sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from slapd import Slapd, generate_users_ldif

from ldapsync import config as config_mod
from ldapsync import sync
from ldapsync.state import State
from ldapsync.status import SyncResult

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
BASE_LDIF = REPO / "fixtures" / "ldif" / "base.ldif"
EXPORTERS: list[dict[str, Any]] = [
    {"kind": "postfix-virtual", "name": "alias", "path": "out/maps/alias", "include": ["aliases", "forwards"]},
    {"kind": "postfix-recipients", "path": "out/maps/recipients"},
    {"kind": "postfix-sender-login", "path": "out/maps/sender_login"},
    {"kind": "dovecot-passwd", "path": "out/dovecot/passwd", "mode": "0640"},
]
NAMES = ["alias", "postfix-recipients", "postfix-sender-login", "dovecot-passwd"]
EXIT_HELD = 4


# -- helpers -------------------------------------------------------------------------------
class Site:
    """One tmp dir: config, an LDIF source we can rewrite, outputs and state."""

    def __init__(self, root: Path, **top: Any):
        self.root = root
        self.ldif = root / "users.ldif"
        if not self.ldif.exists():
            self.ldif.write_bytes(DEMO_LDIF.read_bytes())
        self.top = top
        self.config = root / "ldapsync.yaml"
        self.write_config()

    def write_config(self, **more: Any) -> None:
        self.top.update(more)
        doc: dict[str, Any] = {
            "domain": "example.org",
            "domain_aliases": ["example.net"],
            "source": {"ldif": {"path": str(self.ldif), "base_dn": "ou=users,dc=example,dc=org"}},
            "state_dir": "state",
            "exporters": EXPORTERS,
            **self.top,
        }
        self.config.write_text(yaml.safe_dump(doc))

    @property
    def state(self) -> State:
        return State(self.root / "state")

    def run(self, *args: str, check: int | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "ldapsync", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        return proc

    def outputs(self) -> dict[str, tuple[bytes, int, int]]:
        """Every file under out/ (compiled maps too): bytes, inode, mtime_ns."""
        out = self.root / "out"
        return {
            str(p.relative_to(out)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*"))
            if p.is_file()
        }

    def sources(self) -> dict[str, bytes]:
        """The text outputs only: a recompiled .db is not byte-reproducible, its answers are."""
        return {k: v[0] for k, v in self.outputs().items() if not k.endswith((".db", ".lmdb", ".cdb"))}

    def text(self, rel: str) -> str:
        return (self.root / "out" / rel).read_text()

    def status(self) -> dict[str, Any]:
        return dict(json.loads((self.root / "state" / "status.json").read_text()))


def users_ldif(n: int) -> str:
    return BASE_LDIF.read_text() + "\n" + generate_users_ldif(n)


def recorder_hook(root: Path, log: Path, fail_flag: Path | None = None) -> list[str]:
    """A hook that fails while fail_flag exists, else logs phase, generation and names."""
    script = root / "hook.sh"
    fail = f'if [ -e "{fail_flag}" ]; then echo "simulated failure" >&2; exit 3; fi\n' if fail_flag else ""
    script.write_text(
        "#!/bin/sh\nset -eu\n"
        + fail
        + f'echo "$LDAPSYNC_PHASE $LDAPSYNC_GENERATION ${{LDAPSYNC_CHANGED_NAMES:-}}" >> "{log}"\n'
    )
    script.chmod(0o755)
    return [str(script)]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- guards --------------------------------------------------------------------------------
def test_empty_directory_is_held_shown_approved_and_forced(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.run("--once", check=0)
    good = site.outputs()

    site.ldif.write_text(BASE_LDIF.read_text())  # the directory answers, but with no users
    proc = site.run("--once", check=EXIT_HELD)
    assert "no mail accounts" in proc.stderr
    assert site.outputs() == good, "an empty directory answer reached the maps"
    assert site.state.held() is not None
    assert site.status()["result"] == "held"

    proc = site.run("--dry-run", check=1)
    assert "-bob@example.org\tbob@elsewhere.example\n" in proc.stdout
    assert "HELD" in proc.stderr and "no mail accounts" in proc.stderr
    assert site.outputs() == good

    site.ldif.write_bytes(DEMO_LDIF.read_bytes())  # the held snapshot, not the live source, is approved
    site.run("approve", check=0)
    assert "bob@example.org" not in site.text("maps/alias")
    assert site.text("dovecot/passwd") == ""
    assert site.state.held() is None
    site.run("approve", check=0)  # nothing held: a no-op

    site.run("--once", check=0)  # additions are never held
    assert "bob@example.org\tbob@elsewhere.example" in site.text("maps/alias")
    site.ldif.write_text(BASE_LDIF.read_text())
    site.run("--once", "--force", check=0)
    assert site.text("dovecot/passwd") == ""
    site.ldif.write_bytes(DEMO_LDIF.read_bytes())
    site.run("--once", check=0)
    site.ldif.write_text(BASE_LDIF.read_text())
    site.run("--once", check=EXIT_HELD)  # --force was for one run only


@pytest.mark.parametrize(
    ("safety", "remaining", "reason"),
    [
        ({"max_deletions": 10, "max_deletion_ratio": 1.0}, 90, "max_deletions 10"),
        ({"max_deletions": 100_000, "max_deletion_ratio": 0.2}, 60, "max_deletion_ratio 0.2"),
    ],
)
def test_mass_deletion_is_held(tmp_path: Path, safety: dict[str, Any], remaining: int, reason: str) -> None:
    site = Site(tmp_path, safety=safety)
    site.ldif.write_text(users_ldif(100))
    site.run("--once", check=0)
    good = site.outputs()

    site.ldif.write_text(users_ldif(remaining))
    proc = site.run("--once", check=EXIT_HELD)
    assert reason in proc.stderr
    assert site.outputs() == good
    held = site.state.held()
    assert held is not None and reason in held[1]["reason"]

    site.ldif.write_text(users_ldif(97))  # a few leaving is normal business: installed
    site.run("--once", check=0)
    assert "user000097" not in site.text("maps/recipients") and "user000096" in site.text("maps/recipients")
    assert site.state.held() is None, "a later good sync supersedes the held change"


# -- LDAP down: last-known-good ----------------------------------------------------------------
def ldap_site(root: Path, server: Slapd, **top: Any) -> Site:
    ldap = {
        "uri": [server.uri],
        "bind_dn": server.service_dn,
        "bind_password_file": str(server.service_password_file),
        "base_dn": server.users_dn,
        "filter": "(objectClass=inetOrgPerson)",
        "timeout": 2,
    }
    return Site(root, source={"ldap": ldap}, **top)


@pytest.mark.slapd
def test_ldap_down_keeps_present_outputs_untouched(tmp_path: Path, slapd: Slapd) -> None:
    site = ldap_site(tmp_path, slapd)
    site.run("--once", check=0)
    good = site.outputs()
    slapd.stop()
    proc = site.run("--once", check=1)
    assert slapd.uri in proc.stderr
    assert site.outputs() == good, "outputs were touched while LDAP was down"
    assert site.status()["ldap_reachable"] is False


@pytest.mark.slapd
def test_ldap_down_restores_missing_outputs_from_last_known_good(tmp_path: Path, slapd: Slapd) -> None:
    site = ldap_site(tmp_path, slapd)
    site.run("--once", check=0)
    good = site.sources()
    gid = site.state.current_id()
    slapd.stop()
    for rel in ("maps/alias", "maps/alias.db", "dovecot/passwd"):
        (tmp_path / "out" / rel).unlink()

    proc = site.run("--once", check=1)  # installed from LKG, but LDAP is still down: not a success
    assert "LAST-KNOWN-GOOD" in proc.stderr and gid in proc.stderr
    assert site.sources() == good
    assert (tmp_path / "out/maps/alias.db").exists()
    assert (tmp_path / "out/dovecot/passwd").stat().st_mode & 0o777 == 0o640
    assert site.status()["source"] == f"last-known-good:{gid}"


@pytest.mark.slapd
def test_new_exporter_while_ldap_down_is_rendered_from_last_known_good(tmp_path: Path, slapd: Slapd) -> None:
    site = ldap_site(tmp_path, slapd)
    site.run("--once", check=0)
    slapd.stop()
    new = {"kind": "postfix-transport", "path": "out/maps/transport", "nexthop": "smtp:[srs.example.org]"}
    site.write_config(exporters=[*EXPORTERS, new])
    proc = site.run("--once", check=1)
    assert "LAST-KNOWN-GOOD" in proc.stderr
    assert "bob@example.org\tsmtp:[srs.example.org]" in site.text("maps/transport")
    assert (tmp_path / "out/maps/transport.db").exists()
    slapd.start()  # what LKG rendered is exactly what the directory gives
    site.run("--dry-run", check=0)


# -- generations, snapshots, rollback ------------------------------------------------------------
def test_generations_are_recorded_pruned_listed_and_rolled_back(tmp_path: Path) -> None:
    log = tmp_path / "check.log"
    site = Site(tmp_path, keep_generations=3, hooks={"check": [recorder_hook(tmp_path, log)]})
    versions = {}
    for i in range(5):
        site.ldif.write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", f"bob@v{i}.example"))
        site.run("--once", check=0)
        versions[site.state.current_id()] = site.text("maps/alias")
    ids = list(versions)
    gens = [g.id for g in site.state.generations()]
    assert gens == ids[:1:-1], "keep_generations: 3, newest first"
    assert sorted(p.name for p in (tmp_path / "state/generations").iterdir()) == sorted(ids[2:])

    listing = site.run("snapshots", check=0).stdout.splitlines()
    assert [line[2:].split()[0] for line in listing] == gens
    assert listing[0].startswith("* ") and not listing[1].startswith("*")

    checks_before = len(lines(log))
    proc = site.run("rollback", check=0)  # default: the generation before the current one
    assert ids[3] in proc.stdout
    assert site.text("maps/alias") == versions[ids[3]]
    assert "bob@example.org\tbob@v3.example" in site.text("maps/alias")
    assert len(lines(log)) == checks_before + 1 and lines(log)[-1].startswith("check "), "check hook skipped"
    assert site.state.current_id() == ids[3]

    site.run("rollback", ids[2], check=0)
    assert site.text("maps/alias") == versions[ids[2]]
    proc = site.run("rollback", "19700101T000000Z-00000000")
    assert proc.returncode == 1 and "19700101T000000Z-00000000" in proc.stderr


def test_rollback_refused_by_a_check_hook_changes_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.run("--once", check=0)
    first = site.state.current_id()
    site.ldif.write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    site.run("--once", check=0)
    good = site.outputs()
    site.write_config(hooks={"check": [["false"]]})
    proc = site.run("rollback", str(first))
    assert proc.returncode == 1 and "check hook" in proc.stderr
    assert site.outputs() == good
    assert site.state.current_id() != first


# -- a damaged state dir -------------------------------------------------------------------------
def _damage(state: Path, what: str) -> None:
    gen = state / "generations" / (state / "current").read_text().strip()
    if what == "meta":
        (gen / "meta.json").write_text('{"id": "trunc')
    elif what == "snapshot":  # the directory data: the base in the store
        base = state / "store" / json.loads((gen / "meta.json").read_bytes())["store"]["base"]
        data = base.read_bytes()
        base.write_bytes(data[: len(data) // 2])
    elif what == "output":
        (gen / "outputs" / "alias").write_bytes(b"")
    else:
        (state / "status.json").write_bytes(b"\x00\xffgarbage{")


@pytest.mark.parametrize("what", ["meta", "snapshot", "output", "status"])
def test_damaged_state_is_detected_reported_and_rebuilt(tmp_path: Path, what: str) -> None:
    site = Site(tmp_path)
    site.run("--once", check=0)
    _damage(tmp_path / "state", what)

    proc = site.run("--once", check=0)  # LDAP (here: the LDIF) is fine: rebuild from it
    assert "damaged" in proc.stderr or "unreadable" in proc.stderr, proc.stderr
    assert site.status()["result"] in ("installed", "unchanged")
    lkg = site.state.last_good()
    assert lkg is not None and lkg.id == site.state.current_id()
    lkg.verify()

    # the rebuilt last-known-good really works: source gone and outputs wiped
    good = site.sources()
    site.ldif.unlink()
    shutil.rmtree(tmp_path / "out")
    proc = site.run("--once", check=1)
    assert "LAST-KNOWN-GOOD" in proc.stderr
    assert site.sources() == good


def test_a_generation_a_killed_run_left_half_recorded_is_removed_by_the_next_sync(tmp_path: Path) -> None:
    """kill -9 while recording leaves a .tmp-* copy of the snapshot; an unchanged sync records nothing new."""
    site = Site(tmp_path)
    site.run("--once", check=0)
    half = tmp_path / "state" / "generations" / ".tmp-k1ll3d"
    (half / "outputs").mkdir(mode=0o700, parents=True)
    (half / "snapshot.json").write_text("{")
    site.run("--once", check=0)
    assert site.status()["result"] == "unchanged"  # nothing new recorded: no prune either
    assert not half.exists()
    assert [g.id for g in site.state.generations()] == [site.state.current_id()]


# -- secrets at rest -----------------------------------------------------------------------------
def test_state_dir_is_0700_and_its_files_0600(tmp_path: Path) -> None:
    site = Site(tmp_path, metrics={"textfile": "metrics/ldapsync.prom"})
    (tmp_path / "metrics").mkdir()
    os.umask(old := os.umask(0o022))
    site.run("--once", check=0)
    site.ldif.write_text(BASE_LDIF.read_text())
    site.run("--once", check=EXIT_HELD)  # held/ too
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for p in state.rglob("*"):
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p.relative_to(state)}: {mode:04o}"
    assert old == 0o022


def test_group_readable_state_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o750)
    (tmp_path / "state").chmod(0o750)
    site = Site(tmp_path)
    proc = site.run("--once")
    assert proc.returncode == 1
    assert "chmod 0700" in proc.stderr and str(tmp_path / "state") in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "state" / "generations").exists()


# -- reload hooks: failures are retried, hangs are killed ----------------------------------------
def test_failed_reload_keeps_files_and_is_retried_next_sync(tmp_path: Path) -> None:
    log, flag = tmp_path / "reload.log", tmp_path / "reload-fails"
    flag.touch()
    site = Site(tmp_path, hooks={"reload": [recorder_hook(tmp_path, log, flag)]})
    proc = site.run("--once", check=0)  # the maps are in place: Postfix/Dovecot pick them up
    assert "reload hook failed" in proc.stderr and "simulated failure" in proc.stderr
    assert "bob@example.org\tbob@elsewhere.example" in site.text("maps/alias")
    status = site.status()
    assert sorted(status["reload_pending"]) == sorted(NAMES) and "exited 3" in status["reload_error"]
    assert lines(log) == []

    site.run("--once", check=0)  # still failing: still pending, nothing lost
    assert sorted(site.status()["reload_pending"]) == sorted(NAMES)

    flag.unlink()
    site.run("--once", check=0)  # nothing changed in LDAP, but the reload is owed
    (call,) = lines(log)
    assert call.startswith("reload ") and sorted(call.split()[2:]) == sorted(NAMES)
    assert site.status()["reload_pending"] == []

    site.run("--once", check=0)
    assert len(lines(log)) == 1, "reload ran again although nothing changed and nothing was owed"


def test_hanging_reload_hook_is_killed_after_timeout(tmp_path: Path) -> None:
    site = Site(tmp_path, hooks={"reload": [["sleep", "60"]], "timeout": 1})
    started = time.monotonic()
    proc = site.run("--once", check=0)
    assert time.monotonic() - started < 15
    assert "timed out after 1s" in proc.stderr
    assert "bob@example.org" in site.text("maps/alias")
    assert site.status()["reload_pending"]


def test_pipeline_survives_reload_failure_in_process(tmp_path: Path) -> None:
    """The agent calls Pipeline.run in a loop: a reload failure must come back as a result."""
    from ldapsync import config as config_mod
    from ldapsync import sync

    site = Site(tmp_path, hooks={"reload": [["false"]]})
    pipeline = sync.Pipeline(config_mod.load(site.config))
    assert pipeline.run().status == "installed"
    site.ldif.write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    assert pipeline.run().status == "installed"
    assert "bob@new.example" in site.text("maps/alias")


# -- the generation id hooks and the log see ------------------------------------------------------
def test_hooks_and_log_only_ever_see_listed_generations(tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    hook = recorder_hook(tmp_path, log)
    site = Site(tmp_path, hooks={"check": [hook], "reload": [hook]})
    seen_in_log: list[str] = []

    def run(*args: str, check: int) -> None:
        proc = site.run(*args, check=check)
        seen_in_log.extend(re.findall(r"generation[=\"': ]+(\d{8}T\d{6}Z-[0-9a-f]{8}(?:\.\d+)?)", proc.stderr))

    run("--once", check=0)
    site.ldif.write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    run("--once", check=0)
    run("rollback", check=0)  # back to the first generation
    (tmp_path / "out/maps/alias").write_text("edited by hand\n")  # same directory content, file repaired
    site.ldif.write_bytes(DEMO_LDIF.read_bytes())
    run("--once", check=0)
    site.ldif.unlink()  # LDAP gone, an output lost: restored from last-known-good
    (tmp_path / "out/dovecot/passwd").unlink()
    run("--once", check=1)

    listed = {line[2:].split()[0] for line in site.run("snapshots", check=0).stdout.splitlines()}
    hook_ids = [line.split()[1] for line in lines(log)]
    assert len(hook_ids) >= 8, lines(log)  # check + reload for each of the five installs
    assert set(hook_ids) <= listed, f"hooks saw {set(hook_ids) - listed}, `snapshots` lists {listed}"
    assert seen_in_log and set(seen_in_log) <= listed, f"the log named {set(seen_in_log) - listed}"


# -- plan and apply ---------------------------------------------------------------------------------
def pipeline_for(site: Site, *, follow: bool = False) -> sync.Pipeline:
    return sync.Pipeline(config_mod.load(site.config), follow=follow)


def tree(root: Path) -> dict[str, tuple[bytes | None, int]]:
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes(), p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_plan_has_no_side_effects_and_counts_each_output(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.run("--once", check=0)
    text = DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example")
    site.ldif.write_text(text + "\n" + generate_users_ldif(2))
    pipeline = pipeline_for(site)
    snapshot = pipeline.read_source()
    before = tree(tmp_path)

    plan = pipeline.plan(snapshot)
    again = pipeline.plan(snapshot)
    assert tree(tmp_path) == before, "plan() wrote something"
    assert replace(plan, generation="") == replace(again, generation=""), "plan() is a function of its inputs"
    assert plan.verdict is sync.Verdict.INSTALL and plan.new_generation
    assert set(plan.changed) == set(NAMES)
    assert (plan.counts["alias"].changed, plan.counts["alias"].removed) == (1, 0)
    recipients = sync.Delta(added=4, removed=0, changed=0)  # two users, in example.org and example.net
    assert plan.counts["postfix-recipients"] == recipients and str(recipients) == "+4 -0 ~0"

    result = pipeline.apply(plan)
    assert result.status == SyncResult.INSTALLED and result.generation == plan.generation
    assert site.state.current_id() == plan.generation
    assert "bob@example.org\tbob@new.example" in site.text("maps/alias")

    noop = pipeline.plan(pipeline.read_source())
    assert noop.verdict is sync.Verdict.NOOP and noop.changed == ()
    assert noop.generation == plan.generation and not noop.new_generation
    outputs, generations = site.outputs(), tree(tmp_path / "state" / "generations")
    assert pipeline.apply(noop).status == SyncResult.UNCHANGED
    assert site.outputs() == outputs and tree(tmp_path / "state" / "generations") == generations


def test_an_agent_after_a_change_plans_what_a_fresh_run_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived pipeline splices its outputs and takes the guards' counts from the splice;
    they must be what a fresh --once computes by parsing the installed files."""
    site = Site(tmp_path)
    pipeline = pipeline_for(site, follow=True)
    assert pipeline.apply(pipeline.plan(pipeline.read_source())).status == SyncResult.INSTALLED
    parsed: list[str] = []
    full_diff = sync.guards.diff
    monkeypatch.setattr(sync.guards, "diff", lambda name, *a, **kw: parsed.append(name) or full_diff(name, *a, **kw))

    def fresh_plan() -> sync.Plan:
        fresh = pipeline_for(site)  # the first render of a pipeline is whole: what --once does
        return fresh.plan(fresh.read_source())

    text = DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example")
    site.ldif.write_text(text.replace("uid: alice", "uid: alicia") + "\n" + generate_users_ldif(2))
    plan, fresh = pipeline.plan(pipeline.read_source()), fresh_plan()
    assert [o.data for o in plan.outputs] == [o.data for o in fresh.outputs]
    assert plan.counts == fresh.counts
    # alice is gone: erin's forward to her only (dead target: erin refuses mail now) and her
    # place in webmaster's forward go with her line
    assert plan.counts["alias"] == sync.Delta(4, 3, 2) and plan.counts["dovecot-passwd"] == sync.Delta(3, 1, 0)
    assert parsed == NAMES, "only the fresh pipeline parses the installed files"

    # not installed (a dry run, a held change): the next plan counts against what IS installed
    parsed.clear()
    site.ldif.write_text(text + "\n" + generate_users_ldif(3))
    plan, fresh = pipeline.plan(pipeline.read_source()), fresh_plan()
    assert [o.data for o in plan.outputs] == [o.data for o in fresh.outputs]
    assert plan.counts == fresh.counts and plan.counts["dovecot-passwd"] == sync.Delta(3, 0, 0)
    assert parsed == NAMES * 2


def test_apply_counts_its_own_plan_in_the_guards_window_whatever_was_planned_since(tmp_path: Path) -> None:
    """The plan carries what its guards counted: apply() needs nothing another plan() may have replaced."""
    site = Site(tmp_path, safety={"window": 3600})
    site.run("--once", check=0)
    site.ldif.write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    pipeline = pipeline_for(site)
    plan = pipeline.plan(pipeline.read_source())
    assert plan.counts["alias"].changed == 1
    assert [d for d in plan.guarded if d.counts] and all(d.output in NAMES for d in plan.guarded)
    site.ldif.write_text(DEMO_LDIF.read_text())
    other = pipeline.plan(pipeline.read_source())  # e.g. a --dry-run between, or a newer change
    assert other.verdict is sync.Verdict.NOOP

    assert pipeline.apply(plan).status == SyncResult.INSTALLED
    window = site.state.guard_window()
    counted = {name: sum(e.changed for e in events) for name, events in window.events.items()}
    assert counted.get("alias") == 1, f"the applied plan's change was not counted: {counted}"


def test_plan_holds_what_a_guard_refuses_and_apply_keeps_it(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.run("--once", check=0)
    good = site.outputs()
    site.ldif.write_text(BASE_LDIF.read_text())
    pipeline = pipeline_for(site)
    plan = pipeline.plan(pipeline.read_source())
    assert plan.verdict is sync.Verdict.HOLD and plan.held_reason and "no mail accounts" in plan.held_reason
    assert plan.counts["postfix-recipients"].removed > 0
    assert pipeline.plan(pipeline.read_source(), force=True).verdict is sync.Verdict.INSTALL

    result = pipeline.apply(plan)
    assert result.status == SyncResult.HELD and site.outputs() == good
    held = site.state.held()
    assert held is not None and held[1]["counts"]["postfix-recipients"].startswith("+0 -")
    assert site.status()["held"] == plan.held_reason and site.status()["syncs"] == {"installed": 1, "held": 1}


def test_follower_notes_write_only_when_something_changes(tmp_path: Path) -> None:
    site = Site(tmp_path)
    pipeline = pipeline_for(site)
    pipeline.note_confirmed()  # nothing installed yet: nothing to confirm
    assert not (tmp_path / "state" / "status.json").exists()
    assert pipeline.run().status == SyncResult.INSTALLED
    path = tmp_path / "state" / "status.json"
    pipeline.note_follower(True, None)
    written = path.stat().st_mtime_ns, path.read_bytes()
    pipeline.note_follower(True, None)
    t0 = site.status()["last_confirmed"]
    pipeline.note_confirmed(now=t0 + sync.CONFIRM_REFRESH / 2)  # within CONFIRM_REFRESH: the record stays
    assert (path.stat().st_mtime_ns, path.read_bytes()) == written
    pipeline.note_confirmed(now=t0 + sync.CONFIRM_REFRESH + 1)
    assert site.status()["last_confirmed"] == t0 + sync.CONFIRM_REFRESH + 1
    assert site.status()["last_success"] == t0, "confirming is not syncing"
    pipeline.note_follower(False, "ldap://ldap-01: timed out")
    assert site.status()["ldap_reachable"] is False and site.status()["follower_error"] == "ldap://ldap-01: timed out"


# -- what an install changed: keys, not lines -------------------------------------------------
def _events(stderr: str, event: str) -> list[dict[str, Any]]:
    """The JSON log events named `event` (each line may start with its <N> syslog priority)."""
    found = []
    for line in stderr.splitlines():
        line = re.sub(r"^<\d>", "", line)
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("event") == event:
                found.append(doc)
    return found


def test_an_install_reports_keys_added_removed_and_changed_in_log_status_metrics_and_generation(
    tmp_path: Path,
) -> None:
    """One changed forward is one changed key in the log, the status record, the metrics and
    the generation's meta, never the output's line count."""
    prom = tmp_path / "ldapsync.prom"
    site = Site(tmp_path, metrics={"textfile": str(prom)})
    site.run("--once", check=0)
    first = _events(site.run("--once", check=0).stderr, "installed")
    assert first == [], "nothing changed: nothing installed"

    text = DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example")
    site.ldif.write_text(text)
    proc = site.run("--once", check=0)
    (installed,) = _events(proc.stderr, "installed")
    assert installed["changed"] == {"alias": {"added": 0, "removed": 0, "changed": 1}}
    status = site.status()
    assert status["last_changes"] == {"alias": {"added": 0, "removed": 0, "changed": 1}}
    assert "\nlast install:   alias +0 -0 ~1 (keys)\n" in site.run("status", check=0).stdout
    shown = json.loads(site.run("status", "--json", check=0).stdout)
    assert shown["last_changes"] == {"alias": {"added": 0, "removed": 0, "changed": 1}}
    assert 'ldapsync_last_install_keys{kind="changed",output="alias"} 1.0' in prom.read_text()
    gen = site.state.get()
    assert gen is not None and gen.meta["delta"]["alias"] == {"added": 0, "removed": 0, "changed": 1}

    site.ldif.write_text(text + "\n" + generate_users_ldif(1))  # one user: in both domains
    (installed,) = _events(site.run("--once", check=0).stderr, "installed")
    assert installed["changed"]["postfix-recipients"] == {"added": 2, "removed": 0, "changed": 0}
    assert installed["changed"]["dovecot-passwd"] == {"added": 1, "removed": 0, "changed": 0}
    status = site.status()
    assert status["last_changes"]["postfix-recipients"] == {"added": 2, "removed": 0, "changed": 0}
    assert "alias" in status["last_changes"] and status["changes_total"]["alias"]["changed"] == 1
    assert status["changes_total"]["postfix-recipients"]["added"] > 2, "the first install's keys count too"
    metrics = prom.read_text()
    assert 'ldapsync_last_install_keys{kind="added",output="postfix-recipients"} 2.0' in metrics
    assert 'ldapsync_keys_changed_total{kind="changed",output="alias"} 1.0' in metrics

    # a rollback measures what it changes as well
    proc = site.run("rollback", check=0)
    (installed,) = _events(proc.stderr, "installed")
    assert installed["changed"]["postfix-recipients"] == {"added": 0, "removed": 2, "changed": 0}
    assert site.status()["last_changes"]["dovecot-passwd"] == {"added": 0, "removed": 1, "changed": 0}
