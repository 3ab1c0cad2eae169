"""The agent's store: the mirrored directory, the routing engine's index and the sync cookie.

One LMDB environment (state_dir/mirror.lmdb), memory-mapped: the entries and the index live
in the page cache, not in the agent's heap, and a restart opens them instead of reading the
directory again. Every sync writes what changed -- entries, index updates, cookie, the
digest of the whole, and the hashes of the outputs it rendered -- in ONE write transaction,
so a crash (kill -9, power loss) leaves the store as it was before that sync or as it was
after it, never a mix: the cookie always goes with exactly the entries stored.

The store is a cache. The generations (state_dir/generations, store/) are the record an admin
reads; the store can always be rebuilt from LDAP, and is, whenever it cannot be trusted: a
format this version does not write, another search or routing configuration (the
fingerprint), a damaged file, or content that does not match the installed outputs. The
reader says why when it rebuilds.

Tables (LMDB named databases):
  meta         format, fingerprint, cookie, entry sum, and the engine's and renderers' records (JSON)
  entries      entry key (entryUUID, else DN) -> [dn, uuid, [[attribute, [values]], ...]] (JSON)
  logins, addresses, dns, to_addresses, to_dns
               name -> entry keys claiming or routing to it (sorted duplicates): the engine's index
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import structlog

from ldapsync.directory import Attributes, Entry, EntrySum
from ldapsync.errors import StateError
from ldapsync.state import trust

log = structlog.get_logger(__name__)

STORE_NAME = "mirror.lmdb"
FORMAT = 1  # bump when what a table holds changes: an older store is rebuilt, never read
INDEX_TABLES = ("logins", "addresses", "dns", "to_addresses", "to_dns")
NEW_STORE = "no store yet"  # Store.rebuilt of a store created where there was none
# Address space, not disk or memory: the file grows with what is written, and pages are page
# cache. Never grown at run time (LMDB allows that only with no transaction open anywhere in
# the process, and the follower thread reads while the main thread writes).
_MAP_SIZE = 1 << 40
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_entry(entry: Entry) -> bytes:
    attrs = entry.attributes
    pairs = list(attrs.pairs()) if isinstance(attrs, Attributes) else sorted(attrs.items())
    return _ENCODE([entry.dn, entry.uuid, pairs]).encode()


def decode_entry(data: bytes) -> Entry:
    dn, uuid, pairs = json.loads(data)
    return Entry(dn, Attributes.of({name: values for name, values in pairs}), uuid)


class Store:
    """An open store. Not thread-safe for writing: one writer (the agent's main thread)."""

    def __init__(self, path: Path, env: lmdb.Environment, rebuilt: str | None):
        self.path = path
        self.env = env
        self.rebuilt = rebuilt  # why the store was started afresh when opened, or None
        self._meta = env.open_db(b"meta")
        self._entries = env.open_db(b"entries")
        self._index = {name: env.open_db(name.encode(), dupsort=True) for name in INDEX_TABLES}

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path, fingerprint: str, *, map_size: int = _MAP_SIZE) -> Store:
        """The store under state dir `root`, emptied first when it cannot be trusted (see
        `rebuilt`; logged): never an error for a damaged or outdated store, which is only a cache."""
        path = root / STORE_NAME
        why: str | None = None
        problem = _untrusted(path)
        if problem is not None:  # a cache: ignored (removed), never read
            log.error("state file not trusted; ignoring it", problem=problem)
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                raise StateError(f"state_dir: {problem}; remove it")
        try:
            env = _open_env(path, map_size)
            store = cls(path, env, None)
            why = store._unusable(fingerprint)
        except lmdb.Error as e:
            why = f"store unreadable: {e}"
            env = None
        if why is None:
            return store
        if env is not None:
            env.close()
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a file where the directory belongs
        try:
            env = _open_env(path, map_size)
        except lmdb.Error as e:
            raise StateError(f"cannot create the store {path}: {e}") from e
        if why != NEW_STORE:  # one that was there: say why it is not read
            log.warning("store rebuilt; reading the directory afresh", why=why, path=str(path))
        store = cls(path, env, why)
        with store.env.begin(write=True) as txn:
            txn.put(b"format", str(FORMAT).encode(), db=store._meta)
            txn.put(b"fingerprint", fingerprint.encode(), db=store._meta)
        return store

    @classmethod
    def open_readonly(cls, root: Path, fingerprint: str) -> Store | None:
        """The store to read from without writing anything (a dry run), or None if there is
        none this version and search may use (never rebuilt here)."""
        path = root / STORE_NAME
        env = _open_readonly(path)
        if env is None:
            return None
        try:
            store = cls(path, env, None)
            if store._unusable(fingerprint) is None:
                return store
        except lmdb.Error:
            pass
        env.close()
        return None

    def _unusable(self, fingerprint: str) -> str | None:
        with self.env.begin() as txn:
            fmt = txn.get(b"format", db=self._meta)
            fp = txn.get(b"fingerprint", db=self._meta)
        if fmt is None:
            return NEW_STORE
        if fmt != str(FORMAT).encode():
            return f"store format {fmt.decode('ascii', 'replace')!r}, this version writes {FORMAT}"
        if fp != fingerprint.encode():
            return "search or routing configuration changed since the store was written"
        return None

    def close(self) -> None:
        self.env.close()

    # -- transactions ----------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self) -> Iterator[View]:
        with self.env.begin(buffers=False) as txn:
            yield View(self, txn)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Writer]:
        """One write transaction: committed when the block ends, dropped if it raises (a full
        disk, a full map: StateError, and the store stays as it was)."""
        try:
            with self.env.begin(write=True) as txn:
                yield Writer(self, txn)
        except lmdb.Error as e:
            raise StateError(f"store {self.path}: {e}") from e

    def write(self, work: Any) -> None:
        """Run `work(writer)` in one write transaction."""
        with self.writing() as w:
            work(w)


class View:
    """A read transaction's consistent view (a write transaction reads what it wrote)."""

    def __init__(self, store: Store, txn: lmdb.Transaction):
        self.store = store
        self.txn = txn

    def meta(self, name: str, default: Any = None) -> Any:
        data = self.txn.get(name.encode(), db=self.store._meta)
        return default if data is None else json.loads(bytes(data))

    def cookie(self) -> bytes | None:
        data = self.txn.get(b"cookie", db=self.store._meta)
        return None if data is None or data == b"" else bytes(data)

    def entry_sum(self) -> EntrySum | None:
        raw = self.meta("entry_sum")
        if not isinstance(raw, list) or len(raw) != 2:
            return None
        return EntrySum(int(raw[0]), int(raw[1], 16))

    def entry(self, key: str) -> Entry | None:
        data = self.txn.get(key.encode(), db=self.store._entries)
        return None if data is None else decode_entry(bytes(data))

    def count(self) -> int:
        return int(self.txn.stat(self.store._entries)["entries"])

    def keys(self) -> Iterator[str]:
        with self.txn.cursor(db=self.store._entries) as cur:
            for key in cur.iternext(keys=True, values=False):
                yield bytes(key).decode()

    def entries(self) -> Iterator[tuple[str, Entry]]:
        with self.txn.cursor(db=self.store._entries) as cur:
            for key, value in cur:
                yield bytes(key).decode(), decode_entry(bytes(value))

    def holders(self, table: str, name: str) -> list[str]:
        """Entry keys filed under `name` in one of the index tables."""
        with self.txn.cursor(db=self.store._index[table]) as cur:
            if not cur.set_key(name.encode()):
                return []
            return [bytes(v).decode() for v in cur.iternext_dup()]


class Writer(View):
    def set_meta(self, name: str, value: Any) -> None:
        self.txn.put(name.encode(), _ENCODE(value).encode(), db=self.store._meta)

    def set_cookie(self, cookie: bytes | None) -> None:
        self.txn.put(b"cookie", cookie or b"", db=self.store._meta)

    def set_entry_sum(self, entry_sum: EntrySum) -> None:
        self.set_meta("entry_sum", [entry_sum.count, f"{entry_sum.total:x}"])

    def put_entry(self, key: str, entry: Entry) -> None:
        self.txn.put(key.encode(), encode_entry(entry), db=self.store._entries)

    def delete_entry(self, key: str) -> None:
        self.txn.delete(key.encode(), db=self.store._entries)

    def put_entries(self, items: Iterable[tuple[str, Entry]]) -> None:
        """Many entries at once (a whole directory: sorted keys append fastest)."""
        with self.txn.cursor(db=self.store._entries) as cur:
            cur.putmulti((k.encode(), encode_entry(e)) for k, e in items)

    def file_many(self, table: str, pairs: Iterable[tuple[str, str]]) -> None:
        """(name, key) pairs into one index table at once."""
        rows = sorted((name.encode(), key.encode()) for name, key in pairs)
        with self.txn.cursor(db=self.store._index[table]) as cur:
            cur.putmulti(rows, dupdata=True)

    def file(self, table: str, names: Iterable[str], key: str) -> None:
        db = self.store._index[table]
        k = key.encode()
        for name in names:
            self.txn.put(name.encode(), k, db=db, dupdata=True)

    def unfile(self, table: str, names: Iterable[str], key: str) -> None:
        db = self.store._index[table]
        k = key.encode()
        for name in names:
            self.txn.delete(name.encode(), k, db=db)

    def clear_table(self, table: str) -> None:
        self.txn.drop(self.store._index[table], delete=False)

    def clear_entries(self) -> None:
        self.txn.drop(self.store._entries, delete=False)

    def clear(self) -> None:
        """Empty every table but the format and fingerprint (a full rewrite follows)."""
        for db in (self.store._entries, *self.store._index.values()):
            self.txn.drop(db, delete=False)
        keep = {b"format", b"fingerprint"}
        with self.txn.cursor(db=self.store._meta) as cur:
            stale = [bytes(k) for k in cur.iternext(keys=True, values=False) if bytes(k) not in keep]
        for k in stale:
            self.txn.delete(k, db=self.store._meta)


def _untrusted(path: Path) -> str | None:
    """Why the store must not be read (not ours, or open to others), or None."""
    for p in (path, path / "data.mdb", path / "lock.mdb"):
        problem = trust.untrusted(p, private=p != path / "lock.mdb")
        if problem is not None:
            return problem
    return None


def peek(root: Path) -> dict[str, Any] | None:
    """The store's meta records and entry count, read only (tests, `ldapsync status`); None
    if there is no readable store."""
    env = _open_readonly(root / STORE_NAME)
    if env is None:
        return None
    try:
        with env.begin(buffers=False) as txn:
            meta_db = env.open_db(b"meta", txn=txn, create=False)
            entries_db = env.open_db(b"entries", txn=txn, create=False)
            out: dict[str, Any] = {"entries": txn.stat(entries_db)["entries"]}
            for key, value in txn.cursor(db=meta_db):
                k, v = bytes(key).decode(), bytes(value)
                out[k] = v if k == "cookie" else v.decode() if k in ("format", "fingerprint") else json.loads(v)
            return out
    except (lmdb.Error, ValueError):
        return None
    finally:
        env.close()


def _open_readonly(path: Path) -> lmdb.Environment | None:
    """The store's environment for reading only (beside a writer: readers take a slot in
    lock.mdb), or None if there is no store we may read."""
    if not (path / "data.mdb").exists() or _untrusted(path) is not None:
        return None
    try:
        return lmdb.open(str(path), readonly=True, max_dbs=len(INDEX_TABLES) + 2, lock=True)
    except lmdb.Error:
        return None


def _open_env(path: Path, map_size: int) -> lmdb.Environment:
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    # one process writes (the state lock); readers (status) open the same file read-only
    return lmdb.open(
        str(path),
        map_size=max(map_size, _file_size(path / "data.mdb")),
        max_dbs=len(INDEX_TABLES) + 2,
        mode=0o600,
        readahead=False,  # random reads of a few entries per change: no read-ahead of neighbours
        meminit=True,  # unused page space zeroed: no stray process memory (a password) on disk
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
