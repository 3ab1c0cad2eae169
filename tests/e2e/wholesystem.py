"""Whole mail systems built from the docs' recipes: every host a real Postfix (and Dovecot where
the recipe has one), configured from Debian's stock files plus the snippets of
docs/deployment.md, fed by `ldapsync --once`, with an SMTP sink as "the Internet".

A ``Recipe`` names the snippets one host gets; a ``System`` starts a set of hosts that reach
each other on loopback ports (the snippets' host names are the only thing replaced), sends
mail and records, per message, what happened to it: the RCPT reply, every mailbox and Internet
address it reached, and every bounce it caused.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import shutil
import smtplib
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import systemdata as sd
from mailstack import (
    CERT_FILE,
    DOVECOT_ETC,
    ETC_DIR,
    KEY_FILE,
    LDAPSYNC,
    MAPS_DIR,
    OUTSIDE,
    POSTFIX_SPOOL,
    SNIPPETS,
    SRS_MYNETWORKS,
    START_TIMEOUT,
    STATE_DIR,
    UNIT_UMASK,
    Dovecot,
    Postfix,
    Sink,
    Substitutions,
    _insecure_tls,
    dovecot_snippet_path,
    hash_password,
    ldapsync_config,
    make_workdir,
    self_signed_cert,
    tail,
    wait_for,
)

from ldapsync.testing.ports import free_ports
from ldapsync.testing.slapd import BASE_LDIF, Slapd

VMAIL_ROOT = "/var/vmail"
VMAIL_ID = 5000  # the snippets' uid/gid: the vmail user
OUR_DOMAINS = ("example.org", "host1.example.org", "example.net")
DRAIN_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Recipe:
    """What docs/deployment.md installs on one host: snippet names, in the order they are applied."""

    name: str
    ldapsync: str  # "" for a host without ldapsync (the SRS host)
    main_cf: tuple[str, ...]
    master_cf: tuple[str, ...] = ()
    dovecot: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()  # Dovecot protocol packages (dovecot-lmtpd, dovecot-imapd)
    stores_mail: bool = False  # has /var/vmail and Dovecot LMTP
    accepts_submission: bool = False


MX = Recipe("mx", "ldapsync-mx.yaml", ("postfix-mx-main.cf",))
SRS = Recipe("srs", "", ("postfix-srs-main.cf",))
MAILBOX = Recipe(
    "mailbox",
    "ldapsync-mailbox.yaml",
    ("postfix-mailbox-main.cf",),
    dovecot=("dovecot-mailbox.conf",),
    packages=("dovecot-lmtpd", "dovecot-imapd"),
    stores_mail=True,
)
SUBMISSION = Recipe(
    "submission",
    "ldapsync-submission.yaml",
    ("postfix-submission-main.cf",),
    ("postfix-submission-master.cf",),
    ("dovecot-ldapsync.conf",),
    accepts_submission=True,
)
ONE_HOST = Recipe(
    "onehost",
    "ldapsync-onehost.yaml",
    ("postfix-onehost-main.cf", "postfix-submission-main.cf"),
    ("postfix-submission-master.cf",),
    ("dovecot-mailbox.conf", "dovecot-onehost.conf"),
    packages=("dovecot-lmtpd", "dovecot-imapd"),
    stores_mail=True,
    accepts_submission=True,
)
MX_SRS = Recipe("mxsrs", "ldapsync-mx-srs.yaml", ("postfix-mx-srs-main.cf",))
# The snippets' host names, and which recipe answers for each in a system.
HOSTNAMES = {"[mx.example.org]": "mx", "[srs.example.org]": "srs", "[mailbox.example.org]": "mailbox"}


class Host:
    """One host of a recipe: its ldapsync config, Postfix and, if the recipe has one, Dovecot."""

    def __init__(
        self,
        system: System,
        recipe: Recipe,
        port: int,
        *,
        overrides: Mapping[str, str],
        harness: Mapping[str, str] | None = None,
    ):
        self.recipe = recipe
        self.name = recipe.name
        self.dir = system.workdir / recipe.name
        (self.dir / "maps").mkdir(parents=True)
        self.vmail = self.dir / "vmail"
        self.dovecot_etc = self.dir / "etc-dovecot"
        # Postfix(root=self.dir, name) keeps its queue here: Dovecot's sockets go in it
        spool = self.dir / f"postfix-{recipe.name}" / "spool"
        pairs = {
            MAPS_DIR: str(self.dir / "maps"),
            STATE_DIR: str(self.dir / "state"),
            DOVECOT_ETC: str(self.dovecot_etc),
            ETC_DIR: str(system.etc),
            CERT_FILE: str(system.cert[0]),
            KEY_FILE: str(system.cert[1]),
            VMAIL_ROOT: str(self.vmail),
            POSTFIX_SPOOL: str(spool),
            SRS_MYNETWORKS: "127.0.0.1/32",  # the MX connects from loopback
        }
        pairs.update(
            {name: f"[127.0.0.1]:{system.ports[host]}" for name, host in HOSTNAMES.items() if host in system.ports}
        )
        self.subs = Substitutions(pairs)

        def text(name: str) -> str:
            return self.subs.apply(overrides[name] if name in overrides else (SNIPPETS / name).read_text())

        self.config: Path | None = None
        if recipe.ldapsync:
            self.config = ldapsync_config(
                recipe.ldapsync,
                self.dir / "ldapsync.yaml",
                self.subs,
                ldap_uri=system.ldap_uri,
                bind_password_file=system.secret,
                text=overrides.get(recipe.ldapsync),  # an older version of the snippet
            )
        self.postfix = Postfix(
            self.dir,
            recipe.name,
            world=system.world,
            main_cf="".join(text(n) for n in recipe.main_cf),
            master_cf="".join(text(n) for n in recipe.master_cf),
            port=port,
            cert=system.cert,
            harness=harness,
        )
        assert self.postfix.queue_dir == spool
        self.dovecot: Dovecot | None = None
        if recipe.dovecot:
            self.dovecot = Dovecot(
                self.dir,
                self.dovecot_etc,
                {dovecot_snippet_path(n): text(n) for n in recipe.dovecot},
                packages=recipe.packages,
                cert=system.cert,
            )
        if recipe.stores_mail:
            self.vmail.mkdir()
            os.chown(self.vmail, VMAIL_ID, VMAIL_ID)  # `install -d -o 5000 -g 5000 /var/vmail`

    def sync(self) -> subprocess.Popen[str] | None:
        if self.config is None:
            return None
        return subprocess.Popen(
            [str(LDAPSYNC), "-c", str(self.config), "--once"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            umask=UNIT_UMASK,
        )

    def stored(self) -> Iterable[tuple[str, str]]:
        """(login, message text) for every message in every Maildir under the vmail root."""
        if not self.recipe.stores_mail:
            return
        for maildir in self.vmail.glob("*/*/Maildir"):
            login = maildir.parent.name
            for sub in ("new", "cur"):
                for path in sorted((maildir / sub).glob("*")):
                    yield login, path.read_text(errors="replace")


@dataclass
class Observed:
    """What happened to one message."""

    reply: int = 0
    reply_text: str = ""
    reached: Counter[str] = field(default_factory=Counter)  # "mailbox:login" / "internet:addr" -> copies
    bounces: int = 0

    def summary(self) -> str:
        if self.reply != 250:
            return f"refused at RCPT: {self.reply} {self.reply_text}"
        parts = [f"{d} x{n}" if n != 1 else d for d, n in sorted(self.reached.items())]
        if self.bounces:
            parts.append(f"{self.bounces} bounce(s) to the sender")
        return "accepted; " + (", ".join(parts) if parts else "delivered nowhere")


class System:
    """Hosts from ``recipes`` sharing one slapd, one mail.yaml and one Internet sink.

    ``entry`` is the host Internet mail is sent to (the MX, or the one host). A submission host
    reaches our domains through ``entry``: a transport map in its harness block stands for the
    DNS MX records. ``overrides`` replaces a snippet's text (to run an older version of it).
    """

    def __init__(
        self,
        workdir: Path,
        recipes: Iterable[Recipe],
        *,
        ldap_uri: str,
        bind_password_file: Path,
        static_text: str,
        entry: str,
        overrides: Mapping[str, str] | None = None,
    ):
        self.workdir = workdir
        self.ldap_uri = ldap_uri
        self.world = Sink(workdir, "world")
        self.etc = workdir / "etc-ldapsync"
        self.etc.mkdir()
        (self.etc / "mail.yaml").write_text(static_text)
        self.secret = self.etc / "bind.secret"
        shutil.copy(bind_password_file, self.secret)
        self.secret.chmod(0o600)
        self.cert = self_signed_cert(workdir)
        recipes = list(recipes)
        self.ports = dict(zip((r.name for r in recipes), free_ports(len(recipes)), strict=True))
        self.entry_name = entry
        self.hosts: dict[str, Host] = {}
        for recipe in recipes:
            harness = {}
            if recipe.accepts_submission and recipe.name != entry:
                # stands for the DNS MX records of our domains
                route = self.workdir / f"dns-mx-{recipe.name}"
                route.write_text("".join(f"{d}\tsmtp:[127.0.0.1]:{self.ports[entry]}\n" for d in OUR_DOMAINS))
                harness = {"transport_maps": f"texthash:{route}"}
            self.hosts[recipe.name] = Host(
                self, recipe, self.ports[recipe.name], overrides=overrides or {}, harness=harness
            )

    @property
    def entry(self) -> Host:
        return self.hosts[self.entry_name]

    def sync(self) -> None:
        """`ldapsync --once` on every host (in parallel)."""
        procs = {name: proc for name, host in self.hosts.items() if (proc := host.sync()) is not None}
        for name, proc in procs.items():
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"ldapsync --once ({name}) rc={proc.returncode}:\n{err}"

    def start(self) -> None:
        self.world.start()
        for host in self.hosts.values():
            host.postfix.spawn()
        for host in self.hosts.values():
            host.postfix.wait_ready()
        for host in self.hosts.values():
            if host.dovecot is not None:
                host.dovecot.start()  # after Postfix made private/ in its queue for the sockets
                # Postfix must find Dovecot's sockets at the first delivery or login: a missing
                # LMTP socket defers mail for queue_run_delay (minutes), not for a moment
                private = host.postfix.queue_dir / "private"
                sockets = [private / "dovecot-lmtp"] if host.recipe.stores_mail else []
                sockets += [private / "auth"] if host.recipe.accepts_submission else []
                for sock in sockets:
                    wait_for(sock.exists, START_TIMEOUT, f"{sock} from dovecot on {host.name}")

    def stop(self) -> None:
        with ThreadPoolExecutor(max_workers=2 * len(self.hosts) + 1) as pool:
            futures = [pool.submit(h.postfix.stop) for h in self.hosts.values()]
            futures += [pool.submit(h.dovecot.stop) for h in self.hosts.values() if h.dovecot is not None]
            futures.append(pool.submit(self.world.stop))
        for future in futures:
            with contextlib.suppress(Exception):
                future.result()

    # ------------------------------------------------------------------ mail
    @staticmethod
    def message(sender: str, tag: str) -> bytes:
        return (
            f"From: <{sender}>\r\nTo: undisclosed-recipients:;\r\nSubject: e2e {tag}\r\n"
            f"Message-ID: <{tag}@e2e.test>\r\n\r\nTag: {tag}\r\n"
        ).encode()

    def send_from_internet(self, rcpt: str, tag: str) -> tuple[int, str]:
        """One message from an Internet sender to ``rcpt`` at the entry host; the RCPT reply.

        One connection per message: Postfix slows down and drops a client after ten refused
        recipients (smtpd_soft_error_limit), which would time the test, not the routing.
        """
        with smtplib.SMTP("127.0.0.1", self.entry.postfix.smtp, local_hostname="client.example.com", timeout=60) as s:
            s.ehlo()
            code, _ = s.mail(OUTSIDE)
            assert code == 250, f"MAIL FROM refused: {code}"
            code, text = s.rcpt(rcpt)
            if code == 250:
                dcode, dtext = s.data(self.message(OUTSIDE, tag))
                assert dcode == 250, f"DATA for {rcpt}: {dcode} {dtext!r}"
        return code, text.decode(errors="replace")

    def submit(self, host: str, login: tuple[str, str], sender: str, rcpt: str, tag: str) -> tuple[int, str]:
        """One message submitted (STARTTLS, SASL) on ``host``'s submission port."""
        port = self.hosts[host].postfix.submission
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.com", timeout=60) as s:
            s.starttls(context=_insecure_tls())
            s.login(*login)
            code, _ = s.mail(sender)
            assert code == 250, f"MAIL FROM {sender} refused: {code}"
            code, text = s.rcpt(rcpt)
            if code == 250:
                dcode, dtext = s.data(self.message(sender, tag))
                assert dcode == 250, f"DATA for {rcpt}: {dcode} {dtext!r}"
        return code, text.decode(errors="replace")

    def wait_drained(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Every queue empty, and no host logging anything, twice in a row: nothing is in
        flight any more.

        Queues are read upstream first (entry host, then the others): a message that moves
        on while they are read is already in the next queue, which is read later. A message
        that moves back upstream (a loop between two hosts) can slip between the reads of two
        rounds on a busy machine, but not without a host logging its hop: the logs' sizes
        must stand still too.
        """
        order = [self.entry, *(h for h in self.hosts.values() if h is not self.entry)]
        deadline = time.monotonic() + timeout
        empty_rounds = 0
        logged = -1
        while empty_rounds < 2:
            busy = [h.name for h in order if h.postfix.queue()]
            size = sum(h.postfix.maillog.stat().st_size for h in order if h.postfix.maillog.exists())
            empty_rounds = 0 if busy or size != logged else empty_rounds + 1
            logged = size
            if busy and time.monotonic() > deadline:
                raise AssertionError(
                    f"queues not drained after {timeout:g}s: "
                    + "; ".join(f"{h.name}: {h.postfix.queue()}" for h in order)
                    + "\n"
                    + self.logs()
                )
            time.sleep(0.2)

    def observe(self, tags: Mapping[str, tuple[int, str]]) -> dict[str, Observed]:
        """Per tag: its RCPT reply, every copy delivered anywhere, every bounce it caused."""
        seen = {tag: Observed(reply, text) for tag, (reply, text) in tags.items()}

        def tags_in(text: str) -> list[str]:
            return [t for t in seen if f"{t}@e2e.test" in text]

        for host in self.hosts.values():
            for login, text in host.stored():
                for tag in tags_in(text):
                    if "Content-Type: multipart/report" in text and "delivery-status" in text:
                        seen[tag].bounces += 1
                    else:
                        seen[tag].reached[f"mailbox:{login}"] += 1
        for captured in self.world.messages():
            for tag in tags_in(captured.text):
                if captured.sender == "":
                    seen[tag].bounces += 1  # a bounce to the Internet sender
                else:
                    for rcpt in captured.recipients:
                        seen[tag].reached[f"internet:{rcpt}"] += 1
        return seen

    def problems_in_logs(self) -> list[str]:
        """Log lines no correct run has: bounces, deferrals, loops, fatal errors."""
        bad = ("status=bounced", "status=deferred", "loops back to myself", "too many hops", "fatal:", "panic:")
        return [
            f"{h.name}: {line}"
            for h in self.hosts.values()
            for line in h.postfix.log().splitlines()
            if any(b in line for b in bad)
        ]

    def logs(self) -> str:
        parts = [f"== postfix {h.name} ==\n{h.postfix.log()[-4000:]}" for h in self.hosts.values()]
        parts += [f"== dovecot {h.name} ==\n{tail(h.dovecot.log_path)}" for h in self.hosts.values() if h.dovecot]
        return "\n".join(parts)


# ----------------------------------------------------------------------------- a whole run
@dataclass(frozen=True, slots=True)
class Expected:
    """``reply``: 250 (accepted) or the refusal code; ``text``: what the refusal must end with;
    ``reached``: each destination exactly once."""

    reply: int
    reached: frozenset[str] = frozenset()
    text: str = ""


@dataclass
class Run:
    """One message per address (from the Internet) and per submission, and what became of each."""

    tags: dict[str, str]  # tag -> "address" or "submit:address"
    observed: dict[str, Observed]
    stuck: str = ""  # what was still queued when the wait for the queues gave up

    def by_address(self) -> dict[str, Observed]:
        return {self.tags[tag]: obs for tag, obs in self.observed.items()}


def run_mail(
    system: System,
    internet: Iterable[str],
    submissions: Iterable[str] = (),
    *,
    login: tuple[str, str] = ("", ""),
    submit_host: str = "",
) -> Run:
    """Send one uniquely tagged message to every address, wait for every queue, observe."""
    import uuid

    replies: dict[str, tuple[int, str]] = {}
    tags: dict[str, str] = {}
    for rcpt in internet:
        tag = uuid.uuid4().hex
        tags[tag] = rcpt
        replies[tag] = system.send_from_internet(rcpt, tag)
    for rcpt in submissions:
        tag = uuid.uuid4().hex
        tags[tag] = f"submit:{rcpt}"
        replies[tag] = system.submit(submit_host, login, f"{login[0]}@example.org", rcpt, tag)
    try:
        system.wait_drained()
    except AssertionError as e:  # still say what became of every other message
        return Run(tags, system.observe(replies), stuck=str(e))
    return Run(tags, system.observe(replies))


def mismatches(expected: Mapping[str, Expected], observed: Mapping[str, Observed]) -> list[str]:
    """One line per address whose fate differs from the intent (empty: all as intended)."""
    out = []
    for address, want in sorted(expected.items()):
        got = observed[address]
        if want.reply != 250:
            if got.reply == want.reply and got.reply_text.endswith(want.text):
                continue
            wanted = f"refused at RCPT ({want.reply}{' ' + want.text if want.text else ''})"
        else:
            if got.reply == 250 and got.reached == Counter(dict.fromkeys(want.reached, 1)) and not got.bounces:
                continue
            wanted = "accepted; " + ", ".join(sorted(want.reached)) + " (each once, no bounce)"
        out.append(f"{address}: wanted {wanted}; got {got.summary()}")
    return out


# ----------------------------------------------------------------------------- the scenario
PASSWORD = "plain1-secret"
SUBMITTED = ("keep1@example.org", "g-outer@example.org", "in2@example.org", "friend@far.example")


def expected(address: str) -> Expected:
    """The intent (tests/e2e/systemdata.py) as what the mail system must do."""
    if address.startswith("submit:"):
        address = address.removeprefix("submit:")
        if sd.shape(address) not in sd.INTENT:
            return Expected(250, frozenset({f"internet:{address}"}))
    outcome = sd.addresses()[address]
    if outcome.reject is None:
        return Expected(250, outcome.destinations)
    return Expected(outcome.reject, text=outcome.text)


@dataclass
class Result:
    system: System
    run: Run


def whole_system(
    recipes: tuple[Recipe, ...],
    entry: str,
    submit_host: str,
    *,
    addresses: Iterable[str] | None = None,
    submitted: Iterable[str] = SUBMITTED,
    overrides: Mapping[str, str] | None = None,
) -> Iterator[Result]:
    """Build, sync, start, send (every address of the directory unless ``addresses``), drain;
    yield what happened; tear everything down."""
    from conftest import require_mail_stack

    require_mail_stack()
    workdir = make_workdir(f"ldapsync-e2e-{entry}-")
    ldap = Slapd(workdir / "ldap", ldif_files=(BASE_LDIF,), extra_ldif=sd.ldif(hash_password(PASSWORD)))
    system: System | None = None
    try:
        ldap.start()
        system = System(
            workdir,
            recipes,
            ldap_uri=ldap.uri,
            bind_password_file=ldap.service_password_file,
            static_text=sd.static_file((SNIPPETS / "mail.yaml").read_text()),
            entry=entry,
            overrides=overrides,
        )
        system.sync()
        system.start()
        run = run_mail(
            system,
            sd.addresses() if addresses is None else addresses,
            submitted,
            login=(sd.SENDER_LOGIN, PASSWORD),
            submit_host=submit_host,
        )
        yield Result(system, run)
    finally:
        if system is not None:
            system.stop()
        ldap.close()
        shutil.rmtree(workdir, ignore_errors=True)


def check(result: Result, addresses: list[str]) -> None:
    observed = result.run.by_address()
    wrong = mismatches({a: expected(a) for a in addresses}, observed)
    if result.run.stuck:
        wrong.append(result.run.stuck.split("\n", 1)[0])
    assert not wrong, (
        f"{len(wrong)} of {len(addresses)} addresses went wrong:\n  " + "\n  ".join(wrong) + "\n" + result.system.logs()
    )


# ----------------------------------------------------------------------------- the model
def fate(reply: int, reached: Mapping[str, int], bounced: bool) -> str:
    """What happened to one message, in words both real Postfix and the model can say."""
    if reply != 250:
        return f"refused {reply}"
    copies = ", ".join(f"{d} x{n}" if n != 1 else d for d, n in sorted(reached.items())) or "nowhere"
    return f"accepted: {copies}" + ("; bounced" if bounced else "")


def model_fates(result: Result) -> dict[str, str]:
    """What tests/mailflow.py predicts for every message of the run, fed with the maps ldapsync
    installed on each host (read back from the hosts, as Postfix reads them)."""
    import mailflow

    system = result.system

    # the installed maps name the hosts by test port (the transport map's nexthop): back to the docs' names
    names = {f"[127.0.0.1]:{system.ports[h]}".encode(): n.encode() for n, h in HOSTNAMES.items() if h in system.ports}

    def outputs(role: str, host: Host) -> dict[str, bytes]:
        data = mailflow.installed_outputs(role, lambda path: Path(host.subs.apply(path)))
        for port, name in names.items():
            data = {path: text.replace(port, name) for path, text in data.items()}
        return data

    specs = []
    for name, host in system.hosts.items():
        recipe = host.recipe
        role = recipe.ldapsync.removeprefix("ldapsync-").removesuffix(".yaml")
        exporters = mailflow.role_exporters(role) if role else []
        kinds = {e["path"]: e["kind"] for e in exporters}
        main = "".join((SNIPPETS / n).read_text() for n in recipe.main_cf)
        master = "".join((SNIPPETS / n).read_text() for n in recipe.master_cf)
        data = outputs(role, host) if role else {}
        service = mailflow.parse_master_cf_overrides(master, "submission")
        hostnames = (f"{name}.example.org",)
        # the model's Internet mail arrives at "mx", submitted mail at "submission"
        if name == system.entry_name:
            specs.append(mailflow.HostSpec("mx", hostnames, main, data, kinds))
            if recipe.accepts_submission:  # the same Postfix, as its submission service sees it
                specs.append(mailflow.HostSpec("submission", hostnames, main, data, kinds, service))
        else:
            specs.append(mailflow.HostSpec(name, hostnames, main, data, kinds, service))
    site = mailflow.Site(specs)
    fates = {}
    for address in result.run.tags.values():
        rcpt, via = (
            (address.removeprefix("submit:"), "submission") if address.startswith("submit:") else (address, "mx")
        )
        predicted = site.send(rcpt, via=via)
        if predicted.rejected is not None:
            fates[address] = f"refused {predicted.rejected.split()[0]}"
            continue
        reached = Counter(
            {
                f"{'mailbox' if d.kind == 'mailbox' else 'internet'}:{d.where}": n
                for d, n in predicted.deliveries.items()
            }
        )
        fates[address] = fate(250, reached, bool(predicted.bounces or predicted.looped))
    return fates


def model_disagreements(result: Result) -> list[str]:
    """One line per message where the model's prediction and real Postfix differ."""
    predicted = model_fates(result)
    out = []
    for address, got in sorted(result.run.by_address().items()):
        real = fate(got.reply, got.reached, got.bounces > 0)
        if predicted[address] != real:
            out.append(f"{address}: real Postfix {real}; the model {predicted[address]}")
    return out


def imap_messages(result: Result, host_name: str, address: str) -> int:
    """How many messages of the run's message to ``address`` the recipient finds over IMAP
    (STARTTLS with the stock certificate setup, login with the LDAP mail password)."""
    host = result.system.hosts[host_name]
    assert host.dovecot is not None
    tag = next(t for t, a in result.run.tags.items() if a == address)
    with imaplib.IMAP4("127.0.0.1", host.dovecot.imap) as imap:
        imap.starttls(ssl_context=_insecure_tls())
        imap.login(sd.SENDER_LOGIN, PASSWORD)
        imap.select("INBOX", readonly=True)
        status, found = imap.search(None, "BODY", tag)
    assert status == "OK", found
    return len(found[0].split())
