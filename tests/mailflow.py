"""A pure model of mail flow through the Postfix hosts docs/deployment.md configures.

Why: whether a directory's mail reaches the right mailbox, once, depends on ldapsync's maps
*and* on how each role's Postfix uses them; a test of the maps alone cannot see a loop
between two hosts or a copy accepted by the MX and refused by the next hop. This module
configures each host from the documentation's own files (docs/snippets/postfix-<role>-main.cf
for Postfix, docs/snippets/ldapsync-<role>.yaml for which maps the host has; a role without
one, the SRS host, has none), fills the maps
with what the real ldapsync pipeline renders for a directory, and follows one message per
recipient address from host to host, applying Postfix's documented semantics:

- RCPT time (smtpd(8), postconf(5)): smtpd_relay_restrictions (Debian's default:
  permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination), then
  smtpd_recipient_restrictions (check_recipient_access, permit_mynetworks,
  reject_unauth_destination, permit_sasl_authenticated, reject), then
  smtpd_reject_unlisted_recipient: an address found in virtual_alias_maps is known; otherwise
  by address class (ADDRESS_CLASS_README) relay_recipient_maps, virtual_mailbox_maps, or
  "User unknown in virtual alias table" for a virtual alias domain.
- cleanup(8)'s virtual alias expansion, as src/cleanup/cleanup_map1n.c does it: recursive,
  an address that expands into itself stops there, virtual_alias_recursion_limit and
  virtual_alias_expansion_limit defer the message ("4.6.0 Alias expansion error"); then
  duplicates of one recipient's expansion are removed (enable_original_recipient = yes
  removes duplicate (original recipient, address) pairs; at the next hop each copy arrives as
  its own RCPT, so two recipients expanding to one address there are two copies).
- trivial-rewrite(8): address class (mydestination, virtual_alias_domains,
  virtual_mailbox_domains, relay_domains with parent_domain_matches_subdomains honoured for
  relay_domains and smtpd_access_maps) -> local/virtual/relay/default transport; for the
  relay and default classes (off-host mail) the nexthop is relayhost when set, else the
  recipient domain, and a nexthop in the transport's own value (`smtp:[host]`) wins over both
  (src/trivial-rewrite/resolve.c); then transport_maps (full address, then domain) override.
  A nexthop `[host]` is that site host; a bare domain is looked up in "DNS": our domains' MX
  is the site's MX, anything else is the Internet.
- each SMTP hop is a new delivery with its own RCPT checks; a refusal there is a bounce
  after acceptance. A message passing more than hopcount_limit (50) hosts is "too many hops":
  the model reports it as a loop. Delivery by LMTP looks the address up in Dovecot's
  passwd-file userdb (the `dovecot-userdb` output): a missing one is a bounce.

Site hosts are in each other's mynetworks (docs/deployment.md: the MX relays to the SRS and
mailbox hosts); the first hop comes from the Internet, or from an authenticated submission
client with ``Site.send(address, via="submission")``.

API (also used by the end-to-end tests to compare real Postfix with the prediction)::

    from mailflow import Site, render_role, DOCS
    outputs = {role: render_role(role, ldif=path, static=mail_yaml) for role in ("mx", "srs", "mailbox")}
    site = Site.from_docs(roles=("mx", "srs", "mailbox", "submission"), outputs_by_role=outputs)
    outcome = site.send("alice@example.org")
    outcome.rejected        # the RCPT reply text at the first host, or None
    outcome.deliveries      # Counter of Delivery(kind="mailbox", where=login) / Delivery("external", address)
    outcome.bounces         # Bounce(host, address, reason): accepted, then returned to the sender
    outcome.looped          # addresses whose copy went round until the hop limit
    outcome.sent_out        # (host, address): which host handed each external copy to the Internet

``outputs_by_role`` maps a role to {exporter path as in the role's YAML: bytes}:
``render_role`` renders them with the real pipeline, ``installed_outputs(role, where)`` reads
the files a test host installed (``where`` maps a documented path to the real one), so the
prediction is made from the very maps the real Postfix uses. A site of another shape is
``Site([HostSpec(...), ...])``: ``role_spec(role, outputs, name=..., hostnames=...)`` builds a
host from a snippet role under another name (the one host, or the MX and SRS host on one box,
is the site's "mx"); ``one_host_spec`` builds the one-host recipe when docs/snippets has none.
The first host named "mx" receives the Internet's mail; our domains' MX records point at it.
Nothing here writes a file or opens a socket.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SNIPPETS = DOCS / "snippets"
HOSTNAMES = {
    "mx": "mx.example.org",
    "srs": "srs.example.org",
    "mailbox": "mailbox.example.org",
    "submission": "submission.example.org",
}
INTERNET = "the Internet"
# What Debian's main.cf and Postfix's defaults give before a snippet is appended (postconf -d;
# Debian 12 sets smtpd_relay_restrictions and compatibility_level in its main.cf).
POSTFIX_DEFAULTS = {
    "mydestination": "$myhostname, localhost",
    "relay_domains": "",
    "virtual_alias_domains": "$virtual_alias_maps",
    "virtual_mailbox_domains": "$virtual_mailbox_maps",
    "virtual_alias_maps": "",
    "virtual_mailbox_maps": "",
    "relay_recipient_maps": "",
    "transport_maps": "",
    "local_transport": "local:$myhostname",
    "virtual_transport": "virtual",
    "relay_transport": "relay",
    "default_transport": "smtp",
    "relayhost": "",
    "parent_domain_matches_subdomains": (
        "debug_peer_list, fast_flush_domains, mynetworks, permit_mx_backup_networks, "
        "qmqpd_authorized_clients, relay_domains, smtpd_access_maps"
    ),
    "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination",
    "smtpd_recipient_restrictions": "",
    "smtpd_reject_unlisted_recipient": "yes",
    "virtual_alias_recursion_limit": "1000",
    "virtual_alias_expansion_limit": "1000",
    "hopcount_limit": "50",
}


class ModelError(Exception):
    """The documented configuration uses something this model does not know: extend the model."""


# -- main.cf --------------------------------------------------------------------------------


def parse_main_cf(text: str) -> dict[str, str]:
    """postconf(5) syntax: `name = value`; a line starting with whitespace continues the
    previous one; `#` lines are comments; a later setting wins."""
    params: dict[str, str] = {}
    name: str | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace():
            if name is None:
                raise ModelError(f"line {lineno}: continuation without a parameter")
            params[name] = (params[name] + " " + raw.strip()).strip()
            continue
        key, eq, value = raw.partition("=")
        if not eq:
            raise ModelError(f"line {lineno}: not `name = value`: {raw!r}")
        name = key.strip()
        params[name] = value.strip()
    return params


def parse_master_cf_overrides(text: str, service: str) -> dict[str, str]:
    """The `-o name=value` options of one master.cf service (its smtpd's own parameters)."""
    out: dict[str, str] = {}
    current = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            current = raw.split()[0]
            continue
        if current == service:
            m = re.fullmatch(r"\s+-o\s+([a-z_0-9]+)=(.*)", raw)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def expand(value: str, params: Mapping[str, str], depth: int = 0) -> str:
    """$name and ${name} references, recursively (postconf(5))."""
    if depth > 20:
        raise ModelError(f"parameter expansion too deep: {value!r}")

    def sub(m: re.Match[str]) -> str:
        return expand(params.get(m.group(1) or m.group(2), ""), params, depth + 1)

    return re.sub(r"\$\{?([a-z_0-9]+)\}?|\$\{([a-z_0-9]+)\}", sub, value)


def split_list(value: str) -> list[str]:
    return [v for v in re.split(r"[\s,]+", value) if v]


# -- lookup tables --------------------------------------------------------------------------


def parse_table(data: bytes) -> dict[str, str]:
    """A postmap source file: `key<whitespace>value` per line (what postmap would compile)."""
    out: dict[str, str] = {}
    for line in data.decode("utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.strip().partition("\t") if "\t" in line else line.strip().partition(" ")
        out.setdefault(key.lower(), value.strip())  # postmap keeps the first (and warns)
    return out


def parse_userdb(data: bytes) -> dict[str, str]:
    """Dovecot passwd-file userdb: key -> the login whose mailbox it is (userdb_user, or the key)."""
    out: dict[str, str] = {}
    for line in data.decode("utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        key = line.split(":", 1)[0]
        m = re.search(r"(?:^|\s|:)userdb_user=(\S+)", line)
        out[key.lower()] = m.group(1) if m else key
    return out


@dataclass(frozen=True, slots=True)
class Delivery:
    """A final destination: a mailbox (by Dovecot login) or an address outside the site."""

    kind: str  # "mailbox" or "external"
    where: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.where}"


@dataclass(frozen=True, slots=True)
class Bounce:
    host: str
    address: str
    reason: str


@dataclass(frozen=True, slots=True)
class Outcome:
    address: str
    rejected: str | None = None  # the RCPT (or end-of-DATA) reply at the first host
    deliveries: Counter[Delivery] = field(default_factory=Counter)
    bounces: tuple[Bounce, ...] = ()
    looped: tuple[str, ...] = ()
    sent_out: tuple[tuple[str, str], ...] = ()  # (host, address) for each copy handed to the Internet
    trail: tuple[str, ...] = ()  # one line per step, for failure messages

    @property
    def accepted(self) -> bool:
        return self.rejected is None

    def describe(self) -> str:
        head = f"{self.address}: " + (f"rejected: {self.rejected}" if self.rejected else "accepted")
        parts = [head]
        parts += [f"  delivered {d} x{n}" for d, n in sorted(self.deliveries.items(), key=str)]
        parts += [f"  bounced at {b.host}: {b.address}: {b.reason}" for b in self.bounces]
        parts += [f"  looped: {a}" for a in self.looped]
        parts += [f"    {t}" for t in self.trail[:60]]
        return "\n".join(parts)


# -- hosts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostSpec:
    """One Postfix host: its names, its main.cf (snippets appended to Debian's defaults) and
    its ldapsync outputs keyed by the path its ldapsync YAML writes them to."""

    name: str
    hostnames: tuple[str, ...]
    main_cf: str
    outputs: Mapping[str, bytes]
    kinds: Mapping[str, str] = field(default_factory=dict)  # output path -> exporter kind
    # the smtpd clients reach first, when it is not the main.cf one (master.cf `-o` options)
    service: Mapping[str, str] = field(default_factory=dict)


class Host:
    """One Postfix host's decisions: RCPT checks (smtpd), virtual alias expansion (cleanup),
    address class and transport (trivial-rewrite), each from its parameters and tables."""

    def __init__(self, spec: HostSpec):
        self.name = spec.name
        self.hostnames = spec.hostnames
        params = dict(POSTFIX_DEFAULTS)
        params["myhostname"] = spec.hostnames[0]
        params.update(parse_main_cf(spec.main_cf))
        self.params = params
        self.tables: dict[str, dict[str, str]] = {}
        for path, data in spec.outputs.items():
            kind = spec.kinds.get(path, "")
            self.tables[path] = parse_userdb(data) if kind == "dovecot-userdb" else parse_table(data)
        self.service = dict(spec.service)
        self.userdb = next((self.tables[p] for p, k in spec.kinds.items() if k == "dovecot-userdb"), None)
        self.parent_match = set(self.values("parent_domain_matches_subdomains"))

    # parameters
    def get(self, name: str) -> str:
        return expand(self.params.get(name, ""), self.params)

    def with_service(self) -> Host:
        """This host as its master.cf service sees it (the `-o` options win over main.cf)."""
        if not self.service:
            return self
        other = copy.copy(self)
        other.params = {**self.params, **self.service}
        return other

    def values(self, name: str) -> list[str]:
        return split_list(self.get(name))

    def maps(self, name: str) -> list[dict[str, str]]:
        out = []
        for ref in self.values(name):
            _, _, path = ref.partition(":")
            if path not in self.tables:
                raise ModelError(f"{self.name}: {name} names {ref}, which no ldapsync output of this host writes")
            out.append(self.tables[path])
        return out

    def lookup(self, name: str, address: str) -> str | None:
        """mail_addr_find(3) on every table of `name`: the address, then `@domain`."""
        domain = address.rpartition("@")[2]
        for table in self.maps(name):
            for key in (address, "@" + domain):
                if key in table:
                    return table[key]
        return None

    def domain_in(self, name: str, domain: str) -> bool:
        """match_list(3) domain list: names, or map references whose keys are domains; parent
        domains match when `name` is in parent_domain_matches_subdomains (or for `.domain`)."""
        parents = name in self.parent_match
        for item in self.values(name):
            if ":" in item and not item.startswith("["):
                _, _, path = item.partition(":")
                table = self.tables.get(path, {})
                if domain in table or any(domain.endswith("." + k) for k in table if parents):
                    return True
                continue
            item = item.lower()
            if domain == item or (item.startswith(".") and domain.endswith(item)):
                return True
            if parents and domain.endswith("." + item):
                return True
        return False

    # address class and transport (trivial-rewrite)
    def address_class(self, domain: str) -> str:
        if self.domain_in("mydestination", domain):
            return "local"
        if self.domain_in("virtual_alias_domains", domain):
            return "alias"
        if self.domain_in("virtual_mailbox_domains", domain):
            return "virtual"
        if self.domain_in("relay_domains", domain):
            return "relay"
        return "default"

    def is_ours(self, domain: str) -> bool:
        return self.address_class(domain) != "default"

    def resolve(self, address: str) -> tuple[str, str]:
        """(transport, nexthop) for an address after virtual alias expansion."""
        domain = address.rpartition("@")[2]
        cls = self.address_class(domain)
        if cls == "alias":
            return "error", "5.1.1 User unknown in virtual alias table"
        default = {
            "local": "local_transport",
            "virtual": "virtual_transport",
            "relay": "relay_transport",
            "default": "default_transport",
        }[cls]
        transport, _, nexthop = self.get(default).partition(":")
        if not nexthop and cls in ("relay", "default"):
            nexthop = self.get("relayhost")
        for table in self.maps("transport_maps"):
            hit = table.get(address) or table.get(domain)
            if hit:
                t, _, n = hit.partition(":")
                transport, nexthop = t or transport, n or nexthop
                break
        return transport, nexthop or domain

    # smtpd
    def rcpt(self, address: str, *, trusted: bool, sasl: bool = False) -> str | None:
        """The RCPT TO reply if the address is refused, else None."""
        domain = address.rpartition("@")[2]
        denied = f"554 5.7.1 <{address}>: Relay access denied"
        for r in self.values("smtpd_relay_restrictions"):
            if (r == "permit_mynetworks" and trusted) or (r == "permit_sasl_authenticated" and sasl):
                break
            if r in ("defer_unauth_destination", "reject_unauth_destination"):
                if not self.is_ours(domain):
                    return denied.replace("554", "454", 1) if r.startswith("defer") else denied
                continue
            if r in ("permit_mynetworks", "permit_sasl_authenticated"):
                continue
            if r == "reject":  # smtpd_check.c: the generic reject, not "Relay access denied"
                return f"554 5.7.1 <{address}>: Recipient address rejected: Access denied"
            raise ModelError(f"{self.name}: smtpd_relay_restrictions: {r} is not modelled")
        items = self.values("smtpd_recipient_restrictions")
        i = 0
        while i < len(items):
            r = items[i]
            i += 1
            if r == "check_recipient_access":
                table_ref = items[i]
                i += 1
                action = self._access(table_ref, address)
                if action is None or action.upper().startswith("DUNNO"):
                    continue
                word, _, text = action.partition(" ")
                if word.upper() == "OK":
                    break
                if word.upper() == "REJECT":
                    return f"554 5.7.1 <{address}>: Recipient address rejected: {text or 'Access denied'}"
                if word.upper() == "DEFER":
                    return f"450 4.7.1 <{address}>: Recipient address rejected: {text or 'Access denied'}"
                if re.fullmatch(r"[45]\d\d", word):
                    return f"{word} <{address}>: Recipient address rejected: {text}"
                raise ModelError(f"{self.name}: access action {action!r} is not modelled")
            if r == "permit_mynetworks":
                if trusted:
                    break
                continue
            if r == "permit_sasl_authenticated":
                if sasl:
                    break
                continue
            if r == "reject_unauth_destination":
                if not self.is_ours(domain):
                    return denied
                continue
            if r == "reject":
                return f"554 5.7.1 <{address}>: Recipient address rejected: Access denied"
            raise ModelError(f"{self.name}: smtpd_recipient_restrictions: {r} is not modelled")
        if self.get("smtpd_reject_unlisted_recipient") == "yes":
            return self._unlisted(address)
        return None

    def _access(self, ref: str, address: str) -> str | None:
        """check_recipient_access lookup order: address, domain and (parent matching) its
        parents, then `user@`."""
        _, _, path = ref.partition(":")
        if path not in self.tables:
            raise ModelError(f"{self.name}: check_recipient_access {ref}: no ldapsync output writes it")
        table = self.tables[path]
        local, _, domain = address.rpartition("@")
        keys = [address, domain]
        parts = domain.split(".")
        for n in range(1, len(parts)):
            parent = ".".join(parts[n:])
            if "smtpd_access_maps" in self.parent_match:
                keys.append(parent)
            keys.append("." + parent)
        keys.append(local + "@")
        return next((table[k] for k in keys if k in table), None)

    def _unlisted(self, address: str) -> str | None:
        if self.values("virtual_alias_maps") and self.lookup("virtual_alias_maps", address) is not None:
            return None
        transport, nexthop = self.resolve(address)
        unknown = f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in "
        if transport == "error":
            return f"550 5.1.1 <{address}>: Recipient address rejected: {nexthop.split(' ', 1)[1]}"
        cls = self.address_class(address.rpartition("@")[2])
        if cls == "local":
            raise ModelError(f"{self.name}: {address} is in mydestination: local delivery is not modelled")
        known = {"virtual": "virtual_mailbox_maps", "relay": "relay_recipient_maps"}.get(cls)
        if known and self.values(known) and self.lookup(known, address) is None:
            return unknown + ("virtual mailbox table" if cls == "virtual" else "relay recipient table")
        return None

    # cleanup
    def expand_virtual(self, address: str) -> list[str] | str:
        """cleanup_map1n_internal() then cleanup_out_recipient()'s duplicate filter; a str is
        the reason the message was not accepted."""
        if not self.values("virtual_alias_maps"):
            return [address]
        recursion = int(self.get("virtual_alias_recursion_limit"))
        expansion = int(self.get("virtual_alias_expansion_limit"))
        argv = [address]
        been_here: set[str] = set()
        arg = 0
        while arg < len(argv):
            if len(argv) > expansion:
                return "4.6.0 Alias expansion error (virtual_alias_expansion_limit)"
            count = 0
            while True:
                if argv[arg].lower() in been_here:
                    break
                if count >= recursion:
                    return "4.6.0 Alias expansion error (virtual_alias_recursion_limit)"
                result = self.lookup("virtual_alias_maps", argv[arg].lower())
                if result is None:
                    break
                lhs = argv[arg].lower()
                for i, target in enumerate(split_list(result)):
                    if i == 0:
                        argv[arg] = target
                    else:
                        argv.append(target)
                    if target.lower() == lhs:
                        been_here.add(lhs)
                count += 1
            arg += 1
        return list(dict.fromkeys(a.lower() for a in argv))


def role_spec(
    role: str,
    outputs: Mapping[str, bytes],
    *,
    name: str | None = None,
    hostnames: tuple[str, ...] | None = None,
    snippets: Path = SNIPPETS,
    main_cf: str | None = None,
) -> HostSpec:
    """A host configured as docs/snippets configure `role` (postfix-<role>-main.cf, the
    exporters of ldapsync-<role>.yaml, the `-o` options of postfix-<role>-master.cf).
    `name` and `hostnames` let one host carry another role's name (the one host is the MX)."""
    text = main_cf if main_cf is not None else (snippets / f"postfix-{role}-main.cf").read_text()
    kinds = {e["path"]: e["kind"] for e in role_exporters(role, snippets)}
    missing = sorted(set(kinds) - set(outputs))
    if missing:
        raise ModelError(f"{role}: no rendered output for {', '.join(missing)}")
    master = snippets / f"postfix-{role}-master.cf"
    service = parse_master_cf_overrides(master.read_text(), role) if master.exists() else {}
    return HostSpec(name or role, hostnames or (HOSTNAMES[role],), text, dict(outputs), kinds, service)


class Site:
    """Hosts by name; `send()` follows one message per recipient address."""

    def __init__(self, specs: Sequence[HostSpec], *, mx: str = "mx"):
        self.hosts = {s.name: Host(s) for s in specs}
        self.by_hostname = {n: h for h in self.hosts.values() for n in h.hostnames}
        if mx not in self.hosts:
            raise ModelError(f"no host named {mx!r}: the Internet needs an MX")
        self.mx = self.hosts[mx]
        # "DNS": the MX of every domain the MX host accepts mail for, listed by name.
        self.dns_mx = {
            d.lower(): self.mx
            for p in ("relay_domains", "virtual_mailbox_domains", "virtual_alias_domains")
            for d in self.mx.values(p)
            if ":" not in d
        }

    @classmethod
    def from_docs(
        cls,
        *,
        roles: Iterable[str],
        outputs_by_role: Mapping[str, Mapping[str, bytes]],
        snippets: Path = SNIPPETS,
        main_cf: Mapping[str, str] | None = None,
    ) -> Site:
        """One host per role, configured from docs/snippets (`main_cf` replaces a role's
        postfix-<role>-main.cf text, e.g. an older version of it)."""
        specs = [
            role_spec(role, outputs_by_role.get(role, {}), snippets=snippets, main_cf=(main_cf or {}).get(role))
            for role in roles
        ]
        return cls(specs)

    def _next_host(self, transport: str, nexthop: str, address: str) -> Host | str:
        """The site host a transport delivers to, INTERNET, or "lmtp" for local delivery."""
        if transport in ("lmtp", "virtual"):
            return transport
        if transport not in ("smtp", "relay"):
            raise ModelError(f"transport {transport}:{nexthop} is not modelled")
        if nexthop.startswith("["):
            name = nexthop[1:].split("]", 1)[0]
            host = self.by_hostname.get(name)
            if host is None:
                raise ModelError(f"nexthop {nexthop}: no site host has that name")
            return host
        return self.dns_mx.get(nexthop.lower(), INTERNET)

    def send(self, address: str, *, via: str = "mx", max_steps: int = 20000) -> Outcome:
        """One message to `address`, from the Internet to the MX (or from an authenticated
        user through `via`, e.g. "submission")."""
        address = address.lower()
        first = self.hosts[via]
        sasl = via != self.mx.name
        trail: list[str] = []
        reply = first.with_service().rcpt(address, trusted=False, sasl=sasl)
        if reply is not None:
            return Outcome(address, rejected=reply, trail=(f"{first.name}: RCPT {address}: {reply}",))
        deliveries: Counter[Delivery] = Counter()
        bounces: list[Bounce] = []
        looped: list[str] = []
        sent_out: list[tuple[str, str]] = []
        limit = int(first.get("hopcount_limit"))
        queue: list[tuple[Host, str, int]] = [(first, address, 1)]
        steps = 0
        while queue:
            host, rcpt, hops = queue.pop(0)
            steps += 1
            if steps > max_steps:
                looped.append(rcpt)
                break
            expanded = host.expand_virtual(rcpt)
            if isinstance(expanded, str):
                if host is first and hops == 1:
                    return Outcome(address, rejected=f"451 {expanded}", trail=tuple(trail))
                bounces.append(Bounce(host.name, rcpt, expanded))
                continue
            if expanded != [rcpt]:
                trail.append(f"{host.name}: {rcpt} -> {', '.join(expanded)}")
            for target in expanded:
                transport, nexthop = host.resolve(target)
                if transport == "error":
                    bounces.append(Bounce(host.name, target, nexthop))
                    continue
                dest = self._next_host(transport, nexthop, target)
                if dest in ("lmtp", "virtual"):
                    login = (host.userdb or {}).get(target)
                    if transport == "virtual":
                        login = target if host.lookup("virtual_mailbox_maps", target) is not None else None
                    if login is None:
                        bounces.append(Bounce(host.name, target, "550 5.1.1 User doesn't exist (LMTP)"))
                    else:
                        trail.append(f"{host.name}: {target} -> mailbox {login}")
                        deliveries[Delivery("mailbox", login)] += 1
                    continue
                if dest == INTERNET:
                    trail.append(f"{host.name}: {target} -> {transport}:{nexthop} (Internet)")
                    deliveries[Delivery("external", target)] += 1
                    sent_out.append((host.name, target))
                    continue
                assert isinstance(dest, Host)
                if dest is host:
                    bounces.append(Bounce(host.name, target, f"mail for {nexthop} loops back to myself"))
                    continue
                if hops + 1 > limit:
                    looped.append(target)
                    bounces.append(Bounce(dest.name, target, "5.4.6 too many hops"))
                    continue
                reply = dest.rcpt(target, trusted=True)
                said = f": {reply}" if reply else ""
                trail.append(f"{host.name}: {target} -> {transport}:{nexthop} ({dest.name}){said}")
                if reply is not None:
                    bounces.append(Bounce(host.name, target, f"{dest.name} said: {reply}"))
                    continue
                queue.append((dest, target, hops + 1))
        return Outcome(address, None, deliveries, tuple(bounces), tuple(looped), tuple(sent_out), tuple(trail))


# -- rendering with the real pipeline -------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _yaml_text(path: Path, mtime_ns: int) -> str:
    return json.dumps(yaml.safe_load(path.read_text()))


def load_yaml(path: Path) -> dict[str, Any]:
    """A snippet's YAML, parsed once per version of the file (a fresh copy each time)."""
    doc: dict[str, Any] = json.loads(_yaml_text(path, path.stat().st_mtime_ns))
    return doc


def role_exporters(role: str, snippets: Path = SNIPPETS) -> list[dict[str, Any]]:
    """The exporters of docs/snippets/ldapsync-<role>.yaml; none for a role without ldapsync
    (the SRS host: a relay that needs no map)."""
    path = snippets / f"ldapsync-{role}.yaml"
    return list(load_yaml(path)["exporters"]) if path.exists() else []


def role_config(role: str, *, ldif: Path, static: Path | None, snippets: Path = SNIPPETS) -> dict[str, Any]:
    """docs/snippets/ldapsync-<role>.yaml with the LDIF as its source (same base DN)."""
    doc = load_yaml(snippets / f"ldapsync-{role}.yaml")
    base = doc["source"]["ldap"]["base_dn"]
    doc["source"] = {"ldif": {"path": str(ldif), "base_dn": base}}
    doc["static"] = str(static) if static is not None else None
    doc["state_dir"] = "/nonexistent/ldapsync-state"  # never touched: nothing is installed
    return doc


def render_config(doc: Mapping[str, Any], path: Path = SNIPPETS / "ldapsync.yaml") -> dict[str, bytes]:
    """Every output of one ldapsync config, as the real pipeline renders it: path -> bytes."""
    from ldapsync import config, sync

    cfg = config.parse(dict(doc), path)
    pipeline = sync.Pipeline(cfg)
    outputs, _ = pipeline.render(pipeline.read_source(), log_problems=False)
    by_name = {spec.name: str(Path(e["path"])) for spec, e in zip(cfg.exporters, doc["exporters"], strict=True)}
    return {by_name[o.name]: o.data for o in outputs}


def render_role(role: str, *, ldif: Path, static: Path | None, snippets: Path = SNIPPETS) -> dict[str, bytes]:
    if not role_exporters(role, snippets):
        return {}
    doc = role_config(role, ldif=ldif, static=static, snippets=snippets)
    return render_config(doc, snippets / f"ldapsync-{role}.yaml")


def installed_outputs(role: str, where: Callable[[str], Path], snippets: Path = SNIPPETS) -> dict[str, bytes]:
    """A role's outputs as installed somewhere else (a test host's work directory): `where`
    maps each exporter path of docs/snippets/ldapsync-<role>.yaml to the file to read."""
    return {e["path"]: where(e["path"]).read_bytes() for e in role_exporters(role, snippets)}


# -- the one-host recipe ----------------------------------------------------------------------

ONE_HOST_MAIN_CF = """\
# The one-host recipe (MX + mailbox + submission on one box, no SRS host), as the routing
# design states it: the mailbox role's main.cf, the MX's disabled-address check, the virtual
# alias map with aliases AND forwards, no transport map: the box forwards itself.
virtual_mailbox_domains = example.org
virtual_alias_domains = host1.example.org, example.net
virtual_alias_maps = hash:/etc/postfix/ldapsync/virtual
virtual_mailbox_maps = hash:/etc/postfix/ldapsync/virtual_mailbox
virtual_transport = lmtp:unix:private/dovecot-lmtp
smtpd_recipient_restrictions =
    check_recipient_access hash:/etc/postfix/ldapsync/disabled,
    permit_mynetworks,
    reject_unauth_destination
"""


def one_host_config(*, ldif: Path, static: Path | None, snippets: Path = SNIPPETS) -> dict[str, Any]:
    """The mailbox role's ldapsync YAML with `include: [aliases, forwards]` and the access map
    (built here from the documented recipe: docs/snippets has no one-host files yet)."""
    doc = role_config("mailbox", ldif=ldif, static=static, snippets=snippets)
    for e in doc["exporters"]:
        if e["kind"] == "postfix-virtual":
            e["include"] = ["aliases", "forwards"]
    doc["exporters"].append({"kind": "postfix-access", "path": "/etc/postfix/ldapsync/disabled"})
    return doc


def one_host_spec(*, ldif: Path, static: Path | None, snippets: Path = SNIPPETS) -> HostSpec:
    doc = one_host_config(ldif=ldif, static=static, snippets=snippets)
    outputs = render_config(doc, snippets / "ldapsync-mailbox.yaml")
    kinds = {e["path"]: e["kind"] for e in doc["exporters"]}
    return HostSpec("mx", ("mail.example.org",), ONE_HOST_MAIN_CF, outputs, kinds)
