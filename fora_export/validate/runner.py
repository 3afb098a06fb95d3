"""``fora-export validate``: engine vs PyTorch, per graph and over a trajectory.

1. Graphs: for several batch sizes and timesteps, the engine's full graph
   (prediction and every cache tensor) and reuse graph (fed the caches its own
   full graph wrote for a nearby earlier timestep) against the PyTorch split
   modules on the same inputs.
2. Trajectory: a whole sampling run (DDIM or DPM-Solver++, the engine's cache
   schedule): runtime vs PyTorch FORA, final-latent relative L2.
3. Drift: PyTorch FORA vs PyTorch without caching, as information (this is the
   approximation FORA makes, not an export error).
4. Calibrated schedules (``fora-export calibrate``): for every one the manifest lists,
   the plan a ``schedule="calibrated"`` generation gets equals the file's full steps;
   for the one the trajectory runs, so do the graphs its steps ran.

With ``backend="tensorrt"`` (datacenter TensorRT) the graph cases also hold every engine
against its ONNX graph on ONNX Runtime (``fora_export/validate/engines.py``, polygraphy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fora_export.adapters.base import TORCH_DTYPES, ModelAdapter
from fora_export.errors import ConfigError
from fora_export.reference import load_reference
from fora_export.schedulers import default_scheduler, make_scheduler, served_steps
from fora_export.schedules import chosen_schedule
from fora_export.split.graphs import SplitModel, split_model
from fora_export.validate.compare import (
    GRAPH_TOLERANCES,
    TRAJECTORY_TOLERANCES,
    compare,
    relative_l2,
    to_numpy,
)
from fora_export.validate.forecast_ref import ForecastHistory
from fora_export.validate.report import CalibratedCheck, GraphCase, TrajectoryResult, ValidationReport
from fora_runtime.calibration import CalibratedSchedules
from fora_runtime.manifest import FORECAST_ROLE, DenoisingSpec, GraphRole, Manifest
from fora_runtime.schedule import CacheSchedule
from fora_runtime.session import ForaSession
from fora_runtime.trust import DEFAULT_ACCESS, FolderAccess

log = logging.getLogger(__name__)

GRAPH_TIMESTEPS = (999, 500, 0)
#: The reuse case reuses caches written this many timesteps earlier.
REUSE_GAP = 40


class _Feeder:
    """Converts CPU torch inputs into what the session's backend takes."""

    def __init__(self, session: ForaSession) -> None:
        self._backend = session.backend

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self._backend.host_inputs:
            return {k: v.numpy() for k, v in inputs.items()}
        return {k: self._backend.upload(v) for k, v in inputs.items()}


def validate_graphs(
    session: ForaSession, split: SplitModel, batch_sizes: list[int], seed: int
) -> list[GraphCase]:
    manifest = session.manifest
    tolerance = GRAPH_TOLERANCES[manifest.precision]
    feed = _Feeder(session)
    cases = []
    generator = torch.Generator().manual_seed(seed)
    timestep_name = session.timestep_name
    # Graph timesteps are the family's scheduler timesteps (0..999 for DDPM) in its convention.
    scale = split.adapter.timestep_scale
    assert manifest.denoising is not None  # checked when the manifest was read
    low, top = (bound / scale for bound in manifest.denoising.timestep_range)
    # An expert serves part of the range: its top, middle and bottom instead.
    timesteps: tuple[float, ...] = GRAPH_TIMESTEPS
    if not all(low <= t <= top for t in GRAPH_TIMESTEPS):
        timesteps = (top, (low + top) / 2, low)
    for batch in batch_sizes:
        for timestep in timesteps:
            inputs = split.adapter.random_inputs(batch, manifest.precision, generator)
            inputs[timestep_name] = torch.full((batch,), float(timestep) * scale)
            with torch.no_grad():
                ref_pred, ref_caches = split.run_full(inputs)
            pred = session.run_step(GraphRole.FULL, batch, feed(inputs))
            caches = session.read_caches(batch)
            comparisons = [compare("prediction", pred, ref_pred, tolerance)]
            comparisons += [
                compare(spec.name, caches[spec.name], ref_caches[spec.name], tolerance)
                for spec in manifest.caches
            ]
            cases.append(GraphCase(GraphRole.FULL, batch, timestep, comparisons))

            # Reuse: caches from a full step at an earlier (larger) timestep, as in sampling;
            # at the top there is none, so the reuse step moves to t-REUSE_GAP instead.
            cache_t = timestep + REUSE_GAP if timestep + REUSE_GAP <= top else timestep
            reuse_t = cache_t - REUSE_GAP
            earlier = dict(inputs, **{timestep_name: torch.full((batch,), float(cache_t) * scale)})
            inputs = dict(inputs, **{timestep_name: torch.full((batch,), float(reuse_t) * scale)})
            with torch.no_grad():
                _, earlier_caches = split.run_full(earlier)
                ref_reuse = split.run_reuse(inputs, earlier_caches)
            session.run_step(GraphRole.FULL, batch, feed(earlier))
            reuse_pred = session.run_step(GraphRole.REUSE, batch, feed(inputs))
            reuse_case = [compare("prediction", reuse_pred, ref_reuse, tolerance)]
            cases.append(GraphCase(GraphRole.REUSE, batch, reuse_t, reuse_case))
            if session.backend.gate_table_enabled:
                gated_pred = _gated_reuse_step(
                    session, feed(inputs), batch, (cache_t * scale, reuse_t * scale)
                )
                cases.append(
                    GraphCase(
                        GraphRole.REUSE_GATED,
                        batch,
                        reuse_t,
                        [compare("prediction", gated_pred, ref_reuse, tolerance)],
                    )
                )
            if session.backend.forecast_enabled:
                cases.append(_forecast_case(session, split, feed, inputs, batch, timestep, (low, top)))
            log.debug("graphs: batch %d t=%d done", batch, timestep)
    return cases


def _forecast_case(
    session: ForaSession,
    split: SplitModel,
    feed: _Feeder,
    inputs: dict[str, torch.Tensor],
    batch: int,
    timestep: float,
    served: tuple[float, float],
) -> GraphCase:
    """The forecast reuse step of a three-step generation (full at t + 2g and t + g, forecast
    at t) against the PyTorch reference: the caches themselves forecast and replayed
    through the model's blocks (:mod:`fora_export.validate.forecast_ref`)."""
    low, top = served
    gap = min(float(REUSE_GAP), (top - low) / 3)
    reuse_t = min(timestep, top - 2 * gap)
    times = (reuse_t + 2 * gap, reuse_t + gap, reuse_t)
    scale = split.adapter.timestep_scale
    name = session.timestep_name
    history = ForecastHistory()
    with torch.no_grad():
        for t in times[:2]:
            at_t = torch.full((batch,), t * scale)
            history.record(at_t, split.run_full(dict(inputs, **{name: at_t}))[1])
        at_t = torch.full((batch,), times[2] * scale)
        reference = split.run_reuse(dict(inputs, **{name: at_t}), history.reuse_caches(at_t))
    fed = feed(inputs)
    latents = fed[session.latents_name]
    conditioning = {k: v for k, v in fed.items() if k not in (session.latents_name, name)}
    generation = session.start(
        3,
        batch,
        schedule=CacheSchedule.explicit([0, 1]),
        timesteps=[t * scale for t in times],
        forecast=True,
        **conditioning,
    )
    for _ in range(3):
        prediction = generation.step(latents)
    if generation.history[-1] != FORECAST_ROLE:
        raise ConfigError("validate | the forecast step ran plain reuse | report this bug")
    tolerance = GRAPH_TOLERANCES[session.manifest.precision]
    return GraphCase(
        FORECAST_ROLE, batch, times[2], [compare("prediction", prediction, reference, tolerance)]
    )


def _gated_reuse_step(
    session: ForaSession, inputs: dict[str, Any], batch: int, timesteps: tuple[float, float]
) -> Any:
    """The reuse prediction of a two-step generation (full at ``timesteps[0]``, reuse at
    ``timesteps[1]``) whose gates come from the gate table computed at ``start``: the
    ``gates`` and ``reuse_gated`` graphs together, through the session as users run them."""
    latents = inputs[session.latents_name]
    conditioning = {k: v for k, v in inputs.items() if k not in (session.latents_name, session.timestep_name)}
    generation = session.start(
        2, batch, schedule=CacheSchedule.explicit([0]), timesteps=list(timesteps), **conditioning
    )
    if not generation.uses_gate_table:
        raise ConfigError("validate | the session did not use its gate table | report this bug")
    generation.step(latents)
    return generation.step(latents)


StepFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def sample(
    step_fn: StepFn,
    adapter: ModelAdapter,
    latents: torch.Tensor,
    scheduler_name: str,
    steps: int,
    denoising: DenoisingSpec,
    served: list[int] | None = None,
) -> torch.Tensor:
    """Run a sampling loop; ``step_fn(k, latents, t)`` returns the model output for the
    graph timestep ``t`` (the scheduler's timestep in the family's convention). ``served``:
    the indices of the schedule's steps to run (an expert's part), default all."""
    scheduler = make_scheduler(scheduler_name, steps, denoising)
    latents = latents.float()
    indices = served if served is not None else list(range(len(scheduler.timesteps)))
    if indices and indices[0] > 0:
        scheduler.set_begin_index(indices[0])  # the schedule continues where the other expert left it
    for k, index in enumerate(indices):
        t = scheduler.timesteps[index]
        output = step_fn(k, latents, t * denoising.timestep_scale)
        eps = adapter.noise_prediction(torch.from_numpy(to_numpy(output)))
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def validate_trajectory(
    session: ForaSession,
    split: SplitModel,
    *,
    steps: int,
    scheduler: str,
    schedule: CacheSchedule,
    batch_size: int,
    seed: int,
) -> TrajectoryResult:
    manifest = session.manifest
    dtype = TORCH_DTYPES[manifest.precision]
    generator = torch.Generator().manual_seed(seed + 1)
    base = split.adapter.random_inputs(batch_size, manifest.precision, generator)
    latents_name, timestep_name = session.latents_name, session.timestep_name
    denoising = manifest.denoising
    assert denoising is not None  # checked when the manifest was read
    latents0 = base[latents_name].float()
    conditioning = {k: v for k, v in base.items() if k not in (latents_name, timestep_name)}
    feed = _Feeder(session)

    def step_inputs(latents: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            latents_name: latents.to(dtype),
            timestep_name: torch.full((batch_size,), float(t)),
            **conditioning,
        }

    # With the timesteps given up front, as schedulers allow: builds with gate-table
    # graphs then precompute every step's gates, the path users get.
    timesteps = make_scheduler(scheduler, steps, denoising).timesteps.numpy() * denoising.timestep_scale
    total = steps
    served = served_steps(timesteps, denoising)
    timesteps = timesteps[served]
    steps = len(served)  # an expert runs its part of the schedule only
    plan = schedule.plan(steps)
    generation = session.start(
        steps, batch_size, schedule=schedule, timesteps=timesteps, **feed(conditioning)
    )

    def runtime_step(k: int, latents: torch.Tensor, t: torch.Tensor) -> Any:
        fed = feed(step_inputs(latents, t))
        return generation.step(fed.pop(latents_name), fed.pop(timestep_name), **fed)

    forecast = generation.uses_forecast
    history = ForecastHistory()

    def fora_step(k: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inputs = step_inputs(latents, t)
        with torch.no_grad():
            if plan[k]:
                pred, caches = split.run_full(inputs)
                history.record(inputs[timestep_name], caches)
                return pred
            if forecast:
                return split.run_reuse(inputs, history.reuse_caches(inputs[timestep_name]))
            return split.run_reuse(inputs, history.caches[-1])

    def nocache_step(k: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return split.adapter.predict(step_inputs(latents, t))

    final_runtime = sample(runtime_step, split.adapter, latents0, scheduler, total, denoising, served)
    final_fora = sample(fora_step, split.adapter, latents0, scheduler, total, denoising, served)
    final_nocache = sample(nocache_step, split.adapter, latents0, scheduler, total, denoising, served)
    return TrajectoryResult(
        scheduler=scheduler,
        steps=steps,
        batch_size=batch_size,
        schedule=schedule.describe(),
        num_full=sum(plan),
        runtime_vs_fora_rel_l2=relative_l2(final_runtime, final_fora),
        tolerance=TRAJECTORY_TOLERANCES[manifest.precision],
        fora_vs_nocache_rel_l2=relative_l2(final_fora, final_nocache),
        final_nonfinite=not bool(torch.isfinite(final_runtime).all()),
        gate_table=generation.uses_gate_table,
        forecast=forecast,
        ran_full_steps=[k for k, role in enumerate(generation.history) if role == GraphRole.FULL],
    )


def _engines_vs_onnxruntime(
    folder: Path, manifest: Manifest, batch_sizes: list[int], seed: int, *, trusted: bool
) -> list[GraphCase]:
    """Each TensorRT engine against its ONNX graph (polygraphy's runners; datacenter TensorRT:
    polygraphy's TensorRT runner imports ``tensorrt``, which TensorRT-RTX plans do not load in)."""
    from fora_export.validate.engines import compare_engines_with_onnxruntime
    from fora_runtime.backends.trt_flavor import DATACENTER, flavor_of

    record = manifest.backends.get("tensorrt")
    if not trusted:
        # polygraphy deserialises plans with plugins registered and host code allowed.
        log.warning(
            "%s is not trusted: its engines are checked through the runtime's restricted TensorRT "
            "only, not compared with ONNX Runtime through polygraphy (pass --trust for that)",
            folder,
        )
        return []
    if flavor_of(record, where=str(folder)) is not DATACENTER:
        log.info("TensorRT-RTX plans: compared with PyTorch through the runtime only (not with polygraphy)")
        return []
    return compare_engines_with_onnxruntime(folder, manifest, batch_sizes, seed=seed)


def validate(
    engine_dir: str | Path,
    *,
    model: str | None = None,
    backend: str = "onnxruntime",
    steps: int = 20,
    scheduler: str | None = None,
    schedule: CacheSchedule | str | None = None,
    interval: int | None = None,
    batch_sizes: list[int] | None = None,
    seed: int = 0,
    graphs: bool = True,
    trajectory: bool = True,
    access: FolderAccess = DEFAULT_ACCESS,
) -> ValidationReport:
    """Validate an engine folder; see the module docstring for what is checked. ``access``:
    how the folder is verified and whether it is trusted (``fora_runtime.trust``);
    ``schedule="calibrated"``: the trajectory runs the schedule calibrated for ``steps``."""
    if steps < 1:
        raise ConfigError(f"--steps | got {steps} | expected >= 1")
    with ForaSession(engine_dir, backend=backend, **access.session_options()) as session:
        manifest = session.manifest
        assert manifest.denoising is not None  # checked when the manifest was read
        scheduler = scheduler or default_scheduler(manifest.denoising)
        make_scheduler(scheduler, steps, manifest.denoising)  # refuses a wrong family before work
        if not isinstance(schedule, CacheSchedule):  # "calibrated" (refused without a file), options
            schedule = chosen_schedule(manifest, engine_dir, steps, interval=interval, schedule=schedule)
        if batch_sizes is None:
            batch_sizes = sorted({manifest.batch.min, manifest.batch.opt, manifest.batch.max})
        for batch in batch_sizes:
            if not manifest.batch.contains(batch):
                raise ConfigError(f"--batch-sizes | {batch} is outside the built range {manifest.batch}")
        adapter = load_reference(manifest, model)
        split = split_model(adapter, tuple(s.name for s in session.step_inputs))
        report = ValidationReport(
            engine_dir=str(engine_dir),
            backend=backend,
            model=model or manifest.source,
            precision=manifest.precision,
        )
        try:
            if graphs:
                report.graph_cases = validate_graphs(session, split, batch_sizes, seed)
                if backend == "tensorrt":
                    report.graph_cases += _engines_vs_onnxruntime(
                        Path(engine_dir), manifest, batch_sizes, seed, trusted=session.trusted
                    )
            if trajectory:
                report.trajectory = validate_trajectory(
                    session,
                    split,
                    steps=steps,
                    scheduler=scheduler,
                    schedule=schedule or manifest.schedule,
                    batch_size=manifest.batch.opt,
                    seed=seed,
                )
            report.calibrated = check_calibrated(session, report.trajectory)
        finally:
            split.remove()
    return report


def check_calibrated(session: ForaSession, trajectory: TrajectoryResult | None) -> list[CalibratedCheck]:
    """Every calibrated schedule of the folder: its file's full steps against the plan of a
    ``schedule="calibrated"`` generation and, where the trajectory ran it, the steps that
    ran the full graph."""
    manifest = session.manifest
    calibrated = CalibratedSchedules(manifest, session.engine_dir)
    checks = []
    for steps in calibrated.steps:
        record = calibrated.record(steps)
        generation = session.start(steps, manifest.batch.min, schedule="calibrated")
        ran = None
        if trajectory is not None and trajectory.schedule == record.schedule.describe():
            ran = trajectory.ran_full_steps
        checks.append(
            CalibratedCheck(
                steps=steps,
                file=manifest.calibrated_schedules[steps],
                file_full_steps=list(record.full_steps),
                planned_full_steps=[k for k, full in enumerate(generation.plan) if full],
                ran_full_steps=ran,
            )
        )
    session.reset()
    return checks
