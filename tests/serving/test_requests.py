"""The served interface without a server: request checks (one-line errors), grouping of
requests into batched generations, and batched results equal per-request ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fora_runtime import CacheSchedule, ForaSession, InputError, load_manifest
from fora_runtime.errors import BackendError
from fora_runtime.serving import (
    BatchedGenerator,
    DDIMSampler,
    GenerationRequest,
    ServingSpec,
    instance_backend_options,
    parse_request,
    plan_groups,
    seeded_latents,
)

LATENT = (4, 8, 8)


def ask(count: int = 1, *, steps: int = 4, labels: list[int] | None = None, **extra: np.ndarray) -> dict:
    labels = labels if labels is not None else list(range(count))
    return {
        "latents": np.random.default_rng(count).standard_normal((count, *LATENT), dtype=np.float32),
        "class_labels": np.array(labels, dtype=np.int64).reshape(-1, 1),
        "num_steps": np.full((count, 1), steps, np.int32),
        **extra,
    }


@pytest.fixture(scope="module")
def spec(tiny_engine: Path) -> ServingSpec:
    return ServingSpec.from_manifest(load_manifest(tiny_engine))


def test_spec_lists_the_served_inputs(spec: ServingSpec) -> None:
    names = [t.name for t in spec.inputs()]
    assert names == ["latents", "seed", "class_labels", "num_steps", "cache_interval", "guidance_scale"]
    assert [t.name for t in spec.inputs() if not t.optional] == ["class_labels", "num_steps"]
    labels = spec.conditioning[0]
    assert (labels.shape, labels.graph_shape) == ((1,), ())  # served [b, 1], the graph takes [b]
    assert spec.outputs()[0].shape == LATENT and spec.max_batch == 4


def test_parse_request_reads_every_setting(spec: ServingSpec) -> None:
    request = parse_request(
        ask(
            2,
            steps=5,
            cache_interval=np.full((2, 1), 2, np.int32),
            guidance_scale=np.full((2, 1), 3.0, np.float32),
        ),
        spec,
    )
    assert request.batch_size == 2 and request.engine_batch == 4
    assert request.num_steps == 5 and request.schedule == CacheSchedule.interval_of(2)
    assert request.guidance_scale == 3.0
    assert request.conditioning["class_labels"].shape == (2,)


def test_seeds_give_the_same_latents_everywhere(spec: ServingSpec) -> None:
    inputs = ask(2)
    del inputs["latents"]
    request = parse_request({**inputs, "seed": np.array([[3], [4]], np.int64)}, spec)
    np.testing.assert_array_equal(request.latents, seeded_latents(np.array([3, 4]), LATENT))
    np.testing.assert_array_equal(
        request.latents[0], np.random.default_rng(3).standard_normal(LATENT, dtype=np.float32)
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latents": np.zeros((1, 4, 8, 7), np.float32)}, r"expected float32 \[1, 4, 8, 8\]"),
        ({"latents": np.full((1, *LATENT), np.nan, np.float32)}, "NaN or Inf"),
        ({"seed": np.array([[1]], np.int64)}, "exactly one of 'latents' and 'seed'"),
        ({"class_labels": np.array([[11]], np.int64)}, r"values 11..11 outside \[0, 10\]"),
        ({"class_labels": np.array([[1.0]], np.float32)}, "expected int64"),
        ({"num_steps": np.array([[0]], np.int32)}, r"Input 'num_steps' \| got 0 \| expected 1..1000"),
        ({"cache_interval": np.array([[0]], np.int32)}, "expected >= 1"),
        ({"guidance_scale": np.array([[0.5]], np.float32)}, "expected a number >= 1"),
        ({"num_steps": np.array([[4, 4]], np.int32)}, r"\[batch, 1\]"),
        ({"num_steps": np.full((2, 1), 4, np.int32)}, "same leading batch axis"),
        ({"prompt": np.zeros((1, 1), np.float32)}, "not inputs of this model"),
    ],
)
def test_bad_requests_are_one_line_input_errors(spec: ServingSpec, change: dict, message: str) -> None:
    with pytest.raises(InputError, match=message) as raised:
        parse_request({**ask(1), **change}, spec)
    assert "\n" not in str(raised.value) and str(raised.value).count("|") >= 2


def test_request_limits(spec: ServingSpec) -> None:
    with pytest.raises(InputError, match="at most 4 samples"):
        parse_request(ask(5), spec)
    guided = ask(3, guidance_scale=np.full((3, 1), 2.0, np.float32))
    with pytest.raises(InputError, match="with guidance"):  # 6 engine rows > 4
        parse_request(guided, spec)
    with pytest.raises(InputError, match="differs between the samples"):
        parse_request(ask(2) | {"num_steps": np.array([[4], [5]], np.int32)}, spec)
    missing = ask(1)
    del missing["class_labels"]
    with pytest.raises(InputError, match=r"Input 'class_labels' \| missing"):
        parse_request(missing, spec)


def test_max_batch_is_checked(tiny_engine: Path) -> None:
    with pytest.raises(InputError, match=r"expected 1\.\.4"):
        ServingSpec.from_manifest(load_manifest(tiny_engine), max_batch=5)


def fake(batch: int, steps: int = 4, interval: int = 3, guidance: float = 1.0) -> GenerationRequest:
    latents = np.zeros((batch, *LATENT), np.float32)
    schedule = CacheSchedule.interval_of(interval)
    return GenerationRequest(latents, {"class_labels": np.zeros(batch, np.int64)}, steps, schedule, guidance)


def test_plan_groups_by_key_in_arrival_order_within_the_batch_limit() -> None:
    requests = [fake(1), fake(2), fake(1, steps=5), None, fake(2), fake(1, interval=2), fake(1, guidance=2.0)]
    # Same key: 0, 1 (3 rows), 4 does not fit (5 rows) and opens a new group.
    assert plan_groups(requests, 4) == [[0, 1], [2], [4], [5], [6]]
    assert plan_groups([fake(1)] * 6, 4) == [[0, 1, 2, 3], [4, 5]]
    assert plan_groups([fake(1, guidance=3.0)] * 3, 4) == [[0, 1], [2]]  # guided: 2 rows each


def test_batched_generation_equals_one_generation_per_request(tiny_engine: Path, spec: ServingSpec) -> None:
    asks = [ask(1, labels=[3]), ask(2, labels=[1, 9]), ask(1, labels=[5], steps=6)]
    asks[0]["latents"] = seeded_latents(np.array([7]), LATENT)
    requests = [parse_request(a, spec) for a in asks]
    with ForaSession(tiny_engine) as session:
        generator = BatchedGenerator(session, spec, DDIMSampler)
        together = generator.run([*requests, None])
        alone = [generator.generate([r])[0] for r in requests]
    assert together[3] is None
    for index, (mine, solo) in enumerate(zip(together[:3], alone, strict=True)):
        assert isinstance(mine, np.ndarray) and mine.shape == requests[index].latents.shape
        # Batch 3 vs batch 1 or 2: the same arithmetic in GEMMs of other shapes.
        np.testing.assert_allclose(mine, solo, atol=1e-5, rtol=0)
    assert np.abs(together[0] - together[1][:1]).max() > 1e-2  # different inputs, different results


def test_guided_generation_follows_classifier_free_guidance(tiny_engine: Path, spec: ServingSpec) -> None:
    request = parse_request(ask(1, labels=[2], guidance_scale=np.full((1, 1), 4.0, np.float32)), spec)
    with ForaSession(tiny_engine) as session:
        served = BatchedGenerator(session, spec, DDIMSampler).generate([request])[0]
        # By hand: conditional and null-class halves in one batch of 2, eps = u + s (c - u).
        sampler = DDIMSampler()
        timesteps = sampler.timesteps(4)
        labels = np.array([2, 10])
        generation = session.start(4, 2, timesteps=timesteps, class_labels=labels)
        x = request.latents
        for t in timesteps:
            eps = generation.step(np.concatenate([x, x]))[:, :4]
            x = sampler.step(eps[1:] + np.float32(4.0) * (eps[:1] - eps[1:]), t, x)
    np.testing.assert_array_equal(served, x)


def test_a_failing_group_answers_its_own_requests_only(tiny_engine: Path, spec: ServingSpec) -> None:
    class Broken(DDIMSampler):
        def timesteps(self, num_steps: int) -> np.ndarray:
            if num_steps == 5:
                raise RuntimeError("broken sampler")
            return super().timesteps(num_steps)

    requests = [parse_request(ask(1, steps=5), spec), parse_request(ask(1, steps=4), spec)]
    with ForaSession(tiny_engine) as session:
        results = BatchedGenerator(session, spec, Broken).run(requests)
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], np.ndarray)


def test_instance_backend_options() -> None:
    assert instance_backend_options("onnxruntime", "cpu", 0, threads=2) == {
        "providers": ["CPUExecutionProvider"],
        "intra_op_threads": 2,
    }
    assert instance_backend_options("torch", "gpu", 3) == {"device": "cuda:3"}
    assert instance_backend_options("tensorrt", "gpu", 1) == {"device": 1}
    with pytest.raises(BackendError, match="needs a GPU instance"):
        instance_backend_options("tensorrt", "cpu", 0)
