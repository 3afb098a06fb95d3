"""What the exporter needs to know about one model family.

An adapter names the family's cache points (which sublayers FORA caches), its
step inputs and how to call the model. Everything family-specific lives in one
adapter file; nothing else branches on the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from fora_export.errors import ConfigError
from fora_export.split.taps import CachePoint
from fora_runtime.manifest import TensorSpec

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
}


class ModelAdapter(ABC):
    """Family-specific knowledge about a diffusers transformer."""

    family: ClassVar[str]
    model_class: ClassVar[str]
    #: Sublayer kinds cached per block, in cache order.
    cache_kinds: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module) -> None:
        # diffusers models expose config values and submodules as dynamic attributes.
        self.model: Any = model

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model.config)

    # -- cache points ---------------------------------------------------------------
    @abstractmethod
    def cache_points(self) -> list[CachePoint]:
        """Every cached sublayer, block by block, in a fixed order."""

    # -- inputs ---------------------------------------------------------------------
    @abstractmethod
    def default_resolution(self) -> tuple[int, int]:
        """Latent (height, width) the model was configured for."""

    @abstractmethod
    def check_resolution(self, resolution: tuple[int, int]) -> None:
        """Raise ConfigError when the model cannot run at this latent size."""

    @property
    @abstractmethod
    def latent_channels(self) -> int: ...

    @property
    @abstractmethod
    def output_channels(self) -> int: ...

    @abstractmethod
    def step_input_specs(self, resolution: tuple[int, int], precision: str) -> list[TensorSpec]:
        """Graph inputs other than caches; the first is ``latents``, the second ``timestep``."""

    @abstractmethod
    def conditioning(self) -> dict[str, Any]:
        """Conditioning facts the runtime and validate need (recorded in the manifest)."""

    @abstractmethod
    def random_inputs(
        self, batch_size: int, resolution: tuple[int, int], precision: str, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Random but valid step inputs (timestep included), on CPU."""

    # -- calling the model ----------------------------------------------------------
    @abstractmethod
    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One denoising step of the unmodified model: the full model output."""

    def noise_prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The epsilon part of a model output (drops learned-variance channels)."""
        return output[:, : self.latent_channels]

    def check_precision(self, precision: str) -> torch.dtype:
        if precision not in TORCH_DTYPES:
            raise ConfigError(f"Precision | got {precision!r} | expected one of {', '.join(TORCH_DTYPES)}")
        return TORCH_DTYPES[precision]
