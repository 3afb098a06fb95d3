"""TensorRT engines for the step graphs (``full``, ``reuse``, and the gate-table graphs).

Two flavours build through this one module: datacenter TensorRT 10.1+ / 11.x
(older versions are refused: the runtime needs ``device_memory_size_v2`` and
``set_device_memory(ptr, size)``, both new in 10.1) on and for the visible GPU,
and TensorRT-RTX 1.7+, which needs no GPU and compiles plans for a list of RTX
compute capabilities. What differs between them is in ``trt_flavors.py`` (a
``BuildFlavor`` argument, datacenter TensorRT by default); the build settings are
``trt_config.TrtBuildConfig``; parsing graphs (a constant-folded copy, the network's IO
checked against the manifest) and TensorRT's logger are ``trt_parser.py``. Engines only load
under the library version that built them. Networks are always strongly typed:
the precision of every tensor comes from the ONNX graph (the exporter writes
fp16 / bf16 graphs itself), so no precision builder flag is ever set (TensorRT 11
removed ``BuilderFlag.FP16`` / ``BF16``). TensorRT modules and ``torch`` are
imported inside the functions that need them, so importing this module is free.

How the build pipeline calls it, after the ONNX graphs are exported into the
temporary build folder and before the manifest is written::

    from fora_export.builder import tensorrt as trt_build

    flavor, note = trt_build.resolve_tensorrt(config.backend)  # None: no engines (auto, none here)
    trt_build.seed_timing_cache(out, tmp, flavor)              # rebuilding `out`: reuse its timing cache
    record = trt_build.build_folder_engines(tmp, graphs, config.batch, config.tensorrt,
                                            profiles={GraphRole.GATES: GATE_ROWS}, flavor=flavor)
    manifest = Manifest(..., files=_file_records(tmp), backends={"tensorrt": record})

(``graphs`` are the ONNX exports' ``GraphSpec`` per role, ``GATE_ROWS`` from ``builder.graphs``.)

Inputs: the build folder holding the ONNX graphs (external data beside them is
fine: graphs are parsed by path), the manifest's ``GraphSpec`` per role (its
``file``, ``inputs`` and ``outputs``: every parsed network's IO must be exactly
these; profile shapes come from ``TensorSpec.concrete_shape``) and the
``BatchRange``, which becomes the single optimization profile (min/opt/max on
axis 0 of every graph input; the gates engine's is ``gate_rows``).

Outputs, written into the folder: ``full.plan`` and ``reuse.plan`` (serialized
engines, see ``ENGINE_FILES``; builds with gate-table graphs add ``GATE_ENGINE_FILES``)
and, for datacenter TensorRT, ``timing.cache`` (``TIMING_CACHE_FILE``), shared by the
builds and read again by later rebuilds. ``tensorrt_record`` returns the
``backends["tensorrt"]`` entry of the manifest (flavour, library version, where the
engines run, profile, engine files with sha256); the runtime refuses engines whose
recorded version or compute capability does not fit the running ones. The engine
files must also be listed in ``Manifest.files`` (``_file_records`` does that when it
runs after ``build_engines``; or merge ``engine_file_records``) so ``load_manifest``
verifies them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fora_export.builder.trt_config import TrtBuildConfig
from fora_export.builder.trt_flavors import BUILD_FLAVORS, DATACENTER_BUILD, BuildFlavor
from fora_export.builder.trt_parser import (
    ParsedNetwork,
    capture_errors,
    check_network_io,
    fold_for_parser,
    parse_network_io,
    parse_onnx,
    tensorrt_logger,
)
from fora_export.errors import BuildError
from fora_runtime.manifest import (
    GATE_TABLE_ROLES,
    GRAPH_ROLES,
    BatchRange,
    GraphRole,
    GraphSpec,
    TensorSpec,
    file_record,
    graph_file,
)

if TYPE_CHECKING:
    import tensorrt

__all__ = [
    "ENGINE_FILES",
    "GATE_ENGINE_FILES",
    "TIMING_CACHE_FILE",
    "BuiltEngine",
    "TrtBuildConfig",
    "build_engine",
    "build_engines",
    "build_folder_engines",
    "check_network_io",
    "engine_file_records",
    "fold_for_parser",
    "parse_network_io",
    "profile_shapes",
    "resolve_tensorrt",
    "seed_timing_cache",
    "tensorrt_available",
    "tensorrt_record",
]

log = logging.getLogger(__name__)

ENGINE_FILES: dict[str, str] = {role: graph_file(role, "tensorrt") for role in GRAPH_ROLES}


#: Engines of builds with gate-table graphs (the ``gates`` engine's profile is the
#: manifest's ``gate_rows``, not its batch range).
GATE_ENGINE_FILES: dict[str, str] = {role: graph_file(role, "tensorrt") for role in GATE_TABLE_ROLES}


TIMING_CACHE_FILE = "timing.cache"


def _tensorrt_version() -> str:
    """The running datacenter TensorRT's version, or a BuildError saying why there is none."""
    return DATACENTER_BUILD.load()[1]


def tensorrt_available() -> tuple[bool, str]:
    """Whether datacenter TensorRT engines can be built here, and why (for ``--backend auto``)."""
    return DATACENTER_BUILD.available()


def resolve_tensorrt(backend: str) -> tuple[BuildFlavor | None, str]:
    """``--backend`` ``tensorrt``, ``tensorrt-rtx`` or ``auto``: the flavour to build engines
    with (None: none) and what the build will write, in words. ``auto`` means datacenter
    TensorRT when it and a GPU are present: TensorRT-RTX plans are asked for by name."""
    flavor = BUILD_FLAVORS.get(backend, DATACENTER_BUILD)
    available, why = flavor.available()
    if backend in BUILD_FLAVORS and not available:
        where = "a GPU machine with TensorRT" if flavor is DATACENTER_BUILD else "a machine with TensorRT-RTX"
        raise BuildError(f"--backend {backend} | {why} | run the build on {where}")
    if not available:
        return None, f"backend {backend}: ONNX graphs only ({why})"
    what = "TensorRT engines" if flavor is DATACENTER_BUILD else "TensorRT-RTX plans for RTX GPUs"
    return flavor, f"backend {backend}: ONNX graphs + {what} ({why})"


def profile_shapes(
    inputs: Sequence[TensorSpec], batch: BatchRange
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input: the batch axis spans ``batch``, other axes are fixed."""
    return {
        spec.name: (
            spec.concrete_shape(batch.min),
            spec.concrete_shape(batch.opt),
            spec.concrete_shape(batch.max),
        )
        for spec in inputs
    }


def _attach_timing_cache(builder_config: tensorrt.IBuilderConfig, path: Path | None) -> tensorrt.ITimingCache:
    """Load ``path`` (if any) into a timing cache and attach it; a stale cache is replaced."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    if blob:
        try:
            cache = builder_config.create_timing_cache(blob)
            if cache is not None and builder_config.set_timing_cache(cache, ignore_mismatch=False):
                log.info("reusing TensorRT timing cache %s", path)
                return cache
        except RuntimeError as err:
            log.warning("TensorRT timing cache %s is unusable (%s); starting a fresh one", path, err)
        else:
            log.warning("TensorRT timing cache %s is from another device or version; starting fresh", path)
    cache = builder_config.create_timing_cache(b"")
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{path} | cannot write it: {err} | check free disk space and permissions") from err


def build_engine(
    onnx_path: Path,
    inputs: Sequence[TensorSpec],
    batch: BatchRange,
    timing_cache: Path | None,
    out: Path,
    config: TrtBuildConfig | None = None,
    *,
    outputs: Sequence[TensorSpec] | None = None,
    flavor: BuildFlavor = DATACENTER_BUILD,
) -> BuiltEngine:
    """Parse ``onnx_path`` (a constant-folded copy of it, see :func:`fold_for_parser`), build
    one strongly typed engine with ``flavor`` and write it to ``out``.

    ``inputs`` are the graph's manifest inputs: the network's inputs must be exactly
    these (names, dtypes, shapes with the batch axis); its profile spans ``batch`` on
    axis 0. ``outputs``, when given, are checked likewise. ``timing_cache`` is read
    when it exists and rewritten with what this build timed (None, or a flavour
    without one: no timing cache). Raises BuildError with the parser's messages
    (naming node and operator) when the graph does not parse and with TensorRT's
    errors when the build fails.
    """
    config = config or TrtBuildConfig()
    flavor.check_config(config)
    trt, _ = flavor.load()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path} | missing | export the ONNX graphs before building engines")
    logger = tensorrt_logger(trt)
    cache = timing_cache if flavor.uses_timing_cache else None
    out = Path(out)
    # The folded copy lives next to the engine until the engine is built (never in a manifest).
    with tempfile.TemporaryDirectory(prefix=".fold-", dir=out.parent) as scratch:
        graph = fold_for_parser(onnx_path, Path(scratch)) if config.fold_constants else None
        with capture_errors(logger) as errors:
            parsed = parse_onnx(trt, logger, errors, onnx_path, flavor, graph.path if graph else None)
            check_network_io(parsed.network, onnx_path, inputs, outputs)
            path = _build(trt, logger, errors, parsed, inputs, batch, cache, out, config, flavor)
    return BuiltEngine(path, graph.note if graph else "as exported: folding switched off")


class BuiltEngine(NamedTuple):
    """An engine written by :func:`build_engine`, and how its graph was prepared for the parser."""

    path: Path
    parsed: str


def _build(
    trt: Any,
    logger: Any,
    errors: list[str],
    parsed: ParsedNetwork,
    inputs: Sequence[TensorSpec],
    batch: BatchRange,
    timing_cache: Path | None,
    out: Path,
    config: TrtBuildConfig,
    flavor: BuildFlavor,
) -> Path:
    """build_engine's work; ``errors`` collects what TensorRT logs as errors meanwhile."""
    builder, network, onnx_path = parsed.builder, parsed.network, parsed.onnx_path
    shapes = profile_shapes(inputs, batch)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        _set_profile_shape(trt, profile, onnx_path, tensor, shapes[tensor.name], errors)

    builder_config = builder.create_builder_config()
    builder_config.builder_optimization_level = config.opt_level
    tf32 = getattr(trt.BuilderFlag, "TF32", None)  # not a precision flag: kept in 11.x, on by default
    if tf32 is not None:
        (builder_config.set_flag if config.tf32 else builder_config.clear_flag)(tf32)
    if config.workspace_bytes is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    flavor.configure(trt, builder_config, config)
    if builder_config.add_optimization_profile(profile) < 0:
        raise BuildError(
            f"{onnx_path} | TensorRT rejected the optimization profile for batch {batch}"
            f"{_errors_suffix(errors)} | check --batch MIN:OPT:MAX"
        )
    cache = None
    if timing_cache is not None:
        # A stale or foreign cache makes TensorRT log errors although the build goes on with
        # a fresh one: log those at INFO and keep them out of a later build failure's message.
        with capture_errors(logger, level=logging.INFO) as cache_errors:
            cache = _attach_timing_cache(builder_config, timing_cache)
        if cache_errors:
            log.info(
                "TensorRT reported while loading the timing cache %s (not fatal): %s",
                timing_cache,
                "; ".join(cache_errors),
            )

    log.info("building %s engine %s from %s (batch %s)", flavor.title, out.name, onnx_path.name, batch)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise BuildError(
            f"{onnx_path} | {flavor.title} could not build an engine: "
            f"{'; '.join(errors) or 'no error logged'} "
            "| see the TensorRT messages above; a smaller batch range or a workspace limit may help"
        )
    _write_atomic(out, memoryview(serialized))
    if cache is not None and timing_cache is not None:
        _write_atomic(timing_cache, memoryview(cache.serialize()))
    return out


def _errors_suffix(errors: list[str]) -> str:
    return f": {'; '.join(errors)}" if errors else ""


def _set_profile_shape(
    trt: Any,
    profile: Any,
    onnx_path: Path,
    tensor: Any,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    errors: list[str],
) -> None:
    """``profile.set_shape`` for one network input, its failures as BuildError."""
    low, opt, high = shapes
    what = f"input '{tensor.name}': min {list(low)}, opt {list(opt)}, max {list(high)}"
    rank = len(tensor.shape)
    if any(len(shape) != rank for shape in shapes):
        raise BuildError(
            f"{onnx_path} | profile shapes of {what} do not match the network's rank {rank} "
            f"(shape {list(tensor.shape)}) | the graph and manifest come from different exports; rebuild"
        )
    try:
        profile.set_shape(tensor.name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
    except (RuntimeError, ValueError, TypeError) as err:
        details = "; ".join([str(err), *errors])
        raise BuildError(
            f"{onnx_path} | TensorRT rejected the profile shapes of {what} ({details}) "
            "| check --batch MIN:OPT:MAX (1 <= min <= opt <= max) against the graph's input shapes"
        ) from err


def build_engines(
    folder: Path,
    graphs: Mapping[str, GraphSpec],
    batch: BatchRange,
    config: TrtBuildConfig | None = None,
    *,
    engines: Mapping[str, str] = ENGINE_FILES,
    profiles: Mapping[str, BatchRange] | None = None,
    flavor: BuildFlavor = DATACENTER_BUILD,
) -> dict[str, BuiltEngine]:
    """Build ``full.plan`` and ``reuse.plan`` (or the roles of ``engines``) in ``folder``
    from the graphs' ONNX files with ``flavor``, each with the batch profile ``batch``
    unless ``profiles`` gives its role another range; each network's inputs and
    outputs are checked against its ``GraphSpec``.

    Builds of a flavour with a timing cache share ``folder/timing.cache`` (created, or
    reused when present). Returns role -> the engine built.
    """
    folder = Path(folder)
    cache = folder / TIMING_CACHE_FILE
    built: dict[str, BuiltEngine] = {}
    for role, file in engines.items():
        if role not in graphs:
            raise BuildError(f"{folder} | no '{role}' graph in the manifest | expected {sorted(graphs)}")
        graph = graphs[role]
        profile = (profiles or {}).get(role, batch)
        built[role] = build_engine(
            folder / graph.file,
            graph.inputs,
            profile,
            cache,
            folder / file,
            config,
            outputs=graph.outputs,
            flavor=flavor,
        )
    return built


def build_folder_engines(
    folder: Path,
    graphs: Mapping[str, GraphSpec],
    batch: BatchRange,
    config: TrtBuildConfig | None,
    *,
    profiles: Mapping[str, BatchRange],
    flavor: BuildFlavor = DATACENTER_BUILD,
) -> dict[str, Any]:
    """Build an engine for every graph of an export folder (each with the batch profile
    unless ``profiles`` gives its role another range: the gates graph's rows) and return
    the manifest's ``backends["tensorrt"]`` record."""
    engines = {role: graph_file(role, "tensorrt") for role in graphs}
    built = build_engines(folder, graphs, batch, config, engines=engines, profiles=profiles, flavor=flavor)
    record = tensorrt_record(
        folder, batch, config, engines=engines, gate_rows=profiles.get(GraphRole.GATES), flavor=flavor
    )
    record["build"]["parsed"] = {role: engine.parsed for role, engine in built.items()}
    return record


def seed_timing_cache(previous: Path, folder: Path, flavor: BuildFlavor = DATACENTER_BUILD) -> bool:
    """Copy ``previous/timing.cache`` (an earlier build of the same output) into ``folder``
    (for flavours that use one)."""
    source = Path(previous) / TIMING_CACHE_FILE
    if not flavor.uses_timing_cache or not source.is_file():
        return False
    shutil.copyfile(source, Path(folder) / TIMING_CACHE_FILE)
    return True


def engine_file_records(folder: Path, engines: Mapping[str, str] = ENGINE_FILES) -> dict[str, dict[str, Any]]:
    """``Manifest.files`` entries (bytes, sha256, stamp) for the engine files."""
    records: dict[str, dict[str, Any]] = {}
    for file in engines.values():
        path = Path(folder) / file
        if not path.is_file():
            raise BuildError(f"{path} | missing | build the TensorRT engines first")
        records[file] = file_record(path)
    return records


def tensorrt_record(
    folder: Path,
    batch: BatchRange,
    config: TrtBuildConfig | None = None,
    *,
    engines: Mapping[str, str] = ENGINE_FILES,
    gate_rows: BatchRange | None = None,
    flavor: BuildFlavor = DATACENTER_BUILD,
) -> dict[str, Any]:
    """The manifest's ``backends["tensorrt"]`` entry for the engines built in ``folder``
    (``gate_rows``: the gates engine's profile, when there is one).

    Call it on the machine that built the engines: it records the running library's
    version and where the engines run (datacenter: this GPU and its compute
    capability; TensorRT-RTX: the target compute capabilities), which the runtime
    compares against its own.
    """
    config = config or TrtBuildConfig()
    _, version = flavor.load()
    files = engine_file_records(folder, engines)
    return {
        "flavor": flavor.runtime.name,
        flavor.runtime.version_key: version,
        **flavor.device_record(config),
        "profile": {"min": batch.min, "opt": batch.opt, "max": batch.max},
        "gate_profile": asdict(gate_rows) if gate_rows is not None else None,
        "engines": dict(engines),
        "sha256": {file: record["sha256"] for file, record in files.items()},
        "timing_cache": TIMING_CACHE_FILE if (Path(folder) / TIMING_CACHE_FILE).is_file() else None,
        "build": {**config.to_dict(), "strongly_typed": True},
    }
