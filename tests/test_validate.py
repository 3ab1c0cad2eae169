"""validate: the strict gate every LDAP value passes before it can reach a map or the passwd-file."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from passlib import hash as ph

from ldapsync import validate
from ldapsync.validate import Invalid

# Real hashes from fixtures/ldif/demo.ldif (each verified there with doveadm pw -t).
HASHES = {
    "$1$NeuqKH2q$RDpcAKsEaEwyzUgBQYR.g0": "MD5-CRYPT",
    "$5$IaIAYq9cxgbgaund$pXRHdqMzKPrRT8G0F0brEX7EBbC1SqtuDhrOalQbZQA": "SHA256-CRYPT",
    "$6$tzQDEwrEjlV6b/Zr$2Zb.f5NRN0KrY0rT/n0/clRPRQTPkwCIVmGd5jOyTE/wHIA0UVxbFAFxCMyYzy6XB6859.YIKQnV.ozm3gl2z.": (
        "SHA512-CRYPT"
    ),
    "$2b$10$1SkB9jHvJDSZXEQAIjwH5ONHG5W2rLYCE40q8SeNviLt4XCBMcsfG": "BLF-CRYPT",
    "$y$j9T$Y3huYXEiash5V9tt$ixkQuog82axg4k2qnFCFQcvPRMSnVjbgI/40pJtGq18": "CRYPT",
    "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ==": "SSHA",
    "{SSHA512}nhq5J9y0EeACnKDvYP1Km20MoVnJek4+1UhT4NEbr+JQ4Fq3EyPguA1GqV4muhb8ryob8y5ejhEhi1+dEhV0P+bOBbw72kvb": (
        "SSHA512"
    ),
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$PTMV//McjUDCUSo3E1snEg$vjwNdr7471O3RVbgaznQV/4yUjX5LeR71sQ8/5Je0b8": (
        "ARGON2ID"
    ),
    "{CRYPT}$6$DIVZDtf6vB4BxNXa$l4G5idW3XaOwK0KmZnVMVysQu3vM1ojMuFFSFiMbbuiqCv3qmokN8."
    "agZJH8bRgzgIND88YbrrbarsKXH4RSI/": ("SHA512-CRYPT"),
}
SHA512 = next(h for h, s in HASHES.items() if s == "SHA512-CRYPT" and h.startswith("$6$"))
SSHA = "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ=="


# -- addresses ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.org", "alice@example.org"),
        ("first.last@example.org", "first.last@example.org"),
        ("a+tag@sub.example.org", "a+tag@sub.example.org"),
        ("x_y%z=w-v@example.org", "x_y%z=w-v@example.org"),
        ("Bob@Elsewhere.EXAMPLE", "Bob@elsewhere.example"),  # domain folded, local part kept
    ],
)
def test_address_accepts_plain_addresses(value: str, expected: str) -> None:
    assert validate.address(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        " alice@example.org",
        "alice@example.org ",
        "ali ce@example.org",
        "alice@example.org\tbob@example.org",
        "alice@example.org,bob@example.org",
        "alice@example.org\nroot@example.org",
        "alice@example.org\r",
        "nul@example.org\x00attacker@evil.example",
        "ctl\x01@example.org",
        "del\x7f@example.org",
        "|/usr/bin/evil",
        "|cmd@example.org",
        "/var/mail/alice",
        ":include:/etc/passwd",
        ":INCLUDE:/etc/passwd",
        "alice:x@example.org",
        "#alice@example.org",
        "jürgen@example.org",
        "alice@exämple.org",
        "\u212aate@example.org",  # KELVIN SIGN lower-cases to ASCII 'k'
        "alice",
        "alice@",
        "@example.org",
        "alice@@example.org",
        "alice@localhost",
        "a..b@example.org",
        ".a@example.org",
        "-a@example.org",
        "a@-example.org",
        "a@example..org",
        "x" * 250 + "@example.org",
        "",
    ],
)
def test_address_rejects_unsafe_values(value: str) -> None:
    with pytest.raises(Invalid):
        validate.address(value)


def test_address_length_limit_is_254() -> None:
    ok = "x" * (254 - len("@example.org")) + "@example.org"
    assert validate.address(ok) == ok
    with pytest.raises(Invalid, match="254"):
        validate.address("x" + ok)


def test_local_part_and_login() -> None:
    assert validate.local_part("postmaster") == "postmaster"
    for bad in ("post master", "a,b", "-x", "ä", "a:b", "", "|x"):
        with pytest.raises(Invalid):
            validate.local_part(bad)
    assert validate.login("Alice") == "alice"  # logins are case-folded
    assert validate.login("a.b_c-9") == "a.b_c-9"
    for bad in ("bad user", "bad:user", "bad\nuser", "", ".x", "x" * 65, "\u212aate", "jürgen", "a@b", "a.", "a..b"):
        with pytest.raises(Invalid):
            validate.login(bad)
    assert validate.login("x" * 64) == "x" * 64


def test_disable_message() -> None:
    assert validate.disable_message("  Gone, ask admin@example.org  ") == "Gone, ask admin@example.org"
    for bad in ("", "   ", "Gone.\nattacker@evil.example OK", "tab\there", "ümlaut", "x" * 201):
        with pytest.raises(Invalid):
            validate.disable_message(bad)


# -- passwords ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("stored", "scheme"), list(HASHES.items()))
def test_every_scheme_is_normalised_to_the_dovecot_name(stored: str, scheme: str) -> None:
    out = validate.password(stored)
    assert out.startswith("{" + scheme + "}")
    body = stored.split("}", 1)[1] if stored.startswith("{") else stored
    assert out == "{" + scheme + "}" + body


def test_scheme_prefix_is_case_insensitive() -> None:
    assert validate.password("{crypt}" + SHA512) == "{SHA512-CRYPT}" + SHA512
    assert validate.password("{ssha}" + SSHA[6:]) == SSHA
    assert validate.password("{SHA512-CRYPT}" + SHA512) == "{SHA512-CRYPT}" + SHA512


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("hunter2", "plaintext"),
        ("{PLAIN}hunter2", "plaintext"),
        ("{plain}hunter2", "plaintext"),
        ("{CLEARTEXT}hunter2", "plaintext"),
        ("{CLEAR}hunter2", "plaintext"),
        ("$6$broken", "malformed"),
        ("$6$salt$short", "malformed"),
        ("{SSHA}not-base64!!", "malformed"),
        ("{FOO}hunter2", "unknown"),
        ("{MD5}hunter2", "malformed LDAP-MD5"),
        ("{}hunter2", "malformed"),
        ("{CRYPT}hunter2", "unknown or malformed"),
        ("{MD5-CRYPT}" + SHA512, "unknown or malformed"),  # scheme and body disagree
        ("{ARGON2ID}$argon2id$v=19$m=\u0666,t=3,p=1$PTMV//McjUDCUSo3E1snEg$vjwNdr7471O3RVbgaznQV/4yUjX5", "ASCII"),
        ("$y$j9T$hunter2", "malformed yescrypt"),
        (SSHA + ":1000:1000::/root", "':'"),
        (SSHA + "\nroot:{PLAIN}owned", "whitespace"),
        (SSHA + "\x00hunter2", "control"),
        (SSHA + " hunter2", "whitespace"),
        (SSHA + "\x7f", "DEL"),
        ("", "plaintext"),
    ],
)
def test_bad_passwords_are_refused_without_quoting_them(value: str, reason: str) -> None:
    with pytest.raises(Invalid) as info:
        validate.password(value)
    message = str(info.value)
    assert reason in message
    # The reason goes to logs: it must carry no part of the secret.
    assert "hunter2" not in message
    for secret_part in ("PTMV", "ow0LAeWb", "owned", "broken", "short"):
        assert secret_part not in message


# -- retired accounts ---------------------------------------------------------------------------
TODAY = date(2026, 11, 21)


@pytest.mark.parametrize(
    ("status", "retired"),
    [
        ("inactive", True),
        ("memorial", True),
        ("inactive since 2001", True),
        ("retiring 2020-01-01", True),
        ("retiring 2026-05-01", True),  # 204 days ago: past the ~6 month grace
        ("retiring 2026-06-01", False),  # 173 days ago: still in grace
        ("retiring 2099-01-01", False),  # announced, not reached
        ("retiring", False),  # userdir-ldap: no date, not retired
        ("retiring soon", False),  # unparsable date, not retired
        ("active", False),
        ("", False),
        ("Inactive", False),  # userdir-ldap compares case-sensitively
    ],
)
def test_retired_semantics(status: str, retired: bool) -> None:
    assert validate.is_retired(status, TODAY) is retired


def test_domain_names() -> None:
    assert validate.is_domain("example.org")
    assert validate.is_domain("host1.example.org")
    for bad in ("localhost", "Example.org", "ex ample.org", "-x.org", "x..org", "ä.org", "x.org.", "a" * 64 + ".org"):
        assert not validate.is_domain(bad)


@pytest.mark.parametrize(
    ("handler", "settings"),
    [
        (ph.md5_crypt, {}),
        (ph.sha256_crypt, {}),
        (ph.sha256_crypt, {"rounds": 6000}),
        (ph.sha512_crypt, {}),
        (ph.sha512_crypt, {"rounds": 5001}),
        (ph.ldap_salted_sha1, {"salt_size": 4}),
        (ph.ldap_salted_sha1, {"salt_size": 16}),
        (ph.ldap_salted_sha256, {}),
        (ph.ldap_salted_sha512, {"salt_size": 8}),
    ],
)
def test_fast_hash_shape_check_agrees_with_libpass(handler: Any, settings: dict[str, Any]) -> None:
    """The regex/base64 shape checks accept what libpass makes and refuse every truncation."""
    good = handler.using(**settings).hash("secret")
    assert validate.password(good).endswith(good.split("}", 1)[-1])
    for cut in range(1, len(good) - 1):
        truncated = good[:cut]
        try:
            libpass_ok = bool(handler.from_string(truncated).checksum)
        except (ValueError, TypeError):
            libpass_ok = False
        try:
            validate.password(truncated)
            ours_ok = True
        except validate.Invalid:
            ours_ok = False
        assert ours_ok == libpass_ok, truncated
