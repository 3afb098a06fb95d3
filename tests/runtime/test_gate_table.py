"""Gate tables: a generation whose timesteps are known computes every step's gates at
``start`` (the ``gates`` graph) and its reuse steps only read caches (``reuse_gated``)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fora_export.adapters.dit import DiTGatedResidual, DiTGateTable
from fora_export.adapters.gated import GatedReuseStep
from fora_export.adapters.registry import adapter_for
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_dit
from fora_export.split.graphs import split_model
from fora_runtime import BackendError, ForaSession, InputError, ManifestError, load_manifest
from fora_runtime.manifest import MANIFEST_NAME, BatchRange
from fora_runtime.schedule import CacheSchedule
from tests.conftest import TRUSTED
from tests.tiny_models import OTHER_DIT, TINY_DIT

NAMES = ("latents", "timestep", "class_labels")
STEPS = 7
BATCH = 2
TIMESTEPS = np.linspace(999, 0, STEPS).astype(np.float32)
LABELS = np.array([3, 7], dtype=np.int64)
BACKENDS = ["onnxruntime", "torch"]


def to_numpy(value: Any) -> np.ndarray:
    return value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def generate(
    session: ForaSession, *, up_front: bool, per_sample: bool = False
) -> tuple[list[np.ndarray], bool]:
    """Predictions of one generation (latents moved a little each step, as in sampling)."""
    latents = np.random.default_rng(0).standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    timesteps = np.repeat(TIMESTEPS[:, None], BATCH, axis=1) if per_sample else TIMESTEPS
    if up_front:
        gen = session.start(STEPS, BATCH, timesteps=timesteps, class_labels=LABELS)
    else:
        gen = session.start(STEPS, BATCH)
    outputs = []
    for t in timesteps:
        out = to_numpy(gen.step(latents) if up_front else gen.step(latents, t, class_labels=LABELS))
        outputs.append(out)
        latents = latents - 0.05 * out[:, :4]
    return outputs, gen.uses_gate_table


def test_dit_gated_modules_equal_the_lean_reuse_step() -> None:
    for config in (TINY_DIT, OTHER_DIT):
        model = make_demo_dit(config)
        adapter = adapter_for(model)
        split = split_model(adapter, NAMES)
        lean = adapter.lean_reuse_graph(NAMES, split.cache_names)
        inputs = adapter.random_inputs(3, "fp32", torch.Generator().manual_seed(1))
        with torch.no_grad():
            _, caches = split.run_full(inputs)
            cache_args = [caches[n] for n in split.cache_names]
            table = DiTGateTable(model)(inputs["timestep"], inputs["class_labels"])
            gated = GatedReuseStep(DiTGatedResidual(model))(inputs["latents"], table, *cache_args)
            expected = lean(*(inputs[n] for n in NAMES), *cache_args)
        # Two gates per block, then the final shift and scale.
        assert table.shape == (3, 2 * config["num_layers"] + 2, model.inner_dim)
        torch.testing.assert_close(gated, expected, atol=0, rtol=0)


def test_build_writes_gate_table_graphs_and_programs(tiny_torch_engine: Path) -> None:
    manifest = load_manifest(tiny_torch_engine)
    assert manifest.gate_rows == BatchRange(1, 256, 1024)
    assert set(manifest.graphs) == {"full", "reuse", "gates", "reuse_gated"}
    assert [t.name for t in manifest.graphs["gates"].inputs] == ["timestep", "class_labels"]
    assert set(manifest.backends["torch"]["programs"]) == {"full", "reuse", "gates", "reuse_gated"}
    assert {"gates.onnx", "reuse_gated.onnx", "gates.pt2", "reuse_gated.pt2"} <= set(manifest.files)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_table_generation_equals_per_step_gates(tiny_torch_engine: Path, backend: str) -> None:
    with ForaSession(tiny_torch_engine, backend=backend, trust_programs=True) as session:
        per_step, used_per_step = generate(session, up_front=False)
        gated, used_table = generate(session, up_front=True)
        per_sample, _ = generate(session, up_front=True, per_sample=True)
    assert not used_per_step and used_table
    # Same fp32 arithmetic in another grouping (one GEMM over all rows): ~1e-6.
    for want, got, got_per_sample in zip(per_step, gated, per_sample, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_per_sample, got, atol=1e-5, rtol=0)


def test_gate_table_can_be_switched_off(tiny_torch_engine: Path) -> None:
    for backend in BACKENDS:
        with ForaSession(
            tiny_torch_engine, backend=backend, trust_programs=True, gate_table=False
        ) as session:
            _, used = generate(session, up_front=True)
            assert not session.backend.gate_table_enabled
            loaded = getattr(session.backend, "_sessions", None) or session.backend._programs  # type: ignore[attr-defined]
            assert "gates" not in loaded and "reuse_gated" not in loaded  # not even loaded
        assert not used


def test_table_holds_the_reuse_steps_only(tiny_torch_engine: Path) -> None:
    with ForaSession(tiny_torch_engine) as session:
        gen = session.start(STEPS, BATCH, timesteps=TIMESTEPS, class_labels=LABELS)
    reuse_steps = [i for i, full in enumerate(gen.plan) if not full]
    assert gen._gate_table is not None and len(reuse_steps) < STEPS
    assert gen._gate_table.table.shape[0] == len(reuse_steps) * BATCH


@pytest.mark.parametrize("backend", BACKENDS)
def test_narrower_integer_labels_are_widened_for_the_table(tiny_torch_engine: Path, backend: str) -> None:
    latents = np.zeros((BATCH, 4, 8, 8), np.float32)
    with ForaSession(tiny_torch_engine, backend=backend, trust_programs=True) as session:
        narrow = session.start(3, BATCH, timesteps=TIMESTEPS[:3], class_labels=LABELS.astype(np.int32))
        got = [to_numpy(narrow.step(latents)) for _ in range(3)]
        wide = session.start(3, BATCH, timesteps=TIMESTEPS[:3], class_labels=LABELS)
        want = [to_numpy(wide.step(latents)) for _ in range(3)]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_gate_table_in_several_calls_equals_one(tiny_torch_engine: Path) -> None:
    with ForaSession(tiny_torch_engine) as session:
        planned = session._inputs.plan(TIMESTEPS, {"class_labels": LABELS}, STEPS, BATCH)
        rows = planned.rows(BATCH, list(range(STEPS)), ("timestep", "class_labels"))
        whole = session.backend.gate_table(rows)
        small = dataclasses.replace(session.manifest, gate_rows=BatchRange(1, 1, 3))
        session.backend.manifest = small  # 14 rows in calls of at most 3
        parts = session.backend.gate_table(rows)
    assert parts.shape == whole.shape == (STEPS * BATCH, 6, 16)
    np.testing.assert_allclose(parts, whole, atol=1e-6, rtol=0)


def test_validate_checks_the_gated_reuse_step(tiny_torch_engine: Path) -> None:
    from fora_export.validate.runner import validate

    for backend in BACKENDS:
        report = validate(tiny_torch_engine, backend=backend, steps=6, batch_sizes=[1, 2], access=TRUSTED)
        roles = {case.role for case in report.graph_cases}
        assert roles == {"full", "reuse", "reuse_gated"}
        assert report.trajectory is not None and report.trajectory.gate_table
        assert report.passed, report.to_dict()


# -- what a caller gets wrong --------------------------------------------------------


def test_steps_may_omit_planned_inputs_but_not_change_them(tiny_torch_engine: Path) -> None:
    latents = np.zeros((BATCH, 4, 8, 8), np.float32)
    with ForaSession(tiny_torch_engine) as session:
        gen = session.start(STEPS, BATCH, timesteps=TIMESTEPS, class_labels=LABELS)
        gen.step(latents, float(TIMESTEPS[0]), class_labels=LABELS)  # the same values are fine
        with pytest.raises(InputError, match=r"timestep \[5\.0\] at step 1, start\(\) planned"):
            gen.step(latents, np.array([5.0]))
        with pytest.raises(InputError, match="'class_labels' differs from the one given to start"):
            gen.step(latents, class_labels=LABELS + 1)
        assert gen.step_index == 1  # refused steps did not advance
        plain = session.start(STEPS, BATCH)
        with pytest.raises(InputError, match=re.escape("Input 'timestep' | missing")):
            plain.step(latents)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_labels": LABELS}, "without timesteps"),
        ({"timesteps": TIMESTEPS}, r"pass all of \['class_labels'\]"),
        (
            {"timesteps": TIMESTEPS[:3], "class_labels": LABELS},
            r"got shape \[3\] \| expected \[7\] or \[7, 2\]",
        ),
        (
            {"timesteps": TIMESTEPS, "class_labels": LABELS[:1]},
            r"'class_labels' \| got shape \[1\], expected \[2\]",
        ),
        ({"timesteps": TIMESTEPS, "class_labels": np.array([3, 99])}, r"values 3\.\.99 outside \[0, 10\]"),
        ({"timesteps": ["a"] * STEPS, "class_labels": LABELS}, "expected numbers"),
        ({"timesteps": TIMESTEPS, "class_labels": LABELS.astype(np.float32)}, "got float32, expected int64"),
    ],
)
def test_start_rejects_bad_planned_inputs(
    tiny_torch_engine: Path, kwargs: dict[str, Any], message: str
) -> None:
    with ForaSession(tiny_torch_engine) as session, pytest.raises(InputError, match=message):
        session.start(STEPS, BATCH, **kwargs)


def test_builds_without_gate_table_take_timesteps_up_front(tmp_path: Path, tiny_dit_dir: Path) -> None:
    out = tmp_path / "plain"
    build(
        str(tiny_dit_dir), out, BuildConfig.from_options(batch="1:2:4", reuse_graph="plain"), progress=False
    )
    manifest = load_manifest(out)
    assert not manifest.has_gate_table and "gates" not in manifest.graphs
    with ForaSession(out) as session:
        per_step, _ = generate(session, up_front=False)
        planned, used = generate(session, up_front=True)
    assert not used
    for want, got in zip(per_step, planned, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "broken", ["no gate_rows", "no gates graph", "table mismatch", "gated output", "latents to gates"]
)
def test_manifest_refuses_half_a_gate_table(tiny_torch_engine: Path, tmp_path: Path, broken: str) -> None:
    folder = tmp_path / "engine"
    shutil.copytree(tiny_torch_engine, folder)
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    if broken == "no gate_rows":
        data["gate_rows"] = None
    elif broken == "no gates graph":
        del data["graphs"]["gates"]
    elif broken == "table mismatch":
        data["graphs"]["reuse_gated"]["inputs"][1]["shape"][1] = 5
    elif broken == "gated output":
        data["graphs"]["reuse_gated"]["outputs"][0]["name"] = "noise"
    else:
        data["graphs"]["gates"]["inputs"].append(data["graphs"]["full"]["inputs"][0])
    path.write_text(json.dumps(data))
    match = (
        r"gate-table graphs|gate_rows|reuse_gated input 'gates'|only the full graph's prediction|'latents'"
    )
    with pytest.raises(ManifestError, match=match):
        load_manifest(folder, verify="none")


def test_explicit_schedule_reuse_reads_its_own_row(tiny_torch_engine: Path) -> None:
    """Row ``index * batch``: a reuse step at step 3 must use step 3's gates, not step 1's."""
    latents = np.random.default_rng(2).standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    with ForaSession(tiny_torch_engine) as session:
        gen = session.start(
            4, BATCH, schedule=CacheSchedule.explicit([0]), timesteps=TIMESTEPS[:4], class_labels=LABELS
        )
        gated = [to_numpy(gen.step(latents)) for _ in range(4)]
        gen = session.start(4, BATCH, schedule=CacheSchedule.explicit([0]))
        per_step = [to_numpy(gen.step(latents, t, class_labels=LABELS)) for t in TIMESTEPS[:4]]
    for want, got in zip(per_step, gated, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(gated[3] - gated[1]).max() > 1e-3  # the rows differ, so the check can fail


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphed_gate_table_equals_per_step_gates(tiny_dit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuda"
    config = BuildConfig.from_options(batch="1:2:4", backend="torch", device="cuda")
    build(str(tiny_dit_dir), out, config, progress=False)
    with ForaSession(out, backend="torch", trust_programs=True) as session:
        assert session.backend.uses_cuda_graphs  # type: ignore[attr-defined]
        per_step, _ = generate(session, up_front=False)
        gated, used = generate(session, up_front=True)
    assert used
    for want, got in zip(per_step, gated, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_torch_record_with_half_the_gate_programs_is_refused(tiny_torch_engine: Path) -> None:
    from fora_runtime.backends.torch_backend import check_program_record

    record = load_manifest(tiny_torch_engine).backends["torch"]
    inputs = {k: v for k, v in record["inputs"].items() if k in ("full", "reuse")}
    with pytest.raises(BackendError, match="the same in 'programs', 'inputs' and 'outputs'"):
        check_program_record({**record, "inputs": inputs}, running_torch=torch.__version__, where="m.json")
