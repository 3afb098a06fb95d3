"""The quality tests' shared CLI run: the standard small quality report of an engine folder
(N=1, N=3, every step full, full at step 0 only), as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli

STEPS = 20
ALL_STEPS = ",".join(str(k) for k in range(STEPS))


def small_quality_report(engine: Path, out: Path, *extra: str) -> dict:
    """4 samples per class, 20 steps: no caching, N=3 (paper), every step full (identical
    to N=1: a scheduler carrying state from one generation to the next would break this),
    full at step 0 only (every later step reuses the noisiest step's caches: deliberately
    broken). ``_out`` in the result is ``out``."""
    code, stdout, stderr = run_cli(
        "quality", str(engine), "--samples", "4", "--steps", str(STEPS), "--repeats", "1",
        "--intervals", "1,3", "--schedule-mode", "paper",
        "--schedule-list", ALL_STEPS, "--schedule-list", "0",
        "--json", "--grid", str(out / "grid.png"), *extra,
    )  # fmt: skip
    assert code == 0, stderr
    data = json.loads(stdout)
    data["_out"] = str(out)
    return data


def rows(report: dict) -> dict[str, dict]:
    return {row["label"]: row for row in report["schedules"]}
