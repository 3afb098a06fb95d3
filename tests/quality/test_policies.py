"""``fora-export quality --policies``: calibrated and forecast policies at equal full steps,
on the trained demo-digits weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.quality.quality_cli import run_cli

STEPS = 20
POLICIES = "static,calibrated,forecast,calibrated+forecast"


@pytest.fixture(scope="module")
def calibrated_engine(digits_forecast_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    engine = tmp_path_factory.mktemp("calibrated") / "engine"
    shutil.copytree(digits_forecast_engine, engine)
    # 7 full steps: N=3's count at 20 steps, so that row is the file's own schedule.
    code, _, stderr = run_cli(
        "calibrate", str(engine), "--steps", str(STEPS), "--full-steps", "7", "--samples", "20"
    )
    assert code == 0, stderr
    return engine


@pytest.fixture(scope="module")
def report(calibrated_engine: Path) -> dict:
    code, stdout, stderr = run_cli(
        "quality", str(calibrated_engine), "--samples", "4", "--steps", str(STEPS), "--repeats", "1",
        "--intervals", "1,3,5", "--schedule-mode", "paper", "--policies", POLICIES, "--json",
    )  # fmt: skip
    assert code == 0, stderr
    return json.loads(stdout)


def test_every_policy_runs_at_the_static_full_steps(report: dict, calibrated_engine: Path) -> None:
    by_label = {row["label"]: row for row in report["schedules"]}
    for n, full in ((3, 7), (5, 4)):
        static = by_label[f"N={n} paper"]
        assert static["num_full"] == full and not static["forecast"]
        forecast = by_label[f"forecast N={n}"]
        assert forecast["schedule"] == static["schedule"] and forecast["forecast"]
        calibrated = by_label[f"calibrated {full} full"]
        both = by_label[f"calibrated+forecast {full} full"]
        assert calibrated["num_full"] == both["num_full"] == full
        assert calibrated["schedule"]["full_steps"] == both["schedule"]["full_steps"] != static["schedule"]
        assert not calibrated["forecast"] and both["forecast"]
    # The calibrated row of the file's own budget is the schedule the runtime reads from it.
    manifest = json.loads((calibrated_engine / "manifest.json").read_text())
    record = json.loads((calibrated_engine / manifest["calibrated_schedules"][str(STEPS)]).read_text())
    assert by_label["calibrated 7 full"]["schedule"] == {
        "kind": "calibrated",
        "steps": STEPS,
        "full_steps": record["full_steps"],
    }


def test_forecasting_beats_plain_reuse_on_trained_weights(report: dict) -> None:
    """First-order forecasts track the caches between full steps better than repeating them
    (features of a trained model change smoothly): higher PSNR at equal full steps."""
    by_label = {row["label"]: row for row in report["schedules"]}
    for n in (3, 5):
        assert by_label[f"forecast N={n}"]["psnr_db"] > by_label[f"N={n} paper"]["psnr_db"] + 1.0


@pytest.mark.parametrize(
    ("policies", "engine", "pattern"),
    [
        ("calibrated", "digits_forecast_engine", "there is none | run fora-export calibrate"),
        ("forecast", "digits_engine", "rebuild with --forecast"),
        ("static,bogus", "digits_engine", "--policies | got static,bogus"),
    ],
)
def test_policies_the_engines_cannot_serve_are_one_line_errors(
    policies: str, engine: str, pattern: str, request: pytest.FixtureRequest
) -> None:
    folder = request.getfixturevalue(engine)
    code, _, stderr = run_cli("quality", str(folder), "--steps", str(STEPS), "--policies", policies)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and pattern in lines[0] and lines[0].count(" | ") == 2, stderr
