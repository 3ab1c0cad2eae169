"""The man pages: made from docs/cli.md and docs/configuration.md, rendered without a warning,
and naming every command, option and configuration key there is."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ldapsync import cli, manpage, schema
from ldapsync import config as config_mod
from ldapsync.exporters import _builtins

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [
    *sorted((REPO / "examples").glob("*.yaml")),
    *sorted((REPO / "docs" / "snippets").glob("ldapsync-*.yaml")),
]


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("man")
    return {p.name: p for p in manpage.build(REPO / "docs", out, "1.2.3")}


def groff(page: Path) -> tuple[str, str]:
    """The page as a terminal shows it (overstrike removed), and groff's warnings."""
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", str(page)],
        capture_output=True,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r".\x08", "", proc.stdout.decode("utf-8"))
    return text, proc.stderr.decode()


needs_groff = pytest.mark.skipif(shutil.which("groff") is None, reason="groff (groff-base) not installed")


@needs_groff
@pytest.mark.parametrize("name", ["ldapsync.8", "ldapsync.yaml.5"])
def test_pages_render_without_a_warning(pages: dict[str, Path], name: str) -> None:
    text, warnings = groff(pages[name])
    assert warnings == "", warnings
    assert "\\" not in text.replace("\\N", ""), "a roff escape leaked into the text"
    assert re.search(r"^NAME\n\s+ldapsync", text, re.M)
    assert re.search(r"^SEE ALSO\n", text, re.M)
    assert "ldapsync 1.2.3" in text


@pytest.mark.skipif(shutil.which("man") is None, reason="man (man-db) not installed")
@pytest.mark.parametrize("name", ["ldapsync.8", "ldapsync.yaml.5"])
def test_man_renders_them_at_80_columns_without_a_warning(pages: dict[str, Path], name: str) -> None:
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(pages[name])],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"},
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(name.rsplit(".", 1)[0].upper() + "(")


def _actions(p: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(command, option string) for every option, and ("", command) for every command."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield "", name
                yield from _actions(sub, name)
        else:
            for opt in action.option_strings:
                yield prefix, opt


@needs_groff
def test_ldapsync_8_names_every_command_and_option(pages: dict[str, Path]) -> None:
    text, _ = groff(pages["ldapsync.8"])
    words = set(re.findall(r"(?<![\w-])(-{1,2}[a-z][a-z-]*|[a-z]+)", text))
    missing = sorted({f"{cmd} {opt}".strip() for cmd, opt in _actions(cli.parser()) if opt not in words})
    assert not missing, f"ldapsync(8) (docs/cli.md) does not mention: {missing}"
    commands = {opt for cmd, opt in _actions(cli.parser()) if cmd == "" and not opt.startswith("-")}
    assert commands >= {"status", "snapshots", "diff", "rollback", "approve", "check", "explain"}
    for command in commands:  # each in the commands table, as a tag of its own
        assert re.search(rf"^ {{7}}{command}\b", text, re.M), f"no entry for the {command} command"


def config_keys(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every key the config loader reads, found by loading each shipped config and recording
    what it asks for (it asks for every key of a section it reads, present or not)."""
    seen: set[str] = set()
    get, sub = config_mod._Section.get, config_mod._Section.sub

    def recording_get(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        seen.add(self.key(name))
        return get(self, name, *args, **kwargs)

    def recording_sub(self: Any, name: str) -> Any:
        seen.add(self.key(name))
        return sub(self, name)

    monkeypatch.setattr(config_mod._Section, "get", recording_get)
    monkeypatch.setattr(config_mod._Section, "sub", recording_sub)
    for path in CONFIGS:
        if path.name != "mail.yaml":  # the static file, not a config
            config_mod.load(path)
    leaves = {re.sub(r"\[\d+\]", "", k).rsplit(".", 1)[-1] for k in seen}
    leaves |= set(schema.LOGICAL_FIELDS)  # attributes.<field>
    for kind, candidate in _builtins().items():
        leaves.add(kind)
        assert candidate.cls is not None
        leaves |= set(candidate.cls.options)
    assert {"state_dir", "max_deletion_ratio", "bind_password_file", "textfile", "include"} <= leaves
    return leaves


@needs_groff
def test_ldapsync_yaml_5_names_every_configuration_key(pages: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    text, _ = groff(pages["ldapsync.yaml.5"])
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_-]*", text))
    missing = sorted(k for k in config_keys(monkeypatch) if k not in words)
    assert not missing, f"ldapsync.yaml(5) (docs/configuration.md) does not mention: {missing}"


# -- the converter -------------------------------------------------------------------------
PAGE = manpage.Page("x", 1, "x.md", "a test", top=2)


def test_roff_control_characters_and_escapes_in_the_text_stay_text() -> None:
    md = "# T\n\n.hidden request? no\n'also not\n\n"
    md += "back\\slash `a\\b -x` **b** *i* [l](https://e.example/) [d](other.md)\n"
    roff = manpage.convert(md, PAGE)
    assert "\n\\&.hidden request? no 'also not\n" in roff
    assert "back\\eslash \\fBa\\eb \\-x\\fR \\fBb\\fR \\fIi\\fR l <https://e.example/> d\n" in roff


def test_non_ascii_is_named_for_groff() -> None:
    assert "a \\[u2014] b \\[u2192] c" in manpage.convert("# T\n\na — b → c\n", PAGE)


def test_tables_become_tagged_paragraphs_with_labelled_extra_columns() -> None:
    md = "# T\n\n| command | does | exit |\n|---|---|---|\n| `a` | x \\| y | 0 |\n"
    roff = manpage.convert(md, PAGE)
    assert ".TP\n\\fBa\\fR\n.br\n\\fIdoes:\\fR x | y\n.br\n\\fIexit:\\fR 0\n" in roff
    two = manpage.convert("# T\n\n| option | meaning |\n|---|---|\n| `-q` | quiet |\n", PAGE)
    assert ".TP\n\\fB\\-q\\fR\nquiet\n" in two


@pytest.mark.parametrize(
    ("md", "error"),
    [
        ("# T\n\n> quote\n", "x.md:3: not in the Markdown subset"),
        ("# T\n\n```\ncode\n", "x.md:3: code block not closed"),
        ("# T\n\n| a | b |\n|---|---|\n| 1 |\n", "x.md:3: table row has 1 cells, its header 2"),
        ("# T\n\n| a | b |\n| 1 | 2 |\n", "x.md:3: a table needs a header row"),
        ("# T\n\nan `unbalanced code span\n", "x.md:3: unbalanced backtick"),
        ("no title\n", "x.md:1: the document must start with its title"),
    ],
)
def test_what_the_converter_does_not_know_is_refused_with_file_and_line(md: str, error: str) -> None:
    with pytest.raises(manpage.ManpageError, match=re.escape(error)):
        manpage.convert(md, PAGE)


def test_main_writes_both_pages(tmp_path: Path) -> None:
    assert manpage.main([str(REPO / "docs"), str(tmp_path), "9"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ldapsync.8", "ldapsync.yaml.5"]
    assert manpage.main([str(tmp_path / "nowhere"), str(tmp_path)]) == 1
