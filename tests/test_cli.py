"""The command line as an admin (or cron, or Ansible) runs it: a real process, real exit codes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import siteconfig
from slapd import _free_port

import ldapsync

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
EXPORTERS: list[dict[str, Any]] = [
    {"kind": "postfix-virtual", "name": "alias", "path": "out/maps/alias", "include": ["aliases", "forwards"]},
    {"kind": "postfix-transport", "path": "out/maps/transport", "nexthop": "smtp:[srs.example.org]"},
    {"kind": "postfix-recipients", "path": "out/maps/recipients"},
    {"kind": "postfix-sender-login", "path": "out/maps/sender_login"},
    {"kind": "postfix-access", "path": "out/maps/disabled"},
    {"kind": "dovecot-passwd", "path": "out/dovecot/passwd", "mode": "0640"},
]
# every password value in the demo LDIF: none may ever be printed
DEMO_HASHES = [
    line.split(":", 1)[1].strip() for line in DEMO_LDIF.read_text().splitlines() if line.startswith("mailPassword:")
]


def write_config(tmp: Path, ldif: Path = DEMO_LDIF, **top: Any) -> Path:
    return siteconfig.write_config(tmp, ldif=ldif, **{"exporters": EXPORTERS, **top})


def ldapsync_cli(*args: str | Path, check: int | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ldapsync", *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and directory below root with content and mtime_ns."""
    out: dict[str, tuple[bytes, int]] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else b"<dir>", p.stat().st_mtime_ns)
    return out


def assert_no_secret(text: str) -> None:
    for secret in DEMO_HASHES:
        body = secret.split("}", 1)[-1]  # {SCHEME}... or a bare crypt string
        assert body not in text, f"a password hash was printed: {body[:12]}..."
    assert not re.search(r"\$(1|2b|5|6|y)\$[^ <]{8,}", text), "something that looks like a crypt hash was printed"


def test_version() -> None:
    proc = ldapsync_cli("--version", check=0)
    assert proc.stdout.strip() == f"ldapsync {ldapsync.__version__}"
    script = Path(sys.executable).with_name("ldapsync")
    if script.exists():  # the console script of `pip install`
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True).stdout
        assert out.strip() == f"ldapsync {ldapsync.__version__}"


def test_once_installs_every_output(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    proc = ldapsync_cli("-c", cfg, "--once", check=0)
    out = tmp_path / "out"
    for exp in EXPORTERS:
        assert (tmp_path / exp["path"]).is_file(), exp["path"]
    assert (out / "maps" / "alias.db").is_file()
    assert b"bob@example.org\tbob@elsewhere.example\n" in (out / "maps" / "alias").read_bytes()
    assert_no_secret(proc.stdout + proc.stderr)
    ldapsync_cli("-c", cfg, "--once", check=0)  # unchanged: still success


def test_dry_run_diffs_changes_and_writes_nothing(tmp_path: Path) -> None:
    ldif = tmp_path / "users.ldif"
    ldif.write_bytes(DEMO_LDIF.read_bytes())
    cfg = write_config(tmp_path, ldif)

    # nothing installed yet: every output is new
    proc = ldapsync_cli("-c", cfg, "--dry-run", check=1)
    for exp in EXPORTERS:
        assert f"--- /dev/null\n+++ {tmp_path / exp['path']}\n" in proc.stdout, exp["path"]
    assert "+bob@example.org\tbob@elsewhere.example\n" in proc.stdout
    assert "+alice:{SHA512-CRYPT}<hash sha256:" in proc.stdout, "dovecot lines must be shown redacted"
    assert_no_secret(proc.stdout + proc.stderr)
    assert not (tmp_path / "out").exists(), "dry run created outputs"
    assert not (tmp_path / "state").exists(), "dry run created the state dir"

    ldapsync_cli("-c", cfg, "--once", check=0)
    before = tree(tmp_path)
    proc = ldapsync_cli("-c", cfg, "--dry-run", check=0)
    assert proc.stdout == ""

    # bob's forward and alice's password change: two diffs, the hash never shown
    bob_hash = next(h for h in DEMO_HASHES if "TWKJVx9bKUmSW7m0" in h)
    alice_hash = next(h for h in DEMO_HASHES if "Mwbjj2JAVj1UcS5G" in h)
    text = ldif.read_text().replace("emailForward: bob@elsewhere.example", "emailForward: bob@new.example")
    ldif.write_text(text.replace(f"mailPassword: {alice_hash}", f"mailPassword: {bob_hash}"))
    before = tree(tmp_path)
    proc = ldapsync_cli("-c", cfg, "--dry-run", check=1)
    assert "-bob@example.org\tbob@elsewhere.example\n+bob@example.org\tbob@new.example\n" in proc.stdout
    assert f"--- {tmp_path / 'out/dovecot/passwd'}\n+++ {tmp_path / 'out/dovecot/passwd'}\n" in proc.stdout
    assert re.search(
        r"^-alice:\{SHA512-CRYPT\}<hash sha256:\w+>\n\+alice:\{SHA512-CRYPT\}<hash sha256:\w+>$", proc.stdout, re.M
    )
    assert_no_secret(proc.stdout + proc.stderr)
    assert tree(tmp_path) == before, "dry run changed a file (outputs or state)"


def test_dry_run_exits_2_when_ldap_is_unreachable(tmp_path: Path) -> None:
    dead = f"ldap://127.0.0.1:{_free_port()}"
    secret = tmp_path / "bind.secret"
    secret.write_text("x")
    secret.chmod(0o600)
    ldap = {"uri": dead, "base_dn": "ou=users,dc=example,dc=org", "bind_dn": "cn=x", "bind_password_file": str(secret)}
    cfg = write_config(tmp_path, source={"ldap": ldap}, exporters=EXPORTERS[:1])
    proc = ldapsync_cli("-c", cfg, "--dry-run", check=2)
    assert dead in proc.stderr
    assert proc.stdout == ""
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "bind.secret",
        "ldapsync.yaml",
    ], "a dry run must not write status, metrics or outputs"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"safety": {"max_deletion": 5}}, "safety.max_deletion"),  # a typo must not disable a guard
        ({"keep_generations": "ten"}, "keep_generations"),
        ({"exporters": [{**EXPORTERS[0], "map_type": "dbm"}]}, "exporters[0].map_type"),
        ({"hooks": {"check": [42]}}, "hooks.check[0]"),
    ],
)
@pytest.mark.parametrize("mode", ["--once", "--dry-run"])
def test_config_errors_exit_2_naming_file_and_key(tmp_path: Path, change: dict[str, Any], key: str, mode: str) -> None:
    cfg = write_config(tmp_path, **change)
    proc = ldapsync_cli("-c", cfg, mode, check=2)
    assert str(cfg) in proc.stderr and key in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = ldapsync_cli("-c", tmp_path / "nope.yaml", "--once", check=2)
    assert str(tmp_path / "nope.yaml") in proc.stderr


def test_once_fails_nonzero_when_the_source_is_unreadable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tmp_path / "missing.ldif")
    proc = ldapsync_cli("-c", cfg, "--once")
    assert proc.returncode not in (0, 2), proc.returncode
    assert "missing.ldif" in proc.stderr
    assert not (tmp_path / "out").exists()
    os.stat(tmp_path / "state" / "status.json")  # the failure is recorded for `status`/`check`


# -- the first hour of an admin ---------------------------------------------------------------


def test_check_usage_error_is_unknown_not_critical(tmp_path: Path) -> None:
    """A monitoring plugin that cannot run reports UNKNOWN (3), never CRITICAL (2)."""
    cfg = write_config(tmp_path)
    proc = ldapsync_cli("-c", cfg, "check", check=3)  # --max-age missing
    assert "--max-age" in proc.stderr
    assert proc.stdout.startswith("LDAPSYNC UNKNOWN - usage error"), "monitoring reads the status line on stdout"
    ldapsync_cli("check", "--max-age", "x", check=3)
    ldapsync_cli("-c", cfg, "check", "--max-age", "60", "--bogus", check=3)
    # a usage error of any other command stays 2
    ldapsync_cli("-c", cfg, "status", "--bogus", check=2)


def test_config_option_is_accepted_after_the_subcommand(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    ldapsync_cli("-c", cfg, "--once", check=0)
    after = ldapsync_cli("status", "-c", cfg, check=0).stdout
    before = ldapsync_cli("-c", cfg, "status", check=0).stdout
    ages = re.compile(r"\d+s ago")  # the one thing that may differ between the two calls
    assert "alias" in after and ages.sub("", after) == ages.sub("", before)
    proc = ldapsync_cli("check", "--max-age", "600", "--config", cfg, check=0)
    assert proc.stdout.startswith("LDAPSYNC OK")
    # given on both sides, the one after the subcommand wins; a default never overrides
    ldapsync_cli("-c", tmp_path / "nonexistent.yaml", "snapshots", "-c", cfg, check=0)


def test_every_subcommand_has_help_text() -> None:
    top = ldapsync_cli("--help", check=0).stdout
    for name in ("status", "snapshots", "diff", "rollback", "approve", "check", "explain", "files"):
        line = next((ln for ln in top.splitlines() if ln.strip().startswith(name + " ")), "")
        assert len(line.split(None, 1)[-1]) > 15, f"{name} has no help text in --help"
        sub = ldapsync_cli(name, "--help", check=0).stdout
        assert "--config" in sub and "--quiet" in sub, name
        assert len(sub.split("\n\n")[1].strip()) > 15, f"{name} --help has no description"
    assert "docs/cli.md" in top
    assert (REPO / "docs" / "cli.md").is_file(), "the help text points at docs/cli.md"


def test_status_into_a_closed_pipe_logs_no_error(tmp_path: Path) -> None:
    """`ldapsync status | head -1`: the reader leaves early; no "Broken pipe" error, exit 0."""
    cfg = write_config(tmp_path)
    ldapsync_cli("-c", cfg, "--once", check=0)
    for args in (["status"], ["status", "--json"], ["--dry-run"], ["snapshots"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written
        proc = subprocess.run(
            [sys.executable, "-m", "ldapsync", "-c", str(cfg), *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
        os.close(write)
        assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert proc.returncode in (0, 1), (args, proc.returncode)


def test_paths_are_printed_without_dotdot(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    cfg = siteconfig.write_config(
        tmp_path / "etc",
        exporters=[{"kind": "postfix-recipients", "path": "../postfix/recipients", "map_type": "texthash"}],
    )
    ldapsync_cli("-c", cfg, "--once", check=0)
    status = ldapsync_cli("-c", cfg, "status", check=0).stdout
    assert f"{tmp_path}/postfix/recipients" in status and ".." not in status


def test_dry_run_summary_comes_first_and_stat_prints_only_it(tmp_path: Path) -> None:
    ldif = tmp_path / "users.ldif"
    ldif.write_bytes(DEMO_LDIF.read_bytes())
    cfg = write_config(tmp_path, ldif)
    ldapsync_cli("-c", cfg, "--once", check=0)
    text = ldif.read_text().replace("emailForward: bob@elsewhere.example", "emailForward: bob@new.example")
    ldif.write_text(text.replace("uid: alice\n", "uid: alice\nemailForward: alice@new.example\n"))
    full = ldapsync_cli("-c", cfg, "--dry-run", check=1).stdout
    summary = full.split("--- ", 1)[0].splitlines()
    # keys: alice's forward is added, bob's changes value
    assert [line.split()[:4] for line in summary] == [
        ["alias", "+1", "-0", "~1"],
        ["postfix-transport", "+1", "-0", "~0"],
    ]
    assert summary[0].endswith(str(tmp_path / "out/maps/alias"))
    stat = ldapsync_cli("-c", cfg, "--dry-run", "--stat", check=1).stdout
    assert stat.splitlines() == summary
    ldapsync_cli("-c", cfg, "--stat", check=2)  # --stat alone is a usage error


def _with_rejected_value(tmp_path: Path) -> Path:
    ldif = tmp_path / "users.ldif"
    bad = "emailForward: bob@elsewhere.example\nemailForward: not an address"
    ldif.write_text(DEMO_LDIF.read_text().replace("emailForward: bob@elsewhere.example", bad))
    return write_config(tmp_path, ldif)


def test_quiet_once_reports_a_rejected_value_once_not_every_run(tmp_path: Path) -> None:
    cfg = _with_rejected_value(tmp_path)
    first = ldapsync_cli("-c", cfg, "--once", "--quiet", check=0).stderr
    assert first.count("LDAP value rejected") == 1, first
    assert '"installed"' not in first, "--quiet logs no info lines"
    again = ldapsync_cli("-c", cfg, "--once", "--quiet", check=0).stderr
    assert again == "", "cron mails nothing when nothing new went wrong"
    # without --quiet every run says it (an admin running it by hand wants to see it)
    assert "LDAP value rejected" in ldapsync_cli("-c", cfg, "--once", check=0).stderr
    status = ldapsync_cli("-c", cfg, "status", check=0).stdout
    assert re.search(r"^rejected:\s+1 ", status, re.M), status


def test_missing_bind_password_file_names_the_config_file_and_key(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        source={
            "ldap": {
                "uri": f"ldap://127.0.0.1:{_free_port()}",
                "base_dn": "dc=example,dc=org",
                "bind_dn": "cn=svc,dc=example,dc=org",
                "bind_password_file": "secret/bind.pw",
            }
        },
    )
    for mode in ("--once", "--dry-run"):
        proc = ldapsync_cli("-c", cfg, mode, check=2)
        assert f"{cfg}: source.ldap.bind_password_file: cannot read {tmp_path}/secret/bind.pw" in proc.stderr


def test_misspelt_required_key_suggests_the_near_miss(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("state_dir:", "statedir:"))
    proc = ldapsync_cli("-c", cfg, "--once", check=2)
    assert "state_dir: is required (found 'statedir'" in proc.stderr, proc.stderr


RECORD_HOOK = """#!/bin/sh
printf '%s %s\\n' "$1" "$LDAPSYNC_CHANGED_NAMES" >> "$(dirname "$0")/reloads.log"
"""


def test_reload_hooks_run_only_for_the_outputs_they_serve(tmp_path: Path) -> None:
    hook = tmp_path / "record-reload"
    hook.write_text(RECORD_HOOK)
    hook.chmod(0o755)
    ldif = tmp_path / "users.ldif"
    ldif.write_bytes(DEMO_LDIF.read_bytes())
    cfg = write_config(
        tmp_path,
        ldif,
        hooks={
            "reload": [
                {"command": [str(hook), "postfix"], "outputs": ["alias", "postfix-transport", "postfix-recipients"]},
                {"command": f"{hook} dovecot", "outputs": ["dovecot-passwd"]},
                [str(hook), "every-output"],  # the list-of-commands form: every output
            ]
        },
    )
    reloads = tmp_path / "reloads.log"
    ldapsync_cli("-c", cfg, "--once", check=0)
    first = reloads.read_text().splitlines()
    assert [line.split()[0] for line in first] == ["postfix", "dovecot", "every-output"]
    assert first[0] == "postfix alias postfix-transport postfix-recipients", "a hook sees only its outputs"
    assert first[1] == "dovecot dovecot-passwd"

    # only a password changed: the Postfix reload does not run
    bob_hash = next(h for h in DEMO_HASHES if "TWKJVx9bKUmSW7m0" in h)
    alice_hash = next(h for h in DEMO_HASHES if "Mwbjj2JAVj1UcS5G" in h)
    ldif.write_text(ldif.read_text().replace(f"mailPassword: {alice_hash}", f"mailPassword: {bob_hash}"))
    reloads.unlink()
    ldapsync_cli("-c", cfg, "--once", check=0)
    assert reloads.read_text().splitlines() == ["dovecot dovecot-passwd", "every-output dovecot-passwd"]

    # nothing changed: no reload at all
    reloads.unlink()
    ldapsync_cli("-c", cfg, "--once", check=0)
    assert not reloads.exists()


def test_reload_hook_naming_an_unknown_output_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, hooks={"reload": [{"command": ["true"], "outputs": ["dovecot-paswd"]}]})
    proc = ldapsync_cli("-c", cfg, "--once", check=2)
    assert "hooks.reload[0].outputs[0]: 'dovecot-paswd' is not an exporter name; did you mean 'dovecot-passwd'?" in (
        proc.stderr
    )


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A temp dir other users can traverse (pytest's tmp_path sits below a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="ldapsync-cli-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_output_directories_are_created_traversable_for_the_exporters_group(open_dir: Path) -> None:
    """Under the unit's UMask=0077 a new directory would be 0700 root: Dovecot could not read the passwd-file."""
    import grp

    tmp_path = open_dir

    try:
        grp.getgrnam("dovecot")
    except KeyError:
        pytest.skip("no dovecot group (apt-get install dovecot-core)")
    if os.geteuid() != 0:
        pytest.skip("chown to the dovecot group needs root")
    etc = tmp_path / "etc-dovecot"
    etc.mkdir(mode=0o755)
    (etc / "private").mkdir(mode=0o700)  # stock Debian: 0700 root:root
    exporters = [
        {"kind": "postfix-recipients", "path": "maps/new/recipients", "map_type": "texthash"},
        {"kind": "dovecot-passwd", "path": f"{etc}/ldapsync/passwd", "group": "dovecot", "mode": "0640"},
    ]
    cfg = siteconfig.write_config(tmp_path, exporters=exporters)
    proc = subprocess.run(
        ["sh", "-c", 'umask 077 && exec "$0" -m ldapsync -c "$1" --once', sys.executable, str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    d = (etc / "ldapsync").stat()
    assert (oct(d.st_mode & 0o7777), d.st_uid, grp.getgrgid(d.st_gid).gr_name) == ("0o750", 0, "dovecot")
    assert oct((tmp_path / "maps").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "maps" / "new").stat().st_mode & 0o777) == "0o755"
    # the dovecot user itself can read the file (what Dovecot's auth process does)
    read = subprocess.run(
        ["runuser", "-u", "dovecot", "--", "head", "-c", "5", str(etc / "ldapsync" / "passwd")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert read.returncode == 0 and read.stdout, read.stderr


def test_files_lists_each_output_and_its_compiled_map(tmp_path: Path) -> None:
    exporters = [
        {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "include": ["aliases"]},
        {"kind": "postfix-recipients", "path": "out/recipients", "map_type": "lmdb"},
        {"kind": "postfix-access", "path": "out/disabled", "map_type": "texthash"},
        {"kind": "dovecot-passwd", "path": "out/passwd"},
    ]
    cfg = write_config(tmp_path, exporters=exporters)
    proc = ldapsync_cli("files", "-c", cfg, check=0)
    out = tmp_path / "out"
    names = ["alias", "alias.db", "recipients", "recipients.lmdb", "disabled", "passwd"]
    assert proc.stdout.splitlines() == [str(out / n) for n in names]
    assert not out.exists(), "files only reads"

    bad = write_config(tmp_path, exporters=[{"kind": "dovecot-passwd", "path": "out/pass\nwd"}])
    proc = ldapsync_cli("files", "-c", bad, check=2)
    assert proc.stdout == "" and "exporters[0].path" in proc.stderr and "holds a newline" in proc.stderr
