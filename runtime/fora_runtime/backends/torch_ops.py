"""Custom torch ops that fora's torch programs call, and their kernels.

``fora::gated_residual_sum(hidden, gates, caches)`` is the reuse step's weighted
residual sum, ``hidden + sum_i gates[:, i, None, :] * caches[i]``, added in the
caches' order. The DiT reuse programs (``reuse.pt2``, ``reuse_gated.pt2``) call
it instead of a chain of 2 x 56 broadcast multiply-adds: on an H100 that chain
costs 0.34 ms for DiT-XL/2 at batch 2 (tiny kernels), the fused Triton kernel
here 0.05 ms, close to reading the 63 MiB of caches once (measured with
``tools/reuse_variants.py``).

- CUDA tensors with Triton installed (CUDA builds of torch ship it): one kernel
  launch per 8 caches, products summed in fp32, rounded once per launch.
- Anything else (CPU, no Triton, odd layouts): the multiply-add chain, exactly
  what the ONNX graphs compute.

Programs that call the op load only once it is registered: the torch backend
calls :func:`gated_residual_sum_op` before ``torch.export.load``. Nothing here
imports torch at module level (the runtime imports without it).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

OP_NAME = "fora::gated_residual_sum"
SCHEMA = "(Tensor hidden, Tensor gates, Tensor[] caches) -> Tensor"
#: Caches summed per kernel launch (the kernel takes this many cache pointers).
CACHES_PER_LAUNCH = 8
BLOCK = 1024

_op: Any = None
_kernel: Any = None  # the Triton kernel; False once Triton turned out to be unavailable


def gated_residual_sum_op(torch: Any) -> Any:
    """The registered op (``torch.ops.fora.gated_residual_sum``), registering it once."""
    global _op
    if _op is None:
        _op = torch.library.custom_op(
            OP_NAME, _make_impl(torch), mutates_args=(), schema=SCHEMA, device_types=None
        )
        # Contiguous, like both implementations' results (hidden itself may be a transposed view).
        _op.register_fake(
            lambda hidden, gates, caches: _check_dtypes(hidden, gates, caches).new_empty(hidden.shape)
        )
    return _op


def _check_dtypes(hidden: Any, gates: Any, caches: Any) -> Any:
    """The op computes in one dtype: gates and caches must have hidden's."""
    odd = [t.dtype for t in (gates, *caches) if t.dtype != hidden.dtype]
    if odd:
        raise ValueError(f"{OP_NAME}: hidden is {hidden.dtype}, gates/caches include {odd[0]}")
    return hidden


def chain_sum(hidden: Any, gates: Any, caches: Any) -> Any:
    """The weighted sum as the ONNX graphs compute it: one multiply-add per cache.
    The result is contiguous (a fresh tensor, never ``hidden`` itself)."""
    hidden = hidden.contiguous()
    if not caches:
        return hidden.clone()  # an op's output must not alias its input
    for index, cache in enumerate(caches):
        hidden = gates[:, index].unsqueeze(1) * cache + hidden
    return hidden


def _make_impl(torch: Any) -> Any:
    def gated_residual_sum(hidden: Any, gates: Any, caches: list[Any]) -> Any:
        _check_dtypes(hidden, gates, caches)
        if hidden.is_cuda:
            problem = "Triton is not available" if triton_kernel() is None else None
            if problem is None:
                hidden = hidden.contiguous()  # patch embeddings come out transposed: one small copy
                problem = kernel_layout_problem(hidden, gates, caches)
                if problem is None:
                    return triton_gated_sum(hidden, gates, caches)
            _warn_once(f"fora::gated_residual_sum runs unfused (slower) on CUDA: {problem}")
        return chain_sum(hidden, gates, caches)

    return gated_residual_sum


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def kernel_layout_problem(hidden: Any, gates: Any, caches: list[Any]) -> str | None:
    """None when the kernel takes these tensors: hidden and caches [B, T, D] contiguous and
    alike, gates [B, >= len(caches), D] of their dtype; else what does not fit."""
    if not caches:
        return "no caches"
    if hidden.dim() != 3 or not hidden.is_contiguous():
        return f"hidden is {list(hidden.shape)}, not a contiguous [B, T, D]"
    if gates.dim() != 3 or gates.dtype != hidden.dtype or gates.shape[1] < len(caches):
        return f"gates are {gates.dtype}{list(gates.shape)}, expected {hidden.dtype}[B, >= {len(caches)}, D]"
    if gates.shape[0] != hidden.shape[0] or gates.shape[2] != hidden.shape[2]:
        return f"gates {list(gates.shape)} do not match hidden {list(hidden.shape)}"
    for index, cache in enumerate(caches):
        if (cache.shape, cache.dtype, cache.device) != (hidden.shape, hidden.dtype, hidden.device):
            return f"cache {index} is {cache.dtype}{list(cache.shape)} on {cache.device}"
        if not cache.is_contiguous():
            return f"cache {index} is not contiguous"
    return None


def triton_kernel() -> Any:
    """The Triton kernel, compiled on first launch; None when Triton is unavailable."""
    global _kernel
    if _kernel is None:
        try:
            _kernel = _define_kernel()
        except Exception as err:  # ImportError, or a Triton too old for this source
            log.debug(
                "fora::gated_residual_sum: no Triton kernel (%s: %s)",
                type(err).__name__,
                err,
            )
            _kernel = False
    return _kernel or None


def triton_gated_sum(hidden: Any, gates: Any, caches: list[Any]) -> Any:
    """``hidden + sum_i gates[:, i, None, :] * caches[i]`` by the Triton kernel (layout as
    :func:`kernel_layout_problem` checks). CPU tensors work under ``TRITON_INTERPRET=1``."""
    kernel = triton_kernel()
    if kernel is None:
        raise RuntimeError("Triton is not available")
    out = hidden.clone()
    gates = gates.contiguous()
    numel = out.numel()
    grid = ((numel + BLOCK - 1) // BLOCK,)
    sample_size = out.shape[1] * out.shape[2]
    for first in range(0, len(caches), CACHES_PER_LAUNCH):
        group = list(caches[first : first + CACHES_PER_LAUNCH])
        count = len(group)
        group += [group[0]] * (CACHES_PER_LAUNCH - count)  # unused pointer slots
        kernel[grid](
            out, gates, *group, numel, sample_size, out.shape[2], gates.stride(0), first,
            COUNT=count, BLOCK=BLOCK,
        )  # fmt: skip
    return out


def _define_kernel() -> Any:
    from fora_runtime.backends.triton_kernels import gated_sum_kernel

    return gated_sum_kernel
