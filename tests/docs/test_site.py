"""The documentation site builds strictly (mkdocs.yml: broken links or anchors, pages
missing from the nav and nav entries without a page are errors), README.md's own links
resolve (GitHub renders it; mkdocs does not see it), and the block parser the snippet
tests rely on reads fences as markdown does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import REPO, parse_blocks, shell_commands

_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def test_site_builds_strictly(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr
    # Images live under docs/assets (make quality writes there), so the site serves them.
    assert (tmp_path / "site" / "assets" / "quality.png").is_file()
    assert (tmp_path / "site" / "cli" / "index.html").is_file()


def slug(heading: str) -> str:
    """The anchor of a heading, as GitHub and mkdocs' toc both make it for these headings."""
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower())


def test_readme_links_resolve() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = [m.group("target") for m in _LINK.finditer(readme)]
    local = [t for t in targets if not re.match(r"^[a-z]+://", t)]
    assert len(local) >= 10
    for target in local:
        path, _, anchor = target.partition("#")
        file = REPO / path
        assert file.exists(), f"README.md links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.MULTILINE)
            slugs = {slug(heading) for heading in headings}
            assert anchor in slugs, f"README.md links to {target}: {path} has no heading #{anchor}"


def test_parser_reads_fences_as_markdown() -> None:
    page = "\n".join(
        [
            "text",
            "```bash",
            "make demo  # a comment",
            "fora-export bench engines/x \\",
            "    --steps 4",
            "FOO=1 fora-export info engines/x",
            "```",
            "- a list item:",
            "",
            "  ```python",
            "  print('indented')",
            "  ```",
            "````text",
            "```",
            "````",
        ]
    )
    bash, python, text = parse_blocks(page, Path("page.md"))
    assert (bash.line, bash.language, python.language, text.language) == (2, "bash", "python", "text")
    assert python.text == "print('indented')\n" and text.text == "```\n"
    commands = shell_commands(bash)
    assert [c.argv for c in commands] == [
        ["make", "demo"],
        ["fora-export", "bench", "engines/x", "--steps", "4"],
        ["fora-export", "info", "engines/x"],
    ]
    assert [c.line for c in commands] == [3, 4, 6] and commands[2].env == {"FOO": "1"}
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks("```bash\nmake demo\n", Path("page.md"))
