"""A throwaway OpenLDAP slapd for integration tests.

One instance = one private directory (cn=config, mdb data, ldapi socket,
logs), one free TCP port on 127.0.0.1 and one child process. Nothing on the
system is read or written besides the stock schemas in /etc/ldap/schema and
the modules in /usr/lib/ldap: never /etc/ldap/slapd.d nor /var/lib/ldap.

    with Slapd(tmp_path) as ldap:          # default data, syncprov, no limits
        ldap.search("(uid=alice)", ["mailPassword"], bind="service")

See tests/conftest.py for the ``slapd`` and ``slapd_factory`` fixtures; bench/ uses it too.
Fixture data (fixtures/ldif/) is read from the source tree this package lives in.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from ldapsync.testing.ports import free_port as _free_port  # noqa: F401 - tests import it from here
from ldapsync.testing.ports import free_ports


def _repo() -> Path:
    """The checkout whose fixtures/ this runs with: the source tree this module lives in, or,
    for an installed package (Debian's smoke test), the nearest fixtures/ above the working dir."""
    here = Path(__file__).resolve().parents[2]
    if (here / "fixtures" / "ldif").is_dir():
        return here
    for parent in (Path.cwd(), *Path.cwd().parents):
        if (parent / "fixtures" / "ldif").is_dir():
            return parent
    return here


REPO = _repo()
FIXTURES = REPO / "fixtures" / "ldif"
BASE_LDIF = FIXTURES / "base.ldif"
DEMO_LDIF = FIXTURES / "demo.ldif"
HOSTILE_LDIF = FIXTURES / "hostile.ldif"
BIND_SECRET = FIXTURES / "bind.secret"
DEFAULT_LDIF: tuple[Path, ...] = (BASE_LDIF, DEMO_LDIF, HOSTILE_LDIF)
UD_LDAP_SCHEMA = REPO / "ldapsync" / "schema" / "ud-ldap.ldif"

SYSTEM_SCHEMA_DIR = Path("/etc/ldap/schema")
SYSTEM_SCHEMAS = ("core", "cosine", "nis", "inetorgperson", "misc")
MODULE_DIR = Path("/usr/lib/ldap")

SUFFIX = "dc=example,dc=org"
USERS_DN = f"ou=users,{SUFFIX}"
SERVICE_DN = f"cn=ldapsync,ou=services,{SUFFIX}"
ROOTDN = f"cn=admin,{SUFFIX}"
ROOTPW = "admin-secret"  # test-only rootdn password
GENERATED_USER_PASSWORD = "generated-secret"  # plaintext of generate_users_ldif()'s hash

BindAs = Literal["root", "service", "anonymous"]
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
_START_TIMEOUT = 10.0
_CMD_TIMEOUT = 60.0
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux
DEFAULT_DB_MAX_SIZE = 1 << 30  # mdb map size: plenty for tests; bench passes more for big directories


class SlapdError(RuntimeError):
    """slapd/slapadd/ldapmodify failed; the message carries their stderr."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def missing_tools() -> str | None:
    """None if a throwaway slapd can run here, else a human-readable reason."""
    for tool in ("slapd", "slapadd"):
        if _which(tool) is None:
            return "slapd not installed: apt-get install slapd"
    for tool in ("ldapsearch", "ldapmodify"):
        if _which(tool) is None:
            return "ldap-utils not installed: apt-get install ldap-utils"
    if not (MODULE_DIR / "back_mdb.la").exists() and not (MODULE_DIR / "back_mdb.so").exists():
        return f"back_mdb module not found in {MODULE_DIR}: apt-get install slapd"
    return None


def ssha(password: str, salt: bytes | None = None) -> str:
    """An RFC 2307-style {SSHA} hash (salted SHA-1) as slapd and Dovecot accept it."""
    salt = os.urandom(8) if salt is None else salt
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


@functools.cache
def generated_user_hash() -> str:
    """The one {SSHA} hash of GENERATED_USER_PASSWORD used by generate_users_ldif()."""
    return ssha(GENERATED_USER_PASSWORD)


def generate_users_ldif(n: int, start: int = 0, base: str = USERS_DN) -> str:
    """LDIF for n simple valid users uid=userNNNNNN (start .. start+n-1).

    Every other user (odd numbers) has an external emailForward
    (userNNNNNN@elsewhere.example); all have mailPassword = generated_user_hash(),
    i.e. password GENERATED_USER_PASSWORD.
    """
    pw = generated_user_hash()
    chunks: list[str] = []
    for i in range(start, start + n):
        uid = f"user{i:06d}"
        fwd = f"emailForward: {uid}@elsewhere.example\n" if i % 2 else ""
        chunks.append(
            f"dn: uid={uid},{base}\n"
            "objectClass: inetOrgPerson\n"
            "objectClass: ldapsyncMailAccount\n"
            f"uid: {uid}\n"
            f"cn: User {i}\n"
            f"sn: {i}\n"
            f"{fwd}"
            f"mailPassword: {pw}\n"
        )
    return "\n".join(chunks)


@dataclass
class LdapEntry:
    """One entry from ldapsearch output. Attribute lookup is case-insensitive."""

    dn: str
    attrs: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> list[str]:
        for key, values in self.attrs.items():
            if key.lower() == name.lower():
                return values
        return []

    def __getitem__(self, name: str) -> list[str]:
        values = self.get(name)
        if not values:
            raise KeyError(name)
        return values

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get(name))


def parse_ldif(text: bytes) -> list[LdapEntry]:
    """Parse ldapsearch -LLL output (folded lines, base64 values; no URLs)."""
    entries: list[LdapEntry] = []
    for record in text.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines: list[bytes] = []
        for raw in record.split(b"\n"):
            if raw.startswith(b" ") and lines:
                lines[-1] += raw[1:]
            elif raw and not raw.startswith(b"#"):
                lines.append(raw)
        entry: LdapEntry | None = None
        for line in lines:
            name, _, rest = line.partition(b":")
            if rest.startswith(b":"):
                value = base64.b64decode(rest[1:].strip())
            else:
                value = rest[1:] if rest.startswith(b" ") else rest
            text_value = value.decode("utf-8", "surrogateescape")
            key = name.decode()
            if entry is None:
                if key.lower() != "dn":
                    break  # not an entry (e.g. a search reference)
                entry = LdapEntry(text_value)
            else:
                entry.attrs.setdefault(key, []).append(text_value)
        if entry is not None:
            entries.append(entry)
    return entries


def _accepts_unix(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _ldif_config_url(path: Path) -> str:
    return "file://" + urllib.parse.quote(str(path))


def _openssl(*args: str | Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise SlapdError("openssl not found: apt-get install openssl")
    proc = subprocess.run([exe, *map(str, args)], capture_output=True, timeout=_CMD_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise SlapdError(f"openssl {args[0]} failed with rc={proc.returncode}:\n{proc.stderr.decode(errors='replace')}")


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    """A throwaway self-signed CA (P-256, 1 day): returns (certificate, key) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN=ldapsync test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path], name: str = "server") -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost signed by ``ca``: returns (certificate, key)."""
    cert, key, csr = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=localhost",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "1", "-extfile", ext,
    )  # fmt: skip
    return cert, key


class Slapd:
    """A private slapd under ``workdir`` (created if needed; must be per test).

    The constructor writes cn=config and loads the data with ``slapadd -q``;
    ``start()`` (or ``with Slapd(...)``) runs the server.

    ldif_files: LDIF files loaded in order (default: base, demo, hostile).
    extra_ldif: more LDIF text loaded after the files (e.g. generate_users_ldif()).
    syncprov: add the syncprov overlay (and entryUUID/entryCSN indexes).
    sessionlog: syncprov's session log of that many writes (olcSpSessionlog): a consumer whose
        cookie is still in the log is sent the changed entries and the deleted entries' UUIDs,
        not a present message for every entry. None (default): no session log.
    service_unlimited: olcLimits lifting size/time limits for the service
        account; with False OpenLDAP's default size limit (500) applies to it.
    size_limit: the database-wide olcSizeLimit (None = OpenLDAP's default 500).
    tls: make a throwaway CA (``ca_file``) and a certificate for 127.0.0.1/localhost with
        openssl; StartTLS then works on ``uri`` and slapd also listens on ``ldaps_uri``.
    db_max_size: the mdb map size in bytes (olcDbMaxSize); slapadd fails with MDB_MAP_FULL
        once the data outgrows it. It is a sparse file's size, not memory.
    load_timeout: seconds each slapadd of the data may take (a million entries take minutes).
    """

    suffix = SUFFIX
    users_dn = USERS_DN
    service_dn = SERVICE_DN
    rootdn = ROOTDN
    rootpw = ROOTPW

    def __init__(
        self,
        workdir: Path,
        *,
        ldif_files: Sequence[Path | str] | None = None,
        extra_ldif: str | Sequence[str] = (),
        syncprov: bool = True,
        sessionlog: int | None = None,
        service_unlimited: bool = True,
        size_limit: int | None = None,
        tls: bool = False,
        db_max_size: int = DEFAULT_DB_MAX_SIZE,
        load_timeout: float = _CMD_TIMEOUT,
    ) -> None:
        reason = missing_tools()
        if reason is not None:
            raise SlapdError(reason)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.syncprov = syncprov
        self.sessionlog = sessionlog
        self.service_unlimited = service_unlimited
        self.size_limit = size_limit
        self.db_max_size = db_max_size
        self.config_dir = self.workdir / "slapd.d"
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "slapd.log"
        self.service_password = BIND_SECRET.read_text().strip()
        self.service_password_file = self._secret_file("service.secret", self.service_password)
        self._rootpw_file = self._secret_file("rootpw.secret", self.rootpw)
        self._socket_dir: Path | None = None
        self.socket_path = self._pick_socket_path()
        ports = free_ports(2 if tls else 1)  # chosen together: never the same twice
        self.port = ports[0]
        self.tls = tls
        self.tls_port = ports[1] if tls else None
        self.ca_file: Path | None = None
        self._tls_cert: tuple[Path, Path] | None = None
        if tls:
            tls_dir = self.workdir / "tls"
            ca = make_ca(tls_dir)
            self.ca_file = ca[0]
            self._tls_cert = make_server_cert(tls_dir, ca)
        self._proc: subprocess.Popen[bytes] | None = None
        self._env = dict(os.environ, LDAPNOINIT="1")
        self._env.pop("LDAPCONF", None)
        self._env.pop("LDAPRC", None)

        self._build_config()
        files = DEFAULT_LDIF if ldif_files is None else tuple(Path(p) for p in ldif_files)
        texts = [extra_ldif] if isinstance(extra_ldif, str) else list(extra_ldif)
        for i, text in enumerate(texts):
            path = self.workdir / f"extra-{i}.ldif"
            path.write_text(text)
            files += (path,)
        for path in files:
            self._run(
                ["slapadd", "-q", "-b", self.suffix, "-F", str(self.config_dir), "-l", str(path)], timeout=load_timeout
            )

    # ------------------------------------------------------------------ setup
    def _secret_file(self, name: str, secret: str) -> Path:
        """0600 file holding exactly ``secret`` (no trailing newline: ldap* -y)."""
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        os.chmod(path, 0o600)
        return path

    def _pick_socket_path(self) -> Path:
        path = self.workdir / "ldapi"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        self._socket_dir = Path(tempfile.mkdtemp(prefix="slapd-"))
        return self._socket_dir / "ldapi"

    def _config_ldif(self) -> str:
        uid, gid = os.getuid(), os.getgid()
        peer = f"gidNumber={gid}+uidNumber={uid},cn=peercred,cn=external,cn=auth"
        modules = ["back_mdb"] + (["syncprov"] if self.syncprov else [])
        schemas = [SYSTEM_SCHEMA_DIR / f"{name}.ldif" for name in SYSTEM_SCHEMAS]
        schemas.append(UD_LDAP_SCHEMA)
        svc = self.service_dn
        lines = [
            "dn: cn=config",
            "objectClass: olcGlobal",
            "cn: config",
            f"olcPidFile: {self.workdir / 'slapd.pid'}",
            f"olcArgsFile: {self.workdir / 'slapd.args'}",
            "olcLogLevel: none",
            *(
                [
                    f"olcTLSCACertificateFile: {self.ca_file}",
                    f"olcTLSCertificateFile: {self._tls_cert[0]}",
                    f"olcTLSCertificateKeyFile: {self._tls_cert[1]}",
                ]
                if self._tls_cert is not None
                else []
            ),
            "",
            "dn: cn=module{0},cn=config",
            "objectClass: olcModuleList",
            "cn: module{0}",
            f"olcModulePath: {MODULE_DIR}",
            *[f"olcModuleLoad: {m}" for m in modules],
            "",
            "dn: cn=schema,cn=config",
            "objectClass: olcSchemaConfig",
            "cn: schema",
            "",
            *[f"include: {_ldif_config_url(p)}\n" for p in schemas],
            "dn: olcDatabase={-1}frontend,cn=config",
            "objectClass: olcDatabaseConfig",
            "objectClass: olcFrontendConfig",
            "olcDatabase: {-1}frontend",
            *([f"olcSizeLimit: {self.size_limit}"] if self.size_limit is not None else []),
            "",
            "dn: olcDatabase={0}config,cn=config",
            "objectClass: olcDatabaseConfig",
            "olcDatabase: {0}config",
            f"olcAccess: {{0}}to * by dn.exact={peer} manage by * none",
            "",
            "dn: olcDatabase={1}mdb,cn=config",
            "objectClass: olcDatabaseConfig",
            "objectClass: olcMdbConfig",
            "olcDatabase: {1}mdb",
            f"olcDbDirectory: {self.data_dir}",
            f"olcSuffix: {self.suffix}",
            f"olcRootDN: {self.rootdn}",
            f"olcRootPW: {ssha(self.rootpw)}",
            f"olcDbMaxSize: {self.db_max_size}",
            "olcDbIndex: objectClass eq",
            "olcDbIndex: uid eq",
            *(["olcDbIndex: entryUUID eq", "olcDbIndex: entryCSN eq"] if self.syncprov else []),
            # Passwords: the service account reads both, anonymous may only
            # authenticate (simple bind) and never sees mailPassword.
            f'olcAccess: {{0}}to attrs=userPassword by dn.exact="{svc}" read by self =xw by anonymous auth by * none',
            f'olcAccess: {{1}}to attrs=mailPassword by dn.exact="{svc}" read by * none',
            f'olcAccess: {{2}}to * by dn.exact="{svc}" read by * read',
            *([f'olcLimits: {{0}}dn.exact="{svc}" size=unlimited time=unlimited'] if self.service_unlimited else []),
            "",
        ]
        if self.syncprov:
            lines += [
                "dn: olcOverlay={0}syncprov,olcDatabase={1}mdb,cn=config",
                "objectClass: olcOverlayConfig",
                "objectClass: olcSyncProvConfig",
                "olcOverlay: {0}syncprov",
                *([f"olcSpSessionlog: {self.sessionlog}"] if self.sessionlog is not None else []),
                "",
            ]
        return "\n".join(lines)

    def _build_config(self) -> None:
        for d in (self.config_dir, self.data_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(mode=0o700)
        config = self.workdir / "config.ldif"
        config.write_text(self._config_ldif())
        self._run(["slapadd", "-n0", "-F", str(self.config_dir), "-l", str(config)])

    def _run(
        self, argv: list[str], *, input: bytes | None = None, check: bool = True, timeout: float = _CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[bytes]:
        exe = _which(argv[0])
        if exe is None:
            raise SlapdError(f"{argv[0]} not found")
        proc = subprocess.run(
            [exe, *argv[1:]],
            input=input,
            capture_output=True,
            env=self._env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise SlapdError(
                f"{' '.join(argv)} failed with rc={proc.returncode}:\n"
                f"{proc.stderr.decode(errors='replace')}{proc.stdout.decode(errors='replace')}"
            )
        return proc

    # -------------------------------------------------------------- properties
    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        if self.tls_port is None:
            raise SlapdError("ldaps_uri needs Slapd(..., tls=True)")
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def ldapi_uri(self) -> str:
        return "ldapi://" + urllib.parse.quote(str(self.socket_path), safe="")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = _START_TIMEOUT, *, tcp: bool = True) -> None:
        """Start slapd (same port as before if restarting) and wait until it accepts.

        tcp=False listens on ldapi only: clients of ``uri`` are cut off while tests still
        change the directory through ``modify()`` (which uses ldapi), like a replica that
        goes on changing while the network to it is down.
        """
        if self.running:
            return
        last_error = ""
        for attempt in range(5):
            if attempt and tcp:  # another process took the port: retry on new ones
                ports = free_ports(1 if self.tls_port is None else 2)
                self.port = ports[0]
                if self.tls_port is not None:
                    self.tls_port = ports[1]
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            err = self._spawn_and_wait(timeout, tcp=tcp)
            if err is None:
                return
            last_error = err
            if "bind(" not in err and "Address already in use" not in err:
                break
        raise SlapdError(f"slapd did not start on {self.uri}:\n{last_error}")

    def _spawn_and_wait(self, timeout: float, *, tcp: bool = True) -> str | None:
        exe = _which("slapd")
        assert exe is not None
        urls = f"{self.uri}/ {self.ldapi_uri}" if tcp else self.ldapi_uri
        if tcp and self.tls_port is not None:
            urls += f" {self.ldaps_uri}/"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [exe, "-d", "0", "-h", urls, "-F", str(self.config_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env,
            )
        finally:
            log.close()
        # never leave an orphan slapd behind, even if the test forgets to stop it
        weakref.finalize(self, _kill_quietly, self._proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                return f"slapd exited with rc={rc}; log:\n{self._log_tail()}"
            try:
                if tcp:
                    for port in (self.port, self.tls_port):
                        if port is not None:
                            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                                pass
            except OSError:
                time.sleep(0.01)
                continue
            if _accepts_unix(self.socket_path):  # the file alone can exist before slapd listens
                return None
            time.sleep(0.01)
        self.kill()
        return f"slapd not accepting after {timeout:.1f}s; log:\n{self._log_tail()}"

    def _log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit within ``timeout``)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL (simulates a crash; mdb data survives)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """stop() then start(): same data, same port (unless it was taken meanwhile)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the out-of-tree socket dir (if one was needed)."""
        self.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- clients
    def bind_args(self, bind: BindAs) -> list[str]:
        """ldap* tool arguments for a simple bind as root/service/anonymous."""
        if bind == "root":
            return ["-x", "-D", self.rootdn, "-y", str(self._rootpw_file)]
        if bind == "service":
            return ["-x", "-D", self.service_dn, "-y", str(self.service_password_file)]
        return ["-x"]

    def modify(self, ldif_text: str, *, ldapi: bool = True, add: bool = False) -> None:
        """ldapmodify as the rootdn; LDIF may use changetype add/modify/delete/modrdn.

        add=True makes records without a changetype adds (ldapmodify -a).
        Raises SlapdError with ldapmodify's stderr on failure.
        """
        argv = ["ldapmodify", "-H", self.ldapi_uri if ldapi else self.uri, *self.bind_args("root")]
        if add:
            argv.append("-a")
        self._run(argv, input=ldif_text.encode())

    def modify_config(self, ldif_text: str) -> None:
        """ldapmodify on cn=config via SASL EXTERNAL over ldapi (e.g. change olcLimits)."""
        self._run(["ldapmodify", "-Q", "-Y", "EXTERNAL", "-H", self.ldapi_uri], input=ldif_text.encode())

    def fingerprint(self) -> bytes:
        """cn=config and every entry with its operational attributes (entryCSN, modifyTimestamp):
        equal before and after exactly when nothing changed the server's configuration or data."""
        argv = ["ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-Q", "-Y", "EXTERNAL", "-H", self.ldapi_uri]
        config = self._run([*argv, "-b", "cn=config"])
        data = self.ldapsearch("(objectClass=*)", "*", "+", bind="root", ldapi=True)
        if data.returncode != 0:
            raise SlapdError(f"ldapsearch of {self.suffix} failed with rc={data.returncode}:\n{data.stderr.decode()}")
        return config.stdout + b"\n" + data.stdout

    def ldapsearch(
        self,
        *args: str,
        bind: BindAs = "service",
        base: str | None = None,
        ldapi: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        """Raw ldapsearch -LLL (never raises on a non-zero rc: check .returncode).

        Extra ``args`` go after the standard ones (filter, attrs, -E ..., -z ...).
        """
        argv = [
            "ldapsearch",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-o",
            "nettimeout=10",
            "-H",
            self.ldapi_uri if ldapi else self.uri,
            *self.bind_args(bind),
            "-b",
            base or self.suffix,
            *args,
        ]
        return self._run(argv, check=False)

    def search(
        self,
        filter: str = "(objectClass=*)",
        attrs: Iterable[str] = (),
        *,
        base: str | None = None,
        scope: Literal["base", "one", "sub", "children"] = "sub",
        bind: BindAs = "root",
    ) -> list[LdapEntry]:
        """Entries matching ``filter``; raises SlapdError unless ldapsearch returns 0/32."""
        proc = self.ldapsearch("-s", scope, filter, *attrs, bind=bind, base=base)
        if proc.returncode == 32:  # noSuchObject: empty result
            return []
        if proc.returncode != 0:
            raise SlapdError(
                f"ldapsearch {filter} failed with rc={proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
            )
        return parse_ldif(proc.stdout)

    def context_csn(self) -> list[str]:
        """The suffix's contextCSN values: a syncrepl consumer whose cookie carries them has
        received every change made so far."""
        entries = self.search("(objectClass=*)", ["contextCSN"], base=self.suffix, scope="base")
        return entries[0].get("contextCSN") if entries else []

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Slapd {self.uri} {state} in {self.workdir}>"
