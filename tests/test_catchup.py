"""A one-shot run resumes from the saved sync state (ldapsync.catchup), against real slapd.

The property: whatever changed in the directory, a warm run (the saved mirror caught up by a
refreshOnly from its cookie) installs byte for byte what a cold run with a fresh state dir
installs. The rest: what a warm run reads when nothing changed, and every way resuming is
refused (no syncprov, a refused cookie, damaged follow state, another search) ending in a
full read with the same bytes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentutil import set_stored_cookie
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldapproxy import TamperingProxy
from profiles import examples
from slapd import Slapd, SlapdError, generate_users_ldif, missing_tools
from structlog.testing import capture_logs

from ldapsync import catchup, mirror, sync
from ldapsync import config as config_mod
from ldapsync.directory import Entry, EntrySum
from ldapsync.state import State, lmdbstore

pytestmark = pytest.mark.slapd

EXPORTERS: list[dict[str, Any]] = [
    {
        "kind": "postfix-virtual",
        "name": "alias",
        "path": "out/maps/alias",
        "include": ["aliases", "forwards"],
        "map_type": "none",
    },
    {"kind": "postfix-recipients", "path": "out/maps/recipients", "map_type": "none"},
    {"kind": "postfix-sender-login", "path": "out/maps/sender_login", "map_type": "none"},
    {"kind": "dovecot-passwd", "path": "out/dovecot/passwd", "mode": "0640"},
]
USERS = 12  # generated users at the start; the property test adds, renames and deletes among POOL
POOL = 24


class Site:
    """A config reading `server` with its own state dir and outputs under `root`."""

    def __init__(self, root: Path, server: Slapd, *, top: dict[str, Any] | None = None, **ldap: Any) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.top = top or {}
        self.config = root / "ldapsync.yaml"
        self.ldap: dict[str, Any] = {
            "uri": [server.uri],
            "bind_dn": server.service_dn,
            "bind_password_file": str(server.service_password_file),
            "base_dn": server.users_dn,
            "filter": "(objectClass=inetOrgPerson)",
            "timeout": 10,
            **ldap,
        }
        self.write()

    def write(self, **ldap: Any) -> None:
        self.ldap.update(ldap)
        doc = {
            "domain": "example.org",
            "domain_aliases": ["example.net"],
            "source": {"ldap": self.ldap},
            "state_dir": "state",
            "exporters": EXPORTERS,
            **self.top,
        }
        self.config.write_text(yaml.safe_dump(doc))

    def pipeline(self) -> sync.Pipeline:
        return sync.Pipeline(config_mod.load(self.config))

    def once(self, *, resume: bool = True) -> tuple[sync.Result, catchup.OneShot]:
        """What `ldapsync --once` does, in this process: the outcome of the read is kept."""
        pipeline = self.pipeline()
        with catchup.resuming(pipeline, resume=resume) as one_shot:
            assert one_shot is not None
            result = pipeline.run()
            one_shot.save(result)
        return result, one_shot

    def cli(self, *args: str, check: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "ldapsync", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        return proc

    def outputs(self) -> dict[str, bytes]:
        out = self.root / "out"
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    def inodes(self) -> dict[str, tuple[int, int]]:
        out = self.root / "out"
        return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}

    @property
    def state(self) -> State:
        return State(self.root / "state")

    def stored(self) -> dict[str, Any]:
        """The store's records (cookie, serial, generation, entry sum, entry count)."""
        meta = lmdbstore.peek(self.root / "state")
        assert meta is not None, "no store"
        return meta

    def stored_entries(self) -> list[Entry]:
        store = lmdbstore.Store.open_readonly(self.root / "state", mirror.fingerprint(config_mod.load(self.config)))
        assert store is not None
        try:
            with store.reading() as view:
                return [e for _, e in view.entries()]
        finally:
            store.close()


SEARCH_CHANGED = "search or routing configuration changed since the store was written"


def logged(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines a CLI run wrote (a non-terminal stderr gets JSON)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def named(stderr: str, event: str) -> list[dict[str, Any]]:
    return [e for e in logged(stderr) if e.get("event") == event]


def cold_outputs(root: Path, server: Slapd) -> dict[str, bytes]:
    """What a cold run with a fresh state dir installs, read by today's paged search (no resuming)."""
    site = Site(Path(tempfile.mkdtemp(dir=root)), server)
    assert site.pipeline().run().status == "installed"
    return site.outputs()


def user(i: int, forward: str | None = None) -> str:
    return generate_users_ldif(1, start=i).replace(
        "mailPassword:", f"emailForward: {forward}\nmailPassword:" if forward else "mailPassword:"
    )


# -- one slapd for the module: the property test changes its data, example after example -------------
class Directory:
    """The module's slapd and which generated users it holds (the changes are ours only).

    `changes()` turns operations into LDIF records, applied in order by one ldapmodify;
    `reset()` gives those that bring the content back to the USERS generated users as
    generated, so each example starts from the same content (and a failing one replays).
    """

    def __init__(self, server: Slapd, root: Path) -> None:
        self.server = server
        self.root = root
        self.present = set(range(USERS))
        self.dirty: set[int] = set()  # present, but not as generated
        self.warm = Site(root / "warm", server)

    def dn(self, i: int) -> str:
        return f"uid=user{i:06d},{self.server.users_dn}"

    def modify(self, records: list[str]) -> None:
        if records:
            self.server.modify("\n".join(records))

    def apply(self, op: tuple[str, int, int]) -> None:
        self.modify(self.changes([op]))

    def changes(self, ops: list[tuple[str, int, int]]) -> list[str]:
        records = []
        for kind, i, j in ops:
            dn = self.dn(i)
            if kind == "add" and i not in self.present:
                records.append(user(i).replace("\n", "\nchangetype: add\n", 1))
                self.present.add(i)
            elif kind == "forward" and i in self.present:
                records.append(
                    f"dn: {dn}\nchangetype: modify\nreplace: emailForward\nemailForward: n{j}@elsewhere.example\n"
                )
                self.dirty.add(i)
            elif kind == "unforward" and i in self.present:
                records.append(f"dn: {dn}\nchangetype: modify\nreplace: emailForward\n")
                self.dirty.add(i)
            elif kind == "touch" and i in self.present:  # an attribute no map uses: only the cookie moves
                records.append(f"dn: {dn}\nchangetype: modify\nreplace: description\ndescription: {j}\n")
                self.dirty.add(i)
            elif kind == "rename" and i in self.present and j not in self.present:
                records.append(f"dn: {dn}\nchangetype: modrdn\nnewrdn: uid=user{j:06d}\ndeleteoldrdn: 1\n")
                self.present.discard(i)
                self.present.add(j)
                self.dirty.discard(i)
                self.dirty.add(j)
            elif kind == "delete" and i in self.present:
                records.append(f"dn: {dn}\nchangetype: delete\n")
                self.present.discard(i)
                self.dirty.discard(i)
        return records

    def reset(self) -> list[str]:
        records = [f"dn: {self.dn(i)}\nchangetype: delete\n" for i in sorted(self.present) if i >= USERS]
        for i in sorted(self.dirty & set(range(USERS))):
            forward = f"emailForward: user{i:06d}@elsewhere.example\n" if i % 2 else ""
            records.append(
                f"dn: {self.dn(i)}\nchangetype: modify\nreplace: emailForward\n{forward}-\n"
                f"replace: description\n-\nreplace: cn\ncn: User {i}\n-\nreplace: sn\nsn: {i}\n"
            )
        self.present &= set(range(USERS))
        self.dirty.clear()
        return records + self.changes([("add", i, 0) for i in range(USERS)])


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Directory]:
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("catchup")
    with Slapd(root / "slapd", extra_ldif=generate_users_ldif(USERS)) as server:
        directory = Directory(server, root)
        result, one_shot = directory.warm.once()
        assert result.status == "installed" and one_shot.outcome is not None
        assert one_shot.outcome.cookie is not None, "a cold run by syncrepl brings a cookie"
        yield directory


OPS = st.tuples(
    st.sampled_from(["add", "forward", "unforward", "touch", "rename", "delete"]),
    st.integers(0, POOL - 1),
    st.integers(0, POOL - 1),
)


@settings(
    max_examples=examples(20),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, max_size=8))
def test_warm_run_installs_what_a_cold_run_installs(directory: Directory, ops: list[tuple[str, int, int]]) -> None:
    directory.modify(directory.reset() + directory.changes(ops))
    result, one_shot = directory.warm.once()
    assert result.status in ("installed", "unchanged")
    outcome = one_shot.outcome
    assert outcome is not None and outcome.resumed, "the warm run read the whole directory"
    assert outcome.cookie is not None
    assert directory.warm.outputs() == cold_outputs(directory.root, directory.server)
    # and the store is what the next run resumes from: this directory (as the generation holds
    # it, refused secrets marked) with this cookie
    stored = directory.warm.stored()
    assert stored["cookie"] == outcome.cookie
    count, total = stored["entry_sum"]
    current = directory.warm.state.get()
    assert current is not None and EntrySum(count, int(total, 16)).hexdigest() == current.meta["snapshot_digest"]


def test_warm_run_without_changes_reads_no_entry_and_touches_nothing(directory: Directory) -> None:
    warm = directory.warm
    warm.once()  # caught up with whatever the other tests did
    before, files = warm.outputs(), warm.inodes()
    result, one_shot = warm.once()
    assert result.status == "unchanged"
    assert one_shot.outcome is not None and one_shot.outcome.resumed
    assert (one_shot.outcome.received, one_shot.outcome.deleted) == (0, 0)
    assert warm.outputs() == before and warm.inodes() == files


def test_warm_run_after_a_change_receives_only_that_entry(directory: Directory) -> None:
    """And records its generation as a journal line after the directory it resumed from,
    not as a new base of the whole directory."""
    site = Site(directory.root / "one-change", directory.server)
    site.once()
    i = min(directory.present)
    directory.apply(("forward", i, 7))
    result, one_shot = site.once()
    assert result.status == "installed"
    assert one_shot.outcome is not None and one_shot.outcome.resumed
    assert one_shot.outcome.received == 1
    assert f"user{i:06d}@example.org\tn7@elsewhere.example" in (site.root / "out/maps/alias").read_text()
    store = sorted(p.suffix for p in (site.root / "state" / "store").iterdir())
    assert store == [".base", ".journal"], store


def test_cli_once_resumes_and_says_so(directory: Directory) -> None:
    """The command cron runs: the second `--once` resumes, reads nothing, changes nothing."""
    site = Site(directory.root / "cli", directory.server)
    first = site.cli("--once")
    assert "read the whole directory" in [e["event"] for e in logged(first.stderr)]
    files = site.inodes()
    second = site.cli("--once")
    resumed = named(second.stderr, "resumed from the saved sync state")
    assert len(resumed) == 1 and resumed[0]["received"] == 0, second.stderr
    (whole,) = named(first.stderr, "read the whole directory")
    assert resumed[0]["bytes"] < 200 < 100 * whole["entries"], (resumed, whole)
    assert site.inodes() == files
    assert site.outputs() == cold_outputs(directory.root, directory.server)


def test_dry_run_resumes_but_writes_no_state(directory: Directory) -> None:
    site = Site(directory.root / "dry", directory.server)
    site.cli("--once")
    state = site.root / "state"
    locks = ("lock", "lock.mdb")  # the state lock, and LMDB's table of readers
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file() and p.name not in locks}
    i = min(directory.present)
    directory.apply(("forward", i, 11))
    proc = site.cli("--dry-run", check=1)
    assert "resumed from the saved sync state" in proc.stderr
    assert "n11@elsewhere.example" in proc.stdout
    after = {p: p.read_bytes() for p in state.rglob("*") if p.is_file() and p.name not in locks}
    assert after == before, "a dry run wrote state"


def test_resync_reads_the_whole_directory(directory: Directory) -> None:
    site = Site(directory.root / "resync", directory.server)
    site.cli("--once")
    proc = site.cli("resync")
    assert "resumed from the saved sync state" not in proc.stderr
    assert "read the whole directory" in [e["event"] for e in logged(proc.stderr)]


def test_refresh_cut_short_fails_the_run_and_keeps_the_saved_state(directory: Directory) -> None:
    """All or nothing: a connection lost mid-refresh applies none of it and saves nothing;
    the next run resumes from the same cookie and gets all of it."""
    site = Site(directory.root / "cut", directory.server)
    site.once()
    saved = site.stored()
    before = site.outputs()
    added = sorted(set(range(POOL, POOL + 3)))
    for i in added:
        directory.server.modify(user(i), add=True)
    proxy = TamperingProxy("127.0.0.1", directory.server.port, lambda n, m: (m, True))  # close after the first
    try:
        site.write(uri=[proxy.uri], connect_rounds=1)
        result, one_shot = site.once()
    finally:
        proxy.close()
    assert result.status == "failed" and one_shot.outcome is None
    assert site.stored() == saved
    assert site.outputs() == before
    site.write(uri=[directory.server.uri])
    result, one_shot = site.once()
    assert result.status == "installed"
    assert one_shot.outcome is not None and one_shot.outcome.resumed and one_shot.outcome.received == len(added)
    assert site.outputs() == cold_outputs(directory.root, directory.server)
    for i in added:
        directory.server.modify(f"dn: uid=user{i:06d},{directory.server.users_dn}\nchangetype: delete\n")


def test_held_change_is_resumed_from_and_approved(directory: Directory) -> None:
    """A held change is not saved: the next run resumes from the last installed directory
    and its cookie, gets the same deletions again (no entry in full) and holds them again;
    after `approve` the run resumes and finds nothing to do."""
    site = Site(directory.root / "held", directory.server, top={"safety": {"max_deletions": 1}})
    site.once()
    gone = sorted(directory.present)[:2]
    for i in gone:
        directory.apply(("delete", i, 0))
    try:
        result, _ = site.once()
        assert result.status == "held"
        stored = site.stored()
        assert stored["generation"] == site.state.current_id()  # still the installed directory
        result, one_shot = site.once()
        assert result.status == "held"
        assert one_shot.outcome is not None and one_shot.outcome.resumed and one_shot.outcome.received == 0
        assert one_shot.outcome.deleted == len(gone)
        assert site.stored() == stored
        site.cli("approve")
        result, one_shot = site.once()
        assert result.status == "unchanged"
        assert one_shot.outcome is not None and one_shot.outcome.resumed and one_shot.outcome.received == 0
        assert site.outputs() == cold_outputs(directory.root, directory.server)
    finally:
        for i in gone:
            directory.apply(("add", i, 0))


# -- resuming refused: a full read, the same bytes ---------------------------------------------------
def test_cookie_from_the_servers_future_means_a_full_read(directory: Directory) -> None:
    """OpenLDAP answers a cookie from its future (slapd restored from a backup) with
    unwillingToPerform or e-syncRefreshRequired: the run reads everything and saves the new cookie."""
    site = Site(directory.root / "future", directory.server)
    site.once()
    cookie = site.stored()["cookie"].decode()
    future = re.sub(r"csn=\d{14}", "csn=20991231000000", cookie)
    assert future != cookie, cookie
    set_stored_cookie(site.root / "state", future.encode())
    directory.apply(("forward", min(directory.present), 13))
    with capture_logs() as logs:
        result, one_shot = site.once()
    assert result.status == "installed"
    assert one_shot.outcome is not None and not one_shot.outcome.resumed
    assert any(e["event"] == "could not resume from the saved sync state; reading the whole directory" for e in logs)
    assert site.outputs() == cold_outputs(directory.root, directory.server)
    assert site.stored()["cookie"].decode() != future
    _, again = site.once()
    assert again.outcome is not None and again.outcome.resumed and again.outcome.received == 0


def test_a_lying_present_list_means_a_full_read(directory: Directory) -> None:
    """A present list naming an entry the saved copy lacks (one flipped bit in one UUID) would,
    believed, delete the entry it meant: the run reads the whole directory instead."""
    from ldapsync import syncrepl

    site = Site(directory.root / "lying", directory.server)
    site.once()
    victim = next(e for e in site.stored_entries() if e.dn.startswith("uid=alice,"))
    assert victim.uuid
    raw_uuid = syncrepl.uuid_from_str(victim.uuid)
    flipped = bytes([raw_uuid[0] ^ 0x01]) + raw_uuid[1:]
    directory.apply(("forward", min(directory.present), 17))  # a change: the refresh has a present phase
    lied: list[int] = []

    def lie(n: int, m: bytes) -> tuple[bytes, bool]:
        if raw_uuid in m and not lied:
            lied.append(n)
            return m.replace(raw_uuid, flipped), False
        return m, False

    proxy = TamperingProxy("127.0.0.1", directory.server.port, lie, sync_info=True)
    try:
        site.write(uri=[proxy.uri])
        with capture_logs() as logs:
            result, one_shot = site.once()
    finally:
        proxy.close()
    assert lied, "the present list never named the victim"
    assert result.status == "installed"
    assert one_shot.outcome is not None and not one_shot.outcome.resumed
    (warning,) = [
        e for e in logs if e["event"] == "could not resume from the saved sync state; reading the whole directory"
    ]
    assert syncrepl.uuid_to_str(flipped) in warning["reason"]
    assert "alice@example.org" in (site.root / "out/maps/recipients").read_text()
    assert site.outputs() == cold_outputs(directory.root, directory.server)


@pytest.mark.parametrize("damage", ["garbage", "format"])
def test_damaged_store_means_a_full_read_with_a_clear_log_line(directory: Directory, damage: str) -> None:
    site = Site(directory.root / f"damaged-{damage}", directory.server)
    site.once()
    data = site.root / "state" / lmdbstore.STORE_NAME / "data.mdb"
    if damage == "garbage":
        data.write_bytes(b"\x00not an lmdb file" * 256)
    else:  # written by a version with another format: never read
        import lmdb

        env = lmdb.open(str(data.parent), max_dbs=8)
        with env.begin(write=True) as txn:
            txn.put(b"format", b"0", db=env.open_db(b"meta", txn=txn))
        env.close()
    with capture_logs() as logs:
        result, one_shot = site.once()
    assert result.status == "unchanged"
    assert one_shot.outcome is not None and not one_shot.outcome.resumed
    (rebuilt,) = [e for e in logs if e["event"] == "store rebuilt; reading the directory afresh"]
    assert rebuilt["why"].startswith("store unreadable" if damage == "garbage" else "store format '0'"), rebuilt
    assert site.outputs() == cold_outputs(directory.root, directory.server)
    _, again = site.once()
    assert again.outcome is not None and again.outcome.resumed


@pytest.mark.parametrize(
    "change",
    [
        {"filter": "(&(objectClass=inetOrgPerson)(!(uid=alice)))"},
        {"base_dn": "dc=example,dc=org"},
    ],
    ids=["filter", "base"],
)
def test_another_search_means_a_full_read(directory: Directory, change: dict[str, str]) -> None:
    site = Site(directory.root / f"search-{next(iter(change))}", directory.server)
    site.once()
    site.write(**change)
    with capture_logs() as logs:
        result, one_shot = site.once()
    assert result.status in ("installed", "unchanged")  # not held: the comparison below means something
    assert one_shot.outcome is not None and not one_shot.outcome.resumed
    assert {"event": "store rebuilt; reading the directory afresh", "why": SEARCH_CHANGED}.items() <= next(
        e for e in logs if e["event"] == "store rebuilt; reading the directory afresh"
    ).items()
    cold = Site(Path(tempfile.mkdtemp(dir=directory.root)), directory.server, **change)
    cold.pipeline().run()
    assert site.outputs() == cold.outputs()


def test_another_attribute_set_means_a_full_read(directory: Directory) -> None:
    site = Site(directory.root / "attributes", directory.server)
    site.once()
    doc = yaml.safe_load(site.config.read_text())
    doc["attributes"] = {"forward": "description"}
    site.config.write_text(yaml.safe_dump(doc))
    with capture_logs() as logs:
        _, one_shot = site.once()
    assert one_shot.outcome is not None and not one_shot.outcome.resumed
    rebuilt = [e for e in logs if e["event"] == "store rebuilt; reading the directory afresh"]
    assert [e["why"] for e in rebuilt] == [SEARCH_CHANGED]


# -- a server without syncprov: the paged search, every time ------------------------------------------
def test_server_without_syncprov_is_read_whole_with_the_same_bytes(tmp_path: Path) -> None:
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    try:
        plain = Slapd(tmp_path / "slapd", syncprov=False, extra_ldif=generate_users_ldif(5))
    except SlapdError as e:  # pragma: no cover - the module fixture would have failed as well
        pytest.fail(str(e))
    with plain:
        site = Site(tmp_path / "site", plain)
        first = site.cli("--once")
        assert "the server offers no syncrepl (no syncprov): reading the whole directory" in first.stderr
        plain.modify(f"dn: uid=user000001,{plain.users_dn}\nchangetype: delete\n")
        second = site.cli("--once")
        assert "the server offers no syncrepl" in second.stderr
        assert "resumed" not in second.stderr
        assert site.outputs() == cold_outputs(tmp_path, plain)
        assert "user000001@" not in (site.root / "out/maps/alias").read_text()


def test_ldif_source_is_not_touched() -> None:
    """An LDIF source has nothing to resume: resuming() leaves the pipeline as it is."""
    from siteconfig import write_config

    with tempfile.TemporaryDirectory() as d:
        pipeline = sync.Pipeline(config_mod.load(write_config(Path(d), exporters=EXPORTERS)))
        with catchup.resuming(pipeline) as one_shot:
            assert one_shot is None and pipeline.reader is None
