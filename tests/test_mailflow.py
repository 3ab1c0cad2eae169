"""Mail flow through the documented hosts delivers what the directory says, once, and never loops.

For random directories (accounts that forward, keep a copy, chain into the domain; nested
groups; static aliases and forwards overriding LDAP; disabled, retired and unknown targets;
forward loops) every address is sent one message through a model of the documented site
(tests/mailflow.py: Postfix semantics applied to docs/snippets and to the maps the real
pipeline renders) and the outcome is compared with the intent (tests/mailintent.py, written
from docs/configuration.md alone): each intended destination receives exactly one copy,
nothing accepted is bounced later or loops, and every address that must be refused is
refused at RCPT by the MX.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import splitdesign
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mailflow import (
    HOSTNAMES,
    REPO,
    SNIPPETS,
    Delivery,
    Host,
    HostSpec,
    ModelError,
    Outcome,
    Site,
    installed_outputs,
    one_host_spec,
    parse_main_cf,
    render_role,
    role_spec,
)
from mailintent import DOMAINS, Account, Directory, Group, Intent, Resolver, canonical, group_dn, user_dn
from profiles import examples

ROLES = ("mx", "srs", "mailbox", "submission")

LOGINS = ("u0", "u1", "u2", "u3", "u4", "u5")
GROUPS = ("g0", "g1", "g2")
STATIC_ORDER = ("s0", "s1", "s2", "u5", "g2")  # a static entry targets only later static names: no static-only loop
EXTERNAL = ("x0@ext.example", "x1@ext.example", "bounces@lists.example.net")
UNKNOWN = "nobody@example.org"


def in_some_domain(draw: Any, name: str) -> str:
    """A target in our domains, as an admin may write it: bare, canonical or in an alias domain."""
    form: str = draw(st.sampled_from(("bare", *DOMAINS)))
    return name if form == "bare" else f"{name}@{form}"


@st.composite
def directories(draw: Any) -> Directory:
    present = draw(st.lists(st.sampled_from(LOGINS), unique=True, min_size=3))
    states = {login: draw(st.sampled_from(("active", "active", "active", "disabled", "retired"))) for login in present}
    live_logins = [x for x in LOGINS if states.get(x) == "active"]
    # Names a target may take: live accounts, groups, static names, and dead ones (disabled,
    # retired, absent, unknown: ldapsync drops them and refuses an address left with nothing).
    target_names = sorted({*live_logins, *GROUPS, "s0", "s1", "s2", *LOGINS, "nobody"})

    def target(exclude: str = "") -> str:
        if draw(st.integers(0, 3)) == 0:
            return str(draw(st.sampled_from(EXTERNAL)))
        name: str = draw(st.sampled_from([n for n in target_names if n != exclude] or ["x0@ext.example"]))
        return name if "@" in name else in_some_domain(draw, name)

    accounts = []
    for login in present:
        forward: list[str] = []
        if states[login] == "active" and draw(st.booleans()):
            forward = [target(exclude=login) for _ in range(draw(st.integers(1, 3)))]
            if draw(st.booleans()):
                forward.append(in_some_domain(draw, login))  # keeps a copy
        accounts.append(Account(login, tuple(forward), states[login], f"{login} has left"))
    active = [i for i, a in enumerate(accounts) if a.state == "active"]
    if len(active) >= 2 and draw(st.booleans()):  # a forward loop: k -> y, y -> k
        i, j = draw(st.lists(st.sampled_from(active), min_size=2, max_size=2, unique=True))
        for me, other in ((i, j), (j, i)):
            a = accounts[me]
            accounts[me] = replace(a, forward=(*a.forward, in_some_domain(draw, accounts[other].login)))
    groups = []
    for name in draw(st.lists(st.sampled_from(GROUPS), unique=True)):
        members = draw(
            st.lists(st.sampled_from([user_dn(x) for x in LOGINS] + [group_dn(g) for g in GROUPS]), max_size=3)
        )
        addresses = [target() for _ in range(draw(st.integers(0, 2)))]
        if not members and not addresses:
            addresses = [draw(st.sampled_from(EXTERNAL))]
        groups.append(Group(name, tuple(dict.fromkeys(members)), tuple(dict.fromkeys(addresses))))
    aliases: dict[str, tuple[str, ...]] = {}
    forwards: dict[str, str] = {}
    for i, name in enumerate(STATIC_ORDER):
        if draw(st.integers(0, 2)) != 0:
            continue
        later = list(STATIC_ORDER[i + 1 :])
        names = [n for n in target_names if n not in STATIC_ORDER or n in later]
        pool = [*names, *EXTERNAL]

        def pick(pool: list[str] = pool) -> str:
            t = draw(st.sampled_from(pool))
            return t if "@" in t else in_some_domain(draw, t)

        if draw(st.integers(0, 3)) == 0:
            forwards[name] = pick()
        else:
            aliases[name] = tuple(dict.fromkeys(pick() for _ in range(draw(st.integers(1, 3)))))
    d = Directory(tuple(accounts), tuple(groups), aliases, forwards)
    return d


def probe_addresses(d: Directory) -> list[str]:
    """Every name the strategy or `d` uses, in every domain, and addresses that are not ours."""
    names = (*LOGINS, *GROUPS, *STATIC_ORDER, "nobody", *(a.login for a in d.accounts), *(g.name for g in d.groups))
    names += (*d.aliases, *d.forwards)
    return [f"{n}@{dom}" for n in dict.fromkeys(names) for dom in DOMAINS] + list(EXTERNAL)


FOUR_HOSTS = "MX, SRS, mailbox and submission hosts (docs/snippets)"
# The one-host recipe and the MX and SRS host on one box come from docs/snippets when it has
# them (postfix-onehost-main.cf, postfix-mx-srs-main.cf and their ldapsync YAML); until then
# the one host is built from the recipe in tests/mailflow.py and the shared box is not checked.
ONE_HOST_SNIPPETS = (SNIPPETS / "postfix-onehost-main.cf").exists()
ONE_HOST = "one host (docs/snippets)" if ONE_HOST_SNIPPETS else "one host (recipe built in tests/mailflow.py)"
MX_SRS = "MX and SRS host on one box + mailbox (docs/snippets)"
DESIGNS = (FOUR_HOSTS, ONE_HOST, *((MX_SRS,) if (SNIPPETS / "postfix-mx-srs-main.cf").exists() else ()))
# Not documented any more, only built to prove the property catches it (tests/splitdesign.py):
# the MX expands aliases and groups, a transport map sends forwarded addresses to the SRS
# host, whose virtual map expands the forwards.
SPLIT = "split design: the MX expands aliases, the SRS host forwards (docs/snippets at 6892c84)"


def split_snippets(directory: Path) -> Path:
    """docs/snippets with the split design's MX and SRS files (tests/splitdesign.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in SNIPPETS.iterdir():
        (directory / f.name).write_text(f.read_text())
    for name, text in splitdesign.SNIPPETS.items():
        (directory / name).write_text(text)
    return directory


def rendered(d: Directory, tmp: Path) -> tuple[dict[str, dict[str, bytes]], Path, Path]:
    """Every role's outputs for `d`, by the real pipeline (from an LDIF and a mail.yaml)."""
    ldif, static = tmp / "directory.ldif", tmp / "mail.yaml"
    ldif.write_text(d.ldif())
    static.write_text(d.mail_yaml())
    return {r: render_role(r, ldif=ldif, static=static) for r in ROLES}, ldif, static


def sites(d: Directory, *, srs_main_cf: str | None = None, designs: tuple[str, ...] = DESIGNS) -> dict[str, Site]:
    with tempfile.TemporaryDirectory(prefix="mailflow-") as tmp:
        outputs, ldif, static = rendered(d, Path(tmp))
        out = {}
        if FOUR_HOSTS in designs:
            out[FOUR_HOSTS] = Site.from_docs(roles=ROLES, outputs_by_role=outputs)
        if SPLIT in designs:  # `srs_main_cf` replaces the split design's SRS main.cf
            split = split_snippets(Path(tmp) / "split")
            main_cf = {"srs": srs_main_cf} if srs_main_cf is not None else None
            by_role = {r: render_role(r, ldif=ldif, static=static, snippets=split) for r in ROLES}
            out[SPLIT] = Site.from_docs(roles=ROLES, outputs_by_role=by_role, snippets=split, main_cf=main_cf)
        if ONE_HOST in designs and ONE_HOST_SNIPPETS:
            one = render_role("onehost", ldif=ldif, static=static)
            out[ONE_HOST] = Site([role_spec("onehost", one, name="mx", hostnames=("mail.example.org",))])
        elif ONE_HOST in designs:
            out[ONE_HOST] = Site([one_host_spec(ldif=ldif, static=static)])
        if MX_SRS in designs:
            box = render_role("mx-srs", ldif=ldif, static=static)
            hostnames = (HOSTNAMES["mx"], HOSTNAMES["srs"])
            mailbox = role_spec("mailbox", outputs["mailbox"])
            out[MX_SRS] = Site([role_spec("mx-srs", box, name="mx", hostnames=hostnames), mailbox])
        return out


def wrong(outcome: Outcome, intent: Intent) -> str | None:
    """Why `outcome` is not what `intent` says, or None."""
    if intent.refused is not None:
        if outcome.accepted:
            return f"must be refused ({intent.refused}) but was accepted"
        if intent.refused.startswith("disabled: ") and intent.refused[10:] not in (outcome.rejected or ""):
            return f"refused without the disabled account's message: {outcome.rejected}"
        return None
    if not outcome.accepted:
        return f"must reach {sorted(map(str, intent.destinations))} but was refused: {outcome.rejected}"
    if outcome.looped:
        return "looped"
    if outcome.bounces:
        return "accepted, then bounced"
    got = {str(k): v for k, v in outcome.deliveries.items()}
    if set(outcome.deliveries) != intent.destinations:
        return f"delivered {got}, intended {sorted(map(str, intent.destinations))}"
    if any(n != 1 for n in outcome.deliveries.values()):
        return f"delivered {got}, intended once each"
    return None


def check_site(d: Directory, site: Site, label: str, addresses: list[str] | None = None) -> list[str]:
    """What goes wrong for each address: sent from the Internet, and (where the site has a
    submission host) from one of our users, who must get what the MX delivers or its refusal."""
    resolver = Resolver(d)
    problems = []
    for address in addresses or probe_addresses(d):
        outcome = site.send(address)
        intent = resolver.intend(address)
        why = wrong(outcome, intent)
        if why:
            problems.append(f"[{label}] {address}: {why}\n{outcome.describe()}")
        if "submission" in site.hosts and intent.refused != "not ours":
            submitted = site.send(address, via="submission")  # a user of ours writes to it
            same = submitted.deliveries == outcome.deliveries and submitted.looped == outcome.looped
            if outcome.accepted and not (same and submitted.bounces == outcome.bounces):
                problems.append(
                    f"[{label}, via submission] {address}: not what the MX delivers\n{submitted.describe()}"
                )
            if not outcome.accepted and [b.reason for b in submitted.bounces] != [f"mx said: {outcome.rejected}"]:
                problems.append(
                    f"[{label}, via submission] {address}: no bounce with the MX's reason\n{submitted.describe()}"
                )
    return problems


def describe(d: Directory) -> str:
    return f"--- directory.ldif\n{d.ldif()}--- mail.yaml\n{d.mail_yaml()}"


def check_all(d: Directory, addresses: list[str] | None = None, **kw: Any) -> None:
    problems = [p for label, site in sites(d, **kw).items() for p in check_site(d, site, label, addresses)]
    assert not problems, describe(d) + "\n\n" + "\n\n".join(problems[:6])


@settings(max_examples=examples(50), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(directories())
def test_every_address_reaches_what_the_directory_says_once(d: Directory) -> None:
    resolver = Resolver(d)
    intents = [resolver.intend(a) for a in probe_addresses(d)]
    event(f"live addresses: {min(sum(not i.dead for i in intents) // 10 * 10, 30)}+")
    for shape, present in (
        ("kept copy", any(a.login in {canonical(t).split("@")[0] for t in a.forward} for a in d.accounts)),
        ("destination reached along two routes", any(i.shared for i in intents)),
        ("static entry", bool(d.aliases or d.forwards)),
        ("group", bool(d.groups)),
        ("loop cut", resolver.loops_cut > 0),
    ):
        event(f"{shape}: {present}")
    check_all(d)


# -- shapes, one by one -----------------------------------------------------------------------

KEPT_COPY = Directory((Account("mallory", ("mallory@example.org", "mallory@elsewhere.example")),))
Cases = dict[str, set[str] | None]
SHAPES: dict[str, tuple[Directory, Cases]] = {
    "kept copy": (KEPT_COPY, {"mallory@example.org": {"mailbox:mallory", "external:mallory@elsewhere.example"}}),
    "in-domain forward": (
        Directory((Account("erin", ("alice@example.net",)), Account("alice"))),
        {"erin@example.org": {"mailbox:alice"}, "erin@host1.example.org": {"mailbox:alice"}},
    ),
    "chain": (
        Directory(
            (Account("a", ("b@example.org",)), Account("b", ("c@example.org", "b")), Account("c", ("c@x.example",)))
        ),
        {"a@example.org": {"mailbox:b", "external:c@x.example"}},
    ),
    "alias to a forwarded user": (
        Directory((Account("dave", ("dave@a.example",)),), aliases={"abuse": ("dave",)}),
        {"abuse@example.org": {"external:dave@a.example"}, "abuse@example.net": {"external:dave@a.example"}},
    ),
    "nested group": (
        Directory(
            (Account("alice"), Account("bob", ("bob@b.example",)), Account("carol", ("carol", "carol@c.example"))),
            (
                Group("staff", (user_dn("alice"), group_dn("ops"))),
                Group("ops", (user_dn("bob"), user_dn("carol"), group_dn("staff"))),
            ),
        ),
        {
            "staff@example.org": {
                "mailbox:alice",
                "external:bob@b.example",
                "mailbox:carol",
                "external:carol@c.example",
            },
            "ops@example.net": {"mailbox:alice", "external:bob@b.example", "mailbox:carol", "external:carol@c.example"},
        },
    ),
    "alias-domain address": (
        Directory((Account("alice"), Account("erin", ("erin", "erin@e.example")))),
        {"alice@host1.example.org": {"mailbox:alice"}, "erin@example.net": {"mailbox:erin", "external:erin@e.example"}},
    ),
    "forward to lists.example.net": (
        Directory(forwards={"noreply-bounces": "bounces@lists.example.net"}),
        {"noreply-bounces@example.org": {"external:bounces@lists.example.net"}, "x@lists.example.net": None},
    ),
    "static alias over an LDAP forward and a disabled account": (
        Directory(
            (Account("alice"), Account("bob", ("bob@b.example",)), Account("carol", (), "disabled", "carol left")),
            aliases={"bob": ("alice",), "carol": ("alice", "bob")},
        ),
        {"bob@example.org": {"mailbox:alice"}, "carol@example.org": {"mailbox:alice"}},
    ),
    "forward loop": (
        Directory((Account("k", ("y@example.org", "k@external.example")), Account("y", ("k@example.org",)))),
        {"k@example.org": {"external:k@external.example"}, "y@example.org": {"mailbox:y"}},
    ),
}
DEAD_SHAPES: dict[str, tuple[Directory, Cases]] = {
    "static alias with dead targets": (
        Directory(
            (Account("alice"), Account("bob", (), "disabled", "bob left"), Account("old", (), "retired")),
            aliases={"postmaster": ("alice", "bob", "old", "nobody")},
        ),
        {"postmaster@example.org": {"mailbox:alice"}, "bob@example.org": None},
    ),
    "static alias with only dead targets": (
        Directory((Account("bob", (), "disabled", "bob left"),), aliases={"abuse": ("bob", "nobody")}),
        {"abuse@example.org": None, "abuse@example.net": None},
    ),
    "forward to a disabled account": (
        Directory((Account("erin", ("bob@example.org", "erin@e.example")), Account("bob", (), "disabled", "gone"))),
        {"erin@example.org": {"external:erin@e.example"}},
    ),
    "group member address that is retired": (
        Directory((Account("alice"), Account("old", (), "retired")), (Group("team", (), ("alice", "old", "ghost")),)),
        {"team@example.org": {"mailbox:alice"}},
    ),
}


def check_shape(d: Directory, cases: dict[str, set[str] | None]) -> None:
    resolver = Resolver(d)
    for address, want in cases.items():  # the oracle says what the example says
        intent = resolver.intend(address)
        got = None if intent.dead else {str(x) for x in intent.destinations}
        assert got == want, f"the oracle disagrees with the example: {address}: {got}"
    check_all(d, list(dict.fromkeys([*cases, *probe_addresses(d)])))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shape(shape: str) -> None:
    check_shape(*SHAPES[shape])


@pytest.mark.parametrize("shape", sorted(DEAD_SHAPES))
def test_dead_target_shapes(shape: str) -> None:
    """Fails until the `routing` branch (dead targets dropped) is merged; see DEAD_TARGETS."""
    check_shape(*DEAD_SHAPES[shape])


def test_a_user_sending_through_the_submission_host_reaches_what_the_internet_reaches() -> None:
    """The submission host (master.cf: permit_sasl_authenticated) knows no address: it hands
    everything to our MX, so a live address gets the same copies; a refused one is refused
    by the MX and comes back to the user as a bounce naming the MX's reason."""
    d = SHAPES["nested group"][0]
    d = replace(d, accounts=(*d.accounts, Account("gone", (), "disabled", "gone for good")))
    site = sites(d, designs=(FOUR_HOSTS,))[FOUR_HOSTS]
    assert site.send("alice@example.org", via="submission").trail[0].startswith("submission: ")
    resolver = Resolver(d)
    for address in probe_addresses(d):
        direct, submitted = site.send(address), site.send(address, via="submission")
        if resolver.intend(address).refused == "not ours":
            assert submitted.accepted and submitted.sent_out == (("submission", address),), submitted.describe()
            continue
        assert submitted.accepted, submitted.describe()
        if direct.accepted:
            assert submitted.deliveries == direct.deliveries and not submitted.bounces, submitted.describe()
        else:
            assert not submitted.deliveries and [b.reason for b in submitted.bounces] == [
                f"mx said: {direct.rejected}"
            ], submitted.describe()
    assert "gone for good" in site.send("gone@example.org", via="submission").bounces[0].reason


SHARED = Directory((Account("u2", ("x0@ext.example",)),), aliases={"s1": ("u2", "x0@ext.example")})
SHARED_GROUP = Directory((Account("u1"), Account("u2", ("u1",))), (Group("g0", (user_dn("u1"), user_dn("u2"))),))


def test_two_routes_to_one_destination_give_one_copy_and_gave_two_in_the_split_design() -> None:
    """`s1: [u2, x0@ext.example]` with `u2 -> x0@ext.example`, and a group of u1 and u2 where
    u2 forwards to u1: every documented design resolves the address in one expansion on one
    host, where cleanup removes the duplicate. The split design (the MX expands aliases and
    groups, the SRS host forwards) passes two copies on, and the property says so."""
    x0, u1 = Delivery("external", "x0@ext.example"), Delivery("mailbox", "u1")
    for d, address, dest in ((SHARED, "s1@example.org", x0), (SHARED_GROUP, "g0@example.org", u1)):
        assert Resolver(d).intend(address).shared
        found = sites(d, designs=(*DESIGNS, SPLIT))
        for design in DESIGNS:
            outcome = found[design].send(address)
            assert outcome.deliveries == Counter({dest: 1}), f"{design}\n{outcome.describe()}"
        split = found[SPLIT].send(address)
        assert split.deliveries == Counter({dest: 2}), split.describe()
        with pytest.raises(AssertionError, match=re.escape(address) + r": delivered .* intended once each"):
            check_all(d, [address], designs=(SPLIT,))
        check_all(d, designs=DESIGNS)
    # the external copy leaves through the SRS host (relayhost); the split MX sent one out itself
    assert found_sent_out(SHARED, FOUR_HOSTS) == (("srs", "x0@ext.example"),)
    assert sorted(found_sent_out(SHARED, SPLIT)) == [("mx", "x0@ext.example"), ("srs", "x0@ext.example")]


def found_sent_out(d: Directory, design: str) -> tuple[tuple[str, str], ...]:
    return sites(d, designs=(design,))[design].send("s1@example.org").sent_out


# -- the model finds the loop of the old design -------------------------------------------------


LOOP_FREE_COMMIT = "6892c84"  # docs: loop-free routing


def old_snippets(directory: Path) -> Path:
    """docs/snippets as they were before the loop-free design, rebuilt from today's by undoing
    that commit's changes (no git history needed): the SRS host's relay_transport back to the
    MX, Postfix's default parent_domain_matches_subdomains on MX and SRS, and the MX, SRS and
    submission roles reading only ou=users, without `groups:`."""
    split_snippets(directory)
    for f in sorted(directory.iterdir()):
        text = f.read_text()
        if f.name in ("postfix-mx-main.cf", "postfix-srs-main.cf"):
            text = "\n".join(
                line
                for line in text.splitlines()
                if not line.startswith("parent_domain_matches_subdomains")
                and "lists.example.net" not in line
                and "relay_domains): forwards there" not in line
                and "Subdomains of our domains" not in line
            )
            if f.name == "postfix-srs-main.cf":  # the loop: what stays in our domains went back to the MX
                text = text.replace("relay:[mailbox.example.org]", "relay:[mx.example.org]")
        if f.name in ("ldapsync-mx.yaml", "ldapsync-srs.yaml", "ldapsync-submission.yaml"):
            doc = yaml.safe_load(text)
            doc["source"]["ldap"]["base_dn"] = "ou=users,dc=example,dc=org"
            del doc["groups"]
            text = yaml.safe_dump(doc, sort_keys=False)
        (directory / f.name).write_text(text)
    return directory


def old_srs_main_cf() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return (old_snippets(Path(tmp)) / "postfix-srs-main.cf").read_text()


def test_the_rebuilt_old_snippets_are_what_the_repository_had(tmp_path: Path) -> None:
    """Settings and YAML documents, compared with the commit before the loop-free design."""
    old = old_snippets(tmp_path)
    for name in ("postfix-mx-main.cf", "postfix-srs-main.cf", "ldapsync-mx.yaml", "ldapsync-srs.yaml"):
        shown = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{LOOP_FREE_COMMIT}~1:docs/snippets/{name}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode != 0:
            pytest.skip(f"no git history for {LOOP_FREE_COMMIT}~1 (shallow clone or release tarball)")
        ours_now = (old / name).read_text()
        if name.endswith(".cf"):
            assert parse_main_cf(ours_now) == parse_main_cf(shown.stdout), name
        else:
            assert yaml.safe_load(ours_now) == yaml.safe_load(shown.stdout), name


def test_the_old_srs_snippet_loops_the_kept_copy_and_the_property_says_so() -> None:
    old = old_srs_main_cf()
    assert parse_main_cf(old)["relay_transport"] == "relay:[mx.example.org]"
    site = sites(KEPT_COPY, srs_main_cf=old, designs=(SPLIT,))[SPLIT]
    outcome = site.send("mallory@example.org")
    assert outcome.looped == ("mallory@example.org",), outcome.describe()
    assert outcome.deliveries[Delivery("external", "mallory@elsewhere.example")] > 20  # one per round
    assert Delivery("mailbox", "mallory") not in outcome.deliveries
    # the property's check, given the kept copy, fails on the old snippet and passes on the new
    with pytest.raises(AssertionError, match=r"mallory@example\.org: looped"):
        check_all(KEPT_COPY, srs_main_cf=old, designs=(SPLIT,))
    check_all(KEPT_COPY, designs=(SPLIT,))


@settings(max_examples=examples(20), suppress_health_check=[HealthCheck.too_slow])
@given(directories(), st.sampled_from(EXTERNAL))
def test_the_old_srs_snippet_loops_every_kept_copy(d: Directory, elsewhere: str) -> None:
    """Over random directories: with relay_transport back to the MX, every account whose forward
    keeps a copy (after loops are cut) is looped by the model; with the current snippet none is."""
    d = replace(d, accounts=(*d.accounts, Account("keeper", ("keeper", elsewhere))))  # at least one
    resolver = Resolver(d)
    keeps = [
        f"{a.login}@example.org"
        for a in d.accounts
        if f"{a.login}@example.org" in resolver.edges.get(f"{a.login}@example.org", ())
        and a.login not in (*d.aliases, *d.forwards)
    ]
    old = sites(d, srs_main_cf=old_srs_main_cf(), designs=(SPLIT,))[SPLIT]
    new = sites(d, designs=(FOUR_HOSTS,))[FOUR_HOSTS]
    assert "keeper@example.org" in keeps
    for address in keeps:
        assert old.send(address).looped, old.send(address).describe()
        assert not new.send(address).looped, new.send(address).describe()


# -- the model's Postfix semantics, on hand-made hosts ------------------------------------------


def host_site(main_cf: str, tables: dict[str, str], **more: HostSpec) -> Site:
    outputs = {f"/maps/{name}": text.encode() for name, text in tables.items()}
    return Site([HostSpec("mx", ("mx.example.org",), main_cf, outputs), *more.values()])


def test_main_cf_continuation_lines_comments_and_later_settings() -> None:
    params = parse_main_cf("# c\na = 1\nb = x,\n    y\n  # not a comment inside? it is one\nb2 = $a\na = 2\n")
    assert params == {"a": "2", "b": "x, y", "b2": "$a"}


def mx_maps(virtual: str) -> dict[str, bytes]:
    return {"/maps/virtual": virtual.encode()}


def test_virtual_expansion_stops_at_a_self_map_removes_duplicates_and_defers_a_loop() -> None:
    main_cf = "relay_domains = example.org\nvirtual_alias_maps = hash:/maps/virtual\n"
    virtual = "a@example.org\ta@example.org,b@example.org\nb@example.org\tx@ext.example,c@example.org\n"
    virtual += "c@example.org\tx@ext.example\nl1@example.org\tl2@example.org\nl2@example.org\tl1@example.org\n"
    mx = Host(HostSpec("mx", ("mx.example.org",), main_cf, {"/maps/virtual": virtual.encode()}))
    assert mx.expand_virtual("a@example.org") == ["a@example.org", "x@ext.example"]
    assert "virtual_alias_recursion_limit" in str(mx.expand_virtual("l1@example.org"))
    site = Site([HostSpec("mx", ("mx.example.org",), main_cf, {"/maps/virtual": virtual.encode()})])
    assert (site.send("l1@example.org").rejected or "").startswith("451 4.6.0 Alias expansion error")
    small = Host(HostSpec("mx", ("mx.example.org",), main_cf + "virtual_alias_expansion_limit = 1\n", mx_maps(virtual)))
    assert "virtual_alias_expansion_limit" in str(small.expand_virtual("b@example.org"))


def test_rcpt_checks_by_address_class() -> None:
    main_cf = """\
relay_domains = example.org
virtual_alias_domains = example.net
virtual_mailbox_domains = mail.example
virtual_alias_maps = hash:/maps/virtual
virtual_mailbox_maps = hash:/maps/mailbox
relay_recipient_maps = hash:/maps/recipients
smtpd_recipient_restrictions = check_recipient_access hash:/maps/access, reject_unauth_destination
"""
    site = host_site(
        main_cf,
        {
            "virtual": "al@example.net\ta@example.org\n",
            "mailbox": "m@mail.example\tm/\n",
            "recipients": "a@example.org\tOK\n",
            "access": "off@example.org\tREJECT gone away\n",
        },
    )
    reply = {a: site.send(a).rejected for a in ("a@example.org", "b@example.org", "al@example.net", "no@example.net")}
    reply.update(
        {a: site.send(a).rejected for a in ("m@mail.example", "n@mail.example", "off@example.org", "x@y.example")}
    )
    assert reply["a@example.org"] is None and reply["al@example.net"] is None and reply["m@mail.example"] is None
    assert "User unknown in relay recipient table" in (reply["b@example.org"] or "")
    assert "User unknown in virtual alias table" in (reply["no@example.net"] or "")
    assert "User unknown in virtual mailbox table" in (reply["n@mail.example"] or "")
    assert (reply["off@example.org"] or "").endswith("Recipient address rejected: gone away")
    assert "Relay access denied" in (reply["x@y.example"] or "")


def test_parent_domain_matches_subdomains_decides_whether_a_subdomain_is_ours() -> None:
    base = "relay_domains = example.net\nrelay_recipient_maps = hash:/maps/recipients\n"
    tables = {"recipients": "a@example.net\tOK\n"}
    default = host_site(base, tables)
    narrowed = host_site(base + "parent_domain_matches_subdomains = smtpd_access_maps\n", tables)
    assert "relay recipient table" in (default.send("b@lists.example.net").rejected or "")  # Postfix's default
    assert "Relay access denied" in (narrowed.send("b@lists.example.net").rejected or "")


def test_a_host_relaying_to_itself_bounces_and_the_hop_limit_stops_a_loop() -> None:
    loop_a = "relay_domains = example.org\nrelay_transport = relay:[b.example.org]\n"
    loop_b = "relay_domains = example.org\nrelay_transport = relay:[mx.example.org]\n"
    site = Site([HostSpec("mx", ("mx.example.org",), loop_a, {}), HostSpec("b", ("b.example.org",), loop_b, {})])
    outcome = site.send("a@example.org")
    assert outcome.looped == ("a@example.org",) and outcome.bounces[0].reason == "5.4.6 too many hops"
    self_site = Site(
        [
            HostSpec(
                "mx", ("mx.example.org",), "relay_domains = example.org\nrelay_transport = relay:[mx.example.org]\n", {}
            )
        ]
    )
    assert "loops back to myself" in self_site.send("a@example.org").bounces[0].reason


def test_a_map_the_main_cf_names_but_no_exporter_writes_is_an_error() -> None:
    site = host_site("relay_domains = example.org\nrelay_recipient_maps = hash:/maps/nowhere\n", {})
    with pytest.raises(ModelError, match="no ldapsync output"):
        site.send("a@example.org")


def test_installed_outputs_are_read_by_their_documented_path(tmp_path: Path) -> None:
    """What the end-to-end tests use: the files a host installed, keyed as the snippets name them."""
    with tempfile.TemporaryDirectory() as tmp:
        rendered_outputs, _, _ = rendered(KEPT_COPY, Path(tmp))
    for path, data in rendered_outputs["mx"].items():
        (tmp_path / Path(path).name).write_bytes(data)
    read = installed_outputs("mx", lambda p: tmp_path / Path(p).name)
    assert read == rendered_outputs["mx"]
    site = Site.from_docs(roles=ROLES, outputs_by_role={**rendered_outputs, "mx": read})
    assert site.send("mallory@example.org").deliveries == Counter(
        {Delivery("mailbox", "mallory"): 1, Delivery("external", "mallory@elsewhere.example"): 1}
    )


def test_the_snippets_before_the_loop_free_design_fail_the_property(tmp_path: Path) -> None:
    """All of docs/snippets as they were before the loop-free design: the kept copy loops, and
    a group is unknown to the MX (its ldapsync read only ou=users, without `groups:`)."""
    old = old_snippets(tmp_path / "snippets")
    d = Directory(
        (Account("mallory", ("mallory", "mallory@elsewhere.example")), Account("alice")),
        (Group("team", (user_dn("alice"),)),),
    )
    ldif, static = tmp_path / "d.ldif", tmp_path / "mail.yaml"
    ldif.write_text(d.ldif())
    static.write_text(d.mail_yaml())
    outputs = {r: render_role(r, ldif=ldif, static=static, snippets=old) for r in ROLES}
    site = Site.from_docs(roles=ROLES, outputs_by_role=outputs, snippets=old)
    problems = "\n".join(check_site(d, site, SPLIT))
    assert "mallory@example.org: looped" in problems
    assert "team@example.org: must reach ['mailbox:alice'] but was refused" in problems


def test_relayhost_is_the_nexthop_of_off_host_mail_unless_the_transport_names_one() -> None:
    """trivial-rewrite: relay and default classes go to relayhost when the transport gives no
    nexthop (`relay_transport = relay` here); `relay:[host]` or a transport map entry wins."""
    main_cf = "relay_domains = example.org\nrelayhost = [srs.example.org]\n"
    host = Host(HostSpec("mx", ("mx.example.org",), main_cf, {}))
    assert host.resolve("x@ext.example") == ("smtp", "[srs.example.org]")
    assert host.resolve("a@example.org") == ("relay", "[srs.example.org]")
    named = Host(HostSpec("mx", ("mx.example.org",), main_cf + "relay_transport = relay:[mailbox.example.org]\n", {}))
    assert named.resolve("a@example.org") == ("relay", "[mailbox.example.org]")
    assert Host(HostSpec("mx", ("mx.example.org",), "", {})).resolve("x@ext.example") == ("smtp", "ext.example")


def test_the_srs_host_relays_for_its_mynetworks_only_and_accepts_no_domain_of_ours() -> None:
    """docs/snippets/postfix-srs-main.cf: the MXes (trusted) may relay anything through it;
    anyone else is refused, for external addresses and for ours alike (real Postfix's reply:
    tests/e2e/test_e2e_mail.py)."""
    srs = Host(role_spec("srs", {}))
    assert not srs.tables and not srs.is_ours("example.org")
    for rcpt in ("x@ext.example", "alice@example.org"):
        assert srs.rcpt(rcpt, trusted=True) is None
        assert srs.rcpt(rcpt, trusted=False) == f"554 5.7.1 <{rcpt}>: Recipient address rejected: Access denied"
