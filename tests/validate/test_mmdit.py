"""SD3 and Flux.1 (MMDiT) end to end: tiny seeded models saved with save_pretrained,
built through the real pipeline, validated on ONNX Runtime and the torch backend; the
lean reuse graphs' exactness, image-stream-only caches, baked position ids, and the
one-line errors for inputs fixed per build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.registry import adapter_for
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_flux, make_demo_sd3
from fora_export.split.graphs import split_model
from fora_export.validate.runner import validate
from fora_runtime import ForaSession, InputError, load_manifest
from tests.conftest import TRUSTED
from tests.family_engines import family_engine
from tests.helpers import save_model
from tests.tiny_models import TINY_FLUX_DEV, TINY_FLUX_SCHNELL, TINY_SD3, TINY_SD35

pytestmark = pytest.mark.slow


TEXT = 6
FP32_GRAPH_ATOL = 1e-4  # fp32 graphs vs PyTorch (validate's own tolerance)


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Flux.1-dev-like (TINY_FLUX_DEV), 8x8 latent, TEXT tokens, batch 1:2:3, ONNX + torch."""
    return family_engine(tmp_path_factory, "flux")


@pytest.fixture(scope="module")
def sd35(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD3.5-Medium-like (TINY_SD35), TEXT tokens, batch 1:2:3, ONNX + torch."""
    return family_engine(tmp_path_factory, "sd3")


def _assert_fp32_parity(report) -> None:
    assert report.passed, report.to_dict()
    assert max(c.worst.max_abs for c in report.graph_cases) <= FP32_GRAPH_ATOL
    assert report.trajectory.scheduler == "flow-euler"
    assert report.trajectory.runtime_vs_fora_rel_l2 <= 1e-4
    assert report.trajectory.gate_table


@pytest.mark.parametrize("engine", ["flux_dev", "sd35"])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_mmdit_engines_validate(engine: str, backend: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(engine)
    report = validate(folder, backend=backend, steps=8, access=TRUSTED)
    _assert_fp32_parity(report)
    # every graph case ran: full, reuse and the gate-table reuse at each batch size
    assert {c.role for c in report.graph_cases} == {"full", "reuse", "reuse_gated"}
    assert {c.batch_size for c in report.graph_cases} == {1, 2, 3}


@pytest.mark.parametrize(("make", "config"), [(make_demo_flux, TINY_FLUX_SCHNELL), (make_demo_sd3, TINY_SD3)])
def test_other_configurations_build_and_validate(make, config, tmp_path: Path) -> None:
    model = save_model(make, tmp_path / "model", config, seed=1)
    out = tmp_path / "engine"
    build(
        str(model),
        out,
        BuildConfig.from_options(batch="1:2", resolution="8x8", text_length=TEXT),
        progress=False,
    )
    _assert_fp32_parity(validate(out, steps=6, batch_sizes=[1, 2]))


@pytest.mark.parametrize(("make", "config"), [(make_demo_flux, TINY_FLUX_DEV), (make_demo_sd3, TINY_SD35)])
def test_lean_reuse_fed_its_own_caches_reproduces_the_full_step(make, config) -> None:
    """The lean reuse graph reads only the image-stream caches and, fed the caches of the
    same inputs, equals the full step exactly (fp32): nothing the text stream computes
    reaches the prediction except through the cached attentions."""
    adapter = adapter_for(make(config, seed=3), AdapterOptions(text_length=TEXT, resolution=(8, 8)))
    names = tuple(s.name for s in adapter.step_input_specs("fp32"))
    split = split_model(adapter, names)
    inputs = adapter.random_inputs(2, "fp32", torch.Generator().manual_seed(0))
    with torch.no_grad():
        prediction, caches = split.run_full(inputs)
        lean_names = adapter.lean_cache_names(split.cache_names)
        lean = adapter.lean_reuse_graph(names, lean_names)
        reused = lean(*(inputs[n] for n in names), *(caches[n] for n in lean_names))
    assert lean_names and all(".context" not in n and "ff_context" not in n for n in lean_names)
    assert len(lean_names) < len(split.cache_names)
    assert torch.equal(reused, prediction)
    split.remove()


def test_flux_engine_keeps_image_caches_and_bakes_position_ids(flux_dev: Path) -> None:
    manifest = load_manifest(flux_dev)
    roles = {spec.name: spec.role for spec in manifest.inputs}
    assert roles == {
        "latents": "latents",
        "timestep": "timestep",
        "guidance": "conditioning",
        "pooled_projections": "conditioning",
        "encoder_hidden_states": "conditioning",
        "img_ids": "build_constant",
        "txt_ids": "build_constant",
    }
    assert manifest.latents_input.shape == ("batch", 16, 16)  # 8x8 latent -> 4x4 = 16 packed tokens
    assert manifest.denoising.latent_layout == "BSC" and manifest.denoising.timestep_scale == 1e-3
    # Only image-stream caches: image tokens only, never the text stream's.
    assert all(c.shape[1] == 16 for c in manifest.caches)
    assert {c.kind for c in manifest.caches} == {"attn", "ff", "proj_out"}
    graph_inputs = {t.name for g in manifest.graphs.values() for t in g.inputs}
    assert not graph_inputs & {"img_ids", "txt_ids"}


def test_flux_inputs_fixed_per_build_get_one_line_errors(flux_dev: Path) -> None:
    manifest = load_manifest(flux_dev)
    rng = np.random.default_rng(0)
    inputs = {
        spec.name: rng.standard_normal(spec.concrete_shape(1)).astype(spec.dtype)
        for spec in manifest.step_inputs
    }
    img_ids = np.array(manifest.input_spec("img_ids").value, dtype=np.float32)
    with ForaSession(flux_dev) as session:
        gen = session.start(4, 1)
        latents, timestep = inputs.pop("latents"), np.float32(0.5)
        inputs.pop("timestep")
        gen.step(latents, timestep, **inputs, img_ids=img_ids)  # the built ids are accepted
        with pytest.raises(InputError, match=r"Input 'img_ids' \| differs from the value the engines"):
            gen.step(latents, timestep, **inputs, img_ids=np.zeros((64, 3), np.float32))
        without_guidance = {k: v for k, v in inputs.items() if k != "guidance"}
        with pytest.raises(InputError, match=r"Input 'guidance' \| missing"):
            gen.step(latents, timestep, **without_guidance)
        other_text = dict(inputs, encoder_hidden_states=np.zeros((1, TEXT + 1, 24), np.float32))
        with pytest.raises(InputError, match=r"Input 'encoder_hidden_states' \| got shape \[1, 7, 24\]"):
            gen.step(latents, timestep, **other_text)
        with pytest.raises(InputError, match=r"Input 'latents' \| got shape \[1, 64, 16\]"):
            gen.step(np.zeros((1, 64, 16), np.float32), timestep, **inputs)


def test_guidance_given_to_a_schnell_build_is_refused(tmp_path: Path) -> None:
    model = save_model(make_demo_flux, tmp_path / "model", TINY_FLUX_SCHNELL, seed=1)
    out = tmp_path / "engine"
    build(
        str(model),
        out,
        BuildConfig.from_options(batch="1", resolution="4x4", text_length=4),
        progress=False,
    )
    manifest = load_manifest(out)
    inputs = {s.name: np.zeros(s.concrete_shape(1), np.float32) for s in manifest.step_inputs}
    with ForaSession(out) as session:
        gen = session.start(2, 1)
        latents = inputs.pop("latents")
        inputs.pop("timestep")
        with pytest.raises(InputError, match=r"Inputs \['guidance'\] \| not inputs of these engines"):
            gen.step(latents, 0.5, **inputs, guidance=np.full((1,), 3.5, np.float32))


def test_sd3_fp16_engine_validates(tmp_path: Path) -> None:
    model = save_model(make_demo_sd3, tmp_path / "model", TINY_SD3, seed=1)
    out = tmp_path / "engine"
    config = BuildConfig.from_options(batch="1:2", text_length=TEXT, precision="fp16")
    build(str(model), out, config, progress=False)
    report = validate(out, steps=6, batch_sizes=[2])
    assert report.passed, report.to_dict()
    assert report.trajectory.runtime_vs_fora_rel_l2 <= 2e-2  # fp16 trajectory tolerance


def test_fp16_overflow_fails_validate_loudly(tmp_path: Path) -> None:
    """Flux's activations overflow fp16 at real scale; here one feed-forward is scaled
    until they do. validate must fail with the non-finite output named, not pass on NaNs."""
    model = make_demo_flux(TINY_FLUX_SCHNELL, seed=1)
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[2].weight.mul_(1e5)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "engine"
    config = BuildConfig.from_options(batch="1", resolution="4x4", text_length=4, precision="fp16")
    build(str(tmp_path / "model"), out, config, progress=False)
    report = validate(out, steps=3, batch_sizes=[1])
    assert not report.passed
    assert any(o.nonfinite for case in report.graph_cases for o in case.comparisons)


def test_sd3_plain_reuse_graph_with_attn_cached_opens_and_validates(tmp_path: Path) -> None:
    """Regression: ``--cache attn,ff --reuse-graph plain`` wrote a folder the runtime refused
    (the exporter dropped the text-stream caches from the reuse graph, the full graph still
    wrote them). Now both graphs carry the image-stream caches only."""
    model = save_model(make_demo_sd3, tmp_path / "model", TINY_SD3, seed=1)
    out = tmp_path / "engine"
    config = BuildConfig.from_options(batch="1:2", text_length=TEXT, cache="attn,ff", reuse_graph="plain")
    build(str(model), out, config, progress=False)
    manifest = load_manifest(out)
    cache_names = [c.name for c in manifest.caches]
    assert cache_names == ["cache.0.attn.image", "cache.0.ff", "cache.1.attn.image", "cache.1.ff"]
    assert [t.name for t in manifest.graphs["reuse"].inputs][-4:] == cache_names
    report = validate(out, steps=6, batch_sizes=[1, 2])
    assert report.passed, report.to_dict()
    assert max(c.worst.max_abs for c in report.graph_cases) <= FP32_GRAPH_ATOL
    assert report.trajectory.runtime_vs_fora_rel_l2 <= 1e-4 and not report.trajectory.gate_table
