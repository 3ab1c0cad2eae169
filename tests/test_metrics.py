"""Prometheus textfile: atomically written, parsed with prometheus_client's own parser."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ldapsync import config as config_mod
from ldapsync import metrics, sync
from ldapsync.delta import Delta
from ldapsync.status import Histogram, OutputState, Status, SyncResult

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
    "ldapsync_keys_changed": "counter",
    "ldapsync_last_install_keys": "gauge",
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


# -- the shipped dashboard and alerting rules ------------------------------------------------------
MONITORING = REPO / "monitoring"
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def exported() -> set[str]:
    """Every sample name the textfile can hold (a record with every field set)."""
    record = Status(
        result=SyncResult.INSTALLED,
        last_attempt=1.0,
        last_success=1.0,
        last_confirmed=1.0,
        duration=1.0,
        ldap_reachable=True,
        follower_connected=True,
        held="held",
        rejected=1,
        weak_passwords=1,
        outputs={"alias": OutputState(1, "0" * 64)},
        reload_pending=("alias",),
        syncs={"installed": 1},
        propagation=Histogram().observe(1.0),
        last_changes={"alias": Delta(1, 0, 0)},
        changes_total={"alias": Delta(1, 0, 0)},
    )
    text = metrics.render(record).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names (in {...}, by/on/ignoring/without (...)), strings or range durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\(?)", expr):
        if not m.group(2) and m.group(1) not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def test_promql_metric_names_are_found() -> None:
    expr = 'sum by (instance, le) (rate(a_bucket{x="y", i=~"$i"}[$__rate_interval])) > 3 and ignoring(r) b == 1'
    assert promql_metrics(expr) == {"a_bucket", "b"}
    assert promql_metrics("time() - c > 900") == {"c"}


def rules() -> list[dict[str, object]]:
    doc = yaml.safe_load((MONITORING / "ldapsync.rules.yml").read_text())
    assert set(doc) == {"groups"} and len(doc["groups"]) == 1
    (group,) = doc["groups"]
    assert set(group) == {"name", "rules"} and group["name"] == "ldapsync"
    return list(group["rules"])


def dashboard_exprs() -> list[str]:
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":  # label_values(METRIC, LABEL)
            m = re.fullmatch(r"label_values\((\w+), *\w+\)", var["definition"])
            assert m, var["definition"]
            exprs.append(m.group(1))
    return exprs


def test_dashboard_and_rules_read_only_metrics_we_export() -> None:
    ours = exported()
    exprs = [str(r["expr"]) for r in rules()] + dashboard_exprs()
    used = set().union(*(promql_metrics(e) for e in exprs))
    assert used - ours == set(), f"not exported by ldapsync.metrics: {sorted(used - ours)}"
    assert {"ldapsync_last_confirmed_timestamp_seconds", "ldapsync_keys_changed_total"} <= used


def test_dashboard_is_importable_grafana_json() -> None:
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert doc["uid"] == "ldapsync" and doc["title"] and isinstance(doc["schemaVersion"], int)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in doc["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        assert p["targets"] and all(t["expr"].count("(") == t["expr"].count(")") for t in p["targets"])
        assert p["datasource"]["uid"] == "${datasource}", "the data source is chosen on import"


def test_alerting_rules_are_well_formed_and_page_only_for_stale_maps() -> None:
    seen = set()
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        name = str(rule["alert"])
        assert re.fullmatch(r"Ldapsync[A-Z][A-Za-z]+", name) and name not in seen
        seen.add(name)
        expr = str(rule["expr"])
        assert expr.count("(") == expr.count(")") and promql_metrics(expr), name
        assert re.fullmatch(r"\d+[smhdwy]", str(rule["for"])), f"{name}: every alert waits before firing"
        labels, notes = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and labels["severity"] in ("critical", "warning", "info"), name
        assert isinstance(notes, dict) and set(notes) == {"summary", "description"}, name
        for text in notes.values():
            assert set(re.findall(r"\$(\w+)", str(text))) <= {"labels", "value"}, name
        if labels["severity"] == "critical":  # the only page: maps not confirmed for a long time
            assert promql_metrics(expr) == {"ldapsync_last_confirmed_timestamp_seconds"}, name
    by_name = {str(r["alert"]): r for r in rules()}
    assert by_name["LdapsyncLdapUnreachable"]["for"] == "10m", "longer than the liveness timeout and backoff"
    assert "ldapsync_ldap_reachable == 1" in str(by_name["LdapsyncSyncsFailing"]["expr"]), (
        "a sync that fails because LDAP is down is the unreachable alert's, not a second one"
    )
    assert {"LdapsyncMapsStale", "LdapsyncChangeHeld", "LdapsyncSyncsFailing"} <= seen
