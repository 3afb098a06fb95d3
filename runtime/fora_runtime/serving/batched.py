"""Run served requests as batched generations.

Requests with the same step count, cache schedule and guidance scale share every
timestep and every full/reuse decision, so they can run as one generation of the
concatenated batch: :func:`plan_groups` packs them (in arrival order, up to the
engines' batch maximum), :class:`BatchedGenerator` runs each group and splits
the final latents back per request. Each request's samples stay in their own
rows from the first step to the last, so every response is that request's own
result. Requests with other keys run in their own groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fora_runtime.serving.ddim import Sampler
from fora_runtime.serving.requests import GenerationRequest, ServingSpec
from fora_runtime.session import ForaSession


def plan_groups(requests: Sequence[GenerationRequest | None], max_rows: int) -> list[list[int]]:
    """Indices of ``requests`` per batched generation. ``None`` entries (requests that
    failed their checks) are skipped. A group's engine rows never exceed ``max_rows``."""
    open_groups: dict[tuple[object, ...], list[int]] = {}
    rows: dict[tuple[object, ...], int] = {}
    groups: list[list[int]] = []
    for index, request in enumerate(requests):
        if request is None:
            continue
        key = request.group_key
        if key in open_groups and rows[key] + request.engine_batch <= max_rows:
            open_groups[key].append(index)
            rows[key] += request.engine_batch
            continue
        open_groups[key] = [index]
        rows[key] = request.engine_batch
        groups.append(open_groups[key])
    return groups


class BatchedGenerator:
    """Runs groups of requests through one activated :class:`ForaSession`.

    ``new_sampler`` makes one scheduler per generation (multistep schedulers keep
    state between steps)."""

    def __init__(self, session: ForaSession, spec: ServingSpec, new_sampler: Callable[[], Sampler]) -> None:
        self.session = session
        self.spec = spec
        self.new_sampler = new_sampler
        self.latents_dtype = session.manifest.latents_input.dtype

    def run(self, requests: Sequence[GenerationRequest | None]) -> list[np.ndarray | Exception | None]:
        """Final latents per request (``None`` for skipped ones). A group that fails
        gives its exception to each of its requests; the other groups still run."""
        results: list[np.ndarray | Exception | None] = [None] * len(requests)
        for group in plan_groups(requests, self.spec.batch.max):
            members = [r for r in (requests[i] for i in group) if r is not None]
            outputs: Sequence[np.ndarray | Exception]
            try:
                outputs = self.generate(members)
            except Exception as err:  # one failed group must not fail the others
                outputs = [err] * len(group)
            for index, output in zip(group, outputs, strict=True):
                results[index] = output
        return results

    def generate(self, requests: Sequence[GenerationRequest]) -> list[np.ndarray]:
        """One generation for requests of one group key; final latents per request."""
        first = requests[0]
        if any(r.group_key != first.group_key for r in requests):
            raise ValueError("generate() needs requests of one group key")
        latents = np.concatenate([r.latents for r in requests])
        conditioning = {
            name: np.concatenate([r.conditioning[name] for r in requests]) for name in first.conditioning
        }
        samples = latents.shape[0]
        guided = first.guided
        factor = 2 if guided else 1
        # Below the engines' minimum batch: pad with copies of the first sample (dropped after).
        padding = max(0, -(-self.spec.batch.min // factor) - samples)
        if padding:
            latents = np.concatenate([latents, np.repeat(latents[:1], padding, axis=0)])
            conditioning = {
                k: np.concatenate([v, np.repeat(v[:1], padding, axis=0)]) for k, v in conditioning.items()
            }
        final = self._loop(latents, conditioning, first)[:samples]
        bounds = np.cumsum([r.batch_size for r in requests])[:-1]
        return [np.array(part, copy=True) for part in np.split(final, bounds)]

    def _loop(
        self, latents: np.ndarray, conditioning: dict[str, Any], request: GenerationRequest
    ) -> np.ndarray:
        sampler = self.new_sampler()
        timesteps = sampler.timesteps(request.num_steps)
        guided = request.guided
        if guided:
            unconditional = self.spec.unconditional(conditioning)
            conditioning = {k: np.concatenate([v, unconditional[k]]) for k, v in conditioning.items()}
        scale = np.float32(request.guidance_scale)
        channels = self.spec.latent_shape[0]
        samples = latents.shape[0]
        generation = self.session.start(
            request.num_steps,
            samples * (2 if guided else 1),
            schedule=request.schedule,
            timesteps=timesteps,
            **conditioning,
        )
        latents = sampler.initial(latents)
        for t in timesteps:
            model_input = sampler.model_input(latents, t)
            if guided:
                model_input = np.concatenate([model_input, model_input])
            prediction = generation.step(model_input.astype(self.latents_dtype, copy=False))
            noise = np.asarray(prediction[:, :channels], dtype=np.float32)  # learned sigma: drop variance
            if guided:
                conditional, unconditional_noise = noise[:samples], noise[samples:]
                noise = unconditional_noise + scale * (conditional - unconditional_noise)
            latents = sampler.step(noise, t, latents)
        return latents
