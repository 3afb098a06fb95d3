"""The manifest's vocabulary: graph roles, the tensor specs of graphs, inputs and caches,
the batch ranges, the denoising contract and the diffusers forward signature. Stdlib only.

Each spec parses itself strictly from JSON (``from_dict``, any flaw a ``FieldError``) and
writes itself back (``to_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from fora_runtime.dtypes import MANIFEST_DTYPES
from fora_runtime.manifest.fields import (
    MAX_DIM,
    FieldError,
    check_file_name,
    describe,
    expect,
    field_of,
    list_of,
)

#: 2: step inputs with roles (``inputs``) and the family's denoising contract (``denoising``).
#: 3: the family's diffusers forward signature (``forward``), one ``conditioning.text_length``.
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
BATCH_AXIS = "batch"


class GraphRole(str, Enum):
    """The graphs an engine folder may hold; a graph's file is ``<role><suffix>`` and its
    name in the manifest's ``graphs`` is the role's value. One name per graph everywhere
    (modules, manifest keys, backends)."""

    #: The whole model; outputs the prediction and every cache tensor.
    FULL = "full"
    #: Takes the step inputs and the caches; skips attention and feed-forward.
    REUSE = "reuse"
    #: Optional, with REUSE_GATED: the gate table of many (step, sample) rows at once.
    GATES = "gates"
    #: The reuse step reading its row of the gate table instead of computing it.
    REUSE_GATED = "reuse_gated"
    #: Optional (``build --forecast``, with the gate-table graphs): the reuse step that
    #: forecasts each cache from the last two full steps, ``A + w (A - A_previous)``. It reads
    #: the gate table's row, the step's weight ``w`` per sample, the caches and the previous caches.
    REUSE_FORECAST = "reuse_forecast"

    # The value, not ``GraphRole.FULL``, wherever a role is printed or formatted into a name.
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    # In lists of roles formatted into messages too: ``['full', 'reuse']``.
    def __repr__(self) -> str:
        return repr(self.value)


GRAPH_ROLES = (GraphRole.FULL, GraphRole.REUSE)
#: Optional, always together.
GATE_TABLE_ROLES = (GraphRole.GATES, GraphRole.REUSE_GATED)
GATES_NAME = "gates"
FORECAST_ROLE = GraphRole.REUSE_FORECAST
FORECAST_WEIGHT_NAME = "forecast_weight"
#: The previous full step's cache ``name`` is the forecast graph's input ``previous.<name>``.
PREVIOUS_PREFIX = "previous."


def previous_cache_name(name: str) -> str:
    """The forecast graph's input holding cache ``name`` of the full step before the last."""
    return f"{PREVIOUS_PREFIX}{name}"


#: What each step input is. ``build_constant`` inputs (e.g. Flux's position ids) are fixed
#: per build and baked into the graphs; their values are recorded so a caller who passes
#: them anyway is checked.
INPUT_ROLES = ("latents", "timestep", "conditioning", "build_constant")
#: File suffix of each graph format; a graph's file is ``<role><suffix>``.
GRAPH_SUFFIXES = {"onnx": ".onnx", "torch": ".pt2", "tensorrt": ".plan"}


def graph_file(role: str, kind: str = "onnx") -> str:
    """The file name of graph ``role`` in format ``kind`` (one naming rule for every backend)."""
    return f"{role}{GRAPH_SUFFIXES[kind]}"


#: The noise prediction: the first output of every graph but ``gates``.
PREDICTION_NAME = "prediction"


def _shape(data: Any, path: str) -> tuple[int | str, ...]:
    def dim(value: Any, where: str) -> int | str:
        if value == BATCH_AXIS and isinstance(value, str):
            return BATCH_AXIS
        return int(expect(value, int, where, low=1, high=MAX_DIM))

    return list_of(data, "shape", path, dim)


def _dtype(data: Any, path: str) -> str:
    dtype = field_of(data, "dtype", str, path)
    if dtype not in MANIFEST_DTYPES:
        raise FieldError(f"field '{path}.dtype' is {dtype!r}, expected one of {list(MANIFEST_DTYPES)}")
    return str(dtype)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output. ``shape`` holds ints and the symbol ``"batch"``."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def concrete_shape(self, batch_size: int) -> tuple[int, ...]:
        return tuple(batch_size if d == BATCH_AXIS else int(d) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "tensor") -> TensorSpec:
        return cls(name=field_of(data, "name", str, path), dtype=_dtype(data, path), shape=_shape(data, path))


@dataclass(frozen=True)
class InputSpec(TensorSpec):
    """A step input: its role (one of :data:`INPUT_ROLES`) and, for build constants,
    the value baked into the graphs (nested lists, without a batch axis)."""

    role: str = "conditioning"
    value: Any = None

    def to_dict(self) -> dict[str, Any]:
        data = {**super().to_dict(), "role": self.role}
        if self.role == "build_constant":
            data["value"] = self.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "input") -> InputSpec:
        role = field_of(data, "role", str, path)
        if role not in INPUT_ROLES:
            raise FieldError(f"field '{path}.role' is {role!r}, expected one of {list(INPUT_ROLES)}")
        value = data.get("value")
        if role == "build_constant":
            value = field_of(data, "value", list, path)
        return cls(
            name=field_of(data, "name", str, path),
            dtype=_dtype(data, path),
            shape=_shape(data, path),
            role=role,
            value=value,
        )


@dataclass(frozen=True)
class DenoisingSpec:
    """How a family's steps are driven: what the latents look like, what the graphs'
    timestep means and which scheduler family samples with them (set by the adapter)."""

    #: Axis letters of the latents, e.g. ``BCHW`` (DiT, PixArt, SD3), ``BSC`` (Flux's
    #: packed tokens), ``BCFHW`` (video).
    latent_layout: str
    latent_channels: int
    #: Channels of the prediction (twice the latent's with learned sigma).
    output_channels: int
    #: ``ddpm`` (epsilon prediction, integer timesteps) or ``flow_match`` (velocity).
    scheduler: str
    #: The scheduler's config (``num_train_timesteps``, ``shift``, ...).
    scheduler_config: dict[str, Any]
    #: graph timestep = scheduler timestep * timestep_scale (Flux takes t / 1000).
    timestep_scale: float = 1.0
    #: Valid graph timesteps [low, high].
    timestep_range: tuple[float, float] = (0.0, 1000.0)

    @property
    def channel_axis(self) -> int:
        return self.latent_layout.index("C")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timestep_range"] = list(self.timestep_range)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "denoising") -> DenoisingSpec:
        bounds = list_of(data, "timestep_range", path, lambda value, where: expect(value, float, where))
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise FieldError(f"field '{path}.timestep_range' is {list(bounds)}, expected [low, high]")
        low, high = bounds
        config = field_of(data, "scheduler_config", dict, path)
        if "num_train_timesteps" in config:
            expect(config["num_train_timesteps"], int, f"{path}.scheduler_config.num_train_timesteps", low=1)
        return cls(
            latent_layout=field_of(data, "latent_layout", str, path),
            latent_channels=field_of(data, "latent_channels", int, path, low=1, high=MAX_DIM),
            output_channels=field_of(data, "output_channels", int, path, low=1, high=MAX_DIM),
            scheduler=field_of(data, "scheduler", str, path),
            scheduler_config=dict(config),
            timestep_scale=field_of(data, "timestep_scale", float, path),
            timestep_range=(low, high),
        )


@dataclass(frozen=True)
class CacheSpec(TensorSpec):
    """A cached sublayer output: ``block`` index and sublayer ``kind`` (e.g. attn1, ff)."""

    block: int = 0
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "block": self.block, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "cache") -> CacheSpec:
        return cls(
            name=field_of(data, "name", str, path),
            dtype=_dtype(data, path),
            shape=_shape(data, path),
            block=field_of(data, "block", int, path, low=0, high=MAX_DIM),
            kind=field_of(data, "kind", str, path),
        )


@dataclass(frozen=True)
class GraphSpec:
    """One exported subgraph: its file (relative to the engine folder) and IO.

    In the ``gates`` graph the ``batch`` axis counts rows (one per step and sample),
    within the manifest's ``gate_rows`` range rather than its ``batch`` range.
    """

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "graph") -> GraphSpec:
        return cls(
            file=check_file_name(field_of(data, "file", str, path), f"field '{path}.file'"),
            inputs=list_of(data, "inputs", path, TensorSpec.from_dict),
            outputs=list_of(data, "outputs", path, TensorSpec.from_dict),
        )


@dataclass(frozen=True)
class ForwardSignature:
    """How a family's diffusers ``forward`` is called, as data (the adapter declares it,
    the build records it, the diffusers drop-in maps calls by it).

    ``parameters`` are the forward's parameters in diffusers' order (positional calls
    are mapped by it); ``hidden_states`` and ``timestep`` are the latents and timestep,
    every other parameter named like a manifest input feeds that input. ``nested``
    parameters are dicts whose keys are manifest inputs (PixArt's ``added_cond_kwargs``);
    ``unsupported`` ones must be None, empty or False (what the engines cannot honour:
    ControlNet residuals, skipped layers, LoRA scales). ``fixed`` parameters are plain
    values the build fixes (Qwen-Image's ``img_shapes``): name -> the value of one sample
    (nested lists of integers), which a call's per-sample list must repeat; they feed no
    graph input. ``text_masks`` maps a prompt-mask input to the embeddings it masks: a
    pipeline may pass no mask (every token real) or prompts shorter than the built text
    length, and the drop-in then pads both (masked padding changes nothing).
    """

    parameters: tuple[str, ...]
    nested: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()
    #: Prompt tokens the pipeline adds to ``max_sequence_length`` (SD3: 77 CLIP tokens).
    extra_text_tokens: int = 0
    fixed: Mapping[str, Any] = field(default_factory=dict)
    text_masks: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters": list(self.parameters),
            "nested": list(self.nested),
            "unsupported": list(self.unsupported),
            "extra_text_tokens": self.extra_text_tokens,
            "fixed": dict(self.fixed),
            "text_masks": dict(self.text_masks),
        }

    @classmethod
    def from_dict(cls, data: Any, path: str = "forward") -> ForwardSignature:
        def names(key: str) -> tuple[str, ...]:
            return list_of(data, key, path, lambda value, where: expect(value, str, where))

        parameters = names("parameters")
        fixed = field_of(data, "fixed", dict, path)
        masks = field_of(data, "text_masks", dict, path)
        for name, value in fixed.items():
            if name not in parameters:
                raise FieldError(f"field '{path}.fixed' names {describe(name)}, not a forward parameter")
            _integer_lists(value, f"{path}.fixed.{name}", depth=0)
        for mask, embeddings in masks.items():
            expect(embeddings, str, f"{path}.text_masks.{mask}")
        return cls(
            parameters=parameters,
            nested=names("nested"),
            unsupported=names("unsupported"),
            extra_text_tokens=field_of(data, "extra_text_tokens", int, path, low=0, high=MAX_DIM),
            fixed=dict(fixed),
            text_masks=dict(masks),
        )


def _integer_lists(value: Any, path: str, depth: int) -> None:
    """FieldError unless ``value`` is an integer or a list of such, at most 8 levels deep."""
    if isinstance(value, list) and depth < 8:
        for index, item in enumerate(value):
            _integer_lists(item, f"{path}[{index}]", depth + 1)
        return
    expect(value, int, path, low=-MAX_DIM, high=MAX_DIM)


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int

    def contains(self, batch_size: int) -> bool:
        return self.min <= batch_size <= self.max

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "batch") -> BatchRange:
        low, opt, high = (
            field_of(data, key, int, path, low=1, high=MAX_DIM) for key in ("min", "opt", "max")
        )
        if not low <= opt <= high:
            raise FieldError(f"field '{path}' is {low}:{opt}:{high}, expected 1 <= min <= opt <= max")
        return cls(min=low, opt=opt, max=high)
