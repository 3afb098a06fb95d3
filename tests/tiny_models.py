"""The tiny model configs of the test suite, one place for each: seeded models are made
from them with the demo factories and saved with save_pretrained (nothing downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fora_export.demo import make_demo_dit, make_demo_pixart
from tests.helpers import save_model

# learn_sigma on (out = 2 x in), 2 blocks, 2 heads of 4... patch 2 on an 8x8 latent.
TINY_DIT = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}

# Another shape on every axis the adapter reads: depth, heads, patch size, channels,
# classes, and learn_sigma off (out_channels defaults to in_channels).
OTHER_DIT = {
    "num_attention_heads": 3,
    "attention_head_dim": 4,
    "in_channels": 3,
    "out_channels": None,
    "num_layers": 3,
    "sample_size": 16,
    "patch_size": 4,
    "num_embeds_ada_norm": 7,
}


# PixArt-Sigma-like (no size conditions) and PixArt-alpha-1024-like (resolution and
# aspect-ratio conditions; hidden size divisible by 3 as those embeddings need).
TINY_PIXART = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "cross_attention_dim": 16,
    "caption_channels": 12,
    "use_additional_conditions": False,
}
OTHER_PIXART = {
    "num_attention_heads": 3,
    "attention_head_dim": 4,
    "in_channels": 3,
    "out_channels": None,
    "num_layers": 3,
    "sample_size": 12,
    "patch_size": 2,
    "cross_attention_dim": 12,
    "caption_channels": 20,
    "use_additional_conditions": True,
}


# Flux.1-dev-like (guidance embedding) and schnell-like (none), other widths and depths.
TINY_FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "pooled_projection_dim": 12,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
TINY_FLUX_SCHNELL = {**TINY_FLUX_DEV, "num_layers": 1, "num_single_layers": 3, "guidance_embeds": False}
# SD3.5-Medium-like (dual attention, qk RMSNorm) and SD3-Medium-like (neither).
TINY_SD35 = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 12,
    "out_channels": 4,
    "pos_embed_max_size": 16,
    "dual_attention_layers": (0, 1),
    "qk_norm": "rms_norm",
}
TINY_SD3 = {**TINY_SD35, "num_layers": 2, "dual_attention_layers": (), "qk_norm": None}

TINY_WAN = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 12,
    "freq_dim": 16,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 64,
}
# Wan 2.1 I2V: the cross-attention also reads CLIP image embeddings (image_dim).
TINY_WAN_I2V = {**TINY_WAN, "num_layers": 3, "image_dim": 10, "added_kv_proj_dim": 16}


def save_pixart(folder: Path, config: dict, seed: int = 0) -> Path:
    return save_model(make_demo_pixart, folder, config, seed)


def save_dit(folder: Path, config: dict, seed: int = 0) -> Path:
    return save_model(make_demo_dit, folder, config, seed)


@dataclass(frozen=True)
class TinyFamily:
    """One model family's tiny test model, the one table the family-wide tests iterate
    (tests/conformance): adding a family to the registry fails them until it has an entry.

    ``demo`` names the built-in demo (``fora_export.demo``) whose factory makes the model from
    ``config`` (a config in which every sublayer kind the family caches occurs) with seeded
    random weights (``seed``); ``build`` are the build options (the CLI's flags, as
    ``BuildConfig.from_options`` takes them) that size its inputs; ``lean_reuse`` says the
    family has a lean reuse graph with a gate table (built with every kind cached).
    ``backend``: the ``--backend`` of the family's shared default build
    (tests/family_engines.py; ``torch``: the tests of both backends read one folder).
    ``plain_builds``: the ``--cache`` subsets the conformance suite really builds with the
    plain reuse graph: for TorchScript families (whose exporter drops graph inputs nothing
    reads, where an IO bug hides) together leaving every kind out at least once; none for
    dynamo families (they keep every input: the exported IO is the module's, which the
    contract level checks for every subset and their default builds confirm).
    """

    demo: str
    config: dict[str, Any]
    build: dict[str, Any]
    lean_reuse: bool
    plain_builds: tuple[tuple[str, ...], ...]
    seed: int = 0
    backend: str = "auto"


# Qwen-Image-like (2x2-packed 4-channel latents) and another shape on every axis the
# adapter reads: depth, heads, head width and rotary axes, packed channels, text width.
TINY_QWENIMAGE = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "axes_dims_rope": (4, 6, 6),
}
OTHER_QWENIMAGE = {
    **TINY_QWENIMAGE,
    "in_channels": 8,
    "out_channels": 2,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 3,
    "joint_attention_dim": 20,
    "axes_dims_rope": (2, 2, 4),
}


#: Family name -> its tiny test model (the adapters' ``family`` names). The MMDiT and Wan
#: builds are the ones tests/validate/test_mmdit.py and test_wan.py check in depth.
TINY_FAMILIES: dict[str, TinyFamily] = {
    "dit": TinyFamily(
        "demo-dit", TINY_DIT, {"batch": "1:2:4"}, lean_reuse=True, plain_builds=(("attn1",), ("ff",))
    ),
    "pixart": TinyFamily(
        "demo-pixart",
        TINY_PIXART,
        {"batch": "1:2:4", "text_length": 6},
        lean_reuse=False,
        plain_builds=(("attn1", "ff"), ("attn2",)),
    ),
    "sd3": TinyFamily(
        "demo-sd3",
        TINY_SD35,
        {"batch": "1:2:3", "text_length": 6},
        lean_reuse=True,
        plain_builds=(("attn", "ff"), ("attn2", "ff_context")),
        seed=1,
        backend="torch",
    ),
    "flux": TinyFamily(
        "demo-flux",
        TINY_FLUX_DEV,
        {"batch": "1:2:3", "resolution": "8x8", "text_length": 6},
        lean_reuse=True,
        plain_builds=(),
        seed=1,
        backend="torch",
    ),
    "wan": TinyFamily(
        "demo-wan",
        TINY_WAN,
        {"batch": "1:2:3", "resolution": "4x4", "frames": 3, "text_length": 6},
        lean_reuse=True,
        plain_builds=(),
        seed=1,
        backend="torch",
    ),
    "qwenimage": TinyFamily(
        "demo-qwenimage",
        TINY_QWENIMAGE,
        # tests/validate/test_qwenimage.py's engine (24 text tokens: its pipeline's prompts).
        {"batch": "1:2:3", "resolution": "8x8", "text_length": 24},
        lean_reuse=True,
        plain_builds=(),
        seed=1,
        backend="torch",
    ),
}
