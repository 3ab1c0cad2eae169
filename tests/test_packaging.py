"""What the sdist, the wheel and the Debian package carry (built from this checkout, inspected)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import ldapsync

REPO = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "demo-out")
DEBIAN_PYTHON = Path("/usr/bin/python3")


def _has_module(python: Path | str, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


def _build(tmp: Path, python: Path | str, what: str) -> Path:
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    code = f"import sys; from setuptools import build_meta as b; print(b.build_{what}(sys.argv[1]))"
    proc = subprocess.run(
        [str(python), "-c", code, str(tmp / "out")], cwd=src, capture_output=True, text=True, timeout=300, check=True
    )
    return tmp / "out" / proc.stdout.strip().splitlines()[-1]


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    """pyproject.toml lists packages explicitly (hooks/, systemd/, examples/ are mapped in): a new
    subpackage missing from the list would be missing from the wheel and the .deb."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ldapsync").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_sdist_has_the_license_and_no_tests_without_their_fixtures(tmp_path: Path) -> None:
    sdist = _build(tmp_path, sys.executable, "sdist")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert "LICENSE" in names
    assert {"hooks/postfix-reload", "systemd/ldapsync.service", "examples/ldapsync.yaml"} <= names
    tests = {n for n in names if n.startswith("tests/")}
    if tests:  # shipped tests must be runnable: their conftest, helpers and fixtures too
        assert {"tests/conftest.py", "tests/slapd.py", "fixtures/ldif/demo.ldif"} <= names


def test_wheel_carries_hooks_unit_and_example_config(tmp_path: Path) -> None:
    python = DEBIAN_PYTHON if _has_module(DEBIAN_PYTHON, "wheel") else sys.executable
    if not _has_module(python, "wheel"):
        pytest.skip("no wheel module to build with (apt install python3-wheel)")
    whl = _build(tmp_path, python, "wheel")
    with zipfile.ZipFile(whl) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    for hook in ("postfix-reload", "dovecot-reload", "check-canary"):
        info = infos[f"ldapsync/data/hooks/{hook}"]
        assert (info.external_attr >> 16) & 0o111, f"{hook} is not executable in the wheel"
    assert "ldapsync/data/systemd/ldapsync.service" in infos
    assert "ldapsync/data/examples/ldapsync.yaml" in infos
    assert "ldapsync/schema/ud-ldap.ldif" in infos
    assert any(n.endswith(".dist-info/LICENSE") for n in infos)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("dpkg-deb") is None or not _has_module(DEBIAN_PYTHON, "wheel"):
        pytest.skip("building the .deb needs dpkg-deb and python3-setuptools python3-wheel")
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run([str(REPO / ".ci" / "build-deb"), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.name == f"ldapsync_{ldapsync.__version__}_all.deb"
    return path


def _contents(deb: Path) -> dict[str, str]:
    """path -> permissions string, from dpkg-deb --contents."""
    out = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    files = {}
    for line in out.splitlines():
        fields = line.split()
        files[fields[5].lstrip(".").rstrip("/") or "/"] = fields[0]
    return files


def test_deb_installs_what_the_docs_promise(deb: Path) -> None:
    files = _contents(deb)
    assert files["/usr/bin/ldapsync"] == "-rwxr-xr-x"
    assert "/lib/systemd/system/ldapsync.service" in files
    for hook in ("postfix-reload", "dovecot-reload", "check-canary"):
        assert files[f"/usr/share/ldapsync/hooks/{hook}"] == "-rwxr-xr-x", hook
    assert "/usr/share/ldapsync/schema/ud-ldap.ldif" in files
    assert "/etc/ldapsync/ldapsync.yaml" in files
    assert files["/var/lib/ldapsync"] == "drwx------"
    for doc in ("README.md", "copyright", "docs/deployment.md", "docs/cli.md", "examples/demo/demo.ldif"):
        assert f"/usr/share/doc/ldapsync/{doc}" in files, doc
    assert "/usr/lib/python3/dist-packages/ldapsync/cli.py" in files
    assert any(p.endswith(".dist-info/entry_points.txt") for p in files), "exporter plugins are entry points"


def test_deb_conffile_and_debian_dependencies(deb: Path) -> None:
    def field(name: str) -> str:
        return subprocess.run(
            ["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True
        ).stdout.strip()

    conffiles = subprocess.run(
        ["dpkg-deb", "--info", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout
    assert conffiles.split() == ["/etc/ldapsync/ldapsync.yaml"]
    depends = [d.split()[0] for d in field("Depends").split(", ")]
    assert "python3-structlog" in depends and "python3-passlib" in depends
    assert all(d == "python3" or d.startswith("python3-") for d in depends), depends
    assert field("Architecture") == "all"
