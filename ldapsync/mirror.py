"""The agent's in-memory copy of the directory, and the files that let a restart resume it.

The Mirror holds each entry once, compactly (directory.Attributes: no dict per entry), keyed
by entryUUID, kept in snapshot order, with the directory digest kept up to date per change
(directory.EntrySum): a snapshot for a rebuild shares the mirrored entries and costs neither
a sort nor hashing of the whole directory. The follow state (follow.json in the state directory)
pairs a saved snapshot -- a recorded generation or held change, or follow-snapshot.json for
one that is neither -- with the sync cookie that goes with exactly that content. A syncrepl
refresh is staged beside the mirrored content and applied whole when it completes, or
dropped (see Mirror), so no snapshot holds part of one.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import structlog

from ldapsync.config import Config
from ldapsync.directory import (
    Attributes,
    Entry,
    EntrySum,
    Rejection,
    Snapshot,
    SnapshotDelta,
    entry_key,
    entry_order,
    make_entry,
    sort_entries,
)
from ldapsync.errors import StateError
from ldapsync.fileio import write_atomic
from ldapsync.state import State, sha256

log = structlog.get_logger(__name__)

FOLLOW_FILE = "follow.json"
FOLLOW_SNAPSHOT = "follow-snapshot.json"


def compact(entry: Entry) -> Entry:
    """The entry with its attributes in the compact form (the same object if they are)."""
    if isinstance(entry.attributes, Attributes):
        return entry
    return Entry(entry.dn, Attributes.of(entry.attributes), entry.uuid)


class _Stage:
    """A refresh in progress (Mirror.begin_refresh): its changes, rejections and cookie, kept
    apart from the mirrored content until commit_refresh applies them all at once.

    Raw changes only (key -> the entry now, None: deleted), never a copy of the mirror: an
    entry the refresh sends unchanged is the mirrored object itself, so a full refresh costs
    the dict of its keys, not a second directory.
    """

    __slots__ = ("changes", "cookie", "has_cookie", "rejections")

    def __init__(self) -> None:
        self.changes: dict[str, Entry | None] = {}
        self.rejections: dict[str, list[Rejection]] = {}  # only for staged entries that have some
        self.cookie: bytes | None = None
        self.has_cookie = False  # the refresh brought a cookie (else the one in force stays)


class Staging:
    """What every mirror does about a refresh in progress (its `_stage`, None without one,
    with `cookie` and `has_cookie`): the cookie goes with the content or is staged with it."""

    _stage: Any
    _lock: threading.Lock
    cookie: bytes | None

    def set_cookie(self, cookie: bytes | None) -> None:
        """The cookie that goes with the content; in a refresh, staged with its changes.

        None forgets the cookie at once, refresh or not (and any the refresh brought): the
        next connection does a full refresh, even if this refresh is then abandoned."""
        with self._lock:
            if cookie is None:
                self.cookie = None
                if self._stage is not None:
                    self._stage.cookie, self._stage.has_cookie = None, False
            elif self._stage is not None:
                self._stage.cookie, self._stage.has_cookie = cookie, True
            else:
                self.cookie = cookie

    @property
    def refreshing(self) -> bool:
        """A refresh is staged: changes and cookies wait for commit_refresh."""
        return self._stage is not None

    def staged(self) -> int:
        """How many changes the refresh in progress holds (0 without one): how far a first
        read got, which len() does not show until the refresh completes."""
        stage = self._stage
        return len(stage.changes) if stage is not None else 0

    def abandon_refresh(self) -> bool:
        """The refresh did not complete (a lost connection, a protocol error, a stop): drop
        its stage; the mirror is what it was before it, with its cookie. True if one was open."""
        with self._lock:
            stage, self._stage = self._stage, None
            return stage is not None


class Mirror(Staging):
    """The directory as last seen, plus the sync cookie that goes with exactly this state.

    A syncrepl refresh is staged (begin_refresh, commit_refresh, abandon_refresh): until it
    completes, its upserts, deletes and cookie land in the stage, and everything a sync
    reads -- snapshot(), content(), keys(), len(), cookie -- is the content as it was before
    the refresh with the cookie of that content. A refresh cut off half way would otherwise
    leave a mix a sync installs from (a renamed entry's new copy beside the old one: two
    entries claiming one address), and the cookie saved with it would not describe it.
    A change made of several steps (persistent search's delete by DN, then add) is staged
    the same way.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._sorted: list[Entry] | None = []  # the same entries in snapshot order; None: sort at the snapshot
        self._rejections: dict[str, list[Rejection]] = {}
        # The digest's running sum as of the last snapshot, and the changes since: applied at
        # the next snapshot, or, when they outnumber a quarter of the entries (a refresh
        # streaming in), dropped for one pass over all entries.
        self._sum: EntrySum | None = EntrySum()
        self._pending: list[tuple[Entry | None, Entry | None]] = []
        self.cookie: bytes | None = None
        self.source = "ldap"
        # What changed since the last snapshot, handed on with the next one (SnapshotDelta);
        # None: unknown (after a load, or a refresh too large to be worth listing).
        self._serial = 0
        self._since: dict[str, Entry | None] | None = None
        self._stage: _Stage | None = None  # a refresh in progress

    def load(self, snapshot: Snapshot, cookie: bytes | None) -> None:
        entries = {entry_key(e): compact(e) for e in snapshot.entries}
        entry_sum: EntrySum | None = vars(snapshot).get("entry_sum")  # known if computed or saved
        ordered = sort_entries(entries.values())
        rejections: dict[str, list[Rejection]] = {}
        if snapshot.rejections:
            key_of: dict[str, str] = {}
            for k, e in entries.items():
                key_of.setdefault(e.dn, k)
            for r in snapshot.rejections:
                rejections.setdefault(key_of.get(r.dn, r.dn), []).append(r)
        with self._lock:
            self._entries = entries
            self._sorted = list(ordered)
            self._rejections = rejections
            self._sum = entry_sum
            self._pending = []
            self._since = None
            self._stage = None  # a refresh's changes are relative to the content replaced here
            self.cookie = cookie
            self.source = snapshot.source

    def replace_all(self, snapshot: Snapshot) -> bool:
        """Install a full read; True if the content differs from what was mirrored."""
        with self._lock:
            before = self._current_sum()
        if "entry_sum" not in vars(snapshot):
            snapshot = Snapshot.with_sum(
                snapshot.entries, snapshot.source, snapshot.rejections, EntrySum.of(snapshot.entries)
            )
        self.load(snapshot, None)
        return before != snapshot.entry_sum

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._entries)

    def upsert(self, key: str, dn: str, raw: Mapping[str, Sequence[bytes]] | Attributes, wanted: Iterable[str]) -> None:
        """Add or replace the entry `key`: from raw values (only `wanted` kept, bad UTF-8
        rejected), or from attributes already decoded (the syncrepl reader's), kept as they are."""
        rejections: list[Rejection] = []
        if isinstance(raw, Attributes):
            entry = Entry(dn, raw, key)
        else:
            entry = compact(make_entry(dn, raw, wanted, rejections, uuid=key))
        with self._lock:
            stage = self._stage
            if stage is not None:
                old = self._entries.get(key)
                stage.changes[key] = old if old == entry else entry  # unchanged: one copy
                if rejections:
                    stage.rejections[key] = rejections
                else:
                    stage.rejections.pop(key, None)
                return
            self._put(key, entry)
            if rejections:
                self._rejections[key] = rejections
            else:  # no empty list per entry: ~9 MiB per 100k entries
                self._rejections.pop(key, None)

    def delete(self, key: str) -> bool:
        """Delete `key`; False if it was not there (in a refresh: as the refresh sees it)."""
        with self._lock:
            stage = self._stage
            if stage is not None:
                existed = stage.changes.get(key, self._entries.get(key)) is not None
                if key in self._entries:
                    stage.changes[key] = None
                else:
                    stage.changes.pop(key, None)
                stage.rejections.pop(key, None)
                return existed
            self._rejections.pop(key, None)
            return self._remove(key)

    def _put(self, key: str, entry: Entry) -> None:
        """Add or replace one entry in the mirrored content (the lock held)."""
        old = self._entries.get(key)
        if self._sorted is not None:
            if old is not None:
                self._unsort(self._sorted, old)
            bisect.insort(self._sorted, entry, key=entry_order)
        self._changed(old, entry)
        self._entries[key] = entry
        self._note(key, entry)

    def _remove(self, key: str) -> bool:
        """Delete one entry from the mirrored content (the lock held)."""
        old = self._entries.pop(key, None)
        if old is None:
            return False
        if self._sorted is not None:
            self._unsort(self._sorted, old)
        self._changed(old, None)
        self._note(key, None)
        return True

    # -- a staged refresh -------------------------------------------------------------------

    def begin_refresh(self) -> None:
        """From now on upserts, deletes and cookies are staged; the mirrored content and its
        cookie stay what every reader sees. An unfinished stage is dropped first: a new
        refresh starts from the mirrored content and its cookie."""
        with self._lock:
            self._stage = _Stage()

    def commit_refresh(self) -> None:
        """The refresh completed: apply its changes and its cookie (if it brought one) at once,
        under the lock, so no snapshot sees part of them. Without a refresh, nothing.

        Entries the refresh sent unchanged are not changes. Many changes (a quarter of the
        entries or more) are applied in bulk: the order and digest are recomputed once at the
        next snapshot, as for a refresh streamed straight in."""
        with self._lock:
            stage, self._stage = self._stage, None
            if stage is None:
                return
            for key in stage.changes:
                found = stage.rejections.get(key)
                if found:
                    self._rejections[key] = found
                else:
                    self._rejections.pop(key, None)
            if stage.has_cookie:
                self.cookie = stage.cookie
            entries = self._entries
            changed = sum(1 for k, e in stage.changes.items() if e is not entries.get(k))  # no list of them
            if changed <= max(64, len(entries) // 4):
                for key, entry in stage.changes.items():
                    if entry is entries.get(key):
                        continue
                    if entry is None:
                        self._remove(key)
                    else:
                        self._put(key, entry)
                return
            self._sum, self._pending, self._sorted, self._since = None, [], None, None
            if not entries and all(e is not None for e in stage.changes.values()):
                self._entries = cast(dict[str, Entry], stage.changes)  # a first read: the stage is the mirror
                return
            for key, entry in stage.changes.items():
                if entry is None:
                    entries.pop(key, None)
                else:
                    entries[key] = entry

    def _note(self, key: str, entry: Entry | None) -> None:
        if self._since is None:
            return
        self._since[key] = entry
        if len(self._since) > max(64, len(self._entries) // 4):  # a refresh: the consumer rebuilds anyway
            self._since = None

    def _changed(self, old: Entry | None, new: Entry | None) -> None:
        if self._sum is None:
            return
        self._pending.append((old, new))
        if len(self._pending) > max(16, len(self._entries) // 4):  # a refresh: one pass each at the snapshot
            self._sum, self._pending, self._sorted = None, [], None

    @staticmethod
    def _unsort(ordered: list[Entry], entry: Entry) -> None:
        i = bisect.bisect_left(ordered, entry_order(entry), key=entry_order)
        while ordered[i] is not entry:  # equal keys: an identical entry under another key
            i += 1
        del ordered[i]

    def _current_sum(self) -> EntrySum:
        if self._sum is None:
            self._sum = EntrySum.of(self._entries.values())
        for old, new in self._pending:
            if old is not None:
                self._sum = self._sum.removed(old)
            if new is not None:
                self._sum = self._sum.added(new)
        self._pending = []
        return self._sum

    def content(self) -> EntrySum:
        """The running digest of the mirrored entries: equal content, equal sum (no snapshot)."""
        with self._lock:
            return self._current_sum()

    def delete_dn(self, dn: str) -> bool:
        with self._lock:
            key = next((k for k, e in self._view() if e.dn.lower() == dn.lower()), None)
        return self.delete(key) if key is not None else False

    def _view(self) -> Iterator[tuple[str, Entry]]:
        """The entries as a staged refresh sees them (the mirrored ones without one)."""
        stage = self._stage
        if stage is None:
            yield from self._entries.items()
            return
        for key, entry in self._entries.items():
            if key not in stage.changes:
                yield key, entry
        for key, staged in stage.changes.items():
            if staged is not None:
                yield key, staged

    def snapshot(self) -> tuple[Snapshot, bytes | None]:
        """A consistent (snapshot, cookie) pair: persisting both lets a restart resume.

        The snapshot shares the mirrored entries and carries the running digest."""
        with self._lock:
            rejections = tuple(r for rs in self._rejections.values() for r in rs)
            if self._sorted is None:
                self._sorted = list(sort_entries(self._entries.values()))
            snapshot = Snapshot.with_sum(tuple(self._sorted), self.source, rejections, self._current_sum())
            self._serial += 1
            if self._since is not None:
                snapshot.with_delta(SnapshotDelta(self, self._serial - 1, self._serial, self._since))
            self._since = {}
            return snapshot, self.cookie

    def __len__(self) -> int:
        return len(self._entries)


def fingerprint(config: Config) -> str:
    """What the cookie is valid for: another base, filter or attribute set needs a full read."""
    src = config.source
    doc = [
        getattr(src, "base_dn", None),
        getattr(src, "filter", None),
        getattr(src, "scope", None),
        config.routing.attributes.ldap_attributes(),
    ]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def follow_state_path(state: State) -> Path:
    return state.root / FOLLOW_FILE


def save_follow_state(
    state: State, config: Config, snapshot: Snapshot, cookie: bytes | None, *, generation: str | None = None
) -> None:
    """Persist (snapshot, cookie) so a restart resumes, without writing the directory again.

    `generation`: the id of a recorded generation or held change holding exactly this
    snapshot: follow.json names it, and a restart rebuilds the mirror from it. Otherwise the
    snapshot goes to follow-snapshot.json, written only when it changed. The digest's running
    sum is saved too, so a restart does not hash every entry.
    """
    fp = fingerprint(config)
    digest = snapshot.digest()
    entry_sum = snapshot.entry_sum
    doc: dict[str, object] = {
        "fingerprint": fp,
        "cookie": base64.b64encode(cookie).decode() if cookie else None,
        "snapshot_digest": digest,
        "snapshot_sum": [entry_sum.count, f"{entry_sum.total:x}"],
        "time": time.time(),
    }
    target = state.root / FOLLOW_SNAPSHOT
    recorded = state.get(generation) if generation is not None else None
    if recorded is not None and recorded.meta.get("snapshot_digest") == digest:
        state.write_json(FOLLOW_FILE, {**doc, "generation": recorded.id})
        with contextlib.suppress(FileNotFoundError):
            target.unlink()  # a snapshot saved for an earlier held change
        return
    saved = state.read_json(FOLLOW_FILE)
    unchanged = (
        "generation" not in saved
        and saved.get("fingerprint") == fp
        and saved.get("snapshot_digest") == digest
        and target.exists()
    )
    if unchanged and state.trusted(FOLLOW_FILE, FOLLOW_SNAPSHOT):  # else rewrite what is not ours
        sha = str(saved.get("snapshot_sha256"))
    else:
        data = snapshot.to_json()
        sha = sha256(data)
        write_atomic(target, data)
    state.write_json(FOLLOW_FILE, {**doc, "snapshot_sha256": sha})


def load_follow_state(state: State, config: Config) -> tuple[Snapshot, bytes | None] | None:
    """The persisted mirror and cookie, or None if absent, damaged, not ours or for another search.

    A follow state naming a generation is rebuilt from the generation's store (whose files
    are checked against their hashes); one written with follow-snapshot.json is read from it.
    """
    if not state.trusted(FOLLOW_FILE):
        return None
    doc = state.read_json(FOLLOW_FILE)
    if not doc:
        return None
    if doc.get("fingerprint") != fingerprint(config):
        log.info("search changed since the cookie was saved; starting with a full read")
        return None
    try:
        cookie = base64.b64decode(doc["cookie"]) if doc.get("cookie") else None
        generation = doc.get("generation")
        if generation is not None:
            if not isinstance(generation, str):
                raise ValueError("generation is not a string")
            snapshot = state.resume(generation)
            if snapshot.digest() != doc.get("snapshot_digest"):
                raise ValueError(f"generation {generation} does not hold the saved snapshot")
            return snapshot, cookie
        if not state.trusted(FOLLOW_SNAPSHOT):
            return None
        data = (state.root / FOLLOW_SNAPSHOT).read_bytes()
        if sha256(data) != doc.get("snapshot_sha256"):
            raise ValueError("snapshot does not match its hash")
        snapshot = Snapshot.from_json(data)
        saved_sum = _saved_sum(doc)
    except (OSError, ValueError, KeyError, TypeError, StateError) as e:
        log.error("saved sync state unusable; starting with a full read", error=str(e))
        return None
    if saved_sum is not None:  # the file matched its hash, so the sum saved with it is its sum
        snapshot = Snapshot.with_sum(snapshot.entries, snapshot.source, snapshot.rejections, saved_sum)
    return snapshot, cookie


def _saved_sum(doc: Mapping[str, object]) -> EntrySum | None:
    """The running digest saved with the snapshot, if it is there and agrees with the digest."""
    raw = doc.get("snapshot_sum")
    if not isinstance(raw, list) or len(raw) != 2 or not isinstance(raw[0], int) or not isinstance(raw[1], str):
        return None  # saved by a version without it: hashed again on load
    entry_sum = EntrySum(raw[0], int(raw[1], 16))
    return entry_sum if entry_sum.hexdigest() == doc.get("snapshot_digest") else None
