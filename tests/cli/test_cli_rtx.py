"""``fora-export build --backend tensorrt-rtx`` end to end: plans built without a GPU, a
manifest ``info`` describes, and ``validate`` / ``bench`` saying in one line that the
plans cannot run on a machine without an RTX GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fora_runtime.backends.trt_flavor import RTX_VERSION
from tests.export.test_trt_rtx_build import pytestmark as pytestmark
from tests.helpers import assert_user_error, run_cli


def test_build_info_and_refusals_without_an_rtx_gpu(tiny_dit_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "rtx"
    code, stdout, _ = run_cli(
        "build",
        str(tiny_dit_dir),
        "--out",
        str(out),
        "--batch",
        "1:2:3",
        "--backend",
        "tensorrt-rtx",
        "--compute-capabilities",
        "12.0,8.9",
    )
    assert code == 0, stdout
    assert f"ONNX graphs + TensorRT-RTX plans for RTX GPUs (tensorrt-rtx {RTX_VERSION} imported" in stdout
    for plan in ("full.plan", "reuse.plan", "gates.plan", "reuse_gated.plan"):
        assert plan in stdout and (out / plan).stat().st_size > 0

    code, stdout, _ = run_cli("info", str(out))
    assert code == 0
    assert f"TensorRT-RTX {RTX_VERSION} plans for compute capability 8.9, 12.0" in " ".join(stdout.split())
    code, stdout, _ = run_cli("info", str(out), "--json")
    record = json.loads(stdout)["backends"]["tensorrt"]
    assert record["compute_capabilities"] == ["8.9", "12.0"]
    assert record["build"]["compute_capabilities"] == ["12.0", "8.9"]  # as asked

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU refusals below do not apply")
    refusal = (
        r"^error: Backend 'tensorrt' \| the folder holds TensorRT-RTX plans for RTX GPUs "
        r"\(compute capability 8\.9, 12\.0\) and no CUDA GPU is visible here .* \| run them on an RTX GPU"
    )
    code, _, stderr = run_cli("validate", str(out), "--backend", "tensorrt", "--steps", "2")
    assert_user_error(code, stderr, refusal)
    assert len(stderr.strip().splitlines()) == 1
    # bench refuses before its eager baseline (which would take the longest).
    code, stdout, stderr = run_cli("bench", str(out), "--backend", "onnxruntime,tensorrt", "--steps", "2")
    assert_user_error(code, stderr, refusal)
    assert stdout == ""
    # The ONNX graphs of the same folder still run (and validate) on the CPU.
    code, stdout, _ = run_cli("validate", str(out), "--steps", "4", "--batch-sizes", "2", "--json")
    assert code == 0 and json.loads(stdout)["passed"] is True


def test_compute_capabilities_are_checked(tiny_dit_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli(
        "build", str(tiny_dit_dir), "--out", str(tmp_path / "x"), "--compute-capabilities", "8.6,nine"
    )
    assert_user_error(
        code, stderr, r"--compute-capabilities \| got \('8\.6', 'nine'\) \| expected major\.minor"
    )
    code, _, stderr = run_cli(
        "build", str(tiny_dit_dir), "--out", str(tmp_path / "x"), "--compute-capabilities", "8.6"
    )
    assert_user_error(
        code, stderr, r"--compute-capabilities \| applies to --backend tensorrt-rtx only \(this build: auto\)"
    )
