"""``fora-export calibrate ENGINE_DIR``: full steps placed from measured cache change."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from fora_export.choices import METRIC_OPTIONS
from fora_export.cli.exits import user_errors
from fora_export.cli.options import (
    engine_dir_argument,
    folder_options,
    json_options,
    runtime_backend_option,
    scheduler_option,
    seed_option,
)


@click.command()
@engine_dir_argument()
@click.option("--steps", type=int, required=True, help="Step count the schedule is for (only this one).")
@click.option(
    "--full-steps", "budget", type=int, required=True, help="Full steps K to place (step 0 is one of them)."
)
@click.option("--samples", type=int, default=20, show_default=True, help="Calibration samples.")
@scheduler_option("Sampling scheduler. [default: ddim for DDPM families, flow-euler for flow-matching ones]")
@click.option(
    "--metric",
    type=click.Choice(tuple(METRIC_OPTIONS)),
    default="l1",
    show_default=True,
    help="Cache change measure whose accumulated drift the choice minimises (relative L1 or L2).",
)
@seed_option(1, "Seed of the calibration noise.")
@click.option("--batch", "batch_size", type=int, default=None, help="Samples per generation.")
@runtime_backend_option("Runtime backend.")
@json_options("Print the schedule file's contents as JSON.")
@folder_options()
@user_errors
def calibrate(
    engine_dir: Path,
    steps: int,
    budget: int,
    samples: int,
    scheduler: str | None,
    metric: str,
    seed: int,
    batch_size: int | None,
    backend: str,
    output: Any,
    access: Any,
) -> None:
    """Choose the full steps of STEPS-step generations from measured cache change, into ENGINE_DIR.

    Runs --samples generations with every step full, measures how much the caches change
    per step, and places --full-steps full steps where the reuse steps' accumulated change
    is least. Use it with --schedule calibrated (validate, sample) or schedule="calibrated".
    A signed folder is re-signed with its key (--key-file or $FORA_MANIFEST_KEY).
    """
    from fora_export.calibrate import calibrate as run_calibrate

    result = run_calibrate(
        engine_dir,
        steps=steps,
        budget=budget,
        samples=samples,
        scheduler=scheduler,
        metric=metric,
        seed=seed,
        batch_size=batch_size,
        backend=backend,
        progress=sys.stderr.isatty(),
        access=access,
    )
    record = result.record

    def print_text() -> None:
        click.echo(
            f"calibrated {engine_dir} for {record.steps} {record.scheduler['name']} steps on "
            f"{record.samples} samples in {record.seconds:.1f} s: {len(record.full_steps)} full steps at "
            f"{','.join(map(str, record.full_steps))}"
        )
        click.echo(
            f"  accumulated drift ({record.metric}): {record.cost:.4g}; evenly spaced "
            f"({','.join(map(str, result.uniform))}): {record.uniform_cost:.4g}"
        )
        click.echo(f"  wrote {result.file} (listed in manifest.json with its sha256)")

    output.emit(result.to_dict(), print_text)
