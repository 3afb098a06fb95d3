"""The runtime's numpy DDIM sampler against diffusers' DDIMScheduler, config by config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from fora_runtime.serving.ddim import DDIMSampler, SchedulerConfigError

CONFIGS = [
    {"beta_schedule": "linear", "clip_sample": False},
    {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
    },
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace", "prediction_type": "sample"},
    {"steps_offset": 1, "clip_sample": True, "clip_sample_range": 0.5},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.get("beta_schedule", "offset"))
@pytest.mark.parametrize("steps", [7, 20])
def test_ddim_matches_diffusers(config: dict, steps: int) -> None:
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(steps)
    sampler = DDIMSampler({"_class_name": "DDIMScheduler", **scheduler.config})
    timesteps = sampler.timesteps(steps)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    # float32 betas from numpy's and torch's linspace differ by up to 1 ulp (7e-9).
    np.testing.assert_allclose(sampler.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    ours = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    theirs = torch.from_numpy(ours.copy())
    for t in timesteps:
        noise = np.tanh(ours * np.float32(0.7)).astype(np.float32)  # a bounded stand-in for a model
        ours = sampler.step(noise, t, ours)
        theirs = scheduler.step(torch.from_numpy(noise), int(t), theirs).prev_sample
    scale = float(np.abs(ours).max())
    assert ours.dtype == np.float32
    # float32 arithmetic in another order (numpy vs torch), over up to 20 steps.
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=2e-5 * max(1.0, scale))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"thresholding": True}, "thresholding is on"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr is on"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
        ({"_class_name": "EulerDiscreteScheduler"}, "runs DDIMScheduler only"),
        ({"prediction_type": "flow"}, "prediction_type 'flow'"),
    ],
)
def test_unsupported_configs_are_refused(config: dict, message: str) -> None:
    with pytest.raises(SchedulerConfigError, match=message):
        DDIMSampler(config)


def test_step_count_is_checked() -> None:
    sampler = DDIMSampler({"num_train_timesteps": 100})
    with pytest.raises(SchedulerConfigError, match=r"expected 1\.\.100"):
        sampler.timesteps(101)
