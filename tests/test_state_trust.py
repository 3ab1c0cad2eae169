"""What in the state dir may be trusted: ours, no symlink, not writable (or, private, not
readable) by others; the follow cache is exempt from the walk (its reader checks it)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from ldapsync.errors import StateError
from ldapsync.state import trust

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "state"
    trust.ensure_root(r)
    return r


def test_a_missing_file_is_not_a_problem(root: Path) -> None:
    assert trust.untrusted(root / "nothing") is None


@pytest.mark.parametrize(
    ("setup", "private", "says"),
    [
        ("symlink", False, "is a symbolic link"),
        ("nobody", False, "is owned by nobody (uid"),
        ("group-writable", False, "is writable by group or others (mode 0660)"),
        ("group-readable", True, "is accessible by group or others (mode 0640)"),
    ],
)
def test_untrusted_says_why(root: Path, setup: str, private: bool, says: str) -> None:
    path = root / "file"
    if setup == "symlink":
        path.symlink_to(root / "elsewhere")
    else:
        path.write_text("x")
        path.chmod({"group-writable": 0o660, "group-readable": 0o640}.get(setup, 0o600))
        if setup == "nobody":
            os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    problem = trust.untrusted(path, private=private)
    assert problem is not None and problem.startswith(str(path)) and says in problem


def test_group_readable_is_fine_unless_private(root: Path) -> None:
    path = root / "status.json"
    path.write_text("{}")
    path.chmod(0o644)
    assert trust.untrusted(path) is None
    assert trust.trusted(root, "status.json") is False


def test_ensure_root_creates_0700_and_refuses_an_open_or_foreign_dir(tmp_path: Path) -> None:
    root = tmp_path / "a" / "state"
    trust.ensure_root(root)
    assert root.stat().st_mode & 0o777 == 0o700
    root.chmod(0o750)
    with pytest.raises(StateError, match=r"accessible by group or others \(mode 0750\).*chmod 0700"):
        trust.ensure_root(root)
    root.chmod(0o700)
    os.chown(root, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(StateError, match="owned by nobody"):
        trust.ensure_root(root)


def test_check_contents_names_the_first_foreign_file_but_skips_the_follow_cache(root: Path) -> None:
    for name in trust.CACHE_FILES:
        (root / name).write_text("{}")
        os.chown(root / name, NOBODY.pw_uid, NOBODY.pw_gid)
    trust.check_contents(root)  # the caches: their reader ignores them instead
    deep = root / "generations" / "g1"
    deep.mkdir(parents=True)
    (deep / "meta.json").write_text("{}")
    os.chown(deep / "meta.json", NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(StateError, match=f"{deep / 'meta.json'} is owned by nobody.*remove it or chown it"):
        trust.check_contents(root)
