"""Maps a diffusers model class name to its adapter."""

from __future__ import annotations

from torch import nn

from fora_export.adapters.base import AdapterOptions, ModelAdapter
from fora_export.adapters.dit import DiTAdapter
from fora_export.adapters.flux import FluxAdapter
from fora_export.adapters.pixart import PixArtAdapter
from fora_export.adapters.sd3 import SD3Adapter
from fora_export.adapters.wan import WanAdapter
from fora_export.errors import ConfigError

ADAPTERS: dict[str, type[ModelAdapter]] = {
    DiTAdapter.model_class: DiTAdapter,
    PixArtAdapter.model_class: PixArtAdapter,
    FluxAdapter.model_class: FluxAdapter,
    SD3Adapter.model_class: SD3Adapter,
    WanAdapter.model_class: WanAdapter,
}


def supported_classes() -> tuple[str, ...]:
    return tuple(ADAPTERS)


def adapter_class_for(class_name: str, *, where: str = "model") -> type[ModelAdapter]:
    adapter = ADAPTERS.get(class_name)
    if adapter is None:
        raise ConfigError(
            f"{where} | model class {class_name!r} is not supported | supported: "
            f"{', '.join(supported_classes())}"
        )
    return adapter


def adapter_for(
    model: nn.Module, options: AdapterOptions | None = None, *, where: str = "model"
) -> ModelAdapter:
    return adapter_class_for(type(model).__name__, where=where)(model, options)
