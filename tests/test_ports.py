"""ldapsync.testing.ports: the one port allocator of tests/slapd.py, tests/e2e and bench."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from slapd import _free_port

from ldapsync.testing import ports


def test_many_allocations_never_repeat_a_port_within_a_process() -> None:
    """Every helper draws from the same allocator: no two servers of a test get one port."""
    from e2e.mailstack import free_port as mailstack_free_port

    got = []
    for _ in range(300):
        got += [_free_port(), mailstack_free_port(), ports.free_port(), *ports.free_ports(2)]
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} ports handed out twice"


def test_concurrent_allocations_never_collide() -> None:
    results: list[list[int]] = []

    def take() -> None:
        results.append([ports.free_port() for _ in range(50)])

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [p for r in results for p in r]
    assert len(flat) == 200 and len(set(flat)) == 200


def test_a_reserved_port_is_held_until_the_block_ends() -> None:
    other = ports.PortAllocator()  # like another allocator (or process) on the same machine
    with ports.reserve(2) as (first, second):
        assert first != second
        seen = set(other.ports(200))
        assert not seen & {first, second}, "a reserved port was handed out again while held"
        with socket.socket() as sock, pytest.raises(OSError) as err:
            sock.bind((ports.HOST, first))
        assert err.value.errno == errno.EADDRINUSE
    with socket.socket() as sock:  # released: the server it was chosen for can bind now
        sock.bind((ports.HOST, first))
    assert first not in ports.free_ports(100), "a port came back after its reservation ended"


def test_processes_sharing_a_registry_never_get_the_same_port(tmp_path: Path) -> None:
    """Two pytest-xdist workers each ask the kernel; a port one released may be offered to the
    other. The session's registry ($LDAPSYNC_PORT_REGISTRY) gives each port to one of them."""
    code = (
        "import sys\nfrom ldapsync.testing import ports\nprint(' '.join(str(ports.free_port()) for _ in range(1500)))\n"
    )
    env = {**os.environ, "LDAPSYNC_PORT_REGISTRY": str(tmp_path / "registry")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True) for _ in range(3)
    ]
    got = [set(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
    assert all(len(g) == 1500 for g in got)
    assert not (got[0] & got[1] or got[0] & got[2] or got[1] & got[2]), "a port was given to two processes"
    assert {int(f.name) for f in (tmp_path / "registry").iterdir()} == got[0] | got[1] | got[2]
