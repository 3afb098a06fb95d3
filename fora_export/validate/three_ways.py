"""A diffusers pipeline run three ways with one seed, schedule and arguments: what
``fora-export sample`` writes and ``validate --pipeline`` checks.

1. **engine**: the engine folder as ``pipe.transformer`` (:mod:`fora_runtime.diffusers`);
2. **no cache**: the pipeline as loaded (its own transformer, every step in full);
3. **PyTorch FORA**: its transformer cached in PyTorch with the engines' schedule
   (:class:`~fora_export.validate.pipeline_ref.ForaReference`).

The engine runs first, so a call the build cannot serve fails before the slower PyTorch
runs. Images are saved as PNG files, videos as animated lossless WebP files (Pillow), and
``save_grid`` lays the three ways out side by side.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fora_export.errors import ConfigError
from fora_export.schedules import chosen_schedule
from fora_runtime.manifest import Manifest, load_manifest
from fora_runtime.trust import DEFAULT_ACCESS, FolderAccess

#: Column order of the grid: label and file prefix.
COLUMNS = (("no cache", "nocache"), ("PyTorch FORA", "fora"), ("engine", "engine"))
DEFAULT_CLASS_LABELS = (207, 360)
DEFAULT_PROMPTS = ("a photo of a cat",)


def load_pipeline(ref: str) -> Any:
    """A built-in demo pipeline by name, or a local folder written by ``pipe.save_pretrained``."""
    from fora_export.adapters.registry import demo_pipeline_names, make_demo_pipeline

    if ref in demo_pipeline_names():
        return make_demo_pipeline(ref)
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"--pipeline '{ref}' | {'is a file' if path.exists() else 'no such folder'}, and not a "
            f"built-in pipeline ({', '.join(demo_pipeline_names())}) | pass a folder written by "
            "pipe.save_pretrained()"
        )
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            f"--pipeline '{ref}' | has no model_index.json | pass a diffusers pipeline folder "
            "(pipe.save_pretrained), not a transformer folder"
        )
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    # Loading bars are noise here; the denoising runs show their own.
    diffusers_logging.disable_progress_bar()
    try:
        return DiffusionPipeline.from_pretrained(str(path))
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"--pipeline '{ref}' | diffusers could not load it: {err}") from err
    finally:
        diffusers_logging.enable_progress_bar()


def pipeline_arguments(
    pipe: Any,
    manifest: Manifest,
    *,
    prompts: tuple[str, ...],
    class_labels: tuple[int, ...],
    guidance: float | None,
) -> dict[str, Any]:
    """The pipeline call for these engines: its conditioning, the built image size and
    prompt length, read off the pipeline's own signature."""
    parameters = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {}
    if "class_labels" in parameters:
        if prompts:
            raise ConfigError(f"--prompt | {type(pipe).__name__} is class-conditional | pass --class-label")
        kwargs["class_labels"] = list(class_labels or DEFAULT_CLASS_LABELS)
    else:
        if class_labels:
            raise ConfigError(f"--class-label | {type(pipe).__name__} takes prompts | pass --prompt")
        kwargs["prompt"] = list(prompts or DEFAULT_PROMPTS)
    scale = getattr(pipe, "vae_scale_factor", getattr(pipe, "vae_scale_factor_spatial", None))
    if "height" in parameters and isinstance(scale, int):
        kwargs["height"], kwargs["width"] = (side * scale for side in manifest.resolution)
    assert manifest.denoising is not None  # checked when the manifest was read
    layout = manifest.denoising.latent_layout
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    if "num_frames" in parameters and "F" in layout and isinstance(temporal, int):
        latent_frames = int(manifest.latents_input.shape[layout.index("F")])
        kwargs["num_frames"] = (latent_frames - 1) * temporal + 1  # Wan's VAE: 4x in time
    if "use_resolution_binning" in parameters:
        kwargs["use_resolution_binning"] = False  # the built size exactly
    if "clean_caption" in parameters:
        kwargs["clean_caption"] = False  # needs bs4 and ftfy; the prompt as typed
    text_length = manifest.conditioning.text_length
    if "max_sequence_length" in parameters and text_length is not None:
        extra = manifest.forward.extra_text_tokens if manifest.forward is not None else 0
        if int(text_length) <= extra:
            raise ConfigError(
                f"ENGINE_DIR | built for {text_length} text tokens, but {type(pipe).__name__} prompts are "
                f"{extra} CLIP tokens + max_sequence_length T5 tokens | rebuild with --text-length "
                f"{extra}+N (e.g. {extra + 256}, the pipeline's default)"
            )
        kwargs["max_sequence_length"] = int(text_length) - extra
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return kwargs


def _run(pipe: Any, label: str, steps: int, seed: int, progress: bool, kwargs: dict[str, Any]) -> Any:
    import torch

    pipe.set_progress_bar_config(desc=label, disable=not progress, leave=True)
    generator = torch.Generator().manual_seed(seed)
    output = pipe(num_inference_steps=steps, generator=generator, output_type="np", **kwargs)
    # [N, H, W, 3] images, or [N, F, H, W, 3] videos (their pipelines return frames).
    return np.asarray(output.frames if hasattr(output, "frames") else output.images)


@dataclass
class ThreeWays:
    """One pipeline call run three ways (see the module docstring), by file prefix."""

    manifest: Manifest
    pipeline_class: str
    scheduler_class: str
    steps: int
    schedule: str
    images: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: Every transformer output (CPU float32) in call order, when recorded.
    calls: dict[str, list[Any]] = field(default_factory=dict)


def run_three_ways(
    engine_dir: str | Path,
    pipeline: str,
    *,
    prompts: tuple[str, ...] = (),
    class_labels: tuple[int, ...] = (),
    steps: int = 20,
    guidance: float | None = None,
    seed: int = 0,
    interval: int | None = None,
    schedule: str | None = None,
    backend: str = "onnxruntime",
    device: str | None = None,
    progress: bool = True,
    record_calls: bool = False,
    access: FolderAccess = DEFAULT_ACCESS,
) -> ThreeWays:
    """Run the pipeline with the engines, without cache and with PyTorch FORA (same seed,
    schedule and arguments); ``record_calls`` keeps every transformer output."""
    from fora_export.validate.pipeline_ref import ForaReference
    from fora_runtime.diffusers import ForaTransformer

    if steps < 1:
        raise ConfigError(f"--steps | got {steps} | expected >= 1")
    manifest = load_manifest(engine_dir, **access.manifest_options())
    plan = chosen_schedule(manifest, engine_dir, steps, interval=interval, schedule=schedule)
    pipe = load_pipeline(pipeline)
    original = getattr(pipe, "transformer", None)
    if original is None or type(original).__name__ != manifest.model_class:
        raise ConfigError(
            f"--pipeline '{pipeline}' | its transformer is a {type(original).__name__}, the engines were "
            f"built from a {manifest.model_class} | pass the pipeline of the engines' model"
        )
    trained = getattr(getattr(pipe.scheduler, "config", None), "num_train_timesteps", None)
    if isinstance(trained, int) and steps > trained:
        raise ConfigError(
            f"--steps | got {steps}, the pipeline's {type(pipe.scheduler).__name__} has {trained} training "
            f"timesteps | sample with 1 to {trained} steps"
        )
    kwargs = pipeline_arguments(pipe, manifest, prompts=prompts, class_labels=class_labels, guidance=guidance)
    dtype = getattr(getattr(pipe, "vae", None), "dtype", None)
    engine = ForaTransformer.from_engine(
        engine_dir, backend=backend, device=device, dtype=dtype, schedule=plan, **access.session_options()
    )
    if device is not None:
        pipe.to(device)
    runs = ThreeWays(manifest, type(pipe).__name__, type(pipe.scheduler).__name__, steps, plan.describe())

    def timed(prefix: str, label: str, transformer: Any) -> None:
        pipe.transformer = transformer
        calls: list[Any] = runs.calls.setdefault(prefix, [])
        hook = transformer.register_forward_hook(
            lambda module, args, output: calls.append(output[0].float().cpu())
        )
        if not record_calls:
            hook.remove()
        start = time.perf_counter()
        try:
            runs.images[prefix] = _run(pipe, label, steps, seed, progress, kwargs)
        finally:
            hook.remove()
            pipe.transformer = original
        runs.seconds[prefix] = time.perf_counter() - start

    try:
        timed("engine", "engine", engine.attach(pipe))
    finally:
        engine.close()
    timed("nocache", "no cache", original)
    reference = ForaReference.for_engines(original, manifest, plan)
    reference.reset(_calls_per_run(pipe, steps))  # per cache context
    try:
        timed("fora", "PyTorch FORA", reference)
    finally:
        reference.remove()
    return runs


def _calls_per_run(pipe: Any, steps: int) -> int:
    """Transformer calls of one run in each cache context: one per scheduler timestep
    (``set_timesteps`` ran for the last run, with the same step count)."""
    timesteps = getattr(pipe.scheduler, "timesteps", None)
    return len(timesteps) if timesteps is not None else steps


def _to_pil(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))


#: Milliseconds per frame of the animated WebP files (Wan: 16 fps).
FRAME_MS = 62


def _write(frames: list[Any], path: Path) -> Path:
    """One PNG, or an animated lossless WebP when there are several frames."""
    try:
        if len(frames) == 1:
            frames[0].save(path)
        else:
            frames[0].save(
                path, save_all=True, append_images=frames[1:], duration=FRAME_MS, loop=0, lossless=True
            )
    except OSError as err:
        raise ConfigError(f"--out | cannot write {path}: {err}") from err
    return path


def _frames(image: np.ndarray) -> list[np.ndarray]:
    """The frames of one sample: an image [H, W, 3] is one frame, a video [F, H, W, 3] several."""
    return [image] if image.ndim == 3 else list(image)


def save_image(image: np.ndarray, path: Path) -> Path:
    return _write([_to_pil(frame) for frame in _frames(image)], path)


def save_grid(images: dict[str, np.ndarray], path: Path, header: int = 18, gap: int = 4) -> Path:
    """Rows of samples, one column per way (no cache | PyTorch FORA | engine), labelled on
    top; videos give an animated grid, frame by frame."""
    from PIL import Image, ImageDraw

    columns = [images[prefix] for _, prefix in COLUMNS]
    first = _frames(columns[0][0])
    rows, height, width = len(columns[0]), first[0].shape[0], first[0].shape[1]
    cell = max(width, 96)  # room for the labels under small images
    size = (len(columns) * (cell + gap) - gap, header + rows * (height + gap) - gap)
    grids = []
    for frame in range(len(first)):
        grid = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(grid)
        for column, ((label, _), samples) in enumerate(zip(COLUMNS, columns, strict=True)):
            left = column * (cell + gap)
            draw.text((left + 2, 3), label, fill="black")
            for row, sample in enumerate(samples):
                picture = _to_pil(_frames(sample)[frame])
                grid.paste(picture, (left + (cell - width) // 2, header + row * (height + gap)))
        grids.append(grid)
    return _write(grids, path)
