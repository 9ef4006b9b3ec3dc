"""The fixed synthetic inputs of the EfficientNet-Lite0 reference features.

``tests/data/efficientnet_lite0_reference.json`` holds the PyTorch features of these
inputs (written by ``experiments/make_efficientnet_reference.py`` in a torch
environment); ``tests/test_vision.py`` regenerates them here and compares the Flax port.
numpy only, so that the torch environment needs nothing else of mmvae.
"""
from __future__ import annotations

import numpy as np

#: The TF-lite training normalisation for [0, 1] images (= mmvae.models.vision.IMAGENET_*).
MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
#: (seed, height, width) of each input; inputs with the same size are run as one batch.
INPUTS: tuple[tuple[int, int, int], ...] = ((0, 224, 224), (1, 224, 224), (2, 160, 192), (3, 200, 168))


def reference_input(seed: int, height: int, width: int) -> np.ndarray:
    """Deterministic normalised RGB image (height, width, 3) float32.

    ``0.5 + 0.3 sin(2 pi (fx x + fy y) + phase)`` per channel, plus a Gaussian blob,
    plus ``0.2 (u - 0.5)`` uniform noise from ``np.random.default_rng(seed)``; clipped
    to [0, 1] and normalised with :data:`MEAN` / :data:`STD`.
    """
    rng = np.random.default_rng(seed)
    freq = rng.random((3, 2)) * 5.0 + 1.0
    phase = rng.random(3) * 2.0 * np.pi
    cy, cx = rng.random(2) * 0.6 + 0.2
    noise = rng.random((height, width, 3))
    yy, xx = np.meshgrid(np.arange(height) / height, np.arange(width) / width, indexing="ij")
    img = np.empty((height, width, 3), np.float64)
    for c in range(3):
        img[..., c] = 0.5 + 0.3 * np.sin(2.0 * np.pi * (freq[c, 0] * xx + freq[c, 1] * yy)
                                         + phase[c])
    img += 0.4 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)[..., None]
    img += 0.2 * (noise - 0.5)
    img = np.clip(img, 0.0, 1.0)
    return ((img - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)
