"""``validate --pipeline`` (a pipeline call with its own scheduler and guidance, engines vs
PyTorch FORA) and ``validate --report`` (per-step error plot, image grid)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.helpers import run_cli


def test_validate_with_a_pipeline_and_a_report(
    dit_pipeline_dir: Path, dit_pipeline_engine: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    code, stdout, stderr = run_cli(
        "validate",
        str(dit_pipeline_engine),
        "--pipeline",
        str(dit_pipeline_dir),
        "--guidance",
        "4",
        "--steps",
        "5",
        "--batch-sizes",
        "2",
        "--report",
        str(report),
        "--json",
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    pipeline = result["pipeline"]
    assert result["passed"] and pipeline["passed"]
    assert (pipeline["pipeline"], pipeline["scheduler"], pipeline["steps"]) == (
        "DiTPipeline",
        "DDIMScheduler",
        5,
    )
    assert pipeline["engine_vs_fora_max_abs"] <= pipeline["tolerance"] == 1e-4
    steps = json.loads((report / "steps.json").read_text())
    assert len(steps["runtime_vs_fora"]) == len(steps["fora_vs_nocache"]) == 5  # one call per step
    assert max(steps["runtime_vs_fora"]) <= 1e-5  # fp32 graphs: ~1e-6 per step
    assert steps["fora_vs_nocache"][0] == 0.0 and max(steps["fora_vs_nocache"]) > 1e-3  # step 0 is full
    assert Image.open(report / "steps.png").width > 0
    assert Image.open(report / "grid.png").height >= 2 * 64  # two images (labels 207, 360), guided


def test_report_without_a_pipeline_plots_validates_trajectory(tiny_engine: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    code, _, stderr = run_cli("validate", str(tiny_engine), "--steps", "4", "--report", str(report))
    assert code == 0, stderr
    steps = json.loads((report / "steps.json").read_text())
    assert steps["label"].startswith("validate trajectory (ddim, 4 steps")
    assert len(steps["runtime_vs_fora"]) == 4 and max(steps["runtime_vs_fora"]) <= 1e-5
    assert (report / "steps.png").is_file() and not (report / "grid.png").exists()
