"""The mirror and the routing engine on the store give what a full build of the directory gives.

Whatever sequence of changes, syncs, restarts (the store reopened by a new process) and
crashes (a sync that never reached the store, a process killed between installing outputs
and writing the store) happens, the outputs rendered from the store's engine are byte for
byte what a full build of the directory renders, and the store, reopened, holds exactly the
directory it says (entries and digest) with the cookie that goes with them.
"""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples
from test_incremental import ATTRS, OU, SSHA, TODAY, Live, config, make, step

from ldapsync import routing
from ldapsync.directory import Entry, EntrySum, Snapshot, sort_entries, without_secrets
from ldapsync.errors import StateError
from ldapsync.exporters import Exporter, exporter_class
from ldapsync.render import Renderer, WholeModelNeeded
from ldapsync.routing.stored import StoredEngine
from ldapsync.state.lmdbstore import FORMAT, STORE_NAME, Store, peek
from ldapsync.static import Static
from ldapsync.stored import StoredEntries, StoredMirror, redact_stored, save

EXPORTERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("postfix-virtual", {"include": ["aliases", "forwards"]}),
    ("postfix-recipients", {}),
    ("postfix-sender-login", {}),
    ("postfix-access", {}),
    ("dovecot-passwd", {}),
    ("dovecot-userdb", {"address_keys": True}),
)


class Host:
    """One agent process: a mirror and an engine on the store, and a renderer per output."""

    def __init__(self, root: Path, settings_: routing.Settings, static: Static, installed: dict[str, bytes]):
        self.store = Store.open(root, "search")
        self.mirror = StoredMirror(self.store)
        self.engine = StoredEngine(settings_, static, self.store)
        self.exporters: list[Exporter] = [exporter_class(k)(o) for k, o in EXPORTERS]
        self.renderers = [Renderer(e, links=False) for e in self.exporters]
        self.in_step = False
        # a restart carries on from the installed outputs only if the store rendered exactly them
        with self.store.reading() as view:
            recorded = view.meta("outputs") or {}
        empty, _ = routing.build(Snapshot((), "x"), Static(), settings_, TODAY)
        restored = 0
        for exp, r in zip(self.exporters, self.renderers, strict=True):
            data = installed.get(exp.kind)
            if data is not None and recorded.get(exp.kind) is not None:
                r.restore(data, empty)
                restored += r.sha256 == recorded[exp.kind]
        self.in_step = restored == len(self.exporters)

    def sync(self, today: date, attribute: str) -> tuple[dict[str, bytes], Snapshot]:
        snapshot, cookie = self.mirror.snapshot()
        if not self.in_step:
            self.engine.force_full()
        try:
            outputs = self._render(snapshot, today)
        except WholeModelNeeded:
            self.engine.force_full()
            outputs = self._render(snapshot, today)
        self.in_step = True
        refused = {r.dn for r in self._report.rejections if r.attribute.lower() == attribute}
        found = redact_stored(snapshot, attribute, refused)
        assert found is not None
        stored, replaced = found
        self.engine.stored_as(replaced)
        self.pending = (stored, cookie, {k: v for k, v in ((e.kind, r.sha256) for e, r in self._pairs())})
        return outputs, stored

    def _pairs(self) -> list[tuple[Exporter, Renderer]]:
        return list(zip(self.exporters, self.renderers, strict=True))

    def _render(self, snapshot: Snapshot, today: date) -> dict[str, bytes]:
        model, self._report, change = self.engine.update(snapshot, today)
        return {e.kind: r.render(model, change).data for e, r in self._pairs()}

    def commit(self) -> None:
        stored, cookie, hashes = self.pending
        save(self.mirror, stored, cookie, self.engine, {k: v for k, v in hashes.items() if v}, None)

    def close(self) -> None:
        self.store.close()


def reference(live: dict[str, Entry], settings_: routing.Settings, static: Static, today: date) -> dict[str, bytes]:
    model, _ = routing.build(Snapshot(sort_entries(live.values()), "test"), static, settings_, today)
    return {kind: exporter_class(kind)(options).render(model) for kind, options in EXPORTERS}


def stored_entries(root: Path) -> tuple[dict[str, Entry], bytes | None, EntrySum | None]:
    store = Store.open(root, "search")
    try:
        with store.reading() as view:
            return dict(view.entries()), view.cookie(), view.entry_sum()
    finally:
        store.close()


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_outputs_from_the_store_equal_a_full_build_through_changes_restarts_and_crashes(
    tmp_path_factory: pytest.TempPathFactory, data: Any
) -> None:
    root = tmp_path_factory.mktemp("state")
    conf, static = config(data.draw)
    attribute = (conf.attributes.mail_password or "").lower()
    installed: dict[str, bytes] = {}
    host = Host(root, conf, static, installed)
    directory = Live()
    live = directory.entries
    cookie = 0
    committed: tuple[dict[str, Entry], int] | None = None  # what the store must hold
    try:
        events = st.one_of(step(), st.tuples(st.sampled_from(["restart", "crash", "lost"]), st.none()))
        for op, arg in data.draw(st.lists(events, max_size=14)):
            if op == "restart":  # a clean stop and start: the store and the installed outputs agree
                host.close()
                host = Host(root, conf, static, installed)
                continue
            if op not in ("crash", "lost") and not directory.apply(op, arg):
                continue
            today = directory.today
            # the follower brings the directory up to date
            for key in host.mirror.keys() - live.keys():
                host.mirror.delete(key)
            for key, e in live.items():
                current = host.mirror._current(key)
                if current is None or not _same_or_redacted(current, e, attribute):
                    host.mirror.upsert(key, e.dn, e.attributes, ATTRS.ldap_attributes())
            cookie += 1
            host.mirror.set_cookie(str(cookie).encode())
            outputs, stored = host.sync(today, attribute)
            assert outputs == reference(live, conf, static, today)
            if op == "lost":  # the sync failed before installing: the store stays, the change waits
                host.engine.reset()
                host.in_step = False
                continue
            installed = outputs
            if op == "crash":  # killed after installing, before the store's transaction
                host.close()
                host = Host(root, conf, static, installed)
                continue
            host.commit()
            committed = (_content(stored), cookie)
            # the store alone (what a restart builds from) gives the same outputs
            assert from_store(host.store, conf, static, today) == outputs
        if committed is not None:
            host.close()
            entries, saved_cookie, saved_sum = stored_entries(root)
            want, want_cookie = committed
            assert entries == want
            assert saved_cookie == str(want_cookie).encode()
            assert saved_sum == EntrySum.of(entries.values())
            host = Host(root, conf, static, installed)
    finally:
        host.close()
        shutil.rmtree(root, ignore_errors=True)


def from_store(store: Store, settings_: routing.Settings, static: Static, today: date) -> dict[str, bytes]:
    with store.reading() as view:
        entries = sort_entries(e for _, e in view.entries())
    model, _ = routing.build(Snapshot(entries, "test"), static, settings_, today)
    return {kind: exporter_class(kind)(options).render(model) for kind, options in EXPORTERS}


def _content(snapshot: Snapshot) -> dict[str, Entry]:
    return {(e.uuid or e.dn): e for e in snapshot.entries}


def _same_or_redacted(current: Entry, wanted: Entry, attribute: str) -> bool:
    if current == wanted:
        return True
    redacted = without_secrets(Snapshot((wanted,), "x"), attribute, {wanted.dn}).entries[0]
    return bool(current == redacted)


def test_a_store_of_another_format_is_rebuilt_and_says_why(tmp_path: Path) -> None:
    store = Store.open(tmp_path, "search")
    assert store.rebuilt == "no store yet"
    with store.writing() as w:
        w.put_entry("k", Entry("uid=a," + OU, {"uid": ("a",)}, "k"))
        w.set_meta("format", FORMAT + 1)
    store.close()
    # written by another version: emptied, never read
    store = Store.open(tmp_path, "search")
    assert store.rebuilt is not None and f"this version writes {FORMAT}" in store.rebuilt
    with store.reading() as view:
        assert view.count() == 0
    store.close()


def test_a_store_for_another_search_is_rebuilt(tmp_path: Path) -> None:
    Store.open(tmp_path, "search").close()
    store = Store.open(tmp_path, "other search")
    assert store.rebuilt == "search or routing configuration changed since the store was written"
    store.close()


def test_a_damaged_store_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    store = Store.open(tmp_path, "search")
    with store.writing() as w:
        w.put_entry("k", Entry("uid=a," + OU, {"uid": ("a",)}, "k"))
    store.close()
    data = tmp_path / STORE_NAME / "data.mdb"
    data.write_bytes(b"\x00garbage" * 512)
    store = Store.open(tmp_path, "search")
    assert store.rebuilt is not None and store.rebuilt.startswith("store unreadable")
    with store.reading() as view:
        assert view.count() == 0
    store.close()


def test_a_snapshot_reads_the_store_only_when_all_entries_are_needed(tmp_path: Path) -> None:
    store = Store.open(tmp_path, "search")
    mirror = StoredMirror(store)
    for i in range(5):
        mirror.upsert(f"k{i}", f"uid=u{i},{OU}", {"uid": [f"u{i}".encode()]}, ["uid"])
    snapshot, _ = mirror.snapshot()
    save(mirror, snapshot, b"c1", None, {}, None)
    mirror.upsert("k2", f"uid=u2,{OU}", {"uid": [b"u2"], "emailforward": [b"x@ext.example"]}, ["uid", "emailforward"])
    snapshot, _ = mirror.snapshot()
    entries = snapshot.entries
    assert isinstance(entries, StoredEntries) and not entries.loaded
    assert len(entries) == 5 and not entries.loaded
    assert entries.delta is not None and set(entries.delta.changes) == {"k2"}
    assert [e.dn for e in entries] == [f"uid=u{i},{OU}" for i in range(5)]
    assert snapshot.digest() == Snapshot(tuple(entries), "x").digest()
    store.close()


def _user(mirror: StoredMirror, key: str, forward: str = "") -> None:
    raw = {"uid": [key.encode()]} | ({"emailforward": [forward.encode()]} if forward else {})
    mirror.upsert(key, f"uid={key},{OU}", raw, ["uid", "emailforward"])


def _forwards(snapshot: Snapshot) -> dict[str, tuple[str, ...]]:
    return {e.uuid or e.dn: e.get("emailforward") for e in snapshot.entries}


def test_a_refresh_shows_nowhere_until_it_completes_and_an_abandoned_one_leaves_no_trace(tmp_path: Path) -> None:
    store = Store.open(tmp_path, "search")
    mirror = StoredMirror(store)
    for key in ("a", "b", "c"):
        _user(mirror, key)
    mirror.set_cookie(b"old")
    snapshot, cookie = mirror.snapshot()
    save(mirror, snapshot, cookie, None, {}, None)
    before = mirror.content()

    mirror.begin_refresh()  # cut off half way: a rename's new copy arrived, not the old one's delete
    _user(mirror, "d", "x@ext.example")
    assert mirror.delete("b")
    mirror.set_cookie(b"new")
    assert mirror.staged() == 2
    snapshot, cookie = mirror.snapshot()
    assert (set(_forwards(snapshot)), cookie) == ({"a", "b", "c"}, b"old")
    assert mirror.content() == before and len(mirror) == 3
    assert mirror.abandon_refresh()
    snapshot, cookie = mirror.snapshot()
    assert (set(_forwards(snapshot)), cookie) == ({"a", "b", "c"}, b"old")

    mirror.begin_refresh()  # complete this time: all of it at once, with its cookie
    _user(mirror, "d", "x@ext.example")
    mirror.delete("b")
    _user(mirror, "a")  # sent unchanged: not a change
    mirror.set_cookie(b"new")
    mirror.commit_refresh()
    snapshot, cookie = mirror.snapshot()
    assert (_forwards(snapshot), cookie) == ({"a": (), "c": (), "d": ("x@ext.example",)}, b"new")
    entries = snapshot.entries
    assert isinstance(entries, StoredEntries) and entries.delta is not None
    assert set(entries.delta.changes) == {"b", "d"}
    assert mirror.content() == EntrySum.of(snapshot.entries)
    store.close()


def test_forgetting_the_cookie_in_a_refresh_forgets_it_at_once(tmp_path: Path) -> None:
    store = Store.open(tmp_path, "search")
    mirror = StoredMirror(store)
    mirror.set_cookie(b"old")
    mirror.begin_refresh()
    mirror.set_cookie(None)  # the server refused it: the next connection must not offer it again
    assert mirror.cookie is None
    mirror.abandon_refresh()
    assert mirror.cookie is None
    store.close()


def test_a_first_read_into_an_empty_store_is_written_whole(tmp_path: Path) -> None:
    store = Store.open(tmp_path, "search")
    mirror = StoredMirror(store)
    mirror.begin_refresh()
    for key in ("a", "b"):
        _user(mirror, key)
    mirror.set_cookie(b"c1")
    mirror.commit_refresh()
    snapshot, cookie = mirror.snapshot()
    entries = snapshot.entries
    assert isinstance(entries, StoredEntries) and entries.delta is None  # no delta of every entry
    save(mirror, snapshot, cookie, None, {}, None)
    store.close()
    meta = peek(tmp_path)
    assert meta is not None and meta["entries"] == 2 and meta["cookie"] == b"c1" and meta["serial"] == 1


def test_a_store_that_cannot_take_a_sync_keeps_the_last_one(tmp_path: Path) -> None:
    """A full disk or map fails the transaction: StateError, and the store holds the sync before."""
    store = Store.open(tmp_path, "search", map_size=1 << 20)
    mirror = StoredMirror(store)
    _user(mirror, "a")
    snapshot, _ = mirror.snapshot()
    save(mirror, snapshot, b"c1", None, {}, None)
    for i in range(2000):  # far more than a megabyte
        mirror.upsert(f"k{i}", f"uid=k{i},{OU}", {"uid": [b"x" * 1000]}, ["uid"])
    snapshot, _ = mirror.snapshot()
    with pytest.raises(StateError, match="MDB_MAP_FULL"):
        save(mirror, snapshot, b"c2", None, {}, None)
    store.close()
    meta = peek(tmp_path)
    assert meta is not None and (meta["entries"], meta["cookie"], meta["serial"]) == (1, b"c1", 1)


def test_a_change_of_many_keys_is_spliced_not_built_whole(tmp_path: Path) -> None:
    """300 accounts disabled at once: every output is spliced, also the access map, which
    has fewer lines than the change has keys (a whole render would need a full build)."""
    conf = routing.Settings(domain="example.org", domain_aliases=(), attributes=ATTRS)
    host = Host(tmp_path, conf, Static(), {})
    users = {f"id{i}": make_user(i) for i in range(2000)}  # 300 is less than a quarter: spliced
    for key, e in users.items():
        host.mirror.upsert(key, e.dn, e.attributes, ATTRS.ldap_attributes())
    host.sync(TODAY, "mailpassword")
    host.commit()
    for i in range(300):
        e = make_user(i, disabled="gone")
        users[f"id{i}"] = e
        host.mirror.upsert(f"id{i}", e.dn, e.attributes, ATTRS.ldap_attributes())
    outputs, _ = host.sync(TODAY, "mailpassword")
    assert not host.engine.last_full, "built whole"
    assert outputs == reference(users, conf, Static(), TODAY)
    assert outputs["postfix-access"].count(b"\n") == 300
    host.close()


def make_user(i: int, *, disabled: str = "") -> Entry:
    attrs = {"objectClass": ["inetOrgPerson"], "uid": [f"u{i}"], "mailPassword": [SSHA]}
    if disabled:
        attrs["mailDisableMessage"] = [disabled]
    return make(f"uid=u{i},{OU}", f"id{i}", attrs)


def test_only_a_pipeline_whose_exporters_all_splice_builds_on_the_store(tmp_path: Path) -> None:
    """An exporter that renders whole needs the whole model every time: such a pipeline keeps
    its engine in memory (the agent then keeps its copy in memory too)."""
    from siteconfig import write_config
    from test_render import Plugin

    from ldapsync import config as config_mod
    from ldapsync.routing.incremental import Engine
    from ldapsync.sync import Pipeline

    cfg = config_mod.load(write_config(tmp_path, exporters=[{"kind": "postfix-virtual", "path": "out/virtual"}]))
    store = Store.open(tmp_path, "search")
    try:
        splicing = Pipeline(cfg, follow=True)
        assert splicing.attach_store(store) and isinstance(splicing.engine, StoredEngine)
        whole = Pipeline(cfg, follow=True)
        whole.exporters.append((whole.exporters[0][0], Plugin({})))
        assert not whole.attach_store(store)
        assert whole.store is None and isinstance(whole.engine, Engine)
    finally:
        store.close()
