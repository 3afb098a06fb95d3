"""The TensorRT runtime backend (fora_runtime.backends.trt).

The tests marked ``tensorrt`` export a tiny random-weight DiT, build both
engines, and run ``ForaSession(folder, backend="tensorrt")`` against ONNX Runtime
over a 20-step loop; they check that caches stay at fixed addresses shared by
both engines and that CUDA-graph replay equals eager execution. They skip unless
the real ``tensorrt`` package and a CUDA GPU are present. The others run anywhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fora_runtime import BackendError, ForaSession
from fora_runtime.backends import backend_names
from fora_runtime.backends.trt import check_build_record
from fora_runtime.caches import ALIGNMENT
from fora_runtime.manifest import MANIFEST_NAME
from tests.conftest import TINY_DIT
from tests.export.test_trt_build import assert_matches, tensorrt_engine_folder

NUM_STEPS = 20
BATCH_SIZE = 2


# -- helpers ------------------------------------------------------------------------------


def tensorrt_gpu_available() -> bool:
    try:
        import tensorrt
        import torch
    except ImportError:
        return False
    return getattr(tensorrt, "__version__", None) is not None and torch.cuda.is_available()


def edited_copy(folder: Path, dst: Path, **record_changes: object) -> Path:
    shutil.copytree(folder, dst)
    data = json.loads((dst / MANIFEST_NAME).read_text())
    data["backends"]["tensorrt"].update(record_changes)
    (dst / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    return dst


def loop_inputs(precision: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    dtype = np.float16 if precision == "fp16" else np.float32
    latents = rng.standard_normal((BATCH_SIZE, 4, 8, 8)).astype(dtype)
    labels = rng.integers(0, TINY_DIT["num_embeds_ada_norm"], BATCH_SIZE).astype(np.int64)
    return latents, labels, np.linspace(999, 0, NUM_STEPS)


def run_generation(
    session: ForaSession, latents: list[object], labels: object, timesteps: np.ndarray
) -> list[np.ndarray]:
    """A full generation on fixed per-step inputs; returns the predictions as host arrays."""
    gen = session.start(NUM_STEPS, BATCH_SIZE)
    outs = []
    for step, t in enumerate(timesteps):
        outs.append(gen.step(latents[step], float(t), class_labels=labels).float().cpu().numpy())
    return outs


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def trt_folder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_dit_dir: Path
) -> tuple[Path, str]:
    return tensorrt_engine_folder(tmp_path_factory, tiny_dit_dir, request.param), request.param


# -- anywhere -----------------------------------------------------------------------------


def test_backend_is_registered() -> None:
    assert "tensorrt" in backend_names()


def test_module_imports_without_optional_packages() -> None:
    code = (
        "import sys\n"
        "for name in ('tensorrt', 'torch', 'onnxruntime', 'fora_export', 'diffusers', 'onnx'):\n"
        "    sys.modules[name] = None\n"
        "import fora_runtime.backends.trt\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout


def test_build_record_mismatches_are_refused() -> None:
    record = {
        "tensorrt_version": "10.13.0.35",
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "engines": {"full": "full.plan", "reuse": "reuse.plan"},
    }
    where = "engines/x/manifest.json"
    assert check_build_record(record, running_version="10.13.0.35", running_capability="9.0", where=where)
    with pytest.raises(
        BackendError, match=r"built with TensorRT 10\.13\.0\.35, this is TensorRT 11\.0\.0\.1"
    ):
        check_build_record(record, running_version="11.0.0.1", running_capability="9.0", where=where)
    with pytest.raises(BackendError, match=r"compute capability 9\.0 .*this GPU has 8\.9 \| rebuild"):
        check_build_record(record, running_version="10.13.0.35", running_capability="8.9", where=where)
    with pytest.raises(BackendError, match=r"no backends\.tensorrt record"):
        check_build_record(None, running_version="10.13.0.35", running_capability="9.0", where=where)
    with pytest.raises(BackendError, match="one per role"):
        check_build_record(
            {**record, "engines": {"full": "full.plan"}},
            running_version="10.13.0.35",
            running_capability="9.0",
            where=where,
        )


def test_activation_refuses_clearly_without_tensorrt_or_gpu(tiny_engine: Path) -> None:
    if tensorrt_gpu_available():
        pytest.skip("TensorRT and a GPU are available here")
    session = ForaSession(tiny_engine, backend="tensorrt")
    with pytest.raises(BackendError, match=r"Backend 'tensorrt' \| .* \| "):
        session.activate()


# -- with TensorRT and a GPU ----------------------------------------------------------------


@pytest.mark.tensorrt
def test_twenty_step_loop_matches_onnxruntime(trt_folder: tuple[Path, str]) -> None:
    import torch

    folder, precision = trt_folder
    latents, labels, timesteps = loop_inputs(precision)
    with (
        ForaSession(folder, backend="onnxruntime") as ort_session,
        ForaSession(folder, backend="tensorrt") as trt,
    ):
        ort_gen = ort_session.start(NUM_STEPS, BATCH_SIZE)
        trt_gen = trt.start(NUM_STEPS, BATCH_SIZE)
        assert ort_gen.plan == trt_gen.plan and 1 < ort_gen.num_full < NUM_STEPS
        cuda_labels = torch.from_numpy(labels).cuda()
        for step, t in enumerate(timesteps):
            want = ort_gen.step(latents, float(t), class_labels=labels)
            got = trt_gen.step(torch.from_numpy(latents).cuda(), float(t), class_labels=cuda_labels)
            assert isinstance(got, torch.Tensor) and got.is_cuda
            kind = "full" if ort_gen.plan[step] else "reuse"
            assert_matches(got.float().cpu().numpy(), want, precision, f"step {step} ({kind})")
            # Both backends get the reference trajectory, so errors do not compound.
            latents = (latents - 0.05 * want[:, :4]).astype(latents.dtype)


@pytest.mark.tensorrt
def test_caches_are_zero_copy_and_steps_do_not_allocate(trt_folder: tuple[Path, str]) -> None:
    import torch

    folder, precision = trt_folder
    latents, labels, timesteps = loop_inputs(precision)
    cuda_latents = torch.from_numpy(latents).cuda()
    cuda_labels = torch.from_numpy(labels).cuda()
    with ForaSession(folder, backend="tensorrt") as session:
        gen = session.start(NUM_STEPS, BATCH_SIZE)
        before = {name: tensor.data_ptr() for name, tensor in session.cache_views(BATCH_SIZE).items()}
        bound = session.backend.tensor_addresses(BATCH_SIZE)  # type: ignore[attr-defined]
        for name, pointer in before.items():
            assert pointer % ALIGNMENT == 0, name
            assert bound["full"][name] == pointer == bound["reuse"][name], name
        allocated = []
        for t in timesteps:
            out = gen.step(cuda_latents, float(t), class_labels=cuda_labels)
            del out  # the returned copy is the caller's; nothing else may be allocated per step
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
        after = {name: tensor.data_ptr() for name, tensor in session.cache_views(BATCH_SIZE).items()}
        assert after == before
        assert session.backend.tensor_addresses(BATCH_SIZE) == bound  # type: ignore[attr-defined]
        assert len(set(allocated[1:])) == 1, f"device memory changed across steps: {allocated}"


@pytest.mark.tensorrt
def test_cuda_graph_replay_equals_eager(trt_folder: tuple[Path, str]) -> None:
    import torch

    folder, precision = trt_folder
    latents, labels, timesteps = loop_inputs(precision)
    per_step = [torch.from_numpy(latents * (1 - 0.02 * step)).cuda() for step in range(NUM_STEPS)]
    cuda_labels = torch.from_numpy(labels).cuda()
    with ForaSession(folder, backend="tensorrt") as session:
        eager = run_generation(session, per_step, cuda_labels, timesteps)
        session.backend.capture_graphs(BATCH_SIZE)  # type: ignore[attr-defined]
        assert set(session.backend.buffers(BATCH_SIZE).bound["graphs"]) == {"full", "reuse"}
        graphed = run_generation(session, per_step, cuda_labels, timesteps)
    with ForaSession(folder, backend="tensorrt", use_cuda_graphs=True) as session:
        captured_on_start = run_generation(session, per_step, cuda_labels, timesteps)
    for step, (a, b, c) in enumerate(zip(eager, graphed, captured_on_start, strict=True)):
        assert np.array_equal(a, b), f"step {step}: graph replay differs from eager"
        assert np.array_equal(a, c), f"step {step}: use_cuda_graphs=True differs from eager"


@pytest.mark.tensorrt
def test_other_tensorrt_version_or_gpu_is_refused(trt_folder: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = trt_folder
    old = edited_copy(folder, tmp_path / "old-trt", tensorrt_version="8.6.1.6")
    with pytest.raises(BackendError, match=r"built with TensorRT 8\.6\.1\.6, this is TensorRT .* \| rebuild"):
        ForaSession(old, backend="tensorrt").activate()
    other_gpu = edited_copy(folder, tmp_path / "other-gpu", compute_capability="7.5")
    with pytest.raises(BackendError, match=r"compute capability 7\.5 .* \| rebuild the engines on this GPU"):
        ForaSession(other_gpu, backend="tensorrt").activate()
