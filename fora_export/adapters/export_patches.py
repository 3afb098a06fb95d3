"""Export-time patches: modules computed by the same formula in ops every exporter and
TensorRT take (Optimum keeps such patches in one place too, ``_MODEL_PATCHER``).

Each replaces instance ``forward``s only, so state-dict keys are unchanged, and gives
eager PyTorch the same values (to fp32 rounding), so validate's reference and the
eager baseline see the model users run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def decompose_rms_norms(model: nn.Module) -> int:
    """Compute every ``torch.nn.RMSNorm`` of ``model`` as its formula in basic ops.

    ``torch.nn.RMSNorm`` exports as ``aten::rms_norm``, which the TorchScript ONNX
    exporter cannot write at opset 17 (ONNX has ``RMSNormalization`` only from opset
    23, which TensorRT 10.x does not parse). The instance ``forward`` is replaced
    (state-dict keys unchanged) by ``x * rsqrt(mean(x^2) + eps) * weight``, reduced
    in fp32 as diffusers' own ``RMSNorm`` does; eager PyTorch gives the same values to
    fp32 rounding. Returns how many modules were changed.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.RMSNorm) and "forward" not in vars(module):
            module.forward = _rms_norm_forward(module)  # type: ignore[method-assign,assignment]
            count += 1
    return count


def _rms_norm_forward(norm: nn.RMSNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        # Casts only where the type changes: no-op Casts are what ONNX optimizers fold away
        # (and one pass left a dangling reference to a folded Cast behind).
        wide = hidden if dtype == torch.float32 else hidden.to(torch.float32)
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        normed = normed if dtype == torch.float32 else normed.to(dtype)
        return normed * norm.weight if norm.weight is not None else normed

    return forward


def precompute_timestep_frequencies(model: nn.Module) -> int:
    """Give every diffusers ``Timesteps`` module its sinusoid frequency table as a value.

    ``get_timestep_embedding`` computes ``exp(-log(max_period) * arange(half) / (half -
    shift))`` in every forward. The dynamo exporter constant-folds that expression with
    its own ``exp``, one ulp off eager PyTorch; multiplied by a timestep near 1000 the
    phase error reaches ~1e-4 in the output. Computing the table once with torch (the
    same ops as eager, so the same bits) and using the stored tensor removes it.
    Returns how many modules were changed.
    """
    from diffusers.models.embeddings import Timesteps

    count = 0
    for module in model.modules():
        if isinstance(module, Timesteps) and "forward" not in vars(module):
            module.forward = _timesteps_forward(module)  # type: ignore[method-assign,assignment]
            count += 1
    return count


def _timesteps_forward(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    channels = int(module.num_channels)
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32)
    frequencies = torch.exp(exponent / (half - module.downscale_freq_shift))
    flip = bool(module.flip_sin_to_cos)
    scale = module.scale

    def forward(timesteps: torch.Tensor) -> torch.Tensor:
        # get_timestep_embedding's arithmetic, with the table as a constant.
        emb = timesteps[:, None].float() * frequencies.to(timesteps.device)[None, :]
        emb = scale * emb
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if flip:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if channels % 2 == 1:
            emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
        return emb

    return forward
