"""The store's pure part: which entry groups changed, the journal line, the rebuilt snapshot.

The reference is the snapshot itself: a base of the old snapshot plus the journal lines of
each step must give back exactly the new one (entries, their order, source, rejections),
whatever the entries share, and however DNs and entryUUIDs collide.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from ldapsync.directory import Attributes, Entry, Rejection, Snapshot, sort_entries
from ldapsync.state import store

USERS = "ou=users,dc=example,dc=org"

# DNs equal but for case, no entryUUID or an empty one: entries that sort as one group
names = st.sampled_from(["a", "A", "b", "c", "ü"])
uuids = st.sampled_from([None, "", "u1", "u2"])
values = st.lists(st.sampled_from(["x", "y", "é", "new\nline", '"q"']), max_size=3)
entries = st.builds(
    lambda n, u, v, compact: Entry(
        f"uid={n},{USERS}", Attributes.of({"uid": tuple(v)}) if compact else ({"uid": tuple(v)} if v else {}), u
    ),
    names,
    uuids,
    values,
    st.booleans(),
)
snapshots = st.builds(
    lambda es, source, bad: Snapshot(sort_entries(es), source, (Rejection(f"uid=a,{USERS}", "uid", "bad"),) * bad),
    st.lists(entries, max_size=10),
    st.sampled_from(["ldap:ldap://a", "ldif:/x"]),
    st.integers(0, 2),
)


def base_of(snapshot: Snapshot) -> dict[str, object]:
    doc: dict[str, object] = json.loads(snapshot.to_json())
    return doc


def shared(old: Snapshot, new: Snapshot) -> Snapshot:
    """`new` with every entry equal to one of `old`'s replaced by that object (as the mirror shares them)."""
    pool = {repr(e): e for e in old.entries}
    return Snapshot(tuple(pool.get(repr(e), e) for e in new.entries), new.source, new.rejections)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(snapshots, min_size=1, max_size=5), st.booleans(), st.booleans())
def test_a_base_and_its_journal_lines_rebuild_every_version_exactly(
    versions: list[Snapshot], share: bool, compact: bool
) -> None:
    base = base_of(versions[0])
    lines = []
    for old, new in itertools.pairwise(versions):
        new = shared(old, new) if share else new
        changes = store.diff(old.entries, new.entries)
        for c in changes:
            assert c.before != c.after
        lines.append(store.journal_line("g", new, changes))
        rebuilt = store.rebuild(base, lines, compact=compact)
        assert rebuilt == new
        assert rebuilt.digest() == new.digest()
        assert all(b"\n" not in line[:-1] for line in lines)
        assert store.rebuild(base, store.lines(b"".join(lines))) == new
    assert store.rebuild(base, []) == versions[0]


def test_equal_entries_are_no_change_whether_or_not_they_are_the_same_object() -> None:
    old = [Entry(f"uid=u{i},{USERS}", {"uid": (f"u{i}",)}, f"k{i}") for i in range(1000)]
    copies = [Entry(e.dn, Attributes.of(e.attributes), e.uuid) for e in old]
    assert store.diff(old, old) == []
    assert store.diff(old, copies) == []


def test_one_change_among_many_is_one_group() -> None:
    old = sort_entries(Entry(f"uid=u{i:05d},{USERS}", {"uid": (f"u{i}",)}, f"k{i}") for i in range(20000))
    new = list(old)
    changed = Entry(old[12345].dn, {"uid": ("renamed",)}, old[12345].uuid)
    new[12345] = changed
    del new[500]
    added = Entry(f"uid=zz,{USERS}", {}, "kz")
    new.append(added)
    changes = store.diff(old, new)
    assert [(c.dn, c.before, c.after) for c in changes] == [
        (old[500].dn, (old[500],), ()),
        (old[12345].dn, (old[12345],), (changed,)),
        (added.dn, (), (added,)),
    ]


def test_a_journal_prefix_must_end_a_line() -> None:
    assert list(store.lines(b'{"a":1}\n{"b":2}\n')) == [b'{"a":1}', b'{"b":2}']
    assert list(store.lines(b"")) == []
    with pytest.raises(ValueError, match="line boundary"):
        list(store.lines(b'{"a":1}\n{"b"'))
