"""``fora-export info --inspect``: polygraphy's description of each TensorRT plan, or one line
saying why the plans cannot be inspected here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fora_runtime.manifest import MANIFEST_NAME
from tests.helpers import assert_user_error, run_cli
from tests.runtime.test_trt_backend import tensorrt_gpu_available


def test_a_folder_without_plans_says_so(tiny_engine: Path) -> None:
    code, _, stderr = run_cli("info", str(tiny_engine), "--inspect", "--trust")
    assert_user_error(
        code, stderr, r"--inspect \| .* holds no TensorRT plans \| build with --backend tensorrt"
    )


def test_tensorrt_rtx_plans_are_not_inspected(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.export.test_trt_rtx_build import rtx_engine_folder

    code, _, stderr = run_cli("info", str(rtx_engine_folder(tmp_path_factory, "dit")), "--inspect", "--trust")
    assert_user_error(
        code, stderr, r"holds TensorRT-RTX plans, which polygraphy loads only through the tensorrt"
    )


def test_datacenter_plans_need_tensorrt_here(tiny_engine: Path, tmp_path: Path) -> None:
    if tensorrt_gpu_available():
        pytest.skip("TensorRT is installed here")
    folder = tmp_path / "engine"
    shutil.copytree(tiny_engine, folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["backends"]["tensorrt"] = {
        "flavor": "tensorrt",
        "engines": {"full": "full.plan", "reuse": "reuse.plan"},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    code, _, stderr = run_cli("info", str(folder), "--inspect", "--trust")
    # Not installed, or only the type stubs mypy uses (as here): either way, said in one line.
    assert_user_error(code, stderr, r"^error: --inspect \| Backend 'tensorrt' \| .*'tensorrt'.* \| install")


@pytest.mark.tensorrt
def test_plans_are_described_by_polygraphy(
    tmp_path_factory: pytest.TempPathFactory, tiny_dit_dir: Path
) -> None:
    if not tensorrt_gpu_available():
        pytest.skip("needs datacenter TensorRT and a CUDA GPU to deserialise the plans")
    from tests.export.test_trt_build import tensorrt_engine_folder

    folder = tensorrt_engine_folder(tmp_path_factory, tiny_dit_dir, "fp32")
    code, stdout, _ = run_cli("info", str(folder), "--inspect", "--json", "--trust")
    assert code == 0
    plans = json.loads(stdout)["plans"]
    assert set(plans) >= {"full", "reuse"} and "latents" in plans["full"]


def test_plans_of_an_untrusted_folder_are_not_loaded(tiny_engine: Path) -> None:
    # polygraphy's loader registers the plugin libraries and allows embedded host code.
    code, _, stderr = run_cli("info", str(tiny_engine), "--inspect")
    assert_user_error(code, stderr, r"^error: --inspect \| polygraphy loads .* not trusted \| pass --trust")
