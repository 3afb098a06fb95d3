"""Wan 2.1 / 2.2 video end to end: tiny seeded T2V and I2V models saved with
save_pretrained, validated on ONNX Runtime and the torch backend; a two-expert
pipeline (Wan 2.2 A14B's layout) whose generation restarts FORA at the switch,
against a PyTorch reference that does the same; the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.registry import adapter_for
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_wan
from fora_export.errors import BuildError, ConfigError
from fora_export.loading import load_model
from fora_export.split.graphs import split_model
from fora_export.validate.runner import make_scheduler, validate
from fora_runtime import ForaSession, InputError, load_manifest
from fora_runtime.experts import start_across_experts
from tests.conftest import TRUSTED
from tests.family_engines import family_engine
from tests.tiny_models import TINY_WAN, TINY_WAN_I2V

pytestmark = pytest.mark.slow

FRAMES, TEXT = 3, 6
BOUNDARY = 0.875


@pytest.fixture(scope="module")
def wan_t2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY_WAN at FRAMES latent frames of 4x4, TEXT tokens, batch 1:2:3, ONNX + torch."""
    return family_engine(tmp_path_factory, "wan")


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A Wan 2.2-style pipeline folder (two I2V transformers, boundary_ratio) and one engine
    folder per expert."""
    root = tmp_path_factory.mktemp("wan-experts")
    pipe = root / "pipe"
    for seed, name in ((2, "transformer"), (3, "transformer_2")):
        make_demo_wan(TINY_WAN_I2V, seed=seed).save_pretrained(pipe / name)
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "boundary_ratio": BOUNDARY,
    }
    (pipe / "model_index.json").write_text(json.dumps(index))
    engines = []
    for subfolder in ("transformer", "transformer_2"):
        config = BuildConfig.from_options(batch="1:2", resolution="4x4", frames=FRAMES, subfolder=subfolder)
        engines.append(build(str(pipe), root / subfolder, config, progress=False).folder)
    return pipe, engines[0], engines[1]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_wan_t2v_validates(wan_t2v: Path, backend: str) -> None:
    report = validate(wan_t2v, backend=backend, steps=8, access=TRUSTED)
    assert report.passed, report.to_dict()
    assert max(c.worst.max_abs for c in report.graph_cases) <= 1e-4
    assert report.trajectory.runtime_vs_fora_rel_l2 <= 1e-4 and report.trajectory.gate_table
    manifest = load_manifest(wan_t2v)
    assert manifest.latents_input.shape == ("batch", 4, FRAMES, 4, 4)
    assert manifest.denoising.latent_layout == "BCFHW"
    assert {c.kind for c in manifest.caches} == {"attn1", "attn2", "ffn"}


def test_each_expert_validates_over_its_own_timesteps(two_experts: tuple[Path, Path, Path]) -> None:
    _, high, low = two_experts
    assert load_manifest(high).denoising.timestep_range == (875.0, 1000.0)
    assert load_manifest(low).denoising.timestep_range == (0.0, 875.0)
    for folder in (high, low):
        report = validate(folder, steps=10, batch_sizes=[1, 2])  # I2V: image embeddings as inputs
        assert report.passed, report.to_dict()
        assert 0 < report.trajectory.steps < 10  # its part of the schedule only


def test_two_expert_generation_restarts_fora_at_the_switch(two_experts: tuple[Path, Path, Path]) -> None:
    pipe, high, low = two_experts
    steps, interval = 12, 3
    denoising = load_manifest(high).denoising
    scheduler = make_scheduler("flow-euler", steps, denoising)
    timesteps = scheduler.timesteps.numpy()
    generator = torch.Generator().manual_seed(0)
    latents0 = torch.randn(2, 4, FRAMES, 4, 4, generator=generator)
    text = torch.randn(2, 512, 12, generator=generator)
    image = torch.randn(2, 257, 10, generator=generator)

    # PyTorch reference: FORA restarted per expert (first step of each full, own step count).
    experts = []
    for name in ("transformer", "transformer_2"):
        options = AdapterOptions(frames=FRAMES, resolution=(4, 4))
        adapter = adapter_for(load_model(str(pipe), subfolder=name).model, options)
        names = tuple(s.name for s in adapter.step_input_specs("fp32"))
        experts.append(split_model(adapter, names))
    owner = [0 if t >= BOUNDARY * 1000 else 1 for t in timesteps]
    counts = [owner.count(0), owner.count(1)]
    plans = [
        [k % interval == 0 for k in range(counts[0])],
        [k % interval == 0 for k in range(counts[1])],
    ]
    latents, caches, seen = latents0.clone(), {}, [0, 0]
    with torch.no_grad():
        for t, expert in zip(scheduler.timesteps, owner, strict=True):
            inputs = {
                "latents": latents,
                "timestep": torch.full((2,), float(t)),
                "encoder_hidden_states": text,
                "encoder_hidden_states_image": image,
            }
            split = experts[expert]
            if plans[expert][seen[expert]]:
                velocity, caches = split.run_full(inputs)
            else:
                velocity = split.run_reuse(inputs, caches)
            seen[expert] += 1
            latents = scheduler.step(velocity, t, latents).prev_sample
    reference = latents
    for split in experts:
        split.remove()

    scheduler = make_scheduler("flow-euler", steps, denoising)
    with ForaSession(high) as high_session, ForaSession(low) as low_session:
        from fora_runtime.schedule import CacheSchedule

        gen = start_across_experts(
            [low_session, high_session],
            2,
            timesteps,
            schedule=CacheSchedule.interval_of(interval),
            encoder_hidden_states=text.numpy(),
            encoder_hidden_states_image=image.numpy(),
        )
        assert gen.steps_per_expert == tuple(counts) and counts[0] > 0 and counts[1] > 0
        assert gen.plan == tuple(plans[0] + plans[1])  # each expert starts with a full step
        latents = latents0.clone()
        for t in scheduler.timesteps:
            velocity = torch.from_numpy(gen.step(latents.numpy()))
            latents = scheduler.step(velocity, t, latents).prev_sample
    error = float((latents - reference).norm() / reference.norm())
    assert error <= 1e-4


def test_wan_bad_input_gets_one_line_errors(two_experts: tuple[Path, Path, Path], wan_t2v: Path) -> None:
    _, high, _ = two_experts
    manifest = load_manifest(high)
    inputs = {s.name: np.zeros(s.concrete_shape(1), np.float32) for s in manifest.step_inputs}
    with ForaSession(high) as session:
        gen = session.start(4, 1)
        latents = inputs.pop("latents")
        inputs.pop("timestep")
        with pytest.raises(InputError, match=r"Input 'timestep' \| values 500..500 outside \[875, 1000\]"):
            gen.step(latents, 500.0, **inputs)
        with pytest.raises(InputError, match=r"Input 'latents' \| got shape \[1, 4, 5, 4, 4\]"):
            gen.step(np.zeros((1, 4, 5, 4, 4), np.float32), 900.0, **inputs)
    t2v = load_manifest(wan_t2v)
    inputs = {s.name: np.zeros(s.concrete_shape(1), np.float32) for s in t2v.step_inputs}
    with ForaSession(wan_t2v) as session:
        gen = session.start(2, 1)
        latents = inputs.pop("latents")
        inputs.pop("timestep")
        image = np.zeros((1, 257, 10), np.float32)
        with pytest.raises(InputError, match=r"Inputs \['encoder_hidden_states_image'\] \| not inputs"):
            gen.step(latents, 900.0, **inputs, encoder_hidden_states_image=image)


def test_expand_timesteps_pipelines_are_refused(tmp_path: Path) -> None:
    pipe = tmp_path / "ti2v"
    make_demo_wan(TINY_WAN, seed=1).save_pretrained(pipe / "transformer")
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
    (pipe / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(ConfigError, match=r"expand_timesteps .* is not supported"):
        load_model(str(pipe))


def test_max_cache_gib_refuses_and_lists_the_subsets_that_fit(tmp_path: Path) -> None:
    make_demo_wan(TINY_WAN, seed=1).save_pretrained(tmp_path / "model")
    # 2 blocks x 3 caches x (3 x 2 x 2 = 12 tokens) x 16 floats: 4.5 KiB per sample; batch 4: 18 KiB.
    limit = 14 / 2**20  # GiB: room for two of the three kinds at batch 4
    config = BuildConfig.from_options(
        batch="1:2:4", resolution="4x4", frames=FRAMES, text_length=TEXT, max_cache_gib=limit
    )
    message = r"caches need 18.00 KiB at batch 4 \(4.50 KiB per sample\) \| pass --cache with one of: "
    with pytest.raises(BuildError, match=message + "attn1,attn2; attn1,ffn; attn2,ffn "):
        build(str(tmp_path / "model"), tmp_path / "engine", config, progress=False)
    assert not (tmp_path / "engine").exists()


def test_build_past_the_models_rotary_tables_is_a_one_line_error(tmp_path: Path) -> None:
    """A Wan config whose rope_max_seq_len is shorter than the build's token grid: refused
    before anything is exported (was a RuntimeError from the rotary table in the export)."""
    make_demo_wan({**TINY_WAN, "rope_max_seq_len": 2}, seed=1).save_pretrained(tmp_path / "model")
    config = BuildConfig.from_options(resolution="8x8", frames=FRAMES, text_length=TEXT)
    with pytest.raises(
        ConfigError, match=r"rope_max_seq_len 2\) cover at most 2 patches per axis: at most 2 frames"
    ):
        build(str(tmp_path / "model"), tmp_path / "engine", config, progress=False)
    assert not (tmp_path / "engine").exists()
