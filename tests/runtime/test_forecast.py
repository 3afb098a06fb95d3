"""Forecast reuse (``build --forecast``): the graph's arithmetic for every gate-table family,
the weights from the planned timesteps, two cache generations in the arena, validate's
PyTorch reference, and the one-line refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.gated import ForecastGatedReuse
from fora_export.adapters.registry import adapter_for
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_dit, make_demo_flux, make_demo_sd3, make_demo_wan
from fora_export.split.graphs import split_model
from fora_export.validate.forecast_ref import forecast_caches, forecast_weight
from fora_export.validate.runner import validate
from fora_runtime import ForaSession, InputError, load_manifest
from fora_runtime.generation import forecast_weights
from fora_runtime.schedule import CacheSchedule
from tests.conftest import TRUSTED
from tests.helpers import one_error_line, run_cli
from tests.tiny_models import TINY_DIT, TINY_FLUX_DEV, TINY_PIXART, TINY_SD3, TINY_WAN, save_dit, save_pixart

STEPS = 8
BATCH = 2
TEXT, FRAMES = 6, 3  # text tokens and latent frames of the tiny text and video models
TIMESTEPS = np.linspace(999, 0, STEPS).astype(np.float32)
LABELS = np.array([3, 7], dtype=np.int64)
#: fp32 graphs against PyTorch, as validate allows (dynamo/TorchScript parity ~5e-6).
FP32_ATOL = 1e-4

FAMILIES = [
    pytest.param(make_demo_dit, TINY_DIT, AdapterOptions(), (8, 8), id="dit"),
    pytest.param(make_demo_sd3, TINY_SD3, AdapterOptions(text_length=TEXT), (8, 8), id="sd3"),
    pytest.param(make_demo_flux, TINY_FLUX_DEV, AdapterOptions(text_length=TEXT), (8, 8), id="flux"),
    pytest.param(make_demo_wan, TINY_WAN, AdapterOptions(text_length=TEXT, frames=FRAMES), (4, 4), id="wan"),
]


@pytest.fixture(scope="module")
def forecast_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DiT built with --forecast: ONNX graphs and CPU torch programs (read-only)."""
    model = save_dit(tmp_path_factory.mktemp("models") / "tiny-dit", TINY_DIT)
    out = tmp_path_factory.mktemp("engines") / "tiny-forecast"
    config = BuildConfig.from_options(batch="1:2:4", backend="torch", device="cpu", forecast=True)
    build(str(model), out, config, progress=False)
    return out


@pytest.mark.parametrize(("make", "config", "options", "resolution"), FAMILIES)
def test_forecast_graph_equals_replaying_forecast_caches(make, config, options, resolution) -> None:
    """The gate-folded forecast (one weighted sum over both generations) equals the family's
    own blocks replaying the forecast caches A_k + w (A_k - A_j)."""
    adapter = adapter_for(make(config, seed=2), dataclasses.replace(options, resolution=resolution))
    names = tuple(s.name for s in adapter.step_input_specs("fp32"))
    split = split_model(adapter, names)
    cache_names = adapter.lean_cache_names(split.cache_names)
    graphs = adapter.gate_table_graphs(cache_names)
    assert graphs is not None
    inputs = adapter.random_inputs(BATCH, "fp32", torch.Generator().manual_seed(0))
    high = adapter.timestep_range()[1]
    times = [high * 0.9, high * 0.7, high * 0.6]
    try:
        with torch.no_grad():
            earlier, last = (
                split.run_full({**inputs, "timestep": torch.full((BATCH,), t)})[1] for t in times[:2]
            )
            now = {**inputs, "timestep": torch.full((BATCH,), times[2])}
            weight = forecast_weight(now["timestep"], torch.tensor(times[1]), torch.tensor(times[0]))
            assert weight.tolist() == pytest.approx([0.5, 0.5])
            reference = split.run_reuse(now, {**last, **forecast_caches(last, earlier, weight)})
            gates = graphs.table(*(now[name] for name in graphs.table_inputs))
            module = ForecastGatedReuse(graphs.gated_reuse, len(cache_names))
            forecast = module(
                now["latents"],
                gates,
                weight.float(),
                *(last[n] for n in cache_names),
                *(earlier[n] for n in cache_names),
            )
            plain = module(now["latents"], gates, torch.zeros(BATCH), *(last[n] for n in cache_names),
                           *(earlier[n] for n in cache_names))  # fmt: skip
            plain_reference = split.run_reuse(now, last)
    finally:
        split.remove()
    scale = float(reference.abs().max())
    assert float((forecast - reference).abs().max()) <= 1e-5 * scale
    assert float((plain - plain_reference).abs().max()) <= 1e-5 * scale  # w = 0 is plain reuse
    assert float((forecast - plain).abs().max()) > 1e-3 * scale  # the forecast changes the step


def test_forecast_weights_from_the_planned_timesteps() -> None:
    plan = (True, False, True, False, False, True, False)
    times = np.array([900, 800, 700, 600, 500, 400, 300], dtype=np.float32)
    weights, steps = forecast_weights(plan, times, 2)
    assert steps == {3, 4, 6}  # step 1 has one full step before it: plain reuse
    # w = (t - t_k) / (t_k - t_j): full steps 0 and 2 for steps 3, 4; 2 and 5 for step 6.
    assert weights[:, 0].tolist() == pytest.approx([0, 0, 0, 0.5, 1.0, 0, 1 / 3])
    assert np.array_equal(weights[:, 0], weights[:, 1])
    # Per-sample timesteps; two full steps at one timestep (Heun repeats them): w = 0.
    per_sample = np.stack([times, times.copy()], axis=1)
    per_sample[2, 1] = per_sample[0, 1]
    weights, _ = forecast_weights(plan, per_sample, 2)
    assert weights[3].tolist() == pytest.approx([0.5, 0.0])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_forecast_engine_validates_against_the_pytorch_forecast(forecast_engine: Path, backend: str) -> None:
    report = validate(forecast_engine, backend=backend, steps=12, batch_sizes=[1, 4], access=TRUSTED)
    assert report.passed, report.to_dict()
    forecast_cases = [c for c in report.graph_cases if c.role == "reuse_forecast"]
    assert {c.batch_size for c in forecast_cases} == {1, 4} and len(forecast_cases) == 6
    assert max(c.worst.max_abs for c in report.graph_cases) <= FP32_ATOL
    trajectory = report.trajectory
    assert trajectory is not None and trajectory.forecast and trajectory.gate_table
    assert trajectory.runtime_vs_fora_rel_l2 <= 1e-4


def generate(session: ForaSession, **options: object) -> tuple[list[np.ndarray], list[str]]:
    latents = np.random.default_rng(0).standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    gen = session.start(STEPS, BATCH, timesteps=TIMESTEPS, class_labels=LABELS, **options)  # type: ignore[arg-type]
    outputs = []
    for _ in range(STEPS):
        output = gen.step(latents)
        host = output.detach().float().cpu().numpy() if hasattr(output, "detach") else output
        outputs.append(np.asarray(host, np.float32))
        latents = latents - 0.05 * outputs[-1][:, :4]
    return outputs, gen.history


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_forecast_steps_follow_the_plan_and_static_runs_on_the_same_build(
    forecast_engine: Path, backend: str
) -> None:
    with ForaSession(forecast_engine, backend=backend, trust_programs=True) as session:  # N=3: 0, 3, 6
        forecast, history = generate(session)
        assert history == ["full", "reuse_gated", "reuse_gated", "full"] + ["reuse_forecast"] * 2 + [
            "full",
            "reuse_forecast",
        ]
        static, static_history = generate(session, forecast=False)
        assert "reuse_forecast" not in static_history
    # Plain reuse until two full steps exist, then the forecast changes the prediction.
    for step in range(4):
        assert np.array_equal(forecast[step], static[step])
    assert not np.allclose(forecast[4], static[4])
    with ForaSession(forecast_engine, backend=backend, forecast=False, trust_programs=True) as session:
        assert session.backend.buffers(BATCH).previous_caches is None  # one cache generation
        assert np.array_equal(np.stack(generate(session)[0]), np.stack(static))


@pytest.mark.slow
def test_two_cache_generations_share_one_arena_and_swap_without_copies(forecast_engine: Path) -> None:
    with ForaSession(forecast_engine) as session:
        buffers = session.backend.buffers(BATCH)
        arena = buffers.bound["arena"]
        assert arena.nbytes == 2 * buffers.cache_layout.nbytes
        gen = session.start(3, BATCH, schedule=CacheSchedule.explicit([0, 1]), timesteps=TIMESTEPS[:3],
                            class_labels=LABELS)  # fmt: skip
        latents = np.zeros((BATCH, 4, 8, 8), np.float32)
        gen.step(latents)
        first = {name: view.copy() for name, view in buffers.caches.items()}
        first_views = buffers.caches
        gen.step(latents)
        assert buffers.previous_caches is first_views  # the older generation, not a copy
        for name, view in buffers.caches.items():
            assert np.shares_memory(view, arena) and np.shares_memory(buffers.previous_caches[name], arena)
            assert np.array_equal(buffers.previous_caches[name], first[name])
            assert not np.array_equal(view, first[name])
        gen.step(latents)
        assert gen.history == ["full", "full", "reuse_forecast"]
    code, stdout, _ = run_cli("info", str(forecast_engine))
    assert code == 0 and "two generations for the forecast" in stdout


@pytest.mark.slow
def test_bench_times_the_forecast_reuse_step(forecast_engine: Path, tiny_engine: Path) -> None:
    from fora_export.bench import bench

    report = bench(forecast_engine, steps=6, intervals=(1, 3), repeats=1, step_runs=2)
    assert report.forecast_reuse_ms is not None and report.forecast_reuse_ms > 0
    assert report.gated_reuse_ms is not None  # the plain gated reuse step too
    assert bench(tiny_engine, steps=4, intervals=(1,), repeats=1, step_runs=1).forecast_reuse_ms is None


def test_forecast_build_refuses_the_plain_reuse_graph(tmp_path: Path, tiny_dit_dir: Path) -> None:
    code, _, stderr = run_cli(
        "build", str(tiny_dit_dir), "--out", str(tmp_path / "e"), "--forecast", "--reuse-graph", "plain"
    )
    assert code == 2 and "--reuse-graph plain" in one_error_line(stderr)
    code, _, stderr = run_cli("build", str(tiny_dit_dir), "--out", str(tmp_path / "e"), "--forecast",
                              "--backend", "tensorrt-rtx")  # fmt: skip
    assert code == 2 and "--backend onnx or torch" in one_error_line(stderr)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_forecast_needs_a_gate_table_family(tmp_path: Path) -> None:
    model = save_pixart(tmp_path / "pixart", TINY_PIXART)
    code, _, stderr = run_cli("build", str(model), "--out", str(tmp_path / "e"), "--forecast")
    assert code == 2 and "has no gate table" in one_error_line(stderr)
    assert not (tmp_path / "e").exists()


def test_forecast_asked_of_engines_or_generations_that_cannot(
    tiny_engine: Path, forecast_engine: Path
) -> None:
    with pytest.raises(InputError, match="built without --forecast"):
        ForaSession(tiny_engine, forecast=True)
    with pytest.raises(InputError, match="cannot forecast"):
        ForaSession(forecast_engine, forecast=True, gate_table=False)
    with ForaSession(forecast_engine) as session:
        with pytest.raises(InputError, match="without timesteps"):
            session.start(STEPS, BATCH, forecast=True)
        # Without timesteps the default reuses plainly (no gate table, no weights).
        assert not session.start(STEPS, BATCH).uses_forecast
    assert load_manifest(forecast_engine).has_forecast


@pytest.mark.slow
def test_forecast_engine_in_a_pipeline_equals_the_pytorch_forecast(
    dit_pipeline_dir: Path, tmp_path: Path
) -> None:
    """The drop-in forecasts (its generations plan the scheduler's timesteps), and so does
    ForaReference for forecast engines; a plain FORA reference gives other images."""
    from diffusers import DiTPipeline

    from fora_export.validate.pipeline_ref import ForaReference
    from fora_runtime.diffusers import enable_fora
    from tests.runtime.test_diffusers import PIXEL_TOLERANCE, images

    engine = tmp_path / "engine"
    config = BuildConfig.from_options(batch="1:2:4", forecast=True)
    build(str(dit_pipeline_dir), engine, config, progress=False)
    manifest = load_manifest(engine)
    steps = 7  # N=3: full at 0, 3, 6; steps 4 and 5 forecast
    outputs = {}
    for name, forecast in (("forecast", True), ("plain", False)):
        pipe = DiTPipeline.from_pretrained(dit_pipeline_dir)
        reference = ForaReference.for_engines(pipe.transformer, manifest)
        reference.forecast = forecast
        pipe.transformer = reference
        reference.reset(steps)
        outputs[name] = images(pipe, 4.0, steps)
    engine_images = images(enable_fora(DiTPipeline.from_pretrained(dit_pipeline_dir), engine), 4.0, steps)
    error = np.abs(engine_images - outputs["forecast"]).max()
    assert error <= PIXEL_TOLERANCE
    # The comparison sees the forecast: plain reuse is further from the engine (the tiny
    # random VAE squeezes every image towards grey, so pixel differences are small).
    assert np.abs(engine_images - outputs["plain"]).max() > 10 * error


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)
def test_cuda_graph_forecast_equals_eager(tmp_path: Path) -> None:
    """The CUDA-graph path captures the full program once per cache generation (the second in
    its own pool) and each reuse program per generation: replays equal eager programs."""
    torch.backends.cudnn.allow_tf32 = False  # fp32 parity (see the torch backend's docstring)
    model = save_dit(tmp_path / "model", TINY_DIT)
    engine = tmp_path / "engine"
    config = BuildConfig.from_options(batch="1:2:4", backend="torch", device="cuda", forecast=True)
    build(str(model), engine, config, progress=False)
    results = {}
    for graphs in (False, True):
        with ForaSession(engine, backend="torch", use_cuda_graphs=graphs, trust_programs=True) as session:
            outputs, history = generate(session)
            outputs_again, _ = generate(session)  # a second generation on the same buffers
        assert history.count("reuse_forecast") == 3
        results[graphs] = (np.stack(outputs), np.stack(outputs_again))
    for eager, graphed in zip(results[False], results[True], strict=True):
        np.testing.assert_allclose(graphed, eager, atol=1e-5)
    np.testing.assert_array_equal(results[True][0], results[True][1])
