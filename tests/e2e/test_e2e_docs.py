"""docs/deployment.md shows exactly the files in docs/snippets/ that the e2e tests run."""

from __future__ import annotations

import re

from mailstack import REPO, SNIPPETS

DOC = REPO / "docs" / "deployment.md"
BLOCK = re.compile(r"<!-- snippet: (?P<name>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)```\n", re.S)


def test_every_snippet_in_the_guide_is_the_tested_file_verbatim() -> None:
    shown = {m["name"]: m["body"] for m in BLOCK.finditer(DOC.read_text())}
    files = {p.name: p.read_text() for p in SNIPPETS.iterdir() if p.is_file()}
    assert sorted(shown) == sorted(files)
    for name, body in shown.items():
        assert body == files[name], f"docs/deployment.md differs from docs/snippets/{name}"
