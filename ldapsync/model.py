"""The routing model: who exists, where each address goes, who may send as what.

A pure function of (directory snapshot, static YAML, settings). Exporters only render it,
so every output agrees with every other, and every host computes the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date

from ldapsync import validate
from ldapsync.directory import Entry, Rejection, Snapshot
from ldapsync.errors import ConfigError
from ldapsync.schema import LOGICAL_FIELDS, AttributeMap
from ldapsync.static import Static

DEFAULT_DISABLED_MESSAGE = "This address is disabled"
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


@dataclass(slots=True)
class BuildReport:
    rejections: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    retired: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What one entry says, validated: a pure function of the entry and the settings."""

    login: str | None = None  # None: not a mail account (or skipped, see rejections)
    retired: bool = False
    disabled: str | None = None
    targets: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    password: str | None = None
    rejections: tuple[Rejection, ...] = ()
    skipped: bool = False  # no login attribute at all
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
    hosted: Mapping[str, tuple[str, ...]] | None = None,
    groups: GroupSettings | None = None,
    mailbox: MailboxSettings | None = None,
) -> tuple[RoutingModel, BuildReport]:
    """`cache` (per DN, reused while the Entry object is the same) makes an agent's rebuild
    after a single change cost a lookup per unchanged entry instead of a re-validation.

    `hosted` adds domains besides `domain` (each with its alias domains), `groups` turns
    group entries into aliases, `mailbox` gives each local account a Dovecot userdb record.
    """
    report = BuildReport(rejections=list(snapshot.rejections))
    rej = report.rejections
    hosted = dict(hosted or {})
    canon = _canonical_domains(domain, domain_aliases, hosted)
    names = _lower_names(attributes)
    group_test = _group_test(groups)

    users: dict[str, str] = {}
    owner_dn: dict[str, str] = {}  # address -> DN that claimed it
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

    # Sorted here, not trusted from the source: duplicate logins and contested aliases go to
    # the first entry, and every host must pick the same one.
    for entry in sorted(snapshot.entries, key=lambda e: (e.dn.lower(), e.dn)):
        hit = cache.get(entry.dn) if cache is not None else None
        if hit is not None and hit[0] is entry:
            parsed = hit[1]
        else:
            if group_test is not None and group_test(entry):
                parsed = _Parsed(group=True)
            else:
                parsed = _parse_entry(entry, attributes, names, domain, canon, today)
            if cache is not None:
                cache[entry.dn] = (entry, parsed)
        if cache is not None:
            seen.add(entry.dn)
        if parsed.group:  # not a mail account: the empty-directory guard must not count it
            group_entries.append(entry)
            report.skipped += 1
            continue
        rej.extend(parsed.rejections)
        dn_key = _dn_key(entry.dn) if group_test is not None else ""
        if parsed.skipped:
            report.skipped += 1
            continue
        if parsed.retired:
            report.retired += 1
            if dn_key:
                member_state[dn_key] = ("retired", None)
            continue
        login = parsed.login
        if login is None:
            continue
        addr = parsed.addresses[0] if parsed.addresses else f"{login}@{domain}"
        if login in login_dn:
            rej.append(
                Rejection(
                    entry.dn, attributes.login, f"login {login!r} already used by {login_dn[login]}; entry skipped"
                )
            )
            continue
        if addr in owner_dn:
            reason = f"address {addr} already used by {owner_dn[addr]}; entry skipped"
            rej.append(Rejection(entry.dn, attributes.address or "", reason))
            continue
        login_dn[login] = entry.dn
        owner_dn[addr] = entry.dn
        if parsed.disabled is not None:
            for a in parsed.addresses or (addr,):
                disabled.setdefault(a, parsed.disabled)
            if dn_key:
                member_state[dn_key] = ("disabled", addr)
            continue
        if dn_key:
            member_state[dn_key] = ("account", addr)
        users[addr] = login
        if mailbox is not None:
            records[login] = (addr, entry.dn, parsed)
        if parsed.targets:
            forwards[addr] = list(parsed.targets)
        if parsed.aliases or len(parsed.addresses) > 1:
            for attr, values in ((attributes.address or "", parsed.addresses[1:]), (alias_attr, parsed.aliases)):
                for alias in values:
                    if alias != addr:
                        ldap_aliases.setdefault(alias, addr)
                        alias_source.setdefault(alias, attr)
                        if ldap_aliases[alias] != addr:
                            rej.append(Rejection(entry.dn, attr, f"{alias} already claimed; value dropped"))
        if parsed.password is not None:
            passwords[login] = parsed.password
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
            continue
        aliases[alias] = [user]
        alias_dn[alias] = owner_dn[user]

    group_dn: dict[str, str] = {}
    if groups is not None and group_entries:
        resolved = _resolve_groups(group_entries, groups, member_state, domain, canon, rej)
        for address, (dn, targets) in resolved.items():
            claimed = owner_dn.get(address) or alias_dn.get(address)
            if claimed:
                reason = f"{address} is an address of {claimed}; the account wins, group address dropped"
                rej.append(Rejection(dn, groups.name_attribute, reason))
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

    _break_loops(aliases, forwards, static_keys, owner_dn, alias_dn, static.file, rej, fwd_attr, alias_attr)
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


def _canonical_domains(
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


def _parse_entry(
    entry: Entry, attributes: AttributeMap, names: dict[str, str], domain: str, canon: Mapping[str, str], today: date
) -> _Parsed:
    rej: list[Rejection] = []
    attrs = entry.attributes
    logins = attrs.get(names["login"], ())
    if not logins:
        return _Parsed(skipped=True)
    if len(logins) > 1:
        return _Parsed(rejections=(Rejection(entry.dn, attributes.login, "multi-valued login; entry skipped"),))
    try:
        login = validate.login(logins[0])
    except validate.Invalid as e:
        return _Parsed(rejections=(Rejection(entry.dn, attributes.login, f"{e}; entry skipped"),))
    if any(validate.is_retired(s, today) for s in attrs.get(names["status"], ())):
        return _Parsed(login=login, retired=True)

    def canonical(addr: str) -> str:
        local, _, dom = addr.rpartition("@")
        return f"{local.lower()}@{canon[dom]}" if dom in canon else addr

    own: list[str] = []
    if names["address"]:
        addr_attr = attributes.address or ""
        for value in attrs.get(names["address"], ()):
            try:
                address = validate.address(value)
            except validate.Invalid as e:
                rej.append(Rejection(entry.dn, addr_attr, f"{_show(value)} {e}; value dropped"))
                continue
            if address.rpartition("@")[2] not in canon:
                rej.append(Rejection(entry.dn, addr_attr, f"{_show(value)} is not in a hosted domain; value dropped"))
                continue
            own.append(canonical(address))
    addresses = tuple(sorted(set(own))) if len(own) > 1 else tuple(own)  # unordered in LDAP: lowest is primary
    messages = attrs.get(names["disable_message"], ())
    if len(messages) > 1:
        messages = tuple(sorted(messages))  # LDAP values are unordered
    if messages:
        try:
            message = validate.disable_message(messages[0])
        except validate.Invalid as e:
            rej.append(Rejection(entry.dn, attributes.disable_message or "", f"{e}; default text used"))
            message = DEFAULT_DISABLED_MESSAGE
        return _Parsed(login=login, disabled=message, rejections=tuple(rej), addresses=addresses)

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
                rej.append(Rejection(entry.dn, fwd_attr, f"{_show(part)} {e}; value dropped"))
    aliases: list[str] = []
    for value in attrs.get(names["alias"], ()):
        try:
            alias = validate.address(value)
        except validate.Invalid as e:
            rej.append(Rejection(entry.dn, alias_attr, f"{_show(value)} {e}; value dropped"))
            continue
        if alias.rpartition("@")[2] not in canon:
            where = domain if len(set(canon.values())) == 1 else "a hosted domain"
            rej.append(Rejection(entry.dn, alias_attr, f"{_show(value)} is not in {where}; value dropped"))
            continue
        aliases.append(canonical(alias))
    password = None
    hashes = attrs.get(names["mail_password"], ())
    if len(hashes) > 1:
        rej.append(Rejection(entry.dn, attributes.mail_password or "", "multi-valued; no password"))
    elif hashes:
        try:
            password = validate.password(hashes[0])
        except validate.Invalid as e:
            rej.append(Rejection(entry.dn, attributes.mail_password or "", f"{e}; no password"))
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
        rejections=tuple(rej),
        addresses=addresses,
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


def _dn_key(dn: str) -> str:
    """A DN as compared with member values: case and spaces around separators do not count."""
    return _DN_SPACES_RE.sub(r"\1", dn.strip().lower())


def _group_test(settings: GroupSettings | None) -> Callable[[Entry], bool] | None:
    if settings is None:
        return None
    classes = frozenset(c.lower() for c in settings.object_classes)
    base = _dn_key(settings.base_dn) if settings.base_dn else None

    def is_group(entry: Entry) -> bool:
        if not classes.intersection(v.lower() for v in entry.attributes.get("objectclass", ())):
            return False
        if base is None:
            return True
        key = _dn_key(entry.dn)
        return key == base or key.endswith("," + base)

    return is_group


def _resolve_groups(
    entries: list[Entry],
    settings: GroupSettings,
    member_state: Mapping[str, tuple[str, str | None]],
    domain: str,
    canon: Mapping[str, str],
    rej: list[Rejection],
) -> dict[str, tuple[str, tuple[str, ...]]]:
    """group address -> (DN, every member address, nested groups flattened).

    Nested groups are expanded here, not left to Postfix, so a cycle is found and reported
    once (every group on it gets the members of all of them) instead of looping in the MTA.
    """
    by_key = {_dn_key(e.dn): e for e in entries}
    direct: dict[str, set[str]] = {}
    nested: dict[str, list[str]] = {}
    names: dict[str, list[str]] = {}
    name_attr = settings.name_attribute.lower()

    def as_address(value: str) -> str:
        if "@" not in value:
            return f"{validate.local_part(value).lower()}@{domain}"
        address = validate.address(value)
        local, _, dom = address.rpartition("@")
        return f"{local.lower()}@{canon[dom]}" if dom in canon else address

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
                member = _dn_key(value)
                if member in by_key:
                    subgroups.append(member)
                    continue
                kind, account = member_state.get(member, ("unknown", None))
                if kind == "account" and account is not None:
                    members.add(account)
                elif kind == "unknown":
                    rej.append(Rejection(dn, attr, f"member {_show(value)} is not a mail account or group; skipped"))
                else:
                    rej.append(Rejection(dn, attr, f"member {_show(value)} is {kind}; skipped"))
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
) -> None:
    """Postfix defers mail caught in an alias loop; drop the LDAP edges that close one."""
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
            from_ldap = [a for a in members if a not in static_keys]
            if not from_ldap:
                keys = ", ".join(static_keys[a] for a in members)
                raise ConfigError(f"alias loop: {' -> '.join(members)}", file=str(static_file), key=keys)
            for a in from_ldap:
                if a in forwards:
                    reason = f"forward loop through {', '.join(members)}; forward dropped"
                    rej.append(Rejection(owner_dn[a], fwd_attr, reason))
                    del forwards[a]
                else:
                    reason = f"alias loop through {', '.join(members)}; alias dropped"
                    rej.append(Rejection(alias_dn[a], alias_attr, reason))
                    del aliases[a]


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
