"""A generation: one sampling run of a :class:`~fora_runtime.session.ForaSession`.

It tracks the step index against the cache schedule's plan and, when the
timesteps and conditioning were given to ``start``, holds them
(:class:`PlannedInputs`) and the gate table computed from them (:class:`GateTable`),
with, on forecast builds, each reuse step's forecast weights (:func:`forecast_weights`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fora_runtime.backends.base import host_array, host_copy
from fora_runtime.errors import GenerationError, InputError, NonFiniteError

if TYPE_CHECKING:
    from fora_runtime.session import StepRunner


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


class PlannedInputs:
    """A generation's timesteps and conditioning, given to ``start``."""

    def __init__(
        self, timesteps: Any, host: dict[str, Any], given: dict[str, Any], *, timestep_name: str
    ) -> None:
        self.timesteps = timesteps  # float32 [steps] or [steps, batch]
        self.timestep_name = timestep_name
        self.host = host  # host copies, for the gate table and for checks
        self.given = given  # as the caller passed them, staged on full steps

    def rows(self, batch_size: int, steps: list[int], names: tuple[str, ...]) -> dict[str, Any]:
        """Gate-table rows of ``steps`` for the inputs ``names`` (the gates graph's): step-major,
        ``batch_size`` rows per step. Other conditioning (text embeddings) is not tiled."""
        import numpy as np

        count = len(steps)
        planned = self.timesteps[steps].reshape(count, -1)
        timestep = np.broadcast_to(planned, (count, batch_size)).reshape(-1)
        # Copies: broadcast views are read-only, and backends may wrap rows without copying.
        rows = {self.timestep_name: np.array(timestep, copy=True)}
        for name, value in self.host.items():
            if name not in names:
                continue
            rows[name] = np.array(
                np.broadcast_to(value[None], (count, *value.shape)).reshape(-1, *value.shape[1:]),
                copy=True,
            )
        return rows

    def matches(self, step: int, timestep: Any, conditioning: dict[str, Any]) -> str | None:
        """None when host values given to a step equal the planned ones, else what differs.
        Device tensors are not compared (that would sync every step)."""
        import numpy as np

        def host_like(value: Any) -> bool:
            device = getattr(value, "device", None)
            return device is None or getattr(device, "type", "cpu") == "cpu"

        if timestep is not None and host_like(timestep):
            got = np.asarray(host_copy(timestep), dtype="float32")
            planned = self.timesteps[step]
            try:  # a number and one per sample both match when the values agree
                same = bool(np.all(np.equal(*np.broadcast_arrays(got, planned))))
            except ValueError:
                same = False
            if not same:
                return f"timestep {got.tolist()} at step {step}, start() planned {planned.tolist()}"
        for name, value in conditioning.items():
            if (
                name in self.host
                and host_like(value)
                and not np.array_equal(host_copy(value), self.host[name])
            ):
                return f"'{name}' differs from the one given to start()"
        return None


class Generation:
    """One sampling run: owns its step index against the schedule's plan, and runs each
    step through the :class:`~fora_runtime.session.StepRunner` its session gave it."""

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
        self.history: list[str] = []

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
                "reuse_forecast" if index in self._gate_table.forecast_steps else "reuse_gated"
            )
        else:
            prediction = runner.run(full, latents, timestep, conditioning)
            self.history.append("full" if full else "reuse")
        # The step ran (caches written): it counts even when its prediction is refused below.
        self.step_index += 1
        if self.detect_nonfinite:
            self._check_finite(prediction, latents, index, "full" if full else "reuse")
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
