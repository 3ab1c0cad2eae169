"""Operator visibility: `ldapsync status [--json]` and the Nagios/Icinga `check` plugin."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ldapsync.state import State

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
BASE_LDIF = REPO / "fixtures" / "ldif" / "base.ldif"
EXPORTERS: list[dict[str, Any]] = [
    {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "include": ["aliases", "forwards"]},
    {"kind": "postfix-recipients", "path": "out/recipients"},
    {"kind": "dovecot-passwd", "path": "out/passwd"},
]
# one line: "LDAPSYNC <STATE> - <text> | <perfdata>", perfdata 'label=value[uom][;warn;crit]' items
CHECK_LINE = re.compile(
    r"^LDAPSYNC (OK|WARNING|CRITICAL|UNKNOWN) - [^|\n]+?(?: \| ((?:[\w.-]+=[\d.]+s?(?:;[\d.]*){0,4} ?)+))?\n$"
)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    ldif = tmp_path / "users.ldif"
    ldif.write_bytes(DEMO_LDIF.read_bytes())
    doc = {
        "domain": "example.org",
        "source": {"ldif": {"path": str(ldif), "base_dn": "ou=users,dc=example,dc=org"}},
        "state_dir": "state",
        "exporters": EXPORTERS,
        "hooks": {"reload": [["sh", "-c", f"test ! -e {tmp_path / 'reload-fails'}"]]},
    }
    (tmp_path / "ldapsync.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path


def cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ldapsync", "-c", str(site / "ldapsync.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check(site: Path, *args: str) -> tuple[int, str, str]:
    proc = cli(site, "check", *args)
    assert CHECK_LINE.match(proc.stdout), f"not one Nagios status line: {proc.stdout!r}"
    return proc.returncode, proc.stdout, proc.stderr


def status_json(site: Path) -> dict[str, Any]:
    proc = cli(site, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_status_json_describes_the_installed_state(site: Path) -> None:
    assert cli(site, "--once").returncode == 0
    info = status_json(site)
    assert 0 <= info["last_success_age"] < 60
    assert info["result"] == "installed"
    assert info["source"] == f"ldif:{site / 'users.ldif'}"
    assert info["generation"] == State(site / "state").current_id() is not None
    assert info["held"] is None and info["reload_pending"] == []
    for exp in EXPORTERS:
        name = exp.get("name", exp["kind"])
        data = (site / exp["path"]).read_bytes()
        assert info["outputs"][name] == {
            "path": str(site / exp["path"]),
            "entries": data.count(b"\n"),
            "sha256": hashlib.sha256(data).hexdigest(),  # what an admin compares across MXes
        }
    human = cli(site, "status").stdout
    assert "held change:    none" in human and info["generation"] in human


def test_status_shows_a_held_change_and_an_outage(site: Path) -> None:
    cli(site, "--once")
    gen = State(site / "state").current_id()
    (site / "users.ldif").write_text(BASE_LDIF.read_text())
    assert cli(site, "--once").returncode == 4
    info = status_json(site)
    assert "no mail accounts" in info["held"] and info["result"] == "held"
    assert info["generation"] == gen, "a held change is not installed"

    (site / "users.ldif").unlink()
    assert cli(site, "--once").returncode == 1
    info = status_json(site)
    assert info["result"] == "failed" and "users.ldif" in info["error"] and info["ldap_reachable"] is False
    assert "last error:" in cli(site, "status").stdout


def test_check_states(site: Path) -> None:
    code, line, _ = check(site, "--max-age", "3600")
    assert code == 2 and "missing outputs" in line  # never synced

    cli(site, "--once")
    code, line, err = check(site, "--max-age", "3600")
    assert (code, err) == (0, "") and line.startswith("LDAPSYNC OK - ")
    perf = dict(item.split("=", 1) for item in line.split(" | ", 1)[1].split())
    assert perf["age"].endswith(";1800;3600") and perf["alias"] == str((site / "out/alias").read_bytes().count(b"\n"))

    code, line, _ = check(site, "--max-age", "3600", "--warn-age", "0")
    assert code == 1 and "last confirmed" in line
    code, line, _ = check(site, "--max-age", "0")
    assert code == 2 and "last confirmed" in line

    (site / "reload-fails").touch()  # a change whose reload fails: WARNING until retried
    (site / "users.ldif").write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    cli(site, "--once")
    code, line, _ = check(site, "--max-age", "3600")
    assert code == 1 and "reload pending" in line
    (site / "reload-fails").unlink()
    cli(site, "--once")
    assert check(site, "--max-age", "3600")[0] == 0

    (site / "users.ldif").write_text(BASE_LDIF.read_text())
    cli(site, "--once")
    code, line, _ = check(site, "--max-age", "3600")
    assert code == 1 and "held" in line

    (site / "out/passwd").unlink()
    code, line, _ = check(site, "--max-age", "3600")
    assert code == 2 and "dovecot-passwd" in line


def test_check_unknown_on_a_broken_config(site: Path) -> None:
    (site / "ldapsync.yaml").write_text("domain: [\n")
    code, line, err = check(site, "--max-age", "3600")
    assert code == 3 and line.startswith("LDAPSYNC UNKNOWN - ") and str(site / "ldapsync.yaml") in line
    assert err == ""


def state_tree(site: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under the site except the LDIF source: bytes (None for a directory) and mtime_ns."""
    return {
        str(p.relative_to(site)): (None if p.is_dir() else p.read_bytes(), p.lstat().st_mtime_ns)
        for p in sorted(site.rglob("*"))
        if p.name != "users.ldif"
    }


def test_read_only_commands_never_write_not_even_a_damaged_held_change(site: Path) -> None:
    assert cli(site, "--once").returncode == 0
    (site / "users.ldif").write_text(BASE_LDIF.read_text())
    assert cli(site, "--once").returncode == 4
    [held] = (site / "state" / "held").glob("held-*/snapshot.json")
    held.write_bytes(held.read_bytes()[:100])  # a held change that does not parse
    before = state_tree(site)
    for args in (["status"], ["status", "--json"], ["check", "--max-age", "900"], ["--dry-run"], ["snapshots"]):
        proc = cli(site, *args)
        assert proc.returncode in (0, 1, 4), f"{args}: {proc.stderr}"
        assert state_tree(site) == before, f"`ldapsync {' '.join(args)}` wrote to the state dir or the outputs"
    assert "no mail accounts" in status_json(site)["held"]
    proc = cli(site, "approve")  # refuses what it cannot read, and keeps it for the admin to look at
    assert proc.returncode == 1 and "held change" in proc.stderr and "unreadable" in proc.stderr
    assert held.exists()

    (site / "users.ldif").unlink()  # a failing sync writes its status, and leaves the held change alone
    assert cli(site, "--once").returncode == 1
    assert held.exists()

    (site / "users.ldif").write_bytes(DEMO_LDIF.read_bytes())  # a good sync supersedes it
    assert cli(site, "--once").returncode == 0
    assert not (site / "state" / "held").exists() and status_json(site)["held"] is None


def backdate(site: Path, seconds: float) -> None:
    """Pretend the status record was written `seconds` ago (what a quiet directory looks like later)."""
    path = site / "state" / "status.json"
    doc = json.loads(path.read_text())
    for key in ("last_attempt", "last_success", "last_confirmed"):
        if isinstance(doc.get(key), int | float):
            doc[key] -= seconds
    path.write_text(json.dumps(doc))


def test_a_quiet_directory_is_confirmed_not_critical(site: Path) -> None:
    from ldapsync import config as config_mod
    from ldapsync import sync

    assert cli(site, "--once").returncode == 0
    backdate(site, 2000)
    code, line, _ = check(site, "--max-age", "900")
    assert code == 2, line

    # an agent following a quiet directory: connected, nothing pending
    pipeline = sync.Pipeline(config_mod.load(site / "ldapsync.yaml"))
    pipeline.note_follower(True, None)
    pipeline.note_confirmed()
    code, line, _ = check(site, "--max-age", "900")
    assert code == 0, line
    info = status_json(site)
    assert info["last_confirmed_age"] < 60 and info["last_success_age"] > 1900, "nothing was installed"

    # cron: an --once that finds nothing to change confirms too
    backdate(site, 2000)
    assert cli(site, "--once").returncode == 0
    code, line, _ = check(site, "--max-age", "900")
    assert code == 0 and status_json(site)["result"] == "unchanged", line

    # a held change is not confirmed by a connected follower: the installed maps are not LDAP's answer
    (site / "users.ldif").write_text(BASE_LDIF.read_text())
    assert cli(site, "--once").returncode == 4
    backdate(site, 2000)
    pipeline.note_confirmed()
    assert check(site, "--max-age", "900")[0] == 2


def test_a_successful_sync_clears_the_previous_error(site: Path) -> None:
    assert cli(site, "--once").returncode == 0
    ldif = (site / "users.ldif").read_bytes()
    (site / "users.ldif").unlink()
    assert cli(site, "--once").returncode == 1
    info = status_json(site)
    assert "users.ldif" in info["error"] and info["ldap_reachable"] is False
    code, line, _ = check(site, "--max-age", "900")
    assert code == 1 and "last sync failed" in line and "users.ldif" in line

    (site / "users.ldif").write_bytes(ldif)
    assert cli(site, "--once").returncode == 0
    info = status_json(site)
    assert info["error"] is None and info["ldap_reachable"] is True and info["result"] == "unchanged"
    assert "last error" not in cli(site, "status").stdout
    assert check(site, "--max-age", "900")[0] == 0


def test_an_output_edited_by_hand_is_reported_until_the_next_sync(site: Path) -> None:
    assert cli(site, "--once").returncode == 0
    with (site / "out/alias").open("a") as fh:
        fh.write("postmaster@example.org\troot@example.org\n")
    code, line, _ = check(site, "--max-age", "900")
    assert code == 1 and "changed outside ldapsync" in line and "alias" in line, line
    assert status_json(site)["modified"] == ["alias"]
    assert "MODIFIED" in cli(site, "status").stdout
    assert cli(site, "--once").returncode == 0  # the sync puts back what LDAP says
    assert check(site, "--max-age", "900")[0] == 0 and status_json(site)["modified"] == []


def test_check_warns_when_a_running_agent_has_lost_ldap(site: Path) -> None:
    """status said `LDAP reachable: NO` while check said OK until the confirmation aged out."""
    import time
    from dataclasses import replace

    from ldapsync import status as status_mod

    assert cli(site, "--once").returncode == 0
    state = State(site / "state")
    now = time.time()
    record = status_mod.load(site / "state")
    status_mod.save(
        site / "state",
        replace(
            record,
            last_confirmed=now - 35,
            ldap_reachable=False,
            follower_connected=False,
            follower_error="ldap://ldap1: connection refused",
            ldap_lost=now - 35,
        ),
    )
    with state.lock(role="agent"):  # an agent runs (no control socket: status asks nobody)
        code, line, _ = check(site, "--max-age", "900")
        assert code == 1, line
        assert re.search(r"LDAP unreachable for 3\d+s", line) and "connection refused" in line
        code, line, _ = check(site, "--max-age", "30")
        assert code == 2 and "LDAP unreachable" in line
        human = cli(site, "status").stdout
        assert re.search(r"LDAP reachable: NO, for 3\ds", human), human
    # without a running agent the record is history, judged by its age alone
    code, line, _ = check(site, "--max-age", "900")
    assert code == 0, line


def test_check_help_names_the_smallest_sensible_max_age(site: Path) -> None:
    out = cli(site, "check", "--help").stdout
    assert "--max-age" in out and "at least 50" in " ".join(out.split())
