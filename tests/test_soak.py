"""Agent soak: random directory churn and agent crashes end where a fresh `ldapsync --once` ends.

The agent follows a real slapd by syncrepl while a seeded random sequence of changes goes
through ldapmodify: adds, modifications of every routed attribute (forwards, aliases, hosted
addresses, password hashes incl. plaintext and weak ones, account status, disable messages),
renames, deletes, alias and login conflicts, forward loops, group membership, nested groups,
and now and then an edit of the static file. In between the agent is killed (`kill -9`, or
SIGTERM) and restarted, sometimes after more changes were made while it was down, so the
restart resumes by cookie. Now and then, and at the end, the test waits until the agent has
installed everything up to slapd's contextCSN and compares every installed file byte for byte
with what `ldapsync --once` (fresh state dir, fresh output paths, same config) installs, and
the compiled maps through `postmap`.

The safety guards are relaxed in the soak config (max_deletions, max_changes, ratios 1.0, and
window 0): random churn deletes and rewrites many values, and a held change is a decision the
test would have to second-guess; a change held anyway fails the test, and so does any error the
agent logs (but for finding what a kill -9 left behind, CRASH_RECOVERY, and what libraries log
through their own loggers). Everything else (passwords.weak: warn, loops, precedence) is the
default.

    LDAPSYNC_SOAK_CHANGES=3000 LDAPSYNC_SOAK_SEED=1234 python -m pytest tests/test_soak.py

Default: 300 changes with about 5 agent stops; the seed is random and printed (and part of
every failure message). The directory changes and the stop points follow from the seed alone;
the agent's timing does not. Every applied change is written to soak-changes.ldif in the
test's tmp dir, with the stops and comparisons marked, for a reproduction (`--basetemp DIR`
keeps it: pytest removes all but its three newest tmp dirs, also those of other runs).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import difflib
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentutil import AgentProcess, AgentSetup, postmap_path, wait_until
from slapd import BASE_LDIF, DEMO_LDIF, FIXTURES, HOSTILE_LDIF, SUFFIX, Slapd, generate_users_ldif, ssha

from ldapsync import status as status_mod

pytestmark = [
    pytest.mark.slapd,
    pytest.mark.soak,
    pytest.mark.skipif(postmap_path() is None, reason="postfix not installed (postmap)"),
]

CHANGES = int(os.environ.get("LDAPSYNC_SOAK_CHANGES", "300"))
SEED_ENV = os.environ.get("LDAPSYNC_SOAK_SEED")
STOP_EVERY = 60  # one agent stop per this many changes
COMPARE_EVERY = 150  # one mid-run comparison per this many changes
USERS_AT_START = 300
HOT_GENERATED = 20  # generated users that most changes pick from (with the fixtures' and new accounts)
CATCH_UP = 90.0  # seconds the agent may take to install what is in the directory (a loaded machine)

USERS = f"ou=users,{SUFFIX}"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
FAST = {"debounce": 0.05, "max_delay": 1.0, "reconnect_max": 1.0, "retry_initial": 0.5, "retry_max": 2.0}
MAILBOX_HOME = "/var/vmail"

# name, kind, map_type (None: a plain file), extra keys
EXPORTERS: list[tuple[str, str, str | None, dict[str, Any]]] = [
    ("virtual", "postfix-virtual", "lmdb", {}),
    ("transport", "postfix-transport", "hash", {"nexthop": "smtp:[srs.example.org]"}),
    ("recipients", "postfix-recipients", "cdb", {}),
    ("sender_login", "postfix-sender-login", "lmdb", {}),
    ("access", "postfix-access", "hash", {}),
    ("virtual_mailbox", "postfix-virtual-mailbox", "lmdb", {}),
    ("passwd", "dovecot-passwd", None, {}),
    ("userdb", "dovecot-userdb", None, {"address_keys": True}),
]
COMPILED_SUFFIX = {"hash": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}

HOSTED = ["example.org", "example.net", "example.com", "example.info", "other.example"]
EXTERNAL = ["elsewhere.example", "outside.example", "partner.example"]
SHARED = ["sales", "info", "help", "team1", "team2", "team3", "postmaster", "abuse", "security", "noc"]
BAD_ADDRESSES = [
    "bad address@example.org",
    "|/usr/bin/evil",
    "/etc/passwd",
    "x@",
    "two@@example.org",
    "root@localhost",
    "a:b@example.org",
    "ctl\x01@example.org",
]
BAD_LOGINS = ["bad..login", "-dash", "dot.", "x" * 70]
STATUSES = [
    "active",
    "inactive",
    "memorial",
    "retiring 2001-01-01",
    "retiring 2999-12-31",
    "locked 2020-01-02",
    "Inactive",
    "disabled",
    "retiring soon",
]
DISABLE_MESSAGES = ["Gone fishing", "Left the project; write to hostmaster@example.org", "x" * 250]
CRYPT_HASHES = [
    line.split(":", 1)[1].strip()
    for line in DEMO_LDIF.read_text().splitlines()
    if line.startswith("mailPassword:") and not line.startswith("mailPassword::")
]


# -- LDIF -----------------------------------------------------------------------------------
def _safe(value: str) -> bool:
    return bool(value) and all(" " <= c <= "~" for c in value) and value[0] not in " :<" and value[-1] != " "


def attr_line(name: str, value: str) -> str:
    if _safe(value):
        return f"{name}: {value}\n"
    return f"{name}:: {base64.b64encode(value.encode()).decode()}\n"


def dn_line(dn: str) -> str:
    return attr_line("dn", dn)


def dedupe(values: Sequence[str]) -> list[str]:
    """Values as slapd takes them in one operation: no two equal ignoring case (caseIgnore rules)."""
    seen: set[str] = set()
    out: list[str] = []
    for v in values:
        if v.lower() not in seen:
            seen.add(v.lower())
            out.append(v)
    return out


def replace(attr: str, values: Sequence[str]) -> str:
    """An LDIF replace part: no values deletes the attribute (also when it is absent)."""
    return f"replace: {attr}\n" + "".join(attr_line(attr, v) for v in dedupe(values))


# -- what the test has put into the directory -------------------------------------------------
@dataclass(frozen=True, slots=True)
class Node:
    key: int  # the same through renames
    dn: str
    name: str  # the uid of an account, the cn of a group
    kind: str  # "account", or the group's object class
    classes: frozenset[str]  # lower-case object classes


GROUP_KINDS = {"groupofnames": "member", "groupofuniquenames": "uniqueMember", "nismailalias": "rfc822MailMember"}


class Directory:
    """Enough of the directory to pick changes that slapd accepts (existing DNs, object classes)."""

    def __init__(self, nodes: Sequence[Node]):
        self.nodes: dict[str, Node] = {n.dn.lower(): n for n in nodes}  # by lower-case DN
        self.keys: dict[int, Node] = {n.key: n for n in nodes}
        self.gone: list[str] = []  # names of deleted or renamed-away entries, to reuse
        self.serial = len(nodes)

    @classmethod
    def read(cls, server: Slapd) -> Directory:
        nodes: list[Node] = []
        found = server.search(
            "(|(uid=*)(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=nisMailAlias))",
            ["objectClass", "uid", "cn"],
        )
        for e in sorted(found, key=lambda e: e.dn.lower()):
            classes = frozenset(c.lower() for c in e.get("objectClass"))
            kind = next((k for k in GROUP_KINDS if k in classes), None)
            if kind is not None and e.dn.lower().endswith(GROUPS.lower()):
                nodes.append(Node(len(nodes), e.dn, e.get("cn")[0], kind, classes))
            elif kind is None and e.get("uid"):
                nodes.append(Node(len(nodes), e.dn, e.get("uid")[0], "account", classes))
        return cls(nodes)

    def fresh(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def accounts(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == "account"]

    def groups(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind != "account"]

    def exists(self, dn: str) -> bool:
        return dn.lower() in self.nodes

    def new(self, dn: str, name: str, kind: str, classes: Sequence[str]) -> Node:
        self.serial += 1
        node = Node(self.serial, dn, name, kind, frozenset(c.lower() for c in classes))
        self.put(node)
        return node

    def put(self, node: Node) -> None:
        """Record node, replacing the one with its key (renamed: under its old DN too)."""
        old = self.keys.get(node.key)
        if old is not None:
            del self.nodes[old.dn.lower()]
        self.nodes[node.dn.lower()] = self.keys[node.key] = node

    def remove(self, node: Node) -> None:
        del self.nodes[node.dn.lower()]
        del self.keys[node.key]
        self.gone.append(node.name)

    def rename(self, node: Node, rdn_attr: str, name: str, parent: str) -> Node:
        self.gone.append(node.name)
        renamed = dataclasses.replace(node, dn=f"{rdn_attr}={name},{parent}", name=name)
        self.put(renamed)
        return renamed


@dataclass(frozen=True, slots=True)
class Change:
    what: str  # one line for the log
    ldif: str = ""  # for ldapmodify, or
    static: dict[str, Any] | None = None  # the new static file


class Changes:
    """Random, valid changes from one seeded generator; the same seed gives the same sequence."""

    def __init__(self, rng: random.Random, directory: Directory):
        self.rng = rng
        self.d = directory
        generated = [n for n in directory.accounts() if n.name.startswith("user0")]
        fixtures = [n for n in directory.accounts() if not n.name.startswith("user0")]
        self.hot: list[int] = [n.key for n in fixtures + rng.sample(generated, min(HOT_GENERATED, len(generated)))]
        self.ops: list[tuple[int, Callable[[], Change]]] = [
            (14, self.forward),
            (10, self.alias),
            (5, self.hosted_address),
            (10, self.password),
            (6, self.status),
            (5, self.disable),
            (10, self.add_account),
            (7, self.delete_account),
            (6, self.rename_account),
            (3, self.loop),
            (3, self.conflict),
            (3, self.add_group),
            (6, self.group_members),
            (2, self.rename_group),
            (2, self.delete_group),
            (2, self.touch),
            (1, self.static),
        ]

    def next(self) -> Change:
        weights = [w for w, _ in self.ops]
        op = self.rng.choices([f for _, f in self.ops], weights)[0]
        return op()

    # -- values ---------------------------------------------------------------------------
    def account(self) -> Node:
        """Mostly one of the hot accounts, so that changes meet: conflicts, loops, groups, renames."""
        if self.rng.random() < 0.7:
            hot = [self.d.keys[k] for k in self.hot if k in self.d.keys]
            if hot:
                return self.rng.choice(hot)
        return self.rng.choice(self.d.accounts())

    def distinct_accounts(self, count: int) -> list[Node]:
        picked: dict[int, Node] = {}
        while len(picked) < count:
            node = self.account()
            picked[node.key] = node
        return list(picked.values())

    def local_part(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return self.account().name
        if r < 0.6:
            return self.rng.choice(SHARED)
        if r < 0.75 and self.d.groups():
            return self.rng.choice(self.d.groups()).name.split("@")[0]
        return self.d.fresh("x")

    def address(self, *, hosted: float = 0.8) -> str:
        if self.rng.random() < 0.04:
            return self.rng.choice(BAD_ADDRESSES)
        domain = self.rng.choice(HOSTED if self.rng.random() < hosted else EXTERNAL)
        local = self.local_part()
        if self.rng.random() < 0.05:
            local, domain = local.upper(), domain.upper()
        return f"{local}@{domain}"

    def forward_values(self, node: Node) -> list[str]:
        r = self.rng.random()
        if r < 0.2:
            return []
        if r < 0.45:
            return [f"{node.name}@{self.rng.choice(EXTERNAL)}"]
        if r < 0.65:
            return [self.address()]
        if r < 0.75:  # keep a copy
            return [f"{node.name}@example.org, {node.name}@{self.rng.choice(EXTERNAL)}"]
        if r < 0.9:  # a comma-separated list in one value
            return [", ".join(self.address() for _ in range(self.rng.randint(2, 3)))]
        return [self.address() for _ in range(self.rng.randint(2, 3))]  # several values

    def password_values(self) -> list[str]:
        word = self.d.fresh("pw-")
        r = self.rng.random()
        if r < 0.1:
            return []
        if r < 0.35:
            return [ssha(word, salt=word.encode())]
        if r < 0.5:
            return [self.rng.choice(CRYPT_HASHES)]
        if r < 0.6:  # weak: unsalted SHA-1
            return ["{SHA}" + base64.b64encode(hashlib.sha1(word.encode()).digest()).decode()]
        if r < 0.65:  # weak: unsalted MD5
            return ["{MD5}" + base64.b64encode(hashlib.md5(word.encode()).digest()).decode()]
        if r < 0.7:  # weak: DES
            return ["{CRYPT}" + "".join(self.rng.choice("./0123456789abcdefXYZ") for _ in range(13))]
        if r < 0.8:  # plaintext
            return [self.rng.choice(["hunter2", word, "{PLAIN}" + word, "{CLEARTEXT}" + word])]
        if r < 0.87:  # malformed
            return [self.rng.choice(["$6$broken", "{SSHA}notbase64!", "{FOO}bar", "{SHA}" + word])]
        if r < 0.93:  # two values
            return [ssha(word, salt=b"salt1234"), ssha(word + "x", salt=b"salt5678")]
        salt = word.encode()[:8]
        return ["{SSHA512}" + base64.b64encode(hashlib.sha512(word.encode() + salt).digest() + salt).decode()]

    def needs(self, node: Node, *classes: str) -> str:
        """The LDIF part adding the object classes the node lacks (and the test's record of it)."""
        missing = [c for c in classes if c.lower() not in node.classes]
        if missing:
            self.d.put(dataclasses.replace(node, classes=node.classes | {c.lower() for c in missing}))
        return "".join(f"add: objectClass\nobjectClass: {c}\n-\n" for c in missing)

    def modify(self, node: Node, *parts: str, classes: Sequence[str] = ()) -> str:
        prefix = self.needs(node, *classes)
        return dn_line(node.dn) + "changetype: modify\n" + prefix + "-\n".join(parts) + "\n"

    # -- account attributes ------------------------------------------------------------------
    def forward(self) -> Change:
        node = self.account()
        values = self.forward_values(node)
        return Change(
            f"forward {node.dn} = {values}",
            self.modify(node, replace("emailForward", values), classes=["ldapsyncMailAccount"]),
        )

    def alias(self) -> Change:
        node = self.account()
        values = [self.address() for _ in range(self.rng.choice([0, 1, 1, 2, 3]))]
        return Change(
            f"alias {node.dn} = {values}",
            self.modify(node, replace("mailLocalAddress", values), classes=["inetLocalMailRecipient"]),
        )

    def hosted_address(self) -> Change:
        node = self.account()
        if "inetorgperson" not in node.classes:
            return self.forward()
        values = [
            f"{self.local_part()}@{self.rng.choice([*HOSTED, *EXTERNAL[:1]])}"
            for _ in range(self.rng.choice([0, 1, 1, 2]))
        ]
        return Change(f"mail {node.dn} = {values}", self.modify(node, replace("mail", values)))

    def password(self) -> Change:
        node = self.account()
        values = self.password_values()
        return Change(
            f"password {node.dn} ({len(values)} values)",
            self.modify(node, replace("mailPassword", values), classes=["ldapsyncMailAccount"]),
        )

    def status(self) -> Change:
        node = self.account()
        values = [] if self.rng.random() < 0.3 else [self.rng.choice(STATUSES)]
        return Change(
            f"status {node.dn} = {values}",
            self.modify(node, replace("accountStatus", values), classes=["ldapsyncMailAccount"]),
        )

    def disable(self) -> Change:
        node = self.account()
        values = [] if self.rng.random() < 0.5 else [self.rng.choice(DISABLE_MESSAGES)]
        return Change(
            f"disable {node.dn} = {values}",
            self.modify(node, replace("mailDisableMessage", values), classes=["ldapsyncMailAccount"]),
        )

    def touch(self) -> Change:
        """A change to an attribute ldapsync does not read: the outputs must not move."""
        people = [n for n in self.d.accounts() if "inetorgperson" in n.classes]
        node = self.rng.choice(people)
        return Change(f"touch {node.dn}", self.modify(node, replace("description", [self.d.fresh("touched ")])))

    # -- accounts come and go -------------------------------------------------------------
    def new_name(self, existing: Node | None = None) -> str:
        """A login: new, reused, another account's (a conflict), or invalid."""
        r = self.rng.random()
        if r < 0.55:
            return self.d.fresh("soak")
        if r < 0.7 and self.d.gone:
            name = self.rng.choice(self.d.gone)
        elif r < 0.92:
            name = self.account().name
            if self.rng.random() < 0.3:
                name = name.upper()
        else:
            name = self.rng.choice(BAD_LOGINS)
        if not DN_SAFE.match(name) or (existing is not None and name.lower() == existing.name.lower()):
            return self.d.fresh("soak")
        return name

    def free_dn(self, rdn_attr: str, name: str, parents: Sequence[str], prefix: str) -> tuple[str, str]:
        parent = self.rng.choice(parents)
        if self.d.exists(f"{rdn_attr}={name},{parent}"):
            name = self.d.fresh(prefix)
        return name, parent

    def add_account(self) -> Change:
        name, parent = self.free_dn("uid", self.new_name(), [USERS, USERS, USERS, PEOPLE], "soak")
        classes = ["inetOrgPerson", "ldapsyncMailAccount", "inetLocalMailRecipient"]
        node = self.d.new(f"uid={name},{parent}", name, "account", classes)
        lines = [
            *(f"objectClass: {c}\n" for c in classes),
            attr_line("uid", name),
            attr_line("cn", name),
            attr_line("sn", name),
        ]
        chance = self.rng.random
        values: dict[str, list[str]] = {
            "emailForward": self.forward_values(node) if chance() < 0.5 else [],
            "mailPassword": self.password_values() if chance() < 0.85 else [],
            "mailLocalAddress": [self.address() for _ in range(2)] if chance() < 0.2 else [],
            "mail": [f"{self.local_part()}@{self.rng.choice(HOSTED)}"] if chance() < 0.15 else [],
            "accountStatus": [self.rng.choice(STATUSES)] if chance() < 0.1 else [],
            "mailDisableMessage": [self.rng.choice(DISABLE_MESSAGES)] if chance() < 0.05 else [],
        }
        for attr, vals in values.items():
            lines += [attr_line(attr, v) for v in dedupe(vals)]
        self.hot.append(node.key)
        return Change(f"add {node.dn}", dn_line(node.dn) + "changetype: add\n" + "".join(lines))

    def delete_account(self) -> Change:
        if len(self.d.accounts()) < 50:
            return self.add_account()
        node = self.account()
        self.d.remove(node)
        return Change(f"delete {node.dn}", dn_line(node.dn) + "changetype: delete\n")

    def rename_account(self) -> Change:
        movable = [
            n
            for n in self.d.accounts()
            if DN_SAFE.match(n.name)
            and n.dn.lower() in (f"uid={n.name},{USERS}".lower(), f"uid={n.name},{PEOPLE}".lower())
        ]
        node = self.rng.choice(movable)
        old = node.dn
        parent = node.dn.split(",", 1)[1]
        if self.rng.random() < 0.3:
            parent = PEOPLE if parent.lower() == USERS.lower() else USERS
        name = self.new_name(node)
        if self.d.exists(f"uid={name},{parent}"):
            name = self.d.fresh("soak")
        moved = parent.lower() != old.split(",", 1)[1].lower()
        node = self.d.rename(node, "uid", name, parent)
        return Change(
            f"rename {old} -> {node.dn}",
            dn_line(old) + f"changetype: modrdn\nnewrdn: uid={name}\n"
            "deleteoldrdn: 1\n" + (f"newsuperior: {parent}\n" if moved else ""),
        )

    # -- conflicts and loops ----------------------------------------------------------------
    def loop(self) -> Change:
        """Two or three accounts forwarding to each other in a ring, some also elsewhere."""
        ring = self.distinct_accounts(self.rng.choice([2, 2, 3]))
        records: list[str] = []
        for node, target in zip(ring, ring[1:] + ring[:1], strict=True):
            values = [f"{target.name}@{self.rng.choice(['example.org', 'example.net'])}"]
            if self.rng.random() < 0.4:
                values.append(f"{node.name}@{self.rng.choice(EXTERNAL)}")
            records.append(self.modify(node, replace("emailForward", values), classes=["ldapsyncMailAccount"]))
        return Change(f"loop {[n.dn for n in ring]}", "\n".join(records))

    def conflict(self) -> Change:
        """Two entries claiming one address: a shared alias, an alias that is a login, a shared mail."""
        a, b = self.distinct_accounts(2)
        r = self.rng.random()
        if r < 0.5:
            shared = f"{self.rng.choice(SHARED)}@{self.rng.choice(HOSTED)}"
            records = [
                self.modify(n, replace("mailLocalAddress", [shared]), classes=["inetLocalMailRecipient"])
                for n in (a, b)
            ]
            return Change(f"conflict alias {shared} on {a.dn}, {b.dn}", "\n".join(records))
        if r < 0.75 or "inetorgperson" not in a.classes or "inetorgperson" not in b.classes:
            value = f"{b.name}@{self.rng.choice(['example.org', 'example.net'])}"
            return Change(
                f"conflict alias {value} on {a.dn}",
                self.modify(a, replace("mailLocalAddress", [value]), classes=["inetLocalMailRecipient"]),
            )
        shared = f"{self.d.fresh('shared')}@{self.rng.choice(['example.com', 'other.example'])}"
        records = [self.modify(n, replace("mail", [shared])) for n in (a, b)]
        return Change(f"conflict mail {shared} on {a.dn}, {b.dn}", "\n".join(records))

    # -- groups -----------------------------------------------------------------------------
    def group_name(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            name = self.d.fresh("list")
        elif r < 0.65:
            name = self.rng.choice(SHARED)
        elif r < 0.8:
            name = self.account().name
        elif r < 0.9:
            name = f"{self.d.fresh('list')}@{self.rng.choice(['example.com', 'other.example', 'example.net'])}"
        elif r < 0.95:
            name = f"Mail Team {self.d.fresh('')}"
        else:
            name = self.rng.choice(self.d.gone) if self.d.gone else self.d.fresh("list")
        return name if DN_SAFE.match(name.replace(" ", "").replace("@", "")) else self.d.fresh("list")

    def members(self, kind: str) -> list[str]:
        count = self.rng.randint(1, 5)
        if kind == "nismailalias":
            pool: list[Callable[[], str]] = [
                lambda: self.account().name,
                self.address,
                lambda: self.rng.choice(BAD_ADDRESSES),
            ]
            return [self.rng.choices(pool, [4, 5, 1])[0]() for _ in range(count - 1)]
        out: list[str] = []
        for _ in range(count):
            r = self.rng.random()
            if r < 0.65 or not self.d.groups():
                dn = self.account().dn
            elif r < 0.9:
                dn = self.rng.choice(self.d.groups()).dn
            else:
                dn = f"uid={self.d.fresh('ghost')},{USERS}"
            out.append(dn.upper() if self.rng.random() < 0.05 else dn)
        return out

    def add_group(self) -> Change:
        kind = self.rng.choice(sorted(GROUP_KINDS))
        name, parent = self.free_dn("cn", self.group_name(), [GROUPS], "list")
        cls = {
            "groupofnames": "groupOfNames",
            "groupofuniquenames": "groupOfUniqueNames",
            "nismailalias": "nisMailAlias",
        }[kind]
        attr = GROUP_KINDS[kind]
        members = "".join(attr_line(attr, m) for m in dedupe(self.members(kind)))
        node = self.d.new(f"cn={name},{parent}", name, kind, [kind])
        return Change(
            f"add group {node.dn}",
            dn_line(node.dn) + f"changetype: add\nobjectClass: {cls}\n" + attr_line("cn", name) + members,
        )

    def group_members(self) -> Change:
        if not self.d.groups():
            return self.add_group()
        node = self.rng.choice(self.d.groups())
        members = self.members(node.kind)
        return Change(f"members {node.dn} = {members}", self.modify(node, replace(GROUP_KINDS[node.kind], members)))

    def rename_group(self) -> Change:
        movable = [g for g in self.d.groups() if g.dn.lower() == f"cn={g.name},{GROUPS}".lower()]
        if not movable:
            return self.add_group()
        node = self.rng.choice(movable)
        old = node.dn
        name, parent = self.free_dn("cn", self.group_name(), [GROUPS], "list")
        if name.lower() == node.name.lower():
            name = self.d.fresh("list")
        node = self.d.rename(node, "cn", name, parent)
        return Change(
            f"rename group {old} -> {node.dn}",
            dn_line(old) + "changetype: modrdn\n" + attr_line("newrdn", f"cn={name}") + "deleteoldrdn: 1\n",
        )

    def delete_group(self) -> Change:
        if not self.d.groups():
            return self.add_group()
        node = self.rng.choice(self.d.groups())
        self.d.remove(node)
        return Change(f"delete group {node.dn}", dn_line(node.dn) + "changetype: delete\n")

    # -- the static file ---------------------------------------------------------------------
    def static(self) -> Change:
        return Change("static file edited", static=self.static_doc())

    def static_doc(self) -> dict[str, Any]:
        """Aliases and forwards; a name targets only names after it, so static entries never loop."""
        logins = [n.name for n in self.d.accounts() if STATIC_SAFE.match(n.name)]
        names = self.rng.sample(SHARED, self.rng.randint(1, 5))
        if self.rng.random() < 0.3:
            names.append(self.rng.choice(logins))  # overrides an account's routing
        names = [n if self.rng.random() < 0.8 else f"{n}@example.com" for n in dedupe(names)]
        aliases: dict[str, Any] = {}
        forwards: dict[str, str] = {}
        for i, name in enumerate(names):
            if self.rng.random() < 0.2:
                forwards[name] = f"{self.d.fresh('fwd')}@{self.rng.choice(EXTERNAL)}"
                continue
            pool = [*self.rng.sample(logins, 3), f"ext@{self.rng.choice(EXTERNAL)}", *names[i + 1 :]]
            aliases[name] = dedupe(self.rng.sample(pool, self.rng.randint(1, 3)))
        doc: dict[str, Any] = {"aliases": aliases}
        if forwards:
            doc["forwards"] = forwards
        return doc


# Logged at error level when a restart finds what a kill -9 left: a generation half removed by
# pruning, a follow-snapshot.json newer than the follow.json naming it (a full read follows).
CRASH_RECOVERY: frozenset[str] = frozenset()  # none left: what a kill -9 leaves is recovered without an error
DN_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
STATIC_SAFE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
STATIC_AT_START: dict[str, Any] = {
    "aliases": {
        "postmaster": ["alice", "bob"],
        "abuse": "postmaster",
        "security": ["user000001", "sec@partner.example"],
    },
    "forwards": {"noreply-bounces": "bounces@lists.example.net"},
}


# -- the agent's world, and a fresh --once beside it --------------------------------------------
def soak_setup(root: Path, server: Slapd) -> AgentSetup:
    """Every built-in output, two hosted domains with alias domains, groups, LDAP aliases and
    addresses, mailboxes, a static file; guards relaxed for random churn."""
    setup = AgentSetup.for_slapd(root, server, agent=FAST, base_dn=SUFFIX, static=STATIC_AT_START)
    setup.doc.update(
        {
            "domain_aliases": ["example.net"],
            "domains": {"example.com": ["example.info"], "other.example": []},
            "attributes": {
                "alias": "mailLocalAddress",
                "address": "mail",
                "uid_number": "uidNumber",
                "gid_number": "gidNumber",
                "home": "homeDirectory",
            },
            "groups": {"base_dn": GROUPS, "members_send_as_group": True},
            "mailbox": {"home_root": MAILBOX_HOME, "uid": 5000, "gid": 5000},
            "safety": {
                "max_deletions": 10**6,
                "max_deletion_ratio": 1.0,
                "max_changes": 10**6,
                "max_change_ratio": 1.0,
                # judged per sync: summed over a window, churn deletes and re-adds more keys
                # than an output holds, and a ratio of 1.0 is exceeded
                "window": 0,
            },
            "exporters": [
                {
                    "kind": kind,
                    "name": name,
                    "path": str(setup.maps / name),
                    **({"map_type": mt} if mt else {}),
                    **extra,
                }
                for name, kind, mt, extra in EXPORTERS
            ],
        }
    )
    setup.write_config()
    return setup


def run_once(setup: AgentSetup, root: Path, *, warm: bool = False) -> Path:
    """`ldapsync --once` with the agent's config but a new state dir and output paths: the maps dir.

    `warm`: the state dir and outputs of an earlier call with the same `root` stay (a cron
    site: the run resumes from the sync state the previous one saved)."""
    doc = copy.deepcopy(setup.doc)
    doc["state_dir"] = str(root / "state")
    doc.pop("hooks", None)
    for exp in doc["exporters"]:
        exp["path"] = str(root / "maps" / Path(exp["path"]).name)
    root.mkdir(parents=True, exist_ok=warm)
    config = root / "ldapsync.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "ldapsync", "-c", str(config), "--once", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=str(root),
    )
    assert proc.returncode == 0, f"ldapsync --once rc={proc.returncode}:\n{proc.stderr[-4000:]}"
    for refused in ("could not resume", "saved sync state not usable", "refresh for a cookie failed"):
        assert refused not in proc.stderr, f"ldapsync --once did not resume:\n{proc.stderr[-4000:]}"
    return root / "maps"


def postmap(postfix_dir: Path, *args: str, stdin: str | None = None) -> str:
    """postmap's output; for `-q -` exit status 1 (no key found) is an answer, not a failure."""
    exe = postmap_path()
    assert exe is not None
    proc = subprocess.run(
        [exe, "-c", str(postfix_dir), *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    ok = (0, 1) if "-q" in args else (0,)
    assert proc.returncode in ok, f"postmap {args} rc={proc.returncode}: {proc.stderr}"
    return proc.stdout


def differences(installed: Path, fresh: Path, postfix_dir: Path) -> list[str]:
    """What differs between the agent's outputs and --once's: text byte for byte, compiled maps
    by lookup (`postmap -q`, every key of either plus absent ones), and the agent's compiled maps
    entry for entry against their source (`postmap -s`: a compiled map left from an older sync)."""
    problems: list[str] = []
    for name, _kind, map_type, _extra in EXPORTERS:
        mine, theirs = installed / name, fresh / name
        if not mine.exists():
            problems.append(f"{name}: not installed by the agent")
            continue
        want, got = theirs.read_bytes(), mine.read_bytes()
        if want != got:
            diff = list(
                difflib.unified_diff(
                    want.decode(errors="replace").splitlines(),
                    got.decode(errors="replace").splitlines(),
                    f"--once {name}",
                    f"agent {name}",
                    lineterm="",
                    n=1,
                )
            )
            more = f"\n... {len(diff) - 120} more diff lines" if len(diff) > 120 else ""
            problems.append(f"{name}: agent output differs from --once:\n" + "\n".join(diff[:120]) + more)
        if map_type is None:
            continue
        table = f"{map_type}:{mine}", f"{map_type}:{theirs}"
        if not (mine.parent / (name + COMPILED_SUFFIX[map_type])).exists():
            problems.append(f"{name}: compiled {map_type} map missing")
            continue
        if map_type != "cdb":  # cdb cannot list its entries (no `postmap -s`): lookups only
            dump = sorted(postmap(postfix_dir, "-s", table[0]).splitlines())
            source = sorted(got.decode(errors="replace").splitlines())
            if dump != source:
                diff = difflib.unified_diff(
                    source, dump, f"agent {name}", f"agent {name} (postmap -s)", lineterm="", n=0
                )
                problems.append(
                    f"{name}: the agent's compiled map differs from its source:\n" + "\n".join(list(diff)[:60])
                )
        keys = {line.split("\t", 1)[0] for data in (want, got) for line in data.decode(errors="replace").splitlines()}
        keys |= {"nobody@example.org", "nobody@example.net", "postmaster@example.com"}
        stdin = "\n".join(sorted(keys)) + "\n"
        queries = [postmap(postfix_dir, "-q", "-", t, stdin=stdin).splitlines() for t in table]
        if queries[0] != queries[1]:
            diff = difflib.unified_diff(
                queries[1], queries[0], f"--once {name} (postmap -q)", f"agent {name} (postmap -q)", lineterm="", n=0
            )
            problems.append(f"{name}: lookups differ:\n" + "\n".join(list(diff)[:60]))
    return problems


def cookie_csns(cookie: str | None) -> set[str]:
    found = re.search(r"csn=([^,]*)", cookie or "")
    return set(found.group(1).split(";")) if found else set()


# -- the run ------------------------------------------------------------------------------------
class Soak:
    def __init__(self, seed: int, server: Slapd, setup: AgentSetup, changes_log: Path):
        self.seed = seed
        self.rng = random.Random(seed)
        self.server = server
        self.setup = setup
        self.directory = Directory.read(server)
        self.changes = Changes(self.rng, self.directory)
        self.agents: list[AgentProcess] = []
        self.agent: AgentProcess | None = None
        self.static_sync: tuple[AgentProcess, int] | None = None  # a sync must follow this log position
        self.changes_log = changes_log
        self.log = changes_log.open("w")
        self.applied = 0
        self.compared = 0
        self.began = time.monotonic()

    def context(self) -> str:
        logs = ", ".join(str(a.log_path) for a in self.agents[-3:])
        return (
            f"\nseed {self.seed}: rerun with LDAPSYNC_SOAK_SEED={self.seed} LDAPSYNC_SOAK_CHANGES={CHANGES}"
            f"\nchanges applied: {self.applied}, written to {self.changes_log}\nlast agent logs: {logs}"
        )

    def note(self, text: str) -> None:
        self.log.write(f"# --- {time.monotonic() - self.began:.1f}s: {text}\n\n")
        self.log.flush()

    # -- directory -----------------------------------------------------------------------
    def apply(self, count: int) -> None:
        """count changes: LDAP ones in one ldapmodify run (a burst), a static edit on its own."""
        batch: list[Change] = []
        for _ in range(count):
            change = self.changes.next()
            if change.static is None:
                batch.append(change)
                continue
            self.flush(batch)
            batch = []
            self.edit_static(change.static)
        self.flush(batch)

    def flush(self, batch: list[Change]) -> None:
        if not batch:
            return
        text = "\n".join(c.ldif for c in batch)
        for c in batch:
            self.log.write(f"# {self.applied}: {c.what}\n")
            self.applied += 1
        self.log.write(text + "\n")
        self.log.flush()
        self.server.modify(text)

    def edit_static(self, doc: dict[str, Any]) -> None:
        self.log.write(f"# {self.applied}: static file\n# " + yaml.safe_dump(doc).replace("\n", "\n# ") + "\n")
        self.applied += 1
        agent = self.agent
        if agent is not None:
            # An agent watches the file only from its first sync on ("ready"): an edit after it
            # read the file at start-up but before that is missed (reported; not what this tests).
            agent.wait_log("ready", timeout=CATCH_UP)
        mark = agent.mark() if agent is not None else 0
        self.setup.write_static(doc)
        if agent is not None:
            reloaded = agent.wait_log(
                "configuration reloaded; re-rendering from the directory in memory", since=mark, timeout=CATCH_UP
            )
            self.static_sync = (agent, agent.logs().index(reloaded) + 1)

    # -- the agent -------------------------------------------------------------------------
    def start(self) -> None:
        self.agent = AgentProcess(self.setup.config)
        self.agents.append(self.agent)
        self.static_sync = None  # a new agent reads the static file as it is now
        self.note(f"agent started (log {self.agent.log_path.name})")
        if self.rng.random() < 0.3:
            self.agent.wait_log("ready", timeout=CATCH_UP)

    def stop(self) -> None:
        agent = self.agent
        assert agent is not None
        kill = self.rng.random() < 0.75
        if not kill or self.rng.random() < 0.7:
            # following, not still starting up (SIGTERM before Python got to the handler kills)
            agent.wait_log("sync done", timeout=CATCH_UP)
        time.sleep(self.rng.choice([0.0, 0.0, 0.02, 0.1, 0.3]))  # often in the middle of a sync
        if kill:
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait()
            self.note("agent killed (SIGKILL)")
        else:
            rc, _ = agent.terminate(timeout=CATCH_UP)
            assert rc == 0, f"SIGTERM: agent exited {rc}:\n{agent.tail()}" + self.context()
            self.note("agent stopped (SIGTERM)")
        agent.close()
        self.agent = None

    def caught_up(self) -> bool:
        """The agent installed everything the directory holds: its saved cookie (written after each
        sync, with the snapshot it installed) carries slapd's contextCSN, and a static edit was synced."""
        agent = self.agent
        assert agent is not None
        if not agent.alive:
            raise AssertionError(f"agent exited rc={agent.proc.returncode}:\n{agent.tail()}" + self.context())
        if self.static_sync is not None:
            static_agent, position = self.static_sync
            if static_agent is agent and not agent.find("sync done", since=position):
                return False
        csns = set(self.server.context_csn())
        return bool(csns) and csns <= cookie_csns(self.setup.saved_cookie())

    def compare(self, tag: str) -> None:
        if self.agent is None:
            self.start()
        self.note(f"waiting for the agent to catch up ({tag})")
        try:
            wait_until(self.caught_up, CATCH_UP, interval=0.05, what="the agent to install slapd's contextCSN")
        except AssertionError as e:
            raise AssertionError(
                f"{e}\ncontextCSN {self.server.context_csn()}, saved cookie {self.setup.saved_cookie()!r}\n"
                f"{self.agent.tail() if self.agent else ''}" + self.context()
            ) from None
        held = status_mod.load(self.setup.state).held
        assert held is None, f"the agent held a change: {held}" + self.context()
        self.compared += 1
        self.note(f"caught up; comparing with --once ({tag})")
        fresh = run_once(self.setup, self.setup.root.parent / f"once-{self.compared}")
        self.note("--once done")
        problems = differences(self.setup.maps, fresh, self.setup.postfix_dir)
        self.note("compared")
        assert not problems, f"after {self.applied} changes ({tag}):\n" + "\n\n".join(problems) + self.context()
        # a cron site kept across the comparisons: its --once resumes from the previous one's cookie
        warm = run_once(self.setup, self.setup.root.parent / "once-warm", warm=True)
        problems = differences(warm, fresh, self.setup.postfix_dir)
        self.note("compared the resuming --once")
        assert not problems, (
            f"resuming --once after {self.applied} changes ({tag}):\n" + "\n\n".join(problems) + self.context()
        )
        shutil.rmtree(fresh.parent)

    def run(self, total: int) -> None:
        stops = sorted(self.rng.sample(range(1, total), min(total - 1, max(1, round(total / STOP_EVERY)))))
        compares = sorted(self.rng.sample(range(1, total), min(total - 1, max(1, total // COMPARE_EVERY))))
        self.start()
        while self.applied < total:
            if compares and compares[0] <= self.applied:  # a burst may have stepped over the point
                compares.pop(0)
                self.compare("mid-run")
            if stops and stops[0] <= self.applied:
                stops.pop(0)
                self.stop()
                down = self.rng.choice([0, 0, 1, 3, 8])  # changes the restart must resume by cookie
                self.apply(min(down, total - self.applied))
                self.start()
            burst = self.rng.choice([1, 1, 1, 1, 2, 3, 6])
            self.apply(min(burst, total - self.applied))
            time.sleep(self.rng.choice([0.0, 0.0, 0.005, 0.02, 0.05, 0.15]))
        self.compare("end")

    def close(self) -> None:
        for agent in self.agents:
            agent.close()
        self.log.close()

    def errors(self) -> list[dict[str, Any]]:
        """Errors ldapsync logged, but for finding what a kill -9 left behind; those and the
        errors of libraries it uses (their own loggers) are printed."""
        errors = [r for a in self.agents for r in a.errors()]
        tolerated = [r for r in errors if r.get("event") in CRASH_RECOVERY or _foreign(r)]
        if tolerated:
            print(f"{len(tolerated)} tolerated error logs:", *sorted({str(r["event"]) for r in tolerated}), sep="\n  ")
        return [r for r in errors if r not in tolerated]


def _foreign(record: dict[str, Any]) -> bool:
    logger = record.get("logger")
    return isinstance(logger, str) and not logger.startswith("ldapsync")


@pytest.fixture
def soak_slapd(slapd_factory: Callable[..., Slapd]) -> Slapd:
    users = generate_users_ldif(USERS_AT_START).replace(
        "objectClass: ldapsyncMailAccount\n", "objectClass: ldapsyncMailAccount\nobjectClass: inetLocalMailRecipient\n"
    )
    files = (BASE_LDIF, DEMO_LDIF, HOSTILE_LDIF, FIXTURES / "groups.ldif", FIXTURES / "domains.ldif")
    return slapd_factory(ldif_files=files, extra_ldif=users)


@pytest.fixture
def seed() -> int:
    value = int(SEED_ENV) if SEED_ENV else random.SystemRandom().randrange(2**32)
    print(f"soak seed {value} (LDAPSYNC_SOAK_SEED={value} LDAPSYNC_SOAK_CHANGES={CHANGES})")
    return value


def test_agent_survives_churn_and_crashes_and_ends_as_once_does(soak_slapd: Slapd, tmp_path: Path, seed: int) -> None:
    setup = soak_setup(tmp_path / "agent", soak_slapd)
    soak = Soak(seed, soak_slapd, setup, tmp_path / "soak-changes.ldif")
    try:
        soak.run(CHANGES)
        errors = soak.errors()
        assert not errors, f"the agent logged errors: {errors[:10]}" + soak.context()
    finally:
        soak.close()
