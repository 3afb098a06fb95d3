"""What the exporter needs to know about one model family.

An adapter names the family's cache points (which sublayers FORA caches), its
step inputs and how to call the model. Everything family-specific lives in one
adapter file; nothing else branches on the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from fora_export.adapters.cache_point import CachePoint
from fora_export.adapters.gated import GatedReuseParts, GatedReuseStep, GateTableGraphs, LeanReuseStep
from fora_export.adapters.registry import FamilySpec, family_spec
from fora_export.errors import ConfigError
from fora_runtime.dtypes import MANIFEST_DTYPES, PRECISION_DTYPES, torch_dtype
from fora_runtime.manifest import BATCH_AXIS, DenoisingSpec, ForwardSignature, InputSpec, Manifest

#: ``--precision`` -> torch dtype, and torch dtype -> manifest name (from the one table).
TORCH_DTYPES = {precision: torch_dtype(name) for precision, name in PRECISION_DTYPES.items()}
DTYPE_NAMES = {torch_dtype(name): name for name in MANIFEST_DTYPES}


@dataclass(frozen=True)
class AdapterOptions:
    """Build options that change what is exported; recorded in the manifest."""

    #: Sublayer kinds to cache (None: every kind the family caches).
    cache: tuple[str, ...] | None = None
    #: Text tokens per prompt, for text-conditioned families (None: family default).
    text_length: int | None = None
    #: Latent frames, for video families (None: family default).
    frames: int | None = None
    #: The graph timesteps this model serves when it is one expert of several (Wan 2.2
    #: A14B: the high-noise ``transformer`` or the low-noise ``transformer_2``).
    expert_range: tuple[float, float] | None = None
    #: Latent (height, width) of the build (None: the family default). Not in
    #: :meth:`to_dict`: the manifest records it as its own ``resolution``.
    resolution: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["resolution"]
        data["cache"] = list(self.cache) if self.cache is not None else None
        data["expert_range"] = list(self.expert_range) if self.expert_range is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AdapterOptions:
        data = data or {}
        cache = data.get("cache")
        return cls(
            cache=tuple(cache) if cache is not None else None,
            text_length=data.get("text_length"),
            frames=data.get("frames"),
            expert_range=tuple(data["expert_range"]) if data.get("expert_range") else None,
        )

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> AdapterOptions:
        """The options an engine folder was built with, its latent resolution included."""
        options = cls.from_dict(manifest.export.adapter_options.to_dict())
        height, width = manifest.resolution
        return replace(options, resolution=(height, width))


def random_prompt_mask(batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """An int64 prompt mask (1 = keep) padding a random tail of every other row: prompts
    shorter than the build, as a masked-prompt family's random inputs need them."""
    mask = torch.ones(batch_size, length, dtype=torch.int64)
    for row in range(1, batch_size, 2):
        keep = int(torch.randint(1, max(length, 2), (1,), generator=generator))
        mask[row, keep:] = 0
    return mask


@contextmanager
def torch_program_ops(*modules: nn.Module) -> Iterator[None]:
    """Within the block, submodules with a ``torch_program`` flag compute as torch programs
    should: through custom ops the runtime registers (fused kernels), where ONNX graphs
    spell the same arithmetic out in standard operators."""
    flagged = [m for module in modules for m in module.modules() if hasattr(m, "torch_program")]
    for sub in flagged:
        setattr(sub, "torch_program", True)  # noqa: B010 - a flag some modules define
    try:
        yield
    finally:
        for sub in flagged:
            setattr(sub, "torch_program", False)  # noqa: B010


def _size_option(flag: str, value: int | None) -> int | None:
    """A size option as given (None: not given), refused unless a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{flag} | got {value!r} | expected an integer >= 1")
    return value


class ModelAdapter(ABC):
    """Family-specific knowledge about a diffusers transformer.

    What a family *is* is declared as data (class attributes and
    :meth:`step_input_specs`): its inputs and their roles, latent layout, timestep
    convention, scheduler family and cache points. Its code is the family's real
    math: the gate table and gated residual of its lean reuse step
    (:meth:`gated_reuse_parts`), from which this class builds the lean reuse graph and
    the gate-table graphs.

    The build's sizes (latent resolution, text length, frames) are options: the adapter
    checks them and makes its size-dependent tables once, when it is made.
    """

    family: ClassVar[str]
    model_class: ClassVar[str]
    #: Sublayer kinds this family can cache per block, in cache order.
    cache_kinds: ClassVar[tuple[str, ...]]
    #: Axis letters of the latents input (see ``DenoisingSpec.latent_layout``).
    latent_layout: ClassVar[str] = "BCHW"
    #: ``ddpm`` (epsilon, DDIM/DPM-Solver) or ``flow_match`` (velocity, flow-matching Euler).
    scheduler: ClassVar[str] = "ddpm"
    #: graph timestep = scheduler timestep * timestep_scale.
    timestep_scale: ClassVar[float] = 1.0
    #: How pipelines call the family's diffusers ``forward`` (recorded in the manifest for
    #: the diffusers drop-in).
    forward_signature: ClassVar[ForwardSignature]

    def __init__(self, model: nn.Module, options: AdapterOptions | None = None) -> None:
        # diffusers models expose config values and submodules as dynamic attributes.
        self.model: Any = model
        self.options = options or AdapterOptions()
        self.cached_kinds = self._check_cache_kinds(self.options.cache)
        # Build defaults are the registry's (FamilySpec: data the CLI help reads without torch).
        spec = self.family_spec()
        self.text_length: int = self._default_size(
            "--text-length", _size_option("--text-length", self.options.text_length), spec.text_length
        )
        self.frames: int = self._default_size(
            "--frames", _size_option("--frames", self.options.frames), spec.frames
        )
        resolution = self.options.resolution or self.default_resolution()
        self.resolution: tuple[int, int] = (int(resolution[0]), int(resolution[1]))
        self.check_sizes()
        self.fix_sizes()

    def call_signature(self) -> ForwardSignature:
        """The forward signature this build records: the family's, with the values of its
        build-fixed arguments (``ForwardSignature.fixed``) where it has such."""
        return self.forward_signature

    @classmethod
    def family_spec(cls) -> FamilySpec:
        """The family's registry entry: its build defaults, pipelines and title."""
        return family_spec(cls.family)

    @classmethod
    def pipeline_build_defaults(cls, index: dict[str, Any], subfolder: str, *, where: str) -> dict[str, Any]:
        """Build options a pipeline folder's ``model_index.json`` (``index``) implies for its
        transformer in ``subfolder`` (none for most families); raise ConfigError for a
        pipeline the exported graphs cannot represent. ``where``: the pipeline folder."""
        return {}

    def _default_size(self, flag: str, given: int | None, default: int | None) -> int:
        if default is None:
            if given is not None:
                what = "captions (it is not text-conditioned)" if flag == "--text-length" else "video frames"
                raise ConfigError(f"{flag} | {self.model_class} takes no {what} | drop {flag}")
            return 0
        return given or default

    def _check_cache_kinds(self, requested: tuple[str, ...] | None) -> tuple[str, ...]:
        if requested is None:
            return self.cache_kinds
        unknown = [k for k in requested if k not in self.cache_kinds]
        if unknown or not requested:
            raise ConfigError(
                f"--cache | got {','.join(requested) or 'nothing'} | {self.model_class} caches "
                f"some of: {','.join(self.cache_kinds)}"
            )
        # Keep the family's order so cache names and graph IO are deterministic.
        return tuple(k for k in self.cache_kinds if k in requested)

    @property
    def caches_every_kind(self) -> bool:
        """Every cacheable sublayer kind is cached: a reuse step then runs no sublayer, which
        the lean reuse graph and the gate table need."""
        return self.cached_kinds == self.cache_kinds

    def cached_points(self) -> list[CachePoint]:
        """The cache points selected by the build options."""
        return [p for p in self.cache_points() if p.kind in self.cached_kinds]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model.config)

    # -- cache points ---------------------------------------------------------------
    @abstractmethod
    def cache_points(self) -> list[CachePoint]:
        """Every cacheable sublayer, block by block, in a fixed order."""

    def plain_reuse_cache_names(self, cache_names: tuple[str, ...]) -> tuple[str, ...]:
        """The caches the plain reuse graph reads (the full graph then writes only these):
        all of them, unless some feed only computations a reuse step leaves dead (MMDiT's
        text stream once the joint attention is replayed)."""
        return cache_names

    def lean_cache_names(self, cache_names: tuple[str, ...]) -> tuple[str, ...]:
        """The caches the family's lean reuse graph reads (default: all of them)."""
        return cache_names

    # -- sizes ----------------------------------------------------------------------
    # diffusers' 2D transformers share these config fields (sample_size, in_channels)
    # and the out_channels attribute; a family with other names overrides them.
    def default_resolution(self) -> tuple[int, int]:
        """Latent (height, width) the model was configured for."""
        size = int(self.model.config.sample_size)
        return (size, size)

    @abstractmethod
    def check_sizes(self) -> None:
        """Raise ConfigError when the model cannot run at the build's sizes
        (``self.resolution``, ``self.text_length``, ``self.frames``)."""

    def fix_sizes(self) -> None:
        """Make the model's size-dependent tables static for the build's sizes (called
        once, when the adapter is made).

        At a latent size other than ``sample_size`` diffusers' ``PatchEmbed``
        recomputes its sinusoidal position table in every forward; traced, that
        leaves the token count unknown to the TorchScript exporter (PixArt's
        output ``squeeze(1)`` then becomes an unfoldable ``If``). Storing the
        same table, computed by the same diffusers function, for the build's
        size makes the graph static without changing any value.
        """
        from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

        embed = getattr(self.model, "pos_embed", None)
        if not isinstance(embed, PatchEmbed) or embed.pos_embed is None or embed.pos_embed_max_size:
            return
        patch = embed.patch_size
        grid = (self.resolution[0] // patch, self.resolution[1] // patch)
        if grid == (embed.height, embed.width):
            return
        table = get_2d_sincos_pos_embed(
            embed_dim=embed.pos_embed.shape[-1],
            grid_size=grid,
            base_size=embed.base_size,
            interpolation_scale=embed.interpolation_scale,
            device=embed.pos_embed.device,
            output_type="pt",
        )
        embed.pos_embed = table.float().unsqueeze(0)
        embed.height, embed.width = grid

    def resolution_error(self, problem: str) -> ConfigError:
        """The one-line refusal of the build's latent size."""
        height, width = self.resolution
        return ConfigError(f"Resolution | latent size {height}x{width} | {problem}")

    def check_patch_multiple(self, patch: int, limit: int | None = None, limit_name: str = "") -> None:
        """Refuse a latent side that is not a positive multiple of ``patch`` (or, with a
        ``limit``, more than ``limit`` patches: the model's ``limit_name``)."""
        for side in self.resolution:
            if side < patch or side % patch or (limit is not None and side // patch > limit):
                bound = f" and at most {limit * patch} ({limit_name} {limit})" if limit is not None else ""
                raise self.resolution_error(
                    f"each side must be a positive multiple of patch_size {patch}{bound}"
                )

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def output_channels(self) -> int:
        """Channels of the model output (twice the latent's with learned sigma)."""
        return int(self.model.out_channels)

    # -- inputs ---------------------------------------------------------------------
    @abstractmethod
    def step_input_specs(self, precision: str) -> list[InputSpec]:
        """Step graph inputs other than caches, each with its role: one ``latents``, one
        ``timestep``, then ``conditioning`` inputs (build constants: :meth:`build_constants`)."""

    def build_constants(self) -> dict[str, torch.Tensor]:
        """Values fixed per build and baked into the graphs (none for most families)."""
        return {}

    def input_specs(self, precision: str) -> list[InputSpec]:
        """Every step input with its role: the graph inputs, then the build constants."""
        specs = self.step_input_specs(precision)
        for name, value in self.build_constants().items():
            specs.append(
                InputSpec(
                    name,
                    DTYPE_NAMES[value.dtype],
                    tuple(value.shape),
                    role="build_constant",
                    value=value.tolist(),
                )
            )
        return specs

    def scheduler_config(self) -> dict[str, Any]:
        """The sampling scheduler's config (``num_train_timesteps`` and family options)."""
        return {"num_train_timesteps": 1000}

    def timestep_range(self) -> tuple[float, float]:
        """Valid graph timesteps: the training schedule's integer steps (DDPM) or the
        flow-matching time scaled to the graph's convention."""
        train_steps = float(self.scheduler_config()["num_train_timesteps"])
        if self.scheduler == "ddpm":
            return (0.0, train_steps - 1)
        return (0.0, train_steps * self.timestep_scale)

    def denoising(self) -> DenoisingSpec:
        return DenoisingSpec(
            latent_layout=self.latent_layout,
            latent_channels=self.latent_channels,
            output_channels=self.output_channels,
            scheduler=self.scheduler,
            scheduler_config=self.scheduler_config(),
            timestep_scale=self.timestep_scale,
            timestep_range=self.timestep_range(),
        )

    def random_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Random valid graph timesteps (float32)."""
        low, high = self.timestep_range()
        if self.scheduler == "ddpm":  # integer timesteps of the training schedule
            return torch.randint(int(low), int(high) + 1, (batch_size,), generator=generator).to(
                torch.float32
            )
        return low + (high - low) * torch.rand(batch_size, generator=generator)

    def conditioning(self) -> dict[str, Any]:
        """Conditioning facts the runtime and validate need (recorded in the manifest)."""
        return self.family_conditioning()

    @abstractmethod
    def family_conditioning(self) -> dict[str, Any]:
        """The family's own conditioning facts: ``kind``, and ``input_ranges`` of
        inputs whose values index tables (class labels) or are flags (masks)."""

    def random_inputs(
        self, batch_size: int, precision: str, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Random but valid step inputs (timestep included), on CPU, drawn in the order of
        :meth:`step_input_specs` (one :meth:`random_input` each)."""
        ranges = self.family_conditioning().get("input_ranges", {})
        return {
            spec.name: self.random_input(spec, batch_size, ranges.get(spec.name), generator)
            for spec in self.step_input_specs(precision)
        }

    def random_input(
        self,
        spec: InputSpec,
        batch_size: int,
        value_range: list[float] | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """One random step input of ``spec``'s dtype and shape (the batch axis
        ``batch_size``): the timestep from :meth:`random_timesteps`, integers uniform over
        ``value_range`` (both ends included), floats standard normal (uniform over
        ``value_range`` when it is given). Families override it for inputs with structure."""
        if spec.role == "timestep":
            return self.random_timesteps(batch_size, generator)
        shape = tuple(batch_size if axis == BATCH_AXIS else int(axis) for axis in spec.shape)
        dtype = torch_dtype(spec.dtype)
        if not dtype.is_floating_point:
            if value_range is None:
                raise ValueError(f"{self.family}: integer input {spec.name!r} needs an input range")
            low, high = (int(v) for v in value_range)
            return torch.randint(low, high + 1, shape, generator=generator, dtype=dtype)
        if value_range is not None:
            low_f, high_f = (float(v) for v in value_range)
            return (low_f + (high_f - low_f) * torch.rand(shape, generator=generator)).to(dtype)
        return torch.randn(shape, generator=generator).to(dtype)

    # -- calling the model ----------------------------------------------------------
    @abstractmethod
    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One denoising step of the unmodified model: the full model output."""

    def use_eager_attention(self) -> None:  # noqa: B027 - optional hook, a no-op for most families
        """Undo export-only changes to the attention processors (for eager baselines)."""

    def noise_prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The part of a model output the scheduler takes (drops learned-variance channels)."""
        axis = self.latent_layout.index("C")
        return output.narrow(axis, 0, self.latent_channels)

    # -- lean reuse graph and gate table --------------------------------------------
    def gated_reuse_parts(self) -> GatedReuseParts | None:
        """The family's reuse math: its gate table (what a reuse step computes from the
        timestep and conditioning alone), the table's inputs, and its gated residual (see
        :class:`GatedReuseParts`); None when the family has none (its reuse step is then
        the plain reuse graph). Called only with every sublayer kind cached. A family
        whose lean reuse step cannot compute its gates apart from the latents overrides
        :meth:`lean_reuse_graph` instead and has no gate table."""
        return None

    def lean_reuse_graph(
        self, input_names: tuple[str, ...], cache_names: tuple[str, ...]
    ) -> nn.Module | None:
        """A reuse step module that skips everything reuse does not need, taking the plain
        reuse graph's step inputs then ``cache_names`` (:meth:`lean_cache_names`): the gate
        table of the step and the gated residual. None when a sublayer kind is not cached
        (it must then run for real, which the plain reuse graph does) or the family has no
        gated reuse parts."""
        if not self.caches_every_kind:
            return None
        parts = self.gated_reuse_parts()
        if parts is None:
            return None
        return LeanReuseStep(parts.table, parts.table_inputs, parts.residual, input_names)

    def gate_table_graphs(self, cache_names: tuple[str, ...]) -> GateTableGraphs | None:
        """The ``gates`` and ``reuse_gated`` modules (see :class:`GateTableGraphs`), or None
        where there is no lean reuse graph."""
        if not self.caches_every_kind:
            return None
        parts = self.gated_reuse_parts()
        if parts is None:
            return None
        return GateTableGraphs(
            table=parts.table.eval(),
            table_inputs=parts.table_inputs,
            gated_reuse=GatedReuseStep(parts.residual).eval(),
        )

    @staticmethod
    def check_precision(precision: str) -> torch.dtype:
        if precision not in TORCH_DTYPES:
            raise ConfigError(f"Precision | got {precision!r} | expected one of {', '.join(TORCH_DTYPES)}")
        return TORCH_DTYPES[precision]
