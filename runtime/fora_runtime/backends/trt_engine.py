"""One TensorRT plan file: :class:`TrtEngine`, the unit the TensorRT backend composes.

An engine owns one deserialised ``ICudaEngine`` of one graph role (``full``, ``reuse``,
``gates``, ``reuse_gated``) and everything that is per engine: the plan check of its
flavour, the check of its IO against the manifest and the buffers it will be bound to,
``USER_MANAGED`` execution contexts on an activation buffer the caller shares between
engines, binding a context to fixed buffer addresses, capturing it as a CUDA graph, and
enqueueing it. Allocation, streams and the order engines run in belong to the backend
(``trt.py``). Every TensorRT call of the runtime is here or in ``trt_flavor.py``;
nothing here imports TensorRT or torch at import time (they are passed in).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fora_runtime.caches import ALIGNMENT
from fora_runtime.dtypes import TENSORRT_NAMES
from fora_runtime.errors import BackendError
from fora_runtime.manifest import GraphRole, LoadedTensor, Manifest, check_graph_io
from fora_runtime.trust import untrusted_plan_error

if TYPE_CHECKING:
    import tensorrt

    from fora_runtime.backends.trt_flavor import TrtFlavor, TrtModule

BACKEND = "Backend 'tensorrt'"


@dataclass(frozen=True)
class Binding:
    """One IO tensor of an engine and the buffer it is bound to."""

    name: str
    is_input: bool
    #: "inputs" (a staging buffer), "caches" (an arena slot), "prediction", or "table"
    #: (the gates engine's output).
    buffer: str


@dataclass
class BoundContext:
    """An execution context of one engine with tensor shapes and addresses set, the
    IRuntimeConfig it was created with (kept alive as long as the context; None on the
    strategy-argument route) and, once captured, its CUDA graph."""

    context: tensorrt.IExecutionContext
    runtime_config: Any
    graph: Any = None


def require_aligned(tensor: Any, what: str) -> None:
    address = int(tensor.data_ptr())
    if address % ALIGNMENT:
        raise BackendError(
            f"{BACKEND} | the {what} at {address:#x} is not {ALIGNMENT}-byte aligned (torch's "
            f"CUDA allocator returned an unaligned block) | use torch's default CUDA caching allocator "
            "(check PYTORCH_CUDA_ALLOC_CONF)"
        )


def engine_io(
    trt: Any, manifest: Manifest, role: str, engine: tensorrt.ICudaEngine, path: Path
) -> list[Binding]:
    """The engine's IO, in binding order, with the buffer each tensor is bound to.

    The IO is checked against ``role``'s graph in the manifest (names, dtypes, shapes with
    dynamic axes; :func:`~fora_runtime.manifest.check_graph_io`). The graph contract the
    manifest was checked against then guarantees each tensor fits its buffer: staging
    buffers are allocated from the step inputs (and the gate table), cache slots from the
    manifest's caches, and the one prediction buffer every engine writes from the full
    graph's prediction.
    """
    caches = {c.name for c in manifest.caches}
    inputs: list[LoadedTensor] = []
    outputs: list[LoadedTensor] = []
    io: list[Binding] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = engine.get_tensor_dtype(name)
        dims = engine.get_tensor_shape(name)
        shape = tuple(None if int(dims[i]) < 0 else int(dims[i]) for i in range(len(dims)))
        (inputs if is_input else outputs).append(
            LoadedTensor(name, TENSORRT_NAMES.get(dtype.name, dtype.name), shape)
        )
        if name in caches:
            buffer = "caches"
        elif is_input:
            buffer = "inputs"
        else:
            buffer = "table" if role == GraphRole.GATES else "prediction"
        io.append(Binding(name, is_input, buffer))
    check_graph_io(role, manifest.graphs[role], inputs, outputs, where=str(path), ordered=False)
    for binding in io:
        if engine.get_tensor_location(binding.name) != trt.TensorLocation.DEVICE:
            kind = "input" if binding.is_input else "output"
            raise BackendError(
                f"{path} | {kind} '{binding.name}' lives in host memory | not supported; rebuild"
            )
    return io


class TrtEngine:
    """One plan file of one graph role, deserialised, its IO checked (see the module docstring).

    ``TrtEngine.load`` does the work; the instance is then used while the backend is
    active and dropped on deactivation (after the backend's stream is idle).
    """

    def __init__(
        self,
        role: str,
        path: Path,
        engine: tensorrt.ICudaEngine,
        io: list[Binding],
        *,
        trt: TrtModule,
        flavor: TrtFlavor,
        torch: Any,
    ) -> None:
        self.role = role
        self.path = path
        self.engine = engine
        #: The IO tensors in binding order, each with the buffer it is bound to.
        self.io = io
        self._trt = trt
        self._flavor = flavor
        self._torch = torch

    @classmethod
    def load(
        cls,
        role: str,
        path: Path,
        manifest: Manifest,
        *,
        runtime: tensorrt.Runtime,
        trt: TrtModule,
        flavor: TrtFlavor,
        torch: Any,
        trusted: bool = False,
    ) -> TrtEngine:
        """Read ``path``, check it with the flavour (TensorRT-RTX asks whether the plan runs on
        this GPU), deserialise it and check its IO against ``role`` in the manifest. Untrusted
        (``runtime`` restricted by ``fora_runtime.trust.restrict_tensorrt_runtime``), a plan
        with plugin layers or host code fails to deserialise and says why."""
        blob = path.read_bytes()
        flavor.check_plan(trt, runtime, blob, str(path))
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None and not trusted:
            raise untrusted_plan_error(path, flavor.title)
        if engine is None:
            raise BackendError(
                f"{path} | {flavor.title} cannot deserialize it (see the TensorRT error above) "
                f"| rebuild the engines with this {flavor.title} on this GPU"
            )
        io = engine_io(trt, manifest, role, engine, path)
        return cls(role, path, engine, io, trt=trt, flavor=flavor, torch=torch)

    @property
    def device_memory_bytes(self) -> int:
        """Activation memory a context of this engine needs (any profile, any shape)."""
        return int(self.engine.device_memory_size_v2)

    def create_context(self, activation: Any) -> BoundContext:
        """A context without its own device memory, running on ``activation`` (a torch
        uint8 tensor the backend shares between all engines: they never run concurrently)."""
        trt = self._trt
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        runtime_config: Any = None
        if hasattr(self.engine, "create_runtime_config"):
            # The IRuntimeConfig route. IRuntimeConfig.set_execution_context_allocation_strategy is
            # in the TensorRT 11.4 Python API reference; ICudaEngine.create_runtime_config and the
            # create_execution_context(runtime_config) overload are in the 10.13 Python bindings
            # (and in the C++ API as createRuntimeConfig / createExecutionContext(IRuntimeConfig*)).
            # Not yet run against an 11.x install.
            runtime_config = self.engine.create_runtime_config()
            runtime_config.set_execution_context_allocation_strategy(strategy)
            self._flavor.configure_runtime_config(trt, runtime_config)
            context = self.engine.create_execution_context(runtime_config)
        else:  # TensorRT 10.x before IRuntimeConfig
            context = self.engine.create_execution_context(strategy)
        if context is None:
            raise BackendError(f"{BACKEND} | cannot create a {self.role} execution context (out of memory?)")
        context.set_device_memory(int(activation.data_ptr()), int(activation.numel()))
        return BoundContext(context, runtime_config)

    def bind(self, tensors: dict[str, Any], activation: Any, *, batch_size: int) -> BoundContext:
        """A context with the shapes and addresses of ``tensors`` (every IO tensor by name:
        torch CUDA tensors at fixed addresses) set once, its output shapes checked."""
        bound = self.create_context(activation)
        self.set_io(bound, tensors, batch_size=batch_size)
        return bound

    def set_io(self, bound: BoundContext, tensors: dict[str, Any], *, batch_size: int) -> None:
        """Set every IO tensor's shape (inputs) and address from ``tensors`` and check that
        the output shapes TensorRT infers are the tensors' own."""
        context, role = bound.context, self.role
        for binding in self.io:
            tensor = tensors[binding.name]
            shape = tuple(int(d) for d in tensor.shape)
            if binding.is_input and not context.set_input_shape(binding.name, shape):
                raise BackendError(
                    f"{BACKEND} | {role} engine refuses shape {list(shape)} for '{binding.name}' "
                    f"(batch {batch_size}) | use a batch size inside the engines' profile, or rebuild "
                    "with a wider --batch"
                )
            if not context.set_tensor_address(binding.name, int(tensor.data_ptr())):
                raise BackendError(f"{BACKEND} | {role} engine refuses the address of '{binding.name}'")
        for binding in self.io:
            if binding.is_input:
                continue
            dims = context.get_tensor_shape(binding.name)
            got = tuple(int(dims[i]) for i in range(len(dims)))
            want = tuple(int(d) for d in tensors[binding.name].shape)
            if got != want:
                raise BackendError(
                    f"{BACKEND} | {role} output '{binding.name}' has shape {list(got)} at batch "
                    f"{batch_size}, the manifest says {list(want)} | rebuild the engines"
                )

    def tensor_addresses(self, bound: BoundContext) -> dict[str, int]:
        """Tensor name -> the device address bound in ``bound``'s context (for checks)."""
        return {b.name: int(bound.context.get_tensor_address(b.name)) for b in self.io}

    def enqueue(self, bound: BoundContext, stream: Any) -> None:
        """Run once on ``stream`` (a torch CUDA stream): replay the captured graph, or enqueue."""
        if bound.graph is not None:
            with self._torch.cuda.stream(stream):
                bound.graph.replay()
        elif not bound.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(
                f"{BACKEND} | {self.role} engine failed to run (see the TensorRT error above) "
                "| check the inputs; rebuild the engines if it persists"
            )

    def capture(self, bound: BoundContext, stream: Any) -> Any:
        """Capture ``bound`` as a CUDA graph on ``stream`` and return it (not yet kept in
        ``bound``: the backend keeps the graphs of a batch size only once all are captured).

        Runs the engine once outside the capture on whatever is bound: the first enqueue
        after shapes or addresses are set does deferred setup work (TensorRT-RTX compiles its
        shape-specialised kernels there) that must not end up in the graph.
        """
        torch = self._torch
        if not bound.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{BACKEND} | {self.role} engine failed to run (see the TensorRT error above)")
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                captured = bound.context.execute_async_v3(stream.cuda_stream)
        except RuntimeError as err:
            raise BackendError(
                f"{BACKEND} | CUDA graph capture of the {self.role} engine failed ({err}) "
                "| create the backend with use_cuda_graphs=False"
            ) from err
        if not captured:
            raise BackendError(
                f"{BACKEND} | {self.role} engine could not be captured in a CUDA graph "
                "| create the backend with use_cuda_graphs=False"
            )
        return graph
