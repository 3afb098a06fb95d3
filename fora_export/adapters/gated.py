"""The lean reuse step, one implementation for every family, and the pieces families
compose their reuse math of.

A reuse step of an adaLN family is ``x = embed(latents) + sum_i g_i(c) * cache_i``
followed by the final modulated norm and head, where ``c`` depends only on the
timestep and conditioning. Two facts are common to all families and live here:

- the gates of every cached sublayer are chunks of per-block adaLN projections of
  one shared vector: stacking those weight rows makes all of them one matrix product
  (:func:`stacked_gate_projection`);
- the weighted residual sum reads each cache once (:class:`WeightedCacheSum`); in
  torch programs it is one ``fora::gated_residual_sum`` op (a fused kernel on CUDA);
- a first-order forecast of the caches is the same sum over twice the caches
  (:class:`ForecastGatedReuse`), so every family's gated reuse step forecasts unchanged.

A family declares its reuse math as :class:`GatedReuseParts` (its gate table, the
table's inputs, its gated residual); :class:`LeanReuseStep` (the ``reuse`` graph) and
:class:`GatedReuseStep` (``reuse_gated``) are built from them by ``ModelAdapter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fora_runtime.backends.torch_ops import gated_residual_sum_op


def stacked_gate_projection(pieces: Sequence[tuple[nn.Linear, int, int]]) -> nn.Linear:
    """One linear layer computing the listed chunks of several adaLN projections.

    ``pieces`` are ``(linear, chunk, chunks)``: rows ``[chunk * D, (chunk + 1) * D)`` of
    ``linear`` whose output is ``chunks`` vectors of size ``D``. The result's output is
    the chunks concatenated in order (``[len(pieces) * D]``), computed from the same input.
    """
    weights, biases = [], []
    for linear, chunk, chunks in pieces:
        size = linear.out_features // chunks
        weights.append(linear.weight.detach()[chunk * size : (chunk + 1) * size])
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros_like(weights[-1][:, 0])
        biases.append(bias[chunk * size : (chunk + 1) * size])
    weight = torch.cat(weights)
    projection = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        projection.weight.copy_(weight)
        projection.bias.copy_(torch.cat(biases))
    return projection


class WeightedCacheSum(nn.Module):
    """``hidden + sum_i gates[:, i, None] * caches[i]``, added in the caches' order (the
    blocks' order of addition), each cache read once.

    ONNX graphs spell it as a multiply-add chain TensorRT fuses into one pointwise
    kernel (not ``addcmul``: its ONNX export computes in fp32 and would change the
    graph's output type). With ``torch_program`` set (see ``torch_program_ops``) it is
    one ``fora::gated_residual_sum`` op.
    """

    def __init__(self) -> None:
        super().__init__()
        self.torch_program = False

    def forward(
        self, hidden: torch.Tensor, gates: torch.Tensor, caches: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if self.torch_program:
            return gated_residual_sum_op(torch)(hidden, gates, list(caches))
        for index, cache in enumerate(caches):
            hidden = gates[:, index].unsqueeze(1) * cache + hidden
        return hidden


class TokenGatedResidual(nn.Module):
    """The gated residual of a family on packed tokens ``[B, S, C]`` with a final
    ``AdaLayerNormContinuous``: ``embed(latents) + sum_i g_i * cache_i``, then the final norm
    modulated by the gate table's last two rows (scale, shift) and ``proj_out`` (Flux,
    Qwen-Image)."""

    def __init__(self, embed: nn.Module, norm_out: Any, proj_out: nn.Module) -> None:
        super().__init__()
        self.embed = embed
        self.norm = norm_out.norm  # AdaLayerNormContinuous: its norm, modulated by the table
        self.proj_out = proj_out
        self.cache_sum = WeightedCacheSum()

    def forward(
        self, latents: torch.Tensor, gates: torch.Tensor, caches: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        hidden = self.cache_sum(self.embed(latents), gates, caches)
        scale, shift = gates[:, len(caches)], gates[:, len(caches) + 1]
        hidden = self.norm(hidden) * (1 + scale)[:, None, :] + shift[:, None, :]
        return self.proj_out(hidden)


class ForecastGatedReuse(nn.Module):
    """The forecast reuse step of a family: ``(latents, gates, forecast_weight, *caches,
    *previous) -> prediction``.

    Each cache is forecast from the last two full steps j < k, ``A(t) ~ A_k + w (A_k - A_j)``
    with ``w = (t - t_k) / (t_k - t_j)`` per sample (the runtime computes it from the planned
    timesteps). Its gated contribution ``g A(t) = g (1 + w) A_k - g w A_j`` is a weighted sum
    over twice the caches, so the family's gated reuse step runs unchanged on the current
    caches followed by the previous ones, with their gates ``g (1 + w)`` and ``-g w``
    followed by the gate table's other rows (final-layer modulation): one pass over both
    cache generations, one fused op in torch programs, the same multiply-add chain in ONNX.
    ``w = 0`` is plain reuse.
    """

    def __init__(self, gated_reuse: nn.Module, num_caches: int) -> None:
        super().__init__()
        self.gated_reuse = gated_reuse
        self.num_caches = num_caches

    def forward(
        self, latents: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, *caches: torch.Tensor
    ) -> torch.Tensor:
        count = self.num_caches
        w = weight.to(gates.dtype)[:, None, None]
        cache_gates = gates[:, :count]
        forecast = torch.cat((cache_gates * (1 + w), cache_gates * -w, gates[:, count:]), dim=1)
        return self.gated_reuse(latents, forecast, *caches)


@dataclass
class GatedReuseParts:
    """A family's reuse math, split where the gate table ends.

    - ``table(*inputs named by table_inputs) -> gates [rows, G, D]``: every gate a reuse
      step applies to a cache (in the caches' order, the blocks' order of addition), then
      the family's other rows (final-layer modulation), from the timestep and
      conditioning alone;
    - ``residual(latents, gates, caches) -> prediction``: the latents' embedding plus the
      gated caches, and the output head.
    """

    table: nn.Module
    table_inputs: tuple[str, ...]
    residual: nn.Module


@dataclass
class GateTableGraphs:
    """A family's lean reuse step split into what depends only on the timestep and
    conditioning (``table``, run once per generation over every step's rows) and what
    reads the latents and caches (``gated_reuse``).

    - ``table(*inputs named by table_inputs) -> gates [rows, ...]``
    - ``gated_reuse(latents, gates, *caches) -> prediction``
    """

    table: nn.Module
    table_inputs: tuple[str, ...]
    gated_reuse: nn.Module


class LeanReuseStep(nn.Module):
    """A reuse step without anything reuse does not need: the step's gate table row and
    the gated residual, instead of every block with its sublayers replayed (which still
    carries every block's embedders and full adaLN projections).

    Takes the plain reuse graph's step inputs (``input_names``; those the table does not
    read, e.g. text embeddings, unused), then the caches, so the two are interchangeable;
    validate checks it against the plain PyTorch reuse.
    """

    def __init__(
        self,
        table: nn.Module,
        table_inputs: tuple[str, ...],
        residual: nn.Module,
        input_names: tuple[str, ...],
    ) -> None:
        super().__init__()
        self.input_names = input_names
        self.table_inputs = table_inputs
        self.table = table
        self.residual = residual

    def forward(self, *inputs_and_caches: torch.Tensor) -> torch.Tensor:
        count = len(self.input_names)
        inputs = dict(zip(self.input_names, inputs_and_caches[:count], strict=True))
        gates = self.table(*(inputs[name] for name in self.table_inputs))
        return self.residual(inputs["latents"], gates, inputs_and_caches[count:])


class GatedReuseStep(nn.Module):
    """The reuse step of a generation whose gate tables were computed up front:
    ``(latents, gates, *caches) -> prediction``, where ``gates`` is this step's row of the
    family's gate table. It only reads caches."""

    def __init__(self, residual: nn.Module) -> None:
        super().__init__()
        self.residual = residual

    def forward(self, latents: torch.Tensor, gates: torch.Tensor, *caches: torch.Tensor) -> torch.Tensor:
        return self.residual(latents, gates, caches)
