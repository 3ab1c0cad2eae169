"""Whether what is in the state directory may be trusted.

ldapsync runs as root and installs what it reads from the state directory (last-known-good
generations, held changes), so the directory and everything in it must belong to the running
user and not be writable by anyone else. Anything else is refused with the path and its owner;
the follow cache is ignored instead (its reader falls back to a full read).
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import structlog

from ldapsync.errors import StateError

log = structlog.get_logger(__name__)

# Caches with their own reader that re-verifies them (and ignores them if untrusted): the
# follow state of ldapsync.mirror, the store of ldapsync.state.lmdbstore. Everything else in
# the state dir is refused if not ours.
CACHE_FILES = frozenset({"follow.json", "follow-snapshot.json", "mirror.lmdb"})


def untrusted(path: Path, *, private: bool = False) -> str | None:
    """Why `path` in the state dir must not be trusted, or None (also when it does not exist).

    Not ours, a symlink, or writable by others; with `private`, any group/other access.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by {user(st.st_uid)}, not by {user(os.geteuid())} (the user ldapsync runs as)"
    too_open = (stat.S_IRWXG | stat.S_IRWXO) if private else (stat.S_IWGRP | stat.S_IWOTH)
    if st.st_mode & too_open:
        how = "accessible" if private else "writable"
        return f"{path} is {how} by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def ensure_root(root: Path) -> None:
    """Create the state dir 0700; refuse one that others can read (it holds hashes) or that
    is not ours (another user could plant what ldapsync installs)."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.stat()
    except OSError as e:
        raise StateError(f"state_dir {root}: {e.strerror}") from e
    if st.st_uid != os.geteuid():
        raise StateError(
            f"state_dir {root} is owned by {user(st.st_uid)}, not by {user(os.geteuid())} "
            "(the user ldapsync runs as): another user could plant what ldapsync installs; "
            "remove it or chown -R it"
        )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StateError(
            f"state_dir {root} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); it holds password hashes: chmod 0700 it"
        )


def check_contents(root: Path) -> None:
    """StateError naming the first file under `root` that is not ours (caches excepted)."""
    for top, dirs, files in os.walk(root):
        here = Path(top)
        if here == root:
            dirs[:] = [d for d in dirs if d not in CACHE_FILES]  # a cache's reader checks its insides
        for name in [*dirs, *files]:
            if here == root and name in CACHE_FILES:
                continue
            problem = untrusted(here / name)
            if problem:
                raise StateError(f"state_dir: {problem}; remove it or chown it")


def trusted(root: Path, *names: str) -> bool:
    """Whether the state dir and these files in it are ours and private; logs why not."""
    for path in (root, *(root / n for n in names)):
        problem = untrusted(path, private=True)
        if problem:
            log.error("state file not trusted; ignoring it", problem=problem)
            return False
    return True
