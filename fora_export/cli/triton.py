"""``fora-export triton ENGINE_DIR``: a Triton Inference Server model of the engines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fora_export.cli.exits import user_errors
from fora_export.cli.options import LoadedChoice, engine_dir_argument, folder_options


def _instance_kinds() -> tuple[str, ...]:
    from fora_runtime.serving.instances import INSTANCE_KINDS

    return INSTANCE_KINDS


def _backends() -> tuple[str, ...]:
    from fora_export.serving.triton_repo import BACKENDS

    return ("auto", *BACKENDS)


@click.command()
@engine_dir_argument()
@click.option(
    "--out",
    "repository",
    type=click.Path(path_type=Path),
    required=True,
    help="Model repository to write into.",
)
@click.option("--name", default="fora", show_default=True, help="Model name (its folder in the repository).")
@click.option(
    "--instances", type=int, default=1, show_default=True, help="Model instances (one per GPU on GPUs)."
)
@click.option(
    "--kind", type=LoadedChoice(_instance_kinds), default="cpu", show_default=True, help="Instance kind."
)
@click.option(
    "--max-batch",
    type=int,
    default=None,
    help="Most samples per request and per batch. [default: the build's max]",
)
@click.option(
    "--backend",
    type=LoadedChoice(_backends),
    default="auto",
    show_default=True,
    help="Runtime backend (auto: TensorRT, torch, ONNX Runtime on GPUs; ONNX Runtime on CPUs).",
)
@click.option(
    "--pipeline",
    type=click.Path(path_type=Path),
    default=None,
    help="diffusers pipeline folder whose scheduler/scheduler_config.json drives the loop. [default: DDIM]",
)
@click.option(
    "--dynamic-batching/--no-dynamic-batching",
    default=True,
    show_default=True,
    help="Let Triton batch concurrent requests into one execute().",
)
@click.option(
    "--max-queue-delay-us", type=int, default=2000, show_default=True, help="Dynamic batcher delay."
)
@click.option(
    "--threads", type=int, default=0, show_default=True, help="ONNX Runtime threads (0: its default)."
)
@click.option(
    "--python-path",
    multiple=True,
    help="Site-packages folder the server's Python stub adds before importing fora_runtime (repeatable).",
)
@click.option("--force", is_flag=True, help="Replace a model of that name this command wrote before.")
@folder_options()
@user_errors
def triton(
    engine_dir: Path,
    repository: Path,
    name: str,
    instances: int,
    kind: str,
    max_batch: int | None,
    backend: str,
    pipeline: Path | None,
    dynamic_batching: bool,
    max_queue_delay_us: int,
    threads: int,
    python_path: tuple[str, ...],
    force: bool,
    access: Any,
) -> None:
    """Write a Triton Inference Server model that runs ENGINE_DIR's generations (see docs/serving.md)."""
    from fora_export.serving.triton_repo import TritonModelConfig, write_triton_model

    config = TritonModelConfig(
        name=name,
        instances=instances,
        kind=kind,
        max_batch=max_batch,
        backend=backend,
        dynamic_batching=dynamic_batching,
        max_queue_delay_us=max_queue_delay_us,
        threads=threads,
        python_path=python_path,
        trust_programs=access.trust_programs,
    )
    written = write_triton_model(
        engine_dir, repository, config, pipeline=pipeline, force=force, access=access
    )
    spec = written.spec
    click.echo(
        f"wrote {written.folder}: {instances} {kind} instance(s), {written.backend}, {written.scheduler}, "
        f"up to {spec.max_batch} samples per request, dynamic batching {'on' if dynamic_batching else 'off'}"
    )
    click.echo(f"  inputs: {', '.join(t.name for t in spec.inputs())}; output: {spec.outputs()[0].name}")
    click.echo(f"  serve:  python tools/serve_triton.py {repository}")
