"""Real builds of a covering subset of the conformance matrix, opened with ForaSession and
validated on ONNX Runtime: each family's default build (the lean reuse graph and its gate
table where the family has them) and, for TorchScript families, plain-reuse builds whose
``--cache`` subsets together leave every kind out once (``TINY_FAMILIES[family].plain_builds``;
dynamo keeps every graph input, so their plain graphs are the contract level's). The folders
are the session's shared ones (tests/family_engines.py), so the families' own test files
read the same exports. Each build's exported IO must also be what the contract suite
(tests/conformance/test_contract.py) predicts without exporting.
"""

from __future__ import annotations

import pytest

from fora_export.validate.runner import validate
from fora_runtime import ForaSession, load_manifest
from fora_runtime.manifest import GraphRole
from tests.conformance.contract import build_config, plan_build
from tests.conformance.registries import demo_model_factories, registered_adapters
from tests.conformance.test_contract import expects_lean, known_bug, planned_io
from tests.family_engines import family_engine
from tests.tiny_models import TINY_FAMILIES

pytestmark = pytest.mark.slow

#: fp32 graphs against PyTorch, as validate allows them (exporter parity ~5e-6).
FP32_ATOL = 1e-4


def real_builds() -> list[object]:
    cases: list[object] = []
    for name in sorted(registered_adapters()):
        tiny = TINY_FAMILIES.get(name)
        if tiny is None:  # test_registries fails on it
            continue
        cases.append(pytest.param(name, None, "lean", id=f"{name}-default"))
        for kinds in tiny.plain_builds:
            reason = known_bug(name, kinds, "plain", lean=False)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(
                pytest.param(name, kinds, "plain", id=f"{name}-{'+'.join(kinds)}-plain", marks=marks)
            )
    return cases


@pytest.mark.parametrize(("name", "kinds", "reuse_graph"), real_builds())
def test_real_build_opens_and_validates(
    tmp_path_factory: pytest.TempPathFactory, name: str, kinds: tuple[str, ...] | None, reuse_graph: str
) -> None:
    tiny = TINY_FAMILIES[name]
    all_kinds = registered_adapters()[name].cache_kinds
    folder = family_engine(tmp_path_factory, name, cache=kinds, reuse_graph=reuse_graph)
    manifest = load_manifest(folder)  # the runtime opens it: the bug this suite guards against
    lean = expects_lean(tiny, kinds or all_kinds, reuse_graph, all_kinds)
    assert manifest.export.reuse_graph == ("lean" if lean else "plain")
    assert manifest.has_gate_table == lean
    with ForaSession(folder) as session:  # ONNX Runtime loads every graph and checks its IO
        assert session.manifest.caches == manifest.caches

    # The contract's prediction of every graph's IO is what the exporter wrote.
    model = demo_model_factories()[tiny.demo](tiny.config, seed=tiny.seed)
    with plan_build(model, build_config(tiny, kinds, reuse_graph, forecast=False)) as plan:
        predicted = planned_io(plan)
    assert predicted.keys() == manifest.graphs.keys()
    for role, graph in manifest.graphs.items():
        assert (predicted[role].inputs, predicted[role].outputs) == (graph.inputs, graph.outputs), role

    report = validate(folder, steps=6, batch_sizes=[manifest.batch.opt])
    assert report.passed, report.to_dict()
    assert max(case.worst.max_abs for case in report.graph_cases) <= FP32_ATOL
    roles = {GraphRole.FULL, GraphRole.REUSE} | ({GraphRole.REUSE_GATED} if lean else set())
    assert {case.role for case in report.graph_cases} == roles
    assert report.trajectory.runtime_vs_fora_rel_l2 <= FP32_ATOL
    assert report.trajectory.gate_table == lean
