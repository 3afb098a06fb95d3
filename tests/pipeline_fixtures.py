"""Tiny diffusers pipelines saved with save_pretrained, and engine folders built from
their transformers (ONNX graphs and CPU torch programs in one folder), once per session.

The DiT has 1000 classes because DiTPipeline's guidance uses the null class 1000; the
PixArt pipeline has a one-layer T5 encoder and an offline word-level tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fora_export.demo import make_demo_dit, make_demo_flux, make_demo_pixart, make_demo_sd3, make_demo_wan
from fora_export.demo_pipelines import (
    CLIP_LENGTH,
    make_dit_pipeline,
    make_flux_pipeline,
    make_pixart_pipeline,
    make_sd3_pipeline,
    make_vae,
    make_wan_pipeline,
    make_wan_vae,
)
from tests.helpers import build_engine
from tests.tiny_models import TINY_DIT, TINY_FLUX_DEV, TINY_PIXART, TINY_SD35, TINY_WAN

# The DiT has DiTPipeline's 1000 classes; the Wan text width is the tiny T5's.
PIPELINE_DIT = {**TINY_DIT, "num_embeds_ada_norm": 1000}
PIPELINE_PIXART = TINY_PIXART
#: Caption tokens of the PixArt build (pipelines pass max_sequence_length=16).
PIXART_TEXT_LENGTH = 16
PIPELINE_SD3 = TINY_SD35
PIPELINE_FLUX = TINY_FLUX_DEV
# Wan 2.1-like: 2 latent frames (5 video frames) of 8x8 (64x64 pixels), 4 latent channels.
PIPELINE_WAN = {**TINY_WAN, "text_dim": 16, "rope_max_seq_len": 32}
WAN_FRAMES = 2
#: Wan 2.2 A14B's boundary: transformer for t >= 875, transformer_2 below (the T2V value).
WAN_BOUNDARY = 0.875
#: T5 tokens of the SD3 and Flux pipelines (max_sequence_length); SD3 adds 77 CLIP tokens.
MMDIT_SEQUENCE_LENGTH = 8


def tiny_vae(shift_factor: float | None = None) -> object:
    return make_vae(4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, shift_factor=shift_factor)


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


@pytest.fixture(scope="session")
def sd3_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "sd3"
    pipe = make_sd3_pipeline(
        make_demo_sd3(PIPELINE_SD3), vae=tiny_vae(shift_factor=0.0609), max_length=MMDIT_SEQUENCE_LENGTH
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def flux_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "flux"
    pipe = make_flux_pipeline(
        make_demo_flux(PIPELINE_FLUX), vae=tiny_vae(shift_factor=0.1159), max_length=MMDIT_SEQUENCE_LENGTH
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qwenimage_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fora_export.demo import make_demo_qwenimage
    from fora_export.demo_pipelines import make_qwenimage_pipeline
    from tests.tiny_models import TINY_QWENIMAGE

    folder = tmp_path_factory.mktemp("pipelines") / "qwenimage"
    make_qwenimage_pipeline(make_demo_qwenimage(TINY_QWENIMAGE, seed=1)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wan_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "wan"
    pipe = make_wan_pipeline(
        make_demo_wan(PIPELINE_WAN), vae=make_wan_vae(4), max_length=MMDIT_SEQUENCE_LENGTH
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wan_experts_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan 2.2 A14B-like: two experts (other seeds) switched at WAN_BOUNDARY."""
    folder = tmp_path_factory.mktemp("pipelines") / "wan-experts"
    pipe = make_wan_pipeline(
        make_demo_wan(PIPELINE_WAN, seed=1),
        transformer_2=make_demo_wan(PIPELINE_WAN, seed=2),
        boundary_ratio=WAN_BOUNDARY,
        vae=make_wan_vae(4),
        max_length=MMDIT_SEQUENCE_LENGTH,
    )
    pipe.save_pretrained(folder)
    return folder


def _build(source: Path, out: Path, **options: object) -> Path:
    """ONNX graphs and CPU torch programs in one folder (both backends' tests share it)."""
    return build_engine(source, out, backend="torch", device="cpu", **options)


@pytest.fixture(scope="session")
def dit_pipeline_engine(tmp_path_factory: pytest.TempPathFactory, dit_pipeline_dir: Path) -> Path:
    return _build(dit_pipeline_dir, tmp_path_factory.mktemp("engines") / "dit-pipeline")


@pytest.fixture(scope="session")
def pixart_pipeline_engine(tmp_path_factory: pytest.TempPathFactory, pixart_pipeline_dir: Path) -> Path:
    return _build(
        pixart_pipeline_dir,
        tmp_path_factory.mktemp("engines") / "pixart-pipeline",
        text_length=PIXART_TEXT_LENGTH,
    )


@pytest.fixture(scope="session")
def sd3_pipeline_engine(tmp_path_factory: pytest.TempPathFactory, sd3_pipeline_dir: Path) -> Path:
    return _build(
        sd3_pipeline_dir,
        tmp_path_factory.mktemp("engines") / "sd3-pipeline",
        text_length=CLIP_LENGTH + MMDIT_SEQUENCE_LENGTH,
    )


@pytest.fixture(scope="session")
def flux_pipeline_engine(tmp_path_factory: pytest.TempPathFactory, flux_pipeline_dir: Path) -> Path:
    """The 64x64 images of the pipeline tests: an 8x8 VAE latent, 16 packed tokens."""
    return _build(
        flux_pipeline_dir,
        tmp_path_factory.mktemp("engines") / "flux-pipeline",
        text_length=MMDIT_SEQUENCE_LENGTH,
        resolution="8x8",
    )


WAN_BUILD = {"text_length": MMDIT_SEQUENCE_LENGTH, "resolution": "8x8", "frames": WAN_FRAMES}


@pytest.fixture(scope="session")
def wan_pipeline_engine(tmp_path_factory: pytest.TempPathFactory, wan_pipeline_dir: Path) -> Path:
    return _build(wan_pipeline_dir, tmp_path_factory.mktemp("engines") / "wan-pipeline", **WAN_BUILD)


@pytest.fixture(scope="session")
def wan_expert_engines(
    tmp_path_factory: pytest.TempPathFactory, wan_experts_pipeline_dir: Path
) -> tuple[Path, Path]:
    """One engine folder per expert (ONNX only: the experts test runs ONNX Runtime)."""
    high, low = (
        build_engine(
            wan_experts_pipeline_dir,
            tmp_path_factory.mktemp("engines") / f"wan-{subfolder}",
            backend="onnx",
            subfolder=subfolder,
            **WAN_BUILD,
        )
        for subfolder in ("transformer", "transformer_2")
    )
    return high, low
