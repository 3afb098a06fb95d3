"""``fora-export bench``: step latencies and end-to-end speedup per cache interval.

Everything is measured side by side in one run on one backend: the latency of a
full and of a reuse step, then whole generations of ``steps`` steps for each
interval N (N=1 is no caching), run round-robin so drift in machine load affects
every interval alike. The speedup of N is ``time(N=1) / time(N)`` on the medians;
its ideal is ``steps / full steps`` (reuse for free).

Statistics: every timed quantity is first warmed up until steady (two consecutive
runs within ``STEADY_TOLERANCE`` of each other, at most ``MAX_WARMUP_RUNS`` runs),
then timed ``repeats`` times (generations, default 5) or ``step_runs`` times (single
steps, default 10). Each row reports the median and the spread (quartiles, IQR
relative to the median, min and max); a spread above ``SPREAD_WARNING`` or a warm-up
that did not settle is reported as a warning, since such numbers are the machine's
noise as much as the engines' speed.

Between steps the latents get a cheap update (``latents -= 0.01 * eps``) in
place of a scheduler, so the numbers are the transformer's time alone.

The eager baseline runs the unmodified diffusers model the engines were built
from, in PyTorch eager mode without caching, the same number of steps with the
same update, on ``cuda`` when visible (else CPU), at the engines' precision.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fora_export.errors import ConfigError
from fora_export.machine import describe_machine
from fora_export.step_inputs import random_step_inputs
from fora_runtime.manifest import GraphRole, Manifest, load_manifest
from fora_runtime.schedule import CacheSchedule
from fora_runtime.session import ForaSession
from fora_runtime.trust import DEFAULT_ACCESS, FolderAccess

#: Timed generations per interval by default (the median of at least five).
DEFAULT_REPEATS = 5
#: Timed single steps per step latency.
DEFAULT_STEP_RUNS = 10
#: Warm-up is steady when two consecutive runs differ by at most this fraction.
STEADY_TOLERANCE = 0.10
MAX_WARMUP_RUNS = 8
#: A spread (interquartile range / median) above this is reported as a warning.
SPREAD_WARNING = 0.10


@dataclass
class Timing:
    """Repeated timings of one quantity (ms): median and spread, and how it was warmed up."""

    runs_ms: list[float]
    #: Untimed runs before these, until two consecutive ones agreed (``steady``).
    warmup_runs: int = 0
    steady: bool = True

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def quartiles_ms(self) -> tuple[float, float]:
        if len(self.runs_ms) < 2:
            return self.median_ms, self.median_ms
        q1, _, q3 = statistics.quantiles(self.runs_ms, n=4, method="inclusive")
        return q1, q3

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0 for a single run)."""
        q1, q3 = self.quartiles_ms
        return (q3 - q1) / self.median_ms if self.median_ms else 0.0

    def problem(self, what: str) -> str | None:
        """Why these numbers deserve suspicion, in words, or None."""
        q1, q3 = self.quartiles_ms
        if self.spread > SPREAD_WARNING:
            return (
                f"{what}: spread {100 * self.spread:.0f}% of the median (quartiles {q1:.4g}..{q3:.4g} ms, "
                f"min {min(self.runs_ms):.4g}, max {max(self.runs_ms):.4g}, {len(self.runs_ms)} runs): "
                "the machine was busy or the runs too few; rerun on a quiet machine or with more --repeats"
            )
        if not self.steady:
            return (
                f"{what}: warm-up did not settle in {self.warmup_runs} runs (consecutive runs kept "
                f"differing by more than {100 * STEADY_TOLERANCE:.0f}%)"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        q1, q3 = self.quartiles_ms
        return {
            "median_ms": self.median_ms,
            "q1_ms": q1,
            "q3_ms": q3,
            "iqr_ms": q3 - q1,
            "spread": self.spread,
            "min_ms": min(self.runs_ms),
            "max_ms": max(self.runs_ms),
            "runs_ms": list(self.runs_ms),
            "warmup_runs": self.warmup_runs,
            "steady": self.steady,
        }


def warm_up(run: Callable[[], float], *, max_runs: int = MAX_WARMUP_RUNS) -> tuple[int, bool]:
    """Call ``run`` (it returns its time in ms) until two consecutive runs are within
    ``STEADY_TOLERANCE`` of each other, at least twice and at most ``max_runs`` times;
    returns (runs, whether it settled)."""
    times = [run(), run()]
    while abs(times[-1] - times[-2]) > STEADY_TOLERANCE * min(times[-1], times[-2]):
        if len(times) >= max_runs:
            return len(times), False
        times.append(run())
    return len(times), True


def timed(run: Callable[[], float], runs: int) -> Timing:
    """Warm ``run`` up until steady, then time it ``runs`` times."""
    warmup, steady = warm_up(run)
    return Timing([run() for _ in range(runs)], warmup_runs=warmup, steady=steady)


#: Most steps or repeats a bench takes (far past any sampler; bounds the timesteps array).
MAX_BENCH_COUNT = 100_000


@dataclass
class IntervalResult:
    interval: int
    num_full: int
    timing: Timing
    speedup: float = 0.0
    #: The speedup from the quartiles: N=1's lower over this row's upper, and the reverse.
    speedup_range: tuple[float, float] = (0.0, 0.0)
    ideal: float = 0.0

    @property
    def median_ms(self) -> float:
        return self.timing.median_ms

    @property
    def efficiency(self) -> float:
        """Measured speedup as a fraction of the ideal."""
        return self.speedup / self.ideal if self.ideal else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "num_full": self.num_full,
            **self.timing.to_dict(),
            "speedup": self.speedup,
            "speedup_range": list(self.speedup_range),
            "ideal": self.ideal,
            "efficiency": self.efficiency,
        }


@dataclass
class EagerBaseline:
    """The diffusers model in eager PyTorch, no caching: what users start from."""

    model: str
    device: str
    precision: str
    timing: Timing

    @property
    def median_ms(self) -> float:
        return self.timing.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "precision": self.precision,
            **self.timing.to_dict(),
        }


@dataclass
class BenchReport:
    engine_dir: str
    backend: str
    machine: str
    model_class: str
    precision: str
    batch_size: int
    steps: int
    schedule_mode: str
    full: Timing
    reuse: Timing
    #: A reuse step reading gates precomputed at start(); None without a gate table.
    gated_reuse: Timing | None = None
    #: A forecast reuse step (both cache generations); None without a forecast graph. The
    #: end-to-end generations of a forecast build forecast.
    forecast_reuse: Timing | None = None
    intervals: list[IntervalResult] = field(default_factory=list)
    eager: EagerBaseline | None = None

    @property
    def full_ms(self) -> float:
        return self.full.median_ms

    @property
    def reuse_ms(self) -> float:
        return self.reuse.median_ms

    @property
    def gated_reuse_ms(self) -> float | None:
        return self.gated_reuse.median_ms if self.gated_reuse is not None else None

    @property
    def forecast_reuse_ms(self) -> float | None:
        return self.forecast_reuse.median_ms if self.forecast_reuse is not None else None

    @property
    def reuse_to_full(self) -> float:
        return self.reuse_ms / self.full_ms

    def speedup_vs_eager(self, row: IntervalResult) -> float | None:
        return self.eager.median_ms / row.median_ms if self.eager else None

    @property
    def warnings(self) -> list[str]:
        """Rows whose spread or warm-up makes their numbers suspect (see :meth:`Timing.problem`)."""
        named: list[tuple[str, Timing | None]] = [
            ("full step", self.full),
            ("reuse step", self.reuse),
            ("gated reuse step", self.gated_reuse),
            ("forecast reuse step", self.forecast_reuse),
            *((f"N={row.interval}", row.timing) for row in self.intervals),
            ("eager baseline", self.eager.timing if self.eager else None),
        ]
        problems = (timing.problem(what) for what, timing in named if timing is not None)
        return [problem for problem in problems if problem is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_dir": self.engine_dir,
            "backend": self.backend,
            "machine": self.machine,
            "model_class": self.model_class,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "schedule_mode": self.schedule_mode,
            "full_ms": self.full_ms,
            "reuse_ms": self.reuse_ms,
            "gated_reuse_ms": self.gated_reuse_ms,
            "forecast_reuse_ms": self.forecast_reuse_ms,
            "reuse_to_full": self.reuse_to_full,
            "full": self.full.to_dict(),
            "reuse": self.reuse.to_dict(),
            "gated_reuse": self.gated_reuse.to_dict() if self.gated_reuse else None,
            "forecast_reuse": self.forecast_reuse.to_dict() if self.forecast_reuse else None,
            "intervals": [
                {**r.to_dict(), "speedup_vs_eager": self.speedup_vs_eager(r)} for r in self.intervals
            ],
            "eager": self.eager.to_dict() if self.eager else None,
            "warnings": self.warnings,
        }


def _split_inputs(session: ForaSession, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(latents, the conditioning inputs) of a step's inputs."""
    conditioning = {k: v for k, v in inputs.items() if k not in (session.latents_name, session.timestep_name)}
    return inputs[session.latents_name], conditioning


def _noise_slice(manifest: Manifest, output: Any) -> Any:
    """The prediction's latent channels (drops learned-variance channels)."""
    assert manifest.denoising is not None  # checked when the manifest was read
    axis = manifest.denoising.channel_axis
    index = [slice(None)] * axis + [slice(0, manifest.denoising.latent_channels)]
    return output[tuple(index)]


def _step_ms(session: ForaSession, role: str, batch: int, inputs: dict[str, Any]) -> float:
    start = time.perf_counter()
    _synchronize(session.run_step(role, batch, inputs))
    return (time.perf_counter() - start) * 1e3


def _gated_reuse_timing(
    session: ForaSession, batch: int, inputs: dict[str, Any], runs: int, *, forecast: bool = False
) -> Timing:
    """Reuse steps that read the gate table: one generation, a full step (two with
    ``forecast``), then plain (or forecast) reuse steps warmed up until steady and ``runs``
    of them, each timed alone."""
    latents, conditioning = _split_inputs(session, inputs)
    full = 2 if forecast else 1
    steps = full + MAX_WARMUP_RUNS + runs
    generation = session.start(
        steps,
        batch,
        schedule=CacheSchedule.explicit(range(full)),
        timesteps=_timesteps(session.manifest, steps),
        forecast=forecast,
        **conditioning,
    )
    for _ in range(full):
        _synchronize(generation.step(latents))

    def gated_step() -> float:
        start = time.perf_counter()
        _synchronize(generation.step(latents))
        return (time.perf_counter() - start) * 1e3

    return timed(gated_step, runs)


def _generation_ms(
    session: ForaSession, schedule: CacheSchedule, steps: int, batch: int, inputs: dict[str, Any]
) -> float:
    """One whole generation, timesteps and conditioning given up front (so builds with a
    gate table compute it inside the timed region, once)."""
    latents, conditioning = _split_inputs(session, inputs)
    latents = latents.clone() if hasattr(latents, "clone") else latents.copy()
    timesteps = _timesteps(session.manifest, steps)
    start = time.perf_counter()
    generation = session.start(steps, batch, schedule=schedule, timesteps=timesteps, **conditioning)
    for _ in range(steps):
        output = generation.step(latents)
        latents -= 0.01 * _noise_slice(session.manifest, output)
    _synchronize(latents)
    return (time.perf_counter() - start) * 1e3


def _timesteps(manifest: Manifest, steps: int) -> Any:
    """``steps`` graph timesteps from the top of the family's range down to its bottom."""
    low, high = manifest.denoising.timestep_range if manifest.denoising else (0.0, 999.0)
    return np.linspace(high, low, steps, dtype=np.float32)


def _synchronize(value: Any) -> None:
    """Wait for queued device work (GPU backends return before their steps finish)."""
    if hasattr(value, "device") and getattr(value.device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(value.device)


def eager_baseline(
    manifest: Manifest, *, steps: int, batch_size: int, repeats: int, model: str | None = None
) -> EagerBaseline:
    """Time ``steps`` eager steps of the diffusers model the engines came from."""
    import torch

    from fora_export.reference import load_reference

    adapter = load_reference(manifest, model)
    adapter.use_eager_attention()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter.model.to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = adapter.random_inputs(batch_size, manifest.precision, generator)
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    timesteps = _timesteps(manifest, steps)
    latents_name, timestep_name = manifest.latents_input.name, manifest.timestep_input.name

    def generation_ms() -> float:
        latents = inputs[latents_name].clone()
        start = time.perf_counter()
        for t in timesteps:
            timestep = torch.full_like(inputs[timestep_name], float(t))
            output = adapter.predict({**inputs, latents_name: latents, timestep_name: timestep})
            latents -= 0.01 * adapter.noise_prediction(output)
        _synchronize(latents)
        return (time.perf_counter() - start) * 1e3

    with torch.no_grad():
        timing = timed(generation_ms, repeats)  # warm-up: lazy initialisation, kernel selection
    return EagerBaseline(
        model=model or manifest.source, device=str(device), precision=manifest.precision, timing=timing
    )


@dataclass(frozen=True)
class BenchPlan:
    """Checked bench options: batch size, schedules per interval (N=1 first)."""

    batch_size: int
    schedules: dict[int, CacheSchedule]
    schedule_mode: str


def plan_bench(
    manifest: Manifest,
    *,
    steps: int,
    intervals: tuple[int, ...],
    batch_size: int | None,
    repeats: int,
    schedule_mode: str | None = None,
) -> BenchPlan:
    """Check every bench option against the manifest before anything runs."""
    for name, value in (("--steps", steps), ("--repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BENCH_COUNT:
            raise ConfigError(f"{name} | got {value!r} | expected an integer from 1 to {MAX_BENCH_COUNT}")
    batch = manifest.batch.opt if batch_size is None else batch_size
    if not manifest.batch.contains(batch):
        raise ConfigError(
            f"--batch | got {batch}, the engines were built for {manifest.batch.min}..{manifest.batch.max} "
            "| pick a batch size in the built range"
        )
    if schedule_mode is None:  # count intervals the way the engines' own schedule does
        schedule_mode = manifest.schedule.mode if manifest.schedule.kind == "interval" else "paper"
    schedules = {n: CacheSchedule.interval_of(n, schedule_mode) for n in sorted({1, *intervals})}
    return BenchPlan(batch_size=batch, schedules=schedules, schedule_mode=schedule_mode)


def bench(
    engine_dir: str | Path,
    *,
    steps: int = 20,
    intervals: tuple[int, ...] = (1, 2, 3, 5),
    batch_size: int | None = None,
    repeats: int = DEFAULT_REPEATS,
    step_runs: int = DEFAULT_STEP_RUNS,
    schedule_mode: str | None = None,
    backend: str = "onnxruntime",
    eager: EagerBaseline | None = None,
    access: FolderAccess = DEFAULT_ACCESS,
) -> BenchReport:
    """Benchmark one backend; ``eager`` (from :func:`eager_baseline`) adds the
    speedup over the diffusers model in eager PyTorch."""
    with ForaSession(engine_dir, backend=backend, **access.session_options()) as session:
        manifest = session.manifest
        plan = plan_bench(
            manifest,
            steps=steps,
            intervals=intervals,
            batch_size=batch_size,
            repeats=repeats,
            schedule_mode=schedule_mode,
        )
        batch, schedules = plan.batch_size, plan.schedules
        host_inputs = random_step_inputs(manifest, session.step_inputs, batch, seed=0)
        inputs = {name: session.backend.upload(value) for name, value in host_inputs.items()}
        # Each warmed up until steady (first runs allocate and pick kernels); full first, so
        # reuse has caches to read.
        full = timed(lambda: _step_ms(session, GraphRole.FULL, batch, inputs), step_runs)
        reuse = timed(lambda: _step_ms(session, GraphRole.REUSE, batch, inputs), step_runs)
        gated_reuse = None
        if session.backend.gate_table_enabled:
            gated_reuse = _gated_reuse_timing(session, batch, inputs, step_runs)
        forecast_reuse = None
        if session.backend.forecast_enabled:
            forecast_reuse = _gated_reuse_timing(session, batch, inputs, step_runs, forecast=True)
        # Generations: the longest (N=1) until steady, every other schedule once (its gate
        # table size, first-run allocations), then round-robin.
        warmup, steady = warm_up(lambda: _generation_ms(session, schedules[1], steps, batch, inputs))
        for n, schedule in schedules.items():
            if n != 1:
                _generation_ms(session, schedule, steps, batch, inputs)
        runs: dict[int, list[float]] = {n: [] for n in schedules}
        for _ in range(repeats):
            for n, schedule in schedules.items():
                runs[n].append(_generation_ms(session, schedule, steps, batch, inputs))
    report = BenchReport(
        engine_dir=str(engine_dir),
        backend=backend,
        machine=describe_machine(),
        model_class=manifest.model_class,
        precision=manifest.precision,
        batch_size=batch,
        steps=steps,
        schedule_mode=plan.schedule_mode,
        full=full,
        reuse=reuse,
        gated_reuse=gated_reuse,
        forecast_reuse=forecast_reuse,
        eager=eager,
    )
    baseline = Timing(runs[1])
    low_base, high_base = baseline.quartiles_ms
    for n, schedule in schedules.items():
        timing = Timing(runs[n], warmup_runs=warmup if n == 1 else 1, steady=steady if n == 1 else True)
        low, high = timing.quartiles_ms
        report.intervals.append(
            IntervalResult(
                interval=n,
                num_full=schedule.num_full(steps),
                timing=timing,
                speedup=baseline.median_ms / timing.median_ms,
                speedup_range=(low_base / high, high_base / low),
                ideal=schedule.ideal_speedup(steps),
            )
        )
    return report


def bench_backends(
    engine_dir: str | Path,
    *,
    backends: tuple[str, ...] = ("onnxruntime",),
    steps: int = 20,
    intervals: tuple[int, ...] = (1, 2, 3, 5),
    batch_size: int | None = None,
    repeats: int = DEFAULT_REPEATS,
    schedule_mode: str | None = None,
    eager: bool = True,
    model: str | None = None,
    access: FolderAccess = DEFAULT_ACCESS,
) -> list[BenchReport]:
    """``fora-export bench``: every option and backend checked before anything is timed, then
    (with ``eager``) the eager diffusers baseline once, then :func:`bench` per backend, as
    progress stages; one report per backend."""
    from fora_export.progress import StageProgress
    from fora_runtime.backends.base import create_backend

    manifest = load_manifest(engine_dir, **access.manifest_options())
    plan = plan_bench(
        manifest,
        steps=steps,
        intervals=intervals,
        batch_size=batch_size,
        repeats=repeats,
        schedule_mode=schedule_mode,
    )
    for name in backends:  # a backend that cannot run here fails now, not after the eager baseline
        create_backend(name, manifest, engine_dir, trust_programs=access.trust_programs).preflight()
    baseline = None
    with StageProgress(len(backends) + eager, title="bench") as progress:
        if eager:
            progress.stage(f"eager diffusers baseline ({repeats} generations)")
            try:
                baseline = eager_baseline(
                    manifest, steps=steps, batch_size=plan.batch_size, repeats=repeats, model=model
                )
            except ConfigError as err:
                raise ConfigError(f"{err} (or skip the eager baseline with --no-eager)") from err
        reports = []
        for name in backends:
            progress.stage(f"{name}: step latency and {len(intervals)} intervals x {repeats} generations")
            reports.append(
                bench(
                    engine_dir,
                    steps=steps,
                    intervals=intervals,
                    batch_size=batch_size,
                    repeats=repeats,
                    schedule_mode=schedule_mode,
                    backend=name,
                    eager=baseline,
                    access=access,
                )
            )
    return reports
