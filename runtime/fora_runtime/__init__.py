"""fora-runtime: run FORA-cached diffusion transformer graphs built by fora-export.

Imports nothing heavy: backends load onnxruntime / tensorrt / torch on first use.
"""

from __future__ import annotations

from fora_runtime.calibration import CalibratedSchedules, CalibrationRecord
from fora_runtime.errors import (
    BackendError,
    ForaError,
    GenerationError,
    InputError,
    ManifestError,
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
    "ForaError",
    "ForaSession",
    "Generation",
    "GenerationError",
    "InputError",
    "Manifest",
    "ManifestError",
    "ScheduleError",
    "load_manifest",
]
