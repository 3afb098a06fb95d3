"""PixArt-alpha / PixArt-Sigma (diffusers ``PixArtTransformer2DModel``).

adaLN-single: one timestep embedding ``t6`` for the whole model, per block

    shift1, scale1, gate1, shift2, scale2, gate2 = scale_shift_table + t6
    A = attn1(modulate(norm1(x)))        # cached: "attn1" (self-attention)
    x = x + gate1 * A
    X = attn2(x, captions, mask)         # cached: "attn2" (cross-attention, ungated)
    x = x + X
    M = ff(modulate(norm2(x)))           # cached: "ff"
    x = x + gate2 * M

The FORA paper reports PixArt-alpha results but released no code for it; this
is the natural extension: cache the raw outputs of all three sublayers.
``--cache`` picks a subset; the reuse graph then runs the others for real.

Export notes (design.md section 4):
- The attention processor is set to diffusers' classic ``AttnProcessor``: the
  SDPA processor's ``view(batch, heads, -1, L)`` on the caption mask does not
  export with a dynamic batch under ``torch.export``. Both compute the same
  attention (parity is checked by validate against this model).
- The caption mask is an int64 input (1 = keep, 0 = padding), like tokenizer
  masks; the caption length is fixed per build.
- The 1024px alpha models take ``resolution`` (height, width) and
  ``aspect_ratio`` conditions; they are graph inputs when the model uses them.
"""

from __future__ import annotations

from typing import Any

import torch

from fora_export.adapters.base import (
    DTYPE_NAMES,
    TORCH_DTYPES,
    AdapterOptions,
    ModelAdapter,
    random_prompt_mask,
)
from fora_export.adapters.cache_point import CachePoint
from fora_export.errors import ConfigError
from fora_runtime.manifest import BATCH_AXIS, ForwardSignature, InputSpec


class PixArtAdapter(ModelAdapter):
    family = "pixart"
    model_class = "PixArtTransformer2DModel"
    forward_signature = ForwardSignature(
        (
            "hidden_states",
            "encoder_hidden_states",
            "timestep",
            "added_cond_kwargs",
            "cross_attention_kwargs",
            "attention_mask",
            "encoder_attention_mask",
        ),
        nested=("added_cond_kwargs",),
        unsupported=("cross_attention_kwargs", "attention_mask"),
    )
    cache_kinds = ("attn1", "attn2", "ff")

    def __init__(self, model: Any, options: AdapterOptions | None = None) -> None:
        if model.config.caption_channels is None:
            raise ConfigError(
                f"{self.model_class} | has no caption_channels (no caption projection) | "
                "only text-conditioned PixArt models are supported"
            )
        super().__init__(model, options)
        model.set_default_attn_processor()

    def use_eager_attention(self) -> None:
        """Back to PyTorch SDPA attention, what users run eagerly."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.model.set_attn_processor(AttnProcessor2_0())

    def cache_points(self) -> list[CachePoint]:
        points = []
        for index, block in enumerate(self.model.transformer_blocks):
            points.append(CachePoint(index, "attn1", block.attn1))
            points.append(CachePoint(index, "attn2", block.attn2))
            points.append(CachePoint(index, "ff", block.ff))
        return points

    # -- inputs ---------------------------------------------------------------------
    @property
    def uses_size_conditions(self) -> bool:
        return bool(self.model.use_additional_conditions)

    def check_sizes(self) -> None:
        self.check_patch_multiple(int(self.model.config.patch_size))

    @property
    def caption_channels(self) -> int:
        return int(self.model.config.caption_channels)

    def step_input_specs(self, precision: str) -> list[InputSpec]:
        height, width = self.resolution
        dtype = DTYPE_NAMES[TORCH_DTYPES[precision]]
        specs = [
            InputSpec("latents", dtype, (BATCH_AXIS, self.latent_channels, height, width), role="latents"),
            InputSpec("timestep", "float32", (BATCH_AXIS,), role="timestep"),
            InputSpec("encoder_hidden_states", dtype, (BATCH_AXIS, self.text_length, self.caption_channels)),
            InputSpec("encoder_attention_mask", "int64", (BATCH_AXIS, self.text_length)),
        ]
        if self.uses_size_conditions:
            specs += [
                InputSpec("resolution", "float32", (BATCH_AXIS, 2)),
                InputSpec("aspect_ratio", "float32", (BATCH_AXIS, 1)),
            ]
        return specs

    def family_conditioning(self) -> dict[str, Any]:
        return {
            "kind": "captions",
            "text_length": self.text_length,
            "caption_channels": self.caption_channels,
            "size_conditions": self.uses_size_conditions,
            "input_ranges": {"encoder_attention_mask": [0, 1]},
        }

    def random_input(
        self,
        spec: InputSpec,
        batch_size: int,
        value_range: list[float] | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Caption masks pad a random tail of every other row; the size conditions are the
        build's image size."""
        if spec.name == "encoder_attention_mask":
            return random_prompt_mask(batch_size, self.text_length, generator)
        pixels = 8.0 * self.resolution[0], 8.0 * self.resolution[1]  # latent -> image size of the SD VAE
        if spec.name == "resolution":
            return torch.tensor([pixels] * batch_size, dtype=torch.float32)
        if spec.name == "aspect_ratio":
            return torch.full((batch_size, 1), pixels[0] / pixels[1], dtype=torch.float32)
        return super().random_input(spec, batch_size, value_range, generator)

    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added = None
        if self.uses_size_conditions:
            added = {"resolution": inputs["resolution"], "aspect_ratio": inputs["aspect_ratio"]}
        return self.model(
            inputs["latents"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=inputs["timestep"],
            added_cond_kwargs=added,
            encoder_attention_mask=inputs["encoder_attention_mask"],
            return_dict=False,
        )[0]
