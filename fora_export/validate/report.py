"""What ``validate`` found, as data: graph cases, the trajectory, calibrated schedules.

Each result is truthy through ``passed`` and serialises with ``to_dict`` (the ``--json``
report); :mod:`fora_export.validate.runner` produces them, :mod:`fora_export.validate.engines`
adds the TensorRT engines' cases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fora_export.validate.compare import GRAPH_TOLERANCES, Comparison


@dataclass
class GraphCase:
    role: str
    batch_size: int
    timestep: float
    comparisons: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(self.comparisons)

    @property
    def worst(self) -> Comparison:
        return max(self.comparisons, key=lambda c: c.max_abs - c.allowed)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "role": self.role,
            "batch_size": self.batch_size,
            "timestep": self.timestep,
            "passed": self.passed,
            "max_abs": max(c.max_abs for c in self.comparisons),
            "max_rel": max(c.max_rel for c in self.comparisons),
            "worst_output": worst.name,
            "outputs": [c.to_dict() for c in self.comparisons],
        }


@dataclass
class TrajectoryResult:
    scheduler: str
    steps: int
    batch_size: int
    schedule: str
    num_full: int
    runtime_vs_fora_rel_l2: float
    tolerance: float
    fora_vs_nocache_rel_l2: float
    final_nonfinite: bool
    #: Whether the runtime's reuse steps read gates precomputed at start().
    gate_table: bool = False
    #: Whether the runtime's reuse steps forecast the caches (and so the reference does).
    forecast: bool = False
    #: The steps at which the runtime ran the full graph.
    ran_full_steps: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.final_nonfinite and self.runtime_vs_fora_rel_l2 <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class CalibratedCheck:
    """A calibrated schedule against what the runtime does with it."""

    steps: int
    file: str
    file_full_steps: list[int]
    #: The full steps of a ``schedule="calibrated"`` generation's plan.
    planned_full_steps: list[int]
    #: The steps that ran the full graph when the trajectory ran this schedule (else None).
    ran_full_steps: list[int] | None = None

    @property
    def passed(self) -> bool:
        ran = self.ran_full_steps
        return self.planned_full_steps == self.file_full_steps and (
            ran is None or ran == self.file_full_steps
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class ValidationReport:
    engine_dir: str
    backend: str
    model: str
    precision: str
    graph_cases: list[GraphCase] = field(default_factory=list)
    trajectory: TrajectoryResult | None = None
    calibrated: list[CalibratedCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        graphs_ok = all(c.passed for c in self.graph_cases)
        calibrated_ok = all(c.passed for c in self.calibrated)
        return graphs_ok and calibrated_ok and (self.trajectory is None or self.trajectory.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_dir": self.engine_dir,
            "backend": self.backend,
            "model": self.model,
            "precision": self.precision,
            "passed": self.passed,
            "graph_tolerance": asdict(GRAPH_TOLERANCES[self.precision]),
            "graphs": [c.to_dict() for c in self.graph_cases],
            "trajectory": self.trajectory.to_dict() if self.trajectory else None,
            "calibrated": [c.to_dict() for c in self.calibrated],
        }
