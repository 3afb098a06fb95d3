"""Terminal output through rich, with data kept as data.

Paths, model names and manifest strings come from users and from engine folders: printed
through rich they would be read as markup (``eng[/b]`` is a closing tag with no opening
one, an error) or emoji codes. Every value interpolated into rich text goes through
:func:`plain`; consoles are made by :func:`console` (no emoji replacement).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape


def console(*, stderr: bool = False) -> Console:
    """A console that never replaces ``:name:`` codes with emoji."""
    return Console(stderr=stderr, emoji=False)


def plain(value: Any) -> str:
    """``value`` as text rich prints verbatim (markup escaped)."""
    return escape(str(value))
