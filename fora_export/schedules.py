"""The cache schedule a command runs, from its ``--interval`` / ``--schedule`` options."""

from __future__ import annotations

from pathlib import Path

from fora_export.errors import ConfigError
from fora_runtime.calibration import CALIBRATED, CalibratedSchedules
from fora_runtime.manifest import Manifest
from fora_runtime.schedule import CacheSchedule

#: ``--schedule`` values: the manifest's (default) or the calibrated one for the step count.
SCHEDULE_CHOICES = ("manifest", CALIBRATED)


def chosen_schedule(
    manifest: Manifest,
    engine_dir: str | Path,
    steps: int,
    *,
    interval: int | None = None,
    schedule: str | None = None,
) -> CacheSchedule:
    """``--interval N`` counted as the engines' own schedule counts (paper for explicit ones),
    ``--schedule calibrated`` the file calibrated for ``steps`` (a ScheduleError when there is
    none), else the manifest's schedule."""
    if schedule not in (None, *SCHEDULE_CHOICES):
        raise ConfigError(f"--schedule | got {schedule!r} | expected one of {', '.join(SCHEDULE_CHOICES)}")
    if schedule == CALIBRATED:
        if interval is not None:
            raise ConfigError("--interval | given with --schedule calibrated | pass one of them")
        return CalibratedSchedules(manifest, engine_dir).for_steps(steps)
    base = manifest.schedule
    if interval is None:
        return base
    mode = base.mode if base.kind == "interval" else "paper"
    return CacheSchedule.interval_of(interval, mode)


def default_steps(manifest: Manifest, schedule: str | None, steps: int | None, fallback: int = 20) -> int:
    """``--steps`` when given; with ``--schedule calibrated`` and one calibrated step count, that
    count; else ``fallback``."""
    if steps is not None:
        return steps
    if schedule == CALIBRATED and len(manifest.calibrated_schedules) == 1:
        return next(iter(manifest.calibrated_schedules))
    return fallback
