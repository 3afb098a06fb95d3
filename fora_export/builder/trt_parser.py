"""TensorRT's view of an ONNX graph: the constant-folded copy it parses, the parsed network
and its IO (checked against the manifest), and the one TensorRT logger per library whose
errors each build collects. Written against the documented TensorRT Python API; TensorRT
modules are passed in (``flavor.load()``), so importing this module imports none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fora_export.builder.trt_flavors import DATACENTER_BUILD, BuildFlavor
from fora_export.errors import BuildError
from fora_runtime.backends.trt_flavor import TrtModule
from fora_runtime.dtypes import TENSORRT_NAMES
from fora_runtime.errors import BackendError
from fora_runtime.manifest import BATCH_AXIS, GraphSpec, LoadedTensor, TensorSpec, check_graph_io

if TYPE_CHECKING:
    import tensorrt

log = logging.getLogger(__name__)

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
# it), whose error list each build swaps in with capture_errors.
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


def tensorrt_logger(trt: Any) -> Any:
    """The one logger for the TensorRT module ``trt`` (made on first use)."""
    key = str(getattr(trt, "__name__", "tensorrt"))
    if key not in _LOGGERS:
        _LOGGERS[key] = _make_logger(trt)
    return _LOGGERS[key]


@contextmanager
def capture_errors(logger: Any, level: int = logging.ERROR) -> Iterator[list[str]]:
    """Collect the TensorRT errors logged inside the block (logged at ``level``) into a
    fresh list; the previous list and level are restored on exit, so blocks nest."""
    errors: list[str] = []
    previous = logger.errors, logger.error_level
    logger.errors, logger.error_level = errors, level
    try:
        yield errors
    finally:
        logger.errors, logger.error_level = previous


@dataclass
class ParsedNetwork:
    """A parsed ONNX graph. The parser owns the weights the network points to: keep it
    (and so this object) alive until the build is done."""

    builder: tensorrt.Builder
    network: tensorrt.INetworkDefinition
    parser: tensorrt.OnnxParser
    onnx_path: Path


def parse_onnx(
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


def _parser_error(error: tensorrt.ParserError) -> str:
    """One parser error, naming the ONNX node and operator it is about."""
    node, op = str(error.node_name()), str(error.node_operator())
    if not node and not op:
        return str(error)
    return f"node '{node}' (op {op}): {error.desc()}"


def _allow_attention_decomposition(trt: TrtModule, network: tensorrt.INetworkDefinition) -> int:
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
            # IAttentionLayer.attention is newer than the 10.13 stubs mypy checks against.
            layer.attention.decomposable = True  # type: ignore[attr-defined]
            count += 1
    if count:
        log.info("%d Attention node(s) may be decomposed where no fused kernel fits", count)
    return count


def network_io(network: tensorrt.INetworkDefinition) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A parsed network's inputs and outputs as manifest tensor specs (a dynamic axis 0 is
    the batch axis; other dynamic axes stay -1, which no manifest shape has)."""

    def spec(tensor: tensorrt.ITensor) -> TensorSpec:
        network_dims = tensor.shape
        shape = tuple(int(network_dims[axis]) for axis in range(len(network_dims)))
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
    logger = tensorrt_logger(trt)
    with capture_errors(logger) as errors:
        parsed = parse_onnx(trt, logger, errors, Path(onnx_path), flavor)
        return network_io(parsed.network)


def check_network_io(
    network: tensorrt.INetworkDefinition,
    onnx_path: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec] | None = None,
) -> None:
    """The parsed network's IO must be the manifest's (names, dtypes, shapes with the batch
    axis): the runtime's one graph-contract check, as every backend runs it on load.
    ``outputs`` None: the outputs are not checked."""
    got_inputs, got_outputs = network_io(network)

    def loaded(specs: Sequence[TensorSpec]) -> list[LoadedTensor]:
        # The batch axis is dynamic in the network; any other -1 matches no manifest dim.
        return [
            LoadedTensor(t.name, t.dtype, tuple(None if d == BATCH_AXIS else int(d) for d in t.shape))
            for t in specs
        ]

    declared = GraphSpec(
        file=onnx_path.name,
        inputs=tuple(inputs),
        outputs=tuple(outputs) if outputs is not None else tuple(got_outputs),
    )
    try:
        check_graph_io(
            onnx_path.stem,
            declared,
            loaded(got_inputs),
            loaded(got_outputs),
            where=str(onnx_path),
            ordered=False,
        )
    except BackendError as err:
        raise BuildError(str(err)) from err
