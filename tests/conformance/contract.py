"""The family contract without exporting: plan the graphs a build would export, compute the
IO each exported graph will have by running its module eagerly, and ask the runtime's
manifest checks whether it would open the folder.

Two calls reach into code being refactored; each is isolated in one function here so it
can be re-pointed in one place: :func:`plan_build` (the builder's graph-job planning,
``_reuse_module`` / ``_graph_jobs`` / ``_cache_specs`` of ``fora_export.builder.pipeline``
today) and :func:`runtime_refusal` (the runtime's manifest consistency check).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fora_export.adapters.base import DTYPE_NAMES, ModelAdapter
from fora_export.adapters.registry import adapter_for
from fora_export.builder.config import BuildConfig
from fora_export.split.graphs import SplitModel, split_model
from fora_runtime.errors import ManifestError
from fora_runtime.manifest import (
    BATCH_AXIS,
    CacheSpec,
    GraphRole,
    GraphSpec,
    InputSpec,
    Manifest,
    TensorSpec,
    graph_file,
)
from tests.tiny_models import TinyFamily


def cache_subsets(kinds: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``kinds`` (what ``--cache`` accepts), in the family's order."""
    return [subset for size in range(1, len(kinds) + 1) for subset in itertools.combinations(kinds, size)]


def build_config(
    family: TinyFamily, kinds: tuple[str, ...] | None, reuse_graph: str, forecast: bool
) -> BuildConfig:
    """The config ``fora-export build --cache KINDS --reuse-graph R [--forecast]`` makes for
    the family's tiny model (``kinds`` None: ``--cache`` left out)."""
    cache = ",".join(kinds) if kinds is not None else None
    return BuildConfig.from_options(cache=cache, reuse_graph=reuse_graph, forecast=forecast, **family.build)


@dataclass
class PlannedGraph:
    """One graph of a planned build: the module the exporter would trace, its example
    arguments (the trace batch's step inputs and the full step's own caches), and its IO
    names."""

    role: str
    module: nn.Module
    example_args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]


@dataclass
class PlannedBuild:
    adapter: ModelAdapter
    split: SplitModel
    config: BuildConfig
    resolution: tuple[int, int]
    inputs: list[InputSpec]
    #: The trace batch's random step inputs, the full step's prediction and every cache.
    example: dict[str, torch.Tensor]
    prediction: torch.Tensor
    caches: dict[str, torch.Tensor]
    graphs: list[PlannedGraph]
    cache_specs: list[CacheSpec]
    #: ``lean`` when the family's lean reuse step was chosen, else ``plain``.
    reuse_graph: str
    #: The torch.onnx exporter the build uses (``--exporter``, else the family's).
    exporter: str
    #: The forecast graph's module: ``(latents, gates, weight, *caches, *previous)``.
    forecast_module: nn.Module | None


@contextmanager
def plan_build(model: nn.Module, config: BuildConfig) -> Iterator[PlannedBuild]:
    """What ``fora_export.builder.pipeline.export_folder`` does before exporting: the adapter
    and split model, the trace batch's inputs and caches, and the planned graph jobs.
    Raises what the build raises for options it refuses (ConfigError, BuildError)."""
    from fora_export.builder import pipeline

    adapter = adapter_for(model, config.adapter, where="MODEL 'tiny'")
    adapter.check_precision(config.precision)
    resolution = config.resolution or adapter.default_resolution()
    adapter.check_resolution(resolution)
    fix_resolution = getattr(adapter, "fix_resolution", None)  # gone once options validate sizes
    if fix_resolution is not None:
        fix_resolution(resolution)
    input_specs = adapter.input_specs(resolution, config.precision)
    names = tuple(s.name for s in input_specs if s.role != "build_constant")
    split = split_model(adapter, names)
    try:
        batch = config.batch
        trace_batch = batch.opt if batch.opt > 1 else min(2, batch.max)
        example = adapter.random_inputs(
            trace_batch, resolution, config.precision, torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            prediction, caches = split.run_full(example)
        reuse_module, reuse_caches = pipeline._reuse_module(split, config)
        jobs = pipeline._graph_jobs(
            split, reuse_module, reuse_caches, example, caches, batch, forecast=config.forecast
        )
        graphs = [
            PlannedGraph(str(job.role), job.module, job.example_args, job.input_names, job.output_names)
            for job in jobs
        ]
        forecast = next((g for g in graphs if g.role == GraphRole.REUSE_FORECAST), None)
        yield PlannedBuild(
            adapter=adapter,
            split=split,
            config=config,
            resolution=resolution,
            inputs=input_specs,
            example=example,
            prediction=prediction,
            caches=caches,
            graphs=graphs,
            cache_specs=pipeline._cache_specs(split, caches, reuse_caches),
            reuse_graph="plain" if reuse_module is split.reuse else "lean",
            exporter=config.export.exporter or type(adapter).onnx_exporter,
            forecast_module=forecast.module if forecast is not None else None,
        )
    finally:
        split.remove()


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The manifest's view of a graph tensor: axis 0 is the batch (or gate-table rows)."""
    return TensorSpec(name, DTYPE_NAMES[tensor.dtype], (BATCH_AXIS, *tensor.shape[1:]))


def _outputs(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    out = module(*args)
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def used_inputs(graph: PlannedGraph, other: dict[str, torch.Tensor]) -> list[bool]:
    """Which inputs the graph's outputs depend on: the exporters drop the others from the
    graph (the runtime then does not bind them). Float inputs by autograd; inputs it finds
    no path from (integer inputs, non-differentiable uses) by whether replacing them with
    another valid value (``other``: another draw of the step inputs) changes an output."""
    args = graph.example_args
    leaves = [a.detach().clone().requires_grad_(True) if a.is_floating_point() else a for a in args]
    with torch.enable_grad():
        outputs = _outputs(graph.module, tuple(leaves))
        total = sum(o.float().sum() for o in outputs if o.requires_grad)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = (
            torch.autograd.grad(total, wanted, allow_unused=True)
            if isinstance(total, torch.Tensor) and total.requires_grad
            else [None] * len(wanted)
        )
    by_leaf = {id(leaf): grad is not None for leaf, grad in zip(wanted, grads, strict=True)}
    used = [by_leaf.get(id(leaf), False) for leaf in leaves]
    with torch.no_grad():
        reference = _outputs(graph.module, args)
        for index, (name, arg) in enumerate(zip(graph.input_names, args, strict=True)):
            if used[index]:
                continue
            replacement = other.get(name)
            if replacement is None or replacement.shape != arg.shape or torch.equal(replacement, arg):
                replacement = arg + 1 if not arg.is_floating_point() else arg * 1.5 + 0.25
            changed = list(args)
            changed[index] = replacement
            outputs = _outputs(graph.module, tuple(changed))
            used[index] = any(not torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
    return used


#: Whether each torch.onnx exporter keeps graph inputs no output depends on: TorchScript
#: drops them, torch.export (dynamo) keeps every input (observed on the real builds:
#: tests/conformance/test_real_builds.py compares these predictions with the exports).
KEEPS_UNUSED_INPUTS = {"torchscript": False, "dynamo": True}


def exported_io(graph: PlannedGraph, other: dict[str, torch.Tensor], exporter: str) -> GraphSpec:
    """The IO the graph will have exported by ``exporter``: every output, and the inputs the
    outputs depend on (every input where the exporter keeps unused ones)."""
    with torch.no_grad():
        outputs = _outputs(graph.module, graph.example_args)
    keep_all = KEEPS_UNUSED_INPUTS[exporter]
    used = [True] * len(graph.example_args) if keep_all else used_inputs(graph, other)
    inputs = tuple(
        tensor_spec(name, arg)
        for name, arg, needed in zip(graph.input_names, graph.example_args, used, strict=True)
        if needed
    )
    return GraphSpec(
        file=graph_file(graph.role),
        inputs=inputs,
        outputs=tuple(tensor_spec(n, t) for n, t in zip(graph.output_names, outputs, strict=True)),
    )


def planned_manifest(plan: PlannedBuild, graphs: dict[str, GraphSpec]) -> Manifest:
    """The manifest the build would write for ``graphs`` (files listed, not written)."""
    from fora_export.builder.pipeline import GATE_ROWS

    adapter = plan.adapter
    zero_digest = "0" * 64
    return Manifest(
        model_class=type(adapter.model).__name__,
        family=adapter.family,
        model_config={},
        source="tiny",
        resolution=plan.resolution,
        batch=plan.config.batch,
        precision=plan.config.precision,
        schedule=plan.config.schedule,
        conditioning=adapter.conditioning(),
        graphs=graphs,
        caches=tuple(plan.cache_specs),
        files={g.file: {"bytes": 1, "sha256": zero_digest} for g in graphs.values()},
        tools={},
        export={"reuse_graph": plan.reuse_graph, "cached_kinds": list(adapter.cached_kinds)},
        config_hash="0" * 16,
        inputs=tuple(plan.inputs),
        denoising=adapter.denoising(),
        gate_rows=GATE_ROWS if GraphRole.GATES in graphs else None,
        forward=adapter.forward_signature,
    )


def runtime_refusal(manifest: Manifest) -> str | None:
    """Why the runtime would refuse to open a folder with this manifest (its consistency
    checks, as run on every open), or None when it would open it."""
    try:
        Manifest.from_dict(manifest.to_dict(), where="manifest.json")
    except ManifestError as err:
        return str(err)
    return None


def gate_table_rows(plan: PlannedBuild) -> torch.Tensor:
    """The gate table's rows for the trace batch (the ``gates`` graph's output)."""
    (gates,) = [g for g in plan.graphs if g.role == GraphRole.GATES]
    with torch.no_grad():
        return gates.module(*gates.example_args)


def graph_named(plan: PlannedBuild, role: str) -> PlannedGraph:
    (graph,) = [g for g in plan.graphs if g.role == role]
    return graph
