"""``python -m fora_export.cli``."""

from fora_export.cli.main import main

main()
