"""The one-host recipe of docs/deployment.md (MX, mailbox and submission on one box, no SRS
host), on stock Debian 12, delivers every address of the whole-system directory exactly where
the intent says, once: the same intent, so one host and four hosts behave alike.

One Postfix (Debian's main.cf and master.cf plus postfix-onehost-main.cf and the submission
snippets) and one Dovecot (stock conf.d plus the mailbox and one-host snippets), fed by
`ldapsync --once` with ldapsync-onehost.yaml; an SMTP sink is the Internet.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import systemdata as sd
from wholesystem import ONE_HOST, SUBMITTED, Result, check, imap_messages, model_disagreements, whole_system

pytestmark = [pytest.mark.e2e, pytest.mark.slapd]


@pytest.fixture(scope="module")
def result() -> Iterator[Result]:
    yield from whole_system((ONE_HOST,), "onehost", "onehost")


def test_every_address_reaches_each_final_destination_exactly_once(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) not in sd.DEAD_TARGET_SHAPES])


def test_an_address_whose_targets_are_dead_is_refused_at_rcpt_and_live_targets_stay(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) in sd.DEAD_TARGET_SHAPES])


def test_submitted_mail_is_delivered_by_the_same_host(result: Result) -> None:
    check(result, [f"submit:{a}" for a in SUBMITTED])


def test_nothing_bounced_deferred_or_looped(result: Result) -> None:
    assert result.system.problems_in_logs() == []


def test_the_mail_flow_model_predicts_what_real_postfix_did_for_every_address(result: Result) -> None:
    assert model_disagreements(result) == []


def test_users_read_their_mail_over_imap_with_the_ldap_mail_password(result: Result) -> None:
    assert imap_messages(result, "onehost", "plain1@example.org") == 1
