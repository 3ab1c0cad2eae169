"""explain: every output's answer for one address, and every rule that dropped or overrode it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import siteconfig

from ldapsync import config, explain, routing
from ldapsync.directory import Entry, Snapshot
from ldapsync.exporters import exporter_class
from ldapsync.static import Static, StaticEntry

DOMAIN = "example.org"
OU = "ou=users,dc=example,dc=org"
TODAY = date(2026, 11, 21)
SSHA = "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ=="
STATIC_FILE = Path("/etc/ldapsync/mail.yaml")
EXPORTERS: list[dict[str, Any]] = [
    {"kind": "postfix-virtual", "path": "out/virtual"},
    {"kind": "postfix-transport", "path": "out/transport", "nexthop": "smtp:[srs.example.org]"},
    {"kind": "postfix-recipients", "path": "out/recipients"},
    {"kind": "postfix-sender-login", "path": "out/sender_login"},
    {"kind": "postfix-access", "path": "out/access"},
    {"kind": "dovecot-passwd", "path": "out/passwd"},
]


def cfg(tmp_path: Path, **top: Any) -> config.Config:
    schema = top.pop("schema", "ud-ldap")
    attributes = top.pop("attributes", {"alias": "mailLocalAddress"})
    exporters = top.pop("exporters", EXPORTERS)
    path = siteconfig.write_config(tmp_path, exporters=exporters, schema=schema, attributes=attributes, **top)
    return config.load(path)


def user(uid: str, rdn: str | None = None, **attrs: str | list[str]) -> Entry:
    values = {k.lower(): (v,) if isinstance(v, str) else tuple(v) for k, v in attrs.items()}
    return Entry(f"{rdn or 'uid=' + uid},{OU}", {"uid": (uid,), **values})


def static_of(**aliases: list[str]) -> Static:
    return Static(
        STATIC_FILE,
        tuple(
            StaticEntry(f"{n}@{DOMAIN}", tuple(f"{t}@{DOMAIN}" for t in ts), f"aliases.{n}")
            for n, ts in aliases.items()
        ),
        (),
    )


def ask(
    c: config.Config, address: str, *entries: Entry, static: Static | None = None, **kw: Any
) -> explain.Explanation:
    exporters = [(spec, exporter_class(spec.kind)(spec.options)) for spec in c.exporters]
    return explain.explain(
        Snapshot(tuple(entries), "test"),
        address,
        config=c,
        static=static or Static(),
        exporters=exporters,
        origin="test",
        today=TODAY,
        **kw,
    )


def rules(answer: explain.Explanation) -> dict[routing.Rule, list[routing.Event]]:
    out: dict[routing.Rule, list[routing.Event]] = {}
    for e in answer.events:
        out.setdefault(e.rule, []).append(e)
    return out


def present(answer: explain.Explanation) -> dict[str, tuple[tuple[str, str], ...]]:
    return {o.name: o.lines for o in answer.outputs if o.lines}


@dataclass(frozen=True)
class Case:
    address: str
    entries: tuple[Entry, ...]
    static: Static | None = None
    top: dict[str, Any] | None = None
    source: str = ""  # the DN or static key the rule must name
    detail: str = ""  # a piece of the rule's detail


K, Y = f"uid=k,{OU}", f"uid=y,{OU}"
GOU = "ou=groups,dc=example,dc=org"
GROUPS_ON: dict[str, Any] = {"groups": {}}
MAIL_ADDRESS: dict[str, Any] = {"attributes": {"alias": "mailLocalAddress", "address": "mail"}}
BOXES: dict[str, Any] = {
    "attributes": {"alias": "mailLocalAddress", "home": "homeDirectory"},
    "mailbox": {"home_root": "/var/vmail", "uid": 5000, "gid": 5000},
}


def group(cn: str, *members: str) -> Entry:
    return Entry(f"cn={cn},{GOU}", {"objectclass": ("groupOfNames",), "cn": (cn,), "member": members})


# Every rule, with the smallest directory that triggers it for `address`.
CASES: dict[routing.Rule, Case] = {
    routing.Rule.ACCOUNT: Case("alice@example.org", (user("alice"),), source=f"uid=alice,{OU}", detail="login alice"),
    routing.Rule.FORWARD: Case(
        "bob@example.org", (user("bob", emailForward="bob@far.example"),), source=f"uid=bob,{OU}", detail="far"
    ),
    routing.Rule.LDAP_ALIAS: Case(
        "sales@example.org", (user("frank", mailLocalAddress="sales@example.org"),), source=f"uid=frank,{OU}"
    ),
    routing.Rule.STATIC: Case(
        "postmaster@example.org", (user("alice"),), static_of(postmaster=["alice"]), source="aliases.postmaster"
    ),
    routing.Rule.PASSWORD: Case("alice@example.org", (user("alice", mailPassword=SSHA),), detail="{SSHA}"),
    routing.Rule.STATIC_OVERRIDE: Case(
        "alice@example.org",
        (user("alice", emailForward="alice@far.example"), user("bob")),
        static_of(alice=["bob"]),
        source="aliases.alice",
        detail=f"uid=alice,{OU}",
    ),
    routing.Rule.LOOP_BROKEN: Case(
        "k@example.org",
        (user("k", emailForward="y@example.org, k@external.example"), user("y", emailForward="k@example.org")),
        source=K,
        detail="k@external.example kept",
    ),
    routing.Rule.ALIAS_CLAIMED: Case(
        "sales@example.org",
        (
            user("frank", mailLocalAddress="sales@example.org", createTimestamp="20200101000000Z"),
            user("mallory", "cn=aaa", mailLocalAddress="sales@example.org", createTimestamp="20260101000000Z"),
        ),
        source=f"cn=aaa,{OU}",
        detail=f"held by uid=frank,{OU} (older by createTimestamp)",
    ),
    routing.Rule.ALIAS_IS_ACCOUNT: Case(
        "alice@example.org",
        (user("alice"), user("mallory", mailLocalAddress="alice@example.org")),
        source=f"uid=mallory,{OU}",
        detail=f"the address of uid=alice,{OU}",
    ),
    routing.Rule.LOGIN_CONFLICT: Case(
        "sam@example.org",
        (
            user("sam", createTimestamp="20200101000000Z", mailPassword=SSHA),
            user("sam", "cn=aaa-sam", createTimestamp="20261201000000Z"),
        ),
        source=f"cn=aaa-sam,{OU}",
        detail=f"held by uid=sam,{OU}",
    ),
    routing.Rule.RETIRED: Case("oscar@example.org", (user("oscar", accountStatus="inactive"),), detail="inactive"),
    routing.Rule.DISABLED: Case("dora@example.org", (user("dora", mailDisableMessage="gone fishing"),), detail="gone"),
    routing.Rule.STATUS_UNRECOGNISED: Case(
        "ivy@example.org", (user("ivy", accountStatus="Inactive"),), detail="case-sensitive"
    ),
    routing.Rule.HASH_REFUSED: Case(
        "pat@example.org", (user("pat", mailPassword="{PLAIN}hunter2"),), detail="plaintext"
    ),
    routing.Rule.HASH_WEAK: Case("wes@example.org", (user("wes", mailPassword="{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ="),)),
    routing.Rule.VALUE_DROPPED: Case(
        "val@example.org", (user("val", emailForward="|/bin/sh, val@far.example"),), detail="command"
    ),
    routing.Rule.NOT_HOSTED: Case(
        "eve@outside.example",
        (user("eve", mail="eve@outside.example"),),
        top=MAIL_ADDRESS,
        source=f"uid=eve,{OU}",
        detail="not in a hosted domain",
    ),
    routing.Rule.GROUP_LOST: Case(
        "alice@example.org",
        (user("alice"), user("bob"), group("alice", f"uid=bob,{OU}")),
        top=GROUPS_ON,
        source=f"cn=alice,{GOU}",
        detail="the account wins",
    ),
    routing.Rule.GROUP_MEMBER_SKIPPED: Case(
        "staff@example.org",
        (user("alice"), user("dora", mailDisableMessage="gone"), group("staff", f"uid=alice,{OU}", f"uid=dora,{OU}")),
        top=GROUPS_ON,
        source=f"cn=staff,{GOU}",
        detail="is disabled",
    ),
    routing.Rule.GROUP_CYCLE: Case(
        "ops@example.org",
        (
            user("alice"),
            user("bob"),
            group("ops", f"uid=alice,{OU}", f"cn=admins,{GOU}"),
            group("admins", f"uid=bob,{OU}", f"cn=ops,{GOU}"),
        ),
        top=GROUPS_ON,
        source=f"cn=ops,{GOU}",
        detail="group cycle through",
    ),
    routing.Rule.NO_MAILBOX: Case(
        "mal@example.org",
        (user("mal", homeDirectory="/etc"),),
        top=BOXES,
        source=f"uid=mal,{OU}",
        detail="is not under /var/vmail; no mailbox",
    ),
    routing.Rule.GROUP: Case(
        "staff@example.org",
        (user("alice"), group("staff", f"uid=alice,{OU}")),
        top=GROUPS_ON,
        source=f"cn=staff,{GOU}",
        detail="alice@example.org",
    ),
    routing.Rule.TARGET_DROPPED: Case(
        "hostmaster@example.org",
        (user("alice"), user("dora", mailDisableMessage="gone")),
        static_of(hostmaster=["alice", "dora"]),
        source="aliases.hostmaster",
        detail="target dora@example.org is disabled; dropped",
    ),
    routing.Rule.NO_TARGET: Case(
        "x001@example.org",
        (user("x001", emailForward="d001@example.org"), user("d001", mailDisableMessage="gone")),
        source=f"uid=x001,{OU}",
        detail="rejected with the message of d001@example.org",
    ),
}


def test_every_rule_has_a_case() -> None:
    assert set(CASES) == set(routing.Rule), "a new Rule needs a case here (and a docs line)"


@pytest.mark.parametrize("rule", list(routing.Rule), ids=lambda r: r.value)
def test_each_rule_is_reported_for_the_address_it_concerns(rule: routing.Rule, tmp_path: Path) -> None:
    case = CASES[rule]
    answer = ask(cfg(tmp_path, **(case.top or {})), case.address, *case.entries, static=case.static)
    found = rules(answer).get(rule)
    assert found, f"{rule} not reported for {case.address}: {answer.render()}"
    assert any(case.source in e.source and case.detail in e.detail for e in found), answer.render()
    assert all(e.address == answer.canonical for e in answer.events)
    assert "hunter2" not in answer.render() and "5en6G6Me" not in answer.render()


def test_a_broken_loop_shows_what_each_output_still_holds(tmp_path: Path) -> None:
    case = CASES[routing.Rule.LOOP_BROKEN]
    answer = ask(cfg(tmp_path), "k@example.net", *case.entries)
    assert (answer.address, answer.canonical) == ("k@example.net", "k@example.org")
    outputs = present(answer)
    assert outputs["postfix-virtual"] == (("k@example.net", "k@example.org"), ("k@example.org", "k@external.example"))
    assert outputs["postfix-transport"] == (("k@example.org", "smtp:[srs.example.org]"),)
    assert "postfix-access" not in outputs and "dovecot-passwd" not in outputs
    loop = rules(answer)[routing.Rule.LOOP_BROKEN][0]
    assert (loop.source, loop.attribute) == (K, "emailForward") and Y in loop.detail


def test_retired_and_disabled_accounts_are_absent_or_only_refused(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    retired = ask(c, "oscar", *CASES[routing.Rule.RETIRED].entries)
    assert not retired.found and present(retired) == {}
    disabled = ask(c, "dora@example.org", *CASES[routing.Rule.DISABLED].entries)
    assert present(disabled) == {"postfix-access": (("dora@example.org", "REJECT gone fishing"),)}


def test_the_passwd_line_is_shown_redacted_and_a_login_conflict_names_both_dns(tmp_path: Path) -> None:
    answer = ask(cfg(tmp_path), "SAM@Example.ORG", *CASES[routing.Rule.LOGIN_CONFLICT].entries)
    (login, value), *_ = present(answer)["dovecot-passwd"]
    assert login == "sam" and value.startswith("{SSHA}<hash sha256:") and SSHA[6:] not in answer.render()
    conflict = rules(answer)[routing.Rule.LOGIN_CONFLICT][0]
    assert conflict.source == f"cn=aaa-sam,{OU}" and f"uid=sam,{OU}" in conflict.detail


def test_an_external_address_and_an_unknown_one(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    unknown = ask(c, "nobody@example.org", user("alice"))
    assert not unknown.found and unknown.events == ()
    assert "not present" in unknown.render() and "rules: none" in unknown.render()
    outside = ask(c, "x@other.example", user("m", mailLocalAddress="x@other.example"))
    assert outside.canonical == "x@other.example"
    assert [e.rule for e in outside.events] == [routing.Rule.VALUE_DROPPED]


def test_a_bad_address_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(explain.ExplainError, match=r"'a b@example\.org'"):
        ask(cfg(tmp_path), "a b@example.org")


def test_installed_bytes_are_answered_and_a_difference_is_flagged(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    installed = {"postfix-recipients": b"alice@example.net\tOK\nalice@example.org\tOK\nold@example.org\tOK\n"}
    answer = ask(c, "old@example.org", user("alice"), installed=installed)
    recipients = next(o for o in answer.outputs if o.name == "postfix-recipients")
    assert recipients.lines == (("old@example.org", "OK"),) and recipients.differs
    assert "installed file differs" in answer.render()


def test_json_lists_every_output_and_rule(tmp_path: Path) -> None:
    case = CASES[routing.Rule.LOOP_BROKEN]
    doc = json.loads(explain.dumps(ask(cfg(tmp_path), "k@example.org", *case.entries)))
    assert doc["found"] is True and doc["canonical"] == "k@example.org"
    assert [o["name"] for o in doc["outputs"]] == [e["kind"] for e in EXPORTERS]
    assert {r["rule"] for r in doc["rules"]} == {"account", "forward", "loop-broken"}


def test_a_trace_does_not_change_the_model(tmp_path: Path) -> None:
    entries = tuple(e for case in CASES.values() for e in case.entries)
    c = cfg(tmp_path)
    s = routing.Settings(DOMAIN, c.routing.domain_aliases, c.routing.attributes)
    snap = Snapshot(entries, "test")
    trace: routing.Trace = []
    assert routing.build(snap, Static(), s, TODAY, trace=trace)[0] == routing.build(snap, Static(), s, TODAY)[0]
    assert trace


# -- the command --------------------------------------------------------------------------------
def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ldapsync", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_cli_explains_from_the_installed_generation_without_writing(tmp_path: Path) -> None:
    ldif = tmp_path / "dir.ldif"
    ldif.write_text(
        f"dn: uid=k,{OU}\nuid: k\nemailForward: y@example.org, k@external.example\n\n"
        f"dn: uid=y,{OU}\nuid: y\nemailForward: k@example.org\nmailPassword: {SSHA}\n\n"
    )
    path = siteconfig.write_config(tmp_path, exporters=EXPORTERS, ldif=ldif)
    assert run("-c", path, "--once").returncode == 0
    ldif.write_text("")  # explain must not read the source: the installed generation answers
    before = tree(tmp_path)
    text = run("-c", path, "explain", "k@example.org")
    assert text.returncode == 0, text.stderr
    assert "from generation " in text.stdout and "loop-broken" in text.stdout and f"(with {Y})" in text.stdout
    doc = json.loads(run("-c", path, "explain", "--json", "y").stdout)
    passwd = next(o for o in doc["outputs"] if o["name"] == "dovecot-passwd")
    assert passwd["entries"][0]["value"].startswith("{SSHA}<hash") and SSHA[6:] not in json.dumps(doc)
    assert run("-c", path, "explain", "nobody@example.org").returncode == 1
    bad = run("-c", path, "explain", "|cmd@example.org")
    assert bad.returncode == 2 and "explain" in bad.stderr
    assert tree(tmp_path) == before, "explain is read-only"


def test_cli_without_a_generation_says_how_to_get_one(tmp_path: Path) -> None:
    path = siteconfig.write_config(tmp_path, exporters=EXPORTERS)
    proc = run("-c", path, "explain", "alice@example.org")
    assert proc.returncode == 2 and "--live" in proc.stderr


@pytest.mark.slapd
def test_cli_live_reads_the_directory(slapd: Any, tmp_path: Path) -> None:
    path = siteconfig.write_config(
        tmp_path,
        exporters=EXPORTERS,
        source={
            "ldap": {
                "uri": slapd.uri,
                "bind_dn": slapd.service_dn,
                "bind_password_file": str(slapd.service_password_file),
                "base_dn": slapd.users_dn,
                "filter": "(objectClass=inetOrgPerson)",
            }
        },
    )
    slapd.modify(f"dn: uid=alice,{OU}\nchangetype: modify\nreplace: accountStatus\naccountStatus: Inactive\n")
    proc = run("-c", path, "explain", "--live", "--json", "alice@example.org")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["origin"] == f"live ldap:{slapd.uri}"
    unrecognised = [r for r in doc["rules"] if r["rule"] == "status-unrecognised"]
    assert unrecognised and unrecognised[0]["source"] == f"uid=alice,{OU}"
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("generations/*"))


def test_a_hosted_domain_address_shows_its_mailbox_and_the_owning_login(tmp_path: Path) -> None:
    c = cfg(
        tmp_path,
        attributes={"alias": "mailLocalAddress", "address": "mail"},
        domains={"example.com": ["example.info"]},
        mailbox={"home_root": "/var/vmail", "home": "/var/vmail/{domain}/{login}", "uid": 5000, "gid": 5000},
        exporters=[
            *EXPORTERS,
            {"kind": "postfix-virtual-mailbox", "path": "out/vmailbox"},
            {"kind": "dovecot-userdb", "path": "out/userdb"},
        ],
    )
    answer = ask(c, "Bob.Smith@Example.INFO", user("bsmith", mail="bob.smith@example.com", mailPassword=SSHA))
    assert (answer.address, answer.canonical) == ("bob.smith@example.info", "bob.smith@example.com")
    found = present(answer)
    assert found["postfix-virtual"] == (("bob.smith@example.info", "bob.smith@example.com"),)
    assert [k for k, _ in found["postfix-virtual-mailbox"]] == ["bob.smith@example.com"]
    assert [k for k, _ in found["dovecot-userdb"]] == ["bsmith"] and found["dovecot-passwd"][0][0] == "bsmith"
    assert rules(answer)[routing.Rule.ACCOUNT][0].detail == "login bsmith"


def test_explain_lists_what_points_at_an_address_including_dropped_dead_references(tmp_path: Path) -> None:
    entries = (
        user("alice"),
        user("dora", mailDisableMessage="gone"),
        user("bob", emailForward="dora@example.org, bob@far.example"),
        user("carl", emailForward="alice@example.org"),
        group("staff", f"uid=alice,{OU}", f"uid=dora,{OU}"),
    )
    static = static_of(hostmaster=["alice", "dora"])
    c = cfg(tmp_path, **GROUPS_ON)
    dora = ask(c, "dora@example.org", *entries, static=static)
    got = {(r.address, r.kind, r.source, r.attribute, r.dropped) for r in dora.references}
    assert got == {
        ("bob@example.org", "forward", f"uid=bob,{OU}", "emailForward", "target dora@example.org is disabled; dropped"),
        (
            "hostmaster@example.org",
            "static alias",
            f"{STATIC_FILE}: aliases.hostmaster",
            "",
            ("target dora@example.org is disabled; dropped"),
        ),
        ("staff@example.org", "group", f"cn=staff,{GOU}", "member", "target dora@example.org is disabled; dropped"),
    }
    alice = ask(c, "alice@example.org", *entries, static=static)
    assert {(r.address, r.kind, r.source, r.dropped) for r in alice.references} == {
        ("carl@example.org", "forward", f"uid=carl,{OU}", ""),
        ("hostmaster@example.org", "static alias", f"{STATIC_FILE}: aliases.hostmaster", ""),
        ("staff@example.org", "group", f"cn=staff,{GOU}", ""),
    }
    text = dora.render()
    assert "referenced by:" in text and f"bob@example.org  from uid=bob,{OU} (emailForward)  DROPPED:" in text
    doc = json.loads(explain.dumps(alice))
    assert {r["address"] for r in doc["referenced_by"]} == {
        "carl@example.org",
        "hostmaster@example.org",
        "staff@example.org",
    }
    lone = ask(c, "carl@example.org", *entries, static=static)
    assert lone.references == () and "referenced by: nothing" in lone.render()
