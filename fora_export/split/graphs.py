"""The two FORA step graphs as ``nn.Module``s sharing the original weights.

- :class:`FullStepGraph` runs the whole transformer and returns the prediction
  followed by every cache tensor (raw sublayer outputs, before their gates).
- :class:`ReuseStepGraph` takes the same step inputs plus the caches; tapped
  sublayers return their cache instead of running, while the blocks still
  recompute embeddings, gates and residual sums for the current timestep.

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
        self.cache_names = tuple(p.name for p in taps.points)


class FullStepGraph(_StepGraph):
    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self._taps.recording() as recorded:
            prediction = self._adapter.predict(dict(zip(self.input_names, inputs, strict=True)))
        return (prediction, *(recorded[p.name] for p in self._taps.points))


class ReuseStepGraph(_StepGraph):
    def forward(self, *inputs_and_caches: torch.Tensor) -> torch.Tensor:
        count = len(self.input_names)
        inputs = dict(zip(self.input_names, inputs_and_caches[:count], strict=True))
        caches = dict(zip(self.cache_names, inputs_and_caches[count:], strict=True))
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
        return tuple(p.name for p in self.taps.points)

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
