"""Shared fixtures: tiny random-weight DiTs saved with save_pretrained, and
engine folders built from them through the real CLI pipeline (built once per
test session, they take a few seconds each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_runtime.trust import KEY_ENV, FolderAccess
from tests.tiny_models import OTHER_DIT, TINY_DIT, save_dit

pytest_plugins = ["tests.pipeline_fixtures"]

#: The folders the tests build themselves are trusted (their torch programs may load).
TRUSTED = FolderAccess(trust_programs=True)


@pytest.fixture(autouse=True)
def _no_deployer_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest key in the developer's environment would make every unsigned test folder
    fail to open: tests that need one set it themselves."""
    monkeypatch.delenv(KEY_ENV, raising=False)


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
