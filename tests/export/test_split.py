"""The split contract: reuse fed the caches of the same inputs reproduces the
full step exactly in fp32, state-dict keys are untouched, taps are removable."""

from __future__ import annotations

import pytest
import torch

from fora_export.adapters.registry import adapter_for
from fora_export.demo import DEMO_DIT_CONFIG, make_demo_dit
from fora_export.split.graphs import split_model
from tests.tiny_models import OTHER_DIT, TINY_DIT

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
