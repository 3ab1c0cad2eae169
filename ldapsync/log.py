"""structlog set-up: readable on a terminal, one JSON object per line otherwise.

Libraries (ldap3, watchdog, tenacity) log through the standard `logging` module; their
records are rendered by the same structlog renderer, so the stream stays one format.

When stderr is the journal, each line starts with its syslog priority as `<N>`: systemd's
SyslogLevelPrefix= reads it, so `journalctl -p warning -u ldapsync` works. Anywhere else
(cron mail, a pipe into jq, a file) a line is just the line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from ldapsync import progress

# syslog(3) priorities, as systemd reads them from a `<N>` line prefix
PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


def wants_priority_prefix() -> bool:
    """Prefix lines only when stderr is the journal's stream.

    systemd sets JOURNAL_STREAM to the "device:inode" of the stream it connected to stderr;
    the variable is inherited by children whose stderr goes elsewhere (`ldapsync --once
    2>&1 | jq` in a unit's shell, a cron job started from a service), so it counts only when
    it names our own stderr.
    """
    return on_journal(os.environ.get("JOURNAL_STREAM"), sys.stderr)


def on_journal(journal_stream: str | None, stream: Any) -> bool:
    """Whether `stream` is the journal stream that JOURNAL_STREAM ("dev:ino") names."""
    if not journal_stream:
        return False
    dev, sep, ino = journal_stream.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(sep) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def _with_priority(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    def render(logger: Any, method_name: str, event_dict: Any) -> Any:
        level = str(event_dict.get("level", method_name)).lower()
        line = renderer(logger, method_name, event_dict)
        return f"<{PRIORITY.get(level, 6)}>{line.decode() if isinstance(line, bytes) else line}"

    return render


def configure(fmt: str = "auto", level: str = "info", *, priority_prefix: bool | None = None) -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False) if use_console else structlog.processors.JSONRenderer()
    )
    if wants_priority_prefix() if priority_prefix is None else priority_prefix:
        renderer = _with_priority(renderer)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            progress.erase_for_log,  # a progress line on the terminal is not left under a log line
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, timestamper],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    # Libraries are chatty at INFO; their warnings and errors are what an admin needs.
    root.setLevel(max(logging.WARNING, getattr(logging, level.upper())))
