"""The family contract without exporting: plan the graphs a build would export, compute the
IO each exported graph will have by running its module eagerly, and ask the runtime's
manifest checks whether it would open the folder.

Two calls reach into the code under test, each in one function here: :func:`plan_build`
(the builder's own planning, ``fora_export.builder.graphs.plan_build``) and
:func:`runtime_refusal` (the runtime's one graph contract, ``check_graph_set``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fora_export.adapters.base import DTYPE_NAMES, ModelAdapter
from fora_export.builder.config import BuildConfig
from fora_export.split.graphs import SplitModel
from fora_runtime.errors import ManifestError
from fora_runtime.manifest import (
    BATCH_AXIS,
    CacheSpec,
    GraphRole,
    GraphSpec,
    InputSpec,
    Manifest,
    TensorSpec,
    check_graph_set,
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
    #: The builder's own plan and loaded model (its manifest is written from them).
    graph_plan: Any = None
    loaded: Any = None


@contextmanager
def plan_build(model: nn.Module, config: BuildConfig) -> Iterator[PlannedBuild]:
    """The build's own plan (``fora_export.builder.graphs.plan_build``: adapter, split model,
    the trace batch's inputs and caches, the graph jobs), before anything is exported.
    Raises what the build raises for options it refuses (ConfigError, BuildError)."""
    from fora_export.builder.graphs import plan_build as plan_graphs
    from fora_export.loading import LoadedModel

    loaded = LoadedModel(model, type(model).__name__, "tiny")
    with plan_graphs(loaded, config) as plan:
        adapter, split = plan.adapter, plan.split
        generator = torch.Generator().manual_seed(0)
        example = adapter.random_inputs(plan.trace_batch, plan.config.precision, generator)
        with torch.no_grad():
            prediction, caches = split.run_full(example)
        graphs = [
            PlannedGraph(str(job.role), job.module, job.example_args, job.input_names, job.output_names)
            for job in plan.jobs
        ]
        forecast = next((g for g in graphs if g.role == GraphRole.REUSE_FORECAST), None)
        yield PlannedBuild(
            adapter=adapter,
            split=split,
            config=plan.config,
            resolution=plan.resolution,
            inputs=list(plan.input_specs),
            example=example,
            prediction=prediction,
            caches=caches,
            graphs=graphs,
            cache_specs=list(plan.caches),
            reuse_graph=plan.reuse_graph,
            exporter=plan.config.export.exporter,
            forecast_module=forecast.module if forecast is not None else None,
            graph_plan=plan,
            loaded=loaded,
        )


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
    """The manifest the build would write for ``graphs`` (the builder's own manifest
    function; files listed, not written)."""
    from fora_export.builder.pipeline import _manifest

    files = {g.file: {"bytes": 1, "sha256": "0" * 64} for g in graphs.values()}
    return _manifest(plan.graph_plan, plan.loaded, graphs, files=files)


def runtime_refusal(manifest: Manifest) -> str | None:
    """Why the runtime would refuse to open a folder with this manifest (the one graph
    contract, as every open, write and backend runs it), or None when it would open it."""
    try:
        check_graph_set(manifest.graphs, manifest.step_inputs, manifest.caches, where="manifest.json")
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
