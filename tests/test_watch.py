"""The follower: its in-memory Mirror, the persisted follow state, and the Follower thread
against real slapd (outages, a frozen server, a URI that is not LDAP).

A restart resumes by cookie only if the saved snapshot is exactly the directory state that
cookie describes; anything doubtful must fall back to a full read (None), never to a
mirror that silently lacks entries.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentutil import Ds389
from ldapproxy import TamperingProxy
from notldap import HttpServer
from slapd import BIND_SECRET, SERVICE_DN, Slapd, generate_users_ldif
from structlog.testing import capture_logs

from ldapsync import ber, ldapsource, syncrepl, watch
from ldapsync import config as config_mod
from ldapsync.config import Config, LdapSource
from ldapsync.directory import Entry, Snapshot
from ldapsync.state import State
from ldapsync.state.lmdbstore import Store
from ldapsync.stored import StoredMirror

WANTED = ["uid", "emailForward", "mailPassword", "entryUUID"]
USERS = "ou=users,dc=example,dc=org"


def raw(uid: str, forward: str | None = None, **extra: list[bytes]) -> dict[str, list[bytes]]:
    attrs = {"uid": [uid.encode()], **extra}
    if forward:
        attrs["emailForward"] = [forward.encode()]
    return attrs


def dn(uid: str) -> str:
    return f"uid={uid},{USERS}"


def make_config(tmp_path: Path, *, passwords: bool = False, **ldap: Any) -> Config:
    """`passwords`: a passwd-file too, so mail password hashes are read."""
    exporters: list[dict[str, Any]] = [
        {"kind": "postfix-virtual", "path": str(tmp_path / "virtual"), "map_type": "none"}
    ]
    if passwords:
        exporters.append({"kind": "dovecot-passwd", "path": str(tmp_path / "passwd")})
    doc = {
        "domain": "example.org",
        "source": {"ldap": {"uri": "ldap://127.0.0.1:1", "base_dn": USERS, **ldap}},
        "state_dir": str(tmp_path / "state"),
        "exporters": exporters,
    }
    return config_mod.parse(doc, tmp_path / "ldapsync.yaml")


# -- Mirror ------------------------------------------------------------------------------


def test_upsert_delete_and_snapshot() -> None:
    m = watch.Mirror()
    m.upsert("u-bob", dn("bob"), raw("bob", "bob@far.example"), WANTED)
    m.upsert("u-alice", dn("alice"), raw("alice"), WANTED)
    snap, cookie = m.snapshot()
    assert cookie is None
    assert [e.dn for e in snap.entries] == [dn("alice"), dn("bob")]  # sorted, not insertion order
    assert [e.uuid for e in snap.entries] == ["u-alice", "u-bob"]
    assert snap.entries[1].get("emailforward") == ("bob@far.example",)

    assert m.delete("u-alice") is True
    assert m.delete("u-alice") is False  # already gone: not a change
    assert m.delete_dn(dn("BOB").upper()) is True  # DNs compare case-insensitively
    assert m.snapshot()[0].entries == ()
    assert len(m) == 0


def test_upsert_same_uuid_under_new_dn_is_a_rename_not_a_copy() -> None:
    m = watch.Mirror()
    m.upsert("u-1", dn("newbie"), raw("newbie", "x@far.example"), WANTED)
    m.upsert("u-1", dn("renamed"), raw("renamed", "x@far.example"), WANTED)
    assert [(e.dn, e.get("uid")) for e in m.snapshot()[0].entries] == [(dn("renamed"), ("renamed",))]


def test_unwanted_attributes_are_not_kept_and_entryuuid_becomes_the_uuid() -> None:
    m = watch.Mirror()
    m.upsert("u-9", dn("bob"), raw("bob", userPassword=[b"{SSHA}secret"], entryUUID=[b"u-9"]), WANTED)
    (entry,) = m.snapshot()[0].entries
    assert set(entry.attributes) == {"uid"}
    assert entry.uuid == "u-9"


def test_rejections_follow_their_entry() -> None:
    m = watch.Mirror()
    m.upsert("u-bob", dn("bob"), raw("bob", emailForward=[b"\xff\xfe"]), WANTED)
    rejections = m.snapshot()[0].rejections
    assert [(r.dn, r.attribute) for r in rejections] == [(dn("bob"), "emailForward")]
    m.upsert("u-bob", dn("bob"), raw("bob", "bob@fixed.example"), WANTED)
    assert m.snapshot()[0].rejections == ()  # the fixed value replaces the old complaint
    m.upsert("u-bob", dn("bob"), raw("bob", emailForward=[b"\xff"]), WANTED)
    m.delete("u-bob")
    assert m.snapshot()[0].rejections == ()


def test_cookie_goes_with_the_state_it_describes() -> None:
    m = watch.Mirror()
    m.upsert("u-bob", dn("bob"), raw("bob"), WANTED)
    m.set_cookie(b"rid=000,csn=1")
    snap, cookie = m.snapshot()
    m.upsert("u-carol", dn("carol"), raw("carol"), WANTED)  # later changes do not leak into a taken snapshot
    assert cookie == b"rid=000,csn=1"
    assert [e.dn for e in snap.entries] == [dn("bob")]


def test_snapshot_never_pairs_a_cookie_with_entries_it_does_not_cover() -> None:
    """Writer: entry i, then cookie i. A snapshot with cookie i must hold entries 0..i."""
    m = watch.Mirror()
    n = 2000
    done = threading.Event()

    def writer() -> None:
        for i in range(n):
            m.upsert(f"u-{i}", dn(f"user{i:05d}"), raw(f"user{i:05d}"), WANTED)
            m.set_cookie(str(i).encode())
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    checked = 0
    while not done.is_set() or checked == 0:
        snap, cookie = m.snapshot()
        if cookie is not None:
            assert len(snap.entries) >= int(cookie) + 1
            checked += 1
    t.join()
    assert m.snapshot()[1] == str(n - 1).encode()


def test_replace_all_reports_content_changes_only() -> None:
    m = watch.Mirror()
    m.upsert("u-bob", dn("bob"), raw("bob", "bob@far.example"), WANTED)
    m.set_cookie(b"old")
    same = Snapshot(
        (Entry(dn("bob"), {"uid": ("bob",), "emailforward": ("bob@far.example",)}, "u-bob"),),
        "ldap:ldap://other-server",
    )
    assert m.replace_all(same) is False  # same content from another server: nothing to rebuild
    assert m.snapshot()[1] is None  # a full read has no cookie
    changed = Snapshot((Entry(dn("bob"), {"uid": ("bob",), "emailforward": ("bob@near.example",)}, "u-bob"),), "ldap:x")
    assert m.replace_all(changed) is True
    assert m.snapshot()[0].entries == changed.entries
    assert m.replace_all(Snapshot((), "ldap:x")) is True  # everything deleted is a change too
    assert len(m) == 0


def test_load_then_snapshot_round_trip() -> None:
    entries = (
        Entry(dn("alice"), {"uid": ("alice",)}, "u-alice"),
        Entry(dn("bob"), {"uid": ("bob",)}, None),  # no entryUUID (LDIF, or a server without it): keyed by DN
    )
    m = watch.Mirror()
    m.load(Snapshot(entries, "ldap:ldap://a"), b"cookie")
    snap, cookie = m.snapshot()
    assert snap.entries == entries and snap.source == "ldap:ldap://a" and cookie == b"cookie"
    assert m.keys() == {"u-alice", dn("bob")}


# -- follow state --------------------------------------------------------------------------


def saved(tmp_path: Path, cookie: bytes | None = b"rid=000,csn=20261121\xff") -> tuple[Config, State, Snapshot]:
    cfg = make_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    m = watch.Mirror()
    m.upsert("u-bob", dn("bob"), raw("bob", "bob@far.example"), cfg.routing.attributes.ldap_attributes())
    m.upsert("u-dave", dn("dave"), raw("dave", emailForward=[b"\xff"]), cfg.routing.attributes.ldap_attributes())
    if cookie is not None:
        m.set_cookie(cookie)
    snap, c = m.snapshot()
    watch.save_follow_state(state, cfg, snap, c)
    return cfg, state, snap


@pytest.mark.parametrize("cookie", [b"rid=000,csn=20261121\xff", None], ids=["binary-cookie", "no-cookie"])
def test_follow_state_round_trip(tmp_path: Path, cookie: bytes | None) -> None:
    cfg, state, snap = saved(tmp_path, cookie)
    loaded = watch.load_follow_state(state, cfg)
    assert loaded is not None
    assert loaded == (snap, cookie)
    assert loaded[0].rejections  # the rejected value is still reported after a restart


def test_follow_state_for_another_search_is_not_used(tmp_path: Path) -> None:
    _, state, _ = saved(tmp_path)
    assert watch.load_follow_state(state, make_config(tmp_path, filter="(objectClass=inetOrgPerson)")) is None
    assert watch.load_follow_state(state, make_config(tmp_path, base_dn="dc=example,dc=org")) is None
    assert watch.load_follow_state(state, make_config(tmp_path, scope="one")) is None


def test_follow_state_survives_changes_outside_the_search(tmp_path: Path) -> None:
    """Another server URI (failover, same directory) or poll interval keeps the cookie valid."""
    _, state, snap = saved(tmp_path)
    other = make_config(tmp_path, uri=["ldap://replica.example:389"], poll_interval=5)
    assert watch.load_follow_state(state, other) == (snap, b"rid=000,csn=20261121\xff")


@pytest.mark.parametrize(
    "damage",
    ["flip-byte", "truncate", "delete-snapshot", "garbage-follow-json", "no-hash", "bad-base64-cookie"],
)
def test_damaged_follow_state_means_full_read(tmp_path: Path, damage: str) -> None:
    cfg, state, _ = saved(tmp_path)
    snap_path = state.root / watch.FOLLOW_SNAPSHOT
    follow_path = watch.follow_state_path(state)
    if damage == "flip-byte":
        data = bytearray(snap_path.read_bytes())
        data[len(data) // 2] ^= 0x01
        snap_path.write_bytes(bytes(data))
    elif damage == "truncate":
        snap_path.write_bytes(snap_path.read_bytes()[:-10])
    elif damage == "delete-snapshot":
        snap_path.unlink()
    elif damage == "garbage-follow-json":
        follow_path.write_bytes(b"{not json")
    else:
        doc = json.loads(follow_path.read_bytes())
        if damage == "no-hash":
            del doc["snapshot_sha256"]
        else:
            doc["cookie"] = "%%%not base64"
        follow_path.write_text(json.dumps(doc))
    assert watch.load_follow_state(state, cfg) is None


def test_no_follow_state_yet(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    state = State(cfg.state_dir)
    state.ensure()
    assert watch.load_follow_state(state, cfg) is None


def test_saved_cookie_is_base64_in_a_readable_file(tmp_path: Path) -> None:
    _, state, _ = saved(tmp_path)
    doc = json.loads(watch.follow_state_path(state).read_bytes())
    assert base64.b64decode(doc["cookie"]) == b"rid=000,csn=20261121\xff"
    assert (state.root / watch.FOLLOW_SNAPSHOT).stat().st_mode & 0o077 == 0  # holds password hashes


def test_unchanged_directory_only_moves_the_cookie(tmp_path: Path) -> None:
    cfg, state, snap = saved(tmp_path, b"cookie-1")
    before = (state.root / watch.FOLLOW_SNAPSHOT).stat()
    watch.save_follow_state(state, cfg, Snapshot(snap.entries, snap.source, snap.rejections), b"cookie-2")
    after = (state.root / watch.FOLLOW_SNAPSHOT).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert watch.load_follow_state(state, cfg) == (snap, b"cookie-2")


# -- reconnect backoff -------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_starts_over_after_a_reset() -> None:
    backoff = watch.Backoff(10.0, rng=lambda: 0.0)
    assert [backoff.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_backoff_jitter_stays_under_the_cap() -> None:
    backoff = watch.Backoff(3.0, rng=lambda: 1.0)
    assert [backoff.next() for _ in range(4)] == [1.5, 2.0, 3.0, 3.0]


# -- the follower against real servers ---------------------------------------------------


class Notifications:
    """The follower's notify callback: what it said, in order, and a way to wait for it."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, event: watch.FollowerEvent) -> None:
        with self._cond:
            self.seen.append(event.kind)
            self._cond.notify_all()

    def wait(self, what: str, *, after: int = 0, timeout: float) -> int:
        """Index of the first `what` at or after index `after`; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if what in self.seen[after:]:
                    return self.seen.index(what, after)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what!r} within {timeout} s (seen: {self.seen[after:]})")
                self._cond.wait(left)


FollowerFactory = Callable[..., tuple[watch.Follower, Notifications]]


@pytest.fixture
def followers(tmp_path: Path) -> Iterator[FollowerFactory]:
    started: list[watch.Follower] = []

    def start(
        uris: list[str],
        server: Slapd,
        passwords: bool = False,
        mirror: watch.Mirror | None = None,
        notes: Notifications | None = None,
        **ldap: Any,
    ) -> tuple[watch.Follower, Notifications]:
        ldap.setdefault("timeout", 2)
        cfg = make_config(
            tmp_path,
            passwords=passwords,
            uri=uris,
            bind_dn=server.service_dn,
            bind_password_file=str(server.service_password_file),
            **ldap,
        )
        notes = notes if notes is not None else Notifications()
        follower = watch.Follower(cfg, mirror if mirror is not None else watch.Mirror(), notes)
        started.append(follower)
        follower.start()
        return follower, notes

    yield start
    for follower in started:
        follower.stop()
        follower.join(timeout=15)


def following(follower: watch.Follower, uri: str, timeout: float) -> None:
    """Wait until `follower` is connected to `uri` (its status is what `ldapsync status` shows)."""
    deadline = time.monotonic() + timeout
    while not (follower.status.connected and follower.status.server == uri):
        if time.monotonic() > deadline:
            raise AssertionError(f"not following {uri} within {timeout} s: {follower.status}")
        time.sleep(0.05)


def disconnected(follower: watch.Follower, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while follower.status.connected:
        if time.monotonic() > deadline:
            raise AssertionError(f"still connected after {timeout} s: {follower.status}")
        time.sleep(0.05)


@pytest.mark.slapd
def test_short_restart_after_several_outages_is_followed_again_quickly(
    slapd: Slapd, followers: FollowerFactory
) -> None:
    """A connection that worked starts the backoff over: outage number six waits no longer than the first."""
    follower, notes = followers([slapd.uri], slapd, watch="syncrepl")
    notes.wait("synced", timeout=20)
    for outage in range(6):
        slapd.stop()
        disconnected(follower, timeout=20)
        slapd.start()
        started = time.monotonic()
        following(follower, slapd.uri, timeout=60)
        took = time.monotonic() - started
        # first retry after 0.5-1.5 s; without the reset the sixth waited 16 s and more
        assert took < 10, f"outage {outage + 1}: followed again only after {took:.1f} s"
    assert notes.seen.count("down") == 6 and notes.seen.count("up") == 7, notes.seen


@pytest.mark.slapd
def test_frozen_server_is_noticed_and_the_next_uri_followed(
    slapd_factory: Callable[..., Slapd], followers: FollowerFactory
) -> None:
    """A stopped slapd keeps its TCP connections open: only a read that gets no answer shows it."""
    first, second = slapd_factory(), slapd_factory()
    follower, notes = followers([first.uri, second.uri], first, watch="syncrepl", timeout=2)
    notes.wait("synced", timeout=20)
    following(follower, first.uri, timeout=20)
    pid = first.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with capture_logs() as logs:
            stopped = time.monotonic()
            disconnected(follower, timeout=30)
            noticed = time.monotonic() - stopped
            following(follower, second.uri, timeout=30)
        assert noticed < 15, f"frozen server noticed only after {noticed:.1f} s (timeout 2 s)"
        up = notes.seen.index("up")
        assert notes.seen.index("down", up) < notes.seen.index("up", up + 1), notes.seen
        # the server just lost is tried last: the second is used without waiting for the first again
        assert not [e for e in logs if e.get("uri") == first.uri], logs
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.slapd
def test_first_uri_answering_http_is_skipped(slapd: Slapd, followers: FollowerFactory) -> None:
    web = HttpServer()
    try:
        with capture_logs() as logs:
            follower, notes = followers([web.uri, slapd.uri], slapd)
            following(follower, slapd.uri, timeout=20)
            notes.wait("synced", timeout=20)
        assert follower.status.method == "syncrepl"
        skipped = [e for e in logs if e.get("uri") == web.uri and e["log_level"] == "warning"]
        assert skipped and "not LDAP" in skipped[0]["error"], logs
        assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    finally:
        web.close()


@pytest.mark.slapd
def test_check_connection_closed_by_the_server_idle_timeout_is_replaced_quietly(
    slapd: Slapd, followers: FollowerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slapd closes idle connections but not one with a persistent search: the stream stays."""
    replaced: list[str] = []  # check connections opened to replace one the server closed
    real_connect = watch.ldapsource.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        connected = real_connect(*args, **kwargs)
        if not kwargs.get("stream") and not kwargs.get("root_dse"):
            replaced.append(connected.uri)
        return connected

    monkeypatch.setattr(watch.ldapsource, "connect", connect)
    slapd.modify_config("dn: cn=config\nchangetype: modify\nreplace: olcIdleTimeout\nolcIdleTimeout: 1\n")
    with capture_logs() as logs:
        follower, notes = followers([slapd.uri], slapd, watch="syncrepl", timeout=4)
        following(follower, slapd.uri, timeout=20)
        # idle timeout 1 s, liveness read every 2 s: the check connection is closed each time; twice
        # shows a replacement is replaced in turn
        deadline = time.monotonic() + 30
        while len(replaced) < 2:
            assert time.monotonic() < deadline, f"check connection replaced {len(replaced)} times in 30 s"
            time.sleep(0.05)
        assert set(replaced) == {slapd.uri}
        slapd.modify(
            "dn: uid=bob,ou=users,dc=example,dc=org\nchangetype: modify\n"
            "replace: emailForward\nemailForward: bob@after-idle.example\n"
        )
        notes.wait("changed", timeout=10)
    assert notes.seen.count("up") == 1 and "down" not in notes.seen, notes.seen
    assert not [e for e in logs if e["log_level"] in ("warning", "error")], logs


# -- a server that lies in its syncrepl answers ----------------------------------------------
# The third entry of the first sync stream is replaced (the proxy passes everything else); the
# follower must name the server and what was wrong, keep nothing of the lie, and end up, after
# reconnecting to the (then honest) server, with exactly what the directory holds.


def _parts(m: bytes) -> tuple[int, bytes, bytes]:
    """(message id, searchResEntry content, controls content) of a sync entry message."""
    msg = ber.frame(m, 0, len(m))
    assert msg.controls is not None
    return msg.message_id, m[msg.start : msg.end], m[msg.controls[0] : msg.controls[1]]


def _message(mid: int, op: int, content: bytes, controls: bytes | None = None) -> bytes:
    tail = b"" if controls is None else ber.tlv(0xA0, controls)
    return ber.tlv(0x30, ber.integer(0x02, mid) + ber.tlv(op, content) + tail)


def _result(code: int, text: bytes = b"") -> bytes:
    return ber.integer(0x0A, code) + ber.tlv(0x04, b"") + ber.tlv(0x04, text)


def _dn_too_long(m: bytes) -> tuple[bytes, bool]:
    mid, content, controls = _parts(m)
    return _message(mid, ber.SEARCH_RES_ENTRY, content[:1] + b"\x82\xff\xff" + content[2:], controls), False


def _other_id(m: bytes) -> tuple[bytes, bool]:
    mid, content, controls = _parts(m)
    return _message(mid + 7, ber.SEARCH_RES_ENTRY, content, controls), False


def _notice_of_disconnection(m: bytes) -> tuple[bytes, bool]:
    notice = _result(52, b"going away") + ber.tlv(0x8A, b"1.3.6.1.4.1.1466.20036")
    return _message(0, ber.EXTENDED_RESP, notice), False


def _bind_response(m: bytes) -> tuple[bytes, bool]:
    return _message(_parts(m)[0], 0x61, _result(0)), False


def _bad_sync_state(m: bytes) -> tuple[bytes, bool]:
    mid, content, _ = _parts(m)
    control = ber.control(syncrepl.SYNC_STATE_OID, False, bytes.fromhex("3003 0a0109"))  # state 9
    return _message(mid, ber.SEARCH_RES_ENTRY, content, control), False


def _no_sync_state(m: bytes) -> tuple[bytes, bool]:
    mid, content, _ = _parts(m)
    return _message(mid, ber.SEARCH_RES_ENTRY, content), False


def _huge_length(m: bytes) -> tuple[bytes, bool]:
    return b"\x30\x84\x7f\xff\xff\xff" + b"\x00" * 64, False


def _http(m: bytes) -> tuple[bytes, bool]:
    return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", False


def _cut_off(m: bytes) -> tuple[bytes, bool]:
    return m[: len(m) // 2], True


def _refused_mid_refresh(m: bytes) -> tuple[bytes, bool]:
    return _message(_parts(m)[0], ber.SEARCH_RES_DONE, _result(53)), False


@pytest.mark.slapd
@pytest.mark.parametrize(
    ("lie", "reason"),
    [
        (_dn_too_long, "malformed LDAP message: objectName longer than the entry"),
        (_other_id, r"unexpected LDAP message id \d+ \(expected \d+\)"),
        (_notice_of_disconnection, "server disconnected: going away"),
        (_bind_response, "unexpected LDAP operation 0x61 in a search response"),
        (_bad_sync_state, r"sync protocol error: entry 'uid=\w+,ou=users,dc=example,dc=org': .*out of range"),
        (_no_sync_state, "has no Sync State control"),
        (_huge_length, "is not believed"),
        (_http, "LDAPMessage expected, got tag 0x48"),
        (_cut_off, "connection closed"),
        (_refused_mid_refresh, r"sync search ended: unwillingToPerform \(53\)"),
    ],
)
def test_a_lying_server_is_named_and_leaves_no_trace_in_the_mirror(
    slapd: Slapd, followers: FollowerFactory, lie: Callable[[bytes], tuple[bytes, bool]], reason: str
) -> None:
    proxy = TamperingProxy("127.0.0.1", slapd.port, lambda n, m: lie(m) if n == 2 else (m, False))
    try:
        with capture_logs() as logs:
            follower, notes = followers([proxy.uri], slapd, watch="syncrepl")
            notes.wait("synced", timeout=30)
        failures = [e for e in logs if e["event"] == "directory connection failed; retrying"]
        assert len(failures) == 1, logs
        assert failures[0]["error"].startswith(f"{proxy.uri}: "), failures
        assert re.search(reason, failures[0]["error"]), failures
        assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
        assert notes.seen.index("error") < notes.seen.index("synced"), notes.seen
        mirrored, cookie = follower.mirror.snapshot()
        source = follower.config.source
        assert isinstance(source, LdapSource)
        truth = ldapsource.read(dataclasses.replace(source, uris=(slapd.uri,)), follower.config.routing.attributes)
        assert mirrored.entries == truth.entries and cookie
    finally:
        proxy.close()


@pytest.mark.slapd
def test_a_present_list_naming_an_entry_the_mirror_lacks_means_a_full_refresh(
    slapd: Slapd, followers: FollowerFactory
) -> None:
    """Resumed with a cookie, slapd lists the unchanged entries as present; one flipped bit in
    one UUID of that list must not make the follower drop the entry it meant, for good."""
    first, notes = followers([slapd.uri], slapd, watch="syncrepl")
    notes.wait("synced", timeout=30)
    snapshot, cookie = first.mirror.snapshot()
    first.stop()
    first.join(timeout=15)
    assert cookie
    victim = next(e for e in snapshot.entries if e.dn == dn("alice"))
    assert victim.uuid
    raw_uuid = syncrepl.uuid_from_str(victim.uuid)
    flipped = bytes([raw_uuid[0] ^ 0x01]) + raw_uuid[1:]
    # one change, so that the resumed refresh has a present phase
    slapd.modify(f"dn: {dn('bob')}\nchangetype: modify\nreplace: emailForward\nemailForward: b@elsewhere.example\n")
    lied: list[int] = []

    def lie(n: int, m: bytes) -> tuple[bytes, bool]:
        if raw_uuid in m and not lied:
            lied.append(n)
            return m.replace(raw_uuid, flipped), False
        return m, False

    proxy = TamperingProxy("127.0.0.1", slapd.port, lie, sync_info=True)
    try:
        mirror = watch.Mirror()
        mirror.load(snapshot, cookie)
        with capture_logs() as logs:
            follower, notes = followers([proxy.uri], slapd, watch="syncrepl", mirror=mirror)
            notes.wait("synced", timeout=30)
        assert lied, "the present list never named the victim"
        warnings = [e for e in logs if "present list names an entry" in e["event"]]
        assert [(w["server"], w["uuid"]) for w in warnings] == [(proxy.uri, syncrepl.uuid_to_str(flipped))], logs
        assert warnings[0]["log_level"] == "warning"
        refreshes = [e for e in logs if e["event"] == "following the directory"]
        assert [r["resume"] for r in refreshes] == [True, False], "the second refresh is a full one"
        mirrored, cookie = follower.mirror.snapshot()
        source = follower.config.source
        assert isinstance(source, LdapSource)
        truth = ldapsource.read(dataclasses.replace(source, uris=(slapd.uri,)), follower.config.routing.attributes)
        assert mirrored.entries == truth.entries and cookie
        assert victim.dn in {e.dn for e in mirrored.entries}
    finally:
        proxy.close()


class Snapshots:
    """Every (digest, cookie) a sync could have installed from `mirror` while it runs: a thread
    takes snapshots as fast as it can, as the agent may at any moment (a new day, a retry,
    an operator's resync)."""

    def __init__(self, mirror: watch.Mirror) -> None:
        self.mirror = mirror
        self.seen: set[tuple[str, bytes | None]] = set()
        self.taken = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot, cookie = self.mirror.snapshot()
            self.seen.add((snapshot.digest(), cookie))
            self.taken += 1
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.mark.slapd
@pytest.mark.parametrize("kind", ["mirror", "stored"], ids=["in-memory", "on-the-store"])
@pytest.mark.parametrize("resume", [True, False], ids=["resumed-with-cookie", "full-refresh"])
def test_a_refresh_cut_in_the_middle_leaves_the_mirror_as_it_was(
    slapd: Slapd, followers: FollowerFactory, resume: bool, kind: str, tmp_path: Path
) -> None:
    """While disconnected, frank is deleted and added again (same DN, same address, another
    entryUUID), bob is deleted and forty users are added. The refresh that brings this is cut
    right after the new frank: half applied, the mirror would hold two franks claiming one
    address (a sync would refuse it) and bob still there. Whatever a sync takes from the
    mirror, at any moment, is the old content with the old cookie or the complete new content
    with the cookie that goes with it; never a mix. Resumed with a cookie, the refresh has a
    present phase (deletions at its end); without one (after e-syncRefreshRequired, an
    in-step alarm or an unknown present UUID), every entry comes again and the ones not sent
    are deleted at the end. The same for the in-memory mirror and the agent's stored one."""
    first, notes = followers([slapd.uri], slapd, watch="syncrepl")
    notes.wait("synced", timeout=30)
    old, old_cookie = first.mirror.snapshot()
    first.stop()
    first.join(timeout=15)
    assert old_cookie and dn("frank") in {e.dn for e in old.entries} and dn("bob") in {e.dn for e in old.entries}
    slapd.modify(
        f"dn: {dn('frank')}\nchangetype: delete\n\n"
        f"dn: {dn('frank')}\nchangetype: add\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncMailAccount\n"
        "objectClass: inetLocalMailRecipient\nuid: frank\ncn: Frank Smith\nsn: Smith\n"
        "mailLocalAddress: frank.smith@example.org\nemailForward: frank@elsewhere.example\n\n"
        f"dn: {dn('bob')}\nchangetype: delete\n"
    )
    slapd.modify(generate_users_ldif(40), add=True)  # after the new frank in the server's order
    cuts: list[int] = []

    def cut_after_the_new_frank(n: int, m: bytes) -> tuple[bytes, bool]:
        if b"uid=frank," in m and not cuts:
            cuts.append(n)
            return m, True
        return m, False

    proxy = TamperingProxy("127.0.0.1", slapd.port, cut_after_the_new_frank)
    store = Store.open(tmp_path, "search") if kind == "stored" else None
    mirror: watch.Mirror | StoredMirror = watch.Mirror() if store is None else StoredMirror(store)
    mirror.load(old, old_cookie if resume else None)
    before = (old.digest(), old_cookie if resume else None)
    at_failure: list[tuple[Snapshot, bytes | None]] = []

    class TakeAtFailure(Notifications):
        def __call__(self, event: watch.FollowerEvent) -> None:
            if event.kind == "error" and not at_failure:  # the follower's thread, right after the cut
                at_failure.append(mirror.snapshot())
            super().__call__(event)

    snapshots = Snapshots(mirror)
    follower: watch.Follower | None = None
    try:
        with capture_logs() as logs:
            follower, notes = followers([proxy.uri], slapd, watch="syncrepl", mirror=mirror, notes=TakeAtFailure())
            failed = notes.wait("error", timeout=30)
            notes.wait("synced", after=failed, timeout=30)
        snapshots.stop()
        assert cuts, "the refresh never sent the new frank"
        failures = [e for e in logs if e["event"] == "directory connection failed; retrying"]
        assert len(failures) == 1 and "connection closed" in failures[0]["error"], logs
        refreshes = [e for e in logs if e["event"] == "following the directory"]
        assert [r["resume"] for r in refreshes] == [resume, resume], logs
        # right after the cut: exactly what the mirror held before the refresh began
        ((cut_snapshot, cut_cookie),) = at_failure
        assert cut_snapshot.entries == old.entries and cut_cookie == before[1]
        # then the whole new content, with the cookie of the refresh that brought it
        new, new_cookie = mirror.snapshot()
        source = follower.config.source
        assert isinstance(source, LdapSource)
        truth = ldapsource.read(dataclasses.replace(source, uris=(slapd.uri,)), follower.config.routing.attributes)
        assert new.entries == truth.entries and new_cookie and new_cookie != old_cookie
        assert [e.dn for e in new.entries].count(dn("frank")) == 1 and dn("bob") not in {e.dn for e in new.entries}
        # and at no moment anything in between
        allowed = {before, (new.digest(), new_cookie)}
        assert snapshots.taken > 0 and snapshots.seen <= allowed, snapshots.seen - allowed
    finally:
        snapshots.stop()
        proxy.close()
        if follower is not None:  # before the store closes under it
            follower.stop()
            follower.join(timeout=15)
        if store is not None:
            store.close()


@pytest.mark.slapd
def test_a_persistent_search_change_is_applied_in_one_step(ds389: Ds389, tmp_path: Path) -> None:
    """psearch names a change by DN: the follower deletes what that DN (for a rename, the
    previous DN too) held and adds the entry as it is now. A sync between the two steps would
    install the directory without the entry (its addresses refused, a deletion for the
    guards); what a sync takes just before the entry lands must still hold it as it was."""

    class Watched(watch.Mirror):
        def __init__(self) -> None:
            super().__init__()
            self.before_upsert: list[Snapshot] = []

        def upsert(self, key: str, dn: str, raw: Any, wanted: Any) -> None:
            self.before_upsert.append(self.snapshot()[0])  # what a sync right now would install
            super().upsert(key, dn, raw, wanted)

    secret = tmp_path / "bind.secret"
    secret.write_text(BIND_SECRET.read_text().strip())
    secret.chmod(0o600)
    cfg = make_config(tmp_path, uri=[ds389.uri], bind_dn=SERVICE_DN, bind_password_file=str(secret), timeout=2)
    mirror, notes = Watched(), Notifications()
    follower = watch.Follower(cfg, mirror, notes, method="psearch")
    follower.start()
    try:
        notes.wait("changed", timeout=60)  # the first full read
        users = {e.dn for e in mirror.snapshot()[0].entries}
        assert dn("user000001") in users and dn("user000002") in users
        after = len(notes.seen)
        ds389.modify(
            f"dn: {dn('user000001')}\nchangetype: modify\nreplace: emailForward\nemailForward: u1@moved.example\n"
        )
        after = notes.wait("changed", after=after, timeout=30) + 1
        ds389.modify(f"dn: {dn('user000002')}\nchangetype: modrdn\nnewrdn: uid=renamed\ndeleteoldrdn: 1\n")
        notes.wait("changed", after=after, timeout=30)
    finally:
        follower.stop()
        follower.join(timeout=15)
    assert len(mirror.before_upsert) == 2, mirror.before_upsert
    modified, renamed = ({e.dn: e for e in snapshot.entries} for snapshot in mirror.before_upsert)
    assert set(modified) == users and set(renamed) == users  # nothing missing at either moment
    assert modified[dn("user000001")].get("emailforward") == ("user000001@elsewhere.example",)
    assert renamed[dn("user000001")].get("emailforward") == ("u1@moved.example",)
    final = {e.dn for e in mirror.snapshot()[0].entries}
    assert final == users - {dn("user000002")} | {dn("renamed")}


@pytest.mark.slapd
def test_refresh_and_persist_decode_what_the_paged_read_decodes(slapd: Slapd, followers: FollowerFactory) -> None:
    """Demo and hostile data, a value that is not UTF-8: the mirror holds what --once reads,
    rejections included; a change in the persist stage is decoded the same way."""
    slapd.modify(
        "dn: uid=binary,ou=users,dc=example,dc=org\nobjectClass: account\nobjectClass: ldapsyncMailAccount\n"
        "uid: binary\nmailPassword:: /+4A\nemailForward: binary@elsewhere.example\n",
        add=True,
    )
    follower, notes = followers([slapd.uri], slapd, passwords=True, watch="syncrepl")
    notes.wait("synced", timeout=30)
    assert "mailPassword" in follower.config.routing.attributes.ldap_attributes()
    source = follower.config.source
    assert isinstance(source, LdapSource)

    def same_as_paged_read() -> None:
        mirrored, _ = follower.mirror.snapshot()
        truth = ldapsource.read(source, follower.config.routing.attributes)
        assert mirrored.entries == truth.entries
        assert sorted(mirrored.rejections, key=str) == sorted(truth.rejections, key=str)

    same_as_paged_read()
    [binary] = [e for e in follower.mirror.snapshot()[0].entries if e.dn.startswith("uid=binary,")]
    assert "mailpassword" not in binary.attributes and binary.attributes.get("emailforward")
    for password in ("mailPassword: {SSHA}abc", "mailPassword:: /+4B"):  # fixed, then broken again
        seen = len(notes.seen)
        slapd.modify(
            f"dn: uid=binary,ou=users,dc=example,dc=org\nchangetype: modify\nreplace: mailPassword\n{password}\n"
        )
        notes.wait("changed", after=seen, timeout=10)
        same_as_paged_read()
    [binary] = [e for e in follower.mirror.snapshot()[0].entries if e.dn.startswith("uid=binary,")]
    assert "mailpassword" not in binary.attributes
    assert [r.attribute for r in follower.mirror.snapshot()[0].rejections if r.dn == binary.dn] == ["mailPassword"]


class CsnReads:
    """Counts the follower's contextCSN reads (the in-step check), with when each ended."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.times: list[float] = []
        real = ldapsource.context_csn_values

        def counted(connected: ldapsource.Connected, suffix: str, within: float) -> tuple[bytes, ...]:
            try:
                return real(connected, suffix, within)
            finally:
                self.times.append(time.monotonic())

        monkeypatch.setattr(ldapsource, "context_csn_values", counted)

    def since(self, start: float) -> int:
        return sum(1 for t in self.times if t >= start)


@pytest.mark.slapd
def test_a_change_the_server_never_sent_is_noticed_by_the_contextcsn_check(
    slapd: Slapd, followers: FollowerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy drops one persist-phase change: the server stays alive and quiet, its contextCSN
    ahead of our cookie. Within a few checks the follower says so, confirms nothing after the
    change, and refreshes fully from that server; the entry is then there."""
    reads = CsnReads(monkeypatch)
    dropped: list[int] = []

    def drop(n: int, m: bytes) -> tuple[bytes, bool]:
        if b"uid=lost," in m and not dropped:
            dropped.append(n)
            return b"", False
        return m, False

    proxy = TamperingProxy("127.0.0.1", slapd.port, drop)
    try:
        follower, notes = followers([proxy.uri], slapd, watch="syncrepl", timeout=2)
        notes.wait("synced", timeout=30)
        answered_at_failure: list[float | None] = []
        original_notify = follower.notify

        def notify(event: watch.FollowerEvent) -> None:
            if event.kind == "error":
                answered_at_failure.append(follower.status.answered)
            original_notify(event)

        follower.notify = notify
        after = len(notes.seen)
        with capture_logs() as logs:
            before_change = time.time()
            start = time.monotonic()
            slapd.modify(
                f"dn: {dn('lost')}\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncMailAccount\n"
                "uid: lost\ncn: Lost\nsn: Lost\nemailForward: lost@elsewhere.example\n",
                add=True,
            )
            failed = notes.wait("error", after=after, timeout=60)
            notes.wait("synced", after=failed, timeout=60)
        assert dropped, "the proxy never saw the change"
        warnings = [e for e in logs if "contextCSN stays ahead" in e["event"]]
        assert len(warnings) == 1, logs
        (warning,) = warnings
        assert warning["log_level"] == "warning" and warning["server"] == proxy.uri
        assert warning["ours"] < warning["server_csn"], warning
        assert 2 <= reads.since(start) <= 8, reads.times  # noticed within a bounded number of checks
        # nothing was confirmed after the lost change
        assert answered_at_failure and all(a is not None and a < before_change for a in answered_at_failure)
        refreshes = [e for e in logs if e["event"] == "following the directory"]
        assert [r["resume"] for r in refreshes] == [False], "a full refresh, without the cookie"
        assert dn("lost") in {e.dn for e in follower.mirror.snapshot()[0].entries}
        assert not [e for e in logs if "found this copy complete" in e["event"]], "the refresh was no false alarm"
        assert follower._false_alarms.trusted(proxy.uri)
    finally:
        proxy.close()


@pytest.mark.slapd
def test_an_honest_server_under_a_burst_of_changes_is_never_called_out_of_step(
    slapd: Slapd, followers: FollowerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes in flight put the server's contextCSN ahead of our cookie at many checks; what
    the server had at one check has reached us by the next, so no refresh, and the follower
    confirms again once the burst is over, its last write outside the search included."""
    reads = CsnReads(monkeypatch)
    follower, notes = followers([slapd.uri], slapd, watch="syncrepl", timeout=2)
    notes.wait("synced", timeout=30)
    after = len(notes.seen)
    with capture_logs() as logs:
        start = time.monotonic()
        batch = 0
        while time.monotonic() - start < 6 or reads.since(start) < 4:  # at least three graces of changes
            assert time.monotonic() - start < 60, f"no in-step checks during the burst: {reads.times}"
            records = [
                f"dn: {dn('alice')}\nchangetype: modify\nreplace: emailForward\n"
                f"emailForward: alice{batch}.{i}@elsewhere.example\n"
                for i in range(40)
            ]
            # a write outside the search moves the contextCSN too: syncprov sends a new cookie for it
            records.append(
                "dn: cn=ldapsync,ou=services,dc=example,dc=org\nchangetype: modify\nreplace: description\n"
                f"description: batch {batch}\n"
            )
            slapd.modify("\n".join(records))
            batch += 1
        burst_end = time.time()
        last = f"alice{batch - 1}.39@elsewhere.example"
        deadline = time.monotonic() + 60
        while (follower.status.in_step or 0) <= burst_end:  # a check passed after the last change
            assert time.monotonic() < deadline, (follower.status, reads.times)
            time.sleep(0.05)
    alice = next(e for e in follower.mirror.snapshot()[0].entries if e.dn == dn("alice"))
    assert alice.get("emailforward") == (last,)
    assert reads.since(start) >= 4, reads.times
    assert not [e for e in logs if e["log_level"] in ("warning", "error")], logs
    assert "error" not in notes.seen[after:] and "synced" not in notes.seen[after:], notes.seen


@pytest.mark.slapd
def test_a_contextcsn_value_that_is_not_a_csn_is_a_warning_and_the_rest_is_compared(
    slapd: Slapd, followers: FollowerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ldapsource.context_csn_values
    reads: list[float] = []

    def with_garbage(connected: ldapsource.Connected, suffix: str, within: float) -> tuple[bytes, ...]:
        reads.append(time.monotonic())
        return (b"20261207\nforged log line", *real(connected, suffix, within))

    monkeypatch.setattr(ldapsource, "context_csn_values", with_garbage)
    with capture_logs() as logs:
        follower, notes = followers([slapd.uri], slapd, watch="syncrepl", timeout=1)
        notes.wait("synced", timeout=30)
        synced_at = time.time()
        deadline = time.monotonic() + 60
        while len(reads) < 3 or (follower.status.in_step or 0) <= synced_at:  # the good value is compared
            assert time.monotonic() < deadline and follower.is_alive(), (reads, follower.status)
            time.sleep(0.05)
    warnings = [e for e in logs if "contextCSN holds a value that is not a CSN" in e["event"]]
    assert len(warnings) == 1, logs  # once per connection, not at every read
    assert warnings[0]["log_level"] == "warning" and warnings[0]["server"] == slapd.uri
    assert warnings[0]["dn"] == "dc=example,dc=org" and warnings[0]["value"] == "20261207\\nforged log line"
    assert "error" not in notes.seen, notes.seen
