"""TensorRT engines against their ONNX graphs on ONNX Runtime, graph by graph (polygraphy).

``validate --backend tensorrt`` compares the runtime with PyTorch like every backend; on a
machine where the engines run it also compares each engine with the ONNX graph it was built
from, on the same inputs, through polygraphy's runners and comparator (``TrtRunner``,
``OnnxrtRunner``, ``Comparator.run``): the engine's own IO, every output (the full graph's
caches too), without the runtime's buffers in between, so a difference is the engine's.
Outputs are compared with :func:`~fora_export.validate.compare.compare` at the graph
tolerance of the precision, reported as graph cases named ``"<role> vs onnxruntime"``.

Inputs per batch size: valid random step inputs (the top timestep of the family's range);
the reuse graphs get the caches, and ``reuse_gated`` the gate rows, that ONNX Runtime's full
and gates graphs computed from them. polygraphy's TensorRT runner imports ``tensorrt``, so
TensorRT-RTX plans (module ``tensorrt_rtx_bindings``) are not compared here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fora_export.errors import ConfigError
from fora_export.step_inputs import random_step_inputs
from fora_export.validate.compare import GRAPH_TOLERANCES, compare
from fora_export.validate.report import GraphCase
from fora_runtime.manifest import GATES_NAME, GraphRole, Manifest

#: Makes the runner of one engine: (role, plan path) -> a polygraphy runner.
EngineRunner = Callable[[str, Path], Any]

POLYGRAPHY_INSTALL = "pip install 'fora-export[gpu]' (or: pip install polygraphy onnx-graphsurgeon)"


def tensorrt_runner(role: str, plan: Path) -> Any:
    """polygraphy's runner of one serialized datacenter TensorRT engine."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(plan))), name=f"tensorrt-{role}")


def compare_engines_with_onnxruntime(
    folder: Path,
    manifest: Manifest,
    batch_sizes: list[int],
    *,
    engine_runner: EngineRunner = tensorrt_runner,
    seed: int = 0,
) -> list[GraphCase]:
    """Every engine of the folder's TensorRT record against its ONNX graph (see the module
    docstring); ``engine_runner`` makes each engine's polygraphy runner."""
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator
        from polygraphy.logger import G_LOGGER
    except ImportError as err:
        raise ConfigError(
            f"validate --backend tensorrt | polygraphy is not installed ({err}) | {POLYGRAPHY_INSTALL}"
        ) from err
    record = manifest.backends.get("tensorrt")
    if not isinstance(record, dict) or not isinstance(record.get("engines"), dict):
        raise ConfigError(f"{folder} | has no TensorRT engines | build with --backend tensorrt")
    engines: dict[str, str] = dict(record["engines"])
    tolerance = GRAPH_TOLERANCES[manifest.precision]
    timestep_name = manifest.timestep_input.name
    cases: list[GraphCase] = []

    def run(role: str, feed: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        graph = manifest.graphs[role]
        onnxruntime = OnnxrtRunner(SessionFromOnnx(str(folder / graph.file)), name=f"onnxruntime-{role}")
        engine = engine_runner(role, folder / engines[role])
        names = {spec.name for spec in graph.inputs}
        with G_LOGGER.verbosity(G_LOGGER.ERROR):  # runner activation lines go to stdout
            results = Comparator.run([engine, onnxruntime], data_loader=[{k: feed[k] for k in names}])
        got, want = results[engine.name][0], results[onnxruntime.name][0]
        comparisons = [
            compare(spec.name, got[spec.name], want[spec.name], tolerance) for spec in graph.outputs
        ]
        timestep = float(np.asarray(feed[timestep_name]).reshape(-1)[0]) if timestep_name in feed else 0.0
        cases.append(GraphCase(f"{role} vs onnxruntime", batch, timestep, comparisons))
        return {name: np.asarray(value) for name, value in want.items()}

    for batch in batch_sizes:
        step = random_step_inputs(manifest, manifest.step_inputs, batch, seed)
        caches = run(GraphRole.FULL, step, batch)
        run(GraphRole.REUSE, {**step, **caches}, batch)
        if GraphRole.GATES in engines and GraphRole.REUSE_GATED in engines:
            # One gate row per sample: the gates graph's batch is its rows.
            gates = run(GraphRole.GATES, step, batch)
            run(GraphRole.REUSE_GATED, {**step, **caches, GATES_NAME: gates[GATES_NAME]}, batch)
    return cases
