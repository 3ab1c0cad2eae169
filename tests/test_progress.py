"""The progress line: when it is due and what it says (fake clock), and that it reaches a
terminal -- only a terminal -- rewritten in place (a real pty)."""

from __future__ import annotations

import io
import itertools
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ldapsync import progress
from ldapsync.progress import CLEAR, Progress, Terminal

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"


def test_nothing_is_shown_for_short_work() -> None:
    p = Progress(100.0)
    assert p.update(100.0, "reading the directory", 0) is None
    assert p.update(100.9, "reading the directory", 50_000) is None
    assert p.update(101.0, "reading the directory", 60_000) is not None


def test_at_most_two_lines_a_second_however_often_it_is_told() -> None:
    p = Progress(0.0)
    shown = [t for t in range(0, 10_000) if p.update(1.0 + t / 1000, "reading the directory", t * 10) is not None]
    assert len(shown) == 20, shown  # 10 s of updates every millisecond
    assert all(b - a >= 500 for a, b in itertools.pairwise(shown))


def test_the_line_names_phase_entries_rate_and_elapsed_time() -> None:
    p = Progress(0.0)
    p.update(0.0, "reading the directory", 0)
    assert p.update(4.0, "reading the directory", 120_000) == "reading the directory: 120,000 entries, 30,000/s, 4s"
    # a new phase: its own rate, from its own start
    p.update(5.0, "building the maps", 150_000)
    assert p.update(7.0, "building the maps", 150_000) == "building the maps: 150,000 entries, 7s"
    p.update(8.0, "installing")
    assert p.line(9.0) == "installing: 9s"


def test_status_gives_the_line_whether_or_not_it_is_due() -> None:
    p = Progress(10.0)
    assert p.status(10.0, "reading the directory", 0) == "reading the directory: 0 entries, 0s"
    assert p.status(12.0, "reading the directory", 0) == "reading the directory: 0 entries, 2s"
    assert p.status(10.1, "reading the directory", 5) == "reading the directory: 5 entries, 0s"
    assert p.status(20.0, "reading the directory", 100_000) == "reading the directory: 100,000 entries, 10,000/s, 10s"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_terminal_rewrites_the_line_in_place_and_erases_it_at_the_end() -> None:
    out, clock = io.StringIO(), FakeClock()
    t = Terminal(out, clock)
    t("reading the directory", 0)
    clock.now = 2.0
    t("reading the directory", 1000)
    clock.now = 2.1
    t("reading the directory", 1100)  # not due
    clock.now = 3.0
    t("building the maps", 3000)
    t.close()
    assert out.getvalue() == (
        CLEAR
        + "reading the directory: 1,000 entries, 500/s, 2s"
        + CLEAR
        + "building the maps: 3,000 entries, 3s"
        + CLEAR
    )


def test_a_log_line_erases_the_progress_line_first() -> None:
    out, clock = io.StringIO(), FakeClock()
    t = Terminal(out, clock)
    clock.now = 2.0
    t("reading the directory", 10)
    event = {"event": "x"}
    assert progress.erase_for_log(None, "warning", event) is event
    assert out.getvalue().endswith(CLEAR) and not t.shown
    progress.erase_for_log(None, "warning", event)  # nothing shown: nothing written
    assert out.getvalue().count(CLEAR) == 2
    t.close()
    assert out.getvalue().count(CLEAR) == 2


def test_not_a_terminal_or_json_logs_report_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert Terminal.for_stderr("console") is progress.silent
    primary, secondary = pty.openpty()
    with os.fdopen(secondary, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        assert isinstance(Terminal.for_stderr("auto"), Terminal)
        assert Terminal.for_stderr("json") is progress.silent
    os.close(primary)


# A sync slow enough to show progress: the renderer is slowed for the test (monkeypatched in the
# child), so the line appears whatever the machine's speed, and the child says when it is done.
SLOW_ONCE = """
import sys, time
from ldapsync import cli, sync
plan = sync.Pipeline.plan
def slow_plan(self, *args, **kwargs):
    time.sleep(1.6)
    return plan(self, *args, **kwargs)
sync.Pipeline.plan = slow_plan
sys.exit(cli.main(["-c", sys.argv[1], "--once"]))
"""


def write_config(root: Path, log_format: str) -> Path:
    doc = {
        "domain": "example.org",
        "source": {"ldif": {"path": str(DEMO_LDIF), "base_dn": "ou=users,dc=example,dc=org"}},
        "state_dir": str(root / "state"),
        "log": {"format": log_format},
        "exporters": [{"kind": "dovecot-passwd", "path": str(root / "passwd")}],
    }
    path = root / "ldapsync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_on_pty(config: Path, *, stderr_is_tty: bool) -> tuple[int, bytes]:
    primary, secondary = pty.openpty()
    stderr = secondary if stderr_is_tty else subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_ONCE, str(config)], stdin=subprocess.DEVNULL, stdout=secondary, stderr=stderr
    )
    os.close(secondary)
    data = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    os.close(primary)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, data if stderr_is_tty else (err or b"")


def test_once_on_a_terminal_shows_progress_and_erases_it(tmp_path: Path) -> None:
    code, seen = run_on_pty(write_config(tmp_path, "console"), stderr_is_tty=True)
    assert code == 0, seen
    # the slowed plan() makes the run pass the delay: the next phase is shown, then erased
    # before the next log line, which starts at the line's beginning
    assert b"\r\x1b[Kinstalling: 22 entries, " in seen, seen
    after = seen[seen.index(b"installing: ") :]
    assert b"\r\x1b[K" in after and b"installed" in after.split(b"\r\x1b[K", 1)[1], seen


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_once_with_stderr_not_a_terminal_shows_no_progress(tmp_path: Path, log_format: str) -> None:
    code, err = run_on_pty(write_config(tmp_path, log_format), stderr_is_tty=False)
    assert code == 0, err
    assert b"\x1b[K" not in err and b"installing:" not in err


def test_once_on_a_terminal_with_json_logs_shows_no_progress(tmp_path: Path) -> None:
    code, seen = run_on_pty(write_config(tmp_path, "json"), stderr_is_tty=True)
    assert code == 0, seen
    assert b"\x1b[K" not in seen and b"installing:" not in seen
