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
        """Every cache tensor the taps record (the plain reuse graph takes them all)."""
        return self.taps.cache_names

    def full_graph(self, cache_outputs: tuple[str, ...]) -> FullStepGraph:
        """A full step graph outputting only ``cache_outputs`` (same weights and taps)."""
        if cache_outputs == self.cache_names:
            return self.full
        return FullStepGraph(self.adapter, self.taps, self.input_names, cache_outputs).eval()

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
