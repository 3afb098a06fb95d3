"""Step inputs, checked against the manifest and staged into a backend's buffers.

A session owns one :class:`StepInputs`: it checks what a caller passes (batch sizes, every
step input's name, shape, dtype and values, and the timesteps and conditioning given up
front to ``start``) and copies step inputs into the backend's staging buffers. Messages
name the engine folder's manifest.
"""

from __future__ import annotations

import operator
from typing import Any

from fora_runtime.backends.base import StepBackend, StepBuffers, host_array, host_copy, is_torch_tensor
from fora_runtime.errors import InputError
from fora_runtime.manifest import InputSpec, Manifest


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


class StepInputs:
    """The input checks and staging of one session (``check=False``: staging only)."""

    def __init__(self, manifest: Manifest, backend: StepBackend, *, where: str, check: bool) -> None:
        self.manifest = manifest
        self.backend = backend
        self.where = where
        self.check = check
        #: The inputs each step feeds the graphs, with their roles (manifest order).
        self.specs: tuple[InputSpec, ...] = manifest.step_inputs
        self.latents_name = manifest.latents_input.name
        self.timestep_name = manifest.timestep_input.name

    def check_batch(self, batch_size: Any) -> int:
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
                f"| rebuild with --batch MIN:OPT:MAX covering it ({self.where})"
            )
        return size

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
                    f"the resolution / text length you need ({self.where})"
                )
        return {k: v for k, v in inputs.items() if k not in constants}

    def plan(
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
        subject = "start() timesteps"
        values = numeric_values(timesteps, subject, "numbers, one per step (or per step and sample)")
        if values is None:  # a device tensor: read once here, not per step
            values = numeric_values(host_copy(timesteps), subject, "numbers")
        assert values is not None
        if (
            values.ndim not in (1, 2)
            or values.shape[0] != num_steps
            or values.shape[1:] not in ((), (batch_size,))
        ):
            raise InputError(
                f"{subject} | got shape {list(values.shape)} | expected [{num_steps}] or "
                f"[{num_steps}, {batch_size}]: one timestep per step (or per step and sample)"
            )
        if self.check:
            self.check_timestep_values(values, subject)
        steps = values.astype("float32")
        planned = {}
        for name in names:
            spec = self.manifest.input_spec(name)
            value = host_copy(conditioning[name])
            # The dtype as given: host copies of floating tensors are float32 (bf16 has no numpy type).
            given_dtype = self.backend.describe_array(conditioning[name])[1]
            if not _dtype_compatible(given_dtype, spec.dtype):
                raise InputError(
                    f"start() input '{name}' | got {given_dtype}, expected {spec.dtype} | ({self.where})"
                )
            want = spec.concrete_shape(batch_size)
            if tuple(value.shape) != want:
                raise InputError(
                    f"start() input '{name}' | got shape {list(value.shape)}, expected {list(want)} "
                    f"| ({self.where})"
                )
            self.manifest.check_values(name, value, where=self.where)
            planned[name] = value
        return PlannedInputs(steps, planned, dict(conditioning), timestep_name=self.timestep_name)

    def stage(self, buffers: StepBuffers, inputs: dict[str, Any], *, only: tuple[str, ...] = ()) -> None:
        """Check every step input (or those named in ``only``) against the manifest and
        copy it into place."""
        backend = self.backend
        specs = [s for s in self.specs if s.name in only] if only else self.specs
        if not self.check:
            for spec in specs:
                value = inputs[spec.name]
                if spec.role == "timestep":
                    value = backend.as_timestep(value, spec.concrete_shape(buffers.batch_size), spec.dtype)
                backend.stage_input(buffers, spec.name, value)
            return
        inputs = self.drop_build_constants(inputs)
        expected = {spec.name for spec in self.specs}
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
                subject = f"Input '{spec.name}'"
                host = numeric_values(value, subject, "a number or one number per sample")
                if host is not None:  # device tensors are not read (that would sync every step)
                    self.check_timestep_values(host, subject)
                    value = host
                try:
                    value = backend.as_timestep(value, want_shape, spec.dtype)
                except (TypeError, ValueError) as err:
                    raise InputError(
                        f"{subject} | got {_short(value)} | expected a number or one number per sample"
                    ) from err
            shape, dtype = backend.describe_array(value)
            if shape != want_shape:
                raise InputError(
                    f"Input '{spec.name}' | got shape {list(shape)}, expected {list(want_shape)} "
                    f"| ({self.where})"
                )
            if not _dtype_compatible(dtype, spec.dtype):
                raise InputError(f"Input '{spec.name}' | got {dtype}, expected {spec.dtype} | ({self.where})")
            if backend.host_inputs and self.manifest.value_range(spec.name) is not None:
                self.manifest.check_values(spec.name, host_array(value), where=self.where)
            backend.stage_input(buffers, spec.name, value)

    def check_timestep_values(self, values: Any, subject: str) -> None:
        """Timesteps (host float64 values) must be finite and inside the range the engines
        serve (the family's, or one expert's part of it)."""
        import numpy as np

        finite = np.isfinite(values)
        if not finite.all():
            raise InputError(
                f"{subject} | values are not all finite ({int(finite.size - finite.sum())} NaN/Inf of "
                f"{finite.size}) | pass finite numbers (the scheduler's timesteps)"
            )
        self.manifest.check_timesteps(values, where=self.where)


def numeric_values(value: Any, subject: str, expected: str) -> Any:
    """Host float64 values of ``value`` when it is a number or an array of numbers (numpy,
    nested lists, CPU torch tensors, with or without grad); None for a device tensor (not read
    here). Booleans, strings, None and other objects are refused with ``subject``."""
    import numpy as np

    if isinstance(value, bool | np.bool_ | str | bytes):
        raise InputError(f"{subject} | got {_short(value)} ({type(value).__name__}) | expected {expected}")
    if is_torch_tensor(value):
        if value.dtype.is_complex or str(value.dtype) == "torch.bool":
            raise InputError(
                f"{subject} | got a {str(value.dtype).removeprefix('torch.')} tensor | expected numbers"
            )
        if value.device.type != "cpu":
            return None
        return value.detach().double().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:  # ragged lists
        raise InputError(f"{subject} | got {_short(value)} | expected {expected}") from err
    kind = array.dtype.kind
    if kind == "b":
        raise InputError(f"{subject} | got a bool array | expected numbers, not truth values")
    if kind in "USa":
        raise InputError(f"{subject} | got a str array | expected numbers (convert strings yourself)")
    if kind not in "iuf":
        raise InputError(f"{subject} | got {_short(value)} | expected {expected}")
    return array.astype("float64")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dtype_compatible(got: str, want: str) -> bool:
    if got == want:
        return True
    # Integer class labels of any width are safe to widen to int64.
    return want == "int64" and got in ("int32", "int16", "uint8", "int8")
