"""What a caller may pass to a step, on every backend alike: timesteps must be finite
numbers in the engines' range; ONNX Runtime takes the torch tensors the torch backend
takes; predictions come back in the array family of the latents; ``detect_nonfinite``
names the step whose prediction went NaN or Inf."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fora_runtime import BackendError, ForaSession, InputError, NonFiniteError

BACKENDS = ["onnxruntime", "torch"]
LABELS = np.array([1, 2])


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 4, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module", params=BACKENDS)
def session(request: pytest.FixtureRequest, tiny_torch_engine: Path):
    with ForaSession(tiny_torch_engine, backend=request.param, trust_programs=True) as s:
        yield s


def one_line_input_error(call: Any, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and message.count(" | ") >= 2, message


@pytest.mark.parametrize(
    ("timestep", "pattern"),
    [
        ("999", r"Input 'timestep' \| got '999' \(str\) \| expected a number"),
        (True, r"Input 'timestep' \| got True \(bool\) \| expected a number"),
        (np.array([True, False]), r"got a bool array \| expected numbers"),
        (torch.tensor([True, False]), r"got a bool tensor \| expected numbers"),
        ([None, None], r"got \[None, None\] \| expected a number or one number per sample"),
        (float("nan"), r"values are not all finite \(1 NaN/Inf of 1\)"),
        (np.array([999.0, np.inf], np.float32), r"values are not all finite \(1 NaN/Inf of 2\)"),
        (2000.0, r"values 2000\.\.2000 outside \[0, 999\]"),
        (torch.tensor([500.0, -1.0]), r"values -1\.\.500 outside \[0, 999\]"),
    ],
)
def test_step_refuses_timesteps_that_are_not_finite_numbers_in_range(
    session: ForaSession, timestep: Any, pattern: str
) -> None:
    gen = session.start(3, 2)
    one_line_input_error(lambda: gen.step(latents(), timestep, class_labels=LABELS), pattern)
    assert gen.step_index == 0  # refused, not run


@pytest.mark.parametrize(
    ("timesteps", "pattern"),
    [
        ([None] * 3, r"start\(\) timesteps \| got \[None, None, None\] \| expected numbers"),
        (["999", "500", "0"], r"start\(\) timesteps \| got a str array \| expected numbers"),
        ([True, False, True], r"start\(\) timesteps \| got a bool array \| expected numbers"),
        ([999.0, float("nan"), 0.0], r"values are not all finite \(1 NaN/Inf of 3\)"),
        ([1999.0, 500.0, 0.0], r"outside \[0, 999\]"),
    ],
)
def test_start_refuses_timesteps_that_are_not_finite_numbers_in_range(
    session: ForaSession, timesteps: list[Any], pattern: str
) -> None:
    one_line_input_error(lambda: session.start(3, 2, timesteps=timesteps, class_labels=LABELS), pattern)


def test_numbers_of_every_kind_are_timesteps(session: ForaSession) -> None:
    want = np.asarray(session.start(1, 2).step(latents(), 500.0, class_labels=LABELS))
    for t in (
        500,
        np.int32(500),
        np.float64(500.0),
        [500, 500],
        torch.tensor(500),
        torch.tensor([500.0, 500.0]),
    ):
        got = session.start(1, 2).step(latents(), t, class_labels=LABELS)
        np.testing.assert_array_equal(got, want)


def test_grad_requiring_tensors_run_like_plain_ones(session: ForaSession) -> None:
    plain = session.start(2, 2)
    want = [plain.step(torch.from_numpy(latents(k)), 999.0 - k, class_labels=LABELS) for k in range(2)]
    grad = session.start(2, 2)
    for k in range(2):
        x = torch.from_numpy(latents(k)).requires_grad_(True)
        t = torch.full((2,), 999.0 - k, requires_grad=True)
        got = grad.step(x, t, class_labels=torch.from_numpy(LABELS))
        assert isinstance(got, torch.Tensor) and not got.requires_grad
        torch.testing.assert_close(got, want[k], rtol=0, atol=0)


def test_bf16_latents_for_an_fp32_engine_are_refused_in_one_line(session: ForaSession) -> None:
    gen = session.start(2, 2)
    bf16 = torch.from_numpy(latents()).to(torch.bfloat16)
    one_line_input_error(
        lambda: gen.step(bf16, 999, class_labels=LABELS), r"Input 'latents' \| got bfloat16, expected float32"
    )


def test_predictions_come_back_in_the_family_of_the_latents(session: ForaSession) -> None:
    host = session.start(2, 2).step(latents(), 999, class_labels=LABELS)
    tensor = session.start(2, 2).step(torch.from_numpy(latents()), 999, class_labels=LABELS)
    assert type(host) is np.ndarray and host.dtype == np.float32
    assert type(tensor) is torch.Tensor and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
    np.testing.assert_array_equal(tensor.numpy(), host)
    inputs = {"latents": latents(), "timestep": np.full(2, 999.0, np.float32), "class_labels": LABELS}
    assert type(session.run_step("full", 2, inputs)) is np.ndarray
    inputs["latents"] = torch.from_numpy(inputs["latents"])
    assert type(session.run_step("full", 2, inputs)) is torch.Tensor


def test_detect_nonfinite_names_the_step(tiny_torch_engine: Path) -> None:
    bad = latents()
    bad[0, 0, 0, 0] = np.nan
    with ForaSession(tiny_torch_engine) as quiet:  # off by default: NaN passes through
        assert np.isnan(quiet.start(3, 2).step(bad, 999, class_labels=LABELS)).any()
    for backend in BACKENDS:
        with ForaSession(
            tiny_torch_engine, backend=backend, trust_programs=True, detect_nonfinite=True
        ) as session:
            gen = session.start(3, 2)
            gen.step(latents(), 999, class_labels=LABELS)
            pattern = (
                r"^Step 1 of 3 \(reuse\) \| the prediction holds \d+ NaN/Inf values of 1024; "
                r"the latents passed held NaN/Inf \| "
            )
            with pytest.raises(NonFiniteError, match=pattern):
                gen.step(bad, 900, class_labels=LABELS)
            assert gen.step_index == 2 and gen.history == ["full", "reuse"]  # the refused step ran
            # Per generation: switched off for this one, on again for the next.
            quiet_generation = session.start(1, 2)
            quiet_generation.detect_nonfinite = False
            assert np.isnan(np.asarray(quiet_generation.step(bad, 999, class_labels=LABELS))).any()
            assert session.start(1, 2).detect_nonfinite


def test_onnxruntime_run_failures_name_the_graph(tiny_engine: Path) -> None:
    with ForaSession(tiny_engine, check_inputs=False) as session:
        gen = session.start(2, 2)
        with pytest.raises(
            BackendError,
            match=r"^Backend 'onnxruntime' \| full graph \(full\.onnx\) failed: .* \| check the step",
        ) as raised:
            gen.step(latents(), 999, class_labels=np.array([1, 99]))  # an unchecked embedding index
        assert "\n" not in str(raised.value)
        with pytest.raises(
            InputError, match=r"Input 'latents' \| cannot be staged: .* \| pass shape \[2, 4, 8, 8\]"
        ):
            gen.step(latents()[:, :, :4], 999, class_labels=LABELS)
