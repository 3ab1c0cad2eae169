"""Is the syncrepl copy in step with the server? The contextCSN check, sans I/O.

A server answering a liveness read proves it alive, not that our copy holds what it holds:
a change the server (or a proxy, or the network) silently dropped in the persist phase
leaves the follower connected and quiet, with a wrong map, for good. syncprov keeps the
suffix's contextCSN, one CSN per serverID (the newest change each provider made), and sends
a cookie with every change and with a new cookie for writes outside our search: once
everything the server committed has reached us, the CSN set in our cookie has caught up
with its contextCSN, sid by sid.

A server CSN newer than ours may just be a change in flight. So a sid is out of step only
when our CSN is still older than the server CSN seen at an earlier check at least `grace`
seconds ago: an honest server under a steady burst moves its contextCSN on, but what it had
`grace` ago has reached us. The comparison is per sid; a sid the server has and our cookie
does not name is not judged (the cookie after a full refresh names them all).

CSNs and cookies come from the network: a malformed one is a problem to report, never a
crash, and is left out of the comparison.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# OpenLDAP CSN: YYYYmmddHHMMSS.uuuuuuZ#count#sid#mod (2.4+); the sid and the count in hex.
_CSN = re.compile(r"(\d{14})\.(\d{6})Z#([0-9a-fA-F]{6})#([0-9a-fA-F]{3})#([0-9a-fA-F]{6})")


@dataclass(frozen=True, slots=True, order=True)
class Csn:
    """One change sequence number; orders as the server does (time, then count, then mod)."""

    time: str  # YYYYmmddHHMMSS, fixed width: orders as text
    micro: int
    count: int
    mod: int
    sid: int
    text: str

    def __str__(self) -> str:
        return self.text


def parse_csn(value: str | bytes) -> Csn | None:
    """The CSN `value` names, or None when it is not one."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    m = _CSN.fullmatch(value.strip())
    if m is None:
        return None
    return Csn(m[1], int(m[2]), int(m[3], 16), int(m[5], 16), int(m[4], 16), m[0].strip())


@dataclass(frozen=True, slots=True)
class CsnSet:
    """The newest CSN per sid, and the values that were not CSNs (shown, not compared)."""

    by_sid: Mapping[int, Csn]
    malformed: tuple[str, ...] = ()


def csn_set(values: Iterable[str | bytes]) -> CsnSet:
    """Per sid the newest of `values` (contextCSN values, or a cookie's csn= list)."""
    out: dict[int, Csn] = {}
    bad: list[str] = []
    for value in values:
        csn = parse_csn(value)
        if csn is None:
            bad.append(_shown(value))
        elif csn.sid not in out or out[csn.sid] < csn:
            out[csn.sid] = csn
    return CsnSet(out, tuple(bad))


def cookie_csns(cookie: bytes | None) -> CsnSet:
    """The CSN set of an OpenLDAP sync cookie (`rid=NNN,sid=NNN,csn=CSN;CSN...`).

    A cookie without `csn=` (a server that sends none, a cookie of another implementation)
    is an empty set: nothing to compare, not an error."""
    if not cookie:
        return CsnSet({})
    try:
        text = cookie.decode("ascii")
    except UnicodeDecodeError:
        return CsnSet({}, (_shown(cookie),))
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip().lower() == "csn":
            return csn_set(v for v in value.split(";") if v)
    return CsnSet({})


def merge(ours: Mapping[int, Csn], newer: Mapping[int, Csn]) -> dict[int, Csn]:
    """Per sid the newer of the two: a persist-phase cookie names only the change's sid."""
    out = dict(ours)
    for sid, csn in newer.items():
        if sid not in out or out[sid] < csn:
            out[sid] = csn
    return out


@dataclass(frozen=True, slots=True)
class InStep:
    """Every sid we can judge has caught up with what the server had `grace` ago: confirm."""


@dataclass(frozen=True, slots=True)
class Pending:
    """The server is ahead on some sid, not for long enough to tell: do not confirm now.

    `caught_up_to`: the time of the previous read if we hold all the server had then (a
    steady burst: confirm as of that read), else None."""

    sids: tuple[int, ...]
    caught_up_to: float | None = None


@dataclass(frozen=True, slots=True)
class OutOfStep:
    """Our CSN for `sid` is still older than the server's of at least `grace` ago: refresh."""

    sid: int
    ours: Csn
    server: Csn
    since: float  # when the server was first seen ahead with `server`


Verdict = InStep | Pending | OutOfStep


class StepCheck:
    """Compares successive contextCSN reads with our CSN set, on the caller's clock.

    `observe` is called after each read; it keeps, per sid the server was ahead on, the
    server CSN of the first such read and when, and calls the copy out of step once our CSN
    is still older than that after `grace` seconds (and at a later read: two reads at least).
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._ahead: dict[int, tuple[Csn, float]] = {}  # sid -> (server CSN, monotonic time first seen ahead)
        self._last: tuple[Mapping[int, Csn], float] | None = None  # the previous read and when

    def reset(self) -> None:
        """Forget what was pending (a new connection, a full refresh)."""
        self._ahead.clear()
        self._last = None

    def observe(self, server: Mapping[int, Csn], ours: Mapping[int, Csn], now: float) -> Verdict:
        ahead: dict[int, tuple[Csn, float]] = {}
        late: OutOfStep | None = None
        for sid, theirs in sorted(server.items()):
            mine = ours.get(sid)
            if mine is None or mine >= theirs:
                continue  # not judged, or caught up
            seen = self._ahead.get(sid)
            if seen is not None and mine < seen[0]:
                if now - seen[1] >= self.grace and now > seen[1]:
                    late = late or OutOfStep(sid, mine, theirs, seen[1])
                ahead[sid] = seen
            else:  # newly ahead, or we passed what it had then: a fresh target
                ahead[sid] = (theirs, now)
        previous, self._ahead, self._last = self._last, ahead, (dict(server), now)
        if late is not None:
            return late
        if not ahead:
            return InStep()
        caught_up = previous is not None and all(
            sid not in ours or ours[sid] >= theirs for sid, theirs in previous[0].items()
        )
        return Pending(tuple(ahead), previous[1] if caught_up and previous is not None else None)


def _shown(value: str | bytes, limit: int = 80) -> str:
    """An untrusted value for a log line: printable, bounded."""
    text = value.decode("ascii", "backslashreplace") if isinstance(value, bytes) else value
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


class FalseAlarms:
    """Servers whose contextCSN moves without a change this copy could have missed.

    A server that sends no new cookie for a write outside our search (OpenLDAP before 2.5)
    leaves our cookie behind its contextCSN after every such write: the check would call the
    copy out of step, and the full refresh would find it complete, again and again. So a
    full refresh the check asked for that changes nothing turns the check off for that
    server (for as long as the follower runs): one wasted refresh, not one per write.
    """

    __slots__ = ("_off", "_suspect")

    def __init__(self) -> None:
        self._suspect: dict[str, object] = {}  # server -> the copy's content when it was called out of step
        self._off: set[str] = set()

    def called_out(self, server: str, content: object) -> None:
        """The check called the copy out of step; `content` is the copy's digest then."""
        self._suspect[server] = content

    def refreshed(self, server: str, content: object) -> bool:
        """A full refresh from `server` completed. True: it was the check's, and found nothing
        missing: the check is off for this server from now on."""
        if server not in self._suspect:
            return False
        if self._suspect.pop(server) == content:
            self._off.add(server)
            return True
        return False

    def trusted(self, server: str) -> bool:
        """Whether the in-step check may judge this server."""
        return server not in self._off
