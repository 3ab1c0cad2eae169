"""validate: the strict gate every LDAP value passes before it can reach a map or the passwd-file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from dovecotauth import auth_server
from passlib import hash as ph

from ldapsync import routing, schema, validate
from ldapsync.directory import Entry, Snapshot
from ldapsync.exporters.dovecot import PasswdExporter
from ldapsync.static import Static
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


# -- every scheme Dovecot verifies ------------------------------------------------------------
SLAPPASSWD = shutil.which("slappasswd") or "/usr/sbin/slappasswd"
SECRET = "correct horse 9"


def slappasswd(scheme: str, *extra: str) -> str:
    """What OpenLDAP's own tool stores (pw-sha2 is the module slapd loads for the SHA-2 schemes)."""
    cmd = [SLAPPASSWD, "-o", "module-load=pw-sha2", "-h", scheme, "-s", SECRET, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def openssl_passwd(flag: str) -> str:
    cmd = ["openssl", "passwd", flag, SECRET]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def doveadm_pw(scheme: str) -> str:
    cmd = ["doveadm", "pw", "-s", scheme, "-p", SECRET]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def pbkdf2() -> str:
    salt = base64.b64encode(os.urandom(12), b"./").decode()
    return f"{{PBKDF2}}$1${salt}$5000${hashlib.pbkdf2_hmac('sha1', SECRET.encode(), salt.encode(), 5000).hex()}"


def scram(name: str, digest: str) -> str:
    """RFC 5802 keys, written as Dovecot writes them: iterations,salt,StoredKey,ServerKey."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac(digest, SECRET.encode(), salt, 4096)
    stored = hashlib.new(digest, hmac.new(salted, b"Client Key", digest).digest()).digest()
    server = hmac.new(salted, b"Server Key", digest).digest()
    b64 = [base64.b64encode(x).decode() for x in (salt, stored, server)]
    return f"{{{name}}}4096,{','.join(b64)}"


# stored value (as the LDAP side writes it) -> the Dovecot scheme ldapsync must write, weak?
PRODUCERS: dict[str, tuple[Callable[[], str], str, bool]] = {
    "SMD5": (lambda: slappasswd("{SMD5}"), "SMD5", False),
    "SSHA": (lambda: slappasswd("{SSHA}"), "SSHA", False),
    "SSHA256": (lambda: slappasswd("{SSHA256}"), "SSHA256", False),
    "SSHA512": (lambda: slappasswd("{SSHA512}"), "SSHA512", False),
    "MD5": (lambda: slappasswd("{MD5}"), "LDAP-MD5", True),
    "SHA": (lambda: slappasswd("{SHA}"), "SHA", True),
    "SHA256": (lambda: slappasswd("{SHA256}"), "SHA256", True),
    "SHA512": (lambda: slappasswd("{SHA512}"), "SHA512", True),
    "PLAIN-MD5": (lambda: "{PLAIN-MD5}" + hashlib.md5(SECRET.encode()).hexdigest(), "PLAIN-MD5", True),
    "DES-CRYPT": (lambda: slappasswd("{CRYPT}", "-c", "%.2s"), "DES-CRYPT", True),
    # Debian's default {CRYPT} for a password longer than 8 characters: a bigcrypt string
    "BIGCRYPT": (lambda: slappasswd("{CRYPT}"), "CRYPT", True),
    "MD5-CRYPT": (lambda: "{CRYPT}" + openssl_passwd("-1"), "MD5-CRYPT", False),
    "SHA256-CRYPT": (lambda: openssl_passwd("-5"), "SHA256-CRYPT", False),
    "SHA512-CRYPT": (lambda: openssl_passwd("-6"), "SHA512-CRYPT", False),
    "BLF-CRYPT": (lambda: "{CRYPT}" + doveadm_pw("BLF-CRYPT").split("}", 1)[1], "BLF-CRYPT", False),
    "PBKDF2": (pbkdf2, "PBKDF2", False),
    "SCRAM-SHA-1": (lambda: scram("SCRAM-SHA-1", "sha1"), "SCRAM-SHA-1", False),
    "SCRAM-SHA-256": (lambda: scram("SCRAM-SHA-256", "sha256"), "SCRAM-SHA-256", False),
}


@pytest.mark.parametrize("name", sorted(PRODUCERS))
def test_each_scheme_is_translated_to_the_dovecot_name_and_flagged_weak_or_not(name: str) -> None:
    produce, scheme, weak = PRODUCERS[name]
    stored = produce()
    checked = validate.check_password(stored)
    assert (checked.scheme, checked.weak) == (scheme, weak)
    assert checked.text.startswith("{" + scheme + "}")
    assert checked.text.endswith(stored.split("}", 1)[-1])


def test_debians_own_crypt_of_a_long_password_is_accepted_as_weak() -> None:
    """`slappasswd -h {CRYPT}` on Debian 12 writes bigcrypt for passwords over 8 characters:
    Dovecot verifies it, all of the password counts, and it is as weak as DES-CRYPT."""
    long_secret = "a much longer secret, 33 characters"
    for secret, length in ((SECRET, 24), (long_secret, 2 + 11 * 5)):
        cmd = [SLAPPASSWD, "-h", "{CRYPT}", "-s", secret]
        stored = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        assert len(stored) == len("{CRYPT}") + length, stored
        checked = validate.check_password(stored)
        assert checked == validate.Hash(stored, "CRYPT", weak=True)

        def verify(password: str, text: str = checked.text) -> int:
            cmd = ["doveadm", "pw", "-t", text, "-p", password]
            return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode

        assert verify(secret) == 0
        assert verify(secret[:8]) != 0 and verify(secret[:-1] + "!") != 0, "bigcrypt reads the whole password"
    users = [Entry("uid=long,ou=users,dc=example,dc=org", {"uid": ("long",), "mailpassword": (stored,)})]
    for policy, passwords in (("warn", {"long": checked.text}), ("refuse", {})):
        settings = routing.Settings("example.org", (), schema.PRESETS["ud-ldap"], weak_passwords=policy)
        built, report = routing.build(Snapshot(tuple(users), "test"), Static(), settings, TODAY)
        assert built.passwords == passwords
        problems = report.notices if policy == "warn" else report.rejections
        assert [(r.dn, r.attribute) for r in problems] == [("uid=long,ou=users,dc=example,dc=org", "mailPassword")]
        assert "weak hash (CRYPT)" in problems[0].reason


@pytest.mark.skipif(shutil.which("dovecot") is None, reason="needs dovecot-core")
def test_every_accepted_scheme_logs_in_through_a_real_dovecot(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each hash, rendered by the passwd-file exporter, verifies in Dovecot: right yes, wrong no."""
    stored = {name.lower().replace("-", ""): PRODUCERS[name][0]() for name in PRODUCERS}
    entries = tuple(
        Entry(f"uid={login},ou=users,dc=example,dc=org", {"uid": (login,), "mailpassword": (value,)})
        for login, value in stored.items()
    )
    routed, report = routing.build(
        Snapshot(entries, "test"),
        Static(),
        routing.Settings(domain="example.org", domain_aliases=(), attributes=schema.PRESETS["ud-ldap"]),
        TODAY,
    )
    assert report.rejections == [] and sorted(routed.passwords) == sorted(stored)
    assert report.weak_passwords == sum(weak for _, _, weak in PRODUCERS.values())
    root = Path(tempfile.mkdtemp(prefix="ldapsync-schemes-"))
    try:
        passwd = root / "passwd"
        passwd.write_bytes(PasswdExporter({}).render(routed))
        with auth_server(root, passwd) as conf:

            def auth(user: str, password: str) -> int:
                cmd = ["doveadm", "-c", str(conf), "auth", "test", "-x", "no-penalty", user, password]
                return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode

            # The wrong password differs in its first character: DES-CRYPT reads only eight.
            # The logins are independent: asked concurrently, as a mail host's clients would.
            with ThreadPoolExecutor(max_workers=8) as pool:
                right = dict(zip(stored, pool.map(lambda login: auth(login, SECRET), stored), strict=True))
                wrong = dict(zip(stored, pool.map(lambda login: auth(login, "x" + SECRET), stored), strict=True))
            verdicts = {login: (right[login], wrong[login]) for login in stored}
        assert verdicts == dict.fromkeys(stored, (0, 77)), (root / "dovecot.log").read_text()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("{SHA}" + "e5e9fa1ba31ecd1ae84f75caaa474f3a663f05f4", "wrong length"),  # hex is not RFC 2307
        ("{SHA}" + base64.b64encode(b"x" * 19).decode(), "wrong length for a 20-byte digest"),
        ("{SHA256}" + base64.b64encode(b"x" * 20).decode(), "wrong length for a 32-byte digest"),
        ("{SMD5}" + base64.b64encode(b"x" * 16).decode(), "4 to 16-byte salt"),  # no salt
        ("{SSHA512}" + base64.b64encode(b"x" * 84).decode(), "4 to 16-byte salt"),
        ("{MD5}XR4ilOzQ4PCOq3aQ0qbuaR==", "not base64"),  # stray bits: not canonical
        ("{MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ", "not base64"),  # padding missing
        ("{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee6", "not 32 hex"),
        ("{PBKDF2}$1$salt$5000$" + "a" * 39, "malformed PBKDF2"),
        ("{PBKDF2}1$salt$5000$" + "a" * 40, "malformed PBKDF2"),
        ("{PBKDF2}$1$$5000$" + "a" * 40, "malformed PBKDF2"),  # no salt
        ("{PBKDF2}$1$salt$0$" + "a" * 40, "malformed PBKDF2"),
        ("{SCRAM-SHA-1}4096,c2FsdA==,AAAA", "iterations,salt,StoredKey,ServerKey"),
        ("{SCRAM-SHA-1}1000,c2FsdA==," + "A" * 27 + "=," + "A" * 27 + "=", "iterations out of"),
        ("{SCRAM-SHA-1}4096,," + "A" * 27 + "=," + "A" * 27 + "=", "salt missing"),
        ("{SCRAM-SHA-256}4096,c2FsdA==," + "A" * 27 + "=," + "A" * 27 + "=", "base64 of 32 bytes"),
        ("{DES-CRYPT}kTGe9g4av0mA", "unknown or malformed crypt"),
        ("{CRYPT}QlNWjF6L2D1McTomgkmbxXhQx", "unknown or malformed crypt"),  # bigcrypt is 2 + 11 per block
        ("{DES-CRYPT}QlNWjF6L2D1McTomgkmbxXhQ", "unknown or malformed crypt"),  # bigcrypt is not DES-CRYPT
        ("QlNWjF6L2D1McTomgkmbxXhQ", "plaintext?"),  # only with an explicit {CRYPT}
        ("kTGe9g4av0mAE", "plaintext?"),  # a bare 13-character word may be a password
        ("{MD5}$1$salt$short", "malformed md5_crypt"),
    ],
)
def test_malformed_digests_are_refused_without_quoting_them(value: str, reason: str) -> None:
    with pytest.raises(Invalid) as info:
        validate.check_password(value)
    assert reason in str(info.value)
    body = value.split("}", 1)[-1]
    assert body[4:20] not in str(info.value) or len(body) < 20


def test_dovecot_md5_crypt_under_the_md5_prefix_is_md5_crypt() -> None:
    """Dovecot's own {MD5} is MD5-CRYPT; RFC 2307's is LDAP-MD5: the body tells them apart."""
    md5crypt = "$1$NeuqKH2q$RDpcAKsEaEwyzUgBQYR.g0"
    assert validate.check_password("{MD5}" + md5crypt) == validate.Hash("{MD5-CRYPT}" + md5crypt, "MD5-CRYPT")
    assert validate.check_password("{MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==").text == "{LDAP-MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ=="


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20261202113500Z", "20261202113500.000000"),
        ("20261202113500.25Z", "20261202113500.250000"),
        ("20261202133500+0200", "20261202113500.000000"),
        ("2026120211350Z", None),
        ("20261302113500Z", None),
        ("yesterday", None),
    ],
)
def test_generalized_time_sorts_in_utc(value: str, expected: str | None) -> None:
    assert validate.generalized_time(value) == expected


@pytest.mark.parametrize("value", ["1G", "500M", "2GB", "1048576", "0"])
def test_quota_sizes(value: str) -> None:
    assert validate.quota(value) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("10%", "is a percentage: Dovecot applies it as a bare number"),
        ("100%", "is a percentage"),
        ("%u", "is not a quota size"),
        ("1G%", "is a percentage"),
        ("1G userdb_uid=0", "is not a quota size"),
        ("1.5G", "is not a quota size"),
    ],
)
def test_quota_refuses_percentages_and_junk(value: str, reason: str) -> None:
    with pytest.raises(Invalid, match=reason):
        validate.quota(value)


@pytest.mark.parametrize(
    "value",
    [
        "user@example.org",
        "First.Last+tag@example.org",
        "user@Example.org",
        "-user@example.org",
        "user-@example.org",
        "us..er@example.org",
        ".user@example.org",
        "user@example",
        "user@-example.org",
        "user@example-.org",
        "user@example.org.",
        "user@exa_mple.org",
        " user@example.org",
        "user@example.org\n",
        "user@example.org ",
        "us\ter@example.org",
        "|cmd@example.org",
        "/file@example.org",
        ":include:/x@example.org",
        "usér@example.org",
        "user@\u212aexample.org",
        "a@b@example.org",
        "a" * 240 + "@example.org",
        "a" * 243 + "@example.org",
        "a" * 242 + "@example.org",
        "user@" + "a" * 63 + ".org",
        "user@" + "a" * 64 + ".org",
        "=%_+@example.org",
        "@example.org",
        "user@",
    ],
)
def test_address_fast_path_agrees_with_every_rule(value: str) -> None:
    """The one-regex path for plain addresses accepts exactly what the rule-by-rule check accepts,
    with the same result."""
    try:
        expected: str | None = validate._address_checked(value)
    except validate.Invalid as e:
        expected, reason = None, str(e)
    if expected is None:
        with pytest.raises(validate.Invalid) as raised:
            validate.address(value)
        assert str(raised.value) == reason
    else:
        assert validate.address(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "$1$NeuqKH2q$RDpcAKsEaEwyzUgBQYR.g0",
        "$1$NeuqKH2q$RDpcAKsEaEwyzUgBQYR.g",
        "$2b$10$1SkB9jHvJDSZXEQAIjwH5ONHG5W2rLYCE40q8SeNviLt4XCBMcsfG",
        "$2x$10$1SkB9jHvJDSZXEQAIjwH5ONHG5W2rLYCE40q8SeNviLt4XCBMcsfG",
        "$2b$10$1SkB9jHvJDSZXEQAIjwH5ONHG5W2rLYCE40q8SeNviLt4XCBMcsf",
        "$6$rounds=5000$Mwbjj2JAVj1UcS5G$nyzXjxh.GlSMV59F5eiRXhZdNputRFpfSv8PpCyTF5Bl5jVMAOeRlJzp8PZW7XF4SsWhilFZqYVvsmQ6BSpFu1",
        "$6$broken",
        "$5$salt$" + "a" * 43,
        "$5$salt$" + "a" * 42,
    ],
)
def test_crypt_shape_check_gives_the_libpass_verdict(value: str) -> None:
    """A complete crypt(3) hash is accepted by its shape alone; anything else still gets the
    handler's own verdict (identify, then parse) and its reason."""
    from passlib import hash as ph

    handler = {"$1$": ph.md5_crypt, "$2": ph.bcrypt, "$5$": ph.sha256_crypt, "$6$": ph.sha512_crypt}
    h = next(v for k, v in handler.items() if value.startswith(k))
    shape = validate._CRYPT_SHAPES[h.name]
    if shape.fullmatch(value):
        assert h.identify(value)
        validate._parse(h, value)
    else:
        with pytest.raises(validate.Invalid, match=f"malformed {h.name} hash"):
            validate._parse(h, value)
