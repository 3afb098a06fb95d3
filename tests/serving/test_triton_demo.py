"""The built-in ``demo-dit`` served end to end: ``fora-export build demo-dit``, ``fora-export
triton``, a real tritonserver on 127.0.0.1, HTTP and gRPC requests whose final latents equal
an in-process ForaSession generation (ONNX Runtime CPU) exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fora_runtime import ForaSession
from fora_runtime.serving import DDIMSampler
from tests.helpers import run_cli

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")

from fora_export.serving.triton_server import TritonServer  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def demo_repository(tmp_path_factory: pytest.TempPathFactory, demo_dit_engine: Path) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "models"
    run_cli("triton", str(demo_dit_engine), "--out", str(repo), "--name", "demo_dit", expect=0)
    return repo


@pytest.fixture(scope="module")
def demo_server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(demo_repository, tmp_path_factory.mktemp("server")) as server:
        yield server


TYPES = {"float32": "FP32", "int64": "INT64", "int32": "INT32"}


def request(module: Any, latents: np.ndarray, labels: np.ndarray) -> list:
    arrays = {
        "latents": latents,
        "class_labels": labels.reshape(-1, 1),
        "num_steps": np.full((len(labels), 1), STEPS, np.int32),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), TYPES[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def in_process(engine: Path, latents: np.ndarray, labels: np.ndarray) -> np.ndarray:
    sampler = DDIMSampler({"clip_sample": False})  # the repository's default scheduler config
    timesteps = sampler.timesteps(STEPS)
    with ForaSession(engine) as session:
        generation = session.start(STEPS, len(labels), timesteps=timesteps, class_labels=labels)
        for t in timesteps:
            latents = sampler.step(generation.step(latents)[:, :4], t, latents)
    return latents


def test_demo_dit_over_http_and_grpc_equals_in_process(
    demo_server: TritonServer, demo_repository: Path
) -> None:
    latents = np.random.default_rng(0).standard_normal((2, 4, 32, 32), dtype=np.float32)
    labels = np.array([207, 360], dtype=np.int64)
    http = httpclient.InferenceServerClient(demo_server.http_url)
    over_http = http.infer("demo_dit", request(httpclient, latents, labels)).as_numpy("final_latents")
    http.close()
    grpc = grpcclient.InferenceServerClient(demo_server.grpc_url)
    over_grpc = grpc.infer("demo_dit", request(grpcclient, latents[:1], labels[:1])).as_numpy("final_latents")
    grpc.close()
    engine = demo_repository / "demo_dit" / "1" / "engine"
    np.testing.assert_array_equal(over_http, in_process(engine, latents, labels))
    np.testing.assert_array_equal(over_grpc, in_process(engine, latents[:1], labels[:1]))
