"""Where a DiT reuse step's time goes on a CUDA GPU: step variants side by side.

Builds a random-weight DiT (default: DiT-XL/2, fp16) straight from the adapters'
modules, captures each variant in a CUDA graph and times its replays in one run:

- ``full``: the diffusers model's forward (what a full step costs);
- ``lean reuse``: DiT's :class:`LeanReuseStep` (gate table + residual sum + final layer);
- ``gated reuse``: DiT's :class:`GatedReuseStep` (the table row given: only reads caches);
- ``gate table``: one step's table, and every step's of a generation at once;
- the weighted residual sum alone and the gated reuse step with other sums: the
  chain of multiply-adds the graphs use, ``addcmul``, one product-and-sum over the
  caches stacked in one tensor, and the runtime's Triton kernel (8 caches per launch);
- with ``--compile``: the gated and lean steps through ``torch.compile``.

Then a kernel profile of the eager lean reuse step. Ratios are to ``full`` in the
same run. This is a developer probe for the GPU machine, not a product benchmark
(``fora-export bench`` is that).

    python tools/reuse_variants.py [--batch 2] [--steps 250] [--compile] [--small]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from fora_export.adapters.dit import DiTGatedResidual, DiTGateTable
from fora_export.adapters.gated import GatedReuseStep
from fora_export.adapters.registry import adapter_for
from fora_export.demo import make_demo_dit, make_demo_dit_xl
from fora_export.split.graphs import split_model
from fora_runtime.backends.torch_ops import chain_sum, triton_gated_sum, triton_kernel

NAMES = ("latents", "timestep", "class_labels")


def graphed_ms(fn: Callable[..., Any], args: tuple[Any, ...], iters: int) -> float:
    """Mean milliseconds per replay of ``fn(*args)`` captured in a CUDA graph."""
    if not torch.cuda.is_available():  # a dry run of the probe on a CPU
        return eager_ms(fn, args, iters)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def eager_ms(fn: Callable[..., Any], args: tuple[Any, ...], iters: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn(*args)
    sync()
    begin = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    sync()
    return (time.perf_counter() - begin) * 1e3 / iters


def addcmul_sum(hidden: torch.Tensor, gates: torch.Tensor, caches: tuple[torch.Tensor, ...]) -> torch.Tensor:
    for index, cache in enumerate(caches):
        hidden = torch.addcmul(hidden, gates[:, index].unsqueeze(1), cache)
    return hidden


def stacked_sum(hidden: torch.Tensor, gates: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``stacked``: the caches as one [n, B, T, D] tensor (as if the full step wrote them so)."""
    weights = gates[:, : stacked.shape[0]].transpose(0, 1).unsqueeze(2)  # [n, B, 1, D]
    return hidden + (weights * stacked).sum(0)


def residual_with(
    residual: DiTGatedResidual, weighted_sum: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """:class:`DiTGatedResidual`'s forward with another weighted sum (same final layer)."""

    def run(latents: torch.Tensor, gates: torch.Tensor, caches: Any, count: int) -> torch.Tensor:
        patch = residual.patch_size
        height, width = latents.shape[-2] // patch, latents.shape[-1] // patch
        hidden = weighted_sum(residual.pos_embed(latents), gates, caches)
        shift, scale = gates[:, count], gates[:, count + 1]
        hidden = residual.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
        hidden = residual.proj_out_2(hidden)
        hidden = hidden.reshape(-1, height, width, patch, patch, residual.out_channels)
        hidden = hidden.permute(0, 5, 1, 3, 2, 4)
        return hidden.reshape(-1, residual.out_channels, height * patch, width * patch)

    return run


def sum_variants(
    residual: DiTGatedResidual,
    latents: torch.Tensor,
    gates: torch.Tensor,
    caches: tuple[torch.Tensor, ...],
    iters: int,
    on_gpu: bool,
) -> list[tuple[str, float, str]]:
    """The weighted sum alone and inside the gated reuse step, per implementation."""
    count = len(caches)
    hidden = residual.pos_embed(latents)
    stacked = torch.stack(caches)
    reference = residual_with(residual, chain_sum)(latents, gates, caches, count)
    sums: dict[str, tuple[Callable[..., torch.Tensor], Any]] = {
        "chain": (chain_sum, caches),
        "addcmul": (addcmul_sum, caches),
        "stacked": (stacked_sum, stacked),
    }
    if on_gpu and triton_kernel() is not None:
        # The runtime's fused op kernel (fora::gated_residual_sum on CUDA).
        sums["triton x8"] = (lambda h, g, c: triton_gated_sum(h.contiguous(), g, list(c)), caches)
    results = [("stack caches (full-step cost)", graphed_ms(lambda *c: torch.stack(c), caches, iters), "")]
    for name, (weighted_sum, cache_arg) in sums.items():
        try:
            alone = graphed_ms(weighted_sum, (hidden, gates, cache_arg), iters)
            step = residual_with(residual, weighted_sum)
            ms = graphed_ms(step, (latents, gates, cache_arg, count), iters)
            error = (step(latents, gates, cache_arg, count).float() - reference.float()).abs().max().item()
            results.append((f"sum only: {name}", alone, ""))
            results.append((f"gated reuse, sum {name}", ms, f"max abs diff to chain {error:.1e}"))
        except Exception as err:  # report and go on: this is a probe
            results.append(
                (f"gated reuse, sum {name}", float("nan"), f"failed: {type(err).__name__}: {err}"[:200])
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=250, help="steps of a generation (gate table)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variants")
    parser.add_argument("--small", action="store_true", help="the small demo-dit instead of DiT-XL/2")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    # Without a GPU: a dry run in fp32 on the CPU (checks the probe, times nothing useful).
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.float16 if on_gpu else torch.float32
    model = (make_demo_dit() if args.small else make_demo_dit_xl()).to(device, dtype).eval()
    adapter = adapter_for(model)
    split = split_model(adapter, NAMES)
    size = int(model.config.sample_size)
    gen = torch.Generator(device).manual_seed(0)
    batch = args.batch
    latents = torch.randn(batch, model.config.in_channels, size, size, generator=gen, device=device).to(dtype)
    timestep = torch.full((batch,), 500.0, device=device)
    labels = torch.arange(batch, device=device) % int(model.config.num_embeds_ada_norm)
    lean = adapter.lean_reuse_graph(NAMES, split.cache_names).eval()
    gated = GatedReuseStep(DiTGatedResidual(model)).eval()
    table = DiTGateTable(model).eval()
    results: list[tuple[str, float, str]] = []
    with torch.no_grad():
        _, caches_by_name = split.run_full({"latents": latents, "timestep": timestep, "class_labels": labels})
        caches = tuple(caches_by_name[n].contiguous() for n in split.cache_names)
        split.remove()  # the model runs untapped from here
        gates = table(timestep, labels)
        print(
            f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, batch {batch}, "
            f"{len(caches)} caches of {list(caches[0].shape)}, "
            f"{torch.cuda.get_device_name() if on_gpu else 'cpu'}"
        )
        cache_mb = sum(c.numel() * c.element_size() for c in caches) / 2**20
        print(
            f"cache bytes: {cache_mb:.1f} MiB "
            f"(a read of all at 3 TB/s: {cache_mb * 2**20 / 3e12 * 1e6:.0f} us)"
        )

        def full(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, timestep=t, class_labels=y, return_dict=False)[0]

        full_ms = graphed_ms(full, (latents, timestep, labels), args.iters)
        results.append(("full (graphed)", full_ms, ""))
        results.append(("full (eager)", eager_ms(full, (latents, timestep, labels), 20), "launch-bound"))
        results.append(("lean reuse", graphed_ms(lean, (latents, timestep, labels, *caches), args.iters), ""))
        results.append(("gated reuse", graphed_ms(gated, (latents, gates, *caches), args.iters), ""))
        results.append(("gate table, 1 step", graphed_ms(table, (timestep, labels), args.iters), ""))
        rows_t = timestep.repeat(args.steps)
        rows_y = labels.repeat(args.steps)
        results.append(
            (f"gate table, {args.steps} steps", eager_ms(table, (rows_t, rows_y), 10), "once per generation")
        )
        reference_gated = gated(latents, gates, *caches)
        reference_lean = lean(latents, timestep, labels, *caches)
        results += sum_variants(DiTGatedResidual(model), latents, gates, caches, args.iters, on_gpu)
        if args.compile:
            for name, module, inputs, reference in (
                ("gated reuse, compiled", gated, (latents, gates, *caches), reference_gated),
                ("lean reuse, compiled", lean, (latents, timestep, labels, *caches), reference_lean),
            ):
                try:
                    begin = time.perf_counter()
                    compiled = torch.compile(module, dynamic=False)
                    out = compiled(*inputs)
                    seconds = time.perf_counter() - begin
                    error = (out.float() - reference.float()).abs().max().item()
                    ms = graphed_ms(compiled, inputs, args.iters)
                    results.append((name, ms, f"compile {seconds:.0f} s, max abs diff {error:.1e}"))
                except Exception as err:  # report and go on: this is a probe
                    results.append((name, float("nan"), f"failed: {type(err).__name__}: {err}"[:200]))

    print(f"\n{'variant':28s} {'ms':>9s} {'of full':>8s}  note")
    for name, ms, note in results:
        print(f"{name:28s} {ms:9.4f} {ms / full_ms:8.2%}  {note}")
    for interval in (3, 5):
        fulls = -(-args.steps // interval)
        for name, ms, _ in results:
            if "reuse" in name and ms == ms:
                total = fulls * full_ms + (args.steps - fulls) * ms
                print(f"N={interval} with {name:24s}: {args.steps * full_ms / total:.2f}x")

    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    with torch.no_grad(), torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(5):
            lean(latents, timestep, labels, *caches)
        if on_gpu:
            torch.cuda.synchronize()
    print("\nkernels of the eager lean reuse step (5 runs):")
    print(prof.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
