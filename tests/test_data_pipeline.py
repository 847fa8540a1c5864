"""Tests of the input pipeline: order, host slices, resume, transforms, sources, bad inputs."""

from __future__ import annotations

import io
import json
import logging

import jax
import numpy as np
import pytest
from conftest import write_cityscapes_like
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from genctl_jax.data import folder, pipeline, sources
from genctl_jax.errors import CheckpointError, ConfigError, DataError

LOGGER = "genctl_jax.data"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _cfg(**overrides):
    cfg = pipeline.default_config()
    cfg.worker_threads = 2
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _memory_source(n: int, hw: tuple[int, int] = (8, 8), seed: int = 0):
    rng = np.random.default_rng(seed)
    examples = [
        {
            "image": rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
            "label": i % 5,
            "caption": f"example {i}",
        }
        for i in range(n)
    ]
    return sources.InMemorySource(examples, name="memory")


def _memory_iter(source, *, seed=0, process_index=0, process_count=1, **cfg_overrides):
    overrides = {"image_size": 4, "batch_size": 8, "fields": ("image", "label", "index")}
    overrides.update(cfg_overrides)
    return pipeline.DataIterator(
        source,
        _cfg(**overrides),
        seed=seed,
        split="train",
        process_index=process_index,
        process_count=process_count,
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _save_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _rgb_folder(root, sizes, seed=0, classes=("cat", "dog")):
    """Writes random RGB PNGs of the given (h, w) sizes, alternating class sub-folders."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, (h, w) in enumerate(sizes):
        rel = f"{classes[i % len(classes)]}/img_{i:03d}.png"
        arrays[rel] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        _save_png(root / rel, arrays[rel])
    return arrays


def _reference(array: np.ndarray, size: int) -> np.ndarray:
    """PIL reference of the default geometry: shorter side to `size` (bicubic), centre crop."""
    img = Image.fromarray(array)
    w, h = img.size
    new = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    img = img.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Config and order
# ---------------------------------------------------------------------------------------------


def test_default_config_fields():
    cfg = pipeline.default_config()
    assert cfg.name == "shapes" and cfg.batch_size == 64 and cfg.image_size == 32
    assert tuple(cfg.fields) == ("image", "label") and cfg.num_epochs is None
    assert {"worker_threads", "prefetch", "data_dir", "tfds_keys", "random_crop"} <= set(cfg)


def test_same_seed_same_batches_other_seed_differs():
    src = _memory_source(40)
    a = _take(_memory_iter(src, seed=3, worker_threads=0), 6)
    b = _take(_memory_iter(src, seed=3, worker_threads=4, random_flip=True), 6)
    c = _take(_memory_iter(src, seed=4), 6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["index"], y["index"])
    assert any((x["index"] != z["index"]).any() for x, z in zip(a, c, strict=True))
    # Same example -> same pixels (no augmentation configured in a).
    np.testing.assert_array_equal(a[0]["image"], _take(_memory_iter(src, seed=3), 1)[0]["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_slices_concatenate_to_the_single_process_batch(process_count):
    src = _memory_source(37, hw=(10, 12))
    aug = {"random_flip": True, "random_crop": (0.3, 1.0), "fields": ("image", "label", "index")}
    steps = 9  # 37 // 8 = 4 steps per epoch: covers two epoch boundaries
    single = _take(_memory_iter(src, seed=7, **aug), steps)
    hosts = [
        _take(_memory_iter(src, seed=7, process_index=p, process_count=process_count, **aug), steps)
        for p in range(process_count)
    ]
    for k in range(steps):
        for key in ("image", "label", "index"):
            joined = np.concatenate([hosts[p][k][key] for p in range(process_count)])
            np.testing.assert_array_equal(joined, single[k][key])
        for p in range(process_count):
            assert hosts[p][k]["image"].shape == (8 // process_count, 4, 4, 3)
    # Hosts read disjoint examples; each epoch visits 32 distinct of the 37 (5 dropped).
    for epoch in range(2):
        seen = [
            i
            for p in range(process_count)
            for k in range(4 * epoch, 4 * epoch + 4)
            for i in hosts[p][k]["index"].tolist()
        ]
        assert len(seen) == 32 == len(set(seen))
        assert set(seen) <= set(range(37))


def test_epoch_covers_split_reshuffles_and_stops():
    src = _memory_source(24)
    it = _memory_iter(src, seed=1, num_epochs=2)
    assert it.steps_per_epoch == 3 and it.num_examples == 24
    batches = list(it)
    assert len(batches) == 6
    orders = [np.concatenate([b["index"] for b in batches[e * 3 : e * 3 + 3]]) for e in range(2)]
    assert sorted(orders[0].tolist()) == sorted(orders[1].tolist()) == list(range(24))
    assert (orders[0] != orders[1]).any()
    unshuffled = np.concatenate([b["index"] for b in _take(_memory_iter(src, shuffle=False), 3)])
    np.testing.assert_array_equal(unshuffled, np.arange(24))


@pytest.mark.parametrize("consumed", [2, 5])  # mid-epoch, and past the epoch boundary (4)
def test_resume_mid_epoch_matches_uninterrupted_run(consumed):
    src = _memory_source(37)
    kw = {"seed": 11, "random_flip": True}
    reference = _take(_memory_iter(src, **kw), consumed + 4)
    it = _memory_iter(src, **kw)
    _take(it, consumed)
    state = json.loads(json.dumps(it.get_state()))
    assert state["global_batches"] == consumed and state["version"] == 1
    # Resume on one process, and on two (process count is not part of the fingerprint).
    resumed = _memory_iter(src, **kw)
    resumed.set_state(state)
    halves = [_memory_iter(src, process_index=p, process_count=2, **kw) for p in range(2)]
    for h in halves:
        h.set_state(state)
    for k in range(4):
        expected = reference[consumed + k]
        got = next(resumed)
        joined = [next(h) for h in halves]
        for key in ("image", "index"):
            np.testing.assert_array_equal(got[key], expected[key])
            np.testing.assert_array_equal(np.concatenate([j[key] for j in joined]), expected[key])
    assert resumed.get_state()["global_batches"] == consumed + 4


def test_set_state_rejects_another_order():
    src = _memory_source(20)
    state = _memory_iter(src, seed=1).get_state()
    with pytest.raises(CheckpointError, match="seed: saved 1, now 2"):
        _memory_iter(src, seed=2).set_state(state)
    with pytest.raises(CheckpointError, match="global_batch_size"):
        _memory_iter(src, seed=1, batch_size=4).set_state(state)
    with pytest.raises(CheckpointError, match="version"):
        _memory_iter(src, seed=1).set_state({"version": 99, "global_batches": 0})


def test_to_global_shards_over_data_and_fsdp():
    mesh = jax.make_mesh(
        (2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    src = _memory_source(40)
    batch = next(_memory_iter(src, fields=("image", "label", "caption")))
    assert batch["caption"].dtype == object and batch["caption"][0].startswith("example ")
    out = pipeline.to_global(batch, mesh)
    assert set(out) == {"image", "label"}  # text stays on the host
    assert out["image"].shape == (8, 4, 4, 3) and out["label"].shape == (8,)
    for value in out.values():
        assert isinstance(value.sharding, NamedSharding)
        assert value.sharding.spec == PartitionSpec(("data", "fsdp"))
        assert len(value.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    with pytest.raises(ConfigError, match="not divisible by the 8 batch shards"):
        pipeline.to_global({"label": np.zeros(4, np.int32)}, mesh)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


def test_flip_is_an_exact_mirror_and_range_is_minus_one_to_one():
    src = _memory_source(32, hw=(6, 6))
    plain = _take(_memory_iter(src, seed=5, image_size=6, shuffle=False), 4)
    flipped = _take(_memory_iter(src, seed=5, image_size=6, shuffle=False, random_flip=True), 4)
    mirrored = same = 0
    for a, b in zip(plain, flipped, strict=True):
        for x, y in zip(a["image"], b["image"], strict=True):
            if np.array_equal(x, y):
                same += 1
            else:
                np.testing.assert_array_equal(y, x[:, ::-1])
                mirrored += 1
    assert mirrored > 4 and same > 4
    # Exact extremes: 0 -> -1, 255 -> 1, and nothing outside.
    img = np.zeros((6, 6, 3), np.uint8)
    img[:, 3:] = 255
    it = _memory_iter(sources.InMemorySource([{"image": img}] * 8), image_size=6, fields=("image",))
    out = next(it)["image"]
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    assert set(np.unique(out).tolist()) == {-1.0, 1.0}


def test_folder_images_resized_and_cropped_like_pil(tmp_path):
    sizes = [(20, 30), (30, 20), (16, 16), (9, 40), (33, 17), (64, 48)]
    arrays = _rgb_folder(tmp_path, sizes)
    cfg = _cfg(
        name=f"folder:{tmp_path}",
        image_size=16,
        batch_size=6,
        shuffle=False,
        fields=("image", "file", "index"),
    )
    batch = next(pipeline.create_iterator(cfg, seed=0, process_index=0, process_count=1))
    files = sorted(arrays)
    assert batch["file"].tolist() == files
    assert batch["image"].shape == (6, 16, 16, 3)
    for row, rel in enumerate(files):
        np.testing.assert_allclose(batch["image"][row], _reference(arrays[rel], 16), atol=1e-6)


def test_random_crop_of_full_scale_on_square_images_is_the_plain_resize():
    src = _memory_source(8, hw=(12, 12))
    plain = next(_memory_iter(src, shuffle=False))
    cropped = next(_memory_iter(src, shuffle=False, random_crop=(1.0, 1.0)))
    np.testing.assert_allclose(cropped["image"], plain["image"], atol=1e-6)
    # Smaller crops differ between epochs (positions come from the stream position).
    it = _memory_iter(src, shuffle=False, random_crop=(0.2, 0.5), batch_size=8)
    first, second = next(it)["image"], next(it)["image"]
    assert first.shape == (8, 4, 4, 3) and not np.array_equal(first, second)


def test_spatial_maps_follow_the_image_geometry():
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(8):
        image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        seg = rng.integers(0, 7, (12, 16), dtype=np.uint8)
        examples.append({"image": image, "segmentation": seg, "depth": image[..., 0].copy()})
    src = sources.InMemorySource(examples)
    fields = ("image", "segmentation", "depth")
    kw = {"seed": 5, "image_size": 6, "shuffle": False, "fields": fields}
    plain = next(_memory_iter(src, **kw))
    flipped = next(_memory_iter(src, random_flip=True, **kw))
    assert plain["segmentation"].dtype == np.int32 and plain["segmentation"].shape == (8, 6, 6)
    assert set(np.unique(plain["segmentation"])) <= set(range(7))  # nearest: ids only
    assert plain["depth"].dtype == np.float32 and plain["depth"].min() >= 0.0
    assert plain["depth"].max() <= 1.0
    mirrored = 0
    for i in range(8):
        if not np.array_equal(plain["image"][i], flipped["image"][i]):
            mirrored += 1
            np.testing.assert_array_equal(
                flipped["segmentation"][i], plain["segmentation"][i, :, ::-1]
            )
            np.testing.assert_array_equal(flipped["depth"][i], plain["depth"][i, :, ::-1])
        else:
            np.testing.assert_array_equal(flipped["depth"][i], plain["depth"][i])
    assert 0 < mirrored < 8


# ---------------------------------------------------------------------------------------------
# Folder source: labels, captions, colour policy, bad files
# ---------------------------------------------------------------------------------------------


def test_folder_labels_and_captions(tmp_path):
    arrays = _rgb_folder(tmp_path, [(8, 8)] * 6)
    files = sorted(arrays)
    with open(tmp_path / "captions.jsonl", "w") as f:
        for rel in reversed(files):  # order in the file does not matter
            f.write(json.dumps({"file": rel, "caption": f"a photo of {rel}"}) + "\n")
        f.write("\n")
    cfg = _cfg(
        name=f"folder:{tmp_path}",
        image_size=8,
        batch_size=6,
        folder_labels=True,
        fields=("image", "label", "caption", "file"),
    )
    batch = next(pipeline.create_iterator(cfg, seed=0, process_index=0, process_count=1))
    for rel, label, caption in zip(batch["file"], batch["label"], batch["caption"], strict=True):
        assert label == ("cat", "dog").index(rel.split("/")[0])
        assert caption == f"a photo of {rel}"


def test_missing_caption_lists_the_images(tmp_path):
    arrays = _rgb_folder(tmp_path, [(8, 8)] * 4)
    first = sorted(arrays)[0]
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": first, "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"3 of 4 images have no caption: cat/img_002.png"):
        pipeline.validate(_cfg(name=f"folder:{tmp_path}", batch_size=2))
    (tmp_path / "captions.jsonl").write_text('{"file": 3}\n')
    with pytest.raises(DataError, match=r"captions.jsonl:1: expected"):
        folder.FolderSource(tmp_path)


def _cityscapes_cfg(root, **overrides):
    cfg = _cfg(
        name=f"folder:{root / 'leftImg8bit' / 'train'}",
        image_size=16,
        batch_size=4,
        shuffle=False,
        fields=("image", "segmentation", "file"),
        **overrides,
    )
    cfg.folder_maps.segmentation = "../../gtFine/train"  # relative to the image folder
    cfg.folder_suffixes.image = "_leftImg8bit"
    cfg.folder_suffixes.segmentation = "_gtFine_labelIds"
    return cfg


def test_paired_label_maps_in_the_cityscapes_layout(tmp_path):
    labels = write_cityscapes_like(tmp_path, size=(16, 32))
    # Palette and 16-bit label maps hold ids too (the palette's colours are ignored).
    paths = sorted(labels)
    maps = tmp_path / "gtFine" / "train"
    stem = paths[1].name.removesuffix("_leftImg8bit.png")
    label_file = maps / paths[1].parent.name / f"{stem}_gtFine_labelIds.png"
    palette = Image.fromarray(labels[paths[1]], mode="P")
    palette.putpalette(list(range(256)) * 3)
    palette.save(label_file)
    stem = paths[2].name.removesuffix("_leftImg8bit.png")
    label_file = maps / paths[2].parent.name / f"{stem}_gtFine_labelIds.png"
    labels[paths[2]] = labels[paths[2]].astype(np.uint16) + 300  # ids beyond 255
    Image.fromarray(labels[paths[2]]).save(label_file)

    cfg = _cityscapes_cfg(tmp_path)
    batch = next(pipeline.create_iterator(cfg, seed=0, process_index=0, process_count=1))
    assert batch["segmentation"].dtype == np.int32
    for i, rel in enumerate(batch["file"]):
        path = tmp_path / "leftImg8bit" / "train" / rel
        # 16 x 32 at image_size 16: no resize, the centred 16 x 16 window (columns 8..23).
        np.testing.assert_array_equal(batch["segmentation"][i], labels[path][:, 8:24])
        np.testing.assert_allclose(
            batch["image"][i], _reference(np.asarray(Image.open(path)), 16), atol=1e-5
        )


def test_paired_map_errors_name_the_files(tmp_path):
    labels = write_cityscapes_like(tmp_path, size=(16, 32))
    paths = sorted(labels)
    maps = tmp_path / "gtFine" / "train" / paths[0].parent.name
    first = paths[0].name.removesuffix("_leftImg8bit.png")

    # Mismatched pair sizes: the error names both files and both sizes.
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(maps / f"{first}_gtFine_labelIds.png")
    it = pipeline.create_iterator(_cityscapes_cfg(tmp_path), seed=0, process_count=1)
    with pytest.raises(
        DataError,
        match=rf"mismatched pair: .*{first}_gtFine_labelIds.png' is "
        rf"16x8 pixels but its image .*{first}_leftImg8bit.png' is 32x16",
    ):
        next(it)
    # A colour image where class ids are expected.
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(maps / f"{first}_gtFine_labelIds.png")
    src = sources.open_source(
        _cityscapes_cfg(tmp_path).name, split="train", image_size=16,
        folder_maps={"segmentation": "../../gtFine/train"},
        folder_suffixes={"image": "_leftImg8bit", "segmentation": "_gtFine_labelIds"},
    )  # fmt: skip
    with pytest.raises(DataError, match=r"mode RGB; a label map stores one class id per pixel"):
        src[0]
    # An image without its map.
    (maps / f"{first}_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=rf"1 of 4 images have no 'segmentation' map .*{first}"):
        pipeline.validate(_cityscapes_cfg(tmp_path))

    # Config mistakes: ConfigError naming the field.
    bad = _cityscapes_cfg(tmp_path)
    bad.folder_suffixes.depth = "_depth"
    with pytest.raises(ConfigError, match=r"folder_suffixes.depth='_depth': expected 'image' or"):
        pipeline.validate(bad)
    bad = _cityscapes_cfg(tmp_path)
    bad.folder_maps.image = "../../gtFine/train"
    with pytest.raises(ConfigError, match=r"folder_maps.image=.*expected a map field"):
        pipeline.validate(bad)
    bad = _cityscapes_cfg(tmp_path)
    bad.folder_maps.segmentation = "aachen"  # inside the image folder
    with pytest.raises(ConfigError, match=r"lies inside the image folder"):
        pipeline.validate(bad)
    bad = _cityscapes_cfg(tmp_path)
    bad.name = "shapes"
    with pytest.raises(ConfigError, match=r"pair maps with a 'folder:' dataset.*'shapes'"):
        pipeline.validate(bad)
    bad = _cfg(name=f"folder:{tmp_path / 'leftImg8bit'}", fields=("image", "edges"))
    with pytest.raises(ConfigError, match=r"'edges' is not provided.*folder_maps.edges=PATH"):
        pipeline.validate(bad)


def test_paired_grey_maps_keep_their_grey_levels(tmp_path):
    """Non-label maps are read as grey values: a palette map by its colours, not its indices."""
    _rgb_folder(tmp_path / "images", [(8, 8)] * 2, classes=("a",))
    edges = np.zeros((8, 8), np.uint8)
    edges[2:6, 3] = 1
    palette = Image.fromarray(edges, mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    _mkparent(tmp_path / "edges" / "a" / "img_000.png")
    palette.save(tmp_path / "edges" / "a" / "img_000.png")
    _save_png(tmp_path / "edges" / "a" / "img_001.png", edges * 200)
    src = folder.FolderSource(tmp_path / "images", maps={"edges": "../edges"})
    assert src.fields >= {"image", "edges"}
    np.testing.assert_array_equal(src[0]["edges"], edges * 255)
    np.testing.assert_array_equal(src[1]["edges"], edges * 200)


def test_a_map_of_another_size_than_its_image_is_a_data_error():
    examples = [{"image": np.zeros((8, 8, 3), np.uint8), "edges": np.zeros((8, 8), np.uint8)}]
    examples.append({"image": np.zeros((8, 8, 3), np.uint8), "edges": np.zeros((4, 8), np.uint8)})
    it = _memory_iter(sources.InMemorySource(examples * 4), shuffle=False, fields=("edges",))
    with pytest.raises(DataError, match=r"example 1: its 'edges' map is 4x8 .* image is 8x8"):
        next(it)


def test_grey_rgba_palette_and_16_bit_images_become_rgb_with_one_log_each(tmp_path, caplog):
    grey = np.full((8, 8), 100, np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 4:, 3] = 255  # left half transparent -> white, right half opaque red
    _save_png(tmp_path / "a_grey.png", grey)
    _save_png(tmp_path / "b_grey.png", grey)
    _save_png(tmp_path / "c_rgba.png", rgba)
    Image.fromarray(np.full((8, 8), 2000, np.uint16)).save(tmp_path / "d_16.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([30, 30, 30] + [0] * 765)
    palette.save(tmp_path / "e_pal.png")
    _save_png(tmp_path / "f_rgb.png", np.full((8, 8, 3), 7, np.uint8))
    caplog.set_level(logging.INFO, logger=LOGGER)
    src = folder.FolderSource(tmp_path)
    images = [src[i]["image"] for i in range(len(src))]
    assert all(im.dtype == np.uint8 and im.shape == (8, 8, 3) for im in images)
    np.testing.assert_array_equal(images[0], 100)
    np.testing.assert_array_equal(images[2][:, :4], 255)  # transparent: composited on white
    assert (images[2][:, 4:] == [200, 0, 0]).all()
    np.testing.assert_array_equal(images[3], round(2000 / 257))
    np.testing.assert_array_equal(images[4], 30)
    np.testing.assert_array_equal(images[5], 7)
    messages = [r.getMessage() for r in caplog.records if "converting" in r.getMessage()]
    assert sum("converting L image" in m for m in messages) == 1  # once per kind
    assert any("converting RGBA image" in m and "white" in m for m in messages)
    assert any("converting I;16" in m for m in messages)
    assert any("converting P image" in m for m in messages)
    assert len(messages) == 4


def test_array_images_grey_and_rgba_converted_in_the_pipeline(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    grey = np.full((4, 4, 1), 9, np.uint8)
    rgba = np.concatenate([np.full((4, 4, 3), 50, np.uint8), np.zeros((4, 4, 1), np.uint8)], -1)
    src = sources.InMemorySource([{"image": grey}, {"image": rgba}] * 4)
    batch = next(_memory_iter(src, shuffle=False, fields=("image",)))
    np.testing.assert_allclose(batch["image"][0], 9 / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(batch["image"][1], 1.0)  # fully transparent -> white
    text = caplog.text
    assert "converting grey-scale image" in text and "converting RGBA image" in text


def test_corrupt_image_raises_data_error_naming_the_file(tmp_path):
    _rgb_folder(tmp_path, [(8, 8)] * 3)
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good, format="PNG")
    (tmp_path / "cat" / "truncated.png").write_bytes(good.getvalue()[:60])
    cfg = _cfg(name=f"folder:{tmp_path}", image_size=8, batch_size=5, shuffle=False)
    cfg.fields = ("image",)
    it = pipeline.create_iterator(cfg, seed=0, process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"cannot read image file .*cat/broken\.jpg"):
        next(it)
    src = folder.FolderSource(tmp_path)
    with pytest.raises(DataError, match=r"truncated\.png"):
        src[src.files.index("cat/truncated.png")]


def test_folder_listing_is_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/z.PNG", "a/y.jpeg", "a/sub/x.webp", "c.bmp", "d.jpg", ".hidden/q.png"]:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
            _mkparent(tmp_path / rel), format=_format_of(rel)
        )
    (tmp_path / "notes.txt").write_text("x")
    assert folder.list_images(tmp_path) == ["a/sub/x.webp", "a/y.jpeg", "b/z.PNG", "c.bmp", "d.jpg"]


def _mkparent(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _format_of(rel):
    ext = rel.rsplit(".", 1)[1].lower()
    return {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}[ext]


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ConfigError, match=r"config.data.name=.*empty folder"):
        pipeline.validate(_cfg(name=f"folder:{tmp_path / 'empty'}"))
    with pytest.raises(ConfigError, match=r"does not exist"):
        pipeline.validate(_cfg(name=f"folder:{tmp_path / 'nope'}"))
    with pytest.raises(DataError, match="empty folder"):  # the source itself: DataError
        folder.FolderSource(tmp_path / "empty")


def test_unknown_prefix_and_bad_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown dataset name 'hf:foo'.*'folder:PATH'"):
        pipeline.validate(_cfg(name="hf:foo"))
    _rgb_folder(tmp_path, [(8, 8)] * 4)
    good = {"name": f"folder:{tmp_path}", "batch_size": 4, "fields": ("image",)}
    pipeline.validate(_cfg(**good), process_count=4)
    bad = [
        ({"batch_size": 6}, 4, r"batch_size=6 is not divisible by the process count 4"),
        ({"batch_size": 8}, 1, r"batch_size=8 exceeds the 4 examples"),
        ({"image_size": 0}, 1, r"image_size=0"),
        ({"random_crop": (0.5, 2.0)}, 1, r"random_crop=\(0.5, 2.0\)"),
        ({"num_epochs": 0}, 1, r"num_epochs=0"),
        ({"fields": ("image", "label")}, 1, r"'label' is not provided.*folder_labels=True"),
        ({"fields": ("image", "caption")}, 1, r"'caption' is not provided.*captions.jsonl"),
        ({"split": "test"}, 1, r"single split 'train'"),
    ]
    for overrides, processes, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            pipeline.validate(_cfg(**{**good, **overrides}), process_count=processes)


def test_parse_name_and_split_precedence():
    assert sources.parse_name("tfds:cifar10") == sources.SourceSpec("tfds", "cifar10", None)
    assert sources.parse_name("tfds:mnist:3.0.1:train[:90%]") == sources.SourceSpec(
        "tfds", "mnist:3.0.1", "train[:90%]"
    )
    assert sources.parse_name("tfds:coco_captions/2017:val").split == "val"
    cfg = _cfg(name="tfds:cifar10:test")
    assert pipeline._resolve_split(cfg, None) == "test"
    assert pipeline._resolve_split(cfg, "validation") == "validation"
    assert pipeline._resolve_split(_cfg(name="shapes"), None) == "train"


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_downloads(monkeypatch):
    import tensorflow_datasets as tfds

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline must never download or prepare a dataset")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


def test_unprepared_and_unknown_tfds_datasets(tmp_path, no_downloads):
    cfg = _cfg(name="tfds:mnist", data_dir=str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"not prepared.*tfds build mnist --file_format=array_record"
    ):
        pipeline.validate(cfg)
    with pytest.raises(DataError, match="not prepared"):
        sources.TfdsSource("mnist", split="train", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"no dataset 'no_such_set_xyz'"):
        pipeline.validate(_cfg(name="tfds:no_such_set_xyz", data_dir=str(tmp_path)))


def test_tfds_reader_choice():
    random_access = {"array_record", "parquet"}
    pick = sources.choose_tfds_reader
    assert pick({"array_record"}, random_access, tf_available=False) == "data_source"
    assert pick({"tfrecord", "parquet"}, random_access, tf_available=True) == "data_source"
    assert pick({"tfrecord"}, random_access, tf_available=True) == "load"
    with pytest.raises(DataError, match=r"--file_format=array_record"):
        pick({"tfrecord"}, random_access, tf_available=False)
    assert sources.tensorflow_available() is False  # this project's venv has no TensorFlow


_TINY_BUILDER = None


def _tiny_builder_class():
    """A tiny captioned TFDS builder (PNG bytes in, so preparing it needs no TensorFlow)."""
    global _TINY_BUILDER
    if _TINY_BUILDER is None:
        import tensorflow_datasets as tfds

        class GenctlTinyCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                features = tfds.features.FeaturesDict(
                    {
                        "img": tfds.features.Image(shape=(None, None, 3)),
                        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                        "cls": tfds.features.ClassLabel(num_classes=3),
                    }
                )
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(12), "test": self._generate_examples(4)}

            def _generate_examples(self, n):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((6, 8, 3), 10 * i, np.uint8)).save(buf, format="PNG")
                    buf.seek(0)
                    captions = [f"caption {i} a", f"caption {i} b"]
                    yield i, {"img": buf, "captions": {"text": captions}, "cls": i % 3}

        _TINY_BUILDER = GenctlTinyCaptions
    return _TINY_BUILDER


def test_prepared_tfds_dataset_with_key_mapping(tmp_path):
    builder = _tiny_builder_class()(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    cfg = _cfg(
        name="tfds:genctl_tiny_captions",
        data_dir=str(tmp_path),
        image_size=4,
        batch_size=4,
        fields=("image", "label", "caption", "index"),
    )
    cfg.tfds_keys.image = "img"
    cfg.tfds_keys.label = "cls"
    cfg.tfds_keys.caption = "captions/text"
    it = pipeline.create_iterator(cfg, seed=0, process_index=0, process_count=1)
    assert it.num_examples == 12
    seen = set()
    for _ in range(3):
        batch = next(it)
        for index, label, caption in zip(
            batch["index"], batch["label"], batch["caption"], strict=True
        ):
            src_example = it.source[int(index)]
            assert label == src_example["label"]
            n = int(src_example["image"][0, 0, 0]) // 10
            assert caption in (f"caption {n} a", f"caption {n} b")
            seen.add(int(index))
    assert seen == set(range(12))
    test_it = pipeline.create_iterator(cfg, seed=0, split="test", process_index=0, process_count=1)
    assert test_it.num_examples == 4
    cfg.fields = ("image", "segmentation")
    with pytest.raises(ConfigError, match=r"'segmentation' is not provided.*tfds_keys"):
        pipeline.validate(cfg)
    with pytest.raises(ConfigError, match=r"cannot read split 'nope'"):
        pipeline.validate(_cfg(name="tfds:genctl_tiny_captions:nope", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# The embedded shapes dataset, end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """Builds the tiny shapes config once per session (about a second)."""
    pytest.importorskip("genctl_jax.data.shapes_tfds")
    data_dir = tmp_path_factory.mktemp("shapes_tfds")
    pipeline.validate(_cfg(name="shapes", shapes_config="tiny16", data_dir=str(data_dir)))
    return str(data_dir)


SHAPES_FIELDS = ("image", "label", "caption", "segmentation", "edges", "depth", "objects", "index")


def test_shapes_end_to_end(shapes_data_dir):
    cfg = _cfg(
        name="shapes",
        shapes_config="tiny16",
        data_dir=shapes_data_dir,
        image_size=16,
        batch_size=16,
        random_flip=True,
        fields=SHAPES_FIELDS,
    )
    it = pipeline.create_iterator(cfg, seed=0, process_index=1, process_count=2)
    assert it.num_examples == 512 and it.local_batch_size == 8 and it.global_batch_size == 16
    batch = next(it)
    assert batch["image"].shape == (8, 16, 16, 3) and batch["segmentation"].shape == (8, 16, 16)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    flips = 0
    for row, index in enumerate(batch["index"]):
        raw = it.source[int(index)]
        assert batch["label"][row] == raw["label"]
        assert batch["caption"][row] == raw["caption"].decode()
        assert json.loads(batch["objects"][row]) == json.loads(raw["objects"])
        image = np.asarray(raw["image"], np.float32) / 127.5 - 1
        flipped = not np.array_equal(batch["image"][row], image)
        flips += flipped
        view = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)
        np.testing.assert_array_equal(batch["image"][row], view(image))
        np.testing.assert_array_equal(batch["segmentation"][row], view(raw["segmentation"]))
        np.testing.assert_array_equal(batch["edges"][row], view(raw["edges"]) / 255.0)
        np.testing.assert_allclose(batch["depth"][row], view(raw["depth"]) / 255.0, atol=1e-7)
    assert 0 < flips < 8
    # Stored at 16 px, trained at 8: maps are resized with the image.
    cfg.image_size = 8
    small = next(pipeline.create_iterator(cfg, seed=0, process_index=0, process_count=1))
    assert small["image"].shape == (16, 8, 8, 3) and small["edges"].shape == (16, 8, 8)
    assert set(np.unique(small["segmentation"]).tolist()) <= set(range(7))


def test_shapes_bad_config(shapes_data_dir):
    base = {"name": "shapes", "data_dir": shapes_data_dir}
    with pytest.raises(ConfigError, match=r"shapes_config"):
        pipeline.validate(_cfg(image_size=12, **base))  # no config stored at 12 px
    with pytest.raises(ConfigError, match=r"split 'validation'"):
        pipeline.validate(_cfg(shapes_config="tiny16", split="validation", **base))
