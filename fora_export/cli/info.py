"""``fora-export info ENGINE_DIR``: the folder described, without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fora_export.cli.exits import user_errors
from fora_export.cli.options import engine_dir_argument, folder_options, json_options


@click.command()
@engine_dir_argument()
@json_options("Print the manifest as JSON.")
@click.option(
    "--inspect",
    is_flag=True,
    help="Also describe each TensorRT plan with polygraphy (needs the TensorRT and GPU that built it).",
)
@folder_options()
@user_errors
def info(engine_dir: Path, output: Any, inspect: bool, access: Any) -> None:
    """Describe ENGINE_DIR: model, batch range, precision, graphs, caches, backends (no torch needed)."""
    from fora_export.reports import print_manifest
    from fora_runtime.manifest import open_engine_folder

    folder = open_engine_folder(engine_dir, **access.manifest_options())  # checks every file (--verify)
    manifest = folder.manifest
    plans: dict[str, str] = {}
    if inspect:
        from fora_export.plans import inspect_plans

        plans = inspect_plans(engine_dir, manifest, trusted=access.trust_programs or folder.signed)

    def print_text() -> None:
        print_manifest(manifest, engine_dir)
        for role, text in plans.items():
            click.echo(f"\n{role} plan (polygraphy):\n{text}")

    output.emit({**manifest.to_dict(), **({"plans": plans} if inspect else {})}, print_text)
