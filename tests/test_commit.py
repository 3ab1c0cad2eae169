"""The commit path: stage, postmap, check hooks, rename -- with the real postmap.

What an admin relies on: an unchanged output is never touched, a failure before the renames
leaves every installed file byte-identical (and no litter), the compiled map answers
`postmap -q`, modes/owners are exact, Dovecot notices every rewrite, and hooks run when and
how docs/hooks say.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import siteconfig
from structlog.testing import capture_logs

from ldapsync import commit, sync
from ldapsync import config as config_mod
from ldapsync.config import Hooks
from ldapsync.errors import CommitError, HookError

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"
POSTMAP = shutil.which("postmap", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))

pytestmark = pytest.mark.skipif(POSTMAP is None, reason="postfix not installed: apt-get install postfix")

EXPORTERS: list[dict[str, Any]] = [
    {"kind": "postfix-virtual", "name": "alias", "path": "out/maps/alias", "include": ["aliases", "forwards"]},
    {"kind": "postfix-transport", "path": "out/maps/transport", "nexthop": "smtp:[srs.example.org]"},
    {"kind": "postfix-recipients", "path": "out/maps/recipients"},
    {"kind": "postfix-sender-login", "path": "out/maps/sender_login"},
    {"kind": "postfix-access", "path": "out/maps/disabled"},
    {"kind": "dovecot-passwd", "path": "out/dovecot/passwd", "mode": "0640"},
]

# A hook that appends what it saw (phase, LDAPSYNC_* env, the staged files and their compiled
# maps, a postmap -q through each staged map) as one JSON line; argv: LOG [EXIT [SLEEP]].
RECORDER = r"""
import json, os, subprocess, sys, time
log = sys.argv[1]
rc = int(sys.argv[2]) if len(sys.argv) > 2 else 0
pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0
env = {k: v for k, v in os.environ.items() if k.startswith("LDAPSYNC_")}
staged = {}
for key, path in env.items():
    if key.startswith("LDAPSYNC_STAGED_") and key != "LDAPSYNC_STAGED_FILES":
        name = key[len("LDAPSYNC_STAGED_"):]
        maptype = env.get("LDAPSYNC_MAPTYPE_" + name, "none")
        d, base = os.path.split(path)
        siblings = sorted(p for p in os.listdir(d) if p.startswith(base + "."))
        info = {"exists": os.path.isfile(path), "siblings": siblings}
        if maptype != "none":
            conf = ["-c", env["LDAPSYNC_POSTFIX_CONFIG_DIR"]] if "LDAPSYNC_POSTFIX_CONFIG_DIR" in env else []
            argv = ["postmap", *conf, "-q", "bob@example.org", maptype + ":" + path]
            q = subprocess.run(argv, capture_output=True, text=True)
            info["query"] = [q.returncode, q.stdout.strip(), q.stderr.strip()]
        staged[name] = info
with open(log, "a") as fh:
    fh.write(json.dumps({"env": env, "staged": staged, "t": time.time()}) + "\n")
time.sleep(pause)
sys.exit(rc)
"""


# -- helpers -------------------------------------------------------------------------------
def write_config(tmp: Path, **top: Any) -> Path:
    return siteconfig.write_config(tmp, **{"exporters": EXPORTERS, **top})


def pipeline(tmp: Path, **top: Any) -> sync.Pipeline:
    return sync.Pipeline(config_mod.load(write_config(tmp, **top)), follow=True)  # long-lived, as in the agent


def recorder(tmp: Path, log: Path, *args: str) -> list[str]:
    script = tmp / "recorder.py"
    script.write_text(RECORDER)
    return [sys.executable, str(script), str(log), *args]


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def tree(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file below root (hidden ones too): bytes, inode, mtime_ns."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (p.read_bytes(), st.st_ino, st.st_mtime_ns)
    return out


def postmap_q(key: str, map_type: str, path: Path, conf: Path) -> str | None:
    proc = subprocess.run(
        [str(POSTMAP), "-c", str(conf), "-q", key, f"{map_type}:{path}"], capture_output=True, text=True, check=False
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout.rstrip("\n") if proc.returncode == 0 else None


@pytest.fixture
def pfconf(tmp_path: Path) -> Path:
    conf = tmp_path / "postfix-conf"
    conf.mkdir()
    (conf / "main.cf").write_text("")
    os.utime(conf / "main.cf", (time.time() - 3600, time.time() - 3600))  # postfix waits on a fresh main.cf
    return conf


def output(path: Path, data: bytes, map_type: str | None = "hash", mode: int = 0o644, **kw: Any) -> commit.Output:
    return commit.Output(path.name, path, data, map_type, mode, **kw)


def install(
    outputs: list[commit.Output], conf: Path, hooks: Hooks | None = None, postmap: str = "postmap"
) -> list[str]:
    changed = commit.install(
        outputs, postmap=commit.Postmap(postmap, conf), hook_config=hooks or Hooks(), generation="test-gen"
    )
    return [o.name for o in changed]


def assert_no_staging_litter(*dirs: Path) -> None:
    for d in dirs:
        litter = [p.name for p in d.iterdir() if "ldapsync-stag" in p.name or p.name.startswith("__db.")]
        assert not litter, f"staged files left in {d}: {litter}"


# -- only what changed is touched ---------------------------------------------------------
def test_only_changed_outputs_are_touched(tmp_path: Path, pfconf: Path) -> None:
    maps = tmp_path / "maps"
    a, b = maps / "a", maps / "b"
    assert install([output(a, b"x@example.org\tone\n"), output(b, b"y@example.org\ttwo\n")], pfconf) == ["a", "b"]
    before = tree(maps)
    time.sleep(0.01)  # so a rewrite would show in mtime_ns

    changed = install([output(a, b"x@example.org\tthree\n"), output(b, b"y@example.org\ttwo\n")], pfconf)

    assert changed == ["a"]
    after = tree(maps)
    assert after["b"] == before["b"] and after["b.db"] == before["b.db"], "unchanged output was rewritten"
    assert after["a"][1] != before["a"][1] and after["a.db"][1] != before["a.db"][1], "changed output not replaced"
    assert postmap_q("x@example.org", "hash", a, pfconf) == "three"
    # and a sync with nothing changed touches nothing at all
    assert install([output(a, b"x@example.org\tthree\n"), output(b, b"y@example.org\ttwo\n")], pfconf) == []
    assert tree(maps) == after


def test_postmap_runs_only_for_the_outputs_that_change(tmp_path: Path, pfconf: Path) -> None:
    """postmap is the slowest step of an install (a 1M-line hash map takes seconds): never for nothing."""
    calls = tmp_path / "postmap-calls"
    wrapper = tmp_path / "postmap"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexec "{POSTMAP}" "$@"\n')
    wrapper.chmod(0o755)

    def run(*outputs: commit.Output) -> list[str]:
        calls.unlink(missing_ok=True)
        install(list(outputs), pfconf, postmap=str(wrapper))
        return [line.rsplit("/", 1)[1] for line in lines(calls)]

    maps = tmp_path / "maps"
    a, b, c = (
        output(maps / "a", b"k\t1\n"),
        output(maps / "b", b"k\t2\n", map_type="cdb"),
        output(maps / "c", b"k\t3\n"),
    )
    assert sorted(run(a, b, c)) == ["a", "b", "c"]
    assert run(a, b, c) == []
    b = output(maps / "b", b"k\t4\n", map_type="cdb")  # new bytes
    assert run(a, b, c) == ["b"]
    c = output(maps / "c", b"k\t3\n", mode=0o640)  # a new mode alone
    assert run(a, b, c) == ["c"]
    (maps / "a.db").unlink()  # the compiled map is gone: only it is rebuilt
    assert run(a, b, c) == ["a"]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- failures before the renames ---------------------------------------------------------
def _make_unwritable(directory: Path) -> None:
    """Make `directory` refuse new files, also for root (immutable flag) -- or skip."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return
    proc = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = f"running as root and chattr +i failed ({proc.stderr.strip()}): cannot make a directory unwritable"
        print(reason)
        pytest.skip(reason)


def _undo_unwritable(directory: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], capture_output=True, check=False)
    directory.chmod(0o755)


@pytest.mark.parametrize("failure", ["check-hook", "postmap-exits-1", "postmap-no-main-cf", "unwritable-dir"])
def test_failure_before_rename_leaves_every_installed_file(tmp_path: Path, pfconf: Path, failure: str) -> None:
    maps, secret = tmp_path / "maps", tmp_path / "dovecot"
    v1 = [
        output(maps / "alias", b"bob@example.org\tbob@elsewhere.example\n"),
        output(maps / "recipients", b"bob@example.org\tOK\n", map_type="lmdb"),
        output(secret / "passwd", b"bob:{SSHA}old\n", map_type=None, mode=0o640),
    ]
    install(v1, pfconf)
    v2 = [
        output(maps / "alias", b"bob@example.org\tbob@new.example\n"),
        output(maps / "recipients", b"bob@example.org\tOK\ncarol@example.org\tOK\n", map_type="lmdb"),
        output(secret / "passwd", b"bob:{SSHA}new\n", map_type=None, mode=0o640),
    ]
    before = {**tree(maps), **{f"dovecot/{k}": v for k, v in tree(secret).items()}}
    hooks, postmap, conf = Hooks(), "postmap", pfconf
    if failure == "check-hook":
        hooks = Hooks(check=(("false",),))
    elif failure == "postmap-exits-1":
        script = tmp_path / "postmap-fails"
        script.write_text("#!/bin/sh\necho 'postmap: fatal: simulated' >&2\nexit 1\n")
        script.chmod(0o755)
        postmap = str(script)
    elif failure == "postmap-no-main-cf":
        conf = tmp_path / "no-such-postfix-dir"
    else:
        _make_unwritable(secret)  # the last output's directory: the others are already staged
    try:
        with pytest.raises(CommitError) as err:
            install(v2, conf, hooks, postmap)
    finally:
        if failure == "unwritable-dir":
            _undo_unwritable(secret)

    after = {**tree(maps), **{f"dovecot/{k}": v for k, v in tree(secret).items()}}
    assert after == before, f"{failure}: installed files changed"
    assert_no_staging_litter(maps, secret)
    assert postmap_q("bob@example.org", "hash", maps / "alias", pfconf) == "bob@elsewhere.example"
    expected = {
        "check-hook": "check hook false exited 1",
        "postmap-exits-1": "simulated",
        "postmap-no-main-cf": "main.cf",
        "unwritable-dir": "cannot create a staging file",
    }[failure]
    assert expected in str(err.value)


# -- modes and owners ----------------------------------------------------------------------
def test_mode_is_exact_also_when_replacing(tmp_path: Path, pfconf: Path) -> None:
    maps = tmp_path / "maps"
    old_umask = os.umask(0o077)  # the configured mode must not depend on the umask
    try:
        install([output(maps / "m", b"k\tv\n", mode=0o644)], pfconf)
        assert (maps / "m").stat().st_mode & 0o7777 == 0o644
        assert (maps / "m.db").stat().st_mode & 0o7777 == 0o644
        # same bytes, other mode configured: the mode alone makes it an install
        assert install([output(maps / "m", b"k\tv\n", mode=0o640)], pfconf) == ["m"]
    finally:
        os.umask(old_umask)
    for p in (maps / "m", maps / "m.db"):
        assert p.stat().st_mode & 0o7777 == 0o640, p
    # somebody chmods the installed file: the next sync puts the mode back
    (maps / "m").chmod(0o666)
    assert install([output(maps / "m", b"k\tv\n", mode=0o640)], pfconf) == ["m"]
    assert (maps / "m").stat().st_mode & 0o7777 == 0o640


def test_owner_and_group_exact_also_when_replacing(tmp_path: Path, pfconf: Path) -> None:
    if os.geteuid() != 0:
        reason = "not root: cannot chown outputs to another uid/gid"
        print(reason)
        pytest.skip(reason)
    maps = tmp_path / "maps"
    install([output(maps / "m", b"k\tv\n", map_type="cdb", mode=0o640)], pfconf)
    assert (maps / "m").stat().st_uid == 0
    uid, gid = 4242, 4343  # need not exist in /etc/passwd for chown
    wanted = output(maps / "m", b"k\tv\n", map_type="cdb", mode=0o640, owner=uid, group=gid)
    assert install([wanted], pfconf) == ["m"], "owner/group change alone must be installed"
    for p in (maps / "m", maps / "m.cdb"):
        st = p.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, 0o640), p
    # content change keeps them (the new file is a fresh inode, created by root)
    install([output(maps / "m", b"k\tw\n", map_type="cdb", mode=0o640, owner=uid, group=gid)], pfconf)
    for p in (maps / "m", maps / "m.cdb"):
        st = p.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, 0o640), p
    again = output(maps / "m", b"k\tw\n", map_type="cdb", mode=0o640, owner=uid, group=gid)
    assert install([again], pfconf) == [], "exact owner/group/mode: nothing to do"


# -- compiled maps -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("map_type", "suffix"), [("hash", ".db"), ("lmdb", ".lmdb"), ("cdb", ".cdb"), ("texthash", None)]
)
def test_compiled_map_answers_postmap_q(tmp_path: Path, map_type: str, suffix: str | None) -> None:
    p = pipeline(tmp_path, exporters=[{**EXPORTERS[0], "map_type": map_type}])
    result = p.run()
    assert result.status == "installed"
    alias = tmp_path / "out" / "maps" / "alias"
    siblings = sorted(x.name for x in alias.parent.iterdir())
    assert siblings == sorted(["alias"] + ([f"alias{suffix}"] if suffix else [])), siblings
    conf = p.postmap().config_dir
    assert conf is not None or Path("/etc/postfix/main.cf").exists()
    for key, want in [
        ("bob@example.org", "bob@elsewhere.example"),
        ("postmaster@example.org", None),  # no static file here: not an alias
        ("alice@example.net", "alice@example.org"),
        ("carol@example.org", "carol@one.example,carol@two.example"),
    ]:
        assert postmap_q(key, map_type, alias, conf or Path("/etc/postfix")) == want, key


# -- Dovecot notices every rewrite -------------------------------------------------------------
def test_passwd_file_mtime_moves_by_a_whole_second(tmp_path: Path, pfconf: Path) -> None:
    path = tmp_path / "dovecot" / "passwd"
    install([output(path, b"bob:{SSHA}AAAA\n", map_type=None, mode=0o640)], pfconf)
    # The installed file looks written "later this second" (clock granularity, or a copy
    # made by another tool): a same-size rewrite now must still move the whole-second mtime.
    future = int(time.time()) + 5
    os.utime(path, (future, future))
    install([output(path, b"bob:{SSHA}BBBB\n", map_type=None, mode=0o640)], pfconf)
    st = path.stat()
    assert path.read_bytes() == b"bob:{SSHA}BBBB\n"
    assert int(st.st_mtime) >= future + 1, "Dovecot would not notice this rewrite"

    # and twice within the same real second, same size
    install([output(path, b"bob:{SSHA}CCCC\n", map_type=None, mode=0o640)], pfconf)
    first = int(path.stat().st_mtime)
    install([output(path, b"bob:{SSHA}DDDD\n", map_type=None, mode=0o640)], pfconf)
    assert int(path.stat().st_mtime) >= first + 1


def test_compiled_map_is_never_older_than_its_source(tmp_path: Path, pfconf: Path) -> None:
    """Postfix logs "database ... is older than source file" otherwise, on every lookup table open."""
    path = tmp_path / "maps" / "m"
    for i in range(4):  # several rewrites within one second
        install([output(path, f"k\tv{i}\n".encode())], pfconf)
        assert path.with_name("m.db").stat().st_mtime_ns >= path.stat().st_mtime_ns, i
    assert postmap_q("k", "hash", path, pfconf) == "v3"


# -- hooks -----------------------------------------------------------------------------------
def test_reload_hooks_run_once_per_sync_and_only_on_change(tmp_path: Path) -> None:
    log = tmp_path / "reload.log"
    ldif = tmp_path / "users.ldif"
    ldif.write_bytes(DEMO_LDIF.read_bytes())
    src = {"ldif": {"path": str(ldif), "base_dn": "ou=users,dc=example,dc=org"}}
    p = pipeline(tmp_path, source=src, hooks={"reload": [recorder(tmp_path, log)]})

    assert p.run().status == "installed"
    calls = records(log)
    assert len(calls) == 1, "one reload per sync, not one per output"
    env = calls[0]["env"]
    assert env["LDAPSYNC_PHASE"] == "reload"
    out = tmp_path / "out"
    assert set(env["LDAPSYNC_CHANGED_FILES"].split("\n")) == {
        str(out / "maps" / n) for n in ("alias", "transport", "recipients", "sender_login", "disabled")
    } | {str(out / "dovecot" / "passwd")}
    assert env["LDAPSYNC_GENERATION"] == p.state.current_id()

    assert p.run().status == "unchanged"
    assert len(records(log)) == 1, "reload ran although nothing changed"

    # bob's forward changes: alias (and only what depends on it) changes
    ldif.write_text(
        DEMO_LDIF.read_text().replace("emailForward: bob@elsewhere.example", "emailForward: bob@new.example")
    )
    result = sync.Pipeline(p.config).run()
    assert result.status == "installed"
    calls = records(log)
    assert len(calls) == 2
    assert calls[1]["env"]["LDAPSYNC_CHANGED_FILES"].split("\n") == [str(out / "maps" / "alias")]
    assert calls[1]["env"]["LDAPSYNC_CHANGED_NAMES"] == "alias"
    assert result.changed == ["alias"]


def test_check_hook_sees_staged_compiled_files(tmp_path: Path) -> None:
    log = tmp_path / "check.log"
    p = pipeline(tmp_path, hooks={"check": [recorder(tmp_path, log)]})
    assert p.run().status == "installed"
    (call,) = records(log)
    env, staged = call["env"], call["staged"]
    assert env["LDAPSYNC_PHASE"] == "check"
    assert set(staged) == {
        "ALIAS",
        "POSTFIX_TRANSPORT",
        "POSTFIX_RECIPIENTS",
        "POSTFIX_SENDER_LOGIN",
        "POSTFIX_ACCESS",
        "DOVECOT_PASSWD",
    }
    assert env["LDAPSYNC_OUTPUTS"].split() == list(staged)
    for name, info in staged.items():
        path = Path(env[f"LDAPSYNC_STAGED_{name}"])
        assert info["exists"], f"{name}: staged file missing while the check hook ran"
        # staged under the output's own name, in a private directory beside the destination
        assert path.parent.name.startswith(".ldapsync-staging."), path
        assert not path.parent.exists(), "staging directory left after the commit"
        if env[f"LDAPSYNC_MAPTYPE_{name}"] == "hash":
            assert info["siblings"] == [path.name + ".db"], f"{name}: staged map not compiled"
            assert info["query"][0] in (0, 1) and not info["query"][2], info
        else:
            assert name == "DOVECOT_PASSWD" and env[f"LDAPSYNC_MAPTYPE_{name}"] == "none"
    assert staged["ALIAS"]["query"][:2] == [0, "bob@elsewhere.example"]
    assert set(env["LDAPSYNC_STAGED_FILES"].split("\n")) == {env[f"LDAPSYNC_STAGED_{n}"] for n in staged}
    # staged inside the destination directory (same filesystem), so the rename is atomic
    assert Path(env["LDAPSYNC_STAGED_ALIAS"]).parent.parent == tmp_path / "out" / "maps"
    assert Path(env["LDAPSYNC_STAGED_ALIAS"]).name == "alias"
    assert Path(env["LDAPSYNC_STAGED_DOVECOT_PASSWD"]).parent.parent == tmp_path / "out" / "dovecot"


def test_hanging_check_hook_is_killed_at_timeout(tmp_path: Path, pfconf: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    # the hook starts a grandchild (same process group) and then hangs
    hang = ("sh", "-c", f"sleep 60 & echo $! > {pidfile}; sleep 60")
    maps = tmp_path / "maps"
    started = time.monotonic()
    with pytest.raises(HookError, match=r"timed out after 0\.5s"):
        install([output(maps / "m", b"k\tv\n")], pfconf, Hooks(check=(hang,), timeout=0.5))
    assert time.monotonic() - started < 10
    assert not (maps / "m").exists()
    assert_no_staging_litter(maps)
    pid = int(pidfile.read_text())
    assert _gone(pid), "the hook's child survived the timeout"


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):  # killed, waiting for a reaper that may not exist in a container
            return True
        time.sleep(0.05)
    return False


def test_stale_staging_files_of_a_killed_sync_are_removed(tmp_path: Path, pfconf: Path) -> None:
    maps = tmp_path / "maps"
    maps.mkdir()
    stale = [maps / ".m.abc123.ldapsync-staged", maps / ".m.abc123.ldapsync-staged.db"]
    for s in stale:
        s.write_bytes(b"half")
    unrelated = maps / ".other.x.ldapsync-staged"
    unrelated.write_bytes(b"not ours to judge yet")
    install([output(maps / "m", b"k\tv\n")], pfconf)
    assert not any(s.exists() for s in stale)
    assert unrelated.exists(), "only the staging files of outputs being installed are cleaned"


def test_berkeley_db_temporaries_of_a_killed_postmap_are_removed(tmp_path: Path, pfconf: Path) -> None:
    """postmap builds a hash map as `__db.<name>.db` and renames it: a kill leaves that behind."""
    maps = tmp_path / "maps"
    maps.mkdir()
    legacy = maps / "__db..m.abc123.ldapsync-staged.db"  # staged beside the destination
    legacy.write_bytes(b"half")
    private = maps / ".ldapsync-staging.k2j4x9"  # staged in a private directory
    private.mkdir(mode=0o700)
    for name in ("m", "__db.m.db"):
        (private / name).write_bytes(b"half")
    install([output(maps / "m", b"k\tv\n")], pfconf)
    assert sorted(p.name for p in maps.iterdir()) == ["m", "m.db"]


VICTIM = b"root:x:0:0:a file outside the output directory\n"


def _plant_symlinks(directory: Path, victim: Path, stop: threading.Event, planted: list[str]) -> None:
    """Another user's loop: a symlink to the victim at every name ldapsync may write next.

    It only creates names in the shared directory (it can neither enter a private 0700
    directory nor remove root's files), the way a local user in a sticky directory would.
    Names are derived (up to two suffixes deep) from ldapsync's own entries only: deriving
    from its own symlinks too would grow the directory without bound (a million entries)
    and make every pass slower without adding a name ldapsync or postmap could write.
    """
    suffixes = ("", ".db", ".lmdb", ".cdb", ".tmp", ".lock", "-lock")
    while not stop.is_set():
        try:
            entries = [e.name for e in os.scandir(directory) if not e.is_symlink()]
        except OSError:
            continue
        for name in entries:
            if name.startswith("__db.") or name == victim.name:
                continue
            bases = [name + s for s in suffixes]
            derived = [base + s for base in bases for s in suffixes]
            derived += [f"__db.{base}{s}" for base in bases for s in (".db", "")]
            for target in derived:
                try:
                    os.symlink(victim, directory / target)
                    planted.append(target)
                except OSError:
                    pass


def test_symlinks_planted_at_staged_and_final_names_never_redirect_a_write(tmp_path: Path, pfconf: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may create names, only owners remove them
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    victim.chmod(0o600)
    kinds = {"alias": "hash", "recipients": "lmdb", "transport": "cdb", "passwd": None}
    for name in kinds:  # planted before the first install: rename must replace, not follow
        for suffix in ("", ".db", ".lmdb", ".cdb"):
            os.symlink(victim, shared / (name + suffix))
    stop = threading.Event()
    planted: list[str] = []
    planter = threading.Thread(target=_plant_symlinks, args=(shared, victim, stop, planted), daemon=True)
    planter.start()
    try:
        for i in range(25):
            outs = [output(shared / n, f"k{i}@example.org\tv{i}\n".encode(), map_type=t) for n, t in kinds.items()]
            assert install(outs, pfconf) == list(kinds), i
    finally:
        stop.set()
        planter.join()
    assert victim.read_bytes() == VICTIM and stat.S_IMODE(victim.stat().st_mode) == 0o600, "write redirected"
    assert any(".db" in p for p in planted), "the planter never raced a sync: the test proves nothing"
    suffix = {"hash": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}
    for name, map_type in kinds.items():
        paths = [shared / name] + ([shared / (name + suffix[map_type])] if map_type else [])
        for p in paths:
            assert stat.S_ISREG(os.lstat(p).st_mode), f"{p} is not a regular file"
        if map_type:
            assert postmap_q("k24@example.org", map_type, shared / name, pfconf) == "v24"


@pytest.mark.parametrize(
    ("unsafe", "message"),
    [
        ("dir-world-writable", r"maps is writable by every user \(mode 0777"),
        ("parent-group-writable", r"shared is writable by group .*\(mode 0775"),
        ("dir-owned-by-another-user", r"maps is owned by 4242 \(mode 0755, owner 4242"),
        ("symlink-owned-by-another-user", r"maps is a symlink owned by 4242"),
    ],
)
def test_an_output_directory_another_user_can_write_is_refused(
    tmp_path: Path, pfconf: Path, unsafe: str, message: str
) -> None:
    shared = tmp_path / "shared"
    maps = shared / "maps"
    if unsafe == "symlink-owned-by-another-user":
        (shared / "real").mkdir(parents=True)
        maps.symlink_to(shared / "real")
    else:
        maps.mkdir(parents=True)
    install([output(maps / "m", b"k\tv1\n")], pfconf)
    before = tree(maps)
    if "owned-by-another-user" in unsafe:
        if os.geteuid() != 0:
            reason = "not root: cannot give a directory to another user"
            print(reason)
            pytest.skip(reason)
        os.lchown(maps, 4242, -1)
    elif unsafe == "dir-world-writable":
        maps.chmod(0o777)
    else:
        os.chown(shared, -1, 4343)
        shared.chmod(0o775)
    with pytest.raises(CommitError, match=f"refusing to install into {maps}: .*{message}"):
        install([output(maps / "m", b"k\tv2\n")], pfconf)
    assert tree(maps) == before, "files changed in an unsafe directory"
    # sticky world-writable (like /tmp) is safe: others cannot rename or remove our files
    shared.chmod(0o1777)
    if unsafe == "dir-world-writable":
        maps.chmod(0o1777)
    if "owned-by-another-user" not in unsafe:
        assert install([output(maps / "m", b"k\tv2\n")], pfconf) == ["m"]


@pytest.mark.parametrize("map_type", ["hash", "lmdb", "cdb"])
def test_a_compiled_map_not_installed_with_its_source_is_rebuilt(tmp_path: Path, pfconf: Path, map_type: str) -> None:
    """Source and compiled map share one mtime; a pair that does not was split (crash, manual postmap)."""
    maps = tmp_path / "maps"
    m = output(maps / "m", b"k\tv1\n", map_type=map_type)
    compiled = m.compiled
    assert compiled is not None
    assert install([m], pfconf) == ["m"]
    assert (maps / "m").stat().st_mtime_ns == compiled.stat().st_mtime_ns
    assert install([m], pfconf) == [], "a pair installed together must stay unchanged"
    # another version's compiled map renamed into place, the text left as it was
    other = tmp_path / "other"
    install([output(other / "m", b"k\tv2\n", map_type=map_type)], pfconf)
    os.replace(other / compiled.name, compiled)
    assert postmap_q("k", map_type, maps / "m", pfconf) == "v2"
    assert install([m], pfconf) == ["m"]
    assert postmap_q("k", map_type, maps / "m", pfconf) == "v1"
    assert install([m], pfconf) == []


# -- patching a compiled map instead of compiling all of it ------------------------------------
def patch_of(old: bytes, new: bytes) -> commit.Patch:
    """What the renderer reports for a splice: the removed keys and the added or changed lines."""
    old_lines, new_lines = set(old.splitlines(keepends=True)), set(new.splitlines(keepends=True))
    kept = {line.split(b"\t")[0] for line in new_lines}
    gone = sorted(k.decode() for k in {line.split(b"\t")[0] for line in old_lines} - kept)
    return commit.Patch(hashlib.sha256(old).hexdigest(), tuple(gone), tuple(sorted(new_lines - old_lines)))


def answers(map_type: str, path: Path, conf: Path) -> list[str]:
    """What the compiled map answers for every key of OLD_MAP and NEW_MAP (`postmap -q -`)."""
    keys = sorted({line.split(b"\t")[0].decode() for line in (OLD_MAP + NEW_MAP).splitlines()})
    proc = subprocess.run(
        [str(POSTMAP), "-c", str(conf), "-q", "-", f"{map_type}:{path}"],
        input="".join(f"{k}\n" for k in keys),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout.splitlines()


def logging_postmap(tmp: Path, fail_on: str = "") -> tuple[Path, Path]:
    """A postmap that logs its arguments (and exits 1 when they contain `fail_on`)."""
    calls, wrapper = tmp / "postmap-calls", tmp / "postmap"
    fail = f'case " $* " in *" {fail_on} "*) exit 1;; esac\n' if fail_on else ""
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n{fail}exec "{POSTMAP}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, calls


OLD_MAP = b"".join(b"user%03d@example.org\tuser%03d@elsewhere.example\n" % (i, i) for i in range(300))
NEW_MAP = (
    OLD_MAP.replace(b"user007@elsewhere.example", b"user007@moved.example,user007@example.org")
    .replace(b"user100@example.org\tuser100@elsewhere.example\n", b"")
    .replace(b"user200@example.org\t", b"user199x@example.org\tnew@example.net\nuser200@example.org\t")
)


@pytest.mark.parametrize("map_type", ["hash", "lmdb"])
def test_a_spliced_map_patches_a_copy_of_the_installed_compiled_map(
    tmp_path: Path, pfconf: Path, map_type: str
) -> None:
    """Same answers as compiling the new text whole, from two small postmap runs on a copy."""
    wrapper, calls = logging_postmap(tmp_path)
    maps = tmp_path / "maps"
    assert install([output(maps / "m", OLD_MAP, map_type=map_type)], pfconf) == ["m"]
    before = (maps / f"m{commit.COMPILED_SUFFIX[map_type]}").stat().st_ino
    patched = output(maps / "m", NEW_MAP, map_type=map_type, patch=patch_of(OLD_MAP, NEW_MAP))
    assert install([patched], pfconf, postmap=str(wrapper)) == ["m"]

    argv = [line.split()[-3:-1] for line in calls.read_text().splitlines()]
    assert argv == [["-d", "-"], ["-i", "-r"]], "only the changed keys are written"
    compiled = maps / f"m{commit.COMPILED_SUFFIX[map_type]}"
    assert compiled.stat().st_ino != before, "installed by rename, not updated in place"
    assert compiled.stat().st_mtime_ns == (maps / "m").stat().st_mtime_ns  # a pair installed together
    whole = tmp_path / "whole"
    install([output(whole / "m", NEW_MAP, map_type=map_type)], pfconf)
    assert answers(map_type, maps / "m", pfconf) == answers(map_type, whole / "m", pfconf)
    assert postmap_q("user100@example.org", map_type, maps / "m", pfconf) is None
    assert postmap_q("user007@example.org", map_type, maps / "m", pfconf) == "user007@moved.example,user007@example.org"
    assert_no_staging_litter(maps)


@pytest.mark.parametrize(
    "situation", ["installed-text-is-not-the-base", "pair-not-installed-together", "postmap-i-fails", "cdb"]
)
def test_a_map_that_cannot_be_patched_is_compiled_whole(tmp_path: Path, pfconf: Path, situation: str) -> None:
    wrapper, calls = logging_postmap(tmp_path, fail_on="-i -r" if situation == "postmap-i-fails" else "")
    map_type = "cdb" if situation == "cdb" else "hash"
    maps = tmp_path / "maps"
    first = OLD_MAP + b"zz@example.org\tz\n" if situation == "installed-text-is-not-the-base" else OLD_MAP
    install([output(maps / "m", first, map_type=map_type)], pfconf)
    if situation == "pair-not-installed-together":  # e.g. someone ran postmap by hand
        os.utime(maps / "m.db", ns=((maps / "m.db").stat().st_mtime_ns + 1,) * 2)
    patched = output(maps / "m", NEW_MAP, map_type=map_type, patch=patch_of(OLD_MAP, NEW_MAP))
    with capture_logs() as logs:
        assert install([patched], pfconf, postmap=str(wrapper)) == ["m"]

    argv = [line.split()[-3:-1] for line in calls.read_text().splitlines()]
    tried = [["-d", "-"], ["-i", "-r"]] if situation == "postmap-i-fails" else []
    assert argv[:-1] == tried and argv[-1][0] not in ("-d", "-i"), "compiled whole after trying a patch or not"
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert len(warned) == (situation == "postmap-i-fails"), "only a failed patch is worth a warning"
    whole = tmp_path / "whole"
    install([output(whole / "m", NEW_MAP, map_type=map_type)], pfconf)
    assert answers(map_type, maps / "m", pfconf) == answers(map_type, whole / "m", pfconf)
    assert_no_staging_litter(maps)


def test_an_agent_patches_the_compiled_maps_a_change_touches(tmp_path: Path, pfconf: Path) -> None:
    """Through the pipeline: a long-lived agent's second sync patches, and answers like a fresh --once."""
    wrapper, calls = logging_postmap(tmp_path)
    ldif = tmp_path / "users.ldif"
    ldif.write_text(DEMO_LDIF.read_text())
    postfix = {"postmap": str(wrapper), "config_dir": str(pfconf)}
    agent = sync.Pipeline(config_mod.load(write_config(tmp_path, ldif=ldif, postfix=postfix)), follow=True)
    assert agent.run().status == "installed"
    ldif.write_text(DEMO_LDIF.read_text().replace("bob@elsewhere.example", "bob@new.example"))
    calls.unlink()
    assert agent.run().changed == ["alias"]
    assert [line.split()[-3:-1] for line in calls.read_text().splitlines()] == [["-i", "-r"]]
    assert postmap_q("bob@example.org", "hash", tmp_path / "out" / "maps" / "alias", pfconf) == "bob@new.example"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    once = sync.Pipeline(config_mod.load(write_config(fresh, ldif=ldif, postfix=postfix)))
    assert once.run().status == "installed"
    keys = sorted({line.split("\t")[0] for line in (tmp_path / "out" / "maps" / "alias").read_text().splitlines()})
    for key in [*keys, "bob@example.net", "nobody@example.org"]:
        want = postmap_q(key, "hash", fresh / "out" / "maps" / "alias", pfconf)
        assert postmap_q(key, "hash", tmp_path / "out" / "maps" / "alias", pfconf) == want, key
