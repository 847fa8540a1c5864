"""The embedded procedural "shapes" dataset: a numpy scene generator and an analytic checker.

Every demo and test uses this data, and the checker measures the conditional fidelity of
generated images (does the image show what the caption / label / layout asked for?) without
any pretrained network. Nothing here imports TFDS; `shapes_tfds.py` wraps the generator.

Scenes. 1 to `max_objects` coloured shapes on a dark, low-contrast linear-gradient (or plain)
background. Each object has a shape (`SHAPES`), a colour (`COLOURS`, all distinct within an
image), a size (`SIZES`) and a position: one of the 3x3 grid regions in `POSITIONS` (also all
distinct within an image), jittered inside its cell. Objects are drawn from the last to the
first. The first object is the *primary* object: drawn last, 1.5 px clear of every other
object, so it renders exactly as it would alone; the others may overlap each other a little.
Every object lies inside the image, at least half a pixel from its border. The position of
an object is the grid cell of its centre, kept at least ~1 px inside the cell at 32x32.

Coordinates. Pixel (row i, column j) covers [j, j+1) x [i, i+1); an object's "centre" is
[x, y] in these units (x to the right, y down) and its "radius" is its nominal size in pixels
(`SIZE_FRACTIONS[size] * image_size`, +-4%). Shapes are scaled so that all have about the same
area at the same radius (triangle and star reach a little further out).

Rendering is anti-aliased by supersampling: every pixel holds `SUPERSAMPLE`^2 samples, each
sample takes the colour of the topmost object that contains it, and the pixel is their mean.

Example dict (`generate_example`, `render_scene`):
  image         uint8 [H, W, 3].
  label         int, class of the primary object: `shape_id * NUM_COLOURS + colour_id`
                (`NUM_CLASSES` classes, names from `label_name`).
  caption       str, e.g. "a small red circle in the top left and a large blue square in the
                center" (primary object first; `parse_caption` inverts it).
  segmentation  uint8 [H, W]: 0 = background, else 1 + shape_id of the visible object (the
                object covering most of the pixel's samples; ties go to the background).
  instances     uint8 [H, W]: 0 = background, else 1 + index of the object in `objects`
                (1 = primary), same occlusion as the image.
  edges         uint8 [H, W] in {0, 255}: object contours, from `instances` (not from the
                image): a pixel is an edge iff it belongs to an object and one of its 4
                neighbours is background or an object further back in draw order. So contours
                are one pixel thick and lie on the nearer object's side.
  depth         uint8 [H, W], nearer = brighter: the background is a far floor (16 at the top
                to 64 at the bottom); object k of `objects` is a fronto-parallel plane at
                255 - 36 * k - 8 * (2 - size_id) (at least 80), so the primary is nearest;
                blended at edges like the image.
  objects       list of JSON-serialisable dicts, primary first: shape, colour, size, position,
                centre [x, y] and radius in pixels, and rgb (the drawn colour, the palette
                colour with a little jitter).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from genctl_jax.errors import ConfigError, DataError

__all__ = [
    "COLOURS",
    "NUM_CLASSES",
    "NUM_COLOURS",
    "NUM_SHAPES",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTIONS",
    "CheckResult",
    "ObjectCheck",
    "check",
    "edges_from_instances",
    "generate_example",
    "label_name",
    "label_of",
    "make_caption",
    "parse_caption",
    "render_scene",
    "segment",
]

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange")
# Saturated, bright colours (max channel >= 200) far from each other (> 85 apart) and far from
# the dark backgrounds (every channel <= 70), so nearest-colour segmentation is unambiguous.
PALETTE = np.array(
    [
        [230, 40, 40],
        [40, 200, 60],
        [45, 85, 240],
        [240, 225, 45],
        [225, 55, 225],
        [50, 220, 235],
        [245, 245, 245],
        [250, 140, 25],
    ],
    dtype=np.float32,
)
SIZES = ("small", "medium", "large")
SIZE_FRACTIONS = (0.1, 0.145, 0.21)  # nominal radius / image size
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
NUM_SHAPES = len(SHAPES)
NUM_COLOURS = len(COLOURS)
NUM_CLASSES = NUM_SHAPES * NUM_COLOURS
SUPERSAMPLE = 4

_MAX_BACKGROUND = 70.0
_COLOUR_JITTER = 8.0
_RADIUS_JITTER = 0.04
_CENTRE_JITTER = 0.1  # of the image size, around the centre of the region's cell
_BORDER = 0.5  # pixels kept free between objects and the image border

# Geometry in units of the radius r. _EXTENT bounds |x| and |y| (used to keep objects inside
# the image), _CIRCUMRADIUS bounds the distance from the centre (used for overlap tests).
_SQUARE_HALF = 0.89
_DIAMOND_HALF = 1.25
_TRIANGLE_R = 1.25
_STAR_OUTER, _STAR_INNER = 1.25, 0.6
_CROSS_ARM, _CROSS_HALF = 1.15, 0.42
_EXTENT = (1.0, _SQUARE_HALF, _TRIANGLE_R, _STAR_OUTER, _DIAMOND_HALF, _CROSS_ARM)
_CIRCUMRADIUS = (
    1.0,
    _SQUARE_HALF * math.sqrt(2.0),
    _TRIANGLE_R,
    _STAR_OUTER,
    _DIAMOND_HALF,
    math.hypot(_CROSS_ARM, _CROSS_HALF),
)
_AREA = (
    math.pi,
    (2 * _SQUARE_HALF) ** 2,
    3 * math.sqrt(3) / 4 * _TRIANGLE_R**2,
    5 * _STAR_OUTER * _STAR_INNER * math.sin(math.pi / 5),
    2 * _DIAMOND_HALF**2,
    2 * (2 * _CROSS_ARM) * (2 * _CROSS_HALF) - (2 * _CROSS_HALF) ** 2,
)


def _polygon(radii: Sequence[float]) -> np.ndarray:
    """Vertices [n, 2] (x, y-down) of a polygon pointing up, vertex k at radius radii[k]."""
    n = len(radii)
    angles = -np.pi / 2 + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], -1) * np.asarray(radii)[:, None]


_TRIANGLE_VERTICES = _polygon([_TRIANGLE_R] * 3)
_STAR_VERTICES = _polygon([_STAR_OUTER, _STAR_INNER] * 5)


# ------------------------------------------------------------------------------------------
# Names and labels
# ------------------------------------------------------------------------------------------


def label_of(shape: str, colour: str) -> int:
    """Class label `shape_id * NUM_COLOURS + colour_id` of a (shape, colour) pair."""
    return _index(SHAPES, shape, "shape") * NUM_COLOURS + _index(COLOURS, colour, "colour")


def label_name(label: int) -> str:
    """Human-readable class name, e.g. `label_name(label_of("circle", "red")) == "red circle"`."""
    label = int(label)
    if not 0 <= label < NUM_CLASSES:
        raise DataError(f"label {label} is out of range; expected 0 <= label < {NUM_CLASSES}")
    shape_id, colour_id = divmod(label, NUM_COLOURS)
    return f"{COLOURS[colour_id]} {SHAPES[shape_id]}"


def _index(names: Sequence[str], value: Any, what: str) -> int:
    try:
        return names.index(value)
    except ValueError:
        raise DataError(f"unknown {what} {value!r}; expected one of {list(names)}") from None


def _region_of(cx: float, cy: float, image_size: int) -> int:
    col = min(max(int(3 * cx / image_size), 0), 2)
    row = min(max(int(3 * cy / image_size), 0), 2)
    return 3 * row + col


def _size_of(radius: float, image_size: int) -> int:
    # Boundaries at the geometric means of neighbouring nominal sizes.
    f = radius / image_size
    bounds = [
        math.sqrt(a * b) for a, b in zip(SIZE_FRACTIONS[:-1], SIZE_FRACTIONS[1:], strict=True)
    ]
    return int(np.searchsorted(bounds, f))


# ------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------


def make_caption(objects: Sequence[Mapping[str, Any]]) -> str:
    """English caption listing the objects in order: "a small red circle in the top left, ..."."""
    phrases = [
        f"a {o['size']} {o['colour']} {o['shape']} {_PREPOSITION[o['position']]} the "
        f"{o['position']}"
        for o in objects
    ]
    if not phrases:
        raise DataError("cannot caption an empty scene")
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


# "on the left", "at the top", "in the top left", "in the center".
_PREPOSITION = {p: "in" for p in POSITIONS} | {
    "left": "on",
    "right": "on",
    "top": "at",
    "bottom": "at",
}


def _alternatives(names: Sequence[str]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_PHRASE = re.compile(
    rf"an? (?P<size>{_alternatives(SIZES)}) (?P<colour>{_alternatives(COLOURS)})"
    rf" (?P<shape>{_alternatives(SHAPES)}) (?:in|on|at) the"
    rf" (?P<position>{_alternatives(POSITIONS)}|centre)"
)


def parse_caption(caption: str) -> list[dict[str, str]]:
    """Objects (shape, colour, size, position) named by a caption in `make_caption`'s grammar.

    The grammar: phrases "a <size> <colour> <shape> in|on|at the <position>" joined by ", "
    and " and "; case, extra whitespace, a final "." and the spelling "centre" are tolerated.
    Raises DataError naming the first phrase that does not fit.
    """
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    if not isinstance(caption, str):
        raise DataError(f"caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.strip().lower().split()).rstrip(".").strip()
    if not text:
        raise DataError("cannot parse an empty caption")
    objects = []
    for phrase in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", text):
        m = _PHRASE.fullmatch(phrase)
        if m is None:
            raise DataError(
                f"cannot parse {phrase!r} in caption {caption!r}; every phrase must read "
                f"'a <size> <colour> <shape> in|on|at the <position>' with size in {list(SIZES)}, "
                f"colour in {list(COLOURS)}, shape in {list(SHAPES)}, position in "
                f"{list(POSITIONS)}"
            )
        obj = m.groupdict()
        if obj["position"] == "centre":
            obj["position"] = "center"
        objects.append({k: obj[k] for k in ("shape", "colour", "size", "position")})
    return objects


# ------------------------------------------------------------------------------------------
# Rasterisation
# ------------------------------------------------------------------------------------------


def _in_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, broadcast over u [1, w] and v [h, 1]."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y0 == y1:
            continue
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * ((x1 - x0) / (y1 - y0))
        inside ^= crosses & (u < x_at)
    return inside


def _inside(shape_id: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of the offsets (u, v) from the centre that lie inside the shape."""
    shape = SHAPES[shape_id]
    if shape == "circle":
        return u * u + v * v <= r * r
    au, av = np.abs(u), np.abs(v)
    if shape == "square":
        h = _SQUARE_HALF * r
        return (au <= h) & (av <= h)
    if shape == "diamond":
        return au + av <= _DIAMOND_HALF * r
    if shape == "cross":
        a, t = _CROSS_ARM * r, _CROSS_HALF * r
        return ((au <= a) & (av <= t)) | ((au <= t) & (av <= a))
    if shape == "triangle":
        return _in_polygon(u, v, _TRIANGLE_VERTICES * r)
    return _in_polygon(u, v, _STAR_VERTICES * r)


@functools.lru_cache(maxsize=16)
def _sample_coords(image_size: int) -> np.ndarray:
    """Coordinates of the supersamples along one axis (pixel j holds SUPERSAMPLE of them)."""
    return ((np.arange(image_size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _sample_pixel(image_size: int) -> np.ndarray:
    """Flat pixel index of every supersample, [S * SS, S * SS]."""
    p = np.arange(image_size * SUPERSAMPLE) // SUPERSAMPLE
    return p[:, None] * image_size + p[None, :]


def _crop(cx: float, cy: float, ext: float, image_size: int) -> tuple[slice, slice]:
    n = image_size * SUPERSAMPLE
    x0 = max(0, math.floor((cx - ext) * SUPERSAMPLE))
    x1 = min(n, math.ceil((cx + ext) * SUPERSAMPLE) + 1)
    y0 = max(0, math.floor((cy - ext) * SUPERSAMPLE))
    y1 = min(n, math.ceil((cy + ext) * SUPERSAMPLE) + 1)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _paint(target: np.ndarray, value: int, shape_id: int, cx, cy, r, image_size: int) -> None:
    """Sets the supersamples of `target` inside the shape to `value`."""
    ys, xs = _crop(cx, cy, _EXTENT[shape_id] * r, image_size)
    coords = _sample_coords(image_size)
    mask = _inside(shape_id, coords[xs][None, :] - cx, coords[ys][:, None] - cy, r)
    target[ys, xs][mask] = value


def _coverage(shape_id: int, cx: float, cy: float, r: float, image_size: int) -> np.ndarray:
    """Fraction [S, S] of each pixel covered by one shape (the checker's templates)."""
    ext = _EXTENT[shape_id] * r
    j0, j1 = max(0, math.floor(cx - ext)), min(image_size, math.ceil(cx + ext) + 1)
    i0, i1 = max(0, math.floor(cy - ext)), min(image_size, math.ceil(cy + ext) + 1)
    out = np.zeros((image_size, image_size), np.float32)
    if j1 <= j0 or i1 <= i0:
        return out
    coords, ss = _sample_coords(image_size), SUPERSAMPLE
    mask = _inside(
        shape_id,
        coords[j0 * ss : j1 * ss][None, :] - cx,
        coords[i0 * ss : i1 * ss][:, None] - cy,
        r,
    )
    out[i0:i1, j0:j1] = mask.reshape(i1 - i0, ss, j1 - j0, ss).mean((1, 3), dtype=np.float32)
    return out


def _background(image_size: int, c0, c1, angle: float) -> np.ndarray:
    """Linear gradient from colour c0 to c1 along direction `angle`, [S, S, 3] float32."""
    p = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    t = np.clip(0.5 + p[None, :] * math.cos(angle) + p[:, None] * math.sin(angle), 0.0, 1.0)
    c0, c1 = np.asarray(c0, np.float32), np.asarray(c1, np.float32)
    return c0 + (c1 - c0) * t[..., None]


def _validate_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise ConfigError(f"image_size must be an int, got {image_size!r}")
    if image_size < 8:
        raise ConfigError(f"image_size={image_size} is too small; use 8 or more (16..128 tested)")
    return int(image_size)


def _clamped_centre(position: int, ext: float, image_size: int) -> tuple[float, float]:
    row, col = divmod(position, 3)
    c = [(col + 0.5) * image_size / 3, (row + 0.5) * image_size / 3]
    lo, hi = ext + _BORDER, image_size - ext - _BORDER
    return tuple(min(max(v, lo), hi) for v in c)


def _scene_object(obj: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """Validates one object and fills in centre/radius/rgb from position/size/colour."""
    if not isinstance(obj, Mapping):
        raise DataError(f"an object must be a dict, got {type(obj).__name__}: {obj!r}")
    shape_id = _index(SHAPES, obj.get("shape"), "shape")
    colour_id = _index(COLOURS, obj.get("colour", obj.get("color")), "colour")
    out = {"shape": SHAPES[shape_id], "colour": COLOURS[colour_id]}
    size = obj.get("size")
    if size is not None:
        size = SIZES[_index(SIZES, size, "size")]
    position = obj.get("position")
    if position is not None:
        position = POSITIONS[_index(POSITIONS, position, "position")]
    radius = obj.get("radius")
    if radius is None:
        if size is None:
            raise DataError(f"object {dict(obj)} needs a 'size' or a 'radius'")
        radius = SIZE_FRACTIONS[_index(SIZES, size, "size")] * image_size
    radius = float(radius)
    centre = obj.get("centre")
    if centre is None:
        if position is None:
            raise DataError(f"object {dict(obj)} needs a 'position' or a 'centre'")
        ext = _EXTENT[shape_id] * radius
        centre = _clamped_centre(POSITIONS.index(position), ext, image_size)
    cx, cy = (float(c) for c in centre)
    rgb = obj.get("rgb")
    rgb = PALETTE[colour_id] if rgb is None else np.asarray(rgb, np.float32)
    out["size"] = size if size is not None else SIZES[_size_of(radius, image_size)]
    out["position"] = position or POSITIONS[_region_of(cx, cy, image_size)]
    out["centre"] = [round(cx, 3), round(cy, 3)]
    out["radius"] = round(radius, 3)
    out["rgb"] = [int(round(float(c))) for c in rgb]
    return out


def render_scene(
    objects: Sequence[Mapping[str, Any]],
    *,
    image_size: int = 32,
    background: tuple[Sequence[float], Sequence[float], float] | None = None,
) -> dict[str, Any]:
    """Renders objects (primary first, drawn last) into an example dict (see module docstring).

    Each object needs shape and colour, plus size or radius, plus position or centre; a
    missing rgb is the palette colour. `background` is (colour0, colour1, angle) of the
    linear gradient; None gives a plain dark grey.
    """
    image_size = _validate_image_size(image_size)
    objs = [_scene_object(o, image_size) for o in objects]
    if not objs:
        raise DataError("render_scene needs at least one object")
    if len(objs) > 254:
        raise DataError(f"at most 254 objects fit the uint8 maps, got {len(objs)}")
    c0, c1, angle = background if background is not None else ((24, 24, 28), (24, 24, 28), 0.0)
    bg = _background(image_size, c0, c1, angle)

    # Supersampled instance map: 0 = background, k + 1 = objs[k]; the primary is drawn last.
    n = len(objs)
    inst_hi = np.zeros((image_size * SUPERSAMPLE,) * 2, np.uint8)
    for k in reversed(range(n)):
        o = objs[k]
        _paint(inst_hi, k + 1, SHAPES.index(o["shape"]), *o["centre"], o["radius"], image_size)
    flat = _sample_pixel(image_size) * (n + 1) + inst_hi
    counts = np.bincount(flat.ravel(), minlength=image_size * image_size * (n + 1))
    frac = counts.reshape(image_size, image_size, n + 1).astype(np.float32)
    frac /= SUPERSAMPLE**2

    rgb = np.array([o["rgb"] for o in objs], np.float32)
    image = frac[..., :1] * bg + frac[..., 1:] @ rgb

    row = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    bg_depth = np.broadcast_to((16.0 + 48.0 * row)[:, None], (image_size, image_size))
    obj_depth = np.array(
        [
            max(80.0, 255.0 - 36.0 * k - 8.0 * (2 - SIZES.index(o["size"])))
            for k, o in enumerate(objs)
        ],
        np.float32,
    )
    depth = frac[..., 0] * bg_depth + frac[..., 1:] @ obj_depth

    instances = np.argmax(frac, axis=-1).astype(np.uint8)
    shape_lut = np.array([0] + [1 + SHAPES.index(o["shape"]) for o in objs], np.uint8)
    primary = objs[0]
    return {
        "image": _to_uint8(image),
        "label": label_of(primary["shape"], primary["colour"]),
        "caption": make_caption(objs),
        "segmentation": shape_lut[instances],
        "instances": instances,
        "edges": edges_from_instances(instances),
        "depth": _to_uint8(depth),
        "objects": objs,
    }


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def edges_from_instances(instances: np.ndarray) -> np.ndarray:
    """Contours {0, 255} of an instance map whose object k + 1 is drawn before object k.

    An object pixel is an edge iff a 4-neighbour is background or an object further back.
    The image border is not an edge.
    """
    inst = np.asarray(instances).astype(np.int32)
    # Nearness: background -1, object id k + 1 -> -(k + 1) + big, so lower id = nearer.
    near = np.where(inst == 0, -1, 1_000 - inst)
    padded = np.pad(near, 1, mode="edge")
    h, w = inst.shape
    farther = np.zeros(inst.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        farther |= padded[dy : dy + h, dx : dx + w] < near
    return np.where((inst > 0) & farther, 255, 0).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Scene sampling
# ------------------------------------------------------------------------------------------


def _sample_objects(rng: np.random.Generator, image_size: int, max_objects: int) -> list:
    """Random objects, primary first; objects that cannot be placed are shrunk, then dropped."""
    n = int(rng.integers(1, max_objects + 1))
    colours = rng.permutation(NUM_COLOURS)[:n]
    positions = rng.permutation(9)[:n]
    shapes = rng.integers(0, NUM_SHAPES, size=n)
    sizes = rng.integers(0, len(SIZES), size=n)
    placed: list[tuple[int, float, float, float]] = []  # (shape_id, cx, cy, r)
    objects = []
    for k in range(n):
        shape_id = int(shapes[k])
        row, col = divmod(int(positions[k]), 3)
        spot = None
        for size_id in range(int(sizes[k]), -1, -1):
            for _ in range(4):
                r = SIZE_FRACTIONS[size_id] * image_size
                r *= 1.0 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER)
                ext = _EXTENT[shape_id] * r
                jitter = rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER, size=2) * image_size
                lo, hi = ext + _BORDER, image_size - ext - _BORDER
                cx = min(max((col + 0.5) * image_size / 3 + jitter[0], lo), hi)
                cy = min(max((row + 0.5) * image_size / 3 + jitter[1], lo), hi)
                if all(_apart(k, (shape_id, cx, cy, r), j, p) for j, p in enumerate(placed)):
                    spot = (size_id, cx, cy, r)
                    break
            if spot is not None:
                break
        if spot is None:
            continue
        size_id, cx, cy, r = spot
        placed.append((shape_id, cx, cy, r))
        colour_id = int(colours[k])
        rgb = PALETTE[colour_id] + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3)
        objects.append(
            {
                "shape": SHAPES[shape_id],
                "colour": COLOURS[colour_id],
                "size": SIZES[size_id],
                "position": POSITIONS[3 * row + col],
                "centre": [cx, cy],
                "radius": r,
                "rgb": np.clip(rgb, 0, 255),
            }
        )
    return objects


def _apart(k: int, a: tuple, j: int, b: tuple) -> bool:
    """Placement rule: others may overlap a little; the primary (index 0) keeps a gap.

    The primary's gap (1.5 px > a pixel diagonal) means no pixel holds samples of both the
    primary and another object, so the primary renders exactly as it would alone.
    """
    dist = math.hypot(a[1] - b[1], a[2] - b[2])
    reach = _CIRCUMRADIUS[a[0]] * a[3] + _CIRCUMRADIUS[b[0]] * b[3]
    return dist >= reach + 1.5 if 0 in (k, j) else dist >= 0.85 * reach


def generate_example(
    index: int, *, seed: int = 0, image_size: int = 32, max_objects: int = 3
) -> dict[str, Any]:
    """Example `index` of the stream `seed`: a pure function of its arguments.

    Uses `np.random.default_rng([seed, index])`, so examples can be made in any order or in
    parallel. See the module docstring for the dict's keys.
    """
    image_size = _validate_image_size(image_size)
    if not 1 <= int(max_objects) <= min(NUM_COLOURS, len(POSITIONS)):
        raise ConfigError(
            f"max_objects={max_objects} is out of range; expected 1..{NUM_COLOURS} "
            "(colours and positions are distinct within an image)"
        )
    if int(index) < 0 or int(seed) < 0:
        raise ConfigError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([int(seed), int(index)])
    objects = _sample_objects(rng, image_size, int(max_objects))
    c0 = rng.uniform(0.0, 0.85 * _MAX_BACKGROUND, size=3)
    if rng.random() < 0.75:
        c1 = np.clip(c0 + rng.uniform(-30.0, 30.0, size=3), 0.0, _MAX_BACKGROUND)
    else:
        c1 = c0
    angle = float(rng.uniform(0.0, 2 * math.pi))
    return render_scene(objects, image_size=image_size, background=(c0, c1, angle))


# ------------------------------------------------------------------------------------------
# Analytic checker
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObjectCheck:
    """What the checker found for one requested object; None = attribute not requested."""

    request: dict[str, Any]
    colour: bool
    shape: bool | None
    position: bool | None
    size: bool | None
    found: dict[str, Any]  # estimates: shape, size, position, centre, radius, area, iou

    @property
    def all_match(self) -> bool:
        return all(v is not False for v in (self.colour, self.shape, self.position, self.size))


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Per-object matches, `all_match` and `score` = fraction of checked attributes that match."""

    objects: tuple[ObjectCheck, ...]
    all_match: bool
    score: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Pixel classification thresholds (0..255 units).
_DARK = 110.0  # pixels whose channels are all below this are background candidates
_RESIDUAL = 50.0  # max distance from the background->colour line to count as that colour


def _as_float_image(image: Any, value_range: tuple[float, float] | None) -> np.ndarray:
    """Returns the image as float32 [S, S, 3] in [0, 255]."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(f"check expects one RGB image of shape [H, W, 3], got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1] or arr.shape[0] < 8:
        raise DataError(f"check expects a square image of side >= 8, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        lo, hi = value_range if value_range is not None else (0.0, 255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError("check got an image with NaN or infinite values")
        if value_range is not None:
            lo, hi = value_range
        elif float(arr.max()) <= 1.5 and float(arr.min()) >= -1.5:
            lo, hi = -1.0, 1.0
        elif float(arr.min()) >= -0.5 and float(arr.max()) <= 255.5:
            lo, hi = 0.0, 255.0
        else:
            raise DataError(
                f"float image values span [{float(arr.min()):.3g}, {float(arr.max()):.3g}], "
                "neither [-1, 1] nor [0, 255]; pass value_range=(lo, hi)"
            )
    else:
        raise DataError(
            f"check expects uint8 in [0, 255] or a float image in [-1, 1] or [0, 255], "
            f"got dtype {arr.dtype}"
        )
    if not hi > lo:
        raise DataError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    out = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0)


def _fit_background(img: np.ndarray) -> np.ndarray:
    """Least-squares plane per channel through the dark pixels, [S, S, 3]."""
    s = img.shape[0]
    dark = img.max(-1) < _DARK
    if dark.sum() < 8:
        return np.zeros_like(img)
    ys, xs = np.nonzero(dark)
    a = np.stack([np.ones_like(xs), xs, ys], -1).astype(np.float32)
    coef, *_ = np.linalg.lstsq(a, img[ys, xs], rcond=None)
    grid_y, grid_x = np.mgrid[0:s, 0:s].astype(np.float32)
    plane = coef[0] + grid_x[..., None] * coef[1] + grid_y[..., None] * coef[2]
    return np.clip(plane, 0.0, _DARK)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a boolean mask (min-label propagation)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(lab, 1, constant_values=big)
        new = lab
        for dy in range(3):
            for dx in range(3):
                new = np.minimum(new, padded[dy : dy + h, dx : dx + w])
        new = np.where(mask, new, big)
        new[mask] = new.ravel()[new[mask]]  # pointer jumping: converge in fewer rounds
        if np.array_equal(new, lab):
            break
        lab = new
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab == ids[np.argmax(counts)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


class _Analysis:
    """Per-pixel colour evidence of one image, shared by all requested objects."""

    def __init__(self, img: np.ndarray):
        self.size = img.shape[0]
        bg = _fit_background(img)
        p = img - bg
        d = PALETTE[None, None] - bg[:, :, None]  # [S, S, K, 3] background -> colour
        alpha = np.einsum("hwc,hwkc->hwk", p, d) / np.maximum((d * d).sum(-1), 1.0)
        self.alpha = np.clip(alpha, 0.0, 1.0)
        resid = np.linalg.norm(p[:, :, None] - self.alpha[..., None] * d, axis=-1)
        self.resid = resid
        best = np.argmin(resid, axis=-1)
        self.hard = np.stack(
            [
                (best == k) & (self.alpha[..., k] >= 0.5) & (resid[..., k] < _RESIDUAL)
                for k in range(NUM_COLOURS)
            ]
        )

    def blob(self, colour_id: int) -> np.ndarray:
        """[S, S] bool: the largest 8-connected blob of pixels of one colour."""
        return _largest_component(self.hard[colour_id])

    def find(self, colour_id: int) -> dict[str, Any] | None:
        """Estimates shape, size, position of the largest blob of one colour (None: absent)."""
        s = self.size
        blob = self.blob(colour_id)
        others = self.hard.any(0) & ~self.hard[colour_id]
        support = _dilate(blob) & ~others & (self.resid[..., colour_id] < _RESIDUAL)
        cov = np.where(support, self.alpha[..., colour_id], 0.0).astype(np.float32)
        area = float(cov.sum())
        min_area = 0.5 * min(_AREA) * (SIZE_FRACTIONS[0] * s) ** 2
        if area < min_area:
            return None
        centres = np.arange(s, dtype=np.float32) + 0.5
        cx = float((cov.sum(0) * centres).sum() / area)
        cy = float((cov.sum(1) * centres).sum() / area)
        valid = ~others
        ious = []
        for shape_id in range(NUM_SHAPES):
            r = math.sqrt(area / _AREA[shape_id])
            tmpl = _coverage(shape_id, cx, cy, r, s)
            inter = np.minimum(cov, tmpl)[valid].sum()
            union = np.maximum(cov, tmpl)[valid].sum()
            ious.append(float(inter / max(union, 1e-6)))
        shape_id = int(np.argmax(ious))
        radius = math.sqrt(area / _AREA[shape_id])
        return {
            "shape": SHAPES[shape_id],
            "size": SIZES[_size_of(radius, s)],
            "position": POSITIONS[_region_of(cx, cy, s)],
            "centre": [round(cx, 3), round(cy, 3)],
            "radius": round(radius, 3),
            "area": round(area, 3),
            "iou": round(ious[shape_id], 4),
        }


def segment(image: Any, *, value_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Analytic segmentation of an image in the dataset's style (the checker's evidence).

    Every palette colour whose largest blob passes the checker's size test is one object, of
    the shape the checker estimates for it. Returns uint8 [S, S] maps like the example dict's:
    `segmentation` (0 = background, else 1 + shape_id), `instances` (1 + the object's rank by
    area, largest first: larger blobs count as nearer where blobs overlap) and `edges` (from
    `instances`, as the dataset draws them). Image as for `check`.
    """
    analysis = _Analysis(_as_float_image(image, value_range))
    found = []
    for colour_id in range(NUM_COLOURS):
        obj = analysis.find(colour_id)
        if obj is not None:
            found.append((obj["area"], SHAPES.index(obj["shape"]), analysis.blob(colour_id)))
    segmentation = np.zeros((analysis.size, analysis.size), np.uint8)
    instances = np.zeros_like(segmentation)
    for rank, (_, shape_id, blob) in enumerate(sorted(found, key=lambda f: -f[0])):
        free = blob & (instances == 0)
        segmentation[free] = 1 + shape_id
        instances[free] = 1 + rank
    return {
        "segmentation": segmentation,
        "instances": instances,
        "edges": edges_from_instances(instances),
    }


def _requests(objects, caption, label) -> list[dict[str, Any]]:
    given = [x is not None for x in (objects, caption, label)]
    if sum(given) != 1:
        raise DataError("check needs exactly one of objects=, caption= or label=")
    if caption is not None:
        return parse_caption(caption)
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, int | np.integer):
            label = np.asarray(label)
            if label.shape != () or not np.issubdtype(label.dtype, np.integer):
                raise DataError(f"label must be one integer class id, got {label!r}")
        name = label_name(int(label))
        colour, shape = name.split(" ")
        return [{"shape": shape, "colour": colour}]
    if isinstance(objects, bytes | str):
        try:
            objects = json.loads(objects)
        except json.JSONDecodeError as e:
            raise DataError(f"objects is a string but not valid JSON: {e}") from None
    if isinstance(objects, Mapping) or not isinstance(objects, Sequence) or not objects:
        raise DataError(f"objects must be a non-empty list of dicts, got {objects!r}")
    out = []
    for o in objects:
        if not isinstance(o, Mapping):
            raise DataError(f"each object must be a dict, got {o!r}")
        req = {
            "shape": SHAPES[_index(SHAPES, o.get("shape"), "shape")],
            "colour": COLOURS[_index(COLOURS, o.get("colour", o.get("color")), "colour")],
        }
        for key, names in (("size", SIZES), ("position", POSITIONS)):
            if o.get(key) is not None:
                req[key] = names[_index(names, o[key], key)]
        out.append(req)
    return out


def check(
    image: Any,
    objects: Sequence[Mapping[str, Any]] | str | bytes | None = None,
    *,
    caption: str | bytes | None = None,
    label: int | None = None,
    value_range: tuple[float, float] | None = None,
) -> CheckResult:
    """Does `image` show what was asked for? Give exactly one of objects, caption or label.

    image: [S, S, 3]; uint8 is read as [0, 255]; floats as [-1, 1] when every value lies in
      [-1.5, 1.5] (the model range, clipped), else as [0, 255]. Pass value_range=(0, 1) for
      floats in [0, 1].
    objects: dicts with shape and colour, and optionally size and position (unset attributes
      are not checked), or their JSON string (as stored by the TFDS builder).
    caption: parsed by `parse_caption`. label: checks that a blob of the class's colour has
      the class's shape (position and size are not checked).

    Each requested colour is looked up as the largest connected blob of pixels nearest to that
    palette colour (after removing a fitted background plane); its soft area and centroid give
    radius, size and region; its shape is the template (rendered at that centre and area)
    with the highest soft IoU. Colours are distinct within the dataset's images, so a colour
    identifies an object. Shape estimates need about 16 px per small object; at 16x16 only
    colour, position and size are reliable.
    """
    img = _as_float_image(image, value_range)
    requests = _requests(objects, caption, label)
    analysis = _Analysis(img)
    checks = []
    for req in requests:
        found = analysis.find(COLOURS.index(req["colour"]))
        if found is None:
            checks.append(
                ObjectCheck(
                    request=req,
                    colour=False,
                    shape=False,
                    position=False if "position" in req else None,
                    size=False if "size" in req else None,
                    found={},
                )
            )
            continue
        checks.append(
            ObjectCheck(
                request=req,
                colour=True,
                shape=found["shape"] == req["shape"],
                position=found["position"] == req["position"] if "position" in req else None,
                size=found["size"] == req["size"] if "size" in req else None,
                found=found,
            )
        )
    flags = [v for c in checks for v in (c.colour, c.shape, c.position, c.size) if v is not None]
    return CheckResult(
        objects=tuple(checks),
        all_match=all(flags),
        score=float(np.mean(flags)),
    )
