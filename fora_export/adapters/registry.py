"""The one family registry: every model family and every built-in demo model, declared once.

- :class:`FamilySpec`: a family's adapter (its file in ``fora_export/adapters/``), the
  diffusers transformer class it serves and the pipeline classes built around it;
- :class:`DemoSpec`: a built-in demo model (``demo-*``): how to make it (a maker of
  seeded random weights, or trained weights shipped in the package), its demo pipeline
  maker, the build options it needs (where its family's defaults are real-model sizes)
  and a one-line description.

Loading, sampling, the demos and the CLI help look families and demos up here. The
module imports only the standard library; adapters and makers are named as
``"module:attribute"`` and imported when first used, so ``fora-export --help`` can list
families and demos without importing torch.

Adding a family: its adapter file, one :class:`FamilySpec` in :data:`FAMILIES` (and a
:class:`DemoSpec` in :data:`DEMOS` for its demo model, if it has one).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fora_export.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fora_export.adapters.base import AdapterOptions, ModelAdapter


def _resolve(ref: str) -> Any:
    """The attribute a ``"module:attribute"`` reference names (imported on first use)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class FamilySpec:
    """One model family."""

    #: The family's name (``ModelAdapter.family``, the manifest's ``family``).
    name: str
    #: How people write it (help texts and messages).
    title: str
    #: The diffusers transformer class it serves (``ModelAdapter.model_class``).
    model_class: str
    #: Its adapter class, as ``"module:Class"``.
    adapter: str
    #: The diffusers pipeline classes whose ``transformer`` it is.
    pipeline_classes: tuple[str, ...]
    #: Build defaults, where the build gives none (data, so help texts need no torch):
    #: text tokens per prompt (None: the family takes no text: class-conditional),
    text_length: int | None = None
    #: latent frames (None: not a video family),
    frames: int | None = None
    #: and the torch.onnx exporter its graphs need (``--exporter`` overrides).
    exporter: str = "torchscript"

    @property
    def adapter_class(self) -> type[ModelAdapter]:
        adapter: type[ModelAdapter] = _resolve(self.adapter)
        return adapter


@dataclass(frozen=True)
class DemoSpec:
    """One built-in demo model (a MODEL name for ``build``, a ``--pipeline`` for ``sample``)."""

    name: str
    #: The family of its transformer (a :class:`FamilySpec` name).
    family: str
    #: One line for the CLI help.
    description: str
    #: A zero-argument maker of the model with seeded random weights, as ``"module:function"``;
    #: None for a demo with trained weights (:attr:`weights`).
    model: str | None = None
    #: The package folder of trained weights (a save_pretrained folder), as
    #: ``"module:PATH_CONSTANT"``; with :attr:`trained_by`, the command that writes it.
    weights: str | None = None
    trained_by: str | None = None
    #: ``maker(transformer) -> pipeline`` of its demo pipeline (``demo_pipelines.py``), as
    #: ``"module:function"``; None when it has none.
    pipeline: str | None = None
    #: Build options used where the build gives none (latent ``resolution``, ``text_length``,
    #: ``frames``): for demos whose family defaults are real-model sizes.
    build_defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def weights_folder(self) -> Path | None:
        folder: Path | None = _resolve(self.weights) if self.weights else None
        return folder

    @property
    def factory(self) -> Any:
        """The maker of :attr:`model`, ``factory(config=None, seed=...)`` (a config of the
        family's shape, seeded random weights); None for trained demos."""
        return _resolve(self.model) if self.model is not None else None

    def make_model(self) -> nn.Module:
        """The demo model with random weights (trained demos load through ``load_model``)."""
        if self.model is None:
            raise ValueError(f"{self.name} has trained weights: load it with fora_export.loading.load_model")
        model: nn.Module = _resolve(self.model)()
        return model

    def make_pipeline(self) -> Any:
        """Its demo pipeline: the demo transformer in a pipeline of small random components."""
        if self.pipeline is None:
            raise ValueError(f"{self.name} has no demo pipeline")
        return _resolve(self.pipeline)(self.make_model())


_ADAPTERS = "fora_export.adapters"
FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("dit", "DiT", "DiTTransformer2DModel", f"{_ADAPTERS}.dit:DiTAdapter", ("DiTPipeline",)),
    FamilySpec(
        "pixart",
        "PixArt",
        "PixArtTransformer2DModel",
        f"{_ADAPTERS}.pixart:PixArtAdapter",
        ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
        text_length=120,
    ),
    FamilySpec(
        "flux",
        "Flux.1",
        "FluxTransformer2DModel",
        f"{_ADAPTERS}.flux:FluxAdapter",
        ("FluxPipeline",),
        text_length=512,
        exporter="dynamo",
    ),
    FamilySpec(
        "sd3",
        "SD3",
        "SD3Transformer2DModel",
        f"{_ADAPTERS}.sd3:SD3Adapter",
        ("StableDiffusion3Pipeline",),
        # StableDiffusion3Pipeline's prompt: 77 CLIP tokens + 256 T5 tokens (max_sequence_length).
        text_length=333,
    ),
    FamilySpec(
        "wan",
        "Wan",
        "WanTransformer3DModel",
        f"{_ADAPTERS}.wan:WanAdapter",
        ("WanPipeline", "WanImageToVideoPipeline"),
        text_length=512,
        frames=21,
        exporter="dynamo",
    ),
    FamilySpec(
        "qwenimage",
        "Qwen-Image",
        "QwenImageTransformer2DModel",
        f"{_ADAPTERS}.qwenimage:QwenImageAdapter",
        ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
        # QwenImagePipeline's default max_sequence_length (prompt tokens after its template).
        text_length=512,
        exporter="dynamo",
    ),
)

#: "Text" tokens of demo-digits-flow's class table (its encoder_hidden_states), so its build length.
DIGITS_FLOW_TEXT_LENGTH = 4

_DEMO = "fora_export.demo"
_PIPELINES = "fora_export.demo_pipelines"
DEMOS: tuple[DemoSpec, ...] = (
    DemoSpec(
        "demo-dit",
        "dit",
        "a small DiT (random weights)",
        model=f"{_DEMO}:make_demo_dit",
        pipeline=f"{_PIPELINES}:make_dit_pipeline",
    ),
    DemoSpec(
        "demo-dit-xl",
        "dit",
        "DiT-XL/2's shape at 256px (random weights, 3 GB in fp32: for GPU benchmarks)",
        model=f"{_DEMO}:make_demo_dit_xl",
    ),
    DemoSpec(
        "demo-pixart",
        "pixart",
        "a small PixArt (random weights)",
        model=f"{_DEMO}:make_demo_pixart",
        pipeline=f"{_PIPELINES}:make_pixart_pipeline",
    ),
    DemoSpec(
        "demo-digits",
        "dit",
        "a DiT trained on scikit-learn's digits",
        weights=f"{_DEMO}:DEMO_DIGITS_DIR",
        trained_by="python tools/train_digits.py --family dit",
    ),
    DemoSpec(
        "demo-digits-flow",
        "sd3",
        "an SD3 MMDiT trained on the digits by flow matching",
        weights=f"{_DEMO}:DEMO_DIGITS_FLOW_DIR",
        trained_by="python tools/train_digits.py --family sd3",
        build_defaults=MappingProxyType({"text_length": DIGITS_FLOW_TEXT_LENGTH}),
    ),
    DemoSpec(
        "demo-flux",
        "flux",
        "a small Flux.1-dev (random weights)",
        model=f"{_DEMO}:make_demo_flux",
        pipeline=f"{_PIPELINES}:make_flux_pipeline",
        build_defaults=MappingProxyType({"resolution": (32, 32), "text_length": 64}),
    ),
    DemoSpec(
        "demo-sd3",
        "sd3",
        "a small SD3.5-Medium (random weights)",
        model=f"{_DEMO}:make_demo_sd3",
        pipeline=f"{_PIPELINES}:make_sd3_pipeline",
        build_defaults=MappingProxyType({"text_length": 64}),
    ),
    DemoSpec(
        "demo-wan",
        "wan",
        "a small Wan 2.1 T2V (random weights)",
        model=f"{_DEMO}:make_demo_wan",
        pipeline=f"{_PIPELINES}:make_wan_pipeline",
        build_defaults=MappingProxyType({"resolution": (16, 16), "text_length": 64, "frames": 5}),
    ),
    DemoSpec(
        "demo-qwenimage",
        "qwenimage",
        "a small Qwen-Image (random weights)",
        model=f"{_DEMO}:make_demo_qwenimage",
        pipeline=f"{_PIPELINES}:make_qwenimage_pipeline",
        build_defaults=MappingProxyType({"resolution": (32, 32), "text_length": 64}),
    ),
)

_BY_CLASS: dict[str, FamilySpec] = {spec.model_class: spec for spec in FAMILIES}
_BY_DEMO: dict[str, DemoSpec] = {spec.name: spec for spec in DEMOS}


# -- families ---------------------------------------------------------------------------
def supported_classes() -> tuple[str, ...]:
    """The diffusers transformer classes with an adapter."""
    return tuple(_BY_CLASS)


def family_spec(name: str) -> FamilySpec:
    """The family named ``name`` (``ModelAdapter.family``)."""
    for spec in FAMILIES:
        if spec.name == name:
            return spec
    raise KeyError(name)


def family_for_pipeline(pipeline_class: str) -> FamilySpec | None:
    """The family whose transformer a diffusers pipeline class holds (None: not one of ours)."""
    return next((spec for spec in FAMILIES if pipeline_class in spec.pipeline_classes), None)


def adapter_class_for(class_name: str, *, where: str = "model") -> type[ModelAdapter]:
    return family_for_class(class_name, where=where).adapter_class


def adapter_for(
    model: nn.Module, options: AdapterOptions | None = None, *, where: str = "model"
) -> ModelAdapter:
    """The adapter of ``model``'s family, with the build ``options`` (sizes checked)."""
    return adapter_class_for(type(model).__name__, where=where)(model, options)


def supported_families_text() -> str:
    """``DiT (DiTTransformer2DModel), PixArt (...), ...`` for help texts."""
    return ", ".join(f"{spec.title} ({spec.model_class})" for spec in FAMILIES)


def family_for_class(class_name: str, *, where: str = "model") -> FamilySpec:
    """The family serving diffusers class ``class_name`` (ConfigError: none does)."""
    spec = _BY_CLASS.get(class_name)
    if spec is None:
        raise ConfigError(
            f"{where} | model class {class_name!r} is not supported | supported: "
            f"{', '.join(supported_classes())}"
        )
    return spec


def text_length_defaults_text() -> str:
    """``PixArt: 120, SD3: 333, ...``: each text family's default ``--text-length``."""
    return ", ".join(f"{spec.title}: {spec.text_length}" for spec in FAMILIES if spec.text_length is not None)


def exporter_defaults_text() -> str:
    """``torchscript for DiT, PixArt, SD3; dynamo for Flux.1, Wan``: each family's default
    ``--exporter``."""
    by_exporter: dict[str, list[str]] = {}
    for spec in FAMILIES:
        by_exporter.setdefault(spec.exporter, []).append(spec.title)
    return "; ".join(f"{exporter} for {', '.join(titles)}" for exporter, titles in by_exporter.items())


def video_families_text() -> str:
    """The families with a frame axis (``--frames``) and their default frame counts."""
    return ", ".join(f"{spec.title}: {spec.frames}" for spec in FAMILIES if spec.frames is not None)


def class_label_families_text() -> str:
    """The class-conditional families (they take no text: class labels)."""
    return ", ".join(spec.title for spec in FAMILIES if spec.text_length is None)


# -- demos ------------------------------------------------------------------------------
def demo_names() -> tuple[str, ...]:
    """Every built-in demo model name."""
    return tuple(_BY_DEMO)


def demo_pipeline_names() -> tuple[str, ...]:
    """The demos with a demo pipeline (``sample --pipeline``)."""
    return tuple(spec.name for spec in DEMOS if spec.pipeline is not None)


def find_demo(name: str) -> DemoSpec | None:
    """The demo called ``name`` (None: not a demo name)."""
    return _BY_DEMO.get(name)


def demo_spec(name: str) -> DemoSpec:
    spec = _BY_DEMO.get(name)
    if spec is None:
        raise ConfigError(f"Demo | got {name!r} | built-in demos: {', '.join(demo_names())}")
    return spec


def demos_text() -> str:
    """``demo-dit (a small DiT (random weights)), ...`` for help texts."""
    return ", ".join(f"{spec.name} ({spec.description})" for spec in DEMOS)


def make_demo_pipeline(name: str) -> Any:
    """The demo pipeline called ``name`` (see :meth:`DemoSpec.make_pipeline`)."""
    spec = _BY_DEMO.get(name)
    if spec is None or spec.pipeline is None:
        raise ConfigError(
            f"--pipeline | got {name!r} | built-in pipelines: {', '.join(demo_pipeline_names())}"
        )
    return spec.make_pipeline()
