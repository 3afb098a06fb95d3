"""Where a generation's full steps go: the accumulated-drift criterion and its exact minimum.

``calibrate`` places the full steps of the schedule it writes with :func:`select_full_steps`
(the criterion and the dynamic program are described in :mod:`fora_export.calibrate`);
``quality``'s calibrated policy places other full-step counts from the same measured change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fora_export.errors import ConfigError


def _change_array(change: Sequence[float | None]) -> np.ndarray:
    """The per-step change as floats, step 0 (no step before it) as 0."""
    return np.array([0.0 if value is None else float(value) for value in change], dtype=np.float64)


def accumulated_drift(change: Sequence[float | None], full_steps: Sequence[int]) -> float:
    """The criterion: the sum over reuse steps t of the change accumulated since the last full
    step f before t, ``d_{f+1} + ... + d_t``."""
    d = _change_array(change)
    full = set(full_steps)
    total, since = 0.0, 0.0
    for step in range(len(d)):
        if step in full:
            since = 0.0
            continue
        since += d[step]
        total += since
    return total


def select_full_steps(change: Sequence[float | None], budget: int) -> tuple[tuple[int, ...], float]:
    """The ``budget`` full steps (step 0 among them) minimising :func:`accumulated_drift`
    over ``len(change)`` steps, exactly (the dynamic program of the module docstring), and
    that minimum. Ties go to the earliest full steps."""
    d = _change_array(change)
    steps = len(d)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= steps:
        raise ConfigError(f"--full-steps | got {budget!r} | expected 1..{steps} (the step count)")
    drift = np.cumsum(d)  # drift[t] - drift[f] = change accumulated from full step f to step t
    prefix = np.concatenate(([0.0], np.cumsum(drift)))  # prefix[x] = sum of drift[t] for t < x
    f = np.arange(steps)[:, None]
    g = np.arange(steps + 1)[None, :]
    with np.errstate(invalid="ignore"):
        # seg[f, g]: steps f+1 .. g-1 reuse full step f's caches (g = steps: to the end).
        segment = (prefix[g] - prefix[np.minimum(f + 1, steps)]) - (g - 1 - f) * drift[f]
    segment = np.where(g > f, segment, np.inf)
    best = np.full(steps, np.inf)
    best[0] = 0.0  # one full step placed, at step 0
    choices = []
    for _ in range(budget - 1):
        total = best[:, None] + segment[:, :steps]  # [previous full step f, next full step g]
        previous = np.argmin(total, axis=0)
        best = total[previous, np.arange(steps)]
        choices.append(previous)
    final = best + segment[:, steps]
    last = int(np.argmin(final))
    chosen = [last]
    for previous in reversed(choices):
        chosen.append(int(previous[chosen[-1]]))
    full_steps = tuple(sorted(chosen))
    return full_steps, float(final[last])


def uniform_full_steps(steps: int, budget: int) -> tuple[int, ...]:
    """``budget`` full steps spread evenly over ``steps`` (step 0 first): the comparison."""
    return tuple(sorted({(index * steps) // budget for index in range(budget)}))
