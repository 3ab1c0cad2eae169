"""Prometheus textfile: atomically written, parsed with prometheus_client's own parser."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ldapsync import config as config_mod
from ldapsync import sync

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
BASE_LDIF = REPO / "fixtures" / "ldif" / "base.ldif"
DOCUMENTED = {
    "ldapsync_last_success_timestamp_seconds": "gauge",
    "ldapsync_last_attempt_timestamp_seconds": "gauge",
    "ldapsync_last_confirmed_timestamp_seconds": "gauge",
    "ldapsync_sync_duration_seconds": "gauge",
    "ldapsync_syncs": "counter",
    "ldapsync_propagation_seconds": "histogram",
    "ldapsync_output_entries": "gauge",
    "ldapsync_output_info": "gauge",
    "ldapsync_held_changes": "gauge",
    "ldapsync_rejected_values": "gauge",
    "ldapsync_weak_password_hashes": "gauge",
    "ldapsync_ldap_reachable": "gauge",
    "ldapsync_reload_pending": "gauge",
}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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


def cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ldapsync", "-c", str(site / "ldapsync.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def once(site: Path) -> int:
    return cli(site, "--once").returncode


def parse(path: Path) -> tuple[dict[str, str], Samples]:
    """Metric family types, and every sample keyed by (name, sorted labels)."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_textfile_after_a_sync(site: Path) -> None:
    before = time.time()
    assert once(site) == 0
    prom = site / "textfile" / "ldapsync.prom"
    types, m = parse(prom)
    for name, kind in DOCUMENTED.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
    assert before - 1 <= value(m, "ldapsync_last_success_timestamp_seconds") <= time.time()
    assert value(m, "ldapsync_last_confirmed_timestamp_seconds") == value(m, "ldapsync_last_success_timestamp_seconds")
    assert value(m, "ldapsync_sync_duration_seconds") > 0
    for name, rel in (("alias", "out/alias"), ("dovecot-passwd", "out/passwd")):
        data = (site / rel).read_bytes()
        assert value(m, "ldapsync_output_entries", output=name) == data.count(b"\n")
        # the content hash as a label: a fleet compares count by (output, sha256) in PromQL
        assert value(m, "ldapsync_output_info", output=name, sha256=hashlib.sha256(data).hexdigest()) == 1
    assert value(m, "ldapsync_syncs_total", result="installed") == 1
    assert value(m, "ldapsync_syncs_total", result="failed") == 0
    assert value(m, "ldapsync_held_changes") == 0 and value(m, "ldapsync_ldap_reachable") == 1
    assert value(m, "ldapsync_rejected_values") >= 0
    assert value(m, "ldapsync_propagation_seconds_count") == 0, "--once has no received change to time"
    assert ("ldapsync_follower_connected", ()) not in m, "no follower under cron"
    assert prom.stat().st_mode & 0o777 == 0o644, "node_exporter must be able to read it"


def test_sync_counters_accumulate_across_once_runs(site: Path) -> None:
    assert once(site) == 0
    assert once(site) == 0
    (site / "users.ldif").write_text(BASE_LDIF.read_text())
    assert once(site) == 4
    (site / "users.ldif").unlink()
    assert once(site) == 1
    _, m = parse(site / "textfile" / "ldapsync.prom")
    counts = {r: value(m, "ldapsync_syncs_total", result=r) for r in ("installed", "unchanged", "held", "failed")}
    assert counts == {"installed": 1, "unchanged": 1, "held": 1, "failed": 1}


def test_metrics_follow_held_changes_and_outages(site: Path) -> None:
    once(site)
    prom = site / "textfile" / "ldapsync.prom"
    first = value(parse(prom)[1], "ldapsync_last_success_timestamp_seconds")
    (site / "users.ldif").write_text(BASE_LDIF.read_text())
    assert once(site) == 4
    _, m = parse(prom)
    assert value(m, "ldapsync_held_changes") == 1 and value(m, "ldapsync_last_success_timestamp_seconds") == first
    assert value(m, "ldapsync_last_confirmed_timestamp_seconds") == first, "a held change confirms nothing"
    (site / "users.ldif").unlink()
    assert once(site) == 1
    _, m = parse(prom)
    assert value(m, "ldapsync_ldap_reachable") == 0 and value(m, "ldapsync_last_success_timestamp_seconds") == first
    assert value(m, "ldapsync_last_attempt_timestamp_seconds") > first


def test_propagation_time_is_observed_from_when_the_change_was_received(site: Path) -> None:
    pipeline = sync.Pipeline(config_mod.load(site / "ldapsync.yaml"))
    assert pipeline.run().status == "installed"
    (site / "users.ldif").write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    assert pipeline.run(received_at=time.time() - 7).status == "installed"
    assert pipeline.run(received_at=time.time() - 7).status == "unchanged", "nothing installed: nothing timed"
    _, m = parse(site / "textfile" / "ldapsync.prom")
    assert value(m, "ldapsync_propagation_seconds_count") == 1
    assert 7 <= value(m, "ldapsync_propagation_seconds_sum") < 60
    assert value(m, "ldapsync_propagation_seconds_bucket", le="5.0") == 0
    assert value(m, "ldapsync_propagation_seconds_bucket", le="60.0") == 1
    assert value(m, "ldapsync_propagation_seconds_bucket", le="+Inf") == 1


def test_follower_connection_is_reported(site: Path) -> None:
    pipeline = sync.Pipeline(config_mod.load(site / "ldapsync.yaml"))
    pipeline.run()
    prom = site / "textfile" / "ldapsync.prom"
    pipeline.note_follower(False, "ldap://ldap-01: connection refused")
    _, m = parse(prom)
    assert value(m, "ldapsync_follower_connected") == 0 and value(m, "ldapsync_ldap_reachable") == 0
    info = json.loads(cli(site, "status", "--json").stdout)
    assert info["follower_connected"] is False and info["ldap_reachable"] is False
    assert info["follower_error"] == "ldap://ldap-01: connection refused"
    pipeline.note_follower(True, None)
    _, m = parse(prom)
    assert value(m, "ldapsync_follower_connected") == 1 and value(m, "ldapsync_ldap_reachable") == 1


def test_unwritable_metrics_textfile_does_not_fail_an_install(site: Path) -> None:
    (site / "textfile").rmdir()  # node_exporter not installed yet, or a typo in the path
    proc = cli(site, "--once")
    assert proc.returncode == 0, proc.stderr  # the maps are installed: cron must not report a failure
    assert "bob@example.org\tbob@elsewhere.example" in (site / "out/alias").read_text()
    assert "metrics not written" in proc.stderr and "warning" in proc.stderr.lower()
    check = cli(site, "check", "--max-age", "900")
    assert check.returncode == 1 and "metrics textfile" in check.stdout, check.stdout
    assert "metrics textfile" in json.loads(cli(site, "status", "--json").stdout)["metrics_error"]

    (site / "textfile").mkdir()
    assert once(site) == 0
    assert (site / "textfile" / "ldapsync.prom").exists()
    assert cli(site, "check", "--max-age", "900").returncode == 0, "the warning clears once written"


def test_metrics_file_is_replaced_atomically(site: Path) -> None:
    once(site)
    prom = site / "textfile" / "ldapsync.prom"
    inode = prom.stat().st_ino
    (site / "users.ldif").write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    once(site)
    assert prom.stat().st_ino != inode, "rewritten in place: node_exporter could read half a file"
    assert sorted(p.name for p in (site / "textfile").iterdir()) == ["ldapsync.prom"], "temp files left"
    parse(prom)


def test_weak_hashes_are_counted_in_status_and_metrics(site: Path) -> None:
    """passwords.weak: warn accepts unsalted digests; the admin sees how many, never which values."""
    ldif = site / "users.ldif"
    text = ldif.read_text()
    sha = "{SHA}" + __import__("base64").b64encode(hashlib.sha1(b"old secret").digest()).decode()
    weak = (
        "dn: uid=legacy,ou=users,dc=example,dc=org\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncMailAccount\n"
        f"uid: legacy\ncn: legacy\nsn: legacy\nmailPassword: {sha}\n"
    )
    ldif.write_text(text.rstrip("\n") + "\n\n" + weak)
    assert once(site) == 0
    _, m = parse(site / "textfile" / "ldapsync.prom")
    assert value(m, "ldapsync_weak_password_hashes") == 1
    assert "legacy:{SHA}" in (site / "out" / "passwd").read_text()
    status = cli(site, "status")
    assert "weak hashes:    1" in status.stdout and sha not in status.stdout
    assert json.loads(cli(site, "status", "--json").stdout)["weak_passwords"] == 1


def test_lost_directory_and_rejected_config_are_reported(site: Path) -> None:
    """The metrics say what `check` judges: since when LDAP is away, and a rejected config."""
    pipeline = sync.Pipeline(config_mod.load(site / "ldapsync.yaml"))
    pipeline.run()
    prom = site / "textfile" / "ldapsync.prom"
    before = time.time()
    pipeline.note_follower(False, "ldap://ldap-01: connection refused")
    _, m = parse(prom)
    lost = value(m, "ldapsync_ldap_lost_timestamp_seconds")
    assert before <= lost <= time.time()
    pipeline.note_follower(False, "ldap://ldap-02: connection refused")  # still away: since the first loss
    assert value(parse(prom)[1], "ldapsync_ldap_lost_timestamp_seconds") == lost
    pipeline.note_follower(True, None)
    assert ("ldapsync_ldap_lost_timestamp_seconds", ()) not in parse(prom)[1]
    assert value(parse(prom)[1], "ldapsync_config_rejected") == 0
    pipeline.note_config("ldapsync.yaml: domain: not a domain")
    assert value(parse(prom)[1], "ldapsync_config_rejected") == 1
    pipeline.note_config(None)
    assert value(parse(prom)[1], "ldapsync_config_rejected") == 0
