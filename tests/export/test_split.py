"""The split contract: reuse fed the caches of the same inputs reproduces the
full step exactly in fp32, state-dict keys are untouched, taps are removable."""

from __future__ import annotations

import pytest
import torch

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.flux import FluxAdapter
from fora_export.adapters.registry import adapter_for
from fora_export.adapters.sd3 import SD3Adapter
from fora_export.demo import DEMO_DIT_CONFIG, make_demo_dit, make_demo_flux, make_demo_sd3
from fora_export.split.graphs import split_model
from tests.tiny_models import OTHER_DIT, TINY_DIT, TINY_FLUX_DEV, TINY_SD35

NAMES = ("latents", "timestep", "class_labels")


@pytest.mark.parametrize("config", [TINY_DIT, OTHER_DIT], ids=["tiny", "other"])
@pytest.mark.parametrize("batch", [1, 3])
def test_reuse_fed_own_caches_equals_full_exactly(config: dict, batch: int) -> None:
    adapter = adapter_for(make_demo_dit(config))
    split = split_model(adapter, NAMES)
    inputs = adapter.random_inputs(batch, "fp32", torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, caches = split.run_full(inputs)
        reuse = split.run_reuse(inputs, caches)
        plain = adapter.predict(inputs)
    assert torch.equal(full, plain)  # the taps do not change the model
    assert torch.equal(reuse, full)
    assert len(caches) == 2 * config["num_layers"]


def test_reuse_really_uses_the_caches() -> None:
    adapter = adapter_for(make_demo_dit(TINY_DIT))
    split = split_model(adapter, NAMES)
    inputs = adapter.random_inputs(2, "fp32", torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, caches = split.run_full(inputs)
        zeroed = {n: torch.zeros_like(c) for n, c in caches.items()}
        assert not torch.allclose(split.run_reuse(inputs, zeroed), full)
        # ... and recomputes gates for the current timestep.
        later = dict(inputs, timestep=inputs["timestep"] * 0.5)
        assert not torch.allclose(split.run_reuse(later, caches), full)


def test_split_keeps_state_dict_keys_and_remove_restores_forward() -> None:
    model = make_demo_dit(TINY_DIT)
    keys = list(model.state_dict())
    split = split_model(adapter_for(model), NAMES)
    assert list(model.state_dict()) == keys
    assert "forward" in vars(model.transformer_blocks[0].attn1)
    split.remove()
    assert "forward" not in vars(model.transformer_blocks[0].attn1)
    assert "forward" not in vars(model.transformer_blocks[1].ff)


def test_tapping_twice_is_refused() -> None:
    adapter = adapter_for(make_demo_dit(TINY_DIT))
    split_model(adapter, NAMES)
    with pytest.raises(RuntimeError, match="tapped twice"):
        split_model(adapter, NAMES)


def test_demo_model_has_no_zero_parameters_and_shared_embedders() -> None:
    model = make_demo_dit(DEMO_DIT_CONFIG)
    for name, param in model.named_parameters():
        assert param.abs().sum() > 0, f"{name} is all zeros: caching errors would be invisible"
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    last = model.transformer_blocks[-1].norm1.emb.state_dict()
    assert all(torch.equal(first[k], last[k]) for k in first)
    assert sum(p.numel() for p in model.parameters()) > 30_000_000


def _subsets(kinds: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [tuple(k for i, k in enumerate(kinds) if mask >> i & 1) for mask in range(1, 2 ** len(kinds))]


MMDIT = [
    pytest.param(make_demo_sd3, TINY_SD35, cache, id=f"sd3.5-{'+'.join(cache)}")
    for cache in _subsets(SD3Adapter.cache_kinds)
] + [
    pytest.param(make_demo_flux, TINY_FLUX_DEV, cache, id=f"flux-{'+'.join(cache)}")
    for cache in _subsets(FluxAdapter.cache_kinds)
]


@pytest.mark.parametrize(("make", "config", "cache"), MMDIT)
def test_plain_reuse_takes_exactly_the_caches_its_prediction_reads(make, config, cache) -> None:
    """Exporters drop graph inputs nothing reads, so the plain reuse graph must take exactly
    the caches its prediction depends on (the full graph writes those, the runtime refuses a
    reuse graph not taking every cache): MMDiT's text-stream caches are dead once the
    attentions that carry text into the image are replayed (SD3: attn; Flux: attn and
    proj_out). Dependence is what autograd reaches from the prediction."""
    options = AdapterOptions(cache=cache, text_length=4, resolution=(8, 8))
    adapter = adapter_for(make(config, seed=1), options)
    names = tuple(s.name for s in adapter.step_input_specs("fp32"))
    split = split_model(adapter, names)
    try:
        inputs = adapter.random_inputs(2, "fp32", torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, caches = split.run_full(inputs)
        module, taken = split.reuse_step(lean=False)
        leaves = {name: caches[name].clone().requires_grad_(True) for name in taken}
        prediction = module(*(inputs[n] for n in names), *(leaves[n] for n in taken))
        grads = torch.autograd.grad(prediction.sum(), list(leaves.values()), allow_unused=True)
        read = {name for name, grad in zip(taken, grads, strict=True) if grad is not None}
        assert read == set(taken), f"taken but not read: {sorted(set(taken) - read)}"
        with torch.no_grad():  # the caches left out change nothing
            full_reuse = split.run_reuse(inputs, caches)
            subset_reuse = module(*(inputs[n] for n in names), *(caches[n] for n in taken))
        assert torch.equal(subset_reuse, full_reuse)
        dropped = set(split.cache_names) - set(taken)
        assert all(".context" in n or "ff_context" in n for n in dropped)
    finally:
        split.remove()
