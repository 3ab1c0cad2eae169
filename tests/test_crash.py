"""Fault tests: whatever happens mid-commit, every installed file is a whole version.

- `kill -9` of `ldapsync --once` at random points, many times, alternating two directory
  versions that change every output;
- a crash between the compiled map's rename and its source's, repaired by the next sync;
- the disk filling up while staging (a 64 KiB tmpfs; root only).
LDAP dropping the connection mid-read is in test_ldapsource.py (it needs the recording proxy).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import siteconfig
from slapd import generate_users_ldif

from ldapsync.state import State

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
POSTMAP = shutil.which("postmap", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
pytestmark = pytest.mark.skipif(POSTMAP is None, reason="postfix not installed: apt-get install postfix")

EXPORTERS: list[dict[str, Any]] = [
    {"kind": "postfix-virtual", "name": "alias", "path": "out/alias", "include": ["aliases", "forwards"]},
    {"kind": "postfix-transport", "path": "out/transport", "nexthop": "smtp:[srs.example.org]", "map_type": "lmdb"},
    {"kind": "postfix-recipients", "path": "out/recipients", "map_type": "cdb"},
    {"kind": "postfix-sender-login", "path": "out/sender_login"},
    {"kind": "postfix-access", "path": "out/disabled"},
    {"kind": "dovecot-passwd", "path": "out/passwd"},
]
COMPILED = {"hash": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}
BOB_HASH = next(
    line.split(":", 1)[1].strip()
    for line in DEMO_LDIF.read_text().split("dn: uid=bob,", 1)[1].splitlines()
    if line.startswith("mailPassword:")
)


def version2() -> str:
    """demo.ldif changed so that every output differs: a forward, a disable text, a new user."""
    text = DEMO_LDIF.read_text().replace("emailForward: bob@elsewhere.example", "emailForward: bob@v2.example")
    text = text.replace("mailDisableMessage: This account has been disabled", "mailDisableMessage: Gone since v2")
    assert "bob@v2.example" in text and "Gone since v2" in text
    return text + (
        "\ndn: uid=zed,ou=users,dc=example,dc=org\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncMailAccount\n"
        f"uid: zed\ncn: Zed\nsn: Zed\nemailForward: zed@elsewhere.example\nmailPassword: {BOB_HASH}\n"
    )


def write_config(root: Path, ldif: Path, exporters: list[dict[str, Any]] = EXPORTERS, **top: Any) -> Path:
    return siteconfig.write_config(root, exporters=exporters, ldif=ldif, **top)


def once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ldapsync", "-c", str(config), "--once"], capture_output=True, text=True, check=False
    )


def sources(root: Path) -> dict[str, bytes]:
    return {e["path"]: (root / e["path"]).read_bytes() for e in EXPORTERS}


def query(root: Path, exp: dict[str, Any], key: str) -> str | None:
    conf = root / "state" / "postfix-config"
    conf_args = ["-c", str(conf)] if conf.is_dir() else []
    map_type = exp.get("map_type", "hash")
    proc = subprocess.run(
        [str(POSTMAP), *conf_args, "-q", key, f"{map_type}:{root / exp['path']}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode in (0, 1) and not proc.stderr, f"{exp['path']}: postmap -q failed: {proc.stderr}"
    return proc.stdout.rstrip("\n") if proc.returncode == 0 else None


def query_all(root: Path, exp: dict[str, Any], keys: list[str]) -> dict[str, str | None]:
    """query() for many keys through one `postmap -q -` (the same lookups, one process per map)."""
    conf = root / "state" / "postfix-config"
    conf_args = ["-c", str(conf)] if conf.is_dir() else []
    map_type = exp.get("map_type", "hash")
    proc = subprocess.run(
        [str(POSTMAP), *conf_args, "-q", "-", f"{map_type}:{root / exp['path']}"],
        input="".join(f"{k}\n" for k in keys),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode in (0, 1) and not proc.stderr, f"{exp['path']}: postmap -q - failed: {proc.stderr}"
    found = dict(line.split("\t", 1) for line in proc.stdout.splitlines())
    assert set(found) <= set(keys), f"{exp['path']}: postmap -q - answered for keys not asked: {found}"
    return {k: found.get(k) for k in keys}


def first_keys(data: bytes) -> list[str]:
    keys = [line.split(b"\t", 1)[0].decode() for line in data.splitlines() if line]
    return [keys[0], keys[len(keys) // 2], keys[-1]] if keys else []


def answers(data: bytes, keys: list[str]) -> dict[str, str | None]:
    table = dict(line.decode().split("\t", 1) for line in data.splitlines() if line)
    return {k: table.get(k) for k in keys}


Versions = list[dict[str, bytes]]
Probe = dict[str, list[str]]
Answers = dict[str, list[dict[str, str | None]]]


def reference(tmp_path: Path, texts: list[str]) -> tuple[Versions, Probe, Answers, float]:
    """What each version installs, keys to ask each map, their answers, the longest run."""
    ref = tmp_path / "ref"
    ref.mkdir()
    versions: list[dict[str, bytes]] = []
    durations = []
    for text in texts:
        (ref / "users.ldif").write_text(text)
        started = time.monotonic()
        assert once(write_config(ref, ref / "users.ldif")).returncode == 0
        durations.append(time.monotonic() - started)
        versions.append(sources(ref))
    for e in EXPORTERS:
        assert versions[0][e["path"]] != versions[1][e["path"]], f"{e['path']} does not change between versions"
    probe = {
        e["path"]: sorted(set(first_keys(versions[0][e["path"]]) + first_keys(versions[1][e["path"]])))
        for e in EXPORTERS
        if e["kind"] != "dovecot-passwd"
    }
    expected_answers = {path: [answers(v[path], keys) for v in versions] for path, keys in probe.items()}
    return versions, probe, expected_answers, max(durations)


def assert_whole_versions(site: Path, versions: Versions, probe: Probe, expected: Answers, i: int) -> None:
    installed = sources(site)
    for e in EXPORTERS:
        path = e["path"]
        assert installed[path] in (versions[0][path], versions[1][path]), f"iteration {i}: {path} is partial/mixed"
        if path in probe:
            got = query_all(site, e, probe[path])
            assert got in expected[path], f"iteration {i}: compiled {path} answers {got}"
            compiled = site / (path + COMPILED[e.get("map_type", "hash")])
            assert compiled.exists()
            if compiled.stat().st_mtime_ns == (site / path).stat().st_mtime_ns:  # a pair: in step with its text
                version = 0 if installed[path] == versions[0][path] else 1
                assert got == expected[path][version], f"iteration {i}: {path} paired with another version's text"
    gens = State(site / "state").generations()  # loads, damaged ones are skipped
    assert gens, f"iteration {i}: no readable generation left"


def test_kill_9_at_random_points_leaves_whole_versions(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("LDAPSYNC_CRASH_SEED", "4")))
    iterations = int(os.environ.get("LDAPSYNC_CRASH_ITERATIONS", "30"))
    ldif = tmp_path / "users.ldif"
    texts = [DEMO_LDIF.read_text(), version2()]
    versions, probe, expected_answers, longest = reference(tmp_path, texts)

    # a slow check hook widens the window between staging and the renames
    hook = ["sh", "-c", "sleep 0.05"]
    site = tmp_path / "site"
    site.mkdir()
    # alternating two versions is deliberate here: without window 0 the guard's window adds up the
    # runs that completed and holds the later ones (and the final run) instead of installing them
    config = write_config(site, ldif, hooks={"check": [hook]}, safety={"window": 0})
    ldif.write_text(texts[0])
    assert once(config).returncode == 0
    span = longest + 0.1
    killed = 0
    for i in range(iterations):
        tmp = ldif.with_suffix(".tmp")
        tmp.write_text(texts[(i + 1) % 2])
        os.replace(tmp, ldif)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ldapsync", "-c", str(config), "--once"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # so the kill takes its postmap children too
        )
        time.sleep(rng.uniform(0.1 * span, 1.1 * span))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
        assert_whole_versions(site, versions, probe, expected_answers, i)

    print(f"kill -9 loop: {iterations} runs, {killed} killed mid-run, span {span:.2f}s")
    assert killed >= iterations // 3, "the kills mostly missed the runs: the test would prove little"

    # afterwards: a normal run succeeds, installs the current version, leaves no litter
    final = once(config)
    assert final.returncode == 0, final.stderr
    current = 0 if ldif.read_text() == texts[0] else 1
    assert sources(site) == versions[current]
    state = State(site / "state")
    lkg = state.last_good()
    assert lkg is not None and lkg.id == state.current_id()
    litter = [p.name for p in (site / "out").iterdir() if p.name.startswith((".", "__db."))]
    assert not litter, f"staging litter (a killed postmap's Berkeley DB temporaries too): {litter}"
    assert not [p.name for p in (site / "state" / "generations").iterdir() if p.name.startswith(".")]


# A long-lived pipeline (as in the agent) alternating two versions: from its second sync on, the
# hash and lmdb maps are patched copies of the installed ones, not compiled whole.
AGENT = """
import os, sys
from pathlib import Path
from ldapsync import config, sync
pipeline = sync.Pipeline(config.load(Path(sys.argv[1])), follow=True)
ldif, texts = Path(sys.argv[2]), [Path(p).read_text() for p in sys.argv[3:]]
i = 0
while True:
    tmp = ldif.with_suffix(".tmp")
    tmp.write_text(texts[i % 2])
    os.replace(tmp, ldif)
    pipeline.run()
    i += 1
"""


def test_kill_9_while_patching_compiled_maps_leaves_whole_versions(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("LDAPSYNC_CRASH_SEED", "4")))
    iterations = int(os.environ.get("LDAPSYNC_CRASH_ITERATIONS", "30")) // 3
    texts = [DEMO_LDIF.read_text(), version2()]
    versions, probe, expected_answers, longest = reference(tmp_path, texts)
    site = tmp_path / "site"
    site.mkdir()
    calls, wrapper = tmp_path / "postmap-calls", tmp_path / "postmap"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexec "{POSTMAP}" "$@"\n')
    wrapper.chmod(0o755)
    ldif = site / "users.ldif"
    ldif.write_text(texts[0])
    hooks = {"check": [["sh", "-c", "sleep 0.05"]]}  # widens the window between staging and the renames
    # window 0: hundreds of alternations must not add up to a held mass change
    config = write_config(site, ldif, postfix={"postmap": str(wrapper)}, hooks=hooks, safety={"window": 0})
    (tmp_path / "agent.py").write_text(AGENT)
    for n, text in enumerate(texts):
        (tmp_path / f"v{n}.ldif").write_text(text)
    for i in range(iterations):
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "agent.py"), str(config), str(ldif)]
            + [str(tmp_path / f"v{n}.ldif") for n in range(2)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # so the kill takes its postmap children too
        )
        time.sleep(rng.uniform(2 * longest, 5 * longest))  # past the first (whole) sync, into the patched ones
        assert proc.poll() is None, "the pipeline loop stopped"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert_whole_versions(site, versions, probe, expected_answers, i)
    patched = [line for line in calls.read_text().splitlines() if " -i -r " in f" {line} "]
    assert len(patched) >= iterations, "the kills did not hit patching runs: the test would prove little"

    final = once(config)  # a fresh run afterwards installs the current version
    assert final.returncode == 0, final.stderr
    current = 0 if ldif.read_text() == texts[0] else 1
    assert sources(site) == versions[current]
    for e in EXPORTERS:
        if e["path"] in probe:
            got = {k: query(site, e, k) for k in probe[e["path"]]}
            assert got == expected_answers[e["path"]][current], e["path"]
    litter = [p.name for p in (site / "out").iterdir() if p.name.startswith((".", "__db."))]
    assert not litter, f"staging litter: {litter}"


def test_disk_full_while_staging_leaves_old_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:
        reason = "not root: cannot mount a small tmpfs to fill up"
        print(reason)
        pytest.skip(reason)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "ldapsync-test", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        reason = f"mount -t tmpfs failed ({proc.stderr.strip()}): cannot simulate a full disk"
        print(reason)
        pytest.skip(reason)
    try:
        exporters = [EXPORTERS[0], EXPORTERS[-1]]
        ldif = tmp_path / "users.ldif"
        ldif.write_text(DEMO_LDIF.read_text())
        config = write_config(tmp_path, ldif, exporters=exporters, safety={"max_deletions": 100_000})
        assert once(config).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert set(before) == {"alias", "alias.db", "passwd"}

        ldif.write_text(DEMO_LDIF.read_text() + "\n" + generate_users_ldif(3000))  # far more than 64 KiB
        result = once(config)
        assert result.returncode == 1
        assert "No space left on device" in result.stderr or "space" in result.stderr.lower(), result.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "old files damaged, or litter left"
        assert query(tmp_path, exporters[0], "bob@example.org") == "bob@elsewhere.example"
    finally:
        subprocess.run(["umount", str(out)], check=False)


def test_a_compiled_map_left_newer_than_its_source_by_a_crash_is_rebuilt(tmp_path: Path) -> None:
    """kill -9 between the two renames: the .db is the new version, the text the old one.

    LDAP then goes back to the old version (or the sync that follows renders the old text):
    the text matches, but Postfix answers from the other version's .db until it is rebuilt.
    """
    exporters = [EXPORTERS[0], EXPORTERS[1]]  # hash and lmdb
    v1, v2 = DEMO_LDIF.read_text(), version2()
    ref, site = tmp_path / "ref", tmp_path / "site"
    for root, text in ((ref, v2), (site, v1)):
        root.mkdir()
        (root / "users.ldif").write_text(text)
        assert once(write_config(root, root / "users.ldif", exporters=exporters)).returncode == 0
    assert query(site, exporters[0], "bob@example.org") == "bob@elsewhere.example"
    for e in exporters:  # the crash: only the compiled maps of v2 were renamed into place
        suffix = COMPILED[e.get("map_type", "hash")]
        os.replace(ref / (e["path"] + suffix), site / (e["path"] + suffix))
    assert query(site, exporters[0], "bob@example.org") == "bob@v2.example"

    result = once(write_config(site, site / "users.ldif", exporters=exporters))

    assert result.returncode == 0, result.stderr
    assert query(site, exporters[0], "bob@example.org") == "bob@elsewhere.example"
    transport_keys = first_keys((site / exporters[1]["path"]).read_bytes())
    want = answers((site / exporters[1]["path"]).read_bytes(), transport_keys)
    assert {k: query(site, exporters[1], k) for k in transport_keys} == want
    assert query(site, exporters[1], "zed@example.org") is None, "the lmdb map still answers for v2's new user"
    assert "not installed together with its source" in result.stdout + result.stderr
    # and the repaired pair is stable: the next sync has nothing to do
    again = once(write_config(site, site / "users.ldif", exporters=exporters))
    assert again.returncode == 0 and "rebuilding" not in again.stdout + again.stderr
