"""Shared pytest fixtures. The throwaway slapd lives in ldapsync/testing/slapd.py (imported here as `slapd`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ is not a package: make `from slapd import ...` work however pytest is run
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slapd import Slapd, missing_tools


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
