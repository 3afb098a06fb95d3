"""Calibrated schedules: the file ``fora-export calibrate`` writes into an engine folder.

Calibration runs generations with every step full, measures how much the caches change
from step to step, and picks the full steps of one step count (see
``fora_export.calibrate``). This module is the runtime's side of the result, stdlib
only: the schedule file's format (:class:`CalibrationRecord`), reading it back with its
sha256 checked against the manifest, and :class:`CalibratedSchedules`, what
``schedule="calibrated"`` resolves to: for a generation of S steps, the schedule
calibrated for S steps, or a one-line :class:`ScheduleError` when there is none.

The manifest lists each file in ``files`` (bytes, sha256) and maps its step count to it
in ``calibrated_schedules``. The file carries everything the choice came from: step
count, scheduler and its timesteps, samples, seed, the per-step change curves and the
accumulated drift of the chosen schedule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fora_runtime.errors import ManifestError, ScheduleError
from fora_runtime.manifest import MANIFEST_NAME, Manifest, verify_listed_file
from fora_runtime.schedule import CacheSchedule

#: ``format`` of a schedule file; another value is refused.
FORMAT = "fora-calibrated-schedule/1"
#: What ``schedule="calibrated"`` (CLI ``--schedule calibrated``) asks for.
CALIBRATED = "calibrated"
#: Change measures a calibration records per step (relative L1 and L2 of the caches).
METRICS = ("rel_l1", "rel_l2")


def schedule_file_name(steps: int, sha256: str) -> str:
    """``calibrated-<steps>-<sha8>.json``: a new calibration gets a new name, so the manifest
    never lists a file that is being replaced."""
    return f"calibrated-{steps}-{sha256[:8]}.json"


@dataclass(frozen=True)
class CalibrationRecord:
    """One calibrated schedule and the measurements it was chosen from."""

    steps: int
    full_steps: tuple[int, ...]
    #: The change measure the choice minimised (one of :data:`METRICS`).
    metric: str
    #: Per measure, the mean change of the caches at each step from the step before, over
    #: samples and cache tensors; index 0 is None (no step before it).
    change: dict[str, list[float | None]]
    #: The accumulated drift (sum over reuse steps of the change since their full step) of
    #: the chosen schedule, and of evenly spaced full steps of the same count.
    cost: float
    uniform_cost: float
    #: ``{"name": "ddim", "class": ..., "config": {...}}`` and its timesteps (graph convention).
    scheduler: dict[str, Any]
    timesteps: list[float]
    samples: int
    seed: int
    #: How the calibration generations were conditioned, in words.
    conditioning: str
    #: The engines' ``config_hash``: a file from another folder is refused.
    config_hash: str
    #: Who wrote it (fora-export version) and how long the measurement took.
    written_by: str = ""
    seconds: float = 0.0

    @property
    def schedule(self) -> CacheSchedule:
        return CacheSchedule.calibrated(self.full_steps, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "steps": self.steps,
            "full_steps": list(self.full_steps),
            "num_full": len(self.full_steps),
            "metric": self.metric,
            "cost": self.cost,
            "uniform_cost": self.uniform_cost,
            "scheduler": self.scheduler,
            "timesteps": list(self.timesteps),
            "samples": self.samples,
            "seed": self.seed,
            "conditioning": self.conditioning,
            "config_hash": self.config_hash,
            "written_by": self.written_by,
            "seconds": self.seconds,
            "change": {name: list(values) for name, values in self.change.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> CalibrationRecord:
        def bad(what: str) -> ManifestError:
            return ManifestError(f"{where} | {what} | calibrate again (fora-export calibrate)")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise bad(f"format {found!r}, expected {FORMAT!r}")
        try:
            steps = data["steps"]
            change = {str(name): list(values) for name, values in data["change"].items()}
            record = cls(
                steps=steps,
                full_steps=tuple(data["full_steps"]),
                metric=str(data["metric"]),
                change=change,
                cost=float(data["cost"]),
                uniform_cost=float(data["uniform_cost"]),
                scheduler=dict(data["scheduler"]),
                timesteps=[float(t) for t in data["timesteps"]],
                samples=int(data["samples"]),
                seed=int(data["seed"]),
                conditioning=str(data["conditioning"]),
                config_hash=str(data["config_hash"]),
                written_by=str(data.get("written_by", "")),
                seconds=float(data.get("seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise bad(f"missing or malformed field ({type(err).__name__}: {err})") from err
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise bad(f"steps {steps!r}, expected an integer >= 1")
        try:
            record.schedule  # noqa: B018 - checks the full steps (ints, step 0 first, below steps)
        except ScheduleError as err:
            raise bad(
                f"full steps {list(record.full_steps)} are not a schedule of {steps} steps (integers, "
                f"0 first, all below {steps})"
            ) from err
        if record.metric not in METRICS or sorted(change) != sorted(METRICS):
            raise bad(f"metric {record.metric!r} / curves {sorted(change)}, expected one of {list(METRICS)}")
        for name, values in change.items():
            finite = all(isinstance(v, int | float) and math.isfinite(v) for v in values[1:])
            if len(values) != steps or values[0] is not None or not finite:
                raise bad(f"change curve {name!r} is not {steps} values (None, then finite numbers)")
        if len(record.timesteps) != steps:
            raise bad(f"{len(record.timesteps)} timesteps for {steps} steps")
        return record


def read_calibration(manifest: Manifest, folder: str | Path, steps: int) -> CalibrationRecord:
    """The calibration of ``steps`` steps the manifest lists, its sha256 checked (always: a
    schedule file is small, and it decides which graph every step runs)."""
    folder = Path(folder)
    name = manifest.calibrated_schedules.get(steps)
    if name is None:
        have = sorted(manifest.calibrated_schedules)
        found = f"one for {', '.join(map(str, have))} steps only" if have else "none"
        raise ScheduleError(
            f"Calibrated schedule | {folder} has {found}, the generation has {steps} steps | calibrate "
            f"it: fora-export calibrate {folder} --steps {steps} --full-steps K"
        )
    fix = f"calibrate again: fora-export calibrate {folder} --steps {steps} --full-steps K"
    path = folder / name
    real = verify_listed_file(manifest, folder, name, "full", fix=fix)
    try:
        data = json.loads(real.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ManifestError(f"{path} | is not valid JSON ({type(err).__name__}) | {fix}") from err
    record = CalibrationRecord.from_dict(data, where=str(path))
    if record.steps != steps:
        raise ManifestError(
            f"{path} | calibrated for {record.steps} steps, {MANIFEST_NAME} lists it for {steps} | {fix}"
        )
    if record.config_hash != manifest.config_hash:
        raise ManifestError(
            f"{path} | calibrated on engines with config hash {record.config_hash}, these are "
            f"{manifest.config_hash} | {fix}"
        )
    return record


class CalibratedSchedules:
    """``schedule="calibrated"`` for one engine folder: each step count gets the schedule
    calibrated for it. Plans like a :class:`CacheSchedule` (``plan``, ``num_full``, ...);
    a step count without a calibration is a one-line :class:`ScheduleError`."""

    kind = CALIBRATED

    def __init__(self, manifest: Manifest, folder: str | Path) -> None:
        self.manifest = manifest
        self.folder = Path(folder)

    @property
    def steps(self) -> tuple[int, ...]:
        """The step counts calibrated so far."""
        return tuple(sorted(self.manifest.calibrated_schedules))

    def record(self, num_steps: int) -> CalibrationRecord:
        return read_calibration(self.manifest, self.folder, num_steps)

    def for_steps(self, num_steps: int) -> CacheSchedule:
        return self.record(num_steps).schedule

    def plan(self, num_steps: int) -> tuple[bool, ...]:
        return self.for_steps(num_steps).plan(num_steps)

    def num_full(self, num_steps: int) -> int:
        return sum(self.plan(num_steps))

    def ideal_speedup(self, num_steps: int) -> float:
        return num_steps / self.num_full(num_steps)

    def describe(self) -> str:
        counts = ", ".join(map(str, self.steps)) or "no step count yet"
        return f"calibrated ({counts})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": CALIBRATED, "steps": list(self.steps)}


#: What sessions and generations accept as a schedule.
Schedule = CacheSchedule | CalibratedSchedules


def resolve_schedule(
    schedule: CacheSchedule | CalibratedSchedules | str | None, manifest: Manifest, folder: str | Path
) -> CacheSchedule | CalibratedSchedules | None:
    """``"calibrated"`` as this folder's :class:`CalibratedSchedules`; schedules as they are."""
    if isinstance(schedule, str):
        if schedule != CALIBRATED:
            raise ScheduleError(
                f"Schedule | got {schedule!r} | pass a CacheSchedule, or '{CALIBRATED}' for the "
                "schedules fora-export calibrate wrote"
            )
        return CalibratedSchedules(manifest, folder)
    return schedule
