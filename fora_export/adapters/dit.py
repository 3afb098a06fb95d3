"""DiT (diffusers ``DiTTransformer2DModel``, adaLN-Zero, class-conditional).

Per block ``BasicTransformerBlock(norm_type="ada_norm_zero")``:

    shift1, scale1, gate1, shift2, scale2, gate2 = norm1.linear(silu(emb(t, y)))
    A = attn1(modulate(norm1(x)))        # cached: "attn1"
    x = x + gate1 * A
    M = ff(modulate(norm3(x)))           # cached: "ff"
    x = x + gate2 * M

Both cached outputs are taken before their gate, as FORA requires. The lean
reuse graph computes only the two gates per block (:class:`DiTGateTable`) and the
residual sum and final layer (:class:`DiTGatedResidual`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fora_export.adapters.base import DTYPE_NAMES, TORCH_DTYPES, ModelAdapter
from fora_export.adapters.cache_point import CachePoint
from fora_export.adapters.gated import GatedReuseParts, WeightedCacheSum
from fora_runtime.manifest import BATCH_AXIS, ForwardSignature, InputSpec


class DiTAdapter(ModelAdapter):
    family = "dit"
    model_class = "DiTTransformer2DModel"
    forward_signature = ForwardSignature(
        ("hidden_states", "timestep", "class_labels", "cross_attention_kwargs"),
        unsupported=("cross_attention_kwargs",),
    )
    cache_kinds = ("attn1", "ff")

    def cache_points(self) -> list[CachePoint]:
        points = []
        for index, block in enumerate(self.model.transformer_blocks):
            points.append(CachePoint(index, "attn1", block.attn1))
            points.append(CachePoint(index, "ff", block.ff))
        return points

    # -- inputs ---------------------------------------------------------------------
    def check_sizes(self) -> None:
        height, width = self.resolution
        if height != width:
            # diffusers' DiT reshapes its output assuming a square token grid.
            raise self.resolution_error("DiT needs a square latent")
        self.check_patch_multiple(int(self.model.config.patch_size))

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_embeds_ada_norm)

    def step_input_specs(self, precision: str) -> list[InputSpec]:
        height, width = self.resolution
        return [
            InputSpec(
                "latents",
                DTYPE_NAMES[TORCH_DTYPES[precision]],
                (BATCH_AXIS, self.latent_channels, height, width),
                role="latents",
            ),
            InputSpec("timestep", "float32", (BATCH_AXIS,), role="timestep"),
            InputSpec("class_labels", "int64", (BATCH_AXIS,)),
        ]

    def family_conditioning(self) -> dict[str, Any]:
        table = self.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        # The table has num_classes + 1 rows when a null class (for guidance) was trained.
        null_class = self.num_classes if table.num_embeddings > self.num_classes else None
        high = table.num_embeddings - 1
        return {
            "kind": "class_labels",
            "num_classes": self.num_classes,
            "null_class": null_class,
            "input_ranges": {"class_labels": [0, high]},
        }

    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            inputs["latents"],
            timestep=inputs["timestep"],
            class_labels=inputs["class_labels"],
            return_dict=False,
        )[0]

    # -- reuse math -----------------------------------------------------------------
    def gated_reuse_parts(self) -> GatedReuseParts:
        return GatedReuseParts(
            DiTGateTable(self.model), ("timestep", "class_labels"), DiTGatedResidual(self.model)
        )


def _embedders_identical(blocks: Any) -> bool:
    """True when every block carries the same timestep/label embedder weights."""
    first = blocks[0].norm1.emb.state_dict()
    if any(t.is_meta for t in first.values()):
        return False  # shapes only, no values to compare
    for block in blocks[1:]:
        other = block.norm1.emb.state_dict()
        if any(not torch.equal(first[key], other[key]) for key in first):
            return False
    return True


class DiTGateTable(nn.Module):
    """Everything a DiT reuse step needs from ``(timestep, class label)``, as one table.

    ``table(t, y)`` is ``[rows, 2L + 2, D]``: rows ``2l`` and ``2l + 1`` are block
    ``l``'s two adaLN gates (chunks 2 and 5 of its projection), the last two rows
    the final layer's shift and scale. None of it depends on the latents, so a
    generation whose timesteps are known can compute the table of every step in
    one call (the ``gates`` graph) before sampling starts.

    - one embedding ``c = emb(t, y)`` when the per-block embedders are identical
      (converted DiT checkpoints duplicate one; checked, else one per block);
    - every block's two gate chunks as one matrix product: ``silu(c) @ W_gates.T``
      with rows ``[2D:3D]`` and ``[5D:6D]`` of each block's weight concatenated.
    """

    def __init__(self, model: Any, *, shared_embedder: bool | None = None) -> None:
        super().__init__()
        blocks = model.transformer_blocks
        dim = int(model.inner_dim)
        self.num_blocks = len(blocks)
        self.shared_embedder = _embedders_identical(blocks) if shared_embedder is None else shared_embedder
        if self.shared_embedder:
            self.embedders = nn.ModuleList([blocks[0].norm1.emb])
        else:
            self.embedders = nn.ModuleList([block.norm1.emb for block in blocks])
        weights, biases = [], []
        for block in blocks:
            linear = block.norm1.linear
            for chunk in (2, 5):  # gate_msa, gate_mlp of (shift, scale, gate) x (msa, mlp)
                weights.append(linear.weight.detach()[chunk * dim : (chunk + 1) * dim])
                biases.append(linear.bias.detach()[chunk * dim : (chunk + 1) * dim])
        self.gate_proj = nn.Linear(
            dim, 2 * dim * len(blocks), device=weights[0].device, dtype=weights[0].dtype
        )
        with torch.no_grad():
            self.gate_proj.weight.copy_(torch.cat(weights))
            self.gate_proj.bias.copy_(torch.cat(biases))
        # The final layer uses block 0's embedder (embedders[0]), as the model's forward does.
        self.proj_out_1 = model.proj_out_1

    @property
    def rows(self) -> int:
        """Rows per sample: two gates per block, then the final shift and scale."""
        return 2 * self.num_blocks + 2

    def forward(self, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = self.gate_proj.weight.dtype
        # Block 0's conditioning serves the gates (of every block, when the embedders are
        # shared) and the final layer.
        conditioning = self.embedders[0](timestep, labels, hidden_dtype=dtype)
        if self.shared_embedder:
            gates = self.gate_proj(F.silu(conditioning))
        else:
            # Per-block embedders: each block's gates from its own conditioning.
            dim = self.gate_proj.in_features
            parts = []
            for index, embedder in enumerate(self.embedders):
                cond = conditioning if index == 0 else embedder(timestep, labels, hidden_dtype=dtype)
                start = 2 * dim * index
                parts.append(
                    F.linear(
                        F.silu(cond),
                        self.gate_proj.weight[start : start + 2 * dim],
                        self.gate_proj.bias[start : start + 2 * dim],
                    )
                )
            gates = torch.cat(parts, dim=1)
        final = self.proj_out_1(F.silu(conditioning))  # shift, scale
        return torch.cat((gates, final), dim=1).view(timestep.shape[0], self.rows, -1)


class DiTGatedResidual(nn.Module):
    """The latent-dependent part of a DiT reuse step, given the step's gate table row:
    ``x = patch_embed(latents) + sum_l (g1_l*A_l + g2_l*M_l)`` in the order the
    blocks add them, then the final layer."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.cache_sum = WeightedCacheSum()
        self.pos_embed = model.pos_embed
        self.norm_out = model.norm_out
        self.proj_out_2 = model.proj_out_2
        self.patch_size = int(model.config.patch_size)
        self.out_channels = int(model.out_channels)

    def forward(
        self, latents: torch.Tensor, gates: torch.Tensor, caches: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        height, width = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        hidden = self.cache_sum(self.pos_embed(latents), gates, caches)
        shift, scale = gates[:, len(caches)], gates[:, len(caches) + 1]
        hidden = self.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
        hidden = self.proj_out_2(hidden)
        patch = self.patch_size
        hidden = hidden.reshape(-1, height, width, patch, patch, self.out_channels)
        hidden = hidden.permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq, as diffusers' einsum
        return hidden.reshape(-1, self.out_channels, height * patch, width * patch)
