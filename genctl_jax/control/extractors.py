"""Condition extractors: images (or label / user maps) -> the spatial conditions of ControlNet.

Every extractor takes a batch and returns a batch, is pure JAX (jittable, shardable over the
batch), and validates its input before tracing anything: shapes, dtypes and channel counts
always; value ranges whenever the input is concrete (not a tracer inside someone's `jit`).

Inputs.
  images  NHWC [N, H, W, C], C = 1 (grey) or 3 (RGB). uint8 (and other integer dtypes) are
          read as [0, 255]. Floats are read in `value_range`, by default (-1, 1), the
          model's range; pass value_range=(0, 255) or (0, 1) for other float images. Values
          may overshoot the range by 2% of its span (clipped); more is a DataError. Floats
          are quantised to uint8 as round((x - lo) * 255 / (hi - lo)) (half to even) before
          any extractor runs, as the reference annotators work on uint8 images.
  labels  integer [N, H, W] label maps, >= 0.
  maps    user-made condition maps (depth, pose) [N, H, W] or [N, H, W, C]: uint8 in
          [0, 255] or floats in `value_range` (default (0, 1)).

Extractors (each also registered under its control type, see `extract`):
  canny        `canny`: cv2.Canny, bit for bit (aperture 3, L1 or L2 gradient), with an
               optional cv2.GaussianBlur pre-step (bit-exact too). ControlNet's annotator runs
               cv2.Canny(image, 100, 200) on the RGB image without blurring: that is
               color="rgb" here; the default color="gray" runs on the cv2 RGB2GRAY image.
  sobel        `sobel`: soft edges, the L2 Sobel gradient magnitude of the grey image in
               [0, 255] (per image max -> 255, or a fixed scale).
  scribble     `scribble`: a "fake scribble" from an image, ControlNet's recipe with Sobel
               soft edges in place of HED: soft edges, Gaussian blur, thinning to line maxima,
               threshold, then a second blur and a low threshold that thickens the strokes.
  scribble_drawing  `scribble_from_drawing`: a user's drawing (dark ink on light paper) ->
               white strokes on black, ControlNet's scribble input (ink = every channel below
               the threshold).
  seg          `seg_color_map`: label maps -> colour images with a fixed palette (by default
               the PASCAL VOC colour map, `voc_palette`: 0 = black, 1 = (128, 0, 0), ...).
  depth, pose  `control_map`: pass-through of user maps, validated and converted.
Raw extractors return uint8 maps ([N, H, W] for edges, [N, H, W, 3] for colour maps).
`extract(control_type, inputs, **params)` returns what a ControlNet takes:
float32 [N, H, W, channels] in [0, 1] (`to_model_input`; channels=3 as ControlNet).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from genctl_jax.control import filters
from genctl_jax.errors import ConfigError, DataError

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

_RANGE_SLACK = 0.02  # of the span: float inputs may overshoot their range this much


# ------------------------------------------------------------------------------------------
# Input validation and conversion
# ------------------------------------------------------------------------------------------


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _array(x: Any, name: str):
    """x as a jax.Array / numpy array (never copied to the host when it is a jax.Array)."""
    if isinstance(x, jax.Array):
        return x
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be an array, got {type(x).__name__}: {e}") from None
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise DataError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    return arr


def _min_max(x) -> tuple[float, float] | None:
    """(min, max) of a concrete array (None when traced or empty)."""
    if _is_traced(x) or x.size == 0:
        return None
    if isinstance(x, jax.Array):
        return float(jnp.min(x)), float(jnp.max(x))
    return float(np.min(x)), float(np.max(x))


def _check_value_range(value_range: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ConfigError(f"value_range must be (lo, hi), got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ConfigError(f"value_range must be finite (lo, hi) with hi > lo, got {value_range}")
    return lo, hi


def _scaled(
    x, name: str, value_range: Any, default_float_range: tuple[float, float], scale: float
) -> jax.Array:
    """x mapped to [0, scale] (integers read as [0, 255], floats in value_range), float32."""
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_ or dtype.kind not in "uif":
        raise DataError(
            f"{name} must hold integers in [0, 255] or floats, got dtype {dtype}; "
            "convert masks to uint8 (0 / 255) first"
        )
    if dtype.kind in "ui":
        if value_range is not None and tuple(value_range) != (0, 255):
            raise ConfigError(
                f"value_range={value_range!r} applies to float {name}; integer {name} are "
                "read as [0, 255]"
            )
        if dtype != np.uint8:
            span = _min_max(x)
            if span is not None and (span[0] < 0 or span[1] > 255):
                raise DataError(
                    f"integer {name} must lie in [0, 255], got values {span[0]:g}..{span[1]:g}"
                )
        return jnp.asarray(x, jnp.float32) * (scale / 255.0)
    lo, hi = _check_value_range(default_float_range if value_range is None else value_range)
    if not _is_traced(x) and x.size:
        if not bool(jnp.all(jnp.isfinite(x))):
            raise DataError(f"{name} contain NaN or infinite values")
        span = _min_max(x)
        slack = _RANGE_SLACK * (hi - lo)
        if span[0] < lo - slack or span[1] > hi + slack:
            raise DataError(
                f"float {name} span [{span[0]:.4g}, {span[1]:.4g}], outside value_range "
                f"({lo:g}, {hi:g}); pass value_range=(lo, hi) for their range, e.g. (0, 255) "
                "or (0, 1)"
            )
    x = (jnp.asarray(x, jnp.float32) - lo) * (scale / (hi - lo))
    return jnp.clip(x, 0.0, scale)


def as_uint8_images(images: Any, value_range: Any = None, *, name: str = "images") -> jax.Array:
    """uint8 [N, H, W, C] (C = 1 or 3) from NHWC images (see the module docstring)."""
    x = _array(images, name)
    if x.ndim != 4:
        hint = "; for a single image use images[None]" if x.ndim == 3 else ""
        raise DataError(
            f"{name} must be NHWC [N, H, W, C] with C = 1 or 3, got shape {tuple(x.shape)}{hint}"
        )
    n, h, w, c = x.shape
    if c not in (1, 3):
        hint = "; drop the alpha channel with images[..., :3]" if c == 4 else ""
        raise DataError(
            f"{name} must have 1 (grey) or 3 (RGB) channels, got {c} in shape "
            f"{tuple(x.shape)}{hint}"
        )
    if h < 1 or w < 1:
        raise DataError(f"{name} must be at least 1x1, got shape {tuple(x.shape)}")
    if np.dtype(x.dtype) == np.uint8:
        return jnp.asarray(x)
    u = _scaled(x, name, value_range, (-1.0, 1.0), 255.0)
    return jnp.round(u).astype(jnp.uint8)


def _image_size_check(images: jax.Array, half: int, what: str) -> None:
    h, w = images.shape[1], images.shape[2]
    if half >= min(h, w):
        raise DataError(
            f"{what} needs images larger than {half} pixels on each side (its kernel radius), "
            f"got {h}x{w}; use a smaller sigma / ksize or larger images"
        )


def _grey(u8: jax.Array) -> jax.Array:
    """int32 [N, H, W, 1] grey image of uint8 [N, H, W, C] (cv2 RGB2GRAY for C = 3)."""
    x = u8.astype(jnp.int32)
    return filters.rgb_to_gray(x)[..., None] if x.shape[-1] == 3 else x


# ------------------------------------------------------------------------------------------
# Canny
# ------------------------------------------------------------------------------------------


def canny_thresholds(
    low_threshold: Any, high_threshold: Any, l2_gradient: bool = False
) -> tuple[jax.Array, jax.Array]:
    """OpenCV's integer thresholds on the magnitude: (low, high) int32, scalars or [N].

    Swapped per element when low > high; with L2 gradients each is clamped to 32767 and
    squared when positive; then floored. Concrete thresholds are computed in float64 as
    OpenCV does; traced ones in float32 (exact for thresholds that are multiples of 1/8 and
    below 2048).
    """
    traced = _is_traced(low_threshold) or _is_traced(high_threshold)
    xp = jnp if traced else np
    dtype = jnp.float32 if traced else np.float64
    lo, hi = xp.asarray(low_threshold, dtype), xp.asarray(high_threshold, dtype)
    for name, t in (("low_threshold", lo), ("high_threshold", hi)):
        if t.ndim > 1:
            raise ConfigError(f"{name} must be a number or one per image [N], got shape {t.shape}")
        if not traced and not np.all(np.isfinite(t)):
            raise ConfigError(f"{name} must be finite, got {t}")
    lo, hi = xp.minimum(lo, hi), xp.maximum(lo, hi)
    if l2_gradient:
        lo, hi = (xp.minimum(t, 32767.0) for t in (lo, hi))
        lo, hi = (xp.where(t > 0, t * t, t) for t in (lo, hi))
    lo, hi = (xp.clip(xp.floor(t), -(2.0**31), 2.0**31 - 128) for t in (lo, hi))
    return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("l2_gradient", "color", "blur_sigma", "blur_ksize", "iterations")
)
def _canny(u8, low, high, *, l2_gradient, color, blur_sigma, blur_ksize, iterations):
    x = _grey(u8) if color == "gray" else u8.astype(jnp.int32)
    if blur_sigma > 0:
        x = filters.gaussian_blur_u8(x, blur_sigma, blur_ksize)
    edges = filters.canny_u8(x, low, high, l2_gradient=l2_gradient, iterations=iterations)
    return jnp.where(edges, 255, 0).astype(jnp.uint8)


def _check_blur(sigma: Any, ksize: Any) -> tuple[float, int]:
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma >= 0:
        raise ConfigError(f"blur_sigma={sigma!r}: expected a number >= 0 (0 = no blur)")
    if isinstance(ksize, bool) or not isinstance(ksize, int) or ksize < 0:
        raise ConfigError(f"blur_ksize={ksize!r}: expected 0 (from sigma) or an odd size")
    if ksize and ksize % 2 == 0:
        raise ConfigError(f"blur_ksize={ksize} must be odd (or 0: from sigma)")
    if ksize and not sigma:
        raise ConfigError(f"blur_ksize={ksize} needs blur_sigma > 0")
    return float(sigma), int(ksize)


def canny(
    images: Any,
    low_threshold: Any = 100.0,
    high_threshold: Any = 200.0,
    *,
    l2_gradient: bool = False,
    aperture_size: int = 3,
    color: str = "gray",
    blur_sigma: float = 0.0,
    blur_ksize: int = 0,
    hysteresis_iterations: int | None = None,
    value_range: Any = None,
) -> jax.Array:
    """Canny edges, uint8 [N, H, W] in {0, 255}, equal to OpenCV's pixel for pixel.

    low_threshold, high_threshold: on the gradient magnitude as cv2.Canny's threshold1/2
      (order free), numbers or one per image [N]; ControlNet uses 100, 200 (its training
      randomised them per image; per-image thresholds do that in one call).
    l2_gradient: sqrt(dx^2 + dy^2) instead of |dx| + |dy|. aperture_size: 3 only.
    color: "gray" runs on cv2.cvtColor(RGB2GRAY) of the image; "rgb" runs cv2.Canny's
      multi-channel rule on the RGB image itself (ControlNet's annotator); grey images
      ignore it.
    blur_sigma, blur_ksize: an optional cv2.GaussianBlur(x, (ksize, ksize), sigma) first
      (sigma = 0: none, cv2.Canny alone; ksize = 0: OpenCV's size from sigma).
    hysteresis_iterations: None propagates edges until convergence; an int bounds the
      propagation to that many pixels from a strong edge (fixed cost, may drop long weak
      chains).
    """
    if color not in ("gray", "rgb"):
        raise ConfigError(f"color={color!r}: expected 'gray' (cv2 RGB2GRAY first) or 'rgb'")
    if aperture_size != 3:
        raise ConfigError(f"aperture_size={aperture_size!r}: only 3 is implemented")
    if hysteresis_iterations is not None and (
        isinstance(hysteresis_iterations, bool)
        or not isinstance(hysteresis_iterations, int)
        or hysteresis_iterations < 0
    ):
        raise ConfigError(
            f"hysteresis_iterations={hysteresis_iterations!r}: expected None (until "
            "convergence) or an int >= 0"
        )
    sigma, ksize = _check_blur(blur_sigma, blur_ksize)
    u8 = as_uint8_images(images, value_range)
    if sigma:
        _image_size_check(u8, (ksize or filters.gaussian_ksize(sigma)) // 2, "blur_sigma")
    low, high = canny_thresholds(low_threshold, high_threshold, bool(l2_gradient))
    for name, t in (("low_threshold", low), ("high_threshold", high)):
        if t.ndim == 1 and t.shape[0] != u8.shape[0]:
            raise ConfigError(
                f"{name} holds {t.shape[0]} values but the batch has {u8.shape[0]} images"
            )
    return _canny(
        u8,
        low,
        high,
        l2_gradient=bool(l2_gradient),
        color=color,
        blur_sigma=sigma,
        blur_ksize=ksize,
        iterations=hysteresis_iterations,
    )


# ------------------------------------------------------------------------------------------
# Soft edges and scribbles
# ------------------------------------------------------------------------------------------

_SOBEL_STEP = 1020.0  # |dx| of a full-contrast (0 -> 255) step edge with the 3x3 Sobel


def _soft_edges(u8, blur_sigma: float, blur_ksize: int, normalize: str) -> jax.Array:
    """float32 [N, H, W] in [0, 255]: L2 Sobel magnitude of the grey image, normalised."""
    x = _grey(u8)
    if blur_sigma > 0:
        x = filters.gaussian_blur_u8(x, blur_sigma, blur_ksize)
    dx, dy = filters.sobel3(x[..., 0].astype(jnp.float32))
    mag = jnp.sqrt(dx * dx + dy * dy)
    if normalize == "image":
        peak = jnp.max(mag, axis=(1, 2), keepdims=True)
        return jnp.where(peak > 0, mag * (255.0 / jnp.maximum(peak, 1e-6)), 0.0)
    return jnp.minimum(mag * (255.0 / _SOBEL_STEP), 255.0)


@functools.partial(jax.jit, static_argnames=("blur_sigma", "blur_ksize", "normalize"))
def _sobel(u8, *, blur_sigma, blur_ksize, normalize):
    return jnp.round(_soft_edges(u8, blur_sigma, blur_ksize, normalize)).astype(jnp.uint8)


def _check_normalize(normalize: str) -> None:
    if normalize not in ("image", "fixed"):
        raise ConfigError(
            f"normalize={normalize!r}: expected 'image' (each image's strongest edge -> 255) "
            "or 'fixed' (a full-contrast step edge -> 255)"
        )


def sobel(
    images: Any,
    *,
    normalize: str = "image",
    blur_sigma: float = 0.0,
    blur_ksize: int = 0,
    value_range: Any = None,
) -> jax.Array:
    """Soft edges, uint8 [N, H, W]: sqrt(dx^2 + dy^2) of the 3x3 Sobel of the grey image.

    normalize: "image" scales each image's largest magnitude to 255 (flat images give 0);
    "fixed" maps a full-contrast step edge (magnitude 1020) to 255 and clips.
    blur_sigma, blur_ksize: optional Gaussian pre-blur as in `canny`.
    """
    _check_normalize(normalize)
    sigma, ksize = _check_blur(blur_sigma, blur_ksize)
    u8 = as_uint8_images(images, value_range)
    if sigma:
        _image_size_check(u8, (ksize or filters.gaussian_ksize(sigma)) // 2, "blur_sigma")
    return _sobel(u8, blur_sigma=sigma, blur_ksize=ksize, normalize=normalize)


@functools.partial(
    jax.jit,
    static_argnames=("thin_sigma", "thin_threshold", "thicken_sigma", "thicken_threshold"),
)
def _scribble(u8, *, thin_sigma, thin_threshold, thicken_sigma, thicken_threshold):
    soft = _soft_edges(u8, 0.0, 0, "image")
    if thin_sigma > 0:
        soft = filters.gaussian_blur_float(soft, thin_sigma)
    lines = jnp.where(filters.line_maxima(soft) > thin_threshold, 255.0, 0.0)
    if thicken_sigma > 0:
        lines = filters.gaussian_blur_float(lines, thicken_sigma)
    return jnp.where(lines > thicken_threshold, 255, 0).astype(jnp.uint8)


def scribble(
    images: Any,
    *,
    thin_sigma: float = 0.5,
    thin_threshold: float = 64.0,
    thicken_sigma: float = 0.5,
    thicken_threshold: float = 4.0,
    value_range: Any = None,
) -> jax.Array:
    """Scribble-like strokes, uint8 [N, H, W] in {0, 255}, simplified from an image.

    ControlNet's "fake scribble" recipe with Sobel soft edges (`sobel`, per-image
    normalised, [0, 255]) in place of its HED network:
    1. blur the soft edges (Gaussian, thin_sigma; 0 = none) and keep only pixels that are
       maxima of their 3-pixel line in at least one of 4 directions (thin ridges);
    2. keep those above thin_threshold (on [0, 255]): the salient contours;
    3. blur the binary strokes (thicken_sigma; 0 = none) and keep everything above
       thicken_threshold, which thickens and smooths them into hand-drawn-looking strokes.
    ControlNet used sigma 3.0 and threshold 127 at 512 px; the defaults here suit 32-128 px
    (thicken_sigma 0.5 with threshold 4 grows each stroke pixel into a plus, about 3 px wide).
    """
    params = {
        "thin_sigma": thin_sigma,
        "thin_threshold": thin_threshold,
        "thicken_sigma": thicken_sigma,
        "thicken_threshold": thicken_threshold,
    }
    for name, v in params.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
            raise ConfigError(f"{name}={v!r}: expected a number >= 0")
    u8 = as_uint8_images(images, value_range)
    return _scribble(u8, **{k: float(v) for k, v in params.items()})


def scribble_from_drawing(
    drawings: Any, *, threshold: float = 127.0, value_range: Any = None
) -> jax.Array:
    """A user's drawing (dark strokes on light paper) -> uint8 [N, H, W], 255 on strokes.

    A pixel is ink when every channel is below `threshold` (on [0, 255]), as ControlNet's
    scribble demo reads drawings.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ConfigError(f"threshold={threshold!r}: expected a number on [0, 255]")
    u8 = as_uint8_images(drawings, value_range, name="drawings")
    ink = jnp.max(u8, axis=-1) < threshold
    return jnp.where(ink, 255, 0).astype(jnp.uint8)


# ------------------------------------------------------------------------------------------
# Segmentation colour maps
# ------------------------------------------------------------------------------------------

_VOC_LABELS = 1 << 24  # labels the VOC bit pattern tells apart


def _voc_colors(labels: jax.Array) -> jax.Array:
    """uint8 [..., 3] PASCAL VOC colour of int32 labels: bit 3k + c of the label is bit
    7 - k of channel c."""
    rgb = []
    for c in range(3):
        v = jnp.zeros_like(labels)
        for k in range(8):
            v = v | (((labels >> (3 * k + c)) & 1) << (7 - k))
        rgb.append(v)
    return jnp.stack(rgb, axis=-1).astype(jnp.uint8)


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """uint8 [num_colors, 3]: the PASCAL VOC colour map (0 black, 1 (128, 0, 0), 2 (0, 128, 0),
    ..., 15 (192, 128, 128), 255 (224, 224, 192)); distinct for up to 2^24 labels."""
    if isinstance(num_colors, bool) or not isinstance(num_colors, int):
        raise ConfigError(f"num_colors={num_colors!r}: expected an int")
    if not 0 < num_colors <= _VOC_LABELS:
        raise ConfigError(f"num_colors={num_colors}: expected 1..{_VOC_LABELS}")
    return np.asarray(_voc_colors(jnp.arange(num_colors, dtype=jnp.int32)))


_voc_colors_jit = jax.jit(_voc_colors)


@jax.jit
def _palette_lookup(labels, palette):
    return jnp.take(palette, labels, axis=0, mode="clip")


def seg_color_map(labels: Any, *, palette: Any = None) -> jax.Array:
    """Colour images uint8 [N, H, W, 3] of integer label maps [N, H, W].

    palette: None for the VOC colour map (any label < 2^24), or [K, 3] colours in [0, 255]
    (labels must be < K). Negative labels are an error (under a caller's jit, where values
    cannot be checked, out-of-range labels take the nearest palette entry).
    """
    x = _array(labels, "labels")
    if x.ndim != 3:
        hint = "; squeeze the channel axis" if x.ndim == 4 and x.shape[-1] == 1 else ""
        raise DataError(f"labels must be [N, H, W] label maps, got shape {tuple(x.shape)}{hint}")
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_ or dtype.kind not in "ui":
        raise DataError(
            f"labels must be integers, got dtype {dtype}; cast whole-number maps with "
            ".astype(np.int32)"
        )
    if palette is None:
        num = _VOC_LABELS
    else:
        pal = np.asarray(palette)
        if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < 1:
            raise ConfigError(f"palette must be [K, 3] RGB colours, got shape {pal.shape}")
        if pal.dtype.kind not in "uif" or pal.min() < 0 or pal.max() > 255:
            raise ConfigError("palette colours must be numbers in [0, 255]")
        num = pal.shape[0]
    span = _min_max(x)
    if span is not None and (span[0] < 0 or span[1] >= num):
        raise DataError(
            f"labels must lie in [0, {num}), got {span[0]:g}..{span[1]:g}"
            + ("" if palette is None else f" (the palette has {num} colours)")
        )
    labels32 = jnp.asarray(x).astype(jnp.int32)
    if palette is None:
        return _voc_colors_jit(labels32)
    return _palette_lookup(labels32, jnp.asarray(np.rint(pal), jnp.uint8))


# ------------------------------------------------------------------------------------------
# Pass-through maps and the model input
# ------------------------------------------------------------------------------------------

_MAP_CHANNELS = {"depth": (1, 3), "pose": (3,)}


def _check_channels(channels: Any) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"channels={channels!r}: expected 1 or 3 (ControlNet uses 3)")
    return int(channels)


def control_map(
    maps: Any, *, kind: str = "depth", channels: int = 3, value_range: Any = None
) -> jax.Array:
    """A user-made condition map as the model's input: float32 [N, H, W, channels] in [0, 1].

    kind: "depth" ([N, H, W], [N, H, W, 1] or a grey [N, H, W, 3]; nearer = brighter as
    the annotators draw it) or "pose" (an RGB skeleton rendering [N, H, W, 3]).
    maps: uint8 / integers in [0, 255], or floats in value_range (default (0, 1)).
    channels: the model's input channels; grey depth is repeated to 3, and 3-channel depth
    reduces to 1 only when its channels are equal (checked when concrete).
    """
    if kind not in _MAP_CHANNELS:
        raise ConfigError(f"kind={kind!r}: expected one of {sorted(_MAP_CHANNELS)}")
    channels = _check_channels(channels)
    x = _array(maps, f"{kind} maps")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(
            f"{kind} maps must be [N, H, W] or [N, H, W, C], got shape {tuple(x.shape)}"
        )
    c = x.shape[-1]
    if c not in _MAP_CHANNELS[kind]:
        raise DataError(
            f"{kind} maps must have {' or '.join(map(str, _MAP_CHANNELS[kind]))} channels, "
            f"got {c} in shape {tuple(x.shape)}"
        )
    if channels not in _MAP_CHANNELS[kind]:
        raise ConfigError(f"{kind} maps feed a 3-channel input, got channels={channels}")
    out = _scaled(x, f"{kind} maps", value_range, (0.0, 1.0), 1.0)
    if c == 3 and channels == 1:
        if not _is_traced(out) and not bool(jnp.all(out == out[..., :1])):
            raise DataError(
                "3-channel depth maps can feed a 1-channel input only when grey (all channels "
                "equal); these differ"
            )
        out = out[..., :1]
    return jnp.broadcast_to(out, (*out.shape[:3], channels)) if c == 1 else out


def to_model_input(maps: Any, channels: int = 3) -> jax.Array:
    """uint8 maps [N, H, W] or [N, H, W, C] -> float32 [N, H, W, channels] in [0, 1]
    (one-channel maps are repeated, as ControlNet's HWC3)."""
    channels = _check_channels(channels)
    x = _array(maps, "maps")
    if np.dtype(x.dtype) != np.uint8:
        raise DataError(f"maps must be uint8 extractor output, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"maps must be [N, H, W] or [N, H, W, 1 | 3], got {tuple(x.shape)}")
    if x.shape[-1] == 3 and channels == 1:
        raise ConfigError("a 3-channel (colour) map cannot feed a 1-channel control input")
    out = jnp.asarray(x, jnp.float32) / 255.0
    return jnp.broadcast_to(out, (*out.shape[:3], channels))


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControlType:
    """One control type of `extract`.

    name: its key. fn: inputs, **params -> uint8 map ([N, H, W] or [N, H, W, 3]), or, when
    `passthrough`, inputs, channels=..., **params -> the model input itself. inputs: what it
    reads ("images", "labels" or "maps"). description: one line for error messages.
    """

    name: str
    fn: Callable[..., jax.Array]
    inputs: str
    description: str
    passthrough: bool = False


_REGISTRY: dict[str, ControlType] = {}


def register(control_type: ControlType, *, replace: bool = False) -> ControlType:
    """Adds a control type to `extract` (replace=True to override an existing name)."""
    if not isinstance(control_type, ControlType):
        raise ConfigError(f"register expects a ControlType, got {type(control_type).__name__}")
    if control_type.name in _REGISTRY and not replace:
        raise ConfigError(
            f"control type {control_type.name!r} is already registered; pass replace=True"
        )
    _REGISTRY[control_type.name] = control_type
    return control_type


def control_types() -> Mapping[str, ControlType]:
    """The registered control types by name (read-only view)."""
    return dict(_REGISTRY)


def _lookup(control_type: str) -> ControlType:
    spec = _REGISTRY.get(control_type) if isinstance(control_type, str) else None
    if spec is None:
        known = ", ".join(f"{k!r} ({v.description})" for k, v in sorted(_REGISTRY.items()))
        raise ConfigError(f"unknown control type {control_type!r}; known: {known}")
    return spec


def _bind(spec: ControlType, inputs: Any, params: dict[str, Any]) -> None:
    fixed = sorted(set(getattr(spec.fn, "keywords", {})) & set(params))
    if fixed:
        raise ConfigError(f"control type {spec.name!r} fixes {fixed}; do not pass them")
    try:
        inspect.signature(spec.fn).bind(inputs, **params)
    except TypeError as e:
        accepted = [
            p.name
            for p in list(inspect.signature(spec.fn).parameters.values())[1:]
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        raise ConfigError(
            f"control type {spec.name!r}: {e}; it accepts parameters {accepted}"
        ) from None


def extract_map(control_type: str, inputs: Any, **params: Any) -> jax.Array:
    """The control type's own output: uint8 maps for extractors, the model input for
    pass-through types."""
    spec = _lookup(control_type)
    _bind(spec, inputs, params)
    return spec.fn(inputs, **params)


def extract(control_type: str, inputs: Any, *, channels: int = 3, **params: Any) -> jax.Array:
    """The condition of `inputs` as a ControlNet takes it: float32 [N, H, W, channels] in
    [0, 1]. control_type: a name of `control_types()` ('canny', 'sobel', 'scribble',
    'scribble_drawing', 'seg', 'depth', 'pose'); params go to its extractor."""
    spec = _lookup(control_type)
    channels = _check_channels(channels)
    if spec.passthrough:
        _bind(spec, inputs, {**params, "channels": channels})
        return spec.fn(inputs, channels=channels, **params)
    _bind(spec, inputs, params)
    return to_model_input(spec.fn(inputs, **params), channels)


for _spec in (
    ControlType("canny", canny, "images", "Canny edges as cv2.Canny"),
    ControlType("sobel", sobel, "images", "Sobel soft edges"),
    ControlType("scribble", scribble, "images", "scribble strokes simplified from an image"),
    ControlType(
        "scribble_drawing", scribble_from_drawing, "images", "a user's drawing, ink -> strokes"
    ),
    ControlType("seg", seg_color_map, "labels", "label maps -> palette colours"),
    ControlType("depth", functools.partial(control_map, kind="depth"), "maps", "depth map", True),
    ControlType("pose", functools.partial(control_map, kind="pose"), "maps", "pose image", True),
):
    register(_spec)
del _spec
