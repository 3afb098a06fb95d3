"""What ``fora-export info --inspect`` shows of an engine folder's TensorRT plans.

polygraphy's engine inspection (``polygraphy inspect model``'s text: IO tensors with
shapes and dtypes per optimization profile, device memory, optionally the layers) for
every plan in the manifest's TensorRT record. Deserialising a plan needs the TensorRT
that built it and a GPU of its compute capability, so where either is missing the
command says why in one line instead. polygraphy loads plans through the ``tensorrt``
module: TensorRT-RTX plans (``tensorrt_rtx_bindings``) are not inspected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fora_export.errors import ConfigError
from fora_runtime.backends.trt_flavor import DATACENTER, flavor_of
from fora_runtime.errors import BackendError
from fora_runtime.manifest import MANIFEST_NAME, Manifest


def inspect_plans(
    folder: Path, manifest: Manifest, *, trusted: bool = False, layers: bool = False
) -> dict[str, str]:
    """role -> polygraphy's description of that role's plan (see the module docstring).

    polygraphy deserialises plans with the plugin libraries registered and embedded host
    code allowed: only for a folder the caller trusts (``--trust``, or a signed manifest)."""
    if not trusted:
        raise ConfigError(
            f"--inspect | polygraphy loads {folder}'s plans with TensorRT plugins and embedded host code "
            "allowed, and the folder is not trusted | pass --trust for a folder you trust, or sign it "
            "(build --sign-key) and pass its key"
        )
    record = manifest.backends.get("tensorrt")
    where = str(Path(folder) / MANIFEST_NAME)
    if not isinstance(record, dict) or not isinstance(record.get("engines"), dict):
        raise ConfigError(f"--inspect | {folder} holds no TensorRT plans | build with --backend tensorrt")
    flavor = flavor_of(record, where=where)
    if flavor is not DATACENTER:
        raise ConfigError(
            f"--inspect | {folder} holds {flavor.title} plans, which polygraphy loads only through the "
            "tensorrt module | inspect datacenter TensorRT engines, or see `fora-export info` for the record"
        )
    try:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import util as trt_util
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError as err:
        raise ConfigError(
            f"--inspect | polygraphy is not installed ({err}) | pip install 'fora-export[gpu]'"
        ) from err
    try:
        flavor.load(backend="tensorrt")  # the installed TensorRT, or why not, in one line
    except BackendError as err:
        raise ConfigError(f"--inspect | {err}") from err
    described: dict[str, str] = {}
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        for role, file in record["engines"].items():
            path = Path(folder) / str(file)
            try:
                engine: Any = EngineFromBytes(BytesFromPath(str(path)))()
            except (PolygraphyException, RuntimeError) as err:
                reason = " ".join(str(err).split())
                raise ConfigError(
                    f"--inspect | {path} | TensorRT cannot deserialize it here ({reason}) "
                    "| inspect it on a GPU like the one that built it, with the TensorRT that built it"
                ) from err
            context = engine.create_execution_context()
            described[role] = trt_util.str_from_engine(engine, context, show_layers=layers)
    return described
