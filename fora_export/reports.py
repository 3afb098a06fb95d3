"""Terminal rendering (rich tables) of validate and bench reports."""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from fora_export.errors import ConfigError
from fora_export.outputs import save_figure
from fora_export.terminal import console as new_console
from fora_export.terminal import plain
from fora_runtime.dtypes import itemsize
from fora_runtime.manifest import GraphRole, Manifest

if TYPE_CHECKING:  # torch-free at import: `info` prints manifests without loading torch
    from fora_export.bench import BenchReport, Timing
    from fora_export.validate.report import ValidationReport


def _verdict(passed: bool) -> str:
    return "[green]pass[/green]" if passed else "[bold red]FAIL[/bold red]"


def print_validation(report: ValidationReport, console: Console | None = None) -> None:
    from fora_export.validate.compare import GRAPH_TOLERANCES

    console = console or new_console()
    tol = GRAPH_TOLERANCES[report.precision]
    console.print(
        f"[bold]validate[/bold] {plain(report.engine_dir)} ({plain(report.backend)}, {report.precision}) "
        f"against {plain(report.model)}"
    )
    if report.graph_cases:
        table = Table(title=f"Graphs vs PyTorch (allowed: {tol.atol:g} abs + {tol.rtol:g} x max|ref|)")
        for column in ("graph", "batch", "timestep", "max abs", "max rel", "worst output", "result"):
            table.add_column(column, justify="right" if column in ("batch", "timestep") else "left")
        for case in report.graph_cases:
            worst = case.worst
            table.add_row(
                case.role,
                str(case.batch_size),
                str(case.timestep),
                f"{max(c.max_abs for c in case.comparisons):.2e}",
                f"{max(c.max_rel for c in case.comparisons):.2e}",
                plain(worst.name),
                _verdict(case.passed) + ("" if case.passed else f" (needs {worst.max_abs:.1e})"),
            )
        console.print(table)
    trajectory = report.trajectory
    if trajectory:
        console.print(
            f"Trajectory ({trajectory.scheduler}, {trajectory.steps} steps, batch {trajectory.batch_size}, "
            f"{trajectory.schedule}, {trajectory.num_full} full"
            f"{', gate table' if trajectory.gate_table else ''}"
            f"{', forecast from the last two full steps' if trajectory.forecast else ''}): runtime vs "
            "PyTorch FORA rel. L2 "
            f"{trajectory.runtime_vs_fora_rel_l2:.2e} (allowed {trajectory.tolerance:g}) "
            f"{_verdict(trajectory.passed)}"
        )
        console.print(
            f"FORA vs no caching (PyTorch, information only): rel. L2 {trajectory.fora_vs_nocache_rel_l2:.3f}"
        )
    for check in report.calibrated:
        ran = "" if check.ran_full_steps is None else ", and the trajectory's full steps"
        console.print(
            f"Calibrated schedule for {check.steps} steps ({check.file}): full at "
            f"{','.join(map(str, check.file_full_steps))}; the runtime's plan{ran} "
            + ("equal it " if check.passed else f"differ ({check.planned_full_steps}) ")
            + _verdict(check.passed)
        )
    console.print(f"Result: {_verdict(report.passed)}")


def _bytes(count: float) -> str:
    """A size in MiB (KiB below one MiB, so tiny models' caches do not read 0.0)."""
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def _graph_bytes(manifest: Manifest, role: str) -> int:
    """Bytes of a graph's ONNX file and its external data (its weights, nearly all)."""
    file = manifest.graphs[role].file
    return sum(int(manifest.files.get(name, {}).get("bytes", 0)) for name in (file, f"{file}.data"))


def print_manifest(manifest: Manifest, folder: Path, console: Console | None = None) -> None:
    """What ``info`` prints. Every string from the folder is printed as data (``plain``)."""
    console = console or new_console()
    height, width = manifest.resolution
    console.print(
        f"[bold]{plain(folder)}[/bold]: {plain(manifest.model_class)} ({plain(manifest.family)}) "
        f"from {plain(manifest.source)}"
    )
    console.print(
        f"latent {height}x{width}, batch {manifest.batch}, {manifest.precision}, "
        f"default schedule: {manifest.schedule.describe()}"
    )
    kinds = sorted({c.kind for c in manifest.caches})
    cache_bytes = sum(
        itemsize(c.dtype) * prod(int(d) for d in c.shape if d != "batch") for c in manifest.caches
    )
    reuse_graph = manifest.export.reuse_graph
    # Forecast builds keep two generations of every cache (the last two full steps').
    generations = 2 if manifest.has_forecast else 1
    held = cache_bytes * generations
    doubled = f" (two generations for the forecast: 2 x {_bytes(cache_bytes)})" if generations == 2 else ""
    console.print(
        f"caches: {len(manifest.caches)} tensors ({plain(', '.join(kinds))}), "
        f"{_bytes(held)} per sample, {_bytes(held * manifest.batch.max)} "
        f"at batch {manifest.batch.max}{doubled}; reuse graph: {plain(reuse_graph)}"
    )
    if manifest.has_forecast:
        console.print(
            "forecast: yes (reuse steps after the second full step forecast each cache from the last two "
            "full steps; the weights come with the gate table)"
        )
    roles = ", ".join(f"{spec.name} ({spec.role.replace('_', ' ')})" for spec in manifest.inputs)
    console.print(f"inputs: {plain(roles)}")
    full_bytes, reuse_bytes = (_graph_bytes(manifest, role) for role in (GraphRole.FULL, GraphRole.REUSE))
    if full_bytes:
        console.print(
            f"reuse graph weights: {reuse_bytes / 2**20:.1f} MiB, {reuse_bytes / full_bytes:.1%} of the full "
            f"graph's {full_bytes / 2**20:.1f} MiB"
        )
    if manifest.gate_rows is not None:
        row_kib = itemsize(manifest.gate_table_dtype) * prod(manifest.gate_table_shape) / 2**10
        console.print(
            f"gate table: yes ({row_kib:.1f} KiB per step and sample, up to {manifest.gate_rows.max} "
            "rows per call of the gates graph)"
        )
    else:
        console.print("gate table: no (reuse steps compute their gates)")
    for steps, file in sorted(manifest.calibrated_schedules.items()):
        console.print(
            f"calibrated schedule for {steps} steps: {_describe_calibration(manifest, folder, steps, file)}"
        )
    table = Table(title="Graphs")
    for column in ("graph", "file", "inputs", "outputs"):
        table.add_column(column)
    for role, graph in manifest.graphs.items():
        table.add_row(role, plain(graph.file), str(len(graph.inputs)), str(len(graph.outputs)))
    console.print(table)
    files = Table(title="Files")
    files.add_column("file")
    files.add_column("MiB", justify="right")
    for name, record in manifest.files.items():
        files.add_row(plain(name), f"{int(record['bytes']) / 2**20:.1f}")
    console.print(files)
    backends = ", ".join(_describe_backend(name, record) for name, record in manifest.backends.items())
    tools = ", ".join(f"{k} {v}" for k, v in manifest.tools.items())
    console.print(f"built backends: {plain(backends or 'none (ONNX only)')}; tools: {plain(tools)}")


def _describe_calibration(manifest: Manifest, folder: Path, steps: int, file: str) -> str:
    """A calibrated schedule in words (or why its file cannot be read)."""
    from fora_runtime.calibration import read_calibration
    from fora_runtime.errors import ForaError

    try:
        record = read_calibration(manifest, folder, steps)
    except ForaError as err:
        return f"{file}: unreadable ({err})"
    return (
        f"{len(record.full_steps)} full at {','.join(map(str, record.full_steps))} ({file}; "
        f"{record.scheduler.get('name')}, {record.samples} samples, {record.metric} drift {record.cost:.3g} "
        f"vs {record.uniform_cost:.3g} evenly spaced)"
    )


def _describe_backend(name: str, record: object) -> str:
    """A built backend in words: TensorRT records say their flavour, version and target GPUs."""
    from fora_runtime.backends.trt_flavor import describe_record

    return describe_record(record) if name == "tensorrt" else name


def print_bench(report: BenchReport, console: Console | None = None) -> None:
    console = console or new_console()
    console.print(
        f"[bold]bench[/bold] {plain(report.engine_dir)}: {plain(report.model_class)}, {report.precision}, "
        f"batch {report.batch_size}, {report.steps} steps, backend {plain(report.backend)}"
    )
    console.print(f"machine: {plain(report.machine)}")
    console.print(
        f"step latency (median, spread): full {report.full_ms:.2f} ms ({_spread(report.full)}), "
        f"reuse {report.reuse_ms:.2f} ms ({_spread(report.reuse)}; reuse = "
        f"{100 * report.reuse_to_full:.1f}% of full)"
    )
    if report.gated_reuse is not None:
        console.print(
            f"reuse with the gate table (gates computed once per generation): "
            f"{report.gated_reuse.median_ms:.3f} ms ({_spread(report.gated_reuse)}; "
            f"{100 * report.gated_reuse.median_ms / report.full_ms:.1f}% of full); "
            "the end-to-end runs below use it"
        )
    if report.forecast_reuse is not None:
        console.print(
            f"forecast reuse step (both cache generations): {report.forecast_reuse.median_ms:.3f} ms "
            f"({_spread(report.forecast_reuse)}; "
            f"{100 * report.forecast_reuse.median_ms / report.full_ms:.1f}% of full); the end-to-end "
            "runs below forecast after their second full step"
        )
    runs = len(report.intervals[0].timing.runs_ms) if report.intervals else 0
    table = Table(
        title=f"End to end, {report.steps} steps ({report.schedule_mode} schedule), median of {runs} runs"
    )
    columns = ["N", "full steps", "time (ms)", "spread", "speedup vs N=1", "ideal", "of ideal"]
    if report.eager:
        columns.append("vs eager")
    for column in columns:
        table.add_column(column, justify="right")
    for row in report.intervals:
        low, high = row.speedup_range
        cells = [
            str(row.interval),
            str(row.num_full),
            f"{row.median_ms:.1f}",
            _spread(row.timing),
            f"{row.speedup:.2f}x ({low:.2f}-{high:.2f})" if row.interval != 1 else f"{row.speedup:.2f}x",
            f"{row.ideal:.2f}x",
            f"{row.efficiency:.2f}",
        ]
        if report.eager:
            cells.append(f"{report.speedup_vs_eager(row):.2f}x")
        table.add_row(*cells)
    console.print(table)
    if report.eager:
        console.print(
            f"eager diffusers baseline ({plain(report.eager.device)}, {report.eager.precision}, no caching): "
            f"{report.eager.median_ms:.1f} ms per generation ({_spread(report.eager.timing)})"
        )
    console.print(
        "spread: interquartile range / median; speedups in brackets from the quartiles", style="dim"
    )
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False)


def _spread(timing: Timing) -> str:
    """A timing's spread in words: IQR relative to the median."""
    return f"IQR {100 * timing.spread:.0f}%" if len(timing.runs_ms) > 1 else "1 run"


def plot_bench(reports: list[BenchReport], path: Path) -> Path:
    """A PNG of end-to-end time per interval, one bar group per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(f"--plot | matplotlib is not installed ({err}) | pip install matplotlib") from err
    intervals = [row.interval for row in reports[0].intervals]
    width = 0.8 / len(reports)
    figure, axis = plt.subplots(figsize=(7, 4))
    for index, report in enumerate(reports):
        positions = [i + index * width for i in range(len(intervals))]
        bars = axis.bar(positions, [row.median_ms for row in report.intervals], width, label=report.backend)
        axis.bar_label(bars, labels=[f"{row.speedup:.2f}x" for row in report.intervals], fontsize=8)
    eager = reports[0].eager
    if eager:
        axis.axhline(eager.median_ms, color="grey", linestyle="--", label=f"eager diffusers ({eager.device})")
    axis.set_xticks([i + width * (len(reports) - 1) / 2 for i in range(len(intervals))])
    axis.set_xticklabels([f"N={n}" for n in intervals])
    axis.set_ylabel(f"ms per {reports[0].steps}-step generation")
    axis.set_title(f"{reports[0].model_class}, batch {reports[0].batch_size}, {reports[0].precision}")
    axis.legend()
    figure.tight_layout()
    try:
        save_figure(figure, path, "--plot", dpi=120)
    finally:
        plt.close(figure)
    return path
