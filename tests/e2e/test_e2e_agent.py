"""Scenarios 5 and 6: the running agent (`ldapsync -c CONFIG`, one per host role) keeps real
Postfix and Dovecot in step with LDAP, with no postmap or reload by hand, and keeps mail
and logins working while LDAP is down.

Scenario 5 touches bob (forward) and alice (password), scenario 6 carol and frank, so the
two tests do not depend on each other's changes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from mailstack import (
    LDAPSYNC,
    OUTSIDE,
    UNIT_UMASK,
    MailStack,
    expect,
    hash_password,
    make_workdir,
    postmap_query,
    send,
    tail,
    token,
    wait_for,
)
from slapd import Slapd

pytestmark = [pytest.mark.e2e, pytest.mark.slapd]

CHANGE_WAIT = 15.0  # LDAP change -> installed -> seen by Postfix/Dovecot
RECONNECT_WAIT = 30.0


class Agents:
    """One `ldapsync -c CONFIG` agent per role, as systemd would run them."""

    def __init__(self, stack: MailStack):
        self.stack = stack
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for name, role in self.stack.roles.items():
            with open(role.dir / "agent.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    [str(LDAPSYNC), "-c", str(role.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    umask=UNIT_UMASK,
                )

    def alive(self) -> dict[str, int | None]:
        return {name: p.poll() for name, p in self.procs.items()}

    def logs(self) -> str:
        return "\n".join(f"== agent {n} ==\n{tail(r.dir / 'agent.log')}" for n, r in self.stack.roles.items())

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def live(ldap_server: Slapd) -> Iterator[tuple[MailStack, Agents]]:
    """The stack with maps from `--once`, then an agent per role following slapd."""
    workdir = make_workdir("ldapsync-e2e-agent-")
    # reconnect_max: how long the agent may back off while LDAP is down (bounded test waits)
    stack = MailStack(workdir, ldap_server.uri, ldap_server.service_password_file, agent={"reconnect_max": 1.0})
    agents = Agents(stack)
    try:
        stack.sync_all()
        stack.start()
        agents.start()
    except BaseException:
        agents.stop()
        stack.stop()
        raise
    yield stack, agents
    agents.stop()
    stack.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def waiting(what: str, agents: Agents, check: object, timeout: float) -> None:
    assert callable(check)
    try:
        wait_for(check, timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}\nagents (None = running): {agents.alive()}\n{agents.logs()}") from None


def test_ldap_change_reaches_smtp_and_auth_without_manual_steps(
    live: tuple[MailStack, Agents], ldap_server: Slapd
) -> None:
    stack, agents = live
    mx_virtual = stack.roles["mx"].maps / "virtual"
    waiting("the agents' first sync", agents, lambda: stack.installed(), CHANGE_WAIT)
    assert postmap_query(mx_virtual, "bob@example.org", stack.mx.config_dir) == "bob@elsewhere.example"
    # Dovecot has just read the passwd-file: a rewrite within this second must still be noticed.
    assert stack.dovecot.auth("alice", "alice-secret")

    ldap_server.modify(
        "dn: uid=bob,ou=users,dc=example,dc=org\nchangetype: modify\n"
        "replace: emailForward\nemailForward: bob@new.example\n\n"
        "dn: uid=alice,ou=users,dc=example,dc=org\nchangetype: modify\n"
        f"replace: mailPassword\nmailPassword: {hash_password('alice-new-secret')}\n"
    )
    started = time.monotonic()
    waiting(
        "Dovecot to accept alice's new password",
        agents,
        lambda: stack.dovecot.auth("alice", "alice-new-secret"),
        CHANGE_WAIT,
    )
    assert not stack.dovecot.auth("alice", "alice-secret")
    waiting(
        "the MX map to follow bob's new forward",
        agents,
        lambda: postmap_query(mx_virtual, "bob@example.org", stack.mx.config_dir) == "bob@new.example",
        CHANGE_WAIT,
    )
    print(f"LDAP change -> Dovecot and Postfix map followed in {time.monotonic() - started:.2f}s")

    # The next SMTP transaction follows the change, through unreloaded Postfix instances.
    tok = token()
    assert send(stack.mx.smtp, OUTSIDE, ["bob@example.org"], tok).refused == {}
    expect(stack.world, tok, {"bob@new.example"}, stack)
    sub = token()
    login = ("alice", "alice-new-secret")
    assert (
        send(stack.submission.submission, "alice@example.org", [OUTSIDE], sub, login=login, starttls=True).refused == {}
    )
    expect(stack.world, sub, {OUTSIDE}, stack)
    assert all(rc is None for rc in agents.alive().values()), agents.logs()


def test_ldap_outage_keeps_mail_and_auth_working_and_catches_up(
    live: tuple[MailStack, Agents], ldap_server: Slapd
) -> None:
    stack, agents = live
    mx_virtual = stack.roles["mx"].maps / "virtual"
    waiting("the agents' first sync", agents, lambda: stack.installed(), CHANGE_WAIT)
    assert stack.dovecot.auth("frank", "frank-secret")
    # A live change first, so the agents' cookie comes from the persist phase (as it will
    # on any agent that has been running for a while).
    ldap_server.modify(
        "dn: uid=carol,ou=users,dc=example,dc=org\nchangetype: modify\n"
        "replace: emailForward\nemailForward: carol@live.example\n"
    )
    waiting(
        "the MX map to follow carol's live change",
        agents,
        lambda: postmap_query(mx_virtual, "carol@example.org", stack.mx.config_dir) == "carol@live.example",
        CHANGE_WAIT,
    )
    before = stack.installed()

    ldap_server.stop()
    time.sleep(3)  # the agents lose their connection and start retrying
    tok = token()
    assert send(stack.mx.smtp, OUTSIDE, ["carol@example.org", "frank@example.net"], tok).refused == {}
    expect(stack.world, tok, {"carol@live.example"}, stack)
    expect(stack.mailbox, tok, {"frank@example.org"}, stack)
    assert stack.dovecot.auth("frank", "frank-secret")
    assert stack.installed() == before  # last-known-good: nothing emptied, nothing rewritten
    assert all(rc is None for rc in agents.alive().values()), agents.logs()

    # Meanwhile the directory changes while the agents are cut off: slapd listens on ldapi
    # only (the agents use TCP), like a provider that goes on changing while the network to
    # the mail hosts is down. (Not slapmodify: offline `slapmodify -w` can leave contextCSN
    # behind the last entry's entryCSN, and slapd then omits that entry from a refresh.)
    ldap_server.start(tcp=False)
    ldap_server.modify(
        "dn: uid=carol,ou=users,dc=example,dc=org\nchangetype: modify\n"
        "replace: emailForward\nemailForward: carol@offline.example\n\n"
        "dn: uid=frank,ou=users,dc=example,dc=org\nchangetype: modify\n"
        f"replace: mailPassword\nmailPassword: {hash_password('frank-new-secret')}\n",
    )
    assert stack.installed() == before  # still cut off: nothing changed on the mail hosts
    ldap_server.stop()
    ldap_server.start()
    waiting(
        "the MX map to catch up with carol's forward",
        agents,
        lambda: postmap_query(mx_virtual, "carol@example.org", stack.mx.config_dir) == "carol@offline.example",
        RECONNECT_WAIT,
    )
    waiting(
        "Dovecot to accept frank's new password",
        agents,
        lambda: stack.dovecot.auth("frank", "frank-new-secret"),
        RECONNECT_WAIT,
    )
    assert not stack.dovecot.auth("frank", "frank-secret")
    tok = token()
    assert send(stack.mx.smtp, OUTSIDE, ["carol@example.org"], tok).refused == {}
    expect(stack.world, tok, {"carol@offline.example"}, stack)
