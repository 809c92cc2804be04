"""Out-of-distribution image canaries for the empirical privacy audit.

Each canary is an image of independent fair coin flips (pixels 0 or 1) with a label drawn
uniformly at random. Why this makes membership detectable:

- Nothing in the real data resembles dense binary noise (an MNIST digit is a few smooth strokes,
  about 19% of pixels lit), so the rest of the training set neither teaches nor contradicts a
  canary's label: a model only fits it by memorising that very example.
- Its label is independent of its pixels, so a model that did not train on a canary predicts it at
  about chance (1 / num_classes), while one that did can assign it a much lower loss. The gap
  between the losses of inserted and held-out canaries is the membership signal an audit turns
  into an empirical epsilon lower bound.
- Canaries are far apart from one another (two random binary images differ in about half their
  pixels), so inserting one hardly changes the loss of another: each is a separate trial.
"""

from __future__ import annotations

import numpy as np


def make_image_canaries(
    m: int, image_shape: tuple[int, ...], num_classes: int, seed: int
) -> dict[str, np.ndarray]:
    """``m`` canaries, deterministic in ``seed``.

    "image": float32 in {0, 1}, shape (m, *image_shape); "label": int32 in [0, num_classes).

    >>> canaries = make_image_canaries(4, (2, 2, 1), num_classes=10, seed=0)
    >>> canaries["image"].shape, canaries["label"].shape
    ((4, 2, 2, 1), (4,))
    >>> bool(np.isin(canaries["image"], (0.0, 1.0)).all())
    True
    """
    if m < 1:
        raise ValueError(f"number of canaries m={m} must be positive")
    if num_classes < 2:
        raise ValueError(
            f"num_classes={num_classes} must be at least 2 for a random label to carry information"
        )
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 2, size=(m, *image_shape)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=m).astype(np.int32)
    return {"image": images, "label": labels}
