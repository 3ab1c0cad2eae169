"""Throwaway mail servers for the end-to-end tests: Postfix, Dovecot and smtp-sink.

Every server is a child of the test, listens on a free 127.0.0.1 port and keeps all its
state in one work directory; nothing on the system is started, stopped or written.

Each server starts from what Debian 12 ships (Postfix: main.cf.debian, main.cf.tls and
master.cf.dist from /usr/share/postfix with postinst's "Internet Site" answers; Dovecot:
dovecot-core's /etc/dovecot tree from /usr/share/dovecot). The role configuration is never
written here: it is read verbatim from docs/snippets/ (the files docs/deployment.md tells
admins to install) and installed where that page says; only the placeholders listed in
``Substitutions`` (paths, host names, ports) are replaced. What this module adds is what
differs for a throwaway instance (its directories, log file and ports, "the Internet"
pointing at a sink), listed in docs/deployment.md, "How the snippets are tested".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ldapsync.testing.ports import free_port, free_ports

REPO = Path(__file__).resolve().parents[2]
SNIPPETS = REPO / "docs" / "snippets"
# the console script next to the running interpreter (the venv), unless LDAPSYNC_BIN says otherwise
LDAPSYNC = Path(os.environ.get("LDAPSYNC_BIN") or Path(sys.executable).parent / "ldapsync")
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
START_TIMEOUT = 20.0
UNIT_UMASK = 0o077  # ldapsync runs with the umask of systemd/ldapsync.service (UMask=0077)
DELIVERY_WAIT = 20.0
OUTSIDE = "someone@outside.example"  # an Internet sender/recipient

# Placeholders in docs/snippets/ and what a test host needs instead (documented in
# docs/deployment.md, "How the snippets are tested").
MAPS_DIR = "/etc/postfix/ldapsync"
DOVECOT_ETC = "/etc/dovecot"  # the passwd-file goes to /etc/dovecot/ldapsync/, which ldapsync creates
POSTFIX_SPOOL = "/var/spool/postfix"
STATE_DIR = "/var/lib/ldapsync"
ETC_DIR = "/etc/ldapsync"
CERT_FILE = "/etc/ssl/certs/ssl-cert-snakeoil.pem"
KEY_FILE = "/etc/ssl/private/ssl-cert-snakeoil.key"


def which(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def missing() -> str | None:
    """None if the mail stack can run here, else why not (printed by the skip)."""
    if os.geteuid() != 0:
        return "e2e mail stack needs root (Postfix master, queue owned by postfix)"
    for tool, pkg in (
        ("postfix", "postfix"),
        ("postmap", "postfix"),
        ("smtp-sink", "postfix"),
        ("postconf", "postfix"),
        ("postqueue", "postfix"),
        ("dovecot", "dovecot-core"),
        ("doveadm", "dovecot-core"),
        ("doveconf", "dovecot-core"),
        ("openssl", "openssl"),
    ):
        if which(tool) is None:
            return f"{tool} not installed: apt-get install {pkg}"
    for path, pkg in (
        (POSTFIX_SHARE / "main.cf.debian", "postfix"),
        (POSTFIX_SHARE / "master.cf.dist", "postfix"),
        (DOVECOT_SHARE / "dovecot.conf", "dovecot-core"),
        (DOVECOT_SHARE / "protocols.d" / "lmtpd.protocol", "dovecot-lmtpd"),
        (DOVECOT_SHARE / "protocols.d" / "imapd.protocol", "dovecot-imapd"),
    ):
        if not path.exists():
            return f"{path} missing: apt-get install {pkg}"
    for user in ("postfix", "dovecot"):
        try:
            import pwd

            pwd.getpwnam(user)
        except KeyError:
            return f"system user {user!r} missing (install the {user} package)"
    if not LDAPSYNC.exists():
        return f"ldapsync console script not found at {LDAPSYNC} (pip install -e .)"
    return None


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with rc={proc.returncode}: {tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not accepting on 127.0.0.1:{port} after {START_TIMEOUT:g}s: {tail(log)}")


def tail(path: Path | None, limit: int = 3000) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return "(no log)"


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def make_workdir(prefix: str) -> Path:
    """A private dir the postfix and dovecot users can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- snippets
@dataclass
class Substitutions:
    """Placeholder -> test value, applied to snippet text in a fixed order."""

    pairs: dict[str, str] = field(default_factory=dict)

    def apply(self, text: str) -> str:
        for old, new in self.pairs.items():
            text = text.replace(old, new)
        return text


# The MXes' addresses in postfix-srs-main.cf's mynetworks (the only clients it relays for).
SRS_MYNETWORKS = "192.0.2.25/32, 192.0.2.26/32"


def snippet(name: str, subs: Substitutions | None = None) -> str:
    text = (SNIPPETS / name).read_text()
    return subs.apply(text) if subs else text


def ldapsync_config(
    name: str,
    dest: Path,
    subs: Substitutions,
    *,
    ldap_uri: str,
    bind_password_file: Path,
    text: str | None = None,
    **extra: Any,
) -> Path:
    """The role's ldapsync YAML from docs/snippets with test paths and the throwaway slapd.

    The throwaway slapd speaks plain LDAP on loopback, so the production URIs and CA file
    are replaced; every other key is used as the docs show it. ``text`` replaces the
    snippet's text (an older version of it).
    """
    data = yaml.safe_load(subs.apply(text) if text is not None else snippet(name, subs))
    ldap = data["source"]["ldap"]
    ldap["uri"] = [ldap_uri]
    ldap.pop("ca_file", None)
    ldap["bind_password_file"] = str(bind_password_file)
    data.update(extra)
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def run_ldapsync(config: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LDAPSYNC), "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        umask=UNIT_UMASK,
    )


def postmap_query(map_path: Path, key: str, config_dir: Path) -> str | None:
    """`postmap -q` on an installed map (what Postfix itself would look up)."""
    exe = which("postmap")
    assert exe is not None
    proc = subprocess.run(
        [exe, "-c", str(config_dir), "-q", key, f"hash:{map_path}"], capture_output=True, text=True, check=False
    )
    if proc.returncode == 1:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"postmap -q {key} hash:{map_path}: {proc.stderr}")
    return proc.stdout.strip()


# ----------------------------------------------------------------------------- smtp-sink
@dataclass(frozen=True)
class Captured:
    sender: str
    recipients: tuple[str, ...]
    text: str


class Sink:
    """Postfix's smtp-sink on a loopback port, appending every message to one dump file."""

    def __init__(self, workdir: Path, name: str):
        self.name = name
        self.dir = workdir / f"sink-{name}"
        self.dir.mkdir()
        shutil.chown(self.dir, "postfix")  # smtp-sink writes as -u postfix
        self.dump = self.dir / "dump"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def nexthop(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def start(self) -> None:
        exe = which("smtp-sink")
        assert exe is not None
        log = self.dir / "sink.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [exe, "-u", "postfix", "-D", str(self.dump), f"127.0.0.1:{self.port}", "64"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        wait_port(self.port, self.proc, f"smtp-sink {self.name}", log)

    def stop(self) -> None:
        stop(self.proc)

    def messages(self) -> list[Captured]:
        try:
            raw = self.dump.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out: list[Captured] = []
        for block in raw.split("\nX-Client-Addr: "):
            lines = block.splitlines()
            sender = next((ln[len("X-Mail-Args: ") :] for ln in lines if ln.startswith("X-Mail-Args: ")), "")
            # "X-Rcpt-Args: <addr> ORCPT=rfc822;original": the envelope recipient is the first word
            rcpts = tuple(
                ln[len("X-Rcpt-Args: ") :].split()[0].strip("<>") for ln in lines if ln.startswith("X-Rcpt-Args: ")
            )
            if rcpts:
                out.append(Captured(sender.split()[0].strip("<>") if sender else "", rcpts, block))
        return out

    def received(self, token: str) -> list[Captured]:
        return [m for m in self.messages() if token in m.text]

    def recipients(self, token: str) -> set[str]:
        return {r for m in self.received(token) for r in m.recipients}


# ----------------------------------------------------------------------------- Postfix
POSTFIX_SHARE = Path("/usr/share/postfix")  # what the postfix package installs main.cf/master.cf from
# The chroot files Debian's /usr/lib/postfix/configure-instance.sh copies into the queue directory
CHROOT_FILES = ("localtime", "services", "resolv.conf", "hosts", "host.conf", "nsswitch.conf")


def internet_site(name: str) -> list[str]:
    """What postinst sets with `postconf -e` for "Internet Site" and debconf's default answers."""
    fqdn = f"{name}.example.org"
    return [
        "smtpd_relay_restrictions=permit_mynetworks permit_sasl_authenticated defer_unauth_destination",
        f"myhostname={fqdn}",
        "alias_maps=hash:/etc/aliases",
        "alias_database=hash:/etc/aliases",
        f"mydestination=$myhostname, {fqdn}, localhost.example.org, localhost",
        "relayhost=",
        "mynetworks=127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128",
        "mailbox_size_limit=0",
        "recipient_delimiter=+",
        "inet_interfaces=all",
        "inet_protocols=all",
    ]


def split_snippet(text: str, existing: set[str]) -> tuple[dict[str, str], str]:
    """A main.cf snippet's settings of parameters in ``existing`` (name -> value, one line
    each), and the rest of its text (to append)."""
    in_place: dict[str, str] = {}
    rest: list[str] = []
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = re.match(r"([a-z_0-9]+)\s*=(.*)$", line)
        if m and m.group(1) in existing:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            assert not (nxt[:1].isspace() and nxt.strip()), f"{m.group(1)}: continued on the next line"
            in_place[m.group(1)] = m.group(2).strip()
            continue
        rest.append(line)
    return in_place, "".join(rest)


class Postfix:
    """One Postfix instance, configured as Debian 12 ships it, then as the docs say.

    main.cf is /usr/share/postfix/main.cf.debian + main.cf.tls with the "Internet Site" answers
    postinst writes and the harness settings (paths, ports, logging: what differs between this
    throwaway instance and an installed host), both set with `postconf -e`, then the role
    snippet installed as docs/deployment.md says: appended, except its settings that the
    stock main.cf already has (the MX's relayhost, the SRS host's mynetworks), which are
    changed in place. A host whose snippet sets relayhost keeps the stock default_transport.
    master.cf is /usr/share/postfix/master.cf.dist (chrooted services included) with the
    port-25 service on a loopback port, then the role's master.cf snippet,
    whose `submission` service gets its own loopback port. Mail for the rest of the world goes
    to ``world``; ``harness`` adds settings (e.g. a transport map standing in for the DNS MX
    records of our domains).
    """

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        world: Sink,
        main_cf: str,
        master_cf: str = "",
        port: int = 0,
        cert: tuple[Path, Path] | None = None,
        harness: Mapping[str, str] | None = None,
    ):
        self.name = name
        self.root = root / f"postfix-{name}"
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True)
        shutil.chown(self.data_dir, "postfix")
        self.smtp = port or free_port()
        self.submission = free_port()
        cert_file, key_file = cert or self_signed_cert(self.root)
        self._chroot_files()

        master = master_cf.replace("\nsubmission inet", f"\n127.0.0.1:{self.submission} inet")
        if master.startswith("submission inet"):
            master = f"127.0.0.1:{self.submission} inet" + master[len("submission inet") :]
        stock_master = re.sub(
            r"^smtp(\s+)inet",
            f"127.0.0.1:{self.smtp}\\1inet",
            (POSTFIX_SHARE / "master.cf.dist").read_text(),
            count=1,
            flags=re.M,
        )
        (self.config_dir / "master.cf").write_text(stock_master + master)

        stock_main = (POSTFIX_SHARE / "main.cf.debian").read_text() + (POSTFIX_SHARE / "main.cf.tls").read_text()
        stock_main = stock_main.replace(CERT_FILE, str(cert_file)).replace(KEY_FILE, str(key_file))
        (self.config_dir / "main.cf").write_text(stock_main)
        # Set in place with `postconf -e`, as postinst does: a parameter given twice makes every
        # Postfix process log "overriding earlier entry", and postlogd, logging that to its own
        # socket, can block the whole instance.
        settings = dict(line.split("=", 1) for line in internet_site(name))
        settings.update(
            {
                "queue_directory": str(self.queue_dir),
                "data_directory": str(self.data_dir),
                "maillog_file": str(self.maillog),
                "maillog_file_prefixes": str(self.root),
                "inet_interfaces": "loopback-only",
                "inet_protocols": "ipv4",
                # the test client plays an Internet host, not a trusted one
                "mynetworks": "192.0.2.1/32",
                # no /etc/aliases database here (nothing is delivered locally)
                "alias_maps": "",
                "alias_database": "",
                # the rest of the world
                "default_transport": f"smtp:[127.0.0.1]:{world.port}",
                **(harness or {}),
            }
        )
        # A snippet setting that Debian's main.cf already has is changed in place, as
        # docs/deployment.md says (`postconf -e`), not appended a second time.
        stock_names = set(settings) | set(re.findall(r"^([a-z_0-9]+)\s*=", stock_main, re.M))
        in_place, main_cf = split_snippet(main_cf, stock_names)
        settings.update(in_place)
        if in_place.get("relayhost"):
            # the role sends everything off-site through its relayhost (the MX through the SRS
            # host): a nexthop in default_transport would override it, so only the stock
            # transport is left (the relayhost stands for the path to the Internet)
            settings["default_transport"] = "smtp"
        postconf = which("postconf")
        assert postconf is not None
        subprocess.run(
            [postconf, "-c", str(self.config_dir), "-e", *(f"{k}={v}" for k, v in settings.items())],
            capture_output=True,
            check=True,
            timeout=30,
        )
        with open(self.config_dir / "main.cf", "a") as f:
            f.write("\n# --- role snippet (docs/deployment.md) ---\n" + main_cf)
        # every Postfix program waits up to 2 s while main.cf is younger than that
        os.utime(self.config_dir / "main.cf", (time.time() - 3600, time.time() - 3600))
        self.proc: subprocess.Popen[bytes] | None = None

    def _chroot_files(self) -> None:
        """What Debian's start-up script copies into the queue directory for chrooted services."""
        etc = self.queue_dir / "etc"
        etc.mkdir()
        for name in CHROOT_FILES:
            src = Path("/etc") / name
            if src.is_file():
                shutil.copy(src, etc / name)

    def postconf(self, *names: str) -> dict[str, str]:
        """`postconf -h` for each name: what this instance really uses (last setting wins)."""
        exe = which("postconf")
        assert exe is not None
        return {
            name: subprocess.run(
                [exe, "-c", str(self.config_dir), "-h", name], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
            for name in names
        }

    def spawn(self) -> None:
        exe = which("postfix")
        assert exe is not None
        with open(self.root / "start.log", "ab") as out:
            self.proc = subprocess.Popen(
                [exe, "-c", str(self.config_dir), "start-fg"], stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_port(self.smtp, self.proc, f"postfix {self.name}", self.root / "start.log")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        exe = which("postfix")
        assert exe is not None
        subprocess.run([exe, "-c", str(self.config_dir), "stop"], capture_output=True, timeout=30, check=False)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queue(self) -> list[dict[str, Any]]:
        """`postqueue -j`: every message still queued (incoming, active, deferred, hold)."""
        exe = which("postqueue")
        assert exe is not None
        proc = subprocess.run(
            [exe, "-c", str(self.config_dir), "-j"], capture_output=True, text=True, timeout=30, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"postqueue -j ({self.name}) rc={proc.returncode}: {proc.stderr}")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def queue_files(self) -> bool:
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            d = self.queue_dir / sub
            if d.exists() and any(p.is_file() for p in d.rglob("*")):
                return True
        return False

    def flush_and_wait_empty(self, timeout: float = 20.0) -> None:
        """Wait until the queue holds no message (delivered, bounced or deferred is visible in the log)."""
        wait_for(lambda: not self.queue_files(), timeout, f"postfix {self.name} queue to drain:\n{self.log()[-3000:]}")


@dataclass(frozen=True)
class SendResult:
    refused: Mapping[str, tuple[int, bytes]]

    def accepted(self, rcpts: Iterable[str]) -> list[str]:
        return [r for r in rcpts if r not in self.refused]


def send(
    port: int,
    sender: str,
    rcpts: list[str],
    token: str,
    *,
    login: tuple[str, str] | None = None,
    mechanism: str | None = None,
    starttls: bool = False,
) -> SendResult:
    """One SMTP transaction; refused recipients are returned, not raised (unless all are).

    login without a mechanism tries each the server offers (smtplib's login); with one, only it.
    """
    msg = (
        f"From: <{sender}>\r\nTo: undisclosed-recipients:;\r\nSubject: e2e {token}\r\n"
        f"Message-ID: <{token}@e2e.test>\r\n\r\n{token}\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.com", timeout=30) as smtp:
        if starttls:
            smtp.starttls(context=_insecure_tls())
        if login is not None and mechanism is None:
            smtp.login(*login)
        elif login is not None and mechanism is not None:
            smtp.user, smtp.password = login
            smtp.ehlo_or_helo_if_needed()
            smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower()))
        refused = smtp.sendmail(sender, rcpts, msg)
    return SendResult(refused)


def rcpt_reply(port: int, rcpt: str, sender: str = "someone@outside.example") -> tuple[int, str]:
    """The server's reply to RCPT TO (no message is sent)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.com", timeout=30) as smtp:
        smtp.ehlo()
        code, _ = smtp.mail(sender)
        assert code == 250, f"MAIL FROM refused: {code}"
        code, text = smtp.rcpt(rcpt)
        smtp.rset()
    return code, text.decode(errors="replace")


def _insecure_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # throwaway self-signed certificate
    return ctx


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=submission.example.org",
            "-keyout", str(key), "-out", str(cert),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


# ----------------------------------------------------------------------------- Dovecot
DOVECOT_SHARE = Path("/usr/share/dovecot")  # what dovecot-core installs /etc/dovecot from
AUTH_SYSTEM_INCLUDE = "!include auth-system.conf.ext"
# Each role's Dovecot packages: the protocols.d files they install decide `protocols`.
PROTOCOL_FILES = {"dovecot-imapd": "imapd.protocol", "dovecot-lmtpd": "lmtpd.protocol"}


def dovecot_snippet_path(name: str) -> str:
    """Where docs/deployment.md puts a Dovecot snippet: the path its first line names."""
    first = (SNIPPETS / name).read_text().splitlines()[0]
    match = re.search(r"/etc/dovecot/([\w./-]+\.conf)$", first)
    assert match, f"docs/snippets/{name}: the first line must name where the file goes in /etc/dovecot"
    return match[1]


def disable_system_auth(conf_d: Path) -> None:
    """The edit docs/deployment.md tells admins to make in 10-auth.conf (no PAM/system users)."""
    path = conf_d / "10-auth.conf"
    text = path.read_text()
    assert f"\n{AUTH_SYSTEM_INCLUDE}\n" in text, f"Debian's 10-auth.conf no longer has {AUTH_SYSTEM_INCLUDE}"
    path.write_text(text.replace(f"\n{AUTH_SYSTEM_INCLUDE}\n", f"\n#{AUTH_SYSTEM_INCLUDE}\n"))


def stock_dovecot_tree(etc: Path, protocols_d: Path, packages: Iterable[str] = ()) -> None:
    """/etc/dovecot as dovecot-core installs it (dovecot.conf, conf.d/), in ``etc``.

    Paths into /etc/dovecot point into ``etc``, and protocols.d holds only the files of the
    role's ``packages`` (a submission host has dovecot-core alone: no protocol at all).
    """
    etc.mkdir(mode=0o755, exist_ok=True)
    (etc / "private").mkdir(mode=0o700, exist_ok=True)
    (etc / "conf.d").mkdir(exist_ok=True)
    protocols_d.mkdir()
    for package in packages:
        shutil.copy(DOVECOT_SHARE / "protocols.d" / PROTOCOL_FILES[package], protocols_d)
    sources = [DOVECOT_SHARE / "dovecot.conf", *sorted(DOVECOT_SHARE.glob("*.conf.ext"))]
    sources += sorted((DOVECOT_SHARE / "conf.d").iterdir())
    for src in sources:
        rel = src.relative_to(DOVECOT_SHARE)
        text = src.read_text().replace(str(DOVECOT_SHARE / "protocols.d"), str(protocols_d))
        (etc / rel).write_text(text.replace(DOVECOT_ETC + "/", f"{etc}/"))


class Dovecot:
    """Dovecot from Debian's stock /etc/dovecot tree plus the role's snippets, all under ``root``.

    ``etc`` stands for /etc/dovecot: the stock tree is copied there, 10-auth.conf gets the
    documented edit, each snippet goes where its first line says, and the generated certificate
    becomes private/dovecot.pem and .key (what the ssl-cert package and dovecot-core's postinst
    provide). The harness file (conf.d/00-test-harness.conf) sets only what differs for a
    throwaway instance: its directories, its log, a loopback IMAP port, no failure delay.
    """

    def __init__(
        self,
        root: Path,
        etc: Path,
        snippets: Mapping[str, str],
        *,
        packages: Iterable[str] = (),
        cert: tuple[Path, Path] | None = None,
        edit_auth: bool = True,
    ):
        self.root = root / "dovecot"
        self.etc = etc
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        for d in (self.base_dir, self.state_dir):
            d.mkdir(parents=True)
        self.log_path = self.root / "dovecot.log"
        stock_dovecot_tree(etc, self.root / "protocols.d", packages)
        if edit_auth:
            disable_system_auth(etc / "conf.d")
        cert_file, key_file = cert or self_signed_cert(self.root)
        shutil.copy(cert_file, etc / "private" / "dovecot.pem")
        shutil.copy(key_file, etc / "private" / "dovecot.key")
        (etc / "private" / "dovecot.key").chmod(0o600)
        self.imap = free_port()
        (etc / "conf.d" / "00-test-harness.conf").write_text(
            f"""\
# --- test harness (directories, log and ports of this throwaway instance) ---
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
listen = 127.0.0.1
# failed logins answer at once (production keeps the 2 s default)
auth_failure_delay = 0
service imap-login {{
  inet_listener imap {{
    port = {self.imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
        )
        for rel, text in snippets.items():
            (etc / rel).write_text(text)
        self.config = etc / "dovecot.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    def doveconf(self, name: str) -> str:
        """`doveconf -h NAME`: the value this configuration really uses."""
        exe = which("doveconf")
        assert exe is not None
        proc = subprocess.run(
            [exe, "-c", str(self.config), "-h", name], capture_output=True, text=True, timeout=30, check=False
        )
        assert proc.returncode == 0, f"doveconf -h {name}: {proc.stderr}"
        return proc.stdout.strip()

    def start(self) -> None:
        exe = which("dovecot")
        assert exe is not None
        with open(self.root / "start.log", "ab") as out:
            self.proc = subprocess.Popen(
                [exe, "-F", "-c", str(self.config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        sock = self.base_dir / "auth-client"
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop(self.proc)
                raise RuntimeError(f"dovecot did not start: {tail(self.root / 'start.log')}{tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop(self.proc)

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        exe = which("doveadm")
        assert exe is not None
        return subprocess.run(
            [exe, "-c", str(self.config), *args], capture_output=True, text=True, timeout=30, check=False
        )

    def auth(self, user: str, password: str) -> bool:
        """`doveadm auth test` without the failure penalty: True = accepted."""
        proc = self.doveadm("auth", "test", "-x", "no-penalty", user, password)
        if proc.returncode not in (0, 77):
            raise RuntimeError(f"doveadm auth test rc={proc.returncode}: {proc.stderr}{tail(self.log_path)}")
        return proc.returncode == 0


def hash_password(password: str) -> str:
    """A SHA512-CRYPT hash from Dovecot itself, as an admin would put in mailPassword."""
    exe = which("doveadm")
    assert exe is not None
    out = subprocess.run(
        [exe, "pw", "-s", "SHA512-CRYPT", "-p", password], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    return out.removeprefix("{SHA512-CRYPT}")


# ----------------------------------------------------------------------------- the stack
@dataclass
class Role:
    name: str
    dir: Path
    config: Path
    subs: Substitutions

    @property
    def maps(self) -> Path:
        return self.dir / "maps"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def sync(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_ldapsync(self.config, "--once", *args)


class MailStack:
    """slapd -> ldapsync (MX, SRS, submission configs) -> Postfix x3 + Dovecot -> sinks.

    MX: resolves aliases, groups and forwards; what stays in our domains goes to the
    ``mailbox`` sink, everything else through the SRS Postfix (its relayhost), which has no
    ldapsync and hands it to ``world``; submission: SASL via Dovecot, outgoing mail to ``world``.
    """

    def __init__(self, workdir: Path, ldap_uri: str, bind_password_file: Path, **config_extra: Any):
        self.workdir = workdir
        self.mailbox = Sink(workdir, "mailbox")
        self.world = Sink(workdir, "world")
        self.etc = workdir / "etc-ldapsync"
        self.etc.mkdir()
        shutil.copy(SNIPPETS / "mail.yaml", self.etc / "mail.yaml")
        secret = self.etc / "bind.secret"
        shutil.copy(bind_password_file, secret)
        secret.chmod(0o600)
        # /etc/dovecot as dovecot-core ships it: 0755 root:root, with private/ 0700 root:root.
        # The passwd-file directory below it is created by ldapsync, as on a real host.
        self.dovecot_etc = workdir / "etc-dovecot"
        self.passwd_dir = self.dovecot_etc / "ldapsync"
        cert, key = self_signed_cert(workdir)

        self.roles: dict[str, Role] = {}
        self.postfix: dict[str, Postfix] = {}
        names = ("srs", "mx", "submission")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        subs_by_name: dict[str, Substitutions] = {}
        for name in names:
            rdir = workdir / name
            (rdir / "maps").mkdir(parents=True)
            subs = Substitutions(
                {
                    MAPS_DIR: str(rdir / "maps"),
                    STATE_DIR: str(rdir / "state"),
                    DOVECOT_ETC: str(self.dovecot_etc),
                    ETC_DIR: str(self.etc),
                    CERT_FILE: str(cert),
                    KEY_FILE: str(key),
                    "[srs.example.org]": f"[127.0.0.1]:{ports['srs']}",
                    "[mx.example.org]": f"[127.0.0.1]:{ports['mx']}",
                    "[mailbox.example.org]": self.mailbox.nexthop,
                    SRS_MYNETWORKS: "127.0.0.1/32",  # the MX connects from loopback
                }
            )
            subs_by_name[name] = subs
            if not (SNIPPETS / f"ldapsync-{name}.yaml").exists():
                continue  # the SRS host runs no ldapsync
            config = ldapsync_config(
                f"ldapsync-{name}.yaml",
                rdir / "ldapsync.yaml",
                subs,
                ldap_uri=ldap_uri,
                bind_password_file=secret,
                **config_extra,
            )
            self.roles[name] = Role(name, rdir, config, subs)
        for name in names:
            subs = subs_by_name[name]
            has_master = (SNIPPETS / f"postfix-{name}-master.cf").exists()
            master = snippet(f"postfix-{name}-master.cf", subs) if has_master else ""
            main = snippet(f"postfix-{name}-main.cf", subs)
            self.postfix[name] = Postfix(
                workdir, name, world=self.world, main_cf=main, master_cf=master, port=ports[name], cert=(cert, key)
            )
        # the Dovecot auth socket lives in the submission Postfix's queue directory
        sub_subs = self.roles["submission"].subs
        sub_subs.pairs[POSTFIX_SPOOL] = str(self.postfix["submission"].queue_dir)
        self.dovecot = Dovecot(
            workdir,
            self.dovecot_etc,
            {dovecot_snippet_path("dovecot-ldapsync.conf"): snippet("dovecot-ldapsync.conf", sub_subs)},
            cert=(cert, key),
        )

    @property
    def mx(self) -> Postfix:
        return self.postfix["mx"]

    @property
    def srs(self) -> Postfix:
        return self.postfix["srs"]

    @property
    def submission(self) -> Postfix:
        return self.postfix["submission"]

    def sync_all(self, *args: str, expect_rc: int = 0) -> dict[str, subprocess.CompletedProcess[str]]:
        """`ldapsync --once` for every role, in parallel (each is mostly Python start-up)."""
        procs = {
            name: subprocess.Popen(
                [str(LDAPSYNC), "-c", str(role.config), "--once", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                umask=UNIT_UMASK,
            )
            for name, role in self.roles.items()
        }
        done = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            assert proc.returncode == expect_rc, f"ldapsync --once ({name}) rc={proc.returncode}:\n{err}"
        return done

    def installed(self) -> dict[Path, bytes]:
        """Every file ldapsync installed for every role (maps, compiled maps, passwd-file)."""
        files = [p for role in self.roles.values() for p in role.maps.iterdir()]
        files += list(self.passwd_dir.iterdir())
        return {p: p.read_bytes() for p in sorted(files) if p.is_file()}

    def start(self) -> None:
        for sink in (self.mailbox, self.world):
            sink.start()
        for pf in self.postfix.values():
            pf.spawn()  # in parallel: each takes a second or two
        for pf in self.postfix.values():
            pf.wait_ready()
        self.dovecot.start()  # after Postfix made its queue's private/ for the auth socket

    def stop(self) -> None:
        """Every server at once: each takes a second or so to shut down."""
        with ThreadPoolExecutor(max_workers=len(self.postfix) + 3) as pool:
            postfix = [pool.submit(pf.stop) for pf in self.postfix.values()]
            others = [pool.submit(server.stop) for server in (self.dovecot, self.mailbox, self.world)]
        for future in postfix:
            with contextlib.suppress(Exception):
                future.result()
        for future in others:
            future.result()

    def logs(self) -> str:
        parts = [f"== postfix {n} ==\n{pf.log()[-4000:]}" for n, pf in self.postfix.items()]
        parts.append(f"== dovecot ==\n{tail(self.dovecot.log_path)}")
        return "\n".join(parts)


# ----------------------------------------------------------------------------- log reading
@dataclass(frozen=True)
class Delivery:
    queue_id: str
    to: str
    orig_to: str | None
    relay: str
    status: str


def deliveries(pf: Postfix, token: str) -> list[Delivery]:
    """What Postfix logged for the message(s) whose Message-ID carries ``token``.

    Follows queue ids from the `message-id=<token@e2e.test>` line to every
    `to=<...>, [orig_to=<...>,] relay=..., status=...` line of the same queue file.
    """
    log = pf.log()
    ids = {
        line.split(": message-id=")[0].rsplit(" ", 1)[-1]
        for line in log.splitlines()
        if f"message-id=<{token}@e2e.test>" in line
    }
    out = []
    for line in log.splitlines():
        for qid in ids:
            marker = f" {qid}: to=<"
            if marker not in line:
                continue
            fields = dict(part.split("=", 1) for part in line.split(f" {qid}: ", 1)[1].split(", ") if "=" in part)
            out.append(
                Delivery(
                    qid,
                    fields["to"].strip("<>"),
                    fields["orig_to"].strip("<>") if "orig_to" in fields else None,
                    fields.get("relay", ""),
                    fields.get("status", "").split(" ", 1)[0],
                )
            )
    return out


def bounces(pf: Postfix) -> list[str]:
    """Log lines of mail Postfix bounced or deferred (the things a held change must never cause)."""
    return [ln for ln in pf.log().splitlines() if "status=bounced" in ln or "status=deferred" in ln]


def token() -> str:
    """A unique tag for one test message (in Subject, body and Message-ID)."""
    return uuid.uuid4().hex


def expect(sink: Sink, tok: str, want: set[str], stack: MailStack) -> None:
    """``sink`` got exactly ``want`` for this token once every queue has drained."""
    try:
        wait_for(lambda: sink.recipients(tok) >= want, DELIVERY_WAIT, f"{sorted(want)} at the {sink.name} sink")
        for pf in stack.postfix.values():
            pf.flush_and_wait_empty()
    except AssertionError as e:
        raise AssertionError(f"{e}\n{stack.logs()}") from None
    assert sink.recipients(tok) == want
