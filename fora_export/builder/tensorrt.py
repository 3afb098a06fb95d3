"""TensorRT engines for the two step graphs (``full`` and ``reuse``).

Works with TensorRT 10.1+ and 11.x (older versions are refused: the runtime needs
``device_memory_size_v2`` and ``set_device_memory(ptr, size)``, both new in 10.1, and
engines only load under the TensorRT that built them). Networks are always strongly typed: the
precision of every tensor comes from the ONNX graph (the exporter writes fp16 /
bf16 graphs itself), so no precision builder flag is ever set (TensorRT 11
removed ``BuilderFlag.FP16`` / ``BF16``). ``tensorrt`` and ``torch`` are
imported inside the functions that need them, so importing this module is free.

How the build pipeline calls it, after both ONNX graphs are exported into the
temporary build folder and before the manifest is written::

    from fora_export.builder import tensorrt as trt_build

    ok, why = trt_build.tensorrt_available()        # for `--backend auto`: build engines if ok
    trt_config = trt_build.TrtBuildConfig(opt_level=3, workspace_bytes=None)
    trt_build.seed_timing_cache(out, tmp)           # rebuilding `out`: reuse its timing cache
    trt_build.build_engines(tmp, graphs, config.batch, trt_config)
    record = trt_build.tensorrt_record(tmp, config.batch, trt_config)
    manifest = Manifest(..., files=_file_records(tmp), backends={"tensorrt": record})

Inputs: the build folder holding ``full.onnx`` / ``reuse.onnx`` (external data
beside them is fine: graphs are parsed by path), the manifest's ``GraphSpec``
per role (its ``file`` and ``inputs``; shapes come from
``TensorSpec.concrete_shape``) and the ``BatchRange``, which becomes the single
optimization profile (min/opt/max on axis 0 of every graph input).

Outputs, written into the folder: ``full.plan`` and ``reuse.plan`` (serialized
engines, see ``ENGINE_FILES``; builds with gate-table graphs add ``GATE_ENGINE_FILES``,
the gates engine with its own rows profile via ``profiles=``) and ``timing.cache`` (``TIMING_CACHE_FILE``),
shared by both builds and read again by later rebuilds. ``tensorrt_record``
returns the ``backends["tensorrt"]`` entry of the manifest (TensorRT version,
GPU, compute capability, profile, engine files with sha256); the runtime refuses
engines whose recorded TensorRT version or compute capability differ from the
running ones. The engine files must also be listed in ``Manifest.files``
(``_file_records`` does that when it runs after ``build_engines``; or merge
``engine_file_records``) so ``load_manifest`` verifies them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fora_export.errors import BuildError, ConfigError
from fora_runtime.backends.trt import unusable_tensorrt
from fora_runtime.manifest import BatchRange, GraphSpec, TensorSpec, sha256_of

if TYPE_CHECKING:
    import tensorrt

log = logging.getLogger(__name__)

ENGINE_FILES: dict[str, str] = {"full": "full.plan", "reuse": "reuse.plan"}
#: Engines of builds with gate-table graphs (the ``gates`` engine's profile is the
#: manifest's ``gate_rows``, not its batch range).
GATE_ENGINE_FILES: dict[str, str] = {"gates": "gates.plan", "reuse_gated": "reuse_gated.plan"}
TIMING_CACHE_FILE = "timing.cache"
MAX_OPT_LEVEL = 5  # builder_optimization_level accepts 0..5 in TensorRT 10.x and 11.x

# TensorRT DataType member name -> manifest dtype name.
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32"}


@dataclass(frozen=True)
class TrtBuildConfig:
    """How engines are built; recorded in the manifest's TensorRT record.

    ``opt_level`` is ``IBuilderConfig.builder_optimization_level`` (0..5, TensorRT
    default 3). ``workspace_bytes`` caps the workspace memory pool; None keeps
    TensorRT's default (the device's global memory). ``tf32`` lets fp32 tensors
    use TF32 math (TensorRT's default, ~1e-3 relative error); it is off so fp32
    engines match the fp32 ONNX graphs to ~1e-5.
    """

    opt_level: int = 3
    workspace_bytes: int | None = None
    tf32: bool = False

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- availability -----------------------------------------------------------------------


def _tensorrt_version() -> str:
    """The running TensorRT's version, or a BuildError saying why there is none."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BuildError(
            f"TensorRT | cannot import 'tensorrt' ({err}) | install it (pip install tensorrt) on a machine "
            "with an NVIDIA GPU, or build without TensorRT engines"
        ) from err
    problem = unusable_tensorrt(trt, "Builder", ", or build without TensorRT engines")
    if problem is not None:
        raise BuildError(f"TensorRT | {problem}")
    return str(trt.__version__)


def _cuda_device() -> tuple[str, str]:
    """(name, compute capability "major.minor") of the current CUDA device."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a fora-export dependency
        raise BuildError(f"TensorRT | cannot import torch ({err}) | install torch with CUDA support") from err
    if not torch.cuda.is_available():
        raise BuildError(
            "TensorRT | no CUDA GPU is visible (torch.cuda.is_available() is False) "
            "| build TensorRT engines on the GPU machine that will run them"
        )
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT engines can be built here, and why (for ``--backend auto``)."""
    try:
        version = _tensorrt_version()
    except BuildError as err:
        return False, _problem(err)
    short = ".".join(version.split(".")[:2])
    try:
        gpu, _ = _cuda_device()
    except BuildError as err:
        return False, f"tensorrt {short} imported, but {_problem(err)}"
    return True, f"tensorrt {short} imported and GPU {gpu} visible"


def _problem(err: BuildError) -> str:
    """The middle ("problem") part of a ``subject | problem | fix`` message."""
    parts = str(err).split(" | ")
    return parts[1] if len(parts) > 1 else parts[0]


# -- building -----------------------------------------------------------------------------


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


def _network_flags(trt: Any) -> int:
    # STRONGLY_TYPED must be set on 10.x; 11.0 deprecates it ("strongly typed mode is
    # always enabled ... retained for API compatibility but is ignored"), so a later
    # release may drop the member: then strong typing is implicit and no flag is needed.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


# TensorRT keeps ONE logger per process: the one given to the first Builder / Runtime /
# Refitter, used by all of them until every one is gone. A logger per build would be
# ignored while anything else (an earlier build's objects, a runtime) is alive, and its
# error list would stay empty. So this module has one logger, made once and never freed
# (TensorRT may hold on to it), whose error list each build swaps in with _capture.
_LOGGER: Any = None


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger forwarding to stdlib logging and collecting error messages into
    its ``errors`` list (None: not collecting); ``error_level`` is the stdlib level errors
    are logged at."""
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):  # type: ignore[misc]  # base class comes from a lazy import
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 trampolines need the explicit base init
            self.errors: list[str] | None = None
            self.error_level = logging.ERROR

        def log(self, level: Any, msg: str) -> None:
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                if self.errors is not None:
                    self.errors.append(msg)
                log.log(self.error_level, "TensorRT: %s", msg)
            elif level == severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif level == severity.INFO:
                log.info("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _logger(trt: Any) -> Any:
    """This module's one TensorRT logger (made on first use)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = _make_logger(trt)
    return _LOGGER


@contextmanager
def _capture(logger: Any, level: int = logging.ERROR) -> Iterator[list[str]]:
    """Collect the TensorRT errors logged inside the block (logged at ``level``) into a
    fresh list; the previous list and level are restored on exit, so blocks nest."""
    errors: list[str] = []
    previous = logger.errors, logger.error_level
    logger.errors, logger.error_level = errors, level
    try:
        yield errors
    finally:
        logger.errors, logger.error_level = previous


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
) -> Path:
    """Parse ``onnx_path``, build one strongly typed engine and write it to ``out``.

    ``inputs`` are the graph's manifest inputs: every network input must be one
    of them (with the same dtype); its profile spans ``batch`` on axis 0.
    ``timing_cache`` is read when it exists and rewritten with what this build
    timed (None: no timing cache). Raises BuildError with the parser's messages
    when the graph does not parse and with TensorRT's errors when the build fails.
    """
    config = config or TrtBuildConfig()
    _tensorrt_version()
    import tensorrt as trt

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path} | missing | export the ONNX graphs before building engines")
    logger = _logger(trt)
    with _capture(logger) as errors:
        return _build(trt, logger, errors, onnx_path, inputs, batch, timing_cache, Path(out), config)


def _build(
    trt: Any,
    logger: Any,
    errors: list[str],
    onnx_path: Path,
    inputs: Sequence[TensorSpec],
    batch: BatchRange,
    timing_cache: Path | None,
    out: Path,
    config: TrtBuildConfig,
) -> Path:
    """build_engine's work; ``errors`` collects what TensorRT logs as errors meanwhile."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    # The parser owns the weights the network points to: keep it alive until the build is done.
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        messages = [str(parser.get_error(i)) for i in range(parser.num_errors)] or errors
        raise BuildError(
            f"{onnx_path} | TensorRT's ONNX parser rejected it: {'; '.join(messages) or 'no message'} "
            "| check the opset and operators, or export with the other exporter"
        )

    specs = {spec.name: spec for spec in inputs}
    shapes = profile_shapes(inputs, batch)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        spec = specs.get(tensor.name)
        if spec is None:
            raise BuildError(
                f"{onnx_path} | network input '{tensor.name}' is not in the manifest's inputs "
                f"{sorted(specs)} | the graph and manifest come from different exports; rebuild"
            )
        got = _TRT_DTYPES.get(tensor.dtype.name, tensor.dtype.name)
        if got != spec.dtype:
            raise BuildError(
                f"{onnx_path} | input '{tensor.name}' is {got} in TensorRT, expected {spec.dtype} "
                "| rebuild the ONNX graphs"
            )
        _set_profile_shape(trt, profile, onnx_path, tensor, shapes[tensor.name], errors)

    builder_config = builder.create_builder_config()
    builder_config.builder_optimization_level = config.opt_level
    tf32 = getattr(trt.BuilderFlag, "TF32", None)  # not a precision flag: kept in 11.x, on by default
    if tf32 is not None:
        (builder_config.set_flag if config.tf32 else builder_config.clear_flag)(tf32)
    if config.workspace_bytes is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if builder_config.add_optimization_profile(profile) < 0:
        raise BuildError(
            f"{onnx_path} | TensorRT rejected the optimization profile for batch {batch}"
            f"{_errors_suffix(errors)} | check --batch MIN:OPT:MAX"
        )
    cache = None
    if timing_cache is not None:
        # A stale or foreign cache makes TensorRT log errors although the build goes on with
        # a fresh one: log those at INFO and keep them out of a later build failure's message.
        with _capture(logger, level=logging.INFO) as cache_errors:
            cache = _attach_timing_cache(builder_config, timing_cache)
        if cache_errors:
            log.info(
                "TensorRT reported while loading the timing cache %s (not fatal): %s",
                timing_cache,
                "; ".join(cache_errors),
            )

    log.info("building TensorRT engine %s from %s (batch %s)", out.name, onnx_path.name, batch)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise BuildError(
            f"{onnx_path} | TensorRT could not build an engine: {'; '.join(errors) or 'no error logged'} "
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
) -> dict[str, Path]:
    """Build ``full.plan`` and ``reuse.plan`` (or the roles of ``engines``) in ``folder``
    from the graphs' ONNX files, each with the batch profile ``batch`` unless
    ``profiles`` gives its role another range.

    All builds share ``folder/timing.cache`` (created, or reused when present).
    Returns role -> engine path.
    """
    folder = Path(folder)
    cache = folder / TIMING_CACHE_FILE
    built: dict[str, Path] = {}
    for role, file in engines.items():
        if role not in graphs:
            raise BuildError(f"{folder} | no '{role}' graph in the manifest | expected {sorted(graphs)}")
        graph = graphs[role]
        profile = (profiles or {}).get(role, batch)
        built[role] = build_engine(folder / graph.file, graph.inputs, profile, cache, folder / file, config)
    return built


def seed_timing_cache(previous: Path, folder: Path) -> bool:
    """Copy ``previous/timing.cache`` (an earlier build of the same output) into ``folder``."""
    source = Path(previous) / TIMING_CACHE_FILE
    if not source.is_file():
        return False
    shutil.copyfile(source, Path(folder) / TIMING_CACHE_FILE)
    return True


# -- manifest -----------------------------------------------------------------------------


def engine_file_records(folder: Path, engines: Mapping[str, str] = ENGINE_FILES) -> dict[str, dict[str, Any]]:
    """``Manifest.files`` entries (bytes, sha256) for the engine files."""
    records: dict[str, dict[str, Any]] = {}
    for file in engines.values():
        path = Path(folder) / file
        if not path.is_file():
            raise BuildError(f"{path} | missing | build the TensorRT engines first")
        records[file] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return records


def tensorrt_record(
    folder: Path,
    batch: BatchRange,
    config: TrtBuildConfig | None = None,
    *,
    engines: Mapping[str, str] = ENGINE_FILES,
    gate_rows: BatchRange | None = None,
) -> dict[str, Any]:
    """The manifest's ``backends["tensorrt"]`` entry for the engines built in ``folder``
    (``gate_rows``: the gates engine's profile, when there is one).

    Call it on the machine that built the engines: it records the running
    TensorRT version and GPU, which the runtime compares against its own.
    """
    config = config or TrtBuildConfig()
    version = _tensorrt_version()
    gpu, capability = _cuda_device()
    files = engine_file_records(folder, engines)
    return {
        "tensorrt_version": version,
        "gpu": gpu,
        "compute_capability": capability,
        "profile": {"min": batch.min, "opt": batch.opt, "max": batch.max},
        "gate_profile": asdict(gate_rows) if gate_rows is not None else None,
        "engines": dict(engines),
        "sha256": {file: record["sha256"] for file, record in files.items()},
        "timing_cache": TIMING_CACHE_FILE if (Path(folder) / TIMING_CACHE_FILE).is_file() else None,
        "build": {**config.to_dict(), "strongly_typed": True},
    }
