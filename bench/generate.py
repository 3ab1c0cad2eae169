"""Realistic, deterministic benchmark directories: LDIF for slapadd, static YAML, expected map.

Shape (per 100 users, by index i): half have an emailForward — single external, a comma list
("a@x, b@y" in ONE value), two values, or a local user —, 1 role account without a password
forwarding to a user and a team address, 0.5 retired (inactive/memorial), 0.5 disabled
(mailDisableMessage), 1 "retiring 2099-01-01" (announced, still active). Password hashes mix
schemes (SHA512-crypt, bcrypt, yescrypt, SSHA, SSHA512, ARGON2ID, MD5-crypt) from a fixed pool:
hashing 100k bcrypt passwords would take longer than the benchmark. Static aliases (1 per 100
users) live in a YAML file for ldapsync and in a map-lines file for the baseline pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DOMAIN = "example.org"
USERS_DN = "ou=users,dc=example,dc=org"

# Real hashes (from fixtures/ldif/demo.ldif, verified there with `doveadm pw -t`), reused:
# the read path cost depends on their length, not on their uniqueness.
HASHES: tuple[str, ...] = (
    "$6$Mwbjj2JAVj1UcS5G$nyzXjxh.GlSMV59F5eiRXhZdNputRFpfSv8PpCyTF5Bl5jVMAOeRlJzp8PZW7XF4SsWhilFZqYVvsmQ6BSpFu1",
    "$6$TWKJVx9bKUmSW7m0$UYwHyJ.bFDkxyNzrdXAYd9zalqlwhGGdyXIexvlRegXu7LdPVAx36BbUoRunRc5wL/b.VhP9epD.VBtz3Tpvz0",
    "$6$qSWBlY5fPsJBtlAN$Tte4QExgBTXXoViR8zHnCDshawodogtYAZ5QUF/3guHF2UbAI0PPgUiTu0885./do/xs4OJ2Jjf96ZyxFlEqY0",
    "$2b$10$1SkB9jHvJDSZXEQAIjwH5ONHG5W2rLYCE40q8SeNviLt4XCBMcsfG",
    "$6$4S25PUTl0yoCfP79$8S7zvttXNJMZXLxxU/XTmn5XSBAc6jn8nmFvT/Zrq1ob2JN6VKs6LrKbyrM8DYKkbN2b4plYsESbydsBL2gpg/",
    "$y$j9T$Y3huYXEiash5V9tt$ixkQuog82axg4k2qnFCFQcvPRMSnVjbgI/40pJtGq18",
    "{SSHA}ow0LAeWbDHFRqvvqMuYH/9Oia266syS2t5zYUQ==",
    "$2b$10$1SkB9jHvJDSZXEQAIjwH5ONHG5W2rLYCE40q8SeNviLt4XCBMcsfG",
    "{SSHA512}nhq5J9y0EeACnKDvYP1Km20MoVnJek4+1UhT4NEbr+JQ4Fq3EyPguA1GqV4muhb8ryob8y5ejhEhi1+dEhV0P+bOBbw72kvb",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$PTMV//McjUDCUSo3E1snEg$vjwNdr7471O3RVbgaznQV/4yUjX5LeR71sQ8/5Je0b8",
    "$1$NeuqKH2q$RDpcAKsEaEwyzUgBQYR.g0",
    "{CRYPT}$6$DIVZDtf6vB4BxNXa$l4G5idW3XaOwK0KmZnVMVysQu3vM1ojMuFFSFiMbbuiqCv3qmokN8.agZJH8bRgzgIND88YbrrbarsKXH4RSI/",
)

FIRST = ("Ada", "Bo", "Chen", "Dana", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Nia")
LAST = ("Lovelace", "Ng", "Okafor", "Petrov", "Quinn", "Rossi", "Sato", "Tanaka", "Urban", "Vega", "Weiss")


def uid(i: int) -> str:
    return f"user{i:06d}"


@dataclass(frozen=True, slots=True)
class Directory:
    ldif: Path  # users only (load after fixtures/ldif/base.ldif)
    static_yaml: Path  # aliases for ldapsync's `static:` file
    static_lines: Path  # the same aliases as virtual-map lines, for the baseline pipeline
    expected_virtual: Path  # the postfix-virtual map ldapsync must produce (sorted lines)
    users: int
    forwards: int
    retired: int
    disabled: int
    roles: int


def user_entry(i: int, n: int) -> tuple[str, list[str], str]:
    """(LDIF record, forward targets if it has a virtual-map line, status) of user i of n."""
    name = uid(i)
    first, last = FIRST[i % len(FIRST)], LAST[i % len(LAST)]
    lines = [
        f"dn: uid={name},{USERS_DN}",
        "objectClass: inetOrgPerson",
        "objectClass: ldapsyncMailAccount",
        f"uid: {name}",
        f"cn: {first} {last} {i}",
        f"sn: {last}",
        f"givenName: {first}",
        f"telephoneNumber: +1 555 {i:07d}",
        f"description: benchmark user {i} of {n}",
    ]
    fwd: list[str] = []
    status = ""
    r = i % 100
    if r == 8 and i >= 8:  # role account: no password, forwards to a user and a team list
        lines[1] = "objectClass: account"
        lines[4:9] = [f"description: role account {i}"]
        fwd = [f"{uid(i - 8)}@{DOMAIN}", f"team{i}@lists.example.net"]
        lines += [f"emailForward: {a}" for a in fwd]
        status = "role"
    else:
        if i % 10 == 1:  # one value holding a comma list (userdir-ldap style)
            fwd = [f"{name}@one.example", f"{name}.backup@two.example"]
            lines.append(f"emailForward: {fwd[0]}, {fwd[1]}")
        elif i % 10 == 3:  # two values
            fwd = [f"{name}@mobile.example", f"{name}@home.example"]
            lines += [f"emailForward: {a}" for a in fwd]
        elif i % 10 == 5 and i >= 5:  # forward to another local user
            fwd = [f"{uid(i - 5)}@{DOMAIN}"]
            lines.append(f"emailForward: {fwd[0]}")
        elif i % 2:  # one external forward
            fwd = [f"{name}@elsewhere.example"]
            lines.append(f"emailForward: {fwd[0]}")
        lines.append(f"mailPassword: {HASHES[(i * 7) % len(HASHES)]}")
        if i % 200 == 2:
            lines.append("accountStatus: " + ("inactive" if i % 400 == 2 else "memorial"))
            status, fwd = "retired", []
        elif i % 200 == 4:
            lines.append(f"mailDisableMessage: {name} has left; contact hr@{DOMAIN}")
            status, fwd = "disabled", []
        elif i % 100 == 6:
            lines.append("accountStatus: retiring 2099-01-01")
    return "\n".join(lines) + "\n", fwd, status


def write(n: int, directory: Path) -> Directory:
    """Write the directory's files, streaming: memory stays flat whatever n is.

    The expected map is written in key order without collecting it: alias* keys sort before
    user* keys, and user keys (zero-padded uids) sort in index order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("users.ldif", "static.yaml", "static.lines", "expected-virtual")}
    counts = {"forwards": 0, "retired": 0, "disabled": 0, "role": 0}
    with (
        paths["static.yaml"].open("w") as yaml,
        paths["static.lines"].open("w") as lines,
        paths["expected-virtual"].open("w") as expected,
    ):
        yaml.write("aliases:\n")
        for k in range(0, n, 100):  # targets: users with i % 100 == 10 (active, no forward)
            target = k + 10 if k + 10 < n else 0
            yaml.write(f"  alias{k // 100:05d}: [{uid(target)}]\n")
            lines.write(f"alias{k // 100:05d}@{DOMAIN}\t{uid(target)}@{DOMAIN}\n")
            expected.write(f"alias{k // 100:05d}@{DOMAIN}\t{uid(target)}@{DOMAIN}\n")
        with paths["users.ldif"].open("w") as ldif:
            for i in range(n):
                record, fwd, status = user_entry(i, n)
                ldif.write(record if i == 0 else "\n" + record)
                if status:
                    counts[status] += 1
                if fwd:  # ldapsync sorts the targets (LDAP values are unordered)
                    expected.write(f"{uid(i)}@{DOMAIN}\t{','.join(sorted(fwd))}\n")
                    counts["forwards"] += 1
    return Directory(
        ldif=paths["users.ldif"],
        static_yaml=paths["static.yaml"],
        static_lines=paths["static.lines"],
        expected_virtual=paths["expected-virtual"],
        users=n,
        forwards=counts["forwards"],
        retired=counts["retired"],
        disabled=counts["disabled"],
        roles=counts["role"],
    )
