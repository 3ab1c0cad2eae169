"""Operator views: `status`, `snapshots` and the Nagios/Icinga `check` plugin."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ldapsync import config as config_mod
from ldapsync.config import Config
from ldapsync.errors import ConfigError, StateError
from ldapsync.state import LockHolder, State

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def _collect(cfg: Config) -> dict[str, Any]:
    state = State(cfg.state_dir)
    status = state.read_json("status.json")
    held = state.held()
    now = time.time()
    last = status.get("last_success")
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
    return {
        "last_success": last,
        "last_success_age": None if last is None else round(now - last, 3),
        "last_attempt": status.get("last_attempt"),
        "result": status.get("result"),
        "error": status.get("error"),
        "source": status.get("source"),
        "ldap_reachable": status.get("ldap_reachable"),
        "follower_error": status.get("follower_error"),
        "generation": state.current_id(),
        "held": None if held is None else held[1].get("reason"),
        "reload_pending": status.get("reload_pending") or [],
        "rejected": status.get("rejected"),
        "outputs": outputs,
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
    age = info["last_success_age"]
    print(f"agent:          {_agent_line(info['agent'])}")
    print(f"last success:   {'never' if age is None else f'{age:.0f}s ago'} ({info['result'] or 'no attempt yet'})")
    away = f", {info['follower_error']}" if info["follower_error"] and not info["ldap_reachable"] else ""
    print(f"source:         {info['source'] or '-'} (LDAP reachable: {info['ldap_reachable']}{away})")
    print(f"generation:     {info['generation'] or '-'}")
    if info["error"] and info["result"] not in ("installed", "unchanged"):
        print(f"last error:     {info['error']}")
    print(f"held change:    {info['held'] or 'none'}")
    if info["reload_pending"]:
        print(f"reload pending: {', '.join(info['reload_pending'])}")
    for name, o in info["outputs"].items():
        if o.get("missing"):
            print(f"  {name:<24} MISSING {o['path']}")
        else:
            print(f"  {name:<24} {o['entries']:>8} entries  sha256:{o['sha256'][:16]}  {o['path']}")
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


def snapshots(state: State) -> int:
    current = state.current_id()
    gens = state.generations()
    if not gens:
        print("no generations yet")
    for g in gens:
        mark = "*" if g.id == current else " "
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.meta.get("time", 0)))
        lines = g.meta.get("lines", {})
        print(
            f"{mark} {g.id}  {when}  {g.meta.get('source', '?')}  "
            + " ".join(f"{k}={v}" for k, v in sorted(lines.items()))
        )
    return 0


def check(config_path: Path, max_age: float, warn_age: float | None) -> int:
    try:
        cfg = config_mod.load(config_path)
        info = _collect(cfg)
    except (ConfigError, OSError) as e:
        print(f"LDAPSYNC UNKNOWN - {_one_line(str(e))}")
        return UNKNOWN
    warn = warn_age if warn_age is not None else max_age / 2
    age = info["last_success_age"]
    missing = [n for n, o in info["outputs"].items() if o.get("missing")]
    perf = " ".join(
        [f"age={age if age is not None else 0:.0f}s;{warn:.0f};{max_age:.0f}"]
        + [f"{n}={o['entries']}" for n, o in info["outputs"].items() if not o.get("missing")]
    )
    if missing:
        code, text = CRITICAL, f"missing outputs: {', '.join(missing)}"
    elif age is None:
        code, text = CRITICAL, "no successful sync yet"
    elif age > max_age:
        code, text = CRITICAL, f"last success {age:.0f}s ago ({info['error'] or info['result']})"
    elif info["held"]:
        code, text = WARNING, f"change held for review: {info['held']}"
    elif age > warn:
        code, text = WARNING, f"last success {age:.0f}s ago"
    elif info["reload_pending"]:
        code, text = WARNING, f"reload pending for {', '.join(info['reload_pending'])}"
    else:
        code, text = OK, f"last success {age:.0f}s ago, generation {info['generation']}"
    label = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}[code]
    print(f"LDAPSYNC {label} - {_one_line(text)} | {perf}")
    return code


def _one_line(text: str) -> str:
    """Monitoring reads one line, and everything after a '|' as perfdata."""
    return " ".join(text.split()).replace("|", "/")
