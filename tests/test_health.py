"""The health record's verdicts and STATUS line, with invented times."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ldapsync.health import CRITICAL, OK, WARNING, Health, min_max_age
from ldapsync.scheduler import CONFIRM_EVERY
from ldapsync.status import Status, SyncResult

NOW = 1_800_000_000.0
GOOD = Status(
    result=SyncResult.INSTALLED,
    last_success=NOW - 100,
    last_confirmed=NOW - 5,
    ldap_reachable=True,
    follower_connected=True,
    generation="g1",
)


def health(record: Status = GOOD, **kw: object) -> Health:
    return Health(at=NOW, record=record, agent_pid=kw.pop("agent_pid", 42), **kw)  # type: ignore[arg-type]


def test_healthy_is_ok() -> None:
    assert health().verdict(900).code == OK


def test_ldap_lost_longer_than_the_timeout_is_a_warning_naming_it() -> None:
    down = replace(GOOD, follower_connected=False, ldap_reachable=False, ldap_lost=NOW - 35, follower_error="refused")
    assert health(down, ldap_timeout=10).verdict(900).code == WARNING
    assert "LDAP unreachable for 35s (refused)" in health(down, ldap_timeout=10).verdict(900).text
    assert health(down, ldap_timeout=60).verdict(900).code == OK, "within the timeout: not yet news"
    assert health(down, agent_pid=None).ldap_down_for is None, "no agent: no follower to have lost it"
    stale = replace(down, last_confirmed=NOW - 1000)
    verdict = health(stale).verdict(900)
    assert verdict.code == CRITICAL and "LDAP unreachable for 35s" in verdict.text


@pytest.mark.parametrize("timeout", [2.0, 10.0, 30.0])
def test_a_quiet_agent_never_warns_at_the_smallest_sensible_max_age(timeout: float) -> None:
    """The worst age of a healthy quiet agent's confirmation: the confirmation interval plus a
    liveness read (half the timeout to ask, half to answer) plus a second's loop."""
    worst = CONFIRM_EVERY + timeout + 1.0
    quiet = replace(GOOD, last_confirmed=NOW - worst)
    assert health(quiet, ldap_timeout=timeout).verdict(min_max_age(timeout)).code == OK


def test_a_rejected_config_is_a_warning_and_leads_the_status_line() -> None:
    h = health(replace(GOOD, config_error="/etc/ldapsync/ldapsync.yaml: domain: bad"))
    assert h.verdict(900).code == WARNING and "restart would fail" in h.verdict(900).text
    line = h.status_line(following="ldap://x (syncrepl)")
    assert line.startswith("config file REJECTED") and "ldapsync.yaml" in line and "following ldap://x" in line


def test_status_line_is_one_line_whatever_the_error() -> None:
    """sd_notify reads each line as a field: a YAML error's newlines must not end the STATUS."""
    h = health(replace(GOOD, config_error="c.yaml: not valid YAML: while parsing\n  in line 2\n    ^"))
    assert "\n" not in h.status_line() and "while parsing in line 2 ^" in h.status_line()


def test_status_line_says_what_is_wrong_first() -> None:
    held = health(replace(GOOD, held="too many deletions", result=SyncResult.HELD))
    assert held.status_line().startswith("change HELD for review (too many deletions)")
    failed = health(replace(GOOD, result=SyncResult.FAILED, error="hook refused"))
    assert failed.status_line(retry_in=4).startswith("sync FAILED (hook refused, retry in 4s)")
    down = health(replace(GOOD, follower_connected=False, follower_error="refused", ldap_lost=NOW))
    assert down.status_line().startswith("directory unreachable since ")
