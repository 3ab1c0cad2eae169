"""ldapsync.hooks (how hooks run) and the shipped scripts in hooks/ (what they do)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ldapsync import config as config_mod
from ldapsync import hooks, sync
from ldapsync.errors import CommitError, HookError

REPO = Path(__file__).resolve().parent.parent
HOOKS = REPO / "hooks"
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
MAIL_YAML = REPO / "examples" / "mail.yaml"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SCRIPTS = ["postfix-reload", "dovecot-reload", "check-canary"]


def run_hook(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HOOKS / name), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": SBIN, **env},
        timeout=60,
        check=False,
    )


# -- hooks.run -----------------------------------------------------------------------------
def test_run_passes_env_and_phase(tmp_path: Path) -> None:
    out = tmp_path / "env"
    cmd = [
        sys.executable,
        "-c",
        f"import os; open({str(out)!r}, 'w').write(os.environ['LDAPSYNC_X'] + ' ' + os.environ['LDAPSYNC_PHASE'])",
    ]
    hooks.run([cmd], {"LDAPSYNC_X": "value"}, 10, phase="reload")
    assert out.read_text() == "value reload"


def test_run_stops_at_the_first_failure_with_its_output(tmp_path: Path) -> None:
    marker = tmp_path / "second-ran"
    with pytest.raises(HookError) as err:
        hooks.run([["sh", "-c", "echo why it failed; exit 7"], ["touch", str(marker)]], {}, 10, phase="check")
    assert "exited 7" in str(err.value) and "why it failed" in str(err.value) and "check hook" in str(err.value)
    assert not marker.exists(), "hooks after a failing one must not run"
    assert isinstance(err.value, CommitError)  # a failed check aborts the commit


def test_run_missing_command_is_a_hook_error(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="cannot run"):
        hooks.run([[str(tmp_path / "no-such-hook")]], {}, 10, phase="check")


def test_run_closes_stdin_and_never_uses_a_shell(tmp_path: Path) -> None:
    # `cat` would block forever on an inherited stdin; `$HOME` must arrive verbatim
    hooks.run([["cat"]], {}, 5, phase="check")
    out = tmp_path / "arg"
    hooks.run(
        [[sys.executable, "-c", f"import sys; open({str(out)!r}, 'w').write(sys.argv[1])", "$HOME;id"]],
        {},
        5,
        phase="check",
    )
    assert out.read_text() == "$HOME;id"


def test_run_kills_a_hanging_hook_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(HookError, match=r"timed out after 0\.3s"):
        hooks.run([["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]], {}, 0.3, phase="reload")
    assert time.monotonic() - started < 5
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the hook's child outlived the timeout")


# -- the shipped scripts ------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_shipped_hook_is_strict_posix_sh(name: str) -> None:
    path = HOOKS / name
    assert os.access(path, os.X_OK), f"{name} is not executable"
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "\nset -eu\n" in text
    assert "Exit status" in text and "Usage" in text
    for shell in ("dash", "sh"):  # dash is Debian's /bin/sh: no bashisms get past it
        exe = shutil.which(shell)
        if exe:
            proc = subprocess.run([exe, "-n", str(path)], capture_output=True, text=True, check=False)
            assert proc.returncode == 0, proc.stderr
    readme = (HOOKS / "README.md").read_text()
    assert f"## {name}" in readme, f"hooks/README.md does not document {name}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_shipped_hook_usage_error_exits_2(name: str) -> None:
    proc = run_hook(name, "-x")
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.fixture
def postfix_conf(tmp_path: Path) -> Path:
    if shutil.which("postconf", path=SBIN) is None:
        pytest.skip("postfix not installed")
    conf = tmp_path / "postfix"
    conf.mkdir()
    (conf / "main.cf").write_text(f"queue_directory = {tmp_path / 'queue'}\ndata_directory = {tmp_path / 'data'}\n")
    os.utime(conf / "main.cf", (time.time() - 3600, time.time() - 3600))
    shutil.copy("/etc/postfix/master.cf", conf / "master.cf")
    return conf


def test_postfix_reload_does_nothing_when_postfix_is_not_running(postfix_conf: Path) -> None:
    proc = run_hook("postfix-reload", "-c", str(postfix_conf))
    assert proc.returncode == 0, proc.stderr
    assert "not running" in proc.stderr


def test_postfix_reload_reports_an_unreadable_config(tmp_path: Path) -> None:
    if shutil.which("postconf", path=SBIN) is None:
        pytest.skip("postfix not installed")
    proc = run_hook("postfix-reload", "-c", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert "cannot read the Postfix configuration" in proc.stderr and str(tmp_path / "nope") in proc.stderr


def test_dovecot_reload_does_nothing_when_dovecot_is_not_running(tmp_path: Path) -> None:
    if shutil.which("doveconf", path=SBIN) is None:
        pytest.skip("dovecot-core not installed")
    conf = tmp_path / "dovecot.conf"
    conf.write_text(f"base_dir = {tmp_path / 'run'}\nssl = no\n")
    proc = run_hook("dovecot-reload", "-c", str(conf))
    assert proc.returncode == 0, proc.stderr
    assert "not running" in proc.stderr
    proc = run_hook("dovecot-reload", "-c", str(tmp_path / "nope.conf"))
    assert proc.returncode == 2 and "cannot read the Dovecot configuration" in proc.stderr


# -- check-canary through a real sync ---------------------------------------------------------------
def canary_pipeline(tmp: Path, *args: str, ldif: Path = DEMO_LDIF) -> sync.Pipeline:
    doc: dict[str, Any] = {
        "domain": "example.org",
        "source": {"ldif": {"path": str(ldif), "base_dn": "ou=users,dc=example,dc=org"}},
        "static": str(MAIL_YAML),
        "state_dir": "state",
        "exporters": [
            {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "include": ["aliases", "forwards"]},
            {"kind": "postfix-recipients", "path": "out/recipients", "map_type": "cdb"},
            {"kind": "dovecot-passwd", "path": "out/passwd"},
        ],
        "hooks": {"check": [[str(HOOKS / "check-canary"), *args]]},
    }
    path = tmp / "ldapsync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return sync.Pipeline(config_mod.load(path))


@pytest.mark.parametrize(
    "args",
    [
        ("alias=postmaster@example.org",),
        ("alias=postmaster@example.org", "postfix-recipients=alice@example.org", "dovecot-passwd=alice"),
    ],
)
def test_check_canary_passes_when_canaries_are_present(tmp_path: Path, args: tuple[str, ...]) -> None:
    p = canary_pipeline(tmp_path, *args)
    assert p.run().status == "installed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("alias=ceo@example.org",), "canary ceo@example.org MISSING"),
        (("postfix-recipients=nobody@example.org",), "canary nobody@example.org MISSING"),
        (("dovecot-passwd=nobody",), "canary nobody MISSING"),
        (("alais=postmaster@example.org",), "no output named 'alais'"),  # a typo must not disable the check
    ],
)
def test_check_canary_refuses_the_sync(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    p = canary_pipeline(tmp_path, *args)
    with pytest.raises(HookError, match=message):
        p.run()
    assert not (tmp_path / "out" / "alias").exists() and not (tmp_path / "out" / "passwd").exists()
    assert not [f for f in (tmp_path / "out").iterdir()], "staged files left behind"


def test_check_canary_catches_a_directory_that_lost_the_canary(tmp_path: Path) -> None:
    ldif = tmp_path / "users.ldif"
    ldif.write_bytes(DEMO_LDIF.read_bytes())
    p = canary_pipeline(tmp_path, "postfix-recipients=alice@example.org", "dovecot-passwd=alice", ldif=ldif)
    assert p.run().status == "installed"
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    # alice's entry vanishes (renamed login): the staged maps lack her
    ldif.write_text(DEMO_LDIF.read_text().replace("uid: alice\n", "uid: alice2\n"))
    with pytest.raises(HookError, match=r"alice@example\.org MISSING"):
        sync.Pipeline(p.config).run()
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before


def test_check_canary_skips_outputs_that_did_not_change(tmp_path: Path) -> None:
    """Only the changed outputs are staged; the unchanged ones passed the check when installed."""
    ldif = tmp_path / "users.ldif"
    ldif.write_bytes(DEMO_LDIF.read_bytes())
    p = canary_pipeline(tmp_path, "alias=bob@example.org", "dovecot-passwd=alice", ldif=ldif)
    p.run()
    ldif.write_text(
        DEMO_LDIF.read_text().replace("emailForward: bob@elsewhere.example", "emailForward: bob@new.example")
    )
    assert sync.Pipeline(p.config).run().changed == ["alias"]


def test_check_canary_refuses_to_run_outside_a_check_phase() -> None:
    proc = run_hook("check-canary", "alias=postmaster@example.org", LDAPSYNC_PHASE="reload")
    assert proc.returncode == 2 and "check hook" in proc.stderr


def _sleepers(tag: str, command: bytes = b"sleep") -> list[int]:
    """Pids of live `sleep <tag>` processes (the tag is a unique duration)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline[:2] == [command, tag.encode()] and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _unique_sleep() -> str:
    return f"{60 + (os.getpid() % 1000) / 1000 + time.monotonic_ns() % 997 / 1_000_000:.6f}"


@pytest.mark.parametrize("detach", ["setsid ", ""])
def test_a_child_holding_the_output_pipe_does_not_stall_a_hook_that_exited(detach: str) -> None:
    """The hook's own exit status counts; what it left behind is killed when it exits."""
    tag = _unique_sleep()
    started = time.monotonic()
    hooks.run([["sh", "-c", f"{detach}sleep {tag} & echo hi"]], {}, 1, phase="reload")
    elapsed = time.monotonic() - started
    assert elapsed < 1 + hooks.DRAIN_GRACE + 2, f"waited {elapsed:.1f}s on a leftover child"
    deadline = time.monotonic() + 5
    while _sleepers(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sleepers(tag), "the hook's leftover child survived"
    res = hooks.run_one(["sh", "-c", f"{detach}sleep {tag} & echo hi; exit 4"], dict(os.environ), 1)
    assert (res.returncode, res.text) == (4, "hi")
    deadline = time.monotonic() + 5
    while _sleepers(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sleepers(tag), "the hook's leftover child survived"


def test_a_leftover_child_flooding_the_pipe_does_not_stall_a_hook_that_exited() -> None:
    tag = _unique_sleep()
    started = time.monotonic()
    res = hooks.run_one(["sh", "-c", f"setsid yes {tag} & echo started >&2"], dict(os.environ), 30)
    assert res.returncode == 0
    assert time.monotonic() - started < 10, "kept reading a leftover child's output"
    assert len(res.output) <= hooks.OUTPUT_CAP
    deadline = time.monotonic() + 5
    while _sleepers(tag, b"yes") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sleepers(tag, b"yes"), "the hook's leftover child survived"


def test_timeout_holds_when_a_detached_child_keeps_the_pipe_open() -> None:
    tag = _unique_sleep()
    started = time.monotonic()
    with pytest.raises(HookError, match=r"check hook .* timed out after 1s: hi"):
        hooks.run([["sh", "-c", f"setsid sleep {tag} & echo hi; sleep {tag}"]], {}, 1, phase="check")
    elapsed = time.monotonic() - started
    assert elapsed < 1 + hooks.DRAIN_GRACE + 2, f"the 1 s timeout took {elapsed:.1f}s"
    deadline = time.monotonic() + 5
    while _sleepers(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sleepers(tag), "a process of the timed-out hook survived"


def test_output_of_a_flooding_hook_is_capped_to_its_tail() -> None:
    flood = [sys.executable, "-c", "import sys\nfor i in range(400_000): sys.stdout.write(f'{i:09d}\\n')\nprint('END')"]
    res = hooks.run_one(flood, dict(os.environ), 60)
    assert res.returncode == 0
    assert len(res.output) == hooks.OUTPUT_CAP
    assert res.dropped == 400_000 * 10 + 4 - hooks.OUTPUT_CAP
    assert res.output.endswith(b"000399999\nEND\n"), "the tail (where errors are) must be kept"
    with pytest.raises(HookError, match=r"(?s)exited 3: .*\(\d+ earlier bytes of output dropped\)"):
        hooks.run([["sh", "-c", "yes | head -c 1000000; exit 3"]], {}, 60, phase="check")


def test_a_hook_flooding_its_output_keeps_memory_bounded() -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(HookError) as err:
        hooks.run([["sh", "-c", "yes | head -c 200000000; exit 1"]], {}, 60, phase="check")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert "(199934464 earlier bytes of output dropped)" in str(err.value)
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB while reading a flooding hook"
