"""Control images from files: what `python -m genctl_jax.sample --control FILE` feeds a ControlNet.

A file is read as the condition map the ControlNet was trained on (an edge map, a segmentation
colour map, a depth map: 8-bit PNG or JPEG), or, with `extract=True`, as the input of the
control type's extractor (`EXTRACTED_FROM`): an image for 'canny', 'sobel' and 'scribble', a
label-id map (greyscale or palette PNG) for 'seg'. A file of another size than the model's
control input is resized with a logged note rather than refused (a map drawn at another
resolution still says what the user wants): nearest-neighbour for segmentation, bilinear
otherwise, and any extractor runs after the resize, at the model's resolution.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging
from PIL import Image

from genctl_jax.control import extractors
from genctl_jax.errors import ConfigError

# control type -> what a file must hold for `extract=True`.
EXTRACTED_FROM = {
    "canny": "an image",
    "sobel": "an image",
    "scribble": "an image",
    "seg": "a label-id map",
}
NEAREST = ("seg",)  # Control types whose maps are categorical: resized nearest-neighbour.
GREY_MODES = ("1", "L", "LA")  # Read as one channel; other modes as RGB.


def _open(path: pathlib.Path, label_ids: bool) -> np.ndarray:
    """uint8 [H, W] (greyscale, or label ids) or [H, W, 3]."""
    if not path.is_file():
        raise ConfigError(f"control image {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
    except OSError as e:
        raise ConfigError(
            f"control image {str(path)!r} is not an image PIL can read: {e}"
        ) from None
    if img.mode in ("I", "I;16", "F") or img.mode.startswith("I;"):
        raise ConfigError(
            f"control image {str(path)!r} has {img.mode!r} pixels; save it as an 8-bit PNG"
        )
    if label_ids:
        if img.mode not in ("L", "P"):
            raise ConfigError(
                f"control image {str(path)!r} is {img.mode!r}; label ids for 'seg' must be a "
                f"greyscale ('L') or palette ('P') PNG whose pixel values are the class ids"
            )
        return np.asarray(img, np.uint8)
    img = img.convert("L" if img.mode in GREY_MODES else "RGB")
    return np.asarray(img, np.uint8)


def _resized(array: np.ndarray, size: int, nearest: bool, path: pathlib.Path) -> np.ndarray:
    height, width = array.shape[:2]
    if (height, width) == (size, size):
        return array
    logging.warning(
        "control image %s is %d x %d; resized to the model's %d x %d (%s)",
        path,
        width,
        height,
        size,
        size,
        "nearest" if nearest else "bilinear",
    )
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size, size), resample=resample))


def read_label_ids(
    path: str | pathlib.Path, size: int, num_classes: int | None = None
) -> np.ndarray:
    """uint8 [size, size] class ids of a label-id PNG (greyscale or palette), resized
    nearest-neighbour with a logged note when it has another size; ids must be < num_classes
    (None: any uint8 id)."""
    path = pathlib.Path(path)
    ids = _resized(_open(path, label_ids=True), size, True, path)
    if num_classes is not None and int(ids.max()) >= num_classes:
        raise ConfigError(
            f"label map {str(path)!r} holds class id {int(ids.max())}, but the model has "
            f"{num_classes} classes (ids 0..{num_classes - 1}); save the class ids themselves "
            f"as pixel values"
        )
    return ids


def read_control(
    path: str | pathlib.Path, control_type: str, channels: int, size: int, *, extract: bool = False
) -> np.ndarray:
    """The control image of a file as a ControlNet takes it: float32 [1, size, size, channels]
    in [0, 1] (module doc). control_type: what the ControlNet was trained on."""
    path = pathlib.Path(path)
    if extract and control_type not in EXTRACTED_FROM:
        raise ConfigError(
            f"extracting a {control_type!r} control from a file is not supported: its file must "
            f"be the map itself; extraction works for "
            f"{', '.join(f'{k} (from {v})' for k, v in EXTRACTED_FROM.items())}"
        )
    label_ids = extract and control_type == "seg"
    array = _resized(_open(path, label_ids), size, control_type in NEAREST, path)
    if label_ids:
        return np.asarray(extractors.extract("seg", array[None], channels=channels))
    if extract:
        return np.asarray(extractors.extract(control_type, array[None], channels=channels))
    grey = array.ndim == 2
    if control_type == "seg" and grey:
        raise ConfigError(
            f"control image {str(path)!r} is greyscale, but a 'seg' ControlNet takes a "
            f"segmentation colour map [H, W, 3]; if the file holds class ids, pass "
            f"--extract_control to colour them"
        )
    if not grey and channels == 1:
        if (array == array[..., :1]).all():
            array = array[..., 0]  # A greyscale map saved as RGB.
        else:
            raise ConfigError(
                f"control image {str(path)!r} is a colour image of shape {array.shape}, but the "
                f"{control_type!r} ControlNet takes 1-channel maps [{size}, {size}, 1]"
            )
    return np.asarray(extractors.to_model_input(array[None], channels))
