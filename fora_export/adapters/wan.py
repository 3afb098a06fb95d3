"""Wan 2.1 / 2.2 video (diffusers ``WanTransformer3DModel``): T2V, I2V and the two
experts of Wan 2.2 A14B.

Latents are ``[B, C, F, H, W]`` (latent frames and size fixed per build; the rotary
tables are static). One timestep embedding drives every block through
``scale_shift_table + timestep_proj`` (PixArt's adaLN-single shape). Per block:

    shift, scale, gate, c_shift, c_scale, c_gate = block.scale_shift_table + timestep_proj
    A = attn1(modulate(norm1(x)))          # cached: "attn1" (self-attention, rotary)
    x = x + gate * A
    X = attn2(norm2(x), text[, image])     # cached: "attn2" (cross-attention, ungated)
    x = x + X
    M = ffn(modulate(norm3(x)))            # cached: "ffn"
    x = x + c_gate * M

On Wan 2.1 I2V ``attn2`` also attends to the CLIP image embeddings
(``encoder_hidden_states_image``, through ``add_k_proj``/``add_v_proj``); its
output is still one tensor per block. ``--cache`` picks a subset; the plain reuse
graph then runs the others for real. With all three cached the lean reuse graph is
the patch embedding, the time embedding and gates, the residual sums and the output
head: no text or image embedder and no attention weights.

Wan 2.2 A14B ships two experts (``transformer`` for high noise, ``transformer_2``
for low noise, switched at ``boundary_ratio``): build one engine folder per expert
(``--subfolder transformer_2`` for the second); each records the timesteps it serves
and refuses others, and ``fora_runtime.experts`` runs a generation across both,
restarting FORA at the switch. Wan 2.2 TI2V-5B (``expand_timesteps``: a timestep per
token) is refused when it is loaded: its gates differ per token, so a reuse step's
gates are no longer one row per sample, which the gate table and the lean reuse graph
rely on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fora_export.adapters.base import DTYPE_NAMES, TORCH_DTYPES, AdapterOptions, ModelAdapter
from fora_export.adapters.cache_point import CachePoint
from fora_export.adapters.export_patches import decompose_rms_norms, precompute_timestep_frequencies
from fora_export.adapters.gated import GatedReuseParts, WeightedCacheSum
from fora_export.errors import ConfigError
from fora_runtime.manifest import BATCH_AXIS, ForwardSignature, InputSpec

#: The I2V attention splits encoder_hidden_states at 512 UMT5 tokens (WanPipeline's
#: max_sequence_length; the image tokens are the rest): the only text length I2V builds take.
I2V_TEXT_LENGTH = 512
#: 81 frames at 480x832: 21 latent frames (the registry's default) of 60x104 (Wan's VAE: 4x in
#: time, 8x in space).
DEFAULT_RESOLUTION = (60, 104)
#: CLIP ViT-H image tokens of Wan 2.1 I2V (256 patches + class token).
IMAGE_TOKENS = 257


class WanAdapter(ModelAdapter):
    family = "wan"
    model_class = "WanTransformer3DModel"
    forward_signature = ForwardSignature(
        ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"),
        unsupported=("attention_kwargs",),
    )
    cache_kinds = ("attn1", "attn2", "ffn")
    latent_layout = "BCFHW"
    scheduler = "flow_match"
    # The rotary embedding's unflatten/unbind pair traces to a batch-specialised graph with
    # the TorchScript exporter; torch.export keeps the batch dynamic.

    def __init__(self, model: Any, options: AdapterOptions | None = None) -> None:
        super().__init__(model, options)
        decompose_rms_norms(model)
        precompute_timestep_frequencies(model)

    @classmethod
    def pipeline_build_defaults(cls, index: dict[str, Any], subfolder: str, *, where: str) -> dict[str, Any]:
        """Wan 2.2 A14B's two experts: the timesteps ``subfolder``'s expert serves; Wan 2.2
        TI2V (a timestep per token) refused."""
        if index.get("expand_timesteps"):
            raise ConfigError(
                f"MODEL '{where}' | {index.get('_class_name')} with expand_timesteps (Wan 2.2 TI2V: a "
                "timestep per token) is not supported: its gates differ per token, and the gate table and "
                "lean reuse graph take one row per sample | use a Wan 2.1 / 2.2 T2V or I2V model"
            )
        ratio = index.get("boundary_ratio")
        experts = [
            name
            for name in ("transformer", "transformer_2")
            if isinstance(index.get(name), list) and index[name] and index[name][0]
        ]
        if ratio is None or len(experts) < 2:
            return {}
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise ConfigError(
                f"{Path(where) / 'model_index.json'} | boundary_ratio is {ratio!r}, expected a number in "
                "[0, 1] | re-save the pipeline"
            )
        # WanPipeline: steps with t >= boundary_ratio * 1000 run `transformer`, the others `transformer_2`.
        boundary = float(ratio) * 1000.0
        return {"expert_range": (boundary, 1000.0) if subfolder == "transformer" else (0.0, boundary)}

    @property
    def image_conditioned(self) -> bool:
        """Wan 2.1 I2V: the cross-attention also reads CLIP image embeddings."""
        return self.model.config.image_dim is not None

    @property
    def output_channels(self) -> int:
        config = self.model.config
        return int(config.out_channels or config.in_channels)

    def cache_points(self) -> list[CachePoint]:
        points = []
        for index, block in enumerate(self.model.blocks):
            points.append(CachePoint(index, "attn1", block.attn1))
            points.append(CachePoint(index, "attn2", block.attn2))
            points.append(CachePoint(index, "ffn", block.ffn))
        return points

    # -- inputs ---------------------------------------------------------------------
    def default_resolution(self) -> tuple[int, int]:
        return DEFAULT_RESOLUTION

    @property
    def patch(self) -> tuple[int, int, int]:
        p_t, p_h, p_w = (int(p) for p in self.model.config.patch_size)
        return p_t, p_h, p_w

    def check_sizes(self) -> None:
        if self.image_conditioned and self.text_length != I2V_TEXT_LENGTH:
            # WanAttnProcessor splits image from text tokens as "all but the last 512".
            raise ConfigError(
                f"--text-length | got {self.text_length} | Wan I2V models take exactly "
                f"{I2V_TEXT_LENGTH} text tokens (the image tokens are the rest)"
            )
        patch = self.patch
        height, width = self.resolution
        sizes = (self.frames, height, width)
        if any(size < p or size % p for size, p in zip(sizes, patch, strict=True)):
            raise ConfigError(
                f"Resolution | latent {self.frames} frames of {height}x{width} | Wan's patch is "
                f"{patch[0]}x{patch[1]}x{patch[2]} (frames x height x width): each must be a positive "
                "multiple of it"
            )
        # The rotary tables hold rope_max_seq_len positions per axis (frames, rows, columns).
        limit = int(self.model.rope.max_seq_len)
        if any(size // p > limit for size, p in zip(sizes, patch, strict=True)):
            raise ConfigError(
                f"Resolution | latent {self.frames} frames of {height}x{width} | the model's rotary "
                f"tables (rope_max_seq_len {limit}) cover at most {limit} patches per axis: at most "
                f"{limit * patch[0]} frames and {limit * patch[1]}x{limit * patch[2]} latents | pass "
                "--frames and --resolution within those"
            )

    @property
    def tokens(self) -> int:
        p_t, p_h, p_w = self.patch
        return (self.frames // p_t) * (self.resolution[0] // p_h) * (self.resolution[1] // p_w)

    def step_input_specs(self, precision: str) -> list[InputSpec]:
        height, width = self.resolution
        dtype = DTYPE_NAMES[TORCH_DTYPES[precision]]
        config = self.model.config
        specs = [
            InputSpec(
                "latents",
                dtype,
                (BATCH_AXIS, self.latent_channels, self.frames, height, width),
                role="latents",
            ),
            InputSpec("timestep", "float32", (BATCH_AXIS,), role="timestep"),
            InputSpec("encoder_hidden_states", dtype, (BATCH_AXIS, self.text_length, int(config.text_dim))),
        ]
        if self.image_conditioned:
            specs.append(
                InputSpec(
                    "encoder_hidden_states_image", dtype, (BATCH_AXIS, IMAGE_TOKENS, int(config.image_dim))
                )
            )
        return specs

    def scheduler_config(self) -> dict[str, Any]:
        # WanPipeline's UniPC / flow-matching schedulers use flow_shift 5.0 at 720p, 3.0 at 480p.
        return {"num_train_timesteps": 1000, "shift": 5.0}

    def timestep_range(self) -> tuple[float, float]:
        expert = self.options.expert_range
        return tuple(expert) if expert is not None else (0.0, 1000.0)  # type: ignore[return-value]

    def family_conditioning(self) -> dict[str, Any]:
        return {
            "kind": "text+image" if self.image_conditioned else "text",
            "text_length": self.text_length,
            "frames": self.frames,
            "input_ranges": {},
        }

    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            hidden_states=inputs["latents"],
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_hidden_states_image=inputs.get("encoder_hidden_states_image"),
            return_dict=False,
        )[0]

    # -- reuse math -----------------------------------------------------------------
    def gated_reuse_parts(self) -> GatedReuseParts:
        return GatedReuseParts(WanGateTable(self.model), ("timestep",), WanGatedResidual(self.model))


class WanGateTable(nn.Module):
    """``t -> [rows, 3L + 2, D]``: per block the self-attention gate, a row of ones (the
    cross-attention is added ungated) and the feed-forward gate, then the output head's
    shift and scale. They depend on the timestep alone: one table per generation."""

    block_gates: torch.Tensor
    out_table: torch.Tensor

    def __init__(self, model: Any) -> None:
        super().__init__()
        embedder = model.condition_embedder
        self.timesteps_proj = embedder.timesteps_proj
        self.time_embedder = embedder.time_embedder
        self.time_proj = embedder.time_proj
        # Per block: scale_shift_table chunks 2 (gate) and 5 (c_gate), as [L, 2, D].
        tables = torch.stack([block.scale_shift_table.detach()[0, [2, 5]] for block in model.blocks])
        self.register_buffer("block_gates", tables)
        self.register_buffer("out_table", model.scale_shift_table.detach()[0])  # shift, scale
        self.num_blocks = len(model.blocks)

    @property
    def rows(self) -> int:
        return 3 * self.num_blocks + 2

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        projected = self.timesteps_proj(timestep)
        dtype = next(iter(self.time_embedder.parameters())).dtype
        temb = self.time_embedder(projected.to(dtype))
        timestep_proj = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))
        # Computed in fp32 as the blocks do (scale_shift_table + temb.float()).
        gates = self.block_gates[None].float() + timestep_proj[:, None, [2, 5]].float()  # [B, L, 2, D]
        ones = torch.ones_like(gates[:, :, :1])
        per_block = torch.cat([gates[:, :, :1], ones, gates[:, :, 1:]], dim=2)  # gate, 1, c_gate
        final = self.out_table[None].float() + temb.float()[:, None]  # shift, scale
        table = torch.cat([per_block.flatten(1, 2), final], dim=1)
        return table.to(dtype)


class WanGatedResidual(nn.Module):
    """``patch_embedding(latents) + sum_i g_i * cache_i``, the output head, unpatchify."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.patch_embedding = model.patch_embedding
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        self.patch = tuple(int(p) for p in model.config.patch_size)
        self.cache_sum = WeightedCacheSum()

    def forward(
        self, latents: torch.Tensor, gates: torch.Tensor, caches: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        p_t, p_h, p_w = self.patch
        frames, height, width = latents.shape[2] // p_t, latents.shape[3] // p_h, latents.shape[4] // p_w
        hidden = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        hidden = self.cache_sum(hidden, gates, caches)
        shift, scale = gates[:, len(caches) : len(caches) + 1], gates[:, len(caches) + 1 : len(caches) + 2]
        hidden = (self.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = self.proj_out(hidden)
        hidden = hidden.reshape(latents.shape[0], frames, height, width, p_t, p_h, p_w, -1)
        hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)
