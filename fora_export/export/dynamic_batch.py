"""The dynamic batch axis for ``torch.export``-based exporters (ONNX dynamo, programs)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from fora_export.errors import ExportError
from fora_runtime.manifest import BATCH_AXIS, BatchRange


def batch_dynamic_shapes(
    module: nn.Module, args: tuple[torch.Tensor, ...], batch_range: BatchRange
) -> dict[str, Any] | None:
    """Axis 0 of every positional input is the batch Dim, keyed by ``forward``'s parameter
    names. The step graphs take ``*args``, so theirs is keyed by the varargs name
    (``inputs`` / ``inputs_and_caches``) with one entry per positional input."""
    if batch_range.min == batch_range.max:
        return None
    batch = torch.export.Dim(BATCH_AXIS, min=batch_range.min, max=batch_range.max)
    shapes: dict[str, Any] = {}
    remaining = len(args)
    for param in inspect.signature(module.forward).parameters.values():
        if remaining and param.kind == param.VAR_POSITIONAL:
            shapes[param.name] = tuple({0: batch} for _ in range(remaining))
            remaining = 0
        elif remaining and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            shapes[param.name] = {0: batch}
            remaining -= 1
    if remaining:
        raise ExportError(f"{type(module).__name__}.forward | takes fewer positional inputs than {len(args)}")
    return shapes
