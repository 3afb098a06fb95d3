"""TensorRT-RTX plans in the runtime's TensorRT backend (fora_runtime.backends.trt, trt_flavor).

The backend runs both TensorRT flavours through one code path, so the GPU tests are
the datacenter ones of test_trt_backend.py (imported below), collected here again
with a ``trt_folder`` of TensorRT-RTX plans built for the visible GPU. They skip
unless an RTX GPU (a compute capability TensorRT-RTX supports) is visible. The
others run anywhere: the refusals where plans cannot run (no GPU, another compute
capability, no TensorRT-RTX, a plan TensorRT-RTX calls invalid).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_runtime import BackendError, ForaSession, load_manifest
from fora_runtime.backends.trt import TensorRTBackend
from fora_runtime.backends.trt_flavor import (
    DATACENTER,
    RTX,
    RTX_INSTALL,
    RTX_VERSION,
    check_build_record,
    describe_record,
)
from tests.export.test_trt_rtx_build import pytestmark as pytestmark
from tests.export.test_trt_rtx_build import rtx_engine_folder

# The datacenter TensorRT GPU tests, run again on TensorRT-RTX plans (see trt_folder below).
from tests.runtime.test_trt_backend import (  # noqa: F401
    edited_copy,
    test_caches_are_zero_copy_and_steps_do_not_allocate,
    test_cuda_graph_replay_equals_eager,
    test_gate_table_generation_matches_onnxruntime,
    test_twenty_step_loop_matches_onnxruntime,
)

RECORD = {
    "flavor": "tensorrt-rtx",
    "tensorrt_rtx_version": RTX_VERSION,
    "gpu": None,
    "compute_capabilities": ["8.6", "8.9", "12.0"],
    "engines": {"full": "full.plan", "reuse": "reuse.plan"},
}
WHERE = "engines/x/manifest.json"


def rtx_gpu_capability() -> str:
    """The visible GPU's compute capability when TensorRT-RTX can build for it, else skip."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU is visible; running TensorRT-RTX plans needs an RTX GPU")
    tensorrt_rtx_bindings = pytest.importorskip(
        "tensorrt_rtx_bindings", reason=f"TensorRT-RTX is not installed here ({RTX_INSTALL})"
    )

    major, minor = torch.cuda.get_device_capability()
    capability = f"{major}.{minor}"
    members = tensorrt_rtx_bindings.ComputeCapability.__members__
    if f"SM{major}{minor}" not in members:
        pytest.skip(
            f"GPU {torch.cuda.get_device_name()} has compute capability {capability}, which TensorRT-RTX "
            f"{RTX_VERSION} does not support (it targets RTX GPUs: {', '.join(sorted(members))})"
        )
    return capability


_GPU_FOLDERS: dict[str, Path] = {}


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def trt_folder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_dit_dir: Path
) -> tuple[Path, str]:
    """The tiny DiT with TensorRT-RTX plans for the visible GPU (the imported GPU tests use it)."""
    capability = rtx_gpu_capability()
    precision = str(request.param)
    if capability == "7.5" and precision == "fp32":
        pytest.skip("TensorRT-RTX has no fp32 GEMM on Turing (7.5): fp32 plans do not build for it")
    if precision not in _GPU_FOLDERS:
        config = BuildConfig.from_options(
            batch="1:2:4",
            precision=precision,
            backend="tensorrt-rtx",
            trt_opt_level=1,
            trt_compute_capabilities=capability,
        )
        root = tmp_path_factory.mktemp(f"rtx-gpu-{precision}")
        _GPU_FOLDERS[precision] = build(str(tiny_dit_dir), root / "rtx", config, progress=False).folder
    return _GPU_FOLDERS[precision], precision


# -- anywhere -----------------------------------------------------------------------------


def test_rtx_records_are_checked_against_the_gpu_and_version() -> None:
    assert check_build_record(RECORD, running_version=RTX_VERSION, running_capability="8.9", where=WHERE)
    with pytest.raises(
        BackendError,
        match=r"plans were built for compute capabilities 8\.6, 8\.9, 12\.0 \(RTX GPUs\), this GPU has 9\.0 "
        r"\| run them on one of those GPUs",
    ):
        check_build_record(RECORD, running_version=RTX_VERSION, running_capability="9.0", where=WHERE)
    with pytest.raises(
        BackendError, match=rf"built with TensorRT-RTX {RTX_VERSION}, this is TensorRT-RTX 1\.8\.0"
    ):
        check_build_record(RECORD, running_version="1.8.0", running_capability="8.9", where=WHERE)
    lacking = {k: v for k, v in RECORD.items() if k != "compute_capabilities"}
    with pytest.raises(BackendError, match=r"TensorRT-RTX record lacks \['compute_capabilities'\]"):
        check_build_record(lacking, running_version=RTX_VERSION, running_capability="8.9", where=WHERE)
    with pytest.raises(
        BackendError, match=r"flavor 'tensorrt-lite', expected one of \['tensorrt', 'tensorrt-rtx'\]"
    ):
        check_build_record(
            {**RECORD, "flavor": "tensorrt-lite"},
            running_version=RTX_VERSION,
            running_capability="8.9",
            where=WHERE,
        )
    # A record without a flavour is datacenter TensorRT's (records written before TensorRT-RTX).
    datacenter = {"tensorrt_version": "10.13.0.35", "compute_capability": "9.0", "engines": RECORD["engines"]}
    assert check_build_record(datacenter, running_version="10.13.0.35", running_capability="9.0", where=WHERE)
    assert describe_record(RECORD) == (
        f"tensorrt (TensorRT-RTX {RTX_VERSION} plans for compute capability 8.6, 8.9, 12.0; "
        "they run on RTX GPUs only)"
    )
    assert describe_record({**datacenter, "gpu": "H100"}).startswith(
        "tensorrt (TensorRT 10.13.0.35 engines for H100"
    )


def test_plans_cannot_run_without_a_gpu(tmp_path_factory: pytest.TempPathFactory) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    folder = rtx_engine_folder(tmp_path_factory, "dit")
    pattern = (
        r"^Backend 'tensorrt' \| the folder holds TensorRT-RTX plans for RTX GPUs \(compute capability "
        r"8\.6, 8\.9, 12\.0\) and no CUDA GPU is visible here .* cannot run on this machine "
        r"\| run them on an RTX GPU"
    )
    session = ForaSession(folder, backend="tensorrt")
    with pytest.raises(BackendError, match=pattern):
        session.backend.preflight()
    with pytest.raises(BackendError, match=pattern):
        session.activate()


def _pretend_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """torch.cuda reporting one visible GPU of ``capability`` (enough for preflight)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_plans_are_refused_on_other_gpus_and_without_tensorrt_rtx(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = rtx_engine_folder(tmp_path_factory, "dit")
    backend = TensorRTBackend(load_manifest(folder), folder)
    _pretend_gpu(monkeypatch, (9, 0))  # an H100 / H200
    with pytest.raises(BackendError, match=r"this GPU has 9\.0 \| run them on one of those GPUs"):
        backend.preflight()
    _pretend_gpu(monkeypatch, (8, 9))  # an RTX 4090: the checks that need no engine pass
    backend.preflight()
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # not installed
    with pytest.raises(
        BackendError,
        match=rf"^Backend 'tensorrt' \| cannot import 'tensorrt_rtx_bindings' .* "
        rf"\| install it: .*=={RTX_VERSION}",
    ):
        backend.preflight()


def test_invalid_plans_are_refused_before_deserializing(tmp_path_factory: pytest.TempPathFactory) -> None:
    import tensorrt_rtx_bindings as trt

    folder = rtx_engine_folder(tmp_path_factory, "dit")
    blob = (folder / "reuse.plan").read_bytes()
    diagnostics = trt.EngineInvalidityDiagnostics

    class Runtime:
        def get_engine_validity(self, buffer: bytes) -> tuple[object, int]:
            assert buffer == blob
            return trt.EngineValidity.INVALID, int(diagnostics.UNSUPPORTED_CC) | int(
                diagnostics.OLD_CUDA_DRIVER
            )

    with pytest.raises(
        BackendError,
        match=r"reuse\.plan \| TensorRT-RTX cannot run this plan here \(unsupported cc, old cuda driver;",
    ):
        RTX.check_plan(trt, Runtime(), blob, str(folder / "reuse.plan"))  # type: ignore[arg-type]
    # The real check: without a GPU, TensorRT-RTX itself calls the plan invalid here.
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="TensorRT-RTX cannot run this plan here"):
            RTX.check_plan(trt, trt.Runtime(trt.Logger(trt.Logger.ERROR)), blob, "reuse.plan")  # type: ignore[arg-type]


def test_rtx_contexts_specialize_kernels_eagerly() -> None:
    import tensorrt_rtx_bindings as trt

    config = types.SimpleNamespace(dynamic_shapes_kernel_specialization_strategy=None)
    RTX.configure_runtime_config(trt, config)  # type: ignore[arg-type]
    assert (
        config.dynamic_shapes_kernel_specialization_strategy
        == trt.DynamicShapesKernelSpecializationStrategy.EAGER
    )
    untouched = types.SimpleNamespace()
    DATACENTER.configure_runtime_config(trt, untouched)  # type: ignore[arg-type]
    assert vars(untouched) == {}


# -- with an RTX GPU --------------------------------------------------------------------------


@pytest.mark.tensorrt
def test_other_tensorrt_rtx_version_or_gpu_is_refused(trt_folder: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = trt_folder
    old = edited_copy(folder, tmp_path / "old", tensorrt_rtx_version="1.0.0.21")
    with pytest.raises(BackendError, match=r"built with TensorRT-RTX 1\.0\.0\.21, this is TensorRT-RTX"):
        ForaSession(old, backend="tensorrt").activate()
    capability = rtx_gpu_capability()
    other = "7.5" if capability != "7.5" else "8.6"
    elsewhere = edited_copy(folder, tmp_path / "other-gpu", compute_capabilities=[other])
    with pytest.raises(
        BackendError, match=rf"built for compute capabilities {other} .* this GPU has {capability}"
    ):
        ForaSession(elsewhere, backend="tensorrt").activate()
