"""DiT (diffusers ``DiTTransformer2DModel``, adaLN-Zero, class-conditional).

Per block ``BasicTransformerBlock(norm_type="ada_norm_zero")``:

    shift1, scale1, gate1, shift2, scale2, gate2 = norm1.linear(silu(emb(t, y)))
    A = attn1(modulate(norm1(x)))        # cached: "attn1"
    x = x + gate1 * A
    M = ff(modulate(norm3(x)))           # cached: "ff"
    x = x + gate2 * M

Both cached outputs are taken before their gate, as FORA requires.
"""

from __future__ import annotations

from typing import Any

import torch

from fora_export.adapters.base import DTYPE_NAMES, TORCH_DTYPES, AdapterOptions, ModelAdapter
from fora_export.errors import ConfigError
from fora_export.split.taps import CachePoint
from fora_runtime.manifest import BATCH_AXIS, TensorSpec


class DiTAdapter(ModelAdapter):
    family = "dit"
    model_class = "DiTTransformer2DModel"
    cache_kinds = ("attn1", "ff")

    def __init__(self, model: Any, options: AdapterOptions | None = None) -> None:
        super().__init__(model, options)
        if self.options.caption_length is not None:
            raise ConfigError("--caption-length | DiT is class-conditional and takes no captions")

    def cache_points(self) -> list[CachePoint]:
        points = []
        for index, block in enumerate(self.model.transformer_blocks):
            points.append(CachePoint(index, "attn1", block.attn1))
            points.append(CachePoint(index, "ff", block.ff))
        return points

    # -- inputs ---------------------------------------------------------------------
    def default_resolution(self) -> tuple[int, int]:
        size = int(self.model.config.sample_size)
        return (size, size)

    def check_resolution(self, resolution: tuple[int, int]) -> None:
        height, width = resolution
        patch = int(self.model.config.patch_size)
        if height != width:
            # diffusers' DiT reshapes its output assuming a square token grid.
            raise ConfigError(f"Resolution | got {height}x{width} | DiT needs a square latent")
        if height < patch or height % patch:
            raise ConfigError(
                f"Resolution | latent size {height} | must be a positive multiple of patch_size {patch}"
            )

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def output_channels(self) -> int:
        return int(self.model.out_channels)

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_embeds_ada_norm)

    def step_input_specs(self, resolution: tuple[int, int], precision: str) -> list[TensorSpec]:
        height, width = resolution
        return [
            TensorSpec(
                "latents",
                DTYPE_NAMES[TORCH_DTYPES[precision]],
                (BATCH_AXIS, self.latent_channels, height, width),
            ),
            TensorSpec("timestep", "float32", (BATCH_AXIS,)),
            TensorSpec("class_labels", "int64", (BATCH_AXIS,)),
        ]

    def conditioning(self) -> dict[str, Any]:
        table = self.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        # The table has num_classes + 1 rows when a null class (for guidance) was trained.
        null_class = self.num_classes if table.num_embeddings > self.num_classes else None
        high = table.num_embeddings - 1
        return {
            "kind": "class_labels",
            "num_classes": self.num_classes,
            "null_class": null_class,
            "input_ranges": {"class_labels": [0, high]},
            "num_train_timesteps": 1000,
            "latent_channels": self.latent_channels,
            "output_channels": self.output_channels,
        }

    def random_inputs(
        self, batch_size: int, resolution: tuple[int, int], precision: str, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        height, width = resolution
        dtype = TORCH_DTYPES[precision]
        latents = torch.randn(batch_size, self.latent_channels, height, width, generator=generator)
        timestep = torch.randint(0, 1000, (batch_size,), generator=generator).to(torch.float32)
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return {"latents": latents.to(dtype), "timestep": timestep, "class_labels": labels}

    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            inputs["latents"],
            timestep=inputs["timestep"],
            class_labels=inputs["class_labels"],
            return_dict=False,
        )[0]
