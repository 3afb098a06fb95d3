"""The quality metrics measure what they name: exact values on constructed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fora_export.quality.metrics import frechet_distance, psnr, relative_l2


def test_identical_samples_give_infinite_psnr_and_zero_distances() -> None:
    images = np.random.default_rng(0).random((20, 1, 8, 8))
    assert psnr(images, images.copy()) == math.inf
    assert relative_l2(images, images.copy()) == 0.0
    features = np.random.default_rng(1).standard_normal((200, 16))
    # Exact in exact arithmetic; float64 round-off of sums of ~16 unit-size terms stays
    # far below 1e-9.
    assert frechet_distance(features, features.copy()) == pytest.approx(0.0, abs=1e-9)


def test_psnr_of_a_known_error() -> None:
    reference = np.full((4, 8, 8), 0.5)
    assert psnr(reference + 0.1, reference) == pytest.approx(20.0, abs=1e-9)  # mse 0.01, peak 1
    assert psnr(reference + 0.01, reference) == pytest.approx(40.0, abs=1e-9)


def test_relative_l2_is_relative_to_the_reference() -> None:
    reference = np.ones((3, 4))
    assert relative_l2(reference * 1.1, reference) == pytest.approx(0.1, abs=1e-12)


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(2)
    features = rng.standard_normal((500, 8))
    shift = np.arange(8, dtype=np.float64) / 4
    # Same covariance, shifted mean: the distance is the squared shift.
    assert frechet_distance(features + shift, features) == pytest.approx(float(shift @ shift), rel=1e-9)
    # Same mean, covariance scaled by s^2: tr(S + s^2 S - 2 s S) = (1 - s)^2 tr(S).
    scale = 3.0
    centred = features - features.mean(0)
    expected = (1 - scale) ** 2 * float(np.trace(np.cov(centred, rowvar=False)))
    assert frechet_distance(centred * scale, centred) == pytest.approx(expected, rel=1e-9)
    # Symmetric in its arguments.
    other = rng.standard_normal((300, 8)) * 2 + 1
    assert frechet_distance(features, other) == pytest.approx(frechet_distance(other, features), rel=1e-9)


def test_frechet_distance_refuses_mismatched_sets() -> None:
    with pytest.raises(ValueError, match="alike"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
