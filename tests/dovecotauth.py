"""A throwaway Dovecot auth server for the unit tests that prove a file Dovecot reads.

passwd-file passdb (and userdb, or a static one), no protocols, config, sockets, state and
log under one directory the `dovecot` user can read. `doveadm -c CONFIG auth test|login|user`
then asks it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STATIC_USERDB = (
    "userdb {\n  driver = static\n  args = uid=nobody gid=nogroup home=/nonexistent allow_all_users=yes\n}\n"
)


@contextmanager
def auth_server(root: Path, passdb: Path, userdb: Path | None = None) -> Iterator[Path]:
    """Dovecot running on `passdb` (and `userdb`; without it a static userdb) until the block
    ends; yields its config file. The log is `root/dovecot.log`."""
    root.chmod(0o755)  # the auth process runs as the dovecot user
    for d in ("run", "state"):
        (root / d).mkdir(exist_ok=True)
    users = f"userdb {{\n  driver = passwd-file\n  args = {userdb}\n}}\n" if userdb else STATIC_USERDB
    conf = root / "dovecot.conf"
    conf.write_text(
        f"base_dir = {root}/run\nstate_dir = {root}/state\nlog_path = {root}/dovecot.log\n"
        "protocols =\nssl = no\nauth_failure_delay = 0\n"
        f"passdb {{\n  driver = passwd-file\n  args = {passdb}\n}}\n" + users
    )
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not all((root / "run" / s).exists() for s in ("auth-client", "auth-userdb")):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = root / "dovecot.log"
                raise AssertionError(
                    f"dovecot did not start: {log.read_text(errors='replace') if log.exists() else ''}"
                )
            time.sleep(0.05)
        yield conf
    finally:
        proc.terminate()
        proc.wait(10)
