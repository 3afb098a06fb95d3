"""Runtime backends: each runs the full and reuse graphs of one engine folder."""

from __future__ import annotations

from fora_runtime.backends.base import StepBackend, StepBuffers, backend_names, create_backend

__all__ = ["StepBackend", "StepBuffers", "backend_names", "create_backend"]
