"""A directory with every routing shape, and what the whole mail system must do with each address.

The intent is written by hand from the routing design (docs/deployment.md, "Mail flow"), not
computed from ldapsync's output: for each address, either the RCPT reply that refuses it, or the
set of final destinations (a mailbox on the mailbox host, or an Internet address), each to be
reached exactly once. tests/e2e/test_e2e_system.py sends one message to every address and
compares what real Postfix and Dovecot did with this.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "example.org"
ALIAS_DOMAINS = ("host1.example.org", "example.net")
USERS = "ou=users,dc=example,dc=org"
GROUPS = "ou=groups,dc=example,dc=org"
SENDER_LOGIN = "plain1"  # the account that submits mail (its mail password is set by the test)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where one message to an address must end: refused at RCPT with ``reject`` (a reply code),
    or delivered once to each login's mailbox and once to each Internet address."""

    reject: int | None = None
    mailboxes: frozenset[str] = frozenset()
    internet: frozenset[str] = frozenset()
    reason: str = ""
    text: str = ""  # what the refusal must end with

    @property
    def destinations(self) -> frozenset[str]:
        return frozenset({f"mailbox:{m}" for m in self.mailboxes} | {f"internet:{a}" for a in self.internet})


def deliver(*targets: str, why: str = "") -> Outcome:
    """Targets: a bare name is a mailbox login, anything with @ an Internet address."""
    return Outcome(
        mailboxes=frozenset(t for t in targets if "@" not in t),
        internet=frozenset(t for t in targets if "@" in t),
        reason=why,
    )


def rejected(code: int, why: str, text: str = "") -> Outcome:
    return Outcome(reject=code, reason=why, text=text)


@dataclass(frozen=True, slots=True)
class Account:
    uid: str
    forward: tuple[str, ...] = ()  # emailForward values (one value may be a comma-separated list)
    status: str | None = None  # accountStatus
    disable: str | None = None  # mailDisableMessage


@dataclass(frozen=True, slots=True)
class Group:
    cn: str
    object_class: str = "groupOfNames"
    members: tuple[str, ...] = ()  # uid=... or cn=... (relative names, completed below)
    addresses: tuple[str, ...] = ()  # rfc822MailMember (nisMailAlias)


EXT = "ext.example"
DIS1 = "dis1 has left, write to plain1@example.org"
DIS2 = "dis2 is disabled"
ACCOUNTS = (
    # the accounts the docs' mail.yaml names
    Account("alice"),
    Account("bob", ("bob@elsewhere.example",)),
    # mailboxes
    *(Account(f"plain{i}") for i in range(1, 7)),
    # forwards out of the domain
    Account("fwd1", (f"fwd1@{EXT}",)),
    Account("fwd2", (f"fwd2a@{EXT}", f"fwd2b@{EXT}")),  # two values
    Account("fwd3", (f"fwd3a@{EXT}, fwd3b@{EXT}",)),  # one comma-separated value
    Account("lists1", ("lists1@lists.example.net",)),  # a subdomain of an alias domain is not ours
    # forwards that keep a copy (the address lists itself)
    Account("keep1", ("keep1@example.org", f"keep1@{EXT}")),
    Account("keep2", (f"keep2@example.org, keep2@{EXT}",)),
    # forwards into the domain
    Account("in1", ("plain2@example.org",)),
    Account("in2", ("keep1@example.org",)),
    Account("in3", ("plain3@example.net",)),  # written in an alias domain
    Account("in4", ("in1@example.org",)),
    Account("inext", ("plain4@example.org", f"inext@{EXT}")),
    # a chain of forwards
    Account("ch1", ("ch2@example.org",)),
    Account("ch2", ("ch3@example.org",)),
    Account("ch3", (f"chain@{EXT}",)),
    # forward loops: the edges of the cycle are dropped, what leaves it stays
    Account("lp1", ("lp2@example.org",)),
    Account("lp2", ("lp1@example.org",)),
    Account("la", ("lb@example.org",)),
    Account("lb", ("lc@example.org",)),
    Account("lc", ("la@example.org",)),
    Account("lk", ("ly@example.org", f"lk@{EXT}")),
    Account("ly", ("lk@example.org",)),
    # disabled and retired accounts
    Account("dis1", disable=DIS1),
    Account("dis2", (f"dis2@{EXT}",), disable=DIS2),
    Account("ret1", status="inactive"),
    Account("ret2", (f"ret2@{EXT}",), status="memorial"),
    # forwards to dead targets (disabled, retired, unknown in the domain)
    Account("todis", ("dis1@example.org",)),
    Account("todis2", ("dis1@example.org", f"todis2@{EXT}")),
    Account("toret", ("ret1@example.org",)),
    Account("tounk", ("nobody-here@example.org",)),
    Account("tounk2", ("nobody-here@example.org", f"tounk2@{EXT}")),
)

GROUP_LIST = (
    Group("g-flat", members=("uid=plain1", "uid=keep1")),
    Group("g-inner", "groupOfUniqueNames", members=("uid=plain5", "uid=fwd1")),
    Group("g-outer", members=("cn=g-inner", "uid=plain6", "uid=ch1")),
    Group("g-nis", "nisMailAlias", addresses=("plain2", "member@partner.example")),
    Group("g-dead", members=("uid=dis1", "uid=ret1")),
    Group("g-mixed", members=("uid=dis1", "uid=plain3", "uid=ghost")),
    Group("g-cyc-a", members=("cn=g-cyc-b", "uid=plain4")),
    Group("g-cyc-b", members=("cn=g-cyc-a", "uid=fwd2")),
    Group("g-twice", members=("uid=plain2", "uid=in1")),  # in1 forwards to plain2
    Group("g-nis-dead", "nisMailAlias", addresses=("ret1", "dis1@example.org", "plain5")),
)

# Appended to the docs' mail.yaml (whose postmaster/abuse/hostmaster/noreply-bounces stay).
STATIC_EXTRA = """\
# --- added by tests/e2e/systemdata.py ---
  sa-team: [plain1, fwd1]
  sa-meta: sa-team
  sa-ext: [partner@partner.example]
  sa-keep: [keep1, in1]
  sa-group: [g-flat, plain3]
  sa-dead: [dis1, nobody-x]
  sa-half: [dis1, plain6]
  sa-ret: [ret1]
  sa-twice: [fwd1, fwd1@ext.example]
"""
STATIC_FORWARDS_EXTRA = """\
  sf-lists: sf@lists.example.net
  sf-in: plain1
"""

UNKNOWN = rejected(550, "no such address")
RETIRED = rejected(550, "retired account")
# every target dead: refused like an unknown address, or with the disabled account's message
DEAD = rejected(550, "every target is dead: nothing may be accepted and bounced")
DEAD_DISABLED = rejected(554, "every target is dead, one disabled: its message", DIS1)

INTENT: dict[str, Outcome] = {
    "alice": deliver("alice"),
    "bob": deliver("bob@elsewhere.example"),
    **{f"plain{i}": deliver(f"plain{i}") for i in range(1, 7)},
    "fwd1": deliver(f"fwd1@{EXT}"),
    "fwd2": deliver(f"fwd2a@{EXT}", f"fwd2b@{EXT}"),
    "fwd3": deliver(f"fwd3a@{EXT}", f"fwd3b@{EXT}"),
    "lists1": deliver("lists1@lists.example.net", why="lists.example.net is not an alias domain"),
    "keep1": deliver("keep1", f"keep1@{EXT}", why="kept copy: once in the mailbox, once out"),
    "keep2": deliver("keep2", f"keep2@{EXT}", why="kept copy in a comma-separated value"),
    "in1": deliver("plain2"),
    "in2": deliver("keep1", f"keep1@{EXT}"),
    "in3": deliver("plain3"),
    "in4": deliver("plain2", why="chain in1 -> plain2"),
    "inext": deliver("plain4", f"inext@{EXT}"),
    "ch1": deliver(f"chain@{EXT}"),
    "ch2": deliver(f"chain@{EXT}"),
    "ch3": deliver(f"chain@{EXT}"),
    "lp1": deliver("lp1", why="loop lp1 <-> lp2 broken: each keeps its mail"),
    "lp2": deliver("lp2", why="loop lp1 <-> lp2 broken: each keeps its mail"),
    "la": deliver("la", why="3-cycle broken"),
    "lb": deliver("lb", why="3-cycle broken"),
    "lc": deliver("lc", why="3-cycle broken"),
    "lk": deliver(f"lk@{EXT}", why="loop edge dropped, the external target stays"),
    "ly": deliver("ly", why="loop edge dropped, nothing left: local"),
    "dis1": rejected(554, "disabled account: its mailDisableMessage", DIS1),
    "dis2": rejected(554, "disabled account: its mailDisableMessage", DIS2),
    "ret1": RETIRED,
    "ret2": RETIRED,
    "todis": DEAD_DISABLED,
    "todis2": deliver(f"todis2@{EXT}", why="dead target dropped, the external one stays"),
    "toret": DEAD,
    "tounk": DEAD,
    "tounk2": deliver(f"tounk2@{EXT}", why="dead target dropped, the external one stays"),
    # groups
    "g-flat": deliver("plain1", "keep1", f"keep1@{EXT}"),
    "g-inner": deliver("plain5", f"fwd1@{EXT}"),
    "g-outer": deliver("plain5", f"fwd1@{EXT}", "plain6", f"chain@{EXT}", why="nested group"),
    "g-nis": deliver("plain2", "member@partner.example"),
    "g-dead": DEAD_DISABLED,
    "g-mixed": deliver("plain3", why="disabled and unknown members skipped"),
    "g-cyc-a": deliver("plain4", f"fwd2a@{EXT}", f"fwd2b@{EXT}", why="group cycle: members of both"),
    "g-cyc-b": deliver("plain4", f"fwd2a@{EXT}", f"fwd2b@{EXT}", why="group cycle: members of both"),
    "g-twice": deliver("plain2", why="a group of an account and of a forward to it"),
    "g-nis-dead": deliver("plain5", why="member addresses of retired and disabled accounts dropped"),
    # static (the docs' mail.yaml, then the additions)
    "postmaster": deliver("alice", "bob@elsewhere.example"),
    "abuse": deliver("alice", "bob@elsewhere.example"),
    "hostmaster": deliver("alice"),
    "noreply-bounces": deliver("bounces@lists.example.net", why="docs' static forward to a subdomain"),
    "sa-team": deliver("plain1", f"fwd1@{EXT}"),
    "sa-meta": deliver("plain1", f"fwd1@{EXT}"),
    "sa-ext": deliver("partner@partner.example"),
    "sa-keep": deliver("keep1", f"keep1@{EXT}", "plain2"),
    "sa-group": deliver("plain1", "keep1", f"keep1@{EXT}", "plain3"),
    "sa-dead": DEAD_DISABLED,
    "sa-half": deliver("plain6", why="dead target dropped"),
    "sa-ret": DEAD,
    "sa-twice": deliver(f"fwd1@{EXT}", why="an alias to an account and to its forward target"),
    "sf-lists": deliver("sf@lists.example.net"),
    "sf-in": deliver("plain1"),
    # not in the directory
    "nobody": UNKNOWN,
    "ghost": UNKNOWN,
}

# Shapes whose targets include dead ones (disabled, retired, unknown) in static aliases, LDAP
# forwards and group member addresses: those targets must be dropped when the maps are built.
DEAD_TARGET_SHAPES = frozenset(
    {"todis", "todis2", "toret", "tounk", "tounk2", "sa-dead", "sa-half", "sa-ret", "g-nis-dead", "g-dead"}
)

# Two routes to one destination that would meet only past the MX if the expansion were split
# between hosts (the MX expanding aliases and groups, the SRS host forwards: each route a
# separate message there, delivered twice). The documented roles resolve it on the MX, once.
TWO_ROUTES = frozenset({"sa-twice", "g-twice"})

# Alias-domain spellings (and case) of a sample of every kind of address.
VARIANTS = (
    "plain1@example.net",
    "plain1@host1.example.org",
    "PLAIN2@Example.NET",
    "fwd1@example.net",
    "keep1@host1.example.org",
    "in1@example.net",
    "ch1@example.net",
    "lp1@host1.example.org",
    "lists1@example.net",
    "g-flat@example.net",
    "g-outer@host1.example.org",
    "sa-team@example.net",
    "postmaster@example.net",
    "noreply-bounces@example.net",
    "dis1@example.net",
    "ret1@host1.example.org",
    "nobody@example.net",
    "todis@example.net",
)


def addresses() -> dict[str, Outcome]:
    """Every address the test sends to, with its intended outcome."""
    out = {f"{name}@{DOMAIN}": outcome for name, outcome in INTENT.items()}
    for variant in VARIANTS:
        out[variant] = INTENT[variant.split("@")[0].lower()]
    return out


def shape(address: str) -> str:
    return address.split("@")[0].lower()


def ldif(sender_password_hash: str) -> str:
    """The accounts and groups above, below base.ldif's ou=users (groups get their own ou)."""
    blocks = [f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n"]
    for acct in ACCOUNTS:
        lines = [
            f"dn: uid={acct.uid},{USERS}",
            "objectClass: inetOrgPerson",
            "objectClass: ldapsyncMailAccount",
            f"uid: {acct.uid}",
            f"cn: {acct.uid}",
            f"sn: {acct.uid}",
            *(f"emailForward: {f}" for f in acct.forward),
            *([f"accountStatus: {acct.status}"] if acct.status else []),
            *([f"mailDisableMessage: {acct.disable}"] if acct.disable else []),
            *([f"mailPassword: {sender_password_hash}"] if acct.uid == SENDER_LOGIN else []),
        ]
        blocks.append("\n".join(lines) + "\n")
    for group in GROUP_LIST:
        attr = "uniqueMember" if group.object_class == "groupOfUniqueNames" else "member"
        lines = [f"dn: cn={group.cn},{GROUPS}", f"objectClass: {group.object_class}", f"cn: {group.cn}"]
        for member in group.members:
            parent = USERS if member.startswith("uid=") else GROUPS
            lines.append(f"{attr}: {member},{parent}")
        lines += [f"rfc822MailMember: {a}" for a in group.addresses]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def static_file(docs_mail_yaml: str) -> str:
    """The docs' mail.yaml with this directory's static aliases and forwards added."""
    head, sep, forwards = docs_mail_yaml.partition("forwards:\n")
    assert sep, "docs/snippets/mail.yaml has no forwards: section"
    return head + STATIC_EXTRA + sep + forwards + STATIC_FORWARDS_EXTRA
