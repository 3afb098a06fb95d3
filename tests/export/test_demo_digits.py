"""demo-digits and demo-digits-flow: trained weights shipped in the package, loaded offline
through the normal local-folder path (diffusers from_pretrained), and packaged into the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fora_export.demo import DEMO_DIGITS_DIR, DEMO_DIGITS_FLOW_DIR
from fora_export.loading import load_model
from fora_export.quality.conditioning import CLASS_CONDITIONING_FILE

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_demo_digits_loads_the_committed_weights_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("demo-digits")
    assert loaded.class_name == "DiTTransformer2DModel" and loaded.source == "demo-digits"
    config = loaded.model.config
    assert (config.in_channels, config.sample_size, config.num_embeds_ada_norm) == (1, 8, 10)
    saved = load_file(DEMO_DIGITS_DIR / WEIGHTS)
    state = loaded.model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[name], state[name]) for name in saved)  # trained, not initialised
    # The blocks carry one embedder's weights (trained tied), as converted DiT checkpoints do.
    first = loaded.model.transformer_blocks[0].norm1.emb.state_dict()
    for block in loaded.model.transformer_blocks[1:]:
        assert all(torch.equal(first[k], v) for k, v in block.norm1.emb.state_dict().items())
    assert (DEMO_DIGITS_DIR / WEIGHTS).stat().st_size < 4 * 2**20  # small enough to commit


def test_demo_digits_flow_loads_the_committed_weights_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("demo-digits-flow")
    assert loaded.class_name == "SD3Transformer2DModel" and loaded.source == "demo-digits-flow"
    config = loaded.model.config
    assert (config.in_channels, config.sample_size, config.patch_size) == (1, 8, 2)
    saved = load_file(DEMO_DIGITS_FLOW_DIR / WEIGHTS)
    state = loaded.model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[name], state[name]) for name in saved)
    # Trained: the adaLN projections start at zero (tools/train_digits.py) and are not now.
    assert loaded.model.transformer_blocks[0].norm1.linear.weight.abs().max() > 0
    size = sum(path.stat().st_size for path in DEMO_DIGITS_FLOW_DIR.iterdir())
    assert size < 4 * 2**20  # small enough to commit


def test_the_wheel_ships_the_weights(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="builds the wheel with the installed setuptools")
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the work tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "fora_export", source / "fora_export", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("fora_export-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("config.json", WEIGHTS, "training_log.json"):
        assert f"fora_export/demo_weights/digits/{name}" in names
    for name in ("config.json", WEIGHTS, "training_log.json", CLASS_CONDITIONING_FILE):
        assert f"fora_export/demo_weights/digits-flow/{name}" in names
