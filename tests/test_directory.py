"""directory: raw LDAP values become a normalised, deterministic Snapshot; bad bytes are reported."""

from __future__ import annotations

from ldapsync.directory import Entry, Rejection, Snapshot, make_entry, sort_entries


def test_make_entry_decodes_filters_and_lowercases_names() -> None:
    rejections: list[Rejection] = []
    e = make_entry(
        "uid=a,dc=x",
        {
            "UID": [b"a"],
            "emailForward": [b"ok@x.example", b"\xff\xfebad@x.example", "str@x.example"],
            "cn": [b"not wanted"],
            "entryUUID": [b"1234-abcd"],
        },
        ["uid", "EMAILFORWARD"],
        rejections,
    )
    assert e == Entry("uid=a,dc=x", {"uid": ("a",), "emailforward": ("ok@x.example", "str@x.example")}, "1234-abcd")
    assert rejections == [Rejection("uid=a,dc=x", "emailForward", "value is not valid UTF-8")]
    assert e.get("EmailForward") == ("ok@x.example", "str@x.example")
    assert e.get(None) == () and e.get("missing") == ()


def test_attribute_with_only_bad_values_is_absent() -> None:
    rejections: list[Rejection] = []
    e = make_entry("uid=a,dc=x", {"uid": [b"\xc3\x28"]}, None, rejections)
    assert e.attributes == {} and len(rejections) == 1


def test_json_round_trip_and_digest() -> None:
    snap = Snapshot(
        (Entry("uid=ä,dc=x", {"uid": ("ä",), "emailforward": ("a@x", "b@x")}, "u1"),),
        "ldap://one",
        (Rejection("uid=b,dc=x", "uid", "bad"),),
    )
    again = Snapshot.from_json(snap.to_json())
    assert again == snap
    # The digest ignores where the data came from: two servers with the same data agree.
    assert Snapshot(snap.entries, "ldap://two").digest() == snap.digest()
    other = Snapshot((Entry("uid=ä,dc=x", {"uid": ("ä",)}, "u1"),), "ldap://one")
    assert other.digest() != snap.digest()


def test_sort_entries_is_total_and_case_insensitive_first() -> None:
    a, b, c, d = (Entry(dn, {}) for dn in ("uid=b,dc=x", "uid=A,dc=x", "uid=a,dc=x", "uid=C,dc=x"))
    assert [e.dn for e in sort_entries([a, b, c, d])] == ["uid=A,dc=x", "uid=a,dc=x", "uid=b,dc=x", "uid=C,dc=x"]
    assert sort_entries([c, d, a, b]) == sort_entries([a, b, c, d])
