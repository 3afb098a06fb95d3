"""tools/train_digits.py is deterministic and is what wrote the committed demo-digits weights:
a short run reproduces the first losses recorded in their training_log.json (the whole
training takes minutes and is not run here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from fora_export.demo import DEMO_DIGITS_DIR

ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 2


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "tools" / "train_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_run_reproduces_the_committed_first_losses() -> None:
    script = load_script()
    log = json.loads((DEMO_DIGITS_DIR / "training_log.json").read_text())
    settings = log["settings"]
    # Warm-up learning rates do not depend on the run's length: a short run takes the
    # same first steps as the full one.
    assert settings["warmup"] > ITERATIONS
    options = {
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


def test_the_log_records_a_falling_loss_curve() -> None:
    log = json.loads((DEMO_DIGITS_DIR / "training_log.json").read_text())
    curve = [point["loss"] for point in log["loss_curve"]]
    assert log["settings"]["iterations"] == log["loss_curve"][-1]["iteration"]
    # Epsilon MSE starts at ~1 (the noise itself) and falls by an order of magnitude.
    assert log["first_losses"][0] > 0.9 and curve[-1] < 0.1 * log["first_losses"][0]
