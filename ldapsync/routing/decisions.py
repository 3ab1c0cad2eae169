"""Where the build's decisions go: one call records the problem and, when tracing, its event.

A decision that drops or refuses something is told to the admin (a rejection or a notice
naming the DN and attribute) and, for `ldapsync explain`, traced as an Event at the address
it concerns. Both come from the same call, so the two can never disagree or be forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence

from ldapsync.directory import Rejection
from ldapsync.routing.types import Event, Rule, Trace


class Decisions:
    """Appends to the caller's lists of rejections and notices and to the trace (if any)."""

    __slots__ = ("notices", "rejections", "trace")

    def __init__(self, rejections: list[Rejection], trace: Trace | None = None, notices: list[Rejection] | None = None):
        self.rejections = rejections
        self.notices = notices if notices is not None else []
        self.trace = trace

    def reject(
        self,
        dn: str,
        attribute: str,
        reason: str,
        rule: Rule | None = None,
        at: str | Sequence[str] = (),
        detail: str | None = None,
    ) -> None:
        """A value or entry was dropped; traced as `rule` at `at` (one address or several)."""
        self.rejections.append(Rejection(dn, attribute, reason))
        if rule is not None:
            self.event(rule, at, dn, attribute, reason if detail is None else detail)

    def notice(
        self, dn: str, attribute: str, reason: str, rule: Rule | None = None, at: str | Sequence[str] = ()
    ) -> None:
        """Accepted, but the admin should look."""
        self.notices.append(Rejection(dn, attribute, reason))
        if rule is not None:
            self.event(rule, at, dn, attribute, reason)

    def event(self, rule: Rule, at: str | Sequence[str], source: str, attribute: str = "", detail: str = "") -> None:
        """A decision that is not a problem (an account, a forward): only explain shows it."""
        if self.trace is None:
            return
        if isinstance(at, str):
            self.trace.append(Event(rule, at, source, attribute, detail))
        else:
            self.trace.extend(Event(rule, a, source, attribute, detail) for a in at)
