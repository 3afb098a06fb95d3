"""``fora-export quality ENGINE_DIR``: what each cache schedule costs in sample quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fora_export.choices import QUALITY_SCHEDULE_MODES
from fora_export.cli.exits import user_errors
from fora_export.cli.options import (
    engine_dir_argument,
    folder_options,
    image_option,
    int_list,
    intervals_option,
    json_options,
    parse_names,
    runtime_backend_option,
    schedule_mode_option,
    seed_option,
)


@click.command()
@engine_dir_argument()
@intervals_option("1,2,3,4,5,6,7,8", "FORA intervals N to compare.")
@schedule_mode_option(
    QUALITY_SCHEDULE_MODES,
    "both",
    "How the intervals are counted (see docs/caching.md, Schedules); both: a row for each.",
)
@click.option(
    "--schedule-list",
    "schedule_lists",
    multiple=True,
    metavar="STEPS",
    callback=int_list("0,1,2,5,9"),
    help="Also an explicit schedule: its full steps, e.g. 0,1,2,5,9 (repeatable).",
)
@click.option(
    "--policies",
    default="static",
    show_default=True,
    help="Cache policies compared at each interval's full-step count: static, calibrated (needs "
    "fora-export calibrate at --steps), forecast (needs build --forecast), calibrated+forecast.",
)
@click.option("--samples", type=int, default=10, show_default=True, help="Seeded samples per class.")
@click.option("--steps", type=int, default=50, show_default=True, help="DDIM steps per sample.")
@click.option(
    "--batch", "batch_size", type=int, default=None, help="Samples per generation. [default: the build's max]"
)
@seed_option(0, "Seed of the noise and the classifier.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per schedule (median).")
@runtime_backend_option("Runtime backend.")
@json_options("Print the report as JSON (see docs/cli.md).", save_json_help="Also write the JSON here.")
@image_option("--plot", "Write a quality-vs-speedup plot.")
@image_option("--grid", "Write an image grid, a row per schedule.")
@folder_options()
@user_errors
def quality(
    engine_dir: Path,
    intervals: tuple[int, ...],
    schedule_mode: str,
    schedule_lists: tuple[tuple[int, ...], ...],
    policies: str,
    samples: int,
    steps: int,
    batch_size: int | None,
    seed: int,
    repeats: int,
    backend: str,
    output: Any,
    plot: Path | None,
    grid: Path | None,
    access: Any,
) -> None:
    """Measure what each cache schedule costs in sample quality (digit models: demo-digits[-flow])."""
    from fora_export.outputs import check_output_file
    from fora_export.quality.classifier import require_sklearn
    from fora_export.quality.report import plot_quality, print_quality, save_quality_grid
    from fora_export.quality.runner import plan_quality, run_quality
    from fora_runtime.manifest import load_manifest

    require_sklearn()
    output.check()
    check_output_file(plot, "--plot", image=True)
    check_output_file(grid, "--grid", image=True)
    plan = plan_quality(  # every option checked before anything runs
        load_manifest(engine_dir, **access.manifest_options()),
        intervals=intervals,
        modes=schedule_mode,
        lists=schedule_lists,
        samples_per_class=samples,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        repeats=repeats,
        where=str(engine_dir),
        policies=parse_names(policies),
    )
    report = run_quality(engine_dir, plan, backend=backend, access=access)
    if plot is not None:
        plot_quality(report, plot)
    if grid is not None:
        save_quality_grid(report, grid)
    output.emit(report.to_dict(), lambda: print_quality(report))
