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

import operator
from pathlib import Path
from typing import Any

from fora_runtime.backends.base import StepBackend, StepBuffers, create_backend, host_copy
from fora_runtime.errors import InputError
from fora_runtime.generation import GateTable, Generation, PlannedInputs
from fora_runtime.manifest import MANIFEST_NAME, InputSpec, Manifest, VerifyMode, open_engine_folder
from fora_runtime.schedule import CacheSchedule


class ForaSession:
    """Runs the full/reuse graphs of one engine folder with a cache schedule."""

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        backend: str = "onnxruntime",
        schedule: CacheSchedule | None = None,
        verify: VerifyMode = "stamp",
        trust_programs: bool = False,
        manifest_key: str | bytes | None = None,
        manifest_key_file: str | Path | None = None,
        check_inputs: bool = True,
        gate_table: bool = True,
        **backend_options: Any,
    ) -> None:
        """``verify``: how the folder's files are checked on open (``stamp``: size and a
        stamp of each, ``full``: sha256 of each, ``none``). ``trust_programs=True`` vouches
        for the folder: torch programs (which run code when loaded) and TensorRT plugin
        layers are then allowed; a manifest signed under ``manifest_key`` /
        ``manifest_key_file`` / ``$FORA_MANIFEST_KEY`` is trusted too (README, "Trust and
        safety"). ``check_inputs=False`` skips the per-step shape, dtype and value checks (for
        hot loops whose inputs are known good; a bad input then fails inside the backend).
        ``gate_table=False`` never precomputes gates (reuse steps compute their own)."""
        self.engine_dir = Path(engine_dir)
        folder = open_engine_folder(
            self.engine_dir, verify=verify, manifest_key=manifest_key, manifest_key_file=manifest_key_file
        )
        self.manifest: Manifest = folder.manifest
        #: True when the folder may load code (torch programs, TensorRT plugins).
        self.trusted = trust_programs or folder.signed
        self.schedule = schedule if schedule is not None else self.manifest.schedule
        self.backend: StepBackend = create_backend(
            backend, self.manifest, self.engine_dir, trust_programs=self.trusted, **backend_options
        )
        # Before activation: without it the backend loads no gate-table graphs at all.
        self.backend.use_gate_table = gate_table
        #: The inputs each step feeds the graphs, with their roles (manifest order).
        self.step_inputs: tuple[InputSpec, ...] = self.manifest.step_inputs
        self.latents_name = self.manifest.latents_input.name
        self.timestep_name = self.manifest.timestep_input.name
        self._generation_id = 0
        self.check_inputs = check_inputs

    # -- lifecycle ------------------------------------------------------------------
    def activate(self) -> ForaSession:
        self.backend.activate()
        return self

    def deactivate(self) -> None:
        self._generation_id += 1  # any live generation is now stale
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
        schedule: CacheSchedule | None = None,
        timesteps: Any = None,
        **conditioning: Any,
    ) -> Generation:
        """Begin a new generation; earlier generations of this session become stale.

        ``timesteps`` (one per step, each a number or one per sample) and the
        generation's conditioning (e.g. ``class_labels``) are optional; given, steps
        may omit them, and where the build and backend allow, the gates of every
        step are computed here at once (:attr:`Generation.uses_gate_table`).
        """
        batch_size = self._check_batch(batch_size)
        plan = (schedule or self.schedule).plan(num_steps)
        planned = None
        if timesteps is not None:
            planned = self._plan_inputs(timesteps, conditioning, len(plan), batch_size)
        elif conditioning:
            raise InputError(
                f"start() | got conditioning {sorted(conditioning)} without timesteps | pass "
                "timesteps too, or pass conditioning to each step()"
            )
        buffers = self.backend.buffers(batch_size)
        table = None
        if planned is not None and self.backend.gate_table_enabled:
            # Rows for the reuse steps only: full steps compute their own gates.
            reuse_steps = [index for index, full in enumerate(plan) if not full]
            if reuse_steps:
                names = tuple(spec.name for spec in self.manifest.graphs["gates"].inputs)
                rows = planned.rows(batch_size, reuse_steps, names)
                table = GateTable(self.backend.gate_table(rows), reuse_steps)
        self._generation_id += 1
        return Generation(self, buffers, plan, self._generation_id, planned, table)

    def _plan_inputs(
        self, timesteps: Any, conditioning: dict[str, Any], num_steps: int, batch_size: int
    ) -> PlannedInputs:
        """Check a generation's timesteps and conditioning given up front (host copies)."""
        conditioning = self.drop_build_constants(conditioning)
        names = list(self.manifest.conditioning_names)
        if sorted(conditioning) != sorted(names):
            raise InputError(
                f"start() | got conditioning {sorted(conditioning)} | with timesteps, pass all of "
                f"{names} (this model's conditioning inputs)"
            )
        try:
            steps = host_copy(timesteps).astype("float32")
        except (TypeError, ValueError) as err:
            raise InputError(f"start() timesteps | got {timesteps!r} | expected numbers") from err
        if (
            steps.ndim not in (1, 2)
            or steps.shape[0] != num_steps
            or steps.shape[1:] not in ((), (batch_size,))
        ):
            raise InputError(
                f"start() timesteps | got shape {list(steps.shape)} | expected [{num_steps}] or "
                f"[{num_steps}, {batch_size}]: one timestep per step (or per step and sample)"
            )
        if self.check_inputs:
            self.manifest.check_timesteps(steps, where=self._where())
        values = {}
        for name in names:
            spec = self.manifest.input_spec(name)
            value = host_copy(conditioning[name])
            # The dtype as given: host copies of floating tensors are float32 (bf16 has no numpy type).
            given_dtype = self.backend.describe_array(conditioning[name])[1]
            if not _dtype_compatible(given_dtype, spec.dtype):
                raise InputError(
                    f"start() input '{name}' | got {given_dtype}, expected {spec.dtype} | ({self._where()})"
                )
            want = spec.concrete_shape(batch_size)
            if tuple(value.shape) != want:
                raise InputError(
                    f"start() input '{name}' | got shape {list(value.shape)}, expected {list(want)} "
                    f"| ({self._where()})"
                )
            self.manifest.check_values(name, value, where=self._where())
            values[name] = value
        return PlannedInputs(steps, values, dict(conditioning), timestep_name=self.timestep_name)

    def drop_build_constants(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` without the build constants among them, each checked to equal the
        value the graphs were built with (e.g. Flux's position ids for the built size)."""
        constants = {spec.name: spec for spec in self.manifest.inputs_of("build_constant")}
        if not constants.keys() & inputs.keys():
            return inputs
        import numpy as np

        for name in constants.keys() & inputs.keys():
            built = np.asarray(constants[name].value, dtype="float64")
            given = inputs[name]
            given = host_copy(given).astype("float64") if given is not None else built
            if given.shape != built.shape or not np.array_equal(given, built):
                raise InputError(
                    f"Input '{name}' | differs from the value the engines were built with (shape "
                    f"{list(given.shape)} vs {list(built.shape)}) | it is fixed per build: rebuild with "
                    f"the resolution / text length you need ({self._where()})"
                )
        return {k: v for k, v in inputs.items() if k not in constants}

    def reset(self) -> None:
        """Invalidate the current generation (its caches can no longer be reused)."""
        self._generation_id += 1

    # -- single steps (validate, bench) -------------------------------------------
    def run_step(self, role: str, batch_size: int, inputs: dict[str, Any]) -> Any:
        """Run one graph outside any generation. ``reuse`` reads whatever the last
        ``full`` of this batch size wrote. Invalidates the current generation."""
        if role not in ("full", "reuse"):
            raise InputError(f"Graph role | got {role!r} | expected 'full' or 'reuse'")
        batch_size = self._check_batch(batch_size)
        buffers = self.backend.buffers(batch_size)
        self._generation_id += 1
        self.stage(buffers, inputs)
        (self.backend.run_full if role == "full" else self.backend.run_reuse)(buffers)
        return self.backend.read_prediction(buffers)

    def cache_views(self, batch_size: int) -> dict[str, Any]:
        """The live cache buffers of ``batch_size`` (backend arrays, not copies)."""
        return self.backend.buffers(batch_size).caches

    def read_caches(self, batch_size: int) -> dict[str, Any]:
        """Host copies of the caches of ``batch_size`` (for validation)."""
        return self.backend.read_caches(self.backend.buffers(batch_size))

    # -- input checks ---------------------------------------------------------------
    def _where(self) -> str:
        return str(self.engine_dir / MANIFEST_NAME)

    def _check_batch(self, batch_size: int) -> int:
        batch = self.manifest.batch
        try:
            size = operator.index(batch_size)  # ints of any kind (numpy too), not floats or bools
        except TypeError:
            size = None
        if size is None or isinstance(batch_size, bool):
            raise InputError(f"Batch size | got {batch_size!r} | expected an integer")
        if not batch.contains(size):
            raise InputError(
                f"Batch size | got {size}, the engines were built for {batch.min}..{batch.max} "
                f"| rebuild with --batch MIN:OPT:MAX covering it ({self._where()})"
            )
        return size

    def stage(self, buffers: StepBuffers, inputs: dict[str, Any], *, only: tuple[str, ...] = ()) -> None:
        """Check every step input (or those named in ``only``) against the manifest and
        copy it into place."""
        specs = [s for s in self.step_inputs if s.name in only] if only else self.step_inputs
        if not self.check_inputs:
            for spec in specs:
                value = inputs[spec.name]
                if spec.role == "timestep":
                    value = self.backend.as_timestep(
                        value, spec.concrete_shape(buffers.batch_size), spec.dtype
                    )
                self.backend.stage_input(buffers, spec.name, value)
            return
        inputs = self.drop_build_constants(inputs)
        expected = {spec.name for spec in self.step_inputs}
        unknown = set(inputs) - expected
        if unknown:
            raise InputError(
                f"Inputs {sorted(unknown)} | not inputs of these engines | expected {sorted(expected)}"
            )
        for spec in specs:
            if spec.name not in inputs or inputs[spec.name] is None:
                raise InputError(f"Input '{spec.name}' | missing | this model needs {sorted(expected)}")
            value = inputs[spec.name]
            want_shape = spec.concrete_shape(buffers.batch_size)
            if spec.role == "timestep":
                try:
                    value = self.backend.as_timestep(value, want_shape, spec.dtype)
                except (TypeError, ValueError) as err:
                    raise InputError(
                        f"Input '{spec.name}' | got {value!r} | expected a number or one number per sample"
                    ) from err
            shape, dtype = self.backend.describe_array(value)
            if shape != want_shape:
                raise InputError(
                    f"Input '{spec.name}' | got shape {list(shape)}, expected {list(want_shape)} "
                    f"| ({self._where()})"
                )
            if not _dtype_compatible(dtype, spec.dtype):
                raise InputError(
                    f"Input '{spec.name}' | got {dtype}, expected {spec.dtype} | ({self._where()})"
                )
            if self.backend.host_inputs:
                self.manifest.check_values(spec.name, value, where=self._where())
                if spec.role == "timestep":
                    self.manifest.check_timesteps(value, where=self._where())
            self.backend.stage_input(buffers, spec.name, value)


def _dtype_compatible(got: str, want: str) -> bool:
    if got == want:
        return True
    # Integer class labels of any width are safe to widen to int64.
    return want == "int64" and got in ("int32", "int16", "uint8", "int8")
