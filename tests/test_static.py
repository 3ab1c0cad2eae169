"""static: the admin's mail.yaml is trusted-but-checked; mistakes name the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ldapsync import static
from ldapsync.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DOMAIN, ALIASES = "example.org", ("host1.example.org", "example.net")


def parse(tmp_path: Path, text: str) -> static.Static:
    path = tmp_path / "mail.yaml"
    path.write_text(text)
    return static.load(path, DOMAIN, ALIASES)


def error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "mail.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        static.load(path, DOMAIN, ALIASES)
    assert str(path) in str(info.value)
    return info.value


def test_example_mail_yaml() -> None:
    st = static.load(REPO / "examples" / "mail.yaml", DOMAIN, ALIASES)
    assert {e.address: e.targets for e in st.aliases} == {
        "postmaster@example.org": ("alice@example.org", "bob@example.org"),
        "abuse@example.org": ("postmaster@example.org",),
        "hostmaster@example.org": ("alice@example.org",),
    }
    assert {e.address: e.targets for e in st.forwards} == {
        "noreply-bounces@example.org": ("bounces@lists.example.net",),
    }
    assert st.aliases[0].key == "aliases.postmaster"


def test_names_and_targets_are_canonicalised(tmp_path: Path) -> None:
    st = parse(
        tmp_path,
        """
aliases:
  Postmaster: [Alice, bob@EXAMPLE.NET, carol@host1.example.org, Ext@Elsewhere.Example, alice]
  info@example.org: alice
forwards:
  bounces: Lists@Lists.Example.NET
""",
    )
    by = {e.address: e for e in st.aliases}
    # bare names mean name@domain; alias-domain targets become the canonical address;
    # duplicates collapse; external targets keep their local part's case.
    assert by["postmaster@example.org"].targets == (
        "alice@example.org",
        "bob@example.org",
        "carol@example.org",
        "Ext@elsewhere.example",
    )
    assert by["info@example.org"].targets == ("alice@example.org",)
    assert st.forwards[0].address == "bounces@example.org"
    assert st.forwards[0].targets == ("Lists@lists.example.net",)


def test_empty_and_missing_file(tmp_path: Path) -> None:
    assert parse(tmp_path, "") == static.Static(tmp_path / "mail.yaml")
    assert static.load(None, DOMAIN, ALIASES) == static.Static()
    with pytest.raises(ConfigError, match="cannot read"):
        static.load(tmp_path / "missing.yaml", DOMAIN, ALIASES)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("aliases:\n  abuse@example.net: alice\n", "aliases.abuse@example.net", "alias domains follow"),
        ("aliases:\n  abuse@host1.example.org: alice\n", "aliases.abuse@host1.example.org", "alias domains"),
        ("aliases:\n  abuse@other.example: alice\n", "aliases.abuse@other.example", "is not in example.org"),
        ("aliases:\n  bad name: alice\n", "aliases.bad name", "not a valid local part"),
        ("aliases:\n  x: '|/bin/sh'\n", "aliases.x[0]", "target"),
        ("aliases:\n  x: ':include:/etc/aliases'\n", "aliases.x[0]", "include"),
        ("aliases:\n  x: /var/mail/x\n", "aliases.x[0]", "target"),
        ("aliases:\n  x: [alice, 'a b@example.org']\n", "aliases.x[1]", "target"),
        ("aliases:\n  x: []\n", "aliases.x", "non-empty"),
        ("aliases:\n  x: {a: b}\n", "aliases.x", "non-empty"),
        ("aliases:\n  x: [3]\n", "aliases.x[0]", "strings"),
        ("aliases:\n  3: alice\n", "aliases.3", "strings"),
        ("forwards:\n  x: [a@b.example, c@d.example]\n", "forwards.x", "one address"),
        ("aliases:\n  x: alice\nforwards:\n  X: a@b.example\n", "forwards.X", "already defined by aliases.x"),
        ("aliases:\n  x: alice\n  x@example.org: bob\n", "aliases.x@example.org", "already defined"),
        ("alias:\n  x: alice\n", "alias", "unknown key"),
        ("aliases: [x]\n", "aliases", "mapping"),
        ("- x\n", None, "mapping"),
        ("aliases: {x: [unclosed\n", None, "not valid YAML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str | None, message: str) -> None:
    err = error(tmp_path, text)
    assert err.key == key, str(err)
    assert message in err.message, str(err)


def test_yaml_round_trip_of_many_entries_keeps_order(tmp_path: Path) -> None:
    doc = {"aliases": {f"list{i}": [f"user{i}", f"user{i + 1}"] for i in range(50)}}
    st = parse(tmp_path, yaml.safe_dump(doc, sort_keys=False))
    assert [e.address for e in st.aliases] == [f"list{i}@example.org" for i in range(50)]
    assert all(e.key == f"aliases.list{i}" for i, e in enumerate(st.aliases))


# -- hosted domains ----------------------------------------------------------------------------------
HOSTED = {"example.com": ("example.info",)}


def test_names_and_targets_in_further_hosted_domains(tmp_path: Path) -> None:
    path = tmp_path / "mail.yaml"
    path.write_text(
        "aliases:\n  sales@Example.COM: [bob@EXAMPLE.INFO, alice, carol@example.net]\n"
        "forwards:\n  info@example.com: x@outside.example\n"
    )
    st = static.load(path, DOMAIN, ALIASES, HOSTED)
    assert {e.address: e.targets for e in st.aliases} == {
        "sales@example.com": ("bob@example.com", "alice@example.org", "carol@example.org")
    }
    assert {e.address: e.targets for e in st.forwards} == {"info@example.com": ("x@outside.example",)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("aliases:\n  sales@example.info: alice\n", "name the address in example.com; alias domains follow it"),
        ("aliases:\n  x@outside.example: alice\n", "is not in a hosted domain (example.org, example.com)"),
    ],
)
def test_hosted_domain_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mail.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        static.load(path, DOMAIN, ALIASES, HOSTED)
    assert info.value.key == f"aliases.{text.split()[1].rstrip(':')}"
