"""exporters: the demo directory rendered, compiled by the real postmap, checked with the real tools.

Postfix answers are read back with `postmap -q`; the passwd-file hashes are verified with
`doveadm pw -t` against the plaintexts listed in fixtures/ldif/demo.ldif's header.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from dovecotauth import auth_server

from ldapsync import config, exporters, routing, schema
from ldapsync.directory import Entry, Snapshot
from ldapsync.errors import ConfigError
from ldapsync.exporters import exporter_class
from ldapsync.exporters.dovecot import PasswdExporter
from ldapsync.static import Static
from ldapsync.sync import Pipeline

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
DOMAINS = ("example.org", "host1.example.org", "example.net")

pytestmark = pytest.mark.skipif(
    shutil.which("postmap") is None or shutil.which("doveadm") is None,
    reason="needs postfix (postmap) and dovecot-core (doveadm)",
)


def plaintexts() -> dict[str, str]:
    """login -> plaintext, from the table in demo.ldif's header."""
    found = {}
    for line in DEMO_LDIF.read_text().splitlines():
        m = re.match(r"#\s+([a-z0-9-]+)\s+(\S+-secret)\s", line)
        if m:
            found[m.group(1)] = m.group(2)
    assert len(found) == 21, found
    return found


@pytest.fixture(scope="module")
def postfix_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """postmap refuses to run without a main.cf; an empty one gives stock defaults."""
    conf = tmp_path_factory.mktemp("postfix-conf")
    (conf / "main.cf").write_text("")
    # every Postfix program waits up to 2 s while main.cf is younger than that
    os.utime(conf / "main.cf", (time.time() - 3600, time.time() - 3600))
    return conf


def postmap_query_all(conf: Path, map_type: str, path: Path, keys: list[str]) -> dict[str, str]:
    """Ask the compiled map for every key at once (`postmap -q -`): key -> value as Postfix sees it."""
    proc = subprocess.run(
        ["postmap", "-c", str(conf), "-q", "-", f"{map_type}:{path}"],
        input="".join(k + "\n" for k in keys),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return dict(line.split("\t", 1) for line in proc.stdout.splitlines())


def postmap_query(conf: Path, map_type: str, path: Path, key: str) -> str | None:
    proc = subprocess.run(
        ["postmap", "-c", str(conf), "-q", key, f"{map_type}:{path}"], capture_output=True, text=True, check=False
    )
    if proc.returncode == 1:
        return None
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.rstrip("\n")


def table(data: bytes) -> dict[str, str]:
    out = {}
    for line in data.decode("ascii").splitlines():
        key, value = line.split("\t")
        assert key not in out, f"duplicate key {key}"
        out[key] = value
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped demo config, pointed into a temp dir, synced once by the real pipeline."""
    tmp = tmp_path_factory.mktemp("demo")
    doc = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    doc["source"]["ldif"]["path"] = str(DEMO_LDIF)
    doc["static"] = str(REPO / "examples" / "mail.yaml")
    doc["state_dir"] = str(tmp / "state")
    for exp in doc["exporters"]:
        exp["path"] = str(tmp / "out" / Path(exp["path"]).name)
        if exp["kind"].startswith("postfix-"):
            exp["map_type"] = "hash"  # compiled by the real postmap, whatever the demo uses
    (tmp / "out").mkdir()
    cfg_path = tmp / "ldapsync.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    cfg = config.load(cfg_path)
    result = Pipeline(cfg).run()
    assert result.status == "installed", result
    assert all(spec.path.with_name(spec.path.name + ".db").exists() for spec in cfg.exporters if spec.map_type)
    return {spec.name: spec.path for spec in cfg.exporters}


def test_demo_virtual_map_through_postmap(demo: dict[str, Path], postfix_conf: Path) -> None:
    rendered = table(demo["alias"].read_bytes())
    assert rendered["dave@example.org"] == "dave@a.example,dave@b.example"  # comma-separated value
    assert rendered["carol@example.org"] == "carol@one.example,carol@two.example"  # multi-valued
    assert rendered["erin@example.org"] == "alice@example.org"  # forward to a local user
    assert rendered["postmaster@example.org"] == "alice@example.org,bob@example.org"  # static alias
    assert rendered["abuse@example.org"] == "postmaster@example.org"
    assert rendered["noreply-bounces@example.org"] == "bounces@lists.example.net"  # static forward
    assert rendered["alice@example.net"] == "alice@example.org"  # alias domain rewrite
    assert "alice@example.org" not in rendered  # a plain mailbox needs no alias
    for gone in ("oscar", "walter", "rita", "dora"):  # retired, and disabled
        assert not any(k.startswith(gone + "@") for k in rendered), gone
    assert rendered["ray@example.org"] == "ray@elsewhere.example"  # retiring in the future: active
    compiled = postmap_query_all(postfix_conf, "hash", demo["alias"], [*rendered, "nobody@example.org"])
    assert compiled == rendered
    assert postmap_query(postfix_conf, "hash", demo["alias"], "DAVE@Example.ORG") == "dave@a.example,dave@b.example"
    assert postmap_query(postfix_conf, "hash", demo["alias"], "oscar@example.org") is None


def test_demo_transport_recipients_sender_login_access(demo: dict[str, Path], postfix_conf: Path) -> None:
    transport = table(demo["postfix-transport"].read_bytes())
    assert transport == {
        f"{u}@example.org": "smtp:[srs.example.org]"
        for u in ("bob", "carol", "dave", "erin", "noreply-bounces", "ray", "webmaster")
    }
    recipients = table(demo["postfix-recipients"].read_bytes())
    assert set(recipients.values()) == {"OK"}
    locals_ = {k.split("@")[0] for k in recipients}
    assert {"alice", "webmaster", "postmaster", "abuse", "noreply-bounces", "pw-yescrypt"} <= locals_
    assert not locals_ & {"oscar", "walter", "rita", "dora"}
    assert all(f"{local}@{d}" in recipients for local in locals_ for d in DOMAINS)
    sender = table(demo["postfix-sender-login"].read_bytes())
    assert sender["postmaster@example.net"] == "alice,bob"
    assert sender["erin@example.org"] == "erin"
    assert "noreply-bounces@example.org" not in sender  # a forward is not a mailbox anyone sends as
    access = table(demo["postfix-access"].read_bytes())
    assert access == {f"dora@{d}": "REJECT This account has been disabled, contact admin@example.org" for d in DOMAINS}
    for name, rendered in (
        ("postfix-transport", transport),
        ("postfix-recipients", recipients),
        ("postfix-sender-login", sender),
        ("postfix-access", access),
    ):
        assert postmap_query_all(postfix_conf, "hash", demo[name], [*rendered, "nobody@example.org"]) == rendered, name


def test_demo_passwd_file_verifies_with_doveadm(demo: dict[str, Path]) -> None:
    path = demo["dovecot-passwd"]
    assert path.stat().st_mode & 0o777 == 0o640
    lines = path.read_text("ascii").splitlines()
    entries = {}
    for line in lines:
        fields = line.split(":")
        assert len(fields) == 2, f"a passwd-file line has exactly login and password: {line!r}"
        entries[fields[0]] = fields[1]
    expected = {login: pw for login, pw in plaintexts().items() if login not in ("oscar", "walter", "rita", "dora")}
    assert set(entries) == set(expected)
    schemes = {login: h[1 : h.index("}")] for login, h in entries.items()}
    assert schemes["pw-md5crypt"] == "MD5-CRYPT" and schemes["pw-bcrypt"] == "BLF-CRYPT"
    assert schemes["pw-cryptprefix"] == "SHA512-CRYPT" and schemes["pw-yescrypt"] == "CRYPT"
    for login, hashed in entries.items():
        ok = subprocess.run(["doveadm", "pw", "-t", hashed, "-p", expected[login]], capture_output=True, check=False)
        assert ok.returncode == 0, (login, ok.stdout, ok.stderr)
    bad = subprocess.run(
        ["doveadm", "pw", "-t", entries["alice"], "-p", "bob-secret"], capture_output=True, check=False
    )
    assert bad.returncode != 0


def test_rerun_is_unchanged(demo: dict[str, Path]) -> None:
    cfg = config.load(demo["alias"].parent.parent / "ldapsync.yaml")
    before = {n: p.read_bytes() for n, p in demo.items()}
    assert Pipeline(cfg).run().status == "unchanged"
    assert {n: p.read_bytes() for n, p in demo.items()} == before


# -- exporter options, on a small model ---------------------------------------------------------
def small_model() -> routing.RoutingModel:
    ssha = "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ=="
    entries = (
        Entry("uid=alice,dc=x", {"uid": ("alice",), "mailpassword": (ssha,)}),
        Entry("uid=bob,dc=x", {"uid": ("bob",), "emailforward": ("bob@elsewhere.example",)}),
        Entry("uid=frank,dc=x", {"uid": ("frank",), "maillocaladdress": ("frank.smith@example.org",)}),
        Entry("uid=dora,dc=x", {"uid": ("dora",), "maildisablemessage": ("Gone",)}),
    )
    attrs = schema.resolve("ud-ldap", {"alias": "mailLocalAddress"}, file=None)
    m, _ = routing.build(
        Snapshot(entries, "t"),
        Static(),
        routing.Settings(domain="example.org", domain_aliases=("example.net",), attributes=attrs),
        date(2026, 1, 1),
    )
    return m


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        (
            ["aliases"],
            {
                "alice@example.net": "alice@example.org",
                "bob@example.net": "bob@example.org",
                "frank.smith@example.net": "frank.smith@example.org",
                "frank.smith@example.org": "frank@example.org",
                "frank@example.net": "frank@example.org",
            },
        ),
        (["forwards"], {"bob@example.org": "bob@elsewhere.example"}),
    ],
)
def test_virtual_include_roles(include: list[str], expected: dict[str, str]) -> None:
    """MX resolves aliases only (forwards go to the SRS relay); SRS resolves forwards."""
    assert table(exporter_class("postfix-virtual")({"include": include}).render(small_model())) == expected


def test_access_action_and_transport_nexthop() -> None:
    m = small_model()
    access = table(exporter_class("postfix-access")({"action": "554"}).render(m))
    assert access == {"dora@example.org": "554 Gone", "dora@example.net": "554 Gone"}
    transport = table(exporter_class("postfix-transport")({"nexthop": "relay:[10.0.0.1]:25"}).render(m))
    assert transport == {"bob@example.org": "relay:[10.0.0.1]:25"}


@pytest.mark.parametrize("map_type", ["hash", "cdb", "lmdb", "btree"])
def test_map_types_compile_and_answer(map_type: str, tmp_path: Path, postfix_conf: Path) -> None:
    types = subprocess.run(["postconf", "-c", str(postfix_conf), "-m"], capture_output=True, text=True, check=True)
    if map_type not in types.stdout.split():
        pytest.skip(f"postfix has no {map_type} support here (install postfix-{map_type})")
    data = exporter_class("postfix-sender-login")({}).render(small_model())
    path = tmp_path / "sender_login"
    path.write_bytes(data)
    subprocess.run(["postmap", "-c", str(postfix_conf), f"{map_type}:{path}"], check=True)
    expected = table(data)
    assert postmap_query_all(postfix_conf, map_type, path, list(expected)) == expected


def test_passwd_redaction_hides_the_hash() -> None:
    exp = PasswdExporter({})
    line = exp.render(small_model()).decode().strip()
    shown = exp.redact(line)
    assert shown.startswith("alice:{SSHA}<hash sha256:") and "ow0LAeWb" not in shown
    assert exp.sensitive and exp.default_mode == 0o640 and not exp.postfix_map


def test_rebuild_renders_again_exactly_the_outputs_whose_inputs_changed(tmp_path: Path) -> None:
    """The agent's speed-up (re-render only what changed) must never serve a stale output."""
    from ldapsync import config as config_mod
    from ldapsync import sync
    from ldapsync.directory import Entry, Snapshot

    doc = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    doc["source"]["ldif"]["path"] = str(REPO / "fixtures" / "ldif" / "demo.ldif")
    doc["static"] = str(REPO / "examples" / "mail.yaml")
    doc["state_dir"] = str(tmp_path / "state")
    for e in doc["exporters"]:
        e["path"] = str(tmp_path / "out" / Path(e["path"]).name)
    (tmp_path / "ldapsync.yaml").write_text(yaml.safe_dump(doc))
    pipeline = sync.Pipeline(config_mod.load(tmp_path / "ldapsync.yaml"), follow=True)
    snap = pipeline.read_source()
    first = {o.name: o.data for o in pipeline.render(snap)[0]}

    def changed(dn_prefix: str, **attrs: tuple[str, ...]) -> Snapshot:
        entries = [
            Entry(e.dn, {**e.attributes, **attrs}, e.uuid) if e.dn.startswith(dn_prefix) else e for e in snap.entries
        ]
        return Snapshot(tuple(entries), snap.source)

    # bob's forward moves: virtual changes; transport, recipients, passwords stay the same objects
    second = {o.name: o.data for o in pipeline.render(changed("uid=bob,", emailforward=("bob@new.example",)))[0]}
    assert b"bob@new.example" in second["alias"] and b"bob@new.example" not in first["alias"]
    for name in ("postfix-transport", "postfix-recipients", "dovecot-passwd", "postfix-sender-login"):
        assert second[name] is first[name]
    # alice gains a forward: transport gets a new key too (only forwards.keys() feed it)
    third = {o.name: o.data for o in pipeline.render(changed("uid=alice,", emailforward=("a@x.example",)))[0]}
    assert b"alice@example.org\t" in third["postfix-transport"]
    assert b"alice@example.org\t" not in second["postfix-transport"]
    # alice is disabled: she leaves recipients and sender logins, enters the access map
    fourth = {o.name: o.data for o in pipeline.render(changed("uid=alice,", maildisablemessage=("gone",)))[0]}
    assert b"alice@example.org\t" not in fourth["postfix-recipients"]
    assert b"alice@example.org\tREJECT gone" in fourth["postfix-access"]
    assert not fourth["dovecot-passwd"].startswith(b"alice:")


# -- the registry: built-ins always, plugins through entry points ------------------------------
BUILTIN_KINDS = {
    "postfix-virtual",
    "postfix-transport",
    "postfix-recipients",
    "postfix-sender-login",
    "postfix-access",
    "dovecot-passwd",
}
PLUGIN_MODULE = """
from ldapsync.exporters import Exporter

class Good(Exporter):
    kind = "site-good"

    def render(self, model):
        return b""

class NotAnExporter:
    kind = "site-notexporter"
"""
PLUGINS = """
[ldapsync.exporters]
site-good = site_exporters:Good
site-notexporter = site_exporters:NotAnExporter
site-broken = site_broken:Thing
site-renamed = site_exporters:Good
"""


def install_plugins(root: Path, entry_points: str, name: str = "site-plugins") -> Path:
    """A real (if tiny) installed distribution: a dist-info with entry_points.txt, on sys.path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "site_exporters.py").write_text(PLUGIN_MODULE)
    (root / "site_broken.py").write_text("raise RuntimeError('boom at import')\n")
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    return root


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Site plugins on sys.path, the registry re-read before and after."""
    monkeypatch.syspath_prepend(str(install_plugins(tmp_path / "site", PLUGINS)))
    exporters._registry.cache_clear()
    yield tmp_path
    exporters._registry.cache_clear()


def kind_error(kind: str) -> str:
    with pytest.raises(ConfigError) as err:
        exporter_class(kind, file=Path("/etc/ldapsync/ldapsync.yaml"), key="exporters[0].kind")
    text = str(err.value)
    assert "/etc/ldapsync/ldapsync.yaml: exporters[0].kind" in text
    return text


def test_plugin_kind_is_found_beside_the_builtins(registry: Path) -> None:
    assert exporter_class("site-good").__name__ == "Good"
    assert set(exporters._registry()) >= BUILTIN_KINDS


def test_plugin_that_fails_to_import_is_named(registry: Path) -> None:
    text = kind_error("site-broken")
    assert "site-broken" in text and "site_broken:Thing" in text and "from site-plugins" in text
    assert "RuntimeError: boom at import" in text


def test_plugin_that_is_not_an_exporter_is_refused(registry: Path) -> None:
    text = kind_error("site-notexporter")
    assert "site_exporters:NotAnExporter" in text and "not a subclass" in text


def test_plugin_registered_under_another_kind_is_refused(registry: Path) -> None:
    assert "declares kind 'site-good'" in kind_error("site-renamed")


def test_a_broken_plugin_nobody_uses_does_not_stop_a_config(registry: Path) -> None:
    doc = {
        "domain": "example.org",
        "source": {"ldif": "dir.ldif"},
        "state_dir": "state",
        "exporters": [{"kind": "postfix-virtual", "path": "maps/alias"}],
    }
    assert config.parse(doc, registry / "ldapsync.yaml").exporters[0].kind == "postfix-virtual"


def test_a_plugin_reusing_a_builtin_kind_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clash = "[ldapsync.exporters]\npostfix-virtual = site_exporters:Good\n"
    monkeypatch.syspath_prepend(str(install_plugins(tmp_path / "site", clash, name="clash")))
    exporters._registry.cache_clear()
    try:
        text = kind_error("postfix-virtual")
    finally:
        exporters._registry.cache_clear()
    assert "registered more than once" in text
    assert (
        "ldapsync.exporters.postfix:VirtualExporter (built in)" in text and "site_exporters:Good (from clash)" in text
    )


def test_builtins_are_there_without_their_metadata_even_beside_a_plugin(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source tree that was never installed has no ldapsync entry points, but a site plugin may."""
    without = [p for p in sys.path if not list(Path(p or ".").glob("ldapsync*-info"))]  # dist-info, egg-info
    monkeypatch.setattr(sys, "path", without)
    exporters._registry.cache_clear()
    assert {ep.value for ep in entry_points(group=exporters.GROUP) if ep.value.startswith("ldapsync.")} == set()
    assert BUILTIN_KINDS | {"site-good"} <= set(exporters._registry())
    assert exporter_class("dovecot-passwd") is PasswdExporter


# -- mailbox host: virtual_mailbox_maps and the Dovecot userdb ---------------------------------
BOX_SETTINGS = routing.MailboxSettings(home="/var/vmail/{domain}/{login}", home_root="/var/vmail", uid=5000, gid=5000)


def mailbox_model() -> routing.RoutingModel:
    entries = (
        Entry("uid=alice,dc=x", {"uid": ("alice",), "mailquota": ("2G",)}),
        Entry("uid=bob,dc=x", {"uid": ("bob",), "emailforward": ("bob@elsewhere.example",)}),
        Entry("uid=carol,dc=x", {"uid": ("carol",), "emailforward": ("carol@example.org, carol@elsewhere.example",)}),
        Entry("uid=dora,dc=x", {"uid": ("dora",), "maildisablemessage": ("Gone",)}),
        Entry("uid=erin,dc=x", {"uid": ("erin",), "mail": ("erin.e@example.com",), "uidnumber": ("5001",)}),
    )
    attrs = schema.resolve("ud-ldap", {"address": "mail", "quota": "mailQuota", "uid_number": "uidNumber"}, file=None)
    m, report = routing.build(
        Snapshot(entries, "t"),
        Static(),
        routing.Settings(
            domain="example.org",
            domain_aliases=("example.net",),
            attributes=attrs,
            hosted={"example.com": ()},
            mailbox=BOX_SETTINGS,
        ),
        date(2026, 1, 1),
    )
    assert report.rejections == []
    return m


def test_virtual_mailbox_map_lists_local_accounts_with_their_path(tmp_path: Path, postfix_conf: Path) -> None:
    data = exporter_class("postfix-virtual-mailbox")({}).render(mailbox_model())
    expected = {
        "alice@example.org": "example.org/alice/Maildir/",
        "carol@example.org": "example.org/carol/Maildir/",  # forward that keeps a copy
        "erin.e@example.com": "example.com/erin/Maildir/",
    }
    assert table(data) == expected
    path = tmp_path / "virtual_mailbox"
    path.write_bytes(data)
    subprocess.run(["postmap", "-c", str(postfix_conf), f"hash:{path}"], check=True)
    keys = [*expected, "bob@example.org", "dora@example.org"]
    assert postmap_query_all(postfix_conf, "hash", path, keys) == expected
    custom = exporter_class("postfix-virtual-mailbox")({"path_template": "{domain}/{local}/"}).render(mailbox_model())
    assert table(custom)["erin.e@example.com"] == "example.com/erin.e/"


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("/var/vmail/{login}/", "must be relative"),
        ("../{login}/", "must be relative"),
        ("{domain}//{login}/", "must be relative"),
        ("{domain}/x/", "must contain {login} or {local}"),
        ("{domain}/{uid}/", "unknown placeholder {uid}"),
        ("{login!r}/", "unknown placeholder"),
        ("{login} x/", "only letters, digits"),
        ("{login}:x/", "only letters, digits"),
        ("{login", "expected '}'"),
    ],
)
def test_virtual_mailbox_path_template_is_validated(template: str, reason: str) -> None:
    from ldapsync.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(reason)) as err:
        exporter_class("postfix-virtual-mailbox").check_options(
            {"path_template": template}, file=Path("/etc/ldapsync/ldapsync.yaml"), key="exporters[0]"
        )
    assert err.value.key == "exporters[0].path_template"


USERDB_OPTIONS = {"fields": {"quota_rule": "*:storage={quota}", "mail": "maildir:~/Maildir"}}


def test_userdb_lines() -> None:
    data = exporter_class("dovecot-userdb")(USERDB_OPTIONS).render(mailbox_model()).decode()
    assert data == (
        "alice::5000:5000::/var/vmail/example.org/alice::userdb_mail=maildir:~/Maildir userdb_quota_rule=*:storage=2G\n"
        "bob::5000:5000::/var/vmail/example.org/bob::userdb_mail=maildir:~/Maildir\n"
        "carol::5000:5000::/var/vmail/example.org/carol::userdb_mail=maildir:~/Maildir\n"
        "erin::5001:5000::/var/vmail/example.com/erin::userdb_mail=maildir:~/Maildir\n"
    )
    keyed = exporter_class("dovecot-userdb")({"address_keys": True}).render(mailbox_model()).decode()
    assert "erin.e@example.com::5001:5000::/var/vmail/example.com/erin::userdb_user=erin\n" in keyed
    assert "erin::5001:5000::/var/vmail/example.com/erin::\n" in keyed


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"uid": "1"}, "not a userdb extra field name"),
        ({"user": "root"}, "not a userdb extra field name"),
        ({"Quota": "1"}, "not a userdb extra field name"),
        ({"quota_rule": "*:storage=1G userdb_uid=0"}, "no spaces"),
        ({"quota_rule": "a\tb"}, "no spaces"),
        ({"quota_rule": "{password}"}, "unknown placeholder {password}"),
        ({"quota_rule": ""}, "non-empty"),
    ],
)
def test_userdb_field_templates_are_validated(fields: dict[str, str], reason: str) -> None:
    from ldapsync.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(reason)):
        exporter_class("dovecot-userdb").check_options(
            {"fields": fields}, file=Path("/etc/ldapsync/ldapsync.yaml"), key="exporters[0]"
        )


@pytest.fixture(scope="module")
def dovecot_userdb() -> Iterator[tuple[Path, Path]]:
    """A throwaway Dovecot whose userdb is a passwd-file the test writes: (config, userdb path)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("a throwaway dovecot needs root")
    root = Path(tempfile.mkdtemp(prefix="ldapsync-userdb-"))
    userdb = root / "userdb"
    userdb.write_text("")
    try:
        with auth_server(root, userdb, userdb) as conf:
            yield conf, userdb
    finally:
        shutil.rmtree(root, ignore_errors=True)


def doveadm_user(conf: Path, user: str) -> dict[str, str] | None:
    proc = subprocess.run(
        ["doveadm", "-c", str(conf), "user", user],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 67:  # unknown user
        return None
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t", 1) for line in proc.stdout.splitlines()[1:]]  # "field<TAB>value" after a header
    return {name: value for name, value in rows}


def test_userdb_is_read_by_dovecot_field_for_field(dovecot_userdb: tuple[Path, Path]) -> None:
    conf, path = dovecot_userdb
    options = {**USERDB_OPTIONS, "address_keys": True}
    path.write_bytes(exporter_class("dovecot-userdb")(options).render(mailbox_model()))
    alice = doveadm_user(conf, "alice")
    assert alice is not None
    assert (alice["uid"], alice["gid"], alice["home"]) == ("5000", "5000", "/var/vmail/example.org/alice")
    assert alice["quota_rule"] == "*:storage=2G" and alice["mail"] == "maildir:~/Maildir"
    erin = doveadm_user(conf, "erin.e@example.com")  # what LMTP looks up: the recipient address
    assert erin is not None and erin["user"] == "erin" and erin["home"] == "/var/vmail/example.com/erin"
    assert doveadm_user(conf, "dora") is None  # disabled: no mailbox


def replace_userdb(conf: Path, path: Path, data: bytes, user: str) -> dict[str, str] | None:
    """Write the userdb and wait until Dovecot reads the new `user` line (it re-reads a
    passwd-file when its mtime, in whole seconds, or its size changed: the mtime is moved on)."""
    before = path.stat().st_mtime
    path.write_bytes(data)
    stamp = max(time.time(), before + 2)
    os.utime(path, (stamp, stamp))
    line = next(x for x in data.decode().splitlines() if x.startswith(user + ":"))
    uid, extra = line.split(":")[2], line.split("::", 3)[3].split()
    names = {"uid", "gid", "home"} | {f.partition("=")[0].removeprefix("userdb_") for f in extra}
    deadline = time.monotonic() + 30
    while True:
        got = doveadm_user(conf, user)
        if got is not None and got["uid"] == uid and set(got) == names:
            return got
        assert time.monotonic() < deadline, f"dovecot did not re-read {path}: {got}"
        time.sleep(0.2)


def test_userdb_values_reach_dovecot_unexpanded(dovecot_userdb: tuple[Path, Path]) -> None:
    """Dovecot expands `%` in extra fields: every value put into a template is written `%%`."""
    conf, path = dovecot_userdb
    m = mailbox_model()
    # a value validation would refuse, to prove the exporter alone keeps `%` literal
    odd = dataclasses.replace(m.mailboxes["alice"], quota="10%")
    m = dataclasses.replace(m, mailboxes={**m.mailboxes, "alice": odd})
    options = {"fields": {**USERDB_OPTIONS["fields"], "quota_rule2": "Trash:storage=+{quota}", "x": "{login}%u"}}
    data = exporter_class("dovecot-userdb")(options).render(m)
    assert b"userdb_quota_rule=*:storage=10%% userdb_quota_rule2=Trash:storage=+10%% userdb_x=alice%u" in data
    alice = replace_userdb(conf, path, data, "alice")
    assert alice is not None
    # the value literally; `%u` in the admin's own template is Dovecot's variable, as the admin meant
    got = (alice["quota_rule"], alice["quota_rule2"], alice["x"])
    assert got == ("*:storage=10%", "Trash:storage=+10%", "alicealice")


def test_a_percent_quota_from_ldap_is_refused_with_dn_and_attribute(dovecot_userdb: tuple[Path, Path]) -> None:
    """`*:storage=10%` is no percentage to Dovecot: it applies 10 bytes (every delivery over quota)."""
    conf, path = dovecot_userdb
    entries = (
        Entry("uid=alice,dc=x", {"uid": ("alice",), "mailquota": ("10%",)}),
        Entry("uid=bob,dc=x", {"uid": ("bob",), "mailquota": ("500M",)}),
    )
    attrs = schema.resolve("ud-ldap", {"quota": "mailQuota"}, file=None)
    settings = routing.Settings("example.org", (), attrs, mailbox=BOX_SETTINGS)
    m, report = routing.build(Snapshot(entries, "t"), Static(), settings, date(2026, 1, 1))
    assert [(r.dn, r.attribute) for r in report.rejections] == [("uid=alice,dc=x", "mailQuota")]
    assert "'10%' is a percentage" in report.rejections[0].reason
    alice = replace_userdb(conf, path, exporter_class("dovecot-userdb")(USERDB_OPTIONS).render(m), "alice")
    bob = doveadm_user(conf, "bob")
    assert alice is not None and "quota_rule" not in alice  # the server's default quota applies
    assert bob is not None and bob["quota_rule"] == "*:storage=500M"


def test_mailbox_outputs_install_atomically_and_roll_back(tmp_path: Path, postfix_conf: Path) -> None:
    """The new outputs take the ordinary path: staged, postmap'd, installed, kept in generations."""
    from ldapsync import sync

    ldif = tmp_path / "dir.ldif"
    ldif.write_text(DEMO_LDIF.read_text())
    doc = {
        "domain": "example.org",
        "source": {"ldif": {"path": str(ldif), "base_dn": "ou=users,dc=example,dc=org"}},
        "state_dir": str(tmp_path / "state"),
        "postfix": {"config_dir": str(postfix_conf)},
        "mailbox": {"home_root": "/var/vmail", "uid": 5000, "gid": 5000},
        "exporters": [
            {"kind": "postfix-virtual-mailbox", "path": str(tmp_path / "out" / "vmailbox")},
            {"kind": "dovecot-userdb", "path": str(tmp_path / "out" / "userdb")},
        ],
    }
    (tmp_path / "ldapsync.yaml").write_text(yaml.safe_dump(doc))
    cfg = config.load(tmp_path / "ldapsync.yaml")
    assert Pipeline(cfg).run().status == "installed"
    userdb, vmailbox = tmp_path / "out" / "userdb", tmp_path / "out" / "vmailbox"
    first = (userdb.read_bytes(), vmailbox.read_bytes())
    assert userdb.stat().st_mode & 0o777 == 0o640
    assert b"alice::5000:5000::/var/vmail/example.org/alice::\n" in first[0]
    assert postmap_query(postfix_conf, "hash", vmailbox, "alice@example.org") == "example.org/alice/Maildir/"
    assert postmap_query(postfix_conf, "hash", vmailbox, "bob@example.org") is None  # forwards only

    ldif.write_text(DEMO_LDIF.read_text().replace("emailForward: bob@elsewhere.example\n", ""))
    assert Pipeline(cfg).run().status == "installed"
    assert postmap_query(postfix_conf, "hash", vmailbox, "bob@example.org") == "example.org/bob/Maildir/"

    assert sync.rollback(Pipeline(cfg), None).status == "installed"
    assert (userdb.read_bytes(), vmailbox.read_bytes()) == first
    assert postmap_query(postfix_conf, "hash", vmailbox, "bob@example.org") is None


def test_mailbox_outputs_parse_into_keys_and_values_for_the_guards() -> None:
    userdb = exporter_class("dovecot-userdb")({"address_keys": True})
    parsed = userdb.parse(userdb.render(mailbox_model()))
    assert parsed["alice"] == ":5000:5000::/var/vmail/example.org/alice::"  # after the empty password field
    assert parsed["erin.e@example.com"] == ":5001:5000::/var/vmail/example.com/erin::userdb_user=erin"
    assert userdb.guarded_values
    vmailbox = exporter_class("postfix-virtual-mailbox")({})
    assert vmailbox.parse(vmailbox.render(mailbox_model()))["alice@example.org"] == "example.org/alice/Maildir/"
    assert vmailbox.guarded_values


# -- logging in by address (passwords.login_by_address) -----------------------------------------
def address_login_model(login_by_address: bool) -> routing.RoutingModel:
    secret = subprocess.run(
        ["doveadm", "pw", "-s", "SSHA", "-p", "victor-secret"], capture_output=True, text=True, check=True
    ).stdout.strip()
    entries = (
        Entry(
            "uid=victor,dc=x",
            {"uid": ("victor",), "mail": ("v@example.info", "victor@example.com"), "mailpassword": (secret,)},
        ),
        Entry("uid=nopw,dc=x", {"uid": ("nopw",), "mail": ("nopw@example.com",)}),
        Entry("uid=alice,dc=x", {"uid": ("alice",), "mailpassword": (secret,)}),
    )
    attrs = schema.resolve("ud-ldap", {"address": "mail"}, file=None)
    m, report = routing.build(
        Snapshot(entries, "t"),
        Static(),
        routing.Settings(
            domain="example.org",
            domain_aliases=(),
            attributes=attrs,
            hosted={"example.com": ("example.info",)},
            mailbox=BOX_SETTINGS,
            login_by_address=login_by_address,
        ),
        date(2026, 1, 1),
    )
    assert report.rejections == []
    return m


def test_login_by_address_is_off_by_default_and_adds_the_own_addresses_when_on() -> None:
    off, on = address_login_model(False), address_login_model(True)
    passwd = PasswdExporter({})
    assert off.login_addresses == {} and passwd.render(off).count(b"\n") == 2
    assert on.login_addresses == {
        "alice": ("alice@example.org",),
        "nopw": ("nopw@example.com",),
        "victor": ("victor@example.com", "v@example.com"),
    }
    lines = passwd.render(on).decode().splitlines()
    hash_ = on.passwords["victor"]
    assert lines == sorted(lines) and len(lines) == 5  # no password, no line: nopw has none
    assert f"victor@example.com:{hash_}::::::user=victor" in lines and f"victor:{hash_}" in lines
    assert len({line.partition(":")[0] for line in lines}) == 5  # keys stay unique
    sender = exporter_class("postfix-sender-login")({}).render(on).decode()
    assert "victor@example.com\tv@example.com,victor,victor@example.com\n" in sender
    assert "victor@example.com\tvictor\n" in exporter_class("postfix-sender-login")({}).render(off).decode()


def test_address_logins_log_in_through_a_real_dovecot_as_the_account() -> None:
    """doveadm auth login: the address authenticates, and the userdb record found is the login's."""
    m = address_login_model(True)
    root = Path(tempfile.mkdtemp(prefix="ldapsync-addrlogin-"))
    try:
        (root / "passwd").write_bytes(PasswdExporter({}).render(m))
        (root / "userdb").write_bytes(exporter_class("dovecot-userdb")({}).render(m))
        with auth_server(root, root / "passwd", root / "userdb") as conf:

            def login(user: str, password: str) -> tuple[int, str]:
                cmd = ["doveadm", "-c", str(conf), "auth", "login", "-x", "no-penalty", user, password]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
                return done.returncode, done.stdout

            for name in ("victor", "victor@example.com", "v@example.com"):
                rc, out = login(name, "victor-secret")
                assert rc == 0, out
                assert "user=victor" in out and "home=/var/vmail/example.com/victor" in out, out
            assert login("victor@example.com", "wrong")[0] != 0
            assert login("v@example.info", "victor-secret")[0] != 0  # canonical addresses only
            assert login("alice@example.org", "victor-secret")[0] == 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
