"""`ldapsync snapshots` says what each generation changed; `ldapsync diff` shows it, redacted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_sync import DEMO_LDIF, EXPORTERS, Site

from ldapsync import history
from ldapsync.delta import Delta
from ldapsync.exporters.dovecot import PasswdExporter

ALICE_HASH = (
    "$6$Mwbjj2JAVj1UcS5G$nyzXjxh.GlSMV59F5eiRXhZdNputRFpfSv8PpCyTF5Bl5jVMAOeRlJzp8PZW7XF4SsWhilFZqYVvsmQ6BSpFu1"
)
NEW_HASH = "{SSHA}UwuA0zzhm0/aklOjCeHV2xdy/5fKTQPBR+7ulQ=="


def three_generations(site: Site) -> list[str]:
    """The demo; then bob's forward changed; then alice's password changed. Ids, oldest first."""
    ids = []
    demo = DEMO_LDIF.read_text()
    for text in (
        demo,
        demo.replace("bob@elsewhere.example", "bob@new.example"),
        demo.replace("bob@elsewhere.example", "bob@new.example").replace(ALICE_HASH, NEW_HASH),
    ):
        site.ldif.write_text(text)
        site.run("--once", check=0)
        ids.append(site.state.current_id())
    assert len(set(ids)) == 3
    return [str(i) for i in ids]


def alice_line(site: Site, gid: str) -> str:
    gen = site.state.get(gid)
    assert gen is not None
    return next(line for line in gen.output("dovecot-passwd").decode().splitlines() if line.startswith("alice:"))


def listing(site: Site) -> dict[str, str]:
    """`snapshots` output: generation id -> the rest of its line after the source."""
    out = {}
    for line in site.run("snapshots", check=0).stdout.splitlines():
        gid = line[2:].split()[0]
        out[gid] = line
    return out


def test_snapshots_show_keys_added_removed_changed_per_output(tmp_path: Path) -> None:
    site = Site(tmp_path)
    first, second, third = three_generations(site)
    rows = listing(site)
    assert list(rows) == [third, second, first]
    assert rows[third].startswith("* ") and rows[third].endswith("  dovecot-passwd +0 -0 ~1")
    assert rows[second].endswith("  alias +0 -0 ~1"), rows[second]
    assert re.search(r"alias \+\d+ -0 ~0, postfix-recipients \+\d+ -0 ~0", rows[first]), rows[first]
    assert "dovecot-passwd +" in rows[first]


def test_generations_without_a_recorded_delta_are_compared_with_the_one_before(tmp_path: Path) -> None:
    """Generations recorded by earlier versions have no `delta` in meta.json."""
    site = Site(tmp_path)
    first, second, third = three_generations(site)
    for gid in (first, second, third):
        meta_path = tmp_path / "state" / "generations" / gid / "meta.json"
        meta = json.loads(meta_path.read_text())
        del meta["delta"]
        meta_path.write_text(json.dumps(meta))
    rows = listing(site)
    assert rows[third].endswith("  dovecot-passwd +0 -0 ~1")
    assert rows[second].endswith("  alias +0 -0 ~1")
    # the oldest has nothing to compare with: every output is unknown
    assert rows[first].endswith("alias ?, postfix-recipients ?, postfix-sender-login ?, dovecot-passwd ?")


def test_diff_defaults_to_previous_against_installed_and_redacts_like_dry_run(tmp_path: Path) -> None:
    site = Site(tmp_path)
    first, second, third = three_generations(site)
    proc = site.run("diff")
    assert proc.returncode == 1, proc.stderr
    assert f"--- {second}/dovecot-passwd\n+++ {third}/dovecot-passwd\n" in proc.stdout
    redact = PasswdExporter({}).redact
    before, after = (alice_line(site, gid) for gid in (second, third))
    assert f"-{redact(before)}\n+{redact(after)}\n" in proc.stdout
    assert ALICE_HASH not in proc.stdout and NEW_HASH not in proc.stdout and "UwuA0" not in proc.stdout
    assert "alias" not in proc.stdout, "only outputs that differ"

    proc = site.run("diff", first)  # one generation: against the installed one
    assert proc.returncode == 1
    assert "-bob@example.org\tbob@elsewhere.example\n+bob@example.org\tbob@new.example\n" in proc.stdout
    assert f"+++ {third}/dovecot-passwd" in proc.stdout and ALICE_HASH not in proc.stdout

    proc = site.run("diff", third, second)  # either order
    assert proc.returncode == 1 and f"--- {third}/dovecot-passwd" in proc.stdout
    assert site.run("diff", second, second).stdout == ""
    assert site.run("diff", second, second).returncode == 0

    proc = site.run("diff", "19700101T000000Z-00000000")
    assert proc.returncode == 2 and "no generation '19700101T000000Z-00000000'" in proc.stderr

    site.run("rollback", first, check=0)  # installed is now the oldest: nothing before it
    proc = site.run("diff")
    assert proc.returncode == 2 and f"no generation before {first}" in proc.stderr


def test_diff_redacts_every_value_of_an_output_the_config_no_longer_names(tmp_path: Path) -> None:
    site = Site(tmp_path)
    first, _, third = three_generations(site)
    renamed = [dict(e, name="passwords") if e["kind"] == "dovecot-passwd" else e for e in EXPORTERS]
    site.write_config(exporters=renamed)
    proc = site.run("diff", first, third)
    assert proc.returncode == 1 and f"+++ {third}/dovecot-passwd" in proc.stdout
    assert ALICE_HASH not in proc.stdout and NEW_HASH not in proc.stdout
    assert re.search(r"^-alice:<value sha256:[0-9a-f]{12}>$", proc.stdout, re.M)


def test_compare_counts_keys_not_lines() -> None:
    parse = PasswdExporter({}).parse
    old = b"a:1\nb:2\nc:3\n"
    assert history.delta_mod.compare(old, b"a:1\nb:9\nd:4\ne:5\n", parse) == Delta(added=2, removed=1, changed=1)
    assert history.delta_mod.compare(old, old, parse) == Delta()


def test_compare_against_nothing_counts_each_key_once_as_added() -> None:
    """A first install: a key written twice (the exporter's parser keeps one) counts once."""
    parse = PasswdExporter({}).parse
    assert history.delta_mod.compare(b"", b"a:1\nb:2\na:3\n\n", parse) == Delta(added=2)
    assert history.delta_mod.compare(b"", b"", parse) == Delta()


@pytest.mark.parametrize("args", [["diff", "a", "b", "c"]])
def test_diff_takes_at_most_two_generations(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "ldapsync", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "unrecognized arguments: c" in proc.stderr
