"""Reading the README and ``docs/*.md`` as the tests need them: fenced blocks
(with the HTML comment that marks one, if any), the ``pq`` and ``make``
commands in them, sections, links and the anchors GitHub gives headings.

Markers, HTML comments on the line just above a fence (GitHub shows nothing):

- ``<!-- tour -->``: a block of the README's tour, run verbatim by
  ``tests/integration/test_readme_tour.py``;
- ``<!-- pq: placeholders -->``: a block whose lines may stand for a command
  with ``...`` / ``…`` (flags left out) or ``[optional flags]``; those lines
  are not parsed (every other line of the block is). Anywhere else a
  placeholder fails the command test, so none slips in unmarked.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: Fence languages whose lines are shell commands (an unlabelled fence is
#: output, or a shell session with ``$ `` prompts).
SHELL_LANGUAGES = {"sh", "bash", "shell", "console", ""}
#: Tokens that stand for something left out.
PLACEHOLDERS = ("...", "…")
_MARKER = re.compile(r"^<!--\s*(.+?)\s*-->$")


def markdown_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


@dataclass(frozen=True)
class Block:
    """A fenced code block: its file, the line of its first content line
    (1-based), its language, its text, and the marker above it (or "")."""

    path: Path
    line: int
    language: str
    text: str
    marker: str

    def where(self, offset: int = 0) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line + offset}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, in order."""
    lines = path.read_text().split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,})(\w*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        indent, ticks, language = fence.groups()
        marker = ""
        above = lines[i - 1].strip() if i else ""
        if m := _MARKER.match(above):
            marker = m.group(1)
        start = i + 1
        j = start
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        body = [line.removeprefix(indent) for line in lines[start:j]]
        out.append(Block(path, start + 1, language, "\n".join(body), marker))
        i = j + 1
    return out


@dataclass(frozen=True)
class Command:
    """One logical shell line of a block (continuations joined), where it starts."""

    block: Block
    offset: int  # lines after the block's first
    text: str
    prompted: bool  # it had a ``$ `` prompt

    def where(self) -> str:
        return self.block.where(self.offset)


def shell_lines(block: Block) -> list[Command]:
    """The block's logical lines: ``\\`` continuations joined, blank lines and
    whole-line comments dropped, a ``$ `` prompt removed."""
    out: list[Command] = []
    pending: list[str] = []
    first = 0
    for n, raw in enumerate(block.text.split("\n")):
        if not pending:
            first = n
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        line = " ".join([*pending, raw]).strip()
        pending = []
        prompted = line.startswith("$ ")
        line = line.removeprefix("$ ")
        if line and not line.startswith("#"):
            out.append(Command(block, first, line, prompted))
    return out


_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
_KEYWORDS = {"do", "then", "else", "time"}
_REDIRECTS = {">", ">>", "<", "<<", "2>", ">&", "2>&1"}


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, as argv lists: split on ``;``,
    ``&&``, ``||``, ``|`` and after ``do``/``then``; ``VAR=value`` prefixes,
    redirections and comments dropped. Enough for docs, not a shell."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in _SEPARATORS:
            commands.append([])
            continue
        if token in _REDIRECTS or (token.startswith(">") and set(token) <= {">", "&"}):
            skip_next = True
            continue
        current = commands[-1]
        if not current and (token in _KEYWORDS or re.match(r"^[A-Za-z_]\w*=", token)):
            continue
        if current and current[-1].isdigit() and token.startswith(">"):
            current.pop()  # `2>`: shlex gave "2" and ">"
        current.append(token)
    return [c for c in commands if c]


@dataclass(frozen=True)
class Invocation:
    """A ``pq`` or ``make`` command found in a doc: its argv after the program."""

    command: Command
    program: str
    args: list[str]


def invocations(path: Path, program: str) -> list[Invocation]:
    """Every ``program ...`` in the shell blocks of ``path`` (``$(...)`` and
    ``for ...; do`` bodies included)."""
    out: list[Invocation] = []
    for block in blocks(path):
        if block.language not in SHELL_LANGUAGES:
            continue
        for command in shell_lines(block):
            if block.language == "" and not (
                command.prompted or command.text.startswith(f"{program} ")
            ):
                continue  # output, unless it reads as a command
            text = command.text.replace("$(", "; ").replace("`", " ")
            if loop := re.match(r"^for (\w+) in (\S+)[^;]*; do (.*); done$", text):
                # `for i in 1 2 3; do pq ... $i; done`: the body with the first value.
                var, value, body = loop.groups()
                text = re.sub(rf"\$\{{?{var}\b\}}?", value, body)
            for argv in simple_commands(text):
                if argv[0] == program:
                    out.append(Invocation(command, program, argv[1:]))
    return out


def has_placeholder(args: list[str]) -> bool:
    """Whether ``args`` leave something out: a ``...``/``…`` argument, or ``[optional]`` ones."""
    return any(a in PLACEHOLDERS or a.startswith("[") or a.endswith("]") for a in args)


def section(path: Path, title: str) -> str:
    """The text under the ``## title`` heading of ``path``, up to the next ``## ``."""
    text = path.read_text()
    head = f"\n## {title}\n"
    assert head in text, f"{path.relative_to(ROOT)}: no section {title!r}"
    return text.split(head, 1)[1].split("\n## ", 1)[0]


def anchor(title: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to ``-``."""
    s = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of the headings of ``path`` (outside fences)."""
    out: set[str] = set()
    fenced = {b.line + k for b in blocks(path) for k in range(-1, b.text.count("\n") + 2)}
    for n, line in enumerate(path.read_text().split("\n"), start=1):
        if n not in fenced and (m := re.match(r"^#{1,6} (.+)$", line)):
            out.add(anchor(m.group(1)))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """Relative markdown links of ``path`` outside fences: (line, target)."""
    fenced = {b.line + k for b in blocks(path) for k in range(-1, b.text.count("\n") + 2)}
    out: list[tuple[int, str]] = []
    for n, line in enumerate(path.read_text().split("\n"), start=1):
        if n in fenced:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if not re.match(r"^[a-z]+:", target):
                out.append((n, target))
    return out
