"""Condition extractors (genctl_jax.control): OpenCV parity of Canny and its integer stages,
jit / batch / 8-device sharding invariance, soft edges, scribbles, segmentation colour maps,
pass-through validation and the `extract` registry.

The OpenCV references need opencv-python-headless (the version these numbers were measured
with: 5.0.0.93); those tests are skipped without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from scipy import ndimage

from genctl_jax import control
from genctl_jax.control import filters
from genctl_jax.data import shapes
from genctl_jax.errors import ConfigError, DataError
from genctl_jax.metrics.control import edge_f1

H, W = 48, 64  # one non-square shape for every test image, so jitted shapes stay few

THRESHOLDS = ((20, 60), (50, 100), (100, 200), (200, 100), (150, 300), (80.5, 150.7))


@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2")


def _synthetic(k: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth waves, a hard step, a bright rectangle (plateaus: ties in the NMS) and noise."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    base = 128 + 60 * np.sin(xx / (3 + k)) * np.cos(yy / (5 + k)) + rng.normal(0, 2 + 3 * k, (H, W))
    img = np.stack([base, 0.8 * base + 40 * (xx > 20 + 2 * k), 255 - base], -1)
    img[10 : 30 - k, 15 : 40 + k] += 50
    img[35:, 5 * k : 5 * k + 9] = 30 * k  # flat plateau with exactly equal gradients
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images():
    """uint8 [16, 48, 64, 3]: 8 shapes-dataset scenes (rows 8..56 of 64x64) + 8 synthetic."""
    scenes = [
        shapes.generate_example(i, seed=5, image_size=64, max_objects=4)["image"][8:56]
        for i in range(8)
    ]
    rng = np.random.default_rng(0)
    return np.stack(scenes + [_synthetic(k, rng) for k in range(8)])


def _cv2_gray(cv2, images):
    return np.stack([cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY) for x in images])


# ------------------------------------------------------------------------------------------
# OpenCV parity
# ------------------------------------------------------------------------------------------


def test_grey_blur_and_sobel_stages_equal_opencv(cv2, images):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (4, H, W, 3), dtype=np.uint8)
    rgb = np.concatenate([images, noise])
    gray = np.asarray(jax.jit(filters.rgb_to_gray)(jnp.asarray(rgb, jnp.int32)))
    ref_gray = _cv2_gray(cv2, rgb)
    np.testing.assert_array_equal(gray, ref_gray)

    g = jnp.asarray(ref_gray, jnp.int32)
    blur = jax.jit(filters.gaussian_blur_u8, static_argnums=(1, 2))
    for sigma, ksize in ((0.8, 0), (1.4, 0), (2.0, 0), (1.0, 5)):
        ours = np.asarray(blur(g, sigma, ksize))
        ref = np.stack([cv2.GaussianBlur(x, (ksize, ksize), sigma) for x in ref_gray])
        np.testing.assert_array_equal(ours, ref, err_msg=f"sigma={sigma} ksize={ksize}")
    assert sum(filters.gaussian_kernel_u8(1.4)) == 256

    dx, dy = jax.jit(filters.sobel3)(g)
    for (ox, oy), ours in (((1, 0), dx), ((0, 1), dy)):
        ref = np.stack(
            [
                cv2.Sobel(x, cv2.CV_16S, ox, oy, ksize=3, borderType=cv2.BORDER_REPLICATE)
                for x in ref_gray
            ]
        )
        np.testing.assert_array_equal(np.asarray(ours), ref)


@pytest.mark.parametrize("color", ["gray", "rgb"])
@pytest.mark.parametrize("l2", [False, True])
def test_canny_equals_cv2_canny(cv2, images, color, l2):
    """No blur: our Canny against cv2.Canny (on the RGB2GRAY image, or on the RGB image as
    ControlNet's annotator calls it), six threshold pairs (one reversed, one fractional)."""
    src = _cv2_gray(cv2, images) if color == "gray" else images
    for low, high in THRESHOLDS:
        ours = np.asarray(control.canny(images, low, high, l2_gradient=l2, color=color))
        ref = np.stack([cv2.Canny(np.ascontiguousarray(x), low, high, L2gradient=l2) for x in src])
        agreement = float((ours == ref).mean())
        f1 = edge_f1(ours, ref, tolerance=0)["f1"]
        print(f"{color} l2={l2} ({low}, {high}): agreement {agreement:.6f}, F1 {f1:.6f}")
        assert ours.dtype == np.uint8 and set(np.unique(ours)) <= {0, 255}
        assert (ref > 0).mean() > 0.02  # a real edge map, not an empty one
        assert agreement == 1.0 and f1 == 1.0


def test_canny_with_blur_equals_gaussianblur_then_canny(cv2, images):
    gray = _cv2_gray(cv2, images)
    for sigma in (1.0, 1.4):
        for low, high in ((30, 60), (60, 120)):
            ours = np.asarray(control.canny(images, low, high, blur_sigma=sigma))
            ref = np.stack([cv2.Canny(cv2.GaussianBlur(x, (0, 0), sigma), low, high) for x in gray])
            agreement = float((ours == ref).mean())
            f1 = edge_f1(ours, ref, tolerance=0)["f1"]
            print(f"blur sigma={sigma} ({low}, {high}): agreement {agreement:.6f}, F1 {f1:.6f}")
            assert (ref > 0).mean() > 0.01
            assert agreement == 1.0 and f1 == 1.0


# ------------------------------------------------------------------------------------------
# Canny: inputs, hysteresis, jit and sharding
# ------------------------------------------------------------------------------------------


def test_canny_reads_model_range_floats_and_per_image_thresholds(images):
    reference = np.asarray(control.canny(images, 50, 100))
    floats = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(np.asarray(control.canny(floats, 50, 100)), reference)
    np.testing.assert_array_equal(
        np.asarray(control.canny(images.astype(np.float32), 50, 100, value_range=(0, 255))),
        reference,
    )
    # One threshold pair per image equals the scalar runs, image by image.
    lows = np.where(np.arange(16) % 2 == 0, 50.0, 100.0)
    highs = 2 * lows
    mixed = np.asarray(control.canny(images, lows, highs))
    other = np.asarray(control.canny(images, 100, 200))
    np.testing.assert_array_equal(mixed[0::2], reference[0::2])
    np.testing.assert_array_equal(mixed[1::2], other[1::2])
    assert (reference != other).mean() > 0.01  # the two threshold pairs really differ
    with pytest.raises(ConfigError, match="holds 3 values but the batch has 16"):
        control.canny(images, [1, 2, 3], 100)


def test_hysteresis_follows_8_connected_chains_from_strong_pixels():
    cand = np.zeros((1, 12, 40), bool)
    cand[0, 2, 0:30] = True  # a 30-pixel chain, strong at its left end
    cand[0, 3 + np.arange(8), 30 + np.arange(8)] = True  # continues diagonally (8-connected)
    cand[0, 9:11, 0:5] = True  # a separate weak blob, never reached
    strong = np.zeros_like(cand)
    strong[0, 2, 0] = True
    full = np.asarray(filters.hysteresis(jnp.asarray(cand), jnp.asarray(strong)))
    assert full.sum() == 38 and not full[0, 9:11, 0:5].any()
    bounded = np.asarray(filters.hysteresis(jnp.asarray(cand), jnp.asarray(strong), 5))
    assert bounded.sum() == 6 and bounded[0, 2, :6].all()
    # Through the public API: a bound too small for long chains drops edges, never adds any.
    img = np.zeros((1, H, W, 1), np.uint8)
    img[0, 10:40, 10:50] = 200
    exact = np.asarray(control.canny(img, 50, 100))
    short = np.asarray(control.canny(img, 50, 100, hysteresis_iterations=3))
    assert exact.sum() > 0 and not (short & ~exact).any()


def test_canny_jit_batch_and_8_device_sharding_equal_single_images(images):
    assert jax.device_count() == 8
    batch = images[:8]
    singles = np.concatenate(
        [np.asarray(control.canny(batch[i : i + 1], 50, 100)) for i in range(8)]
    )
    np.testing.assert_array_equal(np.asarray(control.canny(batch, 50, 100)), singles)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.device_put(jnp.asarray(batch), sharding)

    # Thresholds traced too: one compile serves every threshold pair.
    fn = jax.jit(lambda x, lo, hi: control.canny(x, lo, hi), out_shardings=sharding)
    out = fn(sharded, 50.0, 100.0)
    assert out.shape == (8, H, W) and out.sharding.is_equivalent_to(sharding, 3)
    np.testing.assert_array_equal(np.asarray(out), singles)
    np.testing.assert_array_equal(
        np.asarray(fn(sharded, 100.0, 200.0)), np.asarray(control.canny(batch, 100, 200))
    )
    # Model-range floats traced inside jit (range checks skipped, conversion the same).
    floats = jax.device_put(jnp.asarray(batch, jnp.float32) / 127.5 - 1.0, sharding)
    np.testing.assert_array_equal(np.asarray(fn(floats, 50.0, 100.0)), singles)


# ------------------------------------------------------------------------------------------
# Soft edges, scribbles
# ------------------------------------------------------------------------------------------


def test_sobel_soft_edges_match_scipy(images):
    gray = np.asarray(filters.rgb_to_gray(jnp.asarray(images, jnp.int32))).astype(np.float64)
    sob = lambda g, axis: ndimage.sobel(g, axis, mode="nearest")  # one image at a time
    mag = np.stack([np.hypot(sob(g, 1), sob(g, 0)) for g in gray])
    expected = mag / mag.max(axis=(1, 2), keepdims=True) * 255
    ours = np.asarray(control.sobel(images)).astype(np.float64)
    assert np.abs(ours - expected).max() <= 0.5 + 1e-3  # rounding only
    assert (ours.max(axis=(1, 2)) == 255).all()

    step = np.zeros((2, H, W, 1), np.uint8)
    step[0, :, W // 2 :] = 255  # full-contrast vertical step; image 1 stays flat
    fixed = np.asarray(control.sobel(step, normalize="fixed"))
    assert (fixed[0, :, W // 2 - 1 : W // 2 + 1] == 255).all()
    assert fixed[0].sum() == 255 * 2 * H and fixed[1].max() == 0
    assert np.asarray(control.sobel(step))[1].max() == 0  # flat image: no NaN, all 0


def test_scribble_traces_object_contours_and_reads_drawings():
    examples = [shapes.generate_example(i, seed=2, image_size=64) for i in range(8)]
    imgs = np.stack([e["image"] for e in examples])
    edges = np.stack([e["edges"] for e in examples])
    strokes = np.asarray(control.scribble(imgs))
    assert strokes.dtype == np.uint8 and set(np.unique(strokes)) == {0, 255}
    near = edge_f1(strokes, edges, tolerance=2)
    print(f"scribble vs dataset contours (tolerance 2): {near}, ink {(strokes > 0).mean():.3f}")
    assert near["precision"] > 0.9 and near["recall"] > 0.9
    assert 0.03 < (strokes > 0).mean() < 0.2  # strokes, not filled regions
    thin = np.asarray(control.scribble(imgs, thicken_sigma=0.0))
    assert (thin > 0).sum() < (strokes > 0).sum() and not (thin & ~strokes).any()

    drawing = np.full((1, H, W, 3), 250, np.uint8)
    drawing[0, 20, 5:60] = 10  # a black stroke
    drawing[0, 30, 5:60] = (200, 10, 10)  # a red stroke: not ink (red channel is light)
    ink = np.asarray(control.scribble_from_drawing(drawing))
    expected = np.zeros((1, H, W), np.uint8)
    expected[0, 20, 5:60] = 255
    np.testing.assert_array_equal(ink, expected)


# ------------------------------------------------------------------------------------------
# Segmentation colour maps, pass-through maps
# ------------------------------------------------------------------------------------------


def test_seg_color_map_is_exact():
    known = {
        0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
        5: (128, 0, 128), 6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0),
        15: (192, 128, 128), 255: (224, 224, 192),
    }  # fmt: skip
    labels = np.array(list(known), np.int32).reshape(1, 1, -1)
    colours = np.asarray(control.seg_color_map(labels))
    assert colours.shape == (1, 1, len(known), 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[0, 0], np.array(list(known.values()), np.uint8))
    palette = control.voc_palette(256)
    assert len({tuple(c) for c in palette}) == 256

    seg = np.stack(
        [shapes.generate_example(i, seed=0, image_size=32)["segmentation"] for i in range(4)]
    )
    np.testing.assert_array_equal(np.asarray(control.seg_color_map(seg)), palette[seg])
    mine = np.array(
        [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9], [1, 2, 3], [7, 7, 7]]
    )
    np.testing.assert_array_equal(
        np.asarray(control.seg_color_map(seg, palette=mine)), mine.astype(np.uint8)[seg]
    )
    with pytest.raises(DataError, match="must be integers"):
        control.seg_color_map(seg.astype(np.float32))
    with pytest.raises(DataError, match=r"must lie in \[0, 16777216\), got -1"):
        control.seg_color_map(seg.astype(np.int32) - 1)
    with pytest.raises(DataError, match="the palette has 3 colours"):
        control.seg_color_map(seg, palette=mine[:3])
    with pytest.raises(DataError, match="squeeze the channel axis"):
        control.seg_color_map(seg[..., None])
    with pytest.raises(ConfigError, match=r"palette must be \[K, 3\]"):
        control.seg_color_map(seg, palette=mine[:, :2])


def test_pass_through_maps_validate_and_convert():
    depth = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5) * 6
    out = np.asarray(control.control_map(depth, kind="depth"))
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.repeat(depth[..., None] / 255.0, 3, -1), rtol=0, atol=1e-7)
    floats = depth.astype(np.float32) / 255.0
    np.testing.assert_allclose(
        np.asarray(control.control_map(floats, channels=1)), floats[..., None]
    )
    grey3 = np.repeat(depth[..., None], 3, -1)
    np.testing.assert_allclose(
        np.asarray(control.control_map(grey3, channels=1))[..., 0], depth / 255.0, atol=1e-7
    )
    pose = np.zeros((2, 4, 5, 3), np.uint8)
    pose[:, 1, 2] = (255, 0, 85)
    np.testing.assert_allclose(np.asarray(control.control_map(pose, kind="pose")), pose / 255.0)

    with pytest.raises(DataError, match=r"outside value_range \(0, 1\).*\(0, 255\)"):
        control.control_map(depth.astype(np.float32))
    np.testing.assert_allclose(
        np.asarray(control.control_map(depth.astype(np.float32), value_range=(0, 255))), out
    )
    with pytest.raises(DataError, match="pose maps must have 3 channels, got 1"):
        control.control_map(depth, kind="pose")
    with pytest.raises(ConfigError, match="feed a 3-channel input"):
        control.control_map(pose, kind="pose", channels=1)
    with pytest.raises(DataError, match="only when grey"):
        control.control_map(pose, kind="depth", channels=1)
    with pytest.raises(DataError, match="depth maps must have 1 or 3 channels, got 2"):
        control.control_map(np.zeros((1, 4, 4, 2), np.uint8))
    with pytest.raises(DataError, match=r"\[N, H, W\] or \[N, H, W, C\]"):
        control.control_map(np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="NaN"):
        control.control_map(np.full((1, 4, 4), np.nan, np.float32))
    with pytest.raises(DataError, match="dtype bool"):
        control.control_map(np.zeros((1, 4, 4), bool))
    with pytest.raises(DataError, match=r"must lie in \[0, 255\], got values -3..300"):
        control.control_map(np.array([[[-3, 300]]], np.int16))
    with pytest.raises(ConfigError, match="kind='normals'"):
        control.control_map(depth, kind="normals")


# ------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------


def test_extract_gives_model_inputs_and_clear_errors(images):
    assert {"canny", "sobel", "scribble", "scribble_drawing", "seg", "depth", "pose"} <= set(
        control.control_types()
    )
    edges = np.asarray(control.canny(images, 50, 100))
    cond = np.asarray(control.extract("canny", images, low_threshold=50, high_threshold=100))
    assert cond.shape == (16, H, W, 3) and cond.dtype == np.float32
    np.testing.assert_array_equal(
        cond, np.repeat(edges[..., None] / 255.0, 3, -1).astype(np.float32)
    )
    one = np.asarray(
        control.extract("canny", images, channels=1, low_threshold=50, high_threshold=100)
    )
    np.testing.assert_array_equal(one[..., 0] * 255, edges)
    np.testing.assert_array_equal(
        np.asarray(control.extract_map("canny", images, low_threshold=50, high_threshold=100)),
        edges,
    )
    seg = np.zeros((1, 4, 4), np.int32)
    seg[0, 1:3, 1:3] = 2
    np.testing.assert_array_equal(
        np.asarray(control.extract("seg", seg))[0, 1, 1], np.float32([0, 128, 0]) / np.float32(255)
    )
    depth = np.asarray(control.extract("depth", np.full((1, 4, 4), 51, np.uint8), channels=1))
    assert depth.shape == (1, 4, 4, 1) and np.allclose(depth, 0.2)

    with pytest.raises(ConfigError, match=r"unknown control type 'hed'; known: 'canny'"):
        control.extract("hed", images)
    with pytest.raises(ConfigError, match=r"'canny'.*accepts parameters \['low_threshold'"):
        control.extract("canny", images, sigma=2)
    with pytest.raises(DataError, match=r"got shape \(48, 64, 3\); for a single image"):
        control.extract("canny", images[0])
    with pytest.raises(DataError, match="drop the alpha channel"):
        control.extract("sobel", np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(DataError, match=r"span \[0, 255\], outside value_range \(-1, 1\)"):
        control.extract("canny", images.astype(np.float32))
    with pytest.raises(ConfigError, match="channels=2"):
        control.extract("canny", images, channels=2)
    with pytest.raises(ConfigError, match="aperture_size=5"):
        control.canny(images, aperture_size=5)
    with pytest.raises(ConfigError, match="blur_ksize=4 must be odd"):
        control.canny(images, blur_sigma=1.0, blur_ksize=4)
    with pytest.raises(DataError, match="kernel radius"):
        control.canny(images[:, :4, :4], blur_sigma=3.0)
    with pytest.raises(ConfigError, match="already registered"):
        control.register(control.control_types()["canny"])
