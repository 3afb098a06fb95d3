"""The digit classifier: deterministic, accurate on real digits, features for the distance."""

from __future__ import annotations

import numpy as np

from fora_export.quality.classifier import HIDDEN_UNITS, DigitClassifier, real_digits


def test_classifier_is_seeded_and_scores_real_digits() -> None:
    first, second = DigitClassifier.fit(seed=0), DigitClassifier.fit(seed=0)
    # Held-out real digits: an MLP of this size scores about 97% (chance is 10%).
    assert first.real_accuracy > 0.93
    assert first.real_accuracy == second.real_accuracy
    pixels, labels = real_digits()
    np.testing.assert_array_equal(first.features(pixels[:50]), second.features(pixels[:50]))
    assert first.features(pixels[:5]).shape == (5, HIDDEN_UNITS)
    # Images as [N, 1, 8, 8] score as their flat pixels do.
    assert first.accuracy(pixels.reshape(-1, 1, 8, 8), labels) == first.accuracy(pixels, labels)


def test_real_subset_distance_shrinks_with_more_samples() -> None:
    classifier = DigitClassifier.fit(seed=0)
    few, many = classifier.real_subset_distance(40), classifier.real_subset_distance(800)
    assert 0 < many < few
    # Noise digits are far from real digits, compared at the same sample count.
    noise = np.random.default_rng(0).random((40, 64))
    from fora_export.quality.metrics import frechet_distance

    assert frechet_distance(classifier.features(noise), classifier.real_features) > 5 * few
