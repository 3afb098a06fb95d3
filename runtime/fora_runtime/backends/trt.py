"""TensorRT backend (TensorRT 10.1+ and 11.x, and TensorRT-RTX 1.7+), driven through torch
for CUDA memory.

A thin backend composing one :class:`~fora_runtime.backends.trt_engine.TrtEngine` per
plan file (deserialise, IO checks, contexts, bindings, CUDA-graph capture live there).
This module owns what is shared between the engines: the checks before anything loads
(``preflight``), the one activation buffer, the stream and its events, and the
buffers of each batch size. Both flavours run through the same code; what differs
between them (module, versions, where engines may run, plan validity checks) is in
``trt_flavor.py``, chosen by the manifest record's ``flavor``. The TensorRT module and
``torch`` are imported on activation, so importing this module needs neither.

Layout on the device, all allocated once and bound at fixed addresses:

- each engine is deserialized once per activation;
- ONE activation buffer serves every execution context of every engine
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fora_runtime._lazy import import_optional
from fora_runtime.backends.base import StepBuffers
from fora_runtime.backends.torch_io import TorchTensorIO
from fora_runtime.backends.trt_engine import BoundContext, TrtEngine, require_aligned
from fora_runtime.backends.trt_flavor import DATACENTER, TrtFlavor, TrtModule, flavor_of
from fora_runtime.caches import ALIGNMENT, ArenaLayout
from fora_runtime.errors import BackendError
from fora_runtime.manifest import (
    GATE_TABLE_ROLES,
    GATES_NAME,
    GRAPH_ROLES,
    MANIFEST_NAME,
    GraphRole,
    Manifest,
    TensorSpec,
)
from fora_runtime.trust import restrict_tensorrt_runtime

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


class TensorRTBackend(TorchTensorIO):
    """Runs the TensorRT engines of one engine folder on one CUDA device: one
    :class:`TrtEngine` per plan, one shared activation buffer, one stream."""

    name = "tensorrt"
    supports_gate_table = True

    def __init__(
        self,
        manifest: Manifest,
        folder: Path,
        *,
        gate_table: bool = True,
        forecast: bool = True,
        use_cuda_graphs: bool = False,
        device: int | None = None,
    ) -> None:
        super().__init__(manifest, folder, gate_table=gate_table, forecast=forecast)
        self.use_cuda_graphs = use_cuda_graphs
        self._device_index = device
        self._torch: Any = None
        self._device: Any = None
        # Kept while engines deserialised by the runtime live (and the logger with it).
        self._logger: tensorrt.ILogger | None = None
        self._runtime: tensorrt.Runtime | None = None
        self._engines: dict[str, TrtEngine] = {}
        self._activation: Any = None
        self._stream: Any = None
        self._inputs_ready: Any = None
        self._outputs_ready: Any = None
        # Owned here (not only by StepBuffers) so deactivate can sync before releasing them.
        self._bound: dict[tuple[str, int], BoundContext] = {}
        # The gates engine's context (run per generation on its own rows, not per batch size).
        self._gates_context: BoundContext | None = None

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
        return self.manifest.has_gate_table and GraphRole.GATES in self._engines

    @property
    def _step_roles(self) -> tuple[str, ...]:
        """The engines bound and captured per batch size."""
        return GRAPH_ROLES + ((GraphRole.REUSE_GATED,) if self.gate_table_enabled else ())

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
        roles: tuple[str, ...] = GRAPH_ROLES
        if self.use_gate_table and self.manifest.has_gate_table and GraphRole.GATES in record["engines"]:
            roles += GATE_TABLE_ROLES
        with torch.cuda.device(device):
            engines = {
                role: TrtEngine.load(
                    role,
                    self._engine_path(record, role),
                    self.manifest,
                    runtime=runtime,
                    trt=trt,
                    flavor=flavor,
                    torch=torch,
                    trusted=self.trust_programs,
                )
                for role in roles
            }
            # One activation buffer for every context of every engine: they never run concurrently.
            size = max(engine.device_memory_bytes for engine in engines.values())
            activation = torch.empty(max(size, ALIGNMENT), dtype=torch.uint8, device=device)
            require_aligned(activation, "shared activation buffer")
            stream = torch.cuda.Stream(device=device)
            gates_context = (
                engines[GraphRole.GATES].create_context(activation) if GraphRole.GATES in engines else None
            )
        self._logger, self._runtime = logger, runtime
        self._torch, self._device, self._engines = torch, device, engines
        self._activation, self._stream, self._gates_context = activation, stream, gates_context
        self._inputs_ready = torch.cuda.Event()
        self._outputs_ready = torch.cuda.Event()
        log.info(
            "%s %s: loaded %s on %s, shared activation buffer %d bytes",
            flavor.title,
            version,
            ", ".join(str(record["engines"][role]) for role in roles),
            gpu,
            int(activation.numel()),
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

    def deactivate(self) -> None:
        # base.deactivate drops the StepBuffers (staging buffers, cache arena, prediction)
        # before it calls _deactivate_impl: the engine stream must be idle before they go.
        if self._stream is not None:
            self._stream.synchronize()
        super().deactivate()

    def _deactivate_impl(self) -> None:
        # deactivate() synchronised the engine stream: nothing is in flight any more.
        self._bound.clear()
        self._gates_context = None
        self._engines.clear()
        self._runtime = self._logger = None
        self._activation = None
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
            for spec in manifest.graphs[GraphRole.FULL].inputs
            if spec.name not in cache_names
        }
        if self.gate_table_enabled:  # the reuse_gated step reads its table row from here
            inputs[GATES_NAME] = self._zeros(manifest.graphs[GraphRole.GATES].outputs[0], batch_size)
        prediction = self._zeros(manifest.prediction, batch_size)

        # One allocation for all caches; each cache is a 256-byte aligned view of it.
        arena = torch.zeros(max(layout.nbytes, ALIGNMENT), dtype=torch.uint8, device=self._device)
        require_aligned(arena, "cache arena")
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
            bound={"arena": arena, "contexts": {}},
        )
        tensors = {**inputs, **caches, manifest.prediction.name: prediction}
        with torch.cuda.device(self._device):
            contexts = {
                role: self._engines[role].bind(tensors, self._activation, batch_size=batch_size)
                for role in self._step_roles
            }
            if self.use_cuda_graphs:
                self._capture(contexts)
        # Kept only once every role is bound (and captured): a failure leaves nothing half made.
        buffers.bound["contexts"] = contexts
        for role, bound in contexts.items():
            self._bound[(role, batch_size)] = bound
        return buffers

    def tensor_addresses(self, batch_size: int) -> dict[str, dict[str, int]]:
        """role -> tensor name -> device address bound in that engine's context (for checks)."""
        contexts = self.buffers(batch_size).bound["contexts"]
        return {role: self._engines[role].tensor_addresses(bound) for role, bound in contexts.items()}

    # -- CUDA graphs ----------------------------------------------------------------
    def capture_graphs(self, batch_size: int) -> None:
        """Capture one CUDA graph per engine for ``batch_size``; later steps replay them.

        Runs each engine once on whatever is staged (full, then reuse), so it
        overwrites the caches and the prediction: call it before a generation.
        """
        contexts = self.buffers(batch_size).bound["contexts"]
        if not any(bound.graph is not None for bound in contexts.values()):
            with self._torch.cuda.device(self._device):
                self._capture(contexts)

    def _capture(self, contexts: dict[str, BoundContext]) -> None:
        stream = self._stream
        stream.wait_stream(self._torch.cuda.current_stream(self._device))
        graphs = {role: self._engines[role].capture(contexts[role], stream) for role in self._step_roles}
        for role, graph in graphs.items():  # all captured, or none kept
            contexts[role].graph = graph

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
            self._engines[role].enqueue(buffers.bound["contexts"][role], stream)
            # The caller's stream (prediction reads, next staging) waits for the engine.
            self._outputs_ready.record(stream)
            current.wait_event(self._outputs_ready)

    def _gate_table_impl(self, rows: dict[str, Any]) -> Any:
        """Run the gates engine over ``rows`` in calls of at most ``gate_rows.max`` rows (its
        profile), on the engine stream, into one device table."""
        torch = self._torch
        bound = self._gates_context
        if bound is None:  # gate_table() checked gate_table_enabled: the engine is loaded
            raise BackendError("Backend 'tensorrt' | the gates engine is not loaded")
        engine = self._engines[GraphRole.GATES]
        graph = self.manifest.graphs[GraphRole.GATES]
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
                    require_aligned(tensor, f"gates engine tensor '{name}'")
                    tensor.record_stream(stream)  # in use on the engine stream until it is done
                engine.set_io(bound, tensors, batch_size=size)
                self._inputs_ready.record(current)
                stream.wait_event(self._inputs_ready)
                engine.enqueue(bound, stream)
                self._outputs_ready.record(stream)
                current.wait_event(self._outputs_ready)
                if output is not target:
                    target.copy_(output)
        return table

    def _stage_gates(self, buffers: StepBuffers, table: Any, first_row: int) -> None:
        buffers.inputs[GATES_NAME].copy_(table[first_row : first_row + buffers.batch_size])

    def read_prediction(self, buffers: StepBuffers) -> Any:
        return buffers.prediction.clone()
