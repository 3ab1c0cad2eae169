"""One sync, split in two: plan() decides without side effects, apply() is the only writer.

plan(): source snapshot -> model -> rendered outputs -> diff against what is installed ->
guard verdict, as a frozen Plan. apply(): commit, reload hooks, generation, one status write,
metrics. Every entry point (--once, --dry-run, the agent, approve, rollback, last-known-good)
goes through here, so the checks, hooks and bookkeeping are the same whichever way a change
arrives; `--dry-run` is plan() plus printing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

import structlog

from ldapsync import commit, ldapsource, ldifsource, metrics, progress, static
from ldapsync import guard as guards
from ldapsync import status as status_mod
from ldapsync.config import Config, ExporterSpec, LdapSource
from ldapsync.delta import Delta
from ldapsync.directory import Snapshot, without_secrets
from ldapsync.errors import CommitError, ConfigError, HookError, LdapsyncError, SourceError
from ldapsync.exporters import Exporter, exporter_class
from ldapsync.mirror import FOLLOW_FILE, FOLLOW_SNAPSHOT
from ldapsync.render import FULL, Rendered, Renderer, WholeModelNeeded
from ldapsync.routing import BuildReport, Engine, ModelChange, RoutingModel
from ldapsync.routing import build as routing_build
from ldapsync.routing.stored import StoredEngine
from ldapsync.state import Generation, State
from ldapsync.state.lmdbstore import Store
from ldapsync.status import OutputState, Status, SyncResult
from ldapsync.stored import StoredMirror, of_store, redact_stored
from ldapsync.stored import changes as stored_changes
from ldapsync.stored import save as stored_save

log = structlog.get_logger(__name__)

FALLBACK_POSTFIX_DIR = "postfix-config"
# the phases of a sync, as the progress line names them
READING, BUILDING, INSTALLING = "reading the directory", "building the maps", "installing"
CONFIRM_REFRESH = 5.0  # seconds: a confirmation newer than this is not rewritten (the agent confirms every 10 s)


class Verdict(StrEnum):
    INSTALL = "install"
    HOLD = "hold"
    NOOP = "noop"  # the installed outputs already match


@dataclass(frozen=True, slots=True)
class Plan:
    """What a sync would do, decided from its inputs only; apply() carries it out."""

    snapshot: Snapshot
    outputs: tuple[commit.Output, ...]
    changed: tuple[str, ...]  # outputs whose bytes, compiled map, owner or mode differ from installed
    verdict: Verdict
    counts: Mapping[str, Delta]
    generation: str  # the id the hooks, the log and `ldapsync snapshots` see
    new_generation: bool  # the content differs from the current generation: record it
    held_reason: str | None = None
    rejected: int = 0
    weak_passwords: int = 0
    forced: bool = False  # installed past the guards (--force, approve): the guards' window starts afresh
    guarded: tuple[guards.Delta, ...] = ()  # what the guards counted: apply() adds it to their window


@dataclass(frozen=True, slots=True)
class Result:
    """What a sync did; the CLI turns it into an exit code, the agent into its status line."""

    status: SyncResult
    changed: list[str] = field(default_factory=list)
    generation: str | None = None
    diffs: Mapping[str, str] = field(default_factory=dict)
    held_reason: str | None = None
    counts: Mapping[str, Delta] = field(default_factory=dict)
    error: str | None = None
    held_id: str | None = None  # the held change's id (State.get and State.resume know it)


class Pipeline:
    """Wires a Config to its exporters and state dir; cheap to rebuild on config reload."""

    def __init__(self, config: Config, *, follow: bool = False, store: Store | None = None):
        """`follow`: syncs will come change after change (the agent): keep what makes the next
        one cost its change; a one-shot run does not pay for that. `store`: the agent's store
        (ldapsync.state.lmdbstore), whose mirror gives the snapshots: the routing engine
        works on it and keeps nothing in memory (unless an exporter cannot splice)."""
        self.config = config
        self.follow = follow
        self.state = State(config.state_dir)
        self.exporters: list[tuple[ExporterSpec, Exporter]] = [
            (spec, exporter_class(spec.kind)(spec.options)) for spec in config.exporters
        ]
        rs = config.routing
        self.static = static.load(config.static, rs.domain, rs.domain_aliases, rs.hosted)
        self._reported: set[str] = set()  # keys of problems already logged: an agent repeats syncs
        self.store: Store | None = None
        self.engine: Engine | StoredEngine = Engine(rs, self.static, index=follow)
        self._renderers = {spec.name: Renderer(exp) for spec, exp in self.exporters}
        if store is not None:
            self.attach_store(store)
        self._in_step = False  # every renderer has seen the engine's last model
        # the renderers hold the outputs of the store's content (a stored engine may splice)
        self._store_step = False
        self.last_plan: Plan | None = None  # the last plan run() made, for the agent's store write
        self._follow_files_gone = False
        self._rendered: dict[str, Rendered] = {}  # exporter name -> its last output, until plan() used it
        self._verified: set[str] = set()
        self._redacted: tuple[weakref.ref[Snapshot], Snapshot | None] | None = None  # the last one, as stored
        # told the phase of run() and the entries read so far (`--once` on a terminal)
        self.progress: progress.Report = progress.silent
        # reads the directory instead of a full read (a one-shot run resuming: ldapsync.catchup)
        self.reader: Callable[[], Snapshot] | None = None

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
        report = self.progress
        report(READING, 0)
        if self.reader is not None:
            return self.reader()
        if isinstance(src, LdapSource):
            # the agent's scheduler retries a failed sync; a one-shot run waits a little itself
            rounds = 1 if self.follow else src.connect_rounds
            return ldapsource.read(
                src, self.config.routing.attributes, rounds=rounds, progress=lambda n: report(READING, n)
            )
        return ldifsource.read(src, self.config.routing.attributes)

    def attach_store(self, store: Store) -> bool:
        """Build on `store` from now on (before the first sync); False, and nothing changes,
        if an exporter cannot splice (it needs the whole model every time)."""
        if not all(exp.incremental for _, exp in self.exporters):
            return False
        self.store = store
        self.engine = StoredEngine(self.config.routing, self.static, store)
        self._renderers = {spec.name: Renderer(exp, links=False) for spec, exp in self.exporters}
        return True

    def resume_from_store(self) -> bool:
        """At a start: carry on from the installed outputs if each is exactly what the store
        says it rendered last (else the first sync is a full build). True if so."""
        if self.store is None:
            return False
        with self.store.reading() as view:
            recorded = view.meta("outputs") or {}
        empty, _ = routing_build(Snapshot((), ""), static.Static(), self.config.routing, date.today())
        ok = True
        for spec, _ in self.exporters:
            try:
                data = spec.path.read_bytes()
            except OSError:
                ok = False
                continue
            renderer = self._renderers[spec.name]
            renderer.restore(data, empty)
            ok = ok and renderer.sha256 == recorded.get(spec.name)
        self._in_step = self._store_step = ok
        return ok

    def render(self, snapshot: Snapshot, *, log_problems: bool = True) -> tuple[list[commit.Output], BuildReport]:
        today = date.today()
        engine = self.engine
        if isinstance(engine, StoredEngine):
            # splicing a change of the store's content needs outputs of exactly that content
            if not (self._store_step and self._in_step and of_store(snapshot, engine.store)):
                engine.force_full()
            self._store_step = False  # until this sync is in the store (saved())
        routing, report, change = engine.update(snapshot, today)
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
        # After one LDAP change most outputs are byte-for-byte what they were, and the others
        # differ in a few lines: the renderers splice those the engine says may have changed
        # (ldapsync.render). A render that did not finish leaves them out of step: start afresh.
        if not self._in_step:
            change = FULL
        self._in_step = False
        try:
            outputs = self._render_all(routing, change)
        except WholeModelNeeded:
            assert isinstance(engine, StoredEngine)
            engine.force_full()
            routing, report, change = engine.update(snapshot, today)
            outputs = self._render_all(routing, change)
        self._in_step = True
        return outputs, report

    def _render_all(self, routing: RoutingModel, change: ModelChange) -> list[commit.Output]:
        outputs = []
        for spec, exp in self.exporters:
            rendered = self._renderers[spec.name].render(routing, change)
            self._rendered[spec.name] = rendered
            edit = rendered.edit
            patch = None
            if edit is not None and edit.base is not rendered.data:  # lets commit patch the compiled map
                patch = commit.Patch(edit.base_sha256, edit.gone, edit.put)
            outputs.append(
                commit.Output(
                    name=spec.name,
                    path=spec.path,
                    data=rendered.data,
                    map_type=spec.map_type if spec.map_type != "none" else None,  # texthash: no compiled file
                    mode=spec.mode if spec.mode is not None else exp.default_mode,
                    owner=spec.owner,
                    group=spec.group,
                    sensitive=exp.sensitive,
                    sha256=rendered.sha256,
                    patch=patch,
                    lines=rendered.lines,
                )
            )
        return outputs

    def redacted(self, snapshot: Snapshot, report: BuildReport | None = None) -> Snapshot:
        """`snapshot` as it may be stored: mail passwords the model refused (plaintext, unknown
        scheme) replaced by markers that it refuses as well, so outputs stay the same."""
        if self._redacted is not None and self._redacted[0]() is snapshot:
            return self._redacted[1] or snapshot
        if report is None:
            _, report = self.render(snapshot, log_problems=False)
        attr = (self.config.routing.attributes.mail_password or "").lower()
        refused = {r.dn for r in report.rejections if r.attribute.lower() == attr} if attr else set()
        found = redact_stored(snapshot, attr, refused) if attr else (snapshot, [])
        if found is None:
            stored = without_secrets(snapshot, attr, refused)
        else:
            stored, replaced = found
            if replaced and isinstance(self.engine, StoredEngine):
                # the store keeps them redacted: its problem counts must be what they give
                self.engine.stored_as(replaced)
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
    def guard(self, snapshot: Snapshot, report: BuildReport, guarded: Sequence[guards.Delta]) -> str | None:
        """Why this change must be held for review, or None (the rules: ldapsync.guard)."""
        return guards.check(
            guarded,
            self.state.guard_window(),
            self.config.safety,
            time.time(),
            accounts=len(snapshot.entries) - report.skipped,
            entries=len(snapshot.entries),
        )

    def deltas(self, outputs: Sequence[commit.Output]) -> tuple[list[guards.Delta], list[guards.Delta]]:
        """Each output against what is installed, parsed by its exporter: (every changed value
        counted, what the guards count).

        The guards see changed values only where the exporter guards them (`_guarded`); the
        counts (dry run, held change, log) see them all. One parse serves both.
        """
        exporters = {spec.name: exp for spec, exp in self.exporters}
        deltas = self.measure(outputs)
        return deltas, [_guarded(d, exporters[d.output]) for d in deltas]

    def measure(self, outputs: Sequence[commit.Output]) -> list[guards.Delta]:
        """Each output against what is installed, by key (the renderer's counts when it spliced
        the installed bytes, else the exporter's parser on the lines that differ); no side effects."""
        exporters = {spec.name: exp for spec, exp in self.exporters}
        deltas = []
        for out in outputs:
            installed = commit.installed_bytes(out)
            r = self._rendered.get(out.name)
            if r is not None and r.data is not out.data:
                r = None  # not the output this pipeline rendered last
            if installed == out.data:  # unchanged: no need to parse
                deltas.append(guards.Delta(out.name, r.lines if r is not None else out.data.count(b"\n")))
            elif r is not None and r.edit is not None and r.edit.base == installed:
                # the renderer counted while splicing the installed bytes: no need to parse either
                e = r.edit
                deltas.append(guards.Delta(out.name, r.lines - e.added + e.removed, e.removed, e.changed, e.added))
            else:
                deltas.append(guards.diff(out.name, installed, out.data, exporters[out.name].parse, values=True))
        return deltas

    def record_guard(self, guarded: Sequence[guards.Delta], *, force: bool) -> None:
        """Count an install (what its plan's guards counted) in the guards' window; a forced
        (or approved) one starts a new window."""
        before = self.state.guard_window()
        after = guards.Window() if force else before.record(guarded, time.time(), self.config.safety.window)
        if after != before:
            self.state.save_guard_window(after)

    # -- plan: no side effects ----------------------------------------------------------
    def plan(self, snapshot: Snapshot, *, force: bool = False, log_problems: bool = True) -> Plan:
        """Render, diff against the installed files, ask the guards; read only."""
        outputs, report = self.render(snapshot, log_problems=log_problems)
        snapshot = self.redacted(snapshot, report)  # what a held change or a generation stores
        changed = tuple(o.name for o in outputs if commit.needs_install(o))
        deltas, guarded = self.deltas(outputs)
        self._rendered.clear()  # the previous outputs they were spliced from need not stay in memory
        counts = _counts(deltas)
        held = None if force else self.guard(snapshot, report, guarded)
        if held is not None:
            verdict, generation, new = Verdict.HOLD, self.state.current_id() or "", False
        else:
            verdict = Verdict.INSTALL if changed else Verdict.NOOP
            generation, new = self._generation_for(snapshot, outputs)
        return Plan(
            snapshot,
            tuple(outputs),
            changed,
            verdict,
            counts,
            generation,
            new,
            held_reason=held,
            rejected=len(report.rejections),
            weak_passwords=report.weak_passwords,
            forced=force,
            guarded=tuple(guarded),
        )

    def _generation_for(self, snapshot: Snapshot, outputs: Sequence[commit.Output]) -> tuple[str, bool]:
        """The current generation's id if it holds exactly this content, else a new id to record."""
        hashes = {o.name: o.digest() for o in outputs}
        current = self.state.get()
        same = (
            current is not None
            and current.meta.get("snapshot_digest") == snapshot.digest()
            and current.meta.get("hashes") == hashes
        )
        if same and current is not None and current.id not in self._verified:
            try:  # a damaged last-known-good must not survive just because LDAP did not change
                current.verify(files_only=True)
                self._verified.add(current.id)
            except LdapsyncError as e:
                log.error("last-known-good generation is damaged; a sync records a fresh one", error=str(e))
                same = False
        if same and current is not None:
            return current.id, False
        return self.state.new_generation_id({o.name: o.data for o in outputs}, hashes), True

    def diffs(self, plan: Plan) -> dict[str, str]:
        """Unified diffs of the outputs whose bytes would change, secrets redacted."""
        out = {o.name: commit.diff(o, self._redactor(o.name)) for o in plan.outputs}
        return {k: v for k, v in out.items() if v}

    # -- apply: the only writer ---------------------------------------------------------
    def apply(
        self,
        plan: Plan,
        *,
        before_rename: Callable[[], None] | None = None,
        received_at: float | None = None,
        started: float | None = None,
    ) -> Result:
        """Carry out a plan: hold it, or commit, reload, record the generation; write status once.

        `received_at` (time.time()) is when the change that led here arrived, for the
        propagation histogram. A commit failure is recorded, then raised.
        """
        started = time.monotonic() if started is None else started
        self.state.ensure()
        now = time.time()
        record = replace(
            status_mod.load(self.config.state_dir),
            last_attempt=now,
            source=plan.snapshot.source,
            ldap_reachable=True,
            rejected=plan.rejected,
            weak_passwords=plan.weak_passwords,
        )
        if plan.verdict is Verdict.HOLD:
            reason = plan.held_reason or "held"
            counts = {n: str(d) for n, d in plan.counts.items()}
            held_id = self.state.hold(
                plan.snapshot, {"reason": reason, "source": plan.snapshot.source, "counts": counts}
            )
            log.error(
                "change held for review: run `ldapsync --dry-run` to see it, `ldapsync approve` to install it",
                reason=reason,
                counts=counts,
            )
            self._finish(replace(record, result=SyncResult.HELD, held=reason, error=None).counted(SyncResult.HELD))
            return Result(SyncResult.HELD, held_reason=reason, counts=plan.counts, held_id=held_id)
        try:
            changed, keys = self._commit(plan.outputs, plan.generation, counts=plan.counts, before_rename=before_rename)
            # Services first; recording the generation (a full snapshot write) can follow.
            record = self._reload(record, changed, plan.generation)
            if plan.new_generation:
                self._record_generation(plan)
            self.record_guard(plan.guarded, force=plan.forced)
        except (LdapsyncError, OSError) as e:
            self._finish(_failed(record, str(e)))
            raise
        self.state.clear_held()  # a successful sync supersedes a held change (and removes a damaged one)
        self.state.sweep()  # a killed run's half-recorded generation, also when this one records none
        result = SyncResult.INSTALLED if changed else SyncResult.UNCHANGED
        done = time.time()
        propagation = record.propagation
        if changed and received_at is not None:
            propagation = propagation.observe(max(0.0, done - received_at))
        record = replace(
            record,
            result=result,
            last_success=done,
            last_confirmed=done,
            duration=time.monotonic() - started,
            error=None,
            held=None,
            outputs=_output_states(plan.outputs),
            generation=plan.generation,
            propagation=propagation,
        ).installed(keys)
        self._finish(record.counted(result))
        return Result(result, [o.name for o in changed], plan.generation, counts=plan.counts)

    def _commit(
        self,
        outputs: Sequence[commit.Output],
        generation: str,
        *,
        counts: Mapping[str, Delta] | None = None,
        before_rename: Callable[[], None] | None = None,
    ) -> tuple[list[commit.Output], dict[str, Delta]]:
        """Install what changed; return it, and how each installed output changed by key.

        `counts`: the plan's, measured against what was installed when it was made; without
        them (rollback, last-known-good) they are measured here, before anything is replaced."""
        if counts is None:
            counts = _counts(self.measure(outputs))
        changed = commit.install(
            outputs,
            postmap=self.postmap(),
            hook_config=self.config.hooks,
            generation=generation,
            before_rename=before_rename,
            extra_env={"LDAPSYNC_OUTPUTS": " ".join(commit.env_name(spec.name) for spec, _ in self.exporters)},
        )
        keys = {o.name: counts.get(o.name, Delta()) for o in changed}
        if changed:
            log.info("installed", generation=generation, changed={n: d.to_json() for n, d in keys.items()})
        return changed, keys

    def _record_generation(self, plan: Plan) -> None:
        meta = {
            "source": plan.snapshot.source,
            "entries": len(plan.snapshot.entries),
            "rejected": plan.rejected,
            "specs": {spec.name: self.spec_digest(spec) for spec, _ in self.exporters},
            "config": str(self.config.path),
            "lines": {o.name: o.line_count() for o in plan.outputs},
            "delta": {name: d.to_json() for name, d in sorted(plan.counts.items())},  # against what was installed
        }
        data = {o.name: o.data for o in plan.outputs}
        hashes = {o.name: o.digest() for o in plan.outputs}
        changes = None
        if self.store is not None:
            changes = stored_changes(plan.snapshot, self.store)
        self.state.record(
            plan.generation, plan.snapshot, data, meta, self.config.keep_generations, hashes, changes=changes
        )
        self._verified.add(plan.generation)

    def save(self, mirror: StoredMirror, cookie: bytes | None, result: Result) -> None:
        """Write the last sync to the store (one transaction; ldapsync.stored.save): the
        mirror's snapshot as planned, the engine's index, the cookie, what was rendered."""
        plan = self.last_plan
        if self.store is None or plan is None:
            return
        engine = self.engine if isinstance(self.engine, StoredEngine) else None
        rendered = {spec.name: self._renderers[spec.name].sha256 for spec, _ in self.exporters}
        generation = result.generation if result.status != SyncResult.HELD else None
        stored_save(mirror, plan.snapshot, cookie, engine, {k: v for k, v in rendered.items() if v}, generation)
        self._store_step = True
        self.last_plan = self._redacted = None  # a full sync's entries need not outlive it
        if not self._follow_files_gone:  # what an older version saved instead: once per process
            for name in (FOLLOW_FILE, FOLLOW_SNAPSHOT):
                with contextlib.suppress(FileNotFoundError):
                    (self.config.state_dir / name).unlink()
            self._follow_files_gone = True

    def _reload(self, record: Status, changed: Sequence[commit.Output], generation: str) -> Status:
        """Run reload hooks for what changed and what is still owed; a failure is kept for the next sync."""
        pending = list(dict.fromkeys([*record.reload_pending, *(o.name for o in changed)]))
        if not pending or not self.config.hooks.reload:
            return replace(record, reload_pending=(), reload_error=None)
        outs = list(changed) or [
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
            return replace(record, reload_pending=tuple(pending), reload_error=str(e))
        return replace(record, reload_pending=(), reload_error=None)

    def _finish(self, record: Status) -> None:
        """The one status write of an attempt, after the metrics textfile (whose failure it records)."""
        error = metrics.write(self.config.metrics_textfile, record)
        if error is not None:
            log.warning("metrics not written; installed outputs are not affected", error=error)
        status_mod.save(self.config.state_dir, replace(record, metrics_error=error))

    # -- the sync -----------------------------------------------------------------------
    def run(
        self,
        *,
        dry_run: bool = False,
        force: bool = False,
        snapshot: Snapshot | None = None,
        before_rename: Callable[[], None] | None = None,
        received_at: float | None = None,
    ) -> Result:
        """Read (unless given a snapshot), plan, and apply the plan (a dry run only plans)."""
        started = time.monotonic()
        if not dry_run:
            self.state.ensure()
        if snapshot is None:
            try:
                snapshot = self.read_source()
            except SourceError as e:
                if dry_run:  # a dry run changes nothing, not even status.json
                    raise
                return self.fallback(str(e))
        self.progress(BUILDING, len(snapshot.entries))
        self.last_plan = None
        try:
            plan = self.plan(snapshot, force=force)
            self.last_plan = plan
        except (LdapsyncError, OSError) as e:
            if not dry_run:  # e.g. an installed file unreadable, a static entry that no longer fits
                record = replace(status_mod.load(self.config.state_dir), last_attempt=time.time())
                self._finish(_failed(record, str(e)))
            raise
        if dry_run:
            diffs = self.diffs(plan)
            return Result(
                SyncResult.DRY_RUN, list(diffs), diffs=diffs, held_reason=plan.held_reason, counts=plan.counts
            )
        self.progress(INSTALLING, len(snapshot.entries))
        return self.apply(plan, before_rename=before_rename, received_at=received_at, started=started)

    def fallback(self, error: str) -> Result:
        """LDAP is unusable: keep installed files; restore missing ones from last-known-good."""
        log.error("sync failed", error=error)
        self.state.ensure()
        record = replace(
            status_mod.load(self.config.state_dir),
            last_attempt=time.time(),
            result=SyncResult.FAILED,
            error=error,
            ldap_reachable=False,
        )
        failed = record.counted(SyncResult.FAILED)
        lkg = self.state.last_good()
        if lkg is None:
            log.error("directory unreachable and no last-known-good generation", error=error)
            self._finish(failed)
            return Result(SyncResult.FAILED, error=error)
        specs = lkg.meta.get("specs", {})
        try:
            snapshot = lkg.snapshot()
        except LdapsyncError as e:
            log.error("last-known-good generation unusable", generation=lkg.id, error=str(e))
            self._finish(replace(failed, error=f"{error}; {e}"))
            return Result(SyncResult.FAILED, error=f"{error}; {e}")
        outputs, _ = self.render(snapshot, log_problems=False)
        repair = [
            o
            for (spec, _), o in zip(self.exporters, outputs, strict=True)
            if not o.path.exists() or specs.get(spec.name) != self.spec_digest(spec)
        ]
        if not repair:
            log.warning("directory unreachable; installed files stay as they are", error=error, last_known_good=lkg.id)
            self._finish(failed)
            return Result(SyncResult.FAILED, generation=lkg.id, error=error)  # failed, but serving a generation
        log.error(
            "directory unreachable: installing from LAST-KNOWN-GOOD generation",
            generation=lkg.id,
            outputs=[o.name for o in repair],
            error=error,
        )
        try:
            changed, keys = self._commit(repair, lkg.id)  # the hooks see the generation they are given
            record = self._reload(record, changed, lkg.id)
        except (CommitError, ConfigError) as e:
            message = f"{error}; last-known-good install failed: {e}"
            self._finish(replace(failed, error=message))
            return Result(SyncResult.FAILED, error=message)
        record = replace(
            record,
            result=SyncResult.LAST_KNOWN_GOOD,
            source=f"last-known-good:{lkg.id}",
            outputs=MappingProxyType({**record.outputs, **_output_states(repair)}),
        ).installed(keys)
        self._finish(record.counted(SyncResult.LAST_KNOWN_GOOD))
        return Result(SyncResult.LAST_KNOWN_GOOD, [o.name for o in changed], lkg.id, error=error)

    # -- what the agent's follower knows ------------------------------------------------
    def note_follower(self, connected: bool, error: str | None) -> None:
        """Record the follower's connection (and so whether LDAP is reachable); written only on a change.

        Like apply(), call it from the thread that runs syncs: the record is read, changed and rewritten.
        """
        record = status_mod.load(self.config.state_dir)
        same = record.follower_connected == connected and record.ldap_reachable == connected
        lost = None if connected else (record.ldap_lost if record.follower_connected is False else None) or time.time()
        if same and record.follower_error == error and record.ldap_lost == lost:
            return
        self._save_note(
            replace(
                record, follower_connected=connected, follower_error=error, ldap_reachable=connected, ldap_lost=lost
            )
        )

    def note_config(self, error: str | None) -> None:
        """Record that the config file on disk was rejected (None: the one on disk is in force)."""
        record = status_mod.load(self.config.state_dir)
        if record.config_error != error:
            self._save_note(replace(record, config_error=error))

    def note_confirmed(self, *, now: float | None = None) -> None:
        """The follower is connected and nothing is pending: the installed outputs match the directory.

        Cheap to call often: the record is rewritten at most every CONFIRM_REFRESH seconds.
        Only outputs a successful sync installed can be confirmed.
        """
        now = time.time() if now is None else now
        record = status_mod.load(self.config.state_dir)
        if record.result is not None and not record.result.confirms:
            return  # held, failed, rolled back: what is installed is known not to be LDAP's answer
        if record.last_success is None:
            return
        fresh = record.last_confirmed is not None and now - record.last_confirmed < CONFIRM_REFRESH
        if fresh and record.ldap_reachable and record.follower_connected:
            return
        if record.last_confirmed is not None and now <= record.last_confirmed:
            return  # confirmations only move forward (`now` may be when the server last answered)
        self._save_note(
            replace(record, last_confirmed=now, ldap_reachable=True, follower_connected=True, ldap_lost=None)
        )

    def _save_note(self, record: Status) -> None:
        self.state.ensure()
        self._finish(record)

    def _redactor(self, name: str) -> Callable[[str], str]:
        for spec, exp in self.exporters:
            if spec.name == name:
                return exp.redact
        return lambda line: line


def _failed(record: Status, error: str) -> Status:
    return replace(record, result=SyncResult.FAILED, error=error).counted(SyncResult.FAILED)


def _output_states(outputs: Sequence[commit.Output]) -> Mapping[str, OutputState]:
    return MappingProxyType({o.name: OutputState(o.line_count(), o.digest()) for o in outputs})


def _counts(deltas: Sequence[guards.Delta]) -> Mapping[str, Delta]:
    """The guards' per-output deltas as key counts (every changed value, guarded or not)."""
    return MappingProxyType({d.output: Delta(d.added, d.deleted, d.changed) for d in deltas})


def _guarded(delta: guards.Delta, exp: Exporter) -> guards.Delta:
    """The delta as the guards count it: changed values only where the exporter guards them."""
    return delta if exp.guarded_values else replace(delta, changed=0)


def _problem_key(problem: object) -> str:
    """A stable digest of a warning or rejection: stored in state without the rejected value."""
    return hashlib.sha256(repr(problem).encode("utf-8", "replace")).hexdigest()[:24]


def rollback(pipeline: Pipeline, gid: str | None) -> Result:
    """Reinstall a generation's outputs through the normal commit path, under that generation's id."""
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
    record = replace(status_mod.load(pipeline.config.state_dir), last_attempt=time.time())
    try:
        changed, keys = pipeline._commit(outputs, target.id)
        record = pipeline._reload(record, changed, target.id)
        pipeline.state.set_current(target.id)
    except (LdapsyncError, OSError) as e:
        pipeline._finish(_failed(record, str(e)))
        raise
    record = replace(
        record,
        result=SyncResult.ROLLED_BACK,
        source=f"rollback:{target.id}",
        error=None,
        outputs=_output_states(outputs),
        generation=target.id,
    ).installed(keys)
    pipeline._finish(record.counted(SyncResult.ROLLED_BACK))
    status = SyncResult.INSTALLED if changed else SyncResult.UNCHANGED
    return Result(status, [o.name for o in changed], target.id)
