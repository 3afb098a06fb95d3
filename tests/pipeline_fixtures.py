"""Tiny diffusers pipelines saved with save_pretrained, and engine folders built from
their transformers (ONNX graphs and CPU torch programs in one folder), once per session.

The DiT has 1000 classes because DiTPipeline's guidance uses the null class 1000; the
PixArt pipeline has a one-layer T5 encoder and an offline word-level tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_dit, make_demo_pixart
from fora_export.demo_pipelines import make_dit_pipeline, make_pixart_pipeline, make_vae

PIPELINE_DIT = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
}
PIPELINE_PIXART = {
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
#: Caption tokens of the PixArt build (pipelines pass max_sequence_length=16).
PIXART_TEXT_LENGTH = 16


def tiny_vae() -> object:
    return make_vae(4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)


@pytest.fixture(scope="session")
def dit_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "dit"
    make_dit_pipeline(make_demo_dit(PIPELINE_DIT), vae=tiny_vae()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def pixart_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "pixart"
    pipe = make_pixart_pipeline(
        make_demo_pixart(PIPELINE_PIXART), vae=tiny_vae(), max_length=PIXART_TEXT_LENGTH
    )
    pipe.save_pretrained(folder)
    return folder


def _build(source: Path, out: Path, **options: object) -> Path:
    config = BuildConfig.from_options(batch="1:2:4", backend="torch", device="cpu", **options)
    build(str(source), out, config, progress=False)
    return out


@pytest.fixture(scope="session")
def dit_pipeline_engine(tmp_path_factory: pytest.TempPathFactory, dit_pipeline_dir: Path) -> Path:
    return _build(dit_pipeline_dir, tmp_path_factory.mktemp("engines") / "dit-pipeline")


@pytest.fixture(scope="session")
def pixart_pipeline_engine(tmp_path_factory: pytest.TempPathFactory, pixart_pipeline_dir: Path) -> Path:
    return _build(
        pixart_pipeline_dir,
        tmp_path_factory.mktemp("engines") / "pixart-pipeline",
        caption_length=PIXART_TEXT_LENGTH,
    )
