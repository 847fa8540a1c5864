"""The embedded shapes dataset: generator, analytic checker and the TF-free TFDS builder."""

import json
import math
import sys

import numpy as np
import pytest

from genctl_jax.data import shapes, shapes_tfds
from genctl_jax.errors import ConfigError, DataError

KEYS = {"image", "label", "caption", "segmentation", "instances", "edges", "depth", "objects"}


@pytest.fixture(scope="module")
def examples32():
    return [shapes.generate_example(i, seed=3, image_size=32) for i in range(200)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Data dir holding the built `tiny16` config (512 train / 128 test at 16x16)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    shapes_tfds.shapes_builder(config="tiny16", data_dir=str(data_dir))
    return str(data_dir)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


# ------------------------------------------------------------------------------------------
# Generator
# ------------------------------------------------------------------------------------------


def test_deterministic_and_order_independent():
    later = [shapes.generate_example(i, seed=5) for i in (7, 3, 7)]
    _assert_same(later[0], later[2])
    _assert_same(later[1], shapes.generate_example(3, seed=5))
    other_seed = shapes.generate_example(7, seed=6)
    assert not np.array_equal(other_seed["image"], later[0]["image"])
    other_index = shapes.generate_example(8, seed=5)
    assert not np.array_equal(other_index["image"], later[0]["image"])


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_example_format(size):
    for i in range(3 if size == 128 else 10):
        ex = shapes.generate_example(i, seed=1, image_size=size, max_objects=4)
        assert set(ex) == KEYS
        assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
        for k in ("segmentation", "instances", "edges", "depth"):
            assert ex[k].shape == (size, size) and ex[k].dtype == np.uint8, k
        assert set(np.unique(ex["edges"])) <= {0, 255}
        assert ex["segmentation"].max() <= shapes.NUM_SHAPES
        objs = ex["objects"]
        assert 1 <= len(objs) <= 4
        assert json.loads(json.dumps(objs)) == objs
        assert ex["label"] == shapes.label_of(objs[0]["shape"], objs[0]["colour"])
        assert 0 <= ex["label"] < shapes.NUM_CLASSES
        assert len({o["colour"] for o in objs}) == len(objs)
        assert len({o["position"] for o in objs}) == len(objs)
        for k, o in enumerate(objs):
            cx, cy = o["centre"]
            assert shapes.POSITIONS[3 * int(3 * cy / size) + int(3 * cx / size)] == o["position"]
            frac = shapes.SIZE_FRACTIONS[shapes.SIZES.index(o["size"])]
            assert abs(o["radius"] / (frac * size) - 1) <= 0.041
            seg_id = 1 + shapes.SHAPES.index(o["shape"])
            assert np.all(ex["segmentation"][ex["instances"] == k + 1] == seg_id)
        # Nothing drawn on the border row/columns (objects keep half a pixel away).
        border = np.concatenate(
            [ex["instances"][[0, -1]].ravel(), ex["instances"][:, [0, -1]].ravel()]
        )
        assert not border.any()


def test_labels_and_names():
    assert len(shapes.SHAPES) * len(shapes.COLOURS) == shapes.NUM_CLASSES
    names = [shapes.label_name(i) for i in range(shapes.NUM_CLASSES)]
    assert len(set(names)) == shapes.NUM_CLASSES
    assert shapes.label_name(shapes.label_of("star", "orange")) == "orange star"
    assert shapes.label_of("square", "red") == 1 * shapes.NUM_COLOURS + 0
    with pytest.raises(DataError, match="out of range"):
        shapes.label_name(shapes.NUM_CLASSES)
    # Palette colours are far apart and far from any background colour (channels <= 70).
    d = np.linalg.norm(shapes.PALETTE[:, None] - shapes.PALETTE[None], axis=-1)
    assert d[~np.eye(len(d), dtype=bool)].min() > 80
    assert shapes.PALETTE.max(-1).min() >= 200


def test_square_area_closed_form():
    # Half side 0.89 r = 5 px on pixel boundaries: exactly 100 pixels, all of pure colour.
    r = 5.0 / 0.89
    obj = {"shape": "square", "colour": "blue", "centre": [16.0, 16.0], "radius": r}
    ex = shapes.render_scene([obj], image_size=32)
    seg = ex["segmentation"] == 1 + shapes.SHAPES.index("square")
    assert seg.sum() == 100
    assert seg[11:21, 11:21].all()
    np.testing.assert_array_equal(ex["image"][seg], np.broadcast_to(shapes.PALETTE[2], (100, 3)))
    # Off-grid: pixel count within half the perimeter, anti-aliased coverage within 1%.
    bg = (20, 20, 20)
    obj = {"shape": "square", "colour": "white", "centre": [15.3, 16.7], "radius": 7.3}
    ex = shapes.render_scene([obj], image_size=32, background=(bg, bg, 0.0))
    area = (2 * 0.89 * 7.3) ** 2
    count = int((ex["segmentation"] > 0).sum())
    assert abs(count - area) <= 0.5 * 4 * 2 * 0.89 * 7.3, (count, area)
    alpha = (ex["image"][..., 0].astype(float) - 20) / (245 - 20)
    assert abs(alpha.sum() - area) < 0.01 * area, (alpha.sum(), area)


def test_circle_coverage_closed_form():
    bg = (0, 0, 0)
    obj = {"shape": "circle", "colour": "white", "centre": [31.4, 30.9], "radius": 13.0}
    ex = shapes.render_scene([obj], image_size=64, background=(bg, bg, 0.0))
    alpha = ex["image"][..., 1].astype(float) / 245
    assert abs(alpha.sum() - math.pi * 13.0**2) < 0.01 * math.pi * 13.0**2
    assert ex["depth"][31, 31] == 255 - 8 * (2 - shapes.SIZES.index(ex["objects"][0]["size"]))


def _edges_reference(inst):
    """Edge rule spelled out with loops: object pixel next to background or a farther object."""
    h, w = inst.shape
    out = np.zeros_like(inst)
    for i in range(h):
        for j in range(w):
            if inst[i, j] == 0:
                continue
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                a, b = i + di, j + dj
                # Objects are drawn last-to-first: a larger id is farther back.
                if 0 <= a < h and 0 <= b < w and (inst[a, b] == 0 or inst[a, b] > inst[i, j]):
                    out[i, j] = 255
    return out


def test_edges_depth_and_occlusion(examples32):
    for ex in examples32[:40]:
        inst, seg, edges = ex["instances"], ex["segmentation"], ex["edges"]
        np.testing.assert_array_equal(edges, _edges_reference(inst))
        # Every change of segmentation between 4-neighbours has an edge on one side.
        for a, b, ea, eb in (
            (seg[:, :-1], seg[:, 1:], edges[:, :-1], edges[:, 1:]),
            (seg[:-1], seg[1:], edges[:-1], edges[1:]),
        ):
            assert np.all(((ea > 0) | (eb > 0))[a != b])
        # Depth: nearer (earlier in `objects`) is brighter; the background is far.
        depth = ex["depth"].astype(int)
        near_object = np.pad(inst > 0, 1)
        near_object = np.any(
            [near_object[i : i + 32, j : j + 32] for i in range(3) for j in range(3)], axis=0
        )
        assert depth[~near_object].max() <= 64
        levels = [np.median(depth[inst == k + 1]) for k in range(len(ex["objects"]))]
        levels = [v for v in levels if not np.isnan(v)]
        assert levels == sorted(levels, reverse=True)
        # The primary is never occluded: it renders exactly as it would alone.
        alone = shapes.render_scene(ex["objects"][:1], image_size=32)
        np.testing.assert_array_equal(inst == 1, alone["instances"] == 1)


def test_caption_round_trip(examples32):
    for ex in examples32:
        want = [{k: o[k] for k in ("shape", "colour", "size", "position")} for o in ex["objects"]]
        assert shapes.parse_caption(ex["caption"]) == want
    assert shapes.parse_caption(" A Large WHITE star at the top.  ") == [
        {"shape": "star", "colour": "white", "size": "large", "position": "top"}
    ]
    assert shapes.parse_caption("a small red cross in the centre")[0]["position"] == "center"
    caption = (
        "a small red circle in the top left, a large blue square on the left"
        " and a medium cyan diamond at the bottom"
    )
    assert [o["position"] for o in shapes.parse_caption(caption)] == ["top left", "left", "bottom"]
    for bad in ("", "a huge red circle in the top left", "a small red circle", "two red squares"):
        with pytest.raises(DataError, match="parse"):
            shapes.parse_caption(bad)


def test_render_scene_from_caption():
    caption = "a large green triangle in the center and a small orange star in the top right"
    ex = shapes.render_scene(shapes.parse_caption(caption), image_size=32)
    assert ex["caption"] == caption
    assert shapes.check(ex["image"], caption=caption).all_match


def test_generator_argument_errors():
    with pytest.raises(ConfigError, match="max_objects"):
        shapes.generate_example(0, max_objects=0)
    with pytest.raises(ConfigError, match="image_size"):
        shapes.generate_example(0, image_size=4)
    with pytest.raises(DataError, match="unknown shape"):
        shapes.render_scene(
            [{"shape": "hexagon", "colour": "red", "size": "small", "position": "top"}]
        )


# ------------------------------------------------------------------------------------------
# Checker
# ------------------------------------------------------------------------------------------


def _rate(results):
    return float(np.mean([r.all_match for r in results]))


def test_checker_accepts_own_conditioning(examples32):
    by_objects = _rate(shapes.check(ex["image"], ex["objects"]) for ex in examples32)
    by_caption = _rate(shapes.check(ex["image"], caption=ex["caption"]) for ex in examples32)
    by_label = _rate(shapes.check(ex["image"], label=ex["label"]) for ex in examples32)
    rates = f"objects {by_objects:.3f}, caption {by_caption:.3f}, label {by_label:.3f}"
    assert min(by_objects, by_caption, by_label) >= 0.95, f"own-conditioning match rates: {rates}"


def test_checker_rejects_other_conditioning(examples32):
    n = len(examples32)
    pairs = [(examples32[i], examples32[(i + 1) % n]) for i in range(n)]
    by_objects = _rate(shapes.check(a["image"], b["objects"]) for a, b in pairs)
    by_caption = _rate(shapes.check(a["image"], caption=b["caption"]) for a, b in pairs)
    by_label = _rate(
        shapes.check(a["image"], label=b["label"]) for a, b in pairs if a["label"] != b["label"]
    )
    rates = f"objects {by_objects:.3f}, caption {by_caption:.3f}, label {by_label:.3f}"
    assert max(by_objects, by_caption, by_label) < 0.2, f"mismatched match rates: {rates}"


def test_checker_single_objects_every_shape_size():
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            for position, colour in (("top left", "yellow"), ("center", "orange")):
                obj = {"shape": shape, "colour": colour, "size": size, "position": position}
                ex = shapes.render_scene(
                    [obj], image_size=32, background=((40, 10, 60), (0, 30, 10), 1.0)
                )
                res = shapes.check(ex["image"], [obj])
                assert res.all_match and res.score == 1.0, (obj, res.objects[0].found)
                wrong = dict(obj, shape=shapes.SHAPES[(shapes.SHAPES.index(shape) + 1) % 6])
                res = shapes.check(ex["image"], [wrong])
                assert not res.all_match and res.score == 0.75, (wrong, res.objects[0].found)


def test_checker_attribute_reports(examples32):
    ex = next(e for e in examples32 if len(e["objects"]) == 2)
    res = shapes.check(ex["image"], ex["objects"])
    assert res.all_match and res.score == 1.0 and len(res.objects) == 2
    assert res.objects[0].found["shape"] == ex["objects"][0]["shape"]
    absent = next(c for c in shapes.COLOURS if c not in {o["colour"] for o in ex["objects"]})
    res = shapes.check(ex["image"], [dict(ex["objects"][0], colour=absent)])
    assert (res.objects[0].colour, res.all_match, res.score) == (False, False, 0.0)
    moved = dict(
        ex["objects"][0],
        position=next(p for p in shapes.POSITIONS if p != ex["objects"][0]["position"]),
    )
    res = shapes.check(ex["image"], [moved])
    assert res.objects[0].position is False and res.objects[0].shape and res.score == 0.75
    # Label-only checks leave position and size unchecked.
    res = shapes.check(ex["image"], label=ex["label"])
    assert res.objects[0].position is None and res.objects[0].size is None
    # A blank image matches nothing.
    assert shapes.check(np.zeros((32, 32, 3), np.uint8), ex["objects"]).score == 0.0


def test_checker_image_ranges(examples32):
    for ex in examples32[:20]:
        img = ex["image"].astype(np.float32)
        want = shapes.check(ex["image"], ex["objects"]).all_match
        assert shapes.check(img / 127.5 - 1.0, ex["objects"]).all_match == want
        assert shapes.check(img, ex["objects"]).all_match == want
        assert shapes.check(img / 255.0, ex["objects"], value_range=(0, 1)).all_match == want
        assert shapes.check(ex["image"], json.dumps(ex["objects"]).encode()).all_match == want


def test_checker_bad_inputs(examples32):
    ex = examples32[0]
    objs = ex["objects"]
    bad_images = [
        (np.zeros((32, 32), np.uint8), "shape"),
        (np.zeros((32, 32, 4), np.uint8), "shape"),
        (np.zeros((2, 32, 32, 3), np.uint8), "shape"),
        (np.zeros((32, 16, 3), np.uint8), "square"),
        (np.zeros((32, 32, 3), np.int64), "dtype"),
        (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
        (np.full((32, 32, 3), 300.0, np.float32), "value_range"),
    ]
    for img, msg in bad_images:
        with pytest.raises(ValueError, match=msg):
            shapes.check(img, objs)
    with pytest.raises(DataError, match="exactly one"):
        shapes.check(ex["image"])
    with pytest.raises(DataError, match="exactly one"):
        shapes.check(ex["image"], objs, label=ex["label"])
    with pytest.raises(DataError, match="unknown colour"):
        shapes.check(ex["image"], [{"shape": "circle", "colour": "purple"}])
    with pytest.raises(DataError, match="out of range"):
        shapes.check(ex["image"], label=-1)
    with pytest.raises(DataError, match="JSON"):
        shapes.check(ex["image"], "not json")
    with pytest.raises(DataError, match="parse"):
        shapes.check(ex["image"], caption="a red thing")


@pytest.mark.parametrize("size", [16, 64])
def test_checker_other_resolutions(size):
    exs = [shapes.generate_example(i, seed=11, image_size=size) for i in range(60)]
    rate = _rate(shapes.check(ex["image"], ex["objects"]) for ex in exs)
    assert rate >= 0.95, f"own-objects match rate at {size}x{size}: {rate:.3f}"


# ------------------------------------------------------------------------------------------
# TFDS builder (array_record, no TensorFlow)
# ------------------------------------------------------------------------------------------


def test_tfds_source_matches_generator(tiny_dir):
    cfg = next(c for c in shapes_tfds.Shapes.BUILDER_CONFIGS if c.name == "tiny16")
    for split, n in (("train", 512), ("test", 128)):
        src = shapes_tfds.shapes_data_source(split, config="tiny16", data_dir=tiny_dir)
        assert len(src) == n
        for i in (0, 1, n - 1):
            got = src[i]
            want = shapes.generate_example(
                i, seed=shapes_tfds.split_seed(cfg.seed, split), image_size=16, max_objects=3
            )
            assert int(got["index"]) == i
            assert isinstance(got["caption"], bytes) and isinstance(got["objects"], bytes)
            assert got["caption"].decode() == want["caption"]
            assert json.loads(got["objects"]) == want["objects"]
            assert int(got["label"]) == want["label"]
            for k in ("image", "segmentation", "instances", "edges", "depth"):
                assert got[k].dtype == np.uint8
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{split}[{i}] {k}")
            res = shapes.check(got["image"], got["objects"])
            assert res.score > 0.5
    train0 = shapes_tfds.shapes_data_source(
        "train", image_size=16, config="tiny16", data_dir=tiny_dir
    )[0]
    test0 = shapes_tfds.shapes_data_source("test", config="tiny16", data_dir=tiny_dir)[0]
    assert not np.array_equal(train0["image"], test0["image"])
    assert "tensorflow" not in sys.modules


def test_tfds_data_source_by_name(tiny_dir):
    import tensorflow_datasets as tfds

    srcs = tfds.data_source("shapes/tiny16", data_dir=tiny_dir, download=False)
    assert {str(k): len(v) for k, v in srcs.items()} == {"train": 512, "test": 128}
    batch = srcs["train"].__getitems__([3, 4])
    assert [int(b["index"]) for b in batch] == [3, 4]
    builder = shapes_tfds.shapes_builder(config="tiny16", data_dir=tiny_dir)
    assert builder.info.features["label"].int2str(5) == shapes.label_name(5)
    assert builder.info.file_format.value == "array_record"


def test_tfds_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="image_size=48"):
        shapes_tfds.shapes_data_source("train", image_size=48, data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="contradicts"):
        shapes_tfds.shapes_data_source(
            "train", image_size=32, config="tiny16", data_dir=str(tmp_path)
        )
    with pytest.raises(ConfigError, match="unknown shapes config"):
        shapes_tfds.shapes_data_source("train", config="huge", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="split"):
        shapes_tfds.split_seed(0, "validation")
