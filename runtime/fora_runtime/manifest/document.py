"""The ``Manifest``: everything the runtime knows about an engine folder, parsed strictly
from ``manifest.json`` (any flaw a ``ManifestError``: the folder is untrusted) and checked
against the graph contract (:mod:`fora_runtime.manifest.contract`) on read and on write.
Stdlib only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fora_runtime.dtypes import PRECISION_DTYPES
from fora_runtime.errors import ForaError, InputError, ManifestError
from fora_runtime.manifest.contract import REBUILD, expected_io, graph_set_problem
from fora_runtime.manifest.fields import (
    MAX_DIM,
    SHA256_PATTERN,
    FieldError,
    check_file_name,
    describe,
    expect,
    field_of,
    list_of,
)
from fora_runtime.manifest.schema import (
    FORECAST_ROLE,
    GATE_TABLE_ROLES,
    GRAPH_ROLES,
    INPUT_ROLES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BatchRange,
    CacheSpec,
    DenoisingSpec,
    ForwardSignature,
    GraphRole,
    GraphSpec,
    InputSpec,
    TensorSpec,
)
from fora_runtime.manifest.sections import Conditioning, ExportRecord
from fora_runtime.schedule import CacheSchedule


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
    conditioning: Conditioning
    graphs: dict[str, GraphSpec]
    caches: tuple[CacheSpec, ...]
    files: dict[str, dict[str, Any]]
    tools: dict[str, str]
    export: ExportRecord
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

    def __post_init__(self) -> None:
        # The builder may pass the adapter's ``family_conditioning()`` dict and the export
        # record as dicts: they become their typed sections here (a flaw is a ManifestError).
        for name, section in (("conditioning", Conditioning), ("export", ExportRecord)):
            value = getattr(self, name)
            if isinstance(value, dict):
                try:
                    object.__setattr__(self, name, section.from_dict(value, name))
                except FieldError as err:
                    raise ManifestError(f"{MANIFEST_NAME} | {err} | {REBUILD}") from err

    # -- IO helpers used by the runtime -------------------------------------------------
    @property
    def prediction(self) -> TensorSpec:
        """The noise-prediction output (first output of both graphs)."""
        return self.graphs[GraphRole.FULL].outputs[0]

    def value_range(self, name: str) -> tuple[float, float] | None:
        """The valid [low, high] values of input ``name`` (class labels, masks), or None."""
        return self.conditioning.input_ranges.get(name)

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

    def module_io(self, role: str) -> GraphSpec:
        """``role``'s graph as its module takes it: every input in order, none left out
        (torch programs keep every argument; an ONNX file may drop the ones it does not read)."""
        graph = self.graphs[role]
        if role == GraphRole.GATES:
            return graph
        gates = self.graphs[GraphRole.GATES].outputs[0] if self.has_gate_table else None
        inputs, outputs = expected_io(role, self.step_inputs, self.caches, self.prediction, gates)
        return GraphSpec(file=graph.file, inputs=tuple(inputs), outputs=tuple(outputs))

    @property
    def has_gate_table(self) -> bool:
        """True when the build has the ``gates`` and ``reuse_gated`` graphs."""
        return self.gate_rows is not None

    @property
    def gate_table_shape(self) -> tuple[int, ...]:
        """Shape of one row of the gate table (the ``gates`` output without its row axis)."""
        return tuple(int(d) for d in self.graphs[GraphRole.GATES].outputs[0].shape[1:])

    @property
    def gate_table_dtype(self) -> str:
        return self.graphs[GraphRole.GATES].outputs[0].dtype

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
        data = {
            "schema_version": self.schema_version,  # first, so a human reading the file sees it
            "model_class": self.model_class,
            "family": self.family,
            "model_config": self.model_config,
            "source": self.source,
            "resolution": list(self.resolution),
            "batch": self.batch.to_dict(),
            "precision": self.precision,
            "schedule": self.schedule.to_dict(),
            "conditioning": self.conditioning.to_dict(),
            "graphs": {str(role): graph.to_dict() for role, graph in self.graphs.items()},
            "caches": [cache.to_dict() for cache in self.caches],
            "files": self.files,
            "tools": self.tools,
            "export": self.export.to_dict(),
            "config_hash": self.config_hash,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "denoising": self.denoising.to_dict() if self.denoising is not None else None,
            "backends": self.backends,
            "gate_rows": self.gate_rows.to_dict() if self.gate_rows is not None else None,
            "calibrated_schedules": {str(steps): file for steps, file in self.calibrated_schedules.items()},
            "forward": self.forward.to_dict() if self.forward is not None else None,
        }
        # A JSON round trip: the dict holds only what ``json`` writes (no tuples, no enums).
        return json.loads(json.dumps(data))

    def write(self, folder: Path) -> Path:
        """Write ``manifest.json`` atomically: readers see the old file or the new one, never
        a half-written one (``fora-export calibrate`` rewrites it in place). The manifest is
        checked as a reader checks it first, so no build writes a folder the runtime refuses."""
        path = Path(folder) / MANIFEST_NAME
        self.check(where=str(path))
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
                f"{where} | schema_version {describe(version)} is not supported (this runtime reads "
                f"{SCHEMA_VERSION}) | rebuild the engines with this fora-export (`fora-export build`), "
                "or use the fora-runtime that matches the one that built them"
            )
        try:
            manifest = cls._parse(data)
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
        manifest.check(where=where)
        return manifest

    def check(self, *, where: str = MANIFEST_NAME) -> None:
        """Raise ManifestError unless the manifest is consistent: its inputs, its graphs
        against the graph contract, its files and its sections (``from_dict`` and ``write``
        call it)."""
        try:
            self._check_consistency(where)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ManifestError(
                f"{where} | malformed manifest ({type(err).__name__}: {err}) | {REBUILD}"
            ) from err

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
            conditioning=Conditioning.from_dict(field_of(data, "conditioning", dict, "")),
            graphs=graphs,
            caches=list_of(data, "caches", "", CacheSpec.from_dict),
            files=_files(field_of(data, "files", dict, "")),
            tools=dict(field_of(data, "tools", dict, "")),
            export=ExportRecord.from_dict(field_of(data, "export", dict, "")),
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
            return ManifestError(f"{where} | {what} | {REBUILD}")

        if not (1 <= self.batch.min <= self.batch.opt <= self.batch.max):
            raise ManifestError(
                f"{where} | invalid batch range {self.batch} | expected 1 <= min <= opt <= max"
            )
        self._check_inputs(bad)
        self._check_sections(bad)
        for spec in self.caches:
            if not isinstance(spec, CacheSpec):
                raise bad(f"cache '{getattr(spec, 'name', spec)}' is not a cache spec")
        problem = graph_set_problem(self.graphs, self.step_inputs, self.caches)
        if problem is not None:
            raise bad(problem)
        for role, graph in self.graphs.items():
            if graph.file not in self.files:
                raise bad(f"{role} graph file '{graph.file}' is not listed in 'files'")
        for steps, file in self.calibrated_schedules.items():
            if file not in self.files:
                raise ManifestError(
                    f"{where} | calibrated schedule of {steps} steps: '{file}' is not listed in 'files' "
                    "| run fora-export calibrate again"
                )
        self._check_gate_rows(where)

    def _check_inputs(self, bad: Any) -> None:
        roles = [spec.role for spec in self.inputs]
        if any(role not in INPUT_ROLES for role in roles):
            raise bad(f"input roles {roles} | each must be one of {list(INPUT_ROLES)}")
        if roles.count("latents") != 1 or roles.count("timestep") != 1:
            raise bad("the inputs need exactly one 'latents' and one 'timestep' input")
        if self.step_inputs[0].role != "latents":
            raise bad(f"the first step input is '{self.step_inputs[0].name}', expected the latents")
        names = [spec.name for spec in self.inputs]
        if len(set(names)) != len(names):
            raise bad(f"the inputs name one tensor twice: {names}")
        for spec in self.inputs:
            if spec.role == "build_constant" and not isinstance(spec.value, list):
                raise bad(f"build constant '{spec.name}' has no recorded value")
        denoising = self.denoising
        if denoising is None or sorted(denoising.latent_layout) != sorted(set(denoising.latent_layout)):
            raise bad("denoising.latent_layout is missing or repeats an axis")
        if "B" not in denoising.latent_layout or "C" not in denoising.latent_layout:
            raise bad(f"denoising.latent_layout {denoising.latent_layout!r} needs a B and a C axis")
        if len(denoising.latent_layout) != len(self.latents_input.shape):
            raise bad("denoising.latent_layout does not match the rank of the latents input")

    def _check_sections(self, bad: Any) -> None:
        if not isinstance(self.conditioning, Conditioning) or not isinstance(self.export, ExportRecord):
            raise bad("the conditioning and export sections are not typed sections")
        step = {spec.name for spec in self.step_inputs}
        for name in self.conditioning.input_ranges:
            if name not in step:
                raise bad(
                    f"conditioning.input_ranges names '{name}', which is not a step input {sorted(step)}"
                )
        kinds = sorted({cache.kind for cache in self.caches} - set(self.export.cached_kinds))
        if kinds:
            raise bad(
                f"caches of kinds {kinds} are not in export.cached_kinds {list(self.export.cached_kinds)}"
            )
        if self.export.precision != self.precision:
            raise bad(f"export.precision {self.export.precision!r} differs from precision {self.precision!r}")

    def _check_gate_rows(self, where: str) -> None:
        present = [str(role) for role in GATE_TABLE_ROLES if role in self.graphs]
        if not present and self.gate_rows is None:
            return
        if not present or self.gate_rows is None:
            raise ManifestError(
                f"{where} | gate-table graphs {present} with gate_rows {self.gate_rows} | expected both "
                f"{[str(r) for r in GATE_TABLE_ROLES]} and gate_rows, or none; rebuild the engines"
            )
        rows = self.gate_rows
        if not 1 <= rows.min <= rows.opt <= rows.max:
            raise ManifestError(f"{where} | invalid gate_rows {rows} | expected 1 <= min <= opt <= max")

    @property
    def has_forecast(self) -> bool:
        """True when the build has the forecast reuse graph (``build --forecast``)."""
        return FORECAST_ROLE in self.graphs


def _calibrated_schedules(data: dict[str, Any]) -> dict[int, str]:
    """``calibrated_schedules``: step count (a JSON key of digits) -> a plain file name."""
    schedules = {}
    for steps, file in data.items():
        if not (isinstance(steps, str) and steps.isdigit() and 1 <= int(steps) <= MAX_DIM):
            raise FieldError(f"field 'calibrated_schedules' has key {describe(steps)}, expected a step count")
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
            if not SHA256_PATTERN.fullmatch(field_of(record, key, str, where)):
                raise FieldError(f"field '{where}.{key}' is {describe(record[key])}, expected 64 hex digits")
        files[name] = dict(record)
    return files
