"""Operator views: `status`, `snapshots` and the Nagios/Icinga `check` plugin."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldapsync import config as config_mod
from ldapsync import control
from ldapsync import health as health_mod
from ldapsync import status as status_mod
from ldapsync.config import Config, LdapSource
from ldapsync.errors import ConfigError, StateError
from ldapsync.health import CRITICAL, OK, UNKNOWN, WARNING, Health
from ldapsync.state import LockHolder, State

__all__ = ["CRITICAL", "OK", "UNKNOWN", "WARNING", "check", "locate", "status", "status_unloaded"]
DEFAULT_STATE_DIR = Path("/var/lib/ldapsync")  # the unit's StateDirectory= and the documented state_dir
LIVE_TIMEOUT = 0.5  # the agent answers `status` from its control thread at once; a hung one must not hang status


def _collect(
    state_dir: Path,
    exporters: Sequence[tuple[str, Path]] | None,
    *,
    timeout: float = health_mod.DEFAULT_TIMEOUT,
    config_error: str | None = None,
    live: bool = True,
) -> tuple[dict[str, Any], Health]:
    """Read-only: the status record, the installed files, the generation, the running agent.

    exporters None: the config file could not be read, so the installed files are those the
    status record names (their paths are unknown).
    """
    state = State(state_dir)
    record = status_mod.load(state_dir)
    now = time.time()
    outputs: dict[str, dict[str, Any]] = {}
    for name, path in exporters or ():
        try:
            data = path.read_bytes()
            outputs[name] = {
                "path": str(path),
                "entries": data.count(b"\n"),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        except OSError:
            outputs[name] = {"path": str(path), "entries": None, "sha256": None, "missing": True}
    if exporters is None:
        for name, o in record.outputs.items():
            outputs[name] = {"path": None, "entries": o.lines, "sha256": o.sha256}
    agent = _agent(state)
    health = Health(
        at=now,
        record=record,
        ldap_timeout=timeout,
        agent_pid=agent["pid"],
        config_error=config_error,
        generation=state.current_id(),
        missing=tuple(n for n, o in outputs.items() if o.get("missing")),
        # installed files whose content is not what the last successful sync installed (edited by hand)
        modified=tuple(
            sorted(
                name
                for name, o in outputs.items()
                if name in record.outputs and o["sha256"] is not None and o["sha256"] != record.outputs[name].sha256
            )
        ),
    )

    def age(t: float | None) -> float | None:
        return None if t is None else round(now - t, 3)

    down = health.ldap_down_for
    info = {
        "state_dir": str(state_dir),
        "config_error": health.config_problem,
        "last_success": record.last_success,
        "last_success_age": age(record.last_success),
        "last_confirmed": record.last_confirmed,
        "last_confirmed_age": age(record.last_confirmed),
        "last_attempt": record.last_attempt,
        "result": None if record.result is None else record.result.value,
        "error": record.error,
        "source": record.source,
        "ldap_reachable": record.ldap_reachable,
        "ldap_unreachable_for": None if down is None else round(down, 3),
        "follower_connected": record.follower_connected,
        "follower_error": record.follower_error,
        "generation": health.generation,
        "held": record.held,
        "reload_pending": list(record.reload_pending),
        "reload_error": record.reload_error,
        "metrics_error": record.metrics_error,
        "rejected": record.rejected,
        "weak_passwords": record.weak_passwords,
        "syncs": dict(record.syncs),
        # keys added/removed/changed per output by the last install that changed something
        "last_changes": {n: d.to_json() for n, d in sorted(record.last_changes.items())},
        "outputs": outputs,
        "modified": list(health.modified),
        "agent": agent,
        "live": _live(state_dir) if live and agent["running"] else None,  # what the running agent says
    }
    return info, health


def _live(state_dir: Path) -> dict[str, Any] | None:
    """What the running agent says about itself (its STATUS line, what it follows), or None."""
    try:
        reply = control.ask(state_dir, control.Request("status"), timeout=LIVE_TIMEOUT)
    except control.ControlError as e:
        return {"error": str(e)}
    return None if reply is None else dict(reply.data)


def _exporters(cfg: Config) -> list[tuple[str, Path]]:
    return [(spec.name, spec.path) for spec in cfg.exporters]


def _timeout(cfg: Config) -> float:
    return cfg.source.timeout if isinstance(cfg.source, LdapSource) else health_mod.DEFAULT_TIMEOUT


def locate(config_path: Path) -> Path | None:
    """The state_dir when the config file does not load: where the agent started with it says
    its state lives, else the default state_dir for the default config file."""
    recorded = control.read_pointer(config_path)
    if recorded is not None and recorded.is_dir():
        return recorded
    if config_path.absolute() == config_mod.DEFAULT_CONFIG and DEFAULT_STATE_DIR.is_dir():
        return DEFAULT_STATE_DIR
    return None


def _agent(state: State) -> dict[str, Any]:
    """Whether an agent runs on this state_dir (it holds the lock); tested without writing."""
    try:
        holder: LockHolder | None = state.lock_holder()
    except StateError as e:
        return {"running": None, "pid": None, "lock": None, "error": str(e)}
    running = holder is not None and holder.role == "agent"
    lock = None if holder is None else {"pid": holder.pid, "role": holder.role}
    return {"running": running, "pid": holder.pid if running and holder else None, "lock": lock}


def status(cfg: Config, *, as_json: bool) -> int:
    info, _ = _collect(cfg.state_dir, _exporters(cfg), timeout=_timeout(cfg))
    return _print_status(info, as_json=as_json)


def status_unloaded(config_path: Path, error: ConfigError, *, as_json: bool) -> int:
    """`status` while the config file does not load: say so first, then what the agent does.

    Exit 2 (a configuration error) either way; the state is shown when it can be found.
    """
    state_dir = locate(config_path)
    info = None
    if state_dir is not None:
        info, _ = _collect(state_dir, None, config_error=str(error))
    if as_json:
        print(json.dumps({"config_error": str(error), "state": info}, indent=2, sort_keys=True))
        return 2
    print(f"config:         REJECTED: {_one_line(str(error))}")
    print("                (a running agent keeps its previous configuration; a restart would fail)")
    if info is None:
        print(f"state:          unknown (no agent recorded where its state lives for {config_path})")
        return 2
    print(f"state dir:      {state_dir}")
    _print_status(info, as_json=False)
    return 2


def _print_status(info: dict[str, Any], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0

    def ago(key: str) -> str:
        value = info[key]
        return "never" if value is None else f"{value:.0f}s ago"

    attempt = info["last_attempt"]
    when = "" if attempt is None else f", {time.time() - attempt:.0f}s ago"
    print(f"agent:          {_agent_line(info['agent'])}")
    live = info["live"] or {}
    if live.get("status_line"):
        print(f"agent status:   {live['status_line']}")
    if info["config_error"]:
        print(f"config error:   {_one_line(info['config_error'])}")
    print(f"last attempt:   {info['result'] or 'no attempt yet'}{when}")
    print(f"last success:   {ago('last_success_age')}")
    print(f"confirmed:      {ago('last_confirmed_age')} (installed outputs last known to match the directory)")
    reachable = {True: "yes", False: "NO", None: "unknown"}[info["ldap_reachable"]]
    away = info["ldap_unreachable_for"]
    reachable += "" if away is None else f", for {away:.0f}s"
    print(f"source:         {info['source'] or '-'} (LDAP reachable: {reachable})")
    if info["follower_connected"] is False:
        print(f"follower:       disconnected ({info['follower_error'] or 'no error recorded'})")
    print(f"generation:     {info['generation'] or '-'}")
    if info["last_changes"]:
        changes = ", ".join(
            f"{n} +{d['added']} -{d['removed']} ~{d['changed']}" for n, d in info["last_changes"].items()
        )
        print(f"last install:   {changes} (keys)")
    if info["error"]:
        print(f"last error:     {info['error']}")
    print(f"held change:    {info['held'] or 'none'}")
    rejected = info["rejected"]
    print(f"rejected:       {'-' if rejected is None else rejected}" + (" (see the log)" if rejected else ""))
    if info["weak_passwords"]:
        print(f"weak hashes:    {info['weak_passwords']} (unsalted digest or DES-CRYPT; see the log)")
    if info["reload_pending"]:
        print(f"reload pending: {', '.join(info['reload_pending'])} ({info['reload_error'] or 'not yet run'})")
    if info["metrics_error"]:
        print(f"metrics:        {info['metrics_error']}")
    for name, o in info["outputs"].items():
        if o.get("missing"):
            print(f"  {name:<24} MISSING {o['path']}")
        else:
            mark = "  MODIFIED since installed" if name in info["modified"] else ""
            print(f"  {name:<24} {o['entries']:>8} entries  sha256:{o['sha256'][:16]}  {o['path'] or ''}{mark}")
    return 0


def _agent_line(agent: dict[str, Any]) -> str:
    if agent["running"]:
        return f"running (PID {agent['pid']})"
    if agent["running"] is None:
        return f"unknown ({agent['error']})"
    lock = agent["lock"]
    if lock is not None:
        return f"not running; ldapsync {lock['role'] or ''} (PID {lock['pid']}) holds the state lock"
    return "not running"


def check(config_path: Path, max_age: float, warn_age: float | None) -> int:
    """Nagios/Icinga plugin; ages are measured from the last confirmation, not the last install.

    A config file that does not load is reported with the running agent's state when that
    can be found (WARNING at least: the next restart would fail), else UNKNOWN.
    """
    try:
        try:
            cfg = config_mod.load(config_path)
        except ConfigError as e:
            state_dir = locate(config_path)
            if state_dir is None:
                raise
            info, health = _collect(state_dir, None, config_error=str(e), live=False)
        else:
            info, health = _collect(cfg.state_dir, _exporters(cfg), timeout=_timeout(cfg), live=False)
    except (ConfigError, OSError) as e:
        print(f"LDAPSYNC UNKNOWN - {_one_line(str(e))}")
        return UNKNOWN
    warn = warn_age if warn_age is not None else max_age / 2
    age = health.confirmed_age
    perf = " ".join(
        [f"age={age if age is not None else 0:.0f}s;{warn:.0f};{max_age:.0f}"]
        + [f"{n}={o['entries']}" for n, o in info["outputs"].items() if not o.get("missing")]
    )
    verdict = health.verdict(max_age, warn_age)
    print(f"LDAPSYNC {verdict.label} - {_one_line(verdict.text)} | {perf}")
    return verdict.code


def _one_line(text: str) -> str:
    """Monitoring reads one line, and everything after a '|' as perfdata."""
    return " ".join(text.split()).replace("|", "/")
