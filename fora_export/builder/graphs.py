"""Which graphs a build exports, with which inputs and outputs: the graph jobs.

:func:`plan_build` splits the model, runs one full step on example inputs and returns a
:class:`GraphPlan`: the graph jobs (``plan_graph_jobs``), each with its module, its example
arguments and its expected IO spec (names, dtypes, shapes with the symbolic batch axis),
and the cache tensors the engines keep. Every exporter (ONNX, torch programs, TensorRT)
and the manifest iterate the same jobs, so adding a graph is one entry; nothing here
exports, so a test can plan every build cheaply.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fora_export.adapters.base import DTYPE_NAMES, ModelAdapter
from fora_export.adapters.casting import cast_model
from fora_export.adapters.gated import ForecastGatedReuse, LeanReuseStep
from fora_export.adapters.registry import adapter_for, family_for_class
from fora_export.builder.config import BuildConfig, default_opset
from fora_export.builder.destination import size_text
from fora_export.errors import BuildError, ExportError
from fora_export.loading import LoadedModel
from fora_export.split.graphs import SplitModel, split_model
from fora_runtime.errors import ManifestError
from fora_runtime.manifest import (
    BATCH_AXIS,
    FORECAST_WEIGHT_NAME,
    GATES_NAME,
    BatchRange,
    CacheSpec,
    GraphRole,
    GraphSpec,
    InputSpec,
    Manifest,
    TensorSpec,
    check_graph_set,
    graph_file,
    previous_cache_name,
)

log = logging.getLogger(__name__)

#: Rows (steps x samples) one call of the gates graph takes; the runtime splits longer
#: generations into calls of at most ``max`` rows (a TensorRT engine's activation memory
#: grows with its profile's largest shape; calls are once per generation, so few is enough).
GATE_ROWS = BatchRange(min=1, opt=256, max=1024)
#: The first output of every step graph: the model's prediction (noise or velocity).
PREDICTION = "prediction"


@dataclass
class GraphJob:
    """One graph of the build and what its file must hold."""

    role: GraphRole
    module: torch.nn.Module
    example_args: tuple[torch.Tensor, ...]
    #: The graph's IO as the runtime binds it (axis 0 is ``BATCH_AXIS``). An ONNX export may
    #: drop inputs the module does not use; the manifest records the exported IO.
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: The range of axis 0: the batch, or gate-table rows for the ``gates`` graph.
    batch_range: BatchRange
    #: Reuse graphs compute their residual sums through fora's fused ops as torch programs.
    fused_ops: bool = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def planned(self) -> GraphSpec:
        """The graph's manifest entry as planned (ONNX file, expected IO)."""
        return GraphSpec(file=graph_file(self.role), inputs=self.inputs, outputs=self.outputs)


@dataclass
class GraphPlan:
    """Everything a build decided before exporting."""

    #: The build's settings with the model's own defaults filled in (what the manifest records).
    config: BuildConfig
    adapter: ModelAdapter
    split: SplitModel
    resolution: tuple[int, int]
    #: Every step input with its role, build constants last.
    input_specs: tuple[InputSpec, ...]
    #: The batch size the graphs are traced at.
    trace_batch: int
    jobs: list[GraphJob]
    #: The cache tensors the engines keep: those the reuse graph reads, in order.
    caches: tuple[CacheSpec, ...]
    #: ``plain`` or ``lean``: the reuse graph chosen.
    reuse_graph: str

    @property
    def graphs(self) -> dict[str, GraphSpec]:
        """The planned graph set, role -> manifest entry."""
        return {job.role: job.planned for job in self.jobs}

    @property
    def gate_rows(self) -> BatchRange | None:
        return GATE_ROWS if any(job.role == GraphRole.GATES for job in self.jobs) else None


def resolve_model_defaults(config: BuildConfig, loaded: LoadedModel) -> BuildConfig:
    """``config`` with the model's own defaults (its family's exporter, demo sizes) where the
    build gave none; the manifest records the result, so validate rebuilds the same adapter."""
    defaults = loaded.build_defaults
    if not config.export.resolved:
        exporter = family_for_class(loaded.class_name).exporter
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


@contextmanager
def plan_build(loaded: LoadedModel, config: BuildConfig) -> Iterator[GraphPlan]:
    """Plan the build of ``loaded`` with ``config``: adapt, cast and split the model, run one
    full step on example inputs, choose the reuse graph and plan the graph jobs. The model's
    taps are removed again on exit."""
    config = resolve_model_defaults(config, loaded)
    dtype = ModelAdapter.check_precision(config.precision)
    cast_model(loaded.model, dtype)
    # torch programs are traced where they will run; the ONNX export runs there too
    # (the graphs do not depend on it, and tracing big fp16 models is slow on CPU).
    device = torch.device(torch_device(config.device) if config.backend == "torch" else "cpu")
    loaded.model.to(device)
    # The adapter checks the build's sizes and fixes its size-dependent tables when made.
    options = dataclasses.replace(config.adapter, resolution=config.resolution)
    adapter = adapter_for(loaded.model, options, where=f"MODEL '{loaded.source}'")
    resolution = adapter.resolution
    input_specs = adapter.input_specs(config.precision)
    input_names = tuple(s.name for s in input_specs if s.role != "build_constant")
    split = split_model(adapter, input_names)
    try:
        batch = config.batch
        trace_batch = batch.opt if batch.opt > 1 else min(2, batch.max)
        generator = torch.Generator().manual_seed(0)
        example = adapter.random_inputs(trace_batch, config.precision, generator)
        example = {name: tensor.to(device) for name, tensor in example.items()}
        with torch.no_grad():
            prediction, caches = split.run_full(example)
        reuse, reuse_caches = reuse_module(split, config)
        check_cache_memory(split, caches, reuse_caches, config)
        jobs = plan_graph_jobs(
            split,
            reuse.to(device),
            reuse_caches,
            example,
            prediction,
            caches,
            batch,
            forecast=config.forecast,
        )
        yield GraphPlan(
            config=config,
            adapter=adapter,
            split=split,
            resolution=resolution,
            input_specs=tuple(input_specs),
            trace_batch=trace_batch,
            jobs=jobs,
            caches=tuple(cache_specs(split, caches, reuse_caches)),
            reuse_graph="lean" if isinstance(reuse, LeanReuseStep) else "plain",
        )
    finally:
        split.remove()


def torch_device(requested: str) -> str:
    """The torch device of ``--device`` (``auto``: CUDA when visible)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError(f"--device {requested} | no CUDA GPU is visible | use --device cpu or a GPU machine")
    return requested


def reuse_module(split: SplitModel, config: BuildConfig) -> tuple[torch.nn.Module, tuple[str, ...]]:
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


def tensor_spec(name: str, example: torch.Tensor) -> TensorSpec:
    """The spec of a graph tensor traced as ``example``: its dtype, axis 0 the batch axis."""
    return TensorSpec(name, DTYPE_NAMES[example.dtype], (BATCH_AXIS, *example.shape[1:]))


def _specs(names: list[str], examples: tuple[torch.Tensor, ...]) -> tuple[TensorSpec, ...]:
    return tuple(tensor_spec(n, t) for n, t in zip(names, examples, strict=True))


def plan_graph_jobs(
    split: SplitModel,
    reuse: torch.nn.Module,
    reuse_caches: tuple[str, ...],
    example: dict[str, torch.Tensor],
    prediction: torch.Tensor,
    caches: dict[str, torch.Tensor],
    batch: BatchRange,
    *,
    forecast: bool = False,
) -> list[GraphJob]:
    """The graphs of this build, in export order: full and reuse, then the gate-table
    pair when the family has one for its lean reuse graph, then (``forecast``) the
    forecast reuse graph built on the gate table's reuse step. ``example`` are the step
    inputs, ``prediction`` and ``caches`` what the full step computed from them."""
    names = list(split.input_names)
    step_args = tuple(example[n] for n in names)
    cache_args = tuple(caches[n] for n in reuse_caches)
    predicted = (tensor_spec(PREDICTION, prediction),)
    step_specs = _specs(names, step_args)
    cache_inputs = _specs(list(reuse_caches), cache_args)
    jobs = [
        GraphJob(
            GraphRole.FULL,
            split.full_graph(reuse_caches),
            step_args,
            step_specs,
            (*predicted, *cache_inputs),
            batch,
        ),
        GraphJob(
            GraphRole.REUSE,
            reuse,
            (*step_args, *cache_args),
            (*step_specs, *cache_inputs),
            predicted,
            batch,
            fused_ops=True,
        ),
    ]
    gate_table = split.adapter.gate_table_graphs(reuse_caches) if isinstance(reuse, LeanReuseStep) else None
    if gate_table is None:
        if forecast:
            raise BuildError(
                f"--forecast | {split.adapter.model_class} caching {','.join(split.adapter.cached_kinds)} "
                "has no gate table (the forecast weights come with it: DiT, SD3, Flux and Wan with the lean "
                "reuse graph and every sublayer cached) | drop --forecast, or cache every sublayer"
            )
        return jobs
    table_names = list(gate_table.table_inputs)
    table_args = tuple(example[n] for n in table_names)
    with torch.no_grad():
        gates = gate_table.table(*table_args)
    latents_name = names[0]
    latents = example[latents_name]
    gated_inputs = (tensor_spec(latents_name, latents), tensor_spec(GATES_NAME, gates))
    jobs += [
        GraphJob(
            GraphRole.GATES,
            gate_table.table,
            table_args,
            _specs(table_names, table_args),
            (tensor_spec(GATES_NAME, gates),),
            GATE_ROWS,
        ),
        GraphJob(
            GraphRole.REUSE_GATED,
            gate_table.gated_reuse,
            (latents, gates, *cache_args),
            (*gated_inputs, *cache_inputs),
            predicted,
            batch,
            fused_ops=True,
        ),
    ]
    if forecast:
        # The previous full step's caches: other tensors of the caches' shapes (distinct objects:
        # the tracer must see two inputs, not one input twice).
        previous = tuple(cache.clone() * 0.5 for cache in cache_args)
        weight = torch.full((latents.shape[0],), 0.5, device=latents.device)
        previous_names = [previous_cache_name(name) for name in reuse_caches]
        jobs.append(
            GraphJob(
                GraphRole.REUSE_FORECAST,
                ForecastGatedReuse(gate_table.gated_reuse, len(reuse_caches)).eval(),
                (latents, gates, weight, *cache_args, *previous),
                (
                    *gated_inputs,
                    tensor_spec(FORECAST_WEIGHT_NAME, weight),
                    *cache_inputs,
                    *_specs(previous_names, previous),
                ),
                predicted,
                batch,
                fused_ops=True,
            )
        )
    return jobs


def cache_specs(
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


def check_cache_memory(
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
        f"--max-cache-gib {limit:g} | the caches need {size_text(total)} at batch {batch} "
        f"({size_text(total // batch)} per sample) | {fix}"
    )


def check_planned_graphs(manifest: Manifest) -> None:
    """The graph contract on the planned graph set, before minutes of exporting: the one IO
    check of ``fora_runtime.manifest`` (the same runs on every manifest written and read)."""
    try:
        check_graph_set(
            manifest.graphs, manifest.step_inputs, manifest.caches, where="planned graphs", fix="-"
        )
    except ManifestError as err:
        parts = str(err).split(" | ")
        raise ExportError(
            f"planned graphs | {parts[min(1, len(parts) - 1)]} | a bug in the family's adapter or the "
            "build's plan: please report it"
        ) from err
