"""Hostile input: whatever LDAP holds, every output line is exactly one intended entry.

Hypothesis generates directory entries full of separators of every output format, Postfix
specials, control characters, arbitrary Unicode, overlong values and invalid UTF-8; the model
is built and every exporter rendered. A strict parser (written here, not borrowed from the
code under test) reads every line back and an independent oracle says which keys and values
may exist. A sample, plus the hostile fixture directory, goes through the real `postmap`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples

from ldapsync import config, ldifsource, routing, schema
from ldapsync.directory import Entry, Rejection, Snapshot, make_entry
from ldapsync.exporters import exporter_class
from ldapsync.static import Static, StaticEntry

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "example.org"
DOMAIN_ALIASES = ("host1.example.org", "example.net")
OURS = (DOMAIN, *DOMAIN_ALIASES)
TODAY = date(2026, 11, 21)
NEXTHOP = "smtp:[srs.example.org]"
ATTRS = schema.resolve("ud-ldap", {"alias": "mailLocalAddress"}, file=None)  # every logical field in play
KINDS = ("postfix-virtual", "postfix-transport", "postfix-recipients", "postfix-sender-login", "postfix-access")
STATIC = Static(
    Path("/etc/ldapsync/mail.yaml"),
    (
        StaticEntry("postmaster@example.org", ("alice@example.org", "root@elsewhere.example"), "aliases.postmaster"),
        StaticEntry("abuse@example.org", ("postmaster@example.org",), "aliases.abuse"),
    ),
    (StaticEntry("bounces@example.org", ("bounces@lists.example.net",), "forwards.bounces"),),
)
STATIC_TARGETS = {s.address: s.targets for s in (*STATIC.aliases, *STATIC.forwards)}

# Stored hash -> what the passwd-file must say (each verified in fixtures/ldif/demo.ldif).
GOOD_HASHES = {
    "$1$NeuqKH2q$RDpcAKsEaEwyzUgBQYR.g0": "{MD5-CRYPT}$1$NeuqKH2q$RDpcAKsEaEwyzUgBQYR.g0",
    "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ==": "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ==",
    "{crypt}$y$j9T$Y3huYXEiash5V9tt$ixkQuog82axg4k2qnFCFQcvPRMSnVjbgI/40pJtGq18": (
        "{CRYPT}$y$j9T$Y3huYXEiash5V9tt$ixkQuog82axg4k2qnFCFQcvPRMSnVjbgI/40pJtGq18"
    ),
    "$2b$10$1SkB9jHvJDSZXEQAIjwH5ONHG5W2rLYCE40q8SeNviLt4XCBMcsfG": (
        "{BLF-CRYPT}$2b$10$1SkB9jHvJDSZXEQAIjwH5ONHG5W2rLYCE40q8SeNviLt4XCBMcsfG"
    ),
}

# -- the strict parsers -------------------------------------------------------------------------
KEY_RE = re.compile(r"[a-z0-9._%+=@-]+")
ADDR_RE = re.compile(
    r"[A-Za-z0-9_%+=-]+(?:\.[A-Za-z0-9_%+=-]+)*@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+"
)
LOGIN_RE = re.compile(r"[a-z0-9](?:[a-z0-9_-]|\.(?=[a-z0-9_-])){0,63}")  # a dot-atom local part
PASSWD_RE = re.compile(r"([a-z0-9][a-z0-9._-]{0,63}):(\{[A-Z0-9-]+\}[!-9;-~]+)")  # printable ASCII but ':'


def parse_postfix(kind: str, data: bytes) -> dict[str, str]:
    """`key<TAB>value` lines only; the value's shape depends on the map."""
    text = data.decode("ascii")  # raises on any non-ASCII byte
    assert text == "" or text.endswith("\n")
    out: dict[str, str] = {}
    for line in text[:-1].split("\n") if text else []:
        key, tab, value = line.partition("\t")
        assert tab and KEY_RE.fullmatch(key), repr(line)
        assert key not in out, f"{kind}: duplicate key {key!r}"
        if kind == "postfix-virtual":
            assert all(ADDR_RE.fullmatch(t) for t in value.split(",")), repr(line)
        elif kind == "postfix-sender-login":
            assert all(LOGIN_RE.fullmatch(t) for t in value.split(",")), repr(line)
        elif kind == "postfix-recipients":
            assert value == "OK", repr(line)
        elif kind == "postfix-transport":
            assert value == NEXTHOP, repr(line)
        elif kind == "postfix-vmailbox":
            assert ADDR_RE.fullmatch(key), repr(line)
        else:
            m = re.fullmatch(r"REJECT ([!-~](?:[ -~]*[!-~])?)", value)
            assert m, repr(line)
        out[key] = value
    return out


def parse_passwd(data: bytes) -> dict[str, str]:
    text = data.decode("ascii")
    out: dict[str, str] = {}
    for line in text.splitlines(keepends=True):
        assert line.endswith("\n")
        m = PASSWD_RE.fullmatch(line[:-1])
        assert m, f"not exactly login:{{SCHEME}}hash: {line!r}"
        assert line.count(":") == 1, "a passwd-file line never carries a third field"
        assert m.group(1) not in out
        out[m.group(1)] = m.group(2)
    return out


# -- the oracle ---------------------------------------------------------------------------------
@dataclass
class Account:
    dn: str
    login: str
    entry: Entry

    @property
    def address(self) -> str:
        return f"{self.login}@{DOMAIN}"


def retired(entry: Entry) -> bool:
    for status in entry.get("accountStatus"):
        words = status.split()
        if words and words[0] in ("inactive", "memorial"):
            return True
        if len(words) > 1 and words[0] == "retiring":
            try:
                return (TODAY - datetime.strptime(words[1], "%Y-%m-%d").date()).days > 186
            except ValueError:
                pass
    return False


def accounts(snapshot: Snapshot) -> dict[str, Account]:
    """canonical address -> the first (by DN) active entry whose single login is plain ASCII."""
    out: dict[str, Account] = {}
    for e in sorted(snapshot.entries, key=lambda e: (e.dn.lower(), e.dn)):
        uid = e.get("uid")
        if len(uid) != 1 or not uid[0].isascii() or not LOGIN_RE.fullmatch(uid[0].lower()) or retired(e):
            continue
        acct = Account(e.dn, uid[0].lower(), e)
        out.setdefault(acct.address, acct)
    return out


def canonical(addr: str) -> str:
    local, _, dom = addr.rpartition("@")
    dom = dom.lower()
    return f"{local.lower()}@{DOMAIN}" if dom in OURS else f"{local}@{dom}"


def plain_address(value: str) -> bool:
    """RFC 5321 dot-atom@domain, ASCII, at most 254 characters; the domain may be in any case."""
    local, _, dom = value.rpartition("@")
    return (
        0 < len(value) <= 254
        and value.isascii()
        and not value.startswith("-")
        and ADDR_RE.fullmatch(f"{local}@{dom.lower()}") is not None
    )


def intended_forwards(entry: Entry) -> set[str]:
    targets = set()
    for value in entry.get("emailForward"):
        for part in value.split(","):
            part = part.strip(" ")
            if plain_address(part):
                targets.add(canonical(part))
    return targets


DEAD_RE = re.compile(r"(\S+) has no target left; not accepted(?:, rejected with the message of (\S+))?")


def variants(addr: str) -> list[str]:
    local = addr.rpartition("@")[0]
    return [f"{local}@{d}" for d in OURS]


def check(
    snapshot: Snapshot,
    outputs: Mapping[str, bytes],
    report: routing.BuildReport,
    good_hashes: Mapping[str, str] = GOOD_HASHES,
) -> dict[str, dict[str, str]]:
    maps = {k: parse_postfix(k, outputs[k]) for k in KINDS}
    passwd = parse_passwd(outputs["dovecot-passwd"])
    accts = accounts(snapshot)
    # Any mailDisableMessage value (even an empty one) disables the account; a static entry for
    # the address takes over its routed (and its access-map line), the account stays disabled.
    disabled = {a: acct for a, acct in accts.items() if acct.entry.get("mailDisableMessage")}
    accounts_active = {a: acct for a, acct in accts.items() if a not in disabled}
    by_login = {acct.login: acct for acct in accounts_active.values()}
    rejected_dns = {(r.dn, r.attribute) for r in report.rejections}
    # Addresses whose every target was dead (disabled, retired or unknown in our domains): not
    # accepted anywhere, rejected with a disabled target's message when there was one.
    dead: dict[str, str | None] = {}
    for reason in [r.reason for r in report.rejections] + report.warnings:
        m = DEAD_RE.search(reason)
        if m:
            dead[m[1]] = m[2]
    active = {a: acct for a, acct in accounts_active.items() if a not in dead}

    # Dovecot: exactly the active accounts with one known-good hash, normalised.
    expected_pw = {}
    for acct in accounts_active.values():
        hashes = acct.entry.get("mailPassword")
        if len(hashes) == 1 and hashes[0] in good_hashes:
            expected_pw[acct.login] = good_hashes[hashes[0]]
    assert passwd == expected_pw

    # Access: exactly the disabled accounts, their message or the default, in every domain.
    expected_access = {}
    for a, acct in disabled.items():
        if a in STATIC_TARGETS:
            continue
        msg = sorted(acct.entry.get("mailDisableMessage"))[0].strip()
        ok = msg and len(msg) <= 200 and all(" " <= c <= "~" for c in msg)
        for v in variants(a):
            expected_access[v] = "REJECT " + (msg if ok else routing.DEFAULT_DISABLED_MESSAGE)
    for _ in dead:  # a dead address takes its disabled target's line (the target may be dead itself)
        for a, target in dead.items():
            if target is not None and target in expected_access:
                for v in variants(a):
                    expected_access[v] = expected_access[target]
    assert maps["postfix-access"] == expected_access

    # LDAP aliases that could legitimately exist: plain addresses in our domains, of an active account.
    alias_owner: dict[str, set[str]] = {}
    for acct in active.values():
        for value in acct.entry.get("mailLocalAddress"):
            if plain_address(value) and value.lower().rpartition("@")[2] in OURS:
                alias_owner.setdefault(canonical(value), set()).add(acct.address)

    virtual = maps["postfix-virtual"]
    canon_keys = {k for k in virtual if k.endswith("@" + DOMAIN)}
    for key, value in virtual.items():
        if not key.endswith("@" + DOMAIN):  # alias-domain rewrite to a deliverable canonical address
            assert value == canonical(key) and value in set(active) | canon_keys, (key, value)
            continue
        targets = value.split(",")
        if key in STATIC_TARGETS:  # less the targets in our domains that accept no mail
            accepted = {canonical(k) for k in maps["postfix-recipients"]}
            kept = tuple(t for t in STATIC_TARGETS[key] if t.rpartition("@")[2] not in OURS or t in accepted)
            assert tuple(targets) == kept, (key, value)
        elif key in active:
            acct = active[key]
            intended = sorted(intended_forwards(acct.entry))
            if targets != intended:  # a loop dropped only the targets inside the cycle, and said so
                assert set(targets) < set(intended) and (acct.dn, "emailForward") in rejected_dns, (key, value)
        else:
            assert key in alias_owner and targets[0] in alias_owner[key] and len(targets) == 1, (key, value)
    for a, acct in active.items():  # every intended forward is there, unless a loop dropped it (reported)
        if a not in STATIC_TARGETS and intended_forwards(acct.entry) and a not in virtual:
            assert (acct.dn, "emailForward") in rejected_dns, a

    deliverable = set(active) | (set(STATIC_TARGETS) - set(dead)) | canon_keys
    assert set(maps["postfix-recipients"]) == {v for a in deliverable for v in variants(a)}
    for key, value in virtual.items():  # never accepted and then bounced: every target in our domains exists
        for target in value.split(","):
            if target.rpartition("@")[2] in OURS:
                assert target in deliverable, (key, target)
    for a in dead:
        assert a not in deliverable and a not in virtual, a
    forwarded = {k for k in canon_keys if k not in alias_owner or k in active or k in STATIC_TARGETS}
    forwarded -= {k for k in canon_keys if k in STATIC_TARGETS and any(s.address == k for s in STATIC.aliases)}
    assert set(maps["postfix-transport"]) == forwarded

    sender = maps["postfix-sender-login"]
    for key, value in sender.items():
        logins = value.split(",")
        assert all(login in by_login for login in logins), (key, value)
        assert canonical(key) in deliverable
    for a, acct in active.items():
        if a not in STATIC_TARGETS:
            assert acct.login in sender[a].split(",")
    return maps


# -- generators ---------------------------------------------------------------------------------
SEPARATORS = [":", ",", " ", "\t", "#", "\n", "\r", "\x00", "\r\n", ", ", "\x0b", "\x0c", "\x85", "\u2028", "\x7f"]
SPECIALS = ["|/bin/sh -c evil", "/var/mail/root", ":include:/etc/passwd", ":INCLUDE:/x", "|cmd@example.org"]
LOCALS = ["alice", "bob", "carol", "postmaster", "abuse", "bounces", "Alice", "x.y", "a+b", "\u212aate", "jürgen"]
DOMAINS = [*OURS, "EXAMPLE.NET", "elsewhere.example", "b\u00fccher.example", "x..example", "localhost"]

local = st.one_of(st.sampled_from(LOCALS), st.from_regex(r"[a-z0-9][a-z0-9._%+=#-]{0,8}", fullmatch=True))
address = st.builds(lambda lp, d: f"{lp}@{d}", local, st.sampled_from(DOMAINS))
# Addresses of the generated accounts and static names: these make chains, loops and hijacks.
local_address = st.builds(
    lambda lp, d: f"{lp}@{d}", st.sampled_from(["alice", "bob", "carol", "postmaster", "abuse"]), st.sampled_from(OURS)
)
junk = st.one_of(
    st.text(max_size=30),
    st.sampled_from(SPECIALS),
    st.builds(lambda n: "x" * n + "@elsewhere.example", st.integers(230, 300)),
    st.builds(lambda n: "y" * n, st.integers(60, 70)),
)
value = st.one_of(
    address,
    address,
    junk,
    st.builds(lambda a, s, b: a + s + b, address, st.sampled_from(SEPARATORS), st.one_of(address, junk)),
    st.builds(lambda s, a, t: s + a + t, st.sampled_from(SEPARATORS), address, st.sampled_from(["", *SEPARATORS])),
)
raw_value = st.one_of(
    value,
    value,
    st.binary(max_size=20),
    st.builds(
        lambda v, b: v.encode("utf-8", "surrogatepass") + b, value, st.sampled_from([b"\xff", b"\xc3\x28", b"\x80"])
    ),
)


def mostly(common: st.SearchStrategy[str], rare: st.SearchStrategy[str], percent: int) -> st.SearchStrategy[str]:
    """`common` in about `percent`% of draws: enough valid accounts for the hostile parts to matter."""
    return st.integers(0, 99).flatmap(lambda n: common if n < percent else rare)


valid_login = st.sampled_from(["alice", "bob", "carol", "postmaster", "abuse", "Alice", "BOB", "a.b", "x_y-z"])
login = mostly(
    valid_login,
    st.one_of(local, junk, st.sampled_from(["bad user", "bad:user", "bad\nuser", "\u212aate", "-x", "x" * 65, ""])),
    70,
)
good_hash = st.sampled_from(sorted(GOOD_HASHES))
password = mostly(
    good_hash,
    st.one_of(
        st.builds(lambda h, s, t: h + s + t, good_hash, st.sampled_from(SEPARATORS), junk),
        st.sampled_from(["hunter2", "{PLAIN}hunter2", "{CLEARTEXT}x", "$6$broken", "{FOO}bar", "{SSHA}", ""]),
        junk,
    ),
    50,
)
status = st.sampled_from(
    ["inactive", "memorial", "retiring 2020-01-01", "retiring 2099-01-01", "retiring", "retiring x", "active", " "]
)
message = st.one_of(junk, st.sampled_from(["Gone.", "Gone.\nattacker@evil.example OK", "  spaced  ", "a" * 201]))


@st.composite
def entries(draw: st.DrawFn) -> tuple[Entry, list[Rejection]]:
    rejections: list[Rejection] = []
    uid = draw(login)
    raw: dict[str, list[bytes | str]] = {"uid": [uid] if draw(st.integers(0, 9)) or not uid else [uid, "second"]}
    if draw(st.integers(0, 9)) == 0:
        raw["uid"] = [uid.encode() + b"\xff"]  # invalid UTF-8 login
    for name, strategy, most, odds in (
        ("emailForward", mostly(local_address, raw_value, 50), 3, 3),
        ("mailLocalAddress", mostly(local_address, raw_value, 50), 2, 2),
        ("mailPassword", mostly(password, raw_value, 80), 2, 5),
        ("accountStatus", status, 1, 1),
        ("mailDisableMessage", st.one_of(message, raw_value), 1, 1),
    ):
        if draw(st.integers(0, 4)) >= odds:  # each attribute present with probability odds/5
            continue
        values = draw(st.lists(strategy, min_size=1, max_size=most if draw(st.integers(0, 4)) == 0 else 1))
        raw[name] = [
            v.encode("utf-8", "surrogatepass") if isinstance(v, str) and draw(st.booleans()) else v for v in values
        ]
    dn_uid = re.sub(r"[^a-z0-9]", "_", uid.lower())[:20] or "empty"
    dn = f"uid={dn_uid},ou=u{draw(st.integers(0, 3))},dc=example,dc=org"
    return make_entry(dn, raw, ATTRS.ldap_attributes(), rejections), rejections


directories = st.lists(entries(), min_size=1, max_size=8)


def render(snapshot: Snapshot) -> tuple[dict[str, bytes], routing.BuildReport]:
    m, report = routing.build(
        snapshot, STATIC, routing.Settings(domain=DOMAIN, domain_aliases=DOMAIN_ALIASES, attributes=ATTRS), TODAY
    )
    options = {"postfix-transport": {"nexthop": NEXTHOP}}
    kinds = (*KINDS, "dovecot-passwd")
    return {k: exporter_class(k)(options.get(k, {})).render(m) for k in kinds}, report


def snapshot_of(generated: list[tuple[Entry, list[Rejection]]]) -> Snapshot:
    return Snapshot(tuple(e for e, _ in generated), "hypothesis", tuple(r for _, rs in generated for r in rs))


@settings(max_examples=examples(150), deadline=None, derandomize=True, database=None)
@given(directories)
def test_hostile_directory_never_escapes_its_fields(generated: list[tuple[Entry, list[Rejection]]]) -> None:
    snapshot = snapshot_of(generated)
    outputs, report = render(snapshot)
    check(snapshot, outputs, report)
    for r in report.rejections:  # every rejection names where the value came from, and is loggable
        assert r.dn and r.attribute and "\n" not in r.reason


def dovecot_form(stored: str) -> str | None:
    """The passwd-file form of a hash known to be good (demo.ldif, hostile.ldif's 'hostile-ok'); else None."""
    known_good = set(PLAINTEXT_HASHES_OF_FIXTURES)
    if stored not in known_good:
        return None
    body = stored[len("{CRYPT}") :] if stored.startswith("{CRYPT}") else stored
    for prefix, scheme in (
        ("$1$", "MD5-CRYPT"),
        ("$5$", "SHA256-CRYPT"),
        ("$6$", "SHA512-CRYPT"),
        ("$2b$", "BLF-CRYPT"),
        ("$y$", "CRYPT"),
    ):
        if body.startswith(prefix):
            return "{" + scheme + "}" + body
    return stored  # {SSHA}, {SSHA512}, {ARGON2ID}: already Dovecot's names


def _fixture_hashes() -> list[str]:
    """Every mailPassword of demo.ldif (all verified there) plus hostile.ldif's one valid hash."""
    text = (REPO / "fixtures" / "ldif" / "demo.ldif").read_text()
    return [*re.findall(r"^mailPassword: (\S+)$", text, re.M), "{SSHA}VAzIzUpQY5cTi+BwXhznuV+1BD/gQvuGvMgs9A=="]


PLAINTEXT_HASHES_OF_FIXTURES = _fixture_hashes()


# -- the real postmap ---------------------------------------------------------------------------
needs_postmap = pytest.mark.skipif(shutil.which("postmap") is None, reason="needs postfix (postmap)")


@pytest.fixture(scope="module")
def postfix_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conf = tmp_path_factory.mktemp("postfix-conf")
    (conf / "main.cf").write_text("")
    # every Postfix program waits up to 2 s while main.cf is younger than that
    os.utime(conf / "main.cf", (time.time() - 3600, time.time() - 3600))
    return conf


def postmap_round_trip(conf: Path, workdir: Path, maps: Mapping[str, bytes]) -> None:
    """Compile each map with the real postmap and ask for every key: the answer is exactly our value."""
    for kind, data in maps.items():
        path = workdir / kind
        path.write_bytes(data)
        subprocess.run(["postmap", "-c", str(conf), f"hash:{path}"], check=True, capture_output=True)
        expected = parse_postfix(kind, data)
        proc = subprocess.run(
            ["postmap", "-c", str(conf), "-q", "-", f"hash:{path}"],
            input="".join(f"{k}\n" for k in [*expected, "root@example.org", "evil.example"]),
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode in (0, 1), proc.stderr
        answered = dict(line.split("\t", 1) for line in proc.stdout.splitlines())
        assert answered == expected, kind


@needs_postmap
@settings(
    max_examples=examples(8),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(generated=directories)
def test_hostile_sample_through_real_postmap(
    generated: list[tuple[Entry, list[Rejection]]], tmp_path: Path, postfix_conf: Path
) -> None:
    outputs, _ = render(snapshot_of(generated))
    postmap_round_trip(postfix_conf, tmp_path, {k: outputs[k] for k in KINDS})


@needs_postmap
def test_hostile_fixture_directory(tmp_path: Path, postfix_conf: Path) -> None:
    """The deterministic batch: demo + hostile.ldif, each hostile entry with its one bad thing."""
    fixtures = REPO / "fixtures" / "ldif"
    entries_: list[Entry] = []
    rejections: list[Rejection] = []
    for name in ("demo.ldif", "hostile.ldif"):
        snap = ldifsource.read(config.LdifSource(fixtures / name), ATTRS)
        entries_ += snap.entries
        rejections += snap.rejections
    snapshot = Snapshot(tuple(entries_), "fixtures", tuple(rejections))
    outputs, report = render(snapshot)
    good = {h: dovecot_form(h) for e in snapshot.entries if "ou=users" in e.dn for h in e.get("mailPassword")}
    good = {h: f for h, f in good.items() if f is not None}
    assert len(good) == 22, "every demo hash and the hostile fixtures' valid hash"
    maps = check(snapshot, outputs, report, good)
    postmap_round_trip(postfix_conf, tmp_path, {k: outputs[k] for k in KINDS})
    passwd = parse_passwd(outputs["dovecot-passwd"])
    # Password injections and plaintext never reach the passwd-file; the rest of the entry stays.
    for login in ("h-pw-plain", "h-pw-plainscheme", "h-pw-cleartext", "h-pw-garbage", "h-pw-unknown", "h-pw-colon"):
        assert login not in passwd and f"{login}@example.org" in maps["postfix-recipients"], login
    for login in ("h-pw-newline", "h-pw-multi", "h-pw-nul"):
        assert login not in passwd
    assert "root" not in passwd
    everything = b"".join(outputs.values())
    for needle in (b"attacker", b"evil", b"/bin/sh", b":include:", b"bad user", b"bad:user", b"{PLAIN}"):
        assert needle not in everything, needle
    assert "alice@example.org" not in maps["postfix-virtual"]  # the hijack through mailLocalAddress failed
    assert maps["postfix-access"]["h-disable-newline@example.org"] == "REJECT This address is disabled"
    assert "h-status-baddate@example.org" in maps["postfix-recipients"]  # unparsable date: not retired
    named = {(r.dn.split(",")[0], r.attribute) for r in report.rejections}
    assert ("uid=h-fwd-pipe", "emailForward") in named and ("uid=h-pw-colon", "mailPassword") in named
    assert ("uid=h-hijack", "mailLocalAddress") in named


# -- mailbox host and groups: the new outputs under the same attack ---------------------------
HOSTED = {"example.com": ("example.info",)}
BOX_ATTRS = schema.resolve(
    "ud-ldap",
    {
        "alias": "mailLocalAddress",
        "address": "mail",
        "uid_number": "uidNumber",
        "gid_number": "gidNumber",
        "home": "homeDirectory",
        "quota": "mailQuota",
    },
    file=None,
)
GROUPS = routing.GroupSettings(members_send_as_group=True)
BOX_ATTRS_WANTED = [*BOX_ATTRS.ldap_attributes(), *GROUPS.ldap_attributes()]
MAILBOX = routing.MailboxSettings(home="/var/vmail/{domain}/{login}", home_root="/var/vmail", uid=5000, gid=5000)
USERDB_OPTIONS = {"fields": {"quota_rule": "*:storage={quota}", "mail": "maildir:~/Maildir"}, "address_keys": True}
USERDB_RE = re.compile(
    r"(?P<key>[a-z0-9][a-z0-9._-]{0,63}|[A-Za-z0-9_%+=.-]+@[a-z0-9.-]+)::(?P<uid>[0-9]+):(?P<gid>[0-9]+)::"
    r"(?P<home>/var/vmail(?:/[A-Za-z0-9_+=@.-]+)+)::"
    r"(?P<extra>(?:userdb_user=[a-z0-9][a-z0-9._-]{0,63} ?)?(?:userdb_mail=maildir:~/Maildir ?)?"
    r"(?:userdb_quota_rule=\*:storage=[0-9]{1,15}(?:[BKMGTbkmgt]|[KMGTkmgt][Bb])?|userdb_quota_rule=\*:storage=[0-9]{1,3}%)?)"
)
VMAILBOX_RE = re.compile(r"[a-z0-9.-]+/[a-z0-9][a-z0-9._-]{0,63}/Maildir/")

ids = st.one_of(
    st.sampled_from(
        [
            "5000",
            "5001",
            "60000",
            "0",
            "999",
            "-1",
            "70000",
            "5000 userdb_uid=0",
            "5000:0",
            "+5000",
            "\u0665\u0660\u0660\u0660",
        ]
    ),
    junk,
)
homes = st.one_of(
    st.sampled_from(
        [
            "/var/vmail/example.org/x",
            "/var/vmail/../etc",
            "/var/vmail/./x",
            "/var/vmail/a b",
            "/var/vmail/a:b",
            "/var/vmail/%u",
            "/var/vmail/x\nuserdb_uid=0",
            "/etc",
            "/var/vmailx/y",
            "var/vmail/x",
            "/var/vmail/",
            "/var/vmail//x",
        ]
    ),
    junk,
)
quotas = st.one_of(st.sampled_from(["1G", "500M", "10%", "0", "1G userdb_uid=0", "1G\tx", "%u", "-1", "1.5G"]), junk)
group_names = st.one_of(
    st.sampled_from(["staff", "alice", "Mail Team", "x@example.com", "y@example.info", "|sh"]), junk
)


@st.composite
def mailbox_entries(draw: st.DrawFn) -> tuple[Entry, list[Rejection]]:
    rejections: list[Rejection] = []
    if draw(st.integers(0, 3)) == 0:  # a group
        cn = draw(group_names)
        raw: dict[str, list[bytes | str]] = {"objectClass": [draw(st.sampled_from(routing.GROUP_CLASSES))], "cn": [cn]}
        members = draw(st.lists(st.sampled_from(["alice", "bob", "carol", "staff", "nobody"]), max_size=4))
        raw["member"] = [f"uid={m},ou=u0,dc=example,dc=org" for m in members] + [
            "cn=staff,ou=g,dc=example,dc=org"
        ] * draw(st.integers(0, 1))
        raw["rfc822MailMember"] = draw(st.lists(st.one_of(local_address, raw_value), max_size=3))
        dn = f"cn={re.sub(r'[^a-z0-9]', '_', cn.lower())[:20] or 'empty'},ou=g,dc=example,dc=org"
        return make_entry(dn, raw, BOX_ATTRS_WANTED, rejections), rejections
    uid = draw(login)
    raw = {"uid": [uid]}
    for name, strategy in (
        ("mail", st.one_of(st.sampled_from(["x@example.com", "Y@EXAMPLE.INFO", "z@example.org"]), raw_value)),
        ("emailForward", mostly(local_address, raw_value, 50)),
        ("uidNumber", ids),
        ("gidNumber", ids),
        ("homeDirectory", homes),
        ("mailQuota", quotas),
        ("mailDisableMessage", message),
    ):
        if draw(st.integers(0, 2)) == 0:
            raw[name] = draw(st.lists(strategy, min_size=1, max_size=2))
    dn = f"uid={re.sub(r'[^a-z0-9]', '_', uid.lower())[:20] or 'empty'},ou=u0,dc=example,dc=org"
    return make_entry(dn, raw, BOX_ATTRS_WANTED, rejections), rejections


@settings(max_examples=examples(150), deadline=None, derandomize=True, database=None)
@given(st.lists(mailbox_entries(), min_size=1, max_size=8))
def test_hostile_mailbox_and_group_values_never_escape_their_fields(
    generated: list[tuple[Entry, list[Rejection]]],
) -> None:
    snapshot = snapshot_of(generated)
    m, report = routing.build(
        snapshot,
        STATIC,
        routing.Settings(
            domain=DOMAIN,
            domain_aliases=DOMAIN_ALIASES,
            attributes=BOX_ATTRS,
            hosted=HOSTED,
            groups=GROUPS,
            mailbox=MAILBOX,
        ),
        TODAY,
    )
    for kind in KINDS:
        options = {"nexthop": NEXTHOP} if kind == "postfix-transport" else {}
        parse_postfix(kind, exporter_class(kind)(options).render(m))
    vmailbox = parse_postfix("postfix-vmailbox", exporter_class("postfix-virtual-mailbox")({}).render(m))
    for key, path in vmailbox.items():
        assert VMAILBOX_RE.fullmatch(path), (key, path)
        assert ".." not in path.split("/")
    text = exporter_class("dovecot-userdb")(USERDB_OPTIONS).render(m).decode("ascii")
    keys = set()
    for line in text.splitlines(keepends=True):
        assert line.endswith("\n")
        match = USERDB_RE.fullmatch(line[:-1])
        assert match, repr(line)
        assert 1000 <= int(match["uid"]) <= 60000 and 1000 <= int(match["gid"]) <= 60000, line
        assert not {".", ".."} & set(match["home"].split("/")), line
        assert match["key"] not in keys
        keys.add(match["key"])
    logins = {k for k in keys if "@" not in k}
    assert logins == set(m.mailboxes)
    for login, box in m.mailboxes.items():  # an account whose forward is all dead keeps its mailbox, not mail
        assert m.users.get(box.address) == login or box.address not in m.deliverable()
    assert set(vmailbox) == set(m.local) <= set(m.users)
    for r in report.rejections:
        assert r.dn and r.attribute and "\n" not in r.reason
