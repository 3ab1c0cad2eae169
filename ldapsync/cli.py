"""Command line: parse, load config, wire, run. Exit codes are documented in docs/cli.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from ldapsync import __version__
from ldapsync import config as config_mod
from ldapsync import log as log_mod
from ldapsync.errors import ConfigError, HeldError, LdapsyncError, SourceError, StateError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_HELD = 0, 1, 2, 4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldapsync",
        description="Follow LDAP and atomically install Postfix maps and a Dovecot passwd-file.",
    )
    p.add_argument(
        "-c", "--config", type=Path, default=config_mod.DEFAULT_CONFIG, help="config file (default %(default)s)"
    )
    p.add_argument("--version", action="version", version=f"ldapsync {__version__}")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="sync once and exit (0 ok, 1 failed, 2 config error, 4 held)")
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="print the diff that would be installed (exit 0 none, 1 changes, 2 error)",
    )
    p.add_argument(
        "--force", action="store_true", help="install even if a safety guard would hold the change (one run)"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("snapshots", help="list generations (last-known-good snapshots)")
    rb = sub.add_parser("rollback", help="reinstall a generation through the normal commit path")
    rb.add_argument("generation", nargs="?", help="generation id (default: the one before the current)")
    sub.add_parser("approve", help="install the change a safety guard held")
    st = sub.add_parser("status", help="last sync, source, held changes, outputs and their hashes")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ck = sub.add_parser("check", help="Nagios/Icinga plugin: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    ck.add_argument(
        "--max-age", type=float, required=True, metavar="SECONDS", help="CRITICAL if the last success is older"
    )
    ck.add_argument("--warn-age", type=float, metavar="SECONDS", help="WARNING if older (default: half of --max-age)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "check":
        from ldapsync import report

        return report.check(args.config, args.max_age, args.warn_age)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as e:
        log_mod.configure()
        structlog.get_logger("ldapsync").error("configuration error", error=str(e))
        return EXIT_CONFIG
    log_mod.configure(cfg.log_format, cfg.log_level)
    log = structlog.get_logger("ldapsync")
    try:
        return _dispatch(args, cfg)
    except ConfigError as e:
        log.error("configuration error", error=str(e))
        return EXIT_CONFIG
    except HeldError as e:
        log.error("held", reason=str(e))
        return EXIT_HELD
    except (LdapsyncError, OSError) as e:
        log.error("failed", error=str(e))
        return EXIT_CONFIG if args.dry_run else EXIT_FAIL


def _dispatch(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from ldapsync import report, sync

    if args.command == "status":
        return report.status(cfg, as_json=args.json)
    pipeline = sync.Pipeline(cfg)
    if args.command == "snapshots":
        return report.snapshots(pipeline.state)
    if args.command == "rollback":
        with pipeline.state.lock():
            result = sync.rollback(pipeline, args.generation)
        print(f"rolled back to {result.generation}; changed: {', '.join(result.changed) or 'nothing'}")
        return EXIT_OK
    if args.command == "approve":
        pipeline.state.ensure()
        with pipeline.state.lock():
            held = pipeline.state.held()
            if held is None:
                print("no held change")
                return EXIT_OK
            snapshot, meta = held
            result = pipeline.run(force=True, snapshot=snapshot)
        print(f"approved held change ({meta.get('reason')}); changed: {', '.join(result.changed) or 'nothing'}")
        return EXIT_OK
    if args.dry_run:
        return _dry_run(pipeline, args.force)
    if args.once:
        pipeline.state.ensure()
        with pipeline.state.lock():
            result = pipeline.run(force=args.force)
        if result.status == "held":
            return EXIT_HELD
        if result.status in ("failed", "last-known-good"):
            return EXIT_FAIL
        return EXIT_OK
    from ldapsync import agent

    return agent.run(cfg, force_first=args.force)


def _dry_run(pipeline: object, force: bool) -> int:
    """Plan and print; reads the directory and the state dir, writes nothing."""
    from ldapsync import status as status_mod
    from ldapsync.sync import Pipeline

    assert isinstance(pipeline, Pipeline)
    try:
        result = pipeline.run(dry_run=True, force=force)
    except SourceError as e:
        print(f"ldapsync: cannot read the directory: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StateError as e:
        print(f"ldapsync: {e}", file=sys.stderr)
        return EXIT_CONFIG
    for name in result.diffs:
        sys.stdout.write(result.diffs[name])
    if result.held_reason:
        print(f"ldapsync: this change would be HELD: {result.held_reason}", file=sys.stderr)
    else:
        held = status_mod.load(pipeline.config.state_dir).held
        if held:
            print(f"ldapsync: a change is held for review: {held}", file=sys.stderr)
    summary = ", ".join(f"{n} {result.counts[n]}" if n in result.counts else n for n in result.diffs) or "no changes"
    print(f"ldapsync: dry run: {summary}", file=sys.stderr)
    return 1 if result.diffs else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
