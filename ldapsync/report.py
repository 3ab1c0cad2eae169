"""Operator views: `status`, `snapshots` and the Nagios/Icinga `check` plugin."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ldapsync import config as config_mod
from ldapsync import status as status_mod
from ldapsync.config import Config
from ldapsync.errors import ConfigError, StateError
from ldapsync.state import LockHolder, State
from ldapsync.status import SyncResult

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def _collect(cfg: Config) -> dict[str, Any]:
    """Read-only: the status record, the installed files and the current generation id."""
    state = State(cfg.state_dir)
    record = status_mod.load(cfg.state_dir)
    now = time.time()
    outputs = {}
    for spec in cfg.exporters:
        try:
            data = spec.path.read_bytes()
            outputs[spec.name] = {
                "path": str(spec.path),
                "entries": data.count(b"\n"),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        except OSError:
            outputs[spec.name] = {"path": str(spec.path), "entries": None, "sha256": None, "missing": True}

    def age(t: float | None) -> float | None:
        return None if t is None else round(now - t, 3)

    return {
        "last_success": record.last_success,
        "last_success_age": age(record.last_success),
        "last_confirmed": record.last_confirmed,
        "last_confirmed_age": age(record.last_confirmed),
        "last_attempt": record.last_attempt,
        "result": None if record.result is None else record.result.value,
        "error": record.error,
        "source": record.source,
        "ldap_reachable": record.ldap_reachable,
        "follower_connected": record.follower_connected,
        "follower_error": record.follower_error,
        "generation": state.current_id(),
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
        # installed files whose content is not what the last successful sync installed (edited by hand)
        "modified": sorted(
            name
            for name, o in outputs.items()
            if name in record.outputs and o["sha256"] is not None and o["sha256"] != record.outputs[name].sha256
        ),
        "agent": _agent(state),
    }


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
    info = _collect(cfg)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0

    def ago(key: str) -> str:
        value = info[key]
        return "never" if value is None else f"{value:.0f}s ago"

    attempt = info["last_attempt"]
    when = "" if attempt is None else f", {time.time() - attempt:.0f}s ago"
    print(f"agent:          {_agent_line(info['agent'])}")
    print(f"last attempt:   {info['result'] or 'no attempt yet'}{when}")
    print(f"last success:   {ago('last_success_age')}")
    print(f"confirmed:      {ago('last_confirmed_age')} (installed outputs last known to match the directory)")
    reachable = {True: "yes", False: "NO", None: "unknown"}[info["ldap_reachable"]]
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
            print(f"  {name:<24} {o['entries']:>8} entries  sha256:{o['sha256'][:16]}  {o['path']}{mark}")
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
    """Nagios/Icinga plugin; ages are measured from the last confirmation, not the last install."""
    try:
        cfg = config_mod.load(config_path)
        info = _collect(cfg)
    except (ConfigError, OSError) as e:
        print(f"LDAPSYNC UNKNOWN - {_one_line(str(e))}")
        return UNKNOWN
    warn = warn_age if warn_age is not None else max_age / 2
    age = info["last_confirmed_age"]
    missing = [n for n, o in info["outputs"].items() if o.get("missing")]
    perf = " ".join(
        [f"age={age if age is not None else 0:.0f}s;{warn:.0f};{max_age:.0f}"]
        + [f"{n}={o['entries']}" for n, o in info["outputs"].items() if not o.get("missing")]
    )
    failed = info["result"] in (SyncResult.FAILED, SyncResult.LAST_KNOWN_GOOD)
    if missing:
        code, text = CRITICAL, f"missing outputs: {', '.join(missing)}"
    elif age is None:
        code, text = CRITICAL, "installed outputs never confirmed by a successful sync"
    elif age > max_age:
        code, text = CRITICAL, f"installed outputs last confirmed {age:.0f}s ago ({info['error'] or info['result']})"
    elif info["held"]:
        code, text = WARNING, f"change held for review: {info['held']}"
    elif failed:
        code, text = WARNING, f"last sync failed: {info['error'] or info['result']}"
    elif info["modified"]:
        code, text = WARNING, f"changed outside ldapsync since installed: {', '.join(info['modified'])}"
    elif age > warn:
        code, text = WARNING, f"installed outputs last confirmed {age:.0f}s ago"
    elif info["reload_pending"]:
        code, text = WARNING, f"reload pending for {', '.join(info['reload_pending'])}"
    elif info["metrics_error"]:
        code, text = WARNING, info["metrics_error"]
    else:
        code, text = OK, f"confirmed {age:.0f}s ago, generation {info['generation']}"
    label = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}[code]
    print(f"LDAPSYNC {label} - {_one_line(text)} | {perf}")
    return code


def _one_line(text: str) -> str:
    """Monitoring reads one line, and everything after a '|' as perfdata."""
    return " ".join(text.split()).replace("|", "/")
