"""The trained digit engines (weights from the package), each built once per test session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build


@pytest.fixture(scope="session")
def digits_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "demo-digits"
    build("demo-digits", out, BuildConfig.from_options(batch="1:40:40"), progress=False)
    return out


def refuse_connections(*_: object, **__: object) -> None:
    raise AssertionError("the network was used")


@pytest.fixture(scope="session")
def digits_flow_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo-digits-flow built with every socket connection refused: it loads offline."""
    out = tmp_path_factory.mktemp("engines") / "demo-digits-flow"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse_connections)  # every name lookup
        patch.setattr(socket, "create_connection", refuse_connections)
        patch.setattr(socket.socket, "connect", refuse_connections)
        build("demo-digits-flow", out, BuildConfig.from_options(batch="1:40:40"), progress=False)
    return out


@pytest.fixture(scope="session")
def digits_forecast_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo-digits built with --forecast (the forecast graph besides the static ones)."""
    out = tmp_path_factory.mktemp("engines") / "demo-digits-forecast"
    build("demo-digits", out, BuildConfig.from_options(batch="1:40:40", forecast=True), progress=False)
    return out
