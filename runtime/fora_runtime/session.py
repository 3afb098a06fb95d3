"""``ForaSession``: load an engine folder once, then run FORA-cached generations.

A session owns one backend (both graphs loaded once) and, per batch size, one
set of buffers including the cache arena. Two sessions never share buffers.

Generations make the step index explicit: ``session.start(num_steps, batch)``
returns a :class:`Generation` whose ``step()`` runs full or reuse according to
the schedule. Starting a new generation invalidates the previous one, so a
caller cannot reuse caches written by another generation or batch size.

    with ForaSession("engines/demo-dit") as session:
        gen = session.start(num_steps=20, batch_size=2)
        for t in timesteps:
            noise = gen.step(latents, t, class_labels=labels)
            latents = scheduler.step(noise, t, latents).prev_sample

When the timesteps are known up front (schedulers know them), pass them and the
conditioning to ``start``: builds with gate-table graphs then compute the gates
of every step in one call, and each reuse step only reads caches. ``step`` then
needs only the latents:

        gen = session.start(20, 2, timesteps=scheduler.timesteps, class_labels=labels)
        for t in scheduler.timesteps:
            noise = gen.step(latents)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fora_runtime.backends.base import StepBackend, create_backend, in_family_of
from fora_runtime.calibration import CalibratedSchedules, resolve_schedule
from fora_runtime.errors import InputError
from fora_runtime.generation import GateTable, Generation, OneCallAtATime, StepRunner, forecast_weights
from fora_runtime.inputs import StepInputs
from fora_runtime.manifest import (
    GRAPH_ROLES,
    MANIFEST_NAME,
    GraphRole,
    InputSpec,
    Manifest,
    VerifyMode,
    open_engine_folder,
)
from fora_runtime.schedule import CacheSchedule


class ForaSession:
    """Runs the full/reuse graphs of one engine folder with a cache schedule."""

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        backend: str = "onnxruntime",
        schedule: CacheSchedule | CalibratedSchedules | str | None = None,
        verify: VerifyMode = "stamp",
        trust_programs: bool = False,
        manifest_key: str | bytes | None = None,
        manifest_key_file: str | Path | None = None,
        check_inputs: bool = True,
        gate_table: bool = True,
        forecast: bool | None = None,
        detect_nonfinite: bool = False,
        **backend_options: Any,
    ) -> None:
        """``schedule``: the default of every generation (None: the manifest's; ``"calibrated"``:
        for each step count the schedule ``fora-export calibrate`` wrote for it).
        ``verify``: how the folder's files are checked on open (``stamp``: size and a
        stamp of each, ``full``: sha256 of each, ``none``). ``trust_programs=True`` vouches
        for the folder: torch programs (which run code when loaded) and TensorRT plugin
        layers are then allowed; a manifest signed under ``manifest_key`` /
        ``manifest_key_file`` / ``$FORA_MANIFEST_KEY`` is trusted too (docs/trust.md).
        ``check_inputs=False`` skips the per-step shape, dtype and value checks (for hot
        loops whose inputs are known good; a bad input then fails inside the backend).
        ``gate_table=False`` never precomputes gates (reuse steps compute their own).
        ``forecast`` (forecast builds, ``build --forecast``): None forecasts wherever the
        generation has a gate table; True refuses generations that cannot; False never
        forecasts (static FORA, one cache generation).
        ``detect_nonfinite=True`` makes every step check its prediction for NaN/Inf and raise
        :class:`NonFiniteError` naming the step (each generation's ``detect_nonfinite`` starts
        as this; it reads every prediction, a device sync per step on GPUs: leave it off in
        hot loops)."""
        self.engine_dir = Path(engine_dir)
        folder = open_engine_folder(
            self.engine_dir, verify=verify, manifest_key=manifest_key, manifest_key_file=manifest_key_file
        )
        self.manifest: Manifest = folder.manifest
        #: True when the folder may load code (torch programs, TensorRT plugins).
        self.trusted = trust_programs or folder.signed
        self.schedule: CacheSchedule | CalibratedSchedules = (
            resolve_schedule(schedule, self.manifest, self.engine_dir) or self.manifest.schedule
        )
        if forecast and not self.manifest.has_forecast:
            raise InputError(
                f"ForaSession forecast | {self.engine_dir / MANIFEST_NAME} was built without --forecast | "
                "rebuild with `fora-export build --forecast`, or leave forecast off"
            )
        self.backend: StepBackend = create_backend(
            backend,
            self.manifest,
            self.engine_dir,
            gate_table=gate_table,
            forecast=forecast is not False,
            trust_programs=self.trusted,
            **backend_options,
        )
        if forecast and not (gate_table and self.backend.supports_forecast):
            raise InputError(
                f"ForaSession forecast | backend '{backend}'{'' if gate_table else ' without a gate table'} "
                "cannot forecast | use the onnxruntime or torch backend with gate_table=True, or "
                "forecast=False"
            )
        self.forecast = forecast
        self._inputs = StepInputs(
            self.manifest, self.backend, where=str(self.engine_dir / MANIFEST_NAME), check=check_inputs
        )
        #: The inputs each step feeds the graphs, with their roles (manifest order).
        self.step_inputs: tuple[InputSpec, ...] = self._inputs.specs
        self.latents_name = self._inputs.latents_name
        self.timestep_name = self._inputs.timestep_name
        self.detect_nonfinite = detect_nonfinite
        # The runner of the current generation; retired (so that generation is stale) when
        # anything else uses the buffers.
        self._runner: StepRunner | None = None
        self._calls = OneCallAtATime(str(self.engine_dir))

    @property
    def check_inputs(self) -> bool:
        return self._inputs.check

    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        self._calls.acquire(what)
        try:
            yield
        finally:
            self._calls.release()

    # -- lifecycle ------------------------------------------------------------------
    def activate(self) -> ForaSession:
        with self._exclusive("activate()"):
            self.backend.activate()
        return self

    def deactivate(self) -> None:
        with self._exclusive("deactivate()"):
            self._retire()
            self.backend.deactivate()

    def __enter__(self) -> ForaSession:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- generations ----------------------------------------------------------------
    def start(
        self,
        num_steps: int,
        batch_size: int,
        *,
        schedule: CacheSchedule | CalibratedSchedules | str | None = None,
        timesteps: Any = None,
        forecast: bool | None = None,
        **conditioning: Any,
    ) -> Generation:
        """Begin a new generation; earlier generations of this session become stale.

        ``schedule`` overrides the session's for this generation (``"calibrated"``: the
        schedule calibrated for ``num_steps``; another step count is a ScheduleError).

        ``timesteps`` (one per step, each a number or one per sample) and the
        generation's conditioning (e.g. ``class_labels``) are optional; given, steps
        may omit them, and where the build and backend allow, the gates of every
        step are computed here at once (:attr:`Generation.uses_gate_table`), on forecast
        builds with each reuse step's forecast weights (``forecast`` overrides the
        session's: True needs the timesteps, False reuses plainly). The generation
        checks its predictions for NaN/Inf when the session does (its ``detect_nonfinite``
        attribute switches that per generation).
        """
        with self._exclusive("start()"):
            return self._start(num_steps, batch_size, schedule, timesteps, forecast, conditioning)

    def _start(
        self,
        num_steps: int,
        batch_size: int,
        schedule: CacheSchedule | CalibratedSchedules | str | None,
        timesteps: Any,
        forecast: bool | None,
        conditioning: dict[str, Any],
    ) -> Generation:
        batch_size = self._inputs.check_batch(batch_size)
        plan = (resolve_schedule(schedule, self.manifest, self.engine_dir) or self.schedule).plan(num_steps)
        planned = None
        if timesteps is not None:
            planned = self._inputs.plan(timesteps, conditioning, len(plan), batch_size)
        elif conditioning:
            raise InputError(
                f"start() | got conditioning {sorted(conditioning)} without timesteps | pass "
                "timesteps too, or pass conditioning to each step()"
            )
        wanted = self.forecast if forecast is None else forecast
        if wanted and not (planned is not None and self.backend.forecast_enabled):
            why = "without timesteps" if planned is None else "on engines or a session that cannot forecast"
            raise InputError(
                f"start() forecast | asked for {why} | pass timesteps to start() on a forecast build "
                "(fora-export build --forecast), or forecast=False"
            )
        buffers = self.backend.buffers(batch_size)
        table = None
        if planned is not None and self.backend.gate_table_enabled:
            # Rows for the reuse steps only: full steps compute their own gates.
            reuse_steps = [index for index, full in enumerate(plan) if not full]
            if reuse_steps:
                names = tuple(spec.name for spec in self.manifest.graphs[GraphRole.GATES].inputs)
                rows = planned.rows(batch_size, reuse_steps, names)
                weights, forecast_steps = None, frozenset[int]()
                if wanted is not False and self.backend.forecast_enabled:
                    per_step, forecast_steps = forecast_weights(plan, planned.timesteps, batch_size)
                    weights = self.backend.upload(per_step[reuse_steps].reshape(-1))  # rows as the table's
                table = GateTable(self.backend.gate_table(rows), reuse_steps, weights, forecast_steps)
        self._retire()
        self._runner = StepRunner(self.backend, self._inputs, buffers, self._calls)
        return Generation(
            self._runner,
            plan,
            planned,
            table,
            detect_nonfinite=self.detect_nonfinite,
            where=str(self.engine_dir),
        )

    def drop_build_constants(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` without the build constants among them, each checked to equal the
        value the graphs were built with (e.g. Flux's position ids for the built size)."""
        return self._inputs.drop_build_constants(inputs)

    def reset(self) -> None:
        """Invalidate the current generation (its caches can no longer be reused)."""
        with self._exclusive("reset()"):
            self._retire()

    def _retire(self) -> None:
        if self._runner is not None:
            self._runner.retire()
            self._runner = None

    # -- single steps (validate, bench) -------------------------------------------
    def run_step(self, role: str, batch_size: int, inputs: dict[str, Any]) -> Any:
        """Run one graph outside any generation. ``reuse`` reads whatever the last
        ``full`` of this batch size wrote. Invalidates the current generation."""
        if role not in GRAPH_ROLES:
            raise InputError(f"Graph role | got {role!r} | expected 'full' or 'reuse'")
        with self._exclusive("run_step()"):
            batch_size = self._inputs.check_batch(batch_size)
            buffers = self.backend.buffers(batch_size)
            self._retire()
            self._inputs.stage(buffers, inputs)
            (self.backend.run_full if role == GraphRole.FULL else self.backend.run_reuse)(buffers)
            prediction = self.backend.read_prediction(buffers)
        return in_family_of(prediction, inputs.get(self.latents_name))

    def cache_views(self, batch_size: int) -> dict[str, Any]:
        """The live cache buffers of ``batch_size`` (the backend's own arrays, not copies)."""
        with self._exclusive("cache_views()"):
            return self.backend.buffers(batch_size).caches

    def read_caches(self, batch_size: int) -> dict[str, Any]:
        """Host (numpy) copies of the caches of ``batch_size`` (for validation)."""
        with self._exclusive("read_caches()"):
            return self.backend.read_caches(self.backend.buffers(batch_size))
