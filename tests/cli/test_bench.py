"""Bench statistics: warm-up until steady, at least five timed runs by default, median and
spread per row, and a warning where the spread makes a row suspect."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fora_export.bench import DEFAULT_REPEATS, SPREAD_WARNING, Timing, bench, warm_up
from tests.helpers import run_cli


def fake_runs(times: list[float]) -> tuple[Callable[[], float], list[float]]:
    """A run function returning ``times`` in order (the timings a machine would give)."""
    given: list[float] = []

    def run() -> float:
        given.append(times[len(given)])
        return given[-1]

    return run, given


def test_warm_up_runs_until_two_consecutive_runs_agree() -> None:
    run, given = fake_runs([900.0, 120.0, 104.0, 101.0, 100.0])
    assert warm_up(run) == (4, True)  # 104 -> 101 is within 10%; 120 -> 104 is not
    assert given == [900.0, 120.0, 104.0, 101.0]
    run, given = fake_runs([100.0, 50.0] * 10)
    assert warm_up(run, max_runs=6) == (6, False)  # never settles: stops, and says so


def test_timing_reports_median_quartiles_and_flags_a_wide_spread() -> None:
    steady = Timing([10.0, 10.2, 10.1, 9.9, 10.0])
    assert steady.median_ms == 10.0 and steady.quartiles_ms == (10.0, 10.1)
    assert steady.problem("N=3") is None
    busy = Timing([10.0, 10.0, 30.0, 31.0, 29.0])  # one busy stretch in five runs
    assert busy.spread > SPREAD_WARNING
    problem = busy.problem("N=3")
    assert problem is not None and problem.startswith("N=3: spread 69% of the median")
    data = busy.to_dict()
    assert (data["median_ms"], data["q1_ms"], data["q3_ms"], data["min_ms"], data["max_ms"]) == (
        29.0,
        10.0,
        30.0,
        10.0,
        31.0,
    )
    unsettled = Timing([10.0] * 5, warmup_runs=8, steady=False)
    assert "warm-up did not settle in 8 runs" in (unsettled.problem("full step") or "")


def test_bench_times_five_runs_per_row_by_default(tiny_engine: Path) -> None:
    report = bench(tiny_engine, steps=3, intervals=(1, 3), step_runs=5)
    assert DEFAULT_REPEATS == 5
    data = report.to_dict()
    for row in data["intervals"]:
        assert len(row["runs_ms"]) == DEFAULT_REPEATS
        assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] and row["min_ms"] <= row["q1_ms"]
        low, high = row["speedup_range"]
        assert low <= row["speedup"] <= high
    assert data["intervals"][0]["warmup_runs"] >= 2  # N=1 warmed up until steady
    for step in ("full", "reuse", "gated_reuse"):
        assert len(data[step]["runs_ms"]) == 5 and data[step]["warmup_runs"] >= 2, step
    assert data["full_ms"] == data["full"]["median_ms"]
    assert data["warnings"] == report.warnings and isinstance(data["warnings"], list)


def test_bench_json_and_table_carry_the_spread(tiny_engine: Path, tmp_path: Path) -> None:
    saved = tmp_path / "bench.json"
    args = ("bench", str(tiny_engine), "--steps", "3", "--intervals", "1,3", "--no-eager")
    code, stdout, _ = run_cli(*args, "--repeats", "2", "--save-json", str(saved))
    assert code == 0
    assert "median of 2 runs" in stdout and "IQR" in stdout and "spread" in stdout
    (run,) = json.loads(saved.read_text())["runs"]
    assert {"q1_ms", "q3_ms", "spread", "runs_ms", "warmup_runs"} <= set(run["intervals"][1])


@pytest.mark.parametrize("repeats", ["0", "-1"])
def test_repeats_must_be_positive(tiny_engine: Path, repeats: str) -> None:
    code, _, stderr = run_cli("bench", str(tiny_engine), "--repeats", repeats)
    assert code == 2 and "--repeats" in stderr
