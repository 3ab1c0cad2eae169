"""The man pages, ldapsync(8) and ldapsync.yaml(5), made from docs/cli.md and docs/configuration.md.

The Markdown documents are the one source: the man pages are built from them when the Debian
package is built (`.ci/build-deb`), so the two never disagree. The Markdown is restricted to
what this converter knows, and the converter refuses anything else (ManpageError naming the file
and line) rather than guessing:

- headings `#`, `##`, `###`; the first one is the document's title and is replaced by NAME;
  a `---` rule between parts is dropped (the next heading separates them);
- paragraphs; `- ` bullets (one level of nesting, two spaces in), `N. ` numbered items, with
  continuation lines indented;
- fenced code blocks (```), shown as they are;
- pipe tables with a header row: each row becomes a tagged paragraph, the first cell the tag,
  a second cell the text; in wider tables every further cell is a line of its own, labelled
  with its column's header (no tbl needed, so a table reads well at any terminal width);
- inline `code` (bold, as man pages show literal text), **bold**, *italic*, and links
  [text](target), shown as their text.

Standard library only: it runs under the build machine's /usr/bin/python3 with nothing else
installed. `python3 -m ldapsync.manpage DOCS_DIR OUT_DIR [VERSION]` writes both pages.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class ManpageError(Exception):
    """A Markdown construct the converter does not know, with the file and line."""


@dataclass(frozen=True, slots=True)
class Page:
    """One man page and the document it is made from."""

    name: str  # ldapsync, ldapsync.yaml
    section: int
    source: str  # file name in docs/
    summary: str  # the NAME line's description
    top: int  # heading level shown as .SH (deeper levels as .SS)
    synopsis: tuple[str, ...] = ()  # lines; () takes the document's first code block, if it opens the text
    files: tuple[tuple[str, str], ...] = ()
    see_also: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


PAGES = (
    Page(
        "ldapsync",
        8,
        "cli.md",
        "follow LDAP and atomically install Postfix lookup tables and a Dovecot passwd-file",
        top=2,
        files=(
            ("/etc/ldapsync/ldapsync.yaml", "the configuration, see ldapsync.yaml(5)"),
            ("/var/lib/ldapsync", "the state directory: generations, held change, status record"),
            ("/usr/share/ldapsync/hooks", "the shipped check and reload hooks"),
            ("/usr/share/ldapsync/ldapsync.rules.yml", "Prometheus alerting rules for the metrics"),
            ("/usr/share/ldapsync/grafana-dashboard.json", "a Grafana dashboard for the metrics"),
            ("/usr/share/doc/ldapsync/docs", "operations runbook, deployment, design"),
        ),
        see_also=("ldapsync.yaml(5)", "postmap(1)", "postconf(5)", "doveadm(1)", "systemctl(1)", "journalctl(1)"),
    ),
    Page(
        "ldapsync.yaml",
        5,
        "configuration.md",
        "ldapsync configuration file",
        top=1,
        synopsis=("/etc/ldapsync/ldapsync.yaml",),
        files=(
            ("/etc/ldapsync/ldapsync.yaml", "the configuration read by default"),
            ("/etc/ldapsync/mail.yaml", "the static aliases and forwards (the `static` key)"),
        ),
        see_also=("ldapsync(8)", "postconf(5)", "postmap(1)"),
    ),
)

_FENCE = "```"
_BULLET = re.compile(r"^( {0,2})- (.*)$")
_NUMBER = re.compile(r"^(\d+)\. (.*)$")
_HEADING = re.compile(r"^(#{1,3}) (.+)$")


# -- inline ------------------------------------------------------------------------------------
def _escape(text: str) -> str:
    return text.replace("\\", "\\e")


def inline(text: str) -> str:
    """One paragraph's Markdown inline markup as roff."""
    out = []
    for i, part in enumerate(_code_split(text)):
        if i % 2:  # inside backticks: literal, bold, with real minus signs for options
            out.append("\\fB" + _escape(part).replace("-", "\\-") + "\\fR")
        else:
            out.append(_prose(part))
    return "".join(out)


def _code_split(text: str) -> list[str]:
    """Text and code spans alternating (code at the odd indices)."""
    parts = text.split("`")
    if len(parts) % 2 == 0:
        raise ValueError("unbalanced backtick")
    return parts


def _prose(text: str) -> str:
    text = _escape(text)
    text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: _link(m.group(1), m.group(2)), text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", text)
    text = re.sub(r"(?<![\w*])\*(?![\s*])(.+?)(?<![\s*])\*(?![\w*])", r"\\fI\1\\fR", text)
    return text


def _link(label: str, target: str) -> str:
    return f"{label} <{target}>" if target.startswith(("http://", "https://")) else label


def _line(text: str) -> str:
    """A text line as roff input: one starting with a control character is made plain text."""
    return "\\&" + text if text.startswith((".", "'")) else text


# -- blocks -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Block:
    kind: str  # heading, para, code, table, item
    lines: tuple[str, ...]
    level: int = 0  # heading level; item nesting depth (0, 1)
    marker: str = ""  # item: "\(bu" or "3."
    where: int = 0  # line number in the source


def blocks(text: str, source: str = "<markdown>") -> Iterator[_Block]:
    """The document's blocks, in order; ManpageError for what the converter does not know."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        where = i + 1
        if not line.strip():
            i += 1
            continue
        if line.startswith(_FENCE):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(_FENCE)), None)
            if end is None:
                raise ManpageError(f"{source}:{where}: code block not closed")
            yield _Block("code", tuple(lines[i + 1 : end]), where=where)
            i = end + 1
            continue
        if line == "---":  # a rule between parts: the next heading separates them in a man page
            i += 1
            continue
        m = _HEADING.match(line)
        if m:
            yield _Block("heading", (m.group(2),), level=len(m.group(1)), where=where)
            i += 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            yield _Block("table", tuple(rows), where=where)
            continue
        if line.startswith(("#", ">", "<", "    ", "\t", "* ", "+ ", "=")) or re.match(r"^ *[-*_]{3,} *$", line):
            raise ManpageError(f"{source}:{where}: not in the Markdown subset the man pages are made from: {line!r}")
        bullet, number = _BULLET.match(line), _NUMBER.match(line)
        if bullet or number:
            if bullet:
                level, marker, first = len(bullet.group(1)) // 2, "\\(bu", bullet.group(2)
            else:
                assert number is not None
                level, marker, first = 0, number.group(1) + ".", number.group(2)
            body = [first]
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and not _BULLET.match(lines[i]) and lines[i].strip():
                body.append(lines[i].strip())
                i += 1
            yield _Block("item", tuple(body), level=level, marker=marker, where=where)
            continue
        para = [line]
        i += 1
        while i < len(lines) and lines[i].strip() and not _starts_block(lines[i]):
            para.append(lines[i])
            i += 1
        yield _Block("para", tuple(para), where=where)


def _starts_block(line: str) -> bool:
    return bool(line.startswith((_FENCE, "|")) or _HEADING.match(line) or _BULLET.match(line) or _NUMBER.match(line))


def _cells(row: str) -> list[str]:
    """A table row's cells; `\\|` is a literal bar (also inside code spans)."""
    body = row.strip()
    if not (body.startswith("|") and body.endswith("|")):
        raise ValueError("a table row must start and end with |")
    cells, cur, i = [], "", 1
    while i < len(body) - 1:
        c = body[i]
        if c == "\\" and body[i + 1] == "|":
            cur += "|"
            i += 2
            continue
        if c == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    cells.append(cur.strip())
    return cells


# -- the page ---------------------------------------------------------------------------------
def convert(markdown: str, page: Page, *, version: str = "", date: str = "", source: str = "") -> str:
    """The roff (man(7) macros) of one page."""
    source = source or page.source
    footer = f"ldapsync {version}".strip()
    out = [
        f'.\\" Generated from docs/{page.source} by ldapsync.manpage; edit that file, not this one.',
        f'.TH "{page.name.upper()}" "{page.section}" "{date}" "{footer}" "ldapsync"',
    ]
    out += [".nh", ".ad l", ".SH NAME", f"{_escape(page.name)} \\- {_escape(page.summary)}"]
    items = list(blocks(markdown, source))
    if not items or items[0].kind != "heading":
        raise ManpageError(f"{source}:1: the document must start with its title (a # heading)")
    items = items[1:]
    synopsis: Sequence[str] = page.synopsis
    if not synopsis and items and items[0].kind == "code":
        synopsis, items = items[0].lines, items[1:]
    if synopsis:
        out += [".SH SYNOPSIS", ".nf"] + [_line(_escape(s).replace("-", "\\-")) for s in synopsis] + [".fi"]
    out.append(".SH DESCRIPTION")
    for b in items:
        try:
            out += _render(b, page)
        except ValueError as e:
            raise ManpageError(f"{source}:{b.where}: {e}") from e
    if page.files:
        out.append(".SH FILES")
        for path, what in page.files:
            out += [".TP", f"\\fI{_escape(path)}\\fR", inline(what)]
    if page.see_also:
        refs = [re.sub(r"^(.+)\((\w+)\)$", r"\\fB\1\\fR(\2)", r) for r in page.see_also]
        out += [".SH SEE ALSO", ",\n".join(refs)]
    # groff reads bytes; preconv is not always run (groff -man without -k): name non-ASCII characters
    return re.sub(r"[^\x00-\x7f]", lambda m: f"\\[u{ord(m.group()):04X}]", "\n".join(out) + "\n")


def _render(b: _Block, page: Page) -> list[str]:
    if b.kind == "heading":
        title = b.lines[0]
        if b.level <= page.top:
            plain = re.sub(r"`([^`]*)`", r"\1", title)
            return [f'.SH "{_escape(plain.upper())}"']
        return [f".SS {inline(title)}"]
    if b.kind == "para":
        return [".PP", _line(inline(" ".join(s.strip() for s in b.lines)))]
    if b.kind == "code":
        return [".PP", ".RS 4", ".nf", *(_line(_escape(s)) for s in b.lines), ".fi", ".RE"]
    if b.kind == "item":
        text = _line(inline(" ".join(b.lines)))
        width = 2 if b.marker == "\\(bu" else 4
        item = [f".IP {b.marker} {width}", text]
        return [".RS 2", *item, ".RE"] if b.level else item
    if b.kind == "table":
        return _table(b.lines)
    raise AssertionError(b.kind)


def _table(rows: Sequence[str]) -> list[str]:
    if len(rows) < 2 or not re.fullmatch(r"\|( *:?-+:? *\|)+", rows[1].strip()):
        raise ValueError("a table needs a header row and a |---| row")
    header = _cells(rows[0])
    out = [".PP"] if header else []
    for row in rows[2:]:
        cells = _cells(row)
        if len(cells) != len(header):
            raise ValueError(f"table row has {len(cells)} cells, its header {len(header)}: {row!r}")
        out += [".TP", _line(inline(cells[0]) or "\\&")]
        if len(header) <= 2:  # tag and text
            out.append(_line(inline(cells[1])) if len(cells) > 1 and cells[1] else "\\&")
            continue
        # more columns: each on its own line under the tag, labelled with its header
        for name, cell in zip(header[1:], cells[1:], strict=True):
            if cell:
                out += [".br", _line(f"\\fI{_escape(name)}:\\fR " + inline(cell))]
    return out


def build(docs: Path, out: Path, version: str = "", date: str = "") -> list[Path]:
    """Write every page into `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for page in PAGES:
        src = docs / page.source
        text = convert(src.read_text(encoding="utf-8"), page, version=version, date=date, source=str(src))
        target = out / page.filename
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def main(argv: Sequence[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python3 -m ldapsync.manpage DOCS_DIR OUT_DIR [VERSION]", file=sys.stderr)
        return 2
    try:
        for path in build(Path(argv[0]), Path(argv[1]), *argv[2:]):
            print(path)
    except (ManpageError, OSError) as e:
        print(f"ldapsync.manpage: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
