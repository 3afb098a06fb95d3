"""The demo-digits engine (trained weights from the package), built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build


@pytest.fixture(scope="session")
def digits_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "demo-digits"
    build("demo-digits", out, BuildConfig.from_options(batch="1:40:40"), progress=False)
    return out


@pytest.fixture(scope="session")
def digits_forecast_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo-digits built with --forecast (the forecast graph besides the static ones)."""
    out = tmp_path_factory.mktemp("engines") / "demo-digits-forecast"
    build("demo-digits", out, BuildConfig.from_options(batch="1:40:40", forecast=True), progress=False)
    return out
