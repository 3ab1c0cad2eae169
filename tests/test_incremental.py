"""incremental: the model kept up to date per change equals a full build of the final directory."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples

from ldapsync import routing, schema
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry, sort_entries
from ldapsync.errors import ConfigError
from ldapsync.mirror import Mirror, compact
from ldapsync.routing import ADDRESS_TABLES, LOGIN_TABLES, Engine, Settings
from ldapsync.static import Static, StaticEntry
from ldapsync.validate import RETIRING_GRACE

DOMAIN = "example.org"
TODAY = date(2026, 11, 21)
OU = "ou=users,dc=example,dc=org"
GOU = "ou=groups,dc=example,dc=org"
SSHA = "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ=="
WEAK = "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="
ATTRS = replace(
    schema.PRESETS["ud-ldap"],
    alias="mailLocalAddress",
    uid_number="uidNumber",
    gid_number="gidNumber",
    home="homeDirectory",
    extra=("objectClass", "cn", "member", "rfc822MailMember", "mail", "mailPrimaryAddress"),
)
STATIC = Static(
    Path("/etc/ldapsync/mail.yaml"),
    (
        StaticEntry("postmaster@example.org", ("a@example.org", "root@ext.example"), "aliases.postmaster"),
        StaticEntry("team@example.org", ("b@example.org", "c@example.org"), "aliases.team"),
        # dead targets: any of these may be disabled, retired, unknown or forward to dead ones
        StaticEntry("hostmaster@example.org", ("e@example.org", "f@example.org", "ghost@example.org"), "aliases.h"),
    ),
    (
        StaticEntry("d@example.org", ("d@ext.example",), "forwards.d"),
        StaticEntry("orders@example.org", ("x@example.org",), "forwards.orders"),
    ),
)

# Small pools: conflicts, loops and shared names are the point.
LOGINS = ("a", "b", "c", "d", "e", "f", "Bad Login")
LOCAL = tuple(f"{n}@example.org" for n in ("a", "b", "c", "d", "e", "f", "team", "postmaster", "x", "y", "orders"))
FOREIGN = ("a@ext.example", "b@ext.example", "A@Example.NET", "root@ext.example")
STATUS = (
    "inactive",
    "memorial 2001",
    "retiring 2099-01-01",
    f"retiring {TODAY - RETIRING_GRACE}",
    "bogus",
)  # the last-but-one: retired from the next day on
STAMPS = ("20200101000000Z", "20210101000000Z", "20210101000000.5Z", "garbage")

addresses = st.sampled_from(LOCAL + FOREIGN)


@st.composite
def account(draw: Any) -> dict[str, list[str]]:
    attrs: dict[str, list[str]] = {"objectClass": ["inetOrgPerson"]}
    if draw(st.integers(0, 9)):
        attrs["uid"] = draw(st.lists(st.sampled_from(LOGINS), min_size=1, max_size=2 if draw(st.booleans()) else 1))
    if draw(st.booleans()):
        attrs["emailForward"] = draw(
            st.lists(st.one_of(addresses, st.just("a@example.org, b@ext.example")), max_size=3)
        )
    if draw(st.booleans()):
        attrs["mailLocalAddress"] = draw(st.lists(st.sampled_from((*LOCAL, "z@ext.example", "bad addr")), max_size=3))
    if draw(st.booleans()):  # own addresses (with `address: mail`), in hosted and alias domains
        own = (*LOCAL[:4], "a@example.com", "b@example.biz", "z@ext.example")
        attrs["mail"] = draw(st.lists(st.sampled_from(own), max_size=3))
        if draw(st.booleans()):
            attrs["mailPrimaryAddress"] = draw(st.lists(st.sampled_from(own), min_size=1, max_size=2))
    if draw(st.booleans()):
        attrs["mailPassword"] = [draw(st.sampled_from((SSHA, WEAK, "plaintext")))]
    if draw(st.integers(0, 3)) == 0:
        attrs["accountStatus"] = [draw(st.sampled_from(STATUS))]
    if draw(st.integers(0, 5)) == 0:
        attrs["mailDisableMessage"] = [draw(st.sampled_from(("gone", "bad\nmessage")))]
    if draw(st.booleans()):
        attrs["createTimestamp"] = [draw(st.sampled_from(STAMPS))]
    if draw(st.booleans()):
        attrs["uidNumber"] = [draw(st.sampled_from(("2000", "5", "x")))]
        attrs["homeDirectory"] = [draw(st.sampled_from(("/srv/mail/u", "/etc", "/srv/mail/../x")))]
    return {k: v for k, v in attrs.items() if v}


@st.composite
def group(draw: Any) -> dict[str, list[str]]:
    dns = [f"uid={n},{OU}" for n in ("u0", "u1", "u2", "u3")] + [f"cn={n},{GOU}" for n in ("g0", "g1")]
    attrs = {
        "objectClass": [draw(st.sampled_from(("groupOfNames", "nisMailAlias")))],
        "cn": draw(st.lists(st.sampled_from(("team", "staff", "a", "x")), min_size=1, max_size=2)),
        "member": draw(st.lists(st.sampled_from(dns), max_size=3)),
        "rfc822MailMember": draw(st.lists(st.sampled_from(("y", "b@ext.example", "staff", "e", "ghost")), max_size=2)),
    }
    return {k: v for k, v in attrs.items() if v}


def make(dn: str, uuid: str, attrs: dict[str, list[str]]) -> Entry:
    raw = {k: [v.encode() for v in vs] for k, vs in attrs.items()}
    return compact(make_entry(dn, raw, ATTRS.ldap_attributes(), [], uuid=uuid))


@st.composite
def step(draw: Any) -> tuple[str, Any]:
    op = draw(st.sampled_from(("add", "add", "add_group", "modify", "modrdn", "delete", "batch", "day")))
    if op == "add":
        return op, (draw(st.sampled_from(("u0", "u1", "u2", "u3", "u4"))), draw(account()))
    if op == "add_group":
        return op, (draw(st.sampled_from(("g0", "g1", "g2"))), draw(group()))
    if op == "modify":
        return op, (draw(st.integers(0, 50)), draw(account()))
    if op == "modrdn":
        return op, (draw(st.integers(0, 50)), draw(st.sampled_from(("u0", "u1", "u5", "u6"))))
    if op == "delete":
        return op, draw(st.integers(0, 50))
    if op == "batch":
        return op, draw(st.lists(st.tuples(st.sampled_from(("u7", "u8")), account()), min_size=2, max_size=4))
    return op, None


def config(draw: Any) -> tuple[Settings, Static]:
    hosted = {"example.com": ("example.biz",)} if draw(st.booleans()) else {}
    attrs = replace(ATTRS, address="mail", primary_address="mailPrimaryAddress") if draw(st.booleans()) else ATTRS
    groups = (
        routing.GroupSettings(base_dn=GOU, members_send_as_group=draw(st.booleans()))
        if draw(st.integers(0, 3))
        else None
    )
    mailbox = routing.MailboxSettings(home="/srv/mail/{login}", home_root="/srv/mail", uid=3000, gid=3000)
    s = Settings(
        domain=DOMAIN,
        domain_aliases=("example.net",) if draw(st.booleans()) else (),
        attributes=attrs,
        weak_passwords=draw(st.sampled_from(("warn", "refuse"))),
        hosted=hosted,
        groups=groups,
        mailbox=mailbox if draw(st.booleans()) else None,
        login_by_address=draw(st.booleans()),
    )
    return s, STATIC if draw(st.booleans()) else Static()


def tables(m: routing.RoutingModel) -> dict[str, dict[str, Any]]:
    return {name: dict(sorted(getattr(m, name).items())) for name in (*ADDRESS_TABLES, *LOGIN_TABLES)}


def problems(
    report: routing.BuildReport,
) -> tuple[Counter[Rejection], Counter[str], Counter[Rejection], tuple[int, ...]]:
    return (
        Counter(report.rejections),
        Counter(report.warnings),
        Counter(report.notices),
        (report.retired, report.skipped, report.weak_passwords),
    )


def check(engine: Engine, snapshot: Snapshot, today: date, *, via_delta: bool = False) -> None:
    try:
        full, full_report = routing.build(snapshot, engine.static, engine.settings, today)
    except ConfigError as e:
        with pytest.raises(ConfigError) as raised:
            engine.update(snapshot, today)
        assert str(raised.value) == str(e)
        return
    before = tables(engine._model) if engine._model is not None else None
    routed, report, change = engine.update(snapshot, today)
    if via_delta and before is not None:
        assert engine._seen is not None  # the mirror's delta was taken, not a scan of every entry
    assert tables(routed) == tables(full)
    assert problems(report) == problems(full_report)
    if before is not None and not change.full:  # every key that moved is named in the change
        after = tables(routed)
        for name in ADDRESS_TABLES:
            moved = {k for k in before[name].keys() | after[name].keys() if before[name].get(k) != after[name].get(k)}
            assert moved <= change.addresses, name
        for name in LOGIN_TABLES:
            moved = {k for k in before[name].keys() | after[name].keys() if before[name].get(k) != after[name].get(k)}
            assert moved <= change.logins, name


class Live:
    """The directory a sequence of step()s makes: entries by key, and the day."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.today = TODAY
        self._counter = 0

    def _new_key(self) -> str:
        self._counter += 1
        return f"id{self._counter}"

    def apply(self, op: str, arg: Any) -> bool:
        """Make one step; False if it changed nothing (a modification with no entry yet)."""
        live = self.entries
        keys = sorted(live)
        if op in ("add", "add_group"):
            name, attrs = arg
            dn = f"uid={name},{OU}" if op == "add" else f"cn={name},{GOU}"
            key = self._new_key()
            live[key] = make(dn, key, attrs)
        elif op == "batch":
            for name, attrs in arg:
                key = self._new_key()
                live[key] = make(f"uid={name},{OU}", key, attrs)
        elif op == "day":
            self.today += timedelta(days=1)
        elif not keys:
            return False
        elif op == "modify":
            key = keys[arg[0] % len(keys)]
            old = live[key]
            attrs = arg[1] if old.dn.endswith(OU) else {k: list(v) for k, v in old.attributes.items()}
            if not old.dn.endswith(OU):
                attrs["member"] = attrs.get("member", [])[1:]  # a group loses a member
            live[key] = make(old.dn, key, attrs)
        elif op == "modrdn":
            key = keys[arg[0] % len(keys)]
            old = live[key]
            live[key] = Entry(f"uid={arg[1]},{OU}", old.attributes, key)
        else:
            del live[keys[arg % len(keys)]]
        return True


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_incremental_model_equals_a_full_build_after_any_sequence_of_changes(data: Any) -> None:
    conf, static = config(data.draw)
    engine = Engine(conf, static)
    mirrored = Engine(conf, static)  # fed by a Mirror: told what changed instead of comparing
    mirror = Mirror()
    upserted: dict[str, Entry] = {}
    directory = Live()
    live = directory.entries
    check(engine, Snapshot((), "test"), directory.today)
    check(mirrored, mirror.snapshot()[0], directory.today)
    for op, arg in data.draw(st.lists(step(), min_size=1, max_size=14)):
        if not directory.apply(op, arg):
            continue
        today = directory.today
        check(engine, Snapshot(sort_entries(live.values()), "test"), today)
        for key in mirror.keys() - live.keys():
            mirror.delete(key)
        for key, e in live.items():
            if upserted.get(key) is not e:
                raw = {k: [v.encode() for v in vs] for k, vs in e.attributes.items()}
                mirror.upsert(key, e.dn, raw, ATTRS.ldap_attributes())
                upserted[key] = e
        check(mirrored, mirror.snapshot()[0], today, via_delta=True)


def test_a_single_change_rebuilds_only_its_component() -> None:
    """One forward changed among many unrelated accounts: no full build, one key reported."""
    engine = Engine(Settings(DOMAIN, (), ATTRS), Static())
    users = {f"id{i}": make(f"uid=user{i},{OU}", f"id{i}", {"uid": [f"user{i}"]}) for i in range(200)}
    engine.update(Snapshot(sort_entries(users.values()), "test"), TODAY)
    assert engine.last_full
    users["id7"] = make(f"uid=user7,{OU}", "id7", {"uid": ["user7"], "emailForward": ["x@ext.example"]})
    routed, _, change = engine.update(Snapshot(sort_entries(users.values()), "test"), TODAY)
    assert not engine.last_full
    assert routed.forwards == {"user7@example.org": ("x@ext.example",)}
    assert change.addresses == {"user7@example.org"} and change.logins == {"user7"}


def test_an_alias_taken_by_a_new_entry_rebuilds_the_older_claimant_too() -> None:
    """The older entry keeps a contested alias whichever of the two changes last."""
    engine = Engine(Settings(DOMAIN, (), ATTRS), Static())
    older = make(
        f"uid=old,{OU}", "id1", {"uid": ["old"], "mailLocalAddress": ["x@example.org"], "createTimestamp": [STAMPS[0]]}
    )
    entries = {"id1": older}
    for i in range(100):
        entries[f"n{i}"] = make(f"uid=n{i},{OU}", f"n{i}", {"uid": [f"n{i}"]})
    engine.update(Snapshot(sort_entries(entries.values()), "test"), TODAY)
    newer = make(
        f"uid=aaa,{OU}", "id2", {"uid": ["aaa"], "mailLocalAddress": ["x@example.org"], "createTimestamp": [STAMPS[1]]}
    )
    entries["id2"] = newer
    routed, report, _ = engine.update(Snapshot(sort_entries(entries.values()), "test"), TODAY)
    assert not engine.last_full
    assert routed.aliases["x@example.org"] == ("old@example.org",)
    assert any(r.dn == newer.dn and "already claimed" in r.reason for r in report.rejections)
    del entries["id1"]
    routed, report, change = engine.update(Snapshot(sort_entries(entries.values()), "test"), TODAY)
    assert routed.aliases["x@example.org"] == ("aaa@example.org",)
    assert "x@example.org" in change.addresses
    assert not any("already claimed" in r.reason for r in report.rejections)


def test_a_new_day_rebuilds_everything() -> None:
    """Retirement dates are relative to today: a new day is a full build."""
    engine = Engine(Settings(DOMAIN, (), ATTRS), Static())
    tomorrow = TODAY + timedelta(days=1)
    e = make(f"uid=r,{OU}", "id1", {"uid": ["r"], "accountStatus": [f"retiring {TODAY - RETIRING_GRACE}"]})
    snapshot = Snapshot((e,), "test")
    routed, _, _ = engine.update(snapshot, TODAY)
    assert "r@example.org" in routed.users
    routed, _, change = engine.update(snapshot, tomorrow)
    assert change.full and "r@example.org" not in routed.users
