"""Flux.1 (diffusers ``FluxTransformer2DModel``): dev (guidance-distilled) and schnell.

19 dual-stream ``FluxTransformerBlock``s (image and text tokens, joint attention),
then 38 single-stream ``FluxSingleTransformerBlock``s over the concatenated tokens.
One conditioning vector ``temb = time_text_embed(1000 t[, 1000 g], pooled)`` drives
every adaLN projection. Per dual block ``l``:

    shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1.linear(silu(temb))
    A, A_ctx = attn(norm1(x), norm1_context(ctx))    # cached: "attn" (parts image, context)
    x = x + gate_msa * A
    F = ff(modulate(norm2(x)))                        # cached: "ff"
    x = x + gate_mlp * F
    ctx = ...  the same with A_ctx and ff_context     # cached: "ff_context"

Per single block ``k`` (``h = [ctx, x]``, one stream):

    shift, scale, gate = norm.linear(silu(temb))
    P = proj_out([attn(norm(h)), mlp(norm(h))])       # cached: "proj_out" (parts context, image)
    h = h + gate * P

In single blocks the cached value is the output of ``proj_out``, before its gate:
attention and MLP run in parallel there and meet only in that projection, so its
output is the one tensor per block that a reuse step needs (caching attention and
MLP separately would store 5x the width and still need the projection's weights).

Reuse needs only the image stream: the text stream reaches the prediction only
through the attentions (the dual blocks' joint attention, and the single blocks'
attention inside their cached ``proj_out``), which a reuse step caching ``attn`` and
``proj_out`` does not run. So the reuse graphs then read the image parts of the caches
only (the lean one always, the plain one whenever both are cached), and the full graph
outputs only those. ``img_ids`` / ``txt_ids`` depend only on the latent size and text length,
which are fixed per build: they are build constants, baked into the graphs.

Timesteps follow the pipeline: ``FluxPipeline`` passes the flow-matching time
``t / 1000`` (the model multiplies by 1000), and the raw guidance scale (dev).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fora_export.adapters.base import DTYPE_NAMES, TORCH_DTYPES, AdapterOptions, ModelAdapter
from fora_export.adapters.cache_point import CachePoint
from fora_export.adapters.export_patches import decompose_rms_norms, precompute_timestep_frequencies
from fora_export.adapters.gated import GatedReuseParts, TokenGatedResidual, stacked_gate_projection
from fora_export.errors import ConfigError
from fora_runtime.manifest import BATCH_AXIS, ForwardSignature, InputSpec

#: Latent (VAE) size of a 1024px image.
DEFAULT_RESOLUTION = (128, 128)


class FluxAdapter(ModelAdapter):
    family = "flux"
    model_class = "FluxTransformer2DModel"
    forward_signature = ForwardSignature(
        (
            "hidden_states",
            "encoder_hidden_states",
            "pooled_projections",
            "timestep",
            "img_ids",
            "txt_ids",
            "guidance",
            "joint_attention_kwargs",
            "controlnet_block_samples",
            "controlnet_single_block_samples",
        ),
        unsupported=(
            "joint_attention_kwargs",
            "controlnet_block_samples",
            "controlnet_single_block_samples",
            "controlnet_blocks_repeat",
        ),
    )
    cache_kinds = ("attn", "ff", "ff_context", "proj_out")
    latent_layout = "BSC"
    scheduler = "flow_match"
    timestep_scale = 1e-3
    # The TorchScript exporter mis-traces the rotary embedding's reshapes for a dynamic
    # batch (graphs run only at the traced batch size); torch.export traces them right.

    def __init__(self, model: Any, options: AdapterOptions | None = None) -> None:
        super().__init__(model, options)
        decompose_rms_norms(model)
        precompute_timestep_frequencies(model)

    @property
    def guidance(self) -> bool:
        """dev has the guidance embedding; schnell has none."""
        return bool(self.model.config.guidance_embeds)

    @property
    def num_dual(self) -> int:
        return len(self.model.transformer_blocks)

    def cache_points(self) -> list[CachePoint]:
        points = []
        for index, block in enumerate(self.model.transformer_blocks):
            points.append(CachePoint(index, "attn", block.attn, parts=("image", "context")))
            points.append(CachePoint(index, "ff", block.ff))
            points.append(CachePoint(index, "ff_context", block.ff_context))
        text = self.text_length
        for index, block in enumerate(self.model.single_transformer_blocks):
            points.append(
                CachePoint(
                    self.num_dual + index,
                    "proj_out",
                    block.proj_out,
                    parts=("context", "image"),
                    split=lambda out: (out[:, :text], out[:, text:]),
                    join=lambda parts: torch.cat(parts, dim=1),
                )
            )
        return points

    def lean_cache_names(self, cache_names: tuple[str, ...]) -> tuple[str, ...]:
        """Image-stream caches only (see the module docstring)."""
        return tuple(n for n in cache_names if n.endswith((".image", ".ff")))

    def plain_reuse_cache_names(self, cache_names: tuple[str, ...]) -> tuple[str, ...]:
        """With ``attn`` and ``proj_out`` replayed the text stream is dead: image-stream
        caches only."""
        dead_text = {"attn", "proj_out"} <= set(self.cached_kinds)
        return self.lean_cache_names(cache_names) if dead_text else cache_names

    # -- inputs ---------------------------------------------------------------------
    def default_resolution(self) -> tuple[int, int]:
        return DEFAULT_RESOLUTION

    def check_sizes(self) -> None:
        if any(side < 2 or side % 2 for side in self.resolution):
            raise self.resolution_error(
                "Flux packs 2x2 latent patches: each side must be a positive even number (the VAE "
                "latent, image size / 8)"
            )
        # The rotary embedding of the (text, row, column) ids covers each head's channels.
        axes = tuple(int(d) for d in self.model.config.axes_dims_rope)
        head = int(self.model.config.attention_head_dim)
        if sum(axes) != head:
            raise ConfigError(
                f"{self.model_class} | axes_dims_rope {axes} sum to {sum(axes)}, attention_head_dim "
                f"is {head} | the model cannot run: fix its config.json (the axes must sum to {head})"
            )

    def fix_sizes(self) -> None:
        """The position ids of the build's sizes (what ``predict`` passes the model)."""
        self._ids = self.build_constants()

    @property
    def tokens(self) -> int:
        return (self.resolution[0] // 2) * (self.resolution[1] // 2)

    @property
    def output_channels(self) -> int:
        return int(self.model.out_channels)

    def step_input_specs(self, precision: str) -> list[InputSpec]:
        dtype = DTYPE_NAMES[TORCH_DTYPES[precision]]
        config = self.model.config
        specs = [
            InputSpec("latents", dtype, (BATCH_AXIS, self.tokens, self.latent_channels), role="latents"),
            InputSpec("timestep", "float32", (BATCH_AXIS,), role="timestep"),
        ]
        if self.guidance:
            specs.append(InputSpec("guidance", "float32", (BATCH_AXIS,)))
        specs += [
            InputSpec("pooled_projections", dtype, (BATCH_AXIS, int(config.pooled_projection_dim))),
            InputSpec(
                "encoder_hidden_states",
                dtype,
                (BATCH_AXIS, self.text_length, int(config.joint_attention_dim)),
            ),
        ]
        return specs

    def build_constants(self) -> dict[str, torch.Tensor]:
        """Position ids as ``FluxPipeline`` makes them: (0, row, column) per image token of
        the 2x2-packed latent, zeros per text token."""
        height, width = self.resolution[0] // 2, self.resolution[1] // 2
        img_ids = torch.zeros(height, width, 3)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        return {"img_ids": img_ids.reshape(height * width, 3), "txt_ids": torch.zeros(self.text_length, 3)}

    def scheduler_config(self) -> dict[str, Any]:
        return {"num_train_timesteps": 1000, "shift": 1.0}

    def family_conditioning(self) -> dict[str, Any]:
        return {
            "kind": "text",
            "text_length": self.text_length,
            "guidance": self.guidance,
            "input_ranges": {},
        }

    def random_input(
        self,
        spec: InputSpec,
        batch_size: int,
        value_range: list[float] | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Guidance scales as pipelines pass them (1 to 5)."""
        if spec.name == "guidance":
            return 1.0 + 4.0 * torch.rand(batch_size, generator=generator)
        return super().random_input(spec, batch_size, value_range, generator)

    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        device = inputs["latents"].device
        return self.model(
            hidden_states=inputs["latents"],
            timestep=inputs["timestep"],
            guidance=inputs.get("guidance"),
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            img_ids=self._ids["img_ids"].to(device),
            txt_ids=self._ids["txt_ids"].to(device),
            return_dict=False,
        )[0]

    # -- reuse math -----------------------------------------------------------------
    def gated_reuse_parts(self) -> GatedReuseParts:
        conditioning = ("guidance", "pooled_projections") if self.guidance else ("pooled_projections",)
        return GatedReuseParts(
            FluxGateTable(self.model),
            ("timestep", *conditioning),
            TokenGatedResidual(self.model.x_embedder, self.model.norm_out, self.model.proj_out),
        )


class FluxGateTable(nn.Module):
    """``(t, [g,] pooled) -> [rows, 2 L_dual + L_single + 2, D]``: the image-stream gates of
    every block (dual: ``gate_msa``, ``gate_mlp``; single: ``gate``), then the final
    norm's scale and shift, as one product of ``silu(temb)``."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.time_text_embed = model.time_text_embed
        self.guidance = bool(model.config.guidance_embeds)
        pieces = []
        for block in model.transformer_blocks:
            pieces += [(block.norm1.linear, 2, 6), (block.norm1.linear, 5, 6)]
        for block in model.single_transformer_blocks:
            pieces.append((block.norm.linear, 2, 3))
        pieces += [(model.norm_out.linear, 0, 2), (model.norm_out.linear, 1, 2)]  # scale, shift
        self.gate_proj = stacked_gate_projection(pieces)
        self.rows = len(pieces)

    def forward(self, timestep: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        dtype = self.gate_proj.weight.dtype
        pooled = conditioning[-1]
        timestep = timestep.to(dtype) * 1000
        if self.guidance:
            temb = self.time_text_embed(timestep, conditioning[0].to(dtype) * 1000, pooled)
        else:
            temb = self.time_text_embed(timestep, pooled)
        return self.gate_proj(F.silu(temb)).view(timestep.shape[0], self.rows, -1)
