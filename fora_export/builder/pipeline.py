"""``fora-export build``: load, split, export both graphs, write the manifest.

The folder is built in a hidden temporary sibling (``.<out>.building-<pid>``) and moved
into place only when everything (graphs, checks, manifest) succeeded, so a failed or
interrupted build never leaves a folder claiming graphs that do not exist. The move is the
only step that touches ``--out``: it never replaces a folder another process created
meanwhile (``rename`` onto a non-empty folder fails), and with ``--force`` it replaces
only an engine folder (its manifest parses, it holds nothing the manifest does not list).
Hidden folders left by builds that were killed are removed by the next build to the same
``--out`` (a previous folder found moved aside is put back).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

import fora_export
from fora_export.adapters.base import DTYPE_NAMES, TORCH_DTYPES, ModelAdapter, torch_program_ops
from fora_export.adapters.casting import cast_model
from fora_export.adapters.gated import ForecastGatedReuse, LeanReuseStep
from fora_export.adapters.registry import adapter_class_for, adapter_for
from fora_export.builder import tensorrt as trt_build
from fora_export.builder.config import BuildConfig, default_opset
from fora_export.builder.trt_flavors import BuildFlavor
from fora_export.errors import BuildError, ExportError, ForaError
from fora_export.export.onnx_export import export_onnx, graph_io
from fora_export.loading import LoadedModel, load_model
from fora_export.progress import StageProgress
from fora_export.split.graphs import SplitModel, split_model
from fora_runtime.manifest import (
    BATCH_AXIS,
    FORECAST_ROLE,
    FORECAST_WEIGHT_NAME,
    GATES_NAME,
    MANIFEST_NAME,
    BatchRange,
    CacheSpec,
    GraphSpec,
    Manifest,
    TensorSpec,
    file_record,
    graph_file,
    parse_manifest_bytes,
    previous_cache_name,
    read_manifest_bytes,
)
from fora_runtime.trust import SIGNATURE_NAME, sign_folder

log = logging.getLogger(__name__)

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
    _clear_stale_builds(out)  # first: it may put back a folder a killed build had moved aside
    _check_destination(out, force)
    tensorrt_flavor, backend_note = resolve_backend(config.backend)
    if config.forecast and tensorrt_flavor is not None:
        raise BuildError(
            f"--forecast | --backend {config.backend} chose {tensorrt_flavor.title} engines, and none is "
            "built for the forecast graph yet | build with --backend onnx or torch"
        )
    log.info("%s", backend_note)
    started = time.perf_counter()
    tmp = _sibling(out, BUILDING, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    needed = 0
    try:
        stage_count = 6 if tensorrt_flavor or config.backend == "torch" else 5
        with StageProgress(stage_count, title=f"build {out.name}", enabled=progress) as stages:
            stages.stage(f"loading {model_ref}")
            loaded = load_model(model_ref, TORCH_DTYPES.get(config.precision), config.subfolder)
            needed = _check_free_space(loaded, config, out, tensorrt=tensorrt_flavor is not None)
            tmp.mkdir(parents=True)
            if tensorrt_flavor and out.is_dir():
                trt_build.seed_timing_cache(out, tmp, tensorrt_flavor)  # rebuilds reuse the earlier tuning
            manifest = export_folder(loaded, tmp, config, stages, tensorrt_flavor=tensorrt_flavor)
            if sign_key is not None:
                sign_folder(tmp, sign_key)
        _move_into_place(tmp, out, replace=force)
    except BaseException as err:
        full = _disk_full(err)
        written = _folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            file = Path(str(full.filename)) if full.filename else tmp
            shown = out / file.name if file.parent == tmp else file  # the hidden folder is gone now
            raise BuildError(
                f"{shown} | no space left on the device ({full.strerror}) after writing "
                f"{_size(written)} of the build; it needs at least {_size(needed)} (the model's weights in "
                f"every graph format built), {_size(_free_bytes(out.parent))} free there | free space, or "
                "pass --out on another disk"
            ) from err
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


#: The hidden siblings of ``--out``: a build in progress and a folder being replaced.
BUILDING, REPLACED = "building", "old"


def _sibling(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}.{kind}-{pid}"


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out '{out}' | is a file | choose a folder path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BuildError(f"--out '{out}' | already exists | pass --force to replace it")
        check_replaceable(out)
    if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise BuildError(f"--out '{out}' | is the current folder or one above it | choose a subfolder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BuildError(f"--out '{out}' | cannot create parent folder: {err}") from err
    if not os.access(out.parent, os.W_OK):
        raise BuildError(f"--out '{out}' | parent folder is not writable")


def check_replaceable(folder: Path, *, shown: Path | None = None) -> None:
    """Refuse to replace ``folder`` unless it is an engine folder: its manifest parses as one,
    and it holds nothing the manifest does not list (--force never deletes other files)."""
    shown = shown or folder
    fix = "choose another --out; --force only replaces engine folders"
    try:  # parsed only: no signature or file checks, the folder is about to be deleted
        manifest = parse_manifest_bytes(read_manifest_bytes(folder)[1], where=str(folder / MANIFEST_NAME))
    except ForaError as err:
        parts = str(err).split(" | ")
        reason = parts[min(1, len(parts) - 1)]
        raise BuildError(
            f"--out '{shown}' | is not empty and not an engine folder ({reason}) | {fix} "
            "(remove it yourself if it is one from an older fora-export)"
        ) from err
    known = {MANIFEST_NAME, SIGNATURE_NAME, *manifest.files}
    strangers = sorted(path.name for path in folder.iterdir() if path.name not in known)
    if strangers:
        raise BuildError(
            f"--out '{shown}' | holds files its manifest does not list ({', '.join(strangers[:3])}"
            f"{', ...' if len(strangers) > 3 else ''}) | move them out first, or {fix}"
        )


def _clear_stale_builds(out: Path) -> None:
    """Remove the hidden folders that killed builds to ``out`` left behind; refuse to run next
    to a build of ``out`` that is still running. A previous folder left moved aside (a build
    killed between its two renames) is put back first."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({BUILDING}|{REPLACED})-(\d+)")
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if pid != os.getpid() and _process_alive(pid):
            raise BuildError(
                f"--out '{out}' | another build (process {pid}) is writing it now ({path.name}) | wait "
                f"for it to finish; if no such build runs, remove {path}"
            )
        if kind == REPLACED and not out.exists():
            path.rename(out)
            log.warning("put back %s: a build killed while replacing it had moved it to %s", out, path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by a build (process %d) that did not finish", path, pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _move_into_place(tmp: Path, out: Path, *, replace: bool) -> None:
    """Move the finished build to ``out``: one ``rename``, which fails when another process
    created a non-empty ``out`` meanwhile. With ``replace`` an existing ``out`` is first moved
    aside, checked to still be an engine folder, and put back if anything fails."""
    old = _sibling(out, REPLACED, os.getpid())
    moved_aside = False
    try:
        if replace and out.exists():
            out.rename(old)
            moved_aside = True
            check_replaceable(old, shown=out)  # what is there now, not what was there at the start
        os.rename(tmp, out)
    except (OSError, BuildError) as err:
        if moved_aside and not out.exists():
            old.rename(out)
        if isinstance(err, BuildError):
            raise
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise BuildError(
                f"--out '{out}' | was created by another process while this build ran (nothing of it was "
                "replaced; this build was discarded) | pass --force to replace it, or another --out"
            ) from err
        raise BuildError(f"--out '{out}' | cannot move the finished build into place: {err}") from err
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def _check_free_space(loaded: LoadedModel, config: BuildConfig, out: Path, *, tensorrt: bool) -> int:
    """Refuse a build the disk cannot hold, before exporting: every graph format built holds
    the model's weights at least once (full graph), so their bytes are a lower bound."""
    dtype = TORCH_DTYPES.get(config.precision)
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else 4
    weights = sum(t.numel() for t in (*loaded.model.parameters(), *loaded.model.buffers())) * itemsize
    needed = weights * (1 + (config.backend == "torch") + tensorrt)
    free = _free_bytes(out.parent)
    if free is not None and needed > free:
        raise BuildError(
            f"--out '{out}' | the build needs at least {_size(needed)} (the model's weights in every graph "
            f"format built), {_size(free)} free there | free space, or pass --out on another disk"
        )
    return needed


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _folder_bytes(folder: Path) -> int:
    try:
        return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    except OSError:
        return 0


def _disk_full(err: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``err`` (exporters wrap the errors they meet)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        current = current.__cause__ or current.__context__
    return None


@dataclass
class GraphJob:
    """One graph of the build: every exporter (ONNX, torch programs, TensorRT) and the
    manifest iterate the same list of jobs, so adding a graph is one entry."""

    role: str
    module: torch.nn.Module
    example_args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    #: The range of axis 0: the batch, or gate-table rows for the ``gates`` graph.
    batch_range: BatchRange
    #: Reuse graphs compute their residual sums through fora's fused ops as torch programs.
    fused_ops: bool = False


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
    config = _with_model_defaults(config, loaded)
    dtype = ModelAdapter.check_precision(config.precision)
    cast_model(loaded.model, dtype)
    # torch programs are traced where they will run; the ONNX export runs there too
    # (the graphs do not depend on it, and tracing big fp16 models is slow on CPU).
    device = torch.device(_torch_device(config.device) if config.backend == "torch" else "cpu")
    loaded.model.to(device)
    options = dataclasses.replace(config.adapter, resolution=config.resolution)
    adapter = adapter_for(loaded.model, options, where=f"MODEL '{loaded.source}'")
    resolution = adapter.resolution
    input_specs = adapter.input_specs(config.precision)
    step_specs = [s for s in input_specs if s.role != "build_constant"]
    input_names = tuple(s.name for s in step_specs)
    split = split_model(adapter, input_names)
    try:
        batch = config.batch
        trace_batch = batch.opt if batch.opt > 1 else min(2, batch.max)
        generator = torch.Generator().manual_seed(0)
        example = adapter.random_inputs(trace_batch, config.precision, generator)
        example = {name: tensor.to(device) for name, tensor in example.items()}
        with torch.no_grad():
            _, caches = split.run_full(example)
        reuse_module, reuse_caches = _reuse_module(split, config)
        _check_cache_memory(split, caches, reuse_caches, config)
        reuse_module = reuse_module.to(device)
        jobs = _graph_jobs(
            split, reuse_module, reuse_caches, example, caches, batch, forecast=config.forecast
        )
        cache_specs = _cache_specs(split, caches, reuse_caches)

        for job in jobs:
            stages.stage(f"exporting {job.role} graph")
            export_onnx(
                job.module,
                job.example_args,
                job.input_names,
                job.output_names,
                folder / graph_file(job.role),
                config.export,
                batch_range=job.batch_range,
            )
        graphs = {job.role: _graph_spec(folder, graph_file(job.role)) for job in jobs}
        has_gate_table = "gates" in graphs
        gates_spec = graphs["gates"].outputs[0] if has_gate_table else None
        _check_graphs(graphs, step_specs, cache_specs, gates_spec)
        backends = {}
        if config.backend == "torch":
            stages.stage("exporting torch programs")
            backends["torch"] = _export_torch_programs(jobs, folder)
        if tensorrt_flavor:
            stages.stage(f"building {tensorrt_flavor.title} engines")
            profiles = {job.role: job.batch_range for job in jobs if job.batch_range != batch}
            backends["tensorrt"] = trt_build.build_folder_engines(
                folder, graphs, batch, config.tensorrt, profiles=profiles, flavor=tensorrt_flavor
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
            inputs=tuple(input_specs),
            denoising=adapter.denoising(),
            backends=backends,
            gate_rows=GATE_ROWS if has_gate_table else None,
            forward=adapter.forward_signature,
        )
        manifest.write(folder)
        return manifest
    finally:
        split.remove()


def _with_model_defaults(config: BuildConfig, loaded: LoadedModel) -> BuildConfig:
    """``config`` with the model's own defaults (its family's exporter, demo sizes) where the
    build gave none;
    the manifest records the result, so validate rebuilds the same adapter."""
    defaults = loaded.build_defaults
    if not config.export.resolved:
        exporter = adapter_class_for(loaded.class_name).onnx_exporter
        opset = config.export.opset or default_opset(exporter)
        export = dataclasses.replace(config.export, exporter=exporter, opset=opset)
        config = dataclasses.replace(config, export=export)
    if config.resolution is None and "resolution" in defaults:
        config = dataclasses.replace(config, resolution=tuple(defaults["resolution"]))
    if config.adapter.text_length is None and "text_length" in defaults:
        adapter = dataclasses.replace(config.adapter, text_length=int(defaults["text_length"]))
        config = dataclasses.replace(config, adapter=adapter)
    if config.adapter.frames is None and "frames" in defaults:
        adapter = dataclasses.replace(config.adapter, frames=int(defaults["frames"]))
        config = dataclasses.replace(config, adapter=adapter)
    if "expert_range" in defaults:
        adapter = dataclasses.replace(config.adapter, expert_range=tuple(defaults["expert_range"]))
        config = dataclasses.replace(config, adapter=adapter)
    return config


def _check_cache_memory(
    split: SplitModel,
    caches: dict[str, torch.Tensor],
    kept: tuple[str, ...],
    config: BuildConfig,
) -> None:
    """Refuse, before any export, a build whose caches at the largest batch exceed
    ``--max-cache-gib`` (video caches reach tens of GiB per sample); say which ``--cache``
    subsets would fit."""
    limit = config.max_cache_gib
    if limit is None:
        return
    batch = config.batch.max

    def per_sample(tensor: torch.Tensor) -> int:
        return tensor[0].numel() * tensor.element_size()

    total = sum(per_sample(caches[name]) for name in kept) * batch
    if total <= limit * 2**30:
        return
    by_kind: dict[str, int] = {}
    for point in split.taps.points:
        by_kind[point.kind] = by_kind.get(point.kind, 0) + sum(
            per_sample(caches[n]) for n in point.cache_names
        )
    kinds = list(by_kind)
    fits = []
    for mask in range(1, 2 ** len(kinds) - 1):
        subset = {k for i, k in enumerate(kinds) if mask >> i & 1}
        if sum(by_kind[k] for k in subset) * batch <= limit * 2**30:
            fits.append(subset)
    # The largest subsets only: any subset of one of them fits too.
    fitting = [",".join(k for k in kinds if k in s) for s in fits if not any(s < other for other in fits)]
    fix = (
        f"pass --cache with one of: {'; '.join(fitting)} (uncached sublayers then run in reuse steps)"
        if fitting
        else "lower --batch MAX, the resolution or frames, or raise --max-cache-gib"
    )
    raise BuildError(
        f"--max-cache-gib {limit:g} | the caches need {_size(total)} at batch {batch} "
        f"({_size(total // batch)} per sample) | {fix}"
    )


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _reuse_module(split: SplitModel, config: BuildConfig) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The family's lean reuse step when asked for and available, else the plain one;
    with the caches it reads (which the full graph then outputs)."""
    module, caches = split.reuse_step(lean=config.reuse_graph != "plain")
    if config.reuse_graph != "plain" and not isinstance(module, LeanReuseStep):
        log.info(
            "reuse graph: plain (%s has no lean variant for caches %s)",
            split.adapter.family,
            ",".join(split.adapter.cached_kinds),
        )
    return module, caches


def _graph_jobs(
    split: SplitModel,
    reuse_module: torch.nn.Module,
    reuse_caches: tuple[str, ...],
    example: dict[str, torch.Tensor],
    caches: dict[str, torch.Tensor],
    batch: BatchRange,
    *,
    forecast: bool = False,
) -> list[GraphJob]:
    """The graphs of this build, in export order: full and reuse, then the gate-table
    pair when the family has one for its lean reuse graph, then (``forecast``) the
    forecast reuse graph built on the gate table's reuse step."""
    names = list(split.input_names)
    step_args = tuple(example[n] for n in names)
    cache_args = tuple(caches[n] for n in reuse_caches)
    jobs = [
        GraphJob(
            "full",
            split.full_graph(reuse_caches),
            step_args,
            names,
            [PREDICTION, *reuse_caches],
            batch,
        ),
        GraphJob(
            "reuse",
            reuse_module,
            (*step_args, *cache_args),
            [*names, *reuse_caches],
            [PREDICTION],
            batch,
            fused_ops=True,
        ),
    ]
    lean = isinstance(reuse_module, LeanReuseStep)
    gate_table = split.adapter.gate_table_graphs(reuse_caches) if lean else None
    if gate_table is None:
        if forecast:
            raise BuildError(
                f"--forecast | {split.adapter.model_class} caching {','.join(split.adapter.cached_kinds)} "
                "has no gate table (the forecast weights come with it: DiT, SD3, Flux and Wan with the lean "
                "reuse graph and every sublayer cached) | drop --forecast, or cache every sublayer"
            )
        return jobs
    table_args = tuple(example[n] for n in gate_table.table_inputs)
    with torch.no_grad():
        gates = gate_table.table(*table_args)
    latents_name = names[0]
    jobs += [
        GraphJob(
            "gates", gate_table.table, table_args, list(gate_table.table_inputs), [GATES_NAME], GATE_ROWS
        ),
        GraphJob(
            "reuse_gated",
            gate_table.gated_reuse,
            (example[latents_name], gates, *cache_args),
            [latents_name, GATES_NAME, *reuse_caches],
            [PREDICTION],
            batch,
            fused_ops=True,
        ),
    ]
    if forecast:
        # The previous full step's caches: other tensors of the caches' shapes (distinct objects:
        # the tracer must see two inputs, not one input twice).
        previous = tuple(cache.clone() * 0.5 for cache in cache_args)
        weight = torch.full((example[latents_name].shape[0],), 0.5, device=example[latents_name].device)
        jobs.append(
            GraphJob(
                FORECAST_ROLE,
                ForecastGatedReuse(gate_table.gated_reuse, len(reuse_caches)).eval(),
                (example[latents_name], gates, weight, *cache_args, *previous),
                [
                    latents_name,
                    GATES_NAME,
                    FORECAST_WEIGHT_NAME,
                    *reuse_caches,
                    *(previous_cache_name(name) for name in reuse_caches),
                ],
                [PREDICTION],
                batch,
                fused_ops=True,
            )
        )
    return jobs


def _export_torch_programs(jobs: list[GraphJob], folder: Path) -> dict[str, object]:
    """Trace every graph as a torch.export program (on the example's device)."""
    from fora_export.export.torch_program import export_program, torch_manifest_record

    # Reuse programs call fora's fused ops where the ONNX graphs spell the arithmetic out.
    with torch_program_ops(*(job.module for job in jobs if job.fused_ops)):
        for job in jobs:
            export_program(
                job.module,
                job.example_args,
                folder / graph_file(job.role, "torch"),
                job.batch_range,
                input_names=job.input_names,
                output_names=job.output_names,
            )
    return torch_manifest_record(folder, [job.role for job in jobs])


def _torch_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError(f"--device {requested} | no CUDA GPU is visible | use --device cpu or a GPU machine")
    return requested


def _cache_specs(
    split: SplitModel, caches: dict[str, torch.Tensor], names: tuple[str, ...]
) -> list[CacheSpec]:
    """The cache tensors the engines keep (``names``, in order): those the reuse graph reads."""
    specs = []
    for point in split.taps.points:
        for name in point.cache_names:
            if name not in names:
                continue
            tensor = caches[name]
            specs.append(
                CacheSpec(
                    name=name,
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
    step_specs: Sequence[TensorSpec],
    caches: list[CacheSpec],
    gates: TensorSpec | None = None,
) -> None:
    """The exported IO must be what the runtime will bind: names, dtypes, shapes."""
    expected = {s.name: s for s in (*step_specs, *caches, *((gates,) if gates is not None else ()))}
    if FORECAST_ROLE in graphs:
        expected[FORECAST_WEIGHT_NAME] = TensorSpec(FORECAST_WEIGHT_NAME, "float32", (BATCH_AXIS,))
        for cache in caches:
            name = previous_cache_name(cache.name)
            expected[name] = TensorSpec(name, cache.dtype, cache.shape)
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
