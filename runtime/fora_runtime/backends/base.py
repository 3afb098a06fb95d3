"""The interface every runtime backend implements.

Like polygraphy's runners, a backend has a lifecycle: ``activate()`` loads both
graphs, ``deactivate()`` frees everything; use it as a context manager. Between
them the session asks for :class:`StepBuffers` once per batch size (staged
inputs, the cache arena and the prediction output, all at fixed addresses) and
calls ``run_full`` / ``run_reuse`` on them each step.
"""

from __future__ import annotations

import importlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fora_runtime.caches import ArenaLayout
from fora_runtime.errors import BackendError, GenerationError
from fora_runtime.manifest import FORECAST_ROLE, MANIFEST_NAME, GraphRole, Manifest

# name -> "module:Class"; modules are imported only when the backend is asked for,
# so the runtime imports without onnxruntime / tensorrt / torch installed.
_BACKENDS: dict[str, str] = {
    "onnxruntime": "fora_runtime.backends.onnxrt:OnnxRuntimeBackend",
    "tensorrt": "fora_runtime.backends.trt:TensorRTBackend",
    "torch": "fora_runtime.backends.torch_backend:TorchBackend",
}


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def create_backend(
    name: str,
    manifest: Manifest,
    folder: str | Path,
    *,
    gate_table: bool = True,
    forecast: bool = True,
    trust_programs: bool = False,
    **options: Any,
) -> StepBackend:
    """Instantiate the backend called ``name`` (not yet activated). ``gate_table=False``: it
    loads no gate-table graphs, and generations compute their gates per reuse step.
    ``forecast=False``: it loads no forecast graph and keeps one cache generation.
    ``trust_programs``: the folder may load code (torch programs, TensorRT plugins; see
    ``fora_runtime.trust``)."""
    target = _BACKENDS.get(name)
    if target is None:
        raise BackendError(f"Backend '{name}' | unknown | expected one of {', '.join(_BACKENDS)}")
    module_name, class_name = target.split(":")
    backend_cls: type[StepBackend] = getattr(importlib.import_module(module_name), class_name)
    backend = backend_cls(manifest, Path(folder), gate_table=gate_table, forecast=forecast, **options)
    backend.trust_programs = trust_programs
    return backend


@dataclass
class StepBuffers:
    """Everything one batch size needs, allocated once and bound at fixed addresses.

    ``inputs`` are staging buffers the session copies step inputs into, ``caches``
    are views into one arena (written by full, read by reuse), ``prediction`` is
    the output buffer both graphs write.
    """

    batch_size: int
    inputs: dict[str, Any]
    caches: dict[str, Any]
    prediction: Any
    cache_layout: ArenaLayout
    # Backend-private state bound to these buffers (IO bindings, CUDA graphs, ...).
    bound: dict[str, Any] = field(default_factory=dict)
    #: Set by the first full step: before it the caches hold no data to reuse.
    caches_written: bool = False
    #: Forecast builds: the caches of the full step before the last, the arena's second
    #: generation (None for other builds: one generation).
    previous_caches: dict[str, Any] | None = None
    #: Which of the two generations ``caches`` is: backends bind both ways round once.
    generation: int = 0
    #: Full steps run on these buffers (a forecast needs two of the current generation's).
    full_steps_run: int = 0

    def swap_cache_generations(self) -> None:
        """Make the older generation the one the next full step writes (and the newest one
        "previous"): references swap, no cache moves."""
        if self.previous_caches is not None:
            self.caches, self.previous_caches = self.previous_caches, self.caches
            self.generation ^= 1


def host_copy(value: Any) -> Any:
    """A host numpy copy (never a view) of an array-like: numpy arrays, numbers, torch
    tensors on any device. Floating tensors come back as float32 (bf16 has no numpy
    dtype); integers keep their dtype."""
    import numpy as np

    if hasattr(value, "detach"):
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        value = value.cpu().numpy()
    return np.array(value, copy=True)


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (a caller that made one
    has imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def host_array(value: Any) -> Any:
    """A host numpy array of ``value`` without copying where none is needed: torch tensors
    (any device, with or without grad) detached and moved to the host, bfloat16 as float32
    (numpy has none), anything else through ``numpy.asarray``."""
    import numpy as np

    if is_torch_tensor(value):
        value = value.detach()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def in_family_of(value: Any, like: Any) -> Any:
    """``value`` (a prediction: a numpy array or a torch tensor, owned by the caller) in the
    array family of ``like`` (the latents the caller passed): a torch tensor for torch
    latents (numpy arrays wrapped without a copy, on the CPU), a numpy array otherwise
    (torch tensors moved to the host, which waits for the device; bfloat16 as float32, which
    numpy lacks). Other dtypes are kept."""
    if is_torch_tensor(like):
        return value if is_torch_tensor(value) else sys.modules["torch"].from_numpy(value)
    return host_array(value) if is_torch_tensor(value) else value


class StepBackend(ABC):
    """Runs the full and reuse graphs of one engine folder."""

    name: ClassVar[str]
    # True when step inputs are host arrays the session may inspect (value ranges).
    host_inputs: ClassVar[bool] = True
    #: True when the backend implements the gate-table path (``gates`` + ``reuse_gated``).
    supports_gate_table: ClassVar[bool] = False
    #: True when the backend runs the forecast reuse graph (two cache generations).
    supports_forecast: ClassVar[bool] = False

    def __init__(
        self, manifest: Manifest, folder: Path, *, gate_table: bool = True, forecast: bool = True
    ) -> None:
        self.manifest = manifest
        self.folder = Path(folder)
        #: False: load no gate-table graphs (fixed at construction, before activation loads them).
        self.use_gate_table = gate_table
        #: False: load no forecast graph and keep one cache generation (fixed at construction).
        self.use_forecast = forecast
        #: True: the folder may load code (torch programs, TensorRT plugin layers); set before
        #: activation by ``create_backend``. False refuses both (``fora_runtime.trust``).
        self.trust_programs = False
        self._active = False
        self._buffers: dict[int, StepBuffers] = {}

    # -- lifecycle ------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._active

    def preflight(self) -> None:
        """Raise BackendError now if this backend cannot run the folder on this machine, for
        callers that do slow work before activating (bench's eager baseline). Backends whose
        checks are cheap do them here; activate() checks everything anyway."""
        return None

    def activate(self) -> None:
        if self._active:
            raise BackendError(f"Backend '{self.name}' | already active | call deactivate() first")
        self._activate_impl()
        self._active = True

    def deactivate(self) -> None:
        if not self._active:
            return
        self._buffers.clear()
        self._deactivate_impl()
        self._active = False

    def __enter__(self) -> StepBackend:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def _where(self) -> str:
        """The manifest path, for error messages."""
        return str(self.folder / MANIFEST_NAME)

    def _require_active(self) -> None:
        if not self._active:
            raise BackendError(f"Backend '{self.name}' | not active | call activate() or use `with`")

    # -- buffers --------------------------------------------------------------------
    def buffers(self, batch_size: int) -> StepBuffers:
        """The buffers of ``batch_size``, allocated on first use and kept."""
        self._require_active()
        if batch_size not in self._buffers:
            layout = ArenaLayout.plan(self.manifest.caches, batch_size)
            self._buffers[batch_size] = self._allocate_impl(batch_size, layout)
        return self._buffers[batch_size]

    # -- stepping -------------------------------------------------------------------
    def run_full(self, buffers: StepBuffers) -> None:
        """Run the full graph on the staged inputs; writes caches and prediction. With two
        cache generations it writes the older one, which becomes ``caches``."""
        self._require_active()
        buffers.swap_cache_generations()
        self._run_impl(GraphRole.FULL, buffers)
        buffers.caches_written = True
        buffers.full_steps_run += 1

    def run_reuse(self, buffers: StepBuffers) -> None:
        """Run the reuse graph on the staged inputs and the caches; writes prediction."""
        self._require_active()
        if not buffers.caches_written:
            raise GenerationError(
                f"Reuse step | batch {buffers.batch_size} has no caches yet | run a full step first"
            )
        self._run_impl(GraphRole.REUSE, buffers)

    @property
    def gate_table_enabled(self) -> bool:
        """Whether generations with known timesteps can precompute their gates here."""
        return self.supports_gate_table and self.use_gate_table and self.manifest.has_gate_table

    def gate_table(self, rows: dict[str, Any]) -> Any:
        """Run the ``gates`` graph over ``rows`` (host arrays, one row per step and sample,
        named as the graph's inputs), in calls of at most ``manifest.gate_rows.max`` rows.
        Returns the table ``[rows, *row shape]`` as an array of this backend."""
        self._require_active()
        if not self.gate_table_enabled:
            raise BackendError(
                f"Backend '{self.name}' | no gate-table graphs loaded (the build has none, or "
                "use_gate_table is off) | run reuse steps with per-step gates"
            )
        return self._gate_table_impl(rows)

    def gate_row_chunks(self, rows: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(first row, {input name: its rows})`` for each call of the gates graph: the
        graph's inputs only, at most ``manifest.gate_rows.max`` rows per call."""
        inputs = self.manifest.graphs[GraphRole.GATES].inputs
        count = len(rows[inputs[0].name])
        step = self.manifest.gate_rows.max if self.manifest.gate_rows is not None else count
        for start in range(0, count, step):
            yield start, {spec.name: rows[spec.name][start : start + step] for spec in inputs}

    def run_reuse_gated(self, buffers: StepBuffers, table: Any, first_row: int) -> None:
        """Run the reuse step that reads its gates from ``table[first_row : first_row + batch]``
        (from :meth:`gate_table`) instead of computing them; writes the prediction."""
        self._require_active()
        if not buffers.caches_written:
            raise GenerationError(
                f"Reuse step | batch {buffers.batch_size} has no caches yet | run a full step first"
            )
        self._stage_gates(buffers, table, first_row)
        self._run_impl(GraphRole.REUSE_GATED, buffers)

    @property
    def forecast_enabled(self) -> bool:
        """Whether forecast reuse steps can run here (a forecast build, its graph loaded)."""
        return (
            self.supports_forecast
            and self.use_forecast
            and self.manifest.has_forecast
            and self.gate_table_enabled
        )

    def run_reuse_forecast(self, buffers: StepBuffers, table: Any, first_row: int, weights: Any) -> None:
        """Run the reuse step forecasting each cache from the last two full steps: gates from
        ``table[first_row : first_row + batch]``, the forecast weight of each sample from
        ``weights`` (the same rows); writes the prediction."""
        self._require_active()
        if not self.forecast_enabled:
            raise BackendError(
                f"Backend '{self.name}' | no forecast graph loaded (a build without --forecast, no "
                "gate table, or use_forecast off) | run plain reuse steps"
            )
        if buffers.full_steps_run < 2:
            raise GenerationError(
                f"Forecast reuse step | batch {buffers.batch_size} has {buffers.full_steps_run} full steps | "
                "a forecast needs two; reuse plainly until then"
            )
        self._stage_gates(buffers, table, first_row)
        self._stage_forecast_weights(buffers, weights[first_row : first_row + buffers.batch_size])
        self._run_impl(FORECAST_ROLE, buffers)

    def upload(self, value: Any) -> Any:
        """A host array moved to where this backend's steps read inputs (the device
        for GPU backends), so step loops time the steps rather than transfers."""
        return value

    def read_caches(self, buffers: StepBuffers) -> dict[str, Any]:
        """Host (numpy) copies of every cache tensor; for validation, not the hot path."""
        self._require_active()
        return {name: host_copy(value) for name, value in buffers.caches.items()}

    # -- subclass hooks -------------------------------------------------------------
    @abstractmethod
    def _activate_impl(self) -> None: ...

    @abstractmethod
    def _deactivate_impl(self) -> None: ...

    @abstractmethod
    def _allocate_impl(self, batch_size: int, layout: ArenaLayout) -> StepBuffers: ...

    @abstractmethod
    def _run_impl(self, role: str, buffers: StepBuffers) -> None: ...

    def _gate_table_impl(self, rows: dict[str, Any]) -> Any:
        raise NotImplementedError  # only reached when supports_gate_table is True

    def _stage_gates(self, buffers: StepBuffers, table: Any, first_row: int) -> None:
        raise NotImplementedError

    def _stage_forecast_weights(self, buffers: StepBuffers, weights: Any) -> None:
        raise NotImplementedError  # only reached when supports_forecast is True

    @abstractmethod
    def stage_input(self, buffers: StepBuffers, name: str, value: Any) -> None:
        """Copy a user input into its staging buffer (dtype and shape already checked)."""

    @abstractmethod
    def read_prediction(self, buffers: StepBuffers) -> Any:
        """A copy of the prediction the caller may keep across steps."""

    @abstractmethod
    def as_timestep(self, value: Any, shape: tuple[int, ...], dtype: str) -> Any:
        """A scalar or per-sample timestep (int or float) as a ``shape`` array of ``dtype``."""

    @abstractmethod
    def describe_array(self, value: Any) -> tuple[tuple[int, ...], str]:
        """(shape, dtype name) of a user input, for validation."""
