"""What the sdist, the wheel and the Debian package carry (built from this checkout, inspected)."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

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


def test_deb_ships_man_pages_and_monitoring(deb: Path, tmp_path: Path) -> None:
    files = _contents(deb)
    for page in ("/usr/share/man/man8/ldapsync.8.gz", "/usr/share/man/man5/ldapsync.yaml.5.gz"):
        assert files[page] == "-rw-r--r--", page
    assert files["/usr/share/ldapsync/ldapsync.rules.yml"] == "-rw-r--r--"
    assert files["/usr/share/ldapsync/grafana-dashboard.json"] == "-rw-r--r--"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    page = tmp_path / "usr/share/man/man8/ldapsync.8.gz"
    assert gzip.decompress(page.read_bytes()).startswith(b'.\\" Generated from docs/cli.md')
    if shutil.which("man") is not None:  # what `man ldapsync` shows once installed
        proc = subprocess.run(
            ["man", "--warnings", "-l", str(page)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"},
        )
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert "ldapsync - follow LDAP" in proc.stdout and "diff [GEN1] [GEN2]" in proc.stdout


# -- removing and purging: the maintainer scripts, run against a scratch root ---------------------
def _scripts(deb: Path, tmp: Path, root: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The package's prerm/postrm with /var/lib/ldapsync and /etc/ldapsync moved under `root`, and
    an environment whose PATH has this checkout's `ldapsync` and no-op systemctl/py3clean."""
    control = tmp / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    scripts = {}
    for name in ("prerm", "postrm", "postinst"):
        text = (control / name).read_text()
        text = text.replace("/var/lib/ldapsync", f"{root}/var/lib/ldapsync").replace(
            "/etc/ldapsync", f"{root}/etc/ldapsync"
        )
        scripts[name] = tmp / name
        scripts[name].write_text(text)
        scripts[name].chmod(0o755)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for stub in ("systemctl", "py3clean", "py3compile"):
        (bin_dir / stub).write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "ldapsync").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ldapsync "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(REPO)}
    return scripts, env


def _installed_site(root: Path) -> list[Path]:
    """A config under root/etc/ldapsync writing under root/etc/{postfix,dovecot}/ldapsync, synced
    once; the admin's own files next to the outputs. Returns the generated files."""
    (root / "etc/ldapsync").mkdir(parents=True)
    (root / "var/lib/ldapsync").mkdir(parents=True, mode=0o700)
    postfix, dovecot = root / "etc/postfix/ldapsync", root / "etc/dovecot/ldapsync"
    doc = {
        "domain": "example.org",
        "source": {"ldif": {"path": str(REPO / "fixtures/ldif/demo.ldif"), "base_dn": "ou=users,dc=example,dc=org"}},
        "state_dir": str(root / "var/lib/ldapsync"),
        "exporters": [
            {"kind": "postfix-virtual", "name": "alias", "path": str(postfix / "alias"), "include": ["aliases"]},
            {"kind": "postfix-recipients", "path": str(postfix / "recipients"), "map_type": "texthash"},
            {"kind": "dovecot-passwd", "path": str(dovecot / "mail-passwords")},
        ],
    }
    (root / "etc/ldapsync/ldapsync.yaml").write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "ldapsync", "-c", str(root / "etc/ldapsync/ldapsync.yaml"), "--once"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (postfix / "admin-notes").write_text("the admin's own file\n")
    (root / "etc/postfix/main.cf").write_text("# not ldapsync's\n")
    generated = [postfix / "alias", postfix / "alias.db", postfix / "recipients", dovecot / "mail-passwords"]
    assert all(p.is_file() for p in generated)
    return generated


def _run(script: Path, arg: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(script), arg], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, f"{script.name} {arg}: {proc.stderr}"
    return proc


@pytest.mark.skipif(shutil.which("postmap") is None, reason="postmap (postfix) not installed")
def test_purge_removes_the_generated_files_and_nothing_else(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    generated = _installed_site(root)
    scripts, env = _scripts(deb, tmp_path, root)
    _run(scripts["prerm"], "remove", env)
    _run(scripts["postrm"], "remove", env)
    assert all(p.is_file() for p in generated), "removing (not purging) keeps everything"

    proc = _run(scripts["postrm"], "purge", env)
    assert not any(p.exists() for p in generated), proc.stdout
    assert "removed 4 generated files" in proc.stdout
    assert (root / "etc/postfix/ldapsync/admin-notes").read_text() == "the admin's own file\n"
    assert (root / "etc/postfix/main.cf").exists()
    assert not (root / "etc/dovecot/ldapsync").exists(), "an emptied ldapsync/ directory goes"
    assert (root / "etc/dovecot").is_dir() and not (root / "var/lib/ldapsync").exists()


def test_purge_keeps_the_generated_files_and_says_so_without_a_readable_config(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/ldapsync").mkdir(parents=True)
    (root / "var/lib/ldapsync").mkdir(parents=True, mode=0o700)
    (root / "etc/ldapsync/ldapsync.yaml").write_text("domain: [broken\n")
    kept = root / "etc/postfix/ldapsync/alias"
    kept.parent.mkdir(parents=True)
    kept.write_text("a@example.org\tb@example.org\n")
    scripts, env = _scripts(deb, tmp_path, root)
    proc = _run(scripts["prerm"], "remove", env)
    assert "purging will keep the files ldapsync generated" in proc.stderr
    proc = _run(scripts["postrm"], "purge", env)
    assert "KEPT" in proc.stderr and kept.exists()
    assert not (root / "var/lib/ldapsync").exists()
