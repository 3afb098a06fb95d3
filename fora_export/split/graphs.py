"""The two FORA step graphs as ``nn.Module``s sharing the original weights.

- :class:`FullStepGraph` runs the whole transformer and returns the prediction
  followed by every cache tensor (raw sublayer outputs, before their gates).
- :class:`ReuseStepGraph` takes the same step inputs plus the caches; tapped
  sublayers return their cache instead of running, while the blocks still
  recompute embeddings, gates and residual sums for the current timestep.
  It takes the caches the family says a reuse step reads
  (``ModelAdapter.plain_reuse_cache_names``): a cache feeding only computations the
  reuse step leaves dead is not a graph input (exporters drop unused inputs, so the
  full graph must not write it either).

Both wrap the same model through :class:`SublayerTaps`, so the model's
state-dict keys are unchanged and ``from_pretrained`` weights are used as-is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fora_export.adapters.base import ModelAdapter
from fora_export.split.taps import SublayerTaps


class _StepGraph(nn.Module):
    """A step graph around the tapped model; ``transformer`` keeps its weights' keys."""

    def __init__(self, adapter: ModelAdapter, taps: SublayerTaps, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.transformer = adapter.model
        self._adapter = adapter
        self._taps = taps
        self.input_names = input_names
        self.cache_names = taps.cache_names


class FullStepGraph(_StepGraph):
    """The whole step; outputs the prediction and the caches named by ``cache_outputs``
    (default: all; a lean reuse graph may need fewer, e.g. only image-stream caches)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        taps: SublayerTaps,
        input_names: tuple[str, ...],
        cache_outputs: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(adapter, taps, input_names)
        if cache_outputs is not None:
            unknown = set(cache_outputs) - set(taps.cache_names)
            if unknown:
                raise ValueError(f"cache outputs {sorted(unknown)} are not recorded by the taps")
            self.cache_names = cache_outputs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self._taps.recording() as recorded:
            prediction = self._adapter.predict(dict(zip(self.input_names, inputs, strict=True)))
        return (prediction, *(recorded[name] for name in self.cache_names))


class ReuseStepGraph(_StepGraph):
    """The reuse step; takes the step inputs, then the caches named by ``cache_inputs``
    (default: all). The others feed only dead computations: replay gets zeros of their
    recorded shapes (a full step must have run), which exporters drop with the
    computations they feed."""

    def __init__(
        self,
        adapter: ModelAdapter,
        taps: SublayerTaps,
        input_names: tuple[str, ...],
        cache_inputs: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(adapter, taps, input_names)
        self.unread: tuple[str, ...] = ()
        if cache_inputs is not None:
            unknown = set(cache_inputs) - set(taps.cache_names)
            if unknown:
                raise ValueError(f"cache inputs {sorted(unknown)} are not recorded by the taps")
            self.unread = tuple(n for n in taps.cache_names if n not in cache_inputs)
            self.cache_names = cache_inputs

    def forward(self, *inputs_and_caches: torch.Tensor) -> torch.Tensor:
        count = len(self.input_names)
        inputs = dict(zip(self.input_names, inputs_and_caches[:count], strict=True))
        caches = dict(zip(self.cache_names, inputs_and_caches[count:], strict=True))
        if self.unread:
            batch = inputs_and_caches[0].shape[0]
            for name in self.unread:
                shape, dtype = self._taps.recorded_specs[name]
                caches[name] = inputs_and_caches[0].new_zeros((batch, *shape), dtype=dtype)
        with self._taps.replaying(caches):
            return self._adapter.predict(inputs)


@dataclass
class SplitModel:
    """A model split into its full and reuse step graphs (same weights)."""

    adapter: ModelAdapter
    taps: SublayerTaps
    full: FullStepGraph
    reuse: ReuseStepGraph
    input_names: tuple[str, ...]

    @property
    def cache_names(self) -> tuple[str, ...]:
        """Every cache tensor the taps record (the plain reuse graph takes them all)."""
        return self.taps.cache_names

    def full_graph(self, cache_outputs: tuple[str, ...]) -> FullStepGraph:
        """A full step graph outputting only ``cache_outputs`` (same weights and taps)."""
        if cache_outputs == self.cache_names:
            return self.full
        return FullStepGraph(self.adapter, self.taps, self.input_names, cache_outputs).eval()

    def reuse_step(self, *, lean: bool) -> tuple[nn.Module, tuple[str, ...]]:
        """The reuse step module (``lean``: the family's lean reuse graph where it has one,
        else the plain one) and the caches it takes, which the full graph then writes.
        A plain one reading fewer caches than the taps record needs a full step run first
        (:meth:`run_full`: it records their shapes)."""
        if lean:
            lean_caches = self.adapter.lean_cache_names(self.cache_names)
            module = self.adapter.lean_reuse_graph(self.input_names, lean_caches)
            if module is not None:
                return module.eval(), lean_caches
        caches = self.adapter.plain_reuse_cache_names(self.cache_names)
        if caches == self.cache_names:
            return self.reuse, caches
        return ReuseStepGraph(self.adapter, self.taps, self.input_names, caches).eval(), caches

    def run_full(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.full(*(inputs[n] for n in self.input_names))
        return outputs[0], dict(zip(self.cache_names, outputs[1:], strict=True))

    def run_reuse(self, inputs: dict[str, torch.Tensor], caches: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.reuse(*(inputs[n] for n in self.input_names), *(caches[n] for n in self.cache_names))

    def remove(self) -> None:
        self.taps.remove()


def split_model(adapter: ModelAdapter, input_names: tuple[str, ...]) -> SplitModel:
    """Tap ``adapter.model`` and build both step graphs around it (eval mode)."""
    taps = SublayerTaps(adapter.cached_points())
    # eval() on the wrappers, not just the model: exporters restore the wrapper's
    # training flag recursively afterwards, which would switch on label dropout.
    return SplitModel(
        adapter=adapter,
        taps=taps,
        full=FullStepGraph(adapter, taps, input_names).eval(),
        reuse=ReuseStepGraph(adapter, taps, input_names).eval(),
        input_names=input_names,
    )
