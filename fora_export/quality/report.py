"""The quality report as a rich table, a quality-vs-speedup plot and an image grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from fora_export.errors import ConfigError
from fora_export.outputs import save_figure
from fora_export.quality.classifier import NUM_CLASSES
from fora_export.quality.runner import QualityReport
from fora_export.terminal import console as new_console
from fora_export.terminal import plain


def _psnr_text(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def print_quality(report: QualityReport, console: Console | None = None) -> None:
    console = console or new_console()
    total = len(report.labels)
    console.print(
        f"[bold]quality[/bold] {plain(report.engine_dir)} ({plain(report.model)}): "
        f"{report.samples_per_class} samples per class ({total}), {report.steps} steps "
        f"{plain(report.scheduler)}, seed {report.seed}, "
        f"batch {report.batch_size}, backend {plain(report.backend)}; time: median of {report.repeats} runs"
    )
    console.print(f"machine: {plain(report.machine)}")
    console.print(
        f"digit classifier (MLP on the real digits): accuracy {100 * report.classifier_accuracy:.1f}% on "
        f"held-out real digits; Fréchet distance of {total} real digits to all: {report.real_frechet:.2f}"
    )
    table = Table(
        title="vs uncached samples (PSNR, rel. L2) and real digits (acc., Fréchet)",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    # Two-line headers keep the table within 80 columns.
    table.add_column("schedule", no_wrap=True)
    for column in (
        "full\nsteps",
        "time\n(s)",
        "speed-\nup",
        "ideal",
        "PSNR\n(dB)",
        "rel.\nL2",
        "acc.\n(%)",
        "Fré-\nchet",
    ):
        table.add_column(column, justify="right", no_wrap=True)
    for row in report.results:
        table.add_row(
            row.label,
            str(row.num_full),
            f"{row.seconds:.2f}",
            f"{row.speedup:.2f}x",
            f"{row.ideal:.2f}x",
            _psnr_text(row.psnr_db),
            f"{row.rel_l2:.3f}",
            f"{100 * row.accuracy:.1f}",
            f"{row.frechet:.2f}",
        )
    console.print(table)
    notes = []
    if any(row.kind == "both" for row in report.results):
        notes.append("both: paper and reference counting give the same full steps at this step count")
    notes += [
        f"{row.label.split(' (')[0]}: full at {','.join(map(str, row.schedule['full_steps']))}"
        for row in report.results
        if row.kind == "explicit"
    ]
    for note in notes:
        console.print(note, soft_wrap=True)
    for line in policy_comparison(report):
        console.print(line, soft_wrap=True)


def policy_comparison(report: QualityReport) -> list[str]:
    """Per interval compared by several policies, their PSNR at its full-step count, and
    whether each beats static FORA (paper counting) there."""
    static = {r.interval: r for r in report.results if r.kind in ("paper", "both")}
    others: dict[int, list[Any]] = {}
    for row in report.results:
        if row.kind in ("calibrated", "forecast", "calibrated+forecast") and row.interval is not None:
            others.setdefault(row.interval, []).append(row)
    lines = []
    for interval, rows in others.items():
        base = static.get(interval)
        if base is None:
            continue
        parts = [f"static {_psnr_text(base.psnr_db)}"]
        for row in rows:
            delta = (row.psnr_db or float("inf")) - (base.psnr_db or float("inf"))
            parts.append(f"{row.kind} {_psnr_text(row.psnr_db)} ({delta:+.1f})")
        lines.append(f"{base.num_full} full steps (N={interval}), PSNR dB: " + ", ".join(parts))
    return lines


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(f"quality | matplotlib is not installed ({err}) | pip install matplotlib") from err
    return plt


def _save(figure: Any, path: Path, option: str, plt: Any) -> Path:
    try:
        save_figure(figure, path, option, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


#: Marker per schedule kind, in the plot and its legend.
_STYLES = {
    "none": ("*", "no caching"),
    "paper": ("o", "FORA N, paper counting"),
    "reference": ("s", "FORA N, reference counting"),
    "both": ("D", "FORA N, both countings"),
    "explicit": ("^", "explicit full steps"),
    "calibrated": ("v", "calibrated (same full steps as N)"),
    "forecast": ("P", "forecast (N's schedule)"),
    "calibrated+forecast": ("X", "calibrated + forecast"),
}


#: Rows of the policies beyond static FORA (one per interval, joined into a curve like N's).
POLICY_KINDS = ("calibrated", "forecast", "calibrated+forecast")


def plot_quality(report: QualityReport, path: Path) -> Path:
    """PSNR, classifier accuracy and Fréchet distance against the measured speedup."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    finite = [r.psnr_db for r in report.results if r.psnr_db is not None]
    top = (max(finite) + 5) if finite else 60.0  # where the uncached (infinite) PSNR is drawn
    panels = (
        ("PSNR vs uncached (dB)", lambda r: top if r.psnr_db is None else r.psnr_db),
        ("classifier accuracy (%)", lambda r: 100 * r.accuracy),
        ("Fréchet distance to real digits", lambda r: r.frechet),
    )
    for index, (axis, (title, value)) in enumerate(zip(axes, panels, strict=True)):
        for kind, (marker, name) in _STYLES.items():
            rows = sorted((r for r in report.results if r.kind == kind), key=lambda r: -r.num_full)
            if not rows:
                continue
            xs, ys = [r.speedup for r in rows], [value(r) for r in rows]
            # Joined in budget order (most full steps first), so each counting and policy reads
            # as one curve even where timing noise reorders the measured speedups.
            style = "-" if kind in ("paper", "reference", *POLICY_KINDS) else ""
            axis.plot(xs, ys, marker=marker, linestyle=style, linewidth=0.8, label=name)
            for r in rows if index == 0 else ():  # names on the first panel only: no clutter
                if kind in ("paper", "both"):
                    text = f"N={r.interval}"
                elif kind == "explicit":
                    text = r.label
                else:
                    continue  # reference points sit by their paper twins; uncached is at 1x
                axis.annotate(
                    text, (r.speedup, value(r)), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        axis.set_xlabel("measured speedup vs N=1")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].annotate("uncached: inf", (1.0, top), fontsize=7, xytext=(3, -10), textcoords="offset points")
    axes[1].axhline(100 * report.classifier_accuracy, color="grey", linestyle="--", label="real digits")
    axes[2].axhline(report.real_frechet, color="grey", linestyle="--", label="real digits")
    axes[2].set_yscale("log")  # a broken schedule sits orders of magnitude above the rest
    axes[1].legend(fontsize=7)
    figure.suptitle(
        f"{report.model}: {len(report.labels)} samples, {report.steps} steps {report.scheduler} "
        f"({report.machine})",
        fontsize=10,
    )
    figure.tight_layout()
    return _save(figure, path, "--plot", plt)


def save_quality_grid(report: QualityReport, path: Path, per_class: int = 2) -> Path:
    """One row per schedule: the first ``per_class`` samples of every class (same seeds in
    every row, so each column shows what caching did to one sample)."""
    plt = _pyplot()
    per_class = min(per_class, report.samples_per_class)
    columns = [c * report.samples_per_class + i for c in range(NUM_CLASSES) for i in range(per_class)]
    rows = []
    for row in report.results:
        tiles = report.images[row.label][columns, 0]  # [columns, 8, 8]
        tiles = np.pad(tiles, ((0, 0), (1, 1), (1, 1)), constant_values=0.5)
        rows.append(np.concatenate(list(tiles), axis=1))
    grid = np.concatenate(rows, axis=0)
    tile = grid.shape[0] // len(rows)
    figure, axis = plt.subplots(figsize=(2.0 + 0.32 * len(columns), 0.4 + 0.36 * len(rows)))
    axis.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks([tile * (i + 0.5) for i in range(len(rows))])
    axis.set_yticklabels(
        [f"{r.label}  ({_psnr_text(r.psnr_db)} dB, {100 * r.accuracy:.0f}%)" for r in report.results],
        fontsize=7,
    )
    axis.set_xticks([tile * (c * per_class + per_class / 2) for c in range(NUM_CLASSES)])
    axis.set_xticklabels([str(c) for c in range(NUM_CLASSES)], fontsize=8)
    axis.xaxis.tick_top()
    axis.tick_params(length=0)
    figure.tight_layout()
    return _save(figure, path, "--grid", plt)
