"""Shared pytest fixtures. The throwaway slapd lives in ldapsync/testing/slapd.py (imported here as `slapd`)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ is not a package: make `from slapd import ...` work however pytest is run
sys.path.insert(0, str(Path(__file__).resolve().parent))

import debpackages
import profiles
from agentutil import Ds389, ds389_missing
from slapd import BASE_LDIF, SERVICE_DN, Slapd, generate_users_ldif, missing_tools

from ldapsync.testing import ports

profiles.load()

# Set to run the tests on a machine without the Debian packages of .ci/packages: the tests
# that need a missing program are then skipped instead of the session stopping.
WITHOUT_PACKAGES_ENV = "LDAPSYNC_TESTS_WITHOUT_PACKAGES"
_registry: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """One port registry for the session: pytest-xdist workers (started after this, with this
    environment) and what they start never get the same port (ldapsync.testing.ports)."""
    global _registry
    if not hasattr(config, "workerinput") and ports.REGISTRY_ENV not in os.environ:
        _registry = tempfile.mkdtemp(prefix="ldapsync-ports-")
        os.environ[ports.REGISTRY_ENV] = _registry


def pytest_unconfigure(config: pytest.Config) -> None:
    if _registry is not None:
        shutil.rmtree(_registry, ignore_errors=True)
        os.environ.pop(ports.REGISTRY_ENV, None)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Every program the tests run is installed, from a package .ci/packages lists (the test
    command installs that list): otherwise stop now, naming the package, rather than skip."""
    if hasattr(session.config, "workerinput") or os.environ.get(WITHOUT_PACKAGES_ENV):  # an xdist worker
        return
    found = debpackages.problems()
    if found:
        raise pytest.UsageError(
            "the tests need Debian packages that are missing or not listed in .ci/packages:\n  "
            + "\n  ".join(found)
            + f"\n(.ci/test installs them; {WITHOUT_PACKAGES_ENV}=1 runs without them, skipping what needs them)"
        )


# What .ci/smoke-test also runs, with Debian's /usr/bin/python3 against the installed package:
# the tests that lean on a library Debian ships at another version than pip does (pyasn1 0.4.8,
# structlog 22.3, passlib 1.7.4, watchdog 2.2, sdnotify, prometheus-client 0.16, PyYAML), on the
# installed layout (entry points, the unit), or on the real tools through it; a few of each, to
# stay fast. A file maps to None (all of it) or to test function names (every parameter of
# each). A name that is no longer in its file fails collection: a rename never drops it silently.
SMOKE: dict[str, frozenset[str] | None] = {
    "test_validate.py": None,  # passlib 1.7.4; every hash scheme verified by a real Dovecot
    "test_config.py": None,  # PyYAML
    "test_static.py": None,  # PyYAML
    "test_log.py": None,  # structlog 22.3's renderers and the syslog prefix
    "test_ber.py": None,  # the BER reader against slapd's own answers
    "test_syncrepl.py": None,  # RFC 4533 controls through pyasn1 0.4.8
    "test_syncwire.py": None,  # the syncrepl stream decoder against ldap3's and pyasn1's
    "test_psearch.py": None,  # ldap3's persistent-search message shapes
    "test_model.py": None,  # routing and rendering on Debian's Python
    "test_ldifsource.py": None,
    "test_exporters.py": None,  # entry points from the dpkg-installed dist-info; postmap, doveadm
    "test_systemd.py": None,  # the unit
    "test_ldapsource.py": frozenset(  # ldap3 + pyasn1 against a real slapd
        {
            "test_full_read_matches_the_ldif_it_was_loaded_from",
            "test_paged_read_of_600_users_with_limits_lifted",
            "test_size_limit_fails_loudly_and_keeps_previous_outputs",
            "test_search_requests_only_the_needed_attributes",
            "test_wrong_bind_password_is_a_clear_error",
        }
    ),
    "test_watch.py": frozenset({"test_first_uri_answering_http_is_skipped"}),  # the syncrepl stream
    "test_agent.py": frozenset(
        {
            "test_config_and_static_edits",  # watchdog 2.2 sees the edits
            "test_sd_notify_ready_after_maps_watchdog_and_status",  # sdnotify
            "test_restart_resumes_from_persisted_cookie",  # the store on python3-lmdb
        }
    ),
    "test_agent_loop.py": frozenset(  # the control socket and sd_notify on the installed package
        {"test_a_held_change_is_approved_while_the_agent_runs_within_a_second"}
    ),
    "test_metrics.py": frozenset(  # prometheus-client 0.16
        {"test_metrics_textfile_after_a_sync", "test_dashboard_and_rules_read_only_metrics_we_export"}
    ),
    "test_manpage.py": None,  # Debian's groff and man render the pages without a warning
    "test_stored.py": None,  # the store on python3-lmdb 1.4.0
    "test_cli.py": frozenset(
        {
            "test_version",
            "test_once_installs_every_output",
            "test_every_subcommand_has_help_text",
            "test_dry_run_diffs_changes_and_writes_nothing",
        }
    ),
    "test_commit.py": frozenset(
        {"test_compiled_map_answers_postmap_q", "test_failure_before_rename_leaves_every_installed_file"}
    ),
    "test_state.py": frozenset(
        {"test_generation_files_are_private_and_complete", "test_damaged_generations_are_detected"}
    ),
    "test_sync.py": frozenset(
        {"test_state_dir_is_0700_and_its_files_0600", "test_ldap_down_restores_missing_outputs_from_last_known_good"}
    ),
    "test_report.py": frozenset({"test_status_json_describes_the_installed_state"}),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the SMOKE tests `smoke`; a listed name its file no longer has is a usage error."""
    checked: set[str] = set()
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        names = SMOKE.get(item.path.name, frozenset())
        if names is None or item.originalname in names:
            item.add_marker(pytest.mark.smoke)
        if names and item.path.name not in checked:
            checked.add(item.path.name)
            missing = sorted(n for n in names if not hasattr(item.module, n))
            if missing:
                raise pytest.UsageError(f"tests/conftest.py SMOKE lists {missing} in {item.path.name}: not there")


def _require_slapd() -> None:
    reason = missing_tools()
    if reason is not None:
        print(reason)
        pytest.skip(reason)


@pytest.fixture
def slapd_factory(tmp_path: Path) -> Iterator[Callable[..., Slapd]]:
    """Callable(**Slapd kwargs) -> started Slapd in its own dir under tmp_path.

    Every instance is stopped at teardown.
    """
    _require_slapd()
    instances: list[Slapd] = []

    def make(**kwargs: Any) -> Slapd:
        server = Slapd(tmp_path / f"slapd{len(instances)}", **kwargs)
        instances.append(server)
        server.start()
        return server

    yield make
    for server in instances:
        server.close()


@pytest.fixture
def slapd(slapd_factory: Callable[..., Slapd]) -> Slapd:
    """Started slapd: base+demo+hostile data, syncprov on, service account unlimited."""
    return slapd_factory()


@pytest.fixture(scope="module")
def read_only_slapd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Slapd]]:
    """slapd_factory for the tests of a module that only read: each set of arguments is one
    server, started once and shared by the module's tests.

    A test that changes data or configuration, or stops the server, must have its own (from
    slapd_factory): at the module's end every shared server must still run unchanged.
    """
    _require_slapd()
    shared: dict[str, tuple[Slapd, bytes]] = {}

    def get(**kwargs: Any) -> Slapd:
        key = repr(sorted(kwargs.items()))
        if key not in shared:
            server = Slapd(tmp_path_factory.mktemp("slapd"), **kwargs)
            server.start()
            shared[key] = (server, server.fingerprint())
        return shared[key][0]

    yield get
    try:
        for server, before in shared.values():
            assert server.running, f"a test stopped the shared {server}: it needs its own (slapd_factory)"
            assert server.fingerprint() == before, f"a test changed the shared {server}: it needs its own"
    finally:
        for server, _ in shared.values():
            server.close()


@pytest.fixture
def ds389() -> Iterator[Ds389]:
    """Started 389-ds (persistent search, no syncrepl): base data, the service account may read
    everything, six generated users."""
    reason = ds389_missing()
    if reason is not None:
        print(reason)
        pytest.skip(reason)
    server = Ds389()
    try:
        server.start()
        records = [r for r in BASE_LDIF.read_text().split("\n\n") if "dn:" in r and "dn: dc=example,dc=org" not in r]
        server.modify("\n\n".join(records), add=True)
        server.modify(
            "dn: dc=example,dc=org\nchangetype: modify\nadd: aci\n"
            'aci: (targetattr="*")(version 3.0; acl "ldapsync reads everything"; allow (read, search, compare)'
            f' userdn="ldap:///{SERVICE_DN}";)\n'
        )
        server.modify(generate_users_ldif(6), add=True)
        yield server
    finally:
        server.close()
