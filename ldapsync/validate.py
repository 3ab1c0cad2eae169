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


def address(value: str) -> str:
    """A complete, safe mail address with a lower-cased domain."""
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
    return f"{local}@{m.group(2)}"


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
    return lowered


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


# Accepted password schemes: (passlib handler, Dovecot scheme name).
_CRYPT_HANDLERS: tuple[tuple[str, object, str], ...] = (
    ("$1$", ph.md5_crypt, "MD5-CRYPT"),
    ("$5$", ph.sha256_crypt, "SHA256-CRYPT"),
    ("$6$", ph.sha512_crypt, "SHA512-CRYPT"),
    ("$2b$", ph.bcrypt, "BLF-CRYPT"),
    ("$2y$", ph.bcrypt, "BLF-CRYPT"),
    ("$2a$", ph.bcrypt, "BLF-CRYPT"),
)
_LDAP_SCHEMES: dict[str, tuple[object, str]] = {
    "SSHA": (ph.ldap_salted_sha1, "SSHA"),
    "SSHA256": (ph.ldap_salted_sha256, "SSHA256"),
    "SSHA512": (ph.ldap_salted_sha512, "SSHA512"),
}
_B64CRYPT = "./0-9A-Za-z"
# yescrypt: libpass has no handler; check the crypt(3) shape strictly instead.
_YESCRYPT_RE = re.compile(rf"\$y\$[{_B64CRYPT}]+\$[{_B64CRYPT}]{{1,86}}\$[{_B64CRYPT}]{{43}}")
_ARGON2_RE = re.compile(
    r"\$argon2(id|i)\$v=19\$m=[0-9]{1,8},t=[0-9]{1,4},p=[0-9]{1,3}\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{16,}"
)
_PLAIN = {"PLAIN", "CLEARTEXT", "CLEAR", "PLAIN-TRUNC", "PLAINTEXT"}


def password(value: str) -> str:
    """Normalise a stored hash to Dovecot's `{SCHEME}hash`; refuse plaintext and unknowns."""
    if _PW_BAD_RE.search(value):
        raise Invalid("contains whitespace, a control character or ':'")
    if not value.isascii() or "\x7f" in value:
        raise Invalid("contains non-ASCII characters or DEL")
    scheme, body = _split_scheme(value)
    if scheme in _PLAIN:
        raise Invalid("plaintext passwords are refused")
    if scheme in ("CRYPT", None):
        return _crypt(body, explicit=scheme == "CRYPT")
    if scheme in _LDAP_SCHEMES:
        handler, name = _LDAP_SCHEMES[scheme]
        _parse(handler, "{" + scheme + "}" + body)
        return f"{{{name}}}{body}"
    if scheme in ("ARGON2ID", "ARGON2I"):
        if _ARGON2_RE.fullmatch(body) is None:
            raise Invalid(f"malformed {scheme} hash")
        return f"{{{scheme}}}{body}"
    if scheme in ("MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT"):
        return _crypt(body, explicit=True, expect=scheme)
    raise Invalid("unknown or unsupported password scheme")


def _split_scheme(value: str) -> tuple[str | None, str]:
    if value.startswith("{"):
        end = value.find("}")
        if end <= 1:
            raise Invalid("malformed {SCHEME} prefix")
        return value[1:end].upper(), value[end + 1 :]
    return None, value


def _crypt(body: str, *, explicit: bool, expect: str | None = None) -> str:
    for prefix, handler, name in _CRYPT_HANDLERS:
        if body.startswith(prefix):
            if expect and expect != name:
                break
            _parse(handler, body)
            return f"{{{name}}}{body}"
    else:
        if body.startswith("$y$") and expect is None:
            if _YESCRYPT_RE.fullmatch(body) is None:
                raise Invalid("malformed yescrypt hash")
            return f"{{CRYPT}}{body}"
        m = _ARGON2_RE.fullmatch(body)
        if m and expect is None:
            return f"{{ARGON2{m.group(1).upper()}}}{body}"
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
# {SSHA*}: base64 of digest + salt (passlib's salt bounds: 4 to 16 bytes).
_SALTED_DIGEST = {"ldap_salted_sha1": 20, "ldap_salted_sha256": 32, "ldap_salted_sha512": 64}


def _parse(handler: object, value: str) -> None:
    """The hash must be one libpass identifies AND be complete (salt and checksum)."""
    name: str = handler.name  # type: ignore[attr-defined]
    if not handler.identify(value):  # type: ignore[attr-defined]
        raise Invalid(f"malformed {name} hash")
    shape = _CRYPT_SHAPES.get(name)
    if shape is not None:
        if shape.fullmatch(value) is None:
            raise Invalid(f"malformed {name} hash (no checksum, or not a complete hash)")
        return
    digest = _SALTED_DIGEST.get(name)
    if digest is not None:
        try:
            raw = base64.b64decode(value[value.index("}") + 1 :], validate=True)
        except (ValueError, binascii.Error) as e:
            raise Invalid(f"malformed {name} hash") from e
        if not digest + 4 <= len(raw) <= digest + 16:
            raise Invalid(f"malformed {name} hash (wrong length)")
        return
    try:
        parsed = handler.from_string(value)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as e:
        raise Invalid(f"malformed {name} hash") from e
    if not getattr(parsed, "checksum", None):  # passlib accepts a bare salt ("$6$broken") as a config string
        raise Invalid(f"malformed {name} hash (no checksum)")


RETIRED_STATES = ("inactive", "memorial")
RETIRING_GRACE = timedelta(days=6 * 31)


def is_retired(status: str, today: date) -> bool:
    """userdir-ldap semantics: inactive/memorial, or 'retiring DATE' more than ~6 months ago."""
    words = status.split()
    if not words:
        return False
    if words[0] in RETIRED_STATES:
        return True
    if words[0] == "retiring" and len(words) > 1:
        try:
            when = datetime.strptime(words[1], "%Y-%m-%d").date()
        except ValueError:
            return False
        return today - when > RETIRING_GRACE
    return False


# Mailbox fields (Dovecot userdb). Dovecot expands %variables in passwd-file fields and splits
# extra fields at spaces: values from LDAP may hold neither, nor ':'.
_HOME_RE = re.compile(r"(?:/[A-Za-z0-9_+=@.-]+)+")
_QUOTA_RE = re.compile(r"[0-9]{1,15}(?:[BKMGT]|[KMGT]B)?|[0-9]{1,3}%", re.IGNORECASE)
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
    """A Dovecot quota size like 1G, 500M, 1048576 or 10%."""
    if not value.isascii() or _QUOTA_RE.fullmatch(value) is None:
        raise Invalid("is not a quota size like 500M, 2G or 10%")
    return value
