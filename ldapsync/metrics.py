"""Prometheus metrics for node_exporter's textfile collector, written atomically."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ldapsync.fileio import write_atomic

if TYPE_CHECKING:
    from ldapsync.config import Config
    from ldapsync.state import State


def render(status: dict[str, object], held: bool) -> str:
    def num(key: str) -> float:
        value = status.get(key)
        return float(value) if isinstance(value, int | float) else 0.0

    lines = [
        "# HELP ldapsync_last_success_timestamp_seconds Time of the last successful sync.",
        "# TYPE ldapsync_last_success_timestamp_seconds gauge",
        f"ldapsync_last_success_timestamp_seconds {num('last_success'):.3f}",
        "# HELP ldapsync_last_attempt_timestamp_seconds Time of the last sync attempt.",
        "# TYPE ldapsync_last_attempt_timestamp_seconds gauge",
        f"ldapsync_last_attempt_timestamp_seconds {num('last_attempt'):.3f}",
        "# HELP ldapsync_sync_duration_seconds Duration of the last successful sync.",
        "# TYPE ldapsync_sync_duration_seconds gauge",
        f"ldapsync_sync_duration_seconds {num('duration'):.6f}",
        "# HELP ldapsync_held_changes 1 while a change is held for review.",
        "# TYPE ldapsync_held_changes gauge",
        f"ldapsync_held_changes {1 if held else 0}",
        "# HELP ldapsync_rejected_values LDAP values rejected by validation in the last sync.",
        "# TYPE ldapsync_rejected_values gauge",
        f"ldapsync_rejected_values {num('rejected'):.0f}",
        "# HELP ldapsync_ldap_reachable 1 if the last attempt could read the directory.",
        "# TYPE ldapsync_ldap_reachable gauge",
        f"ldapsync_ldap_reachable {1 if status.get('ldap_reachable', False) else 0}",
        "# HELP ldapsync_output_entries Lines in each installed output.",
        "# TYPE ldapsync_output_entries gauge",
    ]
    counts = status.get("counts")
    if isinstance(counts, dict):
        for name, n in sorted(counts.items()):
            lines.append(f'ldapsync_output_entries{{output="{_label(name)}"}} {n}')
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write(config: Config, state: State) -> None:
    if config.metrics_textfile is None:
        return
    status = state.read_json("status.json")
    status.setdefault("last_attempt", time.time())
    text = render(status, held=state.held() is not None)
    write_atomic(config.metrics_textfile, text.encode(), mode=0o644)
