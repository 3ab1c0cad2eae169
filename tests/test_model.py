"""model: which address goes where, who may send as what; a pure function of its inputs."""

from __future__ import annotations

import base64
import random
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from ldapsync import routing, schema
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry
from ldapsync.errors import ConfigError
from ldapsync.exporters import exporter_class
from ldapsync.static import Static, StaticEntry

DOMAIN = "example.org"
ALIASES = ("host1.example.org", "example.net")
TODAY = date(2026, 11, 21)
UD = schema.PRESETS["ud-ldap"]
ILMR = schema.PRESETS["inetlocalmailrecipient"]
SSHA = "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ=="
STATIC_FILE = Path("/etc/ldapsync/mail.yaml")
OU = "ou=users,dc=example,dc=org"


def entry(uid: str, **attrs: str | list[str]) -> Entry:
    raw = {k: [v] if isinstance(v, str) else v for k, v in attrs.items()}
    rejections: list[Rejection] = []
    e = make_entry(f"uid={uid},ou=users,dc=example,dc=org", {"uid": [uid], **raw}, None, rejections)
    assert not rejections
    return e


def build(
    *entries: Entry,
    static: Static | None = None,
    attributes: schema.AttributeMap = UD,
    domain_aliases: tuple[str, ...] = ALIASES,
) -> tuple[routing.RoutingModel, routing.BuildReport]:
    return routing.build(
        Snapshot(tuple(entries), "test"),
        static or Static(),
        routing.Settings(domain=DOMAIN, domain_aliases=domain_aliases, attributes=attributes),
        TODAY,
    )


def static_of(aliases: dict[str, list[str]] | None = None, forwards: dict[str, str] | None = None) -> Static:
    def addr(name: str) -> str:
        return name if "@" in name else f"{name}@{DOMAIN}"

    return Static(
        STATIC_FILE,
        tuple(StaticEntry(addr(n), tuple(addr(t) for t in ts), f"aliases.{n}") for n, ts in (aliases or {}).items()),
        tuple(StaticEntry(addr(n), (t,), f"forwards.{n}") for n, t in (forwards or {}).items()),
    )


def render_all(m: routing.RoutingModel) -> dict[str, bytes]:
    options = {"postfix-transport": {"nexthop": "smtp:[srs.example.org]"}}
    kinds = [
        "postfix-virtual",
        "postfix-transport",
        "postfix-recipients",
        "postfix-sender-login",
        "postfix-access",
        "dovecot-passwd",
    ]
    return {k: exporter_class(k)(options.get(k, {})).render(m) for k in kinds}


def test_plain_user_is_deliverable_in_every_domain_and_can_log_in() -> None:
    m, report = build(entry("alice", mailPassword=SSHA))
    assert m.users == {"alice@example.org": "alice"}
    assert m.passwords == {"alice": SSHA}
    assert m.variants("alice@example.org") == ["alice@example.org", "alice@host1.example.org", "alice@example.net"]
    assert m.domain_rewrites() == {
        "alice@host1.example.org": "alice@example.org",
        "alice@example.net": "alice@example.org",
    }
    assert m.sender_logins == {"alice@example.org": ("alice",)}
    assert m.forwards == {} and m.aliases == {} and m.disabled == {}
    assert report.rejections == []


def test_logins_are_case_folded() -> None:
    m, _ = build(entry("Alice", mailPassword=SSHA))
    assert m.users == {"alice@example.org": "alice"}
    assert m.passwords == {"alice": SSHA}


def test_forwards_single_multi_valued_and_comma_separated() -> None:
    m, report = build(
        entry("bob", emailForward="Bob@Elsewhere.EXAMPLE"),
        entry("carol", emailForward=["carol@two.example", "carol@one.example"]),
        entry("dave", emailForward="dave@a.example, dave@b.example,,"),
        entry("erin", emailForward="erin@x.example,erin@x.example"),
    )
    assert m.forwards == {
        "bob@example.org": ("Bob@elsewhere.example",),
        "carol@example.org": ("carol@one.example", "carol@two.example"),
        "dave@example.org": ("dave@a.example", "dave@b.example"),
        "erin@example.org": ("erin@x.example",),
    }
    assert report.rejections == []
    # forwarded users are still accounts: recipients, sender logins
    assert set(m.users) == {"bob@example.org", "carol@example.org", "dave@example.org", "erin@example.org"}


def test_forward_to_local_user_is_canonicalised() -> None:
    m, _ = build(entry("alice"), entry("erin", emailForward=["Alice@EXAMPLE.NET", "alice@host1.example.org"]))
    assert m.forwards == {"erin@example.org": ("alice@example.org",)}


def test_bad_forward_value_is_dropped_with_dn_and_attribute() -> None:
    m, report = build(entry("h", emailForward="good@x.example, bad@@evil..example, |/bin/sh"))
    assert m.forwards == {"h@example.org": ("good@x.example",)}
    assert [(r.dn, r.attribute) for r in report.rejections] == [
        ("uid=h,ou=users,dc=example,dc=org", "emailForward")
    ] * 2
    assert "bad@@evil..example" in report.rejections[0].reason


def test_self_forward_keeps_a_copy() -> None:
    m, report = build(entry("alice", emailForward="alice@example.org, alice@elsewhere.example"))
    assert m.forwards == {"alice@example.org": ("alice@elsewhere.example", "alice@example.org")}
    assert report.rejections == []


def test_disabled_account_only_in_the_access_map() -> None:
    m, _ = build(
        entry("dora", mailDisableMessage="Gone, ask admin@example.org", emailForward="d@x.example", mailPassword=SSHA),
        entry("dan", mailDisableMessage="two\nlines OK"),
    )
    assert m.disabled == {
        "dora@example.org": "Gone, ask admin@example.org",
        "dan@example.org": "This address is disabled",
    }
    assert m.users == {} and m.forwards == {} and m.passwords == {} and m.sender_logins == {}
    out = render_all(m)
    assert out["postfix-access"].decode().splitlines() == [
        "dan@example.net\tREJECT This address is disabled",
        "dan@example.org\tREJECT This address is disabled",
        "dan@host1.example.org\tREJECT This address is disabled",
        "dora@example.net\tREJECT Gone, ask admin@example.org",
        "dora@example.org\tREJECT Gone, ask admin@example.org",
        "dora@host1.example.org\tREJECT Gone, ask admin@example.org",
    ]
    for kind, data in out.items():
        if kind != "postfix-access":
            assert b"dora" not in data and b"dan" not in data, kind


@pytest.mark.parametrize(
    "status", ["inactive", "memorial", "retiring 2020-01-01", "retiring 2026-05-01", "inactive 2019"]
)
def test_retired_accounts_are_out_of_everything(status: str) -> None:
    m, report = build(
        entry("oscar", accountStatus=status, emailForward="o@x.example", mailPassword=SSHA, mailDisableMessage="x")
    )
    assert report.retired == 1
    assert all(data == b"" for data in render_all(m).values())


@pytest.mark.parametrize(
    "status", ["retiring 2099-01-01", "retiring 2026-06-01", "retiring", "retiring soon", "active"]
)
def test_not_yet_retired_accounts_stay(status: str) -> None:
    m, report = build(entry("ray", accountStatus=status, mailPassword=SSHA))
    assert report.retired == 0
    assert m.users == {"ray@example.org": "ray"} and "ray" in m.passwords


def test_retired_address_can_be_reused_by_a_later_login() -> None:
    old = Entry("uid=rita,ou=old,dc=example,dc=org", {"uid": ("rita",), "accountstatus": ("memorial",)})
    m, report = build(old, entry("rita"))
    assert m.users == {"rita@example.org": "rita"} and report.rejections == []


def test_duplicate_login_first_dn_wins_and_the_other_is_reported() -> None:
    a = Entry("uid=sam,ou=a,dc=example,dc=org", {"uid": ("sam",), "mailpassword": (SSHA,)})
    b = Entry("uid=SAM,ou=b,dc=example,dc=org", {"uid": ("SAM",), "emailforward": ("evil@x.example",)})
    for order in ((a, b), (b, a)):
        m, report = build(*order)
        assert m.users == {"sam@example.org": "sam"}
        assert m.forwards == {}, "the second entry must not add a forward to the first one's address"
        assert [r.dn for r in report.rejections] == [b.dn]
        assert "already used by uid=sam,ou=a" in report.rejections[0].reason


def test_invalid_and_multi_valued_logins_skip_the_entry() -> None:
    bad = Entry("uid=bad user,ou=users,dc=example,dc=org", {"uid": ("bad user",), "mailpassword": (SSHA,)})
    multi = Entry("cn=two,ou=users,dc=example,dc=org", {"uid": ("a", "b")})
    none = Entry("cn=nologin,ou=users,dc=example,dc=org", {"cn": ("x",)})
    m, report = build(bad, multi, none)
    assert m.users == {} and m.passwords == {}
    assert {(r.dn, r.attribute) for r in report.rejections} == {(bad.dn, "uid"), (multi.dn, "uid")}
    assert report.skipped == 1


def test_bad_password_rejected_account_kept() -> None:
    m, report = build(entry("p", mailPassword="{PLAIN}hunter2"), entry("q", mailPassword=[SSHA, "{SSHA}x"]))
    assert set(m.users) == {"p@example.org", "q@example.org"}
    assert m.passwords == {}
    assert [(r.dn.split(",")[0], r.attribute) for r in report.rejections] == [
        ("uid=p", "mailPassword"),
        ("uid=q", "mailPassword"),
    ]
    assert all("hunter2" not in str(r) for r in report.rejections)


def test_ldap_aliases_with_inetlocalmailrecipient() -> None:
    m, report = build(
        entry("frank", mailLocalAddress=["frank.smith@example.org", "Frank.S@example.net", "frank@example.org"]),
        entry("grace", mailLocalAddress="grace.hopper@example.org", mailRoutingAddress="grace@elsewhere.example"),
        entry("mallory", mailLocalAddress=["frank@example.org", "x@other.example", "frank.smith@example.org"]),
        attributes=ILMR,
    )
    assert m.aliases == {
        "frank.s@example.org": ("frank@example.org",),
        "frank.smith@example.org": ("frank@example.org",),
        "grace.hopper@example.org": ("grace@example.org",),
    }
    assert m.forwards == {"grace@example.org": ("grace@elsewhere.example",)}
    # Sender logins: an alias that delivers to you is yours; a forward target is not.
    assert m.sender_logins["frank.smith@example.org"] == ("frank",)
    assert m.sender_logins["grace.hopper@example.org"] == ("grace",)
    assert "grace@elsewhere.example" not in m.sender_logins
    # frank listing his own address is harmless; mallory's hijack attempts are refused, naming her DN.
    mallory = "uid=mallory,ou=users,dc=example,dc=org"
    assert sorted(str(r) for r in report.rejections) == sorted(
        [
            f"{mallory}: mailLocalAddress: 'x@other.example' is not in example.org; value dropped",
            f"{mallory}: mailLocalAddress: frank.smith@example.org already claimed by uid=frank,{OU}"
            " (first in DN order: no createTimestamp); value dropped",
            f"{mallory}: mailLocalAddress: frank@example.org is the address of uid=frank,ou=users,dc=example,dc=org;"
            " value dropped",
        ]
    )
    assert m.users["frank@example.org"] == "frank"
    assert "frank@example.org" not in m.aliases


def test_static_wins_over_ldap_with_a_warning_naming_both() -> None:
    st = static_of(aliases={"alice": ["bob"], "info": ["bob"]}, forwards={"dora": "dora@new.example"})
    m, report = build(
        entry("alice", emailForward="alice@elsewhere.example"),
        entry("bob"),
        entry("dora", mailDisableMessage="gone"),
        static=st,
    )
    assert m.aliases == {"alice@example.org": ("bob@example.org",), "info@example.org": ("bob@example.org",)}
    assert m.forwards == {"dora@example.org": ("dora@new.example",)}
    assert m.disabled == {}
    assert sorted(report.warnings) == [
        f"{STATIC_FILE}: aliases.alice overrides alice@example.org from LDAP entry uid=alice,{OU}",
        f"{STATIC_FILE}: forwards.dora overrides dora@example.org from LDAP entry uid=dora,{OU}",
    ]


def test_static_alias_overrides_ldap_alias() -> None:
    st = static_of(aliases={"frank.smith": ["alice"]})
    m, report = build(
        entry("alice"), entry("frank", mailLocalAddress="frank.smith@example.org"), static=st, attributes=ILMR
    )
    assert m.aliases == {"frank.smith@example.org": ("alice@example.org",)}
    assert m.sender_logins["frank.smith@example.org"] == ("alice",)
    assert len(report.warnings) == 1 and "uid=frank" in report.warnings[0]


def test_ldap_forward_loop_is_dropped_with_the_dn() -> None:
    m, report = build(
        entry("a", emailForward="b@example.org"),
        entry("b", emailForward="c@example.net"),
        entry("c", emailForward="a@example.org"),
        entry("d", emailForward="a@example.org"),
    )
    assert m.forwards == {"d@example.org": ("a@example.org",)}
    loops = [r for r in report.rejections if "loop" in r.reason]
    assert sorted(r.dn for r in loops) == [f"uid={x},ou=users,dc=example,dc=org" for x in "abc"]
    assert all(r.attribute == "emailForward" for r in loops)
    assert "a@example.org, b@example.org, c@example.org" in loops[0].reason


def test_mixed_loop_drops_only_the_ldap_edge() -> None:
    st = static_of(aliases={"team": ["alice"]})
    m, report = build(entry("alice", emailForward="team@example.org"), static=st)
    assert m.aliases == {"team@example.org": ("alice@example.org",)}
    assert m.forwards == {}
    assert [(r.dn, r.attribute) for r in report.rejections] == [
        ("uid=alice,ou=users,dc=example,dc=org", "emailForward")
    ]


def test_static_only_loop_is_a_config_error_naming_the_keys() -> None:
    st = static_of(aliases={"x": ["y"], "y": ["x"]})
    with pytest.raises(ConfigError) as info:
        build(static=st)
    assert info.value.file == str(STATIC_FILE)
    assert info.value.key == "aliases.x, aliases.y"
    assert "alias loop" in info.value.message


def test_sender_logins_follow_aliases_not_forwards() -> None:
    st = static_of(aliases={"postmaster": ["alice", "bob"], "abuse": ["postmaster"], "ext": ["x@elsewhere.example"]})
    m, _ = build(
        entry("alice"),
        entry("bob", emailForward="bob@elsewhere.example"),
        entry("erin", emailForward="alice@example.org"),  # erin forwards to alice: alice may NOT send as erin
        static=st,
    )
    assert m.sender_logins == {
        "abuse@example.org": ("alice", "bob"),
        "alice@example.org": ("alice",),
        "bob@example.org": ("bob",),
        "erin@example.org": ("erin",),
        "postmaster@example.org": ("alice", "bob"),
    }
    lines = render_all(m)["postfix-sender-login"].decode().splitlines()
    assert "abuse@example.net\talice,bob" in lines and "erin@host1.example.org\terin" in lines
    assert not any(line.startswith("ext@") for line in lines)


def test_alias_domains_produce_variants_in_every_map() -> None:
    m, _ = build(
        entry("alice", mailPassword=SSHA),
        entry("bob", emailForward="bob@elsewhere.example"),
        entry("dora", mailDisableMessage="gone"),
        static=static_of(aliases={"postmaster": ["alice"]}),
    )
    out = {k: v.decode().splitlines() for k, v in render_all(m).items()}
    assert out["postfix-virtual"] == [
        "alice@example.net\talice@example.org",
        "alice@host1.example.org\talice@example.org",
        "bob@example.net\tbob@example.org",
        "bob@example.org\tbob@elsewhere.example",
        "bob@host1.example.org\tbob@example.org",
        "postmaster@example.net\tpostmaster@example.org",
        "postmaster@example.org\talice@example.org",
        "postmaster@host1.example.org\tpostmaster@example.org",
    ]
    assert out["postfix-recipients"] == [
        f"{local}@{d}\tOK"
        for local in ("alice", "bob", "postmaster")
        for d in ("example.net", "example.org", "host1.example.org")
    ]
    assert out["postfix-transport"] == ["bob@example.org\tsmtp:[srs.example.org]"]  # canonical only: rewritten first
    assert out["postfix-access"] == [
        f"dora@{d}\tREJECT gone" for d in ("example.net", "example.org", "host1.example.org")
    ]
    assert len(out["postfix-sender-login"]) == 9
    assert out["dovecot-passwd"] == [f"alice:{SSHA}"]


def test_without_alias_domains_there_are_no_rewrites() -> None:
    m, _ = build(entry("alice"), domain_aliases=())
    assert m.domain_rewrites() == {}
    assert render_all(m)["postfix-virtual"] == b""
    assert render_all(m)["postfix-recipients"] == b"alice@example.org\tOK\n"


def test_output_is_byte_identical_whatever_the_entry_and_value_order() -> None:
    entries = [
        entry("alice", mailPassword=SSHA),
        entry("bob", emailForward=["b2@x.example", "b1@x.example"]),
        entry("frank", mailLocalAddress=["f1@example.org", "f2@example.org"]),
        entry("mallory", mailLocalAddress=["f1@example.org", "m@example.org"]),
        Entry("uid=dup,ou=b,dc=example,dc=org", {"uid": ("dup",), "emailforward": ("b@x.example",)}),
        Entry("uid=dup,ou=a,dc=example,dc=org", {"uid": ("dup",), "emailforward": ("a@x.example",)}),
        Entry("uid=Dup,ou=a,dc=example,dc=org", {"uid": ("dup",), "emailforward": ("c@x.example",)}),
        entry("dora", mailDisableMessage=["b message", "a message"]),
    ]
    attrs = schema.resolve("ud-ldap", {"alias": "mailLocalAddress"}, file=None)
    reference = render_all(build(*entries, attributes=attrs)[0])
    rng = random.Random(4)
    for _ in range(20):
        shuffled = []
        for e in rng.sample(entries, len(entries)):
            attrs_shuffled = {k: tuple(rng.sample(v, len(v))) for k, v in e.attributes.items()}
            shuffled.append(Entry(e.dn, attrs_shuffled, e.uuid))
        assert render_all(build(*shuffled, attributes=attrs)[0]) == reference
    assert (
        b"dup@example.org\tc@x.example" in reference["postfix-virtual"]
    )  # first DN (case-insensitive, then exact) wins
    assert b"REJECT a message" in reference["postfix-access"]


def test_counts() -> None:
    m, _ = build(entry("a", mailPassword=SSHA, emailForward="x@y.example"), entry("d", mailDisableMessage="x"))
    assert m.counts() == {"users": 1, "aliases": 0, "forwards": 1, "passwords": 1, "disabled": 1}


def test_loop_drops_only_the_edges_in_the_cycle_and_keeps_the_external_copy() -> None:
    m, report = build(
        entry("k", emailForward="y@example.org, k@external.example"),
        entry("y", emailForward="k@example.net"),
    )
    assert m.forwards == {"k@example.org": ("k@external.example",)}, "the copy leaving the loop must stay"
    assert "y@example.org" in m.users and "y@example.org" not in m.forwards
    loops = {r.dn: r.reason for r in report.rejections if "loop" in r.reason}
    k_dn, y_dn = f"uid=k,{OU}", f"uid=y,{OU}"
    assert set(loops) == {k_dn, y_dn}
    assert f"(with {y_dn})" in loops[k_dn] and "y@example.org dropped, k@external.example kept" in loops[k_dn]
    assert f"(with {k_dn})" in loops[y_dn] and "forward to k@example.org dropped" in loops[y_dn]


def test_loop_through_an_ldap_alias_keeps_the_forwards_other_targets() -> None:
    m, report = build(
        entry("frank", mailLocalAddress="team@example.org", mailRoutingAddress="gina@example.org"),
        entry("gina", mailRoutingAddress=["team@example.org", "gina@far.example"]),
        attributes=ILMR,
    )
    # team -> frank -> gina -> team: every LDAP edge inside the cycle goes, nothing else.
    assert m.forwards == {"gina@example.org": ("gina@far.example",)}
    assert "team@example.org" not in m.aliases
    assert sorted(r.attribute for r in report.rejections if "loop" in r.reason) == [
        "mailLocalAddress",
        "mailRoutingAddress",
        "mailRoutingAddress",
    ]


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        ("Inactive", "case-sensitive: 'Inactive' is not 'inactive'"),
        ("MEMORIAL", "case-sensitive"),
        ("disabled", "unrecognised status word 'disabled'"),
        ("retiring", "'retiring' without a YYYY-MM-DD date"),
        ("retiring soon", "'retiring' without a YYYY-MM-DD date"),
        ("   ", "empty status"),
    ],
)
def test_unrecognised_status_keeps_the_account_and_warns_with_dn_and_value(status: str, problem: str) -> None:
    m, report = build(entry("ivy", accountStatus=status, mailPassword=SSHA))
    assert m.users == {"ivy@example.org": "ivy"} and report.retired == 0
    assert [(n.dn, n.attribute) for n in report.notices] == [(f"uid=ivy,{OU}", "accountStatus")]
    assert problem in report.notices[0].reason and repr(status) in report.notices[0].reason
    assert "stays active" in report.notices[0].reason


@pytest.mark.parametrize("status", ["active", "locked 2026-01-02", "retiring 2099-01-01", "inactive", "memorial 2001"])
def test_recognised_status_words_are_silent(status: str) -> None:
    _, report = build(entry("ivy", accountStatus=status))
    assert report.notices == [] and report.rejections == []


def test_bad_status_beside_a_retiring_one_is_still_reported() -> None:
    m, report = build(entry("ivy", accountStatus=["Active", "inactive"]))
    assert m.users == {} and report.retired == 1
    assert len(report.notices) == 1 and "'Active'" in report.notices[0].reason


def aged(dn: str, uid: str, created: str | None, **attrs: str) -> Entry:
    raw = {"uid": (uid,), **{k.lower(): (v,) for k, v in attrs.items()}}
    if created is not None:
        raw["createtimestamp"] = (created,)
    return Entry(dn, raw)


def test_an_older_entry_keeps_its_login_whatever_the_new_entrys_dn() -> None:
    old = aged(f"uid=sam,{OU}", "sam", "20240101120000Z", mailPassword=SSHA)
    new = aged(f"cn=aaa-sam,{OU}", "sam", "20261201080000Z", emailForward="evil@x.example")
    for order in ((old, new), (new, old)):
        m, report = build(*order)
        assert m.users == {"sam@example.org": "sam"} and m.passwords == {"sam": SSHA}
        assert m.forwards == {}, "the newer entry must not route the older one's address"
        assert [(r.dn, r.attribute) for r in report.rejections] == [(new.dn, "uid")]
        assert f"already used by {old.dn} (older by createTimestamp)" in report.rejections[0].reason


def test_creation_times_compare_across_time_zones_and_fractions() -> None:
    # 12:00+0200 is 10:00Z: older than 11:00Z although it sorts later as text.
    east = aged(f"uid=zed,{OU}", "zed", "20260101120000+0200")
    west = aged(f"cn=aaa,{OU}", "zed", "20260101110000.5Z")
    _, report = build(west, east)
    assert [r.dn for r in report.rejections] == [west.dn]


def test_ownership_without_create_timestamps_falls_back_to_dn_order() -> None:
    a = aged(f"cn=aaa,{OU}", "sam", None)
    b = aged(f"uid=sam,{OU}", "sam", None)
    _, report = build(b, a)
    assert [r.dn for r in report.rejections] == [b.dn]
    assert "first in DN order: no createTimestamp" in report.rejections[0].reason


def test_an_entry_without_create_timestamp_counts_as_oldest_and_a_malformed_one_as_newest() -> None:
    cached = aged(f"uid=sam,{OU}", "sam", None)  # read before createTimestamp was requested
    new = aged(f"cn=aaa,{OU}", "sam", "20261201080000Z")
    forged = aged(f"cn=000,{OU}", "sam", "yesterday")
    _, report = build(new, forged, cached)
    assert sorted(r.dn for r in report.rejections) == sorted([new.dn, forged.dn])
    assert [(n.dn, n.attribute) for n in report.notices] == [(forged.dn, "createTimestamp")]


def test_an_older_entry_keeps_a_contested_alias() -> None:
    old = aged(f"uid=frank,{OU}", "frank", "20200101000000Z", mailLocalAddress="sales@example.org")
    new = aged(f"cn=aaa,{OU}", "mallory", "20260101000000Z", mailLocalAddress="sales@example.org")
    m, report = build(new, old, attributes=ILMR)
    assert m.aliases == {"sales@example.org": ("frank@example.org",)}
    assert [r.dn for r in report.rejections] == [new.dn] and old.dn in report.rejections[0].reason


WEAK = {
    "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=": "SHA",
    "{MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==": "LDAP-MD5",
    "{CRYPT}kTGe9g4av0mAE": "DES-CRYPT",
}


def test_weak_hashes_are_accepted_counted_and_reported_by_dn_by_default() -> None:
    users = [entry(f"w{i}", mailPassword=h) for i, h in enumerate(WEAK)]
    m, report = build(*users, entry("strong", mailPassword=SSHA))
    assert report.weak_passwords == 3 and report.rejections == []
    assert m.passwords["w1"] == "{LDAP-MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ=="
    assert sorted(n.dn for n in report.notices) == [f"uid=w{i},{OU}" for i in range(3)]
    for n in report.notices:
        assert "weak hash" in n.reason and n.attribute == "mailPassword"
        assert not any(h.split("}")[1] in n.reason for h in WEAK), "a warning never quotes the hash"


def test_weak_hashes_are_refused_by_policy_and_plaintext_always() -> None:
    users = [entry(f"w{i}", mailPassword=h) for i, h in enumerate(WEAK)]
    m, report = routing.build(
        Snapshot((*users, entry("p", mailPassword="{PLAIN}hunter2")), "test"),
        Static(),
        routing.Settings(domain=DOMAIN, domain_aliases=ALIASES, attributes=UD, weak_passwords="refuse"),
        TODAY,
    )
    assert m.passwords == {} and report.weak_passwords == 0 and len(m.users) == 4
    reasons = [r.reason for r in report.rejections]
    assert sum("refused by passwords.weak: refuse" in r for r in reasons) == 3
    assert any("plaintext" in r for r in reasons)


@pytest.mark.slapd
def test_real_slapd_the_entry_created_first_keeps_its_login(slapd: Any, tmp_path: Path) -> None:
    """slapd stamps createTimestamp itself; a later entry whose DN sorts first gets nothing."""
    from ldapsync import config as config_mod
    from ldapsync import ldapsource

    old_hash, new_hash = SSHA, "{SSHA}" + base64.b64encode(b"n" * 24).decode()

    def account(rdn: str, password: str, forward: str = "") -> str:
        extra = f"emailForward: {forward}\n" if forward else ""
        return (
            f"dn: {rdn},ou=users,dc=example,dc=org\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncMailAccount\n"
            f"uid: owner\ncn: x\nsn: x\nmailPassword: {password}\n{extra}"
        )

    slapd.modify(account("uid=owner", old_hash), add=True)
    time.sleep(1.1)  # createTimestamp has a one-second resolution
    slapd.modify(account("cn=aaa-owner", new_hash, "thief@far.example"), add=True)
    (tmp_path / "ldapsync.yaml").write_text(
        yaml.safe_dump(
            {
                "domain": DOMAIN,
                "source": {
                    "ldap": {
                        "uri": slapd.uri,
                        "bind_dn": slapd.service_dn,
                        "bind_password_file": str(slapd.service_password_file),
                        "base_dn": slapd.users_dn,
                        "filter": "(objectClass=inetOrgPerson)",
                    }
                },
                "state_dir": "state",
                "exporters": [{"kind": "dovecot-passwd", "path": "out/passwd"}],
            }
        )
    )
    cfg = config_mod.load(tmp_path / "ldapsync.yaml")
    assert isinstance(cfg.source, config_mod.LdapSource)
    snap = ldapsource.read(cfg.source, cfg.routing.attributes)
    stamps = {e.dn.split(",")[0]: e.attributes.get("createtimestamp") for e in snap.entries}
    assert stamps["uid=owner"] and stamps["cn=aaa-owner"], "createTimestamp must be requested explicitly"
    m, report = routing.build(snap, Static(), routing.Settings(DOMAIN, (), cfg.routing.attributes), TODAY)
    assert m.passwords["owner"] == old_hash and "owner@example.org" not in m.forwards
    conflict = [r for r in report.rejections if "owner" in r.reason]
    assert [r.dn for r in conflict] == ["cn=aaa-owner,ou=users,dc=example,dc=org"]
    assert "uid=owner,ou=users,dc=example,dc=org (older by createTimestamp)" in conflict[0].reason


# -- the reference outputs: features added since must not change a byte of existing configs -----
GOLDEN = Path(__file__).resolve().parent / "golden"
REPO = Path(__file__).resolve().parent.parent


def test_demo_config_outputs_are_byte_identical_to_the_reference(tmp_path: Path) -> None:
    """examples/demo.yaml (one domain, two alias domains, static file) renders what it always did."""
    import yaml

    from ldapsync import config
    from ldapsync.sync import Pipeline

    demo = REPO / "examples" / "demo.yaml"
    data = yaml.safe_load(demo.read_text())
    data["state_dir"] = str(tmp_path / "state")
    cfg = config.parse(data, demo)
    pipeline = Pipeline(cfg)
    outputs, _ = pipeline.render(pipeline.read_source(), log_problems=False)
    assert len(outputs) == 6
    for out in outputs:
        assert out.data == (GOLDEN / "demo" / out.path.name).read_bytes(), out.name


def test_fixture_directory_outputs_are_byte_identical_to_the_reference() -> None:
    """demo.ldif + hostile.ldif with every logical field of the ud-ldap preset and mailLocalAddress."""
    from ldapsync import config, ldifsource

    attrs = schema.resolve("ud-ldap", {"alias": "mailLocalAddress"}, file=None)
    entries: list[Entry] = []
    rejections: list[Rejection] = []
    for name in ("demo.ldif", "hostile.ldif"):
        snap = ldifsource.read(config.LdifSource(REPO / "fixtures" / "ldif" / name), attrs)
        entries += snap.entries
        rejections += snap.rejections
    static = Static(
        Path("/etc/ldapsync/mail.yaml"),
        (
            StaticEntry(
                "postmaster@example.org", ("alice@example.org", "root@elsewhere.example"), "aliases.postmaster"
            ),
            StaticEntry("abuse@example.org", ("postmaster@example.org",), "aliases.abuse"),
        ),
        (StaticEntry("bounces@example.org", ("bounces@lists.example.net",), "forwards.bounces"),),
    )
    m, _ = routing.build(
        Snapshot(tuple(entries), "fixtures", tuple(rejections)),
        static,
        routing.Settings(domain=DOMAIN, domain_aliases=ALIASES, attributes=attrs),
        TODAY,
    )
    for kind, data in render_all(m).items():
        assert data == (GOLDEN / "fixtures" / kind).read_bytes(), kind


# -- groups ----------------------------------------------------------------------------------------
GROUPS = routing.GroupSettings()
GOU = "ou=groups,dc=example,dc=org"


def group(cn: str, *classes: str, **attrs: str | list[str]) -> Entry:
    raw = {k: [v] if isinstance(v, str) else v for k, v in attrs.items()}
    return make_entry(f"cn={cn},{GOU}", {"objectClass": list(classes or ["groupOfNames"]), "cn": [cn], **raw}, None, [])


def dn(uid: str) -> str:
    return f"uid={uid},{OU}"


def build_with(*entries: Entry, **kwargs: object) -> tuple[routing.RoutingModel, routing.BuildReport]:
    params: dict[str, object] = {"domain": DOMAIN, "domain_aliases": ALIASES, "attributes": UD}
    static = kwargs.pop("static", Static())
    params.update(kwargs)
    settings = routing.Settings(**params)  # type: ignore[arg-type]
    return routing.build(Snapshot(tuple(entries), "test"), static, settings, TODAY)  # type: ignore[arg-type]


def reasons(report: routing.BuildReport) -> list[tuple[str, str, str]]:
    return [(r.dn, r.attribute, r.reason) for r in report.rejections]


def test_group_of_names_delivers_to_its_members_addresses() -> None:
    m, report = build_with(
        entry("alice"),
        entry("bob", emailForward="bob@elsewhere.example"),
        group("staff", member=[dn("alice"), "UID=bob, ou=Users,dc=example,dc=org"]),
        groups=GROUPS,
    )
    assert m.aliases == {"staff@example.org": ("alice@example.org", "bob@example.org")}
    assert m.groups == {"staff@example.org": f"cn=staff,{GOU}"}
    assert reasons(report) == []
    assert report.skipped == 1  # a group is not an account (the empty-directory guard counts accounts)
    maps = render_all(m)
    assert b"staff@example.net\tstaff@example.org\n" in maps["postfix-virtual"]  # alias domains follow
    assert b"staff@example.org\tOK\n" in maps["postfix-recipients"]


def test_unique_member_and_nis_mail_alias_members() -> None:
    m, report = build_with(
        entry("alice"),
        entry("carol"),
        entry("dave"),  # the members exist: dead ones would be dropped
        group("team", "groupOfUniqueNames", uniqueMember=dn("alice")),
        group("list", "nisMailAlias", rfc822MailMember=["carol", "Dave@Example.NET", "x@outside.example", "a b"]),
        groups=GROUPS,
    )
    assert m.aliases == {
        "list@example.org": ("carol@example.org", "dave@example.org", "x@outside.example"),
        "team@example.org": ("alice@example.org",),
    }
    assert [(d, a) for d, a, _ in reasons(report)] == [(f"cn=list,{GOU}", "rfc822MailMember")]


def test_group_entries_are_ignored_without_group_settings() -> None:
    m, report = build_with(entry("alice"), group("staff", member=dn("alice")))
    assert m.aliases == {} and m.groups == {}
    assert report.skipped == 1  # as before: an entry without a login


def test_nested_groups_are_flattened() -> None:
    m, report = build_with(
        entry("alice"),
        entry("bob"),
        group("all", member=[f"cn=admins,{GOU}", dn("alice")]),
        group("admins", member=[f"cn=ops,{GOU}"]),
        group("ops", member=dn("bob")),
        groups=GROUPS,
    )
    assert m.aliases == {
        "admins@example.org": ("bob@example.org",),
        "all@example.org": ("alice@example.org", "bob@example.org"),
        "ops@example.org": ("bob@example.org",),
    }
    assert reasons(report) == []


def test_group_cycle_is_reported_with_its_dns_and_installs_no_loop() -> None:
    m, report = build_with(
        entry("alice"),
        entry("bob"),
        group("a", member=[f"cn=b,{GOU}", dn("alice")]),
        group("b", member=[f"cn=a,{GOU}", dn("bob")]),
        group("self", member=[f"cn=self,{GOU}", dn("bob")]),
        groups=GROUPS,
    )
    both = ("alice@example.org", "bob@example.org")
    assert m.aliases == {"a@example.org": both, "b@example.org": both, "self@example.org": ("bob@example.org",)}
    cycle = [r for r in reasons(report) if "cycle" in r[2]]
    assert [r[0] for r in cycle] == [f"cn=a,{GOU}", f"cn=b,{GOU}", f"cn=self,{GOU}"]
    assert f"cn=a,{GOU}; cn=b,{GOU}" in cycle[0][2]


def test_disabled_retired_and_unknown_members_are_skipped_with_a_warning() -> None:
    m, report = build_with(
        entry("alice"),
        entry("dora", mailDisableMessage="Gone"),
        entry("oscar", accountStatus="inactive"),
        group(
            "staff",
            member=[dn("alice"), dn("dora"), dn("oscar"), dn("nobody"), "cn=printer,dc=example,dc=org"],
        ),
        groups=GROUPS,
    )
    assert m.aliases == {"staff@example.org": ("alice@example.org",)}
    got = sorted(r[2] for r in reasons(report))
    assert got == sorted(
        [
            f"member '{dn('dora')}' is disabled; skipped",
            f"member '{dn('oscar')}' is retired; skipped",
            f"member '{dn('nobody')}' is not a mail account or group; skipped",
            "member 'cn=printer,dc=example,dc=org' is not a mail account or group; skipped",
        ]
    )
    assert {r[1] for r in reasons(report)} == {"member"}


def test_group_without_deliverable_members_is_skipped() -> None:
    m, report = build_with(entry("dora", mailDisableMessage="Gone"), group("empty", member=dn("dora")), groups=GROUPS)
    assert m.aliases == {}
    assert ("cn=empty," + GOU, "cn", "no deliverable member; group skipped") in reasons(report)


def test_account_wins_over_a_group_of_the_same_name() -> None:
    m, report = build_with(entry("alice"), entry("bob"), group("alice", member=dn("bob")), groups=GROUPS)
    assert m.users == {"alice@example.org": "alice", "bob@example.org": "bob"}
    assert m.aliases == {} and m.groups == {}
    assert reasons(report) == [
        (
            f"cn=alice,{GOU}",
            "cn",
            f"alice@example.org is an address of {dn('alice')}; the account wins, group address dropped",
        )
    ]


def test_static_alias_wins_over_a_group_and_names_it() -> None:
    m, report = build_with(
        entry("alice"),
        entry("bob"),
        group("postmaster", member=dn("bob")),
        groups=GROUPS,
        static=static_of(aliases={"postmaster": ["alice"]}),
    )
    assert m.aliases == {"postmaster@example.org": ("alice@example.org",)}
    assert m.groups == {}
    assert report.warnings == [
        f"{STATIC_FILE}: aliases.postmaster overrides postmaster@example.org from LDAP entry cn=postmaster,{GOU}"
    ]


def test_group_senders_only_when_members_may_send_as_the_group() -> None:
    entries = (entry("alice"), entry("bob"), group("staff", member=[dn("alice"), dn("bob")]))
    m, _ = build_with(*entries, groups=GROUPS)
    assert "staff@example.org" not in m.sender_logins
    m, _ = build_with(*entries, groups=routing.GroupSettings(members_send_as_group=True))
    assert m.sender_logins["staff@example.org"] == ("alice", "bob")


def test_group_settings_name_attribute_and_base_dn() -> None:
    settings = routing.GroupSettings(name_attribute="mail", base_dn=GOU)
    m, report = build_with(
        entry("alice"),
        group("Staff Team", mail="staff@example.org", member=dn("alice")),
        make_entry(
            "cn=elsewhere,dc=example,dc=org", {"objectClass": ["groupOfNames"], "mail": ["x@example.org"]}, None, []
        ),
        groups=settings,
    )
    assert m.aliases == {"staff@example.org": ("alice@example.org",)}
    assert reasons(report) == []


def test_group_name_outside_hosted_domains_is_dropped() -> None:
    m, report = build_with(
        entry("alice"),
        group("x", mail="x@outside.example", member=dn("alice")),
        groups=routing.GroupSettings(name_attribute="mail"),
    )
    assert m.aliases == {}
    assert reasons(report)[0][2] == "'x@outside.example' is not in a hosted domain; value dropped"


def test_group_member_forwarding_back_to_the_group_breaks_the_loop() -> None:
    m, report = build_with(
        entry("alice", emailForward="staff@example.org"),
        entry("bob"),
        group("staff", member=[dn("alice"), dn("bob")]),
        groups=GROUPS,
    )
    assert "staff@example.org" not in m.aliases or "alice@example.org" not in m.forwards
    assert any("loop" in r[2] for r in reasons(report))


# -- hosted domains --------------------------------------------------------------------------------
HOSTED = {"example.com": ("example.info",), "other.example": ()}
MAIL = schema.resolve("ud-ldap", {"address": "mail", "alias": "mailLocalAddress"}, file=None)


def test_accounts_take_their_addresses_from_the_address_attribute() -> None:
    m, report = build_with(
        entry("bsmith", mail=["Bob.Smith@Example.INFO", "bob@other.example"], mailPassword=SSHA),
        entry("alice"),
        hosted=HOSTED,
        attributes=MAIL,
    )
    assert m.users == {"alice@example.org": "alice", "bob.smith@example.com": "bsmith"}
    assert m.aliases == {"bob@other.example": ("bob.smith@example.com",)}
    assert m.passwords == {"bsmith": SSHA}
    assert reasons(report) == []
    assert m.variants("bob.smith@example.com") == ["bob.smith@example.com", "bob.smith@example.info"]
    assert m.variants("bob@other.example") == ["bob@other.example"]
    assert m.sender_logins["bob@other.example"] == ("bsmith",)
    maps = render_all(m)
    assert b"bob.smith@example.info\tbob.smith@example.com\n" in maps["postfix-virtual"]
    assert b"bob.smith@example.info\tOK\n" in maps["postfix-recipients"]
    assert b"alice@example.info" not in maps["postfix-recipients"]  # alias domains belong to one domain


def test_address_outside_the_hosted_domains_is_dropped() -> None:
    m, report = build_with(entry("eve", mail="eve@outside.example"), hosted=HOSTED, attributes=MAIL)
    assert m.users == {"eve@example.org": "eve"}  # no address left: login@domain, as without the attribute
    assert reasons(report) == [(dn("eve"), "mail", "'eve@outside.example' is not in a hosted domain; value dropped")]


def test_two_accounts_claiming_one_address_without_create_timestamps_first_dn_wins() -> None:
    m, report = build_with(
        entry("a1", mail="team@example.com"), entry("a2", mail="team@example.com"), hosted=HOSTED, attributes=MAIL
    )
    assert m.users == {"team@example.com": "a1"}
    assert reasons(report) == [
        (
            dn("a2"),
            "mail",
            f"address team@example.com already used by {dn('a1')} (first in DN order: no createTimestamp);"
            " entry skipped",
        )
    ]


def test_the_older_account_keeps_a_contested_hosted_address_or_alias() -> None:
    new = entry("a1", mail="team@example.com", createTimestamp="20261201000000Z")
    old = entry("a2", mail="team@example.com", createTimestamp="20200101000000Z")
    older = entry("a3", mail=["a3@example.com", "sales@other.example"], createTimestamp="20190101000000Z")
    m, report = build_with(new, old, older, hosted=HOSTED, attributes=MAIL)
    assert m.users == {"team@example.com": "a2", "a3@example.com": "a3"}
    assert m.aliases == {"sales@other.example": ("a3@example.com",)}
    assert reasons(report) == [
        (
            dn("a1"),
            "mail",
            f"address team@example.com already used by {dn('a2')} (older by createTimestamp); entry skipped",
        )
    ]
    m, report = build_with(
        entry("a4", mail="a4@example.com", mailLocalAddress="sales@other.example", createTimestamp="20261201000000Z"),
        older,
        hosted=HOSTED,
        attributes=MAIL,
    )
    assert m.aliases == {"sales@other.example": ("a3@example.com",)}
    assert [(r.dn, r.attribute) for r in report.rejections] == [(dn("a4"), "mailLocalAddress")]
    assert f"already claimed by {dn('a3')} (older by createTimestamp)" in report.rejections[0].reason


def test_aliases_and_forwards_canonicalise_into_their_own_hosted_domain() -> None:
    m, _ = build_with(
        entry("carol", mail="carol@example.com", mailLocalAddress="c@example.info", emailForward="x@EXAMPLE.INFO"),
        entry("x", mail="x@example.com"),  # the target exists: a dead one would be dropped
        hosted=HOSTED,
        attributes=MAIL,
    )
    assert m.aliases == {"c@example.com": ("carol@example.com",)}
    assert m.forwards == {"carol@example.com": ("x@example.com",)}


def test_disabled_account_is_refused_at_every_address() -> None:
    m, _ = build_with(
        entry("dora", mail=["dora@example.com", "d@other.example"], mailDisableMessage="Gone"),
        hosted=HOSTED,
        attributes=MAIL,
    )
    assert m.disabled == {"d@other.example": "Gone", "dora@example.com": "Gone"}
    assert m.users == {}


# -- local delivery and mailboxes ------------------------------------------------------------------
BOXES = routing.MailboxSettings(home="/var/vmail/{domain}/{login}", home_root="/var/vmail", uid=5000, gid=5000)
BOX_ATTRS = schema.resolve(
    "ud-ldap",
    {"uid_number": "uidNumber", "gid_number": "gidNumber", "home": "homeDirectory", "quota": "mailQuota"},
    file=None,
)


def test_local_delivery_no_forward_or_a_forward_keeping_a_copy() -> None:
    m, _ = build_with(
        entry("alice"),
        entry("bob", emailForward="bob@elsewhere.example"),
        entry("carol", emailForward="carol@example.org, carol@elsewhere.example"),
        entry("dora", mailDisableMessage="Gone"),
        entry("erin"),
        static=static_of(forwards={"erin": "erin@elsewhere.example"}),
    )
    assert m.local == {"alice@example.org": "alice", "carol@example.org": "carol"}


def test_mailboxes_from_defaults_and_attributes() -> None:
    m, report = build_with(
        entry("alice"),
        entry("bob", uidNumber="6001", gidNumber="6002", homeDirectory="/var/vmail/special/bob", mailQuota="2G"),
        attributes=BOX_ATTRS,
        mailbox=BOXES,
    )
    assert m.mailboxes == {
        "alice": routing.Mailbox("alice", "alice@example.org", 5000, 5000, "/var/vmail/example.org/alice"),
        "bob": routing.Mailbox("bob", "bob@example.org", 6001, 6002, "/var/vmail/special/bob", "2G"),
    }
    assert reasons(report) == []


@pytest.mark.parametrize(
    ("attrs", "attribute", "reason"),
    [
        ({"uidNumber": "0"}, "uidNumber", "0 is outside 1000-60000; no mailbox"),
        ({"uidNumber": "70000"}, "uidNumber", "70000 is outside 1000-60000; no mailbox"),
        ({"gidNumber": "-5"}, "gidNumber", "'-5' is not a numeric id; value ignored"),
        ({"uidNumber": "5000 userdb_x=y"}, "uidNumber", "'5000 userdb_x=y' is not a numeric id; value ignored"),
        ({"homeDirectory": "/etc/x"}, "homeDirectory", "'/etc/x' is not under /var/vmail; no mailbox"),
        ({"homeDirectory": "/var/vmail/../etc"}, "homeDirectory", "contains a '.' or '..' component"),
        ({"homeDirectory": "/var/vmail/a b"}, "homeDirectory", "is not an absolute path"),
        ({"homeDirectory": "/var/vmail/a:1"}, "homeDirectory", "is not an absolute path"),
        ({"homeDirectory": "/var/vmail/%u"}, "homeDirectory", "is not an absolute path"),
        ({"homeDirectory": "var/vmail/a"}, "homeDirectory", "is not an absolute path"),
        ({"homeDirectory": "/var/vmailx/a"}, "homeDirectory", "is not under /var/vmail; no mailbox"),
        ({"mailQuota": "1G userdb_quota_rule=*:storage=0"}, "mailQuota", "is not a quota size"),
        ({"mailQuota": ["1G", "2G"]}, "mailQuota", "multi-valued; value ignored"),
    ],
)
def test_bad_mailbox_attributes_are_rejected_with_dn_and_attribute(
    attrs: dict[str, str | list[str]], attribute: str, reason: str
) -> None:
    m, report = build_with(entry("bob", **attrs), attributes=BOX_ATTRS, mailbox=BOXES)
    got = reasons(report)
    assert [(d, a) for d, a, _ in got] == [(dn("bob"), attribute)], got
    assert reason in got[0][2]
    assert m.users == {"bob@example.org": "bob"}  # the account itself stays
    box = m.mailboxes.get("bob")
    # a rejected optional value falls back to the default; a value out of bounds means no mailbox
    assert box is None or (box.uid, box.gid, box.quota) == (5000, 5000, None)


@pytest.mark.parametrize(
    ("home", "problem"),
    [
        ("/var/vmail/../etc", "'/var/vmail/../etc' contains a '.' or '..' component; no mailbox"),
        ("/var/vmail/a b", "'/var/vmail/a b' is not an absolute path"),
        ("/var/vmail/%u", "'/var/vmail/%u' is not an absolute path"),
        ("var/vmail/bob", "'var/vmail/bob' is not an absolute path"),
        (["/var/vmail/b1", "/var/vmail/b2"], "multi-valued; no mailbox"),
    ],
)
def test_an_invalid_home_means_no_mailbox_not_the_default_one(home: str | list[str], problem: str) -> None:
    m, report = build_with(entry("alice"), entry("bob", homeDirectory=home), attributes=BOX_ATTRS, mailbox=BOXES)
    assert set(m.mailboxes) == {"alice"} and m.local == {"alice@example.org": "alice"}
    assert m.users == {"alice@example.org": "alice", "bob@example.org": "bob"}
    [(where, attribute, reason)] = reasons(report)
    assert (where, attribute) == (dn("bob"), "homeDirectory")
    assert reason.startswith(problem.removesuffix("; no mailbox")) and reason.endswith("; no mailbox")


def test_account_without_a_mailbox_is_not_delivered_locally() -> None:
    settings = routing.MailboxSettings(home="/var/vmail/{login}", home_root="/var/vmail", uid=None, gid=5000)
    m, report = build_with(entry("alice"), entry("bob", uidNumber="5001"), attributes=BOX_ATTRS, mailbox=settings)
    assert m.local == {"bob@example.org": "bob"}
    assert set(m.mailboxes) == {"bob"}
    assert reasons(report) == [(dn("alice"), "uidNumber", "no value and no default in mailbox settings; no mailbox")]


# -- against a real slapd: groups and hosted domains read over LDAP --------------------------------
def slapd_config(tmp_path: Path, server: object, **extra: object) -> Path:
    import yaml

    doc = {
        "domain": "example.org",
        "domain_aliases": ["example.net"],
        "source": {
            "ldap": {
                "uri": server.uri,  # type: ignore[attr-defined]
                "bind_dn": server.service_dn,  # type: ignore[attr-defined]
                "bind_password_file": str(server.service_password_file),  # type: ignore[attr-defined]
                "base_dn": "dc=example,dc=org",
                "timeout": 5,
            }
        },
        "state_dir": "state",
        "exporters": [
            {"kind": "postfix-virtual", "path": "out/virtual", "map_type": "none"},
            {"kind": "postfix-recipients", "path": "out/recipients", "map_type": "none"},
            {"kind": "postfix-sender-login", "path": "out/sender_login", "map_type": "none"},
        ],
        **extra,
    }
    path = tmp_path / "ldapsync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slapd
def test_groups_read_from_slapd(tmp_path: Path, slapd_factory: Any) -> None:
    from slapd import BASE_LDIF, DEMO_LDIF, FIXTURES

    from ldapsync import config
    from ldapsync.sync import Pipeline

    server = slapd_factory(ldif_files=(BASE_LDIF, DEMO_LDIF, FIXTURES / "groups.ldif"))
    cfg = config.load(slapd_config(tmp_path, server, groups={"members_send_as_group": True}))
    assert cfg.routing.groups is not None and "member" in cfg.routing.attributes.ldap_attributes()
    pipeline = Pipeline(cfg)
    outputs, report = pipeline.render(pipeline.read_source(), log_problems=False)
    virtual = {o.name: o.data.decode() for o in outputs}["postfix-virtual"]
    assert "staff@example.org\talice@example.org,bob@example.org,frank@example.org,grace@example.org\n" in virtual
    assert "admins@example.org\tbob@example.org,grace@example.org\n" in virtual
    assert "ops@example.org\tbob@example.org,grace@example.org\n" in virtual
    assert "announce@example.org\tcarol@example.org,someone@outside.example\n" in virtual
    assert "staff@example.net\tstaff@example.org\n" in virtual
    assert "alice@example.org\t" not in virtual  # the account alice wins over the group alice
    sender = {o.name: o.data.decode() for o in outputs}["postfix-sender-login"]
    assert "staff@example.org\talice,bob,frank,grace\n" in sender
    got = {(r.dn.split(",")[0], r.attribute, r.reason) for r in report.rejections if "ou=groups" in r.dn}
    staff = "cn=staff"
    assert (staff, "member", "member 'uid=dora,ou=users,dc=example,dc=org' is disabled; skipped") in got
    assert (staff, "member", "member 'uid=oscar,ou=users,dc=example,dc=org' is retired; skipped") in got
    ghost = "member 'uid=ghost,ou=users,dc=example,dc=org' is not a mail account or group; skipped"
    assert (staff, "member", ghost) in got
    cycles = {g for g, _, reason in got if "group cycle through" in reason}
    assert cycles == {"cn=admins", "cn=ops"}
    assert any(g == "cn=alice" and "the account wins" in reason for g, _, reason in got)
    assert any(g == "cn=announce" and a == "rfc822MailMember" and "|/bin/sh" in reason for g, a, reason in got)
    assert any(g == "cn=Mail Team" and a == "cn" for g, a, _ in got)


@pytest.mark.slapd
def test_hosted_domains_and_mailboxes_read_from_slapd(tmp_path: Path, slapd_factory: Any) -> None:
    from slapd import BASE_LDIF, DEMO_LDIF, FIXTURES

    from ldapsync import config
    from ldapsync.sync import Pipeline

    server = slapd_factory(ldif_files=(BASE_LDIF, DEMO_LDIF, FIXTURES / "domains.ldif"))
    path = slapd_config(
        tmp_path,
        server,
        domains={"example.com": ["example.info"], "other.example": []},
        attributes={"address": "mail", "uid_number": "uidNumber", "gid_number": "gidNumber", "home": "homeDirectory"},
        mailbox={"home_root": "/var/vmail", "gid": 5000, "uid": 5000},
    )
    cfg = config.load(path)
    pipeline = Pipeline(cfg)
    outputs, report = pipeline.render(pipeline.read_source(), log_problems=False)
    text = {o.name: o.data.decode() for o in outputs}
    assert "bob@other.example\tbob.smith@example.com\n" in text["postfix-virtual"]
    assert "bob.smith@example.info\tbob.smith@example.com\n" in text["postfix-virtual"]
    assert "bob.smith@example.info\tOK\n" in text["postfix-recipients"]
    assert "eve@example.org\tOK\n" in text["postfix-recipients"]
    assert "alice@example.net\tOK\n" in text["postfix-recipients"]
    assert "alice@example.info" not in text["postfix-recipients"]
    got = {(r.dn.split(",")[0], r.attribute, r.reason) for r in report.rejections if "ou=people" in r.dn}
    assert got == {
        ("uid=eve", "mail", "'eve@outside.example' is not in a hosted domain; value dropped"),
        ("uid=mallory", "homeDirectory", "'/etc' is not under /var/vmail; no mailbox"),
    }
    routed, _ = routing.build(
        pipeline.read_source(),
        Static(),
        routing.Settings(
            cfg.routing.domain,
            cfg.routing.domain_aliases,
            cfg.routing.attributes,
            hosted=cfg.routing.hosted,
            mailbox=cfg.routing.mailbox,
        ),
        TODAY,
    )
    assert routed.mailboxes["bsmith"] == routing.Mailbox(
        "bsmith", "bob.smith@example.com", 5001, 5000, "/var/vmail/example.com/bsmith"
    )
    assert routed.mailboxes["alice"].home == "/var/vmail/example.org/alice"
    assert "mallory" not in routed.mailboxes and "mallory@example.com" not in routed.local


# -- dead targets --------------------------------------------------------------------------------
def lines_with(outputs: dict[str, bytes], address: str) -> dict[str, list[str]]:
    """Every output's lines that mention `address` (as key or value)."""
    out: dict[str, list[str]] = {}
    for kind, data in outputs.items():
        found = [line for line in data.decode().splitlines() if address in line.replace("\t", " ").split(" ")[0]]
        if found:
            out[kind] = found
    return out


def test_static_alias_drops_disabled_and_unknown_targets_with_a_warning() -> None:
    st = static_of(aliases={"hostmaster": ["alice", "dora", "nosuchuser"]})
    m, report = build(entry("alice"), entry("dora", mailDisableMessage="Gone"), static=st)
    assert m.aliases["hostmaster@example.org"] == ("alice@example.org",)
    assert report.warnings == [
        f"{STATIC_FILE}: aliases.hostmaster: target nosuchuser@example.org is unknown; dropped",
        f"{STATIC_FILE}: aliases.hostmaster: target dora@example.org is disabled; dropped",
    ]


def test_forward_to_a_disabled_account_is_not_accepted_but_rejected_with_its_message() -> None:
    m, report = build(
        entry("x001", emailForward="d001@example.org", mailPassword=SSHA),
        entry("d001", mailDisableMessage="d001 has left"),
    )
    out = render_all(m)
    assert "x001@example.org" not in m.deliverable()
    assert lines_with(out, "x001@example.org") == {
        "postfix-access": ["x001@example.org\tREJECT d001 has left"],
    }
    assert "x001@example.net\tREJECT d001 has left\n" in out["postfix-access"].decode()
    assert m.passwords == {"x001": SSHA}  # the account still exists; it accepts no mail
    x001 = f"uid=x001,{OU}"
    assert (x001, "emailForward", "target d001@example.org is disabled; dropped") in reasons(report)
    verdict = "x001@example.org has no target left; not accepted, rejected with the message of d001@example.org"
    assert (x001, "emailForward", verdict) in reasons(report)


def test_a_dead_target_is_dropped_from_a_forward_that_keeps_others() -> None:
    m, report = build(
        entry("eve", emailForward="oscar@example.org, eve@elsewhere.example"), entry("oscar", accountStatus="inactive")
    )
    assert m.forwards == {"eve@example.org": ("eve@elsewhere.example",)}
    assert (f"uid=eve,{OU}", "emailForward", "target oscar@example.org is retired; dropped") in reasons(report)
    assert m.disabled == {}


def test_a_kept_copy_chains_and_forwards_into_aliases_stay() -> None:
    st = static_of(aliases={"team": ["alice", "bob"]})
    m, report = build(
        entry("mallory", emailForward="mallory@example.org, mallory@elsewhere.example"),
        entry("alice"),
        entry("bob", emailForward="carol@example.org"),
        entry("carol", emailForward="carol@far.example"),
        entry("dan", emailForward="team@example.net"),
        static=st,
    )
    assert m.forwards == {
        "bob@example.org": ("carol@example.org",),
        "carol@example.org": ("carol@far.example",),
        "dan@example.org": ("team@example.org",),
        "mallory@example.org": ("mallory@elsewhere.example", "mallory@example.org"),
    }
    assert m.aliases == {"team@example.org": ("alice@example.org", "bob@example.org")}
    assert report.rejections == [] and report.warnings == []


def test_dead_targets_cascade_through_aliases_and_static_entries() -> None:
    # sales (LDAP alias of x) -> x -> nobody: x and sales are gone, and so is the static
    # forward to sales; the static alias keeps its other target.
    st = static_of(aliases={"both": ["sales", "alice"]}, forwards={"orders": "sales@example.org"})
    m, report = build(
        entry("alice"),
        entry("x", emailForward="nobody@example.org", mailLocalAddress="sales@example.org"),
        static=st,
        attributes=UD_ALIAS,
    )
    assert "x@example.org" not in m.deliverable() and "sales@example.org" not in m.deliverable()
    assert "orders@example.org" not in m.deliverable()
    assert m.aliases == {"both@example.org": ("alice@example.org",)}
    assert m.disabled == {}  # nothing disabled on the way: simply unknown, so no access line
    assert f"{STATIC_FILE}: forwards.orders: target sales@example.org is not accepted (no target left); dropped" in (
        report.warnings
    )
    x = f"uid=x,{OU}"
    assert (x, "mailLocalAddress", "target x@example.org is not accepted (no target left); dropped") in reasons(report)


UD_ALIAS = schema.resolve("ud-ldap", {"alias": "mailLocalAddress"}, file=None)


def test_group_address_members_that_are_dead_are_dropped_naming_the_attribute() -> None:
    m, report = build_with(
        entry("alice"),
        entry("dora", mailDisableMessage="Gone"),
        group("list", "nisMailAlias", rfc822MailMember=["alice", "dora", "ghost"]),
        group("gone", member=dn("dora")),
        groups=GROUPS,
    )
    assert m.aliases == {"list@example.org": ("alice@example.org",)}
    got = reasons(report)
    assert (f"cn=list,{GOU}", "rfc822MailMember", "target ghost@example.org is unknown; dropped") in got
    assert (f"cn=list,{GOU}", "rfc822MailMember", "target dora@example.org is disabled; dropped") in got
    # a group whose only members are disabled is rejected with a member's message
    assert m.disabled == {"dora@example.org": "Gone", "gone@example.org": "Gone"}


def test_targets_outside_our_domains_and_in_subdomains_are_never_judged() -> None:
    m, report = build(entry("al", emailForward="x@lists.example.net, y@far.example"))
    assert m.forwards == {"al@example.org": ("x@lists.example.net", "y@far.example")}
    assert report.rejections == []


# -- several addresses: the primary one, and logging in by address --------------------------------
def test_the_primary_address_is_the_login_named_one_then_by_configured_domain_order() -> None:
    m, _ = build_with(
        entry("victor", mail=["v@example.info", "victor@example.com"]),  # v@ sorts first, but is not the login
        entry("ann", mail=["a@example.com", "ann@other.example"]),  # the login's name wins over domain order
        entry("quinn", mail=["zz@example.com", "q@other.example"]),  # no login-named one: domain order
        hosted=HOSTED,
        attributes=MAIL,
    )
    assert m.users == {"victor@example.com": "victor", "ann@other.example": "ann", "zz@example.com": "quinn"}
    assert m.aliases == {
        "v@example.com": ("victor@example.com",),
        "a@example.com": ("ann@other.example",),
        "q@other.example": ("zz@example.com",),
    }
    swapped = {"other.example": (), "example.com": ("example.info",)}  # the admin's order decides
    m, _ = build_with(entry("quinn", mail=["zz@example.com", "q@other.example"]), hosted=swapped, attributes=MAIL)
    assert m.users == {"q@other.example": "quinn"}


def test_a_primary_address_attribute_chooses_among_the_own_addresses() -> None:
    attrs = schema.resolve("ud-ldap", {"address": "mail", "primary_address": "mailPrimaryAddress"}, file=None)
    mail = ["v@example.info", "victor@example.com"]
    m, report = build_with(
        entry("victor", mail=mail, mailPrimaryAddress="V@Example.INFO"),  # an alias-domain spelling: canonical
        entry("wrong", mail=["wrong@example.com", "w@example.com"], mailPrimaryAddress="x@example.com"),
        entry(
            "many", mail=["many@example.com", "m@example.com"], mailPrimaryAddress=["m@example.com", "many@example.com"]
        ),
        hosted=HOSTED,
        attributes=attrs,
    )
    assert m.users == {"v@example.com": "victor", "wrong@example.com": "wrong", "many@example.com": "many"}
    assert "mailPrimaryAddress" in attrs.ldap_attributes()
    assert reasons(report) == [
        (dn("many"), "mailPrimaryAddress", "multi-valued; value ignored, the primary address rule decides"),
        (
            dn("wrong"),
            "mailPrimaryAddress",
            "'x@example.com' is not one of the entry's addresses; value ignored, the primary address rule decides",
        ),
    ]


def test_a_shared_value_is_judged_once_per_parser_and_reported_for_every_entry() -> None:
    """The parser keeps validation results by value: entries sharing a bad hash, a bad status
    or a creation time each get their own rejection or notice under their own DN, and the
    same outcome as a parser that sees the value for the first time."""
    shared = {"mailPassword": "plaintext", "accountStatus": "Retired", "createTimestamp": "20260101000000Z"}
    entries = [entry(f"u{i}", **shared) for i in range(3)]
    settings = routing.Settings(domain=DOMAIN, domain_aliases=ALIASES, attributes=UD)
    parse = routing.entry_parser(settings, TODAY)
    first = [parse(e) for e in entries]
    fresh = [routing.entry_parser(settings, TODAY)(e) for e in entries]
    assert first == fresh
    for e, parsed in zip(entries, first, strict=True):
        assert parsed.password is None and parsed.created == "20260101000000.000000"
        assert [(r.dn, r.attribute) for r in parsed.rejections] == [(e.dn, "mailPassword")]
        assert [(r.dn, r.attribute) for r in parsed.notices] == [(e.dn, "accountStatus")]


def test_a_parser_judges_a_retiring_date_by_its_own_day() -> None:
    """Retirement depends on the day: a parser made for another day does not reuse a verdict."""
    e = entry("old", accountStatus="retiring 2026-01-01")
    settings = routing.Settings(domain=DOMAIN, domain_aliases=ALIASES, attributes=UD)
    assert not routing.entry_parser(settings, date(2026, 3, 1))(e).retired
    assert routing.entry_parser(settings, date(2026, 9, 1))(e).retired


def test_the_parser_memo_is_bounded() -> None:
    """An agent keeps a parser for a day: a stream of distinct values must not grow it without bound."""
    from ldapsync.routing.entry import MEMO_LIMIT, _Memo

    memo = _Memo(TODAY)
    for i in range(MEMO_LIMIT * 2 + 7):
        memo.password(f"{{SSHA}}{i}")
        memo.created(f"2026{i:010d}Z")
        memo.status(f"locked {i}")
    tables = (memo._passwords, memo._stamps, memo._statuses)  # the bound is the point
    assert all(0 < len(t) <= MEMO_LIMIT for t in tables)
