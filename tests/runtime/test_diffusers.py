"""fora_runtime.diffusers: engines as ``pipe.transformer`` of unmodified diffusers pipelines.

Images from ``pipe(...)`` with the drop-in equal those of the same pipeline running
PyTorch FORA (``fora_export.validate.pipeline_ref``) with the same schedule, within
fp32 precision (1e-4 of pixel values in [0, 1]; measured ~1e-6), with and without
guidance, on a second call and at another step count, on ONNX Runtime and torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DiTPipeline,
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)

from fora_export.validate.pipeline_ref import ForaReference
from fora_runtime import CacheSchedule, InputError
from fora_runtime.diffusers import ForaTransformer, PipelineError, enable_fora
from fora_runtime.manifest import load_manifest
from tests.pipeline_fixtures import MMDIT_SEQUENCE_LENGTH, PIXART_TEXT_LENGTH, WAN_BOUNDARY

PIXEL_TOLERANCE = 1e-4
#: (guidance, steps) of three consecutive calls: guided, the same again, unguided at another count.
CALLS = ((4.0, 4), (4.0, 4), (1.0, 3))
PROMPTS = ["a cat", "a red dog on the moon"]


def call_kwargs(pipe: Any, guidance: float) -> dict[str, Any]:
    """The pipeline's arguments; ``guidance`` > 1 turns classifier-free guidance on (Flux:
    true CFG with negative prompts, two passes per step in cache contexts "cond"/"uncond")."""
    if isinstance(pipe, DiTPipeline):
        return {"class_labels": [1, 2], "guidance_scale": guidance}
    if isinstance(pipe, PixArtAlphaPipeline | PixArtSigmaPipeline):
        return {
            "prompt": PROMPTS,
            "guidance_scale": guidance,
            "use_resolution_binning": False,
            "max_sequence_length": PIXART_TEXT_LENGTH,
            "clean_caption": False,
        }
    kwargs = {"prompt": PROMPTS, "height": 64, "width": 64, "max_sequence_length": MMDIT_SEQUENCE_LENGTH}
    if isinstance(pipe, WanPipeline):  # separate conditional and unconditional passes (cache contexts)
        return {
            **kwargs,
            "negative_prompt": ["a blue sky", "a forest"],
            "num_frames": 5,
            "guidance_scale": guidance,
        }
    if isinstance(pipe, FluxPipeline):  # guidance_scale is the distilled guidance embedding
        if guidance > 1:
            kwargs.update(true_cfg_scale=guidance, negative_prompt=["a blue sky", "a forest"])
        return {**kwargs, "guidance_scale": 3.5}
    return {**kwargs, "guidance_scale": guidance}


def images(pipe: Any, guidance: float, steps: int, **extra: Any) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**call_kwargs(pipe, guidance), **extra}
    generator = torch.Generator().manual_seed(0)
    out = pipe(num_inference_steps=steps, generator=generator, output_type="np", **kwargs)
    return np.asarray(out.frames if isinstance(pipe, WanPipeline) else out.images)


def reference_pipeline(cls: Any, folder: Path, engine: Path) -> tuple[Any, ForaReference]:
    pipe = cls.from_pretrained(folder)
    reference = ForaReference.for_engines(pipe.transformer, load_manifest(engine))
    pipe.transformer = reference
    return pipe, reference


CASES = [
    pytest.param(DiTPipeline, "dit", id="dit"),
    pytest.param(PixArtAlphaPipeline, "pixart", id="pixart-alpha"),
    pytest.param(PixArtSigmaPipeline, "pixart", id="pixart-sigma"),
    pytest.param(StableDiffusion3Pipeline, "sd3", id="sd3"),
    pytest.param(FluxPipeline, "flux", id="flux", marks=pytest.mark.slow),
    pytest.param(WanPipeline, "wan", id="wan", marks=pytest.mark.slow),
]


@pytest.fixture
def pipeline_case(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    family = request.param
    return request.getfixturevalue(f"{family}_pipeline_dir"), request.getfixturevalue(
        f"{family}_pipeline_engine"
    )


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("cls", "pipeline_case"), CASES, indirect=["pipeline_case"])
def test_pipeline_images_equal_pytorch_fora(cls: Any, pipeline_case: tuple[Path, Path], backend: str) -> None:
    folder, engine = pipeline_case
    reference_pipe, reference = reference_pipeline(cls, folder, engine)
    pipe = enable_fora(cls.from_pretrained(folder), engine, backend=backend, trust_programs=True)
    assert isinstance(pipe.transformer, ForaTransformer)
    results = []
    for guidance, steps in CALLS:
        reference.reset(steps)
        expected = images(reference_pipe, guidance, steps)
        results.append(images(pipe, guidance, steps))
        assert results[-1].shape == expected.shape and expected.shape[-3:] == (64, 64, 3)
        assert np.abs(results[-1] - expected).max() <= PIXEL_TOLERANCE, (guidance, steps)
    # The comparison sees caching: the unmodified model's images (no cache) differ by more.
    uncached = images(cls.from_pretrained(folder), *CALLS[0])
    assert np.abs(uncached - results[0]).max() > 10 * PIXEL_TOLERANCE


def test_aborted_run_leaves_no_state(pixart_pipeline_dir: Path, pixart_pipeline_engine: Path) -> None:
    reference_pipe, reference = reference_pipeline(
        PixArtAlphaPipeline, pixart_pipeline_dir, pixart_pipeline_engine
    )
    pipe = enable_fora(PixArtAlphaPipeline.from_pretrained(pixart_pipeline_dir), pixart_pipeline_engine)

    def abort(step: int, timestep: Any, latents: Any) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stops after 3 of 6 steps, caches written
        images(pipe, 4.0, 6, prompt=["a green forest", "a blue sky"], callback=abort)
    reference.reset(6)
    expected = images(reference_pipe, 4.0, 6)
    assert np.abs(images(pipe, 4.0, 6) - expected).max() <= PIXEL_TOLERANCE


def test_transformer_passed_to_from_pretrained(dit_pipeline_dir: Path, dit_pipeline_engine: Path) -> None:
    """No enable_fora: the drop-in finds the pipeline (and its scheduler) on the first call."""
    transformer = ForaTransformer.from_engine(dit_pipeline_engine)
    pipe = DiTPipeline.from_pretrained(dit_pipeline_dir, transformer=transformer)
    reference_pipe, reference = reference_pipeline(DiTPipeline, dit_pipeline_dir, dit_pipeline_engine)
    reference.reset(4)
    assert np.abs(images(pipe, 4.0, 4) - images(reference_pipe, 4.0, 4)).max() <= PIXEL_TOLERANCE


def denoise_loop(
    transformer: Any, scheduler: Any, contexts: dict[str, list[int]], steps: int
) -> dict[str, Any]:
    """A hand-written loop calling the transformer once per context and step, in
    ``cache_context(name)`` blocks (as pipelines with separate CFG passes do)."""
    scheduler.set_timesteps(steps)
    latents = {
        name: torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(len(name))) for name in contexts
    }
    for t in scheduler.timesteps:
        for name, labels in contexts.items():
            with transformer.cache_context(name):
                out = transformer(
                    latents[name], timestep=t.expand(2), class_labels=torch.tensor(labels)
                ).sample
            latents[name] = scheduler.step(out[:, :4], t, latents[name]).prev_sample
    return latents


def test_cache_contexts_keep_separate_caches(dit_pipeline_dir: Path, dit_pipeline_engine: Path) -> None:
    pipe = enable_fora(DiTPipeline.from_pretrained(dit_pipeline_dir), dit_pipeline_engine)
    both = denoise_loop(pipe.transformer, pipe.scheduler, {"cond": [1, 2], "uncond": [1000, 1000]}, 5)
    alone = {
        name: denoise_loop(pipe.transformer, pipe.scheduler, {name: labels}, 5)[name]
        for name, labels in {"cond": [1, 2], "uncond": [1000, 1000]}.items()
    }
    for name in both:
        assert torch.allclose(both[name], alone[name], atol=1e-6), name
    assert not torch.allclose(both["cond"], both["uncond"], atol=1e-2)


def test_conditioning_changed_within_a_generation_is_refused(
    dit_pipeline_dir: Path, dit_pipeline_engine: Path
) -> None:
    """Both passes in one context would mix their caches: refused, not silently wrong."""
    pipe = enable_fora(DiTPipeline.from_pretrained(dit_pipeline_dir), dit_pipeline_engine)
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[0].expand(2)
    latents = torch.zeros(2, 4, 8, 8)
    pipe.transformer(latents, timestep=t, class_labels=torch.tensor([1, 2]))
    with pytest.raises(PipelineError, match="'class_labels' \\| changed at step 1 of 4"):
        pipe.transformer(
            latents, timestep=pipe.scheduler.timesteps[1].expand(2), class_labels=torch.tensor([3, 4])
        )


def test_guidance_doubled_batch_beyond_the_build(dit_pipeline_dir: Path, dit_pipeline_engine: Path) -> None:
    pipe = enable_fora(DiTPipeline.from_pretrained(dit_pipeline_dir), dit_pipeline_engine)
    with pytest.raises(PipelineError, match=r"passed 6 samples .* built for 1\.\.4 .* --batch 1:2:6"):
        images(pipe, 4.0, 3, class_labels=[1, 2, 3])


def test_build_limits_are_pipeline_errors(pixart_pipeline_dir: Path, pixart_pipeline_engine: Path) -> None:
    pipe = enable_fora(PixArtSigmaPipeline.from_pretrained(pixart_pipeline_dir), pixart_pipeline_engine)
    with pytest.raises(
        PipelineError, match=r"20 tokens, the engines were built for 16 .* max_sequence_length=16"
    ):
        images(pipe, 4.0, 3, max_sequence_length=20)
    with pytest.raises(PipelineError, match=r"built for \[4, 4, 8, 8\].*pass height=64, width=64"):
        images(pipe, 4.0, 3, height=128, width=128)


def test_step_count_the_schedule_cannot_plan(dit_pipeline_dir: Path, dit_pipeline_engine: Path) -> None:
    pipe = DiTPipeline.from_pretrained(dit_pipeline_dir)
    enable_fora(pipe, dit_pipeline_engine, schedule=CacheSchedule.explicit([0, 6]))
    with pytest.raises(PipelineError, match="runs 5 steps, which the cache schedule"):
        images(pipe, 1.0, 5)
    assert images(pipe, 1.0, 7).shape == (2, 64, 64, 3)


def test_unsupported_arguments_are_refused(dit_pipeline_engine: Path) -> None:
    transformer = ForaTransformer.from_engine(dit_pipeline_engine)
    with pytest.raises(InputError, match="'cross_attention_kwargs' is not supported"):
        transformer(
            torch.zeros(1, 4, 8, 8),
            timestep=torch.tensor([1]),
            class_labels=torch.tensor([1]),
            cross_attention_kwargs={"scale": 0.5},
        )


def test_config_dtype_and_device_as_pipelines_read_them(dit_pipeline_engine: Path) -> None:
    transformer = ForaTransformer.from_engine(dit_pipeline_engine, dtype=torch.float16)
    assert transformer.config.sample_size == 8 and transformer.config.in_channels == 4
    assert transformer.config.out_channels == 8
    assert transformer.dtype == torch.float16 and transformer.device == torch.device("cpu")
    assert transformer.to(torch.float32).dtype == torch.float32


@pytest.fixture(scope="module")
def fp16_pixart_engine(tmp_path_factory: pytest.TempPathFactory, pixart_pipeline_dir: Path) -> Path:
    from fora_export.builder.config import BuildConfig
    from fora_export.builder.pipeline import build

    out = tmp_path_factory.mktemp("engines") / "pixart-fp16"
    config = BuildConfig.from_options(
        batch="1:2:4", precision="fp16", text_length=PIXART_TEXT_LENGTH, backend="torch", device="cpu"
    )
    build(str(pixart_pipeline_dir), out, config, progress=False)
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_fp16_engine_in_an_fp32_pipeline(
    pixart_pipeline_dir: Path, pixart_pipeline_engine: Path, fp16_pixart_engine: Path, backend: str
) -> None:
    """Cast at the boundary: fp32 prompt embeddings go into the fp16 engine, the fp32 VAE
    decodes what it denoised."""
    pipe = enable_fora(
        PixArtAlphaPipeline.from_pretrained(pixart_pipeline_dir),
        fp16_pixart_engine,
        backend=backend,
        trust_programs=True,
    )
    assert pipe.transformer.dtype == torch.float32  # the VAE's
    reference_pipe, reference = reference_pipeline(
        PixArtAlphaPipeline, pixart_pipeline_dir, pixart_pipeline_engine
    )
    reference.reset(4)
    got, expected = images(pipe, 4.0, 4), images(reference_pipe, 4.0, 4)
    assert np.isfinite(got).all()
    # fp16 activations: the validate trajectory tolerance (2e-2), here on pixels in [0, 1].
    assert np.abs(got - expected).max() <= 2e-2


def test_sd3_prompt_length_counts_the_clip_tokens(sd3_pipeline_dir: Path, sd3_pipeline_engine: Path) -> None:
    """SD3's prompt is 77 CLIP tokens + max_sequence_length T5 tokens: the fix names the latter."""
    pipe = enable_fora(StableDiffusion3Pipeline.from_pretrained(sd3_pipeline_dir), sd3_pipeline_engine)
    with pytest.raises(
        PipelineError, match=r"87 tokens, the engines were built for 85 \| pass max_sequence_length=8"
    ):
        images(pipe, 4.0, 2, max_sequence_length=10)


def test_enable_fora_refuses_engines_of_another_family(
    dit_pipeline_engine: Path, pixart_pipeline_dir: Path
) -> None:
    from fora_runtime import ForaError

    with pytest.raises(ForaError, match="is a PixArtTransformer2DModel, the engines were built from a DiT"):
        enable_fora(PixArtAlphaPipeline.from_pretrained(pixart_pipeline_dir), dit_pipeline_engine)


def test_second_order_scheduler_plans_every_call(dit_pipeline_dir: Path, dit_pipeline_engine: Path) -> None:
    """Heun lists each inner timestep twice (7 calls for 4 steps): one generation step per call."""
    from diffusers import HeunDiscreteScheduler

    def with_heun(pipe: Any) -> Any:
        pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
        return pipe

    reference_pipe, reference = reference_pipeline(DiTPipeline, dit_pipeline_dir, dit_pipeline_engine)
    with_heun(reference_pipe)
    pipe = with_heun(enable_fora(DiTPipeline.from_pretrained(dit_pipeline_dir), dit_pipeline_engine))
    reference.reset(7)
    assert np.abs(images(pipe, 4.0, 4) - images(reference_pipe, 4.0, 4)).max() <= PIXEL_TOLERANCE
    assert pipe.transformer._runs[None].generation.num_steps == 7


def test_restart_with_the_same_timesteps_starts_a_new_generation(
    dit_pipeline_dir: Path, dit_pipeline_engine: Path
) -> None:
    """A loop abandoned after 2 of 4 steps and rerun on the same scheduler timesteps (no new
    set_timesteps): the first timestep again starts a new generation, caches written afresh."""
    pipe = enable_fora(DiTPipeline.from_pretrained(dit_pipeline_dir), dit_pipeline_engine)
    transformer, scheduler = pipe.transformer, pipe.scheduler
    labels = torch.tensor([1, 2])

    def loop(steps: int) -> list[torch.Tensor]:
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        outputs = []
        for t in scheduler.timesteps[:steps]:
            outputs.append(transformer(latents, timestep=t.expand(2), class_labels=labels).sample)
            latents = scheduler.step(outputs[-1][:, :4], t, latents).prev_sample
        return outputs

    scheduler.set_timesteps(4)
    fresh = loop(4)
    loop(2)  # aborted: step 2 of 4 would come next
    again = loop(4)
    assert all(torch.equal(a, b) for a, b in zip(fresh, again, strict=True))


def test_onnxruntime_takes_providers_not_a_device(dit_pipeline_engine: Path) -> None:
    from fora_runtime import ForaError

    with pytest.raises(ForaError, match=r"device \| got 'cuda' for the onnxruntime backend .* providers="):
        ForaTransformer.from_engine(dit_pipeline_engine, device="cuda")


@pytest.mark.slow
def test_wan_experts_each_plan_the_steps_they_serve(
    wan_experts_pipeline_dir: Path, wan_expert_engines: tuple[Path, Path]
) -> None:
    """Wan 2.2 A14B: transformer (t >= 875) and transformer_2 (below) are two engine folders;
    each plans only its steps, its first one full, and matches PyTorch FORA run per expert."""
    high, low = wan_expert_engines
    reference_pipe = WanPipeline.from_pretrained(wan_experts_pipeline_dir)
    references = [
        ForaReference.for_engines(reference_pipe.transformer, load_manifest(high)),
        ForaReference.for_engines(reference_pipe.transformer_2, load_manifest(low)),
    ]
    reference_pipe.transformer, reference_pipe.transformer_2 = references
    pipe = enable_fora(WanPipeline.from_pretrained(wan_experts_pipeline_dir), high, transformer_2=low)
    steps = 6
    reference_pipe.scheduler.set_timesteps(steps)
    served_high = int((reference_pipe.scheduler.timesteps >= WAN_BOUNDARY * 1000).sum())
    assert 0 < served_high < steps  # both experts take part
    references[0].reset(served_high)
    references[1].reset(steps - served_high)
    expected = images(reference_pipe, 4.0, steps)
    got = images(pipe, 4.0, steps)
    assert np.abs(got - expected).max() <= PIXEL_TOLERANCE
    assert pipe.transformer._runs["cond"].generation.num_steps == served_high
    assert pipe.transformer_2._runs["cond"].generation.num_steps == steps - served_high
