"""PyTorch FORA as ``pipe.transformer``: the reference the engines are compared with in
a diffusers pipeline (``fora-export sample``, the pipeline tests).

:class:`ForaReference` wraps the pipeline's own diffusers transformer with the
project's split (:func:`fora_export.split.graphs.split_model`): a full step runs the
model's own ``forward`` with the pipeline's arguments while the taps record every
cached sublayer output; a reuse step runs it with the taps replaying them. Which
step is which comes from a plan the caller fixes per run (:meth:`reset`), not from
anything the pipeline does, so the reference shares no lifecycle logic with the
drop-in it checks. Each cache context (``cache_context(name)``) keeps its own step
counter and caches. With ``forecast`` (engines built with ``--forecast``, whose drop-in
forecasts), reuse steps after the second full step replay the caches forecast from the
last two full steps (:mod:`fora_export.validate.forecast_ref`), at the ``timestep`` the
pipeline passes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.registry import adapter_for
from fora_export.errors import ConfigError
from fora_export.split.graphs import SplitModel, split_model
from fora_export.validate.forecast_ref import ForecastHistory
from fora_runtime.manifest import Manifest
from fora_runtime.schedule import CacheSchedule


@dataclass
class _ContextSteps:
    step: int = 0
    history: ForecastHistory = field(default_factory=ForecastHistory)


class ForaReference(nn.Module):
    """``model`` run with FORA caching in PyTorch, full or reuse per ``schedule``."""

    def __init__(
        self,
        model: nn.Module,
        schedule: CacheSchedule,
        options: AdapterOptions | None = None,
        *,
        forecast: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.forecast = forecast
        adapter = adapter_for(model, options, where="pipeline transformer")
        self._split: SplitModel = split_model(adapter, ())
        self._plan: tuple[bool, ...] = ()
        self._contexts: dict[str | None, _ContextSteps] = {}
        self._context: str | None = None

    @classmethod
    def for_engines(
        cls, model: nn.Module, manifest: Manifest, schedule: CacheSchedule | None = None
    ) -> ForaReference:
        """The reference for engines built from ``model`` (checked by class and config), with
        the build's adapter options and static sizes, and the engines' schedule by default."""
        if type(model).__name__ != manifest.model_class:
            raise ConfigError(
                f"Pipeline transformer | is a {type(model).__name__}, the engines were built from a "
                f"{manifest.model_class} | pass the pipeline of the model the engines came from"
            )
        built = {k: v for k, v in manifest.model_config.items() if not k.startswith("_")}
        config = json.loads(json.dumps(dict(model.config), default=str))  # type: ignore[arg-type]
        differing = sorted(k for k in built if built[k] != config.get(k))
        if differing:
            raise ConfigError(
                f"Pipeline transformer | config differs from the engines' model in {differing} | pass "
                "the pipeline of the model the engines were built from"
            )
        reference = cls(
            model,
            schedule or manifest.schedule,
            AdapterOptions.for_manifest(manifest),
            forecast=manifest.has_forecast,
        )
        return reference

    def reset(self, num_steps: int) -> None:
        """Plan the next run: ``num_steps`` transformer calls per context."""
        self._plan = self.schedule.plan(num_steps)
        self._contexts = {}

    def remove(self) -> None:
        """Restore the model's own forwards (the taps come off)."""
        self._split.remove()

    # -- what pipelines read ----------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        previous = self._context
        self._context = name
        try:
            yield
        finally:
            self._context = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        steps = self._contexts.setdefault(self._context, _ContextSteps())
        if steps.step >= len(self._plan):
            raise ConfigError(
                f"ForaReference | call {steps.step + 1} of a run planned for {len(self._plan)} | "
                "call reset(num_steps) before each pipeline run"
            )
        taps = self._split.taps
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if self.forecast and timestep is None:
            raise ConfigError(
                "ForaReference | forecast needs the timestep of every call | call the transformer with "
                "timestep=, as diffusers pipelines do"
            )
        if self._plan[steps.step]:
            with taps.recording() as recorded:
                output = self.model(*args, **kwargs)
            steps.history.record(torch.as_tensor(timestep if timestep is not None else 0.0), dict(recorded))
        else:
            history = steps.history
            caches = history.reuse_caches(torch.as_tensor(timestep)) if self.forecast else history.caches[-1]
            with taps.replaying(caches):
                output = self.model(*args, **kwargs)
        steps.step += 1
        return output
