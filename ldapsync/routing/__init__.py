"""The routing model: who exists, where each address goes, who may send as what.

A pure function of (directory snapshot, static YAML, Settings, day), built in phases
(routing/build.py) and kept up to date change by change (routing/incremental.py).
Exporters only render the RoutingModel.
"""

from ldapsync.routing.build import build
from ldapsync.routing.decisions import Decisions
from ldapsync.routing.entry import EntryCache, Names, Parsed, dn_key, entry_names, entry_parser, group_address
from ldapsync.routing.incremental import ADDRESS_TABLES, LOGIN_TABLES, Engine
from ldapsync.routing.types import (
    DEFAULT_DISABLED_MESSAGE,
    GROUP_CLASSES,
    BuildReport,
    Event,
    GroupSettings,
    Mailbox,
    MailboxSettings,
    ModelChange,
    RoutingModel,
    Rule,
    Settings,
    Trace,
)

__all__ = [
    "ADDRESS_TABLES",
    "DEFAULT_DISABLED_MESSAGE",
    "GROUP_CLASSES",
    "LOGIN_TABLES",
    "BuildReport",
    "Decisions",
    "Engine",
    "EntryCache",
    "Event",
    "GroupSettings",
    "Mailbox",
    "MailboxSettings",
    "ModelChange",
    "Names",
    "Parsed",
    "RoutingModel",
    "Rule",
    "Settings",
    "Trace",
    "build",
    "dn_key",
    "entry_names",
    "entry_parser",
    "group_address",
]
