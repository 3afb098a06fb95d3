"""``fora::gated_residual_sum``: the reuse step's weighted residual sum as one op, with a
Triton kernel on CUDA. The kernel runs here too, on the CPU, in Triton's interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch

from fora_runtime.backends.torch_ops import chain_sum, gated_residual_sum_op, kernel_layout_problem

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)"
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def random_sum_inputs(count: int, dtype: torch.dtype, device: str = "cpu") -> tuple:
    generator = torch.Generator().manual_seed(count)
    batch, tokens, dim = 3, 10, 24

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return (
        randn(batch, tokens, dim),
        randn(batch, count + 2, dim),
        [randn(batch, tokens, dim) for _ in range(count)],
    )


def reference_sum(hidden: torch.Tensor, gates: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
    """The definition, in fp64."""
    total = hidden.double()
    for index, cache in enumerate(caches):
        total = total + gates[:, index, None, :].double() * cache.double()
    return total


def test_chain_sum_is_the_definition() -> None:
    hidden, gates, caches = random_sum_inputs(5, torch.float32)
    torch.testing.assert_close(
        chain_sum(hidden, gates, caches).double(), reference_sum(hidden, gates, caches), atol=1e-5, rtol=0
    )
    empty = chain_sum(hidden, gates, [])
    assert torch.equal(empty, hidden) and empty.data_ptr() != hidden.data_ptr()  # no aliasing


def test_op_on_cpu_is_the_chain_and_registers_once() -> None:
    op = gated_residual_sum_op(torch)
    assert gated_residual_sum_op(torch) is op
    hidden, gates, caches = random_sum_inputs(9, torch.float32)
    # Programs call it through torch.ops (the dispatcher), not through the Python object.
    assert torch.equal(
        torch.ops.fora.gated_residual_sum(hidden, gates, caches), chain_sum(hidden, gates, caches)
    )
    assert torch.equal(op(hidden, gates, caches), chain_sum(hidden, gates, caches))


def test_op_passes_opcheck_and_returns_contiguous_results() -> None:
    """Fake and real outputs agree (shape, dtype, strides) also for a transposed hidden, as
    DiT's patch embedding produces; mixed dtypes are refused."""
    op = gated_residual_sum_op(torch)
    hidden, gates, caches = random_sum_inputs(4, torch.float32)
    transposed = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    for args in ((hidden, gates, caches), (transposed, gates, caches), (hidden, gates, [])):
        torch.library.opcheck(op, args)
        assert op(*args).is_contiguous()
    with pytest.raises(ValueError, match=r"gates/caches include torch\.float16"):
        op(hidden, gates.half(), caches)


def test_kernel_layout_problems_are_named() -> None:
    hidden, gates, caches = random_sum_inputs(3, torch.float32)
    assert kernel_layout_problem(hidden, gates, caches) is None
    assert "not a contiguous" in kernel_layout_problem(hidden.transpose(1, 2), gates, caches)
    assert "gates are" in kernel_layout_problem(hidden, gates[:, :2], caches)
    assert "cache 1 is not contiguous" in kernel_layout_problem(
        hidden, gates, [caches[0], caches[1].transpose(0, 1).contiguous().transpose(0, 1), caches[2]]
    )
    assert "cache 2 is torch.float16" in kernel_layout_problem(hidden, gates, [*caches[:2], caches[2].half()])


INTERPRETED = textwrap.dedent(
    """
    import torch
    from fora_runtime.backends.torch_ops import triton_gated_sum
    from tests.runtime.test_torch_ops import random_sum_inputs, reference_sum

    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
        for count in (1, 8, 9, 19):  # one launch, a full launch, one more, three launches
            hidden, gates, caches = random_sum_inputs(count, dtype)
            got = triton_gated_sum(hidden, gates, caches)
            want = reference_sum(hidden, gates, caches)
            assert got.dtype == dtype and got.shape == hidden.shape
            error = (got.double() - want).abs().max().item()
            # fp16: sums in fp32, one rounding per launch; |sum| < 20 here, so 2e-2 is ~1 ulp.
            assert error <= atol, (dtype, count, error)
    print("ok")
    """
)


@needs_triton
def test_triton_kernel_matches_the_definition_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, check=False,
        cwd=Path(__file__).resolve().parents[2], timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_torch_programs_call_the_op_and_onnx_graphs_do_not(tiny_torch_engine: Path) -> None:
    out = tiny_torch_engine
    for program in ("reuse.pt2", "reuse_gated.pt2"):
        graph = torch.export.load(str(out / program)).graph
        assert any("fora.gated_residual_sum" in str(node.target) for node in graph.nodes), program
    for file in ("reuse.onnx", "reuse_gated.onnx"):
        domains = {node.domain for node in onnx.load(str(out / file)).graph.node}
        assert domains <= {"", "ai.onnx"}, (file, domains)  # standard operators only


def test_runtime_registers_the_op_itself(tiny_torch_engine: Path) -> None:
    """A fresh process with the exporter blocked loads and runs programs calling the op."""
    out = tiny_torch_engine
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("fora_export", "diffusers", "onnx"):
            sys.modules[name] = None
        import numpy as np
        from fora_runtime import ForaSession
        with ForaSession({str(out)!r}, backend="torch", trust_programs=True) as session:
            gen = session.start(3, 2, timesteps=[900.0, 800.0, 700.0], class_labels=np.array([1, 2]))
            for _ in range(3):
                out = gen.step(np.zeros((2, 4, 8, 8), np.float32))
        assert gen.uses_gate_table and out.shape == (2, 8, 8, 8)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_cuda_op_runs_the_kernel_and_matches_the_definition() -> None:
    op = gated_residual_sum_op(torch)
    for dtype, atol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        hidden, gates, caches = random_sum_inputs(19, dtype, "cuda")
        got = op(hidden.transpose(1, 2).contiguous().transpose(1, 2), gates, caches)  # non-contiguous hidden
        assert (got.double() - reference_sum(hidden, gates, caches)).abs().max().item() <= atol
    from fora_runtime.backends import torch_ops

    assert torch_ops.triton_kernel() is not None  # the kernel, not the chain, ran
