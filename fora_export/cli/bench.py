"""``fora-export bench ENGINE_DIR``: step latencies and end-to-end speedup per interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fora_export.cli.exits import user_errors
from fora_export.cli.options import (
    engine_dir_argument,
    folder_options,
    image_option,
    intervals_option,
    json_options,
    runtime_backends_option,
    schedule_mode_option,
)
from fora_runtime.schedule import INTERVAL_MODES


@click.command()
@engine_dir_argument()
@runtime_backends_option("Runtime backend(s), comma-separated: onnxruntime, torch, tensorrt.")
@click.option("--steps", type=int, default=20, show_default=True, help="Steps per generation.")
@intervals_option("1,2,3,5", "Cache intervals to compare.")
@click.option("--batch", "batch_size", type=int, default=None, help="Batch size. [default: the build's opt]")
@click.option(
    "--repeats",
    type=int,
    default=5,
    show_default=True,
    help="Timed generations per interval (median and spread of them).",
)
@schedule_mode_option(INTERVAL_MODES, None, "How intervals are counted. [default: as the engines' schedule]")
@click.option(
    "--eager/--no-eager",
    default=True,
    show_default=True,
    help="Also time the diffusers model in eager PyTorch (needs the model source).",
)
@click.option("--model", default=None, help="Model for the eager baseline. [default: the build's source]")
@image_option("--plot", "Write a PNG of time per interval.")
@json_options("Print the report as JSON.", save_json_help="Also write the JSON report to this file.")
@folder_options()
@user_errors
def bench(
    engine_dir: Path,
    backend: tuple[str, ...],
    steps: int,
    intervals: tuple[int, ...],
    batch_size: int | None,
    repeats: int,
    schedule_mode: str | None,
    eager: bool,
    model: str | None,
    plot: Path | None,
    output: Any,
    access: Any,
) -> None:
    """Measure full/reuse step latency and end-to-end speedup per cache interval."""
    from fora_export.bench import bench_backends
    from fora_export.outputs import check_output_file
    from fora_export.reports import plot_bench, print_bench

    output.check()  # output paths before any work
    check_output_file(plot, "--plot", image=True)
    reports = bench_backends(
        engine_dir,
        backends=backend,
        steps=steps,
        intervals=intervals,
        batch_size=batch_size,
        repeats=repeats,
        schedule_mode=schedule_mode,
        eager=eager,
        model=model,
        access=access,
    )
    if plot is not None:
        plot_bench(reports, plot)

    def print_text() -> None:
        for report in reports:
            print_bench(report)

    output.emit({"runs": [r.to_dict() for r in reports]}, print_text)
