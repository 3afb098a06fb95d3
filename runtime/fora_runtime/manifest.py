"""``manifest.json``: the contract between ``fora-export build`` and the runtime.

The runtime reads only this file and the graph files it lists. Stdlib only.

A folder is untrusted input until proven otherwise (README, "Trust and safety"): the
manifest is parsed with every field's type and range checked (any flaw is a
``ManifestError``, never another exception), every file it names must be a plain name
inside the folder (no separators, ``..``, absolute paths or symlinks leaving it), and
that is checked before any of those files is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from fora_runtime.dtypes import MANIFEST_DTYPES, PRECISION_DTYPES
from fora_runtime.errors import ForaError, InputError, ManifestError
from fora_runtime.schedule import CacheSchedule

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


#: Limits on what a manifest may hold (a crafted one must not exhaust memory or the stack).
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_NESTING = 32
#: Largest dimension, batch size or count a manifest may record (fits every index type).
MAX_DIM = 2**31 - 1
#: A file name a manifest may list: a plain name inside the folder (checked by ``check_file_name``).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FieldError(ValueError):
    """A manifest field of the wrong type or value; ``Manifest.from_dict`` turns it into a
    ``ManifestError`` naming the manifest."""


_KINDS: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def expect(value: Any, kind: type, path: str, *, low: float | None = None, high: float | None = None) -> Any:
    """``value`` if it is of JSON ``kind`` (ints are not bools, floats accept ints), within
    [low, high] for numbers; else FieldError naming ``path``."""
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise FieldError(f"field '{path}' is {_describe(value)}, expected {_KINDS[kind]}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise FieldError(f"field '{path}' is {value}, expected a value in [{low}, {high}]")
    return float(value) if kind is float else value


def field_of(data: Any, key: str, kind: type, path: str, **bounds: float) -> Any:
    """``data[key]`` checked by :func:`expect`; ``data`` must be an object holding ``key``."""
    where = f"{path}.{key}" if path else key
    expect(data, dict, path or "(top level)")
    if key not in data:
        raise FieldError(f"field '{where}' is missing")
    return expect(data[key], kind, where, **bounds)


def list_of(data: Any, key: str, path: str, item: Callable[[Any, str], Any]) -> tuple[Any, ...]:
    """``data[key]`` as a list, each element converted by ``item(element, its path)``."""
    values = field_of(data, key, list, path)
    where = f"{path}.{key}" if path else key
    return tuple(item(value, f"{where}[{index}]") for index, value in enumerate(values))


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


def check_file_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name inside the engine folder: no separators, no ``..``,
    not absolute, no leading dot; else FieldError (checked before any file is touched)."""
    if not (isinstance(name, str) and _PLAIN_NAME.fullmatch(name) and ".." not in name and len(name) <= 255):
        raise FieldError(
            f"{where} names file {_describe(name)}: an engine folder's files are plain names inside it "
            "(letters, digits, _ . + -; no path separators, '..' or absolute paths)"
        )
    return name


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
    ControlNet residuals, skipped layers, LoRA scales).
    """

    parameters: tuple[str, ...]
    nested: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()
    #: Prompt tokens the pipeline adds to ``max_sequence_length`` (SD3: 77 CLIP tokens).
    extra_text_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters": list(self.parameters),
            "nested": list(self.nested),
            "unsupported": list(self.unsupported),
            "extra_text_tokens": self.extra_text_tokens,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str = "forward") -> ForwardSignature:
        def names(key: str) -> tuple[str, ...]:
            return list_of(data, key, path, lambda value, where: expect(value, str, where))

        return cls(
            parameters=names("parameters"),
            nested=names("nested"),
            unsupported=names("unsupported"),
            extra_text_tokens=field_of(data, "extra_text_tokens", int, path, low=0, high=MAX_DIM),
        )


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int

    def contains(self, batch_size: int) -> bool:
        return self.min <= batch_size <= self.max

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "batch") -> BatchRange:
        low, opt, high = (
            field_of(data, key, int, path, low=1, high=MAX_DIM) for key in ("min", "opt", "max")
        )
        if not low <= opt <= high:
            raise FieldError(f"field '{path}' is {low}:{opt}:{high}, expected 1 <= min <= opt <= max")
        return cls(min=low, opt=opt, max=high)


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about a built engine folder."""

    model_class: str
    family: str
    model_config: dict[str, Any]
    source: str
    resolution: tuple[int, int]
    batch: BatchRange
    precision: str
    schedule: CacheSchedule
    conditioning: dict[str, Any]
    graphs: dict[str, GraphSpec]
    caches: tuple[CacheSpec, ...]
    files: dict[str, dict[str, Any]]
    tools: dict[str, str]
    export: dict[str, Any]
    config_hash: str
    #: Every step input with its role, in graph order (build constants last).
    inputs: tuple[InputSpec, ...] = ()
    denoising: DenoisingSpec | None = None
    # Backend-specific build records (e.g. TensorRT version, GPU) keyed by backend.
    backends: dict[str, Any] = field(default_factory=dict)
    #: Rows the ``gates`` graph takes per call; None when the build has no gate-table graphs.
    gate_rows: BatchRange | None = None
    #: Calibrated schedules written by ``fora-export calibrate``: step count -> file (listed in
    #: ``files`` with its sha256; the file itself is read by ``fora_runtime.calibration``).
    calibrated_schedules: dict[int, str] = field(default_factory=dict)
    #: The family's diffusers forward signature (None: the family has no diffusers drop-in).
    forward: ForwardSignature | None = None
    schema_version: int = SCHEMA_VERSION

    # -- IO helpers used by the runtime -------------------------------------------------
    @property
    def prediction(self) -> TensorSpec:
        """The noise-prediction output (first output of both graphs)."""
        return self.graphs["full"].outputs[0]

    def value_range(self, name: str) -> tuple[float, float] | None:
        """The valid [low, high] values of input ``name`` (class labels, masks), or None."""
        bounds = self.conditioning.get("input_ranges", {}).get(name)
        return (bounds[0], bounds[1]) if bounds is not None else None

    def check_values(self, name: str, values: Any, *, where: str = MANIFEST_NAME) -> None:
        """Raise InputError when host ``values`` of input ``name`` leave its valid range
        (an out-of-range class label is an unchecked embedding index on a GPU)."""
        bounds = self.value_range(name)
        if bounds is None:
            return
        import numpy as np

        array = np.asarray(values)
        if array.size and (array.min() < bounds[0] or array.max() > bounds[1]):
            raise InputError(
                f"Input '{name}' | values {array.min()}..{array.max()} outside "
                f"[{bounds[0]}, {bounds[1]}] | ({where})"
            )

    def check_timesteps(self, values: Any, *, where: str = MANIFEST_NAME) -> None:
        """Raise InputError when host timesteps leave the range these engines serve (an
        expert of a two-expert model serves part of the schedule only)."""
        if self.denoising is None:
            return
        import numpy as np

        low, high = self.denoising.timestep_range
        array = np.asarray(values, dtype="float64")
        slack = 1e-6 * max(abs(high), 1.0)  # float32 rounding of the scheduler's timesteps
        if array.size and not (
            np.isfinite(array).all() and array.min() >= low - slack and array.max() <= high + slack
        ):
            raise InputError(
                f"Input '{self.timestep_input.name}' | values {array.min():g}..{array.max():g} outside "
                f"[{low:g}, {high:g}], the timesteps these engines serve | pass timesteps in that range (the "
                f"graph's convention: scheduler timestep x {self.denoising.timestep_scale:g}); for one "
                f"expert of a two-expert model run the other steps with the other expert's engines ({where})"
            )

    @property
    def has_gate_table(self) -> bool:
        """True when the build has the ``gates`` and ``reuse_gated`` graphs."""
        return self.gate_rows is not None

    @property
    def gate_table_shape(self) -> tuple[int, ...]:
        """Shape of one row of the gate table (the ``gates`` output without its row axis)."""
        return tuple(int(d) for d in self.graphs["gates"].outputs[0].shape[1:])

    @property
    def gate_table_dtype(self) -> str:
        return self.graphs["gates"].outputs[0].dtype

    def input_spec(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def inputs_of(self, role: str) -> tuple[InputSpec, ...]:
        return tuple(spec for spec in self.inputs if spec.role == role)

    @property
    def step_inputs(self) -> tuple[InputSpec, ...]:
        """The inputs a step feeds to the graphs (build constants are inside them)."""
        return tuple(spec for spec in self.inputs if spec.role != "build_constant")

    @property
    def latents_input(self) -> InputSpec:
        return self.inputs_of("latents")[0]

    @property
    def timestep_input(self) -> InputSpec:
        return self.inputs_of("timestep")[0]

    @property
    def conditioning_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs_of("conditioning"))

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["resolution"] = list(self.resolution)
        data["batch"] = asdict(self.batch)
        data["gate_rows"] = asdict(self.gate_rows) if self.gate_rows is not None else None
        data["schedule"] = self.schedule.to_dict()
        data["graphs"] = {role: g.to_dict() for role, g in self.graphs.items()}
        data["caches"] = [c.to_dict() for c in self.caches]
        data["inputs"] = [i.to_dict() for i in self.inputs]
        data["denoising"] = self.denoising.to_dict() if self.denoising is not None else None
        data["calibrated_schedules"] = {str(steps): file for steps, file in self.calibrated_schedules.items()}
        data["forward"] = self.forward.to_dict() if self.forward is not None else None
        # Put the version first so a human reading the file sees it.
        return {"schema_version": data.pop("schema_version"), **data}

    def write(self, folder: Path) -> Path:
        """Write ``manifest.json`` atomically: readers see the old file or the new one, never
        a half-written one (``fora-export calibrate`` rewrites it in place)."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and check a manifest. Every flaw, whatever its type or depth, is a
        ManifestError naming ``where``: the data is untrusted."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} | top level is not a JSON object | rebuild the engines")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise ManifestError(
                f"{where} | schema_version {_describe(version)} is not supported (this runtime reads "
                f"{SCHEMA_VERSION}) | rebuild the engines with this fora-export (`fora-export build`), "
                "or use the fora-runtime that matches the one that built them"
            )
        try:
            manifest = cls._parse(data)
            manifest._check_consistency(where)
        except ManifestError:
            raise
        except FieldError as err:
            raise ManifestError(f"{where} | {err} | rebuild the engines with `fora-export build`") from err
        except ForaError as err:  # e.g. a ScheduleError from the recorded schedule
            raise ManifestError(f"{where} | {err} | rebuild the engines with `fora-export build`") from err
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as err:
            # A net under the field checks: a manifest is untrusted input, never a traceback.
            raise ManifestError(
                f"{where} | missing or malformed field ({type(err).__name__}: {err}) | "
                "rebuild the engines with `fora-export build`"
            ) from err
        return manifest

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> Manifest:
        graphs_data = field_of(data, "graphs", dict, "")
        optional = (*GATE_TABLE_ROLES, FORECAST_ROLE)
        roles = GRAPH_ROLES + tuple(r for r in optional if r in graphs_data)
        graphs = {
            str(role): GraphSpec.from_dict(field_of(graphs_data, role, dict, "graphs"), f"graphs.{role}")
            for role in roles
        }
        unknown = sorted(set(graphs_data) - set(roles))
        if unknown:
            raise FieldError(
                f"field 'graphs' has unknown roles {unknown}, expected {list(GRAPH_ROLES + optional)}"
            )
        resolution = list_of(
            data, "resolution", "", lambda v, where: expect(v, int, where, low=1, high=MAX_DIM)
        )
        if len(resolution) != 2:
            raise FieldError(f"field 'resolution' is {list(resolution)}, expected [height, width]")
        precision = field_of(data, "precision", str, "")
        if precision not in PRECISION_DTYPES:
            raise FieldError(f"field 'precision' is {precision!r}, expected one of {list(PRECISION_DTYPES)}")
        gate_rows = data.get("gate_rows")
        forward = data.get("forward")
        return cls(
            model_class=field_of(data, "model_class", str, ""),
            family=field_of(data, "family", str, ""),
            model_config=dict(field_of(data, "model_config", dict, "")),
            source=field_of(data, "source", str, ""),
            resolution=(resolution[0], resolution[1]),
            batch=BatchRange.from_dict(field_of(data, "batch", dict, "")),
            precision=precision,
            schedule=CacheSchedule.from_dict(field_of(data, "schedule", dict, "")),
            conditioning=dict(field_of(data, "conditioning", dict, "")),
            graphs=graphs,
            caches=list_of(data, "caches", "", CacheSpec.from_dict),
            files=_files(field_of(data, "files", dict, "")),
            tools=dict(field_of(data, "tools", dict, "")),
            export=dict(field_of(data, "export", dict, "")),
            config_hash=field_of(data, "config_hash", str, ""),
            inputs=list_of(data, "inputs", "", InputSpec.from_dict),
            denoising=DenoisingSpec.from_dict(field_of(data, "denoising", dict, "")),
            backends=dict(expect(data.get("backends", {}), dict, "backends")),
            gate_rows=BatchRange.from_dict(gate_rows, "gate_rows") if gate_rows is not None else None,
            calibrated_schedules=_calibrated_schedules(
                expect(data.get("calibrated_schedules", {}), dict, "")
            ),
            forward=ForwardSignature.from_dict(forward) if forward is not None else None,
        )

    def _check_consistency(self, where: str) -> None:
        def bad(what: str) -> ManifestError:
            return ManifestError(f"{where} | {what} | rebuild the engines with `fora-export build`")

        for spec in (*self.caches, *(t for g in self.graphs.values() for t in (*g.inputs, *g.outputs))):
            if spec.dtype not in MANIFEST_DTYPES:
                raise bad(f"tensor '{spec.name}' has unknown dtype {spec.dtype!r}")
            for dim in spec.shape:
                if dim != BATCH_AXIS and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
                    raise bad(f"tensor '{spec.name}' has invalid shape {list(spec.shape)}")
        ranges = self.conditioning.get("input_ranges", {})
        if not isinstance(ranges, dict) or not all(
            isinstance(r, list)
            and len(r) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in r)
            for r in ranges.values()
        ):
            raise bad(f"conditioning.input_ranges is {ranges!r}, expected name -> [low, high]")
        if not (1 <= self.batch.min <= self.batch.opt <= self.batch.max):
            raise ManifestError(
                f"{where} | invalid batch range {self.batch} | expected 1 <= min <= opt <= max"
            )
        self._check_inputs(bad)
        cache_names = {c.name for c in self.caches}
        full_outputs = {t.name for t in self.graphs["full"].outputs}
        reuse_inputs = {t.name for t in self.graphs["reuse"].inputs}
        if not cache_names <= full_outputs:
            raise ManifestError(f"{where} | full graph does not output every cache tensor")
        if not cache_names <= reuse_inputs:
            raise ManifestError(f"{where} | reuse graph does not take every cache tensor")
        for role, graph in self.graphs.items():
            if graph.file not in self.files:
                raise ManifestError(f"{where} | {role} graph file '{graph.file}' is not listed in 'files'")
        for steps, file in self.calibrated_schedules.items():
            if file not in self.files:
                raise ManifestError(
                    f"{where} | calibrated schedule of {steps} steps: '{file}' is not listed in 'files' "
                    "| run fora-export calibrate again"
                )
        self._check_gate_table(where)
        self._check_forecast(where)

    def _check_inputs(self, bad: Any) -> None:
        roles = [spec.role for spec in self.inputs]
        if any(role not in INPUT_ROLES for role in roles):
            raise bad(f"input roles {roles} | each must be one of {list(INPUT_ROLES)}")
        if roles.count("latents") != 1 or roles.count("timestep") != 1:
            raise bad("the inputs need exactly one 'latents' and one 'timestep' input")
        for spec in self.inputs:
            if spec.role == "build_constant" and not isinstance(spec.value, list):
                raise bad(f"build constant '{spec.name}' has no recorded value")
        step = {spec.name: spec for spec in self.step_inputs}
        cache_names = {c.name for c in self.caches}
        forecast_only = {FORECAST_WEIGHT_NAME, *(previous_cache_name(name) for name in cache_names)}
        for role, graph in self.graphs.items():
            if role == "gates":
                continue
            for tensor in graph.inputs:
                if tensor.name in cache_names or tensor.name == GATES_NAME:
                    continue
                if role == FORECAST_ROLE and tensor.name in forecast_only:
                    continue
                want = step.get(tensor.name)
                if want is None or (want.dtype, want.shape) != (tensor.dtype, tensor.shape):
                    raise bad(f"{role} graph input '{tensor.name}' is not a step input of the manifest")
        denoising = self.denoising
        if denoising is None or sorted(denoising.latent_layout) != sorted(set(denoising.latent_layout)):
            raise bad("denoising.latent_layout is missing or repeats an axis")
        if "B" not in denoising.latent_layout or "C" not in denoising.latent_layout:
            raise bad(f"denoising.latent_layout {denoising.latent_layout!r} needs a B and a C axis")
        if len(denoising.latent_layout) != len(self.latents_input.shape):
            raise bad("denoising.latent_layout does not match the rank of the latents input")

    def _check_gate_table(self, where: str) -> None:
        present = [role for role in GATE_TABLE_ROLES if role in self.graphs]
        if not present and self.gate_rows is None:
            return
        if len(present) != len(GATE_TABLE_ROLES) or self.gate_rows is None:
            raise ManifestError(
                f"{where} | gate-table graphs {present} with gate_rows {self.gate_rows} | expected both "
                f"{list(GATE_TABLE_ROLES)} and gate_rows, or none; rebuild the engines"
            )
        rows = self.gate_rows
        if not 1 <= rows.min <= rows.opt <= rows.max:
            raise ManifestError(f"{where} | invalid gate_rows {rows} | expected 1 <= min <= opt <= max")
        outputs = self.graphs["gates"].outputs
        if [t.name for t in outputs] != [GATES_NAME] or outputs[0].shape[:1] != (BATCH_AXIS,):
            raise ManifestError(f"{where} | the gates graph must output only '{GATES_NAME}' [batch, ...]")
        gated_inputs = {t.name: t for t in self.graphs["reuse_gated"].inputs}
        table = gated_inputs.get(GATES_NAME)
        if table is None or (table.dtype, table.shape) != (outputs[0].dtype, outputs[0].shape):
            raise ManifestError(
                f"{where} | reuse_gated input '{GATES_NAME}' does not match the gates graph's output"
            )
        if not {c.name for c in self.caches} <= set(gated_inputs):
            raise ManifestError(f"{where} | reuse_gated graph does not take every cache tensor")
        gated_outputs = self.graphs["reuse_gated"].outputs
        if [(t.name, t.dtype, t.shape) for t in gated_outputs] != [
            (self.prediction.name, self.prediction.dtype, self.prediction.shape)
        ]:
            raise ManifestError(f"{where} | reuse_gated graph must output only the full graph's prediction")
        step_inputs = {t.name: t for t in self.graphs["full"].inputs}
        for spec in self.graphs["gates"].inputs:
            want = step_inputs.get(spec.name)
            if spec.name == self.latents_input.name or want is None or want.dtype != spec.dtype:
                raise ManifestError(
                    f"{where} | gates input '{spec.name}' ({spec.dtype}) is not a conditioning input "
                    "of the full graph (timestep, labels, ...) of the same dtype"
                )
        known = {t.name for t in self.graphs["full"].inputs} | {GATES_NAME} | {c.name for c in self.caches}
        for role in GATE_TABLE_ROLES:
            for spec in self.graphs[role].inputs:
                if spec.name not in known:
                    raise ManifestError(f"{where} | {role} input '{spec.name}' is not a step input or cache")

    @property
    def has_forecast(self) -> bool:
        """True when the build has the forecast reuse graph (``build --forecast``)."""
        return FORECAST_ROLE in self.graphs

    def _check_forecast(self, where: str) -> None:
        if not self.has_forecast:
            return
        if not self.has_gate_table:
            raise ManifestError(
                f"{where} | a {FORECAST_ROLE} graph without the gate-table graphs | rebuild the engines"
            )
        graph = self.graphs[FORECAST_ROLE]
        gated = self.graphs["reuse_gated"]
        caches = [c.name for c in self.caches]
        weight = (FORECAST_WEIGHT_NAME, "float32", (BATCH_AXIS,))
        leading = (self.latents_input.name, GATES_NAME)
        expected = [(t.name, t.dtype, t.shape) for t in gated.inputs if t.name in leading]
        expected.append(weight)
        by_name = {c.name: c for c in self.caches}
        expected += [(name, by_name[name].dtype, by_name[name].shape) for name in caches]
        expected += [(previous_cache_name(n), by_name[n].dtype, by_name[n].shape) for n in caches]
        got = [(t.name, t.dtype, t.shape) for t in graph.inputs]
        outputs = [(t.name, t.dtype, t.shape) for t in graph.outputs]
        prediction = [(self.prediction.name, self.prediction.dtype, self.prediction.shape)]
        if got != expected or outputs != prediction:
            raise ManifestError(
                f"{where} | the {FORECAST_ROLE} graph must take latents, {GATES_NAME}, "
                f"{FORECAST_WEIGHT_NAME} [batch] float32, the caches and the previous caches, and output the "
                "prediction | rebuild the engines"
            )


def _calibrated_schedules(data: dict[str, Any]) -> dict[int, str]:
    """``calibrated_schedules``: step count (a JSON key of digits) -> a plain file name."""
    schedules = {}
    for steps, file in data.items():
        if not (isinstance(steps, str) and steps.isdigit() and 1 <= int(steps) <= MAX_DIM):
            raise FieldError(
                f"field 'calibrated_schedules' has key {_describe(steps)}, expected a step count"
            )
        schedules[int(steps)] = check_file_name(file, f"field 'calibrated_schedules.{steps}'")
    return schedules


def _files(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``files`` table: plain names, each with its size, sha256 and (optionally) stamp."""
    files: dict[str, dict[str, Any]] = {}
    for name, record in data.items():
        check_file_name(name, "field 'files'")
        where = f"files.{name}"
        field_of(record, "bytes", int, where, low=0, high=2**63 - 1)
        for key in ("sha256", *(("stamp",) if "stamp" in record else ())):
            if not _SHA256.fullmatch(field_of(record, key, str, where)):
                raise FieldError(f"field '{where}.{key}' is {_describe(record[key])}, expected 64 hex digits")
        files[name] = dict(record)
    return files


def _nesting(data: Any) -> int:
    """The depth of nested lists and objects in ``data`` (iterative: any depth is safe)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_NESTING:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


# -- files ------------------------------------------------------------------------------
#: How ``load_manifest`` checks the files a manifest lists: ``stamp`` (default) their size and
#: a stamp of their first and last MiB and 64 samples between (catches truncation, a file of
#: another build, a copy cut short; reads ~2.3 MiB per file), ``full`` every byte's sha256
#: (catches any change; reads everything), ``none`` only that each exists inside the folder.
VerifyMode = Literal["stamp", "full", "none"]
VERIFY_MODES: tuple[str, ...] = ("stamp", "full", "none")
#: The keyword arguments of ``load_manifest`` a session passes through (how a folder is opened).
FOLDER_OPTIONS = ("verify", "manifest_key", "manifest_key_file")
STAMP_EDGE = 1 << 20
STAMP_SAMPLES = 64
STAMP_SAMPLE = 1 << 12


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stamp_of(path: Path) -> str:
    """sha256 over the size, the first and last MiB and 64 evenly spaced 4 KiB samples of
    ``path`` (the whole file when it is small): cheap, and it changes when a file is cut
    short, extended or replaced by another file. Not proof against a deliberate edit
    between the samples: that is what ``verify="full"`` and signed manifests are for."""
    size = os.stat(path).st_size
    digest = hashlib.sha256(b"fora-stamp-1:%d:" % size)
    with open(path, "rb") as fh:
        if size <= 2 * STAMP_EDGE + STAMP_SAMPLES * STAMP_SAMPLE:
            while block := fh.read(STAMP_EDGE):
                digest.update(block)
            return digest.hexdigest()
        digest.update(fh.read(STAMP_EDGE))
        span = size - 2 * STAMP_EDGE
        for index in range(STAMP_SAMPLES):
            fh.seek(STAMP_EDGE + index * span // STAMP_SAMPLES)
            digest.update(fh.read(STAMP_SAMPLE))
        fh.seek(size - STAMP_EDGE)
        digest.update(fh.read(STAMP_EDGE))
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The manifest's record of one file: its size, sha256 and stamp."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path), "stamp": stamp_of(path)}


def contained_file(folder: Path, name: str) -> Path:
    """``folder/name`` when it is a regular file inside ``folder`` (a symlink to a file in the
    folder counts; one leaving it does not). Checked without reading or stat-ing anything
    outside the folder, so a crafted manifest learns nothing about other files."""
    check_file_name(name, f"{folder}")  # names were checked at parse time; callers may pass others
    base = Path(os.path.realpath(folder))
    path = base / name
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(base):
            raise ManifestError(
                f"{folder / name} | is a symlink leaving the engine folder | engine folders hold their "
                "files; copy the file in (cp -L) or rebuild"
            )
        path = target
    if not path.is_file():
        what = "not a regular file" if path.exists() else "missing"
        raise ManifestError(f"{folder / name} | {what}, but listed in {MANIFEST_NAME} | rebuild the engines")
    return path


def read_manifest_bytes(folder: Path) -> tuple[Path, bytes]:
    """``folder/manifest.json`` and its bytes: a regular file inside the folder, size-capped."""
    if not folder.exists():
        raise ManifestError(f"Engine folder '{folder}' | does not exist | run `fora-export build` first")
    if not folder.is_dir():
        raise ManifestError(
            f"Engine folder '{folder}' | is not a folder | pass the folder `build --out` wrote"
        )
    path = folder / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise ManifestError(
            f"{path} | missing | not an engine folder, or its build did not finish; rebuild it"
        )
    try:
        real = contained_file(folder, MANIFEST_NAME)
        size = real.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path} | {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES} bytes) "
                "| rebuild the engines"
            )
        return path, real.read_bytes()
    except OSError as err:
        raise ManifestError(
            f"{path} | cannot be read ({err.strerror or err}) | check its permissions"
        ) from err


def parse_manifest_bytes(raw: bytes, *, where: str) -> Manifest:
    """Parse the bytes of a ``manifest.json`` (UTF-8 JSON of bounded nesting)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ManifestError(f"{where} | is not valid JSON (not UTF-8: {err}) | rebuild the engines") from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where} | is not valid JSON ({err}) | rebuild the engines") from err
    except RecursionError as err:
        raise ManifestError(
            f"{where} | is not valid JSON for this runtime (nested deeper than {MAX_NESTING} levels) "
            "| rebuild the engines"
        ) from err
    if _nesting(data) > MAX_NESTING:
        raise ManifestError(
            f"{where} | nested deeper than {MAX_NESTING} levels, which no manifest is | rebuild the engines"
        )
    return Manifest.from_dict(data, where=where)


@dataclass(frozen=True)
class EngineFolder:
    """An opened engine folder: its parsed manifest and whether a deployer's key signed it."""

    path: Path
    manifest: Manifest
    #: True when the manifest's signature was verified with the deployer's key.
    signed: bool


def open_engine_folder(
    folder: str | Path,
    *,
    verify: VerifyMode = "stamp",
    manifest_key: str | bytes | None = None,
    manifest_key_file: str | Path | None = None,
) -> EngineFolder:
    """Read, check and (with a key) authenticate ``folder/manifest.json``, then its files.

    Order: the manifest's bytes are read (size-capped), their signature is verified when a
    key is given (``manifest_key``, ``manifest_key_file`` or ``FORA_MANIFEST_KEY``; then an
    unsigned folder is refused, and the files are checked in full since a stamp is no
    proof), then parsed and checked, every listed name contained; only then are the listed
    files opened, per ``verify``.
    """
    from fora_runtime import trust

    if verify not in VERIFY_MODES:
        raise ManifestError(f"verify | got {verify!r} | expected one of {', '.join(VERIFY_MODES)}")
    folder = Path(folder)
    key = trust.resolve_manifest_key(manifest_key, manifest_key_file)
    path, raw = read_manifest_bytes(folder)
    if key is not None:
        trust.verify_manifest_signature(folder, raw, key)
        verify = "full"
    manifest = parse_manifest_bytes(raw, where=str(path))
    verify_manifest_files(manifest, folder, verify)
    return EngineFolder(path=folder, manifest=manifest, signed=key is not None)


def load_manifest(
    folder: str | Path,
    *,
    verify: VerifyMode = "stamp",
    manifest_key: str | bytes | None = None,
    manifest_key_file: str | Path | None = None,
) -> Manifest:
    """Read and validate ``folder/manifest.json`` (see :func:`open_engine_folder`).

    Every file listed in the manifest must exist inside the folder with the recorded
    size and stamp (``verify="full"``: sha256); a mismatch means the folder was tampered
    with or copied incompletely.
    """
    return open_engine_folder(
        folder, verify=verify, manifest_key=manifest_key, manifest_key_file=manifest_key_file
    ).manifest


def verify_manifest_files(manifest: Manifest, folder: Path, verify: VerifyMode = "stamp") -> None:
    """Check every listed file: contained in ``folder`` (always, ``none`` included), its size,
    then its stamp (``stamp``; files recorded without one get their sha256 checked) or its
    sha256 (``full``)."""
    calibrated = {file: steps for steps, file in manifest.calibrated_schedules.items()}
    for name in manifest.files:
        fix = "rebuild the engines"
        if name in calibrated:
            fix = f"calibrate again: fora-export calibrate {folder} --steps {calibrated[name]} --full-steps K"
        verify_listed_file(manifest, folder, name, verify, fix=fix)


def verify_listed_file(
    manifest: Manifest,
    folder: Path,
    name: str,
    verify: VerifyMode = "full",
    *,
    fix: str = "rebuild the engines",
) -> Path:
    """Check one listed file as :func:`verify_manifest_files` does; returns its real path."""
    record = manifest.files[name]
    file = Path(folder) / name
    try:
        real = contained_file(Path(folder), name)
    except ManifestError as err:
        raise ManifestError(str(err).replace("| rebuild the engines", f"| {fix}")) from err
    if verify == "none":
        return real
    size = real.stat().st_size
    if size != record.get("bytes"):
        raise ManifestError(
            f"{file} | size {size} bytes, expected {record.get('bytes')} | file is truncated or was "
            f"replaced; {fix}"
        )
    if verify == "stamp" and "stamp" in record:
        if stamp_of(real) != record["stamp"]:
            raise ManifestError(
                f"{file} | its stamp (size, first/last MiB, samples) does not match {MANIFEST_NAME} "
                f"| file was replaced or modified; {fix}"
            )
    elif sha256_of(real) != record.get("sha256"):
        raise ManifestError(f"{file} | sha256 does not match {MANIFEST_NAME} | file was modified; {fix}")
    return real
