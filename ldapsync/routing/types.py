"""The routing model's data: its settings, the model itself, a change to it, the report, the trace.

Plain frozen data shared by every phase (routing/build.py) and by the exporters, which only
render a RoutingModel: so every output agrees with every other, and every host computes the
same bytes from the same directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from ldapsync.directory import Rejection
from ldapsync.schema import AttributeMap

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
class Settings:
    """Everything the routing model depends on besides the directory, the static file and the day.

    One object (Config.routing) instead of loose keyword arguments: the full build, the
    incremental engine and `ldapsync explain` cannot be handed different halves of it."""

    domain: str
    domain_aliases: tuple[str, ...]
    attributes: AttributeMap
    weak_passwords: str = "warn"  # passwords.weak: unsalted digests and DES-CRYPT
    hosted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # further domains -> alias domains
    groups: GroupSettings | None = None
    mailbox: MailboxSettings | None = None
    login_by_address: bool = False  # passwords.login_by_address: an account's own addresses are logins too

    def __post_init__(self) -> None:
        if self.weak_passwords not in WEAK_POLICIES:
            raise ValueError(f"weak_passwords must be one of {WEAK_POLICIES}")

    def canonical_domains(self) -> dict[str, str]:
        """Every domain we accept mail for -> the hosted domain its addresses are canonical in."""
        canon = {d: self.domain for d in (self.domain, *self.domain_aliases)}
        for hosted_domain, alias_domains in self.hosted.items():
            canon.update({d: hosted_domain for d in (hosted_domain, *alias_domains)})
        return canon

    def all_domains(self) -> tuple[str, ...]:
        """Every domain mail is accepted for: hosted domains and their alias domains."""
        return (self.domain, *self.domain_aliases, *(d for h, a in self.hosted.items() for d in (h, *a)))


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
    # login -> its own addresses that are logins too (passwords.login_by_address), primary first
    login_addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

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
    # Set when the model given with this change holds only the changed part of the directory (a
    # stored engine keeps no whole model): that part's model before the change. Renderers then
    # splice, dropping the lines the old part gave; a whole render needs a full build.
    before: RoutingModel | None = None


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

    Adding a rule: one member here, and one Decisions call (routing/decisions.py) where the
    rule decides."""

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
    GROUP = "group"  # a group entry's name gives the address (its members are the targets)
    TARGET_DROPPED = "target-dropped"  # a target in our domains is disabled, retired or unknown
    NO_TARGET = "no-target"  # every target was dropped: the address is not accepted


@dataclass(frozen=True, slots=True)
class Event:
    """One decision about one canonical address: which rule, and who caused it."""

    rule: Rule
    address: str
    source: str  # an entry DN, or `file: key` for static data
    attribute: str = ""
    detail: str = ""


Trace = list[Event]
