"""The command line as an admin (or cron, or Ansible) runs it: a real process, real exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
