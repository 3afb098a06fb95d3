"""Comparing an engine's outputs with PyTorch, as data.

A :class:`Comparison` is truthy when it passed and carries the tolerance that
would have passed, so a report says "needs 3e-4" rather than only FAIL.

Tolerances by precision (``max_abs <= atol + rtol * max|reference|``):

- fp32: atol 1e-4. Exported fp32 graphs differ from eager PyTorch by operator
  fusion and reassociation only (~5e-6 on DiT through the TorchScript exporter,
  ~5e-5 through dynamo, whose constant folding of the sinusoidal frequency
  table is 1 ulp off and multiplied by timesteps up to 999).
- fp16: rtol 1e-2 of the output's magnitude: fp16 has a 2^-11 unit roundoff and
  errors accumulate over blocks; graphs and eager fp16 round differently.
- bf16: rtol 2e-2 (bf16 roundoff is 2^-8, 8x coarser than fp16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def bound(self, reference_scale: float) -> float:
        return self.atol + self.rtol * reference_scale


GRAPH_TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=0.0),
    "fp16": Tolerance(atol=0.0, rtol=1e-2),
    "bf16": Tolerance(atol=0.0, rtol=2e-2),
}

#: Final-latent relative L2 between the runtime and PyTorch FORA trajectories.
TRAJECTORY_TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 4e-2}


@dataclass(frozen=True)
class Comparison:
    """One output of one case compared against its reference."""

    name: str
    max_abs: float
    max_rel: float  # max_abs / max|reference|
    reference_scale: float
    allowed: float
    nonfinite: bool

    @property
    def passed(self) -> bool:
        return not self.nonfinite and self.max_abs <= self.allowed

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def compare(name: str, actual: Any, reference: Any, tolerance: Tolerance) -> Comparison:
    got = to_numpy(actual).astype(np.float64)
    ref = to_numpy(reference).astype(np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"{name}: shape {got.shape} vs reference {ref.shape}")
    nonfinite = not (np.isfinite(got).all() and np.isfinite(ref).all())
    diff = np.abs(got - ref)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    scale = float(np.nanmax(np.abs(ref))) if ref.size else 0.0
    return Comparison(
        name=name,
        max_abs=max_abs,
        max_rel=max_abs / scale if scale else max_abs,
        reference_scale=scale,
        allowed=tolerance.bound(scale),
        nonfinite=nonfinite,
    )


def relative_l2(actual: Any, reference: Any) -> float:
    got = to_numpy(actual).astype(np.float64)
    ref = to_numpy(reference).astype(np.float64)
    norm = float(np.linalg.norm(ref))
    return float(np.linalg.norm(got - ref)) / norm if norm else float(np.linalg.norm(got))
