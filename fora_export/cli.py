"""``fora-export``: build, validate and bench FORA engine folders.

Exit codes: 0 success; 1 validation failed; 2 bad input (any user error, usage errors
included, printed as one line ``error: subject | problem | fix`` without a traceback);
130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM); nothing is left half-written
either way. Bugs keep their traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from fora_runtime.errors import ForaError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shells' convention
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that every ``finally``
    and ``except BaseException`` cleanup (the build's hidden folder, atomic writes) runs."""


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _user_errors(func: F) -> F:
    """Turn ForaErrors (and a full disk) into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ForaError as err:
            _fail(str(err))
        except OSError as err:
            from fora_export.outputs import NO_SPACE, disk_full_error

            if err.errno not in NO_SPACE:
                raise
            _fail(str(disk_full_error(err.filename or "(a file this command wrote)", None, err)))

    return wrapper  # type: ignore[return-value]


def _usage_message(err: click.UsageError) -> str:
    """A click usage error as ``subject | problem | fix``."""
    ctx = err.ctx
    command = ctx.command_path if ctx is not None else "fora-export"
    fix = f"see `{command} --help`"
    if isinstance(err, click.NoSuchOption):
        hint = f"; did you mean {', '.join(sorted(err.possibilities))}?" if err.possibilities else ""
        return f"{err.option_name} | no such option of `{command}`{hint} | {fix}"
    if isinstance(err, click.BadParameter | click.MissingParameter) and err.param is not None:
        subject = err.param.get_error_hint(ctx) if ctx is not None else str(err.param.name)
        subject = subject.replace("'", "")
        problem = "missing" if isinstance(err, click.MissingParameter) else err.message.rstrip(".")
        return f"{subject} | {problem} | {fix}"
    return f"{command} | {err.message.rstrip('.')} | {fix}"


@contextmanager
def _termination_raises() -> Iterator[None]:
    """While the CLI runs, SIGTERM raises :class:`Terminated` (main thread only)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ForaGroup(click.Group):
    """The command group, with every way out in one place: usage errors and user errors as
    one line with exit 2, SIGINT 130, SIGTERM 143."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        with _termination_raises():
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.UsageError as err:
                if isinstance(err, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                    err.show()  # `fora-export` alone: the help, as click prints it
                    sys.exit(EXIT_BAD_INPUT)
                _fail(_usage_message(err), EXIT_BAD_INPUT)
            except ForaError as err:  # raised outside a command body (an option callback)
                _fail(str(err))
            except click.ClickException as err:  # e.g. a file click could not open
                _fail(f"fora-export | {err.format_message()} | see `fora-export --help`", err.exit_code)
            except click.Abort as err:  # click's wrapping of KeyboardInterrupt (and EOF)
                cause = (
                    "interrupted (Ctrl-C)" if isinstance(err.__context__, KeyboardInterrupt) else "aborted"
                )
                _fail(f"fora-export | {cause} | nothing was left half-written; rerun", EXIT_INTERRUPTED)
            except KeyboardInterrupt:
                _fail(
                    "fora-export | interrupted (Ctrl-C) | nothing was left half-written; rerun",
                    EXIT_INTERRUPTED,
                )
            except Terminated:
                _fail(
                    "fora-export | terminated (SIGTERM) | nothing was left half-written; rerun",
                    EXIT_TERMINATED,
                )
        sys.exit(code if isinstance(code, int) else 0)


#: Seeds go to torch and numpy generators: non-negative int64 (larger ones overflow there).
SEED = click.IntRange(0, 2**63 - 1)


def _folder_options(*, trust: bool = True) -> Callable[[F], F]:
    """``--verify``, ``--key-file`` (and ``--trust``): how ENGINE_DIR is opened, passed to the
    command as ``access`` (a ``fora_runtime.trust.FolderAccess``)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, verify: str, key_file: Path | None, **kwargs: Any) -> Any:
            from fora_runtime.trust import FolderAccess

            trusted = bool(kwargs.pop("trust_programs", False))
            access = FolderAccess(verify=verify, trust_programs=trusted, manifest_key_file=key_file)
            return func(*args, access=access, **kwargs)

        wrapper = click.option(
            "--key-file",
            type=click.Path(path_type=Path),
            default=None,
            help="The deployer's manifest key: refuse ENGINE_DIR unless signed with it. "
            "[default: $FORA_MANIFEST_KEY if set]",
        )(wrapper)
        wrapper = click.option(
            "--verify",
            type=click.Choice(["stamp", "full"]),
            default="stamp",
            show_default=True,
            help="How ENGINE_DIR's files are checked: stamp (size, first/last MiB and samples) or full "
            "(sha256 of every byte).",
        )(wrapper)
        if trust:
            wrapper = click.option(
                "--trust",
                "trust_programs",
                is_flag=True,
                help="Vouch for ENGINE_DIR: load its torch programs (they run code when loaded) and "
                "TensorRT plugin layers. Only for folders you built or trust (see README, Trust and safety).",
            )(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def _setup_logging(verbose: int, quiet: bool) -> None:
    levels = {0: logging.WARNING, 1: logging.INFO}
    level = logging.ERROR if quiet else levels.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    # Third-party INFO chatter (torch.onnx, diffusers) stays out unless -vv.
    for noisy in ("torch", "diffusers", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


@click.group(cls=ForaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fora-export")
@click.option("-v", "--verbose", count=True, help="-v: stage timings; -vv: debug, incl. exporter output.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only (no warnings).")
def main(verbose: int, quiet: bool) -> None:
    """Export diffusion transformers as FORA full/reuse graphs, validate and benchmark them."""
    _setup_logging(verbose, quiet)


def _default_out(model: str) -> Path:
    name = Path(model.rstrip("/")).name or "model"
    return Path("engines") / name


@main.command()
@click.argument("model")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Engine folder to write. [default: engines/<model name>]",
)
@click.option("--resolution", default=None, help="Latent size, e.g. 32 or 32x32. [default: the model's]")
@click.option("--batch", default="1:2:8", show_default=True, help="Batch range MIN:OPT:MAX.")
@click.option(
    "--interval",
    type=int,
    default=3,
    show_default=True,
    help="Default cache interval N recorded in the manifest (1 = no caching).",
)
@click.option(
    "--schedule-mode",
    type=click.Choice(["paper", "reference"]),
    default="paper",
    show_default=True,
    help="How 'every N steps' is counted (see README, Schedules).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Tensor types of the exported graphs.",
)
@click.option("--opset", type=int, default=None, help="ONNX opset. [default: 17 torchscript, 18 dynamo]")
@click.option(
    "--exporter",
    type=click.Choice(["torchscript", "dynamo"]),
    default=None,
    help="torch.onnx exporter. [default: the family's: torchscript for DiT, PixArt, SD3; dynamo for Flux,"
    " Wan]",
)
@click.option(
    "--fp32-islands/--no-fp32-islands",
    default=True,
    show_default=True,
    help="Run LayerNorm and Softmax in fp32 inside fp16/bf16 graphs (see README).",
)
@click.option(
    "--cache",
    default=None,
    help="Sublayer kinds to cache, e.g. attn1,attn2,ff. [default: all the family caches]",
)
@click.option(
    "--text-length",
    "--caption-length",
    "text_length",
    type=int,
    default=None,
    help="Text tokens per prompt, fixed per build (PixArt: 120, SD3: 333, Flux: 512).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnx", "tensorrt", "tensorrt-rtx", "torch"]),
    default="auto",
    show_default=True,
    help="Besides ONNX: tensorrt engines, tensorrt-rtx plans (RTX GPUs; built without a GPU), "
    "torch.export programs, or auto (TensorRT when present).",
)
@click.option(
    "--reuse-graph",
    type=click.Choice(["lean", "plain"]),
    default="lean",
    show_default=True,
    help="lean: reuse computes only gates and the residual sum (DiT); plain: blocks with replayed sublayers.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where --backend torch traces its programs (they run there): auto, cpu, cuda[:N].",
)
@click.option(
    "--opt-level",
    "trt_opt_level",
    type=int,
    default=3,
    show_default=True,
    help="TensorRT builder optimization level (0-5).",
)
@click.option(
    "--workspace",
    "trt_workspace_mib",
    type=int,
    default=None,
    help="TensorRT workspace limit in MiB. [default: TensorRT's]",
)
@click.option(
    "--compute-capabilities",
    "trt_compute_capabilities",
    default=None,
    help="TensorRT-RTX target GPUs, e.g. 8.6,8.9,12.0 (7.5: Turing, fp16 only). [default: 8.6,8.9,12.0]",
)
@click.option(
    "--frames", type=int, default=None, help="Latent frames, fixed per build (video: Wan). [default: 21]"
)
@click.option(
    "--subfolder",
    default=None,
    help="The pipeline folder's transformer to build, e.g. transformer_2 (Wan 2.2's low-noise expert).",
)
@click.option(
    "--max-cache-gib",
    type=float,
    default=None,
    help="Refuse a build whose caches at the largest batch exceed this (lists the --cache subsets that fit).",
)
@click.option(
    "--forecast",
    is_flag=True,
    help="Also export the forecast reuse graph: caches forecast from the last two full steps (gate-table "
    "families; doubles the cache memory).",
)
@click.option("--force", is_flag=True, help="Replace an existing engine folder.")
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    default=None,
    help="Sign the manifest with this key file (HMAC-SHA256): runtimes holding the key trust the folder.",
)
@_user_errors
def build(
    model: str,
    out: Path | None,
    resolution: str | None,
    batch: str,
    interval: int,
    schedule_mode: str,
    precision: str,
    opset: int | None,
    exporter: str | None,
    fp32_islands: bool,
    cache: str | None,
    text_length: int | None,
    backend: str,
    trt_opt_level: int,
    trt_workspace_mib: int | None,
    trt_compute_capabilities: str | None,
    device: str,
    reuse_graph: str,
    frames: int | None,
    subfolder: str | None,
    max_cache_gib: float | None,
    forecast: bool,
    force: bool,
    sign_key: Path | None,
) -> None:
    """Split MODEL into full/reuse graphs and export them to an engine folder.

    MODEL is a local diffusers folder (transformer, or pipeline with transformer/),
    a Hub id resolved by diffusers, or a built-in demo model: demo-dit, demo-pixart,
    demo-sd3, demo-flux, demo-wan (random weights), demo-digits (a DiT trained on scikit-learn's
    digits) and demo-digits-flow (an SD3 MMDiT trained on them by flow matching).
    """
    from fora_export.builder.config import BuildConfig
    from fora_export.builder.pipeline import build as run_build
    from fora_runtime.trust import resolve_manifest_key

    key = resolve_manifest_key(key_file=sign_key) if sign_key is not None else None  # a bad key fails now
    config = BuildConfig.from_options(
        batch=batch,
        resolution=resolution,
        interval=interval,
        schedule_mode=schedule_mode,
        precision=precision,
        opset=opset,
        exporter=exporter,
        fp32_islands=fp32_islands,
        cache=cache,
        text_length=text_length,
        backend=backend,
        trt_opt_level=trt_opt_level,
        trt_workspace_mib=trt_workspace_mib,
        trt_compute_capabilities=trt_compute_capabilities,
        device=device,
        reuse_graph=reuse_graph,
        frames=frames,
        subfolder=subfolder,
        max_cache_gib=max_cache_gib,
        forecast=forecast,
    )
    result = run_build(model, out or _default_out(model), config, force=force, sign_key=key)
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


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="PyTorch model to compare with. [default: the build's source]")
@click.option("--backend", default="onnxruntime", show_default=True, help="Runtime backend to validate.")
@click.option(
    "--steps",
    type=int,
    default=None,
    help="Trajectory length. [default: 20; with --schedule calibrated, its step count when there is one]",
)
@click.option(
    "--scheduler",
    type=click.Choice(["ddim", "dpm", "flow-euler"]),
    default=None,
    help="Sampling scheduler of the trajectory. [default: ddim for DDPM families, flow-euler for "
    "flow-matching ones]",
)
@click.option(
    "--interval", type=int, default=None, help="Cache interval for the trajectory. [default: manifest]"
)
@click.option(
    "--schedule",
    "schedule",
    type=click.Choice(["manifest", "calibrated"]),
    default=None,
    help="Cache schedule: the manifest's, or calibrated (the one fora-export calibrate wrote for --steps)."
    " [default: manifest]",
)
@click.option("--batch-sizes", default=None, help="Comma-separated batch sizes. [default: min,opt,max]")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--pipeline",
    default=None,
    help="Also run this diffusers pipeline (folder, or demo-dit / demo-pixart) with the engines, with its "
    "own scheduler and guidance, against PyTorch FORA.",
)
@click.option(
    "--guidance", type=float, default=None, help="--pipeline's guidance_scale. [default: the pipeline's]"
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a per-step error plot (steps.png, steps.json) and, with --pipeline, the image grid here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (see README).")
@_folder_options()
@_user_errors
def validate(
    engine_dir: Path,
    model: str | None,
    backend: str,
    steps: int | None,
    scheduler: str | None,
    interval: int | None,
    schedule: str | None,
    batch_sizes: str | None,
    seed: int,
    pipeline: str | None,
    guidance: float | None,
    report_dir: Path | None,
    as_json: bool,
    access: Any,
) -> None:
    """Check ENGINE_DIR against the PyTorch model, per graph and over a trajectory."""
    from fora_export.errors import ConfigError
    from fora_export.outputs import check_output_folder, require_matplotlib
    from fora_export.progress import StageProgress
    from fora_export.reports import print_validation
    from fora_export.schedules import default_steps
    from fora_export.validate.runner import validate as run_validate
    from fora_runtime.manifest import load_manifest

    steps = default_steps(load_manifest(engine_dir, verify="none"), schedule, steps)

    sizes = None
    if batch_sizes:
        try:
            sizes = [int(s) for s in batch_sizes.split(",")]
        except ValueError as err:
            raise ConfigError(f"--batch-sizes | got {batch_sizes!r} | expected e.g. 1,2,4") from err
    check_output_folder(report_dir, "--report")  # before any work
    if report_dir is not None:
        require_matplotlib("--report")
    stages = 1 + (pipeline is not None) + (report_dir is not None and pipeline is None)
    with StageProgress(stages, title="validate") as progress:
        progress.stage("graphs and trajectory vs PyTorch")
        report = run_validate(
            engine_dir,
            model=model,
            backend=backend,
            steps=steps,
            scheduler=scheduler,
            interval=interval,
            schedule=schedule,
            batch_sizes=sizes,
            seed=seed,
            access=access,
        )
        checked = _validate_extras(
            progress,
            engine_dir,
            model,
            backend,
            steps,
            scheduler,
            interval,
            schedule,
            seed,
            pipeline,
            guidance,
            report_dir,
            access,
        )
    passed = report.passed and (checked is None or checked.passed)
    if as_json:
        data = report.to_dict()
        if checked is not None:
            data["pipeline"] = checked.to_dict()
            data["passed"] = passed
        click.echo(json.dumps(data, indent=2))
    else:
        print_validation(report)
        if checked is not None:
            verdict = "pass" if checked.passed else "FAIL"
            click.echo(
                f"Pipeline {checked.pipeline} ({checked.scheduler}, {checked.steps} steps, "
                f"{checked.schedule}): final images engine vs PyTorch FORA max abs "
                f"{checked.engine_vs_fora_max_abs:.2e} (allowed {checked.tolerance:g}) {verdict}; "
                f"FORA vs no cache {checked.fora_vs_nocache_max_abs:.3f} (information only)"
            )
        if report_dir is not None:
            click.echo(f"Report: {report_dir}")
    if not passed:
        sys.exit(EXIT_FAILED)


def _validate_extras(
    progress: Any,
    engine_dir: Path,
    model: str | None,
    backend: str,
    steps: int,
    scheduler: str | None,
    interval: int | None,
    schedule: str | None,
    seed: int,
    pipeline: str | None,
    guidance: float | None,
    report_dir: Path | None,
    access: Any,
) -> Any:
    """``validate --pipeline`` and ``--report`` (fora_export.validate.pipeline_check)."""
    from fora_export.validate import pipeline_check

    result, runs = None, None
    if pipeline is not None:
        progress.stage(f"pipeline {pipeline}: engine, no cache, PyTorch FORA")
        result, runs = pipeline_check.validate_pipeline(
            engine_dir,
            pipeline,
            backend=backend,
            steps=steps,
            guidance=guidance,
            seed=seed,
            interval=interval,
            schedule=schedule,
            access=access,
        )
    if report_dir is not None:
        if result is None:
            progress.stage("per-step errors")
            errors = pipeline_check.trajectory_step_errors(
                engine_dir,
                model=model,
                backend=backend,
                steps=steps,
                scheduler=scheduler,
                interval=interval,
                seed=seed,
                schedule_option=schedule,
                access=access,
            )
        else:
            errors = result.steps_errors
        pipeline_check.write_report(report_dir, errors, runs)
    return result


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option(
    "--backend",
    default="onnxruntime",
    show_default=True,
    help="Runtime backend(s), comma-separated: onnxruntime, torch, tensorrt.",
)
@click.option("--steps", type=int, default=20, show_default=True, help="Steps per generation.")
@click.option("--intervals", default="1,2,3,5", show_default=True, help="Cache intervals to compare.")
@click.option("--batch", "batch_size", type=int, default=None, help="Batch size. [default: the build's opt]")
@click.option(
    "--repeats",
    type=int,
    default=5,
    show_default=True,
    help="Timed generations per interval (median and spread of them).",
)
@click.option(
    "--schedule-mode",
    type=click.Choice(["paper", "reference"]),
    default=None,
    help="How intervals are counted. [default: as the engines' schedule]",
)
@click.option(
    "--eager/--no-eager",
    default=True,
    show_default=True,
    help="Also time the diffusers model in eager PyTorch (needs the model source).",
)
@click.option("--model", default=None, help="Model for the eager baseline. [default: the build's source]")
@click.option(
    "--plot", type=click.Path(path_type=Path), default=None, help="Write a PNG of time per interval."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--save-json",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the JSON report to this file.",
)
@_folder_options()
@_user_errors
def bench(
    engine_dir: Path,
    backend: str,
    steps: int,
    intervals: str,
    batch_size: int | None,
    repeats: int,
    schedule_mode: str | None,
    eager: bool,
    model: str | None,
    plot: Path | None,
    as_json: bool,
    save_json: Path | None,
    access: Any,
) -> None:
    """Measure full/reuse step latency and end-to-end speedup per cache interval."""
    from fora_export.bench import bench as run_bench
    from fora_export.bench import eager_baseline, plan_bench
    from fora_export.errors import ConfigError
    from fora_export.outputs import check_output_file, write_text_atomic
    from fora_export.reports import plot_bench, print_bench
    from fora_runtime.backends.base import create_backend
    from fora_runtime.manifest import load_manifest

    check_output_file(save_json, "--save-json")  # output paths before any work
    check_output_file(plot, "--plot", image=True)
    try:
        interval_list = tuple(int(s) for s in intervals.split(","))
    except ValueError as err:
        raise ConfigError(f"--intervals | got {intervals!r} | expected e.g. 1,2,3,5") from err
    backends = [b.strip() for b in backend.split(",") if b.strip()]
    manifest = load_manifest(engine_dir, **access.manifest_options())
    plan = plan_bench(  # every option checked before anything is timed
        manifest,
        steps=steps,
        intervals=interval_list,
        batch_size=batch_size,
        repeats=repeats,
        schedule_mode=schedule_mode,
    )
    for name in backends:  # a backend that cannot run here fails now, not after the eager baseline
        create_backend(name, manifest, engine_dir, trust_programs=access.trust_programs).preflight()
    from fora_export.progress import StageProgress

    baseline = None
    with StageProgress(len(backends) + eager, title="bench") as progress:
        if eager:
            progress.stage(f"eager diffusers baseline ({repeats} generations)")
            try:
                baseline = eager_baseline(
                    manifest, steps=steps, batch_size=plan.batch_size, repeats=repeats, model=model
                )
            except ConfigError as err:
                raise ConfigError(f"{err} (or skip the eager baseline with --no-eager)") from err
        reports = []
        for name in backends:
            progress.stage(f"{name}: step latency and {len(interval_list)} intervals x {repeats} generations")
            reports.append(
                run_bench(
                    engine_dir,
                    steps=steps,
                    intervals=interval_list,
                    batch_size=batch_size,
                    repeats=repeats,
                    schedule_mode=schedule_mode,
                    backend=name,
                    eager=baseline,
                    access=access,
                )
            )
    if plot is not None:
        plot_bench(reports, plot)
    text = json.dumps({"runs": [r.to_dict() for r in reports]}, indent=2)
    if save_json is not None:
        write_text_atomic(save_json, text + "\n", "--save-json")
    if as_json:
        click.echo(text)
    else:
        for report in reports:
            print_bench(report)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
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
    "--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True, help="Instance kind."
)
@click.option(
    "--max-batch",
    type=int,
    default=None,
    help="Most samples per request and per batch. [default: the build's max]",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime", "torch", "tensorrt"]),
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
@_folder_options()
@_user_errors
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
    """Write a Triton Inference Server model that runs ENGINE_DIR's generations (see README, Serving)."""
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


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option(
    "--intervals", default="1,2,3,4,5,6,7,8", show_default=True, help="FORA intervals N to compare."
)
@click.option(
    "--schedule-mode",
    type=click.Choice(["paper", "reference", "both"]),
    default="both",
    show_default=True,
    help="How the intervals are counted (see README, Schedules); both: a row for each.",
)
@click.option(
    "--schedule-list",
    "schedule_lists",
    multiple=True,
    metavar="STEPS",
    help="Also an explicit schedule: its full steps, e.g. 0,1,2,5,9 (repeatable).",
)
@click.option(
    "--policies",
    default="static",
    show_default=True,
    help="Cache policies compared at each interval's full-step count: static, calibrated (needs "
    "fora-export calibrate at --steps), forecast (needs build --forecast), calibrated+forecast.",
)
@click.option("--samples", type=int, default=10, show_default=True, help="Seeded samples per class.")
@click.option("--steps", type=int, default=50, show_default=True, help="DDIM steps per sample.")
@click.option(
    "--batch", "batch_size", type=int, default=None, help="Samples per generation. [default: the build's max]"
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the noise and the classifier.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per schedule (median).")
@click.option("--backend", default="onnxruntime", show_default=True, help="Runtime backend.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (see README).")
@click.option("--save-json", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
@click.option(
    "--plot", type=click.Path(path_type=Path), default=None, help="Write a quality-vs-speedup plot."
)
@click.option(
    "--grid", type=click.Path(path_type=Path), default=None, help="Write an image grid, a row per schedule."
)
@_folder_options()
@_user_errors
def quality(
    engine_dir: Path,
    intervals: str,
    schedule_mode: str,
    schedule_lists: tuple[str, ...],
    policies: str,
    samples: int,
    steps: int,
    batch_size: int | None,
    seed: int,
    repeats: int,
    backend: str,
    as_json: bool,
    save_json: Path | None,
    plot: Path | None,
    grid: Path | None,
    access: Any,
) -> None:
    """Measure what each cache schedule costs in sample quality (digit models: demo-digits[-flow])."""
    from fora_export.outputs import check_output_file, write_text_atomic
    from fora_export.quality.classifier import require_sklearn
    from fora_export.quality.report import plot_quality, print_quality, save_quality_grid
    from fora_export.quality.runner import parse_int_list, plan_quality, run_quality
    from fora_runtime.manifest import load_manifest

    require_sklearn()
    check_output_file(save_json, "--save-json")
    check_output_file(plot, "--plot", image=True)
    check_output_file(grid, "--grid", image=True)
    plan = plan_quality(  # every option checked before anything runs
        load_manifest(engine_dir, **access.manifest_options()),
        intervals=parse_int_list(intervals, "--intervals", "1,2,3,5"),
        modes=schedule_mode,
        lists=tuple(parse_int_list(text, "--schedule-list", "0,1,2,5,9") for text in schedule_lists),
        samples_per_class=samples,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        repeats=repeats,
        where=str(engine_dir),
        policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
    )
    report = run_quality(engine_dir, plan, backend=backend, access=access)
    text = json.dumps(report.to_dict(), indent=2)
    if save_json is not None:
        write_text_atomic(save_json, text + "\n", "--save-json")
    if plot is not None:
        plot_quality(report, plot)
    if grid is not None:
        save_quality_grid(report, grid)
    if as_json:
        click.echo(text)
    else:
        print_quality(report)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--steps", type=int, required=True, help="Step count the schedule is for (only this one).")
@click.option(
    "--full-steps", "budget", type=int, required=True, help="Full steps K to place (step 0 is one of them)."
)
@click.option("--samples", type=int, default=20, show_default=True, help="Calibration samples.")
@click.option(
    "--scheduler",
    type=click.Choice(["ddim", "dpm", "flow-euler"]),
    default=None,
    help="Sampling scheduler. [default: ddim for DDPM families, flow-euler for flow-matching ones]",
)
@click.option(
    "--metric",
    type=click.Choice(["l1", "l2"]),
    default="l1",
    show_default=True,
    help="Cache change measure whose accumulated drift the choice minimises (relative L1 or L2).",
)
@click.option("--seed", type=SEED, default=1, show_default=True, help="Seed of the calibration noise.")
@click.option("--batch", "batch_size", type=int, default=None, help="Samples per generation.")
@click.option("--backend", default="onnxruntime", show_default=True, help="Runtime backend.")
@click.option("--json", "as_json", is_flag=True, help="Print the schedule file's contents as JSON.")
@_folder_options()
@_user_errors
def calibrate(
    engine_dir: Path,
    steps: int,
    budget: int,
    samples: int,
    scheduler: str | None,
    metric: str,
    seed: int,
    batch_size: int | None,
    backend: str,
    as_json: bool,
    access: Any,
) -> None:
    """Choose the full steps of STEPS-step generations from measured cache change, into ENGINE_DIR.

    Runs --samples generations with every step full, measures how much the caches change
    per step, and places --full-steps full steps where the reuse steps' accumulated change
    is least. Use it with --schedule calibrated (validate, sample) or schedule="calibrated".
    A signed folder is re-signed with its key (--key-file or $FORA_MANIFEST_KEY).
    """
    from fora_export.calibrate import calibrate as run_calibrate

    result = run_calibrate(
        engine_dir,
        steps=steps,
        budget=budget,
        samples=samples,
        scheduler=scheduler,
        metric=metric,
        seed=seed,
        batch_size=batch_size,
        backend=backend,
        progress=sys.stderr.isatty(),
        access=access,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    record = result.record
    click.echo(
        f"calibrated {engine_dir} for {record.steps} {record.scheduler['name']} steps on {record.samples} "
        f"samples in {record.seconds:.1f} s: {len(record.full_steps)} full steps at "
        f"{','.join(map(str, record.full_steps))}"
    )
    click.echo(
        f"  accumulated drift ({record.metric}): {record.cost:.4g}; evenly spaced "
        f"({','.join(map(str, result.uniform))}): {record.uniform_cost:.4g}"
    )
    click.echo(f"  wrote {result.file} (listed in manifest.json with its sha256)")


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option(
    "--inspect",
    is_flag=True,
    help="Also describe each TensorRT plan with polygraphy (needs the TensorRT and GPU that built it).",
)
@_folder_options()
@_user_errors
def info(engine_dir: Path, as_json: bool, inspect: bool, access: Any) -> None:
    """Describe ENGINE_DIR: model, batch range, precision, graphs, caches, backends (no torch needed)."""
    from fora_export.reports import print_manifest
    from fora_runtime.manifest import open_engine_folder

    folder = open_engine_folder(engine_dir, **access.manifest_options())  # checks every file (--verify)
    manifest = folder.manifest
    plans: dict[str, str] = {}
    if inspect:
        from fora_export.plans import inspect_plans

        plans = inspect_plans(engine_dir, manifest, trusted=access.trust_programs or folder.signed)
    if as_json:
        click.echo(json.dumps({**manifest.to_dict(), **({"plans": plans} if inspect else {})}, indent=2))
    else:
        print_manifest(manifest, engine_dir)
        for role, text in plans.items():
            click.echo(f"\n{role} plan (polygraphy):\n{text}")


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option(
    "--pipeline",
    "pipeline",
    required=True,
    help="diffusers pipeline folder (pipe.save_pretrained) of the engines' model, or demo-dit / demo-pixart.",
)
@click.option("--prompt", "prompts", multiple=True, help="Prompt (repeat for several images).")
@click.option(
    "--class-label",
    "class_labels",
    multiple=True,
    help="Class label of class-conditional pipelines (DiT); repeat or comma-separate.",
)
@click.option("--steps", type=int, default=20, show_default=True, help="num_inference_steps.")
@click.option("--guidance", type=float, default=None, help="guidance_scale. [default: the pipeline's]")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--interval", type=int, default=None, help="Cache interval. [default: the manifest's]")
@click.option(
    "--schedule",
    "schedule",
    type=click.Choice(["manifest", "calibrated"]),
    default=None,
    help="Cache schedule: the manifest's, or calibrated (the one fora-export calibrate wrote for --steps)."
    " [default: manifest]",
)
@click.option(
    "--backend", default="onnxruntime", show_default=True, help="Runtime backend of the engine run."
)
@click.option("--device", default=None, help="Device of the torch backend and the pipeline (cpu, cuda).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder for the PNGs.")
@_folder_options()
@_user_errors
def sample(
    engine_dir: Path,
    pipeline: str,
    prompts: tuple[str, ...],
    class_labels: tuple[str, ...],
    steps: int,
    guidance: float | None,
    seed: int,
    interval: int | None,
    schedule: str | None,
    backend: str,
    device: str | None,
    out_dir: Path,
    access: Any,
) -> None:
    """Images from PIPELINE with ENGINE_DIR as its transformer, next to no cache and PyTorch FORA."""
    from fora_export.errors import ConfigError
    from fora_export.outputs import check_output_folder
    from fora_export.sample import sample as run_sample

    check_output_folder(out_dir, "--out")
    try:
        labels = tuple(int(v) for value in class_labels for v in value.split(",") if v.strip())
    except ValueError as err:
        raise ConfigError(f"--class-label | got {class_labels!r} | expected integers, e.g. 207,360") from err
    result = run_sample(
        engine_dir,
        pipeline,
        out_dir,
        prompts=prompts,
        class_labels=labels,
        steps=steps,
        guidance=guidance,
        seed=seed,
        interval=interval,
        schedule=schedule,
        backend=backend,
        device=device,
        progress=sys.stderr.isatty(),
        access=access,
    )
    click.echo(f"sampled {result.pipeline}: {result.steps} steps, {result.schedule}")
    for label, prefix in (("engine", "engine"), ("no cache", "nocache"), ("PyTorch FORA", "fora")):
        click.echo(f"  {label:<13} {result.seconds[prefix]:7.2f} s  {len(result.images[prefix])} images")
    click.echo(
        f"  max pixel difference: engine vs PyTorch FORA {result.engine_vs_fora:.2e}, "
        f"PyTorch FORA vs no cache {result.fora_vs_nocache:.2e} (FORA's approximation)"
    )
    click.echo(f"  grid: {result.grid}")


if __name__ == "__main__":
    main()
