"""Prometheus textfile: atomically written, with the metric names docs/operations.md lists."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
BASE_LDIF = REPO / "fixtures" / "ldif" / "base.ldif"
DOCUMENTED = [
    "ldapsync_last_success_timestamp_seconds",
    "ldapsync_last_attempt_timestamp_seconds",
    "ldapsync_sync_duration_seconds",
    "ldapsync_output_entries",
    "ldapsync_held_changes",
    "ldapsync_rejected_values",
    "ldapsync_ldap_reachable",
]
SAMPLE = re.compile(r'^([a-z_]+)(?:\{output="([^"\\]*)"\})? (-?[0-9.]+(?:e[+-]?\d+)?)$')


@pytest.fixture
def site(tmp_path: Path) -> Path:
    ldif = tmp_path / "users.ldif"
    ldif.write_bytes(DEMO_LDIF.read_bytes())
    (tmp_path / "textfile").mkdir()
    doc = {
        "domain": "example.org",
        "source": {"ldif": {"path": str(ldif), "base_dn": "ou=users,dc=example,dc=org"}},
        "state_dir": "state",
        "exporters": [
            {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "include": ["aliases", "forwards"]},
            {"kind": "dovecot-passwd", "path": "out/passwd"},
        ],
        "metrics": {"textfile": "textfile/ldapsync.prom"},
    }
    (tmp_path / "ldapsync.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path


def once(site: Path) -> int:
    cmd = [sys.executable, "-m", "ldapsync", "-c", str(site / "ldapsync.yaml"), "--once"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode


def parse(path: Path) -> dict[str, float]:
    """Strict parse of the exposition format: every metric has HELP and TYPE before its samples."""
    samples: dict[str, float] = {}
    declared: set[str] = set()
    for line in path.read_text().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) == 4 and parts[3], line
            if line.startswith("# TYPE "):
                assert parts[3] in ("gauge", "counter"), line
                declared.add(parts[2])
            continue
        m = SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        assert m.group(1) in declared, f"{m.group(1)} has no TYPE"
        key = m.group(1) + (f"/{m.group(2)}" if m.group(2) is not None else "")
        samples[key] = float(m.group(3))
    return samples


def test_metrics_textfile_after_a_sync(site: Path) -> None:
    before = time.time()
    assert once(site) == 0
    prom = site / "textfile" / "ldapsync.prom"
    m = parse(prom)
    for name in DOCUMENTED:
        assert any(k.split("/")[0] == name for k in m), f"{name} missing"
    assert before - 1 <= m["ldapsync_last_success_timestamp_seconds"] <= time.time()
    assert m["ldapsync_sync_duration_seconds"] > 0
    assert m["ldapsync_output_entries/alias"] == (site / "out/alias").read_bytes().count(b"\n") > 0
    assert m["ldapsync_output_entries/dovecot-passwd"] == (site / "out/passwd").read_bytes().count(b"\n")
    assert m["ldapsync_held_changes"] == 0 and m["ldapsync_ldap_reachable"] == 1
    assert m["ldapsync_rejected_values"] >= 0
    assert prom.stat().st_mode & 0o777 == 0o644, "node_exporter must be able to read it"


def test_metrics_follow_held_changes_and_outages(site: Path) -> None:
    once(site)
    prom = site / "textfile" / "ldapsync.prom"
    first = parse(prom)["ldapsync_last_success_timestamp_seconds"]
    (site / "users.ldif").write_text(BASE_LDIF.read_text())
    assert once(site) == 4
    m = parse(prom)
    assert m["ldapsync_held_changes"] == 1 and m["ldapsync_last_success_timestamp_seconds"] == first
    (site / "users.ldif").unlink()
    assert once(site) == 1
    m = parse(prom)
    assert m["ldapsync_ldap_reachable"] == 0 and m["ldapsync_last_success_timestamp_seconds"] == first
    assert m["ldapsync_last_attempt_timestamp_seconds"] > first


def test_metrics_file_is_replaced_atomically(site: Path) -> None:
    once(site)
    prom = site / "textfile" / "ldapsync.prom"
    inode = prom.stat().st_ino
    (site / "users.ldif").write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    once(site)
    assert prom.stat().st_ino != inode, "rewritten in place: node_exporter could read half a file"
    assert sorted(p.name for p in (site / "textfile").iterdir()) == ["ldapsync.prom"], "temp files left"
    parse(prom)
