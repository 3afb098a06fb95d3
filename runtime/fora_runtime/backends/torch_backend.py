"""PyTorch backend: runs the two step graphs saved as ``torch.export`` programs.

The engine folder carries ``full.pt2`` and ``reuse.pt2`` (written by
``fora_export.export.torch_program.export_program``) and a manifest record
``backends["torch"]`` naming them with the torch version, device and dtype they
were traced with. Loading needs no model source, diffusers or fora_export;
``torch`` itself is imported on activation.

Data path, per batch size (allocated once by ``buffers()``, outside any step):

- staged inputs are fixed tensors on the device; ``stage_input`` copies user
  inputs (numpy arrays, CPU or device tensors, scalar timesteps) into them;
- **CUDA with graphs** (the default on CUDA): after a warm-up on a side stream,
  the full program is captured once as a CUDA graph reading the staged inputs;
  its outputs (prediction and every cache) are static tensors at fixed
  addresses. The reuse program is then captured reading exactly those static
  cache tensors, so caches are never copied or moved. A step is "copy inputs,
  replay one graph" on the caller's current stream, without host sync;
  ``read_prediction`` returns a clone ordered on that stream. The two graphs of
  one batch size share a private memory pool (full captured first): the full
  graph's outputs stay referenced for the life of the buffers, so the reuse
  graph only takes memory the full graph frees during its capture (its
  temporaries). The reuse prediction may therefore lie in full's temporaries and
  is overwritten by the next full replay; ``read_prediction`` clones it before
  that. The graphs never run concurrently (use one stream per session). Each
  batch size gets its own pool: a shared one would let one batch size's caches
  sit in another's temporaries, which its replays overwrite.
- **eager** (CPU, or CUDA with ``use_cuda_graphs=False``): the programs run as
  they are; the cache tensors the full program returns become
  ``StepBuffers.caches`` and the reuse program receives those very tensors (no
  copy). They are new tensors after every full step; ``caches`` is empty until
  the first full step of a batch size.

Caches are therefore the programs' own output allocations rather than slices
of one arena (the ``ArenaLayout`` only reports their size): forcing them into an
arena would cost a copy per cache and step.

Forecast builds (``reuse_forecast.pt2``) keep two cache generations. Eager: the
previous full step's output tensors stay referenced as ``previous_caches`` (no copy).
CUDA graphs: the full program is captured once per generation, the second capture in
a private pool of its own (its static outputs, generation 1's caches, must not lie in
the first capture's temporaries, which every replay of it overwrites); each reuse
program is captured once per generation, reading that generation's outputs (the
forecast program also the other's as "previous"). A full step replays the capture
that writes the older generation.

fp32 programs on CUDA follow torch's TF32 switches, read when a graph is
captured: cuDNN convolutions (DiT's patch embedding) default to TF32, about 1e-3
off fp32. Turn ``torch.backends.cudnn.allow_tf32`` off before ``buffers()`` /
``session.start()`` for fp32 parity with CPU.

Programs are specialised to the device type they were traced on (CPU programs
do not run on CUDA, and the reverse) and may not load under another torch
version: both are checked against the manifest record on activation.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fora_runtime._lazy import import_optional
from fora_runtime.backends.base import StepBuffers
from fora_runtime.backends.torch_io import TorchTensorIO
from fora_runtime.backends.torch_ops import gated_residual_sum_op
from fora_runtime.caches import ArenaLayout
from fora_runtime.errors import BackendError
from fora_runtime.manifest import (
    FORECAST_ROLE,
    FORECAST_WEIGHT_NAME,
    GATE_TABLE_ROLES,
    GATES_NAME,
    GRAPH_ROLES,
    MANIFEST_NAME,
    GraphRole,
    LoadedTensor,
    Manifest,
    check_graph_io,
    graph_file,
)
from fora_runtime.trust import untrusted_program_error

log = logging.getLogger(__name__)

TORCH_INSTALL = "pip install torch"
RECORD_KEYS = ("programs", "torch", "device", "dtype", "inputs", "outputs")
#: Warm-up runs before capture (lazy init of kernels and cuBLAS workspaces).
WARMUP_RUNS = 2


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_program_record(record: Any, *, running_torch: str, where: str) -> dict[str, Any]:
    """Validate the manifest's ``backends["torch"]`` record against the running torch."""
    if not isinstance(record, dict):
        raise BackendError(
            f"{where} | has no torch programs (no backends.torch record) | rebuild with "
            "`fora-export build --backend torch`, or use the onnxruntime backend"
        )
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise BackendError(f"{where} | torch record lacks {missing} | re-export the torch programs")
    built = str(record["torch"])
    if _major_minor(built) is None or _major_minor(built) != _major_minor(running_torch):
        raise BackendError(
            f"{where} | programs were saved by torch {built}, this is torch {running_torch} | "
            f"re-export the programs with this torch, or install torch {built}"
        )
    roles = record["programs"]
    role_sets = (
        sorted(GRAPH_ROLES),
        sorted(GRAPH_ROLES + GATE_TABLE_ROLES),
        sorted((*GRAPH_ROLES, *GATE_TABLE_ROLES, FORECAST_ROLE)),
    )
    for key in ("programs", "inputs", "outputs"):
        value = record[key]
        if not isinstance(value, dict) or sorted(value) not in role_sets or sorted(value) != sorted(roles):
            raise BackendError(
                f"{where} | torch record field '{key}' is {value!r}, expected one entry per role "
                f"{list(GRAPH_ROLES)} (and optionally {list(GATE_TABLE_ROLES)}, then {FORECAST_ROLE}), the "
                "same in 'programs', "
                "'inputs' and 'outputs' | re-export the torch programs"
            )
    # The record is untrusted data: every value of the type the checks below compare.
    names_ok = all(
        isinstance(names, list) and all(isinstance(n, str) for n in names)
        for key in ("inputs", "outputs")
        for names in record[key].values()
    )
    batch = record.get("batch", {})
    if not (
        names_ok
        and all(isinstance(file, str) for file in roles.values())
        and all(isinstance(record[key], str) for key in ("device", "dtype"))
        and isinstance(batch, dict)
        and all(
            isinstance(batch.get(k, 1), int) and not isinstance(batch.get(k), bool) for k in ("min", "max")
        )
    ):
        raise BackendError(
            f"{where} | torch record has fields of the wrong type (program files and devices are "
            "strings, inputs/outputs lists of names, batch min/max integers) | re-export the torch programs"
        )
    return record


class TorchBackend(TorchTensorIO):
    """Runs ``full.pt2`` / ``reuse.pt2`` (and ``gates.pt2`` / ``reuse_gated.pt2`` where built)
    with PyTorch, on CUDA (graphed: full, reuse, reuse_gated; gates runs eagerly once per
    generation) or CPU (eager)."""

    name = "torch"
    supports_gate_table = True
    supports_forecast = True

    def __init__(
        self,
        manifest: Manifest,
        folder: Path,
        *,
        gate_table: bool = True,
        forecast: bool = True,
        device: str = "auto",
        use_cuda_graphs: bool = True,
    ) -> None:
        super().__init__(manifest, folder, gate_table=gate_table, forecast=forecast)
        self._requested_device = device
        self._use_cuda_graphs = use_cuda_graphs
        self._torch: Any = None
        self.device: Any = None
        self._programs: dict[str, Any] = {}
        self._step_names: tuple[str, ...] = ()
        self._cache_names: tuple[str, ...] = ()
        self._has_gate_programs = False
        self._has_forecast_program = False
        # Owned here (not only by StepBuffers) so deactivate syncs before releasing them.
        self._graphs: list[Any] = []

    def preflight(self) -> None:
        """Programs run code when loaded: refuse them from a folder nobody vouched for."""
        if not self.trust_programs:
            record = self.manifest.backends.get("torch")
            programs = record.get("programs") if isinstance(record, dict) else None
            first = programs.get(GraphRole.FULL) if isinstance(programs, dict) else None
            raise untrusted_program_error(self.folder / str(first or graph_file(GraphRole.FULL, "torch")))

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and self._use_cuda_graphs

    @property
    def io_device(self) -> Any:
        return self.device

    @property
    def gate_table_enabled(self) -> bool:
        return self.manifest.has_gate_table and self._has_gate_programs

    @property
    def forecast_enabled(self) -> bool:
        return self._has_forecast_program

    # -- lifecycle ------------------------------------------------------------------
    def _activate_impl(self) -> None:
        torch = import_optional("torch", backend=self.name, install=TORCH_INSTALL)
        record = check_program_record(
            self.manifest.backends.get("torch"), running_torch=torch.__version__, where=self._where()
        )
        self._torch = torch
        self.device = self._resolve_device(torch, str(record["device"]))
        self._check_io(record)
        self.preflight()
        # Reuse programs call fora's custom ops: they must exist before a program loads.
        gated_residual_sum_op(torch)
        programs: dict[str, Any] = {}
        roles = GRAPH_ROLES + (GATE_TABLE_ROLES if self._has_gate_programs else ())
        for role in roles + ((FORECAST_ROLE,) if self._has_forecast_program else ()):
            programs[role] = self._load(torch, record, role)
        self._programs = programs
        log.info(
            "torch backend on %s (%s), CUDA graphs %s",
            self.device,
            record["device"],
            "on" if self.uses_cuda_graphs else "off",
        )

    def _resolve_device(self, torch: Any, recorded: str) -> Any:
        """The device to run on; it must be of the type the programs were traced on."""
        traced = recorded.split(":", 1)[0]
        requested = self._requested_device
        if requested == "auto":
            requested = traced
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError) as err:
            raise BackendError(
                f"Backend 'torch' | device {requested!r} is not a torch device ({err}) | "
                "pass 'auto', 'cpu', 'cuda' or 'cuda:N'"
            ) from err
        if device.type != traced:
            raise BackendError(
                f"{self._where()} | torch programs were traced on {recorded}, this backend runs on "
                f"{device} | re-export the programs on a {device.type} device (tracing fixes the "
                f"device), or pass device='{traced}'"
            )
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendError(
                    f"Backend 'torch' | programs need CUDA ({recorded}) but torch.cuda.is_available() "
                    "is False | run on a machine with an NVIDIA GPU and CUDA torch"
                )
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            gpu = f"cuda:{torch.cuda.get_device_name(device)}"
            if gpu != recorded:
                log.info("torch programs traced on %s run on %s", recorded, gpu)
        return device

    def _check_io(self, record: dict[str, Any]) -> None:
        """The programs' IO (from the record) must be their graphs' in the manifest (the graph
        contract), in order: the programs are called positionally."""
        manifest = self.manifest
        where = self._where()
        if record["dtype"] != manifest.prediction.dtype:
            raise BackendError(
                f"{where} | torch programs are {record['dtype']}, the manifest's prediction "
                f"{manifest.prediction.dtype} | programs and manifest come from different builds; rebuild"
            )
        batch = record.get("batch")
        if isinstance(batch, dict):
            low, high = batch.get("min", 1), batch.get("max", 0)
            if not low <= manifest.batch.min <= manifest.batch.max <= high:
                raise BackendError(
                    f"{where} | torch programs accept batch {low}..{high}, not {manifest.batch} | "
                    "programs and manifest come from different builds; rebuild"
                )
        programs = record["programs"]
        self._has_gate_programs = (
            self.use_gate_table and manifest.has_gate_table and GraphRole.GATES in programs
        )
        self._has_forecast_program = (
            self._has_gate_programs
            and self.use_forecast
            and manifest.has_forecast
            and FORECAST_ROLE in programs
        )
        roles = GRAPH_ROLES + (GATE_TABLE_ROLES if self._has_gate_programs else ())
        for role in roles + ((FORECAST_ROLE,) if self._has_forecast_program else ()):
            check_graph_io(
                role,
                manifest.module_io(role),
                [LoadedTensor(str(name)) for name in record["inputs"][role]],
                [LoadedTensor(str(name)) for name in record["outputs"][role]],
                where=f"{where} ({role} program)",
            )
        cache_names = tuple(c.name for c in manifest.caches)
        self._step_names = tuple(t.name for t in manifest.module_io(GraphRole.FULL).inputs)
        self._cache_names = cache_names

    def _load(self, torch: Any, record: dict[str, Any], role: str) -> Any:
        file = str(record["programs"][role])
        path = self.folder / file
        if file not in self.manifest.files:
            raise BackendError(
                f"{path} | not listed in {MANIFEST_NAME} 'files', so it is not verified | rebuild, or add "
                "its bytes and sha256 to the manifest"
            )
        try:
            program = self._on_device(torch, torch.export.load(str(path)))
            module = program.module().to(self.device)
        except Exception as err:  # torch.export raises many unrelated exception types
            raise BackendError(
                f"{path} | torch {torch.__version__} cannot load it ({type(err).__name__}: {err}) | "
                "re-export the programs with this torch"
            ) from err
        module.requires_grad_(False)
        return module

    def _on_device(self, torch: Any, program: Any) -> Any:
        """The program with its traced CUDA device index replaced by ours. Tracing bakes the
        device into graph nodes (``arange(device=...)``, ``_assert_tensor_metadata``), which
        ``Module.to`` does not touch: a program traced on cuda:0 fails on cuda:1."""
        if self.device.type != "cuda":
            return program
        traced = {
            value.device
            for value in (*program.state_dict.values(), *program.constants.values())
            if isinstance(value, torch.Tensor)
        }
        for graph_module in program.graph_module.modules():
            if isinstance(graph_module, torch.fx.GraphModule):
                for node in graph_module.graph.nodes:
                    if isinstance(node.kwargs.get("device"), torch.device):
                        traced.add(node.kwargs["device"])
        moves = {str(d): str(self.device) for d in traced if d.type == "cuda" and d != self.device}
        if not moves:
            return program
        from torch.export.passes import move_to_device_pass

        return move_to_device_pass(program, moves)

    def _deactivate_impl(self) -> None:
        if self._graphs and self._torch is not None:
            self._torch.cuda.synchronize(self.device)  # no replay may be in flight when graphs die
        self._graphs.clear()
        self._programs.clear()

    # -- buffers --------------------------------------------------------------------
    def _allocate_impl(self, batch_size: int, layout: ArenaLayout) -> StepBuffers:
        torch = self._torch
        inputs: dict[str, Any] = {}
        for name in self._step_names:
            spec = self.manifest.input_spec(name)
            # Zeros, not empty: warm-up and capture run on these (class label 0 is valid).
            inputs[name] = torch.zeros(
                spec.concrete_shape(batch_size), dtype=self._torch_dtype(spec.dtype), device=self.device
            )
        if self.gate_table_enabled:  # the reuse_gated step reads its table row from here
            inputs[GATES_NAME] = torch.zeros(
                (batch_size, *self.manifest.gate_table_shape),
                dtype=self._torch_dtype(self.manifest.gate_table_dtype),
                device=self.device,
            )
        if self._has_forecast_program:  # the forecast step reads each sample's weight from here
            inputs[FORECAST_WEIGHT_NAME] = torch.zeros((batch_size,), dtype=torch.float32, device=self.device)
        buffers = StepBuffers(
            batch_size=batch_size,
            inputs=inputs,
            caches={},
            prediction=None,
            cache_layout=layout,
            previous_caches={} if self._has_forecast_program else None,
        )
        if self.uses_cuda_graphs:
            try:
                self._capture(buffers)
            except Exception as err:  # capture errors surface as RuntimeError or CUDA errors
                raise BackendError(
                    f"Backend 'torch' | capturing CUDA graphs at batch {batch_size} failed "
                    f"({type(err).__name__}: {err}) | pass use_cuda_graphs=False to run eagerly"
                ) from err
        return buffers

    def _capture(self, buffers: StepBuffers) -> None:
        """Capture one CUDA graph per program, generation and this batch size (see module
        docstring)."""
        torch = self._torch
        full, reuse = self._programs[GraphRole.FULL], self._programs[GraphRole.REUSE]
        gated = self._programs.get(GraphRole.REUSE_GATED)
        forecast = self._programs.get(FORECAST_ROLE)
        generations = 2 if forecast is not None else 1
        args = self._step_args(buffers)
        with torch.cuda.device(self.device), torch.no_grad():
            # On this device: torch.cuda.graph's own default side stream is created once per
            # process, on whichever device was current then. Both captures use it (as the
            # docs ask of captures sharing a pool).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    outputs = full(*args)
                    reuse(*args, *outputs[1:])
                    if gated is not None:
                        gated(*self._gated_args(buffers, outputs[1:]))
                    if forecast is not None:
                        forecast(*self._forecast_args(buffers, outputs[1:], outputs[1:]))
            torch.cuda.current_stream().wait_stream(side)
            del outputs

            # Full captures first: generation g's caches are capture g's static outputs.
            full_graphs, cache_sets, full_predictions = [], [], []
            for _ in range(generations):
                full_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(full_graph, stream=side):  # a new private pool each
                    outputs = full(*args)
                full_graphs.append(full_graph)
                cache_sets.append(tuple(outputs[1:]))
                full_predictions.append(outputs[0])
            pool = full_graphs[0].pool()
            graphs: dict[str, list[Any]] = {GraphRole.FULL: full_graphs}
            predictions: dict[str, list[Any]] = {GraphRole.FULL: full_predictions}
            for generation in range(generations):
                caches = cache_sets[generation]
                captures = [(GraphRole.REUSE, reuse, (*args, *caches))]
                if gated is not None:
                    captures.append((GraphRole.REUSE_GATED, gated, self._gated_args(buffers, caches)))
                if forecast is not None:
                    previous = cache_sets[1 - generation]
                    captures.append((FORECAST_ROLE, forecast, self._forecast_args(buffers, caches, previous)))
                for role, program, program_args in captures:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=side):
                        prediction = program(*program_args)
                    graphs.setdefault(role, []).append(graph)
                    predictions.setdefault(role, []).append(prediction)
        self._graphs.extend(graph for per_generation in graphs.values() for graph in per_generation)
        buffers.caches.update(zip(self._cache_names, cache_sets[0], strict=True))
        if buffers.previous_caches is not None:
            buffers.previous_caches.update(zip(self._cache_names, cache_sets[1], strict=True))
        # Not outputs[0]: capture ran nothing, so there is no prediction until a step replays.
        buffers.prediction = None
        buffers.bound["graphs"] = graphs
        buffers.bound["predictions"] = predictions

    def _step_args(self, buffers: StepBuffers) -> tuple[Any, ...]:
        return tuple(buffers.inputs[name] for name in self._step_names)

    def _gated_args(self, buffers: StepBuffers, caches: tuple[Any, ...]) -> tuple[Any, ...]:
        return (buffers.inputs[self.manifest.latents_input.name], buffers.inputs[GATES_NAME], *caches)

    def _forecast_args(
        self, buffers: StepBuffers, caches: tuple[Any, ...], previous: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        latents = buffers.inputs[self.manifest.latents_input.name]
        weight = buffers.inputs[FORECAST_WEIGHT_NAME]
        return (latents, buffers.inputs[GATES_NAME], weight, *caches, *previous)

    # -- stepping -------------------------------------------------------------------
    def _run_impl(self, role: str, buffers: StepBuffers) -> None:
        graphs = buffers.bound.get("graphs")
        if graphs is not None:
            graphs[role][buffers.generation].replay()
            buffers.prediction = buffers.bound["predictions"][role][buffers.generation]
            return
        program = self._programs[role]
        args = self._step_args(buffers)
        if role != GraphRole.FULL:  # run_reuse / run_reuse_gated have checked that a full step ran
            caches = tuple(buffers.caches[n] for n in self._cache_names)
            if role == FORECAST_ROLE:
                assert buffers.previous_caches is not None  # run_reuse_forecast checked two full steps
                previous = tuple(buffers.previous_caches[n] for n in self._cache_names)
                args = self._forecast_args(buffers, caches, previous)
            elif role == GraphRole.REUSE_GATED:
                args = self._gated_args(buffers, caches)
            else:
                args = (*args, *caches)
        try:
            with self._torch.no_grad():
                outputs = program(*args)
        except Exception as err:  # the program's own guards and kernels raise various types
            raise BackendError(
                f"Backend 'torch' | {role} program failed: {type(err).__name__}: {err}"
            ) from err
        if role == GraphRole.FULL:
            buffers.prediction = outputs[0]
            # Same dict, new tensors: the reuse program gets these very objects.
            buffers.caches.update(zip(self._cache_names, outputs[1:], strict=True))
        else:
            buffers.prediction = outputs

    def _gate_table_impl(self, rows: dict[str, Any]) -> Any:
        torch = self._torch
        specs = self.manifest.graphs[GraphRole.GATES].inputs
        program = self._programs[GraphRole.GATES]
        parts = []
        with torch.no_grad():
            for _, chunk in self.gate_row_chunks(rows):
                args = [
                    torch.as_tensor(chunk[spec.name]).to(self.device, dtype=self._torch_dtype(spec.dtype))
                    for spec in specs
                ]
                try:
                    parts.append(program(*args))
                except Exception as err:  # the program's own guards and kernels raise various types
                    raise BackendError(
                        f"Backend 'torch' | gates program failed: {type(err).__name__}: {err}"
                    ) from err
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _stage_gates(self, buffers: StepBuffers, table: Any, first_row: int) -> None:
        buffers.inputs[GATES_NAME].copy_(table[first_row : first_row + buffers.batch_size])

    def _stage_forecast_weights(self, buffers: StepBuffers, weights: Any) -> None:
        buffers.inputs[FORECAST_WEIGHT_NAME].copy_(weights)

    def read_prediction(self, buffers: StepBuffers) -> Any:
        if buffers.prediction is None:
            raise BackendError(
                f"Backend 'torch' | no step ran at batch {buffers.batch_size} | run a step first"
            )
        if buffers.bound.get("graphs") is not None:
            return buffers.prediction.clone()  # the static output is overwritten by the next replay
        return buffers.prediction  # eager: a fresh tensor per step, never written again
