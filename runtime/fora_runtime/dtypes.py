"""The project's one dtype table: manifest names and their numpy, torch, ONNX and
TensorRT counterparts. Stdlib only at import; numpy and torch are imported by the
functions that return their types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    """One tensor type as every layer of the project names it."""

    name: str  # manifest name
    itemsize: int
    numpy: str | None  # numpy type name; None where numpy has none (bfloat16)
    torch: str  # attribute of the torch module
    onnx: int  # onnx.TensorProto elem_type
    tensorrt: str  # tensorrt.DataType member name
    precision: str | None = None  # the --precision choice whose graphs use it


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", 4, "float32", "float32", 1, "FLOAT", "fp32"),
        DType("float16", 2, "float16", "float16", 10, "HALF", "fp16"),
        DType("bfloat16", 2, None, "bfloat16", 16, "BF16", "bf16"),
        DType("int64", 8, "int64", "int64", 7, "INT64"),
        DType("int32", 4, "int32", "int32", 6, "INT32"),
    )
}
#: Types a manifest tensor may have.
MANIFEST_DTYPES = ("float32", "float16", "bfloat16", "int64")
#: ``--precision`` choice -> the floating type of its graphs.
PRECISION_DTYPES = {d.precision: d.name for d in DTYPES.values() if d.precision}
ONNX_ELEM_TYPES = {d.onnx: d.name for d in DTYPES.values()}
TENSORRT_NAMES = {d.tensorrt: d.name for d in DTYPES.values()}
#: Integer types the runtime widens to int64 without loss (class labels, masks).
WIDENS_TO_INT64 = ("int32", "int16", "uint8", "int8")


def itemsize(name: str) -> int:
    return DTYPES[name].itemsize


def numpy_dtype(name: str) -> Any:
    """The numpy type of manifest type ``name``; KeyError where numpy has none."""
    import numpy as np

    numpy_name = DTYPES[name].numpy
    if numpy_name is None:
        raise KeyError(name)
    return np.dtype(numpy_name)


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, DTYPES[name].torch)


def name_of(dtype: Any) -> str:
    """The manifest name of a numpy or torch dtype (``float32``, ``int64``, ...): the type's
    own name without torch's module prefix, which is how the table names them."""
    return str(dtype).removeprefix("torch.")
