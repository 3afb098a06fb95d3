"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``): text-to-image, img2img, inpainting.

``QwenImageTransformerBlock``s over image and text tokens (dual-stream MMDiT, joint
attention with rotary positions and qk RMSNorm). One conditioning vector
``temb = time_text_embed(t)`` (the timestep alone: the second argument is read for its
dtype only) drives every adaLN projection. Per block:

    shift, scale, gate, shift2, scale2, gate2 = img_mod(temb)   # txt_mod(temb): the text's
    A, A_ctx = attn(modulate(img_norm1(x)), modulate(txt_norm1(ctx)), mask)
                                                  # cached: "attn" (parts image, context)
    x = x + gate * A
    F = img_mlp(modulate2(img_norm2(x)))          # cached: "ff"
    x = x + gate2 * F
    ctx = ... A_ctx and txt_mlp                   # cached: "ff_context"

then ``norm_out`` (AdaLayerNormContinuous: scale, shift of ``temb``) and ``proj_out``.
As for Flux and SD3, reuse needs only the image stream: the text stream reaches the
image only through the joint attentions, so once ``attn`` is cached a reuse step leaves
it dead. Both reuse graphs (lean, and plain whenever ``attn`` is cached) then read the
image parts of the caches (``attn`` image part, ``ff``), and the full graph outputs only
those; the lean one is ``img_in``, the gated sums, the final norm and ``proj_out``.

Latents are the pipeline's packed tokens ``[B, (H/2)(W/2), 4 C]`` (Flux's layout;
``--resolution`` is the VAE latent ``H x W``). Timesteps follow the pipeline, which
passes the flow-matching time ``t / 1000`` (the model's sinusoid scales it by 1000).
The rotary tables depend on ``img_shapes`` (one image of ``(1, H/2, W/2)`` patches) and
the text length, both fixed per build: ``pos_embed`` returns them as real (cos, sin)
pairs made once per size by its own forward (the build's become graph constants) and
the attention applies them in real arithmetic (the model's complex multiply does not
export to ONNX; the values agree to fp32 rounding).
``encoder_hidden_states_mask`` is an int64 input (1 = token, 0 = padding); a prompt
shorter than the build pads with zeros and a zero mask, which leaves the image tokens'
attention unchanged (padding keys are masked out).

Not supported yet, refused when the adapter is made: per-token modulation of reference
images (``zero_cond_t``, Qwen-Image-Edit-2511), the layered model's 3D rotary and extra
timestep condition (``use_layer3d_rope``, ``use_additional_t_cond``), guidance
embeddings (diffusers' model has none: its forward fails when given ``guidance``), and
the edit / layered / ControlNet pipelines (reference-image tokens or ControlNet
residuals, which the graphs do not take).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fora_export.adapters.base import (
    DTYPE_NAMES,
    TORCH_DTYPES,
    AdapterOptions,
    ModelAdapter,
    random_prompt_mask,
)
from fora_export.adapters.cache_point import CachePoint
from fora_export.adapters.export_patches import precompute_timestep_frequencies
from fora_export.adapters.gated import GatedReuseParts, TokenGatedResidual, stacked_gate_projection
from fora_export.errors import ConfigError
from fora_runtime.manifest import BATCH_AXIS, ForwardSignature, InputSpec

#: VAE latent of a 1024px image (the pipeline's default size), 64x64 packed tokens.
DEFAULT_RESOLUTION = (128, 128)
#: Positions of QwenEmbedRope's frequency tables (``torch.arange(4096)``).
ROPE_POSITIONS = 4096
#: Config flags of variants the graphs cannot represent yet, with what each is.
UNSUPPORTED_FLAGS = {
    "zero_cond_t": "per-token modulation of reference images (Qwen-Image-Edit-2511)",
    "use_layer3d_rope": "the layered model's 3D rotary positions",
    "use_additional_t_cond": "the layered model's extra timestep condition",
    "guidance_embeds": "guidance embeddings (diffusers' model has none and fails given guidance)",
}
SUPPORTED = "Qwen-Image text-to-image transformers (QwenImagePipeline, its img2img and inpaint pipelines)"


class QwenImageAdapter(ModelAdapter):
    family = "qwenimage"
    model_class = "QwenImageTransformer2DModel"
    forward_signature = ForwardSignature(
        (
            "hidden_states",
            "encoder_hidden_states",
            "encoder_hidden_states_mask",
            "timestep",
            "img_shapes",
            "guidance",
            "attention_kwargs",
            "controlnet_block_samples",
            "additional_t_cond",
        ),
        unsupported=("guidance", "attention_kwargs", "controlnet_block_samples", "additional_t_cond"),
        # QwenImagePipeline passes no mask when no prompt token is padding, and trims prompts
        # to the longest one: the drop-in pads both to the built text length.
        text_masks={"encoder_hidden_states_mask": "encoder_hidden_states"},
    )
    cache_kinds = ("attn", "ff", "ff_context")
    latent_layout = "BSC"
    scheduler = "flow_match"
    timestep_scale = 1e-3
    # Rotary attention with qk RMSNorm: the TorchScript exporter specialises the reshapes
    # to the traced batch (as Flux's); torch.export keeps the batch dynamic.

    def __init__(self, model: Any, options: AdapterOptions | None = None) -> None:
        config = model.config
        enabled = [flag for flag in UNSUPPORTED_FLAGS if config.get(flag)]
        if enabled:
            what = "; ".join(f"{flag}: {UNSUPPORTED_FLAGS[flag]}" for flag in enabled)
            raise ConfigError(
                f"{self.model_class} | {what} is not supported yet | supported: {SUPPORTED}, with "
                f"{', '.join(UNSUPPORTED_FLAGS)} all off"
            )
        super().__init__(model, options)
        precompute_timestep_frequencies(model)
        model.set_attn_processor(RealRotaryAttnProcessor())

    @classmethod
    def pipeline_build_defaults(cls, index: dict[str, Any], subfolder: str, *, where: str) -> dict[str, Any]:
        """Refuse the Qwen-Image pipelines whose transformer call the graphs do not take."""
        from fora_export.adapters.registry import family_spec

        supported = family_spec(cls.family).pipeline_classes  # one image, no ControlNet
        pipeline = str(index.get("_class_name", ""))
        if pipeline.startswith("QwenImage") and pipeline not in supported:
            raise ConfigError(
                f"MODEL '{where}' | {pipeline} is not supported yet: its transformer also takes "
                "reference-image tokens or ControlNet residuals (several images in img_shapes), which "
                f"the exported graphs do not | supported: {', '.join(supported)}"
            )
        return {}

    def use_eager_attention(self) -> None:
        """Back to diffusers' processor and rotary tables (complex arithmetic), what users run."""
        from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

        self.model.set_attn_processor(QwenDoubleStreamAttnProcessor2_0())
        vars(self.model.pos_embed).pop("forward", None)

    def cache_points(self) -> list[CachePoint]:
        points = []
        for index, block in enumerate(self.model.transformer_blocks):
            points.append(CachePoint(index, "attn", block.attn, parts=("image", "context")))
            points.append(CachePoint(index, "ff", block.img_mlp))
            points.append(CachePoint(index, "ff_context", block.txt_mlp))
        return points

    def lean_cache_names(self, cache_names: tuple[str, ...]) -> tuple[str, ...]:
        """Image-stream caches only, in the blocks' order of addition."""
        return tuple(n for n in cache_names if n.endswith((".image", ".ff")))

    def plain_reuse_cache_names(self, cache_names: tuple[str, ...]) -> tuple[str, ...]:
        """With ``attn`` replayed the text stream is dead: image-stream caches only."""
        return self.lean_cache_names(cache_names) if "attn" in self.cached_kinds else cache_names

    # -- sizes ----------------------------------------------------------------------
    def default_resolution(self) -> tuple[int, int]:
        return DEFAULT_RESOLUTION

    @property
    def grid(self) -> tuple[int, int]:
        """Packed token rows and columns (the pipeline's 2x2 patches of the VAE latent)."""
        return self.resolution[0] // 2, self.resolution[1] // 2

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def output_channels(self) -> int:
        """``proj_out`` writes 2x2 patches of ``out_channels``: the packed latent's width."""
        config = self.model.config
        return int(config.patch_size) ** 2 * int(self.model.out_channels)

    def check_sizes(self) -> None:
        if any(side < 2 or side % 2 for side in self.resolution):
            raise self.resolution_error(
                "Qwen-Image packs 2x2 latent patches: each side must be a positive even number (the VAE "
                "latent, image size / 8)"
            )
        config = self.model.config
        if self.output_channels != self.latent_channels:
            raise ConfigError(
                f"{self.model_class} | patch_size {config.patch_size} x out_channels "
                f"{self.model.out_channels} give {self.output_channels} output channels, in_channels is "
                f"{self.latent_channels} | the pipeline needs predictions of the packed latents' width: "
                "fix its config.json"
            )
        axes = tuple(int(d) for d in config.axes_dims_rope)
        head = int(config.attention_head_dim)
        if sum(axes) != head or any(d % 2 for d in axes):
            raise ConfigError(
                f"{self.model_class} | axes_dims_rope {axes} (sum {sum(axes)}), attention_head_dim is "
                f"{head} | the model cannot run: the axes must be even and sum to {head} (config.json)"
            )
        # QwenEmbedRope centres the image positions (-rows/2 .. rows/2) and starts the text's
        # after the larger half side, all within its tables.
        rows, columns = self.grid
        reach = max(rows, columns) // 2 + self.text_length
        if reach > ROPE_POSITIONS or max(rows - rows // 2, columns - columns // 2) > ROPE_POSITIONS:
            raise ConfigError(
                f"Resolution | latent size {self.resolution[0]}x{self.resolution[1]} with "
                f"{self.text_length} text tokens | the rotary tables hold {ROPE_POSITIONS} positions: half "
                f"the larger packed side plus the text length must stay within them | pass a smaller "
                "--resolution or --text-length"
            )

    def fix_sizes(self) -> None:
        """From now on ``pos_embed`` returns its rotary tables as real (cos, sin) pairs, one
        pair per image and text, made once per size; the build's are made here, so the
        exported graphs hold them as constants."""
        pos_embed = self.model.pos_embed
        pos_embed.forward = _real_rotary_tables(pos_embed)
        pos_embed(self.img_shapes, max_txt_seq_len=self.text_length, device=pos_embed.pos_freqs.device)

    @property
    def img_shapes(self) -> list[list[tuple[int, int, int]]]:
        """The pipeline's ``img_shapes`` for one sample (the model reads the first)."""
        return [[(1, *self.grid)]]

    # -- inputs ---------------------------------------------------------------------
    def step_input_specs(self, precision: str) -> list[InputSpec]:
        dtype = DTYPE_NAMES[TORCH_DTYPES[precision]]
        return [
            InputSpec("latents", dtype, (BATCH_AXIS, self.tokens, self.latent_channels), role="latents"),
            InputSpec("timestep", "float32", (BATCH_AXIS,), role="timestep"),
            InputSpec(
                "encoder_hidden_states",
                dtype,
                (BATCH_AXIS, self.text_length, int(self.model.config.joint_attention_dim)),
            ),
            InputSpec("encoder_hidden_states_mask", "int64", (BATCH_AXIS, self.text_length)),
        ]

    def scheduler_config(self) -> dict[str, Any]:
        return {"num_train_timesteps": 1000, "shift": 1.0}

    def call_signature(self) -> ForwardSignature:
        # The pipeline passes img_shapes, one entry per sample, which the build fixes.
        fixed = {"img_shapes": [list(shape) for shape in self.img_shapes[0]]}
        return dataclasses.replace(self.forward_signature, fixed=fixed)

    def family_conditioning(self) -> dict[str, Any]:
        return {
            "kind": "text",
            "text_length": self.text_length,
            "input_ranges": {"encoder_hidden_states_mask": [0, 1]},
        }

    def random_input(
        self,
        spec: InputSpec,
        batch_size: int,
        value_range: list[float] | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Prompt masks pad a random tail of every other row (prompts shorter than the build)."""
        if spec.name == "encoder_hidden_states_mask":
            return random_prompt_mask(batch_size, self.text_length, generator)
        return super().random_input(spec, batch_size, value_range, generator)

    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            hidden_states=inputs["latents"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_hidden_states_mask=inputs["encoder_hidden_states_mask"],
            timestep=inputs["timestep"],
            img_shapes=self.img_shapes,
            return_dict=False,
        )[0]

    # -- reuse math -----------------------------------------------------------------
    def gated_reuse_parts(self) -> GatedReuseParts:
        return GatedReuseParts(
            QwenImageGateTable(self.model),
            ("timestep",),
            TokenGatedResidual(self.model.img_in, self.model.norm_out, self.model.proj_out),
        )


def _real_rotary_tables(pos_embed: nn.Module) -> Any:
    """``pos_embed``'s forward with its complex tables as real (cos, sin) pairs, each
    computed once per (image shapes, text length) by diffusers' own forward."""
    original = type(pos_embed).forward
    tables: dict[tuple[Any, ...], Any] = {}

    def forward(video_fhw: Any, device: Any = None, max_txt_seq_len: Any = None) -> Any:
        first = video_fhw[0] if isinstance(video_fhw, list) else video_fhw  # as diffusers reads it
        shapes = first if isinstance(first, list) else [first]
        key = (tuple(tuple(int(n) for n in shape) for shape in shapes), int(max_txt_seq_len))
        if key not in tables:  # on the tables' own device: the attention moves them
            where = pos_embed.pos_freqs.device
            image, text = original(pos_embed, video_fhw, device=where, max_txt_seq_len=max_txt_seq_len)
            tables[key] = ((image.real, image.imag), (text.real, text.imag))
        return tables[key]

    return forward


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_emb_qwen(x, cos + i sin, use_real=False)`` in real arithmetic: each
    (even, odd) channel pair of ``x [B, S, H, D]`` times ``cos + i sin [S, D/2]``, in fp32."""
    real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    cos, sin = cos.to(x.device)[:, None], sin.to(x.device)[:, None]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(3).to(x.dtype)


class RealRotaryAttnProcessor:
    """diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (joint attention, text tokens
    first, padding keys masked), with the rotary tables as real (cos, sin) pairs."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states_mask is not None:
            image_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads

        def heads(projection: nn.Module, states: torch.Tensor) -> torch.Tensor:
            return projection(states).unflatten(-1, (-1, head_dim))

        img_q, img_k, img_v = (heads(p, hidden_states) for p in (attn.to_q, attn.to_k, attn.to_v))
        txt = encoder_hidden_states
        txt_q, txt_k, txt_v = (heads(p, txt) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
        txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            (img_cos, img_sin), (txt_cos, txt_sin) = image_rotary_emb
            img_q, img_k = _rotate(img_q, img_cos, img_sin), _rotate(img_k, img_cos, img_sin)
            txt_q, txt_k = _rotate(txt_q, txt_cos, txt_sin), _rotate(txt_k, txt_cos, txt_sin)
        joint = dispatch_attention_fn(
            torch.cat([txt_q, img_q], dim=1),
            torch.cat([txt_k, img_k], dim=1),
            torch.cat([txt_v, img_v], dim=1),
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
        )
        joint = joint.flatten(2, 3).to(img_q.dtype)
        text_tokens = txt.shape[1]
        img_out = attn.to_out[0](joint[:, text_tokens:].contiguous())
        txt_out = attn.to_add_out(joint[:, :text_tokens].contiguous())
        return img_out, txt_out


class QwenImageGateTable(nn.Module):
    """``t -> [rows, 2L + 2, D]``: every block's image-stream gates (``gate``, ``gate2`` of
    ``img_mod``), then the final norm's scale and shift, as one product of ``silu(temb)``."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.time_proj = model.time_text_embed.time_proj
        self.timestep_embedder = model.time_text_embed.timestep_embedder
        pieces = []
        for block in model.transformer_blocks:
            pieces += [(block.img_mod[1], 2, 6), (block.img_mod[1], 5, 6)]
        pieces += [(model.norm_out.linear, 0, 2), (model.norm_out.linear, 1, 2)]  # scale, shift
        self.gate_proj = stacked_gate_projection(pieces)
        self.rows = len(pieces)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        # The model's own casts: the timestep to the model dtype, its sinusoid back to it.
        dtype = self.gate_proj.weight.dtype
        temb = self.timestep_embedder(self.time_proj(timestep.to(dtype)).to(dtype))
        return self.gate_proj(F.silu(temb)).view(timestep.shape[0], self.rows, -1)
