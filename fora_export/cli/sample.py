"""``fora-export sample ENGINE_DIR``: images from a diffusers pipeline with the engines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from fora_export.adapters import registry
from fora_export.cli.exits import user_errors
from fora_export.cli.options import (
    DEMO_PIPELINES_HELP,
    engine_dir_argument,
    folder_options,
    parse_int_list,
    runtime_backend_option,
    schedule_option,
    seed_option,
)


def _class_labels(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[int, ...]:
    """Every ``--class-label`` (repeated, or comma-separated) as one tuple of integers."""
    if not value:
        return ()
    return parse_int_list(",".join(value), "--class-label", "207,360")


@click.command()
@engine_dir_argument()
@click.option(
    "--pipeline",
    "pipeline",
    required=True,
    help=f"diffusers pipeline folder (pipe.save_pretrained) of the engines' model, or {DEMO_PIPELINES_HELP}.",
)
@click.option("--prompt", "prompts", multiple=True, help="Prompt (repeat for several images).")
@click.option(
    "--class-label",
    "class_labels",
    multiple=True,
    callback=_class_labels,
    help=f"Class label of class-conditional pipelines ({registry.class_label_families_text()}); repeat or "
    "comma-separate.",
)
@click.option("--steps", type=int, default=20, show_default=True, help="num_inference_steps.")
@click.option("--guidance", type=float, default=None, help="guidance_scale. [default: the pipeline's]")
@seed_option(0)
@click.option("--interval", type=int, default=None, help="Cache interval. [default: the manifest's]")
@schedule_option()
@runtime_backend_option("Runtime backend of the engine run.")
@click.option("--device", default=None, help="Device of the torch backend and the pipeline (cpu, cuda).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder for the PNGs.")
@folder_options()
@user_errors
def sample(
    engine_dir: Path,
    pipeline: str,
    prompts: tuple[str, ...],
    class_labels: tuple[int, ...],
    steps: int,
    guidance: float | None,
    seed: int,
    interval: int | None,
    schedule: str | None,
    backend: str,
    device: str | None,
    out_dir: Path,
    access: Any,
) -> None:
    """Images from PIPELINE with ENGINE_DIR as its transformer, next to no cache and PyTorch FORA."""
    from fora_export.outputs import check_output_folder
    from fora_export.sample import sample as run_sample

    check_output_folder(out_dir, "--out")
    result = run_sample(
        engine_dir,
        pipeline,
        out_dir,
        prompts=prompts,
        class_labels=class_labels,
        steps=steps,
        guidance=guidance,
        seed=seed,
        interval=interval,
        schedule=schedule,
        backend=backend,
        device=device,
        progress=sys.stderr.isatty(),
        access=access,
    )
    click.echo(f"sampled {result.pipeline}: {result.steps} steps, {result.schedule}")
    for label, prefix in (("engine", "engine"), ("no cache", "nocache"), ("PyTorch FORA", "fora")):
        click.echo(f"  {label:<13} {result.seconds[prefix]:7.2f} s  {len(result.images[prefix])} images")
    click.echo(
        f"  max pixel difference: engine vs PyTorch FORA {result.engine_vs_fora:.2e}, "
        f"PyTorch FORA vs no cache {result.fora_vs_nocache:.2e} (FORA's approximation)"
    )
    click.echo(f"  grid: {result.grid}")
