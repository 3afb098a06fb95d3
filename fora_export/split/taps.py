"""Record/replay taps on a transformer's cacheable sublayers.

FORA caches the raw outputs of each block's attention and feed-forward
sublayers. A tap replaces a sublayer instance's ``forward`` (like diffusers'
``HookRegistry``), so the model's state-dict keys stay unchanged and the block's
own forward still computes and applies the gates:

- ``passthrough``: the sublayer runs as usual;
- ``record``: the sublayer runs and its output is recorded;
- ``replay``: the sublayer does not run; the given cache tensor is returned.

A forward pre-hook cannot skip a module, which is why the forward is replaced.
``remove()`` restores the original forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

TapMode = Literal["passthrough", "record", "replay"]


@dataclass(frozen=True)
class CachePoint:
    """One cacheable sublayer: block index, sublayer kind and the module itself."""

    block: int
    kind: str
    module: nn.Module

    @property
    def name(self) -> str:
        return f"cache.{self.block}.{self.kind}"


class SublayerTaps:
    """Installs record/replay forwards on a list of cache points."""

    def __init__(self, points: Sequence[CachePoint]) -> None:
        names = [p.name for p in points]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate cache points: {names}")
        self.points = tuple(points)
        self.mode: TapMode = "passthrough"
        self.recorded: dict[str, torch.Tensor] = {}
        self._replay: dict[str, torch.Tensor] = {}
        self._originals: dict[str, Callable[..., Any]] = {}
        for point in self.points:
            if "forward" in vars(point.module):
                raise RuntimeError(f"{point.name}: sublayer forward is already replaced (tapped twice?)")
            original = point.module.forward
            self._originals[point.name] = original
            point.module.forward = self._make_forward(point.name, original)  # type: ignore[method-assign]

    def _make_forward(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def tapped_forward(*args: Any, **kwargs: Any) -> Any:
            if self.mode == "replay":
                return self._replay[name]
            output = original(*args, **kwargs)
            if self.mode == "record":
                self.recorded[name] = output
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
        missing = [p.name for p in self.points if p.name not in caches]
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
