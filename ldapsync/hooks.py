"""Run admin hooks (check hooks on staged files, reload hooks after install).

No shell: argv lists only. A hook that hangs is killed after its timeout, with its whole
process group, so a stuck `systemctl reload` cannot wedge the agent.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import structlog

from ldapsync.errors import HookError

log = structlog.get_logger(__name__)


def run(commands: Sequence[Sequence[str]], env: Mapping[str, str], timeout: float, *, phase: str) -> None:
    """Run each command in order; raise HookError on the first failure."""
    for argv in commands:
        full_env = {**os.environ, **env, "LDAPSYNC_PHASE": phase}
        try:
            proc = subprocess.Popen(
                list(argv),
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise HookError(f"{phase} hook {argv[0]}: cannot run: {e.strerror}") from e
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise HookError(f"{phase} hook {' '.join(argv)} timed out after {timeout:g}s") from None
        text = out.decode("utf-8", "replace").strip()
        if proc.returncode != 0:
            tail = text[-500:]
            raise HookError(f"{phase} hook {' '.join(argv)} exited {proc.returncode}: {tail}")
        log.info("hook ok", phase=phase, hook=argv[0], output=text[-200:] or None)
