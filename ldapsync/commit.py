"""Install rendered outputs atomically: stage, postmap, check, rename, fsync.

Until the renames, nothing an admin or Postfix/Dovecot can see has changed, so any failure
(postmap, a check hook, a full disk) leaves every installed file byte-identical. Each
output is then swapped by rename(2): compiled map first, then its source, so a reader sees
either the whole old or the whole new version, never a mix or a partial file.

ldapsync runs as root over directories other software touches, so staging cannot be
redirected: files are staged in a private (0700, unpredictable name) directory created inside
the destination directory (same filesystem, so the rename stays atomic), created with
O_EXCL|O_NOFOLLOW, and chmod/chown go through the open descriptor. rename(2) replaces a
symlink planted at the final path instead of writing through it. A destination directory (or
an ancestor) that another user could write to is refused.

A compiled map and its source are installed with the same mtime (to the nanosecond). A crash
between the two renames leaves a pair whose mtimes differ; the next sync sees that and
rebuilds the pair, even though the source text is already what LDAP says.

A hash, btree or lmdb map whose new text was spliced from exactly the installed text (an
Output with a Patch) is not compiled from scratch: the installed compiled map is copied into
the staging directory and only the changed keys are updated there (`postmap -d -`, `postmap
-i -r`), which at a million lines takes a fraction of a second instead of seconds. Only a pair
installed together (same mtime) whose text is the patch's base is copied; anything else, or a
failing update, compiles the whole map as before. The copy is staged and renamed like a fresh
map, so a crash at any point leaves the installed pair as it was.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import glob
import grp
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from ldapsync import hooks
from ldapsync.config import Hooks
from ldapsync.errors import CommitError
from ldapsync.fileio import fsync_dir

log = structlog.get_logger(__name__)

COMPILED_SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}
PATCHABLE = ("hash", "btree", "lmdb")  # postmap updates them in place; a cdb is written once


@dataclass(frozen=True, slots=True)
class Patch:
    """How an output's bytes differ, line by line, from the bytes they were spliced from."""

    base_sha256: str  # of the bytes spliced from: only a map compiled from those can be patched
    gone: tuple[str, ...]  # keys removed
    put: tuple[bytes, ...]  # lines added or changed, each with its newline


@dataclass(frozen=True, slots=True)
class Output:
    name: str
    path: Path
    data: bytes
    map_type: str | None  # None/"texthash"/"none": no compiled file
    mode: int
    owner: int | None = None
    group: int | None = None
    sensitive: bool = False
    sha256: str = ""  # of data, when the renderer already computed it
    patch: Patch | None = None  # data as an edit of earlier bytes, for patching the compiled map
    lines: int | None = None  # of data, when the renderer already counted them

    def digest(self) -> str:
        return self.sha256 or hashlib.sha256(self.data).hexdigest()

    def line_count(self) -> int:
        return self.lines if self.lines is not None else self.data.count(b"\n")

    @property
    def compiled(self) -> Path | None:
        suffix = COMPILED_SUFFIX.get(self.map_type or "")
        return self.path.with_name(self.path.name + suffix) if suffix else None

    @property
    def env_name(self) -> str:
        return env_name(self.name)


def env_name(name: str) -> str:
    """An output name as it appears in hook variables (LDAPSYNC_STAGED_<NAME>)."""
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


@dataclass(frozen=True, slots=True)
class Postmap:
    command: str = "postmap"
    config_dir: Path | None = None

    def argv(self, map_type: str, path: Path, *options: str) -> list[str]:
        conf = ["-c", str(self.config_dir)] if self.config_dir else []
        return [self.command, *conf, *options, f"{map_type}:{path}"]


@dataclass(slots=True)
class _Staged:
    output: Output
    source: Path
    compiled: Path | None = None
    promoted: bool = False


STAGING_PREFIX = ".ldapsync-staging."  # private staging directories inside a destination directory
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def needs_install(out: Output) -> bool:
    """True if content, compiled map, owner or mode differ from what is installed.

    A compiled map whose mtime differs from its source's was not installed together with it
    (a crash between the renames, or someone ran postmap by hand): it is rebuilt.
    """
    try:
        st = os.lstat(out.path)
    except FileNotFoundError:
        return True
    except OSError as e:
        raise CommitError(f"{out.name}: cannot read {out.path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):  # a symlink (or anything else) planted at the output path
        return True
    if _read_installed(out) != out.data or not _attrs_ok(out, st):
        return True
    if out.compiled is not None:
        try:
            cst = os.lstat(out.compiled)
        except FileNotFoundError:
            return True
        except OSError as e:
            raise CommitError(f"{out.name}: cannot read {out.compiled}: {e.strerror}") from e
        if not stat.S_ISREG(cst.st_mode) or not _attrs_ok(out, cst):
            return True
        if cst.st_mtime_ns != st.st_mtime_ns:
            log.warning(
                "compiled map was not installed together with its source (an interrupted install?): rebuilding",
                output=out.name,
                path=str(out.compiled),
            )
            return True
    return False


def _attrs_ok(out: Output, st: os.stat_result) -> bool:
    return (
        (st.st_mode & 0o7777) == out.mode
        and (out.owner is None or st.st_uid == out.owner)
        and (out.group is None or st.st_gid == out.group)
    )


def _read_installed(out: Output) -> bytes | None:
    """The installed file's bytes; None if absent or not a regular file (never follows a symlink)."""
    try:
        fd = os.open(out.path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink: not ldapsync's file
            return None
        raise CommitError(f"{out.name}: cannot read {out.path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fh.read()


def installed_bytes(out: Output) -> bytes:
    """What is installed at the output path (b"" if nothing, or a symlink: never followed)."""
    return _read_installed(out) or b""


def diff(out: Output, redact: Callable[[str], str]) -> str:
    """A unified diff of the installed file against the rendered one, secrets redacted."""
    exists = _read_installed(out) is not None
    return unified_diff(
        installed_bytes(out),
        out.data,
        fromfile=str(out.path) if exists else "/dev/null",
        tofile=str(out.path),
        redact=redact if out.sensitive else None,
    )


def unified_diff(
    old: bytes, new: bytes, *, fromfile: str, tofile: str, redact: Callable[[str], str] | None = None
) -> str:
    """A unified diff of two versions of an output, each line through `redact` first if given
    (the dry run and `ldapsync diff` show the same redacted lines)."""
    a = old.decode("utf-8", "replace").splitlines(keepends=True)
    b = new.decode("utf-8", "replace").splitlines(keepends=True)
    if redact is not None:
        a = [redact(line.rstrip("\n")) + "\n" for line in a]
        b = [redact(line.rstrip("\n")) + "\n" for line in b]
    return "".join(difflib.unified_diff(a, b, fromfile=fromfile, tofile=tofile))


def install(
    outputs: Sequence[Output],
    *,
    postmap: Postmap,
    hook_config: Hooks,
    generation: str,
    before_rename: Callable[[], None] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> list[Output]:
    """Install every output whose bytes or attributes changed; return those."""
    for directory in sorted({o.path.parent for o in outputs}):
        _remove_stale_staging(directory, [o for o in outputs if o.path.parent == directory])
    changed = [o for o in outputs if needs_install(o)]
    if not changed:
        return []
    staged: list[_Staged] = []
    private: dict[Path, Path] = {}  # destination directory -> its private staging directory
    try:
        for out in changed:
            _stage(out, postmap, staged, private)
        env = {
            **(extra_env or {}),
            "LDAPSYNC_GENERATION": generation,
            "LDAPSYNC_STAGED_FILES": "\n".join(str(s.source) for s in staged),
            "LDAPSYNC_CHANGED_FILES": "\n".join(str(s.output.path) for s in staged),
        }
        for s in staged:
            env[f"LDAPSYNC_STAGED_{s.output.env_name}"] = str(s.source)
            env[f"LDAPSYNC_MAPTYPE_{s.output.env_name}"] = s.output.map_type or "none"
        if postmap.config_dir is not None:
            env["LDAPSYNC_POSTFIX_CONFIG_DIR"] = str(postmap.config_dir)
        if hook_config.check:
            hooks.run(hook_config.check, env, hook_config.timeout, phase="check")
        if before_rename is not None:
            before_rename()
        for s in staged:
            _promote(s)
        for d in sorted(private):
            fsync_dir(d)
    finally:
        for d in private.values():  # whatever was not promoted goes with it
            shutil.rmtree(d, ignore_errors=True)
    return changed


def check_directory(directory: Path) -> None:
    """Refuse a destination that a user other than root or us could redirect.

    Whoever can write to the output directory or one of its ancestors (without the sticky
    bit) can swap files or directories under ldapsync's feet, and so make root write where
    they choose; a symlink on the way owned by such a user is the same. Checks the path as
    given and as resolved: a few lstat calls.
    """
    me = os.geteuid()
    trusted_uids = {0, me}
    trusted_gids = {0, os.getegid()}
    lexical = Path(os.path.abspath(directory))
    paths = [lexical, *lexical.parents]
    resolved = Path(os.path.realpath(directory))
    paths += [p for p in [resolved, *resolved.parents] if p not in paths]
    for path in paths:
        try:
            lst = os.lstat(path)
            st = os.stat(path) if stat.S_ISLNK(lst.st_mode) else lst
        except FileNotFoundError:
            continue  # created below by ldapsync itself, with a safe mode
        except OSError as e:
            raise CommitError(f"cannot check the output directory {path}: {e.strerror}") from e
        problem = None
        if stat.S_ISLNK(lst.st_mode) and lst.st_uid not in trusted_uids:
            problem = f"is a symlink owned by {_user(lst.st_uid)}"
        elif st.st_uid not in trusted_uids:
            problem = f"is owned by {_user(st.st_uid)}"
        elif not st.st_mode & stat.S_ISVTX:
            if st.st_mode & stat.S_IWOTH:
                problem = "is writable by every user"
            elif st.st_mode & stat.S_IWGRP and st.st_gid not in trusted_gids:
                problem = f"is writable by group {_group(st.st_gid)}"
        if problem:
            raise CommitError(
                f"refusing to install into {directory}: {path} {problem} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}, owner {_user(st.st_uid)}, group {_group(st.st_gid)}); "
                "that user could redirect ldapsync's writes. Make it owned by root (or the user ldapsync runs "
                "as) and not writable by others, e.g. chmod go-w"
            )


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)


def _remove_stale_staging(directory: Path, outputs: Sequence[Output]) -> None:
    """Remove what a killed ldapsync left behind (the caller holds the state lock).

    That is private staging directories, and from older versions staging files next to the
    destination, including Berkeley DB's `__db.<staged>.db` temporaries of a killed postmap.
    """
    try:
        check_directory(directory)
    except CommitError:
        return  # refused when something must be staged there; do nothing in it until then
    patterns = [f"{glob.escape(STAGING_PREFIX)}*"]
    for out in outputs:
        base = glob.escape(out.path.name)
        patterns += [f".{base}.*.ldapsync-staged*", f"__db..{base}.*.ldapsync-staged*"]
    with contextlib.suppress(OSError):
        for pattern in patterns:
            for stale in directory.glob(pattern):
                with contextlib.suppress(OSError):
                    st = os.lstat(stale)
                    if stat.S_ISDIR(st.st_mode):
                        if st.st_uid != os.geteuid():
                            continue  # not ours: leave it to whoever made it
                        shutil.rmtree(stale)
                    else:
                        stale.unlink()
                    log.warning("removed staging files left by an interrupted sync", path=str(stale))


def output_dir_mode(file_mode: int) -> int:
    """The mode of a directory ldapsync creates: whoever may read the file may traverse to it.

    0640 -> 0750 (the exporter's group, e.g. dovecot, reaches the passwd-file), 0644 -> 0755,
    0600 -> 0700. Set explicitly: the unit's UMask=0077 would otherwise make every new
    directory 0700 root, unreadable to Dovecot's auth process.
    """
    mode = 0o700
    if file_mode & 0o040:
        mode |= 0o050
    if file_mode & 0o004:
        mode |= 0o005
    return mode


def make_output_dir(out: Output) -> None:
    """Create the missing directories of an output's path; an existing directory is left as it is.

    Missing parents are created 0755; the output's own directory gets the exporter's owner,
    group and output_dir_mode().
    """
    directory = out.path.parent
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process created it meanwhile
            d.mkdir()
            if d == directory:
                if out.owner is not None or out.group is not None:
                    os.chown(d, -1 if out.owner is None else out.owner, -1 if out.group is None else out.group)
                os.chmod(d, output_dir_mode(out.mode))
            else:
                os.chmod(d, 0o755)


def _private_dir(out: Output, private: dict[Path, Path]) -> Path:
    """The private staging directory in the output's directory: made once per install, mode 0700."""
    directory = out.path.parent
    if directory not in private:
        try:
            check_directory(directory)
            make_output_dir(out)  # a new host, or the demo on a fresh clone
            check_directory(directory)  # what now exists, as created (umask) or as found
            private[directory] = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
        except OSError as e:
            raise CommitError(f"cannot create a staging file in {directory}: {e.strerror}") from e
    return private[directory]


def _stage(out: Output, postmap: Postmap, staged: list[_Staged], private: dict[Path, Path]) -> None:
    try:
        stage_dir = _private_dir(out, private)
    except CommitError as e:
        raise CommitError(f"{out.name}: {e}") from e
    s = _Staged(out, stage_dir / out.path.name)
    staged.append(s)
    try:
        fd = os.open(s.source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(out.data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise CommitError(f"{out.name}: cannot write {s.source}: {e.strerror}") from e
    files = [s.source]
    if out.compiled is not None and out.map_type:
        s.compiled = s.source.with_name(s.source.name + COMPILED_SUFFIX[out.map_type])
        if not _patch_compiled(out, postmap, s.source, s.compiled):
            argv = postmap.argv(out.map_type, s.source)
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise CommitError(f"{out.name}: cannot run {argv[0]}: {e}") from e
            if proc.returncode != 0 or not s.compiled.exists():
                stderr = proc.stderr.strip()[-500:]
                raise CommitError(f"{out.name}: {' '.join(argv)} failed ({proc.returncode}): {stderr}")
        files.append(s.compiled)
    mtime = _new_mtime(out)
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY | _NOFOLLOW)
        except OSError as e:
            raise CommitError(f"{out.name}: cannot open {p}: {e.strerror}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CommitError(f"{out.name}: {p} is not a regular file")
            if p != s.source:
                os.fsync(fd)
            if out.owner is not None or out.group is not None:
                os.fchown(fd, -1 if out.owner is None else out.owner, -1 if out.group is None else out.group)
            os.fchmod(fd, out.mode)
            if mtime is not None:
                os.utime(fd, ns=(mtime, mtime))
        except OSError as e:
            raise CommitError(f"{out.name}: cannot set owner/mode of {p}: {e.strerror}") from e
        finally:
            os.close(fd)
    if mtime is not None and os.lstat(s.source).st_mtime_ns <= _installed_mtime(out):  # a coarse-grained fs
        mtime = _installed_mtime(out) + 1_000_000_000
        for p in files:
            os.utime(p, ns=(mtime, mtime), follow_symlinks=False)


def _patch_compiled(out: Output, postmap: Postmap, source: Path, staged: Path) -> bool:
    """Make `staged` the installed compiled map with `out.patch` applied; False (and nothing
    staged) when the installed pair is not exactly what the patch starts from, or it fails."""
    patch = out.patch
    if patch is None or out.compiled is None or out.map_type not in PATCHABLE:
        return False
    try:
        st, cst = os.lstat(out.path), os.lstat(out.compiled)
        if not (stat.S_ISREG(st.st_mode) and stat.S_ISREG(cst.st_mode)) or st.st_mtime_ns != cst.st_mtime_ns:
            return False  # not a pair installed together: its compiled map may not match its text
        installed = _read_installed(out)
    except (OSError, CommitError):
        return False  # missing or unreadable: compiled whole, which reports any real problem
    if installed is None or hashlib.sha256(installed).hexdigest() != patch.base_sha256:
        return False  # the edits start from other bytes (a held change, a hand edit)
    try:
        _copy(out.compiled, staged)
        steps = [("-d", "-", "".join(f"{k}\n" for k in patch.gone).encode()), ("-i", "-r", b"".join(patch.put))]
        for flag, arg, data in steps:
            if data:
                argv = postmap.argv(out.map_type, source, flag, arg)
                proc = subprocess.run(argv, input=data, capture_output=True, timeout=600, check=False)
                if proc.returncode != 0:
                    raise OSError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not update a copy of the compiled map: compiling all of it", output=out.name, error=str(e))
        with contextlib.suppress(OSError):
            staged.unlink()
        return False
    return True


def _copy(src: Path, dst: Path) -> None:
    """Copy a regular file (never through a symlink) to a new file, in the kernel."""
    fd_in = os.open(src, os.O_RDONLY | _NOFOLLOW)
    try:
        size = os.fstat(fd_in).st_size
        if not stat.S_ISREG(os.fstat(fd_in).st_mode):
            raise OSError(f"{src} is not a regular file")
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        try:
            copied = 0
            while copied < size:
                sent = os.sendfile(fd_out, fd_in, copied, size - copied)
                if sent == 0:
                    break
                copied += sent
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _installed_mtime(out: Output) -> int:
    newest = 0
    for p in (out.path, out.compiled):
        if p is not None:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(p).st_mtime_ns)
    return newest


def _new_mtime(out: Output) -> int | None:
    """The mtime for the staged files, or None to keep the one writing gave them.

    A compiled map and its source get the same, strictly newer than what is installed: the
    pair is recognisable as installed together. Dovecot reloads a passwd-file only if its
    mtime (whole seconds) or size changed, so a file without a compiled map moves by a whole
    second when needed.
    """
    installed = _installed_mtime(out)
    now = time.time_ns()
    if out.compiled is not None:
        return max(now, installed + 1)
    if installed and now // 1_000_000_000 <= installed // 1_000_000_000:
        return (installed // 1_000_000_000 + 1) * 1_000_000_000
    return None


def _promote(s: _Staged) -> None:
    """Rename into place (rename(2) replaces a symlink at the target, never follows it)."""
    out = s.output
    try:
        if s.compiled is not None and out.compiled is not None:
            os.replace(s.compiled, out.compiled)
        os.replace(s.source, out.path)
    except OSError as e:
        raise CommitError(f"{out.name}: cannot rename into {out.path}: {e.strerror}") from e
    s.promoted = True


def reload(
    hook_config: Hooks, changed: Iterable[Output], generation: str, extra: Mapping[str, str] | None = None
) -> None:
    """Run reload hooks once with the changed paths; raises HookError on failure."""
    outs = list(changed)
    env = {
        "LDAPSYNC_GENERATION": generation,
        "LDAPSYNC_CHANGED_FILES": "\n".join(str(o.path) for o in outs),
        "LDAPSYNC_CHANGED_NAMES": " ".join(o.name for o in outs),
        **(extra or {}),
    }
    hooks.run(hook_config.reload, env, hook_config.timeout, phase="reload")
