"""Persistent search (draft-ietf-ldapext-psearch-03) consumer, sans I/O.

For servers with psearch but no syncrepl (389-ds). psearch has no cookie, so the follower
does a full read compared by content after every (re)connect and uses these events only
for changes while connected. Messages are what ldap3 hands over once it has decoded the
Entry Change Notification control; no ldap3 import here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CHANGE_TYPES = ("add", "delete", "modify", "modify dn")


class PsearchProtocolError(ValueError):
    """A notification that cannot be applied safely; the follower reconnects."""


@dataclass(frozen=True, slots=True)
class Notification:
    dn: str
    attributes: Mapping[str, Sequence[bytes]] = field(default_factory=dict)
    change_type: str | None = None  # None: no Entry Change Notification control
    previous_dn: str | None = None


@dataclass(frozen=True, slots=True)
class Done:
    result_code: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class Upsert:
    dn: str
    attributes: Mapping[str, Sequence[bytes]]
    previous_dn: str | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    dn: str


@dataclass(frozen=True, slots=True)
class Finished:
    result_code: int
    message: str


Event = Upsert | Delete | Finished


class PsearchConsumer:
    def __init__(self) -> None:
        self.finished = False

    def receive(self, message: Notification | Done) -> list[Event]:
        if self.finished:
            raise PsearchProtocolError("message after the persistent search ended")
        if isinstance(message, Done):
            self.finished = True
            return [Finished(message.result_code, message.message)]
        if not message.dn:
            raise PsearchProtocolError("change notification without a DN")
        kind = message.change_type
        if kind is not None and kind not in CHANGE_TYPES:
            raise PsearchProtocolError(f"{message.dn}: unknown change type {kind!r}")
        if kind == "modify dn":
            if not message.previous_dn:
                raise PsearchProtocolError(f"{message.dn}: modify dn without previousDN")
            return [Upsert(message.dn, message.attributes, message.previous_dn)]
        if message.previous_dn:  # the draft allows it on modDN only: a server we do not understand
            raise PsearchProtocolError(f"{message.dn}: previousDN on a {kind or 'plain'} notification")
        if kind == "delete":
            return [Delete(message.dn)]
        return [Upsert(message.dn, message.attributes)]


def from_ldap3(item: Mapping[str, Any]) -> Notification | Done:
    """Translate one ldap3 ASYNC_STREAM event dict into a consumer message."""
    kind = item.get("type")
    if kind == "searchResEntry":
        prev = item.get("previousDN")
        return Notification(
            dn=str(item.get("dn", "")),
            attributes=item.get("raw_attributes") or {},
            change_type=item.get("changeType"),
            previous_dn=str(prev) if prev is not None else None,
        )
    if kind == "searchResDone":
        return Done(int(item.get("result", 80)), str(item.get("message") or item.get("description") or ""))
    raise PsearchProtocolError(f"unexpected {kind!r} in a persistent search")
