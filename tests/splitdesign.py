"""The split routing design, as docs/snippets had it (commit 6892c84), kept as test data.

Why: the documented roles no longer split the expansion between hosts (the MX resolves
aliases, groups and forwards in one expansion), because the split design delivers twice where
two routes of one address meet past the MX (`s: [u, x@ext]` with `u -> x@ext`: the MX sends
x@ext out itself and u to the SRS host, which sends x@ext again). The tests that prove the
mail-flow property and the whole-system harness catch that duplicate build the old hosts from
these texts (and the loop of an SRS host relaying back to the MX from the SRS one).
"""

from __future__ import annotations

# The MX: aliases and groups in the virtual map, every forwarded address to the SRS host.
MX_YAML = """\
# /etc/ldapsync/ldapsync.yaml on an MX.
domain: example.org
domain_aliases: [host1.example.org, example.net]
source:
  ldap:
    uri: [ldaps://ldap-01.example.org, ldaps://ldap-02.example.org]
    ca_file: /etc/ssl/certs/ca-certificates.crt
    bind_dn: cn=ldapsync,ou=services,dc=example,dc=org
    bind_password_file: /etc/ldapsync/bind.secret
    base_dn: dc=example,dc=org     # accounts (ou=users) and groups (ou=groups)
schema: ud-ldap
static: /etc/ldapsync/mail.yaml
state_dir: /var/lib/ldapsync
groups:                            # groups are addresses too: every role that accepts or
  base_dn: ou=groups,dc=example,dc=org   # routes mail for them must know them
exporters:
  - kind: postfix-virtual          # aliases + alias-domain rewrites; forwards are the SRS host's job
    path: /etc/postfix/ldapsync/virtual
    include: [aliases]
  - kind: postfix-transport        # every forwarded address leaves through the SRS host
    path: /etc/postfix/ldapsync/transport
    nexthop: "smtp:[srs.example.org]"
  - kind: postfix-recipients       # relay_recipient_maps: unknown addresses get 550 at RCPT
    path: /etc/postfix/ldapsync/recipients
  - kind: postfix-access           # disabled accounts: REJECT <mailDisableMessage>
    path: /etc/postfix/ldapsync/disabled
"""

MX_MAIN_CF = """\
# ldapsync -- MX role: append to /etc/postfix/main.cf.
# Accepts mail for the domain and its alias domains, rejects unknown and disabled
# recipients at RCPT time, and delivers nothing itself: forwarded addresses leave
# through the SRS host (transport map), everything else goes to the mailbox host.
# ldapsync replaces the maps atomically; Postfix notices without a reload.
relay_domains = example.org, host1.example.org, example.net
relay_recipient_maps = hash:/etc/postfix/ldapsync/recipients
virtual_alias_maps = hash:/etc/postfix/ldapsync/virtual
transport_maps = hash:/etc/postfix/ldapsync/transport
relay_transport = relay:[mailbox.example.org]
# Subdomains of our domains (lists.example.net) are not ours: mail for them is relayed.
parent_domain_matches_subdomains = debug_peer_list, smtpd_access_maps
smtpd_recipient_restrictions =
    check_recipient_access hash:/etc/postfix/ldapsync/disabled,
    permit_mynetworks,
    reject_unauth_destination
"""

# The SRS host: aliases and forwards in its virtual map; what stays in our domains to the mailbox host.
SRS_YAML = """\
# /etc/ldapsync/ldapsync.yaml on the SRS host.
domain: example.org
domain_aliases: [host1.example.org, example.net]
source:
  ldap:
    uri: [ldaps://ldap-01.example.org, ldaps://ldap-02.example.org]
    ca_file: /etc/ssl/certs/ca-certificates.crt
    bind_dn: cn=ldapsync,ou=services,dc=example,dc=org
    bind_password_file: /etc/ldapsync/bind.secret
    base_dn: dc=example,dc=org     # accounts (ou=users) and groups (ou=groups)
schema: ud-ldap
static: /etc/ldapsync/mail.yaml
state_dir: /var/lib/ldapsync
groups:                            # groups are addresses too: every role that accepts or
  base_dn: ou=groups,dc=example,dc=org   # routes mail for them must know them
exporters:
  - kind: postfix-virtual          # user@example.org -> external address
    path: /etc/postfix/ldapsync/virtual
    include: [aliases, forwards]
  - kind: postfix-recipients
    path: /etc/postfix/ldapsync/recipients
"""

SRS_MAIN_CF = """\
# ldapsync -- SRS role: append to /etc/postfix/main.cf.
# The MXes send every forwarded address here; the virtual alias map (aliases and
# forwards) rewrites it to the external address, which leaves by default_transport.
# Sender rewriting itself (SRS, e.g. postsrsd through sender_canonical_maps) is not
# ldapsync's business and is left out here.
relay_domains = example.org, host1.example.org, example.net
relay_recipient_maps = hash:/etc/postfix/ldapsync/recipients
virtual_alias_maps = hash:/etc/postfix/ldapsync/virtual
# What is left in our domains after the virtual alias map is a mailbox (a kept copy, or a
# forward into the domain): it goes straight to the mailbox host, never back to the MX,
# so no message can circle between the MX and this host.
relay_transport = relay:[mailbox.example.org]
# Postfix's default makes every subdomain of a relay domain one of ours
# (lists.example.net under example.net): forwards there would be refused here.
parent_domain_matches_subdomains = debug_peer_list, smtpd_access_maps
smtpd_recipient_restrictions =
    permit_mynetworks,
    reject_unauth_destination
"""

SNIPPETS = {
    "ldapsync-mx.yaml": MX_YAML,
    "postfix-mx-main.cf": MX_MAIN_CF,
    "ldapsync-srs.yaml": SRS_YAML,
    "postfix-srs-main.cf": SRS_MAIN_CF,
}
