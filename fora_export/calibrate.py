"""``fora-export calibrate``: choose where a generation's full steps go, from measured cache change.

Measurement: calibration generations run every step through the runtime's full graph
(N=1), and after each step ``k`` the change of every cache tensor from step ``k-1`` is
measured per sample, ``|C_k - C_{k-1}|_p / |C_{k-1}|_p`` (relative L1 and L2), then
averaged over samples and cache tensors (blocks and sublayers): ``d_k``.

Criterion: a reuse step ``t`` replays the caches of its last full step ``f``, so its error
is ``|C_t - C_f|``, which the triangle inequality bounds by the change accumulated since,
``D(f, t) = d_{f+1} + ... + d_t``. We choose the K full steps (step 0 always: there are no
caches before it) that minimise the **sum over all reuse steps of D(f(t), t)**:

- the sum, not the worst step, because every reuse step's error enters the trajectory and
  later steps build on it;
- the accumulated consecutive change, not ``|C_t - C_f|`` itself, because it is measured
  with one previous step of caches in memory (the pairwise distances need every step's
  caches at once: S x the cache memory), and it is the quantity MagCache accumulates.
  MagCache stops reusing when the accumulated error passes a threshold; with a budget
  of K full steps instead, the exact minimum is a dynamic program
  (:func:`select_full_steps`): the cost splits into segments between consecutive full
  steps, ``seg(f, g) = sum_{t=f+1}^{g-1} D(f, t)``, and the best cost of placing j full
  steps with the last at g is the minimum over f < g of the best for j - 1 ending at f
  plus ``seg(f, g)``. O(K S^2), milliseconds for S = 50.

The schedule file (``fora_runtime.calibration``) records the step count, the scheduler
and its timesteps, the samples and seed, both change curves and the chosen schedule's
drift next to evenly spaced full steps'; the manifest lists it with its sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fora_export
from fora_export.choices import METRIC_OPTIONS
from fora_export.drift import accumulated_drift, select_full_steps, uniform_full_steps
from fora_export.errors import ConfigError
from fora_export.progress import StageProgress
from fora_export.quality.runner import sample_batch_size
from fora_export.schedulers import default_scheduler, make_scheduler
from fora_runtime.calibration import METRICS, CalibrationRecord, schedule_file_name
from fora_runtime.dtypes import numpy_dtype
from fora_runtime.manifest import Manifest, file_record, load_manifest, verify_listed_file
from fora_runtime.schedule import CacheSchedule
from fora_runtime.session import ForaSession
from fora_runtime.trust import DEFAULT_ACCESS, SIGNATURE_NAME, FolderAccess, resolve_manifest_key, sign_folder

#: Below this norm a cache tensor counts as zero (the relative change would divide by ~0).
_TINY = 1e-12


# -- what the calibration generations are conditioned with --------------------------------
def calibration_conditioning(
    manifest: Manifest, samples: int, seed: int
) -> tuple[dict[str, np.ndarray], str]:
    """Conditioning of ``samples`` calibration samples, and how, in words: class-label models
    get every class in turn (never the null class), and so do text-conditioned digit
    models through the class tables beside their weights (``demo-digits-flow``, see
    :mod:`fora_export.quality.conditioning`); otherwise, from the manifest alone, masks
    keep every token and other inputs (text embeddings) are seeded standard normal values,
    which a text model was never trained on: calibrate those through :func:`calibrate`'s
    ``conditioning`` with real embeddings."""
    tables = _class_tables(manifest, samples)
    if tables is not None:
        return tables
    rng = np.random.default_rng(seed)
    values: dict[str, np.ndarray] = {}
    notes = []
    conditioning = manifest.conditioning
    for spec in manifest.inputs_of("conditioning"):
        shape = spec.concrete_shape(samples)
        dtype = numpy_dtype(spec.dtype)
        bounds = manifest.value_range(spec.name)
        if conditioning.kind == "class_labels" and np.issubdtype(dtype, np.integer):
            classes = conditioning.num_classes
            assert classes is not None  # a class-label manifest records them (Conditioning.from_dict)
            values[spec.name] = (np.arange(samples) % classes).astype(dtype).reshape(shape)
            notes.append(f"{spec.name}: classes 0..{classes - 1} in turn")
        elif np.issubdtype(dtype, np.integer):
            high = bounds[1] if bounds is not None else 1
            values[spec.name] = np.full(shape, high, dtype=dtype)
            notes.append(f"{spec.name}: all {high:g}")
        else:
            values[spec.name] = rng.standard_normal(shape).astype(dtype)
            notes.append(f"{spec.name}: random normal")
    return values, "; ".join(notes) or "none"


def _class_tables(manifest: Manifest, samples: int) -> tuple[dict[str, np.ndarray], str] | None:
    """Every class in turn through the model's class-conditioning tables, when its folder has
    them (text-conditioned digit models), else None."""
    from fora_export.quality.conditioning import (
        CLASS_CONDITIONING_FILE,
        class_conditioning,
        load_class_conditioning,
    )
    from fora_export.quality.sampling import model_folder

    folder = model_folder(manifest)
    if manifest.conditioning.kind == "class_labels" or folder is None:
        return None
    path = folder / CLASS_CONDITIONING_FILE
    if not path.is_file():
        return None
    _, classes = load_class_conditioning(path, str(path))  # the null class is the last row
    conditioning = class_conditioning(manifest, classes, str(path), folder)
    labels = np.arange(samples) % classes
    return conditioning.feeds(labels), f"{conditioning.source}: classes 0..{classes - 1} in turn"


# -- measuring ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationPlan:
    """Checked options of one calibration."""

    steps: int
    budget: int
    samples: int
    batch_size: int
    scheduler: str
    metric: str
    seed: int

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return [
            (start, min(start + self.batch_size, self.samples))
            for start in range(0, self.samples, self.batch_size)
        ]


def plan_calibration(
    manifest: Manifest,
    *,
    steps: int,
    budget: int,
    samples: int = 20,
    scheduler: str | None = None,
    metric: str = "l1",
    seed: int = 1,
    batch_size: int | None = None,
    where: str = "ENGINE_DIR",
) -> CalibrationPlan:
    """Check every option against the manifest before anything runs."""

    for name, value in (("--steps", steps), ("--samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} | got {value!r} | expected an integer >= 1")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= steps:
        raise ConfigError(
            f"--full-steps | got {budget!r} | expected 1..{steps} (step 0 is always one of them)"
        )
    if metric not in METRIC_OPTIONS:
        raise ConfigError(f"--metric | got {metric!r} | expected one of {', '.join(METRIC_OPTIONS)}")
    denoising = manifest.denoising
    assert denoising is not None  # checked when the manifest was read
    scheduler = scheduler or default_scheduler(denoising)
    timesteps = make_scheduler(scheduler, steps, denoising).timesteps.numpy() * denoising.timestep_scale
    low, high = denoising.timestep_range
    slack = 1e-6 * max(abs(high), 1.0)
    if timesteps.min() < low - slack or timesteps.max() > high + slack:
        raise ConfigError(
            f"{where} | serves timesteps [{low:g}, {high:g}], the {steps} {scheduler} steps span "
            f"[{timesteps.min():g}, {timesteps.max():g}] | calibrate engines that serve a whole schedule "
            "(not one expert of a two-expert model)"
        )
    batch = sample_batch_size(manifest, samples, batch_size, remainder_option="--samples")
    return CalibrationPlan(
        steps=steps,
        budget=budget,
        samples=samples,
        batch_size=batch,
        scheduler=scheduler,
        metric=METRIC_OPTIONS[metric],
        seed=seed,
    )


def measure_change(
    session: ForaSession,
    plan: CalibrationPlan,
    conditioning: dict[str, np.ndarray],
    *,
    progress: StageProgress | None = None,
) -> tuple[dict[str, list[float | None]], dict[str, Any], list[float]]:
    """Run ``plan.samples`` generations with every step full; per measure of
    :data:`~fora_runtime.calibration.METRICS`, the mean change at each step (None at step 0).
    Also the scheduler's description and the graph timesteps."""
    import torch

    manifest = session.manifest
    denoising = manifest.denoising
    assert denoising is not None  # checked when the manifest was read
    latents_spec = manifest.latents_input
    latents_dtype = numpy_dtype(latents_spec.dtype)
    channels = np.arange(denoising.latent_channels)
    every_step = CacheSchedule.interval_of(1)
    sums = {name: np.zeros(plan.steps) for name in METRICS}
    generator = torch.Generator().manual_seed(plan.seed)
    noise = torch.randn(plan.samples, *latents_spec.concrete_shape(1)[1:], generator=generator)
    scheduler: Any = None
    for start, end in plan.chunks:
        if progress is not None:
            progress.stage(f"samples {start + 1}-{end} of {plan.samples}: {plan.steps} full steps")
        scheduler = make_scheduler(plan.scheduler, plan.steps, denoising)
        timesteps = scheduler.timesteps.numpy() * denoising.timestep_scale
        chunk: dict[str, Any] = {name: value[start:end] for name, value in conditioning.items()}
        generation = session.start(
            plan.steps, end - start, schedule=every_step, timesteps=timesteps.astype(np.float32), **chunk
        )
        latents = noise[start:end].clone()
        previous: dict[str, np.ndarray] | None = None
        for k, t in enumerate(scheduler.timesteps):
            output = generation.step(latents.numpy().astype(latents_dtype))
            caches = {
                name: np.asarray(value, dtype=np.float64).reshape(end - start, -1)
                for name, value in session.read_caches(end - start).items()
            }
            if previous is not None:
                for name, value in caches.items():
                    before = previous[name]
                    diff = value - before
                    for metric, norm in (("rel_l1", 1), ("rel_l2", 2)):
                        per_sample = np.linalg.norm(diff, ord=norm, axis=1) / np.maximum(
                            np.linalg.norm(before, ord=norm, axis=1), _TINY
                        )
                        sums[metric][k] += float(per_sample.sum())
            previous = caches
            prediction = np.take(np.asarray(output, dtype=np.float32), channels, axis=denoising.channel_axis)
            latents = scheduler.step(torch.from_numpy(prediction), t, latents).prev_sample
    count = plan.samples * len(manifest.caches)
    change: dict[str, list[float | None]] = {
        name: [None, *(float(v) / count for v in values[1:])] for name, values in sums.items()
    }
    described = {
        "name": plan.scheduler,
        "class": type(scheduler).__name__,
        "config": json.loads(json.dumps(dict(scheduler.config), default=str)),
    }
    graph_timesteps = [float(t) for t in scheduler.timesteps.numpy() * denoising.timestep_scale]
    return change, described, graph_timesteps


# -- the whole command --------------------------------------------------------------------
@dataclass
class CalibrationResult:
    folder: Path
    file: Path
    record: CalibrationRecord
    #: Full steps spread evenly (the comparison the file records the drift of).
    uniform: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_dir": str(self.folder),
            "file": self.file.name,
            "uniform_full_steps": list(self.uniform),
            **self.record.to_dict(),
        }


def _verify_except_calibrations(manifest: Manifest, folder: Path, verify: str) -> None:
    """Every listed file but the calibrated schedules (a broken one is what a new calibration
    replaces, so it must not stop it), checked as ``verify`` says."""
    calibrated = set(manifest.calibrated_schedules.values())
    for name in manifest.files:
        if name not in calibrated:
            verify_listed_file(manifest, folder, name, verify, fix="rebuild the engines")  # type: ignore[arg-type]


def _signing_key(folder: Path, access: FolderAccess) -> bytes | None:
    """The key to re-sign a signed folder with after its manifest changes (the one its
    signature is checked with), or None for an unsigned folder; a signed folder without a
    key is refused before any work (its signature would no longer match)."""
    if not (folder / SIGNATURE_NAME).exists():
        return None
    key = resolve_manifest_key(None, access.manifest_key_file)
    if key is None:
        raise ConfigError(
            f"{folder} | is signed ({SIGNATURE_NAME}), and calibrating rewrites its manifest | pass the "
            "signing key (--key-file FILE or $FORA_MANIFEST_KEY) to re-sign it"
        )
    return key


def calibrate(
    engine_dir: str | Path,
    *,
    steps: int,
    budget: int,
    samples: int = 20,
    scheduler: str | None = None,
    metric: str = "l1",
    seed: int = 1,
    batch_size: int | None = None,
    backend: str = "onnxruntime",
    conditioning: dict[str, np.ndarray] | None = None,
    progress: bool | None = None,
    access: FolderAccess = DEFAULT_ACCESS,
) -> CalibrationResult:
    """Measure, choose and write the calibrated schedule of ``steps`` steps with ``budget``
    full steps (see the module docstring). ``conditioning``: one value per sample for each
    conditioning input (default: :func:`calibration_conditioning`). ``access``: how the
    folder is opened; a signed folder is checked with its key and re-signed with it."""
    folder = Path(engine_dir)
    manifest = load_manifest(folder, verify="none", manifest_key_file=access.manifest_key_file)
    _verify_except_calibrations(
        manifest, folder, "full" if (folder / SIGNATURE_NAME).exists() else access.verify
    )
    key = _signing_key(folder, access)
    plan = plan_calibration(
        manifest,
        steps=steps,
        budget=budget,
        samples=samples,
        scheduler=scheduler,
        metric=metric,
        seed=seed,
        batch_size=batch_size,
        where=str(folder),
    )
    if conditioning is None:
        conditioning, described = calibration_conditioning(manifest, samples, seed)
    else:
        described = "given by the caller: " + ", ".join(sorted(conditioning))
    started = time.perf_counter()
    with (
        StageProgress(len(plan.chunks), title="calibrate", enabled=progress) as bar,
        ForaSession(
            folder,
            backend=backend,
            verify="none",  # checked above (all but the calibrations)
            trust_programs=access.trust_programs,
            manifest_key_file=access.manifest_key_file,
        ) as session,
    ):
        change, scheduler_record, timesteps = measure_change(session, plan, conditioning, progress=bar)
    seconds = time.perf_counter() - started
    full_steps, cost = select_full_steps(change[plan.metric], plan.budget)
    uniform = uniform_full_steps(plan.steps, plan.budget)
    record = CalibrationRecord(
        steps=plan.steps,
        full_steps=full_steps,
        metric=plan.metric,
        change=change,
        cost=cost,
        uniform_cost=accumulated_drift(change[plan.metric], uniform),
        scheduler=scheduler_record,
        timesteps=timesteps,
        samples=plan.samples,
        seed=plan.seed,
        conditioning=described,
        config_hash=manifest.config_hash,
        written_by=f"fora-export {fora_export.__version__}",
        seconds=round(seconds, 3),
    )
    path = write_calibration(folder, record, signing_key=key)
    return CalibrationResult(folder=folder, file=path, record=record, uniform=uniform)


def write_calibration(
    folder: str | Path, record: CalibrationRecord, *, signing_key: bytes | None = None
) -> Path:
    """Write ``record`` into the engine folder and list it in the manifest (replacing an
    earlier calibration of the same step count). The file gets a new name and the manifest
    is replaced atomically, so at every moment the manifest lists complete, matching files;
    the replaced file is deleted last. ``signing_key``: re-sign the folder's manifest (a
    signed folder between the manifest's and the signature's replacement is refused with
    a one-line error until calibrate reruns)."""
    folder = Path(folder)
    manifest = load_manifest(folder, verify="none")
    text = record.to_json().encode()
    digest = hashlib.sha256(text).hexdigest()
    name = schedule_file_name(record.steps, digest)
    path = folder / name
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    old = manifest.calibrated_schedules.get(record.steps)
    try:
        tmp.write_bytes(text)
        os.replace(tmp, path)
        files = {file: entry for file, entry in manifest.files.items() if file != old}
        files[name] = file_record(path)
        updated = dataclasses.replace(
            manifest,
            files=files,
            calibrated_schedules={**manifest.calibrated_schedules, record.steps: name},
        )
        updated.write(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if name != old:
            path.unlink(missing_ok=True)
        raise
    if signing_key is not None:
        sign_folder(folder, signing_key)
    if old is not None and old != name:
        (folder / old).unlink(missing_ok=True)
    return path
