"""Command line: parse, load config, wire, run. Exit codes are documented in docs/cli.md."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from ldapsync import __version__
from ldapsync import config as config_mod
from ldapsync import log as log_mod
from ldapsync.errors import ConfigError, LdapsyncError, SourceError, StateError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_HELD = 0, 1, 2, 4
LOCK_WAIT = 5.0  # seconds a one-shot command waits for another one; then it names the holder's PID


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
    ex = sub.add_parser(
        "explain", help="where an address goes in every output, and why (0 present, 1 absent, 2 cannot tell)"
    )
    ex.add_argument("address", help="an address, or a bare login (login@domain)")
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.add_argument("--live", action="store_true", help="read the directory instead of the installed generation")
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
    except (LdapsyncError, OSError) as e:
        log.error("failed", error=str(e))
        return EXIT_CONFIG if args.dry_run else EXIT_FAIL


def _dispatch(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from ldapsync import report, sync

    if args.command == "status":
        return report.status(cfg, as_json=args.json)
    pipeline = sync.Pipeline(cfg)
    if args.command == "explain":
        return _explain(pipeline, args.address, as_json=args.json, live=args.live)
    if args.command == "snapshots":
        return report.snapshots(pipeline.state)
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
    if args.dry_run:
        return _dry_run(pipeline, args.force)
    if args.once:
        pipeline.state.ensure()
        with pipeline.state.lock(wait=LOCK_WAIT, role="once"):
            result = pipeline.run(force=args.force)
        if result.status == "held":
            return EXIT_HELD
        if result.status in ("failed", "last-known-good"):
            return EXIT_FAIL
        return EXIT_OK
    from ldapsync import agent

    return agent.run(cfg, force_first=args.force)


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


def _dry_run(pipeline: object, force: bool) -> int:
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
    held = pipeline.state.held()
    if result.held_reason:
        print(f"ldapsync: this change would be HELD: {result.held_reason}", file=sys.stderr)
    elif held is not None:
        print(
            f"ldapsync: a change is held since {time.ctime(held[1].get('time', 0))}: {held[1].get('reason')}",
            file=sys.stderr,
        )
    summary = ", ".join(f"{n}" for n in result.diffs) or "no changes"
    print(f"ldapsync: dry run: {summary}", file=sys.stderr)
    return 1 if result.diffs else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
