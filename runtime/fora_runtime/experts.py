"""Generations across the experts of one model (Wan 2.2 A14B: ``transformer`` for high
noise, ``transformer_2`` for low noise, switched at ``boundary_ratio``).

Each expert is its own engine folder, and its manifest records the timesteps it
serves (``denoising.timestep_range``). A generation across them gives every timestep
to the expert that serves it and restarts FORA at the switch: each expert's first
step is full, caches never cross experts, and each expert's schedule counts its own
steps (a 40-step run split 14/26 at N=3 is plans of 14 and 26 steps).

    with ForaSession("engines/wan-high") as high, ForaSession("engines/wan-low") as low:
        gen = start_across_experts([high, low], batch_size=2, timesteps=scheduler.timesteps,
                                   encoder_hidden_states=text)
        for t in scheduler.timesteps:
            velocity = gen.step(latents)
            latents = scheduler.step(velocity, t, latents).prev_sample
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fora_runtime.backends.base import host_copy
from fora_runtime.errors import InputError
from fora_runtime.generation import Generation
from fora_runtime.schedule import CacheSchedule
from fora_runtime.session import ForaSession


class ExpertGeneration:
    """One sampling run whose steps go to several experts' generations, in turn."""

    def __init__(self, parts: list[tuple[ForaSession, Generation]]) -> None:
        self._parts = parts
        self._current = 0
        self.step_index = 0

    @property
    def num_steps(self) -> int:
        return sum(gen.num_steps for _, gen in self._parts)

    @property
    def plan(self) -> tuple[bool, ...]:
        """Full (True) or reuse per step, each expert's plan in turn."""
        return tuple(full for _, gen in self._parts for full in gen.plan)

    @property
    def num_full(self) -> int:
        return sum(self.plan)

    @property
    def steps_per_expert(self) -> tuple[int, ...]:
        return tuple(gen.num_steps for _, gen in self._parts)

    @property
    def expert(self) -> ForaSession:
        """The session of the expert that runs the next step."""
        return self._parts[min(self._current, len(self._parts) - 1)][0]

    def step(self, latents: Any, timestep: Any = None, **conditioning: Any) -> Any:
        """Run the next step on the expert that serves it (see :meth:`Generation.step`)."""
        while self._current < len(self._parts) - 1 and self._parts[self._current][1].done:
            self._current += 1
        output = self._parts[self._current][1].step(latents, timestep, **conditioning)
        self.step_index += 1
        return output


def start_across_experts(
    sessions: Sequence[ForaSession],
    batch_size: int,
    timesteps: Any,
    *,
    schedule: CacheSchedule | None = None,
    **conditioning: Any,
) -> ExpertGeneration:
    """Start a generation over ``timesteps`` (graph convention, high to low, as schedulers
    give them) on the experts ``sessions``: each timestep goes to the expert whose range
    holds it (the highest range first where two share a boundary)."""
    import numpy as np

    steps = np.asarray(host_copy(timesteps), dtype="float64").reshape(len(timesteps), -1)[:, 0]
    ranked = sorted(sessions, key=lambda s: _range(s)[1], reverse=True)
    owner = []
    for value in steps:
        holder = next((i for i, s in enumerate(ranked) if _range(s)[0] <= value <= _range(s)[1]), None)
        if holder is None:
            ranges = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in (_range(s) for s in ranked))
            raise InputError(
                f"start_across_experts() timesteps | {value:g} is served by no expert (ranges {ranges}) "
                "| pass every expert's engines, or timesteps inside their ranges"
            )
        owner.append(holder)
    if owner != sorted(owner):
        raise InputError(
            "start_across_experts() timesteps | the experts' steps interleave | pass the schedule's "
            "timesteps in order, from high noise to low"
        )
    parts = []
    for index, session in enumerate(ranked):
        mine = [k for k, o in enumerate(owner) if o == index]
        if mine:
            gen = session.start(
                len(mine),
                batch_size,
                schedule=schedule,
                timesteps=np.asarray(timesteps)[mine],
                **conditioning,
            )
            parts.append((session, gen))
    return ExpertGeneration(parts)


def _range(session: ForaSession) -> tuple[float, float]:
    denoising = session.manifest.denoising
    if denoising is None:
        raise InputError(f"{session.engine_dir} | the manifest has no timestep range | rebuild the engines")
    return denoising.timestep_range
