"""Acceptance: exported graphs match PyTorch per graph and over a trajectory."""

from __future__ import annotations

from pathlib import Path

import pytest

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.errors import ConfigError
from fora_export.validate.runner import validate
from fora_runtime import CacheSchedule
from fora_runtime.manifest import GraphRole


def assert_fp32_parity(report) -> None:
    assert report.graph_cases, "no graph cases ran"
    for case in report.graph_cases:
        for comparison in case.comparisons:
            assert comparison.max_abs <= 1e-4, (case.role, case.batch_size, case.timestep, comparison)
    assert report.trajectory.runtime_vs_fora_rel_l2 <= 1e-4
    assert report.passed


def test_tiny_dit_fp32(tiny_engine: Path) -> None:
    report = validate(tiny_engine, steps=20)
    assert_fp32_parity(report)
    # Full graph: prediction + 4 caches compared; reuse: prediction.
    assert {len(c.comparisons) for c in report.graph_cases if c.role == GraphRole.FULL} == {5}
    assert sorted({c.batch_size for c in report.graph_cases}) == [1, 2, 4]
    # FORA approximates: with random weights it must drift from no-cache, measurably.
    assert report.trajectory.fora_vs_nocache_rel_l2 > 1e-4


def test_other_dit_configuration_fp32(other_dit_dir: Path, tmp_path: Path) -> None:
    # learn_sigma off, 3 blocks, 3 heads, patch 4, 3 channels, 7 classes; reference schedule.
    out = tmp_path / "other"
    build(
        str(other_dit_dir),
        out,
        BuildConfig.from_options(batch="1:3:5", interval=2, schedule_mode="reference"),
        progress=False,
    )
    report = validate(out, steps=15, scheduler="dpm")
    assert_fp32_parity(report)
    assert report.trajectory.num_full == 8  # reference reading, S=15, N=2


@pytest.mark.slow
def test_demo_dit_fp32(demo_dit_engine: Path) -> None:
    # 10 steps (4 full at N=3): the demo at its real size; the 20-step runs are the tiny DiT's.
    report = validate(demo_dit_engine, steps=10, batch_sizes=[2])
    assert_fp32_parity(report)


def test_fp16_graphs_validate_on_onnxruntime_cpu(tiny_dit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    build(str(tiny_dit_dir), out, BuildConfig.from_options(precision="fp16"), progress=False)
    report = validate(out, steps=20)
    assert report.precision == "fp16"
    for case in report.graph_cases:
        assert all(c.max_rel <= 1e-2 and not c.nonfinite for c in case.comparisons), case.to_dict()
    assert report.trajectory.runtime_vs_fora_rel_l2 <= 2e-2
    assert report.passed


def test_detects_a_wrong_engine(tiny_engine: Path, other_dit_dir: Path) -> None:
    with pytest.raises(ConfigError, match="config differs from the one the engines were built from"):
        validate(tiny_engine, model=str(other_dit_dir), steps=2)


def test_fails_when_outputs_differ(engine_copy: Path, tiny_dit_dir: Path, tmp_path: Path) -> None:
    # Same config, different weights: every comparison must fail, with the tolerance it needed.
    from tests.tiny_models import TINY_DIT, save_dit

    impostor = save_dit(tmp_path / "impostor", TINY_DIT, seed=123)
    report = validate(engine_copy, model=str(impostor), steps=4, batch_sizes=[2])
    assert not report.passed
    assert not any(case.passed for case in report.graph_cases)
    assert report.graph_cases[0].worst.max_abs > 1e-2
    assert not report.trajectory.passed


def test_trajectory_schedule_override(tiny_engine: Path) -> None:
    report = validate(tiny_engine, steps=10, graphs=False, schedule=CacheSchedule.interval_of(5))
    assert report.trajectory.num_full == 2
    assert report.graph_cases == []


def test_batch_size_outside_range_is_refused(tiny_engine: Path) -> None:
    with pytest.raises(ConfigError, match="outside the built range 1:2:4"):
        validate(tiny_engine, batch_sizes=[8])
