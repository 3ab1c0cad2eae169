"""Operating the running agent: a Unix socket in the state directory, one JSON line each way.

The agent is the state directory's only writer and holds its lock for its lifetime, so
`approve`, `rollback` and `resync` cannot act beside it: they ask it instead. The agent
carries a request out between two syncs (never beside one) and answers with the outcome.
Without an agent listening, the commands act directly, under the state lock, as before.

Protocol (one request per connection; each message is one UTF-8 JSON object and a newline):

    -> {"v": 1, "command": "approve"}
    -> {"v": 1, "command": "rollback", "generation": "20261207T101500Z-1a2b3c4d"}   # or null
    -> {"v": 1, "command": "resync"}
    -> {"v": 1, "command": "status"}
    <- {"v": 1, "ok": true, "message": "approved held change (...); changed: postfix-virtual",
        "data": {...}}

`ok` false: the request was understood but failed (or was refused), `message` says why.
Only root and the agent's own user may connect (SO_PEERCRED); the socket is 0600 in the
0700 state directory. The encoding and parsing below are pure; the server and the client
are the I/O around them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

from ldapsync.errors import LdapsyncError
from ldapsync.fileio import write_atomic

log = structlog.get_logger(__name__)

VERSION = 1
SOCKET = "control.sock"
COMMANDS = ("approve", "rollback", "resync", "status")
MAX_LINE = 1 << 16  # a request is a few dozen bytes; an answer carries a status summary
READ_TIMEOUT = 5.0  # a client that connects and sends nothing is dropped after this
ANSWER_WITHIN = 600.0  # the agent answers after the sync in progress and the request itself
CLIENT_TIMEOUT = 660.0  # a little longer than the agent's own limit
RUNTIME_DIR = Path("/run/ldapsync")  # the unit's RuntimeDirectory=; LDAPSYNC_RUNTIME_DIR overrides it


class ControlError(LdapsyncError):
    """A control request could not be made or answered (bad message, no answer, refused peer)."""


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


# -- the protocol (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Request:
    command: str
    generation: str | None = None  # rollback only: None is "the one before the current"

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"v": VERSION, "command": self.command}
        if self.command == "rollback":
            doc["generation"] = self.generation
        return json.dumps(doc).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> Request:
        doc = _object(line, "request")
        command = doc.get("command")
        if command not in COMMANDS:
            raise ControlError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
        generation = doc.get("generation")
        if generation is not None and (command != "rollback" or not isinstance(generation, str)):
            raise ControlError("'generation' is a string, and only for rollback")
        return cls(str(command), generation)


@dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    message: str
    data: Mapping[str, Any] = field(default_factory=_empty)

    def encode(self) -> bytes:
        doc = {"v": VERSION, "ok": self.ok, "message": self.message, "data": dict(self.data)}
        out = json.dumps(doc, default=str).encode() + b"\n"
        if len(out) > MAX_LINE:
            out = Reply(self.ok, self.message).encode()
        return out

    @classmethod
    def parse(cls, line: bytes) -> Reply:
        doc = _object(line, "answer")
        ok, message, data = doc.get("ok"), doc.get("message"), doc.get("data", {})
        if not isinstance(ok, bool) or not isinstance(message, str) or not isinstance(data, dict):
            raise ControlError("malformed answer from the agent (needs ok, message, data)")
        return cls(ok, message, MappingProxyType(data))


def _object(line: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ControlError(f"{what} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ControlError(f"{what} is not a JSON object")
    if doc.get("v") != VERSION:
        raise ControlError(f"{what} has protocol version {doc.get('v')!r}; this ldapsync speaks {VERSION}")
    return doc


def allowed(peer_uid: int, own_uid: int) -> bool:
    """Root, and the agent's own user, may operate the agent; nobody else."""
    return peer_uid in (0, own_uid)


# -- where the socket is ---------------------------------------------------------------------------
def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET


def runtime_dir() -> Path:
    return Path(os.environ.get("LDAPSYNC_RUNTIME_DIR") or RUNTIME_DIR)


def pointer_path(config_path: Path) -> Path:
    """Where the agent started with `config_path` says where its state lives (found without the config)."""
    key = hashlib.sha256(str(config_path.absolute()).encode()).hexdigest()[:16]
    return runtime_dir() / f"agent-{key}.json"


def write_pointer(config_path: Path, state_dir: Path) -> Path | None:
    """Record the running agent's state_dir for `status` while the config file does not load."""
    path = pointer_path(config_path)
    doc = {"pid": os.getpid(), "config": str(config_path.absolute()), "state_dir": str(state_dir.absolute())}
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(path, json.dumps(doc).encode(), mode=0o644)
    except OSError as e:
        log.warning("cannot record where the agent's state lives", file=str(path), error=str(e))
        return None
    return path


def read_pointer(config_path: Path) -> Path | None:
    """The state_dir an agent started with this config recorded, or None."""
    try:
        doc = json.loads(pointer_path(config_path).read_bytes())
    except (OSError, ValueError):
        return None
    state_dir = doc.get("state_dir") if isinstance(doc, dict) else None
    return Path(state_dir) if isinstance(state_dir, str) else None


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """An address for `path` that fits sun_path (108 bytes): via /proc/self/fd when it is long."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _read_line(sock: socket.socket, deadline: float, what: str) -> bytes | None:
    """One line, or None if the peer closed first; ControlError past the deadline or MAX_LINE."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(what)
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ControlError(f"{what} longer than {MAX_LINE} bytes")
    return buf.split(b"\n", 1)[0]


# -- the client ------------------------------------------------------------------------------------
def ask(state_dir: Path, request: Request, *, timeout: float = CLIENT_TIMEOUT) -> Reply | None:
    """Ask the agent on `state_dir`; None if no agent listens there (act directly then).

    ControlError when an agent listens but no answer comes: it closed the connection (it
    stopped or died: the request may or may not have been carried out) or `timeout` passed.
    """
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            with _addressable(path) as address:
                sock.settimeout(min(timeout, READ_TIMEOUT))
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return None  # no socket, or a stale one: no agent
        except OSError as e:
            raise ControlError(f"cannot reach the agent at {path}: {e.strerror or e}") from e
        deadline = time.monotonic() + timeout
        try:
            sock.sendall(request.encode())
            line = _read_line(sock, deadline, "the agent's answer")
        except TimeoutError as e:
            raise ControlError(
                f"the agent at {path} did not answer {request.command!r} within {timeout:g} s; "
                "it may still carry it out: see `ldapsync status`"
            ) from e
        except OSError as e:
            if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                raise ControlError(f"talking to the agent at {path}: {e.strerror or e}") from e
            line = None
        if line is None:
            raise ControlError(
                f"the agent at {path} closed the connection without answering {request.command!r} "
                "(it stopped or died; see `journalctl -u ldapsync` and `ldapsync status`)"
            )
        return Reply.parse(line)
    finally:
        sock.close()


# -- the server ------------------------------------------------------------------------------------
class Pending:
    """A request handed to the agent's main thread; the connection's thread waits for the answer."""

    def __init__(self, request: Request):
        self.request = request
        self._done = threading.Event()
        self._reply: Reply | None = None

    def answer(self, reply: Reply) -> None:
        if not self._done.is_set():
            self._reply = reply
            self._done.set()

    def wait(self, timeout: float) -> Reply | None:
        self._done.wait(timeout)
        return self._reply


class ControlServer:
    """Accepts connections on the socket; hands each request to `submit` (the agent's queue).

    `status` is answered on the connection's own thread from `describe()` (never waits for a
    sync); everything else waits until the agent's main thread answers the Pending. Closing
    the server answers whatever is still pending with "the agent is stopping".
    """

    def __init__(
        self,
        path: Path,
        submit: Callable[[Pending], None],
        describe: Callable[[], Mapping[str, Any]],
        *,
        answer_within: float = ANSWER_WITHIN,
    ):
        self.path = path
        self.submit = submit
        self.describe = describe
        self.answer_within = answer_within
        self._sock: socket.socket | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: set[Pending] = set()
        self._lock = threading.Lock()
        self._uid = os.getuid()

    def start(self) -> None:
        """Bind (replacing a dead agent's socket: the caller holds the state lock) and listen."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            with _addressable(self.path) as address:
                sock.bind(address)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            sock.settimeout(0.5)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="ldapsync-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()
        with self._lock:
            pending, self._pending = list(self._pending), set()
        for p in pending:
            p.answer(Reply(False, "the agent is stopping; the request was not carried out"))

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._halt.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._halt.is_set():
                    return
                log.error("control socket failed; operating the agent needs a restart", error=str(e))
                return
            threading.Thread(target=self._serve, args=(conn,), name="ldapsync-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                reply = self._handle(conn)
            except ControlError as e:
                reply = Reply(False, str(e))
            except (TimeoutError, OSError):
                return  # the client left or sent nothing
            with contextlib.suppress(OSError):
                conn.settimeout(READ_TIMEOUT)
                conn.sendall(reply.encode())

    def _handle(self, conn: socket.socket) -> Reply:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if not allowed(uid, self._uid):
            log.warning("control request refused: not root or the agent's user", peer_pid=pid, peer_uid=uid)
            return Reply(False, f"permission denied: only root and uid {self._uid} may operate the agent")
        line = _read_line(conn, time.monotonic() + READ_TIMEOUT, "the request")
        if line is None:
            raise TimeoutError("closed before a request")
        request = Request.parse(line)
        if request.command == "status":
            return Reply(True, "running", self.describe())
        log.info("control request", command=request.command, generation=request.generation, peer_uid=uid)
        pending = Pending(request)
        with self._lock:
            if self._halt.is_set():
                return Reply(False, "the agent is stopping; the request was not carried out")
            self._pending.add(pending)
        try:
            self.submit(pending)
            reply = pending.wait(self.answer_within)
        finally:
            with self._lock:
                self._pending.discard(pending)
        if reply is None:
            return Reply(False, f"the agent did not carry out {request.command!r} within {self.answer_within:g} s")
        return reply
