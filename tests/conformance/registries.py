"""Where the conformance suite reads the family registries and the CLI's choices, one
function each (so that a registry moving, e.g. into a family registry, is one edit here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fora_export.adapters.base import ModelAdapter


def registered_adapters() -> dict[str, type[ModelAdapter]]:
    """Family name -> adapter class, from the family registry."""
    from fora_export.adapters.registry import FAMILIES

    return {spec.name: spec.adapter_class for spec in FAMILIES}


def demo_model_factories() -> dict[str, Callable[..., Any]]:
    """Built-in demo name -> the factory of its random-weight model (``(config, seed)``):
    what ``fora-export build demo-...`` calls with the demo's own config."""
    from fora_export.adapters.registry import DEMOS

    return {spec.name: spec.factory for spec in DEMOS if spec.model is not None}


def demo_pipeline_names() -> tuple[str, ...]:
    """The built-in pipelines of ``fora-export sample --pipeline``."""
    from fora_export.adapters.registry import demo_pipeline_names as names

    return names()


def build_option_choices(option: str) -> tuple[str, ...]:
    """The values ``fora-export build --OPTION`` accepts (a click Choice)."""
    import click

    from fora_export.cli import main

    assert isinstance(main, click.Group)
    command = main.commands["build"]
    (param,) = [p for p in command.params if p.name == option.replace("-", "_")]
    assert isinstance(param.type, click.Choice), param
    return tuple(str(choice) for choice in param.type.choices)
