"""One sync: source -> snapshot -> model -> rendered outputs -> guards -> commit -> state.

Every entry point (--once, --dry-run, the agent, approve, rollback) goes through here, so
the checks, hooks and bookkeeping are the same whichever way a change arrives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import structlog

from ldapsync import commit, ldapsource, ldifsource, metrics, model, static
from ldapsync import guard as guards
from ldapsync.config import Config, ExporterSpec, LdapSource
from ldapsync.directory import Snapshot, without_secrets
from ldapsync.errors import CommitError, ConfigError, HookError, LdapsyncError, SourceError
from ldapsync.exporters import Exporter, exporter_class
from ldapsync.state import Generation, State

log = structlog.get_logger(__name__)

FALLBACK_POSTFIX_DIR = "postfix-config"


@dataclass(slots=True)
class Result:
    """What a sync did; the CLI turns it into an exit code, the agent into status."""

    status: str  # "installed", "unchanged", "held", "dry-run", "last-known-good"
    changed: list[str] = field(default_factory=list)
    generation: str | None = None
    diffs: dict[str, str] = field(default_factory=dict)
    held_reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class Pipeline:
    """Wires a Config to its exporters and state dir; cheap to rebuild on config reload."""

    def __init__(self, config: Config):
        self.config = config
        self.state = State(config.state_dir)
        self.exporters: list[tuple[ExporterSpec, Exporter]] = [
            (spec, exporter_class(spec.kind)(spec.options)) for spec in config.exporters
        ]
        self.static = static.load(config.static, config.domain, config.domain_aliases, config.hosted)
        self._reported: set[str] = set()  # keys of problems already logged: an agent repeats syncs
        self._entry_cache: model.EntryCache = {}  # per-entry verdicts, valid for one day (retirement)
        self._cache_day: date | None = None
        self._rendered: dict[str, tuple[object, bytes, str]] = {}  # exporter name -> (its inputs, bytes, sha256)
        self._verified: set[str] = set()
        self._redacted: tuple[weakref.ref[Snapshot], Snapshot | None] | None = None  # the last one, as stored
        self._deltas: tuple[list[str], list[guards.Delta]] | None = None  # guard() -> record_guard()

    def reported_keys(self) -> list[str]:
        """Opaque keys of the problems logged so far (no LDAP values), to carry across runs."""
        return sorted(self._reported)

    def restore_reported(self, keys: object) -> None:
        """Problems a previous run reported are not logged again (cron `--once --quiet`)."""
        if isinstance(keys, list):
            self._reported = {k for k in keys if isinstance(k, str)}

    # -- reading ------------------------------------------------------------------------
    def read_source(self) -> Snapshot:
        src = self.config.source
        if isinstance(src, LdapSource):
            return ldapsource.read(src, self.config.attributes)
        return ldifsource.read(src, self.config.attributes)

    def render(self, snapshot: Snapshot, *, log_problems: bool = True) -> tuple[list[commit.Output], model.BuildReport]:
        cfg = self.config
        today = date.today()
        if today != self._cache_day:
            self._entry_cache.clear()
            self._cache_day = today
        routing, report = model.build(
            snapshot,
            self.static,
            domain=cfg.domain,
            domain_aliases=cfg.domain_aliases,
            attributes=cfg.attributes,
            today=today,
            cache=self._entry_cache,
            weak_passwords=cfg.weak_passwords,
            hosted=cfg.hosted,
            groups=cfg.groups,
            mailbox=cfg.mailbox,
        )
        if log_problems:
            current = {_problem_key(p) for p in (*report.warnings, *report.rejections, *report.notices)}
            for w in report.warnings:
                if _problem_key(w) not in self._reported:
                    log.warning("static entry overrides LDAP", detail=w)
            for r in report.rejections:
                if _problem_key(r) not in self._reported:
                    log.warning("LDAP value rejected", dn=r.dn, attribute=r.attribute, reason=r.reason)
            for n in report.notices:
                if _problem_key(n) not in self._reported:
                    log.warning("LDAP value accepted with a warning", dn=n.dn, attribute=n.attribute, reason=n.reason)
            if report.rejections:
                log.info("rejected LDAP values in this sync", count=len(report.rejections))
            self._reported = current
        outputs = []
        for spec, exp in self.exporters:
            # Re-render only if what this exporter reads changed (equality, not identity): after
            # one LDAP change most outputs are byte-for-byte what they were.
            inputs = exp.inputs(routing)
            cached = self._rendered.get(spec.name)
            if cached is not None and cached[0] == inputs:
                _, data, digest = cached
            else:
                data = exp.render(routing)
                digest = hashlib.sha256(data).hexdigest()
                self._rendered[spec.name] = (inputs, data, digest)
            outputs.append(
                commit.Output(
                    name=spec.name,
                    path=spec.path,
                    data=data,
                    map_type=spec.map_type if spec.map_type != "none" else None,  # texthash: no compiled file
                    mode=spec.mode if spec.mode is not None else exp.default_mode,
                    owner=spec.owner,
                    group=spec.group,
                    sensitive=exp.sensitive,
                    sha256=digest,
                )
            )
        return outputs, report

    def redacted(self, snapshot: Snapshot, report: model.BuildReport | None = None) -> Snapshot:
        """`snapshot` as it may be stored: mail passwords the model refused (plaintext, unknown
        scheme) replaced by markers that it refuses as well, so outputs stay the same."""
        if self._redacted is not None and self._redacted[0]() is snapshot:
            return self._redacted[1] or snapshot
        if report is None:
            _, report = self.render(snapshot, log_problems=False)
        attr = (self.config.attributes.mail_password or "").lower()
        refused = {r.dn for r in report.rejections if r.attribute.lower() == attr} if attr else set()
        stored = without_secrets(snapshot, attr, refused)
        # a weak reference: an agent's 100k-entry snapshot must not outlive its sync
        self._redacted = (weakref.ref(snapshot), stored if stored is not snapshot else None)
        return stored

    def postmap(self) -> commit.Postmap:
        cfg = self.config
        conf = cfg.postfix_config_dir
        if conf is None and not Path("/etc/postfix/main.cf").exists():
            # postmap refuses to run without a main.cf; an empty one gives stock defaults.
            conf = cfg.state_dir / FALLBACK_POSTFIX_DIR
            conf.mkdir(mode=0o700, exist_ok=True)
            main_cf = conf / "main.cf"
            if not main_cf.exists():
                main_cf.touch(mode=0o600)
                # Postfix waits up to ~2 s before reading a main.cf modified within the last second
                os.utime(main_cf, (time.time() - 3600, time.time() - 3600))
        return commit.Postmap(cfg.postmap, conf)

    def spec_digest(self, spec: ExporterSpec) -> str:
        doc = [
            spec.kind,
            str(spec.path),
            spec.map_type,
            spec.mode,
            spec.owner,
            spec.group,
            sorted(spec.options.items()),
        ]
        return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()[:16]

    # -- guards -------------------------------------------------------------------------
    def guard(self, snapshot: Snapshot, outputs: list[commit.Output], report: model.BuildReport) -> str | None:
        """Why this change must be held for review, or None (the rules: ldapsync.guard)."""
        deltas = self.deltas(outputs)
        return guards.check(
            deltas,
            self.state.guard_window(),
            self.config.safety,
            time.time(),
            accounts=len(snapshot.entries) - report.skipped,
            entries=len(snapshot.entries),
        )

    def deltas(self, outputs: list[commit.Output]) -> list[guards.Delta]:
        """Each output against what is installed, parsed by its exporter (kept for record_guard)."""
        exporters = {spec.name: exp for spec, exp in self.exporters}
        deltas = []
        for out in outputs:
            installed = commit.installed_bytes(out)
            if installed == out.data:
                deltas.append(guards.Delta(out.name, out.data.count(b"\n")))  # unchanged: no need to parse
                continue
            exp = exporters[out.name]
            deltas.append(guards.diff(out.name, installed, out.data, exp.parse, values=exp.guarded_values))
        self._deltas = ([o.digest() for o in outputs], deltas)
        return deltas

    def record_guard(self, outputs: list[commit.Output], *, force: bool) -> None:
        """Count an install in the guards' window; a forced (or approved) one starts a new window."""
        before = self.state.guard_window()
        if force:
            after = guards.Window()
        else:
            deltas = self._deltas[1] if self._deltas and self._deltas[0] == [o.digest() for o in outputs] else []
            after = before.record(deltas, time.time(), self.config.safety.window)
        self._deltas = None
        if after != before:
            self.state.save_guard_window(after)

    # -- the sync -----------------------------------------------------------------------
    def run(
        self,
        *,
        dry_run: bool = False,
        force: bool = False,
        snapshot: Snapshot | None = None,
        before_rename: Callable[[], None] | None = None,
    ) -> Result:
        """Read (unless given a snapshot), render, guard, install, record."""
        self.state.ensure()
        started = time.monotonic()
        if snapshot is None:
            try:
                snapshot = self.read_source()
            except SourceError as e:
                if dry_run:  # a dry run changes nothing, not even status.json
                    raise
                self._note_failure(str(e), ldap_reachable=False)
                return self.fallback(str(e))
        outputs, report = self.render(snapshot)
        snapshot = self.redacted(snapshot, report)
        counts = {o.name: o.data.count(b"\n") for o in outputs}
        held = None if force else self.guard(snapshot, outputs, report)
        if dry_run:
            diffs = {o.name: commit.diff(o, self._redactor(o.name)) for o in outputs}
            diffs = {k: v for k, v in diffs.items() if v}
            return Result("dry-run", list(diffs), diffs=diffs, held_reason=held, counts=counts)
        if held:
            self.state.hold(snapshot, {"reason": held, "source": snapshot.source, "counts": counts})
            log.error(
                "change held for review: run `ldapsync --dry-run` to see it, `ldapsync approve` to install it",
                reason=held,
            )
            self._note(
                result="held", held=held, source=snapshot.source, ldap_reachable=True, rejected=len(report.rejections)
            )
            metrics.write(self.config, self.state)
            return Result("held", held_reason=held, counts=counts)
        result = self.install(snapshot, outputs, before_rename=before_rename, report=report)
        self.record_guard(outputs, force=force)
        if result.status != "unchanged" or self.state.held() is not None:
            self.state.clear_held()
        self._note(
            result=result.status,
            source=snapshot.source,
            ldap_reachable=True,
            success=True,
            duration=time.monotonic() - started,
            rejected=len(report.rejections),
            counts=counts,
            hashes={o.name: o.digest() for o in outputs},
            generation=result.generation or self.state.current_id(),
            held=None,
        )
        metrics.write(self.config, self.state)
        return result

    def install(
        self,
        snapshot: Snapshot,
        outputs: list[commit.Output],
        *,
        before_rename: Callable[[], None] | None = None,
        report: model.BuildReport | None = None,
        record: bool = True,
    ) -> Result:
        data = {o.name: o.data for o in outputs}
        hashes = {o.name: o.digest() for o in outputs}
        gid = self.state.new_generation_id(data, hashes)
        changed = commit.install(
            outputs,
            postmap=self.postmap(),
            hook_config=self.config.hooks,
            generation=gid,
            before_rename=before_rename,
            extra_env={"LDAPSYNC_OUTPUTS": " ".join(commit.env_name(spec.name) for spec, _ in self.exporters)},
        )
        if changed:
            log.info("installed", generation=gid, changed={o.name: o.data.count(b"\n") for o in changed})
        # Services first; recording the generation (a full snapshot write) can follow.
        self.reload(changed, gid)
        current = self.state.get()
        same = (
            current is not None
            and current.meta.get("snapshot_digest") == snapshot.digest()
            and current.meta.get("hashes") == hashes
        )
        if same and current is not None and current.id not in self._verified:
            try:  # a damaged last-known-good must not survive just because LDAP did not change
                current.verify()
                self._verified.add(current.id)
            except LdapsyncError as e:
                log.error("last-known-good generation is damaged; recording a fresh one", error=str(e))
                same = False
        generation = None
        if record and not same:
            meta = {
                "source": snapshot.source,
                "entries": len(snapshot.entries),
                "rejected": len(report.rejections) if report else None,
                "specs": {spec.name: self.spec_digest(spec) for spec, _ in self.exporters},
                "config": str(self.config.path),
            }
            generation = self.state.record(gid, snapshot, data, meta, self.config.keep_generations, hashes).id
        elif not record and changed:
            generation = gid
        return Result("installed" if changed else "unchanged", [o.name for o in changed], generation)

    def reload(self, changed: list[commit.Output], generation: str) -> None:
        """Run reload hooks; a failure is remembered and retried on the next sync."""
        status = self.state.read_json("status.json")
        pending = list(dict.fromkeys([*status.get("reload_pending", []), *(o.name for o in changed)]))
        if not pending or not self.config.hooks.reload:
            return
        self._note(reload_pending=pending)
        outs = [o for o in changed] or [
            commit.Output(spec.name, spec.path, b"", spec.map_type, 0)
            for spec, _ in self.exporters
            if spec.name in pending
        ]
        hooks = self.config.hooks
        try:
            for i, command in enumerate(hooks.reload):
                served = [o for o in outs if hooks.reload_serves(i, o.name)]
                if served:  # `postfix-reload` does not run when only the passwd-file changed
                    commit.reload(dataclasses.replace(hooks, reload=(command,)), served, generation)
        except HookError as e:
            log.error("reload hook failed; installed files stay, reload retried next sync", error=str(e))
            self._note(reload_error=str(e))
            return
        self._note(reload_pending=[], reload_error=None)

    def fallback(self, error: str) -> Result:
        """LDAP is unusable: keep installed files; restore missing ones from last-known-good."""
        lkg = self.state.last_good()
        if lkg is None:
            log.error("directory unreachable and no last-known-good generation", error=error)
            return Result("failed", error=error)
        specs = lkg.meta.get("specs", {})
        try:
            snapshot = lkg.snapshot()
        except LdapsyncError as e:
            log.error("last-known-good generation unusable", generation=lkg.id, error=str(e))
            return Result("failed", error=f"{error}; {e}")
        outputs, _ = self.render(snapshot, log_problems=False)
        repair = [
            o
            for (spec, _), o in zip(self.exporters, outputs, strict=True)
            if not o.path.exists() or specs.get(spec.name) != self.spec_digest(spec)
        ]
        if not repair:
            log.warning("directory unreachable; installed files stay as they are", error=error, last_known_good=lkg.id)
            return Result("last-known-good", error=error)
        log.error(
            "directory unreachable: installing from LAST-KNOWN-GOOD generation",
            generation=lkg.id,
            outputs=[o.name for o in repair],
            error=error,
        )
        try:
            result = self.install(snapshot, repair, record=False)
        except (CommitError, ConfigError) as e:
            return Result("failed", error=f"{error}; last-known-good install failed: {e}")
        self._note(result="last-known-good", source=f"last-known-good:{lkg.id}")
        return Result("last-known-good", result.changed, lkg.id, error=error)

    def _redactor(self, name: str) -> Callable[[str], str]:
        for spec, exp in self.exporters:
            if spec.name == name:
                return exp.redact
        return lambda line: line

    def _note(self, **fields: Any) -> None:
        status = self.state.read_json("status.json")
        now = time.time()
        status["last_attempt"] = now
        if fields.pop("success", False):
            status["last_success"] = now
        status.update(fields)
        self.state.write_json("status.json", status)

    def note_follower(self, connected: bool, error: str | None) -> None:
        """The agent's follower reached the directory, or lost it (error cleared on success)."""
        self._note_fields(ldap_reachable=connected, follower_error=None if connected else error)

    def note_confirmed(self) -> None:
        """The installed outputs were confirmed to match LDAP now (connected, nothing pending)."""
        self._note_fields(last_confirmed=time.time())

    def _note_fields(self, **fields: Any) -> None:
        status = self.state.read_json("status.json")
        status.update(fields)
        self.state.write_json("status.json", status)
        metrics.write(self.config, self.state)

    def _note_failure(self, error: str, *, ldap_reachable: bool) -> None:
        log.error("sync failed", error=error)
        self._note(result="error", error=error, ldap_reachable=ldap_reachable)
        metrics.write(self.config, self.state)


def _problem_key(problem: object) -> str:
    """A stable digest of a warning or rejection: stored in state without the rejected value."""
    return hashlib.sha256(repr(problem).encode("utf-8", "replace")).hexdigest()[:24]


def rollback(pipeline: Pipeline, gid: str | None) -> Result:
    """Reinstall a generation's outputs through the normal commit path."""
    pipeline.state.ensure()
    gens = pipeline.state.generations()
    if gid is None:
        current = pipeline.state.current_id()
        ids = [g.id for g in gens]  # newest first
        older = gens[ids.index(current) + 1 :] if current in ids else gens
        if not older:
            raise LdapsyncError("no earlier generation to roll back to")
        target: Generation | None = older[0]
    else:
        target = pipeline.state.get(gid)
    if target is None:
        raise LdapsyncError(f"no generation {gid!r} (see `ldapsync snapshots`)")
    snapshot = target.snapshot()
    outputs, _ = pipeline.render(snapshot, log_problems=False)
    saved: Mapping[str, str] = target.meta.get("hashes", {})
    for o in outputs:
        if o.name in saved and o.digest() != saved[o.name]:
            log.warning(
                "output differs from when the generation was made (config or static file changed)", output=o.name
            )
    result = pipeline.install(snapshot, outputs, record=False)
    pipeline.state.set_current(target.id)
    pipeline._note(result="rolled-back", generation=target.id)
    return Result("installed" if result.changed else "unchanged", result.changed, target.id)
