"""The family table's tiny models (tests/tiny_models.TINY_FAMILIES) saved, and engine folders
built from them, each once per test session and shared by every test that asks for the
same build (read-only: tests that change a folder copy it first).

A family's default build (every kind cached, the lean reuse graph and its gate table where
the family has them, the table's ``backend``) is the one its own test file validates in
depth and the conformance suite opens; other builds (``cache``, ``reuse_graph``) are the
conformance suite's covering subset. Flux and Wan export through dynamo (tens of seconds
a build), so no two tests should build one of their folders twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build_engine, save_model
from tests.tiny_models import TINY_FAMILIES

_MODELS: dict[str, Path] = {}
_ENGINES: dict[tuple[str, tuple[str, ...] | None, str, str], Path] = {}


def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    """The family's tiny model saved with save_pretrained (a MODEL folder)."""
    if family not in _MODELS:
        from fora_export.adapters.registry import demo_spec

        tiny = TINY_FAMILIES[family]
        folder = tmp_path_factory.mktemp("models") / f"tiny-{family}"
        _MODELS[family] = save_model(demo_spec(tiny.demo).factory, folder, tiny.config, tiny.seed)
    return _MODELS[family]


def family_engine(
    tmp_path_factory: pytest.TempPathFactory,
    family: str,
    *,
    cache: tuple[str, ...] | None = None,
    reuse_graph: str = "lean",
    backend: str | None = None,
) -> Path:
    """The engine folder of the family's tiny model built with ``--cache`` ``cache`` (None:
    every kind), ``--reuse-graph`` and ``--backend`` (None: the table's), the table's sizes."""
    tiny = TINY_FAMILIES[family]
    backend = backend or tiny.backend
    key = (family, cache, reuse_graph, backend)
    if key not in _ENGINES:
        name = "-".join((family, "+".join(cache) if cache else "all", reuse_graph, backend))
        options = {"device": "cpu"} if backend == "torch" else {}
        _ENGINES[key] = build_engine(
            tiny_model_dir(tmp_path_factory, family),
            tmp_path_factory.mktemp("engines") / name,
            cache=",".join(cache) if cache else None,
            reuse_graph=reuse_graph,
            backend=backend,
            **options,
            **tiny.build,
        )
    return _ENGINES[key]
