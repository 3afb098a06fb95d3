"""The sampling schedulers of each scheduler family, configured as a manifest records them.

validate's trajectory, calibrate's measuring generations and quality's digit samples all
sample through :func:`make_scheduler`; ``diffusers`` is imported only when one is made, so
the CLI lists the names (``--scheduler``) without it.
"""

from __future__ import annotations

from typing import Any

from fora_export.errors import ConfigError
from fora_runtime.manifest import DenoisingSpec

#: Schedulers validate, calibrate and quality sample with, per scheduler family (the first is
#: the default).
SCHEDULERS_BY_FAMILY = {"ddpm": ("ddim", "dpm"), "flow_match": ("flow-euler",)}


def default_scheduler(denoising: DenoisingSpec) -> str:
    return SCHEDULERS_BY_FAMILY[denoising.scheduler][0]


def make_scheduler(name: str, steps: int, denoising: DenoisingSpec) -> Any:
    """The sampling scheduler ``name`` of the family's scheduler family, configured as the
    manifest records (``num_train_timesteps``, flow-matching ``shift``)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    allowed = SCHEDULERS_BY_FAMILY.get(denoising.scheduler, ())
    if name not in allowed:
        raise ConfigError(
            f"--scheduler | got {name!r} | a {denoising.scheduler} model samples with "
            f"{', '.join(allowed) or 'no scheduler validate knows'}"
        )
    if (
        isinstance(steps, bool)
        or not isinstance(steps, int)
        or not 1 <= steps <= denoising.num_train_timesteps
    ):
        raise ConfigError(
            f"--steps | got {steps!r}, the model was trained with {denoising.num_train_timesteps} timesteps "
            f"| sample with 1 to {denoising.num_train_timesteps} steps"
        )
    config = denoising.scheduler_config
    scheduler: Any
    if name == "ddim":
        scheduler = DDIMScheduler(
            num_train_timesteps=denoising.num_train_timesteps, beta_schedule="linear", clip_sample=False
        )
    elif name == "dpm":
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=denoising.num_train_timesteps, beta_schedule="linear"
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=denoising.num_train_timesteps, shift=float(config.get("shift", 1.0))
        )
    scheduler.set_timesteps(steps)
    return scheduler


#: Every scheduler name, in the order ``--scheduler`` lists them.
SCHEDULER_NAMES: tuple[str, ...] = tuple(name for names in SCHEDULERS_BY_FAMILY.values() for name in names)


def served_steps(timesteps: Any, denoising: DenoisingSpec) -> list[int]:
    """Indices of the schedule's (graph) timesteps inside the engines' range."""
    low, high = denoising.timestep_range
    slack = 1e-6 * max(abs(high), 1.0)
    served = [i for i, t in enumerate(timesteps) if low - slack <= float(t) <= high + slack]
    if not served:
        raise ConfigError(
            f"validate | no step of the schedule falls in the engines' timestep range [{low:g}, {high:g}] "
            "| use more --steps"
        )
    return served
