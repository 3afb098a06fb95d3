"""``validate --pipeline`` and ``validate --report``: the engines inside a diffusers
pipeline, and per-step errors.

- :func:`validate_pipeline` runs a pipeline call (its own scheduler, classifier-free
  guidance as the pipeline does it) with the engines as ``pipe.transformer``, without
  cache and with PyTorch FORA (:func:`fora_export.validate.three_ways.run_three_ways`), recording every
  transformer output. It passes when the final images of the engines and of PyTorch FORA
  agree within the precision's trajectory tolerance (max abs, pixels in [0, 1]; fp32 1e-4).
- :func:`trajectory_step_errors` does the same per step without a pipeline: the runtime,
  PyTorch FORA and PyTorch without cache, each along its own sampling trajectory from the
  same latents (the scheduler and inputs ``validate``'s trajectory uses).
- :func:`write_report` plots the per-step (per-call) relative L2 of the model outputs,
  runtime vs PyTorch FORA and FORA vs no cache, and with a pipeline writes the decoded
  image grid (``grid.png``; an animated ``grid.webp`` for video pipelines).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fora_export.errors import ConfigError
from fora_export.outputs import save_figure, write_text_atomic
from fora_export.reference import load_reference
from fora_export.schedulers import default_scheduler, make_scheduler
from fora_export.schedules import chosen_schedule
from fora_export.split.graphs import split_model
from fora_export.validate.compare import TRAJECTORY_TOLERANCES, relative_l2, to_numpy
from fora_export.validate.three_ways import ThreeWays, run_three_ways, save_grid
from fora_runtime.manifest import load_manifest
from fora_runtime.session import ForaSession
from fora_runtime.trust import DEFAULT_ACCESS, FolderAccess


@dataclass
class StepErrors:
    """Relative L2 of the model output at each transformer call."""

    #: What was run: the pipeline and scheduler, or validate's trajectory.
    label: str
    runtime_vs_fora: list[float]
    fora_vs_nocache: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PipelineResult:
    pipeline: str
    scheduler: str
    steps: int
    schedule: str
    #: Max abs difference of the final images (pixels in [0, 1]).
    engine_vs_fora_max_abs: float
    tolerance: float
    fora_vs_nocache_max_abs: float
    nonfinite: bool
    steps_errors: StepErrors

    @property
    def passed(self) -> bool:
        return not self.nonfinite and self.engine_vs_fora_max_abs <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _per_call(actual: list[Any], reference: list[Any]) -> list[float]:
    return [relative_l2(a, r) for a, r in zip(actual, reference, strict=True)]


def validate_pipeline(
    engine_dir: str | Path,
    pipeline: str,
    *,
    backend: str = "onnxruntime",
    steps: int = 20,
    guidance: float | None = None,
    seed: int = 0,
    interval: int | None = None,
    schedule: str | None = None,
    device: str | None = None,
    progress: bool = False,
    access: FolderAccess = DEFAULT_ACCESS,
) -> tuple[PipelineResult, ThreeWays]:
    """The engines in ``pipeline`` against PyTorch FORA (see the module docstring)."""
    runs = run_three_ways(
        engine_dir,
        pipeline,
        steps=steps,
        guidance=guidance,
        seed=seed,
        interval=interval,
        schedule=schedule,
        backend=backend,
        device=device,
        progress=progress,
        record_calls=True,
        access=access,
    )
    images = runs.images
    errors = StepErrors(
        label=f"{runs.pipeline_class} ({runs.scheduler_class}, {runs.steps} steps, {runs.schedule})",
        runtime_vs_fora=_per_call(runs.calls["engine"], runs.calls["fora"]),
        fora_vs_nocache=_per_call(runs.calls["fora"], runs.calls["nocache"]),
    )
    result = PipelineResult(
        pipeline=runs.pipeline_class,
        scheduler=runs.scheduler_class,
        steps=runs.steps,
        schedule=runs.schedule,
        engine_vs_fora_max_abs=float(np.abs(images["engine"] - images["fora"]).max()),
        tolerance=TRAJECTORY_TOLERANCES[runs.manifest.precision],
        fora_vs_nocache_max_abs=float(np.abs(images["fora"] - images["nocache"]).max()),
        nonfinite=not bool(np.isfinite(images["engine"]).all()),
        steps_errors=errors,
    )
    return result, runs


def trajectory_step_errors(
    engine_dir: str | Path,
    *,
    model: str | None = None,
    backend: str = "onnxruntime",
    steps: int = 20,
    scheduler: str | None = None,
    interval: int | None = None,
    seed: int = 0,
    schedule_option: str | None = None,
    access: FolderAccess = DEFAULT_ACCESS,
) -> StepErrors:
    """Per-step errors along validate's trajectory (batch opt, random valid inputs)."""
    manifest = load_manifest(engine_dir, **access.manifest_options())
    denoising = manifest.denoising
    assert denoising is not None  # checked when the manifest was read
    scheduler = scheduler or default_scheduler(denoising)
    schedule = chosen_schedule(manifest, engine_dir, steps, interval=interval, schedule=schedule_option)
    plan = schedule.plan(steps)
    adapter = load_reference(manifest, model)
    batch = manifest.batch.opt
    with ForaSession(engine_dir, backend=backend, **access.session_options()) as session:
        split = split_model(adapter, tuple(spec.name for spec in session.step_inputs))
        try:
            generator = torch.Generator().manual_seed(seed + 1)
            base = adapter.random_inputs(batch, manifest.precision, generator)
            latents_name, timestep_name = session.latents_name, session.timestep_name
            conditioning = {k: v for k, v in base.items() if k not in (latents_name, timestep_name)}
            dtype = base[latents_name].dtype

            def feed(value: torch.Tensor) -> Any:
                return value.numpy() if session.backend.host_inputs else session.backend.upload(value)

            outputs: dict[str, list[torch.Tensor]] = {"runtime": [], "fora": [], "nocache": []}
            for way in outputs:
                sampler = make_scheduler(scheduler, steps, denoising)
                latents = base[latents_name].float()
                generation = session.start(steps, batch, schedule=schedule) if way == "runtime" else None
                caches: dict[str, torch.Tensor] = {}
                for k, t in enumerate(sampler.timesteps):
                    inputs = {
                        latents_name: latents.to(dtype),
                        timestep_name: torch.full((batch,), float(t * denoising.timestep_scale)),
                        **conditioning,
                    }
                    with torch.no_grad():
                        if generation is not None:
                            fed = {name: feed(value) for name, value in inputs.items()}
                            output = torch.from_numpy(
                                to_numpy(
                                    generation.step(fed.pop(latents_name), fed.pop(timestep_name), **fed)
                                )
                            )
                        elif way == "fora" and plan[k]:
                            output, caches = split.run_full(inputs)
                        elif way == "fora":
                            output = split.run_reuse(inputs, caches)
                        else:
                            output = adapter.predict(inputs)
                    output = output.float()
                    outputs[way].append(output)
                    latents = sampler.step(adapter.noise_prediction(output), t, latents).prev_sample
        finally:
            split.remove()
    return StepErrors(
        label=f"validate trajectory ({scheduler}, {steps} steps, batch {batch}, {schedule.describe()})",
        runtime_vs_fora=_per_call(outputs["runtime"], outputs["fora"]),
        fora_vs_nocache=_per_call(outputs["fora"], outputs["nocache"]),
    )


def write_report(out_dir: str | Path, errors: StepErrors, runs: ThreeWays | None = None) -> list[Path]:
    """``steps.png`` (per-call relative L2, log scale), ``steps.json`` and, with a pipeline
    run, ``grid.png`` (no cache | PyTorch FORA | engine). Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(f"--report | matplotlib is not installed ({err}) | pip install matplotlib") from err
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--report '{out}' | cannot create it: {err}") from err
    figure, axis = plt.subplots(figsize=(7, 4))
    calls = range(len(errors.runtime_vs_fora))
    floor = 1e-12  # exact agreement (0) still shows on a log axis
    axis.semilogy(
        calls, [max(e, floor) for e in errors.runtime_vs_fora], "o-", label="runtime vs PyTorch FORA"
    )
    axis.semilogy(
        calls, [max(e, floor) for e in errors.fora_vs_nocache], "s--", label="PyTorch FORA vs no cache"
    )
    axis.set_xlabel("transformer call (one per step and cache context)")
    axis.set_ylabel("relative L2 of the model output")
    axis.set_title(errors.label, fontsize=9)
    axis.legend()
    figure.tight_layout()
    written = [out / "steps.png", out / "steps.json"]
    try:
        save_figure(figure, written[0], "--report", dpi=120)
        write_text_atomic(written[1], json.dumps(errors.to_dict(), indent=2) + "\n", "--report")
    finally:
        plt.close(figure)
    if runs is not None:
        suffix = ".webp" if runs.images["engine"].ndim == 5 else ".png"  # videos: an animated grid
        written.append(save_grid(runs.images, out / f"grid{suffix}"))
    return written
