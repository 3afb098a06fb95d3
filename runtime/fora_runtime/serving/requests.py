"""Served generation requests: what one request to a served engine folder holds.

A request asks for one whole generation: the initial latents (or one seed per
sample), the model's conditioning (class labels, caption embeddings and mask),
the step count and, optionally, a guidance scale and a cache interval. It
answers with the final latents. Every input carries a leading batch axis (the
request's samples), as Triton's batching models do.

Transport-independent: a server turns its request into ``{name: numpy array}``
and calls :func:`parse_request`, which checks everything against the manifest up
front, so one bad request fails alone instead of failing the batch it would
have joined. The input and output names below are the served model's interface
(``fora-export triton`` writes them into ``config.pbtxt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fora_runtime.errors import InputError
from fora_runtime.manifest import BatchRange, Manifest
from fora_runtime.schedule import CacheSchedule

LATENTS = "latents"
SEED = "seed"
NUM_STEPS = "num_steps"
GUIDANCE_SCALE = "guidance_scale"
CACHE_INTERVAL = "cache_interval"
FINAL_LATENTS = "final_latents"

#: Graph inputs that are not conditioning: the server computes them per step.
#: The class-label input of class-conditioned models (its null class drives guidance).
_CLASS_LABELS = "class_labels"


@dataclass(frozen=True)
class ServedTensor:
    """One input or output of the served model. ``shape`` is per sample (no batch
    axis); ``graph_shape`` is the graph's per-sample shape (``()`` for one label per
    sample, served as ``[1]``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    optional: bool = False
    graph_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ServingSpec:
    """The served interface of one engine folder, read from its manifest."""

    manifest: Manifest
    latent_shape: tuple[int, ...]
    conditioning: tuple[ServedTensor, ...]
    null_class: int | None
    max_steps: int
    max_batch: int

    @classmethod
    def from_manifest(cls, manifest: Manifest, *, max_batch: int | None = None) -> ServingSpec:
        """``max_batch``: most samples per request (default and upper bound: the build's)."""
        denoising = manifest.denoising
        if denoising is None or denoising.scheduler != "ddpm":
            raise InputError(
                f"Serving | {manifest.model_class} samples with a "
                f"{denoising.scheduler if denoising else 'unknown'} scheduler | the served loop is "
                "DDIM (DDPM families: DiT, PixArt); flow-matching families are not served yet"
            )
        latent_shape = tuple(int(d) for d in manifest.latents_input.shape[1:])
        # The request's conditioning: the inputs with that role (by role, never by name).
        conditioning = []
        for spec in manifest.inputs_of("conditioning"):
            per_sample = tuple(int(d) for d in spec.shape[1:])
            conditioning.append(
                ServedTensor(spec.name, spec.dtype, per_sample or (1,), graph_shape=per_sample)
            )
        limit = manifest.batch.max
        if max_batch is not None and not 1 <= max_batch <= limit:
            raise InputError(
                f"Max batch | got {max_batch} | expected 1..{limit}, the engines' batch range "
                f"{manifest.batch} (rebuild with a larger --batch for more)"
            )
        null_class = manifest.conditioning.null_class
        return cls(
            manifest=manifest,
            latent_shape=latent_shape,
            conditioning=tuple(conditioning),
            null_class=int(null_class) if null_class is not None else None,
            max_steps=denoising.num_train_timesteps,
            max_batch=max_batch if max_batch is not None else limit,
        )

    @property
    def batch(self) -> BatchRange:
        return self.manifest.batch

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance is served for class-label models with a null class."""
        return self.null_class is not None and [t.name for t in self.conditioning] == [_CLASS_LABELS]

    def inputs(self) -> tuple[ServedTensor, ...]:
        scalar = (1,)
        served = [
            ServedTensor(LATENTS, "float32", self.latent_shape, optional=True),
            ServedTensor(SEED, "int64", scalar, optional=True),
            *self.conditioning,
            ServedTensor(NUM_STEPS, "int32", scalar),
            ServedTensor(CACHE_INTERVAL, "int32", scalar, optional=True),
        ]
        if self.guidance:
            served.append(ServedTensor(GUIDANCE_SCALE, "float32", scalar, optional=True))
        return tuple(served)

    def outputs(self) -> tuple[ServedTensor, ...]:
        return (ServedTensor(FINAL_LATENTS, "float32", self.latent_shape),)

    def unconditional(self, conditioning: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The guidance batch's second half: every label replaced by the null class."""
        assert self.guidance and self.null_class is not None
        labels = conditioning[_CLASS_LABELS]
        return {_CLASS_LABELS: np.full_like(labels, self.null_class)}


@dataclass(frozen=True)
class GenerationRequest:
    """One request's generation, checked: ``latents`` float32 [b, C, H, W], each
    conditioning input [b, *graph shape] in the graph's dtype."""

    latents: np.ndarray
    conditioning: dict[str, np.ndarray]
    num_steps: int
    schedule: CacheSchedule
    guidance_scale: float = 1.0

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def engine_batch(self) -> int:
        """Rows this request takes in a step (guidance doubles them)."""
        return self.batch_size * (2 if self.guided else 1)

    @property
    def group_key(self) -> tuple[int, CacheSchedule, float]:
        """Requests with equal keys can run as one batched generation."""
        return (self.num_steps, self.schedule, self.guidance_scale)


def seeded_latents(seeds: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
    """Unit-normal float32 latents, one seed per sample (numpy's PCG64 generator: the
    same seed gives the same latents in any process)."""
    return np.stack(
        [np.random.default_rng(int(seed)).standard_normal(latent_shape, dtype=np.float32) for seed in seeds]
    )


def parse_request(inputs: dict[str, np.ndarray], spec: ServingSpec) -> GenerationRequest:
    """Check one request's inputs against the served interface and the manifest.

    Raises :class:`InputError` with a ``subject | problem | fix`` message."""
    served = {t.name: t for t in spec.inputs()}
    unknown = sorted(set(inputs) - set(served))
    if unknown:
        raise InputError(f"Inputs {unknown} | not inputs of this model | expected some of {sorted(served)}")
    sizes = {name: int(np.shape(value)[0]) if np.ndim(value) else 0 for name, value in inputs.items()}
    batch_sizes = set(sizes.values())
    if len(batch_sizes) != 1 or 0 in batch_sizes:
        raise InputError(
            f"Request | batch axes {sizes} | every input needs the same leading batch axis (samples)"
        )
    batch_size = batch_sizes.pop()
    guidance = float(_one_value(inputs, GUIDANCE_SCALE, "float", default=1.0))
    guided = guidance != 1.0
    rows = batch_size * (2 if guided else 1)
    if batch_size > spec.max_batch or rows > spec.batch.max:
        raise InputError(
            f"Request | {batch_size} samples{' with guidance (doubled)' if guided else ''} | at most "
            f"{spec.max_batch} samples and {spec.batch.max} engine rows per request (engines built for "
            f"batch {spec.batch})"
        )
    latents = _latents(inputs, spec, batch_size)
    conditioning = {}
    for tensor in spec.conditioning:
        conditioning[tensor.name] = _conditioning(inputs, tensor, spec, batch_size)
    num_steps = int(_one_value(inputs, NUM_STEPS, "int"))
    if not 1 <= num_steps <= spec.max_steps:
        raise InputError(f"Input '{NUM_STEPS}' | got {num_steps} | expected 1..{spec.max_steps}")
    schedule = spec.manifest.schedule
    if CACHE_INTERVAL in inputs:
        interval = int(_one_value(inputs, CACHE_INTERVAL, "int"))
        mode = schedule.mode if schedule.kind == "interval" else "paper"
        if interval < 1:
            raise InputError(f"Input '{CACHE_INTERVAL}' | got {interval} | expected >= 1 (1 = no caching)")
        schedule = CacheSchedule.interval_of(interval, mode)
    schedule.plan(num_steps)  # an explicit schedule past the last step fails here, alone
    if not np.isfinite(guidance) or guidance < 1.0:
        raise InputError(f"Input '{GUIDANCE_SCALE}' | got {guidance} | expected a number >= 1 (1 = none)")
    return GenerationRequest(latents, conditioning, num_steps, schedule, guidance)


def _latents(inputs: dict[str, np.ndarray], spec: ServingSpec, batch_size: int) -> np.ndarray:
    if (LATENTS in inputs) == (SEED in inputs):
        raise InputError(
            f"Request | needs exactly one of '{LATENTS}' and '{SEED}' | send initial latents or seeds"
        )
    if SEED in inputs:
        seeds = np.asarray(inputs[SEED])
        if seeds.dtype.kind not in "iu" or seeds.shape != (batch_size, 1):
            raise InputError(
                f"Input '{SEED}' | got {seeds.dtype.name} {list(seeds.shape)} | expected int64 "
                f"[{batch_size}, 1], one seed per sample"
            )
        if seeds.min() < 0:
            raise InputError(f"Input '{SEED}' | got {seeds.min()} | expected seeds >= 0")
        return seeded_latents(seeds[:, 0], spec.latent_shape)
    latents = np.asarray(inputs[LATENTS])
    want = (batch_size, *spec.latent_shape)
    if latents.dtype != np.float32 or latents.shape != want:
        raise InputError(
            f"Input '{LATENTS}' | got {latents.dtype.name} {list(latents.shape)} | "
            f"expected float32 {list(want)}"
        )
    if not np.isfinite(latents).all():
        raise InputError(f"Input '{LATENTS}' | holds NaN or Inf | send finite initial latents")
    return np.array(latents, copy=True)


def _conditioning(
    inputs: dict[str, np.ndarray], tensor: ServedTensor, spec: ServingSpec, batch_size: int
) -> np.ndarray:
    if tensor.name not in inputs:
        raise InputError(
            f"Input '{tensor.name}' | missing | this model needs {[t.name for t in spec.conditioning]}"
        )
    value = np.asarray(inputs[tensor.name])
    want = (batch_size, *tensor.shape)
    integer = tensor.dtype == "int64"
    if value.shape != want or (value.dtype.kind not in "iu" if integer else value.dtype.name != tensor.dtype):
        raise InputError(
            f"Input '{tensor.name}' | got {value.dtype.name} {list(value.shape)} | expected "
            f"{tensor.dtype} {list(want)}"
        )
    graph = value.astype(tensor.dtype, copy=True).reshape(batch_size, *(tensor.graph_shape or ()))
    spec.manifest.check_values(tensor.name, graph, where="the engines' manifest.json")
    return graph


def _one_value(inputs: dict[str, np.ndarray], name: str, kind: str, default: Any = None) -> Any:
    """A per-request setting sent as [b, 1]: every sample must carry the same value."""
    if name not in inputs:
        if default is None:
            raise InputError(f"Input '{name}' | missing | send it as [batch, 1]")
        return default
    value = np.asarray(inputs[name])
    kinds = "iu" if kind == "int" else "fiu"
    if value.dtype.kind not in kinds or value.ndim != 2 or value.shape[1] != 1:
        raise InputError(
            f"Input '{name}' | got {value.dtype.name} {list(value.shape)} | expected one {kind} per sample, "
            "[batch, 1]"
        )
    if not (value == value.flat[0]).all():
        raise InputError(
            f"Input '{name}' | differs between the samples of one request | send one value per request "
            "(split the request)"
        )
    return value.flat[0]
