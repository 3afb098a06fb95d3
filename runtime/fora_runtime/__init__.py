"""fora-runtime: run FORA-cached diffusion transformer graphs built by fora-export.

Imports nothing heavy: the errors are imported now, every other name on first use, and
backends load onnxruntime / tensorrt / torch on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fora_runtime.errors import (
    BackendError,
    ConcurrentUseError,
    ForaError,
    GenerationError,
    InputError,
    ManifestError,
    NonFiniteError,
    ScheduleError,
)

if TYPE_CHECKING:
    from fora_runtime.calibration import CalibratedSchedules, CalibrationRecord
    from fora_runtime.generation import Generation
    from fora_runtime.manifest import Manifest, load_manifest
    from fora_runtime.schedule import CacheSchedule
    from fora_runtime.session import ForaSession

__version__ = "0.1.0"

#: Names imported on first use, by the module that defines them.
_LAZY = {
    "CalibratedSchedules": "fora_runtime.calibration",
    "CalibrationRecord": "fora_runtime.calibration",
    "Generation": "fora_runtime.generation",
    "Manifest": "fora_runtime.manifest",
    "load_manifest": "fora_runtime.manifest",
    "CacheSchedule": "fora_runtime.schedule",
    "ForaSession": "fora_runtime.session",
}

__all__ = [
    "BackendError",
    "CacheSchedule",
    "CalibratedSchedules",
    "CalibrationRecord",
    "ConcurrentUseError",
    "ForaError",
    "ForaSession",
    "Generation",
    "GenerationError",
    "InputError",
    "Manifest",
    "ManifestError",
    "NonFiniteError",
    "ScheduleError",
    "load_manifest",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fora_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
