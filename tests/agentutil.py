"""Helpers for tests that run the ldapsync agent as a real subprocess.

    setup = AgentSetup.create(tmp_path, slapd)          # config, dirs, reload-counting hook
    with AgentProcess(setup.config) as agent:           # `python -m ldapsync -c CONFIG`
        agent.wait_log("sync done")
        wait_until(lambda: setup.postmap_q("bob@example.org") == "bob@elsewhere.example")

The agent logs one JSON object per line on stderr (it is not a tty); AgentProcess keeps
that in a file and parses it on demand, so a test can wait for a log event without sleeping.
NotifyListener is a NOTIFY_SOCKET datagram socket as systemd would provide.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from ldapsync.state import lmdbstore

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "example.org"
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll predicate() until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what or predicate!r}")
        time.sleep(interval)


def postmap_path() -> str | None:
    return shutil.which("postmap", path=_SBIN_PATH)


def file_states(paths: list[Path]) -> dict[str, tuple[bytes, int] | None]:
    """Content and mtime_ns of each file (None if missing): 'unchanged' means both equal."""
    out: dict[str, tuple[bytes, int] | None] = {}
    for p in paths:
        try:
            out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
        except FileNotFoundError:
            out[str(p)] = None
    return out


@dataclass
class AgentSetup:
    """One agent's world in its own directory: config, static file, maps, state, hook log."""

    root: Path
    doc: dict[str, Any]
    config: Path = field(init=False)
    maps: Path = field(init=False)
    postfix_dir: Path = field(init=False)
    reload_log: Path = field(init=False)
    static: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.root / "ldapsync.yaml"
        self.maps = self.root / "maps"
        self.postfix_dir = self.root / "postfix"
        self.reload_log = self.root / "reloads.log"
        self.static = self.root / "static.yaml"
        self.state = self.root / "state"

    @classmethod
    def create(
        cls,
        root: Path,
        uris: list[str] | str,
        *,
        bind_dn: str | None = None,
        bind_password_file: Path | None = None,
        watch: str = "auto",
        poll_interval: float | None = None,
        agent: Mapping[str, float] | None = None,
        static: Mapping[str, Any] | None = None,
        base_dn: str = "ou=users,dc=example,dc=org",
        timeout: float = 2.0,
    ) -> AgentSetup:
        """Write a config for an LDAP source; agent=None keeps the agent defaults.

        Outputs: postfix-virtual (lmdb) and dovecot-passwd under root/maps; a reload hook
        that appends one line to root/reloads.log per run.
        """
        root.mkdir(parents=True, exist_ok=True)
        setup = cls(root, {})
        setup.maps.mkdir(exist_ok=True)
        setup.postfix_dir.mkdir(exist_ok=True)
        main_cf = setup.postfix_dir / "main.cf"
        main_cf.touch()
        past = time.time() - 3600
        os.utime(main_cf, (past, past))  # postmap sleeps ~2 s while main.cf is only seconds old
        ldap: dict[str, Any] = {
            "uri": [uris] if isinstance(uris, str) else list(uris),
            "base_dn": base_dn,
            "timeout": timeout,
            "watch": watch,
        }
        if bind_dn is not None:
            ldap["bind_dn"] = bind_dn
            ldap["bind_password_file"] = str(bind_password_file)
        if poll_interval is not None:
            ldap["poll_interval"] = poll_interval
        doc: dict[str, Any] = {
            "domain": DOMAIN,
            "source": {"ldap": ldap},
            "state_dir": str(setup.state),
            "postfix": {"config_dir": str(setup.postfix_dir)},
            "hooks": {"reload": [["sh", "-c", f"echo reload >> '{setup.reload_log}'"]]},
            "exporters": [
                {"kind": "postfix-virtual", "path": str(setup.maps / "virtual"), "map_type": "lmdb"},
                {"kind": "dovecot-passwd", "path": str(setup.maps / "passwd")},
            ],
        }
        if agent is not None:
            doc["agent"] = dict(agent)
        if static is not None:
            setup.write_static(static)
            doc["static"] = str(setup.static)
        setup.doc = doc
        setup.write_config()
        return setup

    @classmethod
    def for_slapd(cls, root: Path, slapd: Any, **kwargs: Any) -> AgentSetup:
        """Config for a tests/slapd.py Slapd, bound as its service account (limits apply)."""
        return cls.create(
            root, slapd.uri, bind_dn=slapd.service_dn, bind_password_file=slapd.service_password_file, **kwargs
        )

    # -- editing -------------------------------------------------------------------------
    def write_config(self, text: str | None = None) -> None:
        """Atomically replace the config (as an editor would): one clean watch event."""
        _write_atomic(self.config, text if text is not None else yaml.safe_dump(self.doc, sort_keys=False))

    def write_static(self, doc: Mapping[str, Any] | str) -> None:
        _write_atomic(self.static, doc if isinstance(doc, str) else yaml.safe_dump(dict(doc), sort_keys=False))

    # -- reading the outputs ----------------------------------------------------------------
    @property
    def virtual(self) -> Path:
        return self.maps / "virtual"

    @property
    def passwd(self) -> Path:
        return self.maps / "passwd"

    def output_files(self) -> list[Path]:
        return [self.virtual, self.maps / "virtual.lmdb", self.passwd]

    def postmap_q(self, key: str) -> str | None:
        """The installed lmdb map's answer for key, via the real `postmap -q` (None: not found)."""
        exe = postmap_path()
        assert exe is not None, "postmap not installed"
        if not (self.maps / "virtual.lmdb").exists():
            return None
        proc = subprocess.run(
            [exe, "-c", str(self.postfix_dir), "-q", key, f"lmdb:{self.virtual}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode == 1:
            return None
        if proc.returncode != 0:
            raise AssertionError(f"postmap -q {key} failed rc={proc.returncode}: {proc.stderr}")
        return proc.stdout.strip()

    def wait_map(self, key: str, expected: str | None, timeout: float = 10.0) -> None:
        wait_until(
            lambda: self.postmap_q(key) == expected,
            timeout,
            interval=0.03,
            what=f"postmap -q {key} == {expected!r} (now {self.postmap_q(key)!r})",
        )

    def passwd_users(self) -> set[str]:
        try:
            lines = self.passwd.read_text().splitlines()
        except FileNotFoundError:
            return set()
        return {line.split(":", 1)[0] for line in lines if line}

    def saved_cookie(self) -> str | None:
        """The sync cookie in the store, written after each sync with the directory it
        installed (None: nothing saved yet)."""
        meta = lmdbstore.peek(self.state)
        cookie = meta.get("cookie") if meta is not None else None
        return cookie.decode(errors="replace") if cookie else None

    def reloads(self) -> int:
        try:
            return self.reload_log.read_text().count("reload")
        except FileNotFoundError:
            return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class AgentProcess:
    """`python -m ldapsync -c CONFIG` as a child, stderr (JSON logs) captured to a file."""

    def __init__(self, config: Path, *, env: Mapping[str, str] | None = None, log_path: Path | None = None):
        self.config = config
        self.log_path = log_path or config.with_name(f"agent-{time.monotonic_ns()}.log")
        child_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        child_env.update(env or {})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child, closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ldapsync", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=child_env,
            cwd=str(config.parent),
        )
        self.stopped = False

    # -- logs -----------------------------------------------------------------------------
    def logs(self) -> list[dict[str, Any]]:
        """Every log record so far; a line that is not JSON becomes {"event": "<raw>", "raw": True}."""
        records: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(re.sub(r"^<[0-7]>", "", line))  # the syslog priority prefix
            except ValueError:
                rec = {"event": line, "raw": True}
            records.append(rec if isinstance(rec, dict) else {"event": line, "raw": True})
        return records

    def mark(self) -> int:
        """A position in the log: pass as since= to look only at what came after."""
        return len(self.logs())

    def find(self, event: str, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        return [
            r for r in self.logs()[since:] if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
        ]

    def wait_log(self, event: str, since: int = 0, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first record with this event (and fields) after since; fails early if the agent died."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event, since, **match)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited rc={self.proc.returncode} before logging {event!r}:\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {event!r} {match or ''} log within {timeout:.1f}s:\n{self.tail()}")
            time.sleep(0.02)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def errors(self, since: int = 0) -> list[dict[str, Any]]:
        return [r for r in self.logs()[since:] if r.get("level") in ("error", "critical") or r.get("raw")]

    # -- process control --------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took)."""
        if self.stopped:
            self.resume()
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class NotifyListener:
    """A NOTIFY_SOCKET (AF_UNIX datagram) that records what the agent tells systemd.

    on_ready (optional) runs in the receiving thread the moment READY=1 arrives, e.g. to
    check that the maps already exist at that instant.
    """

    def __init__(self, on_ready: Callable[[], Any] | None = None):
        self._dir = Path(tempfile.mkdtemp(prefix="ldapsync-notify-"))  # short: sun_path is 108 bytes
        self.path = self._dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.ready_check: Any = None
        self._on_ready = on_ready
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._halt.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1" and self._on_ready is not None and self.ready_check is None:
                    self.ready_check = self._on_ready()
                with self._lock:
                    self.messages.append((now, line))

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def lines(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [m for _, m in self.messages if m.startswith(prefix)]

    def times(self, line: str) -> list[float]:
        with self._lock:
            return [t for t, m in self.messages if m == line]

    def wait(self, prefix: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        return wait_until(
            lambda: len(self.lines(prefix)) >= count and self.lines(prefix),
            timeout,
            what=f"{count} x {prefix!r} on NOTIFY_SOCKET (got {self.lines()[-5:]})",
        )

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=2)
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- a throwaway 389 Directory Server (persistent search, no syncrepl) ------------------------

DS389_DEFAULTS = Path("/usr/share/dirsrv/inf/defaults.inf")
DS389_ROOT_DN = "cn=Directory Manager"
DS389_ROOT_PW = "ds389-admin-secret"  # test-only


def ds389_missing() -> str | None:
    """None if a private 389-ds instance can be created here, else why not."""
    for tool in ("dscreate", "ns-slapd", "ldapmodify"):
        if shutil.which(tool, path=_SBIN_PATH) is None:
            return f"{tool} not found: apt-get install 389-ds-base ldap-utils"
    if not DS389_DEFAULTS.exists() or not Path("/etc/dirsrv/schema").is_dir():
        return f"{DS389_DEFAULTS} or /etc/dirsrv/schema missing: apt-get install 389-ds-base"
    return None


def _ds389_schema(openldap_ldif: Path) -> str:
    """ldapsync's cn=config schema (olcAttributeTypes/olcObjectClasses) as a 389-ds schema file."""
    lines: list[str] = []
    for raw in openldap_ldif.read_text().splitlines():
        if raw.startswith((" ", "\t")) and lines:
            lines[-1] += " " + raw.strip()
        elif raw and not raw.startswith("#"):
            lines.append(raw)
    out = ["dn: cn=schema"]
    for line in lines:
        name, _, value = line.partition(":")
        if name == "olcAttributeTypes":
            out.append("attributeTypes:" + value + " X-ORIGIN 'ldapsync'")
        elif name == "olcObjectClasses":
            out.append("objectClasses:" + value + " X-ORIGIN 'ldapsync'")
    return "\n".join(out) + "\n"


def _kill_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class Ds389:
    """A private 389-ds instance: every file under one temp dir, ns-slapd as a foreground child.

    lib389 only looks for instances under $PREFIX, so the instance gets its own PREFIX with
    a defaults.inf whose system paths point into the temp dir (and with_systemd = 0).
    """

    suffix = "dc=example,dc=org"

    def __init__(self, name: str = "t") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ds389-"))  # short: the ldapi socket path is limited
        self.name = name
        self.prefix = self.root / "p"
        self.config_dir = self.prefix / "etc" / "dirsrv" / f"slapd-{name}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self._env = dict(os.environ, PREFIX=str(self.prefix))
        self._create()

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def _create(self) -> None:
        p = str(self.prefix)
        inf_dir = self.prefix / "share" / "dirsrv" / "inf"
        inf_dir.mkdir(parents=True)
        defaults = DS389_DEFAULTS.read_text()
        for old, new in (
            ("/etc/dirsrv", f"{p}/etc/dirsrv"),
            ("= /var/lib/dirsrv", f"= {p}/var/lib/dirsrv"),
            ("= /var/log/dirsrv", f"= {p}/var/log/dirsrv"),
            ("= /run/", f"= {p}/run/"),
        ):
            defaults = defaults.replace(old, new)
        settings = {
            "sysconf_dir": f"{p}/etc",
            "initconfig_dir": f"{p}/etc/default",
            "local_state_dir": f"{p}/var",
            "with_systemd": "0",
            "tmpfiles_d": f"{p}/tmpfiles.d",
        }
        defaults = "\n".join(
            f"{line.split('=')[0].strip()} = {settings[line.split('=')[0].strip()]}"
            if "=" in line and line.split("=")[0].strip() in settings
            else line
            for line in defaults.splitlines()
        )
        (inf_dir / "defaults.inf").write_text(defaults + "\n")
        etc = self.prefix / "etc" / "dirsrv"
        etc.mkdir(parents=True)
        shutil.copytree("/etc/dirsrv/schema", etc / "schema")
        if Path("/etc/dirsrv/config").is_dir():
            shutil.copytree("/etc/dirsrv/config", etc / "config")
        for d in ("etc/default", "run/lock", "var/log", "tmpfiles.d"):
            (self.prefix / d).mkdir(parents=True, exist_ok=True)
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        inf = self.root / "instance.inf"
        inf.write_text(
            "[general]\nconfig_version = 2\nfull_machine_name = localhost\nselinux = False\nstart = False\n"
            "systemd = False\nstrict_host_checking = False\n"
            f"[slapd]\nsysconf_dir = {p}/etc\ninitconfig_dir = {p}/etc/default\nprefix = {p}\n"
            f"instance_name = {self.name}\nport = {self.port}\nsecure_port = 0\nself_sign_cert = False\n"
            f"root_password = {DS389_ROOT_PW}\nuser = {user}\ngroup = {group}\n"
            f"cert_dir = {self.config_dir}\nconfig_dir = {self.config_dir}\nschema_dir = {self.config_dir}/schema\n"
            f"[backend-userroot]\nsuffix = {self.suffix}\ncreate_suffix_entry = False\n"
        )
        proc = subprocess.run(
            [shutil.which("dscreate", path=_SBIN_PATH) or "dscreate", "from-file", str(inf)],
            capture_output=True,
            text=True,
            env=self._env,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"dscreate failed rc={proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        (self.config_dir / "schema" / "98ldapsync.ldif").write_text(
            _ds389_schema(REPO / "ldapsync" / "schema" / "ud-ldap.ldif")
        )

    def start(self, timeout: float = 30.0) -> None:
        exe = shutil.which("ns-slapd", path=_SBIN_PATH)
        assert exe is not None
        log = open(self.root / "ns-slapd.out", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [exe, "-D", str(self.config_dir), "-i", str(self.root / "ns-slapd.pid"), "-d", "0"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env,
            )
        finally:
            log.close()
        weakref.finalize(self, _kill_child, self.proc)  # no orphan ns-slapd, even if close() is never called
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ns-slapd exited rc={self.proc.returncode}: {self.errors_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ns-slapd not accepting after {timeout}s: {self.errors_log()}") from None
                time.sleep(0.05)

    def errors_log(self) -> str:
        logs = list((self.prefix / "var" / "log").glob("dirsrv/*/errors"))
        return logs[0].read_text(errors="replace")[-3000:] if logs else "(no errors log)"

    def modify(self, ldif_text: str, *, add: bool = False) -> None:
        """ldapmodify as the Directory Manager."""
        exe = shutil.which("ldapmodify", path=_SBIN_PATH)
        assert exe is not None
        argv = [exe, "-x", "-H", self.uri, "-D", DS389_ROOT_DN, "-w", DS389_ROOT_PW, *(["-a"] if add else [])]
        proc = subprocess.run(
            argv,
            input=ldif_text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=dict(os.environ, LDAPNOINIT="1"),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ldapmodify on 389-ds failed rc={proc.returncode}: {proc.stderr}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def set_stored_cookie(state: Path, cookie: bytes) -> None:
    """Replace the cookie in a stopped agent's store (a test's stand-in for a restored backup)."""
    import lmdb

    env = lmdb.open(str(state / lmdbstore.STORE_NAME), max_dbs=len(lmdbstore.INDEX_TABLES) + 2)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"cookie", cookie, db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()
