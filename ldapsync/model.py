"""The routing model: who exists, where each address goes, who may send as what.

A pure function of (directory snapshot, static YAML, settings). Exporters only render it,
so every output agrees with every other, and every host computes the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from enum import Enum

from ldapsync import validate
from ldapsync.directory import Entry, Rejection, Snapshot
from ldapsync.errors import ConfigError
from ldapsync.schema import LOGICAL_FIELDS, AttributeMap
from ldapsync.static import Static

DEFAULT_DISABLED_MESSAGE = "This address is disabled"
WEAK_POLICIES = ("warn", "refuse")
GROUP_CLASSES = ("groupOfNames", "groupOfUniqueNames", "nisMailAlias")


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """Which entries are mail groups and where their names and members are."""

    object_classes: tuple[str, ...] = GROUP_CLASSES
    name_attribute: str = "cn"
    member_attributes: tuple[str, ...] = ("member", "uniqueMember")  # values are DNs
    address_attributes: tuple[str, ...] = ("rfc822MailMember",)  # values are addresses or bare names
    base_dn: str | None = None  # only entries at or below it are groups
    members_send_as_group: bool = False

    def ldap_attributes(self) -> tuple[str, ...]:
        return ("objectClass", self.name_attribute, *self.member_attributes, *self.address_attributes)


@dataclass(frozen=True, slots=True)
class MailboxSettings:
    """Where a local account's mail is stored, for the Dovecot userdb."""

    home: str  # template: {login}, {domain}
    home_root: str
    uid: int | None = None  # used when the entry has no uid attribute
    gid: int | None = None
    id_range: tuple[int, int] = (1000, 60000)


@dataclass(frozen=True, slots=True)
class Mailbox:
    login: str
    address: str
    uid: int
    gid: int
    home: str
    quota: str | None = None


@dataclass(frozen=True, slots=True)
class RoutingModel:
    domain: str
    domain_aliases: tuple[str, ...]
    users: Mapping[str, str]  # canonical address -> login (active accounts)
    aliases: Mapping[str, tuple[str, ...]]  # canonical alias address -> targets
    forwards: Mapping[str, tuple[str, ...]]  # canonical address -> targets
    passwords: Mapping[str, str]  # login -> {SCHEME}hash
    disabled: Mapping[str, str]  # canonical address -> reject text
    sender_logins: Mapping[str, tuple[str, ...]]  # canonical address -> logins
    # Further hosted domains -> their alias domains (the primary is `domain`).
    hosted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    local: Mapping[str, str] = field(default_factory=dict)  # address delivered to its own mailbox -> login
    mailboxes: Mapping[str, Mailbox] = field(default_factory=dict)  # login -> mailbox (with MailboxSettings)
    groups: Mapping[str, str] = field(default_factory=dict)  # group address -> group DN

    def variants(self, address: str) -> list[str]:
        """The address in its domain and in every alias domain of that domain."""
        local, _, dom = address.rpartition("@")
        alias_domains = self.domain_aliases if dom == self.domain else self.hosted.get(dom, ())
        return [address, *(f"{local}@{d}" for d in alias_domains)]

    def domain_rewrites(self) -> dict[str, str]:
        """alias-domain address -> canonical address, for every known address."""
        out: dict[str, str] = {}
        if not self.domain_aliases and not any(self.hosted.values()):
            return out
        for addr in self.deliverable():
            for v in self.variants(addr)[1:]:
                out[v] = addr
        return out

    def deliverable(self) -> list[str]:
        """Canonical addresses that accept mail, sorted."""
        return sorted(set(self.users) | set(self.aliases) | set(self.forwards))

    def counts(self) -> dict[str, int]:
        return {
            "users": len(self.users),
            "aliases": len(self.aliases),
            "forwards": len(self.forwards),
            "passwords": len(self.passwords),
            "disabled": len(self.disabled),
        }


@dataclass(frozen=True, slots=True)
class ModelChange:
    """Which keys of a RoutingModel may differ from the previous model (a superset is fine)."""

    addresses: frozenset[str] = frozenset()  # users, aliases, forwards, disabled, sender_logins, local, groups keys
    logins: frozenset[str] = frozenset()  # passwords and mailboxes keys
    full: bool = False  # anything may have changed: render whole


@dataclass(slots=True)
class BuildReport:
    rejections: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notices: list[Rejection] = field(default_factory=list)  # accepted, but the admin should look (DN, attribute)
    retired: int = 0
    skipped: int = 0
    weak_passwords: int = 0  # accounts whose passwd-file line carries an unsalted digest or DES-CRYPT


class Rule(Enum):
    """Why an address is (or is not) in an output; `ldapsync explain` prints these.

    Adding a rule: one member here, and one `trace.append(Event(...))` where the rule decides.
    """

    ACCOUNT = "account"  # an LDAP entry's login gives the address
    FORWARD = "forward"  # the entry's forward field routes it
    LDAP_ALIAS = "ldap-alias"  # the entry's alias field gives an extra address
    STATIC = "static"  # a static alias/forward routes it
    PASSWORD = "password"  # the entry's hash is in the passwd-file
    STATIC_OVERRIDE = "static-override"  # a static entry replaced the LDAP routing
    LOOP_BROKEN = "loop-broken"  # LDAP edges of a cycle were dropped
    ALIAS_CLAIMED = "alias-claimed"  # an older entry holds the alias; this claim was dropped
    ALIAS_IS_ACCOUNT = "alias-is-account"  # an alias equal to another account's address was dropped
    LOGIN_CONFLICT = "login-conflict"  # an older entry holds the login; this entry was skipped
    RETIRED = "retired"  # accountStatus retired the account: in no output
    DISABLED = "disabled"  # disable message: only in the access map
    STATUS_UNRECOGNISED = "status-unrecognised"  # a status value not understood: counts as active
    HASH_REFUSED = "hash-refused"  # no passwd-file line: the value is not an acceptable hash
    HASH_WEAK = "hash-weak"  # the hash is an unsalted digest or DES-CRYPT
    VALUE_DROPPED = "value-dropped"  # an invalid forward target or alias was dropped
    NOT_HOSTED = "not-hosted"  # an address-attribute value outside every hosted domain was dropped
    GROUP_LOST = "group-lost"  # a group's address is an account's: the account keeps it
    GROUP_MEMBER_SKIPPED = "group-member-skipped"  # a member is disabled, retired or not a mail account
    GROUP_CYCLE = "group-cycle"  # nested groups form a cycle: each gets the members of all
    NO_MAILBOX = "no-mailbox"  # the account has no userdb record, so no local delivery


@dataclass(frozen=True, slots=True)
class Event:
    """One decision about one canonical address: which rule, and who caused it."""

    rule: Rule
    address: str
    source: str  # an entry DN, or `file: key` for static data
    attribute: str = ""
    detail: str = ""


Trace = list[Event]


@dataclass(frozen=True, slots=True)
class _Parsed:
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
    addresses: tuple[str, ...] = ()  # own addresses from the address attribute, primary first
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    quota: str | None = None
    group: bool = False  # a mail group, resolved after every account is known


EntryCache = dict[str, tuple[Entry, _Parsed]]


def build(
    snapshot: Snapshot,
    static: Static,
    *,
    domain: str,
    domain_aliases: tuple[str, ...],
    attributes: AttributeMap,
    today: date,
    cache: EntryCache | None = None,
    weak_passwords: str = "warn",
    trace: Trace | None = None,
    hosted: Mapping[str, tuple[str, ...]] | None = None,
    groups: GroupSettings | None = None,
    mailbox: MailboxSettings | None = None,
) -> tuple[RoutingModel, BuildReport]:
    """`cache` (per DN, reused while the Entry object is the same) makes an agent's rebuild
    after a single change cost a lookup per unchanged entry instead of a re-validation.

    `hosted` adds domains besides `domain` (each with its alias domains), `groups` turns
    group entries into aliases, `mailbox` gives each local account a Dovecot userdb record.

    `trace`, when given, collects every decision as an Event (for `ldapsync explain`); it
    bypasses the cache, and costs nothing when absent."""
    if weak_passwords not in WEAK_POLICIES:
        raise ValueError(f"weak_passwords must be one of {WEAK_POLICIES}")
    if trace is not None:
        cache = None
    report = BuildReport(rejections=list(snapshot.rejections))
    rej = report.rejections
    hosted = dict(hosted or {})
    canon = canonical_domains(domain, domain_aliases, hosted)
    group_test = _group_test(groups)

    users: dict[str, str] = {}
    owner_dn: dict[str, str] = {}  # address -> DN that claimed it
    # the claim's holder's normalised createTimestamp ("" if unknown); per claim, not per DN: a
    # rename not yet matched by its delete shows two entries with one DN
    login_created: dict[str, str] = {}
    addr_created: dict[str, str] = {}
    login_dn: dict[str, str] = {}  # login -> DN that claimed it
    forwards: dict[str, list[str]] = {}
    ldap_aliases: dict[str, str] = {}  # alias -> user address
    alias_source: dict[str, str] = {}  # alias -> attribute it came from
    passwords: dict[str, str] = {}
    disabled: dict[str, str] = {}
    member_state: dict[str, tuple[str, str | None]] = {}  # normalised DN -> (kind, address)
    group_entries: list[Entry] = []
    records: dict[str, tuple[str, str, _Parsed]] = {}  # login -> (address, DN, parsed)
    alias_attr = attributes.alias or ""
    fwd_attr = attributes.forward or ""
    seen: set[str] = set()

    parsed_entries: list[tuple[tuple[str, str, str], int, Entry, _Parsed]] = []
    parse = entry_parser(
        domain=domain,
        domain_aliases=domain_aliases,
        attributes=attributes,
        today=today,
        weak_passwords=weak_passwords,
        hosted=hosted,
        groups=groups,
        trace=trace,
    )
    for i, entry in enumerate(snapshot.entries):
        hit = cache.get(entry.dn) if cache is not None else None
        if hit is not None and hit[0] is entry:
            parsed = hit[1]
        else:
            parsed = parse(entry)
            if cache is not None:
                cache[entry.dn] = (entry, parsed)
        if cache is not None:
            seen.add(entry.dn)
        parsed_entries.append(((parsed.created, entry.dn.lower(), entry.dn), i, entry, parsed))
    # Sorted here, not trusted from the source: a contested login, address or alias goes to
    # the OLDER entry (createTimestamp), then to the first in DN order. Every host picks the
    # same one, and a new entry cannot take over an address by choosing a DN that sorts
    # first. (The index keeps tuples from ever comparing two entries.)
    parsed_entries.sort()

    for _, _, entry, parsed in parsed_entries:
        if parsed.group:  # not a mail account: the empty-directory guard must not count it
            group_entries.append(entry)
            report.skipped += 1
            continue
        if parsed.rejections:
            rej.extend(parsed.rejections)
        if parsed.notices:
            report.notices.extend(parsed.notices)
        member_key = dn_key(entry.dn) if group_test is not None else ""
        if parsed.skipped:
            report.skipped += 1
            continue
        if parsed.retired:
            report.retired += 1
            if member_key:
                member_state[member_key] = ("retired", None)
            continue
        login = parsed.login
        if login is None:
            continue
        addr = parsed.addresses[0] if parsed.addresses else f"{login}@{domain}"
        if login in login_dn:
            holder = login_dn[login]
            why = _precedence(login_created[login], parsed.created)
            reason = f"login {login!r} already used by {holder} ({why}); entry skipped"
            rej.append(Rejection(entry.dn, attributes.login, reason))
            if trace is not None:
                trace.append(Event(Rule.LOGIN_CONFLICT, addr, entry.dn, attributes.login, f"held by {holder} ({why})"))
            continue
        if addr in owner_dn:
            holder = owner_dn[addr]
            why = _precedence(addr_created[addr], parsed.created)
            reason = f"address {addr} already used by {holder} ({why}); entry skipped"
            rej.append(Rejection(entry.dn, attributes.address or "", reason))
            if trace is not None:
                detail = f"address held by {holder} ({why})"
                trace.append(Event(Rule.LOGIN_CONFLICT, addr, entry.dn, attributes.address or "", detail))
            continue
        login_dn[login] = entry.dn
        owner_dn[addr] = entry.dn
        login_created[login] = addr_created[addr] = parsed.created
        if parsed.disabled is not None:
            for a in parsed.addresses or (addr,):
                disabled.setdefault(a, parsed.disabled)
            if member_key:
                member_state[member_key] = ("disabled", addr)
            continue
        if member_key:
            member_state[member_key] = ("account", addr)
        users[addr] = login
        if trace is not None:
            trace.append(Event(Rule.ACCOUNT, addr, entry.dn, attributes.login, f"login {login}"))
        if mailbox is not None:
            records[login] = (addr, entry.dn, parsed)
        if parsed.targets:
            forwards[addr] = list(parsed.targets)
            if trace is not None:
                trace.append(Event(Rule.FORWARD, addr, entry.dn, fwd_attr, ", ".join(parsed.targets)))
        if parsed.aliases or len(parsed.addresses) > 1:
            for attr, values in ((attributes.address or "", parsed.addresses[1:]), (alias_attr, parsed.aliases)):
                for alias in values:
                    if alias == addr:
                        continue
                    ldap_aliases.setdefault(alias, addr)
                    alias_source.setdefault(alias, attr)
                    if ldap_aliases[alias] != addr:
                        holder = owner_dn[ldap_aliases[alias]]
                        why = _precedence(addr_created[ldap_aliases[alias]], parsed.created)
                        reason = f"{alias} already claimed by {holder} ({why}); value dropped"
                        rej.append(Rejection(entry.dn, attr, reason))
                        if trace is not None:
                            detail = f"held by {holder} ({why})"
                            trace.append(Event(Rule.ALIAS_CLAIMED, alias, entry.dn, attr, detail))
        if parsed.password is not None:
            passwords[login] = parsed.password
            if parsed.weak:
                report.weak_passwords += 1
            if trace is not None:
                scheme = parsed.password[1 : parsed.password.index("}")]
                trace.append(Event(Rule.PASSWORD, addr, entry.dn, attributes.mail_password or "", f"{{{scheme}}}"))
    if cache is not None and len(cache) > len(seen):
        for dn in [d for d in cache if d not in seen]:
            del cache[dn]

    # An LDAP alias may not take over an account's address.
    aliases: dict[str, list[str]] = {}
    alias_dn: dict[str, str] = {}
    for alias, user in sorted(ldap_aliases.items()):
        if alias in owner_dn:
            reason = f"{alias} is the address of {owner_dn[alias]}; value dropped"
            rej.append(Rejection(owner_dn[user], alias_source[alias], reason))
            if trace is not None:
                detail = f"the address of {owner_dn[alias]}"
                trace.append(Event(Rule.ALIAS_IS_ACCOUNT, alias, owner_dn[user], alias_source[alias], detail))
            continue
        aliases[alias] = [user]
        alias_dn[alias] = owner_dn[user]
        if trace is not None:
            trace.append(Event(Rule.LDAP_ALIAS, alias, owner_dn[user], alias_source[alias], f"-> {user}"))

    group_dn: dict[str, str] = {}
    if groups is not None and group_entries:
        resolved = _resolve_groups(group_entries, groups, member_state, domain, canon, rej, trace)
        for address, (dn, targets) in resolved.items():
            claimed = owner_dn.get(address) or alias_dn.get(address)
            if claimed:
                reason = f"{address} is an address of {claimed}; the account wins, group address dropped"
                rej.append(Rejection(dn, groups.name_attribute, reason))
                if trace is not None:
                    trace.append(Event(Rule.GROUP_LOST, address, dn, groups.name_attribute, reason))
                continue
            aliases[address] = list(targets)
            alias_dn[address] = group_dn[address] = dn

    # Static entries win over LDAP, loudly.
    static_keys: dict[str, str] = {}
    for kind, entries in (("alias", static.aliases), ("forward", static.forwards)):
        for s in entries:
            static_keys[s.address] = s.key
            clash = owner_dn.get(s.address) or alias_dn.get(s.address)
            if clash:
                report.warnings.append(f"{static.file}: {s.key} overrides {s.address} from LDAP entry {clash}")
            forwards.pop(s.address, None)
            aliases.pop(s.address, None)
            group_dn.pop(s.address, None)
            if s.address in disabled:
                del disabled[s.address]
            (aliases if kind == "alias" else forwards)[s.address] = list(s.targets)
            if trace is not None:
                origin = f"{static.file}: {s.key}"
                trace.append(Event(Rule.STATIC, s.address, origin, "", f"{kind} -> {', '.join(s.targets)}"))
                if clash:
                    trace.append(Event(Rule.STATIC_OVERRIDE, s.address, origin, "", f"replaces LDAP entry {clash}"))

    _break_loops(aliases, forwards, static_keys, owner_dn, alias_dn, static.file, rej, fwd_attr, alias_attr, trace)
    for address in [a for a in group_dn if a not in aliases]:  # a group edge closed a loop
        del group_dn[address]

    senders = aliases
    if group_dn and not (groups is not None and groups.members_send_as_group):
        senders = {a: t for a, t in aliases.items() if a not in group_dn}
    sender = _sender_logins(users, senders)

    # Delivered here: no forward, or a forward that keeps a copy (lists the account itself).
    local = {
        a: login
        for a, login in users.items()
        if (a not in forwards or a in forwards[a]) and (a not in aliases or a in aliases[a])
    }
    mailboxes: dict[str, Mailbox] = {}
    if mailbox is not None:
        for login, (addr, dn, parsed) in sorted(records.items()):
            box = _mailbox(login, addr, dn, parsed, mailbox, attributes, rej)
            if box is not None:
                mailboxes[login] = box
            elif trace is not None:
                trace.append(Event(Rule.NO_MAILBOX, addr, dn, rej[-1].attribute, rej[-1].reason))
        for a in [a for a, login in local.items() if login not in mailboxes]:
            del local[a]

    model = RoutingModel(
        domain=domain,
        domain_aliases=domain_aliases,
        users=dict(sorted(users.items())),
        aliases={k: tuple(v) for k, v in sorted(aliases.items())},
        forwards={k: tuple(v) for k, v in sorted(forwards.items())},
        passwords=dict(sorted(passwords.items())),
        disabled=dict(sorted(disabled.items())),
        sender_logins=sender,
        hosted={d: tuple(a) for d, a in sorted(hosted.items())},
        local=dict(sorted(local.items())),
        mailboxes=mailboxes,
        groups=dict(sorted(group_dn.items())),
    )
    return model, report


def entry_parser(
    *,
    domain: str,
    domain_aliases: tuple[str, ...],
    attributes: AttributeMap,
    today: date,
    weak_passwords: str = "warn",
    hosted: Mapping[str, tuple[str, ...]] | None = None,
    groups: GroupSettings | None = None,
    trace: Trace | None = None,
) -> Callable[[Entry], _Parsed]:
    """What one entry says, validated: the same function for a full and an incremental build."""
    canon = canonical_domains(domain, domain_aliases, dict(hosted or {}))
    names = _lower_names(attributes)
    group_test = _group_test(groups)

    def parse(entry: Entry) -> _Parsed:
        if group_test is not None and group_test(entry):
            return _Parsed(group=True)
        return _parse_entry(entry, attributes, names, domain, canon, today, weak_passwords, trace)

    return parse


def _precedence(holder_created: str, created: str) -> str:
    if holder_created == created:
        return "first in DN order: " + ("same createTimestamp" if created else "no createTimestamp")
    if not holder_created:
        return "it has no createTimestamp, which counts as oldest"
    return "older by createTimestamp"


def canonical_domains(
    domain: str, domain_aliases: tuple[str, ...], hosted: Mapping[str, tuple[str, ...]]
) -> dict[str, str]:
    """Every domain we accept mail for -> the hosted domain its addresses are canonical in."""
    canon = {d: domain for d in (domain, *domain_aliases)}
    for hosted_domain, alias_domains in hosted.items():
        canon.update({d: hosted_domain for d in (hosted_domain, *alias_domains)})
    return canon


def _lower_names(attributes: AttributeMap) -> dict[str, str]:
    """Logical field -> lower-cased attribute name ('' if unmapped), computed once per build."""
    return {f: (getattr(attributes, f) or "").lower() for f in LOGICAL_FIELDS}


CREATE_TIMESTAMP = "createtimestamp"
_UNKNOWN_AGE = "~"  # sorts after every valid timestamp: a malformed one never wins a conflict


def _parse_entry(
    entry: Entry,
    attributes: AttributeMap,
    names: dict[str, str],
    domain: str,
    canon: Mapping[str, str],
    today: date,
    weak_policy: str = "warn",
    trace: Trace | None = None,
) -> _Parsed:
    rej: list[Rejection] = []
    notes: list[Rejection] = []
    attrs = entry.attributes
    logins = attrs.get(names["login"], ())
    if not logins:
        return _Parsed(skipped=True)
    if len(logins) > 1:
        reason = "multi-valued login; entry skipped"
        return _Parsed(rejections=(Rejection(entry.dn, attributes.login, reason),))
    try:
        login = validate.login(logins[0])
    except validate.Invalid as e:
        return _Parsed(rejections=(Rejection(entry.dn, attributes.login, f"{e}; entry skipped"),))

    def canonical(addr: str) -> str:
        local, _, dom = addr.rpartition("@")
        if dom not in canon:
            return addr
        out = f"{local.lower()}@{canon[dom]}"
        return addr if out == addr else out

    # The account's own addresses come first: every later decision is traced at the primary one.
    own: list[str] = []
    address_rej: list[Rejection] = []  # dropped with the entry if it is retired
    if names["address"]:
        addr_attr = attributes.address or ""
        for value in attrs.get(names["address"], ()):
            try:
                address = validate.address(value)
            except validate.Invalid as e:
                address_rej.append(Rejection(entry.dn, addr_attr, f"{_show(value)} {e}; value dropped"))
                continue
            if address.rpartition("@")[2] not in canon:
                reason = f"{_show(value)} is not in a hosted domain; value dropped"
                address_rej.append(Rejection(entry.dn, addr_attr, reason))
                if trace is not None:
                    trace.append(Event(Rule.NOT_HOSTED, address, entry.dn, addr_attr, reason))
                continue
            own.append(canonical(address))
    addresses = tuple(sorted(set(own))) if len(own) > 1 else tuple(own)  # unordered in LDAP: lowest is primary
    me = addresses[0] if addresses else f"{login}@{domain}"
    created = ""
    stamps = attrs.get(CREATE_TIMESTAMP, ())
    if stamps:
        created = (validate.generalized_time(stamps[0]) if len(stamps) == 1 else None) or _UNKNOWN_AGE
        if created == _UNKNOWN_AGE:
            notes.append(Rejection(entry.dn, "createTimestamp", "malformed; the entry counts as newest"))
    status_attr = attributes.status or ""
    retired = False
    for status in attrs.get(names["status"], ()):
        problem = validate.status_problem(status)
        if problem is not None:
            reason = f"{_show(status)}: {problem}; the account stays active"
            notes.append(Rejection(entry.dn, status_attr, reason))
            if trace is not None:
                trace.append(Event(Rule.STATUS_UNRECOGNISED, me, entry.dn, status_attr, reason))
        if validate.is_retired(status, today):
            retired = True
            if trace is not None:
                trace.append(Event(Rule.RETIRED, me, entry.dn, status_attr, _show(status)))
    if retired:
        return _Parsed(login=login, retired=True, notices=tuple(notes), created=created)
    rej.extend(address_rej)
    messages = attrs.get(names["disable_message"], ())
    if len(messages) > 1:
        messages = tuple(sorted(messages))  # LDAP values are unordered
    if messages:
        try:
            message = validate.disable_message(messages[0])
        except validate.Invalid as e:
            rej.append(Rejection(entry.dn, attributes.disable_message or "", f"{e}; default text used"))
            message = DEFAULT_DISABLED_MESSAGE
        if trace is not None:
            trace.append(Event(Rule.DISABLED, me, entry.dn, attributes.disable_message or "", message))
        return _Parsed(
            login=login,
            disabled=message,
            rejections=tuple(rej),
            notices=tuple(notes),
            created=created,
            addresses=addresses,
        )

    def dropped(attribute: str, address: str, reason: str) -> None:
        rej.append(Rejection(entry.dn, attribute, reason))
        if trace is not None:
            trace.append(Event(Rule.VALUE_DROPPED, address, entry.dn, attribute, reason))

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
                dropped(fwd_attr, me, f"{_show(part)} {e}; value dropped")
    aliases: list[str] = []
    for value in attrs.get(names["alias"], ()):
        try:
            alias = validate.address(value)
        except validate.Invalid as e:
            dropped(alias_attr, me, f"{_show(value)} {e}; value dropped")
            continue
        if alias.rpartition("@")[2] not in canon:
            where = domain if len(set(canon.values())) == 1 else "a hosted domain"
            dropped(alias_attr, alias, f"{_show(value)} is not in {where}; value dropped")
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
        try:
            checked = validate.check_password(hashes[0])
        except validate.Invalid as e:
            refused = f"{e}; no password"
        else:
            if not checked.weak:
                password = checked.text
            elif weak_policy == "refuse":
                refused = f"weak hash ({checked.scheme}) refused by passwords.weak: refuse; no password"
            else:
                password, weak = checked.text, True
                reason = f"weak hash ({checked.scheme}): accepted (passwords.weak: warn); rehash it"
                notes.append(Rejection(entry.dn, pw_attr, reason))
                if trace is not None:
                    trace.append(Event(Rule.HASH_WEAK, me, entry.dn, pw_attr, reason))
    if refused is not None:
        rej.append(Rejection(entry.dn, pw_attr, refused))
        if trace is not None:
            trace.append(Event(Rule.HASH_REFUSED, me, entry.dn, pw_attr, refused))
    uid = gid = home = quota = None
    if names["uid_number"] or names["gid_number"] or names["home"] or names["quota"]:  # a mailbox host
        uid = _single(entry, attributes.uid_number, names["uid_number"], validate.numeric_id, rej)
        gid = _single(entry, attributes.gid_number, names["gid_number"], validate.numeric_id, rej)
        home = _single(entry, attributes.home, names["home"], validate.home, rej)
        quota = _single(entry, attributes.quota, names["quota"], validate.quota, rej)
    return _Parsed(
        login=login,
        targets=tuple(targets) if len(targets) < 2 else tuple(sorted(set(targets))),  # unordered in LDAP
        aliases=tuple(aliases),
        password=password,
        weak=weak,
        rejections=tuple(rej),
        notices=tuple(notes),
        created=created,
        addresses=addresses or (me,),  # the primary address made once, shared with the model's tables
        uid=int(uid) if uid is not None else None,
        gid=int(gid) if gid is not None else None,
        home=home,
        quota=quota,
    )


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
        rej.append(Rejection(entry.dn, attr or name, f"{_show(values[0])} {e}; value ignored"))
        return None


def _mailbox(
    login: str,
    address: str,
    dn: str,
    parsed: _Parsed,
    settings: MailboxSettings,
    attributes: AttributeMap,
    rej: list[Rejection],
) -> Mailbox | None:
    """The account's userdb record, or None (with the reason) if any field is missing or out of bounds."""
    lo, hi = settings.id_range
    ids: list[int] = []
    for value, default, attr in (
        (parsed.uid, settings.uid, attributes.uid_number),
        (parsed.gid, settings.gid, attributes.gid_number),
    ):
        chosen = value if value is not None else default
        name = attr or "uid/gid"
        if chosen is None:
            rej.append(Rejection(dn, name, "no value and no default in mailbox settings; no mailbox"))
            return None
        if not lo <= chosen <= hi:
            rej.append(Rejection(dn, name, f"{chosen} is outside {lo}-{hi}; no mailbox"))
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
        rej.append(Rejection(dn, origin, f"{_show(home)} {e}; no mailbox"))
        return None
    if not home.startswith(root):
        rej.append(Rejection(dn, origin, f"{_show(home)} is not under {settings.home_root}; no mailbox"))
        return None
    return Mailbox(login, address, ids[0], ids[1], home, parsed.quota)


_DN_SPACES_RE = re.compile(r"\s*([,=+])\s*")


def dn_key(dn: str) -> str:
    """A DN as compared with member values: case and spaces around separators do not count."""
    return _DN_SPACES_RE.sub(r"\1", dn.strip().lower())


def _group_test(settings: GroupSettings | None) -> Callable[[Entry], bool] | None:
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


def _resolve_groups(
    entries: list[Entry],
    settings: GroupSettings,
    member_state: Mapping[str, tuple[str, str | None]],
    domain: str,
    canon: Mapping[str, str],
    rej: list[Rejection],
    trace: Trace | None = None,
) -> dict[str, tuple[str, tuple[str, ...]]]:
    """group address -> (DN, every member address, nested groups flattened).

    Nested groups are expanded here, not left to Postfix, so a cycle is found and reported
    once (every group on it gets the members of all of them) instead of looping in the MTA.
    """
    by_key = {dn_key(e.dn): e for e in entries}
    direct: dict[str, set[str]] = {}
    nested: dict[str, list[str]] = {}
    names: dict[str, list[str]] = {}
    name_attr = settings.name_attribute.lower()

    def as_address(value: str) -> str:
        return group_address(value, domain, canon)

    for key, entry in sorted(by_key.items(), key=lambda kv: (kv[1].dn.lower(), kv[1].dn)):
        dn = entry.dn
        own: list[str] = []
        for value in sorted(entry.attributes.get(name_attr, ())):
            try:
                address = as_address(value)
            except validate.Invalid as e:
                rej.append(Rejection(dn, settings.name_attribute, f"{_show(value)} {e}; value dropped"))
                continue
            if address.rpartition("@")[2] not in canon.values():
                reason = f"{_show(value)} is not in a hosted domain; value dropped"
                rej.append(Rejection(dn, settings.name_attribute, reason))
                continue
            own.append(address)
        names[key] = own
        members: set[str] = set()
        subgroups: list[str] = []
        for attr in settings.member_attributes:
            for value in entry.attributes.get(attr.lower(), ()):
                member = dn_key(value)
                if member in by_key:
                    subgroups.append(member)
                    continue
                kind, account = member_state.get(member, ("unknown", None))
                if kind == "account" and account is not None:
                    members.add(account)
                else:
                    what = "not a mail account or group" if kind == "unknown" else kind
                    reason = f"member {_show(value)} is {what}; skipped"
                    rej.append(Rejection(dn, attr, reason))
                    if trace is not None:
                        trace.extend(Event(Rule.GROUP_MEMBER_SKIPPED, a, dn, attr, reason) for a in own)
        for attr in settings.address_attributes:
            for value in entry.attributes.get(attr.lower(), ()):
                try:
                    members.add(as_address(value))
                except validate.Invalid as e:
                    rej.append(Rejection(dn, attr, f"{_show(value)} {e}; value dropped"))
        direct[key] = members
        nested[key] = sorted(set(subgroups))

    for cycle in _strongly_connected(nested):
        if len(cycle) > 1 or cycle[0] in nested.get(cycle[0], ()):
            dns = [by_key[k].dn for k in sorted(cycle)]
            for k in sorted(cycle):
                reason = f"group cycle through {'; '.join(dns)}; each gets the members of all, no loop installed"
                rej.append(Rejection(by_key[k].dn, settings.member_attributes[0], reason))
                if trace is not None:
                    attr = settings.member_attributes[0]
                    trace.extend(Event(Rule.GROUP_CYCLE, a, by_key[k].dn, attr, reason) for a in names[k])

    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for key in sorted(by_key, key=lambda k: (by_key[k].dn.lower(), by_key[k].dn)):
        if not names[key]:
            continue
        reach: set[str] = set()
        todo = [key]
        while todo:
            k = todo.pop()
            if k in reach:
                continue
            reach.add(k)
            todo.extend(nested.get(k, ()))
        targets = set().union(*(direct[k] for k in reach)) - set(names[key])
        dn = by_key[key].dn
        if not targets:
            rej.append(Rejection(dn, settings.name_attribute, "no deliverable member; group skipped"))
            continue
        for address in names[key]:
            if address in out:
                reason = f"{address} already claimed by group {out[address][0]}; value dropped"
                rej.append(Rejection(dn, settings.name_attribute, reason))
                continue
            out[address] = (dn, tuple(sorted(targets)))
    return out


def group_address(value: str, domain: str, canon: Mapping[str, str]) -> str:
    """A group's name or address member as an address: a bare name is in `domain`."""
    if "@" not in value:
        return f"{validate.local_part(value).lower()}@{domain}"
    address = validate.address(value)
    local, _, dom = address.rpartition("@")
    return f"{local.lower()}@{canon[dom]}" if dom in canon else address


def _show(value: str) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "...'"


def _break_loops(
    aliases: dict[str, list[str]],
    forwards: dict[str, list[str]],
    static_keys: Mapping[str, str],
    owner_dn: Mapping[str, str],
    alias_dn: Mapping[str, str],
    static_file: object,
    rej: list[Rejection],
    fwd_attr: str,
    alias_attr: str,
    trace: Trace | None = None,
) -> None:
    """Postfix defers mail caught in an alias loop; drop the LDAP edges that close one.

    Only the edges inside the cycle go: a forward `k -> y, k@elsewhere` with `y -> k` keeps
    `k@elsewhere`, so the copy that leaves the loop is still delivered."""
    while True:
        merged = {**forwards, **aliases}
        # Only addresses that route to another known address can be on a cycle; most
        # forwards go outside, so the graph searched is small.
        routes = {k: [t for t in v if t != k and t in merged] for k, v in merged.items()}
        routes = {k: v for k, v in routes.items() if v}
        cycles = [c for c in _strongly_connected(routes) if len(c) > 1]
        if not cycles:
            return
        for cycle in cycles:
            members = sorted(cycle)
            inside = frozenset(cycle)
            from_ldap = [a for a in members if a not in static_keys]
            if not from_ldap:
                keys = ", ".join(static_keys[a] for a in members)
                raise ConfigError(f"alias loop: {' -> '.join(members)}", file=str(static_file), key=keys)
            dns = sorted({(owner_dn if a in forwards else alias_dn)[a] for a in from_ldap})
            for a in from_ldap:
                is_forward = a in forwards
                table = forwards if is_forward else aliases
                dn = (owner_dn if is_forward else alias_dn)[a]
                cut = [t for t in table[a] if t in inside and t != a]
                kept = [t for t in table[a] if t not in cut]
                others = [d for d in dns if d != dn]
                kind = "forward" if is_forward else "alias"
                reason = f"{kind} loop through {', '.join(members)}"
                if others:
                    reason += f" (with {'; '.join(others)})"
                reason += f"; {kind} to {', '.join(cut)} dropped"
                if kept:
                    reason += f", {', '.join(kept)} kept"
                rej.append(Rejection(dn, fwd_attr if is_forward else alias_attr, reason))
                if trace is not None:
                    trace.append(Event(Rule.LOOP_BROKEN, a, dn, fwd_attr if is_forward else alias_attr, reason))
                if kept:
                    table[a] = kept
                else:
                    del table[a]


def _strongly_connected(routes: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (100k-entry directories would blow the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(routes):
        if root in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(root, iter([t for t in routes[root] if t in routes and t != root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter([t for t in routes[child] if t in routes and t != child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == node:
                            break
                    out.append(component)
    return out


def _sender_logins(users: Mapping[str, str], aliases: Mapping[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """An account may send as itself and as every alias that delivers to it (not forwards)."""
    memo: dict[str, frozenset[str]] = {}

    def logins(addr: str, seen: frozenset[str]) -> frozenset[str]:
        if addr in memo:
            return memo[addr]
        found: set[str] = {users[addr]} if addr in users else set()
        if addr in aliases and addr not in seen:
            for t in aliases[addr]:
                if t != addr:
                    found |= logins(t, seen | {addr})
        memo[addr] = frozenset(found)
        return memo[addr]

    out: dict[str, tuple[str, ...]] = {}
    for addr in sorted(set(users) | set(aliases)):
        if addr not in aliases:  # the common case: an account sends as itself
            out[addr] = (users[addr],)
            continue
        found = logins(addr, frozenset())
        if found:
            out[addr] = tuple(sorted(found))
    return out
