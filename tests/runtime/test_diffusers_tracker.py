"""The diffusers drop-in's run tracker with plain values (no torch, no diffusers)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fora_runtime.diffusers.tracker import PipelineError, RunTracker, plan_window, timestep_close

EPS32 = float(np.finfo(np.float32).eps)
SCHEDULED = np.array([999.0, 749.0, 499.0, 249.0], dtype=np.float32)


def test_the_tracker_imports_without_torch_or_diffusers() -> None:
    code = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Blocker())
import fora_runtime.diffusers.tracker
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_timesteps_match_within_the_rounding_of_their_dtype() -> None:
    # float16 spacing at 999 is 0.5: a pipeline rounding 999.3 to half precision still matches.
    eps16 = float(np.finfo(np.float16).eps)
    assert timestep_close(np.array([999.0, 999.0]), 999.3, eps16)
    assert not timestep_close(np.array([999.0]), 999.3, EPS32)
    assert not timestep_close(np.array([999.0, 749.0]), 999.0, EPS32)  # every sample must match


def test_a_plan_starts_at_the_timestep_passed_and_ends_where_the_engines_stop_serving() -> None:
    np.testing.assert_array_equal(
        plan_window(SCHEDULED, np.array([749.0]), EPS32, (0.0, 1000.0)), SCHEDULED[1:]
    )
    # An expert serving [500, 1000] plans the first two steps only.
    np.testing.assert_array_equal(
        plan_window(SCHEDULED, np.array([999.0]), EPS32, (500.0, 1000.0)), SCHEDULED[:2]
    )
    with pytest.raises(PipelineError, match="not among its scheduler's 4 timesteps"):
        plan_window(SCHEDULED, np.array([600.0]), EPS32, (0.0, 1000.0))
    with pytest.raises(PipelineError, match=r"the engines serve \[0, 500\]"):
        plan_window(SCHEDULED, np.array([999.0]), EPS32, (0.0, 500.0))


def test_a_call_continues_the_run_only_as_its_next_step() -> None:
    source = object()
    tracker = RunTracker()
    assert not tracker.continues(source, np.array([999.0]), EPS32, step=None, batch_size=1)
    tracker.started(source, SCHEDULED, 1)
    assert tracker.continues(source, np.array([749.0]), EPS32, step=1, batch_size=1)
    # New scheduler timesteps (set_timesteps ran), another batch size or a finished run: a new run.
    assert not tracker.continues(object(), np.array([749.0]), EPS32, step=1, batch_size=1)
    assert not tracker.continues(source, np.array([749.0]), EPS32, step=1, batch_size=2)
    assert not tracker.continues(source, np.array([749.0]), EPS32, step=None, batch_size=1)
    # The scheduler's first timestep again: the pipeline restarted with the same timesteps.
    assert not tracker.continues(source, np.array([999.0]), EPS32, step=2, batch_size=1)
    with pytest.raises(PipelineError, match="passed 249 at step 1 of 4, its scheduler planned 749"):
        tracker.continues(source, np.array([249.0]), EPS32, step=1, batch_size=1)
    tracker.forget()
    assert not tracker.continues(source, np.array([749.0]), EPS32, step=1, batch_size=1)
