"""One directory entry, read: what it says (validated) and the names it claims.

A pure function of the entry and the settings, shared by the full build (which decides who
wins each claim) and the incremental engine (which follows the claims to find what a change
can reach): the primary address, the default address and the group addresses are worked out
here once, not re-derived by each.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from ldapsync import validate
from ldapsync.directory import Entry, Rejection
from ldapsync.routing.decisions import Decisions
from ldapsync.routing.types import DEFAULT_DISABLED_MESSAGE, GroupSettings, Rule, Settings, Trace
from ldapsync.schema import LOGICAL_FIELDS

CREATE_TIMESTAMP = "createtimestamp"
_UNKNOWN_AGE = "~"  # sorts after every valid timestamp: a malformed one never wins a conflict


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one entry says, validated: a pure function of the entry and the settings."""

    login: str | None = None  # None: not a mail account (or skipped, see rejections)
    retired: bool = False
    disabled: str | None = None
    targets: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    password: str | None = None
    weak: bool = False  # the password is an unsalted digest or DES-CRYPT
    rejections: tuple[Rejection, ...] = ()
    notices: tuple[Rejection, ...] = ()
    skipped: bool = False  # no login attribute at all
    created: str = ""  # normalised createTimestamp; "" when absent: counts as oldest
    # Own addresses, primary first; never empty for an account (the default is login@domain).
    addresses: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    home_error: str | None = None  # the home value is unusable: the account gets no mailbox (not a default one)
    quota: str | None = None
    group: bool = False  # a mail group, resolved after every account is known

    @property
    def primary(self) -> str:
        return self.addresses[0]


EntryCache = dict[str, tuple[Entry, Parsed]]


@dataclass(frozen=True, slots=True)
class Names:
    """The names one entry (or static entry) claims and the names it routes to."""

    logins: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    to_addresses: tuple[str, ...] = ()
    to_dns: tuple[str, ...] = ()


_DN_SPACES_RE = re.compile(r"\s*([,=+])\s*")


def dn_key(dn: str) -> str:
    """A DN as compared with member values: case and spaces around separators do not count."""
    return _DN_SPACES_RE.sub(r"\1", dn.strip().lower())


def group_address(value: str, domain: str, canon: Mapping[str, str]) -> str:
    """A group's name or address member as an address: a bare name is in `domain`."""
    if "@" not in value:
        return f"{validate.local_part(value).lower()}@{domain}"
    address = validate.address(value)
    local, _, dom = address.rpartition("@")
    return f"{local.lower()}@{canon[dom]}" if dom in canon else address


def show(value: str) -> str:
    """An untrusted value as quoted in a message: repr (no control characters), at most 80 characters."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "...'"


def group_test(settings: GroupSettings | None) -> Callable[[Entry], bool] | None:
    """Whether an entry is a mail group (None: groups are not configured)."""
    if settings is None:
        return None
    classes = frozenset(c.lower() for c in settings.object_classes)
    base = dn_key(settings.base_dn) if settings.base_dn else None

    def is_group(entry: Entry) -> bool:
        if not classes.intersection(v.lower() for v in entry.attributes.get("objectclass", ())):
            return False
        if base is None:
            return True
        key = dn_key(entry.dn)
        return key == base or key.endswith("," + base)

    return is_group


MEMO_LIMIT = 4096  # values per table of a _Memo; a full table starts over


class _Memo:
    """Validation results by value, for one parser: validation is a pure function of the value
    (and of the day, which a parser is made for), and many entries share a value: a status
    word, a retiring date, a creation time from a bulk load, a default password hash. Each
    table is bounded, so an agent's parser, kept for a whole day, does not grow with churn."""

    __slots__ = ("_passwords", "_stamps", "_statuses", "_today")

    def __init__(self, today: date) -> None:
        self._today = today
        self._passwords: dict[str, tuple[validate.Hash | None, str]] = {}
        self._stamps: dict[str, str | None] = {}
        self._statuses: dict[str, tuple[str | None, bool]] = {}

    def password(self, value: str) -> tuple[validate.Hash | None, str]:
        """(the checked hash, "") or (None, why it is refused)."""
        found = self._passwords.get(value)
        if found is None:
            try:
                found = (validate.check_password(value), "")
            except validate.Invalid as e:
                found = (None, str(e))
            _remember(self._passwords, value, found)
        return found

    def created(self, value: str) -> str | None:
        if value in self._stamps:
            return self._stamps[value]
        found = validate.generalized_time(value)
        _remember(self._stamps, value, found)
        return found

    def status(self, value: str) -> tuple[str | None, bool]:
        """(why the status is not understood, or None; whether it means retired today)."""
        found = self._statuses.get(value)
        if found is None:
            found = (validate.status_problem(value), validate.is_retired(value, self._today))
            _remember(self._statuses, value, found)
        return found


def _remember(table: dict[str, Any], key: str, value: Any) -> None:
    if len(table) >= MEMO_LIMIT:
        table.clear()
    table[key] = value


def entry_parser(settings: Settings, today: date, trace: Trace | None = None) -> Callable[[Entry], Parsed]:
    """What one entry says, validated: the same function for a full and an incremental build."""
    canon = settings.canonical_domains()
    names = {f: (getattr(settings.attributes, f) or "").lower() for f in LOGICAL_FIELDS}
    is_group = group_test(settings.groups)
    rank = {d: i for i, d in enumerate((settings.domain, *settings.hosted))}
    memo = _Memo(today)

    def parse(entry: Entry) -> Parsed:
        if is_group is not None and is_group(entry):
            return Parsed(group=True)
        return _parse_entry(entry, settings, names, canon, rank, memo, trace)

    return parse


def entry_names(entry: Entry, parsed: Parsed, settings: Settings, canon: Mapping[str, str]) -> Names:
    """Every name the entry could hold (won or not) and every name it routes to."""
    groups = settings.groups
    dns = (dn_key(entry.dn),) if groups is not None else ()
    if parsed.group:
        assert groups is not None

        def addresses(attributes: Iterable[str]) -> tuple[str, ...]:
            out = []
            for attr in attributes:
                for value in entry.get(attr):
                    try:
                        out.append(group_address(value, settings.domain, canon))
                    except validate.Invalid:
                        continue
            return tuple(out)

        return Names(
            addresses=addresses((groups.name_attribute,)),
            dns=dns,
            to_addresses=addresses(groups.address_attributes),
            to_dns=tuple(dn_key(v) for a in groups.member_attributes for v in entry.get(a)),
        )
    if parsed.login is None:
        return Names(dns=dns)
    return Names(
        logins=(parsed.login,), addresses=parsed.addresses + parsed.aliases, dns=dns, to_addresses=parsed.targets
    )


def _parse_entry(
    entry: Entry,
    settings: Settings,
    names: dict[str, str],
    canon: Mapping[str, str],
    rank: Mapping[str, int],
    memo: _Memo,
    trace: Trace | None,
) -> Parsed:
    attributes = settings.attributes
    domain = settings.domain
    rej: list[Rejection] = []
    notes: list[Rejection] = []
    decide = Decisions(rej, trace, notes)
    attrs = entry.attributes
    logins = attrs.get(names["login"], ())
    if not logins:
        return Parsed(skipped=True)
    if len(logins) > 1:
        reason = "multi-valued login; entry skipped"
        return Parsed(rejections=(Rejection(entry.dn, attributes.login, reason),))
    try:
        login = validate.login(logins[0])
    except validate.Invalid as e:
        return Parsed(rejections=(Rejection(entry.dn, attributes.login, f"{e}; entry skipped"),))

    def canonical(addr: str) -> str:
        local, _, dom = addr.rpartition("@")
        if dom not in canon:
            return addr
        out = f"{local.lower()}@{canon[dom]}"
        return addr if out == addr else out

    # The account's own addresses come first: every later decision is traced at the primary one.
    own: list[str] = []
    address_rej: list[Rejection] = []  # dropped with the entry if it is retired
    decide_address = Decisions(address_rej, trace)
    if names["address"]:
        addr_attr = attributes.address or ""
        for value in attrs.get(names["address"], ()):
            try:
                address = validate.address(value)
            except validate.Invalid as e:
                decide_address.reject(entry.dn, addr_attr, f"{show(value)} {e}; value dropped")
                continue
            if address.rpartition("@")[2] not in canon:
                reason = f"{show(value)} is not in a hosted domain; value dropped"
                decide_address.reject(entry.dn, addr_attr, reason, Rule.NOT_HOSTED, address)
                continue
            own.append(canonical(address))
    if len(own) > 1:  # unordered in LDAP: the primary is chosen by a rule the admin controls
        addresses = tuple(sorted(set(own), key=lambda a: primary_order(a, login, rank)))
        attr = attributes.primary_address or ""
        chosen = _chosen_primary(entry, attr, names["primary_address"], addresses, canonical, decide_address)
        if chosen is not None:
            addresses = (chosen, *(a for a in addresses if a != chosen))
    else:
        addresses = tuple(own) or (f"{login}@{domain}",)  # made once, shared with the model's tables
    me = addresses[0]
    created = ""
    stamps = attrs.get(CREATE_TIMESTAMP, ())
    if stamps:
        created = (memo.created(stamps[0]) if len(stamps) == 1 else None) or _UNKNOWN_AGE
        if created == _UNKNOWN_AGE:
            decide.notice(entry.dn, "createTimestamp", "malformed; the entry counts as newest")
    status_attr = attributes.status or ""
    retired = False
    for status in attrs.get(names["status"], ()):
        problem, is_retired = memo.status(status)
        if problem is not None:
            reason = f"{show(status)}: {problem}; the account stays active"
            decide.notice(entry.dn, status_attr, reason, Rule.STATUS_UNRECOGNISED, me)
        if is_retired:
            retired = True
            decide.event(Rule.RETIRED, me, entry.dn, status_attr, show(status))
    if retired:
        return Parsed(login=login, retired=True, notices=tuple(notes), created=created, addresses=addresses)
    rej.extend(address_rej)
    messages = attrs.get(names["disable_message"], ())
    if len(messages) > 1:
        messages = tuple(sorted(messages))  # LDAP values are unordered
    if messages:
        try:
            message = validate.disable_message(messages[0])
        except validate.Invalid as e:
            decide.reject(entry.dn, attributes.disable_message or "", f"{e}; default text used")
            message = DEFAULT_DISABLED_MESSAGE
        decide.event(Rule.DISABLED, me, entry.dn, attributes.disable_message or "", message)
        return Parsed(
            login=login,
            disabled=message,
            rejections=tuple(rej),
            notices=tuple(notes),
            created=created,
            addresses=addresses,
        )

    fwd_attr = attributes.forward or ""
    alias_attr = attributes.alias or ""
    targets: list[str] = []
    for value in attrs.get(names["forward"], ()):
        # "a@x, b@y" is a list (userdir-ldap); spaces around commas are not data.
        for part in value.split(","):
            candidate = part.strip(" ")
            if not candidate:
                continue
            try:
                targets.append(canonical(validate.address(candidate)))
            except validate.Invalid as e:
                decide.reject(entry.dn, fwd_attr, f"{show(part)} {e}; value dropped", Rule.VALUE_DROPPED, me)
    aliases: list[str] = []
    for value in attrs.get(names["alias"], ()):
        try:
            alias = validate.address(value)
        except validate.Invalid as e:
            decide.reject(entry.dn, alias_attr, f"{show(value)} {e}; value dropped", Rule.VALUE_DROPPED, me)
            continue
        if alias.rpartition("@")[2] not in canon:
            where = domain if len(set(canon.values())) == 1 else "a hosted domain"
            reason = f"{show(value)} is not in {where}; value dropped"
            decide.reject(entry.dn, alias_attr, reason, Rule.VALUE_DROPPED, alias)
            continue
        aliases.append(canonical(alias))
    password = None
    weak = False
    pw_attr = attributes.mail_password or ""
    hashes = attrs.get(names["mail_password"], ())
    refused = None
    if len(hashes) > 1:
        refused = "multi-valued; no password"
    elif hashes:
        checked, why = memo.password(hashes[0])
        if checked is None:
            refused = f"{why}; no password"
        else:
            if not checked.weak:
                password = checked.text
            elif settings.weak_passwords == "refuse":
                refused = f"weak hash ({checked.scheme}) refused by passwords.weak: refuse; no password"
            else:
                password, weak = checked.text, True
                reason = f"weak hash ({checked.scheme}): accepted (passwords.weak: warn); rehash it"
                decide.notice(entry.dn, pw_attr, reason, Rule.HASH_WEAK, me)
    if refused is not None:
        decide.reject(entry.dn, pw_attr, refused, Rule.HASH_REFUSED, me)
    uid = gid = home = home_error = quota = None
    if names["uid_number"] or names["gid_number"] or names["home"] or names["quota"]:  # a mailbox host
        uid = _single(entry, attributes.uid_number, names["uid_number"], validate.numeric_id, rej)
        gid = _single(entry, attributes.gid_number, names["gid_number"], validate.numeric_id, rej)
        home, home_error = _home(entry, names["home"])
        quota = _single(entry, attributes.quota, names["quota"], validate.quota, rej)
    return Parsed(
        login=login,
        targets=tuple(targets) if len(targets) < 2 else tuple(sorted(set(targets))),  # unordered in LDAP
        aliases=tuple(aliases),
        password=password,
        weak=weak,
        rejections=tuple(rej),
        notices=tuple(notes),
        created=created,
        addresses=addresses,
        uid=int(uid) if uid is not None else None,
        gid=int(gid) if gid is not None else None,
        home=home,
        home_error=home_error,
        quota=quota,
    )


def primary_order(address: str, login: str, rank: Mapping[str, int]) -> tuple[bool, int, str]:
    """Sort key of an account's own addresses; the first is its primary address.

    The address whose local part is the login comes first, in the first domain of the config's
    order (`domain`, then `domains:` as written); then the others in that domain order, each
    domain's addresses sorted. LDAP returns values in no particular order, so the order there
    cannot decide."""
    local, _, dom = address.rpartition("@")
    return local != login, rank.get(dom, len(rank)), address


def _chosen_primary(
    entry: Entry,
    attr: str,
    name: str,
    addresses: tuple[str, ...],
    canonical: Callable[[str], str],
    decide: Decisions,
) -> str | None:
    """The address the `primary_address` attribute names, if it is one of the entry's own."""
    values = entry.attributes.get(name, ()) if name else ()
    if not values:
        return None
    if len(values) > 1:
        decide.reject(entry.dn, attr, "multi-valued; value ignored, the primary address rule decides")
        return None
    try:
        wanted = canonical(validate.address(values[0]))
    except validate.Invalid as e:
        decide.reject(entry.dn, attr, f"{show(values[0])} {e}; value ignored, the primary address rule decides")
        return None
    if wanted in addresses:
        return wanted
    reason = f"{show(values[0])} is not one of the entry's addresses; value ignored, the primary address rule decides"
    decide.reject(entry.dn, attr, reason)
    return None


def _home(entry: Entry, name: str) -> tuple[str | None, str | None]:
    """(the home value, or None; why it cannot be used, or None). A bad home is not replaced by the
    default: mail for that account would land in a directory the admin did not choose."""
    values = entry.attributes.get(name, ()) if name else ()
    if not values:
        return None, None
    if len(values) > 1:
        return None, "multi-valued"
    try:
        return validate.home(values[0]), None
    except validate.Invalid as e:
        return None, f"{show(values[0])} {e}"


def _single(entry: Entry, attr: str | None, name: str, check: Callable[[str], str], rej: list[Rejection]) -> str | None:
    """A single-valued optional attribute, validated; a bad value is dropped with the DN."""
    if not name:
        return None
    values = entry.attributes.get(name, ())
    if not values:
        return None
    if len(values) > 1:
        rej.append(Rejection(entry.dn, attr or name, "multi-valued; value ignored"))
        return None
    try:
        return check(values[0])
    except validate.Invalid as e:
        rej.append(Rejection(entry.dn, attr or name, f"{show(values[0])} {e}; value ignored"))
        return None
