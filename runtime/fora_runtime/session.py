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
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

from fora_runtime.backends.base import StepBackend, StepBuffers, create_backend
from fora_runtime.errors import GenerationError, InputError
from fora_runtime.manifest import MANIFEST_NAME, Manifest, TensorSpec, load_manifest
from fora_runtime.schedule import CacheSchedule


class ForaSession:
    """Runs the full/reuse graphs of one engine folder with a cache schedule."""

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        backend: str = "onnxruntime",
        schedule: CacheSchedule | None = None,
        verify_files: bool = True,
        check_inputs: bool = True,
        **backend_options: Any,
    ) -> None:
        """``check_inputs=False`` skips the per-step shape, dtype and value checks (for
        hot loops whose inputs are known good; a bad input then fails inside the backend)."""
        self.engine_dir = Path(engine_dir)
        self.manifest: Manifest = load_manifest(self.engine_dir, verify_files=verify_files)
        self.schedule = schedule if schedule is not None else self.manifest.schedule
        self.backend: StepBackend = create_backend(backend, self.manifest, self.engine_dir, **backend_options)
        cache_names = {c.name for c in self.manifest.caches}
        self.step_inputs: tuple[TensorSpec, ...] = tuple(
            t for t in self.manifest.graphs["full"].inputs if t.name not in cache_names
        )
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
    def start(self, num_steps: int, batch_size: int, *, schedule: CacheSchedule | None = None) -> Generation:
        """Begin a new generation; earlier generations of this session become stale."""
        batch_size = self._check_batch(batch_size)
        plan = (schedule or self.schedule).plan(num_steps)
        buffers = self.backend.buffers(batch_size)
        self._generation_id += 1
        return Generation(self, buffers, plan, self._generation_id)

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

    def stage(self, buffers: StepBuffers, inputs: dict[str, Any]) -> None:
        """Check every step input against the manifest and copy it into place."""
        if not self.check_inputs:
            for spec in self.step_inputs:
                value = inputs[spec.name]
                if spec.name == "timestep":
                    value = self.backend.as_timestep(
                        value, spec.concrete_shape(buffers.batch_size), spec.dtype
                    )
                self.backend.stage_input(buffers, spec.name, value)
            return
        expected = {spec.name for spec in self.step_inputs}
        unknown = set(inputs) - expected
        if unknown:
            raise InputError(
                f"Inputs {sorted(unknown)} | not inputs of these engines | expected {sorted(expected)}"
            )
        for spec in self.step_inputs:
            if spec.name not in inputs or inputs[spec.name] is None:
                raise InputError(f"Input '{spec.name}' | missing | this model needs {sorted(expected)}")
            value = inputs[spec.name]
            want_shape = spec.concrete_shape(buffers.batch_size)
            if spec.name == "timestep":
                try:
                    value = self.backend.as_timestep(value, want_shape, spec.dtype)
                except (TypeError, ValueError) as err:
                    raise InputError(
                        f"Input 'timestep' | got {value!r} | expected a number or one number per sample"
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
            self.backend.stage_input(buffers, spec.name, value)


def _dtype_compatible(got: str, want: str) -> bool:
    if got == want:
        return True
    # Integer class labels of any width are safe to widen to int64.
    return want == "int64" and got in ("int32", "int16", "uint8", "int8")


class Generation:
    """One sampling run: tracks the step index against the schedule's plan."""

    def __init__(
        self, session: ForaSession, buffers: StepBuffers, plan: tuple[bool, ...], gen_id: int
    ) -> None:
        self._session = session
        self._buffers = buffers
        self.plan = plan
        self._id = gen_id
        self.step_index = 0

    @property
    def num_steps(self) -> int:
        return len(self.plan)

    @property
    def batch_size(self) -> int:
        return self._buffers.batch_size

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.plan)

    @property
    def num_full(self) -> int:
        return sum(self.plan)

    def step(self, latents: Any, timestep: Any, **conditioning: Any) -> Any:
        """Run step ``step_index`` (full or reuse per the plan) and advance."""
        if self._id != self._session._generation_id:
            raise GenerationError(
                "Generation | stale: the session started another generation or ran a single step "
                "since | call session.start() again"
            )
        if self.done:
            raise GenerationError(
                f"Generation | all {self.num_steps} steps already ran | call session.start() for a new one"
            )
        full = self.plan[self.step_index]
        self._session.stage(self._buffers, {"latents": latents, "timestep": timestep, **conditioning})
        backend = self._session.backend
        (backend.run_full if full else backend.run_reuse)(self._buffers)
        self.step_index += 1
        return backend.read_prediction(self._buffers)
