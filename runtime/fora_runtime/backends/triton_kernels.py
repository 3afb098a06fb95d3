"""Triton kernels of the custom ops in :mod:`fora_runtime.backends.torch_ops`.

Imported only when a kernel is first needed (this module imports triton).
"""

# mypy: ignore-errors
# (Triton kernels are written in Triton's Python dialect: tl.constexpr parameters, no types.)

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gated_product(gate, cache, offs, mask):
    return tl.load(gate, mask=mask).to(tl.float32) * tl.load(cache + offs, mask=mask).to(tl.float32)


@triton.jit
def gated_sum_kernel(
    acc_ptr, gates_ptr, c0, c1, c2, c3, c4, c5, c6, c7,
    numel, sample_size, dim, gates_stride, first,
    COUNT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``acc += sum_k gates[b, first + k, d] * c_k[b, t, d]`` for k < COUNT, on a flat
    [B * T * D] range; products and the sum in fp32, one rounding at the store."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    gate = gates_ptr + (offs // sample_size) * gates_stride + first * dim + offs % dim
    acc = tl.load(acc_ptr + offs, mask=mask).to(tl.float32)
    acc += _gated_product(gate, c0, offs, mask)
    if COUNT > 1:
        acc += _gated_product(gate + dim, c1, offs, mask)
    if COUNT > 2:
        acc += _gated_product(gate + 2 * dim, c2, offs, mask)
    if COUNT > 3:
        acc += _gated_product(gate + 3 * dim, c3, offs, mask)
    if COUNT > 4:
        acc += _gated_product(gate + 4 * dim, c4, offs, mask)
    if COUNT > 5:
        acc += _gated_product(gate + 5 * dim, c5, offs, mask)
    if COUNT > 6:
        acc += _gated_product(gate + 6 * dim, c6, offs, mask)
    if COUNT > 7:
        acc += _gated_product(gate + 7 * dim, c7, offs, mask)
    tl.store(acc_ptr + offs, acc.to(acc_ptr.dtype.element_ty), mask=mask)
