"""Small diffusers pipelines around the demo transformers, made offline from configs.

Every component is created from a config with seeded random weights (nothing is
downloaded): a small ``AutoencoderKL`` (4 levels: the 8x latent scale of the SD VAE),
for caption families a small ``T5EncoderModel`` and a word-level tokenizer built with
the ``tokenizers`` library, wrapped as a transformers fast tokenizer. The images of
random weights are noise; they show that a pipeline runs end to end and how far the
engines are from PyTorch, not what a trained model draws.

``fora-export sample ENGINE --pipeline demo-dit`` uses these (each demo's pipeline maker
is named by its ``DemoSpec`` in :mod:`fora_export.adapters.registry`); the pipeline tests
save tiny ones with ``save_pretrained`` and load them back as users would.
"""

from __future__ import annotations

from typing import Any

import torch

#: Words of the offline tokenizer's vocabulary (after its special tokens); others are <unk>.
VOCABULARY = tuple(
    [
        "a",
        "photo",
        "of",
        "an",
        "the",
        "cat",
        "dog",
        "astronaut",
        "riding",
        "horse",
        "on",
        "moon",
        "red",
        "blue",
        "green",
        "small",
        "large",
        "painting",
        "city",
        "at",
        "night",
        "forest",
        "river",
        "mountain",
        "sky",
        "sunset",
        "portrait",
    ]
)


def make_vae(
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (16, 16, 32, 32),
    norm_num_groups: int = 8,
    seed: int = 0,
    shift_factor: float | None = None,
) -> Any:
    """A small ``AutoencoderKL``; 4 levels give the SD VAE's 8x latent scale. SD3 and Flux
    pipelines need a ``shift_factor`` (their VAEs have one)."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae: Any = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            shift_factor=shift_factor,
            use_quant_conv=shift_factor is None,  # as the SD3/Flux VAEs (no quant convs)
            use_post_quant_conv=shift_factor is None,
        )
        return vae.eval()


def make_tokenizer(max_length: int = 120) -> Any:
    """A T5-like word-level fast tokenizer (``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(VOCABULARY)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def make_t5_encoder(d_model: int, seed: int = 0) -> Any:
    """A one-layer ``T5EncoderModel`` of width ``d_model`` (the transformer's caption_channels)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(VOCABULARY) + 3,
        d_model=d_model,
        d_kv=max(d_model // 4, 4),
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def make_clip_encoder(hidden_size: int, projection_dim: int | None = None, seed: int = 0) -> Any:
    """A one-layer CLIP text encoder of ``hidden_size`` (with a projection to
    ``projection_dim``: ``CLIPTextModelWithProjection``, as SD3's), pooling at ``</s>``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(VOCABULARY) + 3,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH,
        projection_dim=projection_dim or hidden_size,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
        return model.eval()


#: CLIP's prompt length (SD3 and Flux tokenize for CLIP at the tokenizer's model_max_length).
CLIP_LENGTH = 77


def make_flow_scheduler(dynamic_shift: bool) -> Any:
    """``FlowMatchEulerDiscreteScheduler`` as SD3 (shift 3) or Flux (resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not dynamic_shift:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def make_sd3_pipeline(transformer: Any, *, vae: Any = None, max_length: int = 256) -> Any:
    """``StableDiffusion3Pipeline``: two CLIP encoders (their widths fill the joint attention
    width, their projections the pooled width) and a T5 encoder of the joint attention width."""
    from diffusers import StableDiffusion3Pipeline

    config = transformer.config
    joint, pooled = int(config.joint_attention_dim), int(config.pooled_projection_dim)
    clip_width = joint // 2
    vae = vae if vae is not None else make_vae(int(config.in_channels), shift_factor=0.0609)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=make_flow_scheduler(dynamic_shift=False),
        vae=vae,
        text_encoder=make_clip_encoder(clip_width, pooled // 2, seed=1),
        tokenizer=make_tokenizer(CLIP_LENGTH),
        text_encoder_2=make_clip_encoder(joint - clip_width, pooled - pooled // 2, seed=2),
        tokenizer_2=make_tokenizer(CLIP_LENGTH),
        text_encoder_3=make_t5_encoder(joint, seed=3),
        tokenizer_3=make_tokenizer(max_length),
    )


def make_flux_pipeline(transformer: Any, *, vae: Any = None, max_length: int = 512) -> Any:
    """``FluxPipeline``: a CLIP encoder of the pooled width, a T5 encoder of the joint
    attention width; the VAE latent has a quarter of the packed channels."""
    from diffusers import FluxPipeline

    config = transformer.config
    vae = vae if vae is not None else make_vae(int(config.in_channels) // 4, shift_factor=0.1159)
    return FluxPipeline(
        scheduler=make_flow_scheduler(dynamic_shift=True),
        vae=vae,
        text_encoder=make_clip_encoder(int(config.pooled_projection_dim), seed=1),
        tokenizer=make_tokenizer(CLIP_LENGTH),
        text_encoder_2=make_t5_encoder(int(config.joint_attention_dim), seed=2),
        tokenizer_2=make_tokenizer(max_length),
        transformer=transformer,
    )


def make_wan_vae(latent_channels: int = 16, seed: int = 0) -> Any:
    """A small ``AutoencoderKLWan``: 8x in space, 4x in time (Wan's), width 3 per level."""
    from diffusers import AutoencoderKLWan

    return _small_causal_vae(AutoencoderKLWan, 3, latent_channels, seed)


def _small_causal_vae(vae_class: Any, base_dim: int, latent_channels: int, seed: int) -> Any:
    """A seeded causal 3D VAE of Wan's design (Wan's and Qwen-Image's classes share it): one
    residual block per level, 4x in time, latents unnormalised (mean 0, std 1)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae: Any = vae_class(
            base_dim=base_dim,
            z_dim=latent_channels,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * latent_channels,
            latents_std=[1.0] * latent_channels,
        )
        return vae.eval()


def make_umt5_encoder(d_model: int, seed: int = 0) -> Any:
    """A one-layer ``UMT5EncoderModel`` of width ``d_model`` (Wan's text encoder)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(VOCABULARY) + 3,
        d_model=d_model,
        d_kv=max(d_model // 4, 4),
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UMT5EncoderModel(config).eval()


def make_wan_pipeline(
    transformer: Any,
    *,
    transformer_2: Any = None,
    boundary_ratio: float | None = None,
    vae: Any = None,
    max_length: int = 512,
) -> Any:
    """``WanPipeline`` (text to video; with ``transformer_2`` and ``boundary_ratio``, Wan 2.2
    A14B's two experts) with a UMT5 encoder of the transformer's text width."""
    from diffusers import WanPipeline

    config = transformer.config
    return WanPipeline(
        tokenizer=make_tokenizer(max_length),
        text_encoder=make_umt5_encoder(int(config.text_dim)),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
        vae=vae if vae is not None else make_wan_vae(int(config.in_channels)),
        scheduler=make_flow_scheduler(dynamic_shift=False),
    )


def make_dit_pipeline(transformer: Any, *, vae: Any = None) -> Any:
    """``DiTPipeline`` (DDIM) around ``transformer``; guidance needs its null class 1000."""
    from diffusers import DDIMScheduler, DiTPipeline

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    vae = vae if vae is not None else make_vae(int(transformer.config.in_channels))
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


def make_pixart_pipeline(
    transformer: Any, *, sigma: bool = False, vae: Any = None, max_length: int = 120
) -> Any:
    """``PixArtAlphaPipeline`` (or ``PixArtSigmaPipeline``) with DPM-Solver++ around ``transformer``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    vae = vae if vae is not None else make_vae(int(transformer.config.in_channels))
    return cls(
        tokenizer=make_tokenizer(max_length),
        text_encoder=make_t5_encoder(int(transformer.config.caption_channels)),
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"),
    )


def make_qwenimage_vae(latent_channels: int, seed: int = 0) -> Any:
    """A small ``AutoencoderKLQwenImage`` (Qwen-Image's causal 3D VAE): 8x in space, width 8
    per level, latents unnormalised (mean 0, std 1)."""
    from diffusers import AutoencoderKLQwenImage

    return _small_causal_vae(AutoencoderKLQwenImage, 8, latent_channels, seed)


def make_qwen25vl_encoder(hidden_size: int, seed: int = 0) -> Any:
    """A one-layer ``Qwen2_5_VLForConditionalGeneration`` of width ``hidden_size`` (the
    transformer's joint_attention_dim; a multiple of 4), with a one-block vision tower
    (the pipeline encodes text only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = hidden_size // 4  # 2 heads: half of each head's channels carry rotary sections
    section = half * 3 // 8
    vocab = len(VOCABULARY) + 3
    tokens: dict[str, Any] = {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
    config = Qwen2_5_VLConfig(
        text_config={
            **tokens,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_scaling": {"type": "mrope", "mrope_section": [half - 2 * section, section, section]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
        },
        **tokens,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(config).eval()


#: Tokens QwenImagePipeline drops (its prompt template's) plus its longest prompt.
QWENIMAGE_TOKENIZER_LENGTH = 34 + 1024


def make_qwenimage_pipeline(transformer: Any, *, vae: Any = None) -> Any:
    """``QwenImagePipeline``: a Qwen2.5-VL text encoder of the joint attention width; the
    VAE latent has a quarter of the packed channels. Its prompts are as long as they
    tokenize (after the template's first 34 tokens), not padded to a fixed length."""
    from diffusers import QwenImagePipeline

    config = transformer.config
    vae = vae if vae is not None else make_qwenimage_vae(int(config.in_channels) // 4)
    return QwenImagePipeline(
        scheduler=make_flow_scheduler(dynamic_shift=True),
        vae=vae,
        text_encoder=make_qwen25vl_encoder(int(config.joint_attention_dim), seed=1),
        tokenizer=make_tokenizer(QWENIMAGE_TOKENIZER_LENGTH),
        transformer=transformer,
    )
