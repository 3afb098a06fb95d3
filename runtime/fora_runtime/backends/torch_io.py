"""Input staging shared by the backends whose buffers are torch tensors (torch, tensorrt).

Step inputs arrive as numpy arrays, CPU or device torch tensors, or scalar
timesteps; they are copied into fixed staging tensors on the backend's device
(``non_blocking``: no host sync inside a step). Host inputs are range-checked
against the manifest (an out-of-range class label is an unchecked embedding
index on the GPU); device tensors are not, as that would sync every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fora_runtime.backends.base import StepBackend, StepBuffers
from fora_runtime.dtypes import DTYPES
from fora_runtime.errors import BackendError


@dataclass(frozen=True)
class ScalarFill:
    """A scalar timestep, written into its staging buffer with ``fill_`` (no allocation)."""

    value: float | int
    shape: tuple[int, ...]
    dtype: str


def host_values(value: Any) -> np.ndarray:
    """A CPU torch tensor as numpy, for the range check: detached (a tensor that requires
    grad refuses .numpy()), floats as float32 (bf16 has no numpy dtype), integers as int64
    (exact, unlike float32 above 2**24)."""
    value = value.detach()
    array: np.ndarray = (value.float() if value.is_floating_point() else value.long()).numpy()
    return array


class TorchTensorIO(StepBackend):
    """A backend whose staged inputs, caches and predictions are torch tensors.

    Subclasses set ``self._torch`` (the torch module) on activation and define
    :attr:`io_device`, the device their staging buffers live on.
    """

    host_inputs = False
    _torch: Any = None

    @property
    def io_device(self) -> Any:
        raise NotImplementedError

    def _torch_dtype(self, dtype: str) -> Any:
        if dtype not in DTYPES:
            raise BackendError(
                f"Backend '{self.name}' | dtype {dtype} is not supported | rebuild the engines"
            )
        return getattr(self._torch, DTYPES[dtype].torch)

    def stage_input(self, buffers: StepBuffers, name: str, value: Any) -> None:
        target = buffers.inputs[name]
        if isinstance(value, ScalarFill):
            self._check_range(name, np.asarray(value.value))
            target.fill_(value.value)
        elif isinstance(value, self._torch.Tensor):
            if value.device.type == "cpu" and self.manifest.value_range(name) is not None:
                self._check_range(name, host_values(value))
            # detach: autograd must not record the copy into the staging buffer. Pageable
            # host memory is staged before copy_ returns; a pinned host source must not
            # change until the step has run on the current stream.
            target.copy_(value.detach(), non_blocking=True)
        else:
            array = np.ascontiguousarray(value)
            self._check_range(name, array)
            target.copy_(self._torch.from_numpy(array), non_blocking=True)

    def _check_range(self, name: str, array: np.ndarray) -> None:
        self.manifest.check_values(name, array, where=self._where())

    def upload(self, value: Any) -> Any:
        self._require_active()
        return self._torch.as_tensor(value).to(self.io_device)

    def as_timestep(self, value: Any, shape: tuple[int, ...], dtype: str) -> Any:
        torch = self._torch
        torch_dtype = self._torch_dtype(dtype)
        if isinstance(value, torch.Tensor):
            value = value.to(dtype=torch_dtype)
            return value.expand(shape) if value.ndim == 0 else value
        array = np.asarray(value)
        if array.ndim == 0:
            scalar = array.item()
            return ScalarFill(int(scalar) if dtype in ("int64", "int32") else float(scalar), shape, dtype)
        return torch.as_tensor(array).to(dtype=torch_dtype)

    def describe_array(self, value: Any) -> tuple[tuple[int, ...], str]:
        if isinstance(value, ScalarFill):
            return value.shape, value.dtype
        if self._torch is not None and isinstance(value, self._torch.Tensor):
            return tuple(int(d) for d in value.shape), str(value.dtype).removeprefix("torch.")
        array = np.asarray(value)
        return tuple(array.shape), array.dtype.name
