"""Scenario 7: the directory suddenly returns an empty subtree (here: an ACL that hides
every user from the service account, the classic misconfiguration). ldapsync must hold
the change, the installed maps stay, and mail keeps flowing: nothing bounces."""

from __future__ import annotations

import pytest
from mailstack import OUTSIDE, MailStack, bounces, expect, send, token, wait_for
from slapd import Slapd

pytestmark = [pytest.mark.e2e, pytest.mark.slapd]

EXIT_HELD = 4
HIDE_USERS = """\
dn: olcDatabase={1}mdb,cn=config
changetype: modify
add: olcAccess
olcAccess: {0}to dn.children="ou=users,dc=example,dc=org" by * none
"""
SHOW_USERS = """\
dn: olcDatabase={1}mdb,cn=config
changetype: modify
delete: olcAccess
olcAccess: {0}
"""


def test_held_mass_deletion_keeps_mail_flowing(stack: MailStack, ldap_server: Slapd) -> None:
    before = stack.installed()
    assert any(p.name == "mail-passwords" for p in before)
    ldap_server.modify_config(HIDE_USERS)
    assert ldap_server.search("(uid=*)", ["uid"], bind="service", base=ldap_server.users_dn) == []

    # an ACL edit moves no CSN: syncrepl never reports it, so a resuming run sees no change and
    # `resync` is what an admin runs after changing what ldapsync's bind may read
    runs = stack.sync_all("resync", expect_rc=EXIT_HELD)
    assert all("held" in r.stderr for r in runs.values()), {n: r.stderr for n, r in runs.items()}
    assert stack.installed() == before  # byte-identical: maps, .db files, passwd-file

    tok = token()
    rcpts = ["postmaster@example.org", "alice@example.net", "carol@example.org"]
    assert send(stack.mx.smtp, OUTSIDE, rcpts, tok).refused == {}
    expect(stack.mailbox, tok, {"alice@example.org"}, stack)
    expect(stack.world, tok, {"bob@elsewhere.example", "carol@one.example", "carol@two.example"}, stack)
    assert stack.dovecot.auth("alice", "alice-secret")
    assert send(
        stack.submission.submission, "alice@example.org", [OUTSIDE], tok + "-sub", login=("alice", "alice-secret"),
        starttls=True,
    ).refused == {}  # fmt: skip
    wait_for(lambda: stack.world.recipients(tok + "-sub") == {OUTSIDE}, 20, "submitted mail at the world sink")
    for pf in stack.postfix.values():
        pf.flush_and_wait_empty()
        assert bounces(pf) == [], pf.name
    for sink in (stack.mailbox, stack.world):
        assert [m for m in sink.messages() if m.sender == ""] == [], f"a bounce reached {sink.name}"

    # The directory comes back: the next sync installs normally again.
    ldap_server.modify_config(SHOW_USERS)
    stack.sync_all()
    assert stack.installed() == before
