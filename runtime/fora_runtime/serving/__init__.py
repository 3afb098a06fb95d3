"""Serving: whole generations per request, batched across requests.

Transport-independent pieces a server embeds (the Triton model that
``fora-export triton`` writes is one such server): :mod:`.requests` (the served
interface and its checks), :mod:`.batched` (grouping and batched generations)
and :mod:`.ddim` (a numpy DDIM sampler reading diffusers' scheduler config).
numpy only, like the rest of the runtime. :mod:`.triton_model` is the Triton
Python-backend model built on them; ``fora-export triton`` copies it into a model
repository as ``model.py``, and this package never imports it (it needs Triton's
``triton_python_backend_utils``).
"""

from __future__ import annotations

from fora_runtime.serving.batched import BatchedGenerator, plan_groups
from fora_runtime.serving.ddim import DDIMSampler, Sampler, SchedulerConfigError
from fora_runtime.serving.instances import INSTANCE_KINDS, instance_backend_options
from fora_runtime.serving.requests import (
    CACHE_INTERVAL,
    FINAL_LATENTS,
    GUIDANCE_SCALE,
    LATENTS,
    NUM_STEPS,
    SEED,
    GenerationRequest,
    ServedTensor,
    ServingSpec,
    parse_request,
    seeded_latents,
)

__all__ = [
    "CACHE_INTERVAL",
    "FINAL_LATENTS",
    "GUIDANCE_SCALE",
    "INSTANCE_KINDS",
    "LATENTS",
    "NUM_STEPS",
    "SEED",
    "BatchedGenerator",
    "DDIMSampler",
    "GenerationRequest",
    "Sampler",
    "SchedulerConfigError",
    "ServedTensor",
    "ServingSpec",
    "instance_backend_options",
    "parse_request",
    "plan_groups",
    "seeded_latents",
]
