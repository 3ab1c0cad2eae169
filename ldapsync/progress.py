"""A progress line for long work: entries read, rate, phase.

A cold start or `--once` at a million entries takes a minute; without a word the operator
cannot tell a slow read from a hang. `Progress` decides what the line says and when it is
due (pure: the time is an argument, so tests use a fake clock): nothing for work shorter
than `delay`, then at most one line per `interval`. `Terminal` draws it on stderr, only
when stderr is a terminal and the logs are not JSON: never in cron mail, the journal or a
log collector. The agent's systemd STATUS line uses `Progress.status` for the same words.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

DELAY = 1.0  # seconds of work before the first line: short runs print nothing
INTERVAL = 0.5  # seconds between lines: at most two updates a second
CLEAR = "\r\x1b[K"  # carriage return, erase to the end of the line


class Progress:
    """What the progress line says, and whether it is due."""

    def __init__(self, start: float, *, delay: float = DELAY, interval: float = INTERVAL):
        self.start = start
        self.delay = delay
        self.interval = interval
        self.phase = ""
        self.count: int | None = None
        self._phase_start = start
        self._phase_count = 0
        self._last: float | None = None  # when a line was last due

    def update(self, now: float, phase: str, count: int | None = None) -> str | None:
        """Note where the work is; the line to show if one is due, else None."""
        self.note(now, phase, count)
        if now - self.start < self.delay:
            return None
        if self._last is not None and now - self._last < self.interval:
            return None
        self._last = now
        return self.line(now)

    def note(self, now: float, phase: str, count: int | None = None) -> None:
        if phase != self.phase:
            self.phase, self._phase_start = phase, now
            self._phase_count = count or 0
        self.count = count

    def line(self, now: float) -> str:
        """'reading the directory: 120,000 entries, 40,000/s, 3s' (what is known of it)."""
        parts = []
        if self.count is not None:
            parts.append(f"{self.count:,} entries")
            elapsed = now - self._phase_start
            if elapsed >= self.interval and self.count != self._phase_count:  # a phase that counts
                parts.append(f"{(self.count - self._phase_count) / elapsed:,.0f}/s")
        parts.append(f"{now - self.start:.0f}s")
        return f"{self.phase}: {', '.join(parts)}"

    def status(self, now: float, phase: str, count: int | None = None) -> str:
        """The line as of now, whether or not one is due (systemd's STATUS sends only changes)."""
        self.note(now, phase, count)
        return self.line(now)


Report = Callable[[str, "int | None"], None]


def silent(phase: str, count: int | None = None) -> None:
    """Progress reported nowhere (not a terminal, JSON logs, the agent)."""


_shown: Terminal | None = None  # the Terminal whose line is on the screen now


def erase_for_log(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: erase a progress line before a log line is written below it."""
    if _shown is not None:
        _shown.erase()
    return event_dict


class Terminal:
    """Draws the progress line on a terminal stream, rewriting it in place; close() erases it."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.clock = clock
        self.progress = Progress(clock())
        self.shown = False

    @classmethod
    def for_stderr(cls, log_format: str) -> Report:
        """A Terminal on stderr if it is a terminal and logs are not JSON, else `silent`."""
        if log_format == "json" or not _isatty(sys.stderr):
            return silent
        return cls(sys.stderr)

    def __call__(self, phase: str, count: int | None = None) -> None:
        line = self.progress.update(self.clock(), phase, count)
        if line is not None:
            global _shown
            self.stream.write(CLEAR + line)
            self.stream.flush()
            self.shown, _shown = True, self

    def erase(self) -> None:
        """Take the line off the screen (a log line follows; the next update draws it again)."""
        global _shown
        if self.shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self.shown = False
        if _shown is self:
            _shown = None

    def close(self) -> None:
        self.erase()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
