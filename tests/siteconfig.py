"""A throwaway site config over an LDIF source, shared by the CLI, commit and crash tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO_LDIF = REPO / "fixtures" / "ldif" / "demo.ldif"


def write_config(directory: Path, *, exporters: list[dict[str, Any]], ldif: Path = DEMO_LDIF, **top: Any) -> Path:
    """ldapsync.yaml in `directory` (state under it) reading `ldif`; `top` adds/overrides keys."""
    doc: dict[str, Any] = {
        "domain": "example.org",
        "domain_aliases": ["example.net"],
        "source": {"ldif": {"path": str(ldif), "base_dn": "ou=users,dc=example,dc=org"}},
        "state_dir": "state",
        "exporters": exporters,
        **top,
    }
    path = directory / "ldapsync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
