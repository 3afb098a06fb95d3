"""TensorRT backend (TensorRT 10.1+ and 11.x, and TensorRT-RTX 1.7+), driven through torch
for CUDA memory.

Every TensorRT call of the runtime lives in this module; both flavours run through
the same code, and what differs between them (module, versions, where engines may
run, plan validity checks) is in ``trt_flavor.py``, chosen by the manifest record's
``flavor``. The TensorRT module and ``torch`` are imported on activation, so
importing this module needs neither.

Layout on the device, all allocated once and bound at fixed addresses:

- both engines are deserialized once per activation;
- ONE activation buffer serves every execution context of both engines
  (``ExecutionContextAllocationStrategy.USER_MANAGED``, sized
  ``max(engine.device_memory_size_v2)``, given with ``set_device_memory(ptr, size)``;
  both exist from TensorRT 10.1, older versions are refused): the engines run one
  after the other on one stream, never concurrently;
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
record (written by ``fora_export.builder.tensorrt.tensorrt_record``); engines built
by another TensorRT version or for another compute capability are refused, and
``preflight()`` says so before anything is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fora_runtime._lazy import import_optional
from fora_runtime.backends.base import StepBuffers
from fora_runtime.backends.torch_io import TorchTensorIO
from fora_runtime.backends.trt_flavor import DATACENTER, TrtFlavor, TrtModule, flavor_of
from fora_runtime.caches import ALIGNMENT, ArenaLayout
from fora_runtime.dtypes import TENSORRT_NAMES
from fora_runtime.errors import BackendError
from fora_runtime.manifest import (
    BATCH_AXIS,
    GATE_TABLE_ROLES,
    GATES_NAME,
    GRAPH_ROLES,
    MANIFEST_NAME,
    Manifest,
    TensorSpec,
)
from fora_runtime.trust import restrict_tensorrt_runtime, untrusted_plan_error

if TYPE_CHECKING:
    import tensorrt

log = logging.getLogger(__name__)

TORCH_INSTALL = "pip install torch (a CUDA build)"


def _tensorrt_version() -> str:
    """Import tensorrt (lazily) and return its version; refuse a stub-only or too old install."""
    return DATACENTER.load(backend=TensorRTBackend.name)[1]


class _RunTarget(NamedTuple):
    """What activation checked before loading engines."""

    torch: Any
    trt: TrtModule
    flavor: TrtFlavor
    version: str
    device: Any
    record: dict[str, Any]


@dataclass(frozen=True)
class _Binding:
    """One IO tensor of an engine and the buffer it is bound to."""

    name: str
    is_input: bool
    # "inputs" (a staging buffer), "caches" (an arena slot) or "prediction".
    buffer: str


def _shape_fits(engine_shape: tuple[int, ...], spec_shape: tuple[int | str, ...]) -> bool:
    """Whether an engine tensor's shape (-1: dynamic) can hold a buffer of ``spec_shape``.

    Dynamic axes and the batch axis are settled when a context is bound, where input
    shapes are set from the buffers and output shapes are checked against them.
    """
    return len(engine_shape) == len(spec_shape) and all(
        got == -1 or want == BATCH_AXIS or got == want
        for got, want in zip(engine_shape, spec_shape, strict=True)
    )


def _require_aligned(tensor: Any, what: str) -> None:
    address = int(tensor.data_ptr())
    if address % ALIGNMENT:
        raise BackendError(
            f"Backend 'tensorrt' | the {what} at {address:#x} is not {ALIGNMENT}-byte aligned (torch's "
            f"CUDA allocator returned an unaligned block) | use torch's default CUDA caching allocator "
            "(check PYTORCH_CUDA_ALLOC_CONF)"
        )


class TensorRTBackend(TorchTensorIO):
    """Runs the full and reuse TensorRT engines of one engine folder on one CUDA device."""

    name = "tensorrt"
    supports_gate_table = True

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
        # The TensorRT module of the folder's flavour (datacenter or RTX), set on activation.
        self._trt: TrtModule | None = None
        self._flavor: TrtFlavor = DATACENTER
        self._logger: tensorrt.ILogger | None = None
        self._runtime: tensorrt.Runtime | None = None
        self._engines: dict[str, tensorrt.ICudaEngine] = {}
        # Engine IO in binding order, each with the buffer it is bound to.
        self._io: dict[str, list[_Binding]] = {}
        self._activation: Any = None
        self._activation_bytes = 0
        self._stream: Any = None
        self._inputs_ready: Any = None
        self._outputs_ready: Any = None
        # Owned here (not only by StepBuffers) so deactivate can sync before releasing them.
        self._contexts: dict[tuple[str, int], tensorrt.IExecutionContext] = {}
        # The IRuntimeConfig each context was created with (None on the strategy route), kept
        # alive at least as long as its context.
        self._runtime_configs: dict[tuple[str, int], Any] = {}
        self._graphs: dict[tuple[str, int], Any] = {}
        # The gates engine's context (run per generation on its own rows, not per batch size).
        self._gates_context: tensorrt.IExecutionContext | None = None
        self._gates_runtime_config: Any = None

    # -- lifecycle ------------------------------------------------------------------
    @property
    def stream(self) -> Any:
        """The ``torch.cuda.Stream`` the engines run on (None while inactive)."""
        return self._stream

    @property
    def io_device(self) -> Any:
        return self._device

    @property
    def gate_table_enabled(self) -> bool:
        return self.manifest.has_gate_table and "gates" in self._engines

    @property
    def _step_roles(self) -> tuple[str, ...]:
        """The engines bound and captured per batch size."""
        return GRAPH_ROLES + (("reuse_gated",) if self.gate_table_enabled else ())

    def preflight(self) -> None:
        """Refuse, before anything slow, a folder whose engines cannot run here: no CUDA GPU,
        no (or another) TensorRT of the folder's flavour, another compute capability."""
        self._run_target()

    def _run_target(self) -> _RunTarget:
        """What activation needs before loading engines, every check that needs no engine done."""
        record = self.manifest.backends.get("tensorrt")
        flavor = flavor_of(record, where=self._where())
        torch = import_optional("torch", backend=self.name, install=TORCH_INSTALL)
        if not torch.cuda.is_available():
            raise BackendError(f"Backend '{self.name}' | {flavor.no_gpu(record)}")
        trt, version = flavor.load(backend=self.name)
        index = self._device_index if self._device_index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(device)
        checked = flavor.check_record(
            record, running_version=version, running_capability=f"{major}.{minor}", where=self._where()
        )
        self._check_profile(checked)
        return _RunTarget(torch, trt, flavor, version, device, checked)

    def _activate_impl(self) -> None:
        torch, trt, flavor, version, device, record = self._run_target()
        gpu = torch.cuda.get_device_name(device)
        if record.get("gpu") not in (None, gpu):
            log.warning(
                "TensorRT engines were built on %s and run on %s (same compute capability)",
                record["gpu"],
                gpu,
            )

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        restrict_tensorrt_runtime(runtime, trusted=self.trust_programs)  # no plugins from untrusted folders
        engines: dict[str, tensorrt.ICudaEngine] = {}
        io: dict[str, list[_Binding]] = {}
        roles: tuple[str, ...] = GRAPH_ROLES
        if self.use_gate_table and self.manifest.has_gate_table and "gates" in record["engines"]:
            roles += GATE_TABLE_ROLES
        with torch.cuda.device(device):
            for role in roles:
                path = self._engine_path(record, role)
                blob = path.read_bytes()
                flavor.check_plan(trt, runtime, blob, str(path))
                engine = runtime.deserialize_cuda_engine(blob)
                if engine is None and not self.trust_programs:
                    raise untrusted_plan_error(path, flavor.title)
                if engine is None:
                    raise BackendError(
                        f"{path} | {flavor.title} cannot deserialize it (see the TensorRT error above) "
                        f"| rebuild the engines with this {flavor.title} on this GPU"
                    )
                io[role] = self._check_io(trt, role, engine, path)
                engines[role] = engine
            # One activation buffer for every context of every engine: they never run concurrently.
            size = max(int(engine.device_memory_size_v2) for engine in engines.values())
            activation = torch.empty(max(size, ALIGNMENT), dtype=torch.uint8, device=device)
            _require_aligned(activation, "shared activation buffer")
            stream = torch.cuda.Stream(device=device)
        self._torch, self._device, self._trt, self._flavor = torch, device, trt, flavor
        self._logger, self._runtime, self._engines, self._io = logger, runtime, engines, io
        self._activation, self._activation_bytes = activation, int(activation.numel())
        self._stream = stream
        self._inputs_ready = torch.cuda.Event()
        self._outputs_ready = torch.cuda.Event()
        if "gates" in engines:
            with torch.cuda.device(device):
                self._gates_context, self._gates_runtime_config = self._create_context("gates")
                self._gates_context.set_device_memory(self._activation.data_ptr(), self._activation_bytes)
        log.info(
            "%s %s: loaded %s on %s, shared activation buffer %d bytes",
            flavor.title,
            version,
            ", ".join(str(record["engines"][role]) for role in roles),
            gpu,
            self._activation_bytes,
        )

    def _check_profile(self, record: dict[str, Any]) -> None:
        gate_profile, rows = record.get("gate_profile"), self.manifest.gate_rows
        if isinstance(gate_profile, dict) and rows is not None and gate_profile.get("max", 0) < rows.max:
            raise BackendError(
                f"{self._where()} | the gates engine takes up to {gate_profile.get('max')} rows, the "
                f"manifest's gate_rows up to {rows.max} | rebuild the engines"
            )
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
        # Listed first: only names in 'files' are known to be plain names inside the folder.
        listed = self.manifest.files.get(file)
        if listed is None:
            raise BackendError(
                f"{path} | not listed in the manifest's 'files', so it is unverified | rebuild the engines"
            )
        if not path.is_file():
            raise BackendError(f"{path} | missing, but listed in {MANIFEST_NAME} | rebuild the engines")
        recorded = record.get("sha256", {}).get(file)
        if recorded is not None and recorded != listed.get("sha256"):
            raise BackendError(
                f"{path} | the TensorRT record and 'files' disagree on its sha256 | rebuild the engines"
            )
        return path

    def _check_io(self, trt: Any, role: str, engine: tensorrt.ICudaEngine, path: Path) -> list[_Binding]:
        """The engine's IO must be the manifest's, and fit the buffers it will be bound to.

        Names and dtypes are checked against ``role``'s graph in the manifest. Dtypes and
        shapes are also checked against the buffer each tensor is bound to: staging
        buffers are allocated from the full graph's input specs, cache slots from the
        manifest's caches, and the one prediction buffer both engines write from the full
        graph's prediction spec (so a reuse prediction of another dtype is refused here).
        """
        graph = self.manifest.graphs[role]
        declared_in = {t.name: t for t in graph.inputs}
        declared_out = {t.name: t for t in graph.outputs}
        caches = {c.name: c for c in self.manifest.caches}
        staged = {t.name: t for t in self.manifest.graphs["full"].inputs if t.name not in caches}
        gates = self.manifest.graphs["gates"].outputs[0] if self.manifest.has_gate_table else None
        if gates is not None:  # reuse_gated reads its table row from a staging buffer
            staged[GATES_NAME] = gates
        prediction = self.manifest.prediction
        rebuild = "engines and manifest come from different builds; rebuild"
        io: list[_Binding] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            kind = "input" if is_input else "output"
            spec = (declared_in if is_input else declared_out).get(name)
            if spec is None:
                raise BackendError(
                    f"{path} | {kind} '{name}' is not a {role} {kind} in the manifest | {rebuild}"
                )
            target: TensorSpec
            if name in caches:
                buffer, target, what = "caches", caches[name], f"its cache slot ({MANIFEST_NAME} 'caches')"
            elif is_input and name in staged:
                buffer, target, what = "inputs", staged[name], "its staging buffer (the full graph's input)"
            elif not is_input and name == prediction.name:
                buffer, target, what = "prediction", prediction, "the prediction buffer (the full graph's)"
            elif not is_input and role == "gates" and gates is not None and name == GATES_NAME:
                buffer, target, what = "table", gates, "the gate table (the gates graph's output)"
            elif is_input:
                raise BackendError(
                    f"{path} | input '{name}' is neither a step input of the full graph nor a cache "
                    f"| {rebuild}"
                )
            else:
                raise BackendError(
                    f"{path} | output '{name}' is neither the prediction '{prediction.name}' nor a cache, "
                    f"so there is no buffer to bind it to | {rebuild}"
                )
            dtype = engine.get_tensor_dtype(name)
            got = TENSORRT_NAMES.get(dtype.name, dtype.name)
            if got != spec.dtype:
                raise BackendError(
                    f"{path} | {kind} '{name}' is {got}, the manifest says {spec.dtype} | rebuild"
                )
            if got != target.dtype:
                raise BackendError(
                    f"{path} | {kind} '{name}' is {got}, but {what} is {target.dtype} | {rebuild}"
                )
            dims = engine.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            if not _shape_fits(shape, target.shape):
                raise BackendError(
                    f"{path} | {kind} '{name}' has shape {list(shape)}, but {what} has shape "
                    f"{list(target.shape)} | {rebuild}"
                )
            if engine.get_tensor_location(name) != trt.TensorLocation.DEVICE:
                raise BackendError(f"{path} | {kind} '{name}' lives in host memory | not supported; rebuild")
            io.append(_Binding(name, is_input, buffer))
        outputs = {binding.name for binding in io if not binding.is_input}
        if outputs != set(declared_out):
            raise BackendError(
                f"{path} | outputs {sorted(outputs)} differ from the manifest's {sorted(declared_out)} "
                "| rebuild"
            )
        return io

    def deactivate(self) -> None:
        # base.deactivate drops the StepBuffers (staging buffers, cache arena, prediction)
        # before it calls _deactivate_impl: the engine stream must be idle before they go.
        if self._stream is not None:
            self._stream.synchronize()
        super().deactivate()

    def _deactivate_impl(self) -> None:
        # deactivate() synchronised the engine stream: nothing is in flight any more.
        self._graphs.clear()
        self._contexts.clear()
        self._runtime_configs.clear()
        self._gates_context = self._gates_runtime_config = None
        self._engines.clear()
        self._io.clear()
        self._runtime = None
        self._logger = None
        self._trt = None
        self._activation = None
        self._activation_bytes = 0
        self._stream = self._inputs_ready = self._outputs_ready = None

    # -- buffers --------------------------------------------------------------------
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
        if self.gate_table_enabled:  # the reuse_gated step reads its table row from here
            inputs[GATES_NAME] = self._zeros(manifest.graphs["gates"].outputs[0], batch_size)
        prediction = self._zeros(manifest.prediction, batch_size)

        # One allocation for all caches; each cache is a 256-byte aligned view of it.
        arena = torch.zeros(max(layout.nbytes, ALIGNMENT), dtype=torch.uint8, device=self._device)
        _require_aligned(arena, "cache arena")
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
        contexts: dict[str, tensorrt.IExecutionContext] = {}
        runtime_configs: dict[str, Any] = {}
        with torch.cuda.device(self._device):
            for role in self._step_roles:
                contexts[role], runtime_configs[role] = self._bind(role, buffers)
            buffers.bound["contexts"].update(contexts)
            if self.use_cuda_graphs:
                self._capture(buffers)
        # Kept only once every role is bound (and captured): a failure leaves nothing half made.
        for role in self._step_roles:
            self._contexts[(role, batch_size)] = contexts[role]
            self._runtime_configs[(role, batch_size)] = runtime_configs[role]
        return buffers

    def _create_context(self, role: str) -> tuple[tensorrt.IExecutionContext, Any]:
        """A context of ``role``'s engine without its own device memory, and the
        IRuntimeConfig it was created with (None on the strategy-argument route)."""
        trt, flavor = self._trt, self._flavor
        assert trt is not None, "contexts are created only while the backend is active"
        engine = self._engines[role]
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        runtime_config: Any = None
        if hasattr(engine, "create_runtime_config"):
            # The IRuntimeConfig route. IRuntimeConfig.set_execution_context_allocation_strategy is
            # in the TensorRT 11.4 Python API reference; ICudaEngine.create_runtime_config and the
            # create_execution_context(runtime_config) overload are in the 10.13 Python bindings
            # (and in the C++ API as createRuntimeConfig / createExecutionContext(IRuntimeConfig*)).
            # Not yet run against an 11.x install.
            runtime_config = engine.create_runtime_config()
            runtime_config.set_execution_context_allocation_strategy(strategy)
            flavor.configure_runtime_config(trt, runtime_config)
            context = engine.create_execution_context(runtime_config)
        else:  # TensorRT 10.x before IRuntimeConfig
            context = engine.create_execution_context(strategy)
        if context is None:
            raise BackendError(
                f"Backend 'tensorrt' | cannot create a {role} execution context (out of memory?)"
            )
        return context, runtime_config

    def _bind(self, role: str, buffers: StepBuffers) -> tuple[tensorrt.IExecutionContext, Any]:
        """A context of ``role``'s engine with shapes and addresses of ``buffers`` set once
        (and the IRuntimeConfig to keep alive with it)."""
        context, runtime_config = self._create_context(role)
        context.set_device_memory(self._activation.data_ptr(), self._activation_bytes)
        batch = buffers.batch_size
        expected: dict[str, tuple[int, ...]] = {}
        for binding in self._io[role]:
            name, is_input = binding.name, binding.is_input
            if binding.buffer == "caches":
                tensor = buffers.caches[name]
            elif binding.buffer == "inputs":
                tensor = buffers.inputs[name]
            else:
                tensor = buffers.prediction
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
        for binding in self._io[role]:
            if binding.is_input:
                continue
            name = binding.name
            dims = context.get_tensor_shape(name)
            got = tuple(int(dims[i]) for i in range(len(dims)))
            if got != expected[name]:
                raise BackendError(
                    f"Backend 'tensorrt' | {role} output '{name}' has shape {list(got)} at batch {batch}, "
                    f"the manifest says {list(expected[name])} | rebuild the engines"
                )
        return context, runtime_config

    def tensor_addresses(self, batch_size: int) -> dict[str, dict[str, int]]:
        """role -> tensor name -> device address bound in that engine's context (for checks)."""
        buffers = self.buffers(batch_size)
        return {
            role: {b.name: int(context.get_tensor_address(b.name)) for b in self._io[role]}
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
        for role in self._step_roles:
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
        # TensorRT enqueues on the current CUDA device: make it the backend's one.
        with torch.cuda.device(self._device):
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

    def _gate_table_impl(self, rows: dict[str, Any]) -> Any:
        """Run the gates engine over ``rows`` in calls of at most ``gate_rows.max`` rows (its
        profile), on the engine stream, into one device table."""
        torch = self._torch
        context = self._gates_context
        if context is None:  # gate_table() checked gate_table_enabled: the engine is loaded
            raise BackendError("Backend 'tensorrt' | the gates engine is not loaded")
        graph = self.manifest.graphs["gates"]
        count = len(rows[graph.inputs[0].name])
        dtype = self._torch_dtype(graph.outputs[0].dtype)
        table = torch.empty((count, *self.manifest.gate_table_shape), dtype=dtype, device=self._device)
        stream = self._stream
        with torch.cuda.device(self._device):
            current = torch.cuda.current_stream(self._device)
            for start, chunk in self.gate_row_chunks(rows):
                tensors = {
                    spec.name: torch.as_tensor(chunk[spec.name])
                    .to(self._device, dtype=self._torch_dtype(spec.dtype))
                    .contiguous()
                    for spec in graph.inputs
                }
                size = int(tensors[graph.inputs[0].name].shape[0])
                # The engine writes the table in place where the slice is aligned (the usual
                # case: rows of whole 256-byte multiples), else a fresh buffer copied over.
                target = table[start : start + size]
                output = target if target.data_ptr() % ALIGNMENT == 0 else torch.empty_like(target)
                tensors[GATES_NAME] = output
                for name, tensor in tensors.items():
                    _require_aligned(tensor, f"gates engine tensor '{name}'")
                    if name != GATES_NAME and not context.set_input_shape(name, tuple(tensor.shape)):
                        raise BackendError(
                            f"Backend 'tensorrt' | gates engine refuses shape {list(tensor.shape)} for "
                            f"'{name}' | rebuild the engines"
                        )
                    if not context.set_tensor_address(name, int(tensor.data_ptr())):
                        raise BackendError(
                            f"Backend 'tensorrt' | gates engine refuses the address of '{name}'"
                        )
                    tensor.record_stream(stream)  # in use on the engine stream until it is done
                dims = context.get_tensor_shape(GATES_NAME)
                got = tuple(int(dims[i]) for i in range(len(dims)))
                if got != tuple(output.shape):
                    raise BackendError(
                        f"Backend 'tensorrt' | gates engine output has shape {list(got)} for {size} rows, "
                        f"expected {list(output.shape)} | rebuild the engines"
                    )
                self._inputs_ready.record(current)
                stream.wait_event(self._inputs_ready)
                if not context.execute_async_v3(stream.cuda_stream):
                    raise BackendError(
                        "Backend 'tensorrt' | gates engine failed to run (see the TensorRT error above)"
                    )
                self._outputs_ready.record(stream)
                current.wait_event(self._outputs_ready)
                if output is not target:
                    target.copy_(output)
        return table

    def _stage_gates(self, buffers: StepBuffers, table: Any, first_row: int) -> None:
        buffers.inputs[GATES_NAME].copy_(table[first_row : first_row + buffers.batch_size])

    def read_prediction(self, buffers: StepBuffers) -> Any:
        return buffers.prediction.clone()
