"""Exceptions raised for user errors.

Every error a user can cause (bad engine folder, bad input, bad schedule) raises a
``ForaError`` subclass with a message shaped ``subject | problem | fix``. Bugs are
not ForaErrors: they surface with their traceback.
"""

from __future__ import annotations


class ForaError(Exception):
    """Base of all user-facing errors of fora-runtime and fora-export."""


class ManifestError(ForaError):
    """The engine folder or its manifest is missing, corrupt or incompatible."""


class ScheduleError(ForaError):
    """A cache schedule was given invalid arguments."""


class InputError(ForaError):
    """A step was fed inputs that do not match the built graphs."""


class BackendError(ForaError):
    """A runtime backend is unavailable or failed to load the graphs."""


class GenerationError(ForaError):
    """A generation was used out of order (stale, finished, or wrong batch size)."""


class ConcurrentUseError(GenerationError):
    """A session was called from a second thread while a call of another thread ran."""


class NonFiniteError(ForaError):
    """A step's prediction held NaN or Inf (raised with ``detect_nonfinite=True``)."""
