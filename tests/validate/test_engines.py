"""Engines against their ONNX graphs through polygraphy (fora_export.validate.engines).

The comparison's data path (inputs per graph, caches and gate rows handed from the full
and gates graphs, every output compared) runs here with ONNX Runtime standing in for the
engine; with TensorRT and a GPU, ``validate --backend tensorrt`` runs it on the engines."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fora_export.validate.engines import compare_engines_with_onnxruntime
from fora_runtime import load_manifest
from fora_runtime.manifest import GraphRole
from tests.runtime.test_trt_backend import tensorrt_gpu_available


def with_engines(folder: Path) -> Any:
    """The folder's manifest with a TensorRT record whose 'engines' are its ONNX graphs."""
    manifest = load_manifest(folder)
    engines = {role: graph.file for role, graph in manifest.graphs.items()}
    return dataclasses.replace(manifest, backends={"tensorrt": {"engines": engines}})


def onnxruntime_runner(offset: float = 0.0) -> Any:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    class Shifted(OnnxrtRunner):  # type: ignore[misc]
        """An 'engine' whose outputs are ONNX Runtime's plus ``offset``."""

        def infer_impl(self, feed_dict: dict[str, Any]) -> Any:
            outputs = super().infer_impl(feed_dict)
            return type(outputs)((name, value + np.float32(offset)) for name, value in outputs.items())

    def make(role: str, path: Path) -> Any:
        return Shifted(SessionFromOnnx(str(path)), name=f"engine-{role}")

    return make


def test_every_graph_is_compared_output_by_output(tiny_torch_engine: Path) -> None:
    manifest = with_engines(tiny_torch_engine)
    cases = compare_engines_with_onnxruntime(
        tiny_torch_engine, manifest, [1, 3], engine_runner=onnxruntime_runner()
    )
    roles = [(case.role, case.batch_size) for case in cases]
    assert roles == [
        (f"{role} vs onnxruntime", batch)
        for batch in (1, 3)
        for role in (GraphRole.FULL, GraphRole.REUSE, GraphRole.GATES, GraphRole.REUSE_GATED)
    ]
    full = cases[0]
    assert [c.name for c in full.comparisons] == ["prediction", *(c.name for c in manifest.caches)]
    assert all(case.passed and case.worst.max_abs == 0.0 for case in cases)
    assert full.timestep == manifest.denoising.timestep_range[1]


def test_an_engine_that_differs_fails_with_the_tolerance_it_needs(tiny_torch_engine: Path) -> None:
    cases = compare_engines_with_onnxruntime(
        tiny_torch_engine, with_engines(tiny_torch_engine), [2], engine_runner=onnxruntime_runner(1e-3)
    )
    assert cases and not any(case.passed for case in cases)
    worst = cases[0].worst
    assert worst.max_abs == pytest.approx(1e-3, rel=1e-3) and worst.allowed == 1e-4  # fp32: 1e-4 abs


@pytest.mark.tensorrt
def test_validate_compares_tensorrt_engines_with_onnxruntime(
    tmp_path_factory: pytest.TempPathFactory, tiny_dit_dir: Path
) -> None:
    if not tensorrt_gpu_available():
        pytest.skip("needs datacenter TensorRT and a CUDA GPU (polygraphy's TensorRT runner)")
    from fora_export.validate.runner import validate
    from tests.conftest import TRUSTED
    from tests.export.test_trt_build import tensorrt_engine_folder

    folder = tensorrt_engine_folder(tmp_path_factory, tiny_dit_dir, "fp32")
    # Trusted: polygraphy loads plans with plugins and host code allowed (untrusted: skipped).
    report = validate(folder, backend="tensorrt", steps=4, batch_sizes=[2], trajectory=False, access=TRUSTED)
    compared = {case.role for case in report.graph_cases if case.role.endswith(" vs onnxruntime")}
    assert {"full vs onnxruntime", "reuse vs onnxruntime"} <= compared
    assert report.passed, report.to_dict()
