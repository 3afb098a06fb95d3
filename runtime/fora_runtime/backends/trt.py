"""TensorRT backend (TensorRT 10.x and 11.x), driven through torch for CUDA memory.

Every TensorRT call of the runtime lives in this module. ``tensorrt`` and
``torch`` are imported on activation, so importing the module needs neither.

Layout on the device, all allocated once and bound at fixed addresses:

- both engines are deserialized once per activation;
- ONE activation buffer serves every execution context of both engines
  (``ExecutionContextAllocationStrategy.USER_MANAGED``, sized
  ``max(engine.device_memory_size_v2)``, given with ``set_device_memory``): the
  engines run one after the other on one stream, never concurrently;
- per batch size: one context per engine with its input shapes and tensor
  addresses set once, staging buffers for the step inputs, the prediction
  buffer, and one cache arena (``ArenaLayout``, 256-byte aligned slots). The full
  engine's cache outputs and the reuse engine's cache inputs are bound to the
  same slot addresses, so caches never move or get copied (zero-copy);
- optionally one CUDA graph per (engine, batch size), captured by
  ``capture_graphs`` (or on allocation with ``use_cuda_graphs=True``).

A step copies the inputs into the staging buffers on the caller's current CUDA
stream, makes the backend's own (non-default) stream wait for them with an event,
enqueues the engine (``execute_async_v3``) or replays its graph there, and makes
the caller's stream wait for the result with a second event. No host sync and no
device allocation happens inside a step; ``read_prediction`` returns a copy
(a torch CUDA tensor) ordered on the caller's stream.

Inputs may be torch tensors (CUDA or CPU) or numpy arrays; scalar timesteps are
filled in place. The engine folder's manifest must carry a ``backends["tensorrt"]``
record (written by ``fora_export.build.tensorrt.tensorrt_record``); engines built
by another TensorRT version or for another compute capability are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fora_runtime._lazy import import_optional
from fora_runtime.backends.base import StepBackend, StepBuffers
from fora_runtime.caches import ALIGNMENT, ArenaLayout
from fora_runtime.errors import BackendError, InputError
from fora_runtime.manifest import MANIFEST_NAME, Manifest, TensorSpec

if TYPE_CHECKING:
    import tensorrt

log = logging.getLogger(__name__)

ENGINE_ROLES = ("full", "reuse")
TORCH_INSTALL = "pip install torch (a CUDA build)"
TENSORRT_INSTALL = "pip install tensorrt"
# TensorRT DataType member name -> manifest dtype name.
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32"}


def _tensorrt_version() -> str:
    """Import tensorrt (lazily) and return its version; refuse a stub-only install."""
    module = import_optional("tensorrt", backend=TensorRTBackend.name, install=TENSORRT_INSTALL)
    version = getattr(module, "__version__", None)
    if not isinstance(version, str) or not hasattr(module, "Runtime"):
        # A bare `tensorrt/` folder (e.g. from tensorrt-stubs) imports as an empty namespace package.
        raise BackendError(
            "Backend 'tensorrt' | 'tensorrt' imports but has no runtime library (only type stubs are "
            f"installed) | install the real package: {TENSORRT_INSTALL}"
        )
    return version


def check_build_record(
    record: Any, *, running_version: str, running_capability: str, where: str
) -> dict[str, Any]:
    """Validate the manifest's ``backends["tensorrt"]`` record against the running TensorRT and GPU.

    Engines are only guaranteed to load under the TensorRT version that built
    them and on the compute capability they were built for.
    """
    if not isinstance(record, dict):
        raise BackendError(
            f"{where} | has no TensorRT engines (no backends.tensorrt record) | build the folder with "
            "TensorRT engines on this GPU, or use backend='onnxruntime'"
        )
    missing = [key for key in ("tensorrt_version", "compute_capability", "engines") if key not in record]
    if missing:
        raise BackendError(f"{where} | TensorRT record lacks {missing} | rebuild the engines")
    built = str(record["tensorrt_version"])
    if built != running_version:
        raise BackendError(
            f"{where} | engines were built with TensorRT {built}, this is TensorRT {running_version} "
            f"| rebuild the engines with this TensorRT, or install tensorrt=={built}"
        )
    capability = str(record["compute_capability"])
    if capability != running_capability:
        raise BackendError(
            f"{where} | engines were built for compute capability {capability} ({record.get('gpu', '?')}), "
            f"this GPU has {running_capability} | rebuild the engines on this GPU"
        )
    engines = record["engines"]
    if not isinstance(engines, dict) or sorted(engines) != sorted(ENGINE_ROLES):
        raise BackendError(
            f"{where} | TensorRT record lists engines {engines!r}, expected one per role "
            f"{list(ENGINE_ROLES)} | rebuild the engines"
        )
    return record


@dataclass(frozen=True)
class _Fill:
    """A scalar timestep, written into its staging buffer with ``fill_`` (no device allocation)."""

    value: float | int
    shape: tuple[int, ...]
    dtype: str


class TensorRTBackend(StepBackend):
    """Runs the full and reuse TensorRT engines of one engine folder on one CUDA device."""

    name = "tensorrt"
    host_inputs = False

    def __init__(
        self,
        manifest: Manifest,
        folder: Path,
        *,
        use_cuda_graphs: bool = False,
        device: int | None = None,
    ) -> None:
        super().__init__(manifest, folder)
        self.use_cuda_graphs = use_cuda_graphs
        self._device_index = device
        self._torch: Any = None
        self._device: Any = None
        self._logger: tensorrt.ILogger | None = None
        self._runtime: tensorrt.Runtime | None = None
        self._engines: dict[str, tensorrt.ICudaEngine] = {}
        # Engine IO in binding order: role -> [(tensor name, is input)].
        self._io: dict[str, list[tuple[str, bool]]] = {}
        self._activation: Any = None
        self._activation_bytes = 0
        self._stream: Any = None
        self._inputs_ready: Any = None
        self._outputs_ready: Any = None
        # Owned here (not only by StepBuffers) so deactivate can sync before releasing them.
        self._contexts: dict[tuple[str, int], tensorrt.IExecutionContext] = {}
        self._graphs: dict[tuple[str, int], Any] = {}

    # -- lifecycle ------------------------------------------------------------------
    @property
    def stream(self) -> Any:
        """The ``torch.cuda.Stream`` the engines run on (None while inactive)."""
        return self._stream

    def _where(self) -> str:
        return str(self.folder / MANIFEST_NAME)

    def _activate_impl(self) -> None:
        torch = import_optional("torch", backend=self.name, install=TORCH_INSTALL)
        if not torch.cuda.is_available():
            raise BackendError(
                "Backend 'tensorrt' | no CUDA GPU is visible (torch.cuda.is_available() is False) "
                "| run on a machine with an NVIDIA GPU and CUDA torch, or use backend='onnxruntime'"
            )
        version = _tensorrt_version()
        import tensorrt as trt

        index = self._device_index if self._device_index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(device)
        record = check_build_record(
            self.manifest.backends.get("tensorrt"),
            running_version=version,
            running_capability=f"{major}.{minor}",
            where=self._where(),
        )
        gpu = torch.cuda.get_device_name(device)
        if record.get("gpu") not in (None, gpu):
            log.warning(
                "TensorRT engines were built on %s and run on %s (same compute capability)",
                record["gpu"],
                gpu,
            )
        self._check_profile(record)

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engines: dict[str, tensorrt.ICudaEngine] = {}
        io: dict[str, list[tuple[str, bool]]] = {}
        with torch.cuda.device(device):
            for role in ENGINE_ROLES:
                path = self._engine_path(record, role)
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise BackendError(
                        f"{path} | TensorRT cannot deserialize it (see the TensorRT error above) "
                        "| rebuild the engines with this TensorRT on this GPU"
                    )
                io[role] = self._check_io(trt, role, engine, path)
                engines[role] = engine
            # One activation buffer for every context of both engines: they never run concurrently.
            size = max(int(engine.device_memory_size_v2) for engine in engines.values())
            activation = torch.empty(max(size, ALIGNMENT), dtype=torch.uint8, device=device)
            stream = torch.cuda.Stream(device=device)
        self._torch, self._device = torch, device
        self._logger, self._runtime, self._engines, self._io = logger, runtime, engines, io
        self._activation, self._activation_bytes = activation, int(activation.numel())
        self._stream = stream
        self._inputs_ready = torch.cuda.Event()
        self._outputs_ready = torch.cuda.Event()
        log.info(
            "TensorRT %s: loaded %s on %s, shared activation buffer %d bytes",
            version,
            ", ".join(str(record["engines"][role]) for role in ENGINE_ROLES),
            gpu,
            self._activation_bytes,
        )

    def _check_profile(self, record: dict[str, Any]) -> None:
        profile = record.get("profile")
        batch = self.manifest.batch
        if isinstance(profile, dict) and not (
            profile.get("min", 1) <= batch.min and batch.max <= profile.get("max", 0)
        ):
            raise BackendError(
                f"{self._where()} | engines were built for batch {profile.get('min')}..{profile.get('max')}, "
                f"the manifest allows {batch.min}..{batch.max} | rebuild the engines"
            )

    def _engine_path(self, record: dict[str, Any], role: str) -> Path:
        file = str(record["engines"][role])
        path = self.folder / file
        if not path.is_file():
            raise BackendError(f"{path} | missing, but listed in {MANIFEST_NAME} | rebuild the engines")
        listed = self.manifest.files.get(file)
        if listed is None:
            raise BackendError(
                f"{path} | not listed in the manifest's 'files', so it is unverified | rebuild the engines"
            )
        recorded = record.get("sha256", {}).get(file)
        if recorded is not None and recorded != listed.get("sha256"):
            raise BackendError(
                f"{path} | the TensorRT record and 'files' disagree on its sha256 | rebuild the engines"
            )
        return path

    def _check_io(
        self, trt: Any, role: str, engine: tensorrt.ICudaEngine, path: Path
    ) -> list[tuple[str, bool]]:
        """The engine's IO must be the manifest's: names, dtypes, device-resident."""
        graph = self.manifest.graphs[role]
        declared_in = {t.name: t for t in graph.inputs}
        declared_out = {t.name: t for t in graph.outputs}
        cache_names = {c.name for c in self.manifest.caches}
        step_names = {t.name for t in self.manifest.graphs["full"].inputs} - cache_names
        io: list[tuple[str, bool]] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            declared = declared_in if is_input else declared_out
            spec = declared.get(name)
            kind = "input" if is_input else "output"
            if spec is None or (is_input and name not in cache_names | step_names):
                raise BackendError(
                    f"{path} | {kind} '{name}' is not a {role} {kind} in the manifest | engines and manifest "
                    "come from different builds; rebuild"
                )
            dtype = engine.get_tensor_dtype(name)
            got = _TRT_DTYPES.get(dtype.name, dtype.name)
            if got != spec.dtype:
                raise BackendError(
                    f"{path} | {kind} '{name}' is {got}, the manifest says {spec.dtype} | rebuild"
                )
            if engine.get_tensor_location(name) != trt.TensorLocation.DEVICE:
                raise BackendError(f"{path} | {kind} '{name}' lives in host memory | not supported; rebuild")
            io.append((name, is_input))
        outputs = {name for name, is_input in io if not is_input}
        if outputs != set(declared_out):
            raise BackendError(
                f"{path} | outputs {sorted(outputs)} differ from the manifest's {sorted(declared_out)} "
                "| rebuild"
            )
        return io

    def _deactivate_impl(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()  # nothing may be in flight while contexts and buffers go away
        self._graphs.clear()
        self._contexts.clear()
        self._engines.clear()
        self._io.clear()
        self._runtime = None
        self._logger = None
        self._activation = None
        self._activation_bytes = 0
        self._stream = self._inputs_ready = self._outputs_ready = None

    # -- buffers --------------------------------------------------------------------
    def _torch_dtype(self, dtype: str) -> Any:
        torch = self._torch
        table = {
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "int64": torch.int64,
            "int32": torch.int32,
        }
        if dtype not in table:
            raise BackendError(f"Backend 'tensorrt' | dtype {dtype} is not supported | rebuild the engines")
        return table[dtype]

    def _zeros(self, spec: TensorSpec, batch_size: int) -> Any:
        # Zeros, not garbage: capture_graphs runs the engines on whatever is staged, and a
        # garbage class label would be an out-of-range Gather index.
        shape = spec.concrete_shape(batch_size)
        return self._torch.zeros(shape, dtype=self._torch_dtype(spec.dtype), device=self._device)

    def _allocate_impl(self, batch_size: int, layout: ArenaLayout) -> StepBuffers:
        torch = self._torch
        manifest = self.manifest
        cache_names = {c.name for c in manifest.caches}
        inputs = {
            spec.name: self._zeros(spec, batch_size)
            for spec in manifest.graphs["full"].inputs
            if spec.name not in cache_names
        }
        prediction = self._zeros(manifest.prediction, batch_size)

        # One allocation for all caches; each cache is a 256-byte aligned view of it.
        arena = torch.zeros(max(layout.nbytes, ALIGNMENT), dtype=torch.uint8, device=self._device)
        assert arena.data_ptr() % ALIGNMENT == 0, "torch's CUDA allocator returned an unaligned block"
        caches = {
            slot.spec.name: arena[slot.offset : slot.offset + slot.nbytes]
            .view(self._torch_dtype(slot.spec.dtype))
            .view(slot.shape)
            for slot in layout.slots
        }
        buffers = StepBuffers(
            batch_size=batch_size,
            inputs=inputs,
            caches=caches,
            prediction=prediction,
            cache_layout=layout,
            bound={"arena": arena, "contexts": {}, "graphs": {}},
        )
        with torch.cuda.device(self._device):
            for role in ENGINE_ROLES:
                context = self._bind(role, buffers)
                self._contexts[(role, batch_size)] = context
                buffers.bound["contexts"][role] = context
            if self.use_cuda_graphs:
                self._capture(buffers)
        return buffers

    def _bind(self, role: str, buffers: StepBuffers) -> tensorrt.IExecutionContext:
        """A context of ``role``'s engine with shapes and addresses of ``buffers`` set once."""
        import tensorrt as trt

        engine = self._engines[role]
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BackendError(
                f"Backend 'tensorrt' | cannot create a {role} execution context (out of memory?)"
            )
        context.set_device_memory(self._activation.data_ptr(), self._activation_bytes)
        batch = buffers.batch_size
        prediction_name = self.manifest.prediction.name
        expected: dict[str, tuple[int, ...]] = {}
        for name, is_input in self._io[role]:
            if name in buffers.caches:
                tensor = buffers.caches[name]
            elif is_input:
                tensor = buffers.inputs[name]
            elif name == prediction_name:
                tensor = buffers.prediction
            else:  # _check_io accepts only manifest outputs: the prediction and the caches
                raise AssertionError(f"unbound output {name}")
            shape = tuple(int(d) for d in tensor.shape)
            expected[name] = shape
            if is_input and not context.set_input_shape(name, shape):
                raise BackendError(
                    f"Backend 'tensorrt' | {role} engine refuses shape {list(shape)} for '{name}' "
                    f"(batch {batch}) "
                    "| use a batch size inside the engines' profile, or rebuild with a wider --batch"
                )
            if not context.set_tensor_address(name, int(tensor.data_ptr())):
                raise BackendError(f"Backend 'tensorrt' | {role} engine refuses the address of '{name}'")
        for name, is_input in self._io[role]:
            if is_input:
                continue
            dims = context.get_tensor_shape(name)
            got = tuple(int(dims[i]) for i in range(len(dims)))
            if got != expected[name]:
                raise BackendError(
                    f"Backend 'tensorrt' | {role} output '{name}' has shape {list(got)} at batch {batch}, "
                    f"the manifest says {list(expected[name])} | rebuild the engines"
                )
        return context

    def tensor_addresses(self, batch_size: int) -> dict[str, dict[str, int]]:
        """role -> tensor name -> device address bound in that engine's context (for checks)."""
        buffers = self.buffers(batch_size)
        return {
            role: {name: int(context.get_tensor_address(name)) for name, _ in self._io[role]}
            for role, context in buffers.bound["contexts"].items()
        }

    # -- CUDA graphs ----------------------------------------------------------------
    def capture_graphs(self, batch_size: int) -> None:
        """Capture one CUDA graph per engine for ``batch_size``; later steps replay them.

        Runs each engine once on whatever is staged (full, then reuse), so it
        overwrites the caches and the prediction: call it before a generation.
        """
        buffers = self.buffers(batch_size)
        if not buffers.bound["graphs"]:
            with self._torch.cuda.device(self._device):
                self._capture(buffers)

    def _capture(self, buffers: StepBuffers) -> None:
        torch = self._torch
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self._device))
        graphs: dict[str, Any] = {}
        for role in ENGINE_ROLES:
            context = buffers.bound["contexts"][role]
            # Enqueue once outside the capture: the first enqueue after shapes or addresses
            # are set does deferred setup work that must not end up in the graph.
            if not context.execute_async_v3(stream.cuda_stream):
                raise BackendError(
                    f"Backend 'tensorrt' | {role} engine failed to run (see the TensorRT error above)"
                )
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    captured = context.execute_async_v3(stream.cuda_stream)
            except RuntimeError as err:
                raise BackendError(
                    f"Backend 'tensorrt' | CUDA graph capture of the {role} engine failed ({err}) "
                    "| create the backend with use_cuda_graphs=False"
                ) from err
            if not captured:
                raise BackendError(
                    f"Backend 'tensorrt' | {role} engine could not be captured in a CUDA graph "
                    "| create the backend with use_cuda_graphs=False"
                )
            graphs[role] = graph
        for role, graph in graphs.items():
            self._graphs[(role, buffers.batch_size)] = graph
        buffers.bound["graphs"].update(graphs)

    # -- stepping -------------------------------------------------------------------
    def _run_impl(self, role: str, buffers: StepBuffers) -> None:
        torch = self._torch
        stream = self._stream
        current = torch.cuda.current_stream(self._device)
        # Inputs were staged on the caller's stream: the engine stream waits for them.
        self._inputs_ready.record(current)
        stream.wait_event(self._inputs_ready)
        graph = buffers.bound["graphs"].get(role)
        if graph is not None:
            with torch.cuda.stream(stream):
                graph.replay()
        elif not buffers.bound["contexts"][role].execute_async_v3(stream.cuda_stream):
            raise BackendError(
                f"Backend 'tensorrt' | {role} engine failed to run (see the TensorRT error above) "
                "| check the inputs; rebuild the engines if it persists"
            )
        # The caller's stream (prediction reads, next staging) waits for the engine.
        self._outputs_ready.record(stream)
        current.wait_event(self._outputs_ready)

    def stage_input(self, buffers: StepBuffers, name: str, value: Any) -> None:
        target = buffers.inputs[name]
        if isinstance(value, _Fill):
            self._check_range(name, np.asarray(value.value))
            target.fill_(value.value)
        elif isinstance(value, self._torch.Tensor):
            if not value.is_cuda:
                self._check_range(name, value.numpy())
            target.copy_(value, non_blocking=True)
        else:
            array = np.ascontiguousarray(value)
            self._check_range(name, array)
            target.copy_(self._torch.from_numpy(array), non_blocking=True)

    def _check_range(self, name: str, array: np.ndarray) -> None:
        """Value ranges of host inputs (an out-of-range class label is an unchecked Gather
        index in the engine). Device tensors are not checked: that would sync every step."""
        bounds = self.manifest.conditioning.get("input_ranges", {}).get(name)
        if bounds is None or array.size == 0:
            return
        low, high = bounds
        if array.min() < low or array.max() > high:
            raise InputError(
                f"Input '{name}' | values {array.min()}..{array.max()} outside [{low}, {high}] "
                f"| ({self._where()})"
            )

    def read_prediction(self, buffers: StepBuffers) -> Any:
        return buffers.prediction.clone()

    def upload(self, value: Any) -> Any:
        self._require_active()
        return self._torch.as_tensor(value).to(self._device)

    def as_timestep(self, value: Any, shape: tuple[int, ...], dtype: str) -> Any:
        torch = self._torch
        torch_dtype = self._torch_dtype(dtype)
        if isinstance(value, torch.Tensor):
            value = value.to(dtype=torch_dtype)
            return value.expand(shape) if value.ndim == 0 else value
        array = np.asarray(value)
        if array.ndim == 0:
            scalar = array.item()
            return _Fill(int(scalar) if dtype in ("int64", "int32") else float(scalar), shape, dtype)
        return torch.as_tensor(array).to(dtype=torch_dtype)

    def describe_array(self, value: Any) -> tuple[tuple[int, ...], str]:
        if isinstance(value, _Fill):
            return value.shape, value.dtype
        if self._torch is not None and isinstance(value, self._torch.Tensor):
            return tuple(int(d) for d in value.shape), str(value.dtype).removeprefix("torch.")
        array = np.asarray(value)
        return tuple(array.shape), array.dtype.name
