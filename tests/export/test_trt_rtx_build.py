"""Every graph of every family through TensorRT-RTX's ONNX parser and builder.

TensorRT-RTX compiles plans ahead of time without a GPU, so these tests run on any
x86-64 Linux machine (``make test`` installs it): each tiny family model goes
through the real build pipeline with ``--backend tensorrt-rtx`` (strongly typed
networks, one optimization profile from the batch or gate-row range, serialized
plans), and every parsed network's inputs and outputs are compared with the
manifest. A graph the parser rejects fails here, naming node and operator.
Running the plans needs an RTX GPU: see tests/runtime/test_trt_rtx_backend.py.
"""

from __future__ import annotations

import logging
import platform
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fora_export.builder import tensorrt as trt_build
from fora_export.builder import trt_parser
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import GATE_ROWS, build
from fora_export.builder.tensorrt import TrtBuildConfig, build_engine, parse_network_io
from fora_export.builder.trt_flavors import DATACENTER_BUILD, DEFAULT_RTX_TARGETS, RTX_BUILD
from fora_export.demo import make_demo_flux, make_demo_qwenimage, make_demo_sd3
from fora_export.errors import BuildError, ConfigError
from fora_runtime import load_manifest
from fora_runtime.backends.trt_flavor import RTX_VERSION
from fora_runtime.manifest import BATCH_AXIS, BatchRange, TensorSpec
from tests.helpers import save_model
from tests.tiny_models import (
    OTHER_PIXART,
    TINY_DIT,
    TINY_FLUX_DEV,
    TINY_PIXART,
    TINY_QWENIMAGE,
    TINY_SD35,
    save_dit,
    save_pixart,
)

# The TensorRT-RTX wheels exist for x86-64 Linux (and Windows); there, a missing install
# is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="TensorRT-RTX wheels are published for x86-64 Linux and Windows only",
)

BATCH = "1:2:4"


# name -> (save the tiny model, its config, build options). Together they cover every graph
# kind we export: lean reuse + gate table (DiT), plain reuse, PixArt with and without size
# conditions, cached subsets (the reuse graph runs the uncached sublayers), and each precision
# (fp16/bf16 graphs carry fp32 islands: Cast around LayerNorm, Softmax, bf16 Einsum/Conv).
FAMILIES: dict[str, tuple[Callable[..., Path], dict[str, Any], dict[str, Any]]] = {
    "dit": (save_dit, TINY_DIT, {}),
    "dit-bf16": (save_dit, TINY_DIT, {"precision": "bf16"}),
    "dit-fp16-plain": (save_dit, TINY_DIT, {"precision": "fp16", "reuse_graph": "plain"}),
    "pixart": (save_pixart, TINY_PIXART, {}),
    "pixart-alpha-fp16": (
        save_pixart,
        OTHER_PIXART,
        {"precision": "fp16", "cache": "attn1,ff", "text_length": 6},
    ),
    # MMDiT: image-stream caches and gate tables; SD3.5's dual attention and qk RMSNorm
    # (TorchScript, opset 17), Flux's rotary attention and decomposed RMSNorm (dynamo, opset 18).
    "sd3.5-bf16": (
        partial(save_model, make_demo_sd3),
        TINY_SD35,
        {"precision": "bf16", "text_length": 6},
    ),
    "flux-dev": (
        partial(save_model, make_demo_flux),
        TINY_FLUX_DEV,
        {"resolution": "8x8", "text_length": 6},
    ),
    # Qwen-Image: joint attention with a prompt mask, real-arithmetic rotary (dynamo, opset 18).
    "qwenimage": (
        partial(save_model, make_demo_qwenimage),
        TINY_QWENIMAGE,
        {"resolution": "8x8", "text_length": 6},
    ),
}

_FOLDERS: dict[str, Path] = {}


def rtx_engine_folder(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    """``family``'s tiny model built with --backend tensorrt-rtx, once per test session."""
    if family not in _FOLDERS:
        save, model_config, options = FAMILIES[family]
        root = tmp_path_factory.mktemp(f"rtx-{family}")
        model = save(root / "model", model_config)
        # Opt level 1: tiny graphs build fastest; parsing and the IO checks do not depend on it.
        config = BuildConfig.from_options(batch=BATCH, backend="tensorrt-rtx", trt_opt_level=1, **options)
        _FOLDERS[family] = build(str(model), root / "engine", config, progress=False).folder
    return _FOLDERS[family]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def rtx_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rtx_engine_folder(tmp_path_factory, request.param)


def test_every_graph_has_a_tensorrt_rtx_plan(rtx_folder: Path) -> None:
    import tensorrt_rtx_bindings

    manifest = load_manifest(rtx_folder)  # verifies every file, the plans included
    record = manifest.backends["tensorrt"]
    assert record["flavor"] == "tensorrt-rtx"
    assert record["tensorrt_rtx_version"] == tensorrt_rtx_bindings.__version__ == RTX_VERSION
    assert record["compute_capabilities"] == list(DEFAULT_RTX_TARGETS)
    assert record["gpu"] is None  # built without one
    # One plan per exported graph, gate-table graphs included where the build has them.
    assert set(record["engines"]) == set(manifest.graphs)
    assert record["profile"] == {"min": 1, "opt": 2, "max": 4}
    has_gates = "gates" in manifest.graphs
    assert record["gate_profile"] == ({"min": 1, "opt": 256, "max": 1024} if has_gates else None)
    # Gate tables come with the lean reuse graphs of the adaLN-Zero families (DiT, SD3, Flux).
    assert has_gates == (manifest.family != "pixart" and manifest.export.reuse_graph == "lean")
    for file in record["engines"].values():
        assert (rtx_folder / file).stat().st_size > 0
        assert record["sha256"][file] == manifest.files[file]["sha256"]
    # No timing cache: TensorRT-RTX ignores it and it would make the build look for a GPU.
    assert record["timing_cache"] is None and not (rtx_folder / "timing.cache").exists()
    assert record["build"]["strongly_typed"] is True


def test_parsed_networks_match_the_manifest(rtx_folder: Path) -> None:
    manifest = load_manifest(rtx_folder)
    for role, graph in manifest.graphs.items():
        inputs, outputs = parse_network_io(rtx_folder / graph.file, RTX_BUILD)
        assert sorted(inputs, key=lambda t: t.name) == sorted(graph.inputs, key=lambda t: t.name), role
        assert outputs == list(graph.outputs), role
        # Every tensor is batched on axis 0 (the gates graph's batch is its rows).
        assert all(spec.shape[0] == BATCH_AXIS for spec in (*inputs, *outputs)), role


def test_network_io_mismatches_are_build_errors(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = rtx_engine_folder(tmp_path_factory, "dit")
    manifest = load_manifest(folder)
    graph = manifest.graphs["reuse_gated"]
    onnx = folder / graph.file
    out = tmp_path_factory.mktemp("rtx-mismatch") / "reuse_gated.plan"

    def rebuilt(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        build_engine(onnx, inputs, manifest.batch, None, out, outputs=outputs, flavor=RTX_BUILD)

    inputs, outputs = list(graph.inputs), list(graph.outputs)
    wrong_dtype = [TensorSpec(t.name, "float16", t.shape) if t.name == "latents" else t for t in inputs]
    # The runtime's one graph-contract check, as every backend runs it on load.
    with pytest.raises(BuildError, match=r"input 'latents' is float32, the manifest says float16"):
        rebuilt(wrong_dtype, outputs)
    (prediction,) = outputs
    wrong_shape = [TensorSpec(prediction.name, prediction.dtype, (BATCH_AXIS, 8, 8, 4))]
    with pytest.raises(
        BuildError, match=r"output 'prediction' has shape \['\?', 8, 8, 8\], the manifest says"
    ):
        rebuilt(inputs, wrong_shape)
    with pytest.raises(BuildError, match=r"input 'latents' is not a reuse_gated input in the manifest"):
        rebuilt([t for t in inputs if t.name != "latents"], outputs)
    with pytest.raises(
        BuildError, match=r"outputs \['prediction'\] differ from the manifest's \['prediction', 'noise'\]"
    ):
        rebuilt(inputs, [*outputs, TensorSpec("noise", "float32", (BATCH_AXIS, 4))])
    assert not out.exists()


def _onnx_model(path: Path, nodes: list[Any], opset: int, domains: tuple[str, ...] = ()) -> Path:
    """A one-input, one-output float32 graph; x and y are [batch, 2, 4, 8]."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 4, 8])
    graph = helper.make_graph(nodes, "g", [x], [y])
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    onnx.save(helper.make_model(graph, opset_imports=imports), path)
    return path


SPECS = [TensorSpec("x", "float32", (BATCH_AXIS, 2, 4, 8))]
OUT_SPECS = [TensorSpec("y", "float32", (BATCH_AXIS, 2, 4, 8))]


def test_parser_rejection_names_node_and_operator(tmp_path: Path) -> None:
    from onnx import helper

    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="blocks.0/relu"),
        helper.make_node("FancyNorm", ["h"], ["y"], name="blocks.0/norm", domain="com.example"),
    ]
    onnx = _onnx_model(tmp_path / "custom.onnx", nodes, 17, ("com.example",))
    with pytest.raises(
        BuildError,
        match=r"TensorRT-RTX's ONNX parser rejected it: node 'blocks\.0/norm' \(op FancyNorm\): .* \| check",
    ):
        build_engine(onnx, SPECS, BatchRange(1, 1, 2), None, tmp_path / "x.plan", flavor=RTX_BUILD)
    assert not (tmp_path / "x.plan").exists()


def test_constants_are_folded_before_tensorrt_parses_a_graph(tmp_path: Path) -> None:
    """A constant subgraph (a product of constants, cast: what dynamic-batch exports leave
    behind) reaches TensorRT as one stored tensor; the graph computes the same, and the
    folded copy does not outlive the build."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def constant(name: str, value: float) -> Any:
        tensor = numpy_helper.from_array(np.full((1, 2, 1, 8), value, np.float32), name)
        return helper.make_node("Constant", [], [name], value=tensor)

    nodes = [
        constant("scale", 0.5),
        constant("shift", 3.0),
        helper.make_node("Mul", ["scale", "shift"], ["product"]),
        helper.make_node("Cast", ["product"], ["bias"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "bias"], ["y"]),
    ]
    onnx = _onnx_model(tmp_path / "fold.onnx", nodes, 17)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    folded = trt_build.fold_for_parser(onnx, scratch)
    assert folded.note == "constants folded: 5 -> 1 nodes" and folded.path.parent == scratch
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 8)).astype(np.float32)
    outputs = [ort.InferenceSession(str(path)).run(None, {"x": x})[0] for path in (onnx, folded.path)]
    np.testing.assert_array_equal(outputs[1], outputs[0])
    np.testing.assert_allclose(outputs[0], x + 1.5, rtol=0, atol=1e-6)

    built = build_engine(
        onnx, SPECS, BatchRange(1, 2, 4), None, tmp_path / "f.plan", outputs=OUT_SPECS, flavor=RTX_BUILD
    )
    assert built.parsed == "constants folded: 5 -> 1 nodes" and built.path.stat().st_size > 0
    assert not list(tmp_path.glob(".fold-*"))  # the folded copy is gone
    unfolded = build_engine(
        onnx, SPECS, BatchRange(1, 2, 4), None, tmp_path / "u.plan", TrtBuildConfig(fold_constants=False),
        outputs=OUT_SPECS, flavor=RTX_BUILD,
    )  # fmt: skip
    assert unfolded.parsed == "as exported: folding switched off"


def test_the_record_says_how_each_graph_was_parsed(rtx_folder: Path) -> None:
    parsed = load_manifest(rtx_folder).backends["tensorrt"]["build"]["parsed"]
    assert set(parsed) == set(load_manifest(rtx_folder).graphs)
    assert all(
        note.startswith(("constants folded: ", "as exported: folding failed")) for note in parsed.values()
    )


def _attention_graph(tmp_path: Path) -> Path:
    """One opset-23 ``Attention`` node as ``--exporter dynamo --opset 23`` makes of SDPA
    (q, k, v as [batch, heads, tokens, head dim]; 2 heads of dim 8, fp32: the tiny DiT's).
    q, k and v are computed tensors, as in our graphs: TensorRT-RTX 1.7 crashes building an
    Attention whose q, k and v are all the same network input."""
    from onnx import helper

    nodes = [
        helper.make_node("Relu", ["x"], ["q"], name="attn1/to_q"),
        helper.make_node("Neg", ["x"], ["k"], name="attn1/to_k"),
        helper.make_node("Sigmoid", ["x"], ["v"], name="attn1/to_v"),
        helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn1/sdpa"),
    ]
    return _onnx_model(tmp_path / "attention.onnx", nodes, 23)


def test_onnx_attention_nodes_are_built_decomposed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    onnx = _attention_graph(tmp_path)
    with caplog.at_level(logging.INFO, logger="fora_export.builder"):
        build_engine(
            onnx, SPECS, BatchRange(1, 2, 4), None, tmp_path / "a.plan", outputs=OUT_SPECS, flavor=RTX_BUILD
        )
    assert (tmp_path / "a.plan").stat().st_size > 0
    assert "1 Attention node(s) may be decomposed" in caplog.text


def test_onnx_attention_needs_decomposition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Why the builder marks Attention decomposable: without it this graph does not build.
    monkeypatch.setattr(trt_parser, "_allow_attention_decomposition", lambda trt, network: 0)
    with pytest.raises(BuildError, match="Attention operation was not supported by a dedicated kernel"):
        build_engine(
            _attention_graph(tmp_path),
            SPECS,
            BatchRange(1, 2, 4),
            None,
            tmp_path / "a.plan",
            flavor=RTX_BUILD,
        )


def test_target_compute_capabilities(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = rtx_engine_folder(tmp_path_factory, "dit")
    manifest = load_manifest(folder)
    graph = manifest.graphs["gates"]
    work = tmp_path_factory.mktemp("rtx-targets")
    only_blackwell = TrtBuildConfig(opt_level=1, compute_capabilities=("12.0",))
    build_engine(
        folder / graph.file, graph.inputs, GATE_ROWS, None, work / "g.plan", only_blackwell, flavor=RTX_BUILD
    )
    assert RTX_BUILD.device_record(only_blackwell) == {"gpu": None, "compute_capabilities": ["12.0"]}
    # Sorted and deduplicated, as recorded.
    assert RTX_BUILD.targets(TrtBuildConfig(compute_capabilities=("12.0", "8.6", "12.0"))) == ("8.6", "12.0")
    with pytest.raises(
        BuildError, match=r"cannot build for 9\.0 \| choose from 7\.5, 8\.0, 8\.6, 8\.9, 12\.0"
    ):
        build_engine(
            folder / graph.file,
            graph.inputs,
            GATE_ROWS,
            None,
            work / "h.plan",
            TrtBuildConfig(compute_capabilities=("9.0",)),
            flavor=RTX_BUILD,
        )
    # Datacenter TensorRT builds for the GPU it runs on: targets make no sense there.
    with pytest.raises(BuildError, match=r"--compute-capabilities \| TensorRT builds for the GPU it runs on"):
        DATACENTER_BUILD.check_config(only_blackwell)
    with pytest.raises(ConfigError, match=r"expected major\.minor"):
        TrtBuildConfig(compute_capabilities=("sm86",))
    with pytest.raises(ConfigError, match=r"expected major\.minor"):
        BuildConfig.from_options(trt_compute_capabilities=",")


def test_rtx_is_built_only_when_asked_for() -> None:
    flavor, note = trt_build.resolve_tensorrt("tensorrt-rtx")
    assert flavor is RTX_BUILD and f"tensorrt-rtx {RTX_VERSION} imported" in note
    available, _ = trt_build.tensorrt_available()
    auto, note = trt_build.resolve_tensorrt("auto")
    assert auto is (DATACENTER_BUILD if available else None)  # auto never picks TensorRT-RTX


def test_rtx_build_refuses_clearly_without_tensorrt_rtx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # import raises ImportError
    with pytest.raises(
        BuildError,
        match=r"^--backend tensorrt-rtx \| cannot import 'tensorrt_rtx_bindings' .* \| run the build on a "
        r"machine with TensorRT-RTX",
    ):
        trt_build.resolve_tensorrt("tensorrt-rtx")
    with pytest.raises(BuildError, match=rf"^TensorRT-RTX \| cannot import .* install it: .*=={RTX_VERSION}"):
        RTX_BUILD.load()


def test_pinned_versions_agree() -> None:
    # pyproject files cannot import RTX_VERSION: check the pins instead.
    root = Path(__file__).resolve().parents[2]
    for pyproject in (root / "pyproject.toml", root / "runtime" / "pyproject.toml"):
        text = pyproject.read_text()
        for package in ("tensorrt-rtx-cu12-libs", "tensorrt-rtx-cu12-bindings"):
            assert f'"{package}=={RTX_VERSION}' in text, (
                f"{pyproject}: {package} is not pinned to {RTX_VERSION}"
            )
