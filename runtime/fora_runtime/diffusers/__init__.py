"""Engines as ``pipe.transformer`` of an unmodified diffusers pipeline.

    from diffusers import DiTPipeline
    from fora_runtime.diffusers import enable_fora

    pipe = enable_fora(DiTPipeline.from_pretrained("dit-folder"), "engines/dit")
    image = pipe(class_labels=[207], num_inference_steps=20).images[0]

- :mod:`~fora_runtime.diffusers.facade`: :class:`ForaTransformer` (the diffusers
  ``ModelMixin``), :func:`enable_fora`; the one runtime module that imports diffusers
  and torch (the extra ``fora-runtime[diffusers]``).
- :mod:`~fora_runtime.diffusers.tracker`: which calls form one generation (pure).

The facade is imported on first use of its names, so the tracker imports without
diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fora_runtime.diffusers.tracker import PipelineError

if TYPE_CHECKING:
    from fora_runtime.diffusers.facade import ForaTransformer, enable_fora

__all__ = ["ForaTransformer", "PipelineError", "enable_fora"]


def __getattr__(name: str) -> Any:
    if name in ("ForaTransformer", "enable_fora"):
        from fora_runtime.diffusers import facade

        return getattr(facade, name)
    raise AttributeError(f"module 'fora_runtime.diffusers' has no attribute {name!r}")
