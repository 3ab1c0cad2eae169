"""systemd/ldapsync.service passes `systemd-analyze verify` with nothing to complain about.

systemd-analyze reports unknown keys and bad values as warnings with exit status 0, so
the test requires empty output too. ExecStart points at /usr/bin/ldapsync (the .deb), which
a test machine may not have: a copy of the unit runs this checkout's console script instead.
The installed unit itself is verified by the package smoke test (.ci/smoke-test).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "ldapsync.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    if SYSTEMD_ANALYZE is None:
        reason = "systemd-analyze not installed (Debian package systemd)"
        print(reason)
        pytest.skip(reason)
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", PAGER="cat")
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


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


def _settings() -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )


def _writable() -> list[Path]:
    return [Path(p.lstrip("-")) for p in _settings()["ReadWritePaths"].split()]


def _documented_configs() -> dict[str, dict[str, object]]:
    """Every ldapsync config an admin is told to install: the role snippets (the e2e tests run
    them), the YAML blocks of docs/*.md and the packaged example config."""
    configs: dict[str, dict[str, object]] = {}
    for path in [*sorted((REPO / "docs" / "snippets").glob("ldapsync-*.yaml")), REPO / "examples" / "ldapsync.yaml"]:
        configs[str(path.relative_to(REPO))] = yaml.safe_load(path.read_text())
    for doc in sorted((REPO / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)):
            for j, data in enumerate(yaml.safe_load_all(block)):
                if isinstance(data, dict) and ("exporters" in data or "state_dir" in data):
                    configs[f"{doc.name} block {i}.{j}"] = data
    return configs


def _written_paths(cfg: dict[str, object]) -> list[Path]:
    paths = [Path(str(e["path"])).parent for e in cfg.get("exporters") or [] if isinstance(e, dict)]  # type: ignore[attr-defined]
    if cfg.get("state_dir"):
        paths.append(Path(str(cfg["state_dir"])))
    metrics = cfg.get("metrics")
    if isinstance(metrics, dict) and metrics.get("textfile"):
        paths.append(Path(str(metrics["textfile"])).parent)
    return paths


def test_every_documented_output_path_is_writable_under_the_unit() -> None:
    """ProtectSystem=strict: a documented path outside ReadWritePaths= fails only in production."""
    writable = _writable()
    configs = _documented_configs()
    assert {"docs/snippets/ldapsync-mx.yaml", "docs/snippets/ldapsync-submission.yaml"} <= set(configs)
    checked = 0
    for name, cfg in configs.items():
        for path in _written_paths(cfg):
            assert path.is_absolute(), f"{name}: {path} is relative"
            assert any(path == w or w in path.parents for w in writable), (
                f"{name} writes {path}, which the unit does not allow (ReadWritePaths={_settings()['ReadWritePaths']})"
            )
            checked += 1
    assert checked >= 10


def test_metrics_path_in_the_docs_is_writable() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    textfiles = re.findall(r"textfile: (/[^ }`]+)", text)
    assert textfiles
    for t in textfiles:
        assert any(w in Path(t).parents for w in _writable()), t


def test_unit_runs_the_packaged_binary_and_skips_missing_role_paths() -> None:
    settings = _settings()
    assert settings["ExecStart"].split()[0] == "/usr/bin/ldapsync"
    paths = settings["ReadWritePaths"].split()
    # systemd refuses to start a unit whose ReadWritePaths= does not exist, unless "-"-prefixed:
    # only the state directory (created by StateDirectory=) may be required.
    assert [p for p in paths if not p.startswith("-")] == ["/var/lib/ldapsync"]
    assert settings["StateDirectory"] == "ldapsync"
    assert "systemctl edit ldapsync" in (REPO / "docs" / "deployment.md").read_text()
