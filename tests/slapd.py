"""Tests import the throwaway slapd from here; it lives in ldapsync.testing.slapd so bench/ can use it too."""

from ldapsync.testing.slapd import *  # noqa: F403
from ldapsync.testing.slapd import _free_port  # noqa: F401
