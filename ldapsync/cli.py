"""Command line: parse, load config, wire, run. Exit codes and options: docs/cli.md."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from ldapsync import __version__, progress
from ldapsync import config as config_mod
from ldapsync import log as log_mod
from ldapsync.errors import ConfigError, LdapsyncError, SourceError, StateError
from ldapsync.health import min_max_age
from ldapsync.scheduler import CONFIRM_EVERY

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_HELD = 0, 1, 2, 4
LOCK_WAIT = 5.0  # seconds a one-shot command waits for another one; then it names the holder's PID
EXIT_CHECK_UNKNOWN = 3  # the monitoring plugin convention: a plugin that cannot run is UNKNOWN
COMMANDS = ("status", "snapshots", "diff", "rollback", "approve", "resync", "check", "explain", "files")
AGENT_COMMANDS = ("approve", "rollback", "resync")  # carried out by a running agent when there is one


def _global_options(p: argparse.ArgumentParser, *, default: bool) -> None:
    """Options valid before and after the subcommand (`ldapsync status -c FILE` works too).

    On subcommands the defaults are suppressed, so a value given before the subcommand is
    not overwritten by the subcommand's default.
    """
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=config_mod.DEFAULT_CONFIG if default else argparse.SUPPRESS,
        help=f"config file (default {config_mod.DEFAULT_CONFIG})",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if default else argparse.SUPPRESS,
        help="log only warnings and errors, and only problems not reported by an earlier run (for cron)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldapsync",
        description="Follow LDAP and atomically install Postfix maps and a Dovecot passwd-file. "
        "Without --once, --dry-run or a command it runs as the agent (a systemd Type=notify service).",
        epilog="Exit codes and examples: docs/cli.md (installed in /usr/share/doc/ldapsync/; "
        "as man pages: ldapsync(8), ldapsync.yaml(5)).",
    )
    _global_options(p, default=True)
    p.add_argument("--version", action="version", version=f"ldapsync {__version__}")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="sync once and exit (0 ok, 1 failed, 2 config error, 4 held)")
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="print a per-output +added -removed summary, then the diff that would be installed "
        "(exit 0 none, 1 changes, 2 error)",
    )
    p.add_argument("--stat", action="store_true", help="with --dry-run: print only the per-output summary")
    p.add_argument(
        "--force", action="store_true", help="install even if a safety guard would hold the change (one run)"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text)
        _global_options(cmd, default=False)
        return cmd

    command("status", "last sync, source, held change, rejected values, outputs and their hashes").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )
    command(
        "snapshots",
        "list the generations (last-known-good snapshots), newest first, with the keys each one "
        "added, removed and changed per output (+A -R ~C; ? if unknown); * marks the installed one",
    )
    df = command(
        "diff",
        "unified diff between two generations' outputs, secrets redacted as --dry-run redacts them "
        "(exit 0 same, 1 different, 2 error)",
    )
    df.add_argument("old", nargs="?", metavar="GEN1", help="the older generation (default: the one before GEN2)")
    df.add_argument("new", nargs="?", metavar="GEN2", help="the newer generation (default: the installed one)")
    rb = command("rollback", "reinstall a generation through the normal commit path (postmap, check and reload hooks)")
    rb.add_argument(
        "generation", nargs="?", help="generation id from `snapshots` (default: the one before the current)"
    )
    command("approve", "install the change a safety guard held (see it first with --dry-run)")
    command(
        "resync",
        "make the running agent read the whole directory again (without an agent: one full sync, as --once)",
    )
    ck = command("check", "Nagios/Icinga plugin: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also on a usage error)")
    ck.add_argument(
        "--max-age",
        type=float,
        required=True,
        metavar="SECONDS",
        help="CRITICAL if the installed outputs were last confirmed to match the directory longer ago; "
        f"use at least {min_max_age():.0f} (2 x (source timeout + 15) in general): a healthy quiet agent "
        f"confirms every {CONFIRM_EVERY:.0f} s what the server last answered",
    )
    ck.add_argument(
        "--warn-age",
        type=float,
        metavar="SECONDS",
        help="WARNING if older (default: half of --max-age); a running agent that has lost LDAP for longer "
        "than the source timeout is WARNING regardless",
    )
    command(
        "files",
        "the files ldapsync writes: each output and its compiled map, one absolute path per line "
        "(what the Debian package's purge removes)",
    )
    ex = command("explain", "where an address goes in every output, and why (0 present, 1 absent, 2 cannot tell)")
    ex.add_argument("address", help="an address, or a bare login (login@domain)")
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.add_argument("--live", action="store_true", help="read the directory instead of the installed generation")
    return p


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand in argv, skipping option values (`-c check.yaml` is not the check command)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-c", "--config"):
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        if e.code == EXIT_CONFIG and _command_word(argv) == "check":
            # argparse printed the usage on stderr; monitoring reads one line on stdout, never CRITICAL
            print("LDAPSYNC UNKNOWN - usage error (see ldapsync check --help)")
            return EXIT_CHECK_UNKNOWN
        raise
    try:
        code = _main(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        # `ldapsync status | head`: the reader left; nothing to report. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(args: argparse.Namespace) -> int:
    if args.stat and not args.dry_run:
        parser().error("--stat needs --dry-run")
    if args.command == "check":
        from ldapsync import report

        return report.check(args.config, args.max_age, args.warn_age)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as e:
        log_mod.configure()
        structlog.get_logger("ldapsync").error("configuration error", error=str(e))
        if args.command == "status":  # then what the running agent (on its previous config) does
            from ldapsync import report

            return report.status_unloaded(args.config, e, as_json=args.json)
        return EXIT_CONFIG
    level = "warning" if args.quiet and cfg.log_level in ("debug", "info") else cfg.log_level
    log_mod.configure(cfg.log_format, level)
    log = structlog.get_logger("ldapsync")
    try:
        return _dispatch(args, cfg)
    except BrokenPipeError:
        raise
    except ConfigError as e:
        log.error("configuration error", error=str(_in_file(e, cfg.path)))
        return EXIT_CONFIG
    except (LdapsyncError, OSError) as e:
        log.error("failed", error=str(e))
        return EXIT_CONFIG if args.dry_run else EXIT_FAIL


def _in_file(e: ConfigError, path: Path) -> ConfigError:
    """A config error found after loading (a key's file unreadable) still names the config file."""
    return e if e.file is not None else ConfigError(e.message, file=path, key=e.key)


def _preflight(cfg: config_mod.Config) -> None:
    """Fail on an unreadable bind password file now, naming the config file, not on the first bind."""
    if isinstance(cfg.source, config_mod.LdapSource) and cfg.source.bind_password_file is not None:
        from ldapsync import ldapsource

        try:
            ldapsource.bind_password(cfg.source)
        except ConfigError as e:
            raise _in_file(e, cfg.path) from e


def _dispatch(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from ldapsync import catchup, report, sync

    if args.command == "status":
        return report.status(cfg, as_json=args.json)
    if args.command in AGENT_COMMANDS:
        answered = _ask_agent(cfg, args)
        if answered is not None:
            return answered
    if args.command == "files":
        return _files(cfg)
    pipeline = sync.Pipeline(cfg)
    if args.command == "explain":
        return _explain(pipeline, args.address, as_json=args.json, live=args.live)
    if args.command == "snapshots":
        from ldapsync import history

        sys.stdout.write(history.snapshots(pipeline.state, {spec.name: exp.parse for spec, exp in pipeline.exporters}))
        return EXIT_OK
    if args.command == "diff":
        return _diff(pipeline, args.old, args.new)
    if args.command == "rollback":
        with pipeline.state.lock(wait=LOCK_WAIT, role="rollback"):
            result = sync.rollback(pipeline, args.generation)
        print(f"rolled back to {result.generation}; changed: {', '.join(result.changed) or 'nothing'}")
        return EXIT_OK
    if args.command == "approve":
        pipeline.state.ensure()
        with pipeline.state.lock(wait=LOCK_WAIT, role="approve"):
            held = pipeline.state.held()
            if held is None:
                print("no held change")
                return EXIT_OK
            snapshot, meta = held
            result = pipeline.run(force=True, snapshot=snapshot)
        print(f"approved held change ({meta.get('reason')}); changed: {', '.join(result.changed) or 'nothing'}")
        return EXIT_OK
    _preflight(cfg)
    if args.command == "resync":
        args.once = True  # no agent: a one-shot sync always reads the whole directory
    if args.dry_run:
        return _dry_run(pipeline, args.force, stat_only=args.stat)
    if args.once:
        pipeline.state.ensure()
        with pipeline.state.lock(wait=LOCK_WAIT, role="once"):
            if args.quiet:
                # cron: a rejected value is reported once, not by every run until it is fixed
                pipeline.restore_reported(pipeline.state.read_json(REPORTED_FILE).get("problems", []))
            shown = progress.Terminal.for_stderr(cfg.log_format)
            pipeline.progress = shown
            try:  # resumes from the saved sync state; `resync` reads the whole directory
                result = catchup.run_once(pipeline, force=args.force, resume=args.command != "resync")
            finally:
                if isinstance(shown, progress.Terminal):
                    shown.close()
            if args.quiet:
                pipeline.state.write_json(REPORTED_FILE, {"problems": pipeline.reported_keys()})
        if result.status == "held":
            return EXIT_HELD
        if result.status in ("failed", "last-known-good"):
            return EXIT_FAIL
        return EXIT_OK
    from ldapsync import agent

    return agent.run(cfg, force_first=args.force)


def _ask_agent(cfg: config_mod.Config, args: argparse.Namespace) -> int | None:
    """Have the running agent carry out the command; None if no agent listens (act directly)."""
    from ldapsync import control

    request = control.Request(args.command, getattr(args, "generation", None))
    try:
        reply = control.ask(cfg.state_dir, request)
    except control.ControlError as e:
        print(f"ldapsync: {args.command}: {e}", file=sys.stderr)
        return EXIT_FAIL
    if reply is None:
        return None
    if not reply.ok:
        print(f"ldapsync: {args.command}: the agent answered: {reply.message}", file=sys.stderr)
        return EXIT_FAIL
    print(reply.message)
    return EXIT_OK


def _explain(pipeline: object, address: str, *, as_json: bool, live: bool) -> int:
    """Read-only: answers from the installed generation (or the directory), never writes."""
    from ldapsync import explain
    from ldapsync.sync import Pipeline

    assert isinstance(pipeline, Pipeline)
    try:
        installed: dict[str, bytes] | None = None
        if live:
            snapshot = pipeline.read_source()
            origin = f"live {snapshot.source}"
        else:
            gen = pipeline.state.get()
            if gen is None:
                raise explain.ExplainError("nothing installed yet: run `ldapsync --once`, or use --live")
            snapshot = gen.snapshot()
            origin = f"generation {gen.id}"
            installed = {}
            for name in gen.meta.get("hashes", {}):
                try:
                    installed[name] = gen.output(name)
                except (OSError, LdapsyncError):
                    continue  # rendered from the snapshot instead
        answer = explain.explain(
            snapshot,
            address,
            config=pipeline.config,
            static=pipeline.static,
            exporters=pipeline.exporters,
            origin=origin,
            installed=installed,
        )
    except LdapsyncError as e:
        print(f"ldapsync: explain: {e}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(explain.dumps(answer) if as_json else answer.render())
    return EXIT_OK if answer.found else EXIT_FAIL


REPORTED_FILE = "reported.json"


def _files(cfg: config_mod.Config) -> int:
    """Each output's path and its compiled map's, whether or not they exist yet (read-only).

    One path per line for scripts (the package's purge reads it): a path with a newline is
    refused rather than printed as two."""
    from ldapsync import commit

    paths = []
    for i, spec in enumerate(cfg.exporters):
        out = commit.Output(spec.name, spec.path, b"", spec.map_type if spec.map_type != "none" else None, 0)
        for path in (out.path, out.compiled):
            if path is None:
                continue
            if "\n" in str(path):
                raise ConfigError(f"{str(path)!r} holds a newline", file=cfg.path, key=f"exporters[{i}].path")
            paths.append(str(path))
    sys.stdout.write("".join(f"{p}\n" for p in dict.fromkeys(paths)))
    return EXIT_OK


def _diff(pipeline: object, old: str | None, new: str | None) -> int:
    """Read-only, like diff(1): 0 the outputs are the same, 1 they differ, 2 trouble."""
    from ldapsync import history
    from ldapsync.sync import Pipeline

    assert isinstance(pipeline, Pipeline)
    try:
        a, b = history.pick(pipeline.state, old, new)
        diffs = history.diff(a, b, [(spec.name, exp) for spec, exp in pipeline.exporters])
    except (LdapsyncError, OSError) as e:
        print(f"ldapsync: diff: {e}", file=sys.stderr)
        return EXIT_CONFIG
    for text in diffs.values():
        sys.stdout.write(text)
    print(f"ldapsync: diff {a.id} {b.id}: {', '.join(diffs) or 'no differences'}", file=sys.stderr)
    return 1 if diffs else EXIT_OK


def _dry_run(pipeline: object, force: bool, *, stat_only: bool = False) -> int:
    """Plan and print; reads the directory and the state dir, writes nothing."""
    from ldapsync import catchup
    from ldapsync import status as status_mod
    from ldapsync.sync import Pipeline

    assert isinstance(pipeline, Pipeline)
    try:
        with catchup.resuming(pipeline, write=False):  # resumes as --once does, but writes nothing
            result = pipeline.run(dry_run=True, force=force)
    except SourceError as e:
        print(f"ldapsync: cannot read the directory: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StateError as e:
        print(f"ldapsync: {e}", file=sys.stderr)
        return EXIT_CONFIG
    paths = {spec.name: spec.path for spec in pipeline.config.exporters}
    width = max((len(n) for n in result.diffs), default=0)
    for name in result.diffs:  # the summary: keys added, removed and changed, as the guards count them
        counts = result.counts.get(name, "")
        sys.stdout.write(f"{name:<{width}}  {counts}  {paths.get(name, '')}\n")
    if not stat_only:
        for name in result.diffs:
            sys.stdout.write(result.diffs[name])
    if result.held_reason:
        print(f"ldapsync: this change would be HELD: {result.held_reason}", file=sys.stderr)
    else:
        held = status_mod.load(pipeline.config.state_dir).held
        if held:
            print(f"ldapsync: a change is held for review: {held}", file=sys.stderr)
    summary = ", ".join(result.diffs) or "no changes"
    print(f"ldapsync: dry run: {summary}", file=sys.stderr)
    return 1 if result.diffs else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
