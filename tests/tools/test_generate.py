"""tools/generate.py, the README's runtime example, samples end to end with the runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def run_generate(engine: Path, out: Path, *options: str) -> tuple[str, np.ndarray]:
    """Run tools/generate.py; its stdout and the latents it saved."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), str(engine), *options, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, np.load(out)


def test_generate_script_samples_with_the_runtime(tiny_engine: Path, tmp_path: Path) -> None:
    stdout, latents = run_generate(tiny_engine, tmp_path / "latents.npy", "--steps", "7", "--labels", "1,2")
    assert "7 steps, 3 full (full every 3 steps (paper))" in stdout
    assert latents.shape == (2, 4, 8, 8) and np.isfinite(latents).all()


def test_generate_with_classifier_free_guidance(tiny_engine: Path, tmp_path: Path) -> None:
    # Two labels plus their null-class twins: batch 4, the top of the built range.
    runs = {
        guidance: run_generate(
            tiny_engine,
            tmp_path / f"latents-{guidance}.npy",
            "--steps",
            "4",
            "--labels",
            "1,2",
            "--guidance",
            guidance,
        )[1]
        for guidance in ("1", "4")
    }
    assert runs["4"].shape == (2, 4, 8, 8) and np.isfinite(runs["4"]).all()
    assert not np.allclose(runs["1"], runs["4"])  # guidance changes the samples
