"""Integer image filters that reproduce OpenCV's 8-bit rules, batched and jittable.

Everything here works on int32 arrays holding 8-bit values, [N, H, W] (one channel) or
[N, H, W, C], and is pure `jax.numpy`: no validation (see `extractors.py`), no Python
control flow on values, so it runs under `jit`, on sharded batches and per device.

The rules followed are OpenCV's documented (and observable) 8-bit behaviour:
- `rgb_to_gray`: cv2.cvtColor(RGB2GRAY) on uint8, Y = 0.299 R + 0.587 G + 0.114 B in
  15-bit fixed point (9798, 19235, 3735) / 2^15, rounded half up.
- `gaussian_blur_u8`: cv2.GaussianBlur on uint8 with sigma > 0. Its 8-bit path is bit-exact
  fixed point: the 1-D Gaussian (normalised to sum 1) is quantised to 8 fractional bits
  (integers summing to 256, rounding errors carried from the tails inwards, the centre tap
  taking the remainder), applied separably with BORDER_REFLECT_101, and the 16-fractional-
  bit result rounded half up to uint8. A kernel size of 0 means round(6 sigma + 1) | 1.
- `sobel3`: cv.Sobel with aperture 3 on uint8 into int16, BORDER_REPLICATE (what Canny uses).
- `canny_u8`: cv2.Canny with aperture 3 on a 1- or 3-channel uint8 image:
  * gradient magnitude |dx| + |dy| (L1, the default) or dx^2 + dy^2 (L2gradient); for
    several channels the channel of largest magnitude (the first on ties) gives dx, dy and
    the magnitude of the pixel;
  * thresholds: swapped when low > high; with L2 each is clamped to 32767 and squared when
    positive; then floored to integers. A pixel is a candidate when its magnitude is
    > low and it survives non-maximum suppression, strong when also > high;
  * non-maximum suppression in 4 sectors from |dy| against tan(22.5) |dx| and
    tan(67.5) |dx| in 15-bit fixed point (tan(22.5) = 13573 / 2^15): the horizontal sector
    keeps m > left and m >= right, the vertical one m > above and m >= below, the diagonals
    m > both neighbours along the diagonal (up-left/down-right when dx and dy have the same
    sign, up-right/down-left otherwise); magnitudes outside the image count as 0;
  * hysteresis: the output is every candidate 8-connected, through candidates, to a strong
    pixel (`hysteresis`), 255 on edges and 0 elsewhere.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "canny_u8",
    "gaussian_blur_float",
    "gaussian_blur_u8",
    "gaussian_kernel_u8",
    "gaussian_ksize",
    "hysteresis",
    "line_maxima",
    "rgb_to_gray",
    "sobel3",
]

# 0.299, 0.587, 0.114 in 15-bit fixed point (they sum to 2^15).
_GRAY_WEIGHTS = (9798, 19235, 3735)
_GRAY_SHIFT = 15
# tan(22.5 degrees) in 15-bit fixed point; tan(67.5) = tan(22.5) + 2.
_TAN22_Q15 = int(math.tan(math.pi / 8) * (1 << 15) + 0.5)
_Q15 = 15


def rgb_to_gray(images: jax.Array) -> jax.Array:
    """int32 [N, H, W] luma of int32 RGB images [N, H, W, 3] (values 0..255), as OpenCV."""
    r, g, b = (images[..., c] for c in range(3))
    wr, wg, wb = _GRAY_WEIGHTS
    return (wr * r + wg * g + wb * b + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT


# ------------------------------------------------------------------------------------------
# Gaussian blur (OpenCV's 8-bit fixed-point rules)
# ------------------------------------------------------------------------------------------


def gaussian_ksize(sigma: float) -> int:
    """OpenCV's kernel size for uint8 images when none is given: round(6 sigma + 1) | 1."""
    return int(round(sigma * 6 + 1)) | 1  # Python's round is half-to-even, like cvRound


@functools.lru_cache(maxsize=64)
def gaussian_kernel_u8(sigma: float, ksize: int = 0) -> tuple[int, ...]:
    """The 1-D Gaussian as integers with 8 fractional bits (summing to 256), OpenCV's rule.

    sigma > 0; ksize odd (0: `gaussian_ksize(sigma)`).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    n = ksize or gaussian_ksize(sigma)
    if n < 1 or n % 2 == 0:
        raise ValueError(f"ksize must be odd and positive, got {n}")
    half = n // 2
    # exp(-d^2 / (2 sigma^2)) for the offsets d = half..1 of one tail, written with the doubled
    # offset x = 2d as OpenCV evaluates it; the centre tap is exp(0) = 1.
    scale = -0.125 / (float(sigma) * float(sigma))
    tail = [math.exp(float((2 * d) ** 2) * scale) for d in range(half, 0, -1)]
    total = 2.0 * math.fsum(tail) + 1.0 if tail else 1.0
    one = 256
    taps, err = [], 0.0
    for t in tail:  # the outermost tap first, carrying the rounding error inwards
        adjusted = (t / total) * one + err
        v = round(adjusted)  # half to even, like cvRound
        err = adjusted - v
        taps.append(v)
    centre = one - 2 * sum(taps)
    return tuple(taps) + (centre,) + tuple(reversed(taps))


def _correlate_1d(x: jax.Array, taps, axis: int) -> jax.Array:
    """Sum over k of taps[k] * x shifted by k - len(taps) // 2 along `axis` (already padded)."""
    n = x.shape[axis] - len(taps) + 1
    out = None
    for k, t in enumerate(taps):
        if t == 0:
            continue
        term = lax.slice_in_dim(x, k, k + n, axis=axis) * t
        out = term if out is None else out + term
    return out if out is not None else jnp.zeros_like(lax.slice_in_dim(x, 0, n, axis=axis))


def _pad_hw(x: jax.Array, pad: int, mode: str, **kwargs) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[1] = widths[2] = (pad, pad)
    return jnp.pad(x, widths, mode=mode, **kwargs)


def gaussian_blur_u8(images: jax.Array, sigma: float, ksize: int = 0) -> jax.Array:
    """cv2.GaussianBlur(x, (ksize, ksize), sigma) of int32 images [N, H, W(, C)] of 0..255.

    Integer arithmetic throughout, so the result equals OpenCV's bit for bit (up to the
    float64 evaluation of the kernel). BORDER_REFLECT_101; the kernel radius must be smaller
    than the image side.
    """
    taps = gaussian_kernel_u8(float(sigma), int(ksize))
    half = len(taps) // 2
    x = _pad_hw(images.astype(jnp.int32), half, "reflect")  # numpy's reflect = REFLECT_101
    x = _correlate_1d(x, taps, axis=2)
    x = _correlate_1d(x, taps, axis=1)
    return jnp.clip((x + (1 << 15)) >> 16, 0, 255)


def gaussian_blur_float(images: jax.Array, sigma: float) -> jax.Array:
    """Float Gaussian blur of [N, H, W(, C)], BORDER_REFLECT_101, OpenCV's float kernel size
    round(8 sigma + 1) | 1 (clamped so that the kernel fits the image)."""
    n = int(round(sigma * 8 + 1)) | 1
    half = min(n // 2, min(images.shape[1], images.shape[2]) - 1)
    d = np.arange(-half, half + 1, dtype=np.float64)
    taps = np.exp(-(d * d) / (2.0 * float(sigma) ** 2))
    taps = (taps / taps.sum()).astype(np.float32)
    x = _pad_hw(images.astype(jnp.float32), half, "reflect")
    x = _correlate_1d(x, [float(t) for t in taps], axis=2)
    return _correlate_1d(x, [float(t) for t in taps], axis=1)


# ------------------------------------------------------------------------------------------
# Sobel and Canny
# ------------------------------------------------------------------------------------------


def sobel3(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dx, dy): 3x3 Sobel derivatives of [N, H, W(, C)] with BORDER_REPLICATE.

    dx = [-1 0 1; -2 0 2; -1 0 1] correlated with the image (x to the right), dy its
    transpose (y down); exact in int32 for integer input, float for float input.
    """
    p = _pad_hw(images, 1, "edge")
    h, w = images.shape[1], images.shape[2]

    def rows(a, i):  # rows i .. i + h - 1 of the padded image
        return lax.slice_in_dim(a, i, i + h, axis=1)

    def cols(a, j):
        return lax.slice_in_dim(a, j, j + w, axis=2)

    diff_x = cols(p, 2) - cols(p, 0)  # [N, H + 2, W]
    dx = rows(diff_x, 0) + 2 * rows(diff_x, 1) + rows(diff_x, 2)
    diff_y = rows(p, 2) - rows(p, 0)  # [N, H, W + 2]
    dy = cols(diff_y, 0) + 2 * cols(diff_y, 1) + cols(diff_y, 2)
    return dx, dy


def _dilate8(mask: jax.Array) -> jax.Array:
    """3x3 binary dilation of a bool [N, H, W] mask (outside the image counts as False)."""
    h, w = mask.shape[1], mask.shape[2]
    p = _pad_hw(mask, 1, "constant", constant_values=False)
    across = (
        lax.slice_in_dim(p, 0, w, axis=2)
        | lax.slice_in_dim(p, 1, w + 1, axis=2)
        | lax.slice_in_dim(p, 2, w + 2, axis=2)
    )
    return (
        lax.slice_in_dim(across, 0, h, axis=1)
        | lax.slice_in_dim(across, 1, h + 1, axis=1)
        | lax.slice_in_dim(across, 2, h + 2, axis=1)
    )


def hysteresis(
    candidates: jax.Array, strong: jax.Array, iterations: int | None = None
) -> jax.Array:
    """Candidates [N, H, W] 8-connected (through candidates) to a strong pixel.

    Grows the strong set by 3x3 dilations restricted to the candidates. iterations=None runs a
    `lax.while_loop` until nothing changes (exact; the loop ends when the whole batch has
    converged); an int runs exactly that many dilations (reaching at most that many pixels
    along a chain from a strong pixel), a fixed cost for real-time use.
    """
    edges = strong & candidates

    def grow(e):
        return candidates & _dilate8(e)

    if iterations is not None:
        return lax.fori_loop(0, int(iterations), lambda _, e: grow(e), edges)

    steps = 4  # dilations per convergence test

    def body(state):
        e, _ = state
        new = lax.fori_loop(0, steps, lambda _, x: grow(x), e)
        return new, jnp.any(new != e)

    return lax.while_loop(lambda s: s[1], body, (edges, jnp.array(True)))[0]


def line_maxima(x: jax.Array) -> jax.Array:
    """x [N, H, W] where it is a maximum of its 3-pixel line in at least one of the 4
    directions (horizontal, vertical, both diagonals), else 0: the thinning step of
    ControlNet's scribble annotators (a ridge survives across its direction)."""
    h, w = x.shape[1], x.shape[2]
    p = _pad_hw(x, 1, "constant", constant_values=-jnp.inf)

    def at(di, dj):
        return lax.slice(p, (0, 1 + di, 1 + dj), (p.shape[0], 1 + di + h, 1 + dj + w))

    keep = jnp.zeros(x.shape, bool)
    for di, dj in ((0, 1), (1, 0), (1, 1), (1, -1)):
        keep |= x >= jnp.maximum(at(di, dj), at(-di, -dj))
    return jnp.where(keep, x, 0.0)


def _nms_keep(mag: jax.Array, dx: jax.Array, dy: jax.Array) -> jax.Array:
    """Non-maximum suppression of int32 magnitudes [N, H, W] (see the module docstring)."""
    h, w = mag.shape[1], mag.shape[2]
    p = _pad_hw(mag, 1, "constant", constant_values=0)

    def at(di, dj):  # neighbour (i + di, j + dj) of every pixel
        return lax.slice(p, (0, 1 + di, 1 + dj), (p.shape[0], 1 + di + h, 1 + dj + w))

    ax = jnp.abs(dx)
    ay = jnp.abs(dy) << _Q15
    tg22 = ax * _TAN22_Q15
    tg67 = tg22 + (ax << (_Q15 + 1))
    horizontal = ay < tg22
    vertical = ~horizontal & (ay > tg67)
    same_sign = (dx ^ dy) >= 0  # dx * dy >= 0 with zero counted as positive
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d = jnp.where(
        same_sign,
        (mag > at(-1, -1)) & (mag > at(1, 1)),
        (mag > at(-1, 1)) & (mag > at(1, -1)),
    )
    return jnp.where(horizontal, keep_h, jnp.where(vertical, keep_v, keep_d))


def canny_u8(
    images: jax.Array,
    low: jax.Array,
    high: jax.Array,
    *,
    l2_gradient: bool = False,
    iterations: int | None = None,
) -> jax.Array:
    """Canny edges (bool [N, H, W]) of int32 images [N, H, W, C] (C = 1 or 3, 0..255).

    low, high: int32 thresholds on the magnitude as OpenCV uses them internally (already
    ordered, squared for L2 and floored; see `extractors.canny_thresholds`), scalars or [N].
    Multi-channel images follow cv2.Canny's rule (largest-magnitude channel per pixel).
    """
    dx, dy = sobel3(images.astype(jnp.int32))  # [N, H, W, C]
    mag = dx * dx + dy * dy if l2_gradient else jnp.abs(dx) + jnp.abs(dy)
    if images.shape[-1] == 1:
        dx, dy, mag = dx[..., 0], dy[..., 0], mag[..., 0]
    else:
        best = jnp.argmax(mag, axis=-1)[..., None]  # the first channel on ties
        dx, dy, mag = (jnp.take_along_axis(a, best, axis=-1)[..., 0] for a in (dx, dy, mag))
    low = jnp.asarray(low, jnp.int32).reshape(-1, 1, 1)
    high = jnp.asarray(high, jnp.int32).reshape(-1, 1, 1)
    candidates = (mag > low) & _nms_keep(mag, dx, dy)
    strong = candidates & (mag > high)
    return hysteresis(candidates, strong, iterations)
