from __future__ import annotations

import io
import time

import pytest

from ldapsync import ber, pagedigest
from ldapsync.directory import Entry, EntrySum, Rejection, Snapshot, sort_entries

KEEP = frozenset({"uid", "mail", "emailforward", "entryuuid"})


def entry_content(dn: bytes, attrs: list[tuple[bytes, list[bytes]]]) -> bytes:
    """searchResEntry content, encoded independently of the decoder."""
    body = b"".join(
        ber.tlv(0x30, ber.tlv(0x04, name) + ber.tlv(0x31, b"".join(ber.tlv(0x04, v) for v in values)))
        for name, values in attrs
    )
    return ber.tlv(0x04, dn) + ber.tlv(0x30, body)


def page_of(contents: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    spans, at = [], 0
    for c in contents:
        spans.append((at, at + len(c)))
        at += len(c)
    return b"".join(contents), spans


def pages(n: int = 3, per_page: int = 40) -> list[tuple[bytes, list[tuple[int, int]]]]:
    """Entries as a server sends them: case-varied names, attributes not asked for, a repeated
    attribute, invalid UTF-8 next to a good value, entryUUIDs, non-ASCII DNs and values."""
    out = []
    for p in range(n):
        contents = []
        for i in range(per_page):
            k = p * per_page + i
            attrs: list[tuple[bytes, list[bytes]]] = [
                (b"UID", [b"user%d" % k]),
                (b"cn", [b"not wanted %d" % k]),
                (b"mail", [f"jürgen{k}@example.org".encode()]),
                (b"emailForward", [b"a%d@example.net" % k, b"\xff\xfe" if k % 7 == 0 else b"b@example.net"]),
                (b"EmailForward", [b"c%d@example.net" % k] if k % 5 == 0 else []),
            ]
            if k % 3:
                attrs.append((b"entryUUID", [b"%08d-0000-0000-0000-000000000000" % k]))
            dn = f"uid=user{k},ou=Bénutzer,dc=example,dc=org".encode()
            contents.append(entry_content(dn, [(n_, v) for n_, v in attrs if v]))
        out.append(page_of(contents))
    return out


def decoded(all_pages: list[tuple[bytes, list[tuple[int, int]]]]) -> tuple[list[Entry], list[Rejection]]:
    entries: list[Entry] = []
    rejections: list[Rejection] = []
    for page, spans in all_pages:
        pagedigest.decode_page(page, spans, KEEP, entries, rejections)
    return entries, rejections


def stream(all_pages: list[tuple[bytes, list[tuple[int, int]]]]) -> bytes:
    """What Helper writes to the helper's stdin."""
    out = []
    for page, spans in all_pages:
        out.append(pagedigest._HEADER.pack(len(page), len(spans)))
        out.append(b"".join(s.to_bytes(4, "little") + e.to_bytes(4, "little") for s, e in spans))
        out.append(page)
    return b"".join(out) + pagedigest._HEADER.pack(0, 0)


def test_pages_decode_to_the_entries_the_reader_keeps() -> None:
    entries, rejections = decoded(pages(1, 8))
    first = entries[0]
    assert first.dn == "uid=user0,ou=Bénutzer,dc=example,dc=org" and first.uuid is None
    assert first.attributes == {
        "uid": ("user0",),
        "mail": ("jürgen0@example.org",),
        "emailforward": ("a0@example.net", "c0@example.net"),  # the bad value dropped, the repeat kept
    }
    assert entries[1].uuid == "00000001-0000-0000-0000-000000000000"
    assert [(r.dn, r.attribute) for r in rejections] == [(first.dn, "emailForward"), (entries[7].dn, "emailForward")]


def test_the_helper_sums_exactly_the_entries_the_reader_decodes() -> None:
    """Same decoding, same hashes: the helper's sum is the digest of the reader's snapshot."""
    all_pages = pages()
    entries, _ = decoded(all_pages)
    out = io.BytesIO()
    pagedigest.serve(KEEP, io.BytesIO(stream(all_pages)), out)
    count, total = out.getvalue().split()
    assert EntrySum(int(count), int(total, 16)) == EntrySum.of(entries)


def test_a_helper_process_gives_the_digest_of_the_snapshot() -> None:
    all_pages = pages()
    entries, rejections = decoded(all_pages)
    helper = pagedigest.Helper(KEEP)
    for page, spans in all_pages:
        helper.send(page, spans)
    helper.finish()
    answer = helper.result(len(entries), wait=60)  # a busy test machine: the point is the sum, not its speed
    assert answer == EntrySum.of(entries)
    assert helper._proc.returncode is not None  # reaped
    ordered = sort_entries(entries)
    snapshot = Snapshot.with_pending_sum(ordered, "ldap:test", tuple(rejections), lambda: answer)
    assert snapshot.entry_sum is answer and vars(snapshot).get("_pending_sum") is None
    assert snapshot.digest() == Snapshot(ordered, "ldap:test", tuple(rejections)).digest()


def test_a_late_helper_is_waited_for_about_as_long_as_hashing_here_would_take() -> None:
    """The reader never waits long for a helper that has not answered: it hashes itself."""
    helper = pagedigest.Helper(KEEP)
    helper.send(*pages(1)[0])  # and no finish(): the helper waits for more pages forever
    started = time.monotonic()
    assert helper.result(1000) is None
    assert time.monotonic() - started < 5  # the bound is 0.05 s; the margin is for a busy machine
    assert helper._proc.returncode is not None


@pytest.mark.parametrize(
    ("cpus", "load", "spare"), [(2, 0.4, True), (2, 1.0, True), (2, 1.6, False), (1, 0.0, False), (8, 6.5, True)]
)
def test_a_helper_only_runs_on_a_core_left_idle(
    monkeypatch: pytest.MonkeyPatch, cpus: int, load: float, spare: bool
) -> None:
    monkeypatch.setattr(pagedigest.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(pagedigest.os, "getloadavg", lambda: (load, load, load))
    assert pagedigest.spare_core() is spare


def test_no_load_average_means_no_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(pagedigest.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(pagedigest.os, "getloadavg", unavailable)
    assert not pagedigest.spare_core()


def test_a_helper_that_counted_other_entries_is_not_believed() -> None:
    all_pages = pages(1)
    helper = pagedigest.Helper(KEEP)
    for page, spans in all_pages:
        helper.send(page, spans)
    helper.finish()
    assert helper.result(len(all_pages[0][1]) + 1) is None


@pytest.mark.parametrize("wait", [0.0, 5.0])
def test_a_dead_or_slow_helper_leaves_the_digest_to_the_reader(wait: float) -> None:
    """Killed mid-read (or not answering in time): the snapshot hashes its entries itself."""
    all_pages = pages()
    entries, rejections = decoded(all_pages)
    helper = pagedigest.Helper(KEEP)
    helper.send(*all_pages[0])
    if wait:
        helper._proc.kill()
    helper.finish()
    ordered = sort_entries(entries)
    snapshot = Snapshot.with_pending_sum(
        ordered, "ldap:test", tuple(rejections), lambda: helper.result(len(entries), wait=wait)
    )
    assert snapshot.digest() == Snapshot(ordered, "ldap:test", tuple(rejections)).digest()
    assert helper._proc.returncode is not None


def test_the_helper_exits_with_an_error_when_the_reader_goes_away() -> None:
    """A read that fails mid-page closes the pipe: the helper stops and prints nothing."""
    data = stream(pages(2))
    out = io.BytesIO()
    with pytest.raises(EOFError):
        pagedigest.serve(KEEP, io.BytesIO(data[: len(data) // 2]), out)
    assert out.getvalue() == b""
