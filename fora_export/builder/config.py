"""Build options as one frozen, recorded object."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from fora_export.adapters.base import AdapterOptions
from fora_export.builder.trt_config import TrtBuildConfig
from fora_export.choices import BUILD_BACKENDS, PRECISIONS
from fora_export.errors import ConfigError
from fora_export.export.onnx_export import ExportConfig
from fora_runtime.errors import ScheduleError
from fora_runtime.manifest import MAX_DIM, BatchRange
from fora_runtime.schedule import CacheSchedule


def default_opset(exporter: str) -> int:
    """17 for TorchScript (the first opset with LayerNormalization), 18 for dynamo (its minimum)."""
    return 17 if exporter == "torchscript" else 18


def parse_batch(text: str) -> BatchRange:
    """``MIN:OPT:MAX``, ``MIN:MAX`` or a single size."""
    if not re.fullmatch(r"\d+(:\d+){0,2}", text.strip()):
        raise ConfigError(f"--batch | got {text!r} | expected MIN:OPT:MAX, e.g. 1:2:8")
    parts = [int(p) for p in text.strip().split(":")]
    if len(parts) == 1:
        low = opt = high = parts[0]
    elif len(parts) == 2:
        low, high = parts
        opt = high
    else:
        low, opt, high = parts
    if not 1 <= low <= opt <= high:
        raise ConfigError(f"--batch | got {text!r} | need 1 <= MIN <= OPT <= MAX")
    if high > MAX_DIM:
        raise ConfigError(f"--batch | got {text!r} | MAX must be at most {MAX_DIM} (a tensor dimension)")
    return BatchRange(low, opt, high)


def parse_resolution(text: str | int | None) -> tuple[int, int] | None:
    """``32`` or ``32x48`` (latent pixels), or None for the model's own size."""
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", str(text).strip())
    if not match:
        raise ConfigError(f"--resolution | got {text!r} | expected a latent size like 32 or 32x32")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height < 1 or width < 1:
        raise ConfigError(f"--resolution | got {text!r} | sizes must be positive")
    return (height, width)


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``fora-export build`` was asked for, recorded in the manifest."""

    batch: BatchRange = field(default_factory=lambda: BatchRange(1, 2, 8))
    resolution: tuple[int, int] | None = None
    schedule: CacheSchedule = field(default_factory=lambda: CacheSchedule.interval_of(3))
    export: ExportConfig = field(default_factory=ExportConfig)
    adapter: AdapterOptions = field(default_factory=AdapterOptions)
    backend: str = "auto"
    tensorrt: TrtBuildConfig = field(default_factory=TrtBuildConfig)
    #: Where torch programs are traced and will run: "auto" (cuda when visible), "cpu", "cuda".
    device: str = "auto"
    #: A pipeline folder's transformer to build (None: ``transformer``; ``transformer_2``:
    #: Wan 2.2's low-noise expert).
    subfolder: str | None = None
    #: Refuse builds whose caches at the largest batch exceed this many GiB (None: no limit).
    max_cache_gib: float | None = None
    #: "lean": the family's reuse step computing only gates and the residual sum
    #: (when it has one); "plain": every block's forward with replayed sublayers.
    reuse_graph: str = "lean"
    #: Also export the forecast reuse graph (first-order forecast of the caches from the last
    #: two full steps; needs the lean reuse graph's gate table).
    forecast: bool = False

    def __post_init__(self) -> None:
        limit = self.max_cache_gib
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0
        ):
            raise ConfigError(f"--max-cache-gib | got {limit!r} | expected a positive number of GiB")
        if self.backend not in BUILD_BACKENDS:
            raise ConfigError(
                f"--backend | got {self.backend!r} | expected one of {', '.join(BUILD_BACKENDS)}"
            )
        if self.tensorrt.compute_capabilities is not None and self.backend != "tensorrt-rtx":
            raise ConfigError(
                "--compute-capabilities | applies to --backend tensorrt-rtx only "
                f"(this build: {self.backend}) | add --backend tensorrt-rtx, or leave it out"
            )
        if self.reuse_graph not in ("lean", "plain"):
            raise ConfigError(f"--reuse-graph | got {self.reuse_graph!r} | expected lean or plain")
        if self.forecast and self.reuse_graph == "plain":
            raise ConfigError(
                "--forecast | the forecast weights live in the lean reuse step's gate table; the plain "
                "reuse graph (--reuse-graph plain) has none | drop --reuse-graph plain, or --forecast"
            )
        if self.forecast and self.backend in ("tensorrt", "tensorrt-rtx"):
            raise ConfigError(
                f"--forecast | no TensorRT engine is built for the forecast graph yet (--backend "
                f"{self.backend}) | build with --backend onnx or torch"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device | got {self.device!r} | expected auto, cpu, cuda or cuda:N")

    @classmethod
    def from_options(
        cls,
        *,
        batch: str = "1:2:8",
        resolution: str | int | None = None,
        interval: int = 3,
        schedule_mode: str = "paper",
        precision: str = "fp32",
        opset: int | None = None,
        exporter: str | None = None,
        fp32_islands: bool = True,
        cache: str | None = None,
        text_length: int | None = None,
        backend: str = "auto",
        trt_opt_level: int = 3,
        trt_workspace_mib: int | None = None,
        trt_compute_capabilities: str | None = None,
        device: str = "auto",
        reuse_graph: str = "lean",
        frames: int | None = None,
        subfolder: str | None = None,
        max_cache_gib: float | None = None,
        forecast: bool = False,
    ) -> BuildConfig:
        if precision not in PRECISIONS:
            raise ConfigError(f"--precision | got {precision!r} | expected one of {', '.join(PRECISIONS)}")
        try:
            schedule = CacheSchedule.interval_of(interval, schedule_mode)
        except ScheduleError as err:
            raise ConfigError(f"--interval | {err}") from err
        # exporter None: the family's (resolved by the build with the model in hand).
        if opset is None and exporter is not None:
            opset = default_opset(exporter)
        kinds = None
        if cache is not None:
            kinds = tuple(k.strip() for k in cache.split(",") if k.strip())
            if not kinds:
                raise ConfigError(f"--cache | got {cache!r} | expected sublayer kinds, e.g. attn1,attn2,ff")
        workspace = trt_workspace_mib * 2**20 if trt_workspace_mib is not None else None
        targets = None
        if trt_compute_capabilities is not None:
            targets = tuple(cc.strip() for cc in trt_compute_capabilities.split(",") if cc.strip())
        return cls(
            adapter=AdapterOptions(cache=kinds, text_length=text_length, frames=frames),
            subfolder=subfolder,
            max_cache_gib=max_cache_gib,
            forecast=forecast,
            backend=backend,
            device=device,
            reuse_graph=reuse_graph,
            tensorrt=TrtBuildConfig(
                opt_level=trt_opt_level, workspace_bytes=workspace, compute_capabilities=targets
            ),
            batch=parse_batch(batch),
            resolution=parse_resolution(resolution),
            schedule=schedule,
            export=ExportConfig(
                precision=precision,
                opset=opset if opset is not None else 0,
                exporter=exporter or "",
                fp32_islands=fp32_islands,
            ),
        )

    @property
    def precision(self) -> str:
        return self.export.precision

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": asdict(self.batch),
            "resolution": list(self.resolution) if self.resolution else None,
            "schedule": self.schedule.to_dict(),
            "export": asdict(self.export),
            "adapter": self.adapter.to_dict(),
            "backend": self.backend,
            "device": self.device,
            "reuse_graph": self.reuse_graph,
            "tensorrt": self.tensorrt.to_dict(),
            "subfolder": self.subfolder,
            "max_cache_gib": self.max_cache_gib,
            "forecast": self.forecast,
        }
