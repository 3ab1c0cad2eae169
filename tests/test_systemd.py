"""systemd/ldapsync.service passes `systemd-analyze verify` with nothing to complain about.

systemd-analyze reports unknown keys and bad values as warnings with exit status 0, so
the test requires empty output too. ExecStart points at /usr/local/bin/ldapsync, which a
test machine does not have: a copy of the unit runs this checkout's console script instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "ldapsync.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    if SYSTEMD_ANALYZE is None:
        reason = "systemd-analyze not installed (Debian package systemd)"
        print(reason)
        pytest.skip(reason)
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", PAGER="cat")
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def _local_copy(tmp_path: Path, text: str) -> Path:
    script = Path(sys.executable).with_name("ldapsync")
    exec_start = str(script) if script.exists() else f"{sys.executable} -m ldapsync"
    text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={exec_start}", text, flags=re.M)
    assert n == 1, "the unit must have exactly one ExecStart="
    path = tmp_path / "ldapsync.service"
    path.write_text(text)
    return path


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    proc = _verify(_local_copy(tmp_path, UNIT.read_text()))
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and output == "", output


def test_unit_is_a_watched_notify_service_with_reload() -> None:
    """What the agent's sd_notify code relies on (READY/WATCHDOG/SIGHUP) is declared."""
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["WatchdogSec"]
    assert "-HUP" in settings["ExecReload"] and "$MAINPID" in settings["ExecReload"]
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["ReadWritePaths"]


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above is only worth something if systemd-analyze reports mistakes here."""
    broken = UNIT.read_text().replace("Type=notify", "Type=notfy")
    proc = _verify(_local_copy(tmp_path, broken))
    assert "Type" in proc.stderr or "type" in proc.stderr, proc.stderr
