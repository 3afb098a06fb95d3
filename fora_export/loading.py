"""Resolve a MODEL argument to a diffusers transformer instance.

MODEL is one of:
- a built-in demo name (``demo-dit``): small model from config, random weights;
- a local folder: a transformer saved with ``save_pretrained`` (has
  ``config.json``), or a pipeline folder with a ``transformer/`` subfolder;
- a Hugging Face Hub id (``org/name``), resolved by diffusers; with
  ``HF_HUB_OFFLINE=1`` it is read from the local cache only.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fora_export.adapters.casting import cast_model
from fora_export.adapters.registry import (
    DemoSpec,
    adapter_class_for,
    demo_names,
    find_demo,
    supported_classes,
)
from fora_export.errors import ConfigError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: nn.Module
    class_name: str
    #: How to load it again: demo name, absolute folder path or Hub id.
    source: str
    subfolder: str | None = None
    #: Build options this model defaults to where the build gives none (demos).
    build_defaults: dict[str, Any] = field(default_factory=dict)


def _read_config(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (a model's config.json, a pipeline's model_index.json)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        reason = "nested too deep" if isinstance(err, RecursionError) else str(err)
        raise ConfigError(f"{path} | cannot read it as UTF-8 JSON ({reason}) | re-save the model") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} | is a JSON {type(data).__name__}, expected an object | re-save the model with "
            "save_pretrained"
        )
    return data


def _diffusers_class(class_name: str, where: str) -> Any:
    adapter_class_for(class_name, where=where)  # refuses unsupported classes by name
    import diffusers

    return getattr(diffusers, class_name)


def load_model(ref: str, dtype: Any = None, subfolder: str | None = None) -> LoadedModel:
    """Load MODEL (see module docstring) in eval mode, its weights in ``dtype`` (a torch
    dtype; None: as saved for folders, fp32 for demos).

    Saved models load straight into ``dtype`` with empty (meta) initialisation, so the
    weights are held once, in the target precision: Flux.1-dev loaded in fp32 and cast
    would need ~48 GB on the way. ``subfolder`` picks a pipeline folder's transformer
    (``transformer_2``: Wan 2.2 A14B's low-noise expert).
    """
    demo = find_demo(ref)
    if demo is not None:
        if subfolder is not None:
            raise ConfigError(f"--subfolder | {ref} is a built-in model | pass a pipeline folder with it")
        return _load_demo(demo, dtype)
    path = Path(ref).expanduser()
    if path.exists():
        return _load_local(path, dtype, subfolder)
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref
    # "models/dit-typo" where models/ is a folder here is a mistyped path, not a Hub id: say
    # so at once instead of trying the Hub (minutes of retries without a network).
    parent = path.parent
    in_local_folder = parent != Path(".") and parent.is_dir()
    if looks_like_path or in_local_folder or not _HUB_ID.match(ref):
        where = f" (the folder '{parent}' exists, '{path.name}' is not in it)" if in_local_folder else ""
        raise ConfigError(
            f"MODEL '{ref}' | no such folder{where}, and not a built-in model ({', '.join(demo_names())}) "
            "or a Hub id (org/name) | check the path"
        )
    return _load_hub(ref, dtype)


def _load_demo(demo: DemoSpec, dtype: Any) -> LoadedModel:
    """A built-in demo: made with random weights, or its trained weights read from the
    package like any local MODEL folder (offline)."""
    folder = demo.weights_folder
    if folder is None:
        model = demo.make_model()
        if dtype is not None:
            model = cast_model(model, dtype)
    elif not (folder / "config.json").is_file():
        raise ConfigError(
            f"{demo.name} | no trained weights in {folder} | reinstall fora-export, or train them: "
            f"{demo.trained_by}"
        )
    else:
        model = _load_local(folder, dtype).model
    return LoadedModel(
        model=model,
        class_name=type(model).__name__,
        source=demo.name,
        build_defaults=dict(demo.build_defaults),
    )


def _from_pretrained(cls: Any, ref: str, dtype: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` into ``dtype``, initialised on the meta device when accelerate
    is installed (weights then exist once, never as a random fp32 copy first)."""
    import importlib.util

    meta_init = importlib.util.find_spec("accelerate") is not None
    if not meta_init:
        log.info("accelerate is not installed: %s loads through a random fp32 initialisation", ref)
    return cls.from_pretrained(ref, torch_dtype=dtype, low_cpu_mem_usage=meta_init, **kwargs)


def _load_local(path: Path, dtype: Any = None, requested: str | None = None) -> LoadedModel:
    if not path.is_dir():
        raise ConfigError(f"MODEL '{path}' | is a file | pass the folder written by save_pretrained")
    subfolder: str | None = None
    folder = path
    defaults: dict[str, Any] = {}
    if requested is not None:
        if not (path / requested / "config.json").is_file():
            raise ConfigError(
                f"--subfolder '{requested}' | {path / requested / 'config.json'} does not exist | pass "
                "a subfolder of the pipeline holding a transformer (e.g. transformer_2)"
            )
        subfolder, folder = requested, path / requested
    elif not (path / "config.json").is_file():
        if (path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file():
            subfolder = "transformer"
            folder = path / "transformer"
        else:
            raise ConfigError(
                f"MODEL '{path}' | no config.json, and not a pipeline folder with transformer/ "
                "| pass a diffusers transformer or pipeline folder"
            )
    config = _read_config(folder / "config.json")
    class_name = config.get("_class_name")
    if not class_name or not isinstance(class_name, str):
        raise ConfigError(
            f"{folder / 'config.json'} | has no _class_name | not a diffusers model; "
            f"supported: {', '.join(supported_classes())}"
        )
    cls = _diffusers_class(class_name, where=f"MODEL '{path}'")
    if subfolder is not None and (path / "model_index.json").is_file():
        # What the pipeline implies for this transformer (its family knows: Wan's experts).
        index = _read_config(path / "model_index.json")
        adapter = adapter_class_for(class_name)
        defaults = adapter.pipeline_build_defaults(index, subfolder, where=str(path))
    try:
        model = _from_pretrained(cls, str(folder), dtype)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:  # a malformed config too
        raise ConfigError(f"MODEL '{path}' | diffusers could not load it: {err}") from err
    return LoadedModel(
        model=model.eval(),
        class_name=class_name,
        source=str(path.resolve()),
        subfolder=subfolder,
        build_defaults=defaults,
    )


def _load_hub(repo_id: str, dtype: Any = None) -> LoadedModel:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    errors = []
    for subfolder in (None, "transformer"):
        try:
            config_path = hf_hub_download(repo_id, "config.json", subfolder=subfolder)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
            errors.append(f"{subfolder or '.'}: {type(err).__name__}")
            continue
        class_name = _read_config(Path(config_path)).get("_class_name", "")
        cls = _diffusers_class(class_name, where=f"MODEL '{repo_id}'")
        try:
            model = _from_pretrained(cls, repo_id, dtype, subfolder=subfolder)
        except (OSError, ValueError, RuntimeError) as err:
            raise ConfigError(f"MODEL '{repo_id}' | diffusers could not load it: {err}") from err
        return LoadedModel(model=model.eval(), class_name=class_name, source=repo_id, subfolder=subfolder)
    raise ConfigError(
        f"MODEL '{repo_id}' | no local folder, and the Hub id could not be resolved ({'; '.join(errors)}) "
        "| pass a local folder, or fill the Hugging Face cache (HF_HUB_OFFLINE=1 reads only the cache)"
    )
