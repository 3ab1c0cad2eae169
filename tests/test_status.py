"""The status record: round trip, lenient loading of old or damaged files, the histogram."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType

from ldapsync import status
from ldapsync.status import PROPAGATION_BUCKETS, Histogram, OutputState, Status, SyncResult


def test_round_trip(tmp_path: Path) -> None:
    record = Status(
        result=SyncResult.HELD,
        last_attempt=3.0,
        last_success=2.0,
        last_confirmed=2.5,
        duration=0.25,
        ldap_reachable=True,
        follower_connected=False,
        follower_error="ldap://a: refused",
        error=None,
        source="ldap:ldap://a",
        held="dovecot-passwd: 900 of 1000 entries would be deleted",
        rejected=2,
        outputs=MappingProxyType({"alias": OutputState(12, "ab" * 32)}),
        generation="20260101T000000Z-0123abcd",
        reload_pending=("alias",),
        reload_error="reload hook exited 1",
        metrics_error=None,
        syncs=MappingProxyType({"installed": 3, "held": 1}),
        propagation=Histogram().observe(0.2).observe(42.0),
    ).counted(SyncResult.HELD)
    status.save(tmp_path, record)
    assert status.load(tmp_path) == record
    assert record.syncs["held"] == 2


def test_missing_or_damaged_file_reads_empty_and_is_left_alone(tmp_path: Path) -> None:
    assert status.load(tmp_path) == Status()
    path = tmp_path / status.FILE
    path.write_bytes(b"\x00\xffgarbage{")
    assert status.load(tmp_path) == Status()
    assert path.read_bytes() == b"\x00\xffgarbage{", "a reader must not rewrite it"


def test_an_older_status_file_is_read_as_far_as_it_goes(tmp_path: Path) -> None:
    old = {
        "result": "error",
        "error": "ldap://a: refused",
        "last_success": 100.0,
        "last_attempt": 200.0,
        "ldap_reachable": False,
        "counts": {"alias": 4},
        "hashes": {"alias": "cd" * 32},
        "rejected": "three",
        "reload_pending": ["alias"],
    }
    (tmp_path / status.FILE).write_text(json.dumps(old))
    record = status.load(tmp_path)
    assert record.result is SyncResult.FAILED and record.error == "ldap://a: refused"
    assert record.last_confirmed == 100.0, "before confirmations were recorded, a success was one"
    assert record.outputs == {"alias": OutputState(4, "cd" * 32)}
    assert record.rejected == 0 and record.reload_pending == ("alias",) and record.syncs == {}


def test_only_installed_and_unchanged_confirm() -> None:
    assert {r for r in SyncResult if r.confirms} == {SyncResult.INSTALLED, SyncResult.UNCHANGED}


def test_histogram_buckets_are_upper_bounds() -> None:
    h = Histogram()
    for value in (0.0, 0.5, 0.51, 5.0, 1e9):
        h = h.observe(value)
    assert h.count == 5 and math.isclose(h.total, 1e9 + 6.01)
    cumulative = dict(h.cumulative())
    assert cumulative["0.5"] == 2 and cumulative["1.0"] == 3 and cumulative["5.0"] == 4 and cumulative["+Inf"] == 5
    assert len(cumulative) == len(PROPAGATION_BUCKETS)
