"""fp32 islands: run selected ONNX operators in fp32 inside an fp16/bf16 graph.

TensorRT networks are strongly typed, so precision is whatever the ONNX tensor
types say. Some operators need fp32 inside a low-precision graph:

- ``LayerNormalization`` and ``Softmax``: their reductions overflow or lose
  the small differences they exist to capture in fp16 (design.md section 3:
  LayerNorm after attention is a known fp16 trouble spot in DiT-family models).
- ``Conv`` (opset < 22) and ``Einsum``: the ONNX standard does not allow bf16 for
  them, so a bf16 graph fails the ONNX checker unless they run in fp32.

The pass wraps each such node in ``Cast`` nodes: its low-precision float inputs
are cast to fp32, its outputs computed in fp32 and cast back to the type they had.
Tensor types come from ONNX shape inference; the pass never touches a node
whose inputs are already fp32.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16
LOW_PRECISION = {"fp16": FLOAT16, "bf16": BFLOAT16}

#: Operators kept in fp32 for numerical safety, by precision.
NUMERIC_ISLANDS = ("LayerNormalization", "Softmax")


def island_ops(precision: str, opset: int) -> tuple[str, ...]:
    """The operators that run in fp32 for a graph of ``precision`` at ``opset``."""
    if precision not in LOW_PRECISION:
        return ()
    ops = list(NUMERIC_ISLANDS)
    if precision == "bf16":
        ops.append("Einsum")  # no bf16 Einsum in any opset
        if opset < 22:
            ops.append("Conv")  # bf16 Conv arrived in opset 22
    return tuple(ops)


def _tensor_types(model: Any) -> dict[str, int]:
    import onnx

    # strict_mode=False: inference of ops the standard does not type for bf16 fails
    # softly; those tensors then fall back to the graph's low-precision type.
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        elem = value.type.tensor_type.elem_type
        if elem:
            types[value.name] = elem
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def apply_fp32_islands(model: Any, precision: str, ops: tuple[str, ...]) -> int:
    """Rewrite ``model`` in place; returns how many nodes now run in fp32."""
    if not ops or precision not in LOW_PRECISION:
        return 0
    from onnx import helper

    low = LOW_PRECISION[precision]
    types = _tensor_types(model)
    new_nodes = []
    count = 0
    for index, node in enumerate(model.graph.node):
        input_types = [types.get(name, low) for name in node.input if name]
        if node.op_type not in ops or low not in input_types:
            new_nodes.append(node)
            continue
        count += 1
        for position, name in enumerate(node.input):
            if name and types.get(name, low) == low:
                cast_name = f"{name}__fp32_{index}"
                new_nodes.append(
                    helper.make_node(
                        "Cast", [name], [cast_name], to=FLOAT, name=f"{node.name}_in{position}_fp32"
                    )
                )
                node.input[position] = cast_name
        back_casts = []
        for position, name in enumerate(node.output):
            if not name:
                continue
            wide = f"{name}__fp32"
            node.output[position] = wide
            back_casts.append(
                helper.make_node(
                    "Cast", [wide], [name], to=types.get(name, low), name=f"{node.name}_out{position}_cast"
                )
            )
        new_nodes.append(node)
        new_nodes.extend(back_casts)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    # value_info entries for renamed tensors would now carry stale types.
    del model.graph.value_info[:]
    log.info("fp32 islands: %d nodes (%s) run in fp32", count, ", ".join(ops))
    return count
