"""Valid random step inputs from a manifest alone: what bench times and validate's engine
comparison feeds, without the PyTorch model."""

from __future__ import annotations

from typing import Any

import numpy as np

from fora_runtime.dtypes import numpy_dtype
from fora_runtime.manifest import InputSpec, Manifest


def random_step_inputs(
    manifest: Manifest, specs: tuple[InputSpec, ...], batch: int, seed: int
) -> dict[str, Any]:
    """Valid random inputs for every step input, from the manifest alone."""
    rng = np.random.default_rng(seed)
    ranges = manifest.conditioning.input_ranges
    inputs: dict[str, Any] = {}
    for spec in specs:
        shape = spec.concrete_shape(batch)
        dtype = numpy_dtype(spec.dtype)
        if spec.role == "timestep":
            high = manifest.denoising.timestep_range[1] if manifest.denoising else 999.0
            inputs[spec.name] = np.full(shape, high, dtype=dtype)
        elif spec.name in ranges and tuple(ranges[spec.name]) == (0, 1):
            inputs[spec.name] = np.ones(shape, dtype=dtype)  # masks and flags: every token kept
        elif spec.dtype == "int64":
            low, high = ranges.get(spec.name, (1, 1))
            inputs[spec.name] = rng.integers(int(low), int(high) + 1, size=shape, dtype=np.int64)
        else:
            inputs[spec.name] = rng.standard_normal(shape).astype(dtype)
    return inputs
