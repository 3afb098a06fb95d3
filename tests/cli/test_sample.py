"""``fora-export sample``: a pipeline's images with the engines, without cache and with
PyTorch FORA, written as PNGs and one grid."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_user_error, run_cli


def test_sample_writes_the_images_and_the_grid(
    dit_pipeline_dir: Path, dit_pipeline_engine: Path, tmp_path: Path
) -> None:
    out = tmp_path / "samples"
    code, stdout, stderr = run_cli(
        "sample",
        str(dit_pipeline_engine),
        "--pipeline",
        str(dit_pipeline_dir),
        "--class-label",
        "1",
        "--class-label",
        "2",
        "--steps",
        "4",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    assert "4 steps, full every 3 steps (paper)" in stdout
    engine_vs_fora = float(re.search(r"engine vs PyTorch FORA ([0-9.e+-]+)", stdout).group(1))
    assert engine_vs_fora <= 1e-4
    for prefix in ("engine", "nocache", "fora"):
        assert sorted(p.name for p in out.glob(f"{prefix}-*.png")) == [f"{prefix}-{i}.png" for i in range(2)]
    engine = np.asarray(Image.open(out / "engine-0.png"), dtype=np.float32)
    fora = np.asarray(Image.open(out / "fora-0.png"), dtype=np.float32)
    assert engine.shape == (64, 64, 3) and np.abs(engine - fora).max() <= 1  # one 8-bit step at most
    grid = Image.open(out / "grid.png")
    assert grid.width >= 3 * 64 and grid.height >= 2 * 64  # three columns, two rows


def test_sample_user_errors(dit_pipeline_dir: Path, dit_pipeline_engine: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli(
        "sample", str(dit_pipeline_engine), "--pipeline", str(tmp_path / "typo"), "--out", str(tmp_path)
    )
    assert_user_error(code, stderr, r"--pipeline .*typo' \| no such folder")
    code, _, stderr = run_cli(
        "sample",
        str(dit_pipeline_engine),
        "--pipeline",
        str(dit_pipeline_dir),
        "--prompt",
        "a cat",
        "--out",
        str(tmp_path),
    )
    assert_user_error(code, stderr, r"--prompt \| DiTPipeline is class-conditional")
    code, _, stderr = run_cli(
        "sample",
        str(dit_pipeline_engine),
        "--pipeline",
        str(dit_pipeline_dir),
        "--class-label",
        "1,2,3",
        "--guidance",
        "4",
        "--out",
        str(tmp_path),
    )
    assert_user_error(code, stderr, r"passed 6 samples .* rebuild with --batch 1:2:6")


def test_sample_a_text_pipeline(
    pixart_pipeline_dir: Path, pixart_pipeline_engine: Path, tmp_path: Path
) -> None:
    """Prompts, the built size (height/width, resolution binning off) and prompt length
    (max_sequence_length) come from the engines."""
    folder, engine = pixart_pipeline_dir, pixart_pipeline_engine
    out = tmp_path / "samples"
    code, stdout, stderr = run_cli(
        "sample",
        str(engine),
        "--pipeline",
        str(folder),
        "--prompt",
        "a red cat",
        "--steps",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    assert float(re.search(r"engine vs PyTorch FORA ([0-9.e+-]+)", stdout).group(1)) <= 1e-4
    assert np.asarray(Image.open(out / "engine-0.png")).shape == (64, 64, 3)


@pytest.mark.slow
def test_sample_a_video_pipeline(wan_pipeline_dir: Path, wan_pipeline_engine: Path, tmp_path: Path) -> None:
    """Wan: the built frame count (num_frames = 4 (F - 1) + 1), animated WebP files and grid."""
    out = tmp_path / "samples"
    code, stdout, stderr = run_cli(
        "sample",
        str(wan_pipeline_engine),
        "--pipeline",
        str(wan_pipeline_dir),
        "--prompt",
        "a red cat",
        "--steps",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    assert float(re.search(r"engine vs PyTorch FORA ([0-9.e+-]+)", stdout).group(1)) <= 1e-4
    video = Image.open(out / "engine-0.webp")
    assert video.is_animated and video.n_frames == 5 and video.size == (64, 64)
    assert Image.open(out / "grid.webp").n_frames == 5
