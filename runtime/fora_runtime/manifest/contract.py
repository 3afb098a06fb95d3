"""The graph contract: which inputs and outputs, in which order, with which dtypes and
shapes each graph role's graph has, given the step inputs and the caches. Stdlib only.

One check of it, used everywhere a graph set meets its consumer:

- :func:`check_graph_set`: a set of graphs against the step inputs and caches (the builder
  before it writes a folder, ``Manifest`` on read and on write);
- :func:`check_graph_io`: one loaded graph (an ONNX Runtime session, a TensorRT engine, a
  torch program's record) against its graph in the manifest (every backend on activation).

The expected IO of each role (:func:`expected_io`):

========================  ==========================================================  =================
role                      inputs                                                      outputs
========================  ==========================================================  =================
``full``                  the step inputs                                             prediction, caches
``reuse``                 the step inputs, the caches                                 prediction
``gates``                 some step inputs (not the latents), rows on the batch axis  ``gates`` [batch, ...]
``reuse_gated``           latents, ``gates``, the caches                              prediction
``reuse_forecast``        latents, ``gates``, ``forecast_weight`` [batch] float32,    prediction
                          the caches, ``previous.<cache>`` for each cache
========================  ==========================================================  =================

A graph file may leave out the step inputs other than the latents that its ``full`` or
``reuse`` graph does not read (ONNX exporters drop them); a torch program keeps them all
(``Manifest.module_io``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fora_runtime.dtypes import MANIFEST_DTYPES
from fora_runtime.errors import BackendError, ManifestError
from fora_runtime.manifest.schema import (
    BATCH_AXIS,
    FORECAST_ROLE,
    FORECAST_WEIGHT_NAME,
    GATE_TABLE_ROLES,
    GATES_NAME,
    GRAPH_ROLES,
    PREDICTION_NAME,
    GraphRole,
    GraphSpec,
    TensorSpec,
    previous_cache_name,
)

REBUILD = "rebuild the engines with `fora-export build`"
#: Every role a folder may hold, in build order.
ALL_ROLES = (*GRAPH_ROLES, *GATE_TABLE_ROLES, FORECAST_ROLE)


def _text(spec: TensorSpec) -> str:
    return f"{spec.dtype}{list(spec.shape)}"


def _same(a: TensorSpec, b: TensorSpec) -> bool:
    return (a.name, a.dtype, tuple(a.shape)) == (b.name, b.dtype, tuple(b.shape))


def prunable_inputs(role: str, step_inputs: Sequence[TensorSpec]) -> frozenset[str]:
    """The inputs ``role``'s graph file may leave out: ONNX exporters drop the inputs a graph
    does not read (PixArt's lean reuse graph reads no text: its cross-attention is cached).
    The latents, the gate table, the caches and the forecast inputs are always read."""
    if role in (GraphRole.FULL, GraphRole.REUSE):
        return frozenset(spec.name for spec in step_inputs[1:])
    return frozenset()


def expected_io(
    role: str,
    step_inputs: Sequence[TensorSpec],
    caches: Sequence[TensorSpec],
    prediction: TensorSpec,
    gates: TensorSpec | None = None,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs ``role``'s graph module takes and returns, in order (its file
    may leave out :func:`prunable_inputs`; the ``gates`` graph's inputs are the family's
    choice, see :func:`check_graph_set`)."""
    step_inputs, caches = list(step_inputs), list(caches)
    if role == GraphRole.FULL:
        return step_inputs, [prediction, *caches]
    if role == GraphRole.REUSE:
        return [*step_inputs, *caches], [prediction]
    if gates is None:
        raise ValueError(f"the {role} graph's IO depends on the gate table")
    if role == GraphRole.GATES:
        return [], [gates]
    leading = [step_inputs[0], gates]
    if role == GraphRole.REUSE_GATED:
        return [*leading, *caches], [prediction]
    if role == FORECAST_ROLE:
        weight = TensorSpec(FORECAST_WEIGHT_NAME, "float32", (BATCH_AXIS,))
        previous = [TensorSpec(previous_cache_name(c.name), c.dtype, c.shape) for c in caches]
        return [*leading, weight, *caches, *previous], [prediction]
    raise ValueError(f"unknown graph role {role!r}")


def _compare(
    role: str,
    kind: str,
    got: Sequence[TensorSpec],
    want: Sequence[TensorSpec],
    cache_names: set[str],
    optional: frozenset[str] = frozenset(),
) -> str | None:
    """What is wrong with ``got`` as ``role``'s ``kind`` (inputs/outputs), or None. Names in
    ``optional`` may be left out (in order otherwise)."""
    wanted = {spec.name: spec for spec in want}
    names = [spec.name for spec in got]
    if kind == "outputs" and names[:1] != [PREDICTION_NAME] and role != GraphRole.GATES:
        if role == GraphRole.FULL:
            return (
                f"the full graph's first output is {names[:1]}, expected the prediction '{PREDICTION_NAME}'"
            )
        return f"{role} graph must output only the full graph's prediction"
    for spec in got:
        target = wanted.get(spec.name)
        if target is None:
            if kind == "outputs":
                return f"{role} graph output '{spec.name}' is neither the prediction nor a cache tensor"
            return f"{role} graph input '{spec.name}' is not a step input of the manifest or a cache"
        if not _same(spec, target):
            if spec.name == GATES_NAME and role != GraphRole.GATES:
                return f"{role} input '{GATES_NAME}' does not match the gates graph's output"
            if spec.name == PREDICTION_NAME:
                return f"{role} graph must output only the full graph's prediction ({_text(target)})"
            what = "cache tensor" if spec.name in cache_names else "step input"
            return f"{role} graph {kind[:-1]} '{spec.name}' is {_text(spec)}, the {what} is {_text(target)}"
    missing = [name for name in wanted if name not in names and name not in optional]
    if any(name in cache_names for name in missing):
        verb = "output" if kind == "outputs" else "take"
        return f"{role} graph does not {verb} every cache tensor (missing {missing})"
    if missing:
        return f"{role} graph lacks the {kind} {missing}"
    if len(names) != len(set(names)):
        return f"{role} graph names one of its {kind} twice: {names}"
    if names != [name for name in wanted if name in names]:
        return f"{role} graph's {kind} are {names}, expected in the order {list(wanted)}"
    return None


def _gates_inputs_problem(inputs: Sequence[TensorSpec], step_inputs: Sequence[TensorSpec]) -> str | None:
    """The gates graph takes some step inputs other than the latents (the family's choice),
    each once, with the step input's dtype (its batch axis counts table rows)."""
    by_name = {spec.name: spec for spec in step_inputs}
    names = [spec.name for spec in inputs]
    for spec in inputs:
        want = by_name.get(spec.name)
        if (
            spec.name == step_inputs[0].name
            or want is None
            or want.dtype != spec.dtype
            or names.count(spec.name) > 1
        ):
            return (
                f"gates input '{spec.name}' ({spec.dtype}) is not a conditioning input of the full "
                "graph (timestep, labels, ...) of the same dtype, or is named twice"
            )
    return None


def graph_set_problem(
    graphs: Mapping[str, GraphSpec],
    step_inputs: Sequence[TensorSpec],
    caches: Sequence[TensorSpec],
) -> str | None:
    """What breaks the graph contract in ``graphs`` (see the module docstring), or None."""
    roles = list(graphs)
    unknown = [role for role in roles if role not in ALL_ROLES]
    if unknown:
        return f"graph roles {unknown} are unknown, expected some of {[str(r) for r in ALL_ROLES]}"
    missing = [str(role) for role in GRAPH_ROLES if role not in graphs]
    if missing:
        return f"the graphs lack {missing}: every folder has {[str(r) for r in GRAPH_ROLES]}"
    present = [str(role) for role in GATE_TABLE_ROLES if role in graphs]
    if present and len(present) != len(GATE_TABLE_ROLES):
        return f"gate-table graphs {present} | expected both {[str(r) for r in GATE_TABLE_ROLES]} or none"
    if FORECAST_ROLE in graphs and not present:
        return f"a {FORECAST_ROLE} graph without the gate-table graphs"
    for role, graph in graphs.items():
        for spec in (*graph.inputs, *graph.outputs):
            if spec.dtype not in MANIFEST_DTYPES:
                return f"tensor '{spec.name}' has unknown dtype {spec.dtype!r}"
            if any(
                d != BATCH_AXIS and (isinstance(d, bool) or not isinstance(d, int) or d < 1)
                for d in spec.shape
            ):
                return f"tensor '{spec.name}' has invalid shape {list(spec.shape)}"
        if not graph.outputs:
            return f"the {role} graph has no outputs"
    if not step_inputs:
        return "there are no step inputs (latents first)"
    prediction = graphs[GraphRole.FULL].outputs[0]
    if prediction.name != PREDICTION_NAME or prediction.shape[:1] != (BATCH_AXIS,):
        return (
            f"the full graph's first output is '{prediction.name}', expected '{PREDICTION_NAME}' [batch, ...]"
        )
    gates = None
    if present:
        outputs = graphs[GraphRole.GATES].outputs
        if [t.name for t in outputs] != [GATES_NAME] or outputs[0].shape[:1] != (BATCH_AXIS,):
            return f"the gates graph must output only '{GATES_NAME}' [batch, ...]"
        gates = outputs[0]
    cache_names = {c.name for c in caches}
    for role in sorted(graphs, key=ALL_ROLES.index):
        graph = graphs[role]
        want_inputs, want_outputs = expected_io(role, step_inputs, caches, prediction, gates)
        if role == GraphRole.GATES:
            problem = _gates_inputs_problem(graph.inputs, step_inputs)
        else:
            optional = prunable_inputs(role, step_inputs)
            problem = _compare(role, "inputs", graph.inputs, want_inputs, cache_names, optional)
        problem = problem or _compare(role, "outputs", graph.outputs, want_outputs, cache_names)
        if problem:
            return problem
    return None


def check_graph_set(
    graphs: Mapping[str, GraphSpec],
    step_inputs: Sequence[TensorSpec],
    caches: Sequence[TensorSpec],
    *,
    where: str,
    fix: str = REBUILD,
) -> None:
    """Raise ManifestError (``where | problem | fix``) unless ``graphs`` keep the graph
    contract given the ``step_inputs`` (latents first, build constants left out) and the
    ``caches`` in order: the builder calls it before writing a folder, ``Manifest`` on read
    and on write."""
    problem = graph_set_problem(graphs, step_inputs, caches)
    if problem is not None:
        raise ManifestError(f"{where} | {problem} | {fix}")


@dataclass(frozen=True)
class LoadedTensor:
    """A tensor as a loaded graph declares it; what the graph format does not say is None
    (ONNX Runtime: symbolic dims; torch programs: dtypes and shapes)."""

    name: str
    dtype: str | None = None
    shape: tuple[int | None, ...] | None = None


def shape_fits(got: Sequence[int | None], want: Sequence[int | str]) -> bool:
    """A loaded shape fits a manifest shape: same rank, each dimension equal, dynamic
    (None) or on the batch axis (a graph built for a fixed batch binds per call)."""
    return len(got) == len(want) and all(
        g is None or w == BATCH_AXIS or g == w for g, w in zip(got, want, strict=True)
    )


def check_graph_io(
    role: str,
    graph: GraphSpec,
    inputs: Sequence[LoadedTensor],
    outputs: Sequence[LoadedTensor],
    *,
    where: str,
    ordered: bool = True,
) -> None:
    """Raise BackendError unless a loaded graph's IO is ``role``'s ``graph`` in the manifest:
    the same names (in order when the backend binds by position, ``ordered``), dtypes and
    shapes as far as the graph format declares them."""
    rebuild = "the graph and the manifest come from different builds; rebuild the engines"
    for kind, got, declared in (("input", inputs, graph.inputs), ("output", outputs, graph.outputs)):
        by_name = {spec.name: spec for spec in declared}
        for tensor in got:
            spec = by_name.get(tensor.name)
            if spec is None:
                raise BackendError(
                    f"{where} | {kind} '{tensor.name}' is not a {role} {kind} in the manifest | {rebuild}"
                )
            if tensor.dtype is not None and tensor.dtype != spec.dtype:
                raise BackendError(
                    f"{where} | {kind} '{tensor.name}' is {tensor.dtype}, the manifest says "
                    f"{spec.dtype} | {rebuild}"
                )
            if tensor.shape is not None and not shape_fits(tensor.shape, spec.shape):
                shape = ["?" if d is None else d for d in tensor.shape]
                raise BackendError(
                    f"{where} | {kind} '{tensor.name}' has shape {shape}, the manifest says "
                    f"{list(spec.shape)} | {rebuild}"
                )
        names = [tensor.name for tensor in got]
        want = [spec.name for spec in declared]
        if (names if ordered else sorted(names)) != (want if ordered else sorted(want)):
            raise BackendError(f"{where} | {kind}s {names} differ from the manifest's {want} | {rebuild}")
