"""Exporter-side user errors. All derive from ``fora_runtime.errors.ForaError``;
only the CLI (``fora_export.cli.exits``) turns them into a message and an exit code."""

from __future__ import annotations

from fora_runtime.errors import (
    BackendError,
    ForaError,
    GenerationError,
    InputError,
    ManifestError,
    ScheduleError,
)


class ConfigError(ForaError):
    """Bad command-line or build configuration (model path, batch range, precision...)."""


class ExportError(ForaError):
    """Exporting a subgraph to ONNX failed or produced an invalid graph."""


class BuildError(ForaError):
    """Writing the engine folder failed (exists, not writable, backend build failed)."""


__all__ = [
    "BackendError",
    "BuildError",
    "ConfigError",
    "ExportError",
    "ForaError",
    "GenerationError",
    "InputError",
    "ManifestError",
    "ScheduleError",
]
