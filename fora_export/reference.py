"""The PyTorch model an engine folder was built from: what validate and bench's eager
baseline compare the engines with."""

from __future__ import annotations

import json

from fora_export.adapters.base import TORCH_DTYPES, AdapterOptions, ModelAdapter
from fora_export.adapters.casting import cast_model
from fora_export.adapters.registry import adapter_for
from fora_export.errors import ConfigError
from fora_export.loading import load_model
from fora_runtime.manifest import Manifest


def load_reference(manifest: Manifest, model_ref: str | None) -> ModelAdapter:
    """The PyTorch model the engines were built from, in the engines' precision."""
    ref = model_ref or manifest.source
    subfolder = manifest.export.subfolder if model_ref is None else None
    loaded = load_model(ref, TORCH_DTYPES[manifest.precision], subfolder)
    options = AdapterOptions.for_manifest(manifest)  # the build's sizes too
    adapter = adapter_for(loaded.model, options, where=f"MODEL '{ref}'")
    if type(adapter.model).__name__ != manifest.model_class:
        raise ConfigError(
            f"MODEL '{ref}' | is a {type(adapter.model).__name__}, the engines were built from a "
            f"{manifest.model_class} | pass the model they were built from with --model"
        )
    config = {k: v for k, v in adapter.config.items() if not k.startswith("_")}
    built = {k: v for k, v in manifest.model_config.items() if not k.startswith("_")}
    # Compared as the manifest stores them (JSON: tuples become lists).
    as_json = json.loads(json.dumps(config, default=str))
    differing = sorted(k for k in built if built[k] != as_json.get(k))
    if differing:
        raise ConfigError(
            f"MODEL '{ref}' | config differs from the one the engines were built from in {differing} "
            "| pass the right model with --model"
        )
    cast_model(adapter.model, TORCH_DTYPES[manifest.precision])
    return adapter
