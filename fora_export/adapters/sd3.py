"""SD3 / SD3.5 (diffusers ``SD3Transformer2DModel``, MMDiT with joint attention).

``JointTransformerBlock``s over image and text tokens, one conditioning vector
``temb = time_text_embed(t, pooled)`` for every adaLN projection. Per block:

    shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift2, scale2, gate_msa2] = (
        norm1.linear(silu(temb)))
    A, A_ctx = attn(norm1(x), norm1_context(ctx))   # cached: "attn" (parts image, context)
    x = x + gate_msa * A
    A2 = attn2(modulate2(norm1(x_in)))              # cached: "attn2" (SD3.5 dual attention)
    x = x + gate_msa2 * A2
    F = ff(modulate(norm2(x)))                       # cached: "ff"
    x = x + gate_mlp * F
    ctx = ... A_ctx and ff_context                   # cached: "ff_context"

The last block is ``context_pre_only`` (no text-stream update, no ``ff_context``).
SD3.5's qk RMSNorm is diffusers' own ``RMSNorm`` (basic ops, exports at opset 17).

As for Flux, reuse needs only the image stream: the text stream reaches the image
only through the joint attentions, so once ``attn`` is cached a reuse step leaves it
dead. Both reuse graphs (lean, and plain whenever ``attn`` is cached) then read the
image parts of the caches (``attn`` image part, ``attn2``, ``ff``), and the full graph
outputs only those. Timesteps are what ``StableDiffusion3Pipeline`` passes:
the flow-matching scheduler's timesteps (``sigma * 1000``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fora_export.adapters.base import DTYPE_NAMES, TORCH_DTYPES, ModelAdapter
from fora_export.adapters.cache_point import CachePoint
from fora_export.adapters.gated import GatedReuseParts, WeightedCacheSum, stacked_gate_projection
from fora_runtime.manifest import BATCH_AXIS, ForwardSignature, InputSpec

#: SD3's FlowMatchEulerDiscreteScheduler (its scheduler_config.json), which the manifest records.
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


class SD3Adapter(ModelAdapter):
    family = "sd3"
    model_class = "SD3Transformer2DModel"
    forward_signature = ForwardSignature(
        (
            "hidden_states",
            "encoder_hidden_states",
            "pooled_projections",
            "timestep",
            "block_controlnet_hidden_states",
            "joint_attention_kwargs",
        ),
        unsupported=("block_controlnet_hidden_states", "joint_attention_kwargs", "skip_layers"),
        extra_text_tokens=77,
    )
    cache_kinds = ("attn", "attn2", "ff", "ff_context")
    scheduler = "flow_match"

    def cache_points(self) -> list[CachePoint]:
        points = []
        for index, block in enumerate(self.model.transformer_blocks):
            points.append(CachePoint(index, "attn", block.attn, parts=("image", "context")))
            if block.use_dual_attention:
                points.append(CachePoint(index, "attn2", block.attn2))
            points.append(CachePoint(index, "ff", block.ff))
            if block.ff_context is not None:
                points.append(CachePoint(index, "ff_context", block.ff_context))
        return points

    def lean_cache_names(self, cache_names: tuple[str, ...]) -> tuple[str, ...]:
        """Image-stream caches only, in the blocks' order of addition."""
        return tuple(n for n in cache_names if n.endswith((".image", ".attn2", ".ff")))

    def plain_reuse_cache_names(self, cache_names: tuple[str, ...]) -> tuple[str, ...]:
        """With ``attn`` replayed the text stream is dead: image-stream caches only."""
        return self.lean_cache_names(cache_names) if "attn" in self.cached_kinds else cache_names

    # -- inputs ---------------------------------------------------------------------
    def check_sizes(self) -> None:
        limit = self.model.config.pos_embed_max_size  # the position table's patches per side
        self.check_patch_multiple(
            int(self.model.config.patch_size), int(limit) if limit else None, "pos_embed_max_size"
        )

    def step_input_specs(self, precision: str) -> list[InputSpec]:
        height, width = self.resolution
        dtype = DTYPE_NAMES[TORCH_DTYPES[precision]]
        config = self.model.config
        return [
            InputSpec("latents", dtype, (BATCH_AXIS, self.latent_channels, height, width), role="latents"),
            InputSpec("timestep", "float32", (BATCH_AXIS,), role="timestep"),
            InputSpec(
                "encoder_hidden_states",
                dtype,
                (BATCH_AXIS, self.text_length, int(config.joint_attention_dim)),
            ),
            InputSpec("pooled_projections", dtype, (BATCH_AXIS, int(config.pooled_projection_dim))),
        ]

    def scheduler_config(self) -> dict[str, Any]:
        return dict(SCHEDULER_CONFIG)

    def family_conditioning(self) -> dict[str, Any]:
        return {"kind": "text", "text_length": self.text_length, "input_ranges": {}}

    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            hidden_states=inputs["latents"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            timestep=inputs["timestep"],
            return_dict=False,
        )[0]

    # -- reuse math -----------------------------------------------------------------
    def gated_reuse_parts(self) -> GatedReuseParts:
        return GatedReuseParts(
            SD3GateTable(self.model), ("timestep", "pooled_projections"), SD3GatedResidual(self.model)
        )


class SD3GateTable(nn.Module):
    """``(t, pooled) -> [rows, G + 2, D]``: every block's image-stream gates in the order
    the block adds them (``gate_msa``, [``gate_msa2``,] ``gate_mlp``), then the final
    norm's scale and shift, as one product of ``silu(temb)``."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.time_text_embed = model.time_text_embed
        pieces = []
        for block in model.transformer_blocks:
            chunks = 9 if block.use_dual_attention else 6
            pieces.append((block.norm1.linear, 2, chunks))
            if block.use_dual_attention:
                pieces.append((block.norm1.linear, 8, chunks))
            pieces.append((block.norm1.linear, 5, chunks))
        pieces += [(model.norm_out.linear, 0, 2), (model.norm_out.linear, 1, 2)]  # scale, shift
        self.gate_proj = stacked_gate_projection(pieces)
        self.rows = len(pieces)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        temb = self.time_text_embed(timestep, pooled)
        return self.gate_proj(F.silu(temb)).view(timestep.shape[0], self.rows, -1)


class SD3GatedResidual(nn.Module):
    """``pos_embed(latents) + sum_i g_i * cache_i``, the final modulated norm, ``proj_out``
    and unpatchify."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.pos_embed = model.pos_embed
        self.norm = model.norm_out.norm
        self.proj_out = model.proj_out
        self.patch_size = int(model.config.patch_size)
        self.out_channels = int(model.out_channels)
        self.cache_sum = WeightedCacheSum()

    def forward(
        self, latents: torch.Tensor, gates: torch.Tensor, caches: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        height, width = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        hidden = self.cache_sum(self.pos_embed(latents).contiguous(), gates, caches)
        scale, shift = gates[:, len(caches)], gates[:, len(caches) + 1]
        hidden = self.proj_out(self.norm(hidden) * (1 + scale)[:, None, :] + shift[:, None, :])
        patch = self.patch_size
        hidden = hidden.reshape(-1, height, width, patch, patch, self.out_channels)
        hidden = hidden.permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq, as diffusers' einsum
        return hidden.reshape(-1, self.out_channels, height * patch, width * patch)
