"""Save one step graph as a ``torch.export`` program (``full.pt2`` / ``reuse.pt2``).

The runtime's ``torch`` backend (``fora_runtime.backends.torch_backend``) loads
these programs with ``torch.export.load`` and needs no model source, diffusers
or fora_export at run time.

Dynamic batch
    Axis 0 of every positional input is one ``torch.export.Dim("batch",
    min=batch.min, max=batch.max)``; every other axis is fixed per build (the
    resolution, as for ONNX). The step graphs take ``*args``, so the dynamic
    shapes are keyed by the varargs name (``inputs`` for ``FullStepGraph``,
    ``inputs_and_caches`` for ``ReuseStepGraph``).

    torch.export specialises sizes 0 and 1: a batch traced at size 1 becomes the
    constant 1 and the export fails ("You marked batch as dynamic but your code
    specialized it to be a constant (1)"). So the program is always *traced* at a
    batch >= 2 inside the range (the example inputs are tiled along axis 0 when
    needed), while the Dim's ``min`` still admits 1: with an explicit ``min=1``
    the program's guards accept batch 1 and its graph is size-generic, which the
    round-trip check below verifies at ``batch.min``. (``Dim.DYNAMIC`` instead
    yields the range ``[2, inf)`` and refuses batch 1.) A range with
    ``min == max`` is exported static at that size. diffusers' DiT needs nothing
    else: ``unpatchify``'s ``int(hidden_states.shape[1] ** 0.5)`` reads the token
    axis, which is static, and the batch reaches no Python branch.

Device and dtype
    An exported program is specialised to the device and dtype it was traced
    with (factory calls such as the timestep embedding's ``arange`` carry their
    device), so **trace on the device the programs will run on**: move the model
    and the example inputs to ``cuda`` to build programs for the CUDA path. The
    runtime refuses programs traced on another device type. Artifacts saved by
    one torch version may not load under another; the runtime refuses a
    different torch major.minor. Both facts are recorded in the program archive
    (``extra/fora_program.json``) and in the manifest record.

``fora_export.builder.pipeline`` calls :func:`export_program` once per graph job (the
files are named by ``fora_runtime.manifest.graph_file``) and records
:func:`torch_record` of what they returned in the manifest; the files are listed in
``Manifest.files`` like the ONNX graphs, so their sha256 is verified on load.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fora_export.adapters.base import DTYPE_NAMES
from fora_export.errors import ExportError
from fora_export.export.dynamic_batch import batch_dynamic_shapes
from fora_runtime.manifest import BATCH_AXIS, BatchRange, GraphRole, GraphSpec, TensorSpec, graph_file

log = logging.getLogger(__name__)

#: Name of the metadata file stored in each program archive (under ``extra/``).
META_NAME = "fora_program.json"

# Round-trip tolerance by prediction dtype: fp32 programs reproduce eager to ~1e-6.
_TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def device_label(device: torch.device) -> str:
    """``cpu`` or ``cuda:<GPU name>`` (what the manifest records)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@dataclass(frozen=True)
class ExportedProgram:
    """A program written by :func:`export_program`: its IO and the metadata in its archive."""

    graph: GraphSpec
    meta: dict[str, Any]


def export_program(
    module: nn.Module,
    example_args: tuple[torch.Tensor, ...],
    path: str | Path,
    batch_range: BatchRange,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> ExportedProgram:
    """Export ``module`` with ``torch.export``, save it to ``path`` and check the round trip.

    ``input_names``/``output_names`` name the program's positional inputs and its
    outputs, in order (as for ``export_onnx``). Returns the program's IO (axis 0 the
    batch axis) and the metadata stored in the archive. Raises :class:`ExportError`
    when the export, the save or the round-trip check fails.
    """
    path = Path(path)
    if not example_args:
        raise ExportError(f"{path.name} | no example inputs | pass the step inputs to trace with")
    if len(example_args) != len(input_names):
        raise ExportError(
            f"{path.name} | {len(example_args)} example inputs for {len(input_names)} input names "
            f"{list(input_names)} | pass one name per positional input"
        )
    device = example_args[0].device
    if any(arg.device != device for arg in example_args):
        raise ExportError(f"{path.name} | example inputs are on several devices | put them on one device")
    dynamic = batch_range.min < batch_range.max
    trace_batch = _trace_batch(int(example_args[0].shape[0]), batch_range)
    args = _resize_batch(example_args, trace_batch)

    started = time.perf_counter()
    with torch.no_grad():
        reference = _as_tuple(module(*args))
    if len(reference) != len(output_names):
        raise ExportError(
            f"{path.name} | module returns {len(reference)} outputs for {len(output_names)} output "
            f"names | pass one name per output"
        )
    dynamic_shapes = batch_dynamic_shapes(module, args, batch_range)
    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except Exception as err:  # torch.export raises many unrelated exception types
        raise ExportError(
            f"{path.name} | torch.export.export failed at trace batch {trace_batch} "
            f"(batch range {batch_range}): {type(err).__name__}: {err}"
        ) from err

    meta = {
        "torch": torch.__version__,
        "device": device_label(device),
        "dtype": DTYPE_NAMES.get(reference[0].dtype, str(reference[0].dtype).removeprefix("torch.")),
        "inputs": list(input_names),
        "outputs": list(output_names),
        "batch": {"min": batch_range.min, "max": batch_range.max, "dynamic": dynamic},
        "trace_batch": trace_batch,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    try:
        # The archive would also store the example inputs: for a reuse program those
        # are every cache tensor (63 MiB for DiT-XL/2), dead weight at run time.
        program.example_inputs = None
        torch.export.save(program, str(path), extra_files={META_NAME: json.dumps(meta)})
    except Exception as err:
        raise ExportError(f"{path.name} | torch.export.save failed: {type(err).__name__}: {err}") from err

    _check_round_trip(module, path, args, reference, batch_range)
    seconds = time.perf_counter() - started
    log.info("exported %s (batch %s, traced at %d) in %.1f s", path.name, batch_range, trace_batch, seconds)
    graph = GraphSpec(
        file=path.name,
        inputs=tuple(_tensor_spec(n, t) for n, t in zip(input_names, args, strict=True)),
        outputs=tuple(_tensor_spec(n, t) for n, t in zip(output_names, reference, strict=True)),
    )
    return ExportedProgram(graph, meta)


def _tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    dtype = DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype).removeprefix("torch."))
    return TensorSpec(name, dtype, (BATCH_AXIS, *tensor.shape[1:]))


def _trace_batch(example_batch: int, batch_range: BatchRange) -> int:
    """The batch size to trace at: the range's only size, else >= 2 (see module docstring)."""
    if batch_range.min == batch_range.max:
        return batch_range.min
    return min(max(example_batch, 2, batch_range.min), batch_range.max)


def _resize_batch(args: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """Tile or cut every input along axis 0 to ``size`` (valid inputs stay valid)."""
    current = int(args[0].shape[0])
    if current == size:
        return args
    index = torch.arange(size, device=args[0].device) % current
    return tuple(arg.index_select(0, index) for arg in args)


def _as_tuple(outputs: Any) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _check_round_trip(
    module: nn.Module,
    path: Path,
    args: tuple[torch.Tensor, ...],
    reference: tuple[torch.Tensor, ...],
    batch_range: BatchRange,
) -> None:
    """The saved program, loaded back, must reproduce the eager module, at the traced
    batch and at ``batch_range.min`` (batch 1 is where 0/1 specialisation would bite)."""
    try:
        loaded = torch.export.load(str(path)).module()
    except Exception as err:
        raise ExportError(
            f"{path.name} | saved program does not load back: {type(err).__name__}: {err}"
        ) from err
    cases = [(args, reference)]
    if batch_range.min != args[0].shape[0]:
        small = tuple(arg[: batch_range.min] for arg in args)
        with torch.no_grad():
            cases.append((small, _as_tuple(module(*small))))
    for inputs, expected in cases:
        try:
            with torch.no_grad():
                got = _as_tuple(loaded(*inputs))
        except Exception as err:
            raise ExportError(
                f"{path.name} | loaded program fails at batch {inputs[0].shape[0]}: "
                f"{type(err).__name__}: {err}"
            ) from err
        for index, (want, have) in enumerate(zip(expected, got, strict=True)):
            tolerance = _TOLERANCES.get(want.dtype, 0.0) * (1.0 + float(want.abs().max()))
            error = float((have.float() - want.float()).abs().max()) if want.numel() else 0.0
            if have.shape != want.shape or not error <= tolerance:
                raise ExportError(
                    f"{path.name} | output {index} of the loaded program differs from eager PyTorch at "
                    f"batch {inputs[0].shape[0]} (shape {list(have.shape)} vs {list(want.shape)}, max abs "
                    f"error {error:.3g} > {tolerance:.3g}) | report this export bug"
                )


def read_program_meta(path: str | Path) -> dict[str, Any]:
    """The metadata ``export_program`` stored in a ``.pt2`` archive (read without loading it)."""
    path = Path(path)
    suffix = f"extra/{META_NAME}"
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n == suffix or n.endswith(f"/{suffix}")]
            if not names:
                raise ExportError(
                    f"{path} | has no {suffix} | not written by export_program; re-export the programs"
                )
            meta = json.loads(archive.read(names[0]))
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise ExportError(
            f"{path} | cannot read the program archive: {err} | re-export the programs"
        ) from err
    if not isinstance(meta, dict):
        raise ExportError(f"{path} | {suffix} is not a JSON object | re-export the programs")
    return meta


def torch_manifest_record(folder: str | Path, roles: Sequence[str]) -> dict[str, Any]:
    """The manifest's ``backends["torch"]`` entry for the programs of ``roles`` in ``folder``,
    read from their archives (see :func:`torch_record`)."""
    folder = Path(folder)
    files = {role: graph_file(role, "torch") for role in roles}
    return _record(folder, files, {role: read_program_meta(folder / file) for role, file in files.items()})


def torch_record(folder: str | Path, programs: Mapping[str, ExportedProgram]) -> dict[str, Any]:
    """The manifest's ``backends["torch"]`` entry for the programs just exported into
    ``folder`` (role -> what :func:`export_program` returned).

    ``{"programs": {"full": "full.pt2", "reuse": "reuse.pt2"[, "gates": ..., "reuse_gated":
    ...]}, "torch": version,
    "device": "cpu" | "cuda:<name>", "dtype": prediction dtype, "inputs": {role:
    names}, "outputs": {role: names}, "batch": {"min", "max", "dynamic"}}``.
    """
    files = {role: program.graph.file for role, program in programs.items()}
    return _record(Path(folder), files, {role: program.meta for role, program in programs.items()})


def _record(folder: Path, files: dict[str, str], metas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for role, meta in metas.items():
        # The gates program's batch axis counts rows and its output is the table, not a prediction.
        keys = ("torch", "device") if role == GraphRole.GATES else ("torch", "device", "dtype", "batch")
        for key in keys:
            if meta.get(key) != metas[GraphRole.FULL].get(key):
                raise ExportError(
                    f"{folder} | {files[role]} and full.pt2 differ in {key} ({meta.get(key)!r} vs "
                    f"{metas[GraphRole.FULL].get(key)!r}) | export all programs in one build"
                )
    full = metas[GraphRole.FULL]
    return {
        "programs": files,
        "torch": full["torch"],
        "device": full["device"],
        "dtype": full["dtype"],
        "inputs": {role: list(meta["inputs"]) for role, meta in metas.items()},
        "outputs": {role: list(meta["outputs"]) for role, meta in metas.items()},
        "batch": dict(full["batch"]),
    }
