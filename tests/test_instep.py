"""The contextCSN in-step rule: CSN and cookie parsing (untrusted input) and the grace, on a fake clock."""

from __future__ import annotations

import pytest

from ldapsync import instep
from ldapsync.instep import Csn, InStep, OutOfStep, Pending, StepCheck


def csn(stamp: str, sid: int = 0, count: int = 0) -> Csn:
    value = instep.parse_csn(f"20261207{stamp}.000000Z#{count:06x}#{sid:03x}#000000")
    assert value is not None
    return value


def csns(*values: Csn) -> dict[int, Csn]:
    return {c.sid: c for c in values}


# -- parsing ----------------------------------------------------------------------------


def test_csn_parses_and_orders_like_the_server() -> None:
    a = instep.parse_csn(b"20261207204951.195108Z#000000#001#000000")
    b = instep.parse_csn("20261207204951.262577Z#000000#001#000000")
    c = instep.parse_csn("20261207204951.262577Z#00000a#001#000000")  # same microsecond, later count (hex)
    assert a is not None and b is not None and c is not None
    assert a.sid == 1 and str(a) == "20261207204951.195108Z#000000#001#000000"
    assert a < b < c


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "20261207204951Z#000000#001#000000",  # the pre-2.4 format without microseconds
        "20261207204951.195108Z#000000#001",
        "20261207204951.195108Z#000000#0g1#000000",
        "20261207204951.195108Z#000000#001#000000\nx",
        b"\xff\xfe",
    ],
)
def test_malformed_csn_is_none(value: str | bytes) -> None:
    assert instep.parse_csn(value) is None


def test_csn_set_keeps_the_newest_per_sid_and_reports_malformed_values() -> None:
    got = instep.csn_set(
        [
            b"20261207100000.000000Z#000000#001#000000",
            b"20261207110000.000000Z#000000#001#000000",
            b"20261207090000.000000Z#000000#002#000000",
            b"not-a-csn\n",
            b"\xff",
        ]
    )
    assert {sid: str(c) for sid, c in got.by_sid.items()} == {
        1: "20261207110000.000000Z#000000#001#000000",
        2: "20261207090000.000000Z#000000#002#000000",
    }
    assert got.malformed == ("not-a-csn\\n", "\\\\xff")  # escaped: a value cannot forge a log line


def test_cookie_csns_several_sids() -> None:
    cookie = b"rid=001,sid=002,csn=20261207100000.000000Z#000000#001#000000;20261207120000.000000Z#000000#002#000000"
    got = instep.cookie_csns(cookie)
    assert sorted(got.by_sid) == [1, 2] and got.malformed == ()


@pytest.mark.parametrize("cookie", [None, b"", b"rid=000", b"rid=000,sid=001", b"opaque-cookie-of-another-server"])
def test_cookie_without_csn_is_nothing_to_compare(cookie: bytes | None) -> None:
    assert instep.cookie_csns(cookie) == instep.CsnSet({})


def test_cookie_with_a_bad_csn_keeps_the_good_ones() -> None:
    got = instep.cookie_csns(b"rid=000,csn=20261207100000.000000Z#000000#001#000000;bogus")
    assert list(got.by_sid) == [1] and got.malformed == ("bogus",)
    assert instep.cookie_csns(b"rid=000,csn=\xff").malformed


def test_merge_keeps_the_newer_per_sid() -> None:
    ours = csns(csn("100000", 1), csn("100000", 2))
    merged = instep.merge(ours, csns(csn("110000", 2)))  # a persist cookie names one sid
    assert merged == csns(csn("100000", 1), csn("110000", 2))
    assert instep.merge(merged, csns(csn("090000", 1))) == merged  # never backwards


# -- the rule, on a fake clock -----------------------------------------------------------


def test_in_step_when_caught_up() -> None:
    check = StepCheck(grace=10)
    assert check.observe(csns(csn("100000")), csns(csn("100000")), now=0) == InStep()
    assert check.observe(csns(csn("100000")), csns(csn("110000")), now=5) == InStep()  # ours newer: fine


def test_behind_past_the_grace_at_a_later_check_is_out_of_step() -> None:
    check = StepCheck(grace=10)
    server, ours = csns(csn("110000")), csns(csn("100000"))
    assert check.observe(server, ours, now=0) == Pending((0,))  # may be in flight
    assert check.observe(server, ours, now=9.9) == Pending((0,), None)  # not yet past the grace
    verdict = check.observe(server, ours, now=10)
    assert verdict == OutOfStep(0, csn("100000"), csn("110000"), since=0)


def test_one_late_read_is_not_enough() -> None:
    """The first read that sees the server ahead starts the grace, however late it comes."""
    check = StepCheck(grace=10)
    assert check.observe(csns(csn("110000")), csns(csn("100000")), now=1000) == Pending((0,))


def test_a_steady_burst_is_never_out_of_step() -> None:
    """The server is ahead at every read, but what it had at the previous read has reached us."""
    check = StepCheck(grace=10)
    for i in range(50):
        now = i * 6.0
        server = csns(csn(f"10{i:02d}30"))
        ours = csns(csn(f"10{i - 1:02d}30" if i else "095959"))  # one read behind
        verdict = check.observe(server, ours, now=now)
        assert isinstance(verdict, Pending), i
        # confirmed as of the previous read: all the server had then has reached us
        assert verdict.caught_up_to == (now - 6.0 if i else None), i


def test_catching_up_clears_the_pending_sid() -> None:
    check = StepCheck(grace=10)
    assert check.observe(csns(csn("110000")), csns(csn("100000")), now=0) == Pending((0,))
    assert check.observe(csns(csn("110000")), csns(csn("110000")), now=5) == InStep()
    # a new grace; all the server had at the previous read is here
    assert check.observe(csns(csn("120000")), csns(csn("110000")), now=20) == Pending((0,), caught_up_to=5)


def test_several_sids_are_judged_each_on_its_own() -> None:
    check = StepCheck(grace=10)
    server = csns(csn("110000", 1), csn("110000", 2))
    assert check.observe(server, csns(csn("110000", 1), csn("100000", 2)), now=0) == Pending((2,))
    verdict = check.observe(server, csns(csn("110000", 1), csn("100000", 2)), now=12)
    assert isinstance(verdict, OutOfStep) and verdict.sid == 2


def test_a_sid_our_cookie_does_not_name_is_not_judged() -> None:
    check = StepCheck(grace=10)
    server = csns(csn("110000", 1), csn("110000", 3))
    for now in (0, 20, 40):
        assert check.observe(server, csns(csn("110000", 1)), now=now) == InStep()


def test_reset_forgets_what_was_pending() -> None:
    check = StepCheck(grace=10)
    server, ours = csns(csn("110000")), csns(csn("100000"))
    check.observe(server, ours, now=0)
    check.reset()
    assert check.observe(server, ours, now=20) == Pending((0,))


def test_a_refresh_the_check_asked_for_that_finds_nothing_turns_the_check_off_for_that_server() -> None:
    """A server that sends no cookie for writes outside the search keeps its contextCSN ahead of
    ours after each one: one wasted full refresh, then that server is not judged again."""
    alarms = instep.FalseAlarms()
    assert alarms.trusted("ldap://a")
    assert not alarms.refreshed("ldap://a", "sum-1"), "a refresh the check did not ask for proves nothing"
    alarms.called_out("ldap://a", "sum-1")
    assert alarms.refreshed("ldap://a", "sum-1")
    assert not alarms.trusted("ldap://a") and alarms.trusted("ldap://b")


def test_a_refresh_that_brought_what_was_missing_keeps_the_check() -> None:
    alarms = instep.FalseAlarms()
    alarms.called_out("ldap://a", "sum-1")
    assert not alarms.refreshed("ldap://a", "sum-2")  # the lost change arrived with the refresh
    assert alarms.trusted("ldap://a")
    assert not alarms.refreshed("ldap://a", "sum-2"), "only the refresh that followed the alarm counts"
    alarms.called_out("ldap://a", "sum-2")
    alarms.called_out("ldap://b", "sum-2")
    assert alarms.refreshed("ldap://b", "sum-2") and alarms.trusted("ldap://a") and not alarms.trusted("ldap://b")
