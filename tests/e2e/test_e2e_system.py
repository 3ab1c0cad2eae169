"""The whole mail system, as docs/deployment.md builds it on stock Debian 12, delivers every
address of a directory with every routing shape exactly where the intent says, once.

MX, SRS, mailbox and submission hosts are separate real Postfix instances (Debian's main.cf
and master.cf plus the docs' snippets), the mailbox host hands mail to a stock Dovecot over
LMTP, and an SMTP sink is the Internet. `ldapsync --once` feeds every host from one
throwaway slapd. One tagged message goes to every address through the MX (and a few through
the submission host); then every queue must drain, and each message must have reached each
of its final destinations exactly once, or have been refused at RCPT: nothing accepted and
bounced, nothing looping, nothing deferred.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import splitdesign
import systemdata as sd
from wholesystem import (
    MAILBOX,
    MX,
    SRS,
    SUBMISSION,
    SUBMITTED,
    Recipe,
    Result,
    check,
    imap_messages,
    model_disagreements,
    whole_system,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slapd]


@pytest.fixture(scope="module")
def result() -> Iterator[Result]:
    yield from whole_system((MX, SRS, MAILBOX, SUBMISSION), "mx", "submission")


def test_every_address_reaches_each_final_destination_exactly_once(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) not in sd.DEAD_TARGET_SHAPES | sd.TWO_ROUTES])


def test_two_routes_to_one_destination_meeting_past_the_mx_deliver_once(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) in sd.TWO_ROUTES])


def test_an_address_whose_targets_are_dead_is_refused_at_rcpt_and_live_targets_stay(result: Result) -> None:
    check(result, [a for a in sd.addresses() if sd.shape(a) in sd.DEAD_TARGET_SHAPES])


def test_submitted_mail_to_our_addresses_follows_the_same_routes(result: Result) -> None:
    check(result, [f"submit:{a}" for a in SUBMITTED])


def test_no_host_bounced_deferred_or_looped_anything(result: Result) -> None:
    assert result.system.problems_in_logs() == []


def test_the_mailbox_host_serves_imap_over_starttls_with_the_ldap_mail_password(result: Result) -> None:
    assert imap_messages(result, "mailbox", "plain1@example.org") == 1


def test_the_mail_flow_model_predicts_what_real_postfix_did_for_every_address(result: Result) -> None:
    assert model_disagreements(result) == []


def test_every_copy_for_the_internet_leaves_through_the_srs_host(result: Result) -> None:
    """The MX's relayhost: it hands nothing to the Internet itself (forwards and aliases'
    external targets alike), only to the SRS and mailbox hosts."""
    system = result.system
    hops = {name: f"[127.0.0.1]:{port}," for name, port in system.ports.items()}
    world = f"[127.0.0.1]:{system.world.port},"
    mx_sent = [line for line in system.hosts["mx"].postfix.log().splitlines() if "status=sent" in line]
    assert any(hops["srs"] in line for line in mx_sent), mx_sent[:5]
    assert [line for line in mx_sent if not (hops["srs"] in line or hops["mailbox"] in line)] == []
    srs_sent = [line for line in system.hosts["srs"].postfix.log().splitlines() if "status=sent" in line]
    assert srs_sent and all(world in line for line in srs_sent), srs_sent[:5]


SPLIT_MX = Recipe("mx", "ldapsync-mx.yaml", ("postfix-mx-main.cf",))
SPLIT_SRS = Recipe("srs", "ldapsync-srs.yaml", ("postfix-srs-main.cf",))
KEPT_COPIES = ("keep1@example.org", "keep2@example.org", "in2@example.org")


@pytest.fixture(scope="module")
def split_design() -> Iterator[Result]:
    """The system with the split design the docs had (tests/splitdesign.py): the MX expands
    aliases and groups and sends forwarded addresses to the SRS host (transport map), whose
    virtual map expands the forwards and relays what stays in our domains to the mailbox host."""
    two_routes = [a for a in sd.addresses() if sd.shape(a) in sd.TWO_ROUTES]
    yield from whole_system(
        (SPLIT_MX, SPLIT_SRS, MAILBOX, SUBMISSION),
        "mx",
        "submission",
        addresses=[*two_routes, *KEPT_COPIES],
        submitted=(),
        overrides=splitdesign.SNIPPETS,
    )


def test_the_split_design_delivers_twice_where_two_routes_meet_past_the_mx(split_design: Result) -> None:
    """Why the MX resolves everything: with the expansion split between MX and SRS host, real
    Postfix passes two copies on for the two-routes shapes (one per host's expansion). This
    proves the whole-system check sees the duplicate (and the kept copies were fine there)."""
    observed = split_design.run.by_address()
    for address in observed:
        if sd.shape(address) in sd.TWO_ROUTES:
            assert 2 in observed[address].reached.values(), (address, observed[address].summary())
    with pytest.raises(AssertionError, match=r"\(each once, no bounce\); got accepted"):
        check(split_design, [a for a in observed if sd.shape(a) in sd.TWO_ROUTES])
    check(split_design, list(KEPT_COPIES))


@pytest.fixture(scope="module")
def srs_back_to_the_mx() -> Iterator[Result]:
    """The split design with an SRS host whose relay_transport sends what stays in our domains
    back to the MX (instead of to the mailbox host)."""
    text = splitdesign.SRS_MAIN_CF
    relayed_back = text.replace(
        "relay_transport = relay:[mailbox.example.org]", "relay_transport = relay:[mx.example.org]"
    )
    assert relayed_back != text
    yield from whole_system(
        (SPLIT_MX, SPLIT_SRS, MAILBOX, SUBMISSION),
        "mx",
        "submission",
        addresses=KEPT_COPIES,
        submitted=(),
        overrides={**splitdesign.SNIPPETS, "postfix-srs-main.cf": relayed_back},
    )


def test_an_srs_host_relaying_back_to_the_mx_loops_every_kept_copy(srs_back_to_the_mx: Result) -> None:
    """Why nothing the SRS host sends goes back to the MX: the MX would hand the kept copy to
    the SRS host again, each round sending one more copy out, until Postfix's hop limit
    bounces it. This test proves the whole-system test sees that loop."""
    for address, got in srs_back_to_the_mx.run.by_address().items():
        internet = sum(n for d, n in got.reached.items() if d.startswith("internet:"))
        assert internet > 1 and got.bounces and not any(d.startswith("mailbox:") for d in got.reached), (
            address,
            got.summary(),
        )
    problems = srs_back_to_the_mx.system.problems_in_logs()
    assert any("too many hops" in line for line in problems), problems
