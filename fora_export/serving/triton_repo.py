"""``fora-export triton``: a Triton Inference Server model repository from an engine folder.

One Triton model runs one whole FORA generation per request in-process with
``ForaSession`` (a generation is a loop whose caches stay on the device:
ensembles cannot loop, and a round trip per step would copy the caches). The
model folder written here is self-contained::

    REPOSITORY/NAME/
      config.pbtxt              inputs, outputs, dynamic batching, instance groups, fora_* parameters
      fora_model.json           what wrote it (lets --force replace it, and only it)
      1/model.py                the Python-backend model (fora_runtime/serving/triton_model.py)
      1/engine/                 a copy of the engine folder (verified against its manifest)
      1/scheduler_config.json   diffusers-format scheduler config driving the loop

The default scheduler is DDIM, run by the runtime's numpy sampler; ``--pipeline``
copies the pipeline's ``scheduler/scheduler_config.json`` instead (DDIM configs
still run in numpy; other classes make model.py import diffusers).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fora_export.errors import BuildError, ConfigError
from fora_runtime import serving as runtime_serving
from fora_runtime.manifest import (
    MANIFEST_NAME,
    GraphRole,
    Manifest,
    contained_file,
    graph_file,
    load_manifest,
)
from fora_runtime.serving.ddim import DDIM_CLASS_NAME, DDIM_DEFAULTS, DDIMSampler
from fora_runtime.serving.instances import INSTANCE_KINDS
from fora_runtime.serving.requests import ServedTensor, ServingSpec
from fora_runtime.trust import DEFAULT_ACCESS, SIGNATURE_NAME, FolderAccess

log = logging.getLogger(__name__)

CONFIG_NAME = "config.pbtxt"
MARKER_NAME = "fora_model.json"
VERSION = "1"
ENGINE_SUBDIR = "engine"
SCHEDULER_NAME = "scheduler_config.json"
BACKENDS = ("onnxruntime", "torch", "tensorrt")
#: The files each runtime backend needs in the engine folder.
_BACKEND_FILE = {
    backend: graph_file(GraphRole.FULL, kind)
    for backend, kind in (("onnxruntime", "onnx"), ("torch", "torch"), ("tensorrt", "tensorrt"))
}
#: The Python-backend model copied as model.py: a module of the runtime's serving package (it
#: runs on fora_runtime alone), linted and type-checked, never imported here (it imports
#: triton_python_backend_utils, which only Triton's stub has).
MODEL_TEMPLATE = Path(runtime_serving.__file__).with_name("triton_model.py")
_TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
}


@dataclass(frozen=True)
class TritonModelConfig:
    """How the served model runs (the command-line options of ``fora-export triton``)."""

    name: str = "fora"
    instances: int = 1
    kind: str = "cpu"
    max_batch: int | None = None
    backend: str = "auto"
    dynamic_batching: bool = True
    max_queue_delay_us: int = 2000
    threads: int = 0
    python_path: tuple[str, ...] = ()
    #: Vouch for the engine folder: the instances may load torch programs (``--trust``).
    trust_programs: bool = False

    def check(self) -> None:
        if not self.name or self.name.startswith(".") or "/" in self.name or self.name != self.name.strip():
            raise ConfigError(f"--name | got {self.name!r} | expected a plain folder name, e.g. fora_dit")
        if self.instances < 1:
            raise ConfigError(f"--instances | got {self.instances} | expected >= 1")
        if self.kind not in INSTANCE_KINDS:
            raise ConfigError(f"--kind | got {self.kind!r} | expected one of {', '.join(INSTANCE_KINDS)}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"--max-queue-delay-us | got {self.max_queue_delay_us} | expected >= 0")
        if self.threads < 0:
            raise ConfigError(f"--threads | got {self.threads} | expected >= 0 (0 = ONNX Runtime's default)")


@dataclass(frozen=True)
class WrittenModel:
    folder: Path
    backend: str
    spec: ServingSpec
    scheduler: str


def resolve_backend(
    requested: str, kind: str, manifest: Manifest, engine_dir: Path, *, trusted: bool = False
) -> str:
    """The runtime backend the instances use; ``auto``: TensorRT engines, then torch
    programs (trusted folders only: they run code when loaded) on GPU instances, ONNX Runtime
    on CPU ones."""
    present = [b for b in BACKENDS if _BACKEND_FILE[b] in manifest.files]
    if requested == "auto":
        order: tuple[str, ...] = ("tensorrt", "torch", "onnxruntime") if kind == "gpu" else ("onnxruntime",)
        if not trusted:
            order = tuple(b for b in order if b != "torch")
        for backend in order:
            if backend in present:
                return backend
        requested = order[-1]
    if requested not in BACKENDS:
        raise ConfigError(f"--backend | got {requested!r} | expected auto or one of {', '.join(BACKENDS)}")
    if requested not in present:
        raise ConfigError(
            f"--backend {requested} | {engine_dir} has no {_BACKEND_FILE[requested]} | build it with "
            f"`fora-export build ... --backend {'onnx' if requested == 'onnxruntime' else requested}`, "
            f"or choose one of {present}"
        )
    if requested == "tensorrt" and kind != "gpu":
        raise ConfigError("--backend tensorrt | needs GPU instances | pass --kind gpu")
    return requested


def scheduler_config(manifest: Manifest, pipeline: Path | None) -> dict[str, object]:
    """The scheduler config the served loop runs: the pipeline's, or DDIM's defaults with
    the model's training timesteps (clip_sample off, as DiT's and PixArt's pipelines)."""
    if pipeline is None:
        config: dict[str, object] = {
            "_class_name": DDIM_CLASS_NAME,
            **DDIM_DEFAULTS,
            "clip_sample": False,
            "num_train_timesteps": manifest.denoising.num_train_timesteps if manifest.denoising else 1000,
        }
        return config
    path = pipeline / "scheduler" / SCHEDULER_NAME
    if not path.is_file():
        raise ConfigError(
            f"--pipeline {pipeline} | has no scheduler/{SCHEDULER_NAME} | pass a diffusers pipeline "
            "folder (save_pretrained), or leave --pipeline out for DDIM"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} | is not valid JSON ({err}) | pass a diffusers scheduler config") from err
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise ConfigError(f"{path} | has no _class_name | pass a diffusers scheduler config")
    if config["_class_name"] == DDIM_CLASS_NAME:
        DDIMSampler(config)  # refuses what the numpy sampler does not implement, now
    return config


def write_triton_model(
    engine_dir: Path,
    repository: Path,
    config: TritonModelConfig,
    *,
    pipeline: Path | None = None,
    force: bool = False,
    access: FolderAccess = DEFAULT_ACCESS,
) -> WrittenModel:
    """Write ``repository/<name>`` atomically: built in a hidden sibling folder of the
    repository and moved into place when complete. Only the manifest, its signature and the
    files it lists are copied (each checked to lie inside ``engine_dir``)."""
    config.check()
    manifest = load_manifest(engine_dir, **access.manifest_options())  # verifies every file before the copy
    backend = resolve_backend(
        config.backend, config.kind, manifest, engine_dir, trusted=config.trust_programs
    )
    spec = ServingSpec.from_manifest(manifest, max_batch=config.max_batch)
    scheduler = scheduler_config(manifest, pipeline)
    target = repository / config.name
    _check_repository(repository, target, force)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.name}-", dir=repository.parent))
    try:
        version = staging / VERSION
        version.mkdir()
        shutil.copy2(MODEL_TEMPLATE, version / "model.py")
        _copy_engine_folder(engine_dir, manifest, version / ENGINE_SUBDIR)
        (version / SCHEDULER_NAME).write_text(json.dumps(scheduler, indent=2) + "\n")
        (staging / CONFIG_NAME).write_text(config_pbtxt(spec, config, backend))
        marker = {
            "written_by": "fora-export triton",
            "engine_dir": str(engine_dir.resolve()),
            "config_hash": manifest.config_hash,
            "model_class": manifest.model_class,
            "backend": backend,
            "scheduler": scheduler["_class_name"],
        }
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote Triton model %s (%s, %s)", target, backend, scheduler["_class_name"])
    return WrittenModel(target, backend, spec, str(scheduler["_class_name"]))


def _copy_engine_folder(engine_dir: Path, manifest: Manifest, target: Path) -> None:
    """The engine folder's manifest, signature and listed files, nothing else: a stray symlink
    in the folder is not followed into the repository."""
    target.mkdir()
    names = [MANIFEST_NAME, *manifest.files]
    if (engine_dir / SIGNATURE_NAME).is_file():
        names.append(SIGNATURE_NAME)
    for name in names:
        shutil.copy2(contained_file(engine_dir, name), target / name)


def _check_repository(repository: Path, target: Path, force: bool) -> None:
    if repository.exists() and not repository.is_dir():
        raise BuildError(f"--out {repository} | is a file | pass a model repository folder")
    if repository.is_dir():
        strangers = [
            p.name
            for p in repository.iterdir()
            if not p.name.startswith(".") and not (p.is_dir() and (p / CONFIG_NAME).is_file())
        ]
        if strangers:
            raise BuildError(
                f"--out {repository} | is not a Triton model repository (holds {sorted(strangers)[:3]}) "
                "| pass an empty or new folder, or an existing model repository"
            )
    if target.exists():
        if not (target / MARKER_NAME).is_file():
            raise BuildError(
                f"{target} | is a model this tool did not write | choose another --name, or remove it"
            )
        if not force:
            raise BuildError(f"{target} | exists | pass --force to replace it")


def _tensor_block(tensor: ServedTensor) -> str:
    dims = ", ".join(str(d) for d in tensor.shape)
    optional = " optional: true" if tensor.optional else ""
    return (
        f'  {{ name: "{tensor.name}" data_type: {_TRITON_DTYPES[tensor.dtype]} dims: [ {dims} ]{optional} }}'
    )


def config_pbtxt(spec: ServingSpec, config: TritonModelConfig, backend: str) -> str:
    """``config.pbtxt`` of the served model."""
    params = {
        "fora_engine": ENGINE_SUBDIR,
        "fora_backend": backend,
        "fora_scheduler": SCHEDULER_NAME,
        "fora_threads": str(config.threads),
        "fora_python_path": json.dumps(list(config.python_path)),
        "fora_trust_programs": "true" if config.trust_programs else "false",
    }
    lines = [
        f'name: "{config.name}"',
        'backend: "python"',
        f"max_batch_size: {spec.max_batch}",
        "input [",
        ",\n".join(_tensor_block(t) for t in spec.inputs()),
        "]",
        "output [",
        ",\n".join(_tensor_block(t) for t in spec.outputs()),
        "]",
        f"instance_group [ {{ count: {config.instances} kind: KIND_{config.kind.upper()} }} ]",
    ]
    if config.dynamic_batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {config.max_queue_delay_us} }}")
    lines.append("parameters [")
    lines.append(
        ",\n".join(
            f'  {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}'
            for key, value in params.items()
        )
    )
    lines.append("]")
    return "\n".join(lines) + "\n"
