"""Hypothesis profiles for this suite, and each property test's example budget relative to them.

- ``ldapsync`` (every run, CI too): 100 examples where a test names no budget, and no deadline:
  a per-example time limit only measures how busy the machine is (speed is measured in bench/).
- ``thorough``: ten times every budget, for a long local or nightly run:
  ``HYPOTHESIS_PROFILE=thorough .venv/bin/python -m pytest`` (or ``--hypothesis-profile=thorough``).

A test states its budget as ``@settings(max_examples=examples(N))``: N examples in the everyday
profile, scaled with the profile, so the expensive ones stay affordable on every run without
being cut for the thorough one.
"""

from __future__ import annotations

import os

from hypothesis import settings

BASE = 100
# parent: whatever Hypothesis chose (on CI its own `ci` profile: derandomized, no database)
settings.register_profile("ldapsync", parent=settings(), max_examples=BASE, deadline=None)
settings.register_profile("thorough", parent=settings(), max_examples=10 * BASE, deadline=None)


def load() -> None:
    """Load $HYPOTHESIS_PROFILE (default ``ldapsync``); pytest's --hypothesis-profile wins over it."""
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ldapsync"))


def examples(n: int) -> int:
    """``n`` examples in the everyday profile, scaled like the loaded profile's budget."""
    return max(1, n * settings().max_examples // BASE)
