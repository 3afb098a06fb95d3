"""TensorRT engines for the step graphs (``full``, ``reuse``, and the gate-table graphs).

Two flavours build through this one module: datacenter TensorRT 10.1+ / 11.x
(older versions are refused: the runtime needs ``device_memory_size_v2`` and
``set_device_memory(ptr, size)``, both new in 10.1) on and for the visible GPU,
and TensorRT-RTX 1.7+, which needs no GPU and compiles plans for a list of RTX
compute capabilities. What differs between them is in ``trt_flavors.py`` (a
``BuildFlavor`` argument, datacenter TensorRT by default); engines only load
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
                                            profiles={"gates": GATE_ROWS}, flavor=flavor)
    manifest = Manifest(..., files=_file_records(tmp), backends={"tensorrt": record})

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
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fora_export.builder.trt_flavors import BUILD_FLAVORS, DATACENTER_BUILD, BuildFlavor
from fora_export.errors import BuildError, ConfigError
from fora_runtime.backends.trt_flavor import TrtModule
from fora_runtime.dtypes import TENSORRT_NAMES
from fora_runtime.manifest import (
    BATCH_AXIS,
    GATE_TABLE_ROLES,
    GRAPH_ROLES,
    BatchRange,
    GraphSpec,
    TensorSpec,
    file_record,
    graph_file,
)

if TYPE_CHECKING:
    import tensorrt

log = logging.getLogger(__name__)

ENGINE_FILES: dict[str, str] = {role: graph_file(role, "tensorrt") for role in GRAPH_ROLES}
#: Engines of builds with gate-table graphs (the ``gates`` engine's profile is the
#: manifest's ``gate_rows``, not its batch range).
GATE_ENGINE_FILES: dict[str, str] = {role: graph_file(role, "tensorrt") for role in GATE_TABLE_ROLES}
TIMING_CACHE_FILE = "timing.cache"
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


# -- availability -----------------------------------------------------------------------


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


# -- graphs for the parser ------------------------------------------------------------

#: Graphs up to this size (with external data) are folded; folding holds one in memory.
FOLD_MAX_BYTES = 4 << 30
#: Constants larger than this stay computed at run time rather than stored in the plan.
FOLD_TENSOR_BYTES = 16 << 20


class FoldedGraph(NamedTuple):
    """The graph TensorRT parses and what was done to get it, in words (for the record)."""

    path: Path
    note: str


def fold_for_parser(onnx_path: Path, scratch: Path) -> FoldedGraph:
    """A copy of ``onnx_path`` in ``scratch`` with its constant subgraphs folded, for
    TensorRT's ONNX parser: polygraphy's ``fold_constants`` (onnx-graphsurgeon folding,
    ONNX Runtime evaluating the constant subgraphs, shape subgraphs folded where shapes are
    static), which TensorRT's own tools run before parsing. Exports with a dynamic batch
    leave shape arithmetic and casts of constants behind; folded, the parser sees fewer
    layers. The graph's inputs and outputs are unchanged. Where folding cannot run
    (polygraphy not installed, a graph over ``FOLD_MAX_BYTES``, ONNX Runtime failing on a
    constant subgraph, e.g. a bf16 one) the graph is parsed as exported and the note says why.
    """
    try:
        from polygraphy.backend.onnx import fold_constants, onnx_from_path, save_onnx
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError as err:
        log.warning(
            "polygraphy is not installed (%s): TensorRT parses the graphs as exported "
            "(pip install 'fora-export[gpu]' folds their constants first)",
            err,
        )
        return FoldedGraph(onnx_path, "as exported: polygraphy is not installed")
    external = [p for p in onnx_path.parent.glob(f"{onnx_path.name}.data") if p.is_file()]
    size = onnx_path.stat().st_size + sum(p.stat().st_size for p in external)
    if size > FOLD_MAX_BYTES:
        log.info(
            "%s: %.1f GiB, parsed as exported (folding holds a graph in memory)", onnx_path.name, size / 2**30
        )
        return FoldedGraph(onnx_path, f"as exported: {size / 2**30:.1f} GiB is over the folding limit")
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):  # its progress lines go to stdout
            model = onnx_from_path(str(onnx_path), external_data_dir=str(onnx_path.parent))
            before = len(model.graph.node)
            # onnx's shape inference, not ONNX Runtime's symbolic one: that writes
            # sym_shape_infer_temp.onnx into the working directory where it gives up.
            folded = fold_constants(
                model,
                fold_shapes=True,
                error_ok=False,
                size_threshold=FOLD_TENSOR_BYTES,
                allow_onnxruntime_shape_inference=False,
            )
            out = Path(scratch) / onnx_path.name
            save_onnx(folded, str(out), external_data_path=f"{out.name}.data" if external else None)
    except (PolygraphyException, RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        log.warning(
            "%s: constant folding failed (%s); TensorRT parses the graph as exported", onnx_path.name, reason
        )
        return FoldedGraph(onnx_path, f"as exported: folding failed ({reason})")
    after = len(folded.graph.node)
    log.info("%s: constants folded for TensorRT, %d -> %d nodes", onnx_path.name, before, after)
    return FoldedGraph(out, f"constants folded: {before} -> {after} nodes")


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
# error list would stay empty. So this module has one logger per TensorRT module (each
# flavour's library keeps its own), made once and never freed (TensorRT may hold on to
# it), whose error list each build swaps in with _capture.
_LOGGERS: dict[str, Any] = {}


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
    """This module's one logger for the TensorRT module ``trt`` (made on first use)."""
    key = str(getattr(trt, "__name__", "tensorrt"))
    if key not in _LOGGERS:
        _LOGGERS[key] = _make_logger(trt)
    return _LOGGERS[key]


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
    logger = _logger(trt)
    cache = timing_cache if flavor.uses_timing_cache else None
    out = Path(out)
    # The folded copy lives next to the engine until the engine is built (never in a manifest).
    with tempfile.TemporaryDirectory(prefix=".fold-", dir=out.parent) as scratch:
        graph = fold_for_parser(onnx_path, Path(scratch)) if config.fold_constants else None
        with _capture(logger) as errors:
            parsed = _parse(trt, logger, errors, onnx_path, flavor, graph.path if graph else None)
            check_network_io(parsed.network, onnx_path, inputs, outputs)
            path = _build(trt, logger, errors, parsed, inputs, batch, cache, out, config, flavor)
    return BuiltEngine(path, graph.note if graph else "as exported: folding switched off")


class BuiltEngine(NamedTuple):
    """An engine written by :func:`build_engine`, and how its graph was prepared for the parser."""

    path: Path
    parsed: str


@dataclass
class ParsedNetwork:
    """A parsed ONNX graph. The parser owns the weights the network points to: keep it
    (and so this object) alive until the build is done."""

    builder: Any
    network: Any
    parser: Any
    onnx_path: Path


def _parse(
    trt: TrtModule,
    logger: Any,
    errors: list[str],
    onnx_path: Path,
    flavor: BuildFlavor,
    parse_path: Path | None = None,
) -> ParsedNetwork:
    """Parse ``parse_path`` (default ``onnx_path``: a folded copy may stand in for it);
    messages name ``onnx_path``."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parse_path or onnx_path)):
        messages = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or errors
        raise BuildError(
            f"{onnx_path} | {flavor.title}'s ONNX parser rejected it: {'; '.join(messages) or 'no message'} "
            "| check the opset and operators, or export with the other exporter"
        )
    _allow_attention_decomposition(trt, network)
    return ParsedNetwork(builder, network, parser, onnx_path)


def _parser_error(error: Any) -> str:
    """One parser error, naming the ONNX node and operator it is about."""
    node, op = str(error.node_name()), str(error.node_operator())
    if not node and not op:
        return str(error)
    return f"node '{node}' (op {op}): {error.desc()}"


def _allow_attention_decomposition(trt: TrtModule, network: Any) -> int:
    """Let TensorRT decompose every ONNX ``Attention`` node the parser made an IAttention of;
    returns how many.

    An IAttention is fused-or-nothing by default: where no fused kernel takes its shape,
    precision or head dim (fp32, head dims 8/12 in tiny test models; ``Attention`` comes
    from opset 23 exports), the build fails with "Attention operation was not supported by
    a dedicated kernel". Decomposable, it runs fused where a kernel exists and as
    MatMul-Softmax-MatMul otherwise. TensorRT versions without IAttention have no such layers.
    """
    attention_input = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    layer_class = getattr(trt, "IAttentionInputLayer", None)
    if attention_input is None or layer_class is None:
        return 0
    count = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == attention_input:
            layer.__class__ = layer_class  # get_layer returns the ILayer base: downcast to reach .attention
            layer.attention.decomposable = True
            count += 1
    if count:
        log.info("%d Attention node(s) may be decomposed where no fused kernel fits", count)
    return count


def network_io(network: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A parsed network's inputs and outputs as manifest tensor specs (a dynamic axis 0 is
    the batch axis; other dynamic axes stay -1, which no manifest shape has)."""

    def spec(tensor: Any) -> TensorSpec:
        shape = tuple(int(d) for d in tensor.shape)
        dims = tuple(BATCH_AXIS if axis == 0 and d == -1 else d for axis, d in enumerate(shape))
        return TensorSpec(tensor.name, TENSORRT_NAMES.get(tensor.dtype.name, tensor.dtype.name), dims)

    inputs = [spec(network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [spec(network.get_output(i)) for i in range(network.num_outputs)]
    return inputs, outputs


def parse_network_io(
    onnx_path: Path, flavor: BuildFlavor = DATACENTER_BUILD
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Parse ``onnx_path`` with ``flavor``'s ONNX parser and return the network's IO specs."""
    trt, _ = flavor.load()
    logger = _logger(trt)
    with _capture(logger) as errors:
        parsed = _parse(trt, logger, errors, Path(onnx_path), flavor)
        return network_io(parsed.network)


def check_network_io(
    network: Any,
    onnx_path: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec] | None = None,
) -> None:
    """The parsed network's IO must be the manifest's: names, dtypes, shapes with the batch axis."""
    got_inputs, got_outputs = network_io(network)
    pairs = [("input", got_inputs, inputs)]
    if outputs is not None:
        pairs.append(("output", got_outputs, outputs))
    for kind, got, want in pairs:
        expected = {spec.name: spec for spec in want}
        for tensor in got:
            spec = expected.get(tensor.name)
            if spec is None:
                raise BuildError(
                    f"{onnx_path} | network {kind} '{tensor.name}' is not in the manifest's {kind}s "
                    f"{sorted(expected)} | the graph and manifest come from different exports; rebuild"
                )
            if tensor.dtype != spec.dtype:
                raise BuildError(
                    f"{onnx_path} | {kind} '{tensor.name}' is {tensor.dtype} in TensorRT, expected "
                    f"{spec.dtype} | rebuild the ONNX graphs"
                )
            if tuple(tensor.shape) != tuple(spec.shape):
                raise BuildError(
                    f"{onnx_path} | {kind} '{tensor.name}' has shape {list(tensor.shape)} in TensorRT, the "
                    f"manifest says {list(spec.shape)} | rebuild the ONNX graphs"
                )
        missing = sorted(set(expected) - {tensor.name for tensor in got})
        if missing and kind == "output":
            raise BuildError(
                f"{onnx_path} | the network lacks the manifest's {kind}s {missing} "
                "| the graph and manifest come from different exports; rebuild"
            )


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
        with _capture(logger, level=logging.INFO) as cache_errors:
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
        folder, batch, config, engines=engines, gate_rows=profiles.get("gates"), flavor=flavor
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


# -- manifest -----------------------------------------------------------------------------


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
