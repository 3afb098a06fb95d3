"""PixArt (alpha and Sigma configs): cross-attention caching, caption inputs,
size conditions, --cache subsets, both exporters, both schedulers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.registry import adapter_for
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_pixart
from fora_export.errors import ConfigError
from fora_export.split.graphs import split_model
from fora_export.validate.runner import validate
from fora_runtime import ForaSession, InputError, load_manifest
from tests.conftest import TRUSTED
from tests.family_engines import family_engine, tiny_model_dir
from tests.tiny_models import OTHER_PIXART, TINY_PIXART, save_pixart


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory, "pixart")  # TINY_PIXART


@pytest.fixture(scope="module")
def pixart_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY_PIXART, 6 caption tokens, batch 1:2:4 (shared with the Triton tests)."""
    return family_engine(tmp_path_factory, "pixart")


def assert_fp32_parity(report) -> None:
    for case in report.graph_cases:
        assert all(c.max_abs <= 1e-4 for c in case.comparisons), case.to_dict()
    assert report.trajectory.runtime_vs_fora_rel_l2 <= 1e-4
    assert report.passed


@pytest.mark.parametrize("config", [TINY_PIXART, OTHER_PIXART], ids=["sigma-like", "alpha-1024-like"])
def test_reuse_fed_own_caches_equals_full_exactly(config: dict) -> None:
    adapter = adapter_for(make_demo_pixart(config), AdapterOptions(text_length=7))
    names = tuple(s.name for s in adapter.step_input_specs("fp32"))
    split = split_model(adapter, names)
    inputs = adapter.random_inputs(3, "fp32", torch.Generator().manual_seed(0))
    assert inputs["encoder_attention_mask"][1].sum() < 7  # a partly padded row
    with torch.no_grad():
        full, caches = split.run_full(inputs)
        assert torch.equal(split.run_reuse(inputs, caches), full)
        assert torch.equal(full, adapter.predict(inputs))
    assert len(caches) == 3 * config["num_layers"]


def test_manifest_records_caption_inputs(pixart_engine: Path) -> None:
    manifest = load_manifest(pixart_engine)
    inputs = {t.name: (t.dtype, t.shape) for t in manifest.graphs["full"].inputs}
    assert inputs["encoder_hidden_states"] == ("float32", ("batch", 6, 12))
    assert inputs["encoder_attention_mask"] == ("int64", ("batch", 6))
    assert "resolution" not in inputs
    assert manifest.conditioning.text_length == 6
    assert [c.kind for c in manifest.caches[:3]] == ["attn1", "attn2", "ff"]
    # With attn2 cached the reuse graph never reads the captions: the exporter drops those
    # inputs, and the runtime binds each graph's own inputs (the trajectories below run it).
    reuse_inputs = {t.name for t in manifest.graphs["reuse"].inputs}
    assert "encoder_hidden_states" not in reuse_inputs and "latents" in reuse_inputs


def test_tiny_pixart_fp32_ddim_and_dpm(pixart_engine: Path) -> None:
    assert_fp32_parity(validate(pixart_engine, steps=20, scheduler="ddim"))
    assert_fp32_parity(validate(pixart_engine, steps=20, scheduler="dpm", graphs=False))


def test_other_pixart_with_size_conditions_fp32(tmp_path: Path) -> None:
    # Other depth, heads, caption dim and length, learn_sigma off, 1024px-alpha size conditions.
    folder = save_pixart(tmp_path / "other", OTHER_PIXART, seed=3)
    out = tmp_path / "engine"
    build(str(folder), out, BuildConfig.from_options(batch="1:3:4", text_length=9), progress=False)
    manifest = load_manifest(out)
    names = [t.name for t in manifest.graphs["full"].inputs]
    assert names[:6] == [
        "latents",
        "timestep",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "resolution",
        "aspect_ratio",
    ]
    assert_fp32_parity(validate(out, steps=20, scheduler="dpm"))


@pytest.mark.parametrize("cache", ["attn1,ff", "attn2"])
def test_cache_subset_reuse_graph_computes_the_rest(
    tmp_path_factory: pytest.TempPathFactory, cache: str
) -> None:
    # The conformance suite's PixArt builds (TINY_FAMILIES["pixart"].plain_builds).
    out = family_engine(tmp_path_factory, "pixart", cache=tuple(cache.split(",")), reuse_graph="plain")
    manifest = load_manifest(out)
    assert {c.kind for c in manifest.caches} == set(cache.split(","))
    assert_fp32_parity(validate(out, steps=12))


def test_reuse_graph_does_not_carry_cached_sublayer_weights(pixart_engine: Path) -> None:
    import onnx

    model = onnx.load(str(pixart_engine / "reuse.onnx"))
    names = " ".join(init.name for init in model.graph.initializer)
    for sublayer in ("attn1.to_q", "attn2.to_k", "ff.net"):
        assert sublayer not in names
    full = onnx.load(str(pixart_engine / "full.onnx"))
    assert "attn2.to_k" in " ".join(init.name for init in full.graph.initializer)


def test_dynamo_exporter_handles_the_squeeze_trap(pixart_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dynamo"
    build(str(pixart_dir), out, BuildConfig.from_options(text_length=6, exporter="dynamo"), progress=False)
    report = validate(out, steps=8, batch_sizes=[1, 3])
    assert report.passed, report.to_dict()


def test_fp16_pixart_validates(pixart_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    build(str(pixart_dir), out, BuildConfig.from_options(text_length=6, precision="fp16"), progress=False)
    report = validate(out, steps=20)
    assert report.passed, report.to_dict()


def test_mask_values_are_checked(pixart_engine: Path) -> None:
    with ForaSession(pixart_engine) as session:
        gen = session.start(2, 1)
        inputs = {
            "encoder_hidden_states": np.zeros((1, 6, 12), np.float32),
            "encoder_attention_mask": np.array([[1, 1, 2, 0, 0, 0]]),
        }
        with pytest.raises(InputError, match=r"values 0\.\.2 outside \[0, 1\]"):
            gen.step(np.zeros((1, 4, 8, 8), np.float32), 999, **inputs)


def test_bad_cache_kinds_and_caption_options(pixart_dir: Path, tiny_dit_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="caches some of: attn1,attn2,ff"):
        build(str(pixart_dir), tmp_path / "a", BuildConfig.from_options(cache="attn3"), progress=False)
    with pytest.raises(ConfigError, match="caches some of: attn1,ff"):
        build(str(tiny_dit_dir), tmp_path / "b", BuildConfig.from_options(cache="attn2"), progress=False)
    with pytest.raises(ConfigError, match="takes no captions"):
        build(str(tiny_dit_dir), tmp_path / "c", BuildConfig.from_options(text_length=5), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pixart_on_the_torch_backend(pixart_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "torch"
    config = BuildConfig.from_options(text_length=6, backend="torch", device="cpu")
    build(str(pixart_dir), out, config, progress=False)
    report = validate(out, backend="torch", steps=8, batch_sizes=[1, 3], access=TRUSTED)
    assert_fp32_parity(report)


def test_pixart_at_another_resolution_with_the_default_exporter(pixart_dir: Path, tmp_path: Path) -> None:
    # Non-square and not the config's sample_size: the patch embedding is made static.
    out = tmp_path / "res"
    build(str(pixart_dir), out, BuildConfig.from_options(text_length=6, resolution="8x12"), progress=False)
    assert load_manifest(out).graphs["full"].inputs[0].shape == ("batch", 4, 8, 12)
    assert_fp32_parity(validate(out, steps=8, batch_sizes=[2]))
