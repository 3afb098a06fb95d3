"""Which denoising steps run the full graph and which reuse the caches.

FORA recomputes every N steps and reuses the cached attention/MLP outputs in
between. There are two readings of "every N steps" (see docs/caching.md, "Schedules"):

- ``paper`` (default): step k (k = 0 is the first step) is full when k % N == 0.
- ``reference``: the FORA reference code counts an index i down from S-1 to 0
  and recomputes when ``i == S-1 or i % N == 0``. When (S-1) is not a multiple
  of N the two differ: with S=50, N=3 the reference recomputes at steps 0 and 1.

A schedule can also be an explicit list of full steps, or a calibrated one: an
explicit list chosen by ``fora-export calibrate`` for one step count, which it
plans and no other (``fora_runtime.calibration`` reads it from the engine folder).
The plan for a given number of steps is computed once, up front, as a tuple of
booleans.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from fora_runtime.errors import ScheduleError

IntervalMode = Literal["paper", "reference"]
INTERVAL_MODES: tuple[str, ...] = ("paper", "reference")


@dataclass(frozen=True)
class CacheSchedule:
    """A static FORA cache schedule.

    Build one with :meth:`interval` or :meth:`explicit`; call :meth:`plan` to get
    the per-step full/reuse decision for a generation of ``num_steps`` steps.
    """

    kind: Literal["interval", "explicit", "calibrated"]
    interval: int = 1
    mode: IntervalMode = "paper"
    full_steps: tuple[int, ...] = ()
    #: ``calibrated`` only: the step count it was calibrated for, the only one it plans.
    steps: int | None = None

    @classmethod
    def interval_of(cls, interval: int, mode: str = "paper") -> CacheSchedule:
        """Full every ``interval`` steps; ``interval=1`` disables caching."""
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise ScheduleError(f"Cache interval | got {interval!r} | expected an integer >= 1")
        if interval < 1:
            raise ScheduleError(
                f"Cache interval | got {interval} | expected an integer >= 1 (1 means no caching)"
            )
        if mode not in INTERVAL_MODES:
            raise ScheduleError(f"Schedule mode | got {mode!r} | expected one of {', '.join(INTERVAL_MODES)}")
        return cls(kind="interval", interval=interval, mode=mode)  # type: ignore[arg-type]

    @classmethod
    def explicit(cls, full_steps: Iterable[int]) -> CacheSchedule:
        """Full exactly at ``full_steps``; step 0 must be among them (caches start empty)."""
        steps = tuple(sorted(set(full_steps)))
        if not steps:
            raise ScheduleError("Explicit schedule | no full steps given | list at least step 0")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
            raise ScheduleError(f"Explicit schedule | got {steps!r} | expected integer step indices")
        if steps[0] < 0:
            raise ScheduleError(f"Explicit schedule | negative step {steps[0]} | steps count from 0")
        if steps[0] != 0:
            raise ScheduleError(
                f"Explicit schedule | first full step is {steps[0]} | step 0 must be full: "
                "there are no caches to reuse before the first full step"
            )
        return cls(kind="explicit", full_steps=steps)

    @classmethod
    def calibrated(cls, full_steps: Iterable[int], steps: int) -> CacheSchedule:
        """Full at ``full_steps`` (chosen by calibration), for generations of ``steps`` steps only."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ScheduleError(f"Calibrated schedule | step count {steps!r} | expected an integer >= 1")
        listed = cls.explicit(full_steps)
        if listed.full_steps[-1] >= steps:
            raise ScheduleError(
                f"Calibrated schedule | full step {listed.full_steps[-1]} is past the last of its {steps} "
                "steps | calibrate again"
            )
        return cls(kind="calibrated", full_steps=listed.full_steps, steps=steps)

    def plan(self, num_steps: int) -> tuple[bool, ...]:
        """``plan[k]`` is True when step k runs the full graph."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ScheduleError(f"Number of steps | got {num_steps!r} | expected an integer >= 1")
        if self.kind == "calibrated" and num_steps != self.steps:
            raise ScheduleError(
                f"Calibrated schedule | calibrated for {self.steps} steps, the generation has {num_steps} "
                f"| run {self.steps} steps, or calibrate for {num_steps}: fora-export calibrate ENGINE_DIR "
                f"--steps {num_steps} --full-steps K"
            )
        if self.kind in ("explicit", "calibrated"):
            if self.full_steps[-1] >= num_steps:
                raise ScheduleError(
                    f"Explicit schedule | full step {self.full_steps[-1]} is past the last step "
                    f"{num_steps - 1} | list steps below {num_steps}"
                )
            full = set(self.full_steps)
            return tuple(k in full for k in range(num_steps))
        n = self.interval
        if self.mode == "paper":
            return tuple(k % n == 0 for k in range(num_steps))
        last = num_steps - 1
        return tuple((last - k) == last or (last - k) % n == 0 for k in range(num_steps))

    def num_full(self, num_steps: int) -> int:
        return sum(self.plan(num_steps))

    def ideal_speedup(self, num_steps: int) -> float:
        """Speedup over no caching if reuse steps were free: S / (number of full steps)."""
        return num_steps / self.num_full(num_steps)

    def describe(self) -> str:
        if self.kind == "calibrated":
            return f"calibrated for {self.steps} steps: full at {list(self.full_steps)}"
        if self.kind == "explicit":
            return f"explicit full steps {list(self.full_steps)}"
        if self.interval == 1:
            return "no caching (N=1)"
        return f"full every {self.interval} steps ({self.mode})"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "calibrated":
            return {"kind": "calibrated", "steps": self.steps, "full_steps": list(self.full_steps)}
        if self.kind == "explicit":
            return {"kind": "explicit", "full_steps": list(self.full_steps)}
        return {"kind": "interval", "interval": self.interval, "mode": self.mode}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSchedule:
        kind = data.get("kind")
        if kind == "interval":
            return cls.interval_of(data.get("interval"), data.get("mode", "paper"))  # type: ignore[arg-type]
        if kind == "explicit":
            return cls.explicit(data.get("full_steps", ()))
        if kind == "calibrated":
            return cls.calibrated(data.get("full_steps", ()), data.get("steps"))  # type: ignore[arg-type]
        raise ScheduleError(
            f"Schedule | unknown kind {kind!r} | expected 'interval', 'explicit' or 'calibrated'"
        )
