"""What the tests run, and the Debian package each comes from: checked against .ci/packages.

The test command (.ci/test, the README's second command) installs the packages listed in
.ci/packages; a program the tests run that no package on that list provides would make tests
skip (or error) on a fresh machine, where the developer's own machine passed. So every test
session starts by checking, with dpkg, that each program below is installed and comes from
a package on the list; it stops with the package's name otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES_FILE = REPO / ".ci" / "packages"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])

# program (found on PATH and in the sbin directories) or absolute path -> Debian package
PROGRAMS: dict[str, str] = {
    "slapd": "slapd",
    "slapadd": "slapd",
    "slappasswd": "slapd",
    "ldapadd": "ldap-utils",
    "ldapmodify": "ldap-utils",
    "ldapsearch": "ldap-utils",
    "postmap": "postfix",
    "postfix": "postfix",
    "postmulti": "postfix",
    "postconf": "postfix",
    "postqueue": "postfix",
    "smtp-sink": "postfix",
    "/usr/lib/postfix/postfix-lmdb.so": "postfix-lmdb",
    "/usr/lib/postfix/postfix-cdb.so": "postfix-cdb",
    "dovecot": "dovecot-core",
    "doveadm": "dovecot-core",
    "doveconf": "dovecot-core",
    "/usr/lib/dovecot/lmtp": "dovecot-lmtpd",
    "/usr/lib/dovecot/imap": "dovecot-imapd",
    "make-ssl-cert": "ssl-cert",
    "openssl": "openssl",
    "dscreate": "python3-lib389",
    "dsctl": "python3-lib389",
    "ns-slapd": "389-ds-base",
    "systemd-analyze": "systemd",
    "chattr": "e2fsprogs",
    "mount": "mount",
    "umount": "mount",
    "runuser": "util-linux",
    "dpkg-deb": "dpkg",
    "man": "man-db",
    "groff": "groff-base",
}


def listed(path: Path = PACKAGES_FILE) -> list[str]:
    """The package names of .ci/packages (one per line; '#' starts a comment)."""
    names = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


def locate(program: str) -> str | None:
    if program.startswith("/"):
        return program if os.path.exists(program) else None
    return shutil.which(program, path=SBIN_PATH)


def _owners(paths: list[str]) -> dict[str, str]:
    """path -> package, as dpkg knows it. A merged /usr has /usr/bin/x where dpkg recorded
    /bin/x: both are asked."""
    asked: dict[str, str] = {}
    for p in paths:
        asked[p] = p
        m = re.fullmatch(r"/usr(/s?bin/[^/]+)", p)
        if m:
            asked[m.group(1)] = p
    proc = subprocess.run(["dpkg", "-S", *asked], capture_output=True, text=True, check=False)
    owners: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        pkgs, sep, path = line.partition(": ")
        if sep and path in asked:
            owners.setdefault(asked[path], pkgs.split(",")[0].split(":")[0].strip())
    return owners


def _installed(packages: list[str]) -> set[str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        name for name, _, status in (line.partition(" ") for line in proc.stdout.splitlines()) if status == "installed"
    }


def problems(programs: dict[str, str] = PROGRAMS, packages_file: Path = PACKAGES_FILE) -> list[str]:
    """Why the test tools are not all there as .ci/packages promises ([] when they are)."""
    if shutil.which("dpkg") is None:
        return ["dpkg not found: the tests need Debian 12 (or a derivative), see .ci/packages"]
    wanted = listed(packages_file)
    listing = packages_file.relative_to(REPO) if packages_file.is_relative_to(REPO) else packages_file
    out = [
        f"{program} comes from Debian package {pkg}, which {listing} does not list: add it"
        for program, pkg in programs.items()
        if pkg not in wanted
    ]
    installed = _installed(wanted)
    out += [
        f"Debian package {pkg} (in {listing}) is not installed: apt-get install {pkg} "
        "(or run .ci/test, which installs the whole list)"
        for pkg in wanted
        if pkg not in installed
    ]
    found = {program: locate(program) for program in programs}
    out += [
        f"{program} not found: apt-get install {pkg}"
        for program, pkg in programs.items()
        if found[program] is None and pkg in installed
    ]
    owners = _owners([p for p in found.values() if p is not None])
    for program, path in found.items():
        if path is None:
            continue
        owner = owners.get(path)
        if owner is None:
            out.append(
                f"{path} ({program}) belongs to no Debian package: install it with apt-get install {programs[program]}"
            )
        elif owner not in wanted:
            out.append(f"{path} ({program}) comes from Debian package {owner}, which {listing} does not list: add it")
        elif owner != programs[program]:
            out.append(f"{path} ({program}) comes from Debian package {owner}, not {programs[program]}: fix {__file__}")
    return out
