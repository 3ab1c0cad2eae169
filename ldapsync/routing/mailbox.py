"""A local account's Dovecot userdb record: uid, gid, home (under home_root) and quota.

A record with any field missing or out of bounds is not made (the account then has no local
delivery), with the reason naming the DN and the attribute or setting that is wrong.
"""

from __future__ import annotations

from ldapsync import validate
from ldapsync.routing.decisions import Decisions
from ldapsync.routing.entry import Parsed, show
from ldapsync.routing.types import Mailbox, MailboxSettings, Rule
from ldapsync.schema import AttributeMap


def mailbox(
    login: str,
    address: str,
    dn: str,
    parsed: Parsed,
    settings: MailboxSettings,
    attributes: AttributeMap,
    decide: Decisions,
) -> Mailbox | None:
    """The account's userdb record, or None (with the reason) if any field is missing or out of bounds."""

    def refuse(attribute: str, reason: str) -> None:
        decide.reject(dn, attribute, reason, Rule.NO_MAILBOX, address)

    if parsed.home_error is not None:
        refuse(attributes.home or "home", f"{parsed.home_error}; no mailbox")
        return None
    lo, hi = settings.id_range
    ids: list[int] = []
    for value, default, attr in (
        (parsed.uid, settings.uid, attributes.uid_number),
        (parsed.gid, settings.gid, attributes.gid_number),
    ):
        chosen = value if value is not None else default
        name = attr or "uid/gid"
        if chosen is None:
            refuse(name, "no value and no default in mailbox settings; no mailbox")
            return None
        if not lo <= chosen <= hi:
            refuse(name, f"{chosen} is outside {lo}-{hi}; no mailbox")
            return None
        ids.append(chosen)
    if parsed.home is not None:
        home = parsed.home
        origin = attributes.home or "home"
    else:
        home = settings.home.format(login=login, domain=address.rpartition("@")[2])
        origin = "mailbox.home"
    root = settings.home_root.rstrip("/") + "/"
    try:
        home = validate.home(home)
    except validate.Invalid as e:
        refuse(origin, f"{show(home)} {e}; no mailbox")
        return None
    if not home.startswith(root):
        refuse(origin, f"{show(home)} is not under {settings.home_root}; no mailbox")
        return None
    return Mailbox(login, address, ids[0], ids[1], home, parsed.quota)
