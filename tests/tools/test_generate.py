"""tools/generate.py, the README's runtime example, samples end to end with the runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_generate_script_samples_with_the_runtime(tiny_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "latents.npy"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "generate.py"),
            str(tiny_engine),
            "--steps",
            "7",
            "--labels",
            "1,2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "7 steps, 3 full (full every 3 steps (paper))" in result.stdout
    latents = np.load(out)
    assert latents.shape == (2, 4, 8, 8) and np.isfinite(latents).all()


def test_generate_with_classifier_free_guidance(tiny_engine: Path, tmp_path: Path) -> None:
    # Two labels plus their null-class twins: batch 4, the top of the built range.
    runs = {}
    for guidance in ("1", "4"):
        out = tmp_path / f"latents-{guidance}.npy"
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "generate.py"),
                str(tiny_engine),
                "--steps",
                "4",
                "--labels",
                "1,2",
                "--guidance",
                guidance,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        runs[guidance] = np.load(out)
    assert runs["4"].shape == (2, 4, 8, 8) and np.isfinite(runs["4"]).all()
    assert not np.allclose(runs["1"], runs["4"])  # guidance changes the samples
