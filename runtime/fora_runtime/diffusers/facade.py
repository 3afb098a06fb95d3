"""Engines as ``pipe.transformer`` of an unmodified diffusers pipeline.

    from diffusers import DiTPipeline
    from fora_runtime.diffusers import enable_fora

    pipe = enable_fora(DiTPipeline.from_pretrained("dit-folder"), "engines/dit")
    image = pipe(class_labels=[207], num_inference_steps=20).images[0]

This is the one runtime module that imports diffusers and torch (the optional
extra ``fora-runtime[diffusers]``); the rest of the runtime never does.

:class:`ForaTransformer` stands in for the family's diffusers transformer
(``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``,
``FluxTransformer2DModel``): ``config`` is the manifest's model config, ``dtype`` and
``device`` are what the pipeline sees, ``forward`` takes the family's arguments and
returns its output class. Torch tensors go in and come out on every backend.

**Generations.** Pipelines never say when a run begins, so the transformer decides
at every call (:mod:`fora_runtime.diffusers.tracker`: a new generation when there is
none, the last one ran all its steps, the scheduler has new timesteps, the batch size
changed, or the timestep is the scheduler's first again). A generation is planned over
the scheduler's timesteps with the conditioning of its first call, so builds with a
gate table compute every reuse step's gates once. Caches are never carried into another
run, batch size or step count, also after an aborted run.

**The pipeline.** :func:`enable_fora` (or ``attach``) records the pipeline whose
scheduler plans the generations. A transformer passed to ``from_pretrained`` is never
told its pipeline (diffusers registers modules without telling them), so on its first
call it looks for the caller whose ``transformer`` it is, once, and records it.

**Contexts.** ``cache_context(name)`` works as diffusers' ``CacheMixin``: each name
gets its own session (graphs loaded once per name used), hence its own caches, so
pipelines that run the conditional and unconditional passes as separate calls (Flux
with true CFG) never mix them. Batch-doubled CFG (DiT, PixArt, SD3) keeps the whole
doubled batch in one generation.

**dtype boundary.** The engine runs in its build precision; inputs are cast to it and
outputs back to the latents' dtype, so an fp16 engine serves a pipeline whose VAE is
fp32. Timesteps are fed as the scheduler's timesteps in float32 (a pipeline that
rounds them to a half-precision dtype first is matched within that rounding).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from fora_runtime.diffusers.tracker import PipelineError, RunTracker, plan_window
from fora_runtime.dtypes import torch_dtype
from fora_runtime.errors import ForaError, InputError, ScheduleError
from fora_runtime.generation import Generation
from fora_runtime.manifest import FOLDER_OPTIONS, MANIFEST_NAME, Manifest, load_manifest
from fora_runtime.schedule import CacheSchedule
from fora_runtime.session import ForaSession

__all__ = ["ForaTransformer", "PipelineError", "enable_fora"]


def _is_unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, dict | list | tuple) and not value)


@dataclass
class _ContextRun:
    """One cache context's session and the generation it is running."""

    session: ForaSession
    generation: Generation | None = None
    tracker: RunTracker = field(default_factory=RunTracker)
    #: The conditioning tensors given at start, by input name (identity: unchanged).
    conditioning: dict[str, Any] = field(default_factory=dict)


class ForaTransformer(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """A FORA engine folder as a diffusers transformer (see the module docstring).

    Build one with :meth:`from_engine`, or let :func:`enable_fora` swap it into a pipeline.
    """

    # Nothing to load or save: the engines live in their folder.
    _supports_gradient_checkpointing = False

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        backend: str = "onnxruntime",
        device: str | None = None,
        dtype: torch.dtype | None = None,
        schedule: CacheSchedule | str | None = None,
        gate_table: bool = True,
        **backend_options: Any,
    ) -> None:
        super().__init__()
        self.engine_dir = Path(engine_dir)
        # The folder options of the sessions (verify, manifest key) apply to this first read too.
        folder_options = {k: backend_options[k] for k in FOLDER_OPTIONS if k in backend_options}
        manifest = load_manifest(self.engine_dir, **folder_options)
        signature = manifest.forward
        if signature is None:
            raise ForaError(
                f"{self.engine_dir / MANIFEST_NAME} | model class {manifest.model_class} records no "
                "diffusers forward signature | rebuild the engines with this fora-export"
            )
        self.manifest: Manifest = manifest
        self.signature = signature
        if device is not None and backend == "onnxruntime":
            if device != "cpu":
                raise ForaError(
                    f"device | got {device!r} for the onnxruntime backend | it runs where its providers "
                    "do: pass providers=[...] (e.g. CUDAExecutionProvider), or backend='torch'"
                )
        elif device is not None:
            backend_options["device"] = device  # torch, tensorrt: where their engines run
        self._session_options: dict[str, Any] = {
            "backend": backend,
            "schedule": schedule,
            "gate_table": gate_table,
            **backend_options,
        }
        config = {k: v for k, v in manifest.model_config.items() if not k.startswith("_")}
        height, width = manifest.resolution
        if "sample_size" in config and height == width:
            # Pipelines size their latents from sample_size: make it the built latent size.
            config["sample_size"] = height
        self.register_to_config(**config)
        #: The dtype pipelines see (their latents and embeddings); the engine's is the build's.
        self._io_dtype = dtype or torch.float32
        self._engine_dtype = torch_dtype(manifest.latents_input.dtype)
        self._runs: dict[str | None, _ContextRun] = {}
        self._spare: ForaSession | None = self._new_session()  # loads the graphs now: errors surface here
        self._context: str | None = None
        self._pipeline: Any = None

    @classmethod
    def from_engine(
        cls,
        engine_dir: str | Path,
        *,
        backend: str = "onnxruntime",
        device: str | None = None,
        dtype: torch.dtype | None = None,
        schedule: CacheSchedule | str | None = None,
        **backend_options: Any,
    ) -> ForaTransformer:
        """Load ``engine_dir`` on ``backend`` (``onnxruntime``, ``torch``, ``tensorrt``).

        ``device`` is where the torch / TensorRT backend runs (``cpu``, ``cuda:N``; default:
        where the torch programs were traced; ONNX Runtime takes ``providers=`` instead);
        ``dtype`` is the pipeline's dtype (default float32, as pipelines loaded without
        ``torch_dtype``); ``schedule`` overrides the manifest's (``"calibrated"``: the
        schedule ``fora-export calibrate`` wrote for the pipeline's step count);
        ``forecast=False`` reuses plainly on engines built with ``--forecast``.
        """
        return cls(
            engine_dir, backend=backend, device=device, dtype=dtype, schedule=schedule, **backend_options
        )

    # -- what pipelines read ----------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._io_dtype

    @property
    def device(self) -> torch.device:
        session = self._spare or next(iter(self._runs.values())).session
        backend: Any = session.backend  # the torch-tensor backends (torch, tensorrt) name their device
        if backend.host_inputs:
            return torch.device("cpu")
        return torch.device(backend.io_device)

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def out_channels(self) -> int:
        assert self.manifest.denoising is not None  # checked when the manifest was read
        return self.manifest.denoising.output_channels

    def to(self, *args: Any, **kwargs: Any) -> ForaTransformer:  # type: ignore[override]
        """A dtype changes what the pipeline sees; the engine stays where it was loaded."""
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype.is_floating_point:
            self._io_dtype = dtype
        return self

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise ForaError(
            f"ForaTransformer ({self.engine_dir}) | engines are not saved into a pipeline folder | "
            "save the pipeline before enable_fora(), and keep the engine folder beside it"
        )

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Calls inside run in context ``name``'s own generation and caches (see module
        docstring); ``kwargs`` (diffusers' step details) are accepted and not needed."""
        previous = self._context
        self._context = name
        try:
            yield
        finally:
            self._context = previous

    # -- pipeline and sessions --------------------------------------------------------
    def attach(self, pipeline: Any) -> ForaTransformer:
        """Read generation plans from ``pipeline.scheduler`` (or from ``pipeline`` itself
        when it is a scheduler). :func:`enable_fora` calls it; without it, the pipeline
        is found on the first call as the caller whose ``transformer`` this is."""
        self._pipeline = weakref.ref(pipeline)
        return self

    def _scheduler(self) -> Any:
        pipeline = self._pipeline() if self._pipeline is not None else None
        if pipeline is None:
            pipeline = _calling_pipeline(self)
            if pipeline is None:
                raise PipelineError(
                    "ForaTransformer | does not know the pipeline's scheduler, so it cannot plan the "
                    "generation | use enable_fora(pipe, ...) or transformer.attach(pipe)"
                )
            self._pipeline = weakref.ref(pipeline)
        return getattr(pipeline, "scheduler", pipeline)

    def _new_session(self) -> ForaSession:
        return ForaSession(self.engine_dir, **self._session_options).activate()

    def _run_of(self, context: str | None) -> _ContextRun:
        run = self._runs.get(context)
        if run is None:
            # The session loaded at construction serves the first context used.
            session = self._spare if self._spare is not None else self._new_session()
            self._spare = None
            run = self._runs[context] = _ContextRun(session)
        return run

    def close(self) -> None:
        """Release every session's graphs and buffers."""
        for run in self._runs.values():
            run.session.deactivate()
        self._runs.clear()
        if self._spare is not None:
            self._spare.deactivate()
            self._spare = None

    # -- the step -----------------------------------------------------------------------
    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        named = self._named_arguments(args, kwargs)
        latents = named.pop("hidden_states", None)
        timestep = named.pop("timestep", None)
        if not isinstance(latents, torch.Tensor) or timestep is None:
            raise InputError("ForaTransformer | hidden_states and timestep are required | pass both")
        inputs = self._engine_inputs(latents, named)
        run = self._run_of(self._context)
        timestep = torch.as_tensor(timestep).reshape(-1).expand(latents.shape[0])
        generation = self._generation_for(run, latents, timestep, inputs)
        prediction = generation.step(self._to_backend(run.session, latents, self._engine_dtype))
        output = self._to_torch(prediction, latents)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def _named_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        parameters = self.signature.parameters
        if len(args) > len(parameters):
            raise InputError(
                f"ForaTransformer | {len(args)} positional arguments | {self.manifest.model_class} "
                f"takes at most {len(parameters)}: {', '.join(parameters)}"
            )
        named = dict(zip(parameters, args, strict=False))
        for name, value in kwargs.items():
            if name in named:
                raise InputError(f"ForaTransformer | argument '{name}' given twice | pass it once")
            named[name] = value
        for name in self.signature.unsupported:
            value = named.pop(name, None)
            if not _is_unset(value):
                raise InputError(
                    f"ForaTransformer | '{name}' is not supported by exported engines (got "
                    f"{type(value).__name__}) | the graphs have fixed weights and blocks: fuse LoRA "
                    "weights and build without ControlNet or layer skipping"
                )
        for name in self.signature.nested:
            nested = named.pop(name, None) or {}
            for key, value in nested.items():
                if value is not None:
                    named[key] = value
        for name, per_sample in self.signature.fixed.items():
            value = named.pop(name, None)
            if value is not None:
                self._check_fixed(name, value, per_sample)
        return named

    def _check_fixed(self, name: str, value: Any, per_sample: Any) -> None:
        """A build-fixed argument (a list with one entry per sample) must repeat the built
        value; it feeds no graph input."""
        given = _as_lists(value)
        if not isinstance(given, list) or any(sample != per_sample for sample in given):
            height, width = self.manifest.resolution
            raise PipelineError(
                f"Argument '{name}' | got {str(value)[:80]}, the engines were built for {per_sample} per "
                f"sample (latent {height}x{width}) | pass the built height and width to the pipeline, or "
                "rebuild with --resolution for the size you need"
            )

    def _pad_prompts(self, inputs: dict[str, Any]) -> None:
        """Masked prompt inputs as the graphs take them: a missing mask means every token is
        real; prompts shorter than the built text length are padded with zero embeddings
        that the mask hides (attention ignores them: the outputs do not change)."""
        length = self.manifest.conditioning.text_length
        for mask_name, embeddings_name in self.signature.text_masks.items():
            embeddings = inputs.get(embeddings_name)
            if length is None or not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3:
                continue  # the size checks report it
            batch, tokens = int(embeddings.shape[0]), int(embeddings.shape[1])
            dtype = torch_dtype(self.manifest.input_spec(mask_name).dtype)
            mask = inputs.get(mask_name)
            if mask is None:
                mask = torch.ones(batch, tokens, dtype=dtype, device=embeddings.device)
            if tokens < length and isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, tokens):
                pad = length - tokens
                embeddings = torch.nn.functional.pad(embeddings, (0, 0, 0, pad))
                mask = torch.nn.functional.pad(mask, (0, pad))
            inputs[embeddings_name], inputs[mask_name] = embeddings, mask.to(dtype)

    def _engine_inputs(self, latents: torch.Tensor, named: dict[str, Any]) -> dict[str, Any]:
        """The conditioning and build constants of a call by manifest name (unknown or
        missing ones refused), with the build's size limits as pipeline-level errors."""
        manifest = self.manifest
        expected = {spec.name for spec in manifest.inputs if spec.role in ("conditioning", "build_constant")}
        inputs = {name: value for name, value in named.items() if value is not None}
        self._pad_prompts(inputs)
        unknown = sorted(set(inputs) - expected)
        if unknown:
            raise InputError(
                f"ForaTransformer | arguments {unknown} are not inputs of these engines | "
                f"{manifest.model_class} engines take {sorted(expected)}"
            )
        missing = [spec.name for spec in manifest.inputs_of("conditioning") if spec.name not in inputs]
        if missing:
            raise InputError(
                f"ForaTransformer | missing {missing} | the engines were built with these inputs "
                f"({self.engine_dir / MANIFEST_NAME})"
            )
        self._check_sizes(latents, inputs)
        return inputs

    def _check_sizes(self, latents: torch.Tensor, inputs: dict[str, Any]) -> None:
        manifest = self.manifest
        batch = int(latents.shape[0])
        built = manifest.latents_input.concrete_shape(batch)
        if tuple(latents.shape) != built:
            height, width = manifest.resolution
            pipeline = self._pipeline() if self._pipeline is not None else None
            scale = getattr(pipeline, "vae_scale_factor", getattr(pipeline, "vae_scale_factor_spatial", None))
            image = f" (images {height * scale}x{width * scale})" if isinstance(scale, int) else ""
            size = f"height={height * scale}, width={width * scale}" if isinstance(scale, int) else "the size"
            raise PipelineError(
                f"Latents | got {list(latents.shape)}, the engines were built for {list(built)}, latent "
                f"{height}x{width}{image} | pass {size} to the pipeline (videos: the num_frames of the "
                "built --frames; with PixArt's resolution binning, a size its bins keep), or rebuild "
                "with --resolution / --frames for the size you need"
            )
        if not manifest.batch.contains(batch):
            raise PipelineError(
                f"Batch | the pipeline passed {batch} samples (classifier-free guidance doubles the "
                f"images per call), the engines were built for {manifest.batch.min}..{manifest.batch.max} | "
                f"generate fewer images per call, or rebuild with --batch {manifest.batch.min}:"
                f"{manifest.batch.opt}:{batch} or more"
            )
        text_length = manifest.conditioning.text_length
        for spec in manifest.inputs_of("conditioning"):
            value = inputs[spec.name]
            shape = tuple(getattr(value, "shape", ()))
            want = spec.concrete_shape(batch)
            if shape == want:
                continue
            if text_length is not None and len(want) == 3 and want[1] == text_length and len(shape) == 3:
                extra = self.signature.extra_text_tokens
                raise PipelineError(
                    f"Prompt length | '{spec.name}' has {shape[1]} tokens, the engines were built for "
                    f"{text_length} | pass max_sequence_length={text_length - extra} to the pipeline, or "
                    f"rebuild with --text-length {shape[1]}"
                )
            raise InputError(
                f"Input '{spec.name}' | got shape {list(shape)}, expected {list(want)} | "
                f"({self.engine_dir / MANIFEST_NAME})"
            )

    def _generation_for(
        self, run: _ContextRun, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict[str, Any]
    ) -> Generation:
        """The running generation when this call continues it, else a new one (see the
        module docstring for what starts one)."""
        scheduler_timesteps = getattr(self._scheduler(), "timesteps", None)
        if scheduler_timesteps is None:
            raise PipelineError(
                "ForaTransformer | the pipeline's scheduler has no timesteps | call "
                "scheduler.set_timesteps() before the denoising loop, as pipelines do"
            )
        generation = run.generation
        given = timestep.detach().cpu()
        step = generation.step_index if generation is not None and not generation.done else None
        if run.tracker.continues(
            scheduler_timesteps,
            given.double().numpy(),
            _eps(given),
            step=step,
            batch_size=int(latents.shape[0]),
        ):
            assert generation is not None  # continues() is False without one
            self._check_conditioning(run, inputs, generation)
            return generation
        return self._start(run, latents, given, inputs, scheduler_timesteps)

    def _start(
        self,
        run: _ContextRun,
        latents: torch.Tensor,
        given: torch.Tensor,
        inputs: dict[str, Any],
        scheduler_timesteps: Any,
    ) -> Generation:
        denoising = self.manifest.denoising
        assert denoising is not None  # checked when the manifest was read
        scale = denoising.timestep_scale
        scheduled = (torch.as_tensor(scheduler_timesteps).detach().cpu().double() * scale).float().numpy()
        planned = plan_window(
            scheduled, given.double().numpy(), _eps(given), denoising.timestep_range, scale=scale
        )
        session = run.session
        run.generation = None  # a failed start leaves no generation to continue
        run.tracker.forget()
        constants = {spec.name for spec in self.manifest.inputs_of("build_constant")}
        session.drop_build_constants({k: inputs[k].detach().cpu() for k in constants if k in inputs})
        conditioning = {k: v for k, v in inputs.items() if k not in constants}
        fed = {
            name: self._to_backend(session, value, torch_dtype(self.manifest.input_spec(name).dtype))
            for name, value in conditioning.items()
        }
        try:
            generation = session.start(len(planned), int(latents.shape[0]), timesteps=planned, **fed)
        except ScheduleError as err:
            raise PipelineError(
                f"Steps | the pipeline runs {len(planned)} steps, which the cache schedule "
                f"({session.schedule.describe()}) cannot plan: {err} | pass num_inference_steps the "
                "schedule allows, or load the engines with another schedule"
            ) from err
        run.generation = generation
        run.tracker.started(scheduler_timesteps, planned, int(latents.shape[0]))
        run.conditioning = dict(conditioning)
        return generation

    def _check_conditioning(self, run: _ContextRun, inputs: dict[str, Any], generation: Generation) -> None:
        """Conditioning is fixed per generation: the same tensors (or equal values) each step."""
        for name, first in run.conditioning.items():
            value = inputs.get(name)
            if value is first:
                continue
            same = (
                isinstance(value, torch.Tensor)
                and isinstance(first, torch.Tensor)
                and value.shape == first.shape
                and torch.equal(value.to(first.device, first.dtype), first)
            )
            if not same:
                raise PipelineError(
                    f"Input '{name}' | changed at step {generation.step_index} of {generation.num_steps} "
                    "| conditioning is fixed per generation: start a new pipeline call for new prompts"
                )

    def _to_backend(self, session: ForaSession, value: Any, dtype: torch.dtype) -> Any:
        tensor = torch.as_tensor(value).detach().to(dtype)
        if session.backend.host_inputs:
            return tensor.cpu().numpy()
        return session.backend.upload(tensor)

    def _to_torch(self, prediction: Any, latents: torch.Tensor) -> torch.Tensor:
        output = torch.from_numpy(prediction) if isinstance(prediction, np.ndarray) else prediction
        return output.to(device=latents.device, dtype=latents.dtype)


def _eps(given: torch.Tensor) -> float:
    """The machine epsilon of the dtype timesteps arrived in (float32 at least)."""
    dtype = given.dtype if given.is_floating_point() else torch.float32
    return max(float(torch.finfo(dtype).eps), float(torch.finfo(torch.float32).eps))


def _calling_pipeline(transformer: ForaTransformer, depth: int = 12) -> Any:
    """The pipeline whose ``transformer`` is ``transformer``, from the calling frames (for
    pipelines loaded with ``from_pretrained(..., transformer=...)``, which never attach)."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not transformer and any(
            getattr(owner, name, None) is transformer for name in ("transformer", "transformer_2")
        ):
            return owner
        frame = frame.f_back
    return None


def enable_fora(
    pipe: Any,
    engine_dir: str | Path | ForaTransformer,
    *,
    transformer_2: str | Path | ForaTransformer | None = None,
    backend: str = "onnxruntime",
    device: str | None = None,
    schedule: CacheSchedule | None = None,
    **backend_options: Any,
) -> Any:
    """Swap ``pipe.transformer`` for the engines in ``engine_dir`` (or attach a
    :class:`ForaTransformer` already made) and return ``pipe``. ``transformer_2`` does
    the same for a second expert's engines (Wan 2.2 A14B's low-noise ``transformer_2``):
    each expert plans the steps it serves, its first one full.

    The drop-in's dtype is the pipeline's VAE dtype (an fp16 engine in an fp32 pipeline
    casts at the boundary). The original transformer is released from the pipeline;
    to never load it, pass ``transformer=ForaTransformer.from_engine(...)`` to the
    pipeline's ``from_pretrained`` instead.
    """
    for name, engines in (("transformer", engine_dir), ("transformer_2", transformer_2)):
        if engines is None:
            continue
        if isinstance(engines, ForaTransformer):
            transformer = engines
        else:
            vae = getattr(pipe, "vae", None)
            dtype = getattr(vae, "dtype", None) or getattr(pipe, "dtype", None)
            transformer = ForaTransformer.from_engine(
                engines, backend=backend, device=device, dtype=dtype, schedule=schedule, **backend_options
            )
        current = getattr(pipe, name, None)
        built = transformer.manifest.model_class
        if (
            current is not None
            and not isinstance(current, ForaTransformer)
            and type(current).__name__ != built
        ):
            raise ForaError(
                f"enable_fora | the pipeline's {name} is a {type(current).__name__}, the engines were "
                f"built from a {built} | pass the engines of this pipeline's model"
            )
        setattr(pipe, name, transformer)
        transformer.attach(pipe)
    return pipe


def _as_lists(value: Any) -> Any:
    """``value`` with tuples read as lists (how the manifest records a fixed argument)."""
    if isinstance(value, list | tuple):
        return [_as_lists(item) for item in value]
    return value
