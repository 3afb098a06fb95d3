"""The TensorRT runtime backend (fora_runtime.backends.trt).

The tests marked ``tensorrt`` export a tiny random-weight DiT, build both
engines, and run ``ForaSession(folder, backend="tensorrt")`` against ONNX Runtime
over a 20-step loop; they check that caches stay at fixed addresses shared by
both engines and that CUDA-graph replay equals eager execution. They skip unless
the real ``tensorrt`` package and a CUDA GPU are present. The others run anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fora_runtime import BackendError, ForaSession, InputError, ManifestError, load_manifest
from fora_runtime.backends import StepBuffers, backend_names, create_backend
from fora_runtime.backends.trt import TensorRTBackend, _tensorrt_version
from fora_runtime.backends.trt_engine import engine_io
from fora_runtime.backends.trt_flavor import DATACENTER, check_build_record, tensorrt_version_tuple
from fora_runtime.caches import ALIGNMENT, ArenaLayout
from fora_runtime.manifest import MANIFEST_NAME, Manifest, TensorSpec
from tests.export.test_trt_build import assert_matches, tensorrt_engine_folder
from tests.tiny_models import TINY_DIT

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


def test_backend_name_creates_this_backend(tiny_engine: Path) -> None:
    """The registry's "module:Class" entry resolves to this class, not just a listed name."""
    backend = create_backend("tensorrt", load_manifest(tiny_engine), tiny_engine, gate_table=False)
    assert type(backend) is TensorRTBackend and backend.name == "tensorrt" and "tensorrt" in backend_names()
    assert not backend.is_active and not backend.use_gate_table


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
    # Gate-table engines come both or not at all.
    gated = {**record["engines"], "gates": "gates.plan", "reuse_gated": "reuse_gated.plan"}
    assert check_build_record(
        {**record, "engines": gated}, running_version="10.13.0.35", running_capability="9.0", where=where
    )
    with pytest.raises(BackendError, match=r"optionally \['gates', 'reuse_gated'\]"):
        check_build_record(
            {**record, "engines": {**record["engines"], "gates": "gates.plan"}},
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


def test_tensorrt_version_parsing_and_minimum() -> None:
    assert tensorrt_version_tuple("10.13.0.35") == (10, 13)
    assert tensorrt_version_tuple("11.0.0.1") == (11, 0)
    assert tensorrt_version_tuple("10.1.0") == (10, 1)
    assert tensorrt_version_tuple("10") == (10, 0)
    assert tensorrt_version_tuple("dev") is None
    assert DATACENTER.too_old("10.1.0.27") is None
    assert DATACENTER.too_old("11.0.0.1") is None
    problem = DATACENTER.too_old("10.0.1.6")
    assert problem is not None and "10.1 or newer" in problem
    assert DATACENTER.too_old("8.6.1.6") is not None
    assert DATACENTER.too_old("dev") is not None


def test_old_tensorrt_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.0.1.6"  # type: ignore[attr-defined]
    fake.Runtime = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(
        BackendError, match=r"^Backend 'tensorrt' \| TensorRT 10\.0\.1\.6 is too old.* \| upgrade: .*10\.1"
    ):
        _tensorrt_version()
    fake.__version__ = "10.1.0.27"  # type: ignore[attr-defined]
    assert _tensorrt_version() == "10.1.0.27"


def cpu_backend(manifest: Manifest, folder: Path) -> tuple[TensorRTBackend, StepBuffers]:
    """A TensorRT backend that never activates, with CPU staging buffers: enough for stage_input."""
    import torch

    backend = TensorRTBackend(manifest, folder)
    backend._torch = torch
    inputs = {
        "latents": torch.zeros((2, 4, 8, 8)),
        "timestep": torch.zeros(2),
        "class_labels": torch.zeros(2, dtype=torch.int64),
    }
    buffers = StepBuffers(2, inputs, {}, None, ArenaLayout.plan((), 2))
    return backend, buffers


def test_host_tensors_are_range_checked_only_when_ranged(tiny_engine: Path) -> None:
    torch = pytest.importorskip("torch")
    manifest = load_manifest(tiny_engine)
    assert manifest.conditioning.input_ranges["class_labels"] == (0, 10)
    backend, buffers = cpu_backend(manifest, tiny_engine)
    # No range for latents: bf16 and requires_grad must not reach .numpy().
    latents = torch.full((2, 4, 8, 8), 0.5, dtype=torch.bfloat16, requires_grad=True)
    backend.stage_input(buffers, "latents", latents)
    assert torch.equal(buffers.inputs["latents"], torch.full((2, 4, 8, 8), 0.5))
    assert not buffers.inputs["latents"].requires_grad
    # Ranged labels are checked exactly, whatever their integer width.
    backend.stage_input(buffers, "class_labels", torch.tensor([3, 10], dtype=torch.int32))
    assert buffers.inputs["class_labels"].tolist() == [3, 10]
    with pytest.raises(InputError, match=r"Input 'class_labels' \| values 3\.\.11 outside \[0, 10\]"):
        backend.stage_input(buffers, "class_labels", torch.tensor([3, 11]))
    with pytest.raises(InputError, match="outside"):
        backend.stage_input(buffers, "class_labels", torch.tensor([2**40, 1]))


# A stand-in for the few tensorrt names and ICudaEngine methods engine_io uses.
FAKE_TRT = types.SimpleNamespace(
    TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
    TensorLocation=types.SimpleNamespace(DEVICE="DEVICE"),
)
TRT_NAMES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64"}


class FakeEngine:
    def __init__(self, tensors: list[tuple[str, bool, str, tuple[int, ...]]]) -> None:
        self.tensors = tensors
        self.by_name = {name: (is_input, dtype, shape) for name, is_input, dtype, shape in tensors}
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, index: int) -> str:
        return self.tensors[index][0]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if self.by_name[name][0] else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return types.SimpleNamespace(name=TRT_NAMES[self.by_name[name][1]])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.by_name[name][2]

    def get_tensor_location(self, name: str) -> str:
        return "DEVICE"


def engine_like(manifest: Manifest, role: str) -> FakeEngine:
    """An engine whose IO is exactly ``role``'s graph in the manifest, with a dynamic batch axis."""
    graph = manifest.graphs[role]
    tensors = []
    for specs, is_input in ((graph.inputs, True), (graph.outputs, False)):
        for spec in specs:
            shape = tuple(-1 if d == "batch" else int(d) for d in spec.shape)
            tensors.append((spec.name, is_input, spec.dtype, shape))
    return FakeEngine(tensors)


def with_reuse_outputs(manifest: Manifest, outputs: tuple[TensorSpec, ...]) -> Manifest:
    reuse = dataclasses.replace(manifest.graphs["reuse"], outputs=outputs)
    return dataclasses.replace(manifest, graphs={**manifest.graphs, "reuse": reuse})


def test_engine_io_must_fit_the_buffers_it_is_bound_to(tiny_engine: Path) -> None:
    manifest = load_manifest(tiny_engine)
    path = tiny_engine / "reuse.plan"
    for role in ("full", "reuse"):
        bindings = engine_io(FAKE_TRT, manifest, role, engine_like(manifest, role), path)
        kinds = {b.name: b.buffer for b in bindings}
        assert kinds["prediction"] == "prediction" and kinds["latents"] == "inputs"
        assert kinds["cache.0.ff"] == "caches"

    # Gate-table engines: the gates engine writes the table, reuse_gated reads its row from
    # a staging buffer.
    gates = engine_io(FAKE_TRT, manifest, "gates", engine_like(manifest, "gates"), path)
    assert {b.name: b.buffer for b in gates} == {
        "timestep": "inputs",
        "class_labels": "inputs",
        "gates": "table",
    }
    gated = engine_io(FAKE_TRT, manifest, "reuse_gated", engine_like(manifest, "reuse_gated"), path)
    kinds = {b.name: b.buffer for b in gated}
    assert kinds["gates"] == "inputs" and kinds["latents"] == "inputs" and kinds["cache.1.attn1"] == "caches"

    # An engine writing an fp16 prediction where the manifest (and so the one prediction
    # buffer every engine writes) says fp32.
    engine = engine_like(manifest, "reuse")
    engine.by_name["prediction"] = (False, "float16", engine.by_name["prediction"][2])
    with pytest.raises(BackendError, match=r"output 'prediction' is float16, the manifest says float32 \| "):
        engine_io(FAKE_TRT, manifest, "reuse", engine, path)

    # An output the manifest's graph does not have has no buffer.
    tensors = engine_like(manifest, "reuse").tensors
    engine = FakeEngine([("noise" if t[0] == "prediction" else t[0], *t[1:]) for t in tensors])
    with pytest.raises(BackendError, match=r"output 'noise' is not a reuse output in the manifest"):
        engine_io(FAKE_TRT, manifest, "reuse", engine, path)

    # A cache slot of another shape.
    engine = engine_like(manifest, "reuse")
    engine.by_name["cache.0.ff"] = (True, "float32", (-1, 16, 15))
    with pytest.raises(
        BackendError,
        match=r"input 'cache.0.ff' has shape \['\?', 16, 15\], the manifest says \['batch', 16, 16\]",
    ):
        engine_io(FAKE_TRT, manifest, "reuse", engine, path)

    # A manifest whose reuse graph declares a prediction the full graph's buffer cannot hold
    # never reaches a backend: the graph contract refuses it.
    (prediction,) = manifest.graphs["reuse"].outputs
    fp16 = with_reuse_outputs(manifest, (dataclasses.replace(prediction, dtype="float16"),))
    with pytest.raises(ManifestError, match="reuse graph must output only the full graph's prediction"):
        fp16.check()


class FakeContext:
    """The IExecutionContext calls TrtEngine makes, recorded; output shapes follow the batch."""

    def __init__(self, engine: FakeEngine, refuse_shape: str | None = None) -> None:
        self.engine = engine
        self.refuse_shape = refuse_shape
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory = (address, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = shape
        return name != self.refuse_shape

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addresses[name]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        batch = self.shapes["latents"][0]
        return tuple(batch if d == -1 else d for d in self.engine.by_name[name][2])


class FakeTensor:
    def __init__(self, shape: tuple[int, ...], address: int) -> None:
        self.shape = shape
        self.address = address

    def data_ptr(self) -> int:
        return self.address

    def numel(self) -> int:
        return int(np.prod(self.shape))


def fake_trt_engine(manifest: Manifest, role: str, **context_options: Any) -> tuple[Any, list[FakeContext]]:
    from fora_runtime.backends.trt_engine import TrtEngine
    from fora_runtime.backends.trt_flavor import DATACENTER

    engine = engine_like(manifest, role)
    contexts: list[FakeContext] = []

    def create_execution_context(strategy: object) -> FakeContext:
        assert strategy == "USER_MANAGED"  # the engine never allocates its own activation memory
        contexts.append(FakeContext(engine, **context_options))
        return contexts[-1]

    engine.create_execution_context = create_execution_context  # type: ignore[attr-defined]
    trt = types.SimpleNamespace(
        **vars(FAKE_TRT),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"),
    )
    io = engine_io(trt, manifest, role, engine, Path(f"{role}.plan"))
    return TrtEngine(role, Path(f"{role}.plan"), engine, io, trt=trt, flavor=DATACENTER, torch=None), contexts


def test_an_engine_binds_every_tensor_of_its_plan_to_the_buffers(tiny_engine: Path) -> None:
    """TrtEngine.bind on stand-ins: the shared activation buffer, every IO tensor's address
    and every input's shape set from the buffers; inferred output shapes checked."""
    manifest = load_manifest(tiny_engine)
    engine, contexts = fake_trt_engine(manifest, "reuse")
    specs = {s.name: s for s in (*manifest.graphs["reuse"].inputs, *manifest.graphs["reuse"].outputs)}
    tensors = {
        name: FakeTensor(spec.concrete_shape(3), 4096 * (index + 1))
        for index, (name, spec) in enumerate(specs.items())
    }
    activation = FakeTensor((1 << 20,), 1 << 30)
    bound = engine.bind(tensors, activation, batch_size=3)
    (context,) = contexts
    assert bound.context is context and bound.graph is None
    assert context.memory == (1 << 30, 1 << 20)
    assert engine.tensor_addresses(bound) == {name: t.address for name, t in tensors.items()}
    assert context.shapes == {b.name: tensors[b.name].shape for b in engine.io if b.is_input}
    # An output buffer of another shape than TensorRT infers from the inputs is refused.
    tensors["prediction"] = FakeTensor((3, 8, 8, 7), 1 << 12)
    with pytest.raises(BackendError, match=r"reuse output 'prediction' has shape \[3, 8, 8, 8\] at batch 3"):
        engine.bind(tensors, activation, batch_size=3)
    refusing, _ = fake_trt_engine(manifest, "reuse", refuse_shape="latents")
    with pytest.raises(
        BackendError, match=r"reuse engine refuses shape \[3, 4, 8, 8\] for 'latents' \(batch 3\)"
    ):
        refusing.bind(tensors, activation, batch_size=3)


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
        contexts = session.backend.buffers(BATCH_SIZE).bound["contexts"]
        assert {role for role, bound in contexts.items() if bound.graph is not None} == set(contexts)
        assert {"full", "reuse"} <= set(contexts)
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


@pytest.mark.tensorrt
def test_gate_table_generation_matches_onnxruntime(trt_folder: tuple[Path, str]) -> None:
    """Timesteps given up front: TensorRT's gates + reuse_gated engines against ONNX Runtime's
    graphs, both through their gate tables (and per-step gates on ONNX Runtime)."""
    import torch

    folder, precision = trt_folder
    latents, labels, timesteps = loop_inputs(precision)
    with (
        ForaSession(folder, backend="onnxruntime") as ort_session,
        ForaSession(folder, backend="tensorrt", use_cuda_graphs=True) as trt,
    ):
        assert load_manifest(folder).backends["tensorrt"]["engines"]["gates"] == "gates.plan"
        ort_gen = ort_session.start(NUM_STEPS, BATCH_SIZE, timesteps=timesteps, class_labels=labels)
        trt_gen = trt.start(NUM_STEPS, BATCH_SIZE, timesteps=timesteps, class_labels=labels)
        assert ort_gen.uses_gate_table and trt_gen.uses_gate_table
        for step in range(NUM_STEPS):
            want = ort_gen.step(latents)
            got = trt_gen.step(torch.from_numpy(latents).cuda())
            kind = "full" if ort_gen.plan[step] else "reuse (gate table)"
            assert_matches(got.float().cpu().numpy(), want, precision, f"step {step} ({kind})")
            latents = (latents - 0.05 * want[:, :4]).astype(latents.dtype)


def test_gates_engine_profile_must_cover_the_manifest_rows(tiny_engine: Path) -> None:
    manifest = load_manifest(tiny_engine)
    backend = TensorRTBackend(manifest, tiny_engine)
    profile = {"min": 1, "opt": 2, "max": 4}
    backend._check_profile({"profile": profile, "gate_profile": {"min": 1, "opt": 256, "max": 1024}})
    with pytest.raises(
        BackendError, match="the gates engine takes up to 8 rows, the manifest's gate_rows up to 1024"
    ):
        backend._check_profile({"profile": profile, "gate_profile": {"min": 1, "opt": 4, "max": 8}})
