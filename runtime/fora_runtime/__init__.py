"""fora-runtime: run FORA-cached diffusion transformer graphs built by fora-export.

Imports nothing heavy: backends load onnxruntime / tensorrt / torch on first use.
"""

from __future__ import annotations

from fora_runtime.calibration import CalibratedSchedules, CalibrationRecord
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
from fora_runtime.generation import Generation
from fora_runtime.manifest import Manifest, load_manifest
from fora_runtime.schedule import CacheSchedule
from fora_runtime.session import ForaSession

__version__ = "0.1.0"

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
