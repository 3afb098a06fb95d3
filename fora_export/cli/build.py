"""``fora-export build MODEL``: split a model into full/reuse graphs, into an engine folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fora_export.adapters import registry
from fora_export.choices import BUILD_BACKENDS, EXPORTERS, PRECISIONS, REUSE_GRAPHS
from fora_export.cli.exits import user_errors
from fora_export.cli.options import option_group
from fora_runtime.schedule import INTERVAL_MODES

# The families as the help names them; each a one-line change when they come from the family
# registry.
#: MODEL's built-in demo models.
BUILD_HELP = f"""Split MODEL into full/reuse graphs and export them to an engine folder.

MODEL is a local diffusers folder (transformer, or pipeline with transformer/),
a Hub id resolved by diffusers, or a built-in demo model: {registry.demos_text()}.
"""


def _build_config(**options: Any) -> Any:
    from fora_export.builder.config import BuildConfig

    return BuildConfig.from_options(**options)


def build_config_options() -> Any:
    """The build's options, passed to the command as ``config``: a ``BuildConfig``."""
    return option_group(
        "config",
        _build_config,
        click.option(
            "--resolution", default=None, help="Latent size, e.g. 32 or 32x32. [default: the model's]"
        ),
        click.option("--batch", default="1:2:8", show_default=True, help="Batch range MIN:OPT:MAX."),
        click.option(
            "--interval",
            type=int,
            default=3,
            show_default=True,
            help="Default cache interval N recorded in the manifest (1 = no caching).",
        ),
        click.option(
            "--schedule-mode",
            type=click.Choice(INTERVAL_MODES),
            default="paper",
            show_default=True,
            help="How 'every N steps' is counted (see docs/caching.md, Schedules).",
        ),
        click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            default="fp32",
            show_default=True,
            help="Tensor types of the exported graphs.",
        ),
        click.option(
            "--opset", type=int, default=None, help="ONNX opset. [default: 17 torchscript, 18 dynamo]"
        ),
        click.option(
            "--exporter",
            type=click.Choice(EXPORTERS),
            default=None,
            help=f"torch.onnx exporter. [default: the family's: {registry.exporter_defaults_text()}]",
        ),
        click.option(
            "--fp32-islands/--no-fp32-islands",
            default=True,
            show_default=True,
            help="Run LayerNorm and Softmax in fp32 inside fp16/bf16 graphs (see docs/cli.md, Precision).",
        ),
        click.option(
            "--cache",
            default=None,
            help="Sublayer kinds to cache, e.g. attn1,attn2,ff. [default: all the family caches]",
        ),
        click.option(
            "--text-length",
            "--caption-length",
            "text_length",
            type=int,
            default=None,
            help=f"Text tokens per prompt, fixed per build ({registry.text_length_defaults_text()}).",
        ),
        click.option(
            "--backend",
            type=click.Choice(BUILD_BACKENDS),
            default="auto",
            show_default=True,
            help="Besides ONNX: tensorrt engines, tensorrt-rtx plans (RTX GPUs; built without a GPU), "
            "torch.export programs, or auto (TensorRT when present).",
        ),
        click.option(
            "--reuse-graph",
            type=click.Choice(REUSE_GRAPHS),
            default="lean",
            show_default=True,
            help="lean: reuse computes only gates and the residual sum where the family has such a "
            "step (info shows which a folder got); plain: blocks with replayed sublayers.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="Where --backend torch traces its programs (they run there): auto, cpu, cuda[:N].",
        ),
        click.option(
            "--opt-level",
            "trt_opt_level",
            type=int,
            default=3,
            show_default=True,
            help="TensorRT builder optimization level (0-5).",
        ),
        click.option(
            "--workspace",
            "trt_workspace_mib",
            type=int,
            default=None,
            help="TensorRT workspace limit in MiB. [default: TensorRT's]",
        ),
        click.option(
            "--compute-capabilities",
            "trt_compute_capabilities",
            default=None,
            help="TensorRT-RTX target GPUs, e.g. 8.6,8.9,12.0 (7.5: Turing, fp16 only). "
            "[default: 8.6,8.9,12.0]",
        ),
        click.option(
            "--frames",
            type=int,
            default=None,
            help=f"Latent frames, fixed per build. [default: the family's: {registry.video_families_text()}]",
        ),
        click.option(
            "--subfolder",
            default=None,
            help="The pipeline folder's transformer to build, e.g. transformer_2 (Wan 2.2's low-noise "
            "expert).",
        ),
        click.option(
            "--max-cache-gib",
            type=float,
            default=None,
            help="Refuse a build whose caches at the largest batch exceed this (lists the --cache subsets "
            "that fit).",
        ),
        click.option(
            "--forecast",
            is_flag=True,
            help="Also export the forecast reuse graph: caches forecast from the last two full steps "
            "(gate-table families; doubles the cache memory).",
        ),
    )


def default_out(model: str) -> Path:
    name = Path(model.rstrip("/")).name or "model"
    return Path("engines") / name


@click.command(help=BUILD_HELP)
@click.argument("model")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Engine folder to write. [default: engines/<model name>]",
)
@build_config_options()
@click.option("--force", is_flag=True, help="Replace an existing engine folder.")
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    default=None,
    help="Sign the manifest with this key file (HMAC-SHA256): runtimes holding the key trust the folder.",
)
@user_errors
def build(model: str, out: Path | None, config: Any, force: bool, sign_key: Path | None) -> None:
    from fora_export.builder.pipeline import build as run_build
    from fora_runtime.trust import resolve_manifest_key

    key = resolve_manifest_key(key_file=sign_key) if sign_key is not None else None  # a bad key fails now
    result = run_build(model, out or default_out(model), config, force=force, sign_key=key)
    manifest = result.manifest
    sizes = {name: rec["bytes"] for name, rec in manifest.files.items()}
    click.echo(
        f"built {result.folder} in {result.seconds:.1f} s: {manifest.model_class}, "
        f"{len(manifest.caches)} cache tensors, {manifest.precision}, batch {manifest.batch}, "
        f"latent {manifest.resolution[0]}x{manifest.resolution[1]}, {manifest.schedule.describe()}"
    )
    click.echo(f"  {result.backend_note}")
    if key is not None:
        click.echo(f"  signed: {result.folder / 'manifest.json.hmac'} (HMAC-SHA256 under {sign_key})")
    width = max(16, *(len(name) for name in sizes))
    for name, size in sizes.items():
        click.echo(f"  {name:<{width}} {size / 2**20:8.1f} MiB")
