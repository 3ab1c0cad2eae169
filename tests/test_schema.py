"""schema: attribute presets and overrides; the shipped LDIF defines what the presets read."""

from __future__ import annotations

import pytest

from ldapsync import schema
from ldapsync.errors import ConfigError


def test_presets() -> None:
    ud = schema.resolve("ud-ldap", {}, file=None)
    assert ud == schema.AttributeMap(
        login="uid",
        forward="emailForward",
        mail_password="mailPassword",
        status="accountStatus",
        disable_message="mailDisableMessage",
    )
    ilmr = schema.resolve("inetlocalmailrecipient", {}, file=None)
    assert (ilmr.forward, ilmr.alias, ilmr.status) == ("mailRoutingAddress", "mailLocalAddress", None)


def test_overrides_and_custom() -> None:
    m = schema.resolve("ud-ldap", {"forward": "mailRoutingAddress", "status": None}, file=None)
    assert m.forward == "mailRoutingAddress" and m.status is None and m.login == "uid"
    custom = schema.resolve("custom", {"login": "sAMAccountName", "forward": "otherMailbox"}, file=None)
    assert custom == schema.AttributeMap(login="sAMAccountName", forward="otherMailbox")


def test_only_needed_attributes_are_requested() -> None:
    assert schema.PRESETS["ud-ldap"].ldap_attributes() == [
        "accountStatus",
        "createTimestamp",
        "emailForward",
        "entryUUID",
        "mailDisableMessage",
        "mailPassword",
        "uid",
    ]


@pytest.mark.parametrize(
    ("preset", "overrides", "key"),
    [
        ("nope", {}, "schema"),
        ("ud-ldap", {"aliases": "x"}, "attributes.aliases"),
        ("ud-ldap", {"forward": "bad name"}, "attributes.forward"),
        ("ud-ldap", {"forward": "1abc"}, "attributes.forward"),
        ("ud-ldap", {"forward": ["a"]}, "attributes.forward"),
        ("ud-ldap", {"login": None}, "attributes.login"),
        ("custom", {}, "attributes.login"),
    ],
)
def test_errors_name_the_key(preset: str, overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        schema.resolve(preset, overrides, file=None)
    assert info.value.key == key


def test_shipped_ldif_defines_every_ud_ldap_attribute() -> None:
    text = (schema.SCHEMA_DIR / "ud-ldap.ldif").read_text()
    for name in ("emailForward", "mailPassword", "accountStatus", "mailDisableMessage"):
        assert f"NAME '{name}'" in text or f"NAME ( '{name}'" in text, name
