"""The health of a host's ldapsync at one moment: the one record `check`, `status` and the
agent's systemd STATUS line judge by, so they cannot disagree.

A Health is built from the status record (state_dir/status.json, which the metrics textfile
is rendered from too), whether an agent runs, what is on disk, and the time; judging it is
pure, so every verdict is tested with invented times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ldapsync.scheduler import CONFIRM_EVERY
from ldapsync.status import Status, SyncResult

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
LABELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
DEFAULT_TIMEOUT = 10.0  # source.timeout's default, when the config cannot be read


def min_max_age(timeout: float = DEFAULT_TIMEOUT) -> float:
    """The smallest `check --max-age` a healthy quiet agent never warns at (warning at half of it).

    A quiet agent confirms every CONFIRM_EVERY seconds what the server last answered, and a
    quiet server is asked at least every `timeout` (half of it to ask, half to answer).
    """
    return 2 * (CONFIRM_EVERY + timeout + 5.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    code: int
    text: str

    @property
    def label(self) -> str:
        return LABELS[self.code]


@dataclass(frozen=True, slots=True)
class Health:
    """What is known now; times are Unix seconds."""

    at: float  # when this view was taken
    record: Status  # the status record (what the last sync did, what the follower knows)
    ldap_timeout: float = DEFAULT_TIMEOUT  # source.timeout: how long LDAP may be away before it is news
    agent_pid: int | None = None  # an agent runs (it holds the state lock)
    config_error: str | None = None  # the config file on disk does not load
    generation: str | None = None  # the installed generation
    missing: tuple[str, ...] = ()  # outputs whose file is missing
    modified: tuple[str, ...] = ()  # outputs changed outside ldapsync since installed

    # -- what follows from the record ------------------------------------------------------------
    @property
    def confirmed_age(self) -> float | None:
        """Seconds since the installed outputs were last known to match the directory."""
        confirmed = self.record.last_confirmed
        return None if confirmed is None else max(0.0, self.at - confirmed)

    @property
    def ldap_down_for(self) -> float | None:
        """Seconds a running agent's follower has been without the directory, else None."""
        r = self.record
        if self.agent_pid is None or r.follower_connected is not False or r.ldap_lost is None:
            return None
        return max(0.0, self.at - r.ldap_lost)

    @property
    def config_problem(self) -> str | None:
        return self.config_error or self.record.config_error

    @property
    def failed(self) -> bool:
        return self.record.result in (SyncResult.FAILED, SyncResult.LAST_KNOWN_GOOD)

    # -- the verdict -----------------------------------------------------------------------------
    def verdict(self, max_age: float, warn_age: float | None = None) -> Verdict:
        """The monitoring plugin's answer: the worst thing first."""
        warn = warn_age if warn_age is not None else max_age / 2
        r = self.record
        age = self.confirmed_age
        down = self.ldap_down_for
        ldap = "" if down is None else f"; LDAP unreachable for {down:.0f}s ({r.follower_error or 'no error recorded'})"
        if self.missing:
            return Verdict(CRITICAL, f"missing outputs: {', '.join(self.missing)}")
        if age is None:
            return Verdict(CRITICAL, "installed outputs never confirmed by a successful sync")
        if age > max_age:
            why = r.error or (r.result.value if r.result else "no result")
            return Verdict(CRITICAL, f"installed outputs last confirmed {age:.0f}s ago ({why}){ldap}")
        if self.config_problem:
            return Verdict(
                WARNING,
                f"config file rejected, the agent runs the previous one and a restart would fail: "
                f"{self.config_problem}",
            )
        if down is not None and down > self.ldap_timeout:
            return Verdict(
                WARNING,
                f"LDAP unreachable for {down:.0f}s ({r.follower_error or 'no error recorded'}); "
                f"serving installed maps confirmed {age:.0f}s ago",
            )
        if r.held:
            return Verdict(WARNING, f"change held for review: {r.held}")
        if self.failed:
            return Verdict(WARNING, f"last sync failed: {r.error or r.result}")
        if self.modified:
            return Verdict(WARNING, f"changed outside ldapsync since installed: {', '.join(self.modified)}")
        if age > warn:
            return Verdict(WARNING, f"installed outputs last confirmed {age:.0f}s ago")
        if r.reload_pending:
            return Verdict(WARNING, f"reload pending for {', '.join(r.reload_pending)}")
        if r.metrics_error:
            return Verdict(WARNING, r.metrics_error)
        return Verdict(OK, f"confirmed {age:.0f}s ago, generation {self.generation}")

    # -- the agent's one-line summary ------------------------------------------------------------
    def status_line(self, *, following: str | None = None, retry_in: float | None = None) -> str:
        """systemd's STATUS line: what is wrong first, then what is served; no ages (it is not
        rewritten as time passes, so it names times of day instead)."""
        r = self.record
        serving = f"serving generation {self.generation or r.generation or 'none'}"
        parts: list[str] = []
        if self.config_problem:
            parts.append(f"config file REJECTED, a restart would fail ({self.config_problem})")
        if r.result is SyncResult.FAILED or (r.result is SyncResult.LAST_KNOWN_GOOD and r.error):
            when = "" if retry_in is None else f", retry in {retry_in:.0f}s"
            parts.append(f"sync FAILED ({r.error}{when})")
        elif r.held:
            parts.append(f"change HELD for review ({r.held}): ldapsync approve")
        elif r.result is SyncResult.ROLLED_BACK:
            parts.append(f"ROLLED BACK to {r.generation} until the next directory change")
        if r.follower_connected is False:
            since = "" if r.ldap_lost is None else f" since {clock_time(r.ldap_lost)}"
            parts.append(f"directory unreachable{since} ({r.follower_error or 'connecting'})")
        elif following:
            parts.append(f"following {following}")
        installed = "" if r.last_success is None else f", last sync {clock_time(r.last_success)}"
        parts.append(serving + installed)
        return " ".join("; ".join(parts).split())  # one line: sd_notify reads a newline as the next field


def clock_time(t: float) -> str:
    """A time of day, for lines that are not rewritten as time passes."""
    return time.strftime("%H:%M:%S", time.localtime(t))
