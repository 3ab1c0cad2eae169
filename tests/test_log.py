"""Log lines carry their syslog priority where systemd reads it, so journald can filter by severity."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest

# systemd's SyslogLevelPrefix=: a line starting "<N>" (N 0-7) is logged at priority N, prefix removed
PREFIX = re.compile(r"^<([0-7])>(.*)$")

SCRIPT = textwrap.dedent(
    """
    import logging, structlog
    from ldapsync import log
    log.configure(*{args})
    structlog.get_logger("t").info("starting")
    structlog.get_logger("t").warning("a value was rejected", dn="uid=x")
    structlog.get_logger("t").error("install failed")
    logging.getLogger("ldap3").warning("a library warning")
    """
)


def run(args: tuple[str, ...] = (), *, journal: bool = True, **env: str) -> list[str]:
    """Log from a real process whose stderr is a file; journal: JOURNAL_STREAM names that file,
    as systemd names the stream it connects to a service's stderr."""
    child_env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"} | env
    with tempfile.TemporaryFile() as err:
        if journal:
            st = os.fstat(err.fileno())
            child_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run(
            [sys.executable, "-c", SCRIPT.format(args=args)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=child_env,
            timeout=60,
            check=True,
        )
        err.seek(0)
        return err.read().decode().splitlines()


def priorities(lines: list[str]) -> dict[str, int]:
    """event -> the priority systemd would log it at."""
    out = {}
    for line in lines:
        m = PREFIX.match(line)
        assert m, f"no priority prefix: {line!r}"
        out[re.search(r"(starting|a value was rejected|install failed|a library warning)", m.group(2))[0]] = int(
            m.group(1)
        )
    return out


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_on_the_journal_each_line_starts_with_its_syslog_priority(fmt: str) -> None:
    got = priorities(run((fmt, "info")))
    assert got == {"starting": 6, "a value was rejected": 4, "install failed": 3, "a library warning": 4}


def test_journal_filtering_by_warning_keeps_warnings_and_errors_only() -> None:
    """What `journalctl -p warning` keeps (priority <= 4) from a service's stderr."""
    lines = run(("json", "info"))
    kept = [PREFIX.match(line).group(2) for line in lines if int(PREFIX.match(line).group(1)) <= 4]  # type: ignore[union-attr]
    assert len(kept) == 3
    assert not any('"starting"' in k for k in kept)
    assert any('"event": "a value was rejected"' in k and '"level": "warning"' in k for k in kept)


def test_the_json_after_the_prefix_is_unchanged() -> None:
    import json

    for line in run(("json", "debug")):
        rec = json.loads(PREFIX.match(line).group(2))  # type: ignore[union-attr]
        assert rec["level"] in ("info", "warning", "error")


def test_prefix_can_be_turned_off_for_a_reader_that_wants_plain_lines() -> None:
    from ldapsync import log

    script = "from ldapsync import log; import structlog; log.configure('json', priority_prefix=False); "
    script += "structlog.get_logger().warning('w')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert proc.stderr.startswith("{"), proc.stderr
    assert log.PRIORITY["warning"] == 4 and log.PRIORITY["error"] == 3


def test_no_prefix_on_a_terminal() -> None:
    """An admin at a terminal reads plain lines (a pseudo-terminal stands in for it)."""
    master, slave = os.openpty()
    try:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        script = "from ldapsync import log; import structlog; log.configure(); structlog.get_logger().warning('w')"
        subprocess.run([sys.executable, "-c", script], stderr=slave, env=env, check=True, timeout=60)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = out.decode()
    assert "w" in text and not re.match(r"<[0-7]>", text), text


@pytest.mark.parametrize("inherited", [None, "8:12345"])
def test_no_prefix_off_the_journal(inherited: str | None) -> None:
    """Cron mail and `ldapsync --once 2>&1 | jq` read plain lines: a pipe is not the journal,
    even when JOURNAL_STREAM was inherited from a service and names another stream."""
    env = {} if inherited is None else {"JOURNAL_STREAM": inherited}
    lines = run(("json", "info"), journal=False, **env)
    assert lines and all(line.startswith("{") for line in lines), lines


def test_journal_stream_must_name_our_stderr() -> None:
    from ldapsync import log

    with tempfile.TemporaryFile() as f, tempfile.TemporaryFile() as other:
        st = os.fstat(f.fileno())
        assert log.on_journal(f"{st.st_dev}:{st.st_ino}", f)
        assert not log.on_journal(f"{st.st_dev}:{st.st_ino}", other)
        assert not log.on_journal("garbage", f)
        assert not log.on_journal(None, f)
