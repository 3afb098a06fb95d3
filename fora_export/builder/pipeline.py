"""``fora-export build``: load, split, export both graphs, write the manifest.

The folder is built in a hidden temporary sibling and moved into place only
when everything (graphs, checks, manifest) succeeded, so a failed or
interrupted build never leaves a folder claiming graphs that do not exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

import fora_export
from fora_export.adapters.base import DTYPE_NAMES, GateTableGraphs, torch_program_ops
from fora_export.adapters.casting import cast_model
from fora_export.adapters.registry import adapter_for
from fora_export.builder import tensorrt as trt_build
from fora_export.builder.config import BuildConfig
from fora_export.builder.trt_flavors import BuildFlavor
from fora_export.errors import BuildError, ExportError
from fora_export.export.onnx_export import export_onnx, graph_io
from fora_export.loading import LoadedModel, load_model
from fora_export.progress import StageProgress
from fora_export.split.graphs import SplitModel, split_model
from fora_runtime.manifest import (
    BATCH_AXIS,
    GATES_NAME,
    MANIFEST_NAME,
    BatchRange,
    CacheSpec,
    GraphSpec,
    Manifest,
    TensorSpec,
    sha256_of,
)

log = logging.getLogger(__name__)

GRAPH_FILES = {"full": "full.onnx", "reuse": "reuse.onnx"}
GATE_GRAPH_FILES = {"gates": "gates.onnx", "reuse_gated": "reuse_gated.onnx"}
#: Rows (steps x samples) one call of the gates graph takes; the runtime splits longer
#: generations into calls of at most ``max`` rows (a TensorRT engine's activation memory
#: grows with its profile's largest shape; calls are once per generation, so few is enough).
GATE_ROWS = BatchRange(min=1, opt=256, max=1024)
PREDICTION = "prediction"


@dataclass
class BuildResult:
    folder: Path
    manifest: Manifest
    seconds: float
    #: What the build wrote beyond ONNX, and why (``--backend auto``'s choice).
    backend_note: str = ""


def build(
    model_ref: str, out: str | Path, config: BuildConfig, *, force: bool = False, progress: bool | None = None
) -> BuildResult:
    """Build the engine folder ``out`` for MODEL ``model_ref``."""
    out = Path(out)
    _check_destination(out, force)
    tensorrt_flavor, backend_note = resolve_backend(config.backend)
    log.info("%s", backend_note)
    started = time.perf_counter()
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        stage_count = 6 if tensorrt_flavor or config.backend == "torch" else 5
        with StageProgress(stage_count, title=f"build {out.name}", enabled=progress) as stages:
            stages.stage(f"loading {model_ref}")
            loaded = load_model(model_ref)
            tmp.mkdir(parents=True)
            if tensorrt_flavor and out.is_dir():
                trt_build.seed_timing_cache(out, tmp, tensorrt_flavor)  # rebuilds reuse the earlier tuning
            manifest = export_folder(loaded, tmp, config, stages, tensorrt_flavor=tensorrt_flavor)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info("built %s in %.1f s", out, seconds)
    return BuildResult(folder=out, manifest=manifest, seconds=seconds, backend_note=backend_note)


def resolve_backend(backend: str) -> tuple[BuildFlavor | None, str]:
    """Resolve ``--backend``: the TensorRT flavour this build also makes engines with (None:
    no engines), and what it will write, in words (``auto`` says why it chose)."""
    if backend == "onnx":
        return None, "backend onnx: ONNX graphs"
    if backend == "torch":
        return None, "backend torch: ONNX graphs + torch.export programs"
    return trt_build.resolve_tensorrt(backend)


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out '{out}' | is a file | choose a folder path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BuildError(f"--out '{out}' | already exists | pass --force to replace it")
        if not (out / MANIFEST_NAME).is_file():
            # --force replaces engine folders only, never a folder of other files.
            raise BuildError(
                f"--out '{out}' | is not empty and not an engine folder (no {MANIFEST_NAME}) "
                "| choose another --out; --force only replaces engine folders"
            )
    if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise BuildError(f"--out '{out}' | is the current folder or one above it | choose a subfolder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BuildError(f"--out '{out}' | cannot create parent folder: {err}") from err
    if not os.access(out.parent, os.W_OK):
        raise BuildError(f"--out '{out}' | parent folder is not writable")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished folder in; on failure the previous folder is put back."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except OSError as err:
        if old.exists() and not out.exists():
            old.rename(out)
        raise BuildError(f"--out '{out}' | cannot move the finished build into place: {err}") from err
    shutil.rmtree(old, ignore_errors=True)


def export_folder(
    loaded: LoadedModel,
    folder: Path,
    config: BuildConfig,
    stages: StageProgress,
    *,
    tensorrt_flavor: BuildFlavor | None = None,
) -> Manifest:
    """Split ``loaded`` and write graphs + manifest into ``folder``."""
    stages.stage("splitting")
    adapter = adapter_for(loaded.model, config.adapter, where=f"MODEL '{loaded.source}'")
    dtype = adapter.check_precision(config.precision)
    cast_model(adapter.model, dtype)
    # torch programs are traced where they will run; the ONNX export runs there too
    # (the graphs do not depend on it, and tracing big fp16 models is slow on CPU).
    device = torch.device(_torch_device(config.device) if config.backend == "torch" else "cpu")
    adapter.model.to(device)
    resolution = config.resolution or adapter.default_resolution()
    adapter.check_resolution(resolution)
    adapter.fix_resolution(resolution)
    step_specs = adapter.step_input_specs(resolution, config.precision)
    input_names = tuple(s.name for s in step_specs)
    split = split_model(adapter, input_names)
    try:
        batch = config.batch
        trace_batch = batch.opt if batch.opt > 1 else min(2, batch.max)
        generator = torch.Generator().manual_seed(0)
        example = adapter.random_inputs(trace_batch, resolution, config.precision, generator)
        example = {name: tensor.to(device) for name, tensor in example.items()}
        with torch.no_grad():
            _, caches = split.run_full(example)
        cache_specs = _cache_specs(split, caches)
        reuse_module = _reuse_module(split, config).to(device)

        stages.stage("exporting full graph")
        export_onnx(
            split.full,
            tuple(example[n] for n in input_names),
            list(input_names),
            [PREDICTION, *split.cache_names],
            folder / GRAPH_FILES["full"],
            config.export,
            batch_range=batch,
        )
        stages.stage("exporting reuse graph")
        export_onnx(
            reuse_module,
            (*(example[n] for n in input_names), *(caches[n] for n in split.cache_names)),
            [*input_names, *split.cache_names],
            [PREDICTION],
            folder / GRAPH_FILES["reuse"],
            config.export,
            batch_range=batch,
        )
        gate_table = _gate_table_export(split, reuse_module, example, caches)
        if gate_table is not None:
            stages.add_stages(1)
            stages.stage("exporting gate-table graphs")
            _export_gate_table_onnx(gate_table, folder, config)
        files = {**GRAPH_FILES, **(GATE_GRAPH_FILES if gate_table is not None else {})}
        graphs = {role: _graph_spec(folder, file) for role, file in files.items()}
        gates_spec = graphs["gates"].outputs[0] if gate_table is not None else None
        _check_graphs(graphs, step_specs, cache_specs, gates_spec)
        backends = {}
        if config.backend == "torch":
            stages.stage("exporting torch programs")
            backends["torch"] = _export_torch_programs(
                split, reuse_module, gate_table, example, caches, folder, config
            )
        if tensorrt_flavor:
            stages.stage(f"building {tensorrt_flavor.title} engines")
            backends["tensorrt"] = trt_build.build_folder_engines(
                folder,
                graphs,
                batch,
                config.tensorrt,
                gate_rows=GATE_ROWS if gate_table is not None else None,
                flavor=tensorrt_flavor,
            )
        stages.stage("writing manifest")
        manifest = Manifest(
            model_class=type(adapter.model).__name__,
            family=adapter.family,
            model_config=_jsonable(adapter.config),
            source=loaded.source,
            resolution=resolution,
            batch=batch,
            precision=config.precision,
            schedule=config.schedule,
            conditioning=adapter.conditioning(),
            graphs=graphs,
            caches=tuple(cache_specs),
            files=_file_records(folder),
            tools=_tool_versions(),
            export={
                **config.to_dict()["export"],
                "adapter_options": config.adapter.to_dict(),
                "cached_kinds": list(adapter.cached_kinds),
                "reuse_graph": "plain" if reuse_module is split.reuse else "lean",
                "subfolder": loaded.subfolder,
                "trace_batch": trace_batch,
            },
            config_hash=_config_hash(adapter.config, loaded.source, config),
            backends=backends,
            gate_rows=GATE_ROWS if gate_table is not None else None,
        )
        manifest.write(folder)
        return manifest
    finally:
        split.remove()


def _reuse_module(split: SplitModel, config: BuildConfig) -> torch.nn.Module:
    """The family's lean reuse step when asked for and available, else the plain one."""
    if config.reuse_graph == "plain":
        return split.reuse
    lean = split.adapter.lean_reuse_graph(split.input_names, split.cache_names)
    if lean is None:
        log.info(
            "reuse graph: plain (%s has no lean variant for caches %s)",
            split.adapter.family,
            ",".join(split.adapter.cached_kinds),
        )
        return split.reuse
    return lean.eval()


@dataclass
class _GateTableExport:
    """A family's gate-table graphs with their example inputs and IO names, made once for
    every exporter (ONNX and torch programs trace the same examples)."""

    graphs: GateTableGraphs
    table_args: tuple[torch.Tensor, ...]
    gated_args: tuple[torch.Tensor, ...]
    gated_names: list[str]  # latents, the table row, the caches


def _gate_table_export(
    split: SplitModel,
    reuse_module: torch.nn.Module,
    example: dict[str, torch.Tensor],
    caches: dict[str, torch.Tensor],
) -> _GateTableExport | None:
    """The family's gate-table graphs, built along with a lean reuse graph only."""
    if reuse_module is split.reuse:
        return None
    graphs = split.adapter.gate_table_graphs(split.cache_names)
    if graphs is None:
        return None
    table_args = tuple(example[n] for n in graphs.table_inputs)
    with torch.no_grad():
        gates = graphs.table(*table_args)
    return _GateTableExport(
        graphs=graphs,
        table_args=table_args,
        gated_args=(example["latents"], gates, *(caches[n] for n in split.cache_names)),
        gated_names=["latents", GATES_NAME, *split.cache_names],
    )


def _export_gate_table_onnx(gate_table: _GateTableExport, folder: Path, config: BuildConfig) -> None:
    export_onnx(
        gate_table.graphs.table,
        gate_table.table_args,
        list(gate_table.graphs.table_inputs),
        [GATES_NAME],
        folder / GATE_GRAPH_FILES["gates"],
        config.export,
        batch_range=GATE_ROWS,
    )
    export_onnx(
        gate_table.graphs.gated_reuse,
        gate_table.gated_args,
        gate_table.gated_names,
        [PREDICTION],
        folder / GATE_GRAPH_FILES["reuse_gated"],
        config.export,
        batch_range=config.batch,
    )


def _export_torch_programs(
    split: SplitModel,
    reuse_module: torch.nn.Module,
    gate_table: _GateTableExport | None,
    example: dict[str, torch.Tensor],
    caches: dict[str, torch.Tensor],
    folder: Path,
    config: BuildConfig,
) -> dict[str, object]:
    """Trace the step graphs as torch.export programs (on the example's device)."""
    from fora_export.export.torch_program import (
        GATE_PROGRAM_FILES,
        PROGRAM_FILES,
        export_program,
        torch_manifest_record,
    )

    names = list(split.input_names)
    gated = (gate_table.graphs.gated_reuse,) if gate_table is not None else ()
    # Reuse programs call fora's fused ops where the ONNX graphs spell the arithmetic out.
    with torch_program_ops(reuse_module, *gated):
        export_program(
            split.full,
            tuple(example[n] for n in names),
            folder / PROGRAM_FILES["full"],
            config.batch,
            input_names=names,
            output_names=[PREDICTION, *split.cache_names],
        )
        export_program(
            reuse_module,
            (*(example[n] for n in names), *(caches[n] for n in split.cache_names)),
            folder / PROGRAM_FILES["reuse"],
            config.batch,
            input_names=[*names, *split.cache_names],
            output_names=[PREDICTION],
        )
        if gate_table is not None:
            export_program(
                gate_table.graphs.table,
                gate_table.table_args,
                folder / GATE_PROGRAM_FILES["gates"],
                GATE_ROWS,
                input_names=list(gate_table.graphs.table_inputs),
                output_names=[GATES_NAME],
            )
            export_program(
                gate_table.graphs.gated_reuse,
                gate_table.gated_args,
                folder / GATE_PROGRAM_FILES["reuse_gated"],
                config.batch,
                input_names=gate_table.gated_names,
                output_names=[PREDICTION],
            )
    return torch_manifest_record(folder)


def _torch_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError(f"--device {requested} | no CUDA GPU is visible | use --device cpu or a GPU machine")
    return requested


def _cache_specs(split: SplitModel, caches: dict[str, torch.Tensor]) -> list[CacheSpec]:
    specs = []
    for point in split.taps.points:
        tensor = caches[point.name]
        specs.append(
            CacheSpec(
                name=point.name,
                dtype=DTYPE_NAMES[tensor.dtype],
                shape=(BATCH_AXIS, *tensor.shape[1:]),
                block=point.block,
                kind=point.kind,
            )
        )
    return specs


def _graph_spec(folder: Path, file: str) -> GraphSpec:
    inputs, outputs = graph_io(folder / file)
    return GraphSpec(file=file, inputs=tuple(inputs), outputs=tuple(outputs))


def _check_graphs(
    graphs: dict[str, GraphSpec],
    step_specs: list[TensorSpec],
    caches: list[CacheSpec],
    gates: TensorSpec | None = None,
) -> None:
    """The exported IO must be what the runtime will bind: names, dtypes, shapes."""
    expected = {s.name: s for s in (*step_specs, *caches, *((gates,) if gates is not None else ()))}
    prediction = graphs["full"].outputs[0]
    for role, graph in graphs.items():
        output = graph.outputs[0]
        if role == "gates":
            if [t.name for t in graph.outputs] != [GATES_NAME] or output.shape[:1] != (BATCH_AXIS,):
                raise ExportError(
                    f"{graph.file} | outputs {graph.outputs}, expected '{GATES_NAME}' [batch, ...]"
                )
            continue
        if output.name != PREDICTION:
            raise ExportError(f"{graph.file} | first output is '{output.name}', expected '{PREDICTION}'")
        if (output.dtype, output.shape) != (prediction.dtype, prediction.shape):
            # Both graphs write one prediction buffer: they must agree exactly.
            raise ExportError(
                f"{graph.file} | prediction is {output.dtype}{list(output.shape)}, the full graph's is "
                f"{prediction.dtype}{list(prediction.shape)}"
            )
        for tensor in (*graph.inputs, *graph.outputs[1:]):
            want = expected.get(tensor.name)
            if want is None or (want.dtype, tuple(want.shape)) != (tensor.dtype, tuple(tensor.shape)):
                raise ExportError(
                    f"{graph.file} | {role} tensor '{tensor.name}' is {tensor.dtype}{list(tensor.shape)}, "
                    f"expected {want.dtype + str(list(want.shape)) if want else 'no such tensor'}"
                )
    if [t.name for t in graphs["full"].outputs[1:]] != [c.name for c in caches]:
        raise ExportError("full.onnx | cache outputs are missing or out of order")


def _file_records(folder: Path) -> dict[str, dict[str, object]]:
    records: dict[str, dict[str, object]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            records[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return records


def _tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "fora_export": fora_export.__version__}
    for dist in ("torch", "diffusers", "onnx", "onnxruntime", "fora-runtime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _jsonable(config: dict[str, object]) -> dict[str, object]:
    return json.loads(json.dumps(config, default=str))


def _config_hash(model_config: dict[str, object], source: str, config: BuildConfig) -> str:
    payload = json.dumps(
        {"model": _jsonable(model_config), "source": source, "build": config.to_dict()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
