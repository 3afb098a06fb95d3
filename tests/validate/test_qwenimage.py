"""Qwen-Image end to end: tiny seeded models saved with save_pretrained, built through the
real pipeline, validated on ONNX Runtime and the torch backend; the lean reuse graph's
exactness, image-stream-only caches, the real-arithmetic rotary attention against
diffusers', prompt padding, and the one-line refusals of what the graphs do not take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fora_export.adapters.base import AdapterOptions
from fora_export.adapters.qwenimage import QwenImageAdapter
from fora_export.adapters.registry import adapter_for
from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build
from fora_export.demo import make_demo_qwenimage
from fora_export.errors import ConfigError
from fora_export.split.graphs import split_model
from fora_export.validate.runner import validate
from fora_runtime import ForaSession, InputError, load_manifest
from tests.conftest import TRUSTED
from tests.family_engines import family_engine
from tests.tiny_models import OTHER_QWENIMAGE, TINY_FAMILIES, TINY_QWENIMAGE

TEXT = 6
#: The engine's text length: the tiny pipeline's prompts are 14 to 21 tokens.
ENGINE_TEXT = 24
FP32_GRAPH_ATOL = 1e-4  # fp32 graphs vs PyTorch (validate's own tolerance)
SIZES = AdapterOptions(text_length=TEXT, resolution=(8, 8))


@pytest.fixture(scope="session")
def qwen_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen-Image with ONNX graphs and CPU torch programs (the conformance suite's
    default build: shared, read-only)."""
    assert TINY_FAMILIES["qwenimage"].build["text_length"] == ENGINE_TEXT
    return family_engine(tmp_path_factory, "qwenimage")


def _assert_fp32_parity(report) -> None:
    assert report.passed, report.to_dict()
    assert max(c.worst.max_abs for c in report.graph_cases) <= FP32_GRAPH_ATOL
    assert report.trajectory.scheduler == "flow-euler"
    assert report.trajectory.runtime_vs_fora_rel_l2 <= 1e-4
    assert report.trajectory.gate_table


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_qwenimage_engine_validates(qwen_engine: Path, backend: str) -> None:
    report = validate(qwen_engine, backend=backend, steps=8, access=TRUSTED)
    _assert_fp32_parity(report)
    assert {c.role for c in report.graph_cases} == {"full", "reuse", "reuse_gated"}
    assert {c.batch_size for c in report.graph_cases} == {1, 2, 3}


@pytest.mark.slow
def test_another_configuration_builds_and_validates(tmp_path: Path) -> None:
    """Other depth, heads, head width and rotary axes, channels, text width and length,
    and a non-square latent (6x4 packed tokens)."""
    model = tmp_path / "model"
    make_demo_qwenimage(OTHER_QWENIMAGE, seed=2).save_pretrained(model)
    out = tmp_path / "engine"
    build(
        str(model),
        out,
        BuildConfig.from_options(batch="1:2", resolution="12x8", text_length=5),
        progress=False,
    )
    manifest = load_manifest(out)
    assert manifest.latents_input.shape == ("batch", 24, 8)
    assert manifest.forward is not None and manifest.forward.fixed == {"img_shapes": [[1, 6, 4]]}
    _assert_fp32_parity(validate(out, steps=6, batch_sizes=[1, 2]))


@pytest.mark.slow
def test_engine_keeps_image_caches_and_takes_the_prompt_mask(qwen_engine: Path) -> None:
    manifest = load_manifest(qwen_engine)
    assert {spec.name: spec.role for spec in manifest.inputs} == {
        "latents": "latents",
        "timestep": "timestep",
        "encoder_hidden_states": "conditioning",
        "encoder_hidden_states_mask": "conditioning",
    }
    assert manifest.latents_input.shape == ("batch", 16, 16)  # 8x8 latent -> 4x4 packed tokens
    assert manifest.denoising.latent_layout == "BSC" and manifest.denoising.timestep_scale == 1e-3
    assert manifest.conditioning.input_ranges == {"encoder_hidden_states_mask": (0, 1)}
    assert all(c.shape[1] == 16 for c in manifest.caches)  # image tokens only
    assert {c.kind for c in manifest.caches} == {"attn", "ff"}
    # The gate table reads the timestep alone: one table per generation, any prompt.
    assert [t.name for t in manifest.graphs["gates"].inputs] == ["timestep"]
    # img_shapes is fixed per build: the drop-in checks the pipeline's against it; the prompt
    # mask pads prompts shorter than the build.
    assert manifest.forward is not None and manifest.forward.fixed == {"img_shapes": [[1, 4, 4]]}
    assert manifest.forward.text_masks == {"encoder_hidden_states_mask": "encoder_hidden_states"}


@pytest.mark.slow
def test_inputs_fixed_per_build_get_one_line_errors(qwen_engine: Path) -> None:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 16, 16)).astype(np.float32)
    text = rng.standard_normal((1, ENGINE_TEXT, 24)).astype(np.float32)
    mask = np.ones((1, ENGINE_TEXT), np.int64)
    mask[0, -3:] = 0  # a prompt 3 tokens shorter than the build
    with ForaSession(qwen_engine) as session:
        gen = session.start(4, 1)
        # The scheduler's timestep as the model takes it: t / 1000 (sigma), not t.
        with pytest.raises(InputError, match=r"Input 'timestep' \| values 999\.\.999 outside \[0, 1\]"):
            gen.step(latents, 999.0, encoder_hidden_states=text, encoder_hidden_states_mask=mask)
        gen.step(latents, 0.5, encoder_hidden_states=text, encoder_hidden_states_mask=mask)
        with pytest.raises(InputError, match=r"Input 'encoder_hidden_states_mask' \| missing"):
            gen.step(latents, 0.4, encoder_hidden_states=text)
        with pytest.raises(InputError, match=r"Input 'encoder_hidden_states' \| got shape \[1, 25, 24\]"):
            gen.step(
                latents,
                0.4,
                encoder_hidden_states=text[:, [0, *range(ENGINE_TEXT)]],
                encoder_hidden_states_mask=mask,
            )
        with pytest.raises(InputError, match=r"Input 'latents' \| got shape \[1, 64, 16\]"):
            gen.step(
                np.zeros((1, 64, 16), np.float32),
                0.4,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=mask,
            )
        with pytest.raises(
            InputError, match=r"Input 'encoder_hidden_states_mask' \| values 0\.\.2 outside \[0, 1\]"
        ):
            gen.step(
                latents, 0.4, encoder_hidden_states=text, encoder_hidden_states_mask=np.where(mask, 2, 0)
            )


def test_the_drop_in_refuses_img_shapes_other_than_the_build(qwen_engine: Path) -> None:
    """The build fixes img_shapes (each sample's must repeat it): another size is a
    one-line pipeline error before anything runs. (A missing mask and prompts shorter than
    the build are padded: the pipeline test below passes both.)"""
    from fora_runtime.diffusers import ForaTransformer, PipelineError

    engine = ForaTransformer.from_engine(qwen_engine)
    try:
        with pytest.raises(
            PipelineError, match=r"Argument 'img_shapes' \| got .* built for \[\[1, 4, 4\]\] per sample"
        ):
            engine(
                torch.zeros(1, 16, 16),
                timestep=torch.tensor([0.5]),
                encoder_hidden_states=torch.zeros(1, ENGINE_TEXT, 24),
                img_shapes=[[(1, 8, 2)]],
            )
    finally:
        engine.close()


def test_lean_reuse_fed_its_own_caches_reproduces_the_full_step() -> None:
    """The lean reuse graph reads only the image-stream caches and, fed the caches of the
    same inputs, equals the full step exactly (fp32); at a later timestep it equals the
    plain reuse step."""
    adapter = adapter_for(make_demo_qwenimage(TINY_QWENIMAGE, seed=3), SIZES)
    names = tuple(s.name for s in adapter.step_input_specs("fp32"))
    split = split_model(adapter, names)
    inputs = adapter.random_inputs(3, "fp32", torch.Generator().manual_seed(0))
    assert not inputs["encoder_hidden_states_mask"].all()  # a padded prompt among them
    with torch.no_grad():
        prediction, caches = split.run_full(inputs)
        lean_names = adapter.lean_cache_names(split.cache_names)
        lean = adapter.lean_reuse_graph(names, lean_names)
        reused = lean(*(inputs[n] for n in names), *(caches[n] for n in lean_names))
        later = dict(inputs, timestep=inputs["timestep"] * 0.6)
        plain = split.run_reuse(later, caches)
        lean_later = lean(*(later[n] for n in names), *(caches[n] for n in lean_names))
    assert lean_names == ("cache.0.attn.image", "cache.0.ff", "cache.1.attn.image", "cache.1.ff")
    assert torch.equal(reused, prediction)
    torch.testing.assert_close(lean_later, plain, atol=1e-6, rtol=0)
    split.remove()


def _diffusers_call(model, inputs: dict[str, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    batch = inputs["latents"].shape[0]
    return model(
        hidden_states=inputs["latents"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        encoder_hidden_states_mask=inputs["encoder_hidden_states_mask"],
        timestep=inputs["timestep"],
        img_shapes=[[(1, *grid)]] * batch,
        return_dict=False,
    )[0]


def test_exported_attention_equals_diffusers_and_padding_changes_nothing() -> None:
    """The build's rotary tables in real arithmetic compute what diffusers' complex ones do
    (fp32 rounding), and a prompt padded to the build's length with a zero mask gives the
    prediction of the unpadded prompt: the padding keys are masked out, which is how a
    pipeline's shorter prompts fit a build."""
    reference = make_demo_qwenimage(TINY_QWENIMAGE, seed=4)
    adapter = adapter_for(
        make_demo_qwenimage(TINY_QWENIMAGE, seed=4), AdapterOptions(text_length=TEXT, resolution=(12, 8))
    )
    inputs = adapter.random_inputs(2, "fp32", torch.Generator().manual_seed(1))
    inputs["encoder_hidden_states_mask"][:] = 1
    with torch.no_grad():
        exported = adapter.predict(inputs)
        torch.testing.assert_close(exported, _diffusers_call(reference, inputs, (6, 4)), atol=1e-6, rtol=0)
        short = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :4])
        short["encoder_hidden_states_mask"] = inputs["encoder_hidden_states_mask"][:, :4]
        padded = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
        padded["encoder_hidden_states"][:, 4:] = 0
        padded["encoder_hidden_states_mask"] = inputs["encoder_hidden_states_mask"].clone()
        padded["encoder_hidden_states_mask"][:, 4:] = 0
        unpadded = _diffusers_call(reference, short, (6, 4))
        torch.testing.assert_close(adapter.predict(padded), unpadded, atol=1e-5, rtol=0)
        # The adapted model runs other prompt lengths too (PyTorch FORA in a pipeline does).
        torch.testing.assert_close(_diffusers_call(adapter.model, short, (6, 4)), unpadded, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "flag", ["zero_cond_t", "use_layer3d_rope", "use_additional_t_cond", "guidance_embeds"]
)
def test_variants_not_supported_yet_are_one_line_errors(flag: str) -> None:
    model = make_demo_qwenimage({**TINY_QWENIMAGE, flag: True})
    with pytest.raises(
        ConfigError, match=rf"^QwenImageTransformer2DModel \| {flag}: .* is not supported yet \| supported: "
    ):
        adapter_for(model, SIZES)


@pytest.mark.parametrize(
    "pipeline",
    [
        "QwenImageEditPipeline",
        "QwenImageEditPlusPipeline",
        "QwenImageLayeredPipeline",
        "QwenImageControlNetPipeline",
    ],
)
def test_pipelines_with_reference_images_or_controlnet_are_refused(pipeline: str) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"^MODEL 'here' \| {pipeline} is not supported yet: .* \| supported: QwenImagePipeline, ",
    ):
        QwenImageAdapter.pipeline_build_defaults({"_class_name": pipeline}, "transformer", where="here")
    assert (
        QwenImageAdapter.pipeline_build_defaults(
            {"_class_name": "QwenImagePipeline"}, "transformer", where="here"
        )
        == {}
    )


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        ({}, AdapterOptions(resolution=(9, 8)), r"Resolution \| latent size 9x8 \| Qwen-Image packs 2x2"),
        ({}, AdapterOptions(resolution=(8, 8), text_length=4095), r"the rotary tables hold 4096 positions"),
        (
            {"axes_dims_rope": (4, 6, 4)},
            SIZES,
            r"axes_dims_rope \(4, 6, 4\) \(sum 14\), attention_head_dim is 16",
        ),
        ({"out_channels": 3}, SIZES, r"give 12 output channels, in_channels is 16"),
    ],
)
def test_sizes_the_model_cannot_run_are_one_line_errors(
    config: dict, options: AdapterOptions, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        adapter_for(make_demo_qwenimage({**TINY_QWENIMAGE, **config}), options)


def test_demo_pipeline_runs_pytorch_fora_with_true_cfg() -> None:
    """The tiny QwenImagePipeline (Qwen2.5-VL text encoder, Qwen-Image VAE) with PyTorch
    FORA as its transformer: true CFG's two passes run in the cache contexts ``cond`` and
    ``uncond``, each with its own caches; at interval 1 it is the pipeline's own run."""
    from fora_export.demo_pipelines import make_qwenimage_pipeline
    from fora_export.validate.pipeline_ref import ForaReference
    from fora_runtime.schedule import CacheSchedule

    pipe = make_qwenimage_pipeline(make_demo_qwenimage(TINY_QWENIMAGE, seed=1))
    pipe.set_progress_bar_config(disable=True)
    call = {
        "prompt": "a photo of a cat",
        "negative_prompt": "blue sky",
        "true_cfg_scale": 4.0,
        "height": 64,  # an 8x8 latent: 4x4 packed tokens
        "width": 64,
        "num_inference_steps": 6,
        "output_type": "np",
    }
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    original = pipe.transformer
    images, contexts = {}, {}
    for interval in (1, 3):
        reference = ForaReference(original, CacheSchedule.interval_of(interval), SIZES)
        reference.reset(6)
        pipe.transformer = reference
        try:
            images[interval] = pipe(**call, generator=torch.Generator().manual_seed(0)).images
            contexts[interval] = {name: steps.step for name, steps in reference._contexts.items()}
        finally:
            reference.remove()
            pipe.transformer = original
    assert contexts[1] == contexts[3] == {"cond": 6, "uncond": 6}
    assert np.abs(images[1] - plain).max() <= 1e-5  # fp32: every step full is no caching
    assert np.abs(images[3] - plain).max() > 1e-4  # reuse steps changed the trajectory


@pytest.mark.slow
def test_engines_in_the_pipeline_equal_pytorch_fora(qwen_engine: Path) -> None:
    """QwenImagePipeline with the engines as its transformer (true CFG: two passes in the
    cache contexts cond and uncond, prompts of other lengths than the build, padded or
    not) gives PyTorch FORA's images (fp32: <= 1e-4 max abs pixel difference)."""
    from fora_export.demo_pipelines import make_qwenimage_pipeline
    from fora_export.validate.pipeline_ref import ForaReference
    from fora_runtime.diffusers import ForaTransformer

    manifest = load_manifest(qwen_engine)
    pipe = make_qwenimage_pipeline(make_demo_qwenimage(TINY_QWENIMAGE, seed=1))
    pipe.set_progress_bar_config(disable=True)
    original = pipe.transformer
    steps = 9
    calls = [
        {"prompt": "a photo of a cat", "negative_prompt": "blue sky at night"},  # no padding: mask None
        {
            "prompt": ["a cat", "a photo of an astronaut riding a horse on the moon"],
            "negative_prompt": ["sky", "night"],
        },
    ]
    for prompts in calls:
        call = {**prompts, "true_cfg_scale": 4.0, "height": 64, "width": 64, "num_inference_steps": steps}
        call["output_type"] = "np"
        engine = ForaTransformer.from_engine(qwen_engine, schedule=manifest.schedule)
        pipe.transformer = engine.attach(pipe)
        try:
            engines = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        finally:
            engine.close()
            pipe.transformer = original
        reference = ForaReference.for_engines(original, manifest)
        reference.reset(steps)
        pipe.transformer = reference
        try:
            fora = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        finally:
            reference.remove()
            pipe.transformer = original
        assert np.abs(engines - fora).max() <= 1e-4
