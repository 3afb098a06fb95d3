"""``fora-export sample``: images from a diffusers pipeline three ways, side by side.

With the same seed, schedule and arguments, the pipeline runs

1. **engine**: the engine folder as ``pipe.transformer`` (:mod:`fora_runtime.diffusers`);
2. **no cache**: the pipeline as loaded (its own transformer, every step in full);
3. **PyTorch FORA**: its transformer cached in PyTorch with the engines' schedule
   (:class:`~fora_export.validate.pipeline_ref.ForaReference`),

and writes each image (``engine-0.png``, ``nocache-0.png``, ``fora-0.png``, ...) and
``grid.png``: one row per image, columns no cache | PyTorch FORA | engine. Video
pipelines (Wan) write animated WebP files instead (``engine-0.webp``, ``grid.webp``,
lossless, through Pillow). The engine runs first, so a call the build cannot serve
fails before the slower PyTorch runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fora_export.errors import ConfigError
from fora_export.validate.three_ways import COLUMNS, run_three_ways, save_grid, save_image
from fora_runtime.trust import DEFAULT_ACCESS, FolderAccess


@dataclass
class SampleResult:
    out_dir: Path
    pipeline: str
    steps: int
    schedule: str
    #: Seconds per run, by file prefix (engine, nocache, fora).
    seconds: dict[str, float] = field(default_factory=dict)
    images: dict[str, list[Path]] = field(default_factory=dict)
    grid: Path | None = None
    #: Max abs pixel difference (values in [0, 1]) engine vs PyTorch FORA, and FORA vs no cache.
    engine_vs_fora: float = 0.0
    fora_vs_nocache: float = 0.0


def sample(
    engine_dir: str | Path,
    pipeline: str,
    out_dir: str | Path,
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
    access: FolderAccess = DEFAULT_ACCESS,
) -> SampleResult:
    """Run the three ways (see the module docstring) and write the images and the grid."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out '{out}' | cannot create it: {err}") from err
    runs = run_three_ways(
        engine_dir,
        pipeline,
        prompts=prompts,
        class_labels=class_labels,
        steps=steps,
        guidance=guidance,
        seed=seed,
        interval=interval,
        schedule=schedule,
        backend=backend,
        device=device,
        progress=progress,
        access=access,
    )
    result = SampleResult(out, pipeline, steps, runs.schedule, seconds=dict(runs.seconds))
    outputs = runs.images
    result.engine_vs_fora = float(np.abs(outputs["engine"] - outputs["fora"]).max())
    result.fora_vs_nocache = float(np.abs(outputs["fora"] - outputs["nocache"]).max())
    suffix = ".webp" if outputs["engine"].ndim == 5 else ".png"
    for _, prefix in COLUMNS:
        result.images[prefix] = [
            save_image(image, out / f"{prefix}-{index}{suffix}")
            for index, image in enumerate(outputs[prefix])
        ]
    result.grid = save_grid(runs.images, out / f"grid{suffix}")
    return result
