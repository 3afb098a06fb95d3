"""tools/train_digits.py is deterministic and is what wrote the committed weights of both
digit demos (``--family dit``: demo-digits, ``--family sd3``: demo-digits-flow): a short
run reproduces the first losses recorded in their training_log.json (the whole training
takes minutes and is not run here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from fora_export.demo import DEMO_DIGITS_DIR, DEMO_DIGITS_FLOW_DIR

ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 2
FOLDERS = {"dit": DEMO_DIGITS_DIR, "sd3": DEMO_DIGITS_FLOW_DIR}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "tools" / "train_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_a_short_run_reproduces_the_committed_first_losses(family: str) -> None:
    script = load_script()
    log = json.loads((FOLDERS[family] / "training_log.json").read_text())
    settings = log["settings"]
    assert settings.get("family", "dit") == family
    # Warm-up learning rates do not depend on the run's length: a short run takes the
    # same first steps as the full one.
    assert settings["warmup"] > ITERATIONS
    options = {
        "family": family,
        "batch_size": settings["batch_size"],
        "peak_lr": settings["peak_lr"],
        "warmup": settings["warmup"],
        "ema_decay": settings["ema_decay"],
        "seed": settings["seed"],
        "quiet": True,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        first = script.train(ITERATIONS, **options)[1]["first_losses"]
        second = script.train(ITERATIONS, **options)[1]["first_losses"]
    finally:
        torch.set_num_threads(threads)
    assert first == second  # deterministic: bit for bit on one machine
    # Against the committed log, written on another run (maybe another CPU, whose BLAS
    # kernels sum in another order): fp32 round-off of a few steps, ~1e-6 relative.
    np.testing.assert_allclose(first, log["first_losses"][:ITERATIONS], rtol=1e-4)
    assert not torch.are_deterministic_algorithms_enabled()  # the setting is restored


#: The loss at the first iteration (untrained: the final layers are zero, so the output
#: is 0) and the factor by which the committed run lowered it at least. Epsilon MSE starts
#: at E[noise^2] = 1 and can fall towards 0; the velocity target noise - x_0 starts at
#: 1 + E[x_0^2] (~1.7 for these pixels in [-1, 1]) and keeps the spread of the digits a
#: noisy input cannot tell apart, so it falls less.
START_AND_FALL = {"dit": (1.0, 10.0), "sd3": (1.7, 4.0)}


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_the_log_records_a_falling_loss_curve(family: str) -> None:
    log = json.loads((FOLDERS[family] / "training_log.json").read_text())
    curve = [point["loss"] for point in log["loss_curve"]]
    start, fall = START_AND_FALL[family]
    assert log["settings"]["iterations"] == log["loss_curve"][-1]["iteration"]
    assert log["first_losses"][0] == pytest.approx(start, rel=0.1)
    assert curve[-1] < log["first_losses"][0] / fall
