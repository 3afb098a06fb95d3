"""``fora-export build``: load, plan and export the graphs, write the manifest.

The stages: the destination is checked and a hidden build folder made beside it
(``destination``), the model is loaded and its graphs planned (``graphs.plan_build``),
the planned graph set is checked against the graph contract, every graph job is exported
(ONNX, then torch programs or TensorRT engines from them), the manifest is written and the
folder moved into place. A failure at any stage leaves ``--out`` as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import fora_export
from fora_export.adapters.base import TORCH_DTYPES, torch_program_ops
from fora_export.builder import tensorrt as trt_build
from fora_export.builder.config import BuildConfig
from fora_export.builder.destination import (
    building_folder,
    check_destination,
    check_free_space,
    check_replaceable,
    clear_stale_builds,
    discard_failed_build,
    move_into_place,
)
from fora_export.builder.graphs import (
    GATE_ROWS,
    PREDICTION,
    GraphJob,
    GraphPlan,
    check_planned_graphs,
    plan_build,
)
from fora_export.builder.trt_flavors import BuildFlavor
from fora_export.errors import BuildError
from fora_export.export.onnx_export import export_onnx
from fora_export.loading import LoadedModel, load_model
from fora_export.progress import StageProgress
from fora_runtime.manifest import (
    BatchRange,
    Conditioning,
    ExportRecord,
    GraphSpec,
    Manifest,
    file_record,
    graph_file,
)
from fora_runtime.trust import sign_folder

__all__ = [
    "GATE_ROWS",
    "PREDICTION",
    "BuildResult",
    "build",
    "check_replaceable",
    "export_folder",
    "resolve_backend",
]

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    folder: Path
    manifest: Manifest
    seconds: float
    #: What the build wrote beyond ONNX, and why (``--backend auto``'s choice).
    backend_note: str = ""


def build(
    model_ref: str,
    out: str | Path,
    config: BuildConfig,
    *,
    force: bool = False,
    progress: bool | None = None,
    sign_key: bytes | None = None,
) -> BuildResult:
    """Build the engine folder ``out`` for MODEL ``model_ref``; with ``sign_key`` (the
    deployer's key, ``fora_runtime.trust``) the manifest is signed."""
    out = Path(out)
    clear_stale_builds(out)  # first: it may put back a folder a killed build had moved aside
    check_destination(out, force)
    tensorrt_flavor, backend_note = resolve_backend(config.backend)
    if config.forecast and tensorrt_flavor is not None:
        raise BuildError(
            f"--forecast | --backend {config.backend} chose {tensorrt_flavor.title} engines, and none is "
            "built for the forecast graph yet | build with --backend onnx or torch"
        )
    log.info("%s", backend_note)
    started = time.perf_counter()
    tmp = building_folder(out)
    needed = 0
    try:
        stage_count = 6 if tensorrt_flavor or config.backend == "torch" else 5
        with StageProgress(stage_count, title=f"build {out.name}", enabled=progress) as stages:
            stages.stage(f"loading {model_ref}")
            loaded = load_model(model_ref, TORCH_DTYPES.get(config.precision), config.subfolder)
            needed = _needed_bytes(loaded, config, tensorrt=tensorrt_flavor is not None)
            check_free_space(out, needed)
            tmp.mkdir(parents=True)
            if tensorrt_flavor and out.is_dir():
                trt_build.seed_timing_cache(out, tmp, tensorrt_flavor)  # rebuilds reuse the earlier tuning
            manifest = export_folder(loaded, tmp, config, stages, tensorrt_flavor=tensorrt_flavor)
            if sign_key is not None:
                sign_folder(tmp, sign_key)
        move_into_place(tmp, out, replace=force)
    except BaseException as err:
        full_disk = discard_failed_build(tmp, out, err, needed)
        if full_disk is not None:
            raise full_disk from err
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


def _needed_bytes(loaded: LoadedModel, config: BuildConfig, *, tensorrt: bool) -> int:
    """A lower bound of the build's size: every graph format built holds the model's
    weights at least once (full graph)."""
    dtype = TORCH_DTYPES.get(config.precision)
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else 4
    weights = sum(t.numel() for t in (*loaded.model.parameters(), *loaded.model.buffers())) * itemsize
    return weights * (1 + (config.backend == "torch") + tensorrt)


def export_folder(
    loaded: LoadedModel,
    folder: Path,
    config: BuildConfig,
    stages: StageProgress,
    *,
    tensorrt_flavor: BuildFlavor | None = None,
) -> Manifest:
    """Plan the graphs of ``loaded`` and write graphs + manifest into ``folder``."""
    stages.stage("splitting")
    with plan_build(loaded, config) as plan:
        # The planned graph set must keep the graph contract before anything is exported.
        check_planned_graphs(_manifest(plan, loaded, plan.graphs))
        graphs: dict[str, GraphSpec] = {}
        for job in plan.jobs:
            stages.stage(f"exporting {job.role} graph")
            graphs[job.role] = export_onnx(
                job.module,
                job.example_args,
                job.input_names,
                job.output_names,
                folder / graph_file(job.role),
                plan.config.export,
                batch_range=job.batch_range,
            )
        backends: dict[str, Any] = {}
        if plan.config.backend == "torch":
            stages.stage("exporting torch programs")
            backends["torch"] = _export_torch_programs(plan.jobs, folder)
        if tensorrt_flavor:
            stages.stage(f"building {tensorrt_flavor.title} engines")
            batch = plan.config.batch
            profiles: dict[str, BatchRange] = {
                job.role: job.batch_range for job in plan.jobs if job.batch_range != batch
            }
            backends["tensorrt"] = trt_build.build_folder_engines(
                folder, graphs, batch, plan.config.tensorrt, profiles=profiles, flavor=tensorrt_flavor
            )
        stages.stage("writing manifest")
        # Manifest.write checks the exported graph set against the graph contract again.
        manifest = _manifest(plan, loaded, graphs, files=_file_records(folder), backends=backends)
        manifest.write(folder)
        return manifest


def _manifest(
    plan: GraphPlan,
    loaded: LoadedModel,
    graphs: dict[str, GraphSpec],
    *,
    files: dict[str, dict[str, Any]] | None = None,
    backends: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest of the build ``plan`` with ``graphs`` (planned or exported)."""
    adapter, config = plan.adapter, plan.config
    return Manifest(
        model_class=type(adapter.model).__name__,
        family=adapter.family,
        model_config=_jsonable(adapter.config),
        source=loaded.source,
        resolution=plan.resolution,
        batch=config.batch,
        precision=config.precision,
        schedule=config.schedule,
        conditioning=Conditioning.from_dict(adapter.conditioning()),
        graphs=dict(graphs),
        caches=plan.caches,
        files=files or {},
        tools=_tool_versions(),
        export=ExportRecord.from_dict(
            {
                **config.to_dict()["export"],
                "adapter_options": config.adapter.to_dict(),
                "cached_kinds": list(adapter.cached_kinds),
                "reuse_graph": plan.reuse_graph,
                "subfolder": loaded.subfolder,
                "trace_batch": plan.trace_batch,
            }
        ),
        config_hash=_config_hash(adapter.config, loaded.source, config),
        inputs=plan.input_specs,
        denoising=adapter.denoising(),
        backends=backends or {},
        gate_rows=plan.gate_rows,
        forward=adapter.call_signature(),
    )


def _export_torch_programs(jobs: list[GraphJob], folder: Path) -> dict[str, object]:
    """Trace every graph as a torch.export program (on the example's device)."""
    from fora_export.export.torch_program import ExportedProgram, export_program, torch_record

    # Reuse programs call fora's fused ops where the ONNX graphs spell the arithmetic out.
    with torch_program_ops(*(job.module for job in jobs if job.fused_ops)):
        programs: dict[str, ExportedProgram] = {
            job.role: export_program(
                job.module,
                job.example_args,
                folder / graph_file(job.role, "torch"),
                job.batch_range,
                input_names=job.input_names,
                output_names=job.output_names,
            )
            for job in jobs
        }
    return torch_record(folder, programs)


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            records[path.name] = file_record(path)
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
