"""The values the build and run options take, importable without torch.

The CLI lists them in ``--help`` (its choices) and the library checks against the same
tuples (``fora_export.builder.config``, ``fora_export.export.onnx_export``), so a new value
is one edit here.
"""

from __future__ import annotations

from fora_runtime.schedule import INTERVAL_MODES

#: Tensor types of the exported graphs.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: What a build produces beyond the ONNX graphs (always written): ``auto`` adds
#: TensorRT engines when TensorRT imports and a GPU is visible; ``tensorrt-rtx`` adds
#: TensorRT-RTX plans for RTX GPUs (built without a GPU); ``torch`` adds
#: ``torch.export`` programs for the runtime's torch backend.
BUILD_BACKENDS: tuple[str, ...] = ("auto", "onnx", "tensorrt", "tensorrt-rtx", "torch")
#: torch.onnx exporters.
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
#: ``lean``: the family's reuse step computing only gates and the residual sum; ``plain``:
#: the blocks with their cached sublayers replayed.
REUSE_GRAPHS: tuple[str, ...] = ("lean", "plain")
#: ``calibrate --metric`` -> the cache change measure it minimises (``fora_runtime.calibration``).
METRIC_OPTIONS: dict[str, str] = {"l1": "rel_l1", "l2": "rel_l2"}
#: How ``quality`` counts its intervals: either reading, or both (a row for each).
QUALITY_SCHEDULE_MODES: tuple[str, ...] = (*INTERVAL_MODES, "both")
