"""Shared fixtures: tiny random-weight DiTs saved with save_pretrained, and
engine folders built from them through the real CLI pipeline (built once per
test session, they take a few seconds each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_dit, make_demo_pixart
from fora_runtime.trust import KEY_ENV, FolderAccess

pytest_plugins = ["tests.pipeline_fixtures"]

#: The folders the tests build themselves are trusted (their torch programs may load).
TRUSTED = FolderAccess(trust_programs=True)


@pytest.fixture(autouse=True)
def _no_deployer_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest key in the developer's environment would make every unsigned test folder
    fail to open: tests that need one set it themselves."""
    monkeypatch.delenv(KEY_ENV, raising=False)


# learn_sigma on (out = 2 x in), 2 blocks, 2 heads of 4... patch 2 on an 8x8 latent.
TINY_DIT = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}

# Another shape on every axis the adapter reads: depth, heads, patch size, channels,
# classes, and learn_sigma off (out_channels defaults to in_channels).
OTHER_DIT = {
    "num_attention_heads": 3,
    "attention_head_dim": 4,
    "in_channels": 3,
    "out_channels": None,
    "num_layers": 3,
    "sample_size": 16,
    "patch_size": 4,
    "num_embeds_ada_norm": 7,
}


# PixArt-Sigma-like (no size conditions) and PixArt-alpha-1024-like (resolution and
# aspect-ratio conditions; hidden size divisible by 3 as those embeddings need).
TINY_PIXART = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "cross_attention_dim": 16,
    "caption_channels": 12,
    "use_additional_conditions": False,
}
OTHER_PIXART = {
    "num_attention_heads": 3,
    "attention_head_dim": 4,
    "in_channels": 3,
    "out_channels": None,
    "num_layers": 3,
    "sample_size": 12,
    "patch_size": 2,
    "cross_attention_dim": 12,
    "caption_channels": 20,
    "use_additional_conditions": True,
}


def save_pixart(folder: Path, config: dict, seed: int = 0) -> Path:
    make_demo_pixart(config, seed=seed).save_pretrained(folder)
    return folder


def save_dit(folder: Path, config: dict, seed: int = 0) -> Path:
    make_demo_dit(config, seed=seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dit(tmp_path_factory.mktemp("models") / "tiny-dit", TINY_DIT)


@pytest.fixture(scope="session")
def other_dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dit(tmp_path_factory.mktemp("models") / "other-dit", OTHER_DIT, seed=1)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory, tiny_dit_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny-fp32"
    build(str(tiny_dit_dir), out, BuildConfig.from_options(batch="1:2:4"), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_torch_engine(tmp_path_factory: pytest.TempPathFactory, tiny_dit_dir: Path) -> Path:
    """The tiny DiT with ONNX graphs and CPU torch programs, gate tables included (read-only)."""
    out = tmp_path_factory.mktemp("engines") / "tiny-torch"
    config = BuildConfig.from_options(batch="1:2:4", backend="torch", device="cpu")
    build(str(tiny_dit_dir), out, config, progress=False)
    return out


@pytest.fixture
def engine_copy(tiny_engine: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny engine folder, safe to tamper with."""
    import shutil

    target = tmp_path / "engine"
    shutil.copytree(tiny_engine, target)
    return target
