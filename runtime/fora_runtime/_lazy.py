"""Lazy imports of optional backends, failing clearly on first use."""

from __future__ import annotations

import importlib
from types import ModuleType

from fora_runtime.errors import BackendError


def import_optional(module: str, *, backend: str, install: str) -> ModuleType:
    """Import ``module`` or raise a BackendError telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendError(
            f"Backend '{backend}' | cannot import '{module}' ({err}) | install it: {install}"
        ) from err
