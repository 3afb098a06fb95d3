"""Sample every schedule through the runtime and score it against the uncached samples.

For a digit model (1x8x8 pixel-space latents, 10 classes: ``demo-digits``, a DDPM DiT,
or ``demo-digits-flow``, a flow-matching SD3), K seeded samples per class are drawn with
the family's scheduler and conditioning (:mod:`fora_export.quality.sampling`: DDIM on
the linear training betas, or flow-matching Euler) for each cache schedule, from the
same initial noise. The first schedule is always N=1 (no caching, through the runtime
too): the reference.

Policies (``policies``) at equal full steps: ``static`` FORA (the intervals, and explicit
lists), ``calibrated`` (for each interval's full-step count K, the K full steps chosen from
the engine folder's calibration of these steps, as ``fora-export calibrate --full-steps K``
would place them), ``forecast`` (the static paper schedule with forecast reuse steps) and
``calibrated+forecast``. Forecast policies need a ``build --forecast`` folder; static rows
then run with the forecast off on the same engines.

Per schedule: PSNR (pixels in [0, 1]) and relative L2 (the final samples) against the
reference, the digit classifier's accuracy on the conditioning labels, the Fréchet
distance of its features to the real digits', the full steps, and the time of the same
generations (the median of ``repeats`` timed runs). Generations run round-robin (for each
run and batch of samples, every schedule in turn) so drift in machine load affects every
schedule alike.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fora_export.choices import QUALITY_SCHEDULE_MODES
from fora_export.drift import select_full_steps
from fora_export.errors import ConfigError
from fora_export.machine import describe_machine
from fora_export.progress import StageProgress
from fora_export.quality.classifier import IMAGE_SHAPE, NUM_CLASSES, DigitClassifier, require_sklearn
from fora_export.quality.metrics import frechet_distance, psnr, relative_l2
from fora_export.quality.sampling import DigitSampler, denoising_of
from fora_runtime.manifest import Manifest
from fora_runtime.schedule import INTERVAL_MODES, CacheSchedule
from fora_runtime.session import ForaSession
from fora_runtime.trust import DEFAULT_ACCESS, FolderAccess

#: What ``--policies`` compares at equal full steps (static FORA is every interval's own row).
POLICIES = ("static", "calibrated", "forecast", "calibrated+forecast")


@dataclass(frozen=True)
class ScheduleCase:
    """One schedule the command compares; ``label`` names it in every output."""

    label: str
    schedule: CacheSchedule
    #: "none" (N=1, the reference), "paper", "reference", "both" (the two readings give the
    #: same plan at these steps: one row), "explicit" (labelled "list K", K from 1 in the
    #: order given), or a policy beyond static: "calibrated", "forecast", "calibrated+forecast".
    kind: str
    interval: int | None = None
    #: Reuse steps forecast the caches from the last two full steps (a forecast build).
    forecast: bool = False


@dataclass(frozen=True)
class QualityPlan:
    """Checked options: the schedules (the uncached reference first) and the samples."""

    steps: int
    samples_per_class: int
    batch_size: int
    seed: int
    cases: tuple[ScheduleCase, ...]
    #: Timed runs of every schedule (the time is their median; the samples are the same).
    repeats: int = 1

    @property
    def labels(self) -> np.ndarray:
        """Conditioning labels, class-major: K zeros, K ones, ..."""
        return np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), self.samples_per_class)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        total = len(self.labels)
        return [(start, min(start + self.batch_size, total)) for start in range(0, total, self.batch_size)]


#: Scheduler families quality samples (see fora_export.quality.sampling).
DIGIT_SCHEDULERS = ("ddpm", "flow_match")


def check_digit_model(manifest: Manifest, where: str) -> None:
    """The classifier judges 8x8 digits of 10 classes in pixel space: a DDPM or
    flow-matching model of 1x8x8 BCHW latents whose conditioning inputs a class maps to
    (class labels, or the model's class tables)."""
    conditioning, denoising = manifest.conditioning, manifest.denoising
    channels = denoising.latent_channels if denoising is not None else None
    scheduler = denoising.scheduler if denoising is not None else None
    layout = denoising.latent_layout if denoising is not None else None
    height, width = manifest.resolution
    found = (
        f"{conditioning.kind} conditioning, {channels}x{height}x{width} {layout} latents, "
        f"{scheduler} sampling"
    )
    if (
        channels != 1
        or scheduler not in DIGIT_SCHEDULERS
        or layout != "BCHW"
        or tuple(manifest.resolution) != IMAGE_SHAPE
    ):
        raise ConfigError(
            f"{where} | quality scores 8x8 digit models (1x8x8 pixel latents, DDPM or flow matching, "
            f"classes 0-9), this one has {found} | build one: fora-export build demo-digits "
            "(or demo-digits-flow)"
        )
    DigitSampler.for_manifest(manifest, 1, NUM_CLASSES, where)  # refuses conditioning no class maps to


def sample_batch_size(
    manifest: Manifest, total: int, batch_size: int | None, *, remainder_option: str
) -> int:
    """The batch size that generates ``total`` samples (default: as many as the engines take at
    once), checked so every batch, the last and smaller one too, lies in the built range."""
    batch = min(total, manifest.batch.max) if batch_size is None else batch_size
    if not manifest.batch.contains(batch):
        raise ConfigError(
            f"--batch | got {batch}, the engines were built for {manifest.batch} "
            "| pick a batch size in the built range, or rebuild with --batch"
        )
    if total % batch and not manifest.batch.contains(total % batch):
        raise ConfigError(
            f"{remainder_option} | {total} samples in batches of {batch} leave {total % batch}, below the "
            f"built minimum {manifest.batch.min} | choose --samples or --batch so batches fit"
        )
    return batch


def plan_quality(
    manifest: Manifest,
    *,
    intervals: tuple[int, ...],
    modes: str = "both",
    lists: tuple[tuple[int, ...], ...] = (),
    samples_per_class: int = 10,
    steps: int = 50,
    batch_size: int | None = None,
    seed: int = 0,
    repeats: int = 3,
    where: str = "ENGINE_DIR",
    policies: tuple[str, ...] = ("static",),
    engine_dir: str | Path | None = None,
) -> QualityPlan:
    """Check every option against the manifest before anything runs. ``engine_dir`` (where
    the calibration is read from) defaults to ``where``."""
    check_digit_model(manifest, where)
    for name, value in (("--samples", samples_per_class), ("--steps", steps), ("--repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} | got {value!r} | expected an integer >= 1")
    if modes not in QUALITY_SCHEDULE_MODES:
        raise ConfigError(
            f"--schedule-mode | got {modes!r} | expected one of {', '.join(QUALITY_SCHEDULE_MODES)}"
        )
    bad = [n for n in intervals if n < 1]
    if bad:
        raise ConfigError(f"--intervals | got {bad[0]} | intervals are integers >= 1 (1 = no caching)")
    total = NUM_CLASSES * samples_per_class
    batch = sample_batch_size(manifest, total, batch_size, remainder_option="--batch")
    cases = [ScheduleCase("no caching (N=1)", CacheSchedule.interval_of(1), "none", 1)]
    chosen_modes = INTERVAL_MODES if modes == "both" else (modes,)
    for n in dict.fromkeys(intervals):  # in the order given, each once
        if n == 1:
            continue
        by_mode = {mode: CacheSchedule.interval_of(n, mode) for mode in chosen_modes}
        plans = {mode: schedule.plan(steps) for mode, schedule in by_mode.items()}
        if len(chosen_modes) == 2 and plans["paper"] == plans["reference"]:
            # Both readings give the same plan at these steps: one row.
            cases.append(ScheduleCase(f"N={n} both", by_mode["paper"], "both", n))
            continue
        for mode, schedule in by_mode.items():
            cases.append(ScheduleCase(f"N={n} {mode}", schedule, mode, n))
    for number, full_steps in enumerate(lists, start=1):
        schedule = CacheSchedule.explicit(full_steps)
        full = schedule.num_full(steps)  # refuses steps past the last one
        cases.append(ScheduleCase(f"list {number} ({full} full)", schedule, "explicit"))
    cases += _policy_cases(manifest, Path(engine_dir or where), policies, intervals, steps, where)
    return QualityPlan(
        steps=steps,
        samples_per_class=samples_per_class,
        batch_size=batch,
        seed=seed,
        cases=tuple(cases),
        repeats=repeats,
    )


def _policy_cases(
    manifest: Manifest,
    folder: Path,
    policies: tuple[str, ...],
    intervals: tuple[int, ...],
    steps: int,
    where: str,
) -> list[ScheduleCase]:
    """The rows of the policies beyond static FORA, one per interval N > 1 at N's full-step
    count K (paper counting): calibrated (K full steps where the calibration's accumulated
    drift is least), forecast (N's schedule, forecast reuse), calibrated + forecast."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ConfigError(
            f"--policies | got {','.join(policies) or 'none'} | expected some of {','.join(POLICIES)}"
        )
    if any("forecast" in p for p in policies) and not manifest.has_forecast:
        raise ConfigError(
            f"{where} | the forecast policies need forecast reuse graphs, these engines have none | "
            f"rebuild with --forecast (static rows then run with the forecast off)"
        )
    calibration = None
    if any(p.startswith("calibrated") for p in policies):
        from fora_runtime.calibration import CalibratedSchedules

        if steps not in manifest.calibrated_schedules:
            raise ConfigError(
                f"{where} | the calibrated policies read the calibration of {steps} steps, and there is none "
                f"| run fora-export calibrate {folder} --steps {steps} --full-steps K first"
            )
        calibration = CalibratedSchedules(manifest, folder).record(steps)
    cases = []
    for n in dict.fromkeys(intervals):
        if n == 1:
            continue
        static = CacheSchedule.interval_of(n, "paper")
        budget = static.num_full(steps)
        calibrated = None
        if calibration is not None:
            if budget == len(calibration.full_steps):
                calibrated = calibration.schedule  # the file's own: what schedule="calibrated" runs
            else:
                chosen, _ = select_full_steps(calibration.change[calibration.metric], budget)
                calibrated = CacheSchedule.explicit(chosen)
        for policy in policies:
            if policy == "forecast":
                cases.append(ScheduleCase(f"forecast N={n}", static, policy, n, forecast=True))
            elif policy.startswith("calibrated"):
                assert calibrated is not None
                forecast = policy == "calibrated+forecast"
                cases.append(
                    ScheduleCase(f"{policy} {budget} full", calibrated, policy, n, forecast=forecast)
                )
    return cases


@dataclass
class ScheduleResult:
    label: str
    kind: str
    interval: int | None
    schedule: dict[str, Any]
    num_full: int
    #: Median over the repeats of the time to generate every sample.
    seconds: float
    runs_seconds: list[float]
    speedup: float
    ideal: float
    #: None when the samples equal the uncached ones exactly (infinite PSNR).
    psnr_db: float | None
    rel_l2: float
    accuracy: float
    frechet: float
    #: Reuse steps forecast the caches (the forecast policies).
    forecast: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class QualityReport:
    engine_dir: str
    backend: str
    machine: str
    model: str
    steps: int
    samples_per_class: int
    batch_size: int
    seed: int
    repeats: int
    scheduler: str
    classifier_accuracy: float
    #: The Fréchet distance of as many real digits as were generated to all real digits.
    real_frechet: float
    results: list[ScheduleResult] = field(default_factory=list)
    #: Final samples per schedule label, pixels in [0, 1], [samples, 1, 8, 8] (not in the JSON).
    images: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("results", "images", "labels")}
        data["schedules"] = [r.to_dict() for r in self.results]
        return data


def to_pixels(samples: np.ndarray) -> np.ndarray:
    """Model samples in [-1, 1] (training's pixel scale) as pixels in [0, 1], clipped."""
    return np.clip((np.asarray(samples, np.float64) + 1.0) / 2.0, 0.0, 1.0)


def run_quality(
    engine_dir: str | Path,
    plan: QualityPlan,
    *,
    backend: str = "onnxruntime",
    progress: bool | None = None,
    access: FolderAccess = DEFAULT_ACCESS,
) -> QualityReport:
    """Sample every schedule of ``plan`` and score it (see the module docstring)."""
    import torch

    require_sklearn()
    chunks = plan.chunks
    labels = plan.labels
    total = 1 + plan.repeats * len(chunks) * len(plan.cases)
    with StageProgress(total, title="quality", enabled=progress) as bar:
        bar.stage("training the digit classifier")
        classifier = DigitClassifier.fit(seed=plan.seed)
        with ForaSession(engine_dir, backend=backend, **access.session_options()) as session:
            manifest = session.manifest
            sampler = DigitSampler.for_manifest(manifest, plan.steps, NUM_CLASSES, str(engine_dir))
            timesteps = sampler.timesteps
            channels = denoising_of(manifest).latent_channels
            generator = torch.Generator().manual_seed(plan.seed)
            noise = torch.randn(len(labels), channels, *manifest.resolution, generator=generator)
            # Warm-up per batch size (first runs allocate buffers and pick kernels), so the
            # first timed schedule does not pay for it.
            warm = CacheSchedule.explicit([0])
            for size in sorted({end - start for start, end in chunks}):
                sampler.generate(session, timesteps[:2], warm, noise[:size], labels[:size])
                if any(case.forecast for case in plan.cases):  # and the forecast graph's
                    twice = CacheSchedule.explicit([0, 1])
                    sampler.generate(
                        session, timesteps[:3], twice, noise[:size], labels[:size], forecast=True
                    )
            samples = {case.label: np.empty(tuple(noise.shape), np.float32) for case in plan.cases}
            runs: dict[str, list[float]] = {label: [0.0] * plan.repeats for label in samples}
            for repeat in range(plan.repeats):
                for start, end in chunks:
                    for case in plan.cases:
                        bar.stage(
                            f"{case.label}, samples {start + 1}-{end} of {len(labels)}"
                            + (f", run {repeat + 1} of {plan.repeats}" if plan.repeats > 1 else "")
                        )
                        out, took = sampler.generate(
                            session,
                            timesteps,
                            case.schedule,
                            noise[start:end],
                            labels[start:end],
                            forecast=case.forecast,
                        )
                        if repeat == 0:  # later runs only time the same generations again
                            samples[case.label][start:end] = out
                        runs[case.label][repeat] += took
    report = QualityReport(
        engine_dir=str(engine_dir),
        backend=backend,
        machine=describe_machine(),
        model=manifest.source,
        steps=plan.steps,
        samples_per_class=plan.samples_per_class,
        batch_size=plan.batch_size,
        seed=plan.seed,
        repeats=plan.repeats,
        scheduler=sampler.describe(),
        classifier_accuracy=classifier.real_accuracy,
        real_frechet=classifier.real_subset_distance(len(labels), seed=plan.seed),
        labels=labels,
    )
    seconds = {label: statistics.median(times) for label, times in runs.items()}
    reference = plan.cases[0].label
    reference_pixels = to_pixels(samples[reference])
    for case in plan.cases:
        pixels = to_pixels(samples[case.label])
        value = psnr(pixels, reference_pixels)
        report.images[case.label] = pixels.astype(np.float32)
        report.results.append(
            ScheduleResult(
                label=case.label,
                kind=case.kind,
                interval=case.interval,
                schedule=case.schedule.to_dict(),
                num_full=case.schedule.num_full(plan.steps),
                seconds=seconds[case.label],
                runs_seconds=runs[case.label],
                speedup=seconds[reference] / seconds[case.label],
                ideal=case.schedule.ideal_speedup(plan.steps),
                psnr_db=None if value == float("inf") else value,
                rel_l2=relative_l2(samples[case.label], samples[reference]),
                accuracy=classifier.accuracy(pixels, labels),
                frechet=frechet_distance(classifier.features(pixels), classifier.real_features),
                forecast=case.forecast,
            )
        )
    return report
