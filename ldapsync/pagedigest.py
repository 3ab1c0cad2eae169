"""The digest of a paged read, summed in a second process while the reader decodes.

A cold read decodes every entry and later hashes each for the snapshot's digest
(directory.EntrySum): at 100k entries the hashing alone is about a tenth of a cold
`--once`, and the GIL keeps it on the reader's core. The reader hands each raw page to a
helper process (`python -m ldapsync.pagedigest`), which decodes it with the same code
(decode_page) and sums the entry hashes on the other core; the snapshot takes the sum
when its digest is first asked for, after the routing build.

The helper is an optimisation, never a dependency: it is started only when a core is idle
(spare_core), and if it cannot start, dies, is late or answers anything but the expected
count, the digest is computed in-process as before.
It is handed the bytes the server sent (directory data, no credentials) on a pipe only
the reader holds.
"""

from __future__ import annotations

import contextlib
import os
import queue
import struct
import subprocess
import sys
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ldapsync import ber
from ldapsync.directory import _SUM_MASK, Entry, EntrySum, Rejection, entry_hash

_HEADER = struct.Struct("<II")  # page length, number of entries; (0, 0) ends the read
# Hashing in-process costs ~5 us per entry: waiting longer than that for a late helper is
# pure loss, so the snapshot waits at most that long (never less than WAIT_MIN) and then
# hashes the entries itself.
WAIT_PER_ENTRY = 5e-6
WAIT_MIN = 0.05


def spare_core() -> bool:
    """Whether a second process would have a core to itself: more than one CPU, and the load
    average leaving one idle. On a busy host the helper's extra work (it decodes every page a
    second time) would compete with the reader instead of running beside it."""
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    return cpus > 1 and load <= cpus - 1


def decode_page(
    page: bytes,
    spans: Sequence[tuple[int, int]],
    keep: frozenset[str],
    entries: list[Entry],
    rejections: list[Rejection],
) -> None:
    """The entries of one page of searchResEntry spans (the reader's and the helper's decoding)."""
    decode_entry = ber.decode_entry
    append = entries.append
    names: dict[bytes, str] = {}
    for start, end in spans:
        dn, attrs, bad = decode_entry(page, start, end, keep, names)
        uuids = attrs.pop("entryuuid", None)
        for name in bad:
            if name.lower() != "entryuuid":
                rejections.append(Rejection(dn, name, "value is not valid UTF-8"))
        append(Entry(dn, attrs, uuids[-1] if uuids else None))


class Helper:
    """The reader's side: pages go to the helper through a feeder thread (a slow helper never
    blocks the read), which also reads the answer and reaps the helper; `result` is the
    helper's EntrySum, or None if it has none to give. A read that fails calls `close`."""

    def __init__(self, keep: frozenset[str]) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "ldapsync.pagedigest", *sorted(keep)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._pages: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._failed = False
        self._answer: EntrySum | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="ldapsync-page-digest", daemon=True)
        self._thread.start()

    def send(self, page: bytes, spans: Sequence[tuple[int, int]]) -> None:
        flat = array("I", [x for span in spans for x in span])
        self._pages.put(_HEADER.pack(len(page), len(spans)) + flat.tobytes() + page)

    def finish(self) -> None:
        """No more pages: the helper answers once it has hashed them all."""
        self._pages.put(None)

    def _feed(self) -> None:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            while (frame := self._pages.get()) is not None:
                proc.stdin.write(frame)
            proc.stdin.write(_HEADER.pack(0, 0))
            proc.stdin.close()
            self._answer = _parse_answer(proc.stdout.readline())
        except (OSError, ValueError):
            self._failed = True
        finally:
            self.close()  # reaped here: a snapshot whose digest nobody asks for leaves nothing behind
            self._done.set()

    def result(self, count: int, wait: float | None = None) -> EntrySum | None:
        """The helper's sum if it hashed exactly `count` entries within `wait` seconds
        (default: about what hashing them in-process would take)."""
        answered = self._done.wait(max(WAIT_MIN, count * WAIT_PER_ENTRY) if wait is None else wait)
        self.close()
        found = self._answer if answered and not self._failed else None
        return found if found is not None and found.count == count else None

    def close(self) -> None:
        """Stop the helper (done or not) and reap it; the feeder thread ends with its pipes."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _parse_answer(line: bytes) -> EntrySum | None:
    parts = line.split()
    if len(parts) != 2:
        return None
    return EntrySum(int(parts[0]), int(parts[1], 16) & _SUM_MASK)


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("the reader went away")
    return data


def serve(keep: frozenset[str], stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The helper's side: hash the entries of each page; answer `count total` at the end."""
    count = total = 0
    while True:
        size, n = _HEADER.unpack(_read_exactly(stdin, _HEADER.size))
        if size == 0 and n == 0:
            break
        flat = array("I")
        flat.frombytes(_read_exactly(stdin, 8 * n))
        page = _read_exactly(stdin, size)
        entries: list[Entry] = []
        decode_page(page, list(zip(flat[::2], flat[1::2], strict=True)), keep, entries, [])
        for e in entries:
            total += entry_hash(e)
        count += len(entries)
    stdout.write(b"%d %x\n" % (count, total & _SUM_MASK))
    stdout.flush()


if __name__ == "__main__":
    try:
        serve(frozenset(sys.argv[1:]), sys.stdin.buffer, sys.stdout.buffer)
    except (EOFError, OSError, ber.BerError, IndexError, struct.error):
        sys.exit(1)  # the reader computes the digest itself
