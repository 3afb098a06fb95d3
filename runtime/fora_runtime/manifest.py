"""``manifest.json``: the contract between ``fora-export build`` and the runtime.

The runtime reads only this file and the graph files it lists. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fora_runtime.dtypes import MANIFEST_DTYPES
from fora_runtime.errors import InputError, ManifestError
from fora_runtime.schedule import CacheSchedule

#: 2: step inputs with roles (``inputs``) and the family's denoising contract (``denoising``).
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
BATCH_AXIS = "batch"
GRAPH_ROLES = ("full", "reuse")
#: Optional, always together: ``gates`` computes the gate table of many (step, sample)
#: rows at once, ``reuse_gated`` is the reuse step reading its row instead of computing it.
GATE_TABLE_ROLES = ("gates", "reuse_gated")
GATES_NAME = "gates"
#: Optional (``build --forecast``, with the gate-table graphs): the reuse step that forecasts
#: each cache from the last two full steps, ``A + w (A - A_previous)``. It reads the gate
#: table's row, the step's weight ``w`` per sample, the caches and the previous caches.
FORECAST_ROLE = "reuse_forecast"
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
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


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
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(
            name=data["name"],
            dtype=data["dtype"],
            shape=tuple(data["shape"]),
            role=data["role"],
            value=data.get("value"),
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
    def from_dict(cls, data: dict[str, Any]) -> DenoisingSpec:
        low, high = data["timestep_range"]
        return cls(
            latent_layout=str(data["latent_layout"]),
            latent_channels=int(data["latent_channels"]),
            output_channels=int(data["output_channels"]),
            scheduler=str(data["scheduler"]),
            scheduler_config=dict(data["scheduler_config"]),
            timestep_scale=float(data["timestep_scale"]),
            timestep_range=(float(low), float(high)),
        )


@dataclass(frozen=True)
class CacheSpec(TensorSpec):
    """A cached sublayer output: ``block`` index and sublayer ``kind`` (e.g. attn1, ff)."""

    block: int = 0
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "block": self.block, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        return cls(
            name=data["name"],
            dtype=data["dtype"],
            shape=tuple(data["shape"]),
            block=int(data["block"]),
            kind=data["kind"],
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
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(
            file=data["file"],
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
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
        if not isinstance(data, dict):
            raise ManifestError(f"{where} | top level is not a JSON object | rebuild the engines")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{where} | schema_version {version!r} is not supported (this runtime reads "
                f"{SCHEMA_VERSION}) | rebuild the engines with this fora-export (`fora-export build`), "
                "or use the fora-runtime that matches the one that built them"
            )
        try:
            optional = (*GATE_TABLE_ROLES, FORECAST_ROLE)
            roles = GRAPH_ROLES + tuple(r for r in optional if r in data["graphs"])
            graphs = {role: GraphSpec.from_dict(data["graphs"][role]) for role in roles}
            gate_rows = data.get("gate_rows")
            manifest = cls(
                model_class=data["model_class"],
                family=data["family"],
                model_config=dict(data["model_config"]),
                source=data["source"],
                resolution=(int(data["resolution"][0]), int(data["resolution"][1])),
                batch=BatchRange(**data["batch"]),
                precision=data["precision"],
                schedule=CacheSchedule.from_dict(data["schedule"]),
                conditioning=dict(data["conditioning"]),
                graphs=graphs,
                caches=tuple(CacheSpec.from_dict(c) for c in data["caches"]),
                files=dict(data["files"]),
                tools=dict(data["tools"]),
                export=dict(data["export"]),
                config_hash=data["config_hash"],
                inputs=tuple(InputSpec.from_dict(i) for i in data["inputs"]),
                denoising=DenoisingSpec.from_dict(data["denoising"]),
                backends=dict(data.get("backends", {})),
                gate_rows=BatchRange(**gate_rows) if gate_rows is not None else None,
                calibrated_schedules={
                    int(steps): str(file) for steps, file in data.get("calibrated_schedules", {}).items()
                },
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ManifestError(
                f"{where} | missing or malformed field ({type(err).__name__}: {err}) | "
                "rebuild the engines with `fora-export build`"
            ) from err
        manifest._check_consistency(where)
        return manifest

    def _check_consistency(self, where: str) -> None:
        def bad(what: str) -> ManifestError:
            return ManifestError(f"{where} | {what} | rebuild the engines with `fora-export build`")

        for spec in (*self.caches, *(t for g in self.graphs.values() for t in (*g.inputs, *g.outputs))):
            if spec.dtype not in MANIFEST_DTYPES:
                raise bad(f"tensor '{spec.name}' has unknown dtype {spec.dtype!r}")
            for dim in spec.shape:
                if dim != BATCH_AXIS and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
                    raise bad(f"tensor '{spec.name}' has invalid shape {list(spec.shape)}")
        for name, record in self.files.items():
            if not (
                isinstance(record, dict)
                and isinstance(record.get("bytes"), int)
                and isinstance(record.get("sha256"), str)
            ):
                raise bad(f"files entry '{name}' is {record!r}, expected {{'bytes': int, 'sha256': str}}")
        ranges = self.conditioning.get("input_ranges", {})
        if not isinstance(ranges, dict) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int | float) for v in r)
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
            if steps < 1 or file not in self.files:
                raise ManifestError(
                    f"{where} | calibrated schedule {steps}: '{file}' is not a listed file for a step count "
                    ">= 1 | run fora-export calibrate again"
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


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(folder: str | Path, *, verify_files: bool = True) -> Manifest:
    """Read and validate ``folder/manifest.json``.

    With ``verify_files`` every file listed in the manifest must exist with the
    recorded size and sha256; a mismatch means the folder was tampered with or
    copied incompletely.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ManifestError(f"Engine folder '{folder}' | does not exist | run `fora-export build` first")
    if not folder.is_dir():
        raise ManifestError(
            f"Engine folder '{folder}' | is not a folder | pass the folder `build --out` wrote"
        )
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(
            f"{path} | missing | not an engine folder, or its build did not finish; rebuild it"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} | is not valid JSON ({err}) | rebuild the engines") from err
    manifest = Manifest.from_dict(data, where=str(path))
    if verify_files:
        verify_manifest_files(manifest, folder)
    return manifest


def verify_manifest_files(manifest: Manifest, folder: Path) -> None:
    calibrated = {file: steps for steps, file in manifest.calibrated_schedules.items()}
    for name in manifest.files:
        fix = "rebuild the engines"
        if name in calibrated:
            fix = f"calibrate again: fora-export calibrate {folder} --steps {calibrated[name]} --full-steps K"
        verify_listed_file(manifest, folder, name, fix=fix)


def verify_listed_file(manifest: Manifest, folder: Path, name: str, *, fix: str) -> None:
    """Raise ManifestError unless ``folder/name`` has the size and sha256 the manifest lists."""
    record = manifest.files[name]
    file = Path(folder) / name
    if not file.is_file():
        raise ManifestError(f"{file} | missing, but listed in {MANIFEST_NAME} | {fix}")
    size = file.stat().st_size
    if size != record.get("bytes"):
        raise ManifestError(
            f"{file} | size {size} bytes, expected {record.get('bytes')} | file is truncated or was "
            f"replaced; {fix}"
        )
    if sha256_of(file) != record.get("sha256"):
        raise ManifestError(f"{file} | sha256 does not match {MANIFEST_NAME} | file was modified; {fix}")
