"""Prometheus metrics for node_exporter's textfile collector, rendered from the status record.

Everything comes from the one status record (counters and the propagation histogram are
persisted in it), so `--once` from cron accumulates like the agent does, and the textfile
always agrees with `ldapsync status`. Uses only prometheus_client APIs present in 0.16
(Debian 12).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ldapsync.delta import KINDS
from ldapsync.fileio import write_atomic
from ldapsync.status import Status, SyncResult


class _StatusCollector:
    """Exposes one Status record; prometheus_client calls collect() while rendering."""

    def __init__(self, status: Status):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)

        yield from gauge(
            "ldapsync_last_attempt_timestamp_seconds", "Time of the last sync attempt.", s.last_attempt or 0.0
        )
        yield from gauge(
            "ldapsync_last_success_timestamp_seconds",
            "Time of the last sync that ended installed or unchanged.",
            s.last_success or 0.0,
        )
        yield from gauge(
            "ldapsync_last_confirmed_timestamp_seconds",
            "Time the installed outputs were last confirmed to match the directory "
            "(a successful sync, or a connected follower with nothing pending).",
            s.last_confirmed or 0.0,
        )
        yield from gauge(
            "ldapsync_sync_duration_seconds", "Duration of the last sync that got as far as installing.", s.duration
        )
        syncs = CounterMetricFamily("ldapsync_syncs", "Sync attempts by result.", labels=["result"])
        for result in SyncResult:
            if result is not SyncResult.DRY_RUN:
                syncs.add_metric([result.value], float(s.syncs.get(result.value, 0)))
        yield syncs
        yield HistogramMetricFamily(
            "ldapsync_propagation_seconds",
            "Time from the agent receiving a directory change to its installation.",
            buckets=s.propagation.cumulative(),
            sum_value=s.propagation.total,
        )
        yield from gauge("ldapsync_held_changes", "1 while a change is held for review.", 1.0 if s.held else 0.0)
        yield from gauge(
            "ldapsync_rejected_values", "LDAP values rejected by validation in the last sync.", float(s.rejected)
        )
        yield from gauge(
            "ldapsync_weak_password_hashes",
            "Passwd-file lines with an unsalted digest or DES-CRYPT hash (passwords.weak: warn).",
            float(s.weak_passwords),
        )
        yield from gauge(
            "ldapsync_ldap_reachable",
            "1 if the directory answered the last sync or the follower is connected.",
            1.0 if s.ldap_reachable else 0.0,
        )
        if s.follower_connected is not None:
            yield from gauge(
                "ldapsync_follower_connected",
                "1 while the agent's follower is connected to a directory server.",
                1.0 if s.follower_connected else 0.0,
            )
        yield from gauge(
            "ldapsync_reload_pending", "1 while a failed reload hook is owed a retry.", 1.0 if s.reload_pending else 0.0
        )
        yield from gauge(
            "ldapsync_config_rejected",
            "1 while the agent runs its previous configuration because the config file on disk was rejected.",
            1.0 if s.config_error else 0.0,
        )
        if s.ldap_lost is not None:
            yield from gauge(
                "ldapsync_ldap_lost_timestamp_seconds",
                "When the agent's follower lost the directory (present only while it is away).",
                s.ldap_lost,
            )
        entries = GaugeMetricFamily("ldapsync_output_entries", "Lines in each installed output.", labels=["output"])
        info = GaugeMetricFamily(
            "ldapsync_output_info",
            "Always 1; the sha256 label is the installed output's content hash (compare across a fleet).",
            labels=["output", "sha256"],
        )
        for name, o in sorted(s.outputs.items()):
            entries.add_metric([name], float(o.lines))
            info.add_metric([name, o.sha256], 1.0)
        yield entries
        yield info
        keys = CounterMetricFamily(
            "ldapsync_keys_changed",
            "Keys added, removed or changed (kind) in each output, summed over every install.",
            labels=["output", "kind"],
        )
        for name, d in sorted(s.changes_total.items()):
            for kind in KINDS:
                keys.add_metric([name, kind], float(getattr(d, kind)))
        yield keys
        last = GaugeMetricFamily(
            "ldapsync_last_install_keys",
            "Keys added, removed or changed (kind) in each output by the last install that changed something.",
            labels=["output", "kind"],
        )
        for name, d in sorted(s.last_changes.items()):
            for kind in KINDS:
                last.add_metric([name, kind], float(getattr(d, kind)))
        yield last


def render(status: Status) -> bytes:
    """The exposition text of `status`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return bytes(generate_latest(registry))


def write(path: Path | None, status: Status) -> str | None:
    """Write the textfile; return why it could not be written (the caller records it), or None."""
    if path is None:
        return None
    try:
        write_atomic(path, render(status), mode=0o644)
    except OSError as e:
        return f"cannot write metrics textfile {path}: {e.strerror or e}"
    return None
