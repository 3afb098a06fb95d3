"""Which calls of a diffusers pipeline form one generation: pure (numpy only, no torch or
diffusers), so it is tested with plain values.

Pipelines never say when a run begins, so the drop-in decides at every call. A call
continues the running generation when there is one with steps left, planned from the
same scheduler timesteps object (``set_timesteps`` makes a new one, as every pipeline
call does), for the same batch size, and the call's timestep is the next planned one.
Otherwise it starts a new generation, planned over the scheduler's timesteps from the
one this call passes (one call per timestep; order-2 schedulers list theirs twice) up to
the last one these engines serve. A timestep that is neither the next one nor the
scheduler's first, in a running generation, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fora_runtime.errors import InputError


class PipelineError(InputError):
    """A pipeline called the engines in a way the build cannot serve (size, batch, steps)."""


def timestep_close(given: np.ndarray, planned: Any, eps: float) -> bool:
    """Whether the timesteps a call passes (one per sample) equal a planned one, within the
    rounding of the dtype they arrived in (``eps``: its machine epsilon; Flux rounds ``t``
    to the latents' dtype before dividing by 1000), twice, since both sides were rounded."""
    planned_array = np.asarray(planned, dtype=np.float64)
    tolerance = 2.0 * eps * max(float(np.abs(planned_array).max(initial=0.0)), 1.0)
    return bool(np.all(np.abs(np.asarray(given, dtype=np.float64) - planned_array) <= tolerance))


def plan_window(
    scheduled: np.ndarray, given: np.ndarray, eps: float, served: tuple[float, float], *, scale: float = 1.0
) -> np.ndarray:
    """The graph timesteps a new generation plans (float32): the scheduler's timesteps in the
    graphs' convention (``scheduled``), from the one this call passes (``given``) up to the
    last one the engines serve (``served``: [low, high]; an expert of a two-expert model
    serves part of the range)."""
    first = next((k for k, t in enumerate(scheduled) if timestep_close(given, t, eps)), None)
    if first is None:
        raise PipelineError(
            f"Timestep | the pipeline passed {float(given[0]):g}, which is not among its scheduler's "
            f"{len(scheduled)} timesteps (x {scale:g}, the engines' convention) | call the "
            "transformer with the scheduler's timesteps"
        )
    low, high = served
    slack = 1e-6 * max(abs(high), 1.0)
    inside = (scheduled >= low - slack) & (scheduled <= high + slack)
    if not inside[first]:
        raise PipelineError(
            f"Timestep | the pipeline passed {float(given[0]):g}, the engines serve [{low:g}, {high:g}] "
            "| call the engines of the expert that serves it (Wan 2.2: transformer for high noise, "
            "transformer_2 for low)"
        )
    last = first + int(np.argmin(inside[first:])) if not inside[first:].all() else len(scheduled)
    return np.ascontiguousarray(scheduled[first:last], dtype=np.float32)


@dataclass
class RunTracker:
    """The run one cache context is in: what its generation was planned from."""

    #: The scheduler's timesteps object the generation was planned from (identity marks a run).
    source: Any = None
    #: Planned graph timesteps of the generation, float32 [steps].
    planned: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    batch_size: int = 0

    def continues(
        self, source: Any, given: np.ndarray, eps: float, *, step: int | None, batch_size: int
    ) -> bool:
        """True when a call passing timesteps ``given`` is step ``step`` of the running
        generation (None: there is none, or it ran all its steps); False when it starts a
        new one; PipelineError when it is out of order."""
        if step is None or source is not self.source or batch_size != self.batch_size:
            return False
        expected = self.planned[step]
        if timestep_close(given, expected, eps):
            return True
        if not timestep_close(given, self.planned[0], eps):
            raise PipelineError(
                f"Timestep | the pipeline passed {float(given[0]):g} at step {step} of {len(self.planned)}, "
                f"its scheduler planned {float(expected):g} | call the transformer once per scheduler "
                "timestep, in order"
            )
        return False

    def started(self, source: Any, planned: np.ndarray, batch_size: int) -> None:
        """A generation was planned from ``source`` over ``planned``."""
        self.source, self.planned, self.batch_size = source, planned, batch_size

    def forget(self) -> None:
        """No generation to continue (a start failed)."""
        self.started(None, np.zeros(0, np.float32), 0)
