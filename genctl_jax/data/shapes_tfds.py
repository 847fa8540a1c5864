"""TFDS builder for the embedded shapes dataset, built locally and read without TensorFlow.

`Shapes` (TFDS name "shapes") writes `shapes.generate_example` outputs to array_record files;
`shapes_data_source` builds a config on first use and returns a random-access source.

What works without TensorFlow (tensorflow-datasets 4.9.10, checked with TF absent):
- Building with file_format="array_record". `tfds.features.Image` encodes *numpy* images with
  `tf.image.encode_png`, so the builder hands it `PIL.Image` objects (encoded by Pillow);
  `Tensor(encoding="zlib")`, `Scalar`, `Text` and `ClassLabel` encode in pure Python.
  `dataset_info_from_configs` would look for metadata files beside this module, so `_info`
  builds `tfds.core.DatasetInfo` directly. TFDS's `code_path` lookup imports the
  `importlib_resources` backport (not installed on Python >= 3.9), so `Shapes` states it.
- Reading with `builder.as_data_source(split)` or `tfds.data_source("shapes/<config>", ...)`:
  array_record random access + `decode_example_np` (Pillow decodes the PNG). TFDS logs once
  that OpenCV is missing and it falls back to Pillow; that is expected.
- Not usable: `tfds.load`, `builder.as_dataset` and anything returning a `tf.data.Dataset`;
  building as tfrecord. Feed training from the data source (e.g. with grain).

Decoded examples (`src[i]`): image uint8 [S, S, 3]; label int; caption and objects are
*bytes* (UTF-8; objects is JSON: `json.loads(ex["objects"])`, and `shapes.check` accepts the
bytes as they are); segmentation, instances, edges, depth uint8 [S, S]; index int64, the
generator index. Examples are stored in generation order (shuffling disabled), so
`src[i]` equals `shapes.generate_example(i, seed=split_seed(config.seed, split), ...)`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from genctl_jax.data import shapes
from genctl_jax.errors import ConfigError

__all__ = ["Shapes", "ShapesConfig", "shapes_builder", "shapes_data_source", "split_seed"]

_SPLITS = ("train", "test")


def split_seed(seed: int, split: str) -> int:
    """Generator seed of a split: train and test never share a stream, for any config seed."""
    if split not in _SPLITS:
        raise ConfigError(f"split {split!r} is not one of {_SPLITS}")
    return 2 * int(seed) + _SPLITS.index(split)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Resolution, example counts and seed of one variant of the dataset."""

    image_size: int = 32
    num_train: int = 10_000
    num_test: int = 1_000
    max_objects: int = 3
    seed: int = 0


def _config(
    name: str, image_size: int, num_train: int, num_test: int, max_objects: int = 3
) -> ShapesConfig:
    return ShapesConfig(
        name=name,
        description=(
            f"{image_size}x{image_size}, {num_train} train / {num_test} test examples, "
            f"up to {max_objects} objects"
        ),
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        max_objects=max_objects,
    )


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Procedural coloured shapes with captions, labels and control maps; no download."""

    # TFDS derives this with `importlib_resources`, a backport only installed on Python < 3.9;
    # stating it avoids that import. No checksums file sits beside it: nothing is downloaded.
    code_path = epath.Path(__file__)
    # Bump when the generator's output changes, so old builds are not reused.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        _config("32", 32, 10_000, 1_000),  # the default
        _config("16", 16, 10_000, 1_000),
        _config("64", 64, 10_000, 1_000),
        _config("128", 128, 10_000, 1_000),
        _config("tiny16", 16, 512, 128),  # for tests: builds in about a second
        _config("tiny32", 32, 512, 128),
        # One object per image: its class is the whole picture (class-conditional demos).
        _config("single32", 32, 10_000, 1_000, max_objects=1),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size

        def plane():
            return tfds.features.Tensor(
                shape=(s, s), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            )

        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(
                    names=[shapes.label_name(i) for i in range(shapes.NUM_CLASSES)]
                ),
                "caption": tfds.features.Text(),
                "objects": tfds.features.Text(),  # JSON list, see shapes.py
                "segmentation": plane(),
                "instances": plane(),
                "edges": plane(),
                "depth": plane(),
                "index": tfds.features.Scalar(dtype=np.int64),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=shapes.__doc__,
            features=features,
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep src[i] == generate_example(i, ...)
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated locally
        cfg = self.builder_config
        return {
            "train": self._generate_examples(split_seed(cfg.seed, "train"), cfg.num_train),
            "test": self._generate_examples(split_seed(cfg.seed, "test"), cfg.num_test),
        }

    def _generate_examples(self, seed: int, num_examples: int):
        cfg = self.builder_config
        for i in range(num_examples):
            ex = shapes.generate_example(
                i, seed=seed, image_size=cfg.image_size, max_objects=cfg.max_objects
            )
            yield (
                i,
                {
                    "image": PIL.Image.fromarray(ex["image"]),  # Pillow encodes: no TF
                    "label": ex["label"],
                    "caption": ex["caption"],
                    "objects": json.dumps(ex["objects"]),
                    "segmentation": ex["segmentation"],
                    "instances": ex["instances"],
                    "edges": ex["edges"],
                    "depth": ex["depth"],
                    "index": i,
                },
            )


def _config_name(image_size: int | None, config: str | None) -> str:
    names = {c.name: c for c in Shapes.BUILDER_CONFIGS}
    if config is None:
        config = str(32 if image_size is None else image_size)
        if config not in names:
            sizes = sorted({c.image_size for c in Shapes.BUILDER_CONFIGS})
            raise ConfigError(f"image_size={image_size} has no shapes config; use one of {sizes}")
    elif config not in names:
        raise ConfigError(f"unknown shapes config {config!r}; expected one of {sorted(names)}")
    if image_size is not None and names[config].image_size != image_size:
        raise ConfigError(
            f"image_size={image_size} contradicts config {config!r} "
            f"(image_size {names[config].image_size}); pass only one of them"
        )
    return config


def shapes_builder(
    *, image_size: int | None = None, config: str | None = None, data_dir: str | None = None
) -> Shapes:
    """The prepared `Shapes` builder, built first if needed (see `shapes_data_source`)."""
    name = _config_name(image_size, config)
    data_dir = os.fspath(data_dir) if data_dir is not None else _default_data_dir()
    builder = Shapes(config=name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    # Processes sharing data_dir (test workers, the hosts of a run) build it once: the first
    # to take the lock builds, the others wait and then find it prepared.
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".shapes_{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = Shapes(config=name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            logging.info("building the embedded shapes dataset at %s", builder.data_path)
            builder.download_and_prepare()
    return builder


def _default_data_dir() -> str:
    # Read at call time (TFDS itself reads TFDS_DATA_DIR once, at import).
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )


def shapes_data_source(
    split: str,
    *,
    image_size: int | None = None,
    config: str | None = None,
    data_dir: str | None = None,
):
    """Random-access source of a split: `len(src)`, `src[i]` -> dict of numpy arrays / bytes.

    split: "train" or "test", TFDS slicing allowed ("train[:10%]").
    image_size / config: config "<image_size>" (default "32") or a named config such as
      "tiny16"; giving both is fine only if they agree.
    data_dir: where to build and read; default $TFDS_DATA_DIR, else ~/tensorflow_datasets.
      The dataset lands in <data_dir>/shapes/<config>/<version>/ and is built on first use
      (the tiny configs take about a second, 10k examples at 32x32 about ten). With several
      processes sharing one data_dir, build once before they start.
    """
    return shapes_builder(image_size=image_size, config=config, data_dir=data_dir).as_data_source(
        split
    )
