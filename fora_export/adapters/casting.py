"""Casting a loaded model to the build precision."""

from __future__ import annotations

import torch
from torch import nn


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, without diffusers' advice to cast at load time.

    diffusers warns on ``to()`` for models that list modules to keep in fp32;
    DiT lists none, and the exported ONNX types decide precision anyway.
    """
    if next(model.parameters()).dtype == dtype:
        return model
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return model.to(dtype)
    finally:
        diffusers_logging.set_verbosity(previous)
