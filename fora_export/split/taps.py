"""Record/replay taps on a transformer's cacheable sublayers.

FORA caches the raw outputs of each block's attention and feed-forward
sublayers. A tap replaces a sublayer instance's ``forward`` (like diffusers'
``HookRegistry``), so the model's state-dict keys stay unchanged and the block's
own forward still computes and applies the gates:

- ``passthrough``: the sublayer runs as usual;
- ``record``: the sublayer runs and its output is recorded;
- ``replay``: the sublayer does not run; its output is rebuilt from the given caches.

A sublayer whose output is several tensors (a joint attention returns the image
and the context stream's outputs) is cached as several parts, one cache tensor
each; replay rebuilds the output from them.

A forward pre-hook cannot skip a module, which is why the forward is replaced.
``remove()`` restores the original forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch

from fora_export.adapters.cache_point import CachePoint

TapMode = Literal["passthrough", "record", "replay"]


class SublayerTaps:
    """Installs record/replay forwards on a list of cache points."""

    def __init__(self, points: Sequence[CachePoint]) -> None:
        names = [p.name for p in points]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate cache points: {names}")
        self.points = tuple(points)
        #: Every cache tensor, point by point and part by part.
        self.cache_names = tuple(name for point in self.points for name in point.cache_names)
        self.mode: TapMode = "passthrough"
        self.recorded: dict[str, torch.Tensor] = {}
        #: Per cache tensor, its shape past the batch axis and its dtype, as last recorded.
        self.recorded_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._replay: dict[str, torch.Tensor] = {}
        self._originals: dict[str, Callable[..., Any]] = {}
        for point in self.points:
            if "forward" in vars(point.module):
                raise RuntimeError(f"{point.name}: sublayer forward is already replaced (tapped twice?)")
            original = point.module.forward
            self._originals[point.name] = original
            point.module.forward = self._make_forward(point, original)  # type: ignore[method-assign]

    def _make_forward(self, point: CachePoint, original: Callable[..., Any]) -> Callable[..., Any]:
        def tapped_forward(*args: Any, **kwargs: Any) -> Any:
            if self.mode == "replay":
                return point.rebuild(self._replay)
            output = original(*args, **kwargs)
            if self.mode == "record":
                tensors = point.record(output)
                self.recorded.update(tensors)
                for name, tensor in tensors.items():
                    self.recorded_specs[name] = (tuple(tensor.shape[1:]), tensor.dtype)
            return output

        return tapped_forward

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """Run the model inside; yields the dict the cache outputs are recorded into."""
        self.recorded = {}
        self.mode = "record"
        try:
            yield self.recorded
        finally:
            self.mode = "passthrough"

    @contextmanager
    def replaying(self, caches: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run the model inside with every tapped sublayer returning its cache."""
        missing = [name for name in self.cache_names if name not in caches]
        if missing:
            raise KeyError(f"replay needs every cache tensor; missing {missing[:3]}...")
        self._replay = caches
        self.mode = "replay"
        try:
            yield
        finally:
            self.mode = "passthrough"
            self._replay = {}

    def remove(self) -> None:
        """Restore the original forwards."""
        for point in self.points:
            if "forward" in vars(point.module):
                del point.module.forward
        self._originals.clear()
