"""The LDAP source against a real slapd, bound as the NON-root service account.

The rootdn is exempt from size limits; binding as the service account is what makes the
sizeLimitExceeded test meaningful. What goes over the wire is observed with a recording TCP
proxy (LdapProxy), so these tests hold for any client implementation in ldapsource.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from notldap import HttpServer
from slapd import DEFAULT_LDIF, Slapd, _free_port, generate_users_ldif
from structlog.testing import capture_logs

from ldapsync import config as config_mod
from ldapsync import ldapsource, ldifsource, pagedigest, sync
from ldapsync.config import LdapSource
from ldapsync.directory import Snapshot
from ldapsync.errors import ConfigError, SourceError, Unreachable

pytestmark = pytest.mark.slapd


@pytest.fixture
def slapd(read_only_slapd_factory: Callable[..., Slapd]) -> Slapd:
    """The tests here only read: they share one slapd (slapd_factory gives one of its own)."""
    return read_only_slapd_factory()


FILTER = "(objectClass=inetOrgPerson)"
EXPORTERS: list[dict[str, Any]] = [
    {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "include": ["aliases", "forwards"]},
    {"kind": "postfix-recipients", "path": "out/recipients"},
    {"kind": "dovecot-passwd", "path": "out/passwd"},
]


# -- a recording, optionally failing TCP proxy ---------------------------------------------------
class LdapProxy:
    """Forwards 127.0.0.1:<port> to an upstream port and records the client's bytes.

    cut_after: once more than this many server->client bytes went through, call on_cut()
    (default: close both sides, i.e. the connection drops mid-stream).
    """

    def __init__(self, upstream: int, *, cut_after: int | None = None, on_cut: Callable[[], None] | None = None):
        self.upstream = upstream
        self.cut_after = cut_after
        self.on_cut = on_cut
        self.cut = threading.Event()
        self.client_data: list[bytearray] = []
        self.server_bytes = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # upstream gone (killed by a test): refuse like a dead server
                client.close()
                continue
            buf = bytearray()
            with self._lock:
                self.client_data.append(buf)
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, buf), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                else:
                    with self._lock:
                        self.server_bytes += len(data)
                        cut_now = (
                            self.cut_after is not None and self.server_bytes > self.cut_after and not self.cut.is_set()
                        )
                        if cut_now:
                            self.cut.set()
                    if cut_now:
                        if self.on_cut is None:
                            self._close_all()
                            return
                        self.on_cut()
                        continue  # the data that crossed the line is not delivered
                    if self.cut.is_set() and self.on_cut is None:
                        return
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _close_all(self) -> None:
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._listener.close()
        self._close_all()

    def search_requests(self) -> list[dict[str, Any]]:
        """Every SearchRequest the client sent: base, attributes, paged-results size."""
        from ldap3.protocol.rfc4511 import LDAPMessage
        from pyasn1.codec.ber import decoder

        found = []
        for data in self.client_data:
            rest = bytes(data)
            while rest:
                msg, rest = decoder.decode(rest, asn1Spec=LDAPMessage())
                op = msg["protocolOp"]
                if op.getName() != "searchRequest":
                    continue
                req = op["searchRequest"]
                controls = [str(c["controlType"]) for c in msg["controls"]] if msg["controls"].hasValue() else []
                found.append(
                    {
                        "base": str(req["baseObject"]),
                        "attributes": [str(a) for a in req["attributes"]],
                        "deref": int(req["derefAliases"]),
                        "controls": controls,
                    }
                )
        return found


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., LdapProxy]]:
    made: list[LdapProxy] = []

    def make(upstream: int, **kwargs: Any) -> LdapProxy:
        p = LdapProxy(upstream, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@contextlib.contextmanager
def leaked_sockets() -> Iterator[list[warnings.WarningMessage]]:
    """Collect the ResourceWarnings of sockets nobody closed (they surface at garbage collection)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        leaks: list[warnings.WarningMessage] = []
        yield leaks
        gc.collect()
        leaks += [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.fixture(autouse=True)
def _contain_socket_leaks() -> Iterator[None]:
    """Keep a leak of one test (see test_failed_connections_close_their_sockets) out of the next."""
    yield
    with leaked_sockets():
        pass


# -- helpers -------------------------------------------------------------------------------
def ldap_doc(server: Slapd, uris: list[str] | None = None, **ldap: Any) -> dict[str, Any]:
    return {
        "uri": uris or [server.uri],
        "bind_dn": server.service_dn,
        "bind_password_file": str(server.service_password_file),
        "base_dn": server.users_dn,
        "filter": FILTER,
        "timeout": 5,
        **ldap,
    }


def write_config(tmp: Path, server: Slapd, uris: list[str] | None = None, **ldap: Any) -> Path:
    doc = {
        "domain": "example.org",
        "domain_aliases": ["example.net"],
        "source": {"ldap": ldap_doc(server, uris, **ldap)},
        "state_dir": "state",
        "exporters": EXPORTERS,
        # the guards would hold a shrunken directory anyway: off, so these tests see the source alone
        "safety": {"max_deletions": 1_000_000, "max_deletion_ratio": 1.0, "allow_empty": True},
    }
    path = tmp / "ldapsync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def load(tmp: Path, server: Slapd, uris: list[str] | None = None, **ldap: Any) -> config_mod.Config:
    return config_mod.load(write_config(tmp, server, uris, **ldap))


def read(cfg: config_mod.Config) -> Any:
    assert isinstance(cfg.source, LdapSource)
    return ldapsource.read(cfg.source, cfg.routing.attributes)


def outputs(tmp: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((tmp / "out").iterdir())}


def dead_uri() -> str:
    return f"ldap://127.0.0.1:{_free_port()}"


def user_dns(n: int, start: int = 0) -> set[str]:
    return {f"uid=user{i:06d},ou=users,dc=example,dc=org".lower() for i in range(start, start + n)}


# -- tests ---------------------------------------------------------------------------------
def test_full_read_matches_the_ldif_it_was_loaded_from(tmp_path: Path, slapd: Slapd) -> None:
    cfg = load(tmp_path, slapd)
    snap = read(cfg)
    assert snap.source == f"ldap:{slapd.uri}"

    ldif = tmp_path / "all.ldif"
    ldif.write_bytes(b"\n".join(p.read_bytes() for p in DEFAULT_LDIF))
    offline = ldifsource.read(config_mod.LdifSource(ldif, slapd.users_dn), cfg.routing.attributes)
    classes = _classes(ldif)
    expected = {e.dn.lower(): dict(e.attributes) for e in offline.entries if "inetorgperson" in classes[e.dn.lower()]}
    got = {e.dn.lower(): dict(e.attributes) for e in snap.entries}
    # createTimestamp is operational: slapd sends it (requested), the loaded LDIF has none
    assert all(attrs.pop("createtimestamp", None) for attrs in got.values())
    assert got == expected
    assert all(e.uuid for e in snap.entries), "entryUUID is needed to follow deletes"
    alice = got["uid=alice,ou=users,dc=example,dc=org"]
    assert alice["mailpassword"][0].startswith("$6$"), "the service account must read mailPassword"


def _classes(ldif_path: Path) -> dict[str, set[str]]:
    """objectClass values per lower-cased DN of an LDIF file."""
    from ldapsync import ldifsource

    with ldif_path.open("rb") as fh:
        return {
            dn.lower(): {v.decode().lower() for k, vs in raw.items() if k.lower() == "objectclass" for v in vs}
            for dn, raw in ldifsource.parse(fh)
        }


def test_size_limit_fails_loudly_and_keeps_previous_outputs(
    tmp_path: Path, slapd_factory: Callable[..., Slapd]
) -> None:
    server = slapd_factory(service_unlimited=False)  # OpenLDAP's default: 500 entries
    pipeline = sync.Pipeline(load(tmp_path, server, page_size=100))
    assert pipeline.run().status == "installed"
    before = outputs(tmp_path)

    server.modify(generate_users_ldif(600), add=True)
    with pytest.raises(SourceError, match="sizeLimitExceeded") as err:
        read(pipeline.config)
    assert server.uri in str(err.value)

    result = sync.Pipeline(pipeline.config).run()
    assert result.status == "failed" and "sizeLimitExceeded" in (result.error or "")
    assert outputs(tmp_path) == before, "a truncated read reached the maps"
    status = pipeline.state.read_json("status.json")
    assert status["result"] == "failed" and "sizeLimitExceeded" in status["error"]


def test_paged_read_of_600_users_with_limits_lifted(
    tmp_path: Path,
    slapd_factory: Callable[..., Slapd],
    proxy_factory: Callable[..., LdapProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = slapd_factory(extra_ldif=generate_users_ldif(600))
    proxy = proxy_factory(server.port)
    cfg = load(tmp_path, server, [proxy.uri], page_size=50)
    assert isinstance(cfg.source, LdapSource)
    monkeypatch.setattr(pagedigest, "spare_core", lambda: False)
    told: list[int] = []  # the progress line's count, after each page
    snap = ldapsource.read(cfg.source, cfg.routing.attributes, progress=told.append)
    assert told == sorted(told) and len(told) >= 600 // 50 and told[-1] == len(snap.entries)
    dns = {e.dn.lower() for e in snap.entries}
    assert user_dns(600) <= dns
    assert len(snap.entries) == len(server.search(FILTER, ["1.1"], base=server.users_dn, bind="root"))
    pages = [r for r in proxy.search_requests() if r["base"].lower() == server.users_dn.lower()]
    assert len(pages) >= 600 // 50, f"expected >= 12 page requests, saw {len(pages)}"
    assert all("1.2.840.113556.1.4.319" in r["controls"] for r in pages), "not a paged search"
    assert "_pending_sum" not in vars(snap), "no core to spare (the test's own): no helper process"

    # more than one page and a core to spare: the digest is summed by the helper process
    monkeypatch.setattr(pagedigest, "spare_core", lambda: True)
    snap = ldapsource.read(cfg.source, cfg.routing.attributes)
    assert vars(snap).get("_pending_sum") is not None
    assert snap.digest() == Snapshot(snap.entries, snap.source, snap.rejections).digest()
    assert vars(snap).get("_pending_sum") is None

    def cannot_start(keep: frozenset[str]) -> pagedigest.Helper:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(pagedigest, "Helper", cannot_start)  # the read goes on; the digest is computed here
    again = ldapsource.read(cfg.source, cfg.routing.attributes)
    assert "_pending_sum" not in vars(again) and again.digest() == snap.digest()


def test_search_requests_only_the_needed_attributes(
    tmp_path: Path, slapd: Slapd, proxy_factory: Callable[..., LdapProxy]
) -> None:
    proxy = proxy_factory(slapd.port)
    cfg = load(tmp_path, slapd, [proxy.uri])
    read(cfg)
    (request, *_) = proxy.search_requests()
    assert {a.lower() for a in request["attributes"]} == {a.lower() for a in cfg.routing.attributes.ldap_attributes()}
    assert "mailpassword" in {a.lower() for a in request["attributes"]}
    assert request["deref"] == 0, "derefAliases must be neverDerefAliases (syncprov rejects the others)"


def test_failover_to_the_next_uri_is_logged(tmp_path: Path, slapd: Slapd) -> None:
    dead = dead_uri()
    cfg = load(tmp_path, slapd, [dead, slapd.uri])
    with capture_logs() as logs:
        snap = read(cfg)
    assert snap.source == f"ldap:{slapd.uri}"
    assert any(e.dn.startswith("uid=alice,") for e in snap.entries)
    assert "_pending_sum" not in vars(snap), "one page is hashed in-process: no helper process for it"
    failover = [e for e in logs if e.get("uri") == dead]
    assert failover and failover[0]["log_level"] == "warning", logs


def test_all_uris_dead_names_each(tmp_path: Path, slapd: Slapd) -> None:
    dead = [dead_uri(), dead_uri()]
    with pytest.raises(SourceError) as err:
        read(load(tmp_path, slapd, dead))
    for uri in dead:
        assert uri in str(err.value)


def test_a_one_shot_read_waits_for_a_server_that_comes_back(tmp_path: Path, slapd: Slapd) -> None:
    """A cron `--once` during a server restart: the first round finds nobody, the next works."""
    proxy = LdapProxy(_free_port())  # nothing listens upstream: every connection is dropped
    cfg = load(tmp_path, slapd, [proxy.uri])
    assert isinstance(cfg.source, LdapSource) and cfg.source.connect_rounds == 3
    waits: list[float] = []

    def server_comes_back(seconds: float) -> None:
        waits.append(seconds)
        proxy.upstream = slapd.port

    with capture_logs() as logs:
        snap = ldapsource.read(cfg.source, cfg.routing.attributes, rounds=3, sleep=server_comes_back)
    assert waits == [1.0]
    assert any(e.dn.startswith("uid=alice,") for e in snap.entries)
    rounds = [e for e in logs if e["event"].startswith("no LDAP server answered")]
    assert [(e["log_level"], e["round"]) for e in rounds] == [("warning", 1)]


def test_rounds_end_with_every_server_named(tmp_path: Path, slapd: Slapd) -> None:
    dead = [dead_uri(), dead_uri()]
    cfg = load(tmp_path, slapd, dead, connect_rounds=2)
    assert isinstance(cfg.source, LdapSource)
    waits: list[float] = []
    with pytest.raises(Unreachable) as err:
        ldapsource.read(cfg.source, cfg.routing.attributes, rounds=cfg.source.connect_rounds, sleep=waits.append)
    assert waits == [1.0] and all(uri in str(err.value) for uri in dead)


def test_a_server_that_refuses_the_bind_is_not_asked_again(tmp_path: Path, slapd: Slapd) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    cfg = load(tmp_path, slapd, [dead_uri(), slapd.uri], bind_password_file=str(wrong))
    assert isinstance(cfg.source, LdapSource)
    waits: list[float] = []
    with pytest.raises(SourceError) as err:
        ldapsource.read(cfg.source, cfg.routing.attributes, rounds=3, sleep=waits.append)
    assert waits == [] and not isinstance(err.value, Unreachable)
    assert "invalidCredentials" in str(err.value)


def test_a_one_shot_sync_tries_again_but_the_agent_leaves_it_to_its_scheduler(tmp_path: Path, slapd: Slapd) -> None:
    cfg = load(tmp_path, slapd, [dead_uri()], connect_rounds=2, timeout=1)
    for follow, rounds in ((False, 2), (True, 1)):
        with capture_logs() as logs, pytest.raises(Unreachable):
            sync.Pipeline(cfg, follow=follow).read_source()
        tried = [e for e in logs if e["event"] == "LDAP server unavailable, trying the next"]
        assert len(tried) == rounds, (follow, logs)


def test_wrong_bind_password_is_a_clear_error(tmp_path: Path, slapd: Slapd) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    with pytest.raises(SourceError) as err:
        read(load(tmp_path, slapd, bind_password_file=str(wrong)))
    text = str(err.value)
    assert "invalidCredentials" in text and slapd.service_dn in text and slapd.uri in text
    assert "not-the-password" not in text


def test_failed_connections_close_their_sockets(tmp_path: Path, slapd: Slapd) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    with leaked_sockets() as leaks:
        for cfg in (load(tmp_path, slapd, [dead_uri()]), load(tmp_path, slapd, bind_password_file=str(wrong))):
            with contextlib.suppress(SourceError):
                read(cfg)
    assert not leaks, [str(w.message) for w in leaks]


def test_missing_bind_password_file_names_the_key(tmp_path: Path, slapd: Slapd) -> None:
    with pytest.raises(ConfigError) as err:
        read(load(tmp_path, slapd, bind_password_file=str(tmp_path / "nope.secret")))
    assert "source.ldap.bind_password_file" in str(err.value) and "nope.secret" in str(err.value)


def test_group_readable_bind_password_file_is_warned_about(tmp_path: Path, slapd: Slapd) -> None:
    secret = tmp_path / "bind.secret"
    secret.write_text(slapd.service_password)
    secret.chmod(0o640)
    with capture_logs() as logs:
        read(load(tmp_path, slapd, bind_password_file=str(secret)))
    warned = [e for e in logs if e["log_level"] == "warning" and e.get("path") == str(secret)]
    assert warned, logs
    secret.chmod(0o600)
    with capture_logs() as logs:
        read(load(tmp_path, slapd, bind_password_file=str(secret)))
    assert not [e for e in logs if e.get("path") == str(secret)]


@pytest.mark.parametrize("fault", ["drop", "kill-slapd", "stall"])
def test_connection_lost_mid_read_installs_nothing(
    tmp_path: Path, slapd_factory: Callable[..., Slapd], proxy_factory: Callable[..., LdapProxy], fault: str
) -> None:
    """A page missing in the middle of a paged read must fail the sync, never shrink the maps."""
    server = slapd_factory(extra_ldif=generate_users_ldif(1500))
    cfg = load(tmp_path, server, page_size=100, timeout=1)
    pipeline = sync.Pipeline(cfg)
    assert pipeline.run().status == "installed"
    before = outputs(tmp_path)
    server.modify("dn: uid=user000000,ou=users,dc=example,dc=org\nchangetype: delete\n")  # a real change pending

    stopped: list[int] = []

    def on_cut() -> None:
        if fault == "kill-slapd":
            server.kill()
        else:
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            stopped.append(server.pid)

    proxy = proxy_factory(server.port, cut_after=60_000, on_cut=None if fault == "drop" else on_cut)
    cfg2 = load(tmp_path, server, [proxy.uri], page_size=100, timeout=1)
    try:
        result = sync.Pipeline(cfg2).run()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert proxy.cut.is_set(), "the fault was never injected"
    assert result.status == "failed", result
    assert outputs(tmp_path) == before, "a partial read reached the maps"
    assert pipeline.state.read_json("status.json")["result"] == "failed"


# -- a first URI that does not speak LDAP ---------------------------------------------------
@pytest.fixture
def web() -> Iterator[HttpServer]:
    server = HttpServer()
    yield server
    server.close()


def test_an_answer_that_is_not_ldap_names_the_uri_and_the_next_is_used(
    tmp_path: Path, slapd: Slapd, web: HttpServer
) -> None:
    with capture_logs() as logs:
        snap = read(load(tmp_path, slapd, [web.uri, slapd.uri]))
    assert snap.source == f"ldap:{slapd.uri}"
    skipped = [e for e in logs if e.get("uri") == web.uri]
    assert skipped and skipped[0]["log_level"] == "warning" and "not LDAP" in skipped[0]["error"], logs


def once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ldapsync", "-c", str(config), "--once"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_once_falls_through_a_non_ldap_uri_without_a_traceback(tmp_path: Path, slapd: Slapd, web: HttpServer) -> None:
    proc = once(write_config(tmp_path, slapd, [web.uri, slapd.uri]))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and web.uri in proc.stderr and "not LDAP" in proc.stderr
    assert b"alice" in (tmp_path / "out" / "passwd").read_bytes()


def test_once_against_only_a_non_ldap_uri_is_a_clear_error(tmp_path: Path, slapd: Slapd, web: HttpServer) -> None:
    proc = once(write_config(tmp_path, slapd, [web.uri]))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"no LDAP server could be used: {web.uri}: the answer is not LDAP" in proc.stderr


@pytest.mark.parametrize("syncprov", [True, False])
def test_root_dse_is_read_with_the_connection(
    tmp_path: Path, slapd_factory: Callable[..., Slapd], syncprov: bool
) -> None:
    """One read gives the follower both its method (supportedControl) and polling's suffix."""
    server = slapd_factory(syncprov=syncprov)
    cfg = load(tmp_path, server)
    assert isinstance(cfg.source, LdapSource)
    connected = ldapsource.connect(cfg.source, root_dse=True)
    try:
        assert connected.root_dse is not None
        assert ("1.3.6.1.4.1.4203.1.9.1.1" in connected.root_dse.controls) == syncprov
        assert connected.root_dse.suffix_of(server.users_dn) == server.suffix
        csn = ldapsource.context_csn(connected, cfg.source.base_dn)
        assert (csn is not None) == syncprov
        assert ldapsource.alive(connected, 2.0)
    finally:
        connected.close()
    plain = ldapsource.connect(cfg.source)
    plain.close()
    assert plain.root_dse is None  # --once does not need it
