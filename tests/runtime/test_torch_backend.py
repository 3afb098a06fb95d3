"""The PyTorch runtime backend (fora_runtime.backends.torch_backend) and the
``torch.export`` programs it runs (fora_export.export.torch_program).

A copy of the tiny ONNX engine folder gets ``full.pt2`` / ``reuse.pt2`` exported
from the same tiny DiT, plus the manifest's ``backends["torch"]`` record and the
programs' file records. On CPU the backend runs the programs eagerly; tests
marked ``gpu`` run them on CUDA with CUDA graphs and skip without a GPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fora_export.adapters.base import TORCH_DTYPES
from fora_export.adapters.casting import cast_model
from fora_export.adapters.registry import adapter_for
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import PREDICTION, build
from fora_export.demo import make_demo_dit
from fora_export.errors import ExportError
from fora_export.export.torch_program import (
    export_program,
    read_program_meta,
    torch_manifest_record,
)
from fora_export.split.graphs import SplitModel, split_model
from fora_runtime import BackendError, ForaSession, Generation, GenerationError, InputError, load_manifest
from fora_runtime.backends import backend_names, create_backend
from fora_runtime.backends.torch_backend import TorchBackend, check_program_record
from fora_runtime.manifest import MANIFEST_NAME, BatchRange, graph_file, sha256_of
from tests.tiny_models import TINY_DIT

INPUT_NAMES = ("latents", "timestep", "class_labels")
NUM_STEPS = 6
NUM_CLASSES = TINY_DIT["num_embeds_ada_norm"]

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


# -- helpers ------------------------------------------------------------------------------


def add_torch_programs(folder: Path, *, device: str = "cpu", precision: str = "fp32") -> SplitModel:
    """Export the tiny DiT's step graphs as torch programs into the engine ``folder`` and
    record them in its manifest; returns the (CPU-or-``device``) split model as reference."""
    manifest = load_manifest(folder)
    model = make_demo_dit(TINY_DIT)
    cast_model(model, TORCH_DTYPES[precision])
    model.to(device)
    adapter = adapter_for(model)
    split = split_model(adapter, INPUT_NAMES)
    generator = torch.Generator().manual_seed(0)
    example = adapter.random_inputs(2, precision, generator)
    example = {name: value.to(device) for name, value in example.items()}
    with torch.no_grad():
        _, caches = split.run_full(example)
    export_program(
        split.full,
        tuple(example[n] for n in INPUT_NAMES),
        folder / graph_file("full", "torch"),
        manifest.batch,
        input_names=list(INPUT_NAMES),
        output_names=[PREDICTION, *split.cache_names],
    )
    export_program(
        split.reuse,
        (*(example[n] for n in INPUT_NAMES), *(caches[n] for n in split.cache_names)),
        folder / graph_file("reuse", "torch"),
        manifest.batch,
        input_names=[*INPUT_NAMES, *split.cache_names],
        output_names=[PREDICTION],
    )
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["backends"]["torch"] = torch_manifest_record(folder, ("full", "reuse"))
    for file in (graph_file("full", "torch"), graph_file("reuse", "torch")):
        data["files"][file] = {"bytes": (folder / file).stat().st_size, "sha256": sha256_of(folder / file)}
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    return split


def edit_manifest(folder: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(folder, dst)
    data = json.loads((dst / MANIFEST_NAME).read_text())
    edit(data)
    (dst / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    return dst


def step_inputs(batch: int, seed: int = 0, dtype: Any = np.float32) -> list[dict[str, np.ndarray]]:
    """Per-step host inputs of one generation (new latents every step, as in sampling)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int64)
    return [
        {
            "latents": rng.standard_normal((batch, 4, 8, 8)).astype(dtype),
            "timestep": np.full(batch, 999.0 - 150.0 * k, np.float32),
            "class_labels": labels,
        }
        for k in range(NUM_STEPS)
    ]


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def run_step(gen: Generation, step: dict[str, np.ndarray]) -> np.ndarray:
    return to_numpy(gen.step(step["latents"], step["timestep"], class_labels=step["class_labels"]))


def run_session(session: ForaSession, inputs: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    gen = session.start(len(inputs), inputs[0]["latents"].shape[0])
    return [run_step(gen, step) for step in inputs]


def run_split(
    split: SplitModel, plan: tuple[bool, ...], inputs: list[dict[str, np.ndarray]]
) -> list[np.ndarray]:
    """The same generation on the eager PyTorch split modules."""
    outs = []
    caches: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for full, step in zip(plan, inputs, strict=True):
            tensors = {name: torch.from_numpy(value) for name, value in step.items()}
            if full:
                prediction, caches = split.run_full(tensors)
            else:
                prediction = split.run_reuse(tensors, caches)
            outs.append(prediction.numpy())
    return outs


def assert_close(got: list[np.ndarray], want: list[np.ndarray], atol: float) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        error = float(np.abs(a - b).max())
        assert error <= atol, f"step {step}: max abs error {error:.3g} > {atol}"


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_engine(tmp_path_factory: pytest.TempPathFactory, tiny_engine: Path) -> tuple[Path, SplitModel]:
    folder = tmp_path_factory.mktemp("torch-engines") / "tiny-fp32"
    shutil.copytree(tiny_engine, folder)
    return folder, add_torch_programs(folder)


@pytest.fixture
def cpu_session(torch_engine: tuple[Path, SplitModel]):
    with ForaSession(torch_engine[0], backend="torch", trust_programs=True, device="cpu") as session:
        yield session


# -- export -------------------------------------------------------------------------------


def test_backend_name_creates_this_backend(tiny_engine: Path) -> None:
    """The registry's "module:Class" entry resolves to this class, not just a listed name."""
    backend = create_backend("torch", load_manifest(tiny_engine), tiny_engine, gate_table=False)
    assert type(backend) is TorchBackend and backend.name == "torch" and "torch" in backend_names()
    assert not backend.is_active and not backend.use_gate_table


def test_record_and_archive_metadata(torch_engine: tuple[Path, SplitModel]) -> None:
    folder, split = torch_engine
    record = load_manifest(folder).backends["torch"]
    assert record["programs"] == {"full": "full.pt2", "reuse": "reuse.pt2"}
    assert record["torch"] == torch.__version__
    assert (record["device"], record["dtype"]) == ("cpu", "float32")
    assert record["inputs"]["reuse"] == [*INPUT_NAMES, *split.cache_names]
    assert record["outputs"] == {"full": [PREDICTION, *split.cache_names], "reuse": [PREDICTION]}
    assert record["batch"] == {"min": 1, "max": 4, "dynamic": True}
    assert read_program_meta(folder / "full.pt2")["trace_batch"] == 2
    # No example inputs in the archives: for reuse they would be every cache tensor.
    import zipfile

    for name in ("full.pt2", "reuse.pt2"):
        entries = zipfile.ZipFile(folder / name).infolist()
        assert sum(e.file_size for e in entries if "sample_inputs" in e.filename) == 0


def test_batch_one_example_is_traced_at_two_and_still_runs_batch_one(tmp_path: Path) -> None:
    # torch.export specialises a batch traced at 1 to the constant 1; the exporter
    # traces at 2 and checks the loaded program at batch 1 against eager.
    module = nn.Sequential(nn.Linear(4, 3), nn.GELU()).eval()
    exported = export_program(
        module,
        (torch.randn(1, 4),),
        tmp_path / "p.pt2",
        BatchRange(1, 1, 4),
        input_names=["x"],
        output_names=["y"],
    )
    meta = exported.meta
    assert meta["trace_batch"] == 2 and meta["batch"]["dynamic"]
    assert [(t.name, t.shape) for t in exported.graph.inputs] == [("x", ("batch", 4))]
    assert [(t.name, t.dtype, t.shape) for t in exported.graph.outputs] == [("y", "float32", ("batch", 3))]
    program = torch.export.load(str(tmp_path / "p.pt2")).module()
    for batch in (1, 3, 4):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(program(x), module(x), rtol=0, atol=1e-6)


def test_single_size_range_exports_static(tmp_path: Path) -> None:
    module = nn.Linear(4, 3).eval()
    exported = export_program(
        module,
        (torch.randn(1, 4),),
        tmp_path / "p.pt2",
        BatchRange(3, 3, 3),
        input_names=["x"],
        output_names=["y"],
    )
    assert exported.meta["trace_batch"] == 3 and not exported.meta["batch"]["dynamic"]


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_export_failure_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"p\.pt2 \| torch\.export\.export failed at trace batch 2"):
        export_program(
            DataDependent(),
            (torch.randn(2, 4),),
            tmp_path / "p.pt2",
            BatchRange(1, 2, 4),
            input_names=["x"],
            output_names=["y"],
        )
    assert not (tmp_path / "p.pt2").exists()


def test_name_count_mismatch_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="1 example inputs for 2 input names"):
        export_program(
            nn.Identity(),
            (torch.randn(2, 4),),
            tmp_path / "p.pt2",
            BatchRange(1, 2, 4),
            input_names=["x", "z"],
            output_names=["y"],
        )


def test_record_is_refused_for_a_program_without_metadata(tmp_path: Path) -> None:
    for file in (graph_file("full", "torch"), graph_file("reuse", "torch")):
        program = torch.export.export(nn.Linear(2, 2), (torch.randn(2, 2),))
        torch.export.save(program, str(tmp_path / file))
    with pytest.raises(
        ExportError, match=r"has no extra/fora_program\.json \| not written by export_program"
    ):
        torch_manifest_record(tmp_path, ("full", "reuse"))


# -- CPU runtime --------------------------------------------------------------------------


def test_six_step_generation_matches_onnxruntime(
    torch_engine: tuple[Path, SplitModel], cpu_session: ForaSession
) -> None:
    inputs = step_inputs(2)
    with ForaSession(torch_engine[0], backend="onnxruntime") as ort_session:
        expected = run_session(ort_session, inputs)
    assert_close(run_session(cpu_session, inputs), expected, atol=1e-4)


def test_six_step_generation_matches_the_pytorch_split(
    torch_engine: tuple[Path, SplitModel], cpu_session: ForaSession
) -> None:
    inputs = step_inputs(2, seed=1)
    plan = cpu_session.schedule.plan(NUM_STEPS)
    assert plan == (True, False, False, True, False, False)
    assert_close(run_session(cpu_session, inputs), run_split(torch_engine[1], plan, inputs), atol=1e-6)


def test_reuse_receives_the_very_cache_tensors_full_returned(cpu_session: ForaSession) -> None:
    backend: Any = cpu_session.backend
    calls: list[tuple[str, tuple[Any, ...], Any]] = []
    for role in ("full", "reuse"):
        program = backend._programs[role]

        def recording(*args: Any, _role: str = role, _program: Any = program) -> Any:
            outputs = _program(*args)
            calls.append((_role, args, outputs))
            return outputs

        backend._programs[role] = recording
    run_session(cpu_session, step_inputs(2))
    assert [role for role, _, _ in calls] == ["full", "reuse", "reuse", "full", "reuse", "reuse"]
    views = cpu_session.cache_views(2)
    for full_index in (0, 3):
        returned = calls[full_index][2][1:]
        for reuse_index in (full_index + 1, full_index + 2):
            handed = calls[reuse_index][1][len(INPUT_NAMES) :]
            assert len(handed) == len(returned) > 0
            assert all(a is b for a, b in zip(handed, returned, strict=True))
    # The session's live cache views are the last full step's outputs themselves.
    assert all(a is b for a, b in zip(views.values(), calls[3][2][1:], strict=True))
    pointers = {name: t.data_ptr() for name, t in views.items()}
    assert pointers == {name: t.data_ptr() for name, t in zip(views, calls[3][2][1:], strict=True)}
    host = cpu_session.read_caches(2)
    assert all(np.array_equal(host[name], views[name].numpy()) for name in views)


def test_interleaved_sessions_equal_sequential_ones(torch_engine: tuple[Path, SplitModel]) -> None:
    folder = torch_engine[0]
    inputs_a, inputs_b = step_inputs(2, seed=2), step_inputs(2, seed=3)
    with ForaSession(folder, backend="torch", trust_programs=True, device="cpu") as session:
        sequential_a = run_session(session, inputs_a)
        sequential_b = run_session(session, inputs_b)
    with (
        ForaSession(folder, backend="torch", trust_programs=True, device="cpu") as first,
        ForaSession(folder, backend="torch", trust_programs=True, device="cpu") as second,
    ):
        gen_a, gen_b = first.start(NUM_STEPS, 2), second.start(NUM_STEPS, 2)
        outs_a, outs_b = [], []
        for step_a, step_b in zip(inputs_a, inputs_b, strict=True):
            outs_a.append(run_step(gen_a, step_a))
            outs_b.append(run_step(gen_b, step_b))
    assert_close(outs_a, sequential_a, atol=1e-6)
    assert_close(outs_b, sequential_b, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_sizes(
    torch_engine: tuple[Path, SplitModel], cpu_session: ForaSession, batch: int
) -> None:
    inputs = step_inputs(batch, seed=4)
    got = run_session(cpu_session, inputs)
    assert got[0].shape == (batch, 8, 8, 8)
    plan = cpu_session.schedule.plan(NUM_STEPS)
    assert_close(got, run_split(torch_engine[1], plan, inputs), atol=1e-6)


def test_accepts_tensors_scalar_timesteps_and_narrow_labels(cpu_session: ForaSession) -> None:
    inputs = step_inputs(2, seed=5)
    expected = run_session(cpu_session, inputs)
    gen = cpu_session.start(NUM_STEPS, 2)
    for step, want in zip(inputs, expected, strict=True):
        got = gen.step(
            torch.from_numpy(step["latents"]),
            float(step["timestep"][0]),
            class_labels=step["class_labels"].astype(np.int32),
        )
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(to_numpy(got), want)


def test_predictions_survive_later_steps(cpu_session: ForaSession) -> None:
    inputs = step_inputs(2, seed=6)
    gen = cpu_session.start(NUM_STEPS, 2)
    latents = [torch.from_numpy(step["latents"]) for step in inputs]
    first = gen.step(latents[0], inputs[0]["timestep"], class_labels=inputs[0]["class_labels"])
    kept = first.clone()
    gen.step(latents[1], inputs[1]["timestep"], class_labels=inputs[1]["class_labels"])
    assert torch.equal(first, kept)


def test_out_of_range_class_labels_are_refused(cpu_session: ForaSession) -> None:
    gen = cpu_session.start(NUM_STEPS, 2)
    with pytest.raises(InputError, match=r"Input 'class_labels' \| values 0\.\.99 outside \[0, 10\]"):
        gen.step(np.zeros((2, 4, 8, 8), np.float32), 999, class_labels=np.array([0, 99]))


def test_reuse_before_any_full_step_is_refused(cpu_session: ForaSession) -> None:
    step = step_inputs(2)[0]
    with pytest.raises(GenerationError, match="batch 2 has no caches yet"):
        cpu_session.run_step("reuse", 2, step)


def test_other_torch_version_is_refused(torch_engine: tuple[Path, SplitModel], tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["backends"]["torch"]["torch"] = "1.13.1+cu117"

    folder = edit_manifest(torch_engine[0], tmp_path / "engine", edit)
    session = ForaSession(folder, backend="torch", trust_programs=True, device="cpu")
    with pytest.raises(BackendError, match=r"saved by torch 1\.13\.1\+cu117, this is torch .* \| re-export"):
        session.activate()


def test_missing_record_is_refused(tiny_engine: Path) -> None:
    with pytest.raises(BackendError, match=r"no backends\.torch record\) \| rebuild with"):
        ForaSession(tiny_engine, backend="torch", trust_programs=True).activate()


def test_other_device_type_is_refused(torch_engine: tuple[Path, SplitModel]) -> None:
    session = ForaSession(torch_engine[0], backend="torch", trust_programs=True, device="cuda")
    with pytest.raises(BackendError, match=r"traced on cpu, this backend runs on cuda \| re-export"):
        session.activate()


def test_unverified_program_file_is_refused(torch_engine: tuple[Path, SplitModel], tmp_path: Path) -> None:
    folder = edit_manifest(torch_engine[0], tmp_path / "engine", lambda data: data["files"].pop("reuse.pt2"))
    with pytest.raises(BackendError, match=re.escape("reuse.pt2 | not listed in manifest.json 'files'")):
        ForaSession(folder, backend="torch", trust_programs=True, device="cpu").activate()


def test_record_checks() -> None:
    record = {
        "programs": {"full": "full.pt2", "reuse": "reuse.pt2"},
        "torch": "2.13.0+cpu",
        "device": "cpu",
        "dtype": "float32",
        "inputs": {"full": [], "reuse": []},
        "outputs": {"full": [], "reuse": []},
    }
    assert check_program_record(record, running_torch="2.13.1+cu130", where="m.json")
    with pytest.raises(BackendError, match=r"saved by torch 2\.13\.0\+cpu, this is torch 2\.11\.0"):
        check_program_record(record, running_torch="2.11.0", where="m.json")
    with pytest.raises(BackendError, match=r"lacks \['dtype'\]"):
        check_program_record(
            {k: v for k, v in record.items() if k != "dtype"}, running_torch="2.13.0", where="m"
        )
    with pytest.raises(BackendError, match="one entry per role"):
        check_program_record({**record, "programs": {"full": "f"}}, running_torch="2.13.0", where="m")


def test_module_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'onnxruntime', 'tensorrt', 'fora_export', 'diffusers', 'onnx'):\n"
        "    sys.modules[name] = None\n"
        "import fora_runtime.backends.torch_backend\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout


# -- CUDA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_engine(tmp_path_factory: pytest.TempPathFactory, tiny_engine: Path) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    folder = tmp_path_factory.mktemp("torch-engines") / "tiny-cuda-fp32"
    shutil.copytree(tiny_engine, folder)
    add_torch_programs(folder, device="cuda")
    return folder


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager(cuda_engine: Path) -> None:
    inputs = step_inputs(2, seed=7)
    with ForaSession(cuda_engine, backend="torch", trust_programs=True, use_cuda_graphs=False) as eager:
        assert not eager.backend.uses_cuda_graphs  # type: ignore[attr-defined]
        expected = run_session(eager, inputs)
    with ForaSession(cuda_engine, backend="torch", trust_programs=True) as graphed:
        assert graphed.backend.uses_cuda_graphs  # type: ignore[attr-defined]
        for batch in (1, 3):  # captured per batch size
            run_session(graphed, step_inputs(batch, seed=batch))
        got = run_session(graphed, inputs)
    assert_close(got, expected, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_cache_addresses_stay_fixed(cuda_engine: Path) -> None:
    with ForaSession(cuda_engine, backend="torch", trust_programs=True) as session:
        views = session.cache_views(2)
        pointers = {name: t.data_ptr() for name, t in views.items()}
        assert pointers and all(t.is_cuda for t in views.values())
        run_session(session, step_inputs(2, seed=8))
        first = {name: t.clone() for name, t in views.items()}
        run_session(session, step_inputs(2, seed=9))
        assert {name: t.data_ptr() for name, t in session.cache_views(2).items()} == pointers
        assert all(not torch.equal(first[name], views[name]) for name in views)  # full wrote in place


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_cpu_fp32(cuda_engine: Path, torch_engine: tuple[Path, SplitModel]) -> None:
    inputs = step_inputs(2, seed=10)
    with ForaSession(torch_engine[0], backend="torch", trust_programs=True, device="cpu") as cpu:
        expected = run_session(cpu, inputs)
    # cuDNN convolutions (the patch embedding) default to TF32, ~1e-3 off fp32; the
    # flag is read when the graphs are captured, so it must be off before start().
    with (
        torch.backends.cudnn.flags(enabled=True, allow_tf32=False),
        ForaSession(cuda_engine, backend="torch", trust_programs=True) as cuda,
    ):
        got = run_session(cuda, inputs)
    assert_close(got, expected, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_matches_cpu_fp32(
    tmp_path: Path, tiny_dit_dir: Path, torch_engine: tuple[Path, SplitModel]
) -> None:
    folder = tmp_path / "tiny-fp16"
    build(
        str(tiny_dit_dir), folder, BuildConfig.from_options(batch="1:2:4", precision="fp16"), progress=False
    )
    add_torch_programs(folder, device="cuda", precision="fp16")
    inputs = step_inputs(2, seed=11)
    with ForaSession(torch_engine[0], backend="torch", trust_programs=True, device="cpu") as cpu:
        expected = run_session(cpu, inputs)
    half_inputs = [{**s, "latents": s["latents"].astype(np.float16)} for s in inputs]
    with ForaSession(folder, backend="torch", trust_programs=True) as cuda:
        got = run_session(cuda, half_inputs)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = float(np.abs(b).max())
        assert float(np.abs(a - b).max()) <= 1e-2 * scale, f"step {step}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_batch_sizes_do_not_share_graph_memory(cuda_engine: Path) -> None:
    # Full at batch 3, full at batch 1, then reuse at batch 3: with one memory pool for
    # every batch size, batch 1's replay could overwrite batch 3's caches.
    big, small = step_inputs(3, seed=11), step_inputs(1, seed=12)
    with ForaSession(cuda_engine, backend="torch", trust_programs=True, use_cuda_graphs=False) as eager:
        eager.run_step("full", 3, big[0])
        expected = to_numpy(eager.run_step("reuse", 3, big[1]))
    with ForaSession(cuda_engine, backend="torch", trust_programs=True) as graphed:
        graphed.run_step("full", 3, big[0])
        graphed.run_step("full", 1, small[0])
        got = to_numpy(graphed.run_step("reuse", 3, big[1]))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
