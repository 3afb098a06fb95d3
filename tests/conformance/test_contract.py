"""The family contract over the whole matrix, without exporting: every registered family x
every ``--cache`` subset it allows x every ``--reuse-graph`` choice x gate table off/on.

Each case plans the build's graphs as the builder does, computes the IO each exported
graph will have (running its module eagerly: the exporters keep only the inputs the
outputs depend on), and checks that the runtime opens the manifest the build would write
and that reuse, fed the full step's own caches, reproduces the full step's prediction.
Exporting the matrix would take hours (Flux and Wan export through dynamo); the real
builds of a covering subset are tests/conformance/test_real_builds.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from fora_export.errors import ForaError
from fora_runtime.manifest import GATES_NAME, GraphRole, GraphSpec
from tests.conformance.contract import (
    PlannedBuild,
    build_config,
    cache_subsets,
    exported_io,
    gate_table_rows,
    graph_named,
    plan_build,
    planned_manifest,
    runtime_refusal,
)
from tests.conformance.registries import build_option_choices, demo_model_factories, registered_adapters
from tests.tiny_models import TINY_FAMILIES, TinyFamily

#: Reuse fed the full step's own caches recomputes the full step's arithmetic (the lean
#: graphs in another order of summation, stacked gate projections): fp32 rounding of
#: predictions of magnitude ~1-10.
EXACT_ATOL = 1e-5
EXACT_RTOL = 1e-5

#: Known bugs, fixed at their root elsewhere: family -> (which cases, why). Each case
#: is a strict xfail, so the fix makes it fail until its entry here is removed.
KNOWN_BUGS: dict[str, tuple[Callable[[tuple[str, ...], str], bool], str]] = {}


def tiny_model(name: str) -> tuple[TinyFamily, torch.nn.Module]:
    family = TINY_FAMILIES[name]
    return family, demo_model_factories()[family.demo](family.config, seed=family.seed)


def expects_lean(
    family: TinyFamily, kinds: tuple[str, ...], reuse_graph: str, all_kinds: tuple[str, ...]
) -> bool:
    """The lean reuse step (and its gate table) is built when asked for, the family has one,
    and every kind is cached (an uncached sublayer must run: the plain reuse graph runs it)."""
    return family.lean_reuse and reuse_graph == "lean" and kinds == all_kinds


def known_bug(family: str, kinds: tuple[str, ...], reuse_graph: str, lean: bool) -> str | None:
    bug = KNOWN_BUGS.get(family)
    effective = "lean" if lean else "plain"  # lean asked for without one builds the plain graph
    return bug[1] if bug is not None and bug[0](kinds, effective) else None


def matrix() -> Iterator[object]:
    for name, adapter in sorted(registered_adapters().items()):
        family = TINY_FAMILIES.get(name)
        if family is None:  # test_registries fails on it; nothing to plan with
            continue
        for kinds in cache_subsets(adapter.cache_kinds):
            for reuse_graph in build_option_choices("reuse-graph"):
                lean = expects_lean(family, kinds, reuse_graph, adapter.cache_kinds)
                reason = known_bug(name, kinds, reuse_graph, lean)
                bug = pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)
                marks = [bug] if reason else []
                for gates in ("gates-off", "gates-on"):
                    yield pytest.param(
                        name, kinds, reuse_graph, gates == "gates-on",
                        id=f"{name}-{'+'.join(kinds)}-{reuse_graph}-{gates}", marks=marks,
                    )  # fmt: skip


def planned_io(plan: PlannedBuild) -> dict[str, GraphSpec]:
    other = plan.adapter.random_inputs(
        plan.example[plan.split.input_names[0]].shape[0],
        plan.config.precision,
        torch.Generator().manual_seed(1),
    )
    return {graph.role: exported_io(graph, other, plan.exporter) for graph in plan.graphs}


def assert_reproduces_full(output: torch.Tensor, plan: PlannedBuild, what: str) -> None:
    torch.testing.assert_close(
        output, plan.prediction, atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize(("name", "kinds", "reuse_graph", "gate_table"), list(matrix()))
def test_family_contract(name: str, kinds: tuple[str, ...], reuse_graph: str, gate_table: bool) -> None:
    family, model = tiny_model(name)
    all_kinds = registered_adapters()[name].cache_kinds
    lean = expects_lean(family, kinds, reuse_graph, all_kinds)
    config = build_config(family, kinds, reuse_graph, forecast=False)
    with plan_build(model, config) as plan:
        roles = [graph.role for graph in plan.graphs]
        table_roles = [GraphRole.GATES, GraphRole.REUSE_GATED] if lean else []
        assert roles == [GraphRole.FULL, GraphRole.REUSE, *table_roles]
        assert plan.reuse_graph == ("lean" if lean else "plain")
        assert plan.adapter.cached_kinds == kinds
        # Only kinds asked for are cached (not necessarily all: the lean MMDiT graphs keep
        # only the image stream's caches).
        cached = {spec.kind for spec in plan.cache_specs}
        assert cached and cached <= set(kinds)

        graphs = planned_io(plan)
        full = graphs[GraphRole.FULL]
        assert [t.name for t in full.outputs[1:]] == [c.name for c in plan.cache_specs]
        for role, graph in graphs.items():
            if role != GraphRole.GATES:  # every step graph writes the one prediction buffer
                assert graph.outputs[:1] == full.outputs[:1], role
        refusal = runtime_refusal(planned_manifest(plan, graphs))
        assert refusal is None, f"the runtime would refuse this build: {refusal}"

        if not gate_table:  # the runtime's reuse steps run the reuse graph
            reuse = graph_named(plan, GraphRole.REUSE)
            with torch.no_grad():
                assert_reproduces_full(reuse.module(*reuse.example_args), plan, "reuse")
            return
    if not lean:  # no gate table: --forecast (which needs one) is refused in one line
        with (
            pytest.raises(ForaError) as refused,
            plan_build(model, build_config(family, kinds, reuse_graph, forecast=True)),
        ):
            pass
        assert str(refused.value).count(" | ") == 2 and "--forecast" in str(refused.value)
        return
    # The gate table's steps: reuse_gated on the table's rows, and the forecast graph
    # (--forecast) on the caches of two full steps that agree, for any forecast weight.
    with plan_build(model, build_config(family, kinds, reuse_graph, forecast=True)) as plan:
        assert plan.graphs[-1].role == GraphRole.REUSE_FORECAST
        graphs = planned_io(plan)
        refusal = runtime_refusal(planned_manifest(plan, graphs))
        assert refusal is None, f"the runtime would refuse this build: {refusal}"
        rows = gate_table_rows(plan)
        latents = plan.example[plan.split.input_names[0]]
        caches = [plan.caches[spec.name] for spec in plan.cache_specs]
        gated = graph_named(plan, GraphRole.REUSE_GATED)
        assert gated.input_names[:2] == [plan.split.input_names[0], GATES_NAME]
        forecast = graph_named(plan, GraphRole.REUSE_FORECAST)
        weights = torch.linspace(0.25, 2.0, latents.shape[0])
        with torch.no_grad():
            assert_reproduces_full(gated.module(latents, rows, *caches), plan, "reuse_gated")
            output = forecast.module(latents, rows, weights, *caches, *caches)
            assert_reproduces_full(output, plan, "reuse_forecast")
