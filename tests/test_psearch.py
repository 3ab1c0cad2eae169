"""The persistent-search consumer (389-ds style servers) with recorded message sequences.

The Entry Change Notification controls below are BER written out by hand from
draft-ietf-ldapext-psearch-03 (SEQUENCE { changeType ENUMERATED, previousDN OCTET STRING
OPTIONAL, changeNumber INTEGER OPTIONAL }) and decoded by ldap3's own routine, exactly as
ldap3's ASYNC_STREAM strategy hands them to the follower; from_ldap3 must take it from there.
"""

from __future__ import annotations

from typing import Any

import pytest
from ldap3.protocol.rfc2849 import decode_persistent_search_control

from ldapsync import psearch
from ldapsync.psearch import Delete, Done, Finished, Notification, PsearchConsumer, PsearchProtocolError, Upsert

ECN_OID = "2.16.840.1.113730.3.4.7"
USERS = "ou=users,dc=example,dc=org"
BOB = f"uid=bob,{USERS}"
BOB_ATTRS = {"uid": [b"bob"], "emailForward": [b"bob@far.example"], "entryUUID": [b"u-bob"]}

ECN_ADD = bytes.fromhex("3003 0a0101")
ECN_DELETE = bytes.fromhex("3003 0a0102")
ECN_MODIFY = bytes.fromhex("3003 0a0104")
ECN_MODIFY_WITH_NUMBER = bytes.fromhex("3006 0a0104 020142")  # changeNumber 66


def ecn_moddn(previous_dn: str) -> bytes:
    dn = previous_dn.encode()
    assert len(dn) < 124
    body = bytes.fromhex("0a0108") + bytes([0x04, len(dn)]) + dn
    return bytes([0x30, len(body)]) + body


def entry_item(dn: str, attrs: dict[str, list[bytes]], ecn: bytes | None) -> dict[str, Any]:
    """A searchResEntry as ldap3's AsyncStreamStrategy.accumulate_stream leaves it in the queue."""
    item: dict[str, Any] = {
        "type": "searchResEntry",
        "dn": dn,
        "raw_attributes": attrs,
        "attributes": {k: [v.decode() for v in vs] for k, vs in attrs.items()},
        "controls": {} if ecn is None else {ECN_OID: {"description": "", "criticality": False, "value": ecn}},
    }
    notification = decode_persistent_search_control(item)
    if notification:
        item.update(notification)
        del item["controls"][ECN_OID]
    return item


def done_item(result: int, message: str = "") -> dict[str, Any]:
    return {
        "type": "searchResDone",
        "result": result,
        "description": "x",
        "message": message,
        "dn": "",
        "referrals": None,
    }


def feed(items: list[dict[str, Any]]) -> list[psearch.Event]:
    consumer = PsearchConsumer()
    events: list[psearch.Event] = []
    for item in items:
        events += consumer.receive(psearch.from_ldap3(item))
    return events


# -- recorded sequences through from_ldap3 ------------------------------------------------------


def test_add_modify_delete_sequence() -> None:
    events = feed(
        [
            entry_item(BOB, BOB_ATTRS, ECN_ADD),
            entry_item(BOB, {**BOB_ATTRS, "emailForward": [b"bob@near.example"]}, ECN_MODIFY_WITH_NUMBER),
            entry_item(BOB, BOB_ATTRS, ECN_DELETE),
        ]
    )
    assert events == [
        Upsert(BOB, BOB_ATTRS),
        Upsert(BOB, {**BOB_ATTRS, "emailForward": [b"bob@near.example"]}),
        Delete(BOB),
    ]


def test_modify_dn_carries_the_previous_dn() -> None:
    old = f"uid=robert,{USERS}"
    (event,) = feed([entry_item(BOB, BOB_ATTRS, ecn_moddn(old))])
    assert event == Upsert(BOB, BOB_ATTRS, previous_dn=old)
    assert type(event.previous_dn) is str  # ldap3 hands over a pyasn1 LDAPDN


def test_entry_without_notification_control_is_an_upsert() -> None:
    """changes_only=False servers send the current entries first, without the control."""
    assert feed([entry_item(BOB, BOB_ATTRS, None)]) == [Upsert(BOB, BOB_ATTRS)]


def test_search_done_finishes_and_nothing_may_follow() -> None:
    consumer = PsearchConsumer()
    assert consumer.receive(psearch.from_ldap3(done_item(51, "server is busy"))) == [Finished(51, "server is busy")]
    with pytest.raises(PsearchProtocolError, match="after the persistent search ended"):
        consumer.receive(psearch.from_ldap3(entry_item(BOB, BOB_ATTRS, ECN_MODIFY)))
    with pytest.raises(PsearchProtocolError, match="after the persistent search ended"):
        consumer.receive(Done(0))


def test_done_without_message_uses_the_description() -> None:
    item = done_item(3)
    item["message"] = ""
    item["description"] = "timeLimitExceeded"
    assert psearch.from_ldap3(item) == Done(3, "timeLimitExceeded")


@pytest.mark.parametrize("kind", ["searchResRef", "intermediateResponse", None])
def test_unexpected_ldap3_message_types_are_errors(kind: str | None) -> None:
    with pytest.raises(PsearchProtocolError, match="unexpected"):
        psearch.from_ldap3({"type": kind, "uri": ["ldap://elsewhere/"]})


# -- illegal notifications ----------------------------------------------------------------------


def test_modify_dn_without_previous_dn_is_an_error() -> None:
    with pytest.raises(PsearchProtocolError, match="without previousDN") as e:
        PsearchConsumer().receive(Notification(BOB, BOB_ATTRS, "modify dn"))
    assert BOB in str(e.value)  # the error names the entry


@pytest.mark.parametrize("kind", ["add", "modify", "delete", None])
def test_previous_dn_on_anything_but_modify_dn_is_an_error(kind: str | None) -> None:
    with pytest.raises(PsearchProtocolError, match="previousDN on a"):
        PsearchConsumer().receive(Notification(BOB, BOB_ATTRS, kind, previous_dn=f"uid=x,{USERS}"))


@pytest.mark.parametrize("kind", ["rename", "MODIFY", ""])
def test_unknown_change_type_is_an_error(kind: str) -> None:
    with pytest.raises(PsearchProtocolError, match="unknown change type"):
        PsearchConsumer().receive(Notification(BOB, BOB_ATTRS, kind))


def test_notification_without_dn_is_an_error() -> None:
    with pytest.raises(PsearchProtocolError, match="without a DN"):
        PsearchConsumer().receive(Notification("", BOB_ATTRS, "add"))


def test_an_error_does_not_end_the_search_but_done_does() -> None:
    """The follower reconnects on an error; until then a bad message leaves the consumer usable."""
    consumer = PsearchConsumer()
    with pytest.raises(PsearchProtocolError):
        consumer.receive(Notification(BOB, BOB_ATTRS, "bogus"))
    assert consumer.receive(Notification(BOB, BOB_ATTRS, "delete")) == [Delete(BOB)]
    assert not consumer.finished
    consumer.receive(Done(0))
    assert consumer.finished
