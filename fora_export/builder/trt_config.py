"""How TensorRT engines are built: the build settings recorded in the manifest (both
flavours read them; ``trt_flavors`` and ``tensorrt`` import this module, never each other
in a circle)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from fora_export.errors import ConfigError

MAX_OPT_LEVEL = 5  # builder_optimization_level accepts 0..5 in TensorRT 10.x and 11.x


@dataclass(frozen=True)
class TrtBuildConfig:
    """How engines are built; recorded in the manifest's TensorRT record.

    ``opt_level`` is ``IBuilderConfig.builder_optimization_level`` (0..5, TensorRT
    default 3). ``workspace_bytes`` caps the workspace memory pool; None keeps
    TensorRT's default (the device's global memory). ``tf32`` lets fp32 tensors
    use TF32 math (TensorRT's default, ~1e-3 relative error); it is off so fp32
    engines match the fp32 ONNX graphs to ~1e-5. ``compute_capabilities`` are the
    TensorRT-RTX targets ("8.6", ...; None: ``trt_flavors.DEFAULT_RTX_TARGETS``);
    datacenter TensorRT builds for the visible GPU and takes none. ``fold_constants``
    parses a copy of each graph with its constant subgraphs folded (see
    :func:`fold_for_parser`); the engine folder keeps the graphs as exported.
    """

    opt_level: int = 3
    workspace_bytes: int | None = None
    tf32: bool = False
    compute_capabilities: tuple[str, ...] | None = None
    #: Fold constants (polygraphy) in a copy of each graph before TensorRT parses it.
    fold_constants: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.opt_level, bool) or not isinstance(self.opt_level, int):
            raise ConfigError(f"TensorRT opt level | got {self.opt_level!r} | expected an integer 0..5")
        if not 0 <= self.opt_level <= MAX_OPT_LEVEL:
            raise ConfigError(f"TensorRT opt level | got {self.opt_level} | expected 0..{MAX_OPT_LEVEL}")
        if self.workspace_bytes is not None and (
            isinstance(self.workspace_bytes, bool)
            or not isinstance(self.workspace_bytes, int)
            or self.workspace_bytes <= 0
        ):
            raise ConfigError(
                f"TensorRT workspace | got {self.workspace_bytes!r} | expected a positive byte count or None"
            )
        if self.compute_capabilities is not None and (
            not self.compute_capabilities
            or not all(re.fullmatch(r"\d+\.\d", str(cc)) for cc in self.compute_capabilities)
        ):
            raise ConfigError(
                f"--compute-capabilities | got {self.compute_capabilities!r} | expected major.minor "
                "values, e.g. 8.6,8.9,12.0"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
