"""The lean DiT reuse graph: same outputs as the plain reuse step, a fraction
of the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.dit import DiTGatedResidual, DiTGateTable
from fora_export.adapters.gated import LeanReuseStep
from fora_export.adapters.registry import adapter_for
from fora_export.demo import DIT_XL_2_CONFIG as DIT_XL_2
from fora_export.demo import make_demo_dit
from fora_export.split.graphs import split_model
from fora_export.validate.runner import validate
from fora_runtime import load_manifest
from tests.family_engines import family_engine
from tests.tiny_models import OTHER_DIT, TINY_DIT

NAMES = ("latents", "timestep", "class_labels")


def lean_vs_plain(model) -> tuple[torch.Tensor, torch.Tensor, LeanReuseStep]:
    adapter = adapter_for(model)
    split = split_model(adapter, NAMES)
    lean = adapter.lean_reuse_graph(NAMES, split.cache_names).eval()
    inputs = adapter.random_inputs(3, "fp32", torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, caches = split.run_full(inputs)
        later = dict(inputs, timestep=inputs["timestep"] * 0.6)  # caches from an earlier step
        plain = split.run_reuse(later, caches)
        fast = lean(*(later[n] for n in NAMES), *(caches[n] for n in split.cache_names))
    return plain, fast, lean


@pytest.mark.parametrize("config", [TINY_DIT, OTHER_DIT], ids=["tiny", "other"])
def test_lean_reuse_equals_plain_reuse(config: dict) -> None:
    plain, fast, lean = lean_vs_plain(make_demo_dit(config))
    assert lean.table.shared_embedder
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_distinct_embedders_fall_back_to_one_per_block() -> None:
    model = make_demo_dit(TINY_DIT)
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.mul_(1.5)
    plain, fast, lean = lean_vs_plain(model)
    assert not lean.table.shared_embedder and len(lean.table.embedders) == 2
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_no_lean_graph_when_a_kind_is_not_cached() -> None:
    adapter = adapter_for(make_demo_dit(TINY_DIT), AdapterOptions(cache=("ff",)))
    assert adapter.lean_reuse_graph(NAMES, ("cache.0.ff", "cache.1.ff")) is None


def test_dit_xl_reuse_weights_are_under_15_percent_of_full() -> None:
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):  # shapes only: no 2.7 GB of weights on the CI machine
        model = DiTTransformer2DModel(**DIT_XL_2)
    full = sum(p.numel() for p in model.parameters())
    # Converted DiT checkpoints repeat one embedder per block (the lean graph checks
    # the weights; meta tensors have none, so say so).
    table = DiTGateTable(model, shared_embedder=True)
    lean = LeanReuseStep(table, ("timestep", "class_labels"), DiTGatedResidual(model), NAMES)
    reuse = sum(p.numel() for p in lean.parameters())
    # DiT-XL/2 has 675M parameters; diffusers' layout adds 27 copies of the 2.76M embedder.
    assert 749e6 < full < 751e6
    assert reuse / full <= 0.15, f"reuse {reuse / 1e6:.1f}M of full {full / 1e6:.1f}M"
    # The 28 x 2 gate chunks dominate: 1152 x (2 x 28 x 1152) weights.
    assert lean.table.gate_proj.weight.shape == (2 * 28 * 1152, 1152)


def test_build_records_the_reuse_graph_and_plain_still_works(
    tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lean_dir = tiny_engine
    plain_dir = family_engine(tmp_path_factory, "dit", reuse_graph="plain")
    assert load_manifest(lean_dir).export.reuse_graph == "lean"
    assert load_manifest(plain_dir).export.reuse_graph == "plain"
    lean_bytes = load_manifest(lean_dir).files["reuse.onnx"]["bytes"]
    plain_bytes = load_manifest(plain_dir).files["reuse.onnx"]["bytes"]
    assert lean_bytes < plain_bytes
    assert validate(plain_dir, steps=10).passed
