"""One arena per (session, batch size) holding every cache tensor.

The layout is computed here, backend-agnostic: each cache tensor gets an aligned
byte range of a single allocation. Backends allocate the bytes on their device
and bind the full graph's cache outputs and the reuse graph's cache inputs to the
same ranges, so caches never move between steps (zero-copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from fora_runtime.dtypes import itemsize
from fora_runtime.manifest import TensorSpec

# 256 bytes satisfies every backend we bind to (CUDA wants 256 for TensorRT IO).
ALIGNMENT = 256


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in an arena."""

    spec: TensorSpec
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ArenaLayout:
    """Byte layout of a set of tensors for one batch size."""

    batch_size: int
    slots: tuple[Slot, ...]
    nbytes: int

    @classmethod
    def plan(cls, specs: tuple[TensorSpec, ...] | list[TensorSpec], batch_size: int) -> ArenaLayout:
        slots = []
        offset = 0
        for spec in specs:
            shape = spec.concrete_shape(batch_size)
            nbytes = prod(shape) * itemsize(spec.dtype)
            slots.append(Slot(spec=spec, shape=shape, offset=offset, nbytes=nbytes))
            offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
        return cls(batch_size=batch_size, slots=tuple(slots), nbytes=offset)

    def slot(self, name: str) -> Slot:
        for slot in self.slots:
            if slot.spec.name == name:
                return slot
        raise KeyError(name)
