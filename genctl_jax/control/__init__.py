"""Condition extractors for controllable generators: images / label maps / user maps -> the
spatial conditions a ControlNet takes (Canny edges matching OpenCV, Sobel soft edges,
scribbles, segmentation colour maps, depth / pose pass-through), batched and jittable.

`extract(control_type, inputs, **params)` is the entry point; `extractors.py` documents the
input conventions and each extractor, `filters.py` the OpenCV rules reproduced.
"""

from genctl_jax.control.extractors import (
    ControlType,
    as_uint8_images,
    canny,
    canny_thresholds,
    control_map,
    control_types,
    extract,
    extract_map,
    register,
    scribble,
    scribble_from_drawing,
    seg_color_map,
    sobel,
    to_model_input,
    voc_palette,
)

__all__ = [
    "ControlType",
    "as_uint8_images",
    "canny",
    "canny_thresholds",
    "control_map",
    "control_types",
    "extract",
    "extract_map",
    "register",
    "scribble",
    "scribble_from_drawing",
    "seg_color_map",
    "sobel",
    "to_model_input",
    "voc_palette",
]
