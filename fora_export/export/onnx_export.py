"""Export one step graph to an ONNX file with a dynamic batch axis.

Two exporters are offered: ``torchscript`` (default; opset 17, fp32 parity ~5e-6
on DiT, fast) and ``dynamo`` (``torch.export``; opset >= 18). The dynamo path
constant-folds the sinusoidal timestep frequencies 1 ulp off, which costs
~4e-5 abs in fp32 at large timesteps; both stay within validate's 1e-4.

Graphs whose weights exceed ``EXTERNAL_DATA_THRESHOLD`` are saved with their
weights in one external file (``<graph>.onnx.data``) beside the graph, so
models over the 2 GB protobuf limit export too.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fora_export.choices import EXPORTERS
from fora_export.errors import ConfigError, ExportError
from fora_export.export.dynamic_batch import batch_dynamic_shapes
from fora_export.export.islands import apply_fp32_islands, island_ops
from fora_runtime.dtypes import ONNX_ELEM_TYPES
from fora_runtime.manifest import BATCH_AXIS, BatchRange, GraphSpec, TensorSpec

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights


@dataclass(frozen=True)
class ExportConfig:
    """How graphs are exported: ONNX tensor precision, opset and exporter."""

    precision: str = "fp32"
    #: 0: the exporter's default (see ``default_opset``).
    opset: int = 0
    #: "": the model family's exporter (``ModelAdapter.onnx_exporter``).
    exporter: str = ""
    #: None: external data only above EXTERNAL_DATA_THRESHOLD; True/False force it.
    external_data: bool | None = None
    #: Run LayerNorm/Softmax (and ops without bf16 support) in fp32 in fp16/bf16 graphs.
    fp32_islands: bool = True

    @property
    def resolved(self) -> bool:
        """False while exporter and opset are left to the model family ("" and 0)."""
        return bool(self.exporter)

    def __post_init__(self) -> None:
        if not self.exporter:  # the family's exporter, resolved by the build (checked again then)
            if self.opset and (not isinstance(self.opset, int) or self.opset < 17):
                raise ConfigError(
                    f"Opset | got {self.opset!r} | every exporter needs opset >= 17 "
                    "(17 is the first with LayerNormalization)"
                )
            return
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"Exporter | got {self.exporter!r} | expected one of {', '.join(EXPORTERS)}")
        minimum = 18 if self.exporter == "dynamo" else 17
        if not isinstance(self.opset, int) or self.opset < minimum:
            raise ConfigError(
                f"Opset | got {self.opset!r} | the {self.exporter} exporter needs opset >= {minimum} "
                "(17 is the first with LayerNormalization)"
            )


def export_onnx(
    module: nn.Module,
    example_args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    config: ExportConfig,
    *,
    batch_range: BatchRange,
) -> GraphSpec:
    """Export ``module`` to ``path``, check it with the ONNX checker and return the
    graph's IO as written (the manifest's entry for it: exporters drop unused inputs).

    The batch axis (axis 0 of every input and output) is dynamic; every other
    axis is fixed per build and written into the graph's IO types as traced
    from ``example_args`` and the module's outputs on them.
    """
    with torch.no_grad():
        outputs = module(*example_args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    static_shapes = {
        name: tuple(t.shape[1:])
        for name, t in zip((*input_names, *output_names), (*example_args, *outputs), strict=True)
    }
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="fora-export-") as scratch:
        raw = Path(scratch) / path.name
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # Tracer warnings about Python branches on shapes are expected: the
                # resolution is fixed per build; the batch axis is checked by validate.
                warnings.simplefilter("ignore")
                _run_exporter(module, example_args, input_names, output_names, raw, config, batch_range)
        except ConfigError:
            raise
        except Exception as err:  # exporters raise many unrelated exception types
            raise ExportError(f"{path.name} | torch.onnx.export failed: {type(err).__name__}: {err}") from err
        return _finalize(raw, path, config, static_shapes)


def _run_exporter(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    config: ExportConfig,
    batch_range: BatchRange,
) -> None:
    if config.exporter == "torchscript":
        dynamic_axes = {name: {0: BATCH_AXIS} for name in (*input_names, *output_names)}
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=config.opset,
            do_constant_folding=True,
            dynamo=False,
        )
        return
    program = torch.onnx.export(
        module,
        args,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=batch_dynamic_shapes(module, args, batch_range),
        opset_version=config.opset,
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    if program is None:  # only returned as None when writing to a path directly
        raise ExportError(f"{path.name} | torch.onnx.export (dynamo) returned no program")
    program.save(str(path))


def _finalize(
    raw: Path, path: Path, config: ExportConfig, static_shapes: dict[str, tuple[int, ...]]
) -> GraphSpec:
    """Load the raw export, fix IO shapes, save (maybe external data), check; the saved IO."""
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    model = _fold_shape_branches(model)
    _drop_noop_squeezes(model)
    _fix_io_shapes(model, static_shapes)
    if config.fp32_islands:
        apply_fp32_islands(model, config.precision, island_ops(config.precision, config.opset))
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    external = (
        config.external_data if config.external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD
    )
    data_name = f"{path.name}.data"
    for stale in (path, path.with_name(data_name)):
        stale.unlink(missing_ok=True)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        # onnx writes the data file owner-only (0600); give it the graph file's mode so an
        # engine folder copied to a service account stays readable there.
        path.with_name(data_name).chmod(path.stat().st_mode & 0o777)
    else:
        onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{path.name} | ONNX checker rejected the exported graph: {err}") from err
    return _graph_spec(model, path.name)


def _fold_shape_branches(model: Any) -> Any:
    """Fold ``If`` nodes whose condition is static (a Python branch on a shape).

    diffusers writes ``hidden_states.squeeze(1)`` (PixArt's output) for a tensor
    whose axis 1 is the token count; the TorchScript exporter turns it into an
    ``If`` on ``shape[1] == 1`` that ONNX shape inference rejects. The shape is
    static, so onnxscript's optimizer folds the branch away. Only graphs with
    ``If`` nodes go through it: its constant folding would also recompute the
    timestep frequency table 1 ulp off (see the module docstring).
    """
    if not any(node.op_type == "If" for node in model.graph.node):
        return model
    from onnxscript import optimizer

    folded = optimizer.optimize(model)
    if any(node.op_type == "If" for node in folded.graph.node):
        raise ExportError("graph | a shape-dependent branch (If) could not be folded | please report")
    return folded


def _drop_noop_squeezes(model: Any) -> None:
    """Replace ``Squeeze`` on an axis whose static size is not 1 by ``Identity``.

    ``torch.squeeze(dim)`` is a no-op on such an axis, but the dynamo exporter
    emits ``Squeeze(axes=[dim])`` for it (PixArt's ``hidden_states.squeeze(1)``
    on the token axis), which ONNX forbids and ONNX Runtime refuses.
    """
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    shapes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in model.graph.node:
        if node.op_type != "Squeeze" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        shape = shapes.get(node.input[0])
        if not shape:
            continue
        axes = [int(a) % len(shape) for a in constants[node.input[1]].reshape(-1)]
        if all(shape[a] is not None and shape[a] != 1 for a in axes):
            node.op_type = "Identity"
            del node.input[1:]


def _fix_io_shapes(model: Any, static_shapes: dict[str, tuple[int, ...]]) -> None:
    """Axis 0 of every graph input/output is ``batch``; the others are the traced sizes.

    Exporters leave symbolic names on axes they could not infer (dynamo calls the
    batch s0, TorchScript names reshaped axes after their op); the runtime and
    TensorRT profiles want the real sizes.
    """
    graph = model.graph
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        rest = static_shapes.get(value.name)
        if rest is None or len(dims) != len(rest) + 1:
            raise ExportError(f"graph IO '{value.name}' | rank differs from the traced tensor")
        dims[0].Clear()
        dims[0].dim_param = BATCH_AXIS
        for dim, size in zip(dims[1:], rest, strict=True):
            dim.Clear()
            dim.dim_value = int(size)


def _graph_spec(model: Any, file: str) -> GraphSpec:
    """The inputs and outputs of the ONNX ``model`` saved as ``file``."""

    def spec(value: Any) -> TensorSpec:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in ONNX_ELEM_TYPES:
            raise ExportError(
                f"{file} | tensor '{value.name}' has unsupported ONNX type {tensor_type.elem_type}"
            )
        shape: list[int | str] = []
        for dim in tensor_type.shape.dim:
            shape.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or BATCH_AXIS))
        return TensorSpec(value.name, ONNX_ELEM_TYPES[tensor_type.elem_type], tuple(shape))

    graph = model.graph
    return GraphSpec(
        file=file,
        inputs=tuple(spec(v) for v in graph.input),
        outputs=tuple(spec(v) for v in graph.output),
    )
