"""How a digit model's samples are generated: its family's scheduler and its conditioning,
both read from the engines' manifest.

- The scheduler is validate's default for the manifest's scheduler family
  (``denoising.scheduler``): DDIM with the linear training betas for DDPM models, the
  flow-matching Euler scheduler (``FlowMatchEulerDiscreteScheduler``, the recorded
  ``shift`` and ``num_train_timesteps``) for flow-matching ones. The graphs take the
  scheduler's timesteps times ``denoising.timestep_scale``; the scheduler takes the
  prediction's first ``latent_channels`` channels (epsilon or velocity).
- The conditioning inputs come from :mod:`fora_export.quality.conditioning`: the labels
  themselves (DiT) or the model's class tables (SD3).

Everything else in a quality run (schedules, timing, metrics) is the same for every family.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fora_export.adapters.registry import find_demo
from fora_export.quality.conditioning import ClassConditioning, class_conditioning
from fora_export.schedulers import default_scheduler, make_scheduler
from fora_runtime.manifest import DenoisingSpec, Manifest
from fora_runtime.schedule import CacheSchedule
from fora_runtime.session import ForaSession


def model_folder(manifest: Manifest) -> Path | None:
    """The folder the engines were built from: a trained demo's package folder, or the
    recorded local folder (its ``subfolder`` for pipeline folders); None for a built-in
    random-weight demo or a Hub id."""
    demo = find_demo(manifest.source)
    if demo is not None:
        return demo.weights_folder
    path = Path(manifest.source)
    subfolder = manifest.export.subfolder
    folder = path / subfolder if subfolder else path
    return folder if folder.is_dir() else None


def denoising_of(manifest: Manifest) -> DenoisingSpec:
    assert manifest.denoising is not None, "check_digit_model refuses manifests without one"
    return manifest.denoising


@dataclass(frozen=True)
class DigitSampler:
    """The family's sampling loop for ``steps`` steps (see the module docstring)."""

    denoising: DenoisingSpec
    #: validate's name of the scheduler (``ddim``, ``flow-euler``).
    scheduler_name: str
    steps: int
    conditioning: ClassConditioning

    @classmethod
    def for_manifest(cls, manifest: Manifest, steps: int, num_classes: int, where: str) -> DigitSampler:
        denoising = denoising_of(manifest)
        return cls(
            denoising=denoising,
            scheduler_name=default_scheduler(denoising),
            steps=steps,
            conditioning=class_conditioning(manifest, num_classes, where, model_folder(manifest)),
        )

    def new_scheduler(self) -> Any:
        """A scheduler set to ``steps`` steps; one per generation (the flow-matching scheduler
        counts the steps it has taken)."""
        return make_scheduler(self.scheduler_name, self.steps, self.denoising)

    @property
    def timesteps(self) -> np.ndarray:
        """The graphs' timesteps of the generation, in the family's convention."""
        timesteps = self.new_scheduler().timesteps.numpy()
        if self.denoising.timestep_scale != 1.0:
            timesteps = timesteps * self.denoising.timestep_scale
        return timesteps

    def describe(self) -> str:
        config = self.denoising.scheduler_config
        if self.denoising.scheduler == "ddpm":
            return f"{self.scheduler_name} (linear betas)"
        return f"{self.scheduler_name} (shift {float(config.get('shift', 1.0)):g})"

    def update(self, scheduler: Any, index: int, prediction: np.ndarray, latents: Any) -> Any:
        """The scheduler's step ``index`` from the graph's prediction."""
        import torch

        output = torch.from_numpy(prediction).narrow(
            self.denoising.channel_axis, 0, self.denoising.latent_channels
        )
        return scheduler.step(output, scheduler.timesteps[index], latents).prev_sample

    def generate(
        self,
        session: ForaSession,
        timesteps: np.ndarray,
        schedule: CacheSchedule,
        noise: Any,
        labels: np.ndarray,
        forecast: bool = False,
    ) -> tuple[np.ndarray, float]:
        """One generation of ``len(labels)`` samples over ``timesteps`` (the first steps of
        :attr:`timesteps`); the samples and its wall time (runtime steps and scheduler
        updates, the gate table's computation at start included). ``forecast``: reuse steps
        forecast the caches (forecast builds)."""
        scheduler = self.new_scheduler()
        feeds = self.conditioning.feeds(labels)
        latents = noise.clone()
        started = time.perf_counter()
        generation = session.start(
            len(timesteps), len(labels), schedule=schedule, timesteps=timesteps, forecast=forecast, **feeds
        )
        for index in range(len(timesteps)):
            latents = self.update(scheduler, index, generation.step(latents.numpy()), latents)
        return latents.numpy(), time.perf_counter() - started
