"""Sample-quality metrics: against the uncached samples (PSNR, relative L2), and between
two sets of features (the Fréchet distance, FID's formula in another feature space).

numpy only. Images are arrays of any shape whose first axis counts samples.
"""

from __future__ import annotations

import math

import numpy as np


def psnr(images: np.ndarray, reference: np.ndarray, *, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``images`` against ``reference``, from the mean
    squared error over all pixels of all samples (``math.inf`` when they are identical)."""
    mse = float(np.mean((np.asarray(images, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak**2 / mse)


def relative_l2(values: np.ndarray, reference: np.ndarray) -> float:
    """``||values - reference|| / ||reference||`` over the whole set (as validate reports)."""
    values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(values - reference) / np.linalg.norm(reference))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [samples, dims]:
    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of
    the symmetric ``S1^(1/2) S2 S1^(1/2)`` (same spectrum), which stays real and exact to
    round-off where a general matrix square root does not. Identical sets give 0 up to
    that round-off. Like FID it is biased upward for small sets: compare values measured
    with the same number of samples.
    """
    features, reference = np.asarray(features, np.float64), np.asarray(reference, np.float64)
    if features.ndim != 2 or reference.ndim != 2 or features.shape[1] != reference.shape[1]:
        raise ValueError(
            f"feature sets must be [samples, dims] alike, got {features.shape}, {reference.shape}"
        )
    if len(features) < 2 or len(reference) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    mean_gap = features.mean(0) - reference.mean(0)
    cov_a = np.cov(features, rowvar=False)
    cov_b = np.cov(reference, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(cross, 0.0, None))))
    distance = float(mean_gap @ mean_gap + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)  # round-off can take an exact 0 a hair below
