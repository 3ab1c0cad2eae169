"""MX and SRS host on one box (docs/deployment.md, "Role combinations"), with separate mailbox
and submission hosts, on stock Debian 12: every address of the whole-system directory ends
where the intent says, once, and the model agrees with real Postfix.

Resolving aliases, groups and forwards in one expansion on the MX also removes the duplicate
the split design has (two routes to one destination meeting past the MX).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import systemdata as sd
from wholesystem import MAILBOX, MX_SRS, SUBMISSION, SUBMITTED, Result, check, model_disagreements, whole_system

pytestmark = [pytest.mark.e2e, pytest.mark.slapd]


@pytest.fixture(scope="module")
def result() -> Iterator[Result]:
    yield from whole_system((MX_SRS, MAILBOX, SUBMISSION), "mxsrs", "submission")


def test_every_address_reaches_each_final_destination_exactly_once(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) not in sd.DEAD_TARGET_SHAPES])


def test_an_address_whose_targets_are_dead_is_refused_at_rcpt_and_live_targets_stay(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) in sd.DEAD_TARGET_SHAPES])


def test_submitted_mail_to_our_addresses_follows_the_same_routes(result: Result) -> None:
    check(result, [f"submit:{a}" for a in SUBMITTED])


def test_nothing_bounced_deferred_or_looped(result: Result) -> None:
    assert result.system.problems_in_logs() == []


def test_the_mail_flow_model_predicts_what_real_postfix_did_for_every_address(result: Result) -> None:
    assert model_disagreements(result) == []
