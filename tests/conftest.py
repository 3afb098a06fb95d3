"""Shared fixtures: tiny random-weight DiTs saved with save_pretrained, and
engine folders built from them through the real build pipeline (built once per
test session, shared with the family table's builds: tests/family_engines.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fora_runtime.trust import KEY_ENV, FolderAccess
from tests.family_engines import family_engine, tiny_model_dir
from tests.helpers import build_engine
from tests.tiny_models import OTHER_DIT, save_dit

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
    return tiny_model_dir(tmp_path_factory, "dit")


@pytest.fixture(scope="session")
def other_dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dit(tmp_path_factory.mktemp("models") / "other-dit", OTHER_DIT, seed=1)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DiT's default build (read-only)."""
    return family_engine(tmp_path_factory, "dit")


@pytest.fixture(scope="session")
def tiny_torch_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DiT with ONNX graphs and CPU torch programs, gate tables included (read-only)."""
    return family_engine(tmp_path_factory, "dit", backend="torch")


@pytest.fixture(scope="session")
def demo_dit_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fora-export build demo-dit --batch 1:2:4``: the demo at its real size (read-only)."""
    return build_engine("demo-dit", tmp_path_factory.mktemp("engines") / "demo-dit")


@pytest.fixture
def engine_copy(tiny_engine: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny engine folder, safe to tamper with."""
    import shutil

    target = tmp_path / "engine"
    shutil.copytree(tiny_engine, target)
    return target
