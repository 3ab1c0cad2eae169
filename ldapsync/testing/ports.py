"""TCP ports for throwaway servers (slapd, Postfix, Dovecot, smtp-sink) in tests and bench.

Asking the kernel for a free port and closing the socket right away lets the next request get
the same port back: two servers of one stack then collide (the MX delivered to the
submission service). This allocator

- never hands out the same port twice in a process, and
- holds every socket of a reservation until all its ports are chosen, so one request for a
  whole stack cannot collide with itself.

Processes of one test session (pytest-xdist workers, and what they start) share a registry:
a directory named by $LDAPSYNC_PORT_REGISTRY (tests/conftest.py creates one per session),
where a port is claimed by creating a file named after it (O_EXCL, atomic). A port one worker
was given is never given to another, although each asks the kernel for ports on its own
and the kernel may offer a released port again.

Another process outside the session can still take a port between release and the server's
bind: a server that cannot bind should be retried on a new port (ldapsync/testing/slapd.py
does).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

HOST = "127.0.0.1"


REGISTRY_ENV = "LDAPSYNC_PORT_REGISTRY"


class PortAllocator:
    """Unique loopback ports for this process (and, with a registry, for every process that
    shares it); thread-safe. `registry`: a directory; by default $LDAPSYNC_PORT_REGISTRY."""

    def __init__(self, host: str = HOST, *, max_attempts: int = 1000, registry: str | None = None):
        self.host = host
        self._given: set[int] = set()
        self._lock = threading.Lock()
        self._max_attempts = max_attempts
        self._registry = registry

    def _claim(self, port: int) -> bool:
        """Whether `port` is ours: no other process of the session has claimed it."""
        registry = self._registry if self._registry is not None else os.environ.get(REGISTRY_ENV)
        if not registry:
            return True
        os.makedirs(registry, exist_ok=True)
        try:
            fd = os.open(os.path.join(registry, str(port)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    @contextmanager
    def reserve(self, count: int = 1) -> Iterator[list[int]]:
        """`count` ports, each bound by a socket held until the block ends."""
        held: list[socket.socket] = []
        try:
            ports = self._take(count, held)
            yield ports
        finally:
            for sock in held:
                sock.close()

    def ports(self, count: int) -> list[int]:
        """`count` distinct ports, chosen together (released once all are chosen)."""
        with self.reserve(count) as ports:
            return ports

    def port(self) -> int:
        """One port no earlier call in this process returned."""
        return self.ports(1)[0]

    def _take(self, count: int, held: list[socket.socket]) -> list[int]:
        ports: list[int] = []
        refused: list[socket.socket] = []  # already given out: kept bound so the kernel moves on
        try:
            with self._lock:
                attempts = 0
                while len(ports) < count:
                    attempts += 1
                    if attempts > self._max_attempts:
                        raise OSError(f"no unused port on {self.host} after {self._max_attempts} attempts")
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    try:
                        sock.bind((self.host, 0))
                    except OSError:
                        sock.close()
                        raise
                    port = int(sock.getsockname()[1])
                    if port in self._given or not self._claim(port):
                        self._given.add(port)  # another process's: never ask the registry again
                        refused.append(sock)
                        continue
                    self._given.add(port)
                    held.append(sock)
                    ports.append(port)
        finally:
            for sock in refused:
                sock.close()
        return ports


_ALLOCATOR = PortAllocator()


def free_port() -> int:
    """A loopback port no other call in this process got (the process-wide allocator)."""
    return _ALLOCATOR.port()


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports chosen together, e.g. for every server of one stack."""
    return _ALLOCATOR.ports(count)


def reserve(count: int = 1) -> AbstractContextManager[list[int]]:
    """Hold `count` ports bound until the block ends: `with reserve(3) as (a, b, c): ...`."""
    return _ALLOCATOR.reserve(count)
