"""TensorRT engine builds (fora_export.builder.tensorrt).

The tests marked ``tensorrt`` build a tiny random-weight DiT, export it with the
build pipeline, build both engines from the folder's ONNX graphs and compare
them with ONNX Runtime graph by graph. They skip unless the real ``tensorrt``
package and a CUDA GPU are present. The others run anywhere.
"""

from __future__ import annotations

import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fora_export.builder import tensorrt as trt_build
from fora_export.builder import trt_parser
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.builder.tensorrt import (
    ENGINE_FILES,
    GATE_ENGINE_FILES,
    TIMING_CACHE_FILE,
    TrtBuildConfig,
    build_engine,
    build_engines,
    profile_shapes,
    seed_timing_cache,
    tensorrt_available,
)
from fora_export.errors import BuildError, ConfigError
from fora_runtime import ForaSession, load_manifest
from fora_runtime.manifest import BatchRange, TensorSpec
from tests.tiny_models import TINY_DIT

BATCH = "1:2:4"
# Low optimization level: tiny graphs, fast builds; numerics do not depend on it.
TEST_BUILD = TrtBuildConfig(opt_level=1)


# -- helpers (shared with tests/runtime/test_trt_backend.py) -----------------------------------


def require_tensorrt_gpu() -> None:
    """Skip unless the real TensorRT and a CUDA GPU are present."""
    trt = pytest.importorskip(
        "tensorrt",
        reason="TensorRT is not installed (pip install tensorrt); these tests need it and a CUDA GPU",
    )
    if getattr(trt, "__version__", None) is None:
        pytest.skip(
            "only the tensorrt type stubs are installed (no TensorRT runtime); these tests need the real "
            "tensorrt package and a CUDA GPU"
        )
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT tests need one")


_ENGINE_FOLDERS: dict[str, Path] = {}


def tensorrt_engine_folder(
    tmp_path_factory: pytest.TempPathFactory, tiny_dit_dir: Path, precision: str
) -> Path:
    """The tiny DiT exported at ``precision`` plus TensorRT engines, built once per test session."""
    require_tensorrt_gpu()
    if precision not in _ENGINE_FOLDERS:
        root = tmp_path_factory.mktemp(f"trt-{precision}")
        # The real pipeline: ONNX export, then both engines, recorded in the manifest.
        config = BuildConfig.from_options(
            batch=BATCH, precision=precision, backend="tensorrt", trt_opt_level=TEST_BUILD.opt_level
        )
        _ENGINE_FOLDERS[precision] = build(str(tiny_dit_dir), root / "trt", config, progress=False).folder
    return _ENGINE_FOLDERS[precision]


def assert_matches(got: np.ndarray, want: np.ndarray, precision: str, what: str) -> None:
    """fp32: atol 1e-4; fp16/bf16: 1e-2 of the reference's largest magnitude."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: TensorRT produced NaN/Inf"
    tol = 1e-4 if precision == "fp32" else 1e-2 * max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} exceeds {tol:.3g}"


def step_inputs(batch_size: int, precision: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.float16 if precision == "fp16" else np.float32
    return {
        "latents": rng.standard_normal((batch_size, 4, 8, 8)).astype(dtype),
        "timestep": rng.integers(0, 1000, batch_size).astype(np.float32),
        "class_labels": rng.integers(0, TINY_DIT["num_embeds_ada_norm"], batch_size).astype(np.int64),
    }


def to_numpy(value: object) -> np.ndarray:
    return value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def engine_folder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_dit_dir: Path
) -> tuple[Path, str]:
    return tensorrt_engine_folder(tmp_path_factory, tiny_dit_dir, request.param), request.param


# -- anywhere -----------------------------------------------------------------------------


def test_build_config_validates() -> None:
    assert TrtBuildConfig().to_dict() == {
        "opt_level": 3,
        "workspace_bytes": None,
        "tf32": False,
        "compute_capabilities": None,
        "fold_constants": True,
    }
    with pytest.raises(ConfigError, match=r"expected 0\.\.5"):
        TrtBuildConfig(opt_level=6)
    with pytest.raises(ConfigError, match="integer"):
        TrtBuildConfig(opt_level=True)
    with pytest.raises(ConfigError, match="positive byte count"):
        TrtBuildConfig(workspace_bytes=0)


def test_profile_spans_the_batch_range_on_axis_0() -> None:
    specs = [
        TensorSpec("latents", "float16", ("batch", 4, 8, 8)),
        TensorSpec("timestep", "float32", ("batch",)),
    ]
    shapes = profile_shapes(specs, BatchRange(1, 2, 8))
    assert shapes["latents"] == ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8))
    assert shapes["timestep"] == ((1,), (2,), (8,))


def test_tensorrt_available_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way of not having TensorRT has its own reason, and having it says which GPU."""
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    ok, reason = tensorrt_available()
    assert not ok and reason.startswith("cannot import 'tensorrt'"), reason
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    fake.Builder = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = tensorrt_available()
    assert not ok and reason.startswith("tensorrt 10.13 imported, but no CUDA GPU is visible"), reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert tensorrt_available() == (True, "tensorrt 10.13 imported and GPU NVIDIA H200 visible")


def test_build_refuses_clearly_without_tensorrt(tmp_path: Path) -> None:
    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are available here")
    (tmp_path / "full.onnx").write_bytes(b"")
    with pytest.raises(BuildError, match="TensorRT"):
        build_engine(tmp_path / "full.onnx", [], BatchRange(1, 1, 1), None, tmp_path / "full.plan")


def test_backend_tensorrt_without_tensorrt_fails_before_writing(tiny_dit_dir: Path, tmp_path: Path) -> None:
    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are available here")
    out = tmp_path / "engine"
    config = BuildConfig.from_options(backend="tensorrt")
    with pytest.raises(BuildError, match=r"--backend tensorrt \| .* \| run the build on a GPU machine"):
        build(str(tiny_dit_dir), out, config, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_backend_auto_without_tensorrt_builds_onnx_only(tiny_engine: Path) -> None:
    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are available here")
    manifest = load_manifest(tiny_engine)  # built with the default --backend auto
    assert manifest.backends == {}
    assert not any(name.endswith(".plan") for name in manifest.files)


def test_tensorrt_before_10_1_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.0.1.6"  # type: ignore[attr-defined]
    fake.Builder = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(
        BuildError, match=r"^TensorRT \| TensorRT 10\.0\.1\.6 is too old.* \| upgrade: .*10\.1"
    ):
        trt_build._tensorrt_version()
    ok, reason = tensorrt_available()
    assert not ok and "too old" in reason
    fake.__version__ = "10.1.0.27"  # type: ignore[attr-defined]
    assert trt_build._tensorrt_version() == "10.1.0.27"


class _FakeILogger:
    Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    def __init__(self) -> None:
        pass


def test_one_logger_whose_error_list_is_swapped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_trt = types.SimpleNamespace(ILogger=_FakeILogger)
    monkeypatch.setattr(trt_parser, "_LOGGERS", {})
    logger = trt_parser.tensorrt_logger(fake_trt)
    assert trt_parser.tensorrt_logger(fake_trt) is logger  # the same object for every build
    error = _FakeILogger.Severity.ERROR
    logger.log(error, "outside any build")  # logged, collected nowhere
    with caplog.at_level(logging.INFO, logger="fora_export.builder.trt_parser"):
        with trt_parser.capture_errors(logger) as first:
            logger.log(error, "first build")
            # Timing-cache complaints go to their own list, at INFO.
            with trt_parser.capture_errors(logger, level=logging.INFO) as cache:
                logger.log(error, "stale timing cache")
            logger.log(error, "first build again")
        with trt_parser.capture_errors(logger) as second:
            logger.log(error, "second build")
    assert first == ["first build", "first build again"]
    assert cache == ["stale timing cache"]
    assert second == ["second build"]
    assert logger.errors is None
    levels = {record.getMessage(): record.levelno for record in caplog.records}
    assert levels["TensorRT: stale timing cache"] == logging.INFO
    assert levels["TensorRT: second build"] == logging.ERROR


def test_bad_profile_shapes_become_build_errors(tmp_path: Path) -> None:
    class Profile:
        def set_shape(self, *args: object) -> None:
            raise RuntimeError("min > opt")

    fake_trt = types.SimpleNamespace(Dims=tuple)
    tensor = types.SimpleNamespace(name="latents", shape=(-1, 4, 8, 8))
    shapes = ((4, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8))
    onnx = tmp_path / "full.onnx"
    with pytest.raises(
        BuildError,
        match=r"profile shapes of input 'latents': min \[4, 4, 8, 8\], opt \[2, 4, 8, 8\], "
        r"max \[8, 4, 8, 8\] \(min > opt; TensorRT said so\) \| check --batch",
    ):
        trt_build._set_profile_shape(fake_trt, Profile(), onnx, tensor, shapes, ["TensorRT said so"])
    flat = types.SimpleNamespace(name="latents", shape=(-1, 256))
    with pytest.raises(BuildError, match=r"do not match the network's rank 2"):
        trt_build._set_profile_shape(fake_trt, Profile(), onnx, flat, shapes, [])


# -- with TensorRT and a GPU ----------------------------------------------------------------


@pytest.mark.tensorrt
def test_engines_and_record_are_written(engine_folder: tuple[Path, str]) -> None:
    import tensorrt
    import torch

    folder, _ = engine_folder
    manifest = load_manifest(folder)
    record = manifest.backends["tensorrt"]
    major, minor = torch.cuda.get_device_capability()
    assert record["tensorrt_version"] == tensorrt.__version__
    assert record["compute_capability"] == f"{major}.{minor}"
    assert record["profile"] == {"min": 1, "opt": 2, "max": 4}
    # DiT builds have gate-table graphs: their engines come along, gates with its rows profile.
    assert record["engines"] == {**ENGINE_FILES, **GATE_ENGINE_FILES}
    assert record["gate_profile"] == {"min": 1, "opt": 256, "max": 1024}
    for file in record["engines"].values():
        assert record["sha256"][file] == manifest.files[file]["sha256"]
    assert (folder / TIMING_CACHE_FILE).stat().st_size > 0


@pytest.mark.tensorrt
@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_engines_match_onnxruntime_per_graph(engine_folder: tuple[Path, str], batch_size: int) -> None:
    folder, precision = engine_folder
    inputs = step_inputs(batch_size, precision, seed=batch_size)
    with (
        ForaSession(folder, backend="onnxruntime") as ort_session,
        ForaSession(folder, backend="tensorrt") as trt,
    ):
        want = ort_session.run_step("full", batch_size, inputs)
        got = trt.run_step("full", batch_size, inputs)
        assert_matches(to_numpy(got), want, precision, f"full prediction (batch {batch_size})")
        want_caches = ort_session.cache_views(batch_size)
        got_caches = trt.cache_views(batch_size)
        for name, cache in want_caches.items():
            assert_matches(to_numpy(got_caches[name]), cache, precision, f"cache {name} (batch {batch_size})")
        # Reuse reads the caches the full step just wrote, in each backend.
        later = {**inputs, "timestep": (inputs["timestep"] * 0.5).astype(np.float32)}
        want = ort_session.run_step("reuse", batch_size, later)
        got = trt.run_step("reuse", batch_size, later)
        assert_matches(to_numpy(got), want, precision, f"reuse prediction (batch {batch_size})")


@pytest.mark.tensorrt
def test_rebuild_reuses_the_timing_cache(
    engine_folder: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, _ = engine_folder
    manifest = load_manifest(folder)
    work = tmp_path / "rebuild"
    work.mkdir()
    for role in ("full", "reuse"):
        shutil.copy(folder / manifest.graphs[role].file, work / manifest.graphs[role].file)
    assert seed_timing_cache(folder, work)
    with caplog.at_level("INFO", logger="fora_export.builder"):
        build_engines(work, manifest.graphs, manifest.batch, TEST_BUILD)
    assert "reusing TensorRT timing cache" in caplog.text
    assert all((work / file).stat().st_size > 0 for file in ENGINE_FILES.values())


@pytest.mark.tensorrt
def test_parser_errors_become_build_errors(tmp_path: Path) -> None:
    require_tensorrt_gpu()
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not an ONNX model")
    with pytest.raises(BuildError, match="ONNX parser rejected it"):
        build_engine(bad, [], BatchRange(1, 1, 1), None, tmp_path / "broken.plan")
    assert not (tmp_path / "broken.plan").exists()
