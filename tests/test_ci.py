"""The CI and the test command: one Debian package list (.ci/packages) installs everything the
tests run, so a fresh Debian 12 machine runs every test and skips none."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import debpackages
import pytest

REPO = Path(__file__).resolve().parent.parent
CI = REPO / ".ci"

# First words of commands in the sources that are not programs the tests need from a package
NOT_PROGRAMS = {"true", "sh", "bash", "env", "head", "kill", "id", "ls", "cat", "python3", "git", "dpkg", "dpkg-query"}
_CALL_RE = re.compile(
    r"""(?:\b(?:run|Popen|check_output|check_call|call)\(\s*\[\s*|\bwhich\(\s*|\b(?:cmd|argv|exe)\s*=\s*\[\s*)"""
    r"""["']([A-Za-z0-9_./-]+)["']"""
)


def programs_in_sources() -> dict[str, set[str]]:
    """program -> files that run it, from tests/, ldapsync/testing/, bench/ (the Python sources)."""
    found: dict[str, set[str]] = {}
    for root in ("tests", "ldapsync/testing", "bench"):
        for path in (REPO / root).rglob("*.py"):
            for m in _CALL_RE.finditer(path.read_text()):
                name = m.group(1)
                if name.startswith("-"):
                    continue
                found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_program_the_tests_run_is_installed_from_a_listed_package() -> None:
    assert debpackages.problems() == []


def test_every_program_named_in_the_test_sources_is_checked() -> None:
    """A test that starts a new program must add it (and its package) to tests/debpackages.py."""
    known = {p.rsplit("/", 1)[-1] for p in debpackages.PROGRAMS} | NOT_PROGRAMS
    unknown = {
        name: sorted(files)
        for name, files in programs_in_sources().items()
        if name.rsplit("/", 1)[-1] not in known and not name.startswith(("/usr/bin/python", "/work"))
    }
    assert unknown == {}, "add these programs and their Debian packages to tests/debpackages.py"


def test_the_packages_the_ci_bug_missed_are_listed() -> None:
    listed = debpackages.listed()
    for pkg in ("dovecot-lmtpd", "dovecot-imapd", "ssl-cert", "python3-lmdb", "389-ds-base", "postfix-lmdb"):
        assert pkg in listed
    assert len(listed) == len(set(listed))
    for line in (CI / "packages").read_text().splitlines():
        assert not line.strip() or line.startswith("#") or "#" in line, f"say why: {line!r}"


def test_a_missing_package_is_named(tmp_path: Path) -> None:
    lacking = tmp_path / "packages"
    lacking.write_text((CI / "packages").read_text().replace("dovecot-lmtpd", "# dovecot-lmtpd"))
    found = debpackages.problems(packages_file=lacking)
    assert any("/usr/lib/dovecot/lmtp" in p and "dovecot-lmtpd" in p for p in found), found
    programs = {**debpackages.PROGRAMS, "ldapsync-no-such-tool": "ldapsync-no-such-package"}
    lacking.write_text((CI / "packages").read_text() + "ldapsync-no-such-package  # test\n")
    found = debpackages.problems(programs, packages_file=lacking)
    assert found == [
        f"Debian package ldapsync-no-such-package (in {lacking}) is not installed: apt-get install "
        "ldapsync-no-such-package (or run .ci/test, which installs the whole list)"
    ]


def test_a_test_session_stops_naming_the_missing_package(tmp_path: Path) -> None:
    """pytest itself refuses to start, rather than skip the tests that need the package."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for d in ("tests", ".ci", "fixtures"):
        shutil.copytree(REPO / d, copy / d, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    packages = copy / ".ci" / "packages"
    packages.write_text(packages.read_text().replace("dovecot-lmtpd", "# dovecot-lmtpd"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            str(copy / "tests" / "test_ber.py"),
        ],
        cwd=copy,
        env={k: v for k, v in os.environ.items() if k != "LDAPSYNC_TESTS_WITHOUT_PACKAGES"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr  # a usage error
    assert (
        "/usr/lib/dovecot/lmtp comes from Debian package dovecot-lmtpd, which .ci/packages does not list"
        in proc.stdout + proc.stderr
    )


def test_the_readme_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    commands = [line for line in readme.split("```sh", 1)[1].split("```", 1)[0].splitlines() if line and line[0] != "#"]
    assert len(commands) == 2 and commands[1] == ".ci/test", commands
    assert ".ci/packages" in readme.split("```", 2)[1]
    run, test, install = ((CI / name).read_text() for name in ("run", "test", "install-packages"))
    assert "\n.ci/test\n" in run and "\n.ci/install-packages\n" in run
    assert "\n.ci/install-packages\n" in test and "pytest -n auto" in test and "pip install -q -e '.[test]'" in test
    assert "DEBIAN_FRONTEND=noninteractive" in install and "--no-install-recommends" in install
    assert ".ci/packages" in install
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^test = \[.*"pytest-xdist', pyproject, re.M)


@pytest.mark.parametrize("script", ["run", "test", "install-packages", "smoke-test"])
def test_ci_scripts_are_executable_bash(script: str) -> None:
    path = CI / script
    assert path.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(path)], check=True)
