"""The code blocks of README.md and docs/**/*.md, parsed from the markdown, and the shell
commands of a bash block: what tests/docs runs.

A fenced block declares its language: ``python`` and ``bash`` blocks run in the tests,
``text`` blocks are layouts, JSON schemas and program output (nothing to run). A block
whose first line is ``# not run by the docs tests: REASON`` is reported as skipped with
that reason (the marker is visible on the page as well).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The fence languages a documentation block may declare.
LANGUAGES = ("python", "bash", "text")
SKIP_MARKER = re.compile(r"^#\s*not run by the docs tests:\s*(?P<reason>\S.*)$")
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class CodeBlock:
    path: Path  # relative to the repository root
    line: int  # of the opening fence, 1-based
    language: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.as_posix()}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        first = next((line.strip() for line in self.text.splitlines() if line.strip()), "")
        match = SKIP_MARKER.match(first)
        return match.group("reason") if match else None


@dataclass(frozen=True)
class ShellCommand:
    line: int  # in the markdown file, 1-based
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return shlex.join(self.argv)


def documentation_files(repo: Path = REPO) -> list[Path]:
    """README.md and every page of the docs site, relative to ``repo``."""
    pages = sorted(path.relative_to(repo) for path in (repo / "docs").rglob("*.md"))
    return [Path("README.md"), *pages]


def parse_blocks(markdown: str, path: Path) -> list[CodeBlock]:
    """Every fenced code block of ``markdown``, in order. An unclosed fence is an error: the
    rest of the page would silently become code."""
    blocks: list[CodeBlock] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = len(opening.group("indent")), opening.group("fence")
        language = opening.group("info").strip().split(" ")[0]
        body: list[str] = []
        close = index + 1
        while close < len(lines):
            closing = _FENCE.match(lines[close])
            if closing and closing.group("fence").startswith(fence) and not closing.group("info").strip():
                break
            body.append(lines[close][indent:] if lines[close][:indent].isspace() else lines[close])
            close += 1
        else:
            raise ValueError(f"{path}:{index + 1} | code fence never closed | close it with {fence}")
        blocks.append(CodeBlock(path, index + 1, language, "\n".join(body) + "\n"))
        index = close + 1
    return blocks


def collect_blocks(repo: Path = REPO) -> list[CodeBlock]:
    return [
        block
        for path in documentation_files(repo)
        for block in parse_blocks((repo / path).read_text(encoding="utf-8"), path)
    ]


def shell_commands(block: CodeBlock) -> list[ShellCommand]:
    """The commands of a bash block: continuation lines joined, comments dropped, leading
    ``NAME=value`` words taken as the command's environment."""
    commands: list[ShellCommand] = []
    pending, start = "", 0
    for offset, raw in enumerate(block.text.splitlines(), start=block.line + 1):
        if not pending:
            start = offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + raw, comments=True)
        pending = ""
        env: dict[str, str] = {}
        while words and _ASSIGNMENT.match(words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        if words:
            commands.append(ShellCommand(start, words, env))
    if pending:
        raise ValueError(f"{block.id} | the last line ends with a backslash | finish the command")
    return commands
