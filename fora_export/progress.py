"""Stage progress for long commands: a rich progress bar plus INFO timings."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fora_export.terminal import console as new_console
from fora_export.terminal import plain

log = logging.getLogger("fora_export")


class StageProgress:
    """``with StageProgress(5) as p: p.stage("Exporting full graph") ...``

    Draws a bar on stderr when it is a terminal (or when ``enabled=True``) and
    logs each finished stage with its duration at INFO.
    """

    def __init__(self, total: int, *, title: str = "build", enabled: bool | None = None) -> None:
        console = new_console(stderr=True)
        self._enabled = console.is_terminal if enabled is None else enabled
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self._enabled,
            transient=False,
        )
        self._title = title
        self._total = total
        self._task = self._progress.add_task(plain(title), total=total)
        self._current: str | None = None
        self._started = 0.0

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def stage(self, description: str) -> None:
        """Finish the current stage (if any) and start the next."""
        self._finish_current()
        self._current = description
        self._started = time.perf_counter()
        # Descriptions name models and paths: data, not markup.
        self._progress.update(self._task, description=plain(f"{self._title}: {description}"))

    def add_stages(self, count: int) -> None:
        """Grow the total when a stage turns out to be needed (e.g. optional graphs)."""
        self._total += count
        self._progress.update(self._task, total=self._total)

    def _finish_current(self) -> None:
        if self._current is None:
            return
        log.info("%s: %s done in %.1f s", self._title, self._current, time.perf_counter() - self._started)
        self._progress.advance(self._task)
        self._current = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self._finish_current()
        self._progress.stop()
        if self._enabled:
            sys.stderr.flush()
