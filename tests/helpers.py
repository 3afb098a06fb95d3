"""The test suite's shared helpers, one copy each: the CLI runner, saving tiny models, and
building engine folders through the real build pipeline."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from fora_export.builder.config import BuildConfig
from fora_export.builder.pipeline import build


class CliRun(NamedTuple):
    """What one ``fora-export`` invocation printed and returned (unpacks as a tuple)."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str, expect: int | None = None, columns: int = 200) -> CliRun:
    """Run ``fora-export -q ARGS`` in-process through click's CliRunner, as the console
    script would (``prog_name`` fora-export); exceptions the CLI does not turn into an exit
    code propagate, tracebacks and all. ``expect``: assert this exit code (the output is in
    the assertion message). ``columns``: the terminal width rich lays tables out for (wide, so
    no table row wraps)."""
    from click.testing import CliRunner

    from fora_export.cli import main

    result = CliRunner(env={"COLUMNS": str(columns)}).invoke(
        main, ["-q", *args], catch_exceptions=False, prog_name="fora-export"
    )
    run = CliRun(result.exit_code, result.stdout, result.stderr)
    if expect is not None:
        assert run.exit_code == expect, (
            f"fora-export {' '.join(args)} exited {run.exit_code}, expected {expect}\n"
            f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        )
    return run


def one_error_line(stderr: str, *, fields: int = 3) -> str:
    """The CLI's one-line user error ``error: subject | problem | fix`` (``fields`` parts,
    no traceback), returned for the caller to match."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert lines[0].count(" | ") == fields - 1, stderr
    return lines[0]


def assert_user_error(code: int, stderr: str, pattern: str) -> None:
    """A user error of the CLI: exit code 2, an ``error: ...`` message matching ``pattern``,
    no traceback."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert re.search(pattern, stderr), stderr
    assert stderr.startswith("error: "), stderr


def save_model(make: Callable[..., Any], folder: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """A tiny model from the demo factory ``make`` (seeded random weights), saved with
    save_pretrained into ``folder`` (a MODEL folder any build or load reads)."""
    make(config, seed=seed).save_pretrained(folder)
    return folder


def build_engine(source: str | Path, out: Path, *, batch: str = "1:2:4", **options: Any) -> Path:
    """Build the engine folder ``out`` from MODEL ``source`` with the real build pipeline;
    ``options`` are ``BuildConfig.from_options``'s (the CLI's flags)."""
    config = BuildConfig.from_options(batch=batch, **options)
    build(str(source), out, config, progress=False)
    return out
