"""The PyTorch reference of forecast reuse (``build --forecast``), independent of the graphs.

Where the engines fold the forecast into the gates of a weighted sum over two cache
generations (``fora_export.adapters.gated.ForecastGatedReuse``), the reference forecasts
the cache tensors themselves, ``A(t) = A_k + w (A_k - A_j)`` with ``w = (t - t_k) /
(t_k - t_j)`` from the last two full steps j < k, and replays them through the model's
own blocks (the split's plain reuse), so validate compares two different computations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def forecast_weight(timestep: torch.Tensor, last: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """``(t - t_k) / (t_k - t_j)`` per sample (float64), 0 where the two full steps share a
    timestep."""
    t, t_k, t_j = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (timestep, last, before))
    span = t_k - t_j
    return torch.where(span != 0, (t - t_k) / torch.where(span != 0, span, 1.0), 0.0)


def forecast_caches(
    current: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], weight: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each cache forecast to the reuse step's time, computed in float32 (fp32 references
    match; fp16/bf16 ones round once at the end)."""
    out = {}
    for name, value in current.items():
        w = weight.to(torch.float32).reshape(-1, *([1] * (value.dim() - 1)))
        now, before = value.float(), previous[name].float()
        out[name] = (now + w * (now - before)).to(value.dtype)
    return out


@dataclass
class ForecastHistory:
    """The last two full steps' caches and timesteps of one generation."""

    caches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    timesteps: list[torch.Tensor] = field(default_factory=list)

    def record(self, timestep: torch.Tensor, caches: dict[str, torch.Tensor]) -> None:
        self.caches = [*self.caches[-1:], caches]
        self.timesteps = [*self.timesteps[-1:], torch.as_tensor(timestep).detach().cpu()]

    def reuse_caches(self, timestep: torch.Tensor) -> dict[str, torch.Tensor]:
        """The caches a reuse step at ``timestep`` reads: forecast after two full steps, the
        last full step's before."""
        if len(self.caches) < 2:
            return self.caches[-1]
        weight = forecast_weight(
            torch.as_tensor(timestep).detach().cpu(), self.timesteps[1], self.timesteps[0]
        )
        return forecast_caches(
            self.caches[1], self.caches[0], weight.to(next(iter(self.caches[1].values())).device)
        )
