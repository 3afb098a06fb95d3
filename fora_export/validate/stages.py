"""``fora-export validate``'s stages, in order: graphs and trajectory vs PyTorch
(:mod:`fora_export.validate.runner`), then with a pipeline its run with the engines, and
with a report folder the per-step errors (:mod:`fora_export.validate.pipeline_check`).

:func:`validate_folder` checks the output folder before any work, shows the stages as a
progress bar and returns one :class:`FolderValidation`, passed when every stage passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fora_export.outputs import check_output_folder, require_matplotlib
from fora_export.progress import StageProgress
from fora_export.schedules import default_steps
from fora_export.validate import pipeline_check
from fora_export.validate.pipeline_check import PipelineResult
from fora_export.validate.report import ValidationReport
from fora_export.validate.runner import validate
from fora_runtime.manifest import load_manifest
from fora_runtime.trust import DEFAULT_ACCESS, FolderAccess


@dataclass
class FolderValidation:
    """Every stage's result: the graphs and trajectory, and the pipeline run (or None)."""

    report: ValidationReport
    pipeline: PipelineResult | None = None

    @property
    def passed(self) -> bool:
        return self.report.passed and (self.pipeline is None or self.pipeline.passed)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` report: validate's, with ``pipeline`` (and the overall ``passed``)
        when a pipeline ran."""
        data = self.report.to_dict()
        if self.pipeline is not None:
            data["pipeline"] = self.pipeline.to_dict()
            data["passed"] = self.passed
        return data


def validate_folder(
    engine_dir: Path,
    *,
    model: str | None = None,
    backend: str = "onnxruntime",
    steps: int | None = None,
    scheduler: str | None = None,
    interval: int | None = None,
    schedule: str | None = None,
    batch_sizes: list[int] | None = None,
    seed: int = 0,
    pipeline: str | None = None,
    guidance: float | None = None,
    report_dir: Path | None = None,
    access: FolderAccess = DEFAULT_ACCESS,
) -> FolderValidation:
    """Run validate's stages (see the module docstring). ``steps`` None: 20, or with
    ``schedule="calibrated"`` the calibrated step count when there is one."""
    steps = default_steps(load_manifest(engine_dir, verify="none"), schedule, steps)
    check_output_folder(report_dir, "--report")  # before any work
    if report_dir is not None:
        require_matplotlib("--report")
    stages = 1 + (pipeline is not None) + (report_dir is not None and pipeline is None)
    with StageProgress(stages, title="validate") as progress:
        progress.stage("graphs and trajectory vs PyTorch")
        report = validate(
            engine_dir,
            model=model,
            backend=backend,
            steps=steps,
            scheduler=scheduler,
            interval=interval,
            schedule=schedule,
            batch_sizes=batch_sizes,
            seed=seed,
            access=access,
        )
        result, runs = None, None
        if pipeline is not None:
            progress.stage(f"pipeline {pipeline}: engine, no cache, PyTorch FORA")
            result, runs = pipeline_check.validate_pipeline(
                engine_dir,
                pipeline,
                backend=backend,
                steps=steps,
                guidance=guidance,
                seed=seed,
                interval=interval,
                schedule=schedule,
                access=access,
            )
        if report_dir is not None:
            if result is None:
                progress.stage("per-step errors")
                errors = pipeline_check.trajectory_step_errors(
                    engine_dir,
                    model=model,
                    backend=backend,
                    steps=steps,
                    scheduler=scheduler,
                    interval=interval,
                    seed=seed,
                    schedule_option=schedule,
                    access=access,
                )
            else:
                errors = result.steps_errors
            pipeline_check.write_report(report_dir, errors, runs)
    return FolderValidation(report, result)
