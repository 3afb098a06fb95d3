"""``fora-export validate ENGINE_DIR``: the engines against the PyTorch model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from fora_export.cli.exits import EXIT_FAILED, user_errors
from fora_export.cli.options import (
    DEMO_PIPELINES_HELP,
    engine_dir_argument,
    folder_options,
    int_list,
    json_options,
    runtime_backend_option,
    schedule_option,
    scheduler_option,
    seed_option,
)


@click.command()
@engine_dir_argument()
@click.option("--model", default=None, help="PyTorch model to compare with. [default: the build's source]")
@runtime_backend_option("Runtime backend to validate.")
@click.option(
    "--steps",
    type=int,
    default=None,
    help="Trajectory length. [default: 20; with --schedule calibrated, its step count when there is one]",
)
@scheduler_option(
    "Sampling scheduler of the trajectory. [default: ddim for DDPM families, flow-euler for "
    "flow-matching ones]"
)
@click.option(
    "--interval", type=int, default=None, help="Cache interval for the trajectory. [default: manifest]"
)
@schedule_option()
@click.option(
    "--batch-sizes",
    default=None,
    callback=int_list("1,2,4"),
    help="Comma-separated batch sizes. [default: min,opt,max]",
)
@seed_option(0)
@click.option(
    "--pipeline",
    default=None,
    help=f"Also run this diffusers pipeline (folder, or {DEMO_PIPELINES_HELP}) with the engines, with its "
    "own scheduler and guidance, against PyTorch FORA.",
)
@click.option(
    "--guidance", type=float, default=None, help="--pipeline's guidance_scale. [default: the pipeline's]"
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a per-step error plot (steps.png, steps.json) and, with --pipeline, the image grid here.",
)
@json_options("Print the report as JSON (see docs/cli.md).")
@folder_options()
@user_errors
def validate(
    engine_dir: Path,
    model: str | None,
    backend: str,
    steps: int | None,
    scheduler: str | None,
    interval: int | None,
    schedule: str | None,
    batch_sizes: tuple[int, ...] | None,
    seed: int,
    pipeline: str | None,
    guidance: float | None,
    report_dir: Path | None,
    output: Any,
    access: Any,
) -> None:
    """Check ENGINE_DIR against the PyTorch model, per graph and over a trajectory."""
    from fora_export.reports import print_validation
    from fora_export.validate.stages import validate_folder

    checked = validate_folder(
        engine_dir,
        model=model,
        backend=backend,
        steps=steps,
        scheduler=scheduler,
        interval=interval,
        schedule=schedule,
        batch_sizes=list(batch_sizes) if batch_sizes is not None else None,
        seed=seed,
        pipeline=pipeline,
        guidance=guidance,
        report_dir=report_dir,
        access=access,
    )

    def print_text() -> None:
        print_validation(checked.report)
        run = checked.pipeline
        if run is not None:
            verdict = "pass" if run.passed else "FAIL"
            click.echo(
                f"Pipeline {run.pipeline} ({run.scheduler}, {run.steps} steps, "
                f"{run.schedule}): final images engine vs PyTorch FORA max abs "
                f"{run.engine_vs_fora_max_abs:.2e} (allowed {run.tolerance:g}) {verdict}; "
                f"FORA vs no cache {run.fora_vs_nocache_max_abs:.3f} (information only)"
            )
        if report_dir is not None:
            click.echo(f"Report: {report_dir}")

    output.emit(checked.to_dict(), print_text)
    if not checked.passed:
        sys.exit(EXIT_FAILED)
