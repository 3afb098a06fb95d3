"""``fora-export``: build, validate and bench FORA engine folders (``fora_export.cli:main``).

One module per command (parse -> call -> print), the option groups they share in
:mod:`fora_export.cli.options`, exit codes and one-line errors in
:mod:`fora_export.cli.exits`, the group in :mod:`fora_export.cli.main`.
"""

from fora_export.cli.main import main

__all__ = ["main"]
