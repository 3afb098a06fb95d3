"""What FORA costs and saves at the real sizes of SD3.5-Large and Flux.1-dev (1024px),
measured on the meta device (shapes only, no weights): the lean reuse graph's share
of the weights and the cache memory per sample. The README quotes these numbers."""

from __future__ import annotations

import pytest
import torch

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.registry import adapter_for
from fora_export.errors import ConfigError

# The released configs (transformer/config.json of the two checkpoints).
FLUX_1_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
SD35_LARGE = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
# Wan 2.1 T2V 14B (transformer/config.json of Wan2.1-T2V-14B-Diffusers).
WAN_21_14B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
}
# Qwen-Image 20B (transformer/config.json of Qwen/Qwen-Image).
QWEN_IMAGE = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
LATENT_1024PX = (128, 128)  # VAE latent of a 1024x1024 image
IMAGE_TOKENS = 4096  # Flux, Qwen-Image: 2x2-packed 128x128 latent; SD3: patch 2 on 128x128


def meta_model(class_name: str, config: dict):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, class_name)(**config)


def lean_reuse_report(class_name: str, config: dict, text_length: int) -> tuple[float, int, int]:
    """(lean reuse weights / model weights, image-stream cache tensors, bytes per sample in bf16)."""
    options = AdapterOptions(text_length=text_length, resolution=LATENT_1024PX)
    adapter = adapter_for(meta_model(class_name, config), options)
    names = tuple(s.name for s in adapter.step_input_specs("bf16"))
    all_caches = tuple(n for p in adapter.cached_points() for n in p.cache_names)
    caches = adapter.lean_cache_names(all_caches)
    lean = adapter.lean_reuse_graph(names, caches)
    fraction = sum(p.numel() for p in lean.parameters()) / sum(p.numel() for p in adapter.model.parameters())
    width = int(config["attention_head_dim"]) * int(config["num_attention_heads"])
    return fraction, len(caches), len(caches) * IMAGE_TOKENS * width * 2


@pytest.mark.parametrize(
    ("class_name", "config", "text_length", "caches", "gib", "max_fraction"),
    [
        # 19 dual blocks x (attn, ff) + 38 single blocks = 76 caches of 4096 x 3072
        ("FluxTransformer2DModel", FLUX_1_DEV, 512, 76, 1.78, 0.07),
        # 38 joint blocks x (attn, ff) = 76 caches of 4096 x 2432
        ("SD3Transformer2DModel", SD35_LARGE, 333, 76, 1.41, 0.065),
        # 60 dual blocks x (attn, ff) = 120 caches of 4096 x 3072 (x2 with true CFG's two passes)
        ("QwenImageTransformer2DModel", QWEN_IMAGE, 512, 120, 2.81, 0.06),
    ],
    ids=["flux.1-dev", "sd3.5-large", "qwen-image"],
)
def test_real_size_reuse_weights_and_cache_memory(
    class_name: str, config: dict, text_length: int, caches: int, gib: float, max_fraction: float
) -> None:
    fraction, count, nbytes = lean_reuse_report(class_name, config, text_length)
    print(f"{class_name}: lean reuse {fraction:.1%} of the weights, {count} caches, {nbytes / 2**30:.2f} GiB")
    assert count == caches
    assert nbytes / 2**30 == pytest.approx(gib, abs=0.01)
    # The lean reuse graph: embedders, gate projections (a third of adaLN), final layer.
    assert fraction <= max_fraction


def test_wan_14b_reuse_weights_and_video_cache_memory() -> None:
    """Wan 2.1 14B at 480x832, 81 frames: 21 x 30 x 52 = 32,760 tokens; three caches per
    block over 40 blocks of width 5120 are ~37.5 GiB per sample in bf16 (x2 with CFG's
    two passes), which is why --max-cache-gib exists. The lean reuse graph carries no
    attention, text or image weights."""
    model = meta_model("WanTransformer3DModel", WAN_21_14B)
    adapter = adapter_for(model, AdapterOptions(frames=21, resolution=(60, 104)))
    names = tuple(s.name for s in adapter.step_input_specs("bf16"))
    caches = tuple(n for p in adapter.cached_points() for n in p.cache_names)
    lean = adapter.lean_reuse_graph(names, caches)
    fraction = sum(p.numel() for p in lean.parameters()) / sum(p.numel() for p in model.parameters())
    tokens = adapter.tokens
    nbytes = len(caches) * tokens * 5120 * 2
    print(f"Wan 2.1 14B: lean reuse {fraction:.2%} of the weights, {tokens} tokens, {nbytes / 2**30:.1f} GiB")
    assert tokens == 32760 and len(caches) == 120
    assert nbytes / 2**30 == pytest.approx(37.5, abs=0.1)
    assert fraction <= 0.015  # patch embedding, time embedding and its 6D projection (1.1%), head


def test_wan_rotary_tables_too_short_for_the_build_are_one_line_errors() -> None:
    """Wan's rotary tables hold rope_max_seq_len positions per axis: a build whose token grid
    exceeds them is refused when the adapter is made, with the sizes that fit."""
    model = meta_model("WanTransformer3DModel", {**WAN_21_14B, "rope_max_seq_len": 32})
    message = (
        r"Resolution \| latent 21 frames of 60x104 \| the model's rotary tables \(rope_max_seq_len 32\) "
        r"cover at most 32 patches per axis: at most 32 frames and 64x64 latents \| pass --frames and "
        r"--resolution within those"
    )
    with pytest.raises(ConfigError, match=message):
        adapter_for(model, AdapterOptions(frames=21, resolution=(60, 104)))
    adapter_for(model, AdapterOptions(frames=21, resolution=(64, 64)))  # within the tables


def test_flux_rotary_axes_that_miss_the_head_width_are_one_line_errors() -> None:
    config = {**FLUX_1_DEV, "axes_dims_rope": (16, 56, 48)}
    with pytest.raises(
        ConfigError, match=r"axes_dims_rope \(16, 56, 48\) sum to 120, attention_head_dim is 128"
    ):
        adapter_for(meta_model("FluxTransformer2DModel", config), AdapterOptions(resolution=LATENT_1024PX))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (AdapterOptions(text_length=0), r"--text-length \| got 0 \| expected an integer >= 1"),
        (AdapterOptions(frames=True), r"--frames \| got True \| expected an integer >= 1"),
        (AdapterOptions(frames=3), r"--frames \| FluxTransformer2DModel takes no video frames"),
        (AdapterOptions(resolution=(127, 128)), r"Resolution \| latent size 127x128 \| Flux packs 2x2"),
    ],
)
def test_size_options_are_checked_once_when_the_adapter_is_made(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        adapter_for(meta_model("FluxTransformer2DModel", FLUX_1_DEV), options)
