"""The control socket: the protocol as pure functions, the server and client over a real socket.

The agent's side is played by a thread that answers what the server submits, so each
situation (busy agent, concurrent requests, an agent that dies mid-request) is set up
exactly, without processes or sleeps standing in for a signal.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ldapsync import control
from ldapsync.control import ControlError, ControlServer, Pending, Reply, Request


# -- the protocol ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_",
    [Request("approve"), Request("rollback"), Request("rollback", "g1"), Request("resync"), Request("status")],
)
def test_requests_round_trip(request_: Request) -> None:
    line = request_.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert Request.parse(line) == request_


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"command": "approve"}', "protocol version"),
        (b'{"v": 1, "command": "rm -rf"}', "unknown command"),
        (b'{"v": 1, "command": "approve", "generation": "x"}', "only for rollback"),
        (b'{"v": 1, "command": "rollback", "generation": 5}', "is a string"),
    ],
)
def test_bad_requests_are_named(line: bytes, message: str) -> None:
    with pytest.raises(ControlError, match=message):
        Request.parse(line)


def test_replies_round_trip_and_stay_one_line() -> None:
    reply = Reply(True, "approved\nheld change", {"changed": ["a"]})
    line = reply.encode()
    assert line.count(b"\n") == 1
    assert Reply.parse(line) == reply
    with pytest.raises(ControlError, match="malformed"):
        Reply.parse(b'{"v": 1, "ok": "yes", "message": "m"}')


def test_only_root_and_the_agents_user_may_operate_it() -> None:
    assert control.allowed(0, 1000) and control.allowed(1000, 1000)
    assert not control.allowed(1001, 1000) and not control.allowed(65534, 0)


# -- server and client -----------------------------------------------------------------------------
class FakeAgent:
    """The agent's main thread: takes submitted requests from a queue; the test answers them."""

    def __init__(self, state_dir: Path):
        self.submitted: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self.server = ControlServer(
            control.socket_path(state_dir), self.submitted.put, lambda: {"pid": os.getpid()}, answer_within=30
        )

    def take(self, timeout: float = 10) -> Pending:
        return self.submitted.get(timeout=timeout)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path)
    fake.server.start()
    yield fake
    fake.server.close()


def asking(state_dir: Path, request: Request, timeout: float = 30) -> tuple[threading.Thread, list[object]]:
    """control.ask in a thread; the list receives its Reply or exception."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(control.ask(state_dir, request, timeout=timeout))
        except ControlError as e:
            out.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_the_socket_is_private(agent: FakeAgent, tmp_path: Path) -> None:
    st = (tmp_path / control.SOCKET).stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()


def test_no_agent_means_act_directly(tmp_path: Path) -> None:
    assert control.ask(tmp_path, Request("approve"), timeout=5) is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a dead agent's socket file
    stale.bind(str(tmp_path / control.SOCKET))
    stale.close()
    assert control.ask(tmp_path, Request("approve"), timeout=5) is None


def test_a_request_is_answered_with_the_outcome(agent: FakeAgent, tmp_path: Path) -> None:
    thread, out = asking(tmp_path, Request("rollback", "g1"))
    pending = agent.take()
    assert pending.request == Request("rollback", "g1")
    pending.answer(Reply(True, "rolled back to g1", {"generation": "g1"}))
    thread.join(10)
    assert out == [Reply(True, "rolled back to g1", {"generation": "g1"})]


def test_status_is_answered_without_waiting_for_the_agent(agent: FakeAgent, tmp_path: Path) -> None:
    busy, _ = asking(tmp_path, Request("approve"))
    agent.take()  # the agent is busy with it (a long sync) and does not answer yet
    reply = control.ask(tmp_path, Request("status"), timeout=5)
    assert reply is not None and reply.ok and reply.data == {"pid": os.getpid()}
    agent.server.close()
    busy.join(10)


def test_concurrent_requests_each_get_their_own_answer(agent: FakeAgent, tmp_path: Path) -> None:
    asked = [asking(tmp_path, Request("rollback", f"g{i}")) for i in range(8)]
    for _ in asked:
        pending = agent.take()
        pending.answer(Reply(True, f"rolled back to {pending.request.generation}"))
    for i, (thread, out) in enumerate(asked):
        thread.join(10)
        assert out == [Reply(True, f"rolled back to g{i}")]


def test_a_request_during_a_sync_waits_then_is_answered(agent: FakeAgent, tmp_path: Path) -> None:
    thread, out = asking(tmp_path, Request("approve"))
    pending = agent.take()
    thread.join(0.2)
    assert thread.is_alive() and out == [], "answered before the agent carried it out"
    pending.answer(Reply(True, "approved"))
    thread.join(10)
    assert out == [Reply(True, "approved")]


def test_an_agent_that_stops_mid_request_answers_that_it_did_not_do_it(agent: FakeAgent, tmp_path: Path) -> None:
    thread, out = asking(tmp_path, Request("approve"))
    agent.take()
    agent.server.close()
    thread.join(10)
    assert out == [Reply(False, "the agent is stopping; the request was not carried out")]
    assert control.ask(tmp_path, Request("approve"), timeout=5) is None, "the socket is gone: act directly"


def test_an_agent_that_dies_mid_request_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    """A killed agent's connections are closed by the kernel: the client says so at once."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control.socket_path(tmp_path)))
    listener.listen(1)
    thread, out = asking(tmp_path, Request("approve"), timeout=60)
    conn, _ = listener.accept()
    conn.recv(4096)
    conn.close()  # what the kernel does to a dead process's sockets
    listener.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(out) == 1 and isinstance(out[0], ControlError)
    assert "closed the connection without answering 'approve'" in str(out[0])


def test_an_agent_that_hangs_is_a_timeout_naming_it(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control.socket_path(tmp_path)))
    listener.listen(1)
    try:
        with pytest.raises(ControlError, match=r"did not answer 'resync' within 0\.3 s"):
            control.ask(tmp_path, Request("resync"), timeout=0.3)
    finally:
        listener.close()


def test_a_bad_request_gets_an_error_answer(agent: FakeAgent, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(control.socket_path(tmp_path)))
        s.sendall(b'{"v": 1, "command": "format-disk"}\n')
        reply = Reply.parse(s.makefile("rb").readline())
    assert not reply.ok and "unknown command 'format-disk'" in reply.message
    assert agent.submitted.empty()


def test_a_long_state_dir_path_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    fake = FakeAgent(deep)
    fake.server.start()
    try:
        reply = control.ask(deep, Request("status"), timeout=5)
        assert reply is not None and reply.ok
    finally:
        fake.server.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused_by_peer_credentials() -> None:
    """Even where file permissions would let another user connect, SO_PEERCRED refuses it."""
    tmp_path = Path(tempfile.mkdtemp(prefix="ldapsync-ctl-"))  # pytest's tmp_path is private to root
    tmp_path.chmod(0o755)
    fake = FakeAgent(tmp_path)
    fake.server.start()
    try:
        control.socket_path(tmp_path).chmod(0o666)
        script = (
            "import os, pathlib; from ldapsync import control; "  # imported before dropping privileges
            "os.setgid(65534); os.setuid(65534); "
            f"r = control.ask(pathlib.Path({str(tmp_path)!r}), control.Request('approve'), timeout=10); "
            "print(r.ok, r.message)"
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert proc.stdout.startswith("False permission denied"), proc.stdout + proc.stderr
        assert fake.submitted.empty()
    finally:
        fake.server.close()
        shutil.rmtree(tmp_path, ignore_errors=True)
