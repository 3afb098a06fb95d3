"""Built-in demo models: small diffusers transformers with seeded random weights, and
the folders of ``demo-digits`` / ``demo-digits-flow``, the ones with trained weights
(shipped in the package, see below). The demos are declared (named, described, given
their build defaults) in :mod:`fora_export.adapters.registry`.

The random ones are created from a config, nothing downloaded. Every parameter is drawn from a
seeded generator, including the layers DiT initialises to zero for training
(adaLN modulation, final projection): with zero gates every cache would be
multiplied by zero and caching errors would be invisible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

# Re-exported for tools/train_digits.py, which trains demo-digits-flow at that length.
from fora_export.adapters.registry import DIGITS_FLOW_TEXT_LENGTH as DIGITS_FLOW_TEXT_LENGTH

DEMO_SEED = 0

DEMO_DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma, as in the released DiT checkpoints
    "num_layers": 12,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
}


def randomize_weights(model: nn.Module, seed: int) -> nn.Module:
    """Draw every parameter from N(0, 1/fan_in) (weights) or N(0, 0.02) (biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim >= 2 and "embedding" not in name:
                std = param.shape[1:].numel() ** -0.5
            elif param.ndim >= 2:
                std = 1.0
            else:
                std = 0.02
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def make_demo_dit(config: dict[str, Any] | None = None, seed: int = DEMO_SEED) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    model: Any = DiTTransformer2DModel(**(config or DEMO_DIT_CONFIG))
    randomize_weights(model, seed)
    # Converted DiT checkpoints carry one identical timestep/label embedder per
    # block; mirror that so the demo behaves like a real checkpoint.
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    return model.eval()


DEMO_PIXART_CONFIG: dict[str, Any] = {
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 8,
    "sample_size": 32,
    "patch_size": 2,
    "cross_attention_dim": 384,
    "caption_channels": 256,
    "use_additional_conditions": False,  # as PixArt-Sigma and the 512px alpha
}


def make_demo_pixart(config: dict[str, Any] | None = None, seed: int = DEMO_SEED) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    model: Any = PixArtTransformer2DModel(**(config or DEMO_PIXART_CONFIG))
    randomize_weights(model, seed)
    return model.eval()


#: DiT-XL/2 at 256px (28 blocks, hidden 1152, 32x32 latents): the paper's model
#: shape with random weights, for GPU benchmarks (3 GB in fp32: not for CI).
DIT_XL_2_CONFIG: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
}


def make_demo_dit_xl() -> nn.Module:
    return make_demo_dit(DIT_XL_2_CONFIG)


#: The demos with trained weights: transformers trained on scikit-learn's 8x8 digits by
#: ``tools/train_digits.py``, shipped in the package as save_pretrained folders.
#: ``demo-digits``: a DiT (DDPM); ``demo-digits-flow``: an SD3 MMDiT (rectified flow),
#: whose folder also holds its class-conditioning tables (fora_export/quality/conditioning.py).
DEMO_DIGITS_DIR = Path(__file__).parent / "demo_weights" / "digits"
DEMO_DIGITS_FLOW_DIR = Path(__file__).parent / "demo_weights" / "digits-flow"


#: A small Flux.1-dev (about demo-dit's size and cost): 4 dual-stream and 8 single-stream
#: blocks of hidden 384, guidance embedding, 16-channel packed latents (a 4-channel VAE
#: latent in 2x2 patches); built at a 32x32 latent (256 image tokens) and 64 text tokens.
DEMO_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 4,
    "num_single_layers": 8,
    "attention_head_dim": 64,
    "num_attention_heads": 6,
    "joint_attention_dim": 256,
    "pooled_projection_dim": 128,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 24, 24),
}


def make_demo_flux(config: dict[str, Any] | None = None, seed: int = DEMO_SEED) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    model: Any = FluxTransformer2DModel(**(config or DEMO_FLUX_CONFIG))
    randomize_weights(model, seed)
    return model.eval()


#: A small SD3.5-Medium shape: 6 joint blocks of hidden 384 (the last context_pre_only),
#: dual attention in the first two, qk RMSNorm, 16-channel latents; 32x32 latent (256
#: tokens) and 64 text tokens.
DEMO_SD3_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 6,
    "attention_head_dim": 64,
    "num_attention_heads": 6,
    "joint_attention_dim": 256,
    "caption_projection_dim": 384,
    "pooled_projection_dim": 128,
    "out_channels": 16,
    "pos_embed_max_size": 48,
    "dual_attention_layers": (0, 1),
    "qk_norm": "rms_norm",
}


def make_demo_sd3(config: dict[str, Any] | None = None, seed: int = DEMO_SEED) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    model: Any = SD3Transformer2DModel(**(config or DEMO_SD3_CONFIG))
    randomize_weights(model, seed)
    return model.eval()


#: A small Wan 2.1 T2V shape: 4 blocks of hidden 384 (6 heads of 64), 16-channel video
#: latents in 1x2x2 patches; built at 5 latent frames of 16x16 (320 tokens), 64 text tokens.
DEMO_WAN_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 256,
    "freq_dim": 256,
    "ffn_dim": 1536,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
}


def make_demo_wan(config: dict[str, Any] | None = None, seed: int = DEMO_SEED) -> nn.Module:
    from diffusers import WanTransformer3DModel

    model: Any = WanTransformer3DModel(**(config or DEMO_WAN_CONFIG))
    randomize_weights(model, seed)
    return model.eval()


#: A small Qwen-Image: 4 dual-stream blocks of hidden 384 (6 heads of 64), qk RMSNorm,
#: 16-channel packed latents (a 4-channel VAE latent in 2x2 patches); built at a 32x32
#: latent (256 image tokens) and 64 text tokens.
DEMO_QWENIMAGE_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 6,
    "joint_attention_dim": 256,
    "axes_dims_rope": (16, 24, 24),
}


def make_demo_qwenimage(config: dict[str, Any] | None = None, seed: int = DEMO_SEED) -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    model: Any = QwenImageTransformer2DModel(**(config or DEMO_QWENIMAGE_CONFIG))
    randomize_weights(model, seed)
    return model.eval()
