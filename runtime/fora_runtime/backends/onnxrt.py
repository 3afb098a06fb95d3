"""ONNX Runtime backend.

Caches are zero-copy: the full graph's cache outputs and the reuse graph's cache
inputs are bound (IO binding, raw pointers) to the same ranges of one arena, and
the bindings are made once per batch size. Step inputs are copied into fixed
staging buffers, so a step is "copy inputs, run, copy prediction out".

Forecast builds keep two cache generations in the arena (twice the bytes). Every
graph is bound once per generation: the full graph writing generation g, the reuse
graphs reading it (the forecast graph also reading the other one as "previous"), so
switching which generation is the newest selects another binding and moves nothing.

Thread spinning is off by default: with two sessions on few cores, spinning
threads of the idle session steal cores from the busy one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fora_runtime._lazy import import_optional
from fora_runtime.backends.base import StepBackend, StepBuffers, host_array, is_torch_tensor
from fora_runtime.caches import ArenaLayout
from fora_runtime.dtypes import name_of, numpy_dtype
from fora_runtime.errors import BackendError, InputError
from fora_runtime.manifest import (
    FORECAST_ROLE,
    FORECAST_WEIGHT_NAME,
    GATE_TABLE_ROLES,
    GATES_NAME,
    GraphRole,
    LoadedTensor,
    Manifest,
    check_graph_io,
    previous_cache_name,
)

#: ONNX Runtime's tensor type names -> manifest dtypes.
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def _numpy_dtype(dtype: str) -> Any:
    try:
        return numpy_dtype(dtype)
    except KeyError:
        raise BackendError(
            f"Backend 'onnxruntime' | dtype {dtype} is not supported by its Python IO | "
            "build with --precision fp32 or fp16 for ONNX Runtime"
        ) from None


class OnnxRuntimeBackend(StepBackend):
    """Runs the exported ONNX graphs with ONNX Runtime (CPU, or CUDA EP when present)."""

    name = "onnxruntime"
    supports_gate_table = True
    supports_forecast = True

    def __init__(
        self,
        manifest: Manifest,
        folder: Path,
        *,
        gate_table: bool = True,
        forecast: bool = True,
        providers: list[str] | str = "auto",
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
    ) -> None:
        super().__init__(manifest, folder, gate_table=gate_table, forecast=forecast)
        self._requested_providers = providers
        self._intra_op_threads = intra_op_threads
        self._allow_spinning = allow_spinning
        self._sessions: dict[str, Any] = {}
        self._run_errors: tuple[type[BaseException], ...] = ()
        self.providers: list[str] = []

    # -- lifecycle ------------------------------------------------------------------
    def _activate_impl(self) -> None:
        ort = import_optional("onnxruntime", backend=self.name, install="pip install onnxruntime")
        available = ort.get_available_providers()
        if self._requested_providers == "auto":
            wanted = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
            providers = [*wanted, "CPUExecutionProvider"]
        else:
            providers = list(self._requested_providers)
            missing = [p for p in providers if p not in available]
            if missing:
                raise BackendError(
                    f"Backend 'onnxruntime' | providers {missing} are not available "
                    f"(available: {available}) | install the matching onnxruntime build"
                )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self._intra_op_threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self._allow_spinning else "0"
        )
        for role, graph in self.manifest.graphs.items():
            if role in GATE_TABLE_ROLES and not self.use_gate_table:
                continue
            if role == FORECAST_ROLE and not (self.use_gate_table and self.use_forecast):
                continue
            path = self.folder / graph.file
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except _ort_errors(ort) as err:
                raise BackendError(f"{path} | ONNX Runtime cannot load it: {err}") from err
            self._check_io(role, session)
            self._sessions[role] = session
        # A failed run (a kernel refusing its shapes) surfaces as a bare RuntimeError.
        self._run_errors = (*_ort_errors(ort), RuntimeError)
        self.providers = self._sessions[GraphRole.FULL].get_providers()
        self._device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def _check_io(self, role: str, session: Any) -> None:
        """The session's IO must be ``role``'s graph in the manifest (the graph contract)."""
        graph = self.manifest.graphs[role]

        def loaded(args: Any) -> list[LoadedTensor]:
            return [
                LoadedTensor(
                    arg.name,
                    ORT_TYPES.get(arg.type, arg.type),
                    tuple(d if isinstance(d, int) else None for d in arg.shape),
                )
                for arg in args
            ]

        check_graph_io(
            role,
            graph,
            loaded(session.get_inputs()),
            loaded(session.get_outputs()),
            where=str(self.folder / graph.file),
        )

    def _deactivate_impl(self) -> None:
        self._sessions.clear()

    # -- buffers --------------------------------------------------------------------
    def _allocate_impl(self, batch_size: int, layout: ArenaLayout) -> StepBuffers:
        ort = import_optional("onnxruntime", backend=self.name, install="pip install onnxruntime")
        manifest = self.manifest
        cache_names = {c.name for c in manifest.caches}
        step_inputs = [t for t in manifest.graphs[GraphRole.FULL].inputs if t.name not in cache_names]

        inputs: dict[str, Any] = {}
        for spec in step_inputs:
            shape = spec.concrete_shape(batch_size)
            inputs[spec.name] = self._empty(ort, shape, spec.dtype)
        if self.gate_table_enabled:  # the reuse_gated step reads its table row from here
            shape = (batch_size, *manifest.gate_table_shape)
            inputs[GATES_NAME] = self._empty(ort, shape, manifest.gate_table_dtype)
        generations = 2 if FORECAST_ROLE in self._sessions else 1
        if generations == 2:  # the forecast step reads each sample's weight from here
            inputs[FORECAST_WEIGHT_NAME] = self._empty(ort, (batch_size,), "float32")
        pred = manifest.prediction
        prediction = self._empty(ort, pred.concrete_shape(batch_size), pred.dtype)

        # One allocation for all caches (both generations); each cache is a byte range of it.
        arena = self._empty(ort, (generations * layout.nbytes,), "uint8")
        base = self._pointer(arena)
        caches: list[dict[str, Any]] = [{} for _ in range(generations)]
        pointers: list[dict[str, int]] = [{} for _ in range(generations)]
        for generation in range(generations):
            start = generation * layout.nbytes
            for slot in layout.slots:
                pointers[generation][slot.spec.name] = base + start + slot.offset
                if self._device == "cpu":
                    caches[generation][slot.spec.name] = (
                        arena[start + slot.offset : start + slot.offset + slot.nbytes]
                        .view(_numpy_dtype(slot.spec.dtype))
                        .reshape(slot.shape)
                    )
                else:  # device memory: no host view, the pointer is the handle
                    caches[generation][slot.spec.name] = pointers[generation][slot.spec.name]

        buffers = StepBuffers(
            batch_size=batch_size,
            inputs=inputs,
            caches=caches[0],
            prediction=prediction,
            cache_layout=layout,
            bound={"arena": arena},
            previous_caches=caches[1] if generations == 2 else None,
        )
        for role, session in self._sessions.items():
            if role == GraphRole.GATES:  # run once per generation on its own rows, not per batch
                continue
            # One binding per generation g: caches at generation g, previous ones at the other.
            buffers.bound[role] = tuple(
                self._bind(session, buffers, pointers[g], pointers[1 - g] if generations == 2 else {})
                for g in range(generations)
            )
        return buffers

    def _empty(self, ort: Any, shape: tuple[int, ...], dtype: str) -> Any:
        np_dtype = np.uint8 if dtype == "uint8" else _numpy_dtype(dtype)
        if self._device == "cpu":
            return np.empty(shape, dtype=np_dtype)
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np_dtype, "cuda", 0)

    def _pointer(self, array: Any) -> int:
        return int(array.ctypes.data) if isinstance(array, np.ndarray) else int(array.data_ptr())

    def _bind(
        self, session: Any, buffers: StepBuffers, cache_ptrs: dict[str, int], previous_ptrs: dict[str, int]
    ) -> Any:
        binding = session.io_binding()
        layout = buffers.cache_layout
        device = self._device
        previous = {previous_cache_name(name): name for name in previous_ptrs}
        for arg in session.get_inputs():
            if arg.name in cache_ptrs or arg.name in previous:
                cache = previous.get(arg.name, arg.name)
                slot = layout.slot(cache)
                pointer = previous_ptrs[cache] if arg.name in previous else cache_ptrs[cache]
                binding.bind_input(
                    arg.name, device, 0, _numpy_dtype(slot.spec.dtype), list(slot.shape), pointer
                )
            else:
                self._bind_array(binding.bind_input, arg.name, buffers.inputs[arg.name])
        prediction_name = self.manifest.prediction.name
        for arg in session.get_outputs():
            if arg.name == prediction_name:
                self._bind_array(binding.bind_output, arg.name, buffers.prediction)
            else:
                slot = layout.slot(arg.name)
                binding.bind_output(
                    arg.name, device, 0, _numpy_dtype(slot.spec.dtype), list(slot.shape), cache_ptrs[arg.name]
                )
        return binding

    def _bind_array(self, bind: Any, name: str, array: Any) -> None:
        if isinstance(array, np.ndarray):
            bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        else:
            bind(name, "cuda", 0, _ort_numpy_dtype(array), array.shape(), array.data_ptr())

    # -- stepping -------------------------------------------------------------------
    def _run_impl(self, role: str, buffers: StepBuffers) -> None:
        session = self._sessions[role]
        binding = buffers.bound[role][buffers.generation]
        try:
            session.run_with_iobinding(binding)
        except self._run_errors as err:
            raise self._run_error(role, err) from err

    def _run_error(self, role: str, err: BaseException) -> BackendError:
        """An ONNX Runtime failure as one line naming the graph (its messages span lines)."""
        return BackendError(
            f"Backend 'onnxruntime' | {role} graph ({self.manifest.graphs[role].file}) failed: "
            f"{' '.join(str(err).split())} | check the step inputs (check_inputs=False skips the "
            "checks that catch bad ones); rebuild the engines if it persists"
        )

    def _gate_table_impl(self, rows: dict[str, Any]) -> Any:
        session = self._sessions[GraphRole.GATES]
        dtypes = {
            spec.name: _numpy_dtype(spec.dtype) for spec in self.manifest.graphs[GraphRole.GATES].inputs
        }
        parts = []
        for _, chunk in self.gate_row_chunks(rows):
            feed = {name: np.ascontiguousarray(value, dtype=dtypes[name]) for name, value in chunk.items()}
            try:
                parts.append(session.run([GATES_NAME], feed)[0])
            except self._run_errors as err:
                raise self._run_error(GraphRole.GATES, err) from err
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _stage_gates(self, buffers: StepBuffers, table: Any, first_row: int) -> None:
        self.stage_input(buffers, GATES_NAME, table[first_row : first_row + buffers.batch_size])

    def _stage_forecast_weights(self, buffers: StepBuffers, weights: Any) -> None:
        self.stage_input(buffers, FORECAST_WEIGHT_NAME, weights)

    def stage_input(self, buffers: StepBuffers, name: str, value: Any) -> None:
        # torch tensors as the torch backend takes them: any device, grad or not.
        array = host_array(value) if is_torch_tensor(value) else value
        target = buffers.inputs[name]
        try:
            if isinstance(target, np.ndarray):
                np.copyto(target, array, casting="same_kind")
            else:
                target.update_inplace(np.ascontiguousarray(array))
        except (TypeError, ValueError) as err:  # reached with check_inputs=False only
            raise InputError(
                f"Input '{name}' | cannot be staged: {err} | pass shape {list(target.shape)} of "
                f"{name_of(target.dtype) if isinstance(target, np.ndarray) else 'the graph dtype'}"
            ) from err

    def read_prediction(self, buffers: StepBuffers) -> Any:
        pred = buffers.prediction
        return pred.copy() if isinstance(pred, np.ndarray) else pred.numpy()

    def as_timestep(self, value: Any, shape: tuple[int, ...], dtype: str) -> Any:
        array = np.asarray(host_array(value), dtype=_numpy_dtype(dtype))
        if array.ndim == 0:
            return np.full(shape, array, dtype=array.dtype)
        return array

    def describe_array(self, value: Any) -> tuple[tuple[int, ...], str]:
        if is_torch_tensor(value):  # without a host copy; bfloat16 too, which numpy lacks
            return tuple(int(d) for d in value.shape), str(value.dtype).removeprefix("torch.")
        array = np.asarray(value)
        return tuple(array.shape), name_of(array.dtype)


def _ort_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own failure types (a bad or mismatched graph, a kernel failing):
    user-facing BackendErrors. Anything else is a bug and keeps its traceback."""
    state = ort.capi.onnxruntime_pybind11_state
    names = (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NoSuchFile",
        "NotImplemented",
        "RuntimeException",
        "EPFail",
        "EngineError",
    )
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


def _ort_numpy_dtype(value: Any) -> Any:
    mapping = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    return mapping[value.data_type()]
