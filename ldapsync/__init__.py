"""ldapsync: follow LDAP, atomically install mail routing maps, keep last-known-good."""

__version__ = "0.1.0"
