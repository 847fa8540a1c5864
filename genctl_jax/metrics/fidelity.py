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


def caption_fidelity(images, captions) -> dict[str, float]:
    """Fractions of images showing what their caption asks for, attribute by attribute.

    images: [N, S, S, 3] as for `class_fidelity`; captions: N strings in the shapes grammar
    (every object of a caption is checked). `colour_shape` (right colour with the right
    shape) is the headline figure; `position` and `size` count the matching objects, and
    `all` the images where every attribute of every object matches.
    """
    images = np.asarray(images)
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"need as many captions as images, got {len(captions)} and {len(images)}")
    counts = dict(colour=0, colour_shape=0, position=0, size=0, all=0)
    objects = 0
    for image, caption in zip(images, captions, strict=True):
        result = shapes.check(image, caption=caption)
        for obj in result.objects:
            objects += 1
            counts["colour"] += obj.colour
            counts["colour_shape"] += obj.colour and obj.shape
            counts["position"] += bool(obj.position)
            counts["size"] += bool(obj.size)
        counts["all"] += result.all_match
    out = {k: v / objects for k, v in counts.items() if k != "all"}
    out["all"] = counts["all"] / len(images)
    return out


def shapes_test_source(data_config):
    """The shapes test split (held-out images) at the run's image size and shapes config."""
    from genctl_jax.data import sources

    return sources.open_source(
        "shapes",
        split="test",
        image_size=data_config.image_size,
        data_dir=data_config.data_dir,
        shapes_config=data_config.shapes_config,
    )


def shapes_test_prompts(data_config, n: int, *, repeat: bool = False) -> list[str]:
    """Captions of the first `n` examples of the shapes test split (held-out images).

    repeat: cycle the split's captions when it has fewer than `n` (else an error).
    """
    from genctl_jax.data import sources

    source = shapes_test_source(data_config)
    if n > len(source) and not repeat:
        raise ValueError(f"the shapes test split has {len(source)} examples, fewer than {n}")
    held_out = [
        sources.to_text(source[i]["caption"], where=f"test example {i}")
        for i in range(min(n, len(source)))
    ]
    return [held_out[i % len(held_out)] for i in range(n)]
