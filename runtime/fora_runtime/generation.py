"""A generation: one sampling run of a :class:`~fora_runtime.session.ForaSession`.

It tracks the step index against the cache schedule's plan and, when the
timesteps and conditioning were given to ``start``, holds them
(:class:`PlannedInputs`) and the gate table computed from them (:class:`GateTable`),
with, on forecast builds, each reuse step's forecast weights (:func:`forecast_weights`).
"""

from __future__ import annotations

import threading
from typing import Any

from fora_runtime.backends.base import StepBackend, StepBuffers, host_array, in_family_of
from fora_runtime.errors import ConcurrentUseError, GenerationError, InputError, NonFiniteError
from fora_runtime.inputs import PlannedInputs, StepInputs
from fora_runtime.manifest import GraphRole


class GateTable:
    """A backend's gate table and the step each block of ``batch`` rows belongs to; with a
    forecast, the forecast weight of each row (a backend array of the same rows) and the
    steps that forecast."""

    def __init__(
        self,
        table: Any,
        steps: list[int],
        forecast_weights: Any = None,
        forecast_steps: frozenset[int] = frozenset(),
    ) -> None:
        self.table = table
        self.block_of = {step: block for block, step in enumerate(steps)}
        self.forecast_weights = forecast_weights
        self.forecast_steps = forecast_steps


def forecast_weights(plan: tuple[bool, ...], timesteps: Any, batch_size: int) -> tuple[Any, frozenset[int]]:
    """Per step and sample, the weight ``w = (t - t_k) / (t_k - t_j)`` of the first-order
    forecast ``A(t) ~ A_k + w (A_k - A_j)`` from the last two full steps j < k before each
    reuse step (float32 ``[steps, batch]``, 0 where there is none), and the reuse steps
    that have two full steps before them (the earlier ones reuse plainly). A sample whose
    two full steps share a timestep (order-2 schedulers repeat them) gets w = 0."""
    import numpy as np

    times = np.asarray(timesteps, dtype=np.float64).reshape(len(plan), -1)
    times = np.broadcast_to(times, (len(plan), batch_size))
    weights = np.zeros((len(plan), batch_size), dtype=np.float32)
    steps = set()
    last = before = None
    for index, full in enumerate(plan):
        if full:
            before, last = last, index
            continue
        if before is None or last is None:
            continue
        span = times[last] - times[before]
        safe = np.where(span != 0, span, 1.0)
        weights[index] = np.where(span != 0, (times[index] - times[last]) / safe, 0.0)
        steps.add(index)
    return weights, frozenset(steps)


class Generation:
    """One sampling run: owns its step index against the schedule's plan, and runs each
    step through the :class:`StepRunner` its session gave it."""

    def __init__(
        self,
        runner: StepRunner,
        plan: tuple[bool, ...],
        planned: PlannedInputs | None = None,
        gate_table: GateTable | None = None,
        *,
        detect_nonfinite: bool = False,
        where: str = "",
    ) -> None:
        self._runner = runner
        self.plan = plan
        self._planned = planned
        self._gate_table = gate_table
        #: Check every prediction for NaN/Inf (a device sync per step on GPUs).
        self.detect_nonfinite = detect_nonfinite
        self._where = where
        self.step_index = 0
        #: The graph each step ran so far ("full", "reuse", "reuse_gated", "reuse_forecast").
        self.history: list[GraphRole] = []

    @property
    def uses_gate_table(self) -> bool:
        """True when reuse steps read gates computed at ``start`` (they only read caches)."""
        return self._gate_table is not None

    @property
    def uses_forecast(self) -> bool:
        """True when reuse steps after the second full step forecast the caches."""
        return self._gate_table is not None and self._gate_table.forecast_weights is not None

    @property
    def num_steps(self) -> int:
        return len(self.plan)

    @property
    def batch_size(self) -> int:
        return self._runner.batch_size

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.plan)

    @property
    def num_full(self) -> int:
        return sum(self.plan)

    def step(self, latents: Any, timestep: Any = None, **conditioning: Any) -> Any:
        """Run step ``step_index`` (full or reuse per the plan) and advance.

        ``timestep`` and the conditioning may be omitted when they were given to
        ``start``; given anyway, host values must equal the planned ones."""
        runner = self._runner
        runner.acquire("step()")
        try:
            prediction = self._step(runner, latents, timestep, conditioning)
        finally:
            runner.release()
        return prediction

    def _step(self, runner: StepRunner, latents: Any, timestep: Any, conditioning: dict[str, Any]) -> Any:
        runner.require_live()
        if self.done:
            raise GenerationError(
                f"Generation | all {self.num_steps} steps already ran | call session.start() for a new one"
            )
        index = self.step_index
        full = self.plan[index]
        planned = self._planned
        if planned is None:
            if timestep is None:
                raise InputError(
                    "Input 'timestep' | missing | pass it to step(), or the timesteps to start()"
                )
        else:
            if runner.check_inputs:
                problem = planned.matches(index, timestep, conditioning)
                if problem is not None:
                    raise InputError(f"step() | {problem} | pass the same values as to start(), or omit them")
            timestep = planned.timesteps[index] if timestep is None else timestep
            conditioning = {**planned.given, **conditioning}
        if not full and self._gate_table is not None:
            prediction = runner.run_gated(latents, self._gate_table, index)
            self.history.append(
                GraphRole.REUSE_FORECAST
                if index in self._gate_table.forecast_steps
                else GraphRole.REUSE_GATED
            )
        else:
            prediction = runner.run(full, latents, timestep, conditioning)
            self.history.append(GraphRole.FULL if full else GraphRole.REUSE)
        # The step ran (caches written): it counts even when its prediction is refused below.
        self.step_index += 1
        if self.detect_nonfinite:
            self._check_finite(prediction, latents, index, GraphRole.FULL if full else GraphRole.REUSE)
        return prediction

    def _check_finite(self, prediction: Any, latents: Any, index: int, kind: str) -> None:
        import numpy as np

        finite = np.isfinite(host_array(prediction))
        if finite.all():
            return
        try:
            cause = "held" if not np.isfinite(host_array(latents)).all() else "were finite"
        except TypeError:
            cause = "could not be read"
        raise NonFiniteError(
            f"Step {index} of {self.num_steps} ({kind}) | the prediction holds "
            f"{finite.size - int(finite.sum())} NaN/Inf values of {finite.size}; the latents passed "
            f"{cause}{' NaN/Inf' if cause == 'held' else ''} | check the latents and the scheduler (NaN "
            "latents propagate); engines of a model whose fp16 activations overflow (Flux) need "
            f"--precision bf16 ({self._where})"
        )


class OneCallAtATime:
    """Lets one thread at a time into a session: a call from a second thread while one runs
    raises :class:`ConcurrentUseError` instead of staging its inputs into the same buffers
    (which gave wrong results, silently). Not a queue, and not bound to a thread: a session
    may move between threads, one call at a time."""

    def __init__(self, where: str) -> None:
        self._lock = threading.Lock()
        self._holder = ""
        self._where = where

    def acquire(self, what: str) -> None:
        if not self._lock.acquire(blocking=False):
            raise ConcurrentUseError(
                f"ForaSession {self._where} | {what} called in thread '{threading.current_thread().name}' "
                f"while thread '{self._holder}' runs a call of the same session | a session serves "
                "one thread at a time: use one ForaSession per thread (each has its own caches), "
                "or serialise the calls with a lock"
            )
        self._holder = threading.current_thread().name

    def release(self) -> None:
        self._lock.release()


class StepRunner:
    """Runs the steps of one generation on its buffers: a :class:`Generation`'s only handle
    on its session.

    The session makes one per generation and retires it when another generation starts,
    a single step runs, or the session resets or deactivates: the buffers then hold
    another run's caches, so a retired runner refuses to run.
    """

    def __init__(
        self, backend: StepBackend, inputs: StepInputs, buffers: StepBuffers, calls: OneCallAtATime
    ) -> None:
        self._backend = backend
        self._inputs = inputs
        self._buffers = buffers
        self._calls = calls
        self._live = True

    @property
    def batch_size(self) -> int:
        return self._buffers.batch_size

    @property
    def check_inputs(self) -> bool:
        return self._inputs.check

    def retire(self) -> None:
        self._live = False

    def acquire(self, what: str) -> None:
        """Enter the session for one step (:class:`ConcurrentUseError` while another thread
        is in it); the generation calls :meth:`release` when the step is done."""
        self._calls.acquire(what)

    def release(self) -> None:
        self._calls.release()

    def require_live(self) -> None:
        if not self._live:
            raise GenerationError(
                "Generation | stale: the session started another generation or ran a single step "
                "since | call session.start() again"
            )

    def run(self, full: bool, latents: Any, timestep: Any, conditioning: dict[str, Any]) -> Any:
        """One full or reuse step with per-step gates; returns the prediction (a copy)."""
        self.require_live()
        inputs = self._inputs
        step_inputs = {inputs.latents_name: latents, inputs.timestep_name: timestep, **conditioning}
        inputs.stage(self._buffers, step_inputs)
        (self._backend.run_full if full else self._backend.run_reuse)(self._buffers)
        return in_family_of(self._backend.read_prediction(self._buffers), latents)

    def run_gated(self, latents: Any, table: GateTable, step: int) -> Any:
        """The reuse step ``step`` reading its gates from ``table`` (and its forecast weights,
        when ``table`` forecasts that step); returns the prediction."""
        self.require_live()
        name = self._inputs.latents_name
        self._inputs.stage(self._buffers, {name: latents}, only=(name,))
        first_row = table.block_of[step] * self.batch_size
        if step in table.forecast_steps:
            self._backend.run_reuse_forecast(self._buffers, table.table, first_row, table.forecast_weights)
        else:
            self._backend.run_reuse_gated(self._buffers, table.table, first_row)
        return in_family_of(self._backend.read_prediction(self._buffers), latents)
