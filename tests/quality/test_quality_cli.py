"""``fora-export quality`` end to end on the trained demo-digits engine, and its input checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.quality.quality_cli import STEPS, rows, run_cli, small_quality_report

#: Uncached samples score the classifier's accuracy on held-out real digits within this
#: margin: 40 samples make one sample 2.5 points (binomial sd ~5 points at 90%), and the
#: model's own errors (about 5 points at 20 steps) come on top.
ACCURACY_MARGIN = 0.15


@pytest.fixture(scope="module")
def report(digits_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("quality")
    return small_quality_report(
        digits_engine, out, "--save-json", str(out / "quality.json"), "--plot", str(out / "plot.png")
    )


def test_report_lists_every_schedule_with_its_full_steps(report: dict) -> None:
    by_label = rows(report)
    assert list(by_label) == ["no caching (N=1)", "N=3 paper", f"list 1 ({STEPS} full)", "list 2 (1 full)"]
    assert [r["num_full"] for r in by_label.values()] == [STEPS, 7, STEPS, 1]
    assert report["steps"] == STEPS and report["samples_per_class"] == 4
    assert all(r["seconds"] > 0 and len(r["runs_seconds"]) == 1 for r in by_label.values())
    assert by_label["no caching (N=1)"]["speedup"] == 1.0
    assert json.loads(Path(report["_out"], "quality.json").read_text())["schedules"] == report["schedules"]


def test_identical_schedules_give_infinite_psnr_and_zero_distance(report: dict) -> None:
    by_label = rows(report)
    reference, same = by_label["no caching (N=1)"], by_label[f"list 1 ({STEPS} full)"]
    for row in (reference, same):
        assert row["psnr_db"] is None  # infinite: identical to the uncached samples
        assert row["rel_l2"] == 0.0
    # The same samples score the same against the real digits.
    assert same["accuracy"] == reference["accuracy"]
    assert same["frechet"] == reference["frechet"]


def test_uncached_samples_score_like_real_digits(report: dict) -> None:
    reference = rows(report)["no caching (N=1)"]
    # Within the margin both ways: far above the real digits would mean a broken metric.
    assert abs(reference["accuracy"] - report["classifier_accuracy"]) <= ACCURACY_MARGIN


def test_a_broken_schedule_scores_worse(report: dict) -> None:
    by_label = rows(report)
    reference, fora, broken = by_label["no caching (N=1)"], by_label["N=3 paper"], by_label["list 2 (1 full)"]
    assert broken["psnr_db"] < fora["psnr_db"]
    assert broken["rel_l2"] > fora["rel_l2"]
    assert broken["accuracy"] < reference["accuracy"]
    assert broken["frechet"] > reference["frechet"]


def test_plot_and_grid_are_written(report: dict) -> None:
    for name in ("plot.png", "grid.png"):
        assert Path(report["_out"], name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(digits_engine: Path) -> None:
    code, stdout, stderr = run_cli(
        "quality", str(digits_engine), "--samples", "1", "--steps", "4", "--intervals", "2", "--repeats", "2"
    )
    assert code == 0, stderr
    assert "N=2 paper" in stdout and "N=2 reference" in stdout and "PSNR" in stdout


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--schedule-list", "1,2"], "step 0 must be full"),
        (["--schedule-list", "0,50", "--steps", "20"], "past the last step"),
        (["--schedule-list", "0,x"], "--schedule-list | got '0,x'"),
        (["--intervals", "0"], "--intervals | got 0"),
        (["--samples", "0"], "--samples | got 0"),
        (["--batch", "41"], "--batch | got 41"),
        (["--plot", "missing/plot.png"], "does not exist"),
        (["--grid", "grid.txt"], "unknown image type"),
        (["--save-json", "."], "is a folder"),
    ],
)
def test_bad_options_fail_in_one_line_before_any_work(
    digits_engine: Path, args: list[str], pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fora_export.quality.runner as runner

    def no_work(*_: object, **__: object) -> None:
        raise AssertionError("sampling started before the options were checked")

    monkeypatch.setattr(runner, "run_quality", no_work)
    code, _, stderr = run_cli("quality", str(digits_engine), *args)
    assert code == 2
    assert pattern in stderr and len(stderr.strip().splitlines()) == 1


def test_refuses_engines_that_are_not_digit_models(tiny_engine: Path) -> None:
    code, _, stderr = run_cli("quality", str(tiny_engine))
    assert code == 2
    assert "quality scores 8x8 digit models" in stderr and "demo-digits" in stderr


def test_missing_scikit_learn_is_one_line(digits_engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    code, _, stderr = run_cli("quality", str(digits_engine))
    assert code == 2
    assert "scikit-learn is not installed" in stderr and "fora-export[quality]" in stderr
