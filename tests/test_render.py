"""render: a spliced output is byte-for-byte what the exporter renders whole, after any change.

Random directories over a small universe of logins and addresses (so accounts, aliases,
groups, forwards and static entries collide), changed a few entries at a time, under every
option of every built-in exporter; after each change the renderer splices its previous
output and must give exactly render(new model), with the +added -removed ~changed counts the
guards would get by parsing both files.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldapsync import guard, routing, schema
from ldapsync.directory import Entry, Snapshot, make_entry, sort_entries
from ldapsync.exporters import Exporter, exporter_class
from ldapsync.render import FULL, Renderer, diff_models, splice
from ldapsync.routing import Engine, ModelChange, RoutingModel, Settings
from ldapsync.static import Static, StaticEntry

DOMAIN = "example.org"
TODAY = date(2026, 11, 21)
OU, GOU = "ou=users,dc=example,dc=org", "ou=groups,dc=example,dc=org"
ATTRS = schema.resolve(
    "ud-ldap",
    {
        "address": "mail",
        "alias": "mailLocalAddress",
        "uid_number": "uidNumber",
        "gid_number": "gidNumber",
        "home": "homeDirectory",
        "quota": "mailQuota",
    },
    file=None,
)
HOSTED = {"example.com": ("example.info",), "other.example": ()}
BOXES = routing.MailboxSettings(home="/var/vmail/{domain}/{login}", home_root="/var/vmail", uid=5000, gid=5000)
SSHA = "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ=="
SSHA512 = "{SSHA512}nhq5J9y0EeACnKDvYP1Km20MoVnJek4+1UhT4NEbr+JQ4Fq3EyPguA1GqV4muhb8ryob8y5ejhEhi1+dEhV0P+bOBbw72kvb"
STATIC = Static(
    Path("/etc/ldapsync/mail.yaml"),
    (
        StaticEntry("postmaster@example.org", ("alice@example.org", "root@elsewhere.example"), "aliases.postmaster"),
        StaticEntry("sales@example.org", ("bob@example.org",), "aliases.sales"),
    ),
    (StaticEntry("carol@example.org", ("carol@elsewhere.example",), "forwards.carol"),),
)

# Every option of every built-in: (kind, options).
EXPORTERS: list[tuple[str, dict[str, Any]]] = [
    ("postfix-virtual", {}),
    ("postfix-virtual", {"include": ["aliases"]}),
    ("postfix-virtual", {"include": ["forwards"]}),
    ("postfix-transport", {"nexthop": "smtp:[srs.example.org]"}),
    ("postfix-recipients", {}),
    ("postfix-sender-login", {}),
    ("postfix-access", {}),
    ("postfix-access", {"action": "DEFER"}),
    ("postfix-virtual-mailbox", {}),
    ("postfix-virtual-mailbox", {"path_template": "{local}@{domain}/"}),
    ("dovecot-passwd", {}),
    ("dovecot-userdb", {}),
    ("dovecot-userdb", {"address_keys": True}),
    ("dovecot-userdb", {"address_keys": True, "fields": {"quota_rule": "*:storage={quota}", "mail": "maildir:{home}"}}),
    ("dovecot-userdb", {"fields": {"quota_rule": "*:storage={quota}"}}),
]

LOGINS = ("alice", "bob", "carol", "dave", "erin", "sales")
LOCALS = ("alice", "bob", "carol", "sales", "team", "x")
DOMAINS = (DOMAIN, "host1.example.org", "example.net", "example.com", "example.info", "other.example", "far.example")
address = st.builds(lambda local, dom: f"{local}@{dom}", st.sampled_from(LOCALS), st.sampled_from(DOMAINS))


@st.composite
def account(draw: st.DrawFn) -> Entry:
    login = draw(st.sampled_from(LOGINS))
    raw: dict[str, list[str]] = {"uid": [login]}
    for name, values in (
        ("mail", st.lists(address, min_size=1, max_size=2)),
        ("mailLocalAddress", st.lists(address, min_size=1, max_size=2)),
        ("emailForward", st.lists(st.one_of(address, st.just(f"{login}@{DOMAIN}")), min_size=1, max_size=2)),
        ("mailPassword", st.lists(st.sampled_from([SSHA, SSHA512, "plaintext"]), min_size=1, max_size=1)),
        ("mailDisableMessage", st.just(["gone"])),
        ("accountStatus", st.sampled_from([["inactive"], ["retiring 2099-01-01"]])),
        ("uidNumber", st.sampled_from([["5001"], ["70000"]])),  # 70000: out of range, no mailbox
        ("homeDirectory", st.sampled_from([[f"/var/vmail/special/{login}"], ["/etc/x"]])),
        ("mailQuota", st.sampled_from([["2G"], ["1%"]])),
    ):
        if draw(st.integers(0, 3)) == 0:
            raw[name] = draw(values)  # type: ignore[arg-type]
    return make_entry(f"uid={login},ou=u{draw(st.integers(0, 1))},{OU}", raw, None, [])


@st.composite
def group(draw: st.DrawFn) -> Entry:
    cn = draw(st.sampled_from(["staff", "team", "sales"]))
    members = draw(st.lists(st.sampled_from(LOGINS), max_size=3))
    raw = {"objectClass": ["groupOfNames"], "cn": [cn], "member": [f"uid={m},ou=u0,{OU}" for m in members]}
    if draw(st.booleans()):
        raw["member"].append(f"cn={draw(st.sampled_from(['staff', 'team']))},{GOU}")  # nested, maybe a cycle
    return make_entry(f"cn={cn},{GOU}", raw, None, [])


entry = st.one_of(account(), account(), group())


@st.composite
def histories(draw: st.DrawFn) -> list[list[Entry]]:
    """A directory and up to three later versions of it, each a few entries added, changed or deleted."""
    versions = [draw(st.lists(entry, max_size=10))]
    for _ in range(draw(st.integers(1, 3))):
        current = list(versions[-1])
        for _ in range(draw(st.integers(1, 3))):
            what = draw(st.sampled_from(["add", "change", "delete"]))
            if what == "add" or not current:
                current.append(draw(entry))
            elif what == "change":
                i = draw(st.integers(0, len(current) - 1))
                current[i] = Entry(current[i].dn, draw(entry).attributes)
            else:
                del current[draw(st.integers(0, len(current) - 1))]
        versions.append(current)
    return versions


@st.composite
def build_settings(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "domain": DOMAIN,
        "domain_aliases": draw(st.sampled_from([(), ("example.net",), ("host1.example.org", "example.net")])),
        "hosted": draw(st.sampled_from([{}, HOSTED])),
        "groups": draw(
            st.sampled_from([None, routing.GroupSettings(), routing.GroupSettings(members_send_as_group=True)])
        ),
        "mailbox": draw(st.sampled_from([None, BOXES])),
        "login_by_address": draw(st.booleans()),
        "static": draw(st.sampled_from([Static(), STATIC])),
    }


def build(entries: list[Entry], options: dict[str, Any]) -> RoutingModel:
    unique = {e.dn: e for e in entries}  # a directory has one entry per DN
    opts = dict(options)
    static = opts.pop("static")
    m, _ = routing.build(Snapshot(tuple(unique.values()), "test"), static, Settings(attributes=ATTRS, **opts), TODAY)
    return m


def exporters() -> Iterator[Exporter]:
    for kind, options in EXPORTERS:
        yield exporter_class(kind)(options)


def assert_spliced_like_render(renderer: Renderer, new: RoutingModel, change: ModelChange) -> None:
    exp = renderer.exporter
    before = renderer._data
    assert before is not None
    got = renderer.render(new, change)
    want = exp.render(new)
    assert got.data == want, (exp.kind, exp.settings)
    assert got.edit is not None and got.edit.base is before, "rendered whole instead of spliced"
    assert got.lines == want.count(b"\n")
    e = got.edit
    d = guard.diff(exp.kind, before, want, exp.parse, values=True)
    assert (e.added, e.removed, e.changed) == (d.added, d.deleted, d.changed), (exp.kind, exp.settings)
    # the lines a compiled map would be patched with: exactly the difference
    old_lines, new_lines = set(before.splitlines(keepends=True)), set(want.splitlines(keepends=True))
    assert sorted(e.put) == sorted(new_lines - old_lines)
    assert sorted(e.gone) == sorted(set(exp.parse(before)) - set(exp.parse(want)))
    if want == before:
        assert got.data is before  # unchanged: the same object, nothing to install or hash


@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(histories(), build_settings(), st.data())
def test_spliced_outputs_equal_whole_renders(
    versions: list[list[Entry]], options: dict[str, Any], data: st.DataObject
) -> None:
    models = [build(v, options) for v in versions]
    for exp in exporters():
        exact, wider = Renderer(exp), Renderer(exp)
        exact.render(models[0], FULL)
        wider.render(models[0], FULL)
        for old, new in pairwise(models):
            change = diff_models(old, new)
            assert_spliced_like_render(exact, new, change)
            # a change that names more keys than changed (an engine may over-report) changes nothing
            keys = sorted({*old.users, *old.aliases, *new.forwards, *new.disabled, *new.local, "nobody@example.org"})
            keys += ["alice@example.net", "alice@example.info", "x@far.example"]  # never model keys: ignored
            logins = sorted({*old.passwords, *new.mailboxes, "nobody", "alice@example.org"})
            extra = ModelChange(
                change.addresses | {"nobody@example.org", *data.draw(st.lists(st.sampled_from(keys)))},
                change.logins | {"nobody", *data.draw(st.lists(st.sampled_from(logins)))},
            )
            assert extra.addresses > change.addresses and extra.logins > change.logins  # strictly more
            assert_spliced_like_render(wider, new, extra)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(histories(), build_settings())
def test_the_model_engines_changes_splice_into_whole_renders(
    versions: list[list[Entry]], options: dict[str, Any]
) -> None:
    """What the agent does: the engine updates its model in place and names what changed."""
    opts = dict(options)
    static = opts.pop("static")
    engine = Engine(Settings(attributes=ATTRS, **opts), static)
    renderers = [Renderer(exp) for exp in exporters()]
    for version in versions:
        entries = sort_entries({e.dn: e for e in version}.values())
        routed, _, change = engine.update(Snapshot(entries, "test"), TODAY)
        for renderer in renderers:
            got = renderer.render(routed, change)
            assert got.data == renderer.exporter.render(routed), (renderer.exporter.kind, renderer.exporter.settings)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(histories(), build_settings())
def test_diff_models_names_exactly_the_keys_whose_values_differ(
    versions: list[list[Entry]], options: dict[str, Any]
) -> None:
    old, new = build(versions[0], options), build(versions[-1], options)
    change = diff_models(old, new)
    assert not change.full
    tables = ("users", "aliases", "forwards", "disabled", "sender_logins", "local", "groups")
    for names, keys in ((tables, change.addresses), (("passwords", "mailboxes"), change.logins)):
        for name in names:
            a, b = getattr(old, name), getattr(new, name)
            for k in {*a, *b}:
                assert (a.get(k) != b.get(k)) <= (k in keys), (name, k)
        assert all(any(getattr(old, n).get(k) != getattr(new, n).get(k) for n in names) for k in keys)


def models_of(*entries: Entry, **options: Any) -> RoutingModel:
    return build(list(entries), {**{"domain": DOMAIN, "domain_aliases": ("example.net",), "hosted": {}}, **options})


def user(login: str, **attrs: str) -> Entry:
    return make_entry(f"uid={login},{OU}", {"uid": [login], **{k: [v] for k, v in attrs.items()}}, None, [])


def test_userdb_address_line_goes_when_the_mailbox_goes_but_the_account_stays() -> None:
    """The address line derives from the login's record: dropped although no address key changed."""
    options = {"mailbox": BOXES, "static": Static(), "groups": None}
    old = models_of(user("bob", emailForward="bob@far.example"), **options)
    new = models_of(user("bob", emailForward="bob@far.example", uidNumber="70000"), **options)
    change = diff_models(old, new)
    assert change.logins == {"bob"} and not change.addresses  # bob forwards: not local either way
    exp = exporter_class("dovecot-userdb")({"address_keys": True})
    renderer = Renderer(exp)
    first = renderer.render(old).data
    assert b"bob@example.org::5000:5000::" in first
    assert_spliced_like_render(renderer, new, change)
    assert b"bob@example.org" not in renderer.render(new, ModelChange()).data


def test_domains_change_renders_whole() -> None:
    options = {"static": Static(), "groups": None, "mailbox": None}
    old, new = models_of(user("alice"), **options), models_of(user("alice"), **{**options, "domain_aliases": ()})
    assert diff_models(old, new).full
    renderer = Renderer(exporter_class("postfix-recipients")({}))
    renderer.render(old)
    got = renderer.render(new, ModelChange(frozenset({"alice@example.org"})))  # even if told less
    assert got.data == b"alice@example.org\tOK\n" and got.edit is None


class Plugin(Exporter):
    """A site's exporter without rows(): rendered whole whenever anything changed."""

    kind = "site-plugin"
    calls = 0

    def render(self, model: RoutingModel) -> bytes:
        Plugin.calls += 1
        return "".join(f"{a}\n" for a in sorted(model.users)).encode()


def test_an_exporter_without_rows_is_rendered_whole_after_any_change() -> None:
    options = {"static": Static(), "groups": None, "mailbox": None}
    old, new = models_of(user("alice"), **options), models_of(user("alice"), user("bob"), **options)
    renderer = Renderer(Plugin({}))
    first = renderer.render(old)
    assert Plugin.calls == 1
    assert renderer.render(old, ModelChange()).data is first.data and Plugin.calls == 1  # nothing changed
    got = renderer.render(new, ModelChange(logins=frozenset({"bob"})))
    assert got.data == b"alice@example.org\nbob@example.org\n" and Plugin.calls == 2


@pytest.mark.parametrize(
    ("keys", "rows", "want", "counts"),
    [
        (["a"], {"a": "1"}, b"a\t1\nb\t2\nd\t4\n", (1, 0, 0)),
        (["e"], {"e": "5"}, b"b\t2\nd\t4\ne\t5\n", (1, 0, 0)),
        (["c"], {"c": "3"}, b"b\t2\nc\t3\nd\t4\n", (1, 0, 0)),
        (["b", "d"], {}, b"", (0, 2, 0)),
        (["b", "c", "d"], {"b": "9", "c": "3", "d": "4"}, b"b\t9\nc\t3\nd\t4\n", (1, 0, 1)),
        (["bb", "d"], {"bb": "x"}, b"b\t2\nbb\tx\n", (1, 1, 0)),
        (["b"], {"b": "2"}, None, (0, 0, 0)),  # the same line: the same object
    ],
)
def test_splice_edits_only_the_named_lines(
    keys: list[str], rows: dict[str, str], want: bytes | None, counts: tuple[int, int, int]
) -> None:
    data = b"b\t2\nd\t4\n"
    out = splice(data, "\t", keys, rows)
    assert out is not None
    assert (out.added, out.removed, out.changed) == counts
    if want is None:
        assert out.data is data
    else:
        assert out.data == want


def test_splice_refuses_a_key_holding_the_separator() -> None:
    assert splice(b"a\t1\n", "\t", ["a\tb"], {}) is None
