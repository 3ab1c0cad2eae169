"""directory: raw LDAP values become a normalised, deterministic Snapshot; bad bytes are reported."""

from __future__ import annotations

import pytest

from ldapsync import validate
from ldapsync.directory import (
    REFUSED_PREFIX,
    Attributes,
    Entry,
    Rejection,
    Snapshot,
    make_entry,
    sort_entries,
    without_secrets,
)


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


def test_without_secrets_replaces_values_with_a_stable_marker() -> None:
    plain = Entry("uid=p,dc=x", {"uid": ("p",), "mailpassword": ("hunter2",)}, "u-p")
    good = Entry("uid=q,dc=x", {"uid": ("q",), "mailpassword": ("{SSHA}abc",)}, "u-q")
    snap = Snapshot((plain, good), "test")
    assert without_secrets(snap, "mailPassword", set()) is snap
    once = without_secrets(snap, "mailPassword", {"uid=p,dc=x"})
    marker = once.entries[0].get("mailPassword")[0]
    assert marker.startswith(REFUSED_PREFIX) and b"hunter2" not in once.to_json()
    assert once.entries[1] is good and once.entries[0].get("uid") == ("p",) and once.entries[0].uuid == "u-p"
    assert without_secrets(once, "mailpassword", {"uid=p,dc=x"}) is once, "redacting twice changes nothing"
    assert Snapshot.from_json(once.to_json()).digest() == once.digest()
    with pytest.raises(validate.Invalid):
        validate.password(marker)


def test_without_secrets_finds_every_refused_entry_in_any_order() -> None:
    """Found by bisection in a snapshot in DN order, by a scan otherwise; DNs differing in
    case only, or shared by a rename under way, are all redacted."""
    entries = [Entry(f"uid=u{i:03d},dc=x", {"mailpassword": (f"plain{i}",)}, f"id{i}") for i in range(300)]
    entries += [
        Entry("uid=U007,dc=x", {"mailpassword": ("upper",)}, "id-upper"),
        Entry("uid=u042,dc=x", {"mailpassword": ("renamed",)}, "id-renamed"),
    ]
    refused = {"uid=u007,dc=x", "uid=U007,dc=x", "uid=u042,dc=x", "uid=u299,dc=x"}
    for ordered in (sort_entries(entries), tuple(reversed(sort_entries(entries)))):
        out = without_secrets(Snapshot(ordered, "test"), "mailPassword", refused)
        redacted = {e.uuid for e in out.entries if e.get("mailPassword")[0].startswith(REFUSED_PREFIX)}
        assert redacted == {"id7", "id-upper", "id42", "id-renamed", "id299"}


def test_compact_attributes_read_like_the_dict_they_replace() -> None:
    plain = {"uid": ("a",), "emailforward": ("x@y", "z@y"), "cn": ()}
    compact = Attributes.of(plain)
    assert compact == plain and plain == compact and dict(compact.items()) == plain
    assert list(compact) == ["cn", "emailforward", "uid"]  # sorted names
    assert compact["emailforward"] == ("x@y", "z@y") and compact.get("uid") == ("a",)
    assert compact.get("missing") == () and "missing" not in compact and "uid" in compact
    with pytest.raises(KeyError):
        compact["missing"]
    assert Attributes.of(compact) is compact
    assert Attributes.of({"uid": ("b",), "cn": (), "emailforward": ("q@r",)})._shape is not compact._shape
    assert Attributes.of({"uid": ("b",), "cn": (), "emailforward": ("q@r", "s@t")})._shape is compact._shape  # shared
    e = Entry("uid=a,dc=x", compact, "u")
    assert e == Entry("uid=a,dc=x", plain, "u") and e.get("EmailForward") == ("x@y", "z@y")
    snap = Snapshot((e,), "x")
    assert Snapshot.from_json(snap.to_json()) == snap
    assert snap.digest() == Snapshot((Entry("uid=a,dc=x", plain, "u"),), "y").digest()
