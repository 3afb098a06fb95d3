"""A family's cache points as data: which sublayer of which block FORA caches, and how its
output is cached as tensors (the family files declare them; ``fora_export.split.taps``
records and replays them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _as_tuple(output: Any) -> tuple[torch.Tensor, ...]:
    return tuple(output)


@dataclass(frozen=True)
class CachePoint:
    """One cacheable sublayer: block index, sublayer kind and the module itself.

    ``parts`` names the tensors its output is cached as: one unnamed part for a
    sublayer returning one tensor; otherwise ``split(output)`` gives one tensor per
    part and ``join(parts)`` rebuilds the output (default: the output is the tuple
    of parts, in order).
    """

    block: int
    kind: str
    module: nn.Module
    parts: tuple[str, ...] = ("",)
    split: Callable[[Any], tuple[torch.Tensor, ...]] = _as_tuple
    join: Callable[[tuple[torch.Tensor, ...]], Any] = tuple

    @property
    def name(self) -> str:
        return f"cache.{self.block}.{self.kind}"

    @property
    def cache_names(self) -> tuple[str, ...]:
        """One cache tensor name per part: ``cache.<block>.<kind>[.<part>]``."""
        return tuple(f"{self.name}.{part}" if part else self.name for part in self.parts)

    def record(self, output: Any) -> dict[str, torch.Tensor]:
        if self.parts == ("",):
            return {self.name: output}
        tensors = self.split(output)
        return dict(zip(self.cache_names, tensors, strict=True))

    def rebuild(self, caches: dict[str, torch.Tensor]) -> Any:
        if self.parts == ("",):
            return caches[self.name]
        return self.join(tuple(caches[name] for name in self.cache_names))
