"""A real tritonserver (the nvidia-pytriton wheel's) on 127.0.0.1, started once for this
module on a repository written by ``fora-export triton``: HTTP and gRPC requests answer
exactly what an in-process ForaSession generation computes from the same inputs;
concurrent clients get their own results while dynamic batching runs them together; a
malformed request gets an error and the server keeps serving; RSS stays bounded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fora_runtime import CacheSchedule, ForaSession
from fora_runtime.serving import DDIMSampler, seeded_latents
from tests.family_engines import family_engine
from tests.helpers import run_cli
from tests.tiny_models import TINY_PIXART

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from fora_export.serving.triton_server import TritonServer  # noqa: E402

DTYPES = {"float32": "FP32", "int64": "INT64", "int32": "INT32"}
STEPS = 6
LATENT = (4, 8, 8)  # TINY_DIT and TINY_PIXART: 4 channels, 8x8
#: Long enough that requests sent together land in one execute(); a lone request waits this.
QUEUE_DELAY_US = 50_000


def write_model(engine: Path, repository: Path, *args: str) -> None:
    run_cli("triton", str(engine), "--out", str(repository), *args, expect=0)


@pytest.fixture(scope="module")
def dpm_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import DPMSolverMultistepScheduler

    folder = tmp_path_factory.mktemp("pipeline")
    DPMSolverMultistepScheduler(beta_schedule="linear").save_config(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def pixart_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY_PIXART, 6 caption tokens, batch 1:2:4 (tests/validate/test_pixart.py's)."""
    return family_engine(tmp_path_factory, "pixart")


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory: pytest.TempPathFactory, tiny_engine: Path, pixart_engine: Path, dpm_pipeline: Path
) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "models"
    write_model(tiny_engine, repo, "--name", "dit", "--max-queue-delay-us", str(QUEUE_DELAY_US))
    write_model(pixart_engine, repo, "--name", "pixart")
    write_model(tiny_engine, repo, "--name", "dit_dpm", "--pipeline", str(dpm_pipeline))
    return repo


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    # A missing nvidia-pytriton wheel is a ConfigError here, not a skip: it is a dev dependency.
    with TritonServer(repository, tmp_path_factory.mktemp("server")) as running:
        yield running


def tensors(module: Any, **arrays: np.ndarray) -> list[Any]:
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), DTYPES[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def column(value: float | int, count: int, dtype: Any) -> np.ndarray:
    return np.full((count, 1), value, dtype=dtype)


def dit_request(latents: np.ndarray, labels: list[int], steps: int = STEPS, **extra: np.ndarray) -> dict:
    count = len(labels)
    return {
        "latents": latents,
        "class_labels": np.array(labels, dtype=np.int64).reshape(count, 1),
        "num_steps": column(steps, count, np.int32),
        **extra,
    }


def reference(
    engine: Path,
    latents: np.ndarray,
    conditioning: dict[str, np.ndarray],
    steps: int = STEPS,
    *,
    interval: int | None = None,
    guidance: float = 1.0,
    sampler: Any = None,
) -> np.ndarray:
    """The generation in-process: ForaSession (ONNX Runtime CPU) and the same scheduler."""
    sampler = sampler or DDIMSampler(json.loads((engine.parent / "scheduler_config.json").read_text()))
    timesteps = sampler.timesteps(steps)
    count = latents.shape[0]
    guided = guidance != 1.0
    with ForaSession(engine) as session:
        if guided:
            null = session.manifest.conditioning.null_class
            conditioning = {
                "class_labels": np.concatenate([conditioning["class_labels"], np.full(count, null)])
            }
        schedule = CacheSchedule.interval_of(interval) if interval else None
        generation = session.start(
            steps, count * (2 if guided else 1), schedule=schedule, timesteps=timesteps, **conditioning
        )
        x = sampler.initial(latents)
        for t in timesteps:
            model_input = sampler.model_input(x, t)
            noise = generation.step(np.concatenate([model_input] * 2) if guided else model_input)[:, :4]
            if guided:
                cond, uncond = noise[:count], noise[count:]
                noise = uncond + np.float32(guidance) * (cond - uncond)
            x = sampler.step(noise, t, x)
    return x


def served_engine(repository: Path, name: str) -> Path:
    return repository / name / "1" / "engine"


def latents_for(seed: int, count: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *LATENT), dtype=np.float32)


def test_http_request_equals_in_process_generation(server: TritonServer, repository: Path) -> None:
    latents = latents_for(0, 2)
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer("dit", tensors(httpclient, **dit_request(latents, [3, 7])))
    served = result.as_numpy("final_latents")
    client.close()
    expected = reference(served_engine(repository, "dit"), latents, {"class_labels": np.array([3, 7])})
    assert served.dtype == np.float32 and served.shape == (2, *LATENT)
    np.testing.assert_array_equal(served, expected)


def test_grpc_request_with_seed_guidance_and_interval(server: TritonServer, repository: Path) -> None:
    request = {
        "seed": np.array([[11]], dtype=np.int64),
        "class_labels": np.array([[5]], dtype=np.int64),
        "num_steps": column(STEPS, 1, np.int32),
        "guidance_scale": column(4.0, 1, np.float32),
        "cache_interval": column(2, 1, np.int32),
    }
    client = grpcclient.InferenceServerClient(server.grpc_url)
    served = client.infer("dit", tensors(grpcclient, **request)).as_numpy("final_latents")
    client.close()
    expected = reference(
        served_engine(repository, "dit"),
        seeded_latents(np.array([11]), LATENT),
        {"class_labels": np.array([5])},
        interval=2,
        guidance=4.0,
    )
    np.testing.assert_array_equal(served, expected)
    # Guidance and interval changed the result: the inputs really reached the loop.
    plain = reference(
        served_engine(repository, "dit"),
        seeded_latents(np.array([11]), LATENT),
        {"class_labels": np.array([5])},
    )
    assert np.abs(served - plain).max() > 1e-3


def test_pixart_request_equals_in_process_generation(server: TritonServer, repository: Path) -> None:
    rng = np.random.default_rng(5)
    captions = rng.standard_normal((1, 6, TINY_PIXART["caption_channels"]), dtype=np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0]], dtype=np.int64)
    latents = latents_for(6)
    request = {
        "latents": latents,
        "encoder_hidden_states": captions,
        "encoder_attention_mask": mask,
        "num_steps": column(STEPS, 1, np.int32),
    }
    client = httpclient.InferenceServerClient(server.http_url)
    served = client.infer("pixart", tensors(httpclient, **request)).as_numpy("final_latents")
    client.close()
    conditioning = {"encoder_hidden_states": captions, "encoder_attention_mask": mask}
    np.testing.assert_array_equal(
        served, reference(served_engine(repository, "pixart"), latents, conditioning)
    )


class DiffusersLoop:
    """diffusers' own sampling arithmetic (initial sigma, input scaling, step) in torch."""

    def __init__(self, config: dict) -> None:
        import diffusers

        self.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)

    def timesteps(self, steps: int) -> np.ndarray:
        self.scheduler.set_timesteps(steps)
        return self.scheduler.timesteps.numpy()

    def initial(self, latents: np.ndarray) -> np.ndarray:
        return latents * np.float32(self.scheduler.init_noise_sigma)

    def model_input(self, latents: np.ndarray, t: Any) -> np.ndarray:
        import torch

        return self.scheduler.scale_model_input(torch.from_numpy(latents), t).numpy()

    def step(self, noise: np.ndarray, t: Any, latents: np.ndarray) -> np.ndarray:
        import torch

        return self.scheduler.step(torch.from_numpy(noise), t, torch.from_numpy(latents)).prev_sample.numpy()


def test_pipeline_scheduler_drives_the_loop(server: TritonServer, repository: Path) -> None:
    latents = latents_for(8)
    client = httpclient.InferenceServerClient(server.http_url)
    served = client.infer("dit_dpm", tensors(httpclient, **dit_request(latents, [4]))).as_numpy(
        "final_latents"
    )
    client.close()
    config = json.loads((repository / "dit_dpm" / "1" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DPMSolverMultistepScheduler"
    expected = reference(
        served_engine(repository, "dit_dpm"),
        latents,
        {"class_labels": np.array([4])},
        sampler=DiffusersLoop(config),
    )
    np.testing.assert_array_equal(served, expected)


def test_concurrent_clients_get_their_own_results(server: TritonServer, repository: Path) -> None:
    engine = served_engine(repository, "dit")
    clients = 8
    cases = [(latents_for(100 + i), [i % 10]) for i in range(clients)]
    expected = [reference(engine, latents, {"class_labels": np.array(labels)}) for latents, labels in cases]
    stats_before = _stats(server, "dit")
    barrier = threading.Barrier(clients + 1)

    def send(index: int) -> np.ndarray | Exception:
        client = httpclient.InferenceServerClient(server.http_url)
        barrier.wait()
        try:
            if index == clients:  # malformed, yet past Triton's own checks: the model refuses it
                bad = dit_request(latents_for(0), [42])
                return client.infer("dit", tensors(httpclient, **bad))
            latents, labels = cases[index]
            return client.infer("dit", tensors(httpclient, **dit_request(latents, labels))).as_numpy(
                "final_latents"
            )
        except InferenceServerException as err:
            return err
        finally:
            client.close()

    with ThreadPoolExecutor(clients + 1) as pool:
        futures = [pool.submit(send, i) for i in range(clients + 1)]
        outputs = [f.result() for f in futures]
    *results, malformed = outputs
    assert isinstance(malformed, InferenceServerException)
    assert "Input 'class_labels' | values 42..42 outside [0, 10]" in str(malformed)
    for index, result in enumerate(results):
        assert isinstance(result, np.ndarray), result
        # Batched rows vs a batch-1 generation: the same arithmetic, GEMMs of other shapes.
        np.testing.assert_allclose(result, expected[index], atol=1e-5, rtol=0)
        others = [np.abs(result - e).max() for j, e in enumerate(expected) if j != index]
        assert min(others) > 1e-2  # never another request's result
    stats_after = _stats(server, "dit")
    requests = stats_after["inference_count"] - stats_before["inference_count"]
    executions = stats_after["execution_count"] - stats_before["execution_count"]
    print(stats_before, stats_after)
    assert requests == clients + 1  # the malformed one reached the model and was answered there
    assert executions < requests  # dynamic batching delivered several requests per execute()


def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(server: TritonServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    latents = latents_for(1)
    bad = {
        "class label out of range": (dit_request(latents, [99]), "values 99..99 outside [0, 10]"),
        "zero steps": (dit_request(latents, [1], steps=0), "Input 'num_steps' | got 0"),
        "latents and seed": (
            dit_request(latents, [1], seed=np.array([[1]], np.int64)),
            "needs exactly one of 'latents' and 'seed'",
        ),
        "two step counts in one request": (
            {**dit_request(latents_for(1, 2), [1, 2]), "num_steps": np.array([[3], [4]], np.int32)},
            "Input 'num_steps' | differs between the samples of one request",
        ),
    }
    for case, (request, message) in bad.items():
        with pytest.raises(InferenceServerException) as raised:
            client.infer("dit", tensors(httpclient, **request))
        text = str(raised.value)
        assert message in text, (case, text)
        assert "Traceback" not in text and "\n" not in text.strip(), case
    # Triton itself refuses what config.pbtxt rules out (datatypes, shapes, batch axes).
    refused_by_triton = {
        "expects .INT64.": {**dit_request(latents, [1]), "class_labels": np.array([[1.0]], np.float32)},
        "unexpected shape": dit_request(np.zeros((1, 4, 8, 7), np.float32), [1]),
        "batch size does not match": {**dit_request(latents, [1]), "num_steps": column(3, 2, np.int32)},
    }
    for message, request in refused_by_triton.items():
        with pytest.raises(InferenceServerException, match=message):
            client.infer("dit", tensors(httpclient, **request))
    good = client.infer("dit", tensors(httpclient, **dit_request(latents, [1]))).as_numpy("final_latents")
    client.close()
    assert good.shape == (1, *LATENT) and np.isfinite(good).all()


def test_rss_stays_bounded_over_200_requests(server: TritonServer) -> None:
    total, clients = 200, 4

    def run(count: int, offset: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        for i in range(count):
            request = dit_request(latents_for(offset + i), [(offset + i) % 10], steps=3)
            client.infer("dit", tensors(httpclient, **request))
        client.close()

    def burst(count: int) -> None:
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(run, count // clients, k * 1000) for k in range(clients)]:
                future.result()

    burst(40)  # warm-up: arenas for every batch size, allocator pools
    warm = server.rss_bytes()
    burst(total)
    after = server.rss_bytes()
    growth_mib = (after - warm) / 2**20
    print(f"RSS server + stubs: warm {warm / 2**20:.1f} MiB, after {total} requests {after / 2**20:.1f} MiB")
    assert growth_mib < 16, f"RSS grew {growth_mib:.1f} MiB over {total} requests"


def _stats(server: TritonServer, model: str) -> dict[str, int]:
    client = httpclient.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics(model)["model_stats"][0]
    client.close()
    return {
        "inference_count": int(stats["inference_count"]),
        "execution_count": int(stats["execution_count"]),
    }
