"""The mirror keeps each entry once, compactly, and its digest current per change.

The digest a mirror maintains incrementally must always equal the digest of a fresh
snapshot of the same directory (the full computation stays the reference), whatever
sequence of adds, modifies, renames and deletes led there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from ldapsync import config as config_mod
from ldapsync import mirror
from ldapsync.directory import Attributes, Entry, EntrySum, Snapshot, entry_order, make_entry, sort_entries
from ldapsync.mirror import Mirror
from ldapsync.state import State

WANTED = ["uid", "emailForward", "mailPassword", "accountStatus"]
USERS = "ou=users,dc=example,dc=org"

values = st.text(alphabet=st.sampled_from("ab@.,é\n\x00 "), min_size=0, max_size=6)
attributes = st.dictionaries(
    st.sampled_from(["uid", "emailForward", "mailPassword", "accountStatus", "cn", "entryUUID"]),
    st.lists(values, min_size=0, max_size=3),
    max_size=5,
)
upsert = st.tuples(st.just("upsert"), st.sampled_from("kmnopq"), st.sampled_from(["a", "b", "A", "c"]), attributes)
delete = st.tuples(st.just("delete"), st.sampled_from("kmnopq"), st.just(""), st.just({}))


def fresh_digest(state: dict[str, tuple[str, dict[str, list[str]]]]) -> tuple[Snapshot, str]:
    """The reference: plain dict entries built from the final state, digested from scratch."""
    entries = []
    for key, (dn, attrs) in state.items():
        raw = {k: [v.encode() for v in vs] for k, vs in attrs.items()}
        entries.append(make_entry(dn, raw, WANTED, [], uuid=key))
    snap = Snapshot(sort_entries(entries), "reference")
    return snap, snap.digest()


def content(e: Entry) -> tuple[tuple[str, str, str], list[tuple[str, tuple[str, ...]]]]:
    return entry_order(e), sorted(e.attributes.items())


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.one_of(upsert, delete), max_size=40))
def test_incremental_digest_equals_a_fresh_digest(ops: list[tuple[str, str, str, dict[str, list[str]]]]) -> None:
    m = mirror.Mirror()
    state: dict[str, tuple[str, dict[str, list[str]]]] = {}
    for op, key, rdn, attrs in ops:
        if op == "upsert":  # add, modify, or (another rdn for the same key) rename
            dn = f"uid={rdn},{USERS}"
            m.upsert(key, dn, {k: [v.encode() for v in vs] for k, vs in attrs.items()}, WANTED)
            state[key] = (dn, attrs)
        else:
            assert m.delete(key) == (key in state)
            state.pop(key, None)
    snap, _ = m.snapshot()
    reference, digest = fresh_digest(state)
    # Same entries in the same order; entries whose DN and uuid both tie have no content order.
    assert [entry_order(e) for e in snap.entries] == [entry_order(e) for e in reference.entries]
    assert sorted(map(content, snap.entries)) == sorted(map(content, reference.entries))
    assert snap.digest() == digest
    assert Snapshot(snap.entries, "again").digest() == digest  # recomputed from the mirrored entries too


def test_a_change_and_its_undo_move_the_digest_away_and_back() -> None:
    m = mirror.Mirror()
    m.upsert("k", f"uid=a,{USERS}", {"uid": [b"a"], "emailForward": [b"a@far.example"]}, WANTED)
    m.upsert("m", f"uid=b,{USERS}", {"uid": [b"b"]}, WANTED)
    before = m.snapshot()[0].digest()
    m.upsert("k", f"uid=a,{USERS}", {"uid": [b"a"], "emailForward": [b"a@near.example"]}, WANTED)
    changed = m.snapshot()[0].digest()
    m.delete("m")
    gone = m.snapshot()[0].digest()
    m.upsert("m", f"uid=b,{USERS}", {"uid": [b"b"]}, WANTED)
    m.upsert("k", f"uid=a,{USERS}", {"uid": [b"a"], "emailForward": [b"a@far.example"]}, WANTED)
    assert len({before, changed, gone}) == 3
    assert m.snapshot()[0].digest() == before


def test_the_digest_is_the_same_on_every_host() -> None:
    """A fixed value: nothing host- or process-dependent (hash seeds, dict order) may enter it."""
    snap = Snapshot(
        (
            Entry("uid=ä,dc=x", {"uid": ("ä",), "emailforward": ("a@x", "b@x")}, "u1"),
            Entry("uid=b,dc=x", {"uid": ("b",)}),
        ),
        "ldap://one",
    )
    terms = [
        '["uid=ä,dc=x","u1","emailforward",["a@x","b@x"],"uid",["ä"]]',
        '["uid=b,dc=x",null,"uid",["b"]]',
    ]
    total = sum(int.from_bytes(hashlib.blake2b(t.encode()).digest(), "big") for t in terms) % 2**512
    assert snap.digest() == hashlib.sha256(b"2:%x" % total).hexdigest()
    assert snap.digest() == "fb3a4e5827ae5cd893aaccb824f4b3b4d09646f771e8172da38e6e59c17b6348"


def test_mirrored_entries_hold_no_dict() -> None:
    m = mirror.Mirror()
    m.upsert("k", f"uid=a,{USERS}", {"uid": [b"a"], "cn": [b"not wanted"], "emailForward": [b"x@y", b"z@y"]}, WANTED)
    m.load(Snapshot((Entry(f"uid=b,{USERS}", {"uid": ("b",)}, "m"),), "ldap"), None)
    m.upsert("k", f"uid=a,{USERS}", {"uid": [b"a"], "emailForward": [b"x@y", b"z@y"]}, WANTED)
    for e in m.snapshot()[0].entries:
        assert type(e.attributes) is Attributes
        assert not hasattr(e, "__dict__") and not hasattr(e.attributes, "__dict__")
    a = m.snapshot()[0].entries[0]
    assert a.attributes == {"uid": ("a",), "emailforward": ("x@y", "z@y")}  # only the requested ones


def test_a_snapshot_shares_the_mirrored_entries() -> None:
    m = mirror.Mirror()
    m.upsert("k", f"uid=a,{USERS}", {"uid": [b"a"]}, WANTED)
    first, second = m.snapshot()[0], m.snapshot()[0]
    assert first.entries[0] is second.entries[0]


def test_replace_all_says_whether_the_content_changed() -> None:
    m = mirror.Mirror()
    entries = (Entry(f"uid=a,{USERS}", {"uid": ("a",)}, "k"), Entry(f"uid=b,{USERS}", {"uid": ("b",)}, "m"))
    assert m.replace_all(Snapshot(entries, "ldap")) is True
    assert m.replace_all(Snapshot(entries[::-1], "ldap")) is False  # order is not content
    assert m.replace_all(Snapshot(entries[:1], "ldap")) is True
    assert m.snapshot()[0].digest() == Snapshot(entries[:1], "x").digest()


# -- a staged refresh ----------------------------------------------------------------------
# While a syncrepl refresh streams in, its changes and cookie wait in a stage: what a sync
# takes from the mirror (snapshot, content) is the content before the refresh with its cookie,
# until the refresh completes (commit_refresh: all at once) or is cut off (abandon_refresh:
# nothing of it).


def raw_of(attrs: dict[str, list[str]]) -> dict[str, list[bytes]]:
    """Raw values, without entryUUID: the entries' uuid is then their mirror key."""
    return {k: [v.encode() for v in vs] for k, vs in attrs.items() if k != "entryUUID"}


def two_entries() -> Mirror:
    m = Mirror()
    m.upsert("k", f"uid=frank,{USERS}", {"uid": [b"frank"], "emailForward": [b"f@far.example"]}, WANTED)
    m.upsert("m", f"uid=bob,{USERS}", {"uid": [b"bob"]}, WANTED)
    m.set_cookie(b"cookie-1")
    return m


def test_a_staged_refresh_is_not_seen_until_it_is_committed() -> None:
    m = two_entries()
    before, cookie = m.snapshot()
    m.begin_refresh()
    assert m.refreshing
    # the rename-like pair: a new entry for frank's DN (another entryUUID), the old one deleted
    m.upsert("n", f"uid=frank,{USERS}", {"uid": [b"frank"], "emailForward": [b"f@near.example"]}, WANTED)
    assert m.delete("k") is True and m.delete("k") is False  # as the refresh sees it
    assert m.delete("gone") is False
    m.set_cookie(b"cookie-2")
    during, during_cookie = m.snapshot()
    assert (during.entries, during_cookie) == (before.entries, cookie)
    assert m.content() == before.entry_sum and m.keys() == {"k", "m"} and len(m) == 2 and m.cookie == b"cookie-1"
    assert m.staged() == 2  # how far the refresh got (the agent's first-read progress)

    m.commit_refresh()
    assert not m.refreshing and m.staged() == 0
    after, after_cookie = m.snapshot()
    assert after_cookie == b"cookie-2"
    assert [(e.dn, e.uuid) for e in after.entries] == [(f"uid=bob,{USERS}", "m"), (f"uid=frank,{USERS}", "n")]
    assert after.digest() == Snapshot(after.entries, "x").digest() and m.keys() == {"m", "n"}


def test_an_abandoned_refresh_leaves_nothing_behind() -> None:
    m = two_entries()
    before, cookie = m.snapshot()
    m.begin_refresh()
    m.upsert("n", f"uid=frank,{USERS}", {"uid": [b"frank"]}, WANTED)
    m.upsert("m", f"uid=bob,{USERS}", {"uid": [b"bob"], "emailForward": [b"\xff"]}, WANTED)  # a rejection
    m.delete("k")
    m.set_cookie(b"cookie-2")
    m.abandon_refresh()
    assert not m.refreshing
    after, after_cookie = m.snapshot()
    assert (after.entries, after.rejections, after_cookie) == (before.entries, before.rejections, cookie)
    assert after.delta is not None and dict(after.delta.changed) == {}  # nothing changed since `before`
    m.commit_refresh()  # no refresh open: nothing to commit
    assert m.snapshot()[0].entries == before.entries


def test_rejections_are_staged_with_their_entry() -> None:
    m = two_entries()
    m.begin_refresh()
    m.upsert("m", f"uid=bob,{USERS}", {"uid": [b"bob"], "emailForward": [b"\xff"]}, WANTED)
    assert m.snapshot()[0].rejections == ()
    m.commit_refresh()
    assert [(r.dn, r.attribute) for r in m.snapshot()[0].rejections] == [(f"uid=bob,{USERS}", "emailForward")]
    m.begin_refresh()
    m.upsert("m", f"uid=bob,{USERS}", {"uid": [b"bob"]}, WANTED)  # fixed
    assert len(m.snapshot()[0].rejections) == 1
    m.commit_refresh()
    assert m.snapshot()[0].rejections == ()


def test_forgetting_the_cookie_during_a_refresh_takes_effect_at_once() -> None:
    """The follower forgets the cookie (refused, out of step, an unknown present UUID) and then
    drops the connection: the forgetting must outlive the refresh it happened in."""
    m = two_entries()
    m.begin_refresh()
    m.set_cookie(b"cookie-2")
    m.set_cookie(None)
    assert m.snapshot()[1] is None
    m.abandon_refresh()
    assert m.snapshot()[1] is None and m.cookie is None
    m.begin_refresh()
    m.set_cookie(b"cookie-3")
    m.commit_refresh()
    assert m.snapshot()[1] == b"cookie-3"


def test_a_refresh_without_a_cookie_keeps_the_one_in_force() -> None:
    m = two_entries()
    m.begin_refresh()
    m.upsert("m", f"uid=bob,{USERS}", {"uid": [b"bob"], "emailForward": [b"b@far.example"]}, WANTED)
    m.commit_refresh()
    assert m.snapshot()[1] == b"cookie-1"


def test_a_full_refresh_that_sends_every_entry_again_keeps_one_copy_of_each() -> None:
    """A full refresh sends every entry: the unchanged ones stay the mirrored objects (the
    stage does not double the mirror) and the next snapshot names only what really changed."""
    m = mirrored(100)
    before, _ = m.snapshot()
    m.begin_refresh()
    for i in range(100):
        forward = b"new@far.example" if i == 7 else b"x@far.example"
        m.upsert(f"k{i}", f"uid=u{i},{USERS}", {"uid": [f"u{i}".encode()], "emailForward": [forward]}, WANTED)
    m.delete("k9")
    m.set_cookie(b"cookie-2")
    m.commit_refresh()
    after, cookie = m.snapshot()
    assert cookie == b"cookie-2" and len(after.entries) == 99
    old = {e.uuid: e for e in before.entries}
    assert sum(e is old[e.uuid] for e in after.entries) == 98
    assert after.delta is not None and set(after.delta.changed) == {"k7", "k9"}
    assert after.delta.changed["k9"] is None


def test_a_large_refresh_is_applied_in_bulk_to_the_same_content() -> None:
    """More changes than a quarter of the entries: applied without keeping order and digest
    per change (recomputed once at the next snapshot, which then names no delta)."""
    m, reference = mirrored(200), mirrored(200)
    m.snapshot()
    m.begin_refresh()
    for target in (m, reference):
        for i in range(0, 200, 2):
            target.delete(f"k{i}")
        for i in range(150, 300):  # 50 modified (odd keys), 100 added
            target.upsert(f"k{i}", f"uid=u{i},{USERS}", {"uid": [f"u{i}".encode()], "emailForward": [b"\xff"]}, WANTED)
    assert m.snapshot()[0].digest() == mirrored(200).snapshot()[0].digest()
    m.set_cookie(b"cookie-2")
    m.commit_refresh()
    snap, cookie = m.snapshot()
    expected, _ = reference.snapshot()
    assert cookie == b"cookie-2" and len(snap.entries) == 100 + 150 - 25
    assert snap.entries == expected.entries and sorted(map(str, snap.rejections)) == sorted(
        map(str, expected.rejections)
    )
    assert snap.digest() == Snapshot(snap.entries, "fresh").digest()
    assert snap.delta is None  # too many to list: the consumer compares


def test_a_first_read_staged_into_an_empty_mirror_becomes_the_mirror() -> None:
    m = Mirror()
    m.begin_refresh()
    for i in range(100):
        m.upsert(f"k{i}", f"uid=u{i},{USERS}", {"uid": [f"u{i}".encode()], "emailForward": [b"x@far.example"]}, WANTED)
    m.set_cookie(b"cookie-1")
    assert m.snapshot() == (Snapshot((), "ldap"), None)
    m.commit_refresh()
    assert m.snapshot() == mirrored(100).snapshot() and len(m) == 100
    assert m.delete("k5") and m.delete("k-none") is False  # the mirror's own dict from now on
    assert len(m.snapshot()[0].entries) == 99 and m.keys() == {f"k{i}" for i in range(100)} - {"k5"}


def test_beginning_again_or_loading_drops_an_unfinished_stage() -> None:
    m = two_entries()
    before, _ = m.snapshot()
    m.begin_refresh()
    m.upsert("n", f"uid=new,{USERS}", {"uid": [b"new"]}, WANTED)
    m.begin_refresh()  # a new connection's refresh: the last one's changes are not in it
    m.commit_refresh()
    assert m.snapshot()[0].entries == before.entries
    m.begin_refresh()
    m.upsert("n", f"uid=new,{USERS}", {"uid": [b"new"]}, WANTED)
    m.load(before, b"loaded")
    assert not m.refreshing
    m.commit_refresh()
    assert m.snapshot() == (before, b"loaded")


@settings(max_examples=examples(100), deadline=None)
@given(
    st.lists(st.one_of(upsert, delete), max_size=20),
    st.lists(st.one_of(upsert, delete), max_size=40),
    st.booleans(),
)
def test_a_committed_refresh_is_its_changes_applied_and_an_abandoned_one_is_nothing(
    committed: list[tuple[str, str, str, dict[str, list[str]]]],
    staged: list[tuple[str, str, str, dict[str, list[str]]]],
    commit: bool,
) -> None:
    m, reference = Mirror(), Mirror()
    for op, key, rdn, attrs in committed:
        for target in (m, reference):
            if op == "upsert":
                target.upsert(key, f"uid={rdn},{USERS}", raw_of(attrs), WANTED)
            else:
                target.delete(key)
    m.set_cookie(b"before")
    before, _ = m.snapshot()
    m.begin_refresh()
    for op, key, rdn, attrs in staged:
        if op == "upsert":
            m.upsert(key, f"uid={rdn},{USERS}", raw_of(attrs), WANTED)
            reference.upsert(key, f"uid={rdn},{USERS}", raw_of(attrs), WANTED)
        else:
            assert m.delete(key) == reference.delete(key)  # the stage's view is the refresh's
        assert m.snapshot()[0].entries == before.entries
    m.set_cookie(b"after")
    if commit:
        m.commit_refresh()
        expected, expected_cookie = reference.snapshot()[0], b"after"
    else:
        m.abandon_refresh()
        expected, expected_cookie = before, b"before"
    snap, cookie = m.snapshot()
    assert cookie == expected_cookie
    assert [entry_order(e) for e in snap.entries] == [entry_order(e) for e in expected.entries]
    assert sorted(map(content, snap.entries)) == sorted(map(content, expected.entries))
    assert sorted(map(str, snap.rejections)) == sorted(map(str, expected.rejections))
    assert snap.digest() == Snapshot(snap.entries, "fresh").digest() == expected.digest()
    if snap.delta is not None:  # what the incremental engine is told moved: every key that did
        old = {e.uuid: e for e in before.entries}
        new = {e.uuid: e for e in snap.entries}
        moved = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        assert moved <= set(snap.delta.changed)
        assert all(new.get(k) == e for k, e in snap.delta.changed.items())


def test_a_reader_never_sees_part_of_a_refresh() -> None:
    """Writer: refresh after refresh, each adding 50 entries and the cookie naming the count.
    A snapshot taken at any moment holds a whole number of refreshes and their cookie."""
    m = Mirror()
    m.set_cookie(b"0")
    rounds, done = 40, threading.Event()

    def writer() -> None:
        for r in range(rounds):
            m.begin_refresh()
            for i in range(50):
                m.upsert(f"k{r}.{i}", f"uid=u{r}.{i},{USERS}", {"uid": [f"u{r}.{i}".encode()]}, WANTED)
            m.set_cookie(str((r + 1) * 50).encode())
            if r % 3 == 2:
                m.abandon_refresh()  # a cut connection: the next round sends it again
                m.begin_refresh()
                for i in range(50):
                    m.upsert(f"k{r}.{i}", f"uid=u{r}.{i},{USERS}", {"uid": [f"u{r}.{i}".encode()]}, WANTED)
                m.set_cookie(str((r + 1) * 50).encode())
            m.commit_refresh()
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    checked = 0
    while t.is_alive() or checked == 0:
        snap, cookie = m.snapshot()
        assert cookie is not None and len(snap.entries) == int(cookie), (len(snap.entries), cookie)
        checked += 1
    t.join()
    assert done.is_set(), "the writer failed"
    assert m.snapshot()[1] == str(rounds * 50).encode()


def make_config(tmp_path: Path) -> config_mod.Config:
    doc = {
        "domain": "example.org",
        "source": {"ldap": {"uri": "ldap://127.0.0.1:1", "base_dn": USERS}},
        "state_dir": str(tmp_path / "state"),
        "exporters": [{"kind": "postfix-virtual", "path": str(tmp_path / "virtual"), "map_type": "none"}],
    }
    return config_mod.parse(doc, tmp_path / "ldapsync.yaml")


def test_follow_state_carries_the_running_digest(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    m = mirror.Mirror()
    for i in range(20):
        m.upsert(f"k{i}", f"uid=u{i},{USERS}", {"uid": [f"u{i}".encode()]}, WANTED)
    snap, cookie = m.snapshot()
    mirror.save_follow_state(state, cfg, snap, cookie)
    loaded = mirror.load_follow_state(state, cfg)
    assert loaded is not None
    assert "entry_sum" in vars(loaded[0])  # known without hashing every entry again
    assert loaded[0].entry_sum == EntrySum.of(snap.entries)

    # A saved sum that does not agree with the saved digest is not trusted: hashed again.
    path = mirror.follow_state_path(state)
    doc = json.loads(path.read_text())
    doc["snapshot_sum"] = [doc["snapshot_sum"][0], "1"]
    path.write_text(json.dumps(doc))
    loaded = mirror.load_follow_state(state, cfg)
    assert loaded is not None and "entry_sum" not in vars(loaded[0])
    assert loaded[0].digest() == snap.digest()


# -- follow state naming a generation -------------------------------------------------------


def mirrored(n: int) -> Mirror:
    m = Mirror()
    for i in range(n):
        m.upsert(f"k{i}", f"uid=u{i},{USERS}", {"uid": [f"u{i}".encode()], "emailForward": [b"x@far.example"]}, WANTED)
    m.set_cookie(b"cookie-1")
    return m


def recorded(state: State, snapshot: Snapshot) -> str:
    outputs = {"out": snapshot.digest().encode()}
    return state.record(state.new_generation_id(outputs), snapshot, outputs, {}, 10).id


def test_follow_state_names_the_generation_instead_of_copying_the_directory(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    m = mirrored(50)
    held, _ = m.snapshot()
    mirror.save_follow_state(state, cfg, held, b"cookie-0")  # a held change: not in a generation
    assert (state.root / mirror.FOLLOW_SNAPSHOT).exists()
    snap, cookie = m.snapshot()
    gid = recorded(state, snap)
    mirror.save_follow_state(state, cfg, snap, cookie, generation=gid)
    doc = json.loads(mirror.follow_state_path(state).read_text())
    assert doc["generation"] == gid and "snapshot_sha256" not in doc
    assert not (state.root / mirror.FOLLOW_SNAPSHOT).exists(), "the copy for the held change was kept"
    loaded = mirror.load_follow_state(State(state.root), cfg)
    assert loaded == (snap, b"cookie-1")
    assert "entry_sum" in vars(loaded[0])  # from meta.json: not hashed again
    assert all(type(e.attributes) is Attributes for e in loaded[0].entries)  # what the mirror keeps


def test_a_generation_that_does_not_hold_the_snapshot_is_not_named(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    m = mirrored(5)
    gid = recorded(state, m.snapshot()[0])
    m.upsert("k1", f"uid=u1,{USERS}", {"uid": [b"u1"]}, WANTED)  # changed since: e.g. a held change
    snap, cookie = m.snapshot()
    mirror.save_follow_state(state, cfg, snap, cookie, generation=gid)
    assert "generation" not in json.loads(mirror.follow_state_path(state).read_text())
    assert mirror.load_follow_state(state, cfg) == (snap, cookie)


@pytest.mark.parametrize("damage", ["pruned", "journal-damaged", "other-digest"])
def test_a_follow_state_whose_generation_is_unusable_means_a_full_read(tmp_path: Path, damage: str) -> None:
    cfg = make_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    m = mirrored(40)
    recorded(state, m.snapshot()[0])
    m.upsert("k3", f"uid=u3,{USERS}", {"uid": [b"u3"]}, WANTED)
    snap, cookie = m.snapshot()
    gid = recorded(state, snap)  # a journal line after the base
    mirror.save_follow_state(state, cfg, snap, cookie, generation=gid)
    if damage == "pruned":
        shutil.rmtree(state.generations_dir / gid)
    elif damage == "journal-damaged":
        (journal,) = state.store_dir.glob("*.journal")
        journal.write_bytes(journal.read_bytes().replace(b"u3", b"u4"))
    else:
        path = mirror.follow_state_path(state)
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "snapshot_digest": "0" * 64}))
    assert mirror.load_follow_state(State(state.root), cfg) is None


def test_a_restarted_agent_records_only_the_change_and_shares_the_mirrors_entries(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    m = mirrored(300)
    snap, cookie = m.snapshot()
    gid = recorded(state, snap)
    mirror.save_follow_state(state, cfg, snap, cookie, generation=gid)

    restarted = State(state.root)  # a new process
    loaded = mirror.load_follow_state(restarted, cfg)
    assert loaded is not None
    m2 = Mirror()
    m2.load(*loaded)
    m2.upsert("k7", f"uid=u7,{USERS}", {"uid": [b"u7"], "emailForward": [b"new@far.example"]}, WANTED)
    after, _ = m2.snapshot()
    assert sum(a is b for a, b in zip(after.entries, loaded[0].entries, strict=True)) == 299  # one copy of each
    bases = sorted(restarted.store_dir.glob("*.base"))
    new = restarted.get(recorded(restarted, after))
    assert new is not None
    assert sorted(restarted.store_dir.glob("*.base")) == bases, "a restart wrote the whole directory again"
    assert len(list(restarted.store_dir.glob("*.journal"))) == 1
    assert new.snapshot() == after
    new.verify()
