"""The manifest's typed sections: ``conditioning`` (what the family's conditioning inputs
are) and ``export`` (how the graphs were exported). Stdlib only.

Both parse strictly (every key known, every value's type and range checked: any flaw a
``FieldError``) and write back the JSON they were read from (``to_dict``), with optional
facts a family does not have left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fora_runtime.dtypes import PRECISION_DTYPES
from fora_runtime.manifest.fields import (
    MAX_DIM,
    FieldError,
    expect,
    field_of,
    list_of,
    no_unknown_keys,
    optional_of,
)

#: What a family is conditioned on.
CONDITIONING_KINDS = ("class_labels", "captions", "text", "text+image")
#: The reuse graph a build exported: the plain one (the whole model, attention and
#: feed-forward skipped) or the family's lean one (only what reuse needs).
REUSE_GRAPHS = ("plain", "lean")


def _value_range(value: Any, where: str) -> tuple[float, float]:
    """``[low, high]`` with low <= high; integral bounds (class indices, mask flags) stay
    integers, as JSON wrote them."""
    bounds = expect(value, list, where)
    for index, bound in enumerate(bounds):
        expect(bound, float, f"{where}[{index}]")
    if len(bounds) != 2 or bounds[0] > bounds[1]:
        raise FieldError(f"field '{where}' is {bounds}, expected [low, high] with low <= high")
    return bounds[0], bounds[1]


@dataclass(frozen=True)
class Conditioning:
    """The ``conditioning`` section: what the family's conditioning inputs are (the adapter's
    ``family_conditioning()``), read by the runtime's input checks, serving, validate,
    bench and the diffusers drop-in."""

    #: One of :data:`CONDITIONING_KINDS`.
    kind: str
    #: Valid [low, high] values of inputs whose values index tables (class labels) or are
    #: flags (masks), by input name.
    input_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Text tokens per prompt (text-conditioned families).
    text_length: int | None = None
    #: Class-label families: the classes, and the label of the null class for guidance
    #: (None when none was trained).
    num_classes: int | None = None
    null_class: int | None = None
    #: PixArt: the caption embedding's channels and whether the model takes size conditions.
    caption_channels: int | None = None
    size_conditions: bool | None = None
    #: Flux: whether the model takes a guidance input (guidance-distilled checkpoints).
    guidance: bool | None = None
    #: Video families: latent frames.
    frames: int | None = None

    _OPTIONAL_INTS = ("text_length", "num_classes", "null_class", "caption_channels", "frames")
    _OPTIONAL_BOOLS = ("size_conditions", "guidance")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind}
        for key in (*self._OPTIONAL_INTS, *self._OPTIONAL_BOOLS):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        data["input_ranges"] = {name: [low, high] for name, (low, high) in self.input_ranges.items()}
        return data

    @classmethod
    def from_dict(cls, data: Any, path: str = "conditioning") -> Conditioning:
        expect(data, dict, path)
        no_unknown_keys(data, ("kind", "input_ranges", *cls._OPTIONAL_INTS, *cls._OPTIONAL_BOOLS), path)
        kind = field_of(data, "kind", str, path)
        if kind not in CONDITIONING_KINDS:
            raise FieldError(f"field '{path}.kind' is {kind!r}, expected one of {list(CONDITIONING_KINDS)}")
        ranges = field_of(data, "input_ranges", dict, path)
        lows = {"null_class": 0}
        conditioning = cls(
            kind=kind,
            input_ranges={
                str(name): _value_range(value, f"{path}.input_ranges.{name}")
                for name, value in ranges.items()
            },
            **{
                key: optional_of(data, key, int, path, low=lows.get(key, 1), high=MAX_DIM)
                for key in cls._OPTIONAL_INTS
            },
            **{key: optional_of(data, key, bool, path) for key in cls._OPTIONAL_BOOLS},
        )
        if kind == "class_labels" and conditioning.num_classes is None:
            raise FieldError(
                f"field '{path}.num_classes' is missing (a class-label model records its classes)"
            )
        return conditioning


@dataclass(frozen=True)
class RecordedAdapterOptions:
    """``export.adapter_options``: the build options that changed what was exported (the
    exporter's ``AdapterOptions``, recorded so validate rebuilds the same adapter)."""

    cache: tuple[str, ...] | None = None
    text_length: int | None = None
    frames: int | None = None
    expert_range: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": list(self.cache) if self.cache is not None else None,
            "text_length": self.text_length,
            "frames": self.frames,
            "expert_range": list(self.expert_range) if self.expert_range is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str = "export.adapter_options") -> RecordedAdapterOptions:
        expect(data, dict, path)
        no_unknown_keys(data, ("cache", "text_length", "frames", "expert_range"), path)
        cache = data.get("cache")
        expert_range = data.get("expert_range")
        return cls(
            cache=list_of(data, "cache", path, _name) if cache is not None else None,
            text_length=optional_of(data, "text_length", int, path, low=1, high=MAX_DIM),
            frames=optional_of(data, "frames", int, path, low=1, high=MAX_DIM),
            expert_range=_value_range(expert_range, f"{path}.expert_range")
            if expert_range is not None
            else None,
        )


def _name(value: Any, where: str) -> str:
    text = expect(value, str, where)
    if not text:
        raise FieldError(f"field '{where}' is empty, expected a name")
    return str(text)


@dataclass(frozen=True)
class ExportRecord:
    """The ``export`` section: how the graphs were exported (the build's export options,
    the adapter options, what is cached and which reuse graph was exported)."""

    #: ONNX tensor precision (one of ``PRECISION_DTYPES``).
    precision: str
    opset: int
    #: The ONNX exporter (``torchscript`` or ``dynamo``).
    exporter: str
    #: None: external data only for large graphs; True/False forced.
    external_data: bool | None
    #: LayerNorm/Softmax kept in fp32 in fp16/bf16 graphs.
    fp32_islands: bool
    adapter_options: RecordedAdapterOptions
    #: The sublayer kinds cached (e.g. attn1, ff).
    cached_kinds: tuple[str, ...]
    #: One of :data:`REUSE_GRAPHS`.
    reuse_graph: str
    #: The model's subfolder in its repository or folder (None: the top level).
    subfolder: str | None
    #: The batch size the graphs were traced at.
    trace_batch: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "opset": self.opset,
            "exporter": self.exporter,
            "external_data": self.external_data,
            "fp32_islands": self.fp32_islands,
            "adapter_options": self.adapter_options.to_dict(),
            "cached_kinds": list(self.cached_kinds),
            "reuse_graph": self.reuse_graph,
            "subfolder": self.subfolder,
            "trace_batch": self.trace_batch,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str = "export") -> ExportRecord:
        expect(data, dict, path)
        keys = (
            "precision",
            "opset",
            "exporter",
            "external_data",
            "fp32_islands",
            "adapter_options",
            "cached_kinds",
            "reuse_graph",
            "subfolder",
            "trace_batch",
        )
        no_unknown_keys(data, keys, path)
        precision = field_of(data, "precision", str, path)
        if precision not in PRECISION_DTYPES:
            raise FieldError(
                f"field '{path}.precision' is {precision!r}, expected one of {list(PRECISION_DTYPES)}"
            )
        reuse_graph = field_of(data, "reuse_graph", str, path)
        if reuse_graph not in REUSE_GRAPHS:
            raise FieldError(
                f"field '{path}.reuse_graph' is {reuse_graph!r}, expected one of {list(REUSE_GRAPHS)}"
            )
        cached_kinds = list_of(data, "cached_kinds", path, _name)
        if not cached_kinds:
            raise FieldError(f"field '{path}.cached_kinds' is empty, expected the sublayer kinds cached")
        return cls(
            precision=precision,
            opset=field_of(data, "opset", int, path, low=1, high=MAX_DIM),
            exporter=_name(field_of(data, "exporter", str, path), f"{path}.exporter"),
            external_data=optional_of(data, "external_data", bool, path),
            fp32_islands=field_of(data, "fp32_islands", bool, path),
            adapter_options=RecordedAdapterOptions.from_dict(field_of(data, "adapter_options", dict, path)),
            cached_kinds=cached_kinds,
            reuse_graph=reuse_graph,
            subfolder=optional_of(data, "subfolder", str, path),
            trace_batch=field_of(data, "trace_batch", int, path, low=1, high=MAX_DIM),
        )
