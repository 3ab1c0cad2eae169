"""TLS against a real slapd: the server certificate is verified unless `tls_verify: false`.

Every slapd here has its own throwaway CA (tests/slapd.py, ``tls=True``); a second, unrelated
CA stands in for "a certificate the client must not trust". What the client put on the wire
is recorded by a small TCP proxy, so "no plaintext bind after a failed StartTLS" is observed,
not inferred.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from slapd import Slapd, make_ca
from structlog.testing import capture_logs

from ldapsync import config as config_mod
from ldapsync import ldapsource, watch
from ldapsync.config import LdapSource
from ldapsync.directory import Snapshot
from ldapsync.errors import SourceError

pytestmark = pytest.mark.slapd

FILTER = "(objectClass=inetOrgPerson)"
CERT_PROBLEM = "CERTIFICATE_VERIFY_FAILED"
DISABLED_WARNING = "TLS certificate verification is disabled"
EXPORTERS: list[dict[str, Any]] = [
    {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "map_type": "texthash"},
    {"kind": "dovecot-passwd", "path": "out/passwd"},
]


# -- a recording TCP proxy ------------------------------------------------------------------
class RecordingProxy:
    """Listens on ``host``:<free port>, forwards to 127.0.0.1:``upstream``, records client bytes."""

    def __init__(self, upstream: int, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.client_bytes = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def uri(self, scheme: str = "ldap") -> str:
        return f"{scheme}://{self.host}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                return
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.client_bytes += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def sent(self) -> bytes:
        with self._lock:
            return bytes(self.client_bytes)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., RecordingProxy]]:
    made: list[RecordingProxy] = []

    def make(upstream: int, host: str = "127.0.0.1") -> RecordingProxy:
        made.append(RecordingProxy(upstream, host))
        return made[-1]

    yield make
    for p in made:
        p.close()


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture
def tls_slapd(read_only_slapd_factory: Callable[..., Slapd]) -> Slapd:
    """Most tests here only read: they share one TLS slapd per module."""
    return read_only_slapd_factory(tls=True)


@pytest.fixture
def own_tls_slapd(slapd_factory: Callable[..., Slapd]) -> Slapd:
    """A TLS slapd of the test's own, for one that changes its data or configuration."""
    return slapd_factory(tls=True)


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A CA that signed nothing any server here presents."""
    cert, _ = make_ca(tmp_path / "other-ca", "other")
    return cert


def write_config(tmp: Path, server: Slapd, uris: list[str], **ldap: Any) -> Path:
    doc = {
        "domain": "example.org",
        "source": {
            "ldap": {
                "uri": uris,
                "bind_dn": server.service_dn,
                "bind_password_file": str(server.service_password_file),
                "base_dn": server.users_dn,
                "filter": FILTER,
                "timeout": 5,
                **{k: str(v) if isinstance(v, Path) else v for k, v in ldap.items()},
            }
        },
        "state_dir": "state",
        "exporters": EXPORTERS,
    }
    path = tmp / "ldapsync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def source(tmp: Path, server: Slapd, uris: list[str], **ldap: Any) -> tuple[config_mod.Config, LdapSource]:
    cfg = config_mod.load(write_config(tmp, server, uris, **ldap))
    assert isinstance(cfg.source, LdapSource)
    return cfg, cfg.source


def read(tmp: Path, server: Slapd, uris: list[str], **ldap: Any) -> Snapshot:
    cfg, src = source(tmp, server, uris, **ldap)
    return ldapsource.read(src, cfg.routing.attributes)


def has_alice(snap: Snapshot) -> bool:
    return any(e.dn.startswith("uid=alice,") for e in snap.entries)


def require_tls_for_simple_binds(server: Slapd) -> None:
    """slapd refuses simple binds below SSF 64: plain TCP (0) fails, TLS and ldapi (71) pass."""
    server.modify_config("dn: cn=config\nchangetype: modify\nreplace: olcSecurity\nolcSecurity: simple_bind=64\n")


def password_on_the_wire(proxy: RecordingProxy, server: Slapd) -> bool:
    return server.service_password.encode() in proxy.sent()


def outputs(tmp: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((tmp / "out").iterdir())}


# -- ldaps:// --------------------------------------------------------------------------------
def test_ldaps_with_the_servers_ca_reads_the_directory(tmp_path: Path, tls_slapd: Slapd) -> None:
    snap = read(tmp_path, tls_slapd, [tls_slapd.ldaps_uri], ca_file=tls_slapd.ca_file)
    assert snap.source == f"ldap:{tls_slapd.ldaps_uri}"
    assert has_alice(snap)


def test_ldaps_without_ca_file_fails_on_the_certificate(tmp_path: Path, tls_slapd: Slapd) -> None:
    """The system CAs do not know the throwaway CA: verification is on by default."""
    with pytest.raises(SourceError) as err:
        read(tmp_path, tls_slapd, [tls_slapd.ldaps_uri])
    assert CERT_PROBLEM in str(err.value) and tls_slapd.ldaps_uri in str(err.value)


def test_ldaps_with_another_ca_fails(tmp_path: Path, tls_slapd: Slapd, other_ca: Path) -> None:
    with pytest.raises(SourceError) as err:
        read(tmp_path, tls_slapd, [tls_slapd.ldaps_uri], ca_file=other_ca)
    assert CERT_PROBLEM in str(err.value)


def test_ldaps_certificate_for_another_name_fails(
    tmp_path: Path, tls_slapd: Slapd, proxy_factory: Callable[..., RecordingProxy]
) -> None:
    """Right CA, wrong name: the certificate is for 127.0.0.1/localhost, the URI says 127.0.0.2."""
    proxy = proxy_factory(tls_slapd.tls_port, host="127.0.0.2")
    with pytest.raises(SourceError) as err:
        read(tmp_path, tls_slapd, [proxy.uri("ldaps")], ca_file=tls_slapd.ca_file)
    assert "127.0.0.2" in str(err.value) and "match" in str(err.value)
    # control: the same proxy with a name the certificate carries is fine
    good = proxy_factory(tls_slapd.tls_port)
    assert has_alice(read(tmp_path, tls_slapd, [good.uri("ldaps")], ca_file=tls_slapd.ca_file))


def test_once_without_ca_file_installs_nothing(tmp_path: Path, own_tls_slapd: Slapd) -> None:
    """End to end: `ldapsync --once` refuses the unverifiable server and keeps every output."""
    tls_slapd = own_tls_slapd  # changes the directory

    def once(**ldap: Any) -> subprocess.CompletedProcess[str]:
        path = write_config(tmp_path, tls_slapd, [tls_slapd.ldaps_uri], **ldap)
        return subprocess.run(
            [sys.executable, "-m", "ldapsync", "-c", str(path), "--once"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning"),
            check=False,
        )

    good = once(ca_file=tls_slapd.ca_file)
    assert good.returncode == 0, good.stderr
    before = outputs(tmp_path)
    assert b"alice" in before["passwd"]
    # a change a successful read would install
    tls_slapd.modify(
        "dn: uid=alice,ou=users,dc=example,dc=org\nchangetype: modify\nreplace: emailForward\n"
        "emailForward: alice@tls-test.example\n"
    )

    bad = once()
    assert bad.returncode != 0
    assert CERT_PROBLEM in bad.stderr + bad.stdout
    assert outputs(tmp_path) == before

    # control: with the CA the change does arrive, so the failure above really kept it out
    assert once(ca_file=tls_slapd.ca_file).returncode == 0
    assert b"alice@tls-test.example" in outputs(tmp_path)["alias"]


# -- StartTLS --------------------------------------------------------------------------------
def test_start_tls_binds_over_tls(
    tmp_path: Path, own_tls_slapd: Slapd, proxy_factory: Callable[..., RecordingProxy]
) -> None:
    tls_slapd = own_tls_slapd  # require_tls_for_simple_binds changes its configuration
    require_tls_for_simple_binds(tls_slapd)
    proxy = proxy_factory(tls_slapd.port)
    # control: without StartTLS the server refuses the bind and the password crossed in clear
    with pytest.raises(SourceError, match="confidentialityRequired"):
        read(tmp_path, tls_slapd, [proxy.uri()])
    assert password_on_the_wire(proxy, tls_slapd)

    proxy = proxy_factory(tls_slapd.port)
    snap = read(tmp_path, tls_slapd, [proxy.uri()], start_tls=True, ca_file=tls_slapd.ca_file)
    assert has_alice(snap)
    assert not password_on_the_wire(proxy, tls_slapd)


def test_start_tls_with_another_ca_never_binds_in_clear(
    tmp_path: Path, tls_slapd: Slapd, other_ca: Path, proxy_factory: Callable[..., RecordingProxy]
) -> None:
    proxy = proxy_factory(tls_slapd.port)
    with pytest.raises(SourceError) as err:
        read(tmp_path, tls_slapd, [proxy.uri()], start_tls=True, ca_file=other_ca)
    assert CERT_PROBLEM in str(err.value)
    sent = proxy.sent()
    assert sent, "the client never reached the server"
    assert tls_slapd.service_password.encode() not in sent and tls_slapd.service_dn.encode() not in sent


# -- tls_verify: false -----------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["ldaps", "start_tls"])
def test_tls_verify_false_connects_and_warns(tmp_path: Path, tls_slapd: Slapd, scheme: str) -> None:
    if scheme == "ldaps":
        uris, extra = [tls_slapd.ldaps_uri], {}
    else:
        uris, extra = [tls_slapd.uri], {"start_tls": True}
    with capture_logs() as logs:
        snap = read(tmp_path, tls_slapd, uris, tls_verify=False, **extra)
    assert has_alice(snap)
    warned = [e for e in logs if e["event"] == DISABLED_WARNING]
    assert warned and warned[0]["log_level"] == "warning", logs


def test_verified_tls_does_not_warn(tmp_path: Path, tls_slapd: Slapd) -> None:
    with capture_logs() as logs:
        read(tmp_path, tls_slapd, [tls_slapd.ldaps_uri], ca_file=tls_slapd.ca_file)
    assert not [e for e in logs if e["event"] == DISABLED_WARNING]


# -- failover --------------------------------------------------------------------------------
def test_failover_past_an_unverifiable_server(tmp_path: Path, slapd_factory: Callable[..., Slapd]) -> None:
    """Two servers, two CAs, ca_file trusts only the second: the first is skipped and named."""
    untrusted, trusted = slapd_factory(tls=True), slapd_factory(tls=True)
    with capture_logs() as logs:
        snap = read(tmp_path, trusted, [untrusted.ldaps_uri, trusted.ldaps_uri], ca_file=trusted.ca_file)
    assert snap.source == f"ldap:{trusted.ldaps_uri}" and has_alice(snap)
    skipped = [e for e in logs if e.get("uri") == untrusted.ldaps_uri and e["log_level"] == "warning"]
    assert skipped and CERT_PROBLEM in skipped[0]["error"], logs


# -- the live agent's stream connection ------------------------------------------------------
@contextlib.contextmanager
def stream_connection(cfg: config_mod.Config, src: LdapSource) -> Iterator[tuple[Any, str]]:
    """The follower's path: the check connection (StartTLS, bind), then the stream beside it."""
    follower = watch.Follower(cfg, watch.Mirror(), lambda _: None)
    check = ldapsource.connect(src, root_dse=True)
    try:
        with follower._stream(src, check) as conn:
            yield conn, check.uri
    finally:
        check.close()


def test_stream_connection_with_start_tls_is_encrypted(
    tmp_path: Path, own_tls_slapd: Slapd, proxy_factory: Callable[..., RecordingProxy]
) -> None:
    tls_slapd = own_tls_slapd  # require_tls_for_simple_binds changes its configuration
    require_tls_for_simple_binds(tls_slapd)
    proxy = proxy_factory(tls_slapd.port)
    cfg, src = source(tmp_path, tls_slapd, [proxy.uri()], start_tls=True, ca_file=tls_slapd.ca_file)
    with stream_connection(cfg, src) as (conn, uri):
        assert uri == proxy.uri() and conn.bound
        assert isinstance(conn.socket, ssl.SSLSocket)
    assert not password_on_the_wire(proxy, tls_slapd)


def test_stream_connection_with_another_ca_does_not_connect(
    tmp_path: Path, tls_slapd: Slapd, other_ca: Path, proxy_factory: Callable[..., RecordingProxy]
) -> None:
    proxy = proxy_factory(tls_slapd.port)
    cfg, src = source(tmp_path, tls_slapd, [proxy.uri()], start_tls=True, ca_file=other_ca)
    with pytest.raises(SourceError) as err, stream_connection(cfg, src):
        pass
    assert CERT_PROBLEM in str(err.value) and proxy.uri() in str(err.value)
    sent = proxy.sent()
    assert sent and tls_slapd.service_password.encode() not in sent


def test_stream_connection_over_ldaps_with_another_ca_does_not_connect(
    tmp_path: Path, tls_slapd: Slapd, other_ca: Path
) -> None:
    cfg, src = source(tmp_path, tls_slapd, [tls_slapd.ldaps_uri], ca_file=other_ca)
    with pytest.raises(SourceError) as err, stream_connection(cfg, src):
        pass
    assert CERT_PROBLEM in str(err.value)


def test_stream_connection_to_a_server_refusing_start_tls_fails_fast_and_clearly(tmp_path: Path, slapd: Slapd) -> None:
    cfg, src = source(tmp_path, slapd, [slapd.uri], start_tls=True)  # this slapd has no certificate
    started = time.monotonic()
    with pytest.raises(SourceError) as err, stream_connection(cfg, src):
        pass
    assert time.monotonic() - started < src.timeout + 1 and "protocolError" in str(err.value)
