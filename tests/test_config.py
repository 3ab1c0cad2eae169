"""config: a typo or a dangerous setting is a clear error naming the file and the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from ldapsync import config
from ldapsync.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def base(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "domain": "example.org",
        "source": {"ldif": "dir.ldif"},
        "state_dir": "state",
        "exporters": [{"kind": "postfix-virtual", "path": "maps/alias"}],
    }
    doc.update(over)
    return doc


def ldap(**extra: Any) -> dict[str, Any]:
    """A config with a minimal LDAP source plus `extra` keys in source.ldap."""
    return base(source={"ldap": {"uri": "ldap://x", "base_dn": "dc=x", **extra}})


def write(tmp_path: Path, doc: object, name: str = "ldapsync.yaml") -> Path:
    path = tmp_path / "etc" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def load(tmp_path: Path, doc: object) -> config.Config:
    return config.load(write(tmp_path, doc))


def error(tmp_path: Path, doc: object) -> ConfigError:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    err = info.value
    assert str(path) in str(err), "every config error names the file"
    return err


def test_example_demo_config_loads() -> None:
    cfg = config.load(REPO / "examples" / "demo.yaml")
    assert cfg.routing.domain == "example.org"
    assert cfg.routing.domain_aliases == ("host1.example.org", "example.net")
    assert isinstance(cfg.source, config.LdifSource)
    assert cfg.source.path == REPO / "fixtures" / "ldif" / "demo.ldif", "paths are shown without ../"
    assert cfg.source.path.exists()
    assert [e.kind for e in cfg.exporters] == [
        "postfix-virtual",
        "postfix-transport",
        "postfix-recipients",
        "postfix-sender-login",
        "postfix-access",
        "dovecot-passwd",
    ]
    passwd = cfg.exporters[-1]
    assert passwd.map_type is None and passwd.mode == 0o640


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, base())
    etc = tmp_path / "etc"
    assert cfg.state_dir == etc / "state"  # relative to the config file, not the cwd
    assert cfg.source == config.LdifSource(path=etc / "dir.ldif")
    assert cfg.exporters[0].path == etc / "maps" / "alias"
    assert cfg.exporters[0].map_type == "hash"
    assert cfg.exporters[0].name == "postfix-virtual"
    assert cfg.exporters[0].mode is None
    assert cfg.routing.attributes.login == "uid" and cfg.routing.attributes.forward == "emailForward"
    assert cfg.static is None
    assert cfg.hooks == config.Hooks((), (), 60.0)
    assert cfg.safety == config.Safety(500, 0.2, False)
    assert cfg.agent == config.Agent(0.1, 2.0, 60.0)
    assert cfg.keep_generations == 10
    assert cfg.postmap == "postmap" and cfg.postfix_config_dir is None
    assert cfg.metrics_textfile is None
    assert (cfg.log_format, cfg.log_level) == ("auto", "info")
    assert cfg.routing.weak_passwords == "warn"
    assert load(tmp_path, base(passwords={"weak": "refuse"})).routing.weak_passwords == "refuse"
    assert cfg.routing.login_by_address is False
    assert load(tmp_path, base(passwords={"login_by_address": True})).routing.login_by_address is True
    err = error(tmp_path, base(passwords={"login_by_address": "yes"}))
    assert err.key == "passwords.login_by_address" and "must be of type bool" in str(err)


def test_full_ldap_source(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        base(
            source={
                "ldap": {
                    "uri": ["ldap://ldap-01.example.org", "ldaps://ldap-02.example.org"],
                    "start_tls": True,
                    "ca_file": "ca.pem",
                    "bind_dn": "cn=ldapsync,dc=example,dc=org",
                    "bind_password_file": "bind.secret",
                    "base_dn": "ou=users,dc=example,dc=org",
                    "filter": "(objectClass=inetOrgPerson)",
                    "scope": "one",
                    "page_size": 1000,
                    "timeout": 5,
                    "tls_verify": False,
                    "watch": "poll",
                    "poll_interval": 30,
                }
            },
            domain="Example.ORG",
            domain_aliases=["example.net"],
            schema="inetlocalmailrecipient",
            attributes={"mail_password": "userPassword", "status": None},
            static="mail.yaml",
            hooks={"check": ["/usr/bin/true --flag 'two words'"], "reload": [["systemctl", "reload", "postfix"]]},
            safety={"max_deletions": 0, "max_deletion_ratio": 1, "allow_empty": True},
            agent={"debounce": 0, "max_delay": 5, "reconnect_max": 120},
            postfix={"postmap": "/usr/sbin/postmap", "config_dir": "/etc/postfix"},
            metrics={"textfile": "metrics/ldapsync.prom"},
            log={"format": "json", "level": "DEBUG"},
            keep_generations=3,
            exporters=[{"kind": "postfix-virtual", "path": "maps/alias"}, {"kind": "dovecot-passwd", "path": "pw"}],
        ),
    )
    src = cfg.source
    assert isinstance(src, config.LdapSource)
    etc = tmp_path / "etc"
    assert src.uris == ("ldap://ldap-01.example.org", "ldaps://ldap-02.example.org")
    assert src.ca_file == etc / "ca.pem" and src.bind_password_file == etc / "bind.secret"
    assert (src.scope, src.page_size, src.timeout, src.tls_verify, src.watch, src.poll_interval) == (
        "one",
        1000,
        5.0,
        False,
        "poll",
        30.0,
    )
    assert cfg.routing.domain == "example.org"  # domains are case-folded
    assert cfg.routing.attributes.login == "uid" and cfg.routing.attributes.alias == "mailLocalAddress"
    assert cfg.routing.attributes.mail_password == "userPassword" and cfg.routing.attributes.status is None
    assert cfg.static == etc / "mail.yaml"
    assert cfg.hooks.check == (("/usr/bin/true", "--flag", "two words"),)  # strings split like a shell, no shell
    assert cfg.hooks.reload == (("systemctl", "reload", "postfix"),)
    assert cfg.safety == config.Safety(0, 1.0, True)
    assert cfg.agent == config.Agent(0.0, 5.0, 120.0)
    assert cfg.postfix_config_dir == Path("/etc/postfix")
    assert cfg.metrics_textfile == etc / "metrics" / "ldapsync.prom"
    assert (cfg.log_format, cfg.log_level, cfg.keep_generations) == ("json", "debug", 3)


@pytest.mark.parametrize(
    ("doc", "key", "message"),
    [
        (base(domian="x.org"), "domian", "unknown key"),
        (base(safety={"max_deletion": 3}), "safety.max_deletion", "unknown key"),
        (base(hooks={"relaod": []}), "hooks.relaod", "unknown key"),
        (base(log={"colour": True}), "log.colour", "unknown key"),
        ({k: v for k, v in base().items() if k != "domain"}, "domain", "required"),
        (base(domain="localhost"), "domain", "not a domain"),
        (base(domain_aliases=["example.org"]), "domain_aliases", "must not repeat"),
        (base(domain_aliases=["a.example", "a.example"]), "domain_aliases", "must not repeat"),
        (base(domain_aliases=["not a domain"]), "domain_aliases[0]", "not a domain"),
        ({k: v for k, v in base().items() if k != "state_dir"}, "state_dir", "required"),
        (base(source={}), "source", "exactly one"),
        (base(source={"ldif": "a.ldif", "ldap": {"uri": "ldap://x", "base_dn": "dc=x"}}), "source", "exactly one"),
        (base(source={"ldif": {"base_dn": "dc=x"}}), "source.ldif.path", "required"),
        (base(source={"ldif": {"path": "a", "filter": "(x=y)"}}), "source.ldif.filter", "unknown key"),
        (base(source={"ldap": {"base_dn": "dc=x"}}), "source.ldap.uri", "required"),
        (base(source={"ldap": {"uri": "http://x", "base_dn": "dc=x"}}), "source.ldap.uri", "not an ldap://"),
        (base(source={"ldap": {"uri": ["ldap://x", "x"], "base_dn": "dc=x"}}), "source.ldap.uri[1]", "not an ldap"),
        (base(source={"ldap": {"uri": "ldap://x"}}), "source.ldap.base_dn", "required"),
        (
            ldap(bind_dn="cn=a", bind_password="s3cret"),
            "source.ldap.bind_password",
            "never inline",
        ),
        (
            ldap(bind_dn="cn=a"),
            "source.ldap.bind_password_file",
            "required with bind_dn",
        ),
        (ldap(scope="subtree"), "source.ldap.scope", "sub"),
        (ldap(watch="push"), "source.ldap.watch", "one of"),
        (ldap(page_size=0), "source.ldap.page_size", "1"),
        (ldap(filter="uid=*"), "source.ldap.filter", "parenthes"),
        (ldap(timeout=0), "source.ldap.timeout", "> 0"),
        (ldap(start_tls="yes"), "source.ldap.start_tls", "bool"),
        (base(schema="openldap"), "schema", "unknown preset"),
        (base(attributes={"forwrd": "x"}), "attributes.forwrd", "unknown field"),
        (base(attributes={"forward": "bad attr"}), "attributes.forward", "not an LDAP attribute"),
        (base(schema="custom"), "attributes.login", "login attribute is required"),
        (base(exporters=[]), "exporters", "at least one"),
        (base(exporters=[{"kind": "postfix-virtuall", "path": "a"}]), "exporters[0].kind", "unknown exporter kind"),
        (base(exporters=[{"path": "a"}]), "exporters[0].kind", "required"),
        (base(exporters=[{"kind": "postfix-virtual"}]), "exporters[0].path", "required"),
        (
            base(exporters=[{"kind": "postfix-virtual", "path": "a", "map_type": "dbm"}]),
            "exporters[0].map_type",
            "one of",
        ),
        (
            base(exporters=[{"kind": "dovecot-passwd", "path": "p", "map_type": "hash"}]),
            "exporters[0].map_type",
            "unknown key",
        ),
        (base(exporters=[{"kind": "postfix-virtual", "path": "a", "mode": "rw-r"}]), "exporters[0].mode", "octal"),
        (base(exporters=[{"kind": "postfix-virtual", "path": "a", "mode": "1777"}]), "exporters[0].mode", "0777"),
        (
            base(exporters=[{"kind": "postfix-virtual", "path": "a", "owner": "no-such-user-xyz"}]),
            "exporters[0].owner",
            "no such user",
        ),
        (
            base(exporters=[{"kind": "postfix-virtual", "path": "a", "group": "no-such-group-xyz"}]),
            "exporters[0].group",
            "no such group",
        ),
        (
            base(exporters=[{"kind": "postfix-virtual", "path": "a", "include": ["aliases", "users"]}]),
            "exporters[0].include",
            "subset",
        ),
        (base(exporters=[{"kind": "postfix-virtual", "path": "a", "include": []}]), "exporters[0].include", "subset"),
        (base(exporters=[{"kind": "postfix-transport", "path": "t"}]), "exporters[0].nexthop", "required"),
        (
            base(exporters=[{"kind": "postfix-transport", "path": "t", "nexthop": "srs.example.org"}]),
            "exporters[0].nexthop",
            "required",
        ),
        (
            base(exporters=[{"kind": "postfix-access", "path": "d", "action": "DISCARD"}]),
            "exporters[0].action",
            "REJECT",
        ),
        (
            base(exporters=[{"kind": "postfix-recipients", "path": "r", "nexthop": "smtp:x"}]),
            "exporters[0].nexthop",
            "unknown key",
        ),
        (
            base(exporters=[{"kind": "postfix-virtual", "path": "a"}, {"kind": "postfix-virtual", "path": "b"}]),
            "exporters[0].name",
            "duplicate exporter name",
        ),
        (
            base(
                exporters=[
                    {"kind": "postfix-virtual", "name": "mx", "path": "maps/a"},
                    {"kind": "postfix-recipients", "path": "maps/../maps/a"},
                ]
            ),
            "exporters[0].path",
            "two exporters write",
        ),
        (base(hooks={"check": [42]}), "hooks.check[0]", "command string or a list"),
        (base(hooks={"reload": [""]}), "hooks.reload[0]", "empty"),
        (base(hooks={"timeout": -1}), "hooks.timeout", "> 0"),
        (base(safety={"max_deletion_ratio": 1.5}), "safety.max_deletion_ratio", "between 0 and 1"),
        (base(safety={"max_deletions": -1}), "safety.max_deletions", ">= 0"),
        (base(safety={"max_deletions": True}), "safety.max_deletions", "number"),
        (base(agent={"max_delay": 0}), "agent.max_delay", "> 0"),
        (base(agent={"debounce": -0.5}), "agent.debounce", ">= 0"),
        (base(log={"format": "xml"}), "log.format", "auto, console or json"),
        (base(log={"level": "trace"}), "log.level", "debug"),
        (base(keep_generations=0), "keep_generations", ">= 1"),
        (base(passwords={"weak": "allow"}), "passwords.weak", "warn or refuse"),
        (base(passwords={"weak_hashes": "warn"}), "passwords.weak_hashes", "unknown key"),
        (base(postfix={"config": "/etc/postfix"}), "postfix.config", "unknown key"),
        (base(metrics={"textfile": 3}), "metrics.textfile", "str"),
        (["not", "a", "mapping"], None, "mapping"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, doc: object, key: str | None, message: str) -> None:
    err = error(tmp_path, doc)
    assert err.key == key, str(err)
    assert message in err.message, str(err)
    if key:
        assert f": {key}: " in str(err)


def test_inline_password_value_is_not_echoed(tmp_path: Path) -> None:
    ldap = {"uri": "ldap://x", "base_dn": "dc=x", "bind_dn": "cn=a", "bind_password": "s3cret-value"}
    err = error(tmp_path, base(source={"ldap": ldap}))
    assert "s3cret-value" not in str(err)


def test_unreadable_and_broken_yaml(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        config.load(missing)
    assert str(missing) in str(info.value)
    err = error(tmp_path, "domain: [unclosed\n")
    assert "not valid YAML" in err.message


def test_exporter_options_owner_and_map_types(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        base(
            exporters=[
                {"kind": "postfix-virtual", "name": "mx", "path": "a", "include": ["aliases"], "map_type": "cdb"},
                {"kind": "postfix-transport", "path": "t", "nexthop": "smtp:[srs.example.org]", "map_type": "texthash"},
                {"kind": "postfix-access", "path": "d", "action": "554"},
                {"kind": "dovecot-passwd", "path": "/abs/passwd", "owner": "root", "group": "root", "mode": "0640"},
                {"kind": "postfix-recipients", "path": "r", "owner": 0, "group": 0, "mode": "600"},
            ]
        ),
    )
    mx, transport, access, passwd, recipients = cfg.exporters
    assert (mx.name, mx.map_type, dict(mx.options)) == ("mx", "cdb", {"include": ["aliases"]})
    assert transport.map_type == "texthash" and transport.options == {"nexthop": "smtp:[srs.example.org]"}
    assert access.options == {"action": "554"} and access.name == "postfix-access"
    assert passwd.path == Path("/abs/passwd") and passwd.owner == 0 and passwd.group == 0 and passwd.mode == 0o640
    assert passwd.map_type is None  # not a Postfix map: never postmap'ed
    assert recipients.owner == 0 and recipients.mode == 0o600


@pytest.mark.parametrize("text", ["0640", "640", "0600", "644"])
def test_unquoted_mode_is_refused_not_misread(tmp_path: Path, text: str) -> None:
    """YAML reads `mode: 0640` as the number 416: installing 0416 (or 01200) silently would be wrong."""
    doc = yaml.safe_dump(base()).replace("path: maps/alias", f"path: maps/alias\n  mode: {text}")
    err = error(tmp_path, doc)
    assert err.key == "exporters[0].mode"
    assert "quoted" in err.message


def test_ldif_source_as_mapping(tmp_path: Path) -> None:
    cfg = load(tmp_path, base(source={"ldif": {"path": "/data/dir.ldif", "base_dn": "ou=users,dc=example,dc=org"}}))
    assert cfg.source == config.LdifSource(Path("/data/dir.ldif"), "ou=users,dc=example,dc=org")


def test_single_uri_and_defaults_of_ldap_source(tmp_path: Path) -> None:
    cfg = load(tmp_path, base(source={"ldap": {"uri": "ldapi://%2Frun%2Fslapd%2Fldapi", "base_dn": "dc=x"}}))
    assert cfg.source == config.LdapSource(uris=("ldapi://%2Frun%2Fslapd%2Fldapi",), base_dn="dc=x")
    src = cfg.source
    assert isinstance(src, config.LdapSource)
    assert (src.filter, src.scope, src.start_tls, src.tls_verify, src.page_size, src.timeout) == (
        "(objectClass=*)",
        "sub",
        False,
        True,
        500,
        10.0,
    )
    assert (src.bind_dn, src.bind_password_file, src.watch, src.poll_interval) == (None, None, "auto", 60.0)


SECTIONS = [(config.Hooks, "hooks"), (config.Safety, "safety"), (config.Agent, "agent"), (config.Settings, "routing")]


def test_an_absent_key_takes_the_field_default(tmp_path: Path) -> None:
    cfg = load(tmp_path, ldap())
    for cls, attr in [*SECTIONS, (config.LdapSource, "source"), (config.Config, None)]:
        parsed = getattr(cfg, attr) if attr else cfg
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                assert getattr(parsed, f.name) == f.default, f"{cls.__name__}.{f.name}"


def _other_defaults(cls: type) -> type:
    """`cls` with every number and flag default changed, built the way config builds its own."""
    spec = []
    for f in dataclasses.fields(cls):
        d = f.default
        if isinstance(d, bool):
            spec.append((f.name, f.type, dataclasses.field(default=not d)))
        elif isinstance(d, int | float):
            spec.append((f.name, f.type, dataclasses.field(default=d * 3 + 1)))
        elif d is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            spec.append((f.name, f.type))
        else:
            spec.append((f.name, f.type, dataclasses.field(default=d, default_factory=f.default_factory)))
    return dataclasses.make_dataclass(cls.__name__, spec, frozen=True, slots=True)


@pytest.mark.parametrize("cls, attr", [*SECTIONS, (config.LdapSource, "source")])
def test_each_default_is_written_once_on_its_dataclass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: type, attr: str
) -> None:
    """Changing a field default changes what an absent key reads as: no second copy in the parser."""
    other = _other_defaults(cls)
    monkeypatch.setattr(config, cls.__name__, other)
    parsed = getattr(load(tmp_path, ldap()), attr)
    required = {f.name for f in dataclasses.fields(other) if f.default is dataclasses.MISSING}
    assert parsed == other(**{name: getattr(parsed, name) for name in required})


# -- hosted domains, groups, mailboxes ---------------------------------------------------------------
def test_hosted_domains_groups_and_mailbox(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        base(
            domain_aliases=["example.net"],
            domains={"Example.COM": ["example.info"], "other.example": None},
            groups={"name_attribute": "mail", "object_classes": "groupOfNames", "members_send_as_group": True},
            mailbox={"home_root": "/var/vmail/", "home": "/var/vmail/{domain}/{login}", "uid": 5000, "gid": 5000},
            exporters=[
                {"kind": "postfix-virtual-mailbox", "path": "maps/vmailbox"},
                {"kind": "dovecot-userdb", "path": "dovecot/userdb", "fields": {"quota_rule": "*:storage={quota}"}},
            ],
        ),
    )
    assert cfg.routing.hosted == {"example.com": ("example.info",), "other.example": ()}
    assert cfg.routing.all_domains() == ("example.org", "example.net", "example.com", "example.info", "other.example")
    assert cfg.routing.groups is not None and cfg.routing.groups.object_classes == ("groupOfNames",)
    assert cfg.routing.groups.members_send_as_group and cfg.routing.groups.name_attribute == "mail"
    assert {"objectClass", "mail", "member", "uniqueMember", "rfc822MailMember"} <= set(
        cfg.routing.attributes.ldap_attributes()
    )
    assert cfg.routing.mailbox is not None and cfg.routing.mailbox.home_root == "/var/vmail"
    assert cfg.routing.mailbox.id_range == (1000, 60000)


def test_empty_groups_section_turns_groups_on_with_the_defaults(tmp_path: Path) -> None:
    from ldapsync.routing import GroupSettings

    assert load(tmp_path, base(groups={})).routing.groups == GroupSettings()
    assert load(tmp_path, base(groups=None)).routing.groups is None


def test_without_the_new_sections_nothing_changes(tmp_path: Path) -> None:
    both = [{"kind": "postfix-virtual", "path": "maps/alias"}, {"kind": "dovecot-passwd", "path": "pw"}]
    cfg = load(tmp_path, base(exporters=both))
    assert cfg.routing.hosted == {} and cfg.routing.groups is None and cfg.routing.mailbox is None
    assert cfg.routing.attributes.ldap_attributes() == [
        "accountStatus",
        "createTimestamp",
        "emailForward",
        "entryUUID",
        "mailDisableMessage",
        "mailPassword",
        "uid",
    ]


@pytest.mark.parametrize(
    ("over", "key", "message"),
    [
        ({"domains": {"example.org": []}}, "domains.example.org", "already configured by domain"),
        ({"domains": {"a.example": ["b.example"], "b.example": []}}, "domains.b.example", "already configured by"),
        ({"domains": {"a.example": ["example.org"]}}, "domains.a.example[0]", "already configured"),
        ({"domains": {"a.example": "b.example"}}, "domains.a.example", "list of alias domains"),
        ({"domains": {"not a domain": []}}, "domains.not a domain", "not a domain name"),
        ({"domains": ["a.example"]}, "domains", "dict"),
        ({"groups": {"name_attribute": "c n"}}, "groups.name_attribute", "not an LDAP attribute name"),
        ({"groups": {"object_classes": []}}, "groups.object_classes", "at least one"),
        ({"groups": {"member_attributes": [], "address_attributes": []}}, "groups.member_attributes", "need"),
        ({"groups": {"filter": "(cn=*)"}}, "groups.filter", "unknown key"),
        ({"mailbox": {"home": "/x/{login}"}}, "mailbox.home_root", "is required"),
        ({"mailbox": {"home_root": "vmail"}}, "mailbox.home_root", "not an absolute path"),
        ({"mailbox": {"home_root": "/var/vmail", "home": "/srv/{login}"}}, "mailbox.home", "not under home_root"),
        ({"mailbox": {"home_root": "/var/vmail", "home": "/var/vmail/../{login}"}}, "mailbox.home", "'..'"),
        ({"mailbox": {"home_root": "/var/vmail", "home": "/var/vmail/{uid}"}}, "mailbox.home", "placeholder"),
        ({"mailbox": {"home_root": "/var/vmail", "home": "/var/vmail/{login} x"}}, "mailbox.home", "absolute"),
        ({"mailbox": {"home_root": "/v", "id_range": [0, 10]}}, "mailbox.id_range", "root never owns mail"),
        ({"mailbox": {"home_root": "/v", "id_range": [10, 5]}}, "mailbox.id_range", "first <= last"),
        ({"mailbox": {"home_root": "/v", "id_range": []}}, "mailbox.id_range", "first <= last"),
        ({"groups": {"name_attribute": ""}}, "groups.name_attribute", "not an LDAP attribute name"),
        ({"mailbox": {"home_root": "/v", "uid": 0}}, "mailbox.uid", "outside id_range"),
        ({"mailbox": {"home_root": "/v", "gid": 99999}}, "mailbox.gid", "outside id_range"),
        (
            {"exporters": [{"kind": "dovecot-userdb", "path": "userdb"}]},
            "exporters[0]",
            "needs a mailbox: section",
        ),
        (
            {"exporters": [{"kind": "postfix-virtual-mailbox", "path": "m", "path_template": "/abs/{login}/"}]},
            "exporters[0].path_template",
            "relative",
        ),
        ({"attributes": {"home": "home directory"}}, "attributes.home", "not an LDAP attribute name"),
    ],
)
def test_new_section_errors_name_file_and_key(tmp_path: Path, over: dict[str, Any], key: str, message: str) -> None:
    err = error(tmp_path, base(**over))
    assert err.key == key, str(err)
    assert message in err.message, str(err)


def test_reload_hooks_name_their_outputs_or_serve_every_output(tmp_path: Path) -> None:
    two = [{"kind": "postfix-virtual", "path": "maps/alias"}, {"kind": "dovecot-passwd", "path": "dovecot/passwd"}]
    reload = [
        {"command": ["postfix", "reload"], "outputs": ["postfix-virtual"]},
        {"command": "doveadm reload", "outputs": ["dovecot-passwd"]},
        "/usr/bin/logger synced",
        {"command": ["true"]},
    ]
    hooks = load(tmp_path, base(exporters=two, hooks={"reload": reload})).hooks
    assert hooks.reload == (("postfix", "reload"), ("doveadm", "reload"), ("/usr/bin/logger", "synced"), ("true",))
    served = {i: [o for o in ("postfix-virtual", "dovecot-passwd") if hooks.reload_serves(i, o)] for i in range(4)}
    assert served == {
        0: ["postfix-virtual"],
        1: ["dovecot-passwd"],
        2: ["postfix-virtual", "dovecot-passwd"],
        3: ["postfix-virtual", "dovecot-passwd"],
    }


@pytest.mark.parametrize(
    ("reload", "key", "message"),
    [
        ([{"outputs": ["postfix-virtual"]}], "hooks.reload[0].command", "is required"),
        ([{"command": ["x"], "outputs": []}], "hooks.reload[0].outputs", "is empty"),
        ([{"command": ["x"], "outputs": ["postfix-virtua"]}], "hooks.reload[0].outputs[0]", "did you mean"),
        ([{"command": ["x"], "output": ["postfix-virtual"]}], "hooks.reload[0].output", "did you mean 'outputs'"),
        ([{"command": 3}], "hooks.reload[0].command", "command string or a list"),
    ],
)
def test_reload_hook_errors_name_the_key(tmp_path: Path, reload: list[Any], key: str, message: str) -> None:
    err = error(tmp_path, base(hooks={"reload": reload}))
    assert err.key == key and message in str(err), str(err)


def test_unknown_key_suggests_the_near_miss(tmp_path: Path) -> None:
    err = error(tmp_path, base(keep_generation=3))
    assert err.key == "keep_generation" and "did you mean 'keep_generations'?" in str(err)


def test_hashes_are_read_only_when_an_exporter_writes_them(tmp_path: Path) -> None:
    """An MX without a passwd-file never fetches mail password hashes (least privilege)."""
    mx = config.load(write(tmp_path, base(exporters=[{"kind": "postfix-virtual", "path": "out/virtual"}])))
    assert mx.routing.attributes.mail_password is None
    assert "mailPassword" not in mx.routing.attributes.ldap_attributes()
    doc = base(
        exporters=[
            {"kind": "postfix-virtual", "path": "out/virtual"},
            {"kind": "dovecot-passwd", "path": "out/passwd"},
        ]
    )
    imap = config.load(write(tmp_path, doc, "imap.yaml"))
    assert imap.routing.attributes.mail_password == "mailPassword"
    assert "mailPassword" in imap.routing.attributes.ldap_attributes()
