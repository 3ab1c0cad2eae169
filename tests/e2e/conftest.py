"""Fixtures for the end-to-end tests: a throwaway slapd feeding a whole mail stack.

tests/e2e is deliberately not a package; pytest puts this directory on sys.path, and the
parent conftest puts tests/ there (for `slapd`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from mailstack import MailStack, make_workdir, missing
from slapd import Slapd, missing_tools


def require_mail_stack() -> None:
    """Skip, with the reason printed, when a real component is unavailable here."""
    reason = missing_tools() or missing()
    if reason is not None:
        print(f"SKIP e2e: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def ldap_server() -> Iterator[Slapd]:
    """One slapd per module (base+demo+hostile data, syncprov, service account unlimited)."""
    require_mail_stack()
    workdir = make_workdir("ldapsync-e2e-ldap-")
    server = Slapd(workdir)
    server.start()
    yield server
    server.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(ldap_server: Slapd) -> Iterator[MailStack]:
    """MX, SRS and submission Postfix + Dovecot, maps installed by `ldapsync --once`."""
    workdir = make_workdir("ldapsync-e2e-")
    mail = MailStack(workdir, ldap_server.uri, ldap_server.service_password_file)
    try:
        mail.sync_all()
        mail.start()
    except BaseException:
        mail.stop()
        raise
    yield mail
    mail.stop()
    shutil.rmtree(workdir, ignore_errors=True)
