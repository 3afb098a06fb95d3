"""The judge of generated digits: a small scikit-learn MLP trained on the real digits.

It is trained at run time (L-BFGS, a fraction of a second) from scikit-learn's bundled ``load_digits``
(1797 8x8 images, nothing downloaded), seeded, so every run scores with the same
network. Three uses:

- ``real_accuracy``: its accuracy on held-out real digits (a quarter, stratified), the
  yardstick for the accuracy of generated digits on their conditioning labels;
- ``features``: the hidden layer's activations, the space of the Fréchet distance (FID
  uses Inception's pool features the same way);
- ``real_features``: those of all real digits, the distance's reference set.

Pixels are in [0, 1] (the digits' 0..16 divided by 16), as [samples, 64] or [samples, 1, 8, 8].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fora_export.errors import ConfigError

IMAGE_SHAPE = (8, 8)
NUM_CLASSES = 10
HIDDEN_UNITS = 64


def require_sklearn() -> None:
    """Fail with the one-line error when scikit-learn is missing (before any work)."""
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "quality | scikit-learn is not installed (it trains the digit classifier that scores samples) "
            "| pip install 'fora-export[quality]'"
        ) from err


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All real digits as pixels in [0, 1], [1797, 64], and their labels."""
    require_sklearn()
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float64) / 16.0, digits.target.astype(np.int64)


@dataclass
class DigitClassifier:
    network: Any  # sklearn.neural_network.MLPClassifier
    real_accuracy: float
    real_features: np.ndarray
    seed: int

    @classmethod
    def fit(cls, seed: int = 0) -> DigitClassifier:
        require_sklearn()
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

        pixels, labels = real_digits()
        train_x, test_x, train_y, test_y = train_test_split(
            pixels, labels, test_size=0.25, stratify=labels, random_state=seed
        )
        # L-BFGS: full-batch, converges in ~50 iterations, a fraction of a second here.
        network = MLPClassifier(
            hidden_layer_sizes=(HIDDEN_UNITS,), solver="lbfgs", alpha=1e-3, max_iter=300, random_state=seed
        )
        # One BLAS thread: these small products ran 7-25x slower on two threads of a
        # shared 2-core machine (0.3 s against 2-8 s), and the result does not depend on it.
        with warnings.catch_warnings(), threadpool_limits(1):
            # Stopping at max_iter would be a deterministic end of training, not a problem.
            warnings.simplefilter("ignore", ConvergenceWarning)
            network.fit(train_x, train_y)
        accuracy = float(np.mean(network.predict(test_x) == test_y))
        classifier = cls(network=network, real_accuracy=accuracy, real_features=np.empty(0), seed=seed)
        classifier.real_features = classifier.features(pixels)
        return classifier

    @staticmethod
    def _flat(pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, np.float64)
        return pixels.reshape(len(pixels), -1)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.network.predict(self._flat(pixels)))

    def accuracy(self, pixels: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of samples the classifier assigns their conditioning label."""
        return float(np.mean(self.predict(pixels) == np.asarray(labels)))

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Hidden-layer activations (ReLU, as the network computes them), [samples, 64]."""
        hidden = self._flat(pixels) @ self.network.coefs_[0] + self.network.intercepts_[0]
        return np.maximum(hidden, 0.0)

    def real_subset_distance(self, count: int, seed: int = 0) -> float:
        """The Fréchet distance of ``count`` real digits (drawn without replacement) to all of
        them: what a perfect generator scores with that many samples (the distance's floor)."""
        from fora_export.quality.metrics import frechet_distance

        rng = np.random.default_rng(seed)
        index = rng.choice(len(self.real_features), size=min(count, len(self.real_features)), replace=False)
        return frechet_distance(self.real_features[index], self.real_features)
