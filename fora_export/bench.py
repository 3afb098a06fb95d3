"""``fora-export bench``: step latencies and end-to-end speedup per cache interval.

Everything is measured side by side in one run on one backend: the median
latency of a full and of a reuse step, then whole generations of ``steps``
steps for each interval N (N=1 is no caching), run round-robin so drift in
machine load affects every interval alike. The speedup of N is
``time(N=1) / time(N)``; its ideal is ``steps / full steps`` (reuse for free).

Between steps the latents get a cheap update (``latents -= 0.01 * eps``) in
place of a scheduler, so the numbers are the transformer's time alone.

The eager baseline runs the unmodified diffusers model the engines were built
from, in PyTorch eager mode without caching, the same number of steps with the
same update, on ``cuda`` when visible (else CPU), at the engines' precision.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fora_export.errors import ConfigError
from fora_runtime.dtypes import numpy_dtype
from fora_runtime.manifest import InputSpec, Manifest
from fora_runtime.schedule import CacheSchedule
from fora_runtime.session import ForaSession
from fora_runtime.trust import DEFAULT_ACCESS, FolderAccess


@dataclass
class IntervalResult:
    interval: int
    num_full: int
    median_ms: float
    runs_ms: list[float]
    speedup: float = 0.0
    ideal: float = 0.0

    @property
    def efficiency(self) -> float:
        """Measured speedup as a fraction of the ideal."""
        return self.speedup / self.ideal if self.ideal else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "efficiency": self.efficiency}


@dataclass
class EagerBaseline:
    """The diffusers model in eager PyTorch, no caching: what users start from."""

    model: str
    device: str
    precision: str
    median_ms: float
    runs_ms: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    full_ms: float
    reuse_ms: float
    #: A reuse step reading gates precomputed at start(); None without a gate table.
    gated_reuse_ms: float | None = None
    #: A forecast reuse step (both cache generations); None without a forecast graph. The
    #: end-to-end generations of a forecast build forecast.
    forecast_reuse_ms: float | None = None
    intervals: list[IntervalResult] = field(default_factory=list)
    eager: EagerBaseline | None = None

    @property
    def reuse_to_full(self) -> float:
        return self.reuse_ms / self.full_ms

    def speedup_vs_eager(self, row: IntervalResult) -> float | None:
        return self.eager.median_ms / row.median_ms if self.eager else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reuse_to_full"] = self.reuse_to_full
        data["intervals"] = [
            {**r.to_dict(), "speedup_vs_eager": self.speedup_vs_eager(r)} for r in self.intervals
        ]
        data["eager"] = self.eager.to_dict() if self.eager else None
        return data


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def random_step_inputs(
    manifest: Manifest, specs: tuple[InputSpec, ...], batch: int, seed: int
) -> dict[str, Any]:
    """Valid random inputs for every step input, from the manifest alone."""
    rng = np.random.default_rng(seed)
    ranges = manifest.conditioning.get("input_ranges", {})
    inputs: dict[str, Any] = {}
    for spec in specs:
        shape = spec.concrete_shape(batch)
        dtype = numpy_dtype(spec.dtype)
        if spec.role == "timestep":
            high = manifest.denoising.timestep_range[1] if manifest.denoising else 999.0
            inputs[spec.name] = np.full(shape, high, dtype=dtype)
        elif spec.name in ranges and ranges[spec.name] == [0, 1]:
            inputs[spec.name] = np.ones(shape, dtype=dtype)  # masks and flags: every token kept
        elif spec.dtype == "int64":
            low, high = ranges.get(spec.name, (1, 1))
            inputs[spec.name] = rng.integers(low, high + 1, size=shape, dtype=np.int64)
        else:
            inputs[spec.name] = rng.standard_normal(shape).astype(dtype)
    return inputs


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


def _median_step_ms(session: ForaSession, role: str, batch: int, inputs: dict[str, Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        _synchronize(session.run_step(role, batch, inputs))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _median_gated_reuse_ms(
    session: ForaSession, batch: int, inputs: dict[str, Any], runs: int, *, forecast: bool = False
) -> float:
    """Median latency of reuse steps that read the gate table (one full step, or two with
    ``forecast``, then ``runs`` plain or forecast reuse steps of one generation, each timed
    alone)."""
    latents, conditioning = _split_inputs(session, inputs)
    full = 2 if forecast else 1
    timesteps = _timesteps(session.manifest, runs + full)
    generation = session.start(
        runs + full,
        batch,
        schedule=CacheSchedule.explicit(range(full)),
        timesteps=timesteps,
        forecast=forecast,
        **conditioning,
    )
    for _ in range(full):
        _synchronize(generation.step(latents))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        _synchronize(generation.step(latents))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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

    from fora_export.validate.runner import load_reference

    adapter = load_reference(manifest, model)
    adapter.use_eager_attention()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter.model.to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = adapter.random_inputs(batch_size, manifest.resolution, manifest.precision, generator)
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    timesteps = _timesteps(manifest, steps)
    latents_name, timestep_name = manifest.latents_input.name, manifest.timestep_input.name
    runs = []
    with torch.no_grad():
        adapter.predict(inputs)  # warm-up: lazy initialisation, kernel selection
        for _ in range(repeats):
            latents = inputs[latents_name].clone()
            start = time.perf_counter()
            for t in timesteps:
                timestep = torch.full_like(inputs[timestep_name], float(t))
                output = adapter.predict({**inputs, latents_name: latents, timestep_name: timestep})
                latents -= 0.01 * adapter.noise_prediction(output)
            _synchronize(latents)
            runs.append((time.perf_counter() - start) * 1e3)
    return EagerBaseline(
        model=model or manifest.source,
        device=str(device),
        precision=manifest.precision,
        median_ms=statistics.median(runs),
        runs_ms=runs,
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
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} | got {value!r} | expected an integer >= 1")
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
    repeats: int = 3,
    step_runs: int = 10,
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
        # Warm up both graphs (first runs allocate and pick kernels).
        for role in ("full", "reuse", "full"):
            warm = session.run_step(role, batch, inputs)
        _synchronize(warm)  # queued warm-up work must not land in the first timed step
        full_ms = _median_step_ms(session, "full", batch, inputs, step_runs)
        reuse_ms = _median_step_ms(session, "reuse", batch, inputs, step_runs)
        gated_reuse_ms = None
        if session.backend.gate_table_enabled:
            _median_gated_reuse_ms(session, batch, inputs, 2)  # warm-up (first runs allocate)
            gated_reuse_ms = _median_gated_reuse_ms(session, batch, inputs, step_runs)
        forecast_reuse_ms = None
        if session.backend.forecast_enabled:
            _median_gated_reuse_ms(session, batch, inputs, 2, forecast=True)  # warm-up
            forecast_reuse_ms = _median_gated_reuse_ms(session, batch, inputs, step_runs, forecast=True)
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
        full_ms=full_ms,
        reuse_ms=reuse_ms,
        gated_reuse_ms=gated_reuse_ms,
        forecast_reuse_ms=forecast_reuse_ms,
        eager=eager,
    )
    baseline = statistics.median(runs[1])
    for n, schedule in schedules.items():
        median = statistics.median(runs[n])
        report.intervals.append(
            IntervalResult(
                interval=n,
                num_full=schedule.num_full(steps),
                median_ms=median,
                runs_ms=runs[n],
                speedup=baseline / median,
                ideal=schedule.ideal_speedup(steps),
            )
        )
    return report
