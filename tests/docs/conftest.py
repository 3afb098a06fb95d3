"""The folders the documentation's snippets name, made small: tiny models shaped like the
demos the pages talk about, saved with save_pretrained, and engine folders built from them
once per session.

- ``engines/demo-dit``: a 2-block DiT with demo-dit's interface (4 latent channels of 32x32,
  learned sigma, 1000 classes; patches of 4, so 64 tokens), so the runtime snippet's latents
  and labels fit as written;
- ``my-pixart`` and ``engines/my-pixart``: a PixArt-Sigma pipeline of tiny components
  (sample size 32, so resolution binning keeps the default 256px image; a 120-token
  tokenizer) and its transformer built with ``--text-length 120 --backend torch`` (CPU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_pixart
from fora_export.demo_pipelines import make_pixart_pipeline
from tests.pipeline_fixtures import tiny_vae
from tests.tiny_models import TINY_DIT, TINY_PIXART, save_dit

DOCS_DIT = {**TINY_DIT, "sample_size": 32, "patch_size": 4, "num_embeds_ada_norm": 1000}
DOCS_PIXART = {**TINY_PIXART, "sample_size": 32}
DOCS_TEXT_LENGTH = 120


@pytest.fixture(scope="session")
def docs_dit_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = save_dit(tmp_path_factory.mktemp("docs-models") / "demo-dit", DOCS_DIT)
    out = tmp_path_factory.mktemp("docs-engines") / "demo-dit"
    build(str(model), out, BuildConfig.from_options(batch="1:2:4"), progress=False)
    return out


@pytest.fixture(scope="session")
def docs_pixart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pipeline folder, engine folder)."""
    pipeline = tmp_path_factory.mktemp("docs-pipelines") / "my-pixart"
    pipe = make_pixart_pipeline(
        make_demo_pixart(DOCS_PIXART), sigma=True, vae=tiny_vae(), max_length=DOCS_TEXT_LENGTH
    )
    pipe.save_pretrained(pipeline)
    engine = tmp_path_factory.mktemp("docs-engines") / "my-pixart"
    config = BuildConfig.from_options(text_length=DOCS_TEXT_LENGTH, backend="torch", device="cpu")
    build(str(pipeline), engine, config, progress=False)
    return pipeline, engine


@pytest.fixture
def docs_workdir(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder holding what the block of the test names (only that: the
    fixtures are built on first use). The block is the test's ``block`` parameter."""
    text = request.getfixturevalue("block").text
    workdir = tmp_path / "work"
    (workdir / "engines").mkdir(parents=True)
    if "engines/demo-dit" in text:
        shutil.copytree(request.getfixturevalue("docs_dit_engine"), workdir / "engines" / "demo-dit")
    if "my-pixart" in text:
        pipeline, engine = request.getfixturevalue("docs_pixart")
        (workdir / "my-pixart").symlink_to(pipeline, target_is_directory=True)
        shutil.copytree(engine, workdir / "engines" / "my-pixart")
    monkeypatch.chdir(workdir)
    return workdir
