"""Strict checks for values that come from LDAP: untrusted user input.

Every output format is line- and separator-based, so a value is accepted only if it cannot
carry a separator of ANY output (whitespace, comma, colon, '#', control characters) nor a
Postfix special ('|command', '/file', ':include:'). Rejection reasons never quote a
password value: they end up in logs.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from passlib import hash as ph

# RFC 5321 dot-atom, minus every character Postfix or a map format treats specially.
_LOCAL = r"[A-Za-z0-9_%+=-]+(?:\.[A-Za-z0-9_%+=-]+)*"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_ADDRESS_RE = re.compile(rf"({_LOCAL})@({_LABEL}(?:\.{_LABEL})+)")
_LOCAL_RE = re.compile(_LOCAL)
# A login is also the local part of login@domain: a dot-atom, so no leading, trailing or double dot.
LOGIN_RE = re.compile(r"(?=.{1,64}\Z)[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9_-]+)*")
MAX_ADDRESS = 254
MAX_MESSAGE = 200


class Invalid(ValueError):
    """A value failed validation; str() is a reason safe to log."""


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_PW_BAD_RE = re.compile(r"[\s\x00-\x1f:]")


def is_domain(value: str) -> bool:
    return len(value) <= 253 and _DOMAIN_RE.fullmatch(value) is not None


# The common case, checked in one match: an address every rule of address() accepts as it is
# (ASCII, no separator or control character, not '-'-led, domain already lower-case, at most
# 254 characters). Anything else takes the full path, which names what is wrong.
_PLAIN_ADDRESS_RE = re.compile(rf"(?=.{{1,{MAX_ADDRESS}}}\Z)(?!-){_LOCAL}@{_LABEL}(?:\.{_LABEL})+")


def address(value: str) -> str:
    """A complete, safe mail address with a lower-cased domain."""
    if _PLAIN_ADDRESS_RE.fullmatch(value) is not None:
        return value
    return _address_checked(value)


def _address_checked(value: str) -> str:
    """address() rule by rule: the first rule a value breaks is the reason given."""
    if value != value.strip():
        raise Invalid("leading or trailing whitespace")
    if len(value) > MAX_ADDRESS:
        raise Invalid(f"longer than {MAX_ADDRESS} characters")
    if _CONTROL_RE.search(value):
        raise Invalid("contains a control character")
    if value.startswith(("|", "/", ":include:")) or value.lower().startswith(":include:"):
        raise Invalid("is a command, file or :include: target, not an address")
    if not value.isascii():  # before lower(): 'K' (U+212A KELVIN SIGN).lower() is ASCII 'k'
        raise Invalid("contains non-ASCII characters")
    m = _ADDRESS_RE.fullmatch(value.lower())
    if m is None or value.startswith("-"):
        raise Invalid("is not a plain user@domain address")
    local = value.rsplit("@", 1)[0]
    out = f"{local}@{m.group(2)}"
    return value if out == value else out  # the entry's own string: one copy in memory, not two


def local_part(value: str) -> str:
    """A bare name from static YAML (`postmaster`), checked like an address's local part."""
    if not value.isascii() or _LOCAL_RE.fullmatch(value) is None or value.startswith("-"):
        raise Invalid(f"{value!r} is not a valid local part")
    return value


def login(value: str) -> str:
    """A login name, safe as a Dovecot passwd-file user field and a map value."""
    lowered = value.lower()
    # isascii first: non-ASCII letters can lower-case into ASCII (U+212A -> 'k'), a login hijack.
    if not value.isascii() or LOGIN_RE.fullmatch(lowered) is None:
        raise Invalid("is not a valid login (letters, digits, '.', '_', '-'; no '..' or trailing '.'; at most 64)")
    return value if lowered == value else lowered


def disable_message(value: str) -> str:
    """Text for a Postfix REJECT reply: printable ASCII, one line."""
    text = value.strip()
    if not text:
        raise Invalid("is empty")
    if any(not (0x20 <= ord(c) < 0x7F) for c in text):
        raise Invalid("must be printable ASCII on one line")
    if len(text) > MAX_MESSAGE:
        raise Invalid(f"longer than {MAX_MESSAGE} characters")
    return text


@dataclass(frozen=True, slots=True)
class Hash:
    """A stored hash as Dovecot verifies it: `{SCHEME}body`, and whether the scheme is weak."""

    text: str
    scheme: str  # the Dovecot scheme name
    weak: bool = False  # unsalted digest, DES-CRYPT or bigcrypt: one GPU-hour cracks most of them


# Accepted password schemes: (passlib handler, Dovecot scheme name).
_CRYPT_HANDLERS: tuple[tuple[str, object, str], ...] = (
    ("$1$", ph.md5_crypt, "MD5-CRYPT"),
    ("$5$", ph.sha256_crypt, "SHA256-CRYPT"),
    ("$6$", ph.sha512_crypt, "SHA512-CRYPT"),
    ("$2b$", ph.bcrypt, "BLF-CRYPT"),
    ("$2y$", ph.bcrypt, "BLF-CRYPT"),
    ("$2a$", ph.bcrypt, "BLF-CRYPT"),
)
# RFC 2307-style digests, base64 of digest (+ salt): stored scheme -> (Dovecot scheme, digest
# bytes, salted). The names differ: LDAP's {MD5} is Dovecot's LDAP-MD5 (Dovecot's own {MD5}
# means MD5-CRYPT), so the prefix is translated, never copied.
_DIGESTS: dict[str, tuple[str, int, bool]] = {
    "MD5": ("LDAP-MD5", 16, False),
    "LDAP-MD5": ("LDAP-MD5", 16, False),
    "SHA": ("SHA", 20, False),
    "SHA1": ("SHA", 20, False),
    "SHA256": ("SHA256", 32, False),
    "SHA512": ("SHA512", 64, False),
    "SMD5": ("SMD5", 16, True),
    "SSHA": ("SSHA", 20, True),
    "SSHA256": ("SSHA256", 32, True),
    "SSHA512": ("SSHA512", 64, True),
}
SALT_BYTES = (4, 16)  # what slappasswd, Dovecot and 389-ds write (4 or 8); libpass's bounds
_B64CRYPT = "./0-9A-Za-z"
# yescrypt: libpass has no handler; check the crypt(3) shape strictly instead.
_YESCRYPT_RE = re.compile(rf"\$y\$[{_B64CRYPT}]+\$[{_B64CRYPT}]{{1,86}}\$[{_B64CRYPT}]{{43}}")
_ARGON2_RE = re.compile(
    r"\$argon2(id|i)\$v=19\$m=[0-9]{1,8},t=[0-9]{1,4},p=[0-9]{1,3}\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{16,}"
)
_DES_RE = re.compile(rf"[{_B64CRYPT}]{{13}}")
# bigcrypt: DES-CRYPT of each 8-character block, 2 salt + 11 characters per block. Debian 12's
# libxcrypt writes it for `slappasswd -h {CRYPT}` with a password longer than 8 characters,
# and Dovecot's CRYPT (crypt(3)) verifies it. At most 16 blocks (128 characters).
_BIGCRYPT_RE = re.compile(rf"[{_B64CRYPT}]{{2}}(?:[{_B64CRYPT}]{{11}}){{2,16}}")
_HEX32_RE = re.compile(r"[0-9a-fA-F]{32}")
# As `doveadm pw -s PBKDF2` writes it: $1$salt$rounds$hex(PBKDF2-HMAC-SHA1, 20 bytes).
_PBKDF2_RE = re.compile(r"\$1\$[A-Za-z0-9./+=_-]{1,64}\$[1-9][0-9]{0,8}\$[0-9a-fA-F]{40}")
# As `doveadm pw -s SCRAM-SHA-256` writes it: iterations,salt,StoredKey,ServerKey (base64).
_SCRAM = {"SCRAM-SHA-1": 20, "SCRAM-SHA-256": 32}
SCRAM_ITERATIONS = (4096, 2**31 - 1)  # Dovecot refuses fewer than 4096
_PLAIN = {"PLAIN", "CLEARTEXT", "CLEAR", "PLAIN-TRUNC", "PLAINTEXT"}
_CRYPT_NAMES = ("MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT", "DES-CRYPT")


def password(value: str) -> str:
    """Normalise a stored hash to Dovecot's `{SCHEME}hash`; refuse plaintext and unknowns."""
    return check_password(value).text


def check_password(value: str) -> Hash:
    """The stored hash, checked structurally and named as the Dovecot scheme that verifies it."""
    if _PW_BAD_RE.search(value):
        raise Invalid("contains whitespace, a control character or ':'")
    if not value.isascii() or "\x7f" in value:
        raise Invalid("contains non-ASCII characters or DEL")
    scheme, body = _split_scheme(value)
    if scheme in _PLAIN:
        raise Invalid("plaintext passwords are refused")
    if scheme in ("CRYPT", None):
        return _crypt(body, explicit=scheme == "CRYPT")
    if scheme == "MD5" and body.startswith("$1$"):
        return _crypt(body, explicit=True, expect="MD5-CRYPT")  # Dovecot's own {MD5}
    if scheme in _DIGESTS:
        name, size, salted = _DIGESTS[scheme]
        _digest(body, name, size, salted)
        return Hash(f"{{{name}}}{body}", name, weak=not salted)
    if scheme == "PLAIN-MD5":
        if _HEX32_RE.fullmatch(body) is None:
            raise Invalid("malformed PLAIN-MD5 hash (not 32 hex digits)")
        return Hash(f"{{PLAIN-MD5}}{body}", "PLAIN-MD5", weak=True)
    if scheme == "PBKDF2":
        if _PBKDF2_RE.fullmatch(body) is None:
            raise Invalid("malformed PBKDF2 hash (not $1$salt$rounds$40-hex-digits)")
        return Hash(f"{{PBKDF2}}{body}", "PBKDF2")
    if scheme in _SCRAM:
        _scram(body, scheme, _SCRAM[scheme])
        return Hash(f"{{{scheme}}}{body}", scheme)
    if scheme in ("ARGON2ID", "ARGON2I"):
        if _ARGON2_RE.fullmatch(body) is None:
            raise Invalid(f"malformed {scheme} hash")
        return Hash(f"{{{scheme}}}{body}", scheme)
    if scheme in _CRYPT_NAMES:
        return _crypt(body, explicit=True, expect=scheme)
    if scheme == "REFUSED-SHA256":  # directory.refused_marker: what ldapsync keeps of a refused value
        raise Invalid("refused when read (plaintext or not a usable hash); only its SHA-256 is kept")
    raise Invalid("unknown or unsupported password scheme")


def _b64(text: str) -> bytes | None:
    """Strict base64: padded, canonical (no stray bits), or None."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None
    return raw if base64.b64encode(raw).decode() == text else None


def _digest(body: str, name: str, size: int, salted: bool) -> None:
    raw = _b64(body)
    if raw is None:
        raise Invalid(f"malformed {name} hash (not base64)")
    if not salted and len(raw) != size:
        raise Invalid(f"malformed {name} hash (wrong length for a {size}-byte digest)")
    if salted and not size + SALT_BYTES[0] <= len(raw) <= size + SALT_BYTES[1]:
        raise Invalid(f"malformed {name} hash (wrong length: {size}-byte digest and a 4 to 16-byte salt)")


def _scram(body: str, name: str, size: int) -> None:
    fields = body.split(",")
    if len(fields) != 4 or not fields[0].isdigit() or len(fields[0]) > 10:
        raise Invalid(f"malformed {name} hash (not iterations,salt,StoredKey,ServerKey)")
    if not SCRAM_ITERATIONS[0] <= int(fields[0]) <= SCRAM_ITERATIONS[1]:
        raise Invalid(f"malformed {name} hash (iterations out of {SCRAM_ITERATIONS[0]}..{SCRAM_ITERATIONS[1]})")
    salt = _b64(fields[1])
    if not salt:
        raise Invalid(f"malformed {name} hash (salt missing or not base64)")
    for key in fields[2:]:
        raw = _b64(key)
        if raw is None or len(raw) != size:
            raise Invalid(f"malformed {name} hash (keys must be base64 of {size} bytes)")


def _split_scheme(value: str) -> tuple[str | None, str]:
    if value.startswith("{"):
        end = value.find("}")
        if end <= 1:
            raise Invalid("malformed {SCHEME} prefix")
        return value[1:end].upper(), value[end + 1 :]
    return None, value


def _crypt(body: str, *, explicit: bool, expect: str | None = None) -> Hash:
    for prefix, handler, name in _CRYPT_HANDLERS:
        if body.startswith(prefix):
            if expect and expect != name:
                break
            _parse(handler, body)
            return Hash(f"{{{name}}}{body}", name)
    else:
        if body.startswith("$y$") and expect is None:
            if _YESCRYPT_RE.fullmatch(body) is None:
                raise Invalid("malformed yescrypt hash")
            return Hash(f"{{CRYPT}}{body}", "CRYPT")
        m = _ARGON2_RE.fullmatch(body)
        if m and expect is None:
            name = f"ARGON2{m.group(1).upper()}"
            return Hash(f"{{{name}}}{body}", name)
        # DES only with an explicit prefix: a bare 13-character word may be a plaintext password.
        if explicit and expect in (None, "DES-CRYPT") and _DES_RE.fullmatch(body):
            return Hash(f"{{DES-CRYPT}}{body}", "DES-CRYPT", weak=True)
        # bigcrypt is DES per block: as weak as DES-CRYPT (each block cracks alone).
        if explicit and expect is None and _BIGCRYPT_RE.fullmatch(body):
            return Hash(f"{{CRYPT}}{body}", "CRYPT", weak=True)
    if explicit:
        raise Invalid("unknown or malformed crypt hash")
    raise Invalid("not a recognised password hash (plaintext?)")


_H64 = "[./0-9A-Za-z]"
# The exact shape of each crypt(3) hash, checksum included: checked with one regex instead of
# passlib's per-hash object construction (5x faster; it matters at 100k entries).
_CRYPT_SHAPES = {
    "md5_crypt": re.compile(rf"\$1\${_H64}{{0,8}}\${_H64}{{22}}"),
    "sha256_crypt": re.compile(rf"\$5\$(?:rounds=[0-9]{{1,9}}\$)?{_H64}{{0,16}}\${_H64}{{43}}"),
    "sha512_crypt": re.compile(rf"\$6\$(?:rounds=[0-9]{{1,9}}\$)?{_H64}{{0,16}}\${_H64}{{86}}"),
    "bcrypt": re.compile(rf"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\${_H64}{{53}}"),
}


def _parse(handler: object, value: str) -> None:
    """The hash must be one libpass identifies AND be complete (salt and checksum)."""
    name: str = handler.name  # type: ignore[attr-defined]
    shape = _CRYPT_SHAPES.get(name)
    if shape is not None and shape.fullmatch(value) is not None:
        return  # each shape starts with an ident its handler identifies: no need to ask it
    if not handler.identify(value):  # type: ignore[attr-defined]
        raise Invalid(f"malformed {name} hash")
    if shape is not None:
        if shape.fullmatch(value) is None:
            raise Invalid(f"malformed {name} hash (no checksum, or not a complete hash)")
        return
    try:
        parsed = handler.from_string(value)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as e:
        raise Invalid(f"malformed {name} hash") from e
    if not getattr(parsed, "checksum", None):  # passlib accepts a bare salt ("$6$broken") as a config string
        raise Invalid(f"malformed {name} hash (no checksum)")


RETIRED_STATES = ("inactive", "memorial")
# Every first word userdir-ldap writes; anything else is kept active but reported.
STATUS_WORDS = ("active", "inactive", "memorial", "retiring", "locked")
RETIRING_GRACE = timedelta(days=6 * 31)


def is_retired(status: str, today: date) -> bool:
    """userdir-ldap semantics: inactive/memorial, or 'retiring DATE' more than ~6 months ago."""
    words = status.split()
    if not words:
        return False
    if words[0] in RETIRED_STATES:
        return True
    if words[0] == "retiring" and len(words) > 1:
        when = _retiring_date(words[1])
        return when is not None and today - when > RETIRING_GRACE
    return False


def status_problem(status: str) -> str | None:
    """Why a status value is not one userdir-ldap understands (it then counts as active), or None."""
    words = status.split()
    if not words:
        return "empty status"
    first = words[0]
    if first not in STATUS_WORDS:
        if first.lower() in STATUS_WORDS:
            return f"status words are case-sensitive: {first!r} is not {first.lower()!r}"
        return f"unrecognised status word {first[:40]!r}"
    if first == "retiring" and (len(words) < 2 or _retiring_date(words[1]) is None):
        return "'retiring' without a YYYY-MM-DD date"
    return None


def _retiring_date(text: str) -> date | None:
    try:
        return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        return None


_GENERALIZED_TIME_RE = re.compile(
    r"([0-9]{4}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])(?:[01][0-9]|2[0-3])[0-5][0-9](?:[0-5][0-9]|60))"
    r"(?:[.,]([0-9]{1,6}))?(Z|[+-](?:[01][0-9]|2[0-3])[0-5][0-9])"
)


def generalized_time(value: str) -> str | None:
    """An LDAP GeneralizedTime (createTimestamp) as a sortable UTC string, or None if malformed."""
    m = _GENERALIZED_TIME_RE.fullmatch(value)
    if m is None:
        return None
    stamp, fraction, zone = m.group(1), (m.group(2) or "").ljust(6, "0"), m.group(3)
    if zone != "Z":  # rare: servers write UTC; only offsets need the calendar
        try:
            when = datetime.strptime(stamp[:12] + min(stamp[12:], "59"), "%Y%m%d%H%M%S")
        except ValueError:
            return None
        sign = 1 if zone[0] == "+" else -1
        when -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5]))
        stamp = when.strftime("%Y%m%d%H%M%S")
    return f"{stamp}.{fraction}"


# Mailbox fields (Dovecot userdb). Dovecot expands %variables in passwd-file fields and splits
# extra fields at spaces: values from LDAP may hold neither, nor ':'.
_HOME_RE = re.compile(r"(?:/[A-Za-z0-9_+=@.-]+)+")
_QUOTA_RE = re.compile(r"[0-9]{1,15}(?:[BKMGT]|[KMGT]B)?", re.IGNORECASE)
MAX_ID = 4294967294  # (uid_t)-1 is "no user"


def numeric_id(value: str) -> str:
    """A uid or gid: decimal digits only (no sign, no spaces)."""
    if not value.isascii() or not value.isdigit() or len(value) > 10 or int(value) > MAX_ID:
        raise Invalid("is not a numeric id")
    return str(int(value))


def home(value: str) -> str:
    """An absolute, normalised directory path: no '..', '.', '//', trailing '/', or special characters."""
    if not value.isascii() or _HOME_RE.fullmatch(value) is None or len(value) > 4096:
        raise Invalid("is not an absolute path of letters, digits and ._+=@- (no spaces, ':', '%')")
    if any(part in (".", "..") for part in value.split("/")):
        raise Invalid("contains a '.' or '..' component")
    return value


def quota(value: str) -> str:
    """A Dovecot quota size like 1G, 500M or 1048576 (a bare number: the template's unit).

    No percentage: Dovecot 2.3 reads a percentage only relative to the default rule, and in
    the default rule itself (`*:storage=10%`, what a per-account quota is) it applies the bare
    number (10 kilobytes: every delivery fails over quota). Written unescaped, `%` is also a
    variable in a userdb extra field. A clear refusal beats a mailbox that takes no mail.
    """
    if value.isascii() and value.endswith("%") and _QUOTA_RE.fullmatch(value[:-1]):
        raise Invalid(
            "is a percentage: Dovecot applies it as a bare number (kilobytes) in a user's quota rule; "
            "give a size like 500M or 2G"
        )
    if not value.isascii() or _QUOTA_RE.fullmatch(value) is None:
        raise Invalid("is not a quota size like 500M, 2G or 1048576")
    return value
