"""Conditional fidelity on the embedded shapes dataset, judged by its analytic checker.

No pretrained network: `genctl_jax.data.shapes.check` finds the blob of the requested
colour and compares its shape with rendered templates.
"""

from __future__ import annotations

import numpy as np

from genctl_jax.data import shapes


def class_fidelity(images, labels) -> dict[str, float]:
    """Fractions of images showing their class: colour present, and colour and shape right.

    images: [N, S, S, 3] in [-1, 1] (float) or uint8; labels: [N] shapes class ids.
    `class` (colour and shape) is the headline figure.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"need as many labels as images, got {len(labels)} and {len(images)}")
    colour = shape = 0
    for image, label in zip(images, labels, strict=True):
        result = shapes.check(image, label=int(label)).objects[0]
        colour += result.colour
        shape += result.colour and result.shape
    n = len(images)
    return {"colour": colour / n, "class": shape / n}
