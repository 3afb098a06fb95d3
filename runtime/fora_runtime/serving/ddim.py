"""A numpy DDIM sampler (eta = 0) that reads diffusers' ``DDIMScheduler`` config.

The runtime never imports diffusers, so a served generation needs its own
scheduler arithmetic. This is diffusers' DDIM update step for step, in float32
like diffusers' torch tensors (betas, cumulative alphas and the update), so a
generation served here matches ``DDIMScheduler`` to float32 rounding (the test
suite compares them). It reads the same ``scheduler_config.json`` keys; options
it does not implement (thresholding, zero-SNR rescaling) are refused.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from fora_runtime.errors import ForaError

#: ``_class_name`` of the scheduler configs this module runs.
DDIM_CLASS_NAME = "DDIMScheduler"

#: diffusers' DDIMScheduler defaults for every key this sampler reads.
DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}


class SchedulerConfigError(ForaError):
    """A scheduler config asks for something the sampler does not implement."""


class Sampler(Protocol):
    """What a served generation needs from a scheduler (one object per generation:
    multistep schedulers keep state between steps)."""

    def timesteps(self, num_steps: int) -> np.ndarray:
        """The timesteps of a ``num_steps`` generation, first to last."""
        ...

    def initial(self, latents: np.ndarray) -> np.ndarray:
        """Scale unit-variance initial noise for the first step."""
        ...

    def model_input(self, latents: np.ndarray, timestep: Any) -> np.ndarray:
        """The transformer's latents input at ``timestep``."""
        ...

    def step(self, noise: np.ndarray, timestep: Any, latents: np.ndarray) -> np.ndarray:
        """The latents of the next step from the model's noise prediction."""
        ...


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # diffusers' betas_for_alpha_bar (squaredcos_cap_v2): computed in float64, then float32.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


class DDIMSampler:
    """Deterministic DDIM (eta = 0) as diffusers' ``DDIMScheduler`` computes it."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        given = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
        name = (config or {}).get("_class_name", DDIM_CLASS_NAME)
        if name != DDIM_CLASS_NAME:
            raise SchedulerConfigError(
                f"Scheduler config | _class_name {name!r} | the numpy sampler runs {DDIM_CLASS_NAME} only"
            )
        self.config = {**DDIM_DEFAULTS, **{k: v for k, v in given.items() if k in DDIM_DEFAULTS}}
        cfg = self.config
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if cfg[key]:
                raise SchedulerConfigError(
                    f"Scheduler config | {key} is on | not implemented by the numpy DDIM sampler; "
                    "switch it off or serve with a diffusers scheduler"
                )
        if cfg["prediction_type"] not in ("epsilon", "sample", "v_prediction"):
            raise SchedulerConfigError(
                f"Scheduler config | prediction_type {cfg['prediction_type']!r} | expected epsilon, "
                "sample or v_prediction"
            )
        if cfg["timestep_spacing"] not in ("leading", "trailing", "linspace"):
            raise SchedulerConfigError(
                f"Scheduler config | timestep_spacing {cfg['timestep_spacing']!r} | expected leading, "
                "trailing or linspace"
            )
        count = int(cfg["num_train_timesteps"])
        if cfg["trained_betas"] is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
        elif cfg["beta_schedule"] == "linear":
            betas = np.linspace(cfg["beta_start"], cfg["beta_end"], count, dtype=np.float32)
        elif cfg["beta_schedule"] == "scaled_linear":
            betas = (
                np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, count, dtype=np.float32) ** 2
            )
        elif cfg["beta_schedule"] == "squaredcos_cap_v2":
            betas = _cosine_betas(count)
        else:
            raise SchedulerConfigError(
                f"Scheduler config | beta_schedule {cfg['beta_schedule']!r} | expected linear, "
                "scaled_linear or squaredcos_cap_v2"
            )
        self.num_train_timesteps = count
        # torch's float32 cumprod accumulates in double on the CPU; so does this one.
        alphas = np.float32(1.0) - betas
        self.alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        self.final_alpha_cumprod = np.float32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps = 0

    def timesteps(self, num_steps: int) -> np.ndarray:
        count = self.num_train_timesteps
        if not 1 <= num_steps <= count:
            raise SchedulerConfigError(
                f"num_steps | got {num_steps} | expected 1..{count} (the scheduler's training timesteps)"
            )
        self.num_inference_steps = num_steps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            steps = np.linspace(0, count - 1, num_steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = count // num_steps
            steps = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
            steps += int(self.config["steps_offset"])
        else:
            steps = np.round(np.arange(count, 0, -count / num_steps)).astype(np.int64) - 1
        return steps

    def initial(self, latents: np.ndarray) -> np.ndarray:
        return latents  # DDIM's initial noise sigma is 1

    def model_input(self, latents: np.ndarray, timestep: Any) -> np.ndarray:
        return latents

    def step(self, noise: np.ndarray, timestep: Any, latents: np.ndarray) -> np.ndarray:
        if not self.num_inference_steps:
            raise SchedulerConfigError("DDIM step | timesteps() was not called | call it first")
        t = int(timestep)
        prev = t - self.num_train_timesteps // self.num_inference_steps
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        beta_t = np.float32(1.0) - alpha_t
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            original = (latents - beta_t ** np.float32(0.5) * noise) / alpha_t ** np.float32(0.5)
            epsilon = noise
        elif kind == "sample":
            original = noise
            epsilon = (latents - alpha_t ** np.float32(0.5) * original) / beta_t ** np.float32(0.5)
        else:
            original = alpha_t ** np.float32(0.5) * latents - beta_t ** np.float32(0.5) * noise
            epsilon = alpha_t ** np.float32(0.5) * noise + beta_t ** np.float32(0.5) * latents
        if self.config["clip_sample"]:
            bound = np.float32(self.config["clip_sample_range"])
            original = np.clip(original, -bound, bound)
        direction = (np.float32(1.0) - alpha_prev) ** np.float32(0.5) * epsilon
        return (alpha_prev ** np.float32(0.5) * original + direction).astype(np.float32, copy=False)
