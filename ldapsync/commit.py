"""Install rendered outputs atomically: stage, postmap, check, rename, fsync.

Until the renames, nothing an admin or Postfix/Dovecot can see has changed, so any failure
(postmap, a check hook, a full disk) leaves every installed file byte-identical. Each
output is then swapped by rename(2): compiled map first, then its source, so a reader sees
either the whole old or the whole new version, never a mix or a partial file.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import os
import re
import subprocess
import tempfile
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

    def digest(self) -> str:
        return self.sha256 or hashlib.sha256(self.data).hexdigest()

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

    def argv(self, map_type: str, path: Path) -> list[str]:
        conf = ["-c", str(self.config_dir)] if self.config_dir else []
        return [self.command, *conf, f"{map_type}:{path}"]


@dataclass(slots=True)
class _Staged:
    output: Output
    source: Path
    compiled: Path | None = None
    promoted: bool = False


def needs_install(out: Output) -> bool:
    """True if content, compiled map, owner or mode differ from what is installed."""
    try:
        st = out.path.stat()
        if out.path.read_bytes() != out.data:
            return True
    except FileNotFoundError:
        return True
    except OSError as e:
        raise CommitError(f"{out.name}: cannot read {out.path}: {e.strerror}") from e
    if not _attrs_ok(out, st):
        return True
    if out.compiled is not None:
        try:
            cst = out.compiled.stat()
        except FileNotFoundError:
            return True
        if not _attrs_ok(out, cst):
            return True
    return False


def _attrs_ok(out: Output, st: os.stat_result) -> bool:
    return (
        (st.st_mode & 0o7777) == out.mode
        and (out.owner is None or st.st_uid == out.owner)
        and (out.group is None or st.st_gid == out.group)
    )


def installed_bytes(out: Output) -> bytes:
    try:
        return out.path.read_bytes()
    except FileNotFoundError:
        return b""


def installed_text(out: Output) -> str:
    try:
        return out.path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def diff(out: Output, redact: Callable[[str], str]) -> str:
    """A unified diff of the installed file against the rendered one, secrets redacted."""
    old = installed_text(out).splitlines(keepends=True)
    new = out.data.decode("utf-8", "replace").splitlines(keepends=True)
    if out.sensitive:
        old = [redact(line.rstrip("\n")) + "\n" for line in old]
        new = [redact(line.rstrip("\n")) + "\n" for line in new]
    exists = out.path.exists()
    return "".join(
        difflib.unified_diff(old, new, fromfile=str(out.path) if exists else "/dev/null", tofile=str(out.path))
    )


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
    for out in outputs:
        _remove_stale_staging(out)
    changed = [o for o in outputs if needs_install(o)]
    if not changed:
        return []
    staged: list[_Staged] = []
    try:
        for out in changed:
            _stage(out, postmap, staged)
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
        dirs: set[Path] = set()
        for s in staged:
            _promote(s)
            dirs.add(s.output.path.parent)
        for d in sorted(dirs):
            fsync_dir(d)
    finally:
        for s in staged:
            if not s.promoted:
                for p in (s.compiled, s.source):
                    if p is not None:
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
    return changed


def _remove_stale_staging(out: Output) -> None:
    """Remove staging files a killed ldapsync left behind (the caller holds the state lock)."""
    with contextlib.suppress(OSError):
        for stale in out.path.parent.glob(f".{glob.escape(out.path.name)}.*.ldapsync-staged*"):
            with contextlib.suppress(OSError):
                stale.unlink()
                log.warning("removed a staging file left by an interrupted sync", path=str(stale))


def _stage(out: Output, postmap: Postmap, staged: list[_Staged]) -> None:
    directory = out.path.parent
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)  # a new host, or the demo on a fresh clone
        fd, tmp = tempfile.mkstemp(prefix=f".{out.path.name}.", suffix=".ldapsync-staged", dir=directory)
    except OSError as e:
        raise CommitError(f"{out.name}: cannot create a staging file in {directory}: {e.strerror}") from e
    s = _Staged(out, Path(tmp))
    staged.append(s)  # registered first, so a failure below still removes it
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(out.data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise CommitError(f"{out.name}: cannot write {tmp}: {e.strerror}") from e
    if out.compiled is None:  # Postfix warns when a .db is older than its source: leave those alone
        _ensure_mtime_moves(out.path, s.source)
    if out.compiled is not None and out.map_type:
        argv = postmap.argv(out.map_type, s.source)
        s.compiled = s.source.with_name(s.source.name + COMPILED_SUFFIX[out.map_type])
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CommitError(f"{out.name}: cannot run {argv[0]}: {e}") from e
        if proc.returncode != 0 or not s.compiled.exists():
            raise CommitError(f"{out.name}: {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        with contextlib.suppress(OSError):
            fd2 = os.open(s.compiled, os.O_RDONLY)
            try:
                os.fsync(fd2)
            finally:
                os.close(fd2)
    for p in (s.source, s.compiled):
        if p is None:
            continue
        try:
            if out.owner is not None or out.group is not None:
                os.chown(p, -1 if out.owner is None else out.owner, -1 if out.group is None else out.group)
            os.chmod(p, out.mode)
        except OSError as e:
            raise CommitError(f"{out.name}: cannot set owner/mode of {p}: {e.strerror}") from e


def _ensure_mtime_moves(installed: Path, staged: Path) -> None:
    """Dovecot reloads a passwd-file only if mtime (whole seconds) or size changed."""
    try:
        old = installed.stat()
    except FileNotFoundError:
        return
    new = staged.stat()
    if int(new.st_mtime) <= int(old.st_mtime):
        when = int(old.st_mtime) + 1
        os.utime(staged, (when, when))


def _promote(s: _Staged) -> None:
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
