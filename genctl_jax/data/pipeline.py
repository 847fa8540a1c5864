"""The input pipeline: one global example order, host slices, transforms, global arrays.

Order. Epoch e visits the N examples of the split in a permutation drawn from (seed, e)
(grain's `index_shuffle`, O(1) memory), or in index order when `shuffle=False`. The epoch
is cut into `N // batch_size` global batches; the last partial global batch is dropped
(those examples are seen in other epochs, in other positions). Global batches of successive
epochs form one stream; global batch k is fixed by (seed, k) alone.

Host slices. Process p of P reads the contiguous slice `[p * B/P, (p + 1) * B/P)` of every
global batch, so the concatenation of the P local batches is exactly the global batch of a
one-process run, and over an epoch the processes read disjoint examples.

Randomness. Augmentations (crop, flip, choice among several captions) of the example at
global stream position g (= k * B + offset in the batch) draw from a generator seeded by
(seed, g): independent of process count, thread count and timing.

Transforms. Decode -> RGB (sources.py colour policy) -> resize the shorter side to
`image_size` (bicubic) and centre-crop, or, with `random_crop=(lo, hi)`, a square crop whose
area is a fraction U(lo, hi) of the largest square that fits, at a uniformly random position,
resized to `image_size` (squares, so nothing is stretched) -> optional random horizontal
flip -> float32 in [-1, 1].
Other fields of the example:
- `label`: int32 scalar.
- text (`caption`, `objects`, `file`, ...): Python str; a batch holds an object array of them.
  A list of captions (e.g. coco_captions) yields one, chosen by the position's generator.
- spatial maps (arrays with the image's height and width, e.g. `segmentation`, `edges`,
  `depth`): cropped, resized and flipped exactly as the image. Fields in
  `sources.LABEL_MAP_FIELDS` use nearest-neighbour resampling and keep integer values
  (int32); others are resized bilinearly and come out float32, uint8 maps scaled to [0, 1].
  A field of `sources.MAP_FIELDS` whose height and width differ from the image's is a
  DataError (a mismatched pair).
- `index`: int32, the example's index in the split (always available, replacing a source
  field of that name; for debugging and tests).
- anything else: passed through as a numpy array.

Checkpointing. `get_state()` is {"version": 1, "global_batches": k, "fingerprint": {name,
split, num_examples, seed, global_batch_size, shuffle}}, JSON-serialisable; `set_state`
resumes at global batch k with any process count, and raises CheckpointError naming each
fingerprint entry that differs.

Errors. `validate` / `create_iterator` raise ConfigError for anything the config gets wrong,
including data it points at that is not there (missing or empty folder, unregistered or
unprepared TFDS set, unknown split). Bad data inside an existing set raises DataError (an
unreadable image names its file; a captions.jsonl without an entry for some image lists them).
Split: the `split` argument of create_iterator > a ':SPLIT' in `name` > `config.data.split`.
For 'shapes', validation builds the dataset into data_dir on first use (seconds; it is
generated locally), as reading it would.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from grain.experimental import index_shuffle
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections.config_dict import placeholder
from PIL import Image

from genctl_jax.data import sources
from genctl_jax.errors import CheckpointError, ConfigError, DataError

STATE_VERSION = 1
# Distinct streams of the root seed, so data order and augmentation are independent.
_SHUFFLE_STREAM = 0x5EED_0001
_AUGMENT_STREAM = 0x5EED_0002
_SEED_MOD = 2**64  # SeedSequence wants non-negative entropy


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` block with its defaults (one documented line per field)."""
    c = ml_collections.ConfigDict()
    c.name = "shapes"  # 'shapes' | 'tfds:NAME[:SPLIT]' (NAME as tfds.builder reads) | 'folder:PATH'
    c.split = "train"  # Split read when create_iterator gets no split; a ':SPLIT' in name wins.
    c.image_size = 32  # Output height = width in pixels.
    c.batch_size = 64  # Global batch size over all processes; must divide by the process count.
    c.shuffle = True  # Shuffle the example order, reshuffled every epoch (False: index order).
    c.num_epochs = placeholder(int)  # Epochs to read before StopIteration; None reads forever.
    c.random_flip = False  # Mirror image and maps left-right with probability 1/2.
    c.random_crop = placeholder(
        tuple
    )  # None: centre crop; (lo, hi): random square crop, area fraction U(lo,hi).
    c.fields = ("image", "label")  # Fields kept in each batch (see the module docstring).
    # TFDS feature path ('/' for nesting, '' = absent) of each canonical field; add keys freely.
    c.tfds_keys = ml_collections.ConfigDict({"image": "image", "label": "label", "caption": ""})
    c.data_dir = placeholder(
        str
    )  # TFDS data dir ('tfds:', 'shapes'); None: $TFDS_DATA_DIR or TFDS's default.
    c.shapes_config = placeholder(str)  # Builder config of the shapes dataset; None: its default.
    c.folder_labels = False  # 'folder:': label = index of the top-level sub-folder (sorted names).
    c.captions_file = "captions.jsonl"  # 'folder:': captions file in the folder, used if present.
    # 'folder:': field -> folder of per-image maps paired by relative path (data/folder.py).
    c.folder_maps = ml_collections.ConfigDict()
    # 'folder:': 'image' or map field -> file-stem ending dropped when pairing (Cityscapes).
    c.folder_suffixes = ml_collections.ConfigDict()
    c.worker_threads = 8  # Threads reading and transforming examples (0: in the calling thread).
    c.prefetch = 2  # Local batches read ahead of the consumer.
    return c


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _resolve_split(cfg: Any, split: str | None) -> str:
    """Explicit argument > ':SPLIT' in the name > data.split."""
    if split is not None:
        return split
    try:
        spec = sources.parse_name(cfg.name)
    except DataError:
        spec = None
    return (spec.split if spec is not None else None) or cfg.split


def _check_fields(cfg: Any, process_count: int) -> None:
    """Cheap checks of every field that needs no data."""
    try:
        sources.parse_name(cfg.name)
    except DataError as e:
        raise ConfigError(f"config.data.name={cfg.name!r}: {e}") from None
    if not isinstance(cfg.split, str) or not cfg.split:
        raise ConfigError(f"config.data.split={cfg.split!r}: expected a split name like 'train'")
    if not _is_int(cfg.image_size) or not 1 <= cfg.image_size <= 16384:
        raise ConfigError(
            f"config.data.image_size={cfg.image_size!r}: expected an integer in [1, 16384]"
        )
    if not _is_int(process_count) or process_count < 1:
        raise ConfigError(f"process_count={process_count!r}: expected an integer >= 1")
    if not _is_int(cfg.batch_size) or cfg.batch_size < 1:
        raise ConfigError(f"config.data.batch_size={cfg.batch_size!r}: expected an integer >= 1")
    if cfg.batch_size % process_count:
        raise ConfigError(
            f"config.data.batch_size={cfg.batch_size} is not divisible by the process count "
            f"{process_count}; use a multiple of {process_count}"
        )
    for name in ("shuffle", "random_flip", "folder_labels"):
        if not isinstance(cfg[name], bool):
            raise ConfigError(f"config.data.{name}={cfg[name]!r}: expected True or False")
    if cfg.num_epochs is not None and (not _is_int(cfg.num_epochs) or cfg.num_epochs < 1):
        raise ConfigError(
            f"config.data.num_epochs={cfg.num_epochs!r}: expected None (forever) or an integer >= 1"
        )
    crop = cfg.random_crop
    if crop is not None:
        ok = isinstance(crop, Sequence) and not isinstance(crop, str) and len(crop) == 2
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in crop)
        if not ok or not 0 < crop[0] <= crop[1] <= 1:
            raise ConfigError(
                f"config.data.random_crop={crop!r}: expected None (centre crop) or "
                "(lo, hi) area fractions with 0 < lo <= hi <= 1, e.g. (0.5, 1.0)"
            )
    fields = cfg.fields
    if (
        isinstance(fields, str)
        or not isinstance(fields, Sequence)
        or not fields
        or not all(isinstance(f, str) and f for f in fields)
        or len(set(fields)) != len(fields)
    ):
        raise ConfigError(
            f"config.data.fields={fields!r}: expected a non-empty tuple of distinct field names, "
            "e.g. ('image', 'label')"
        )
    keys = cfg.tfds_keys
    keys = dict(keys.items()) if hasattr(keys, "items") else keys  # ConfigDict is no Mapping
    if not isinstance(keys, Mapping) or not all(isinstance(v, str) for v in keys.values()):
        raise ConfigError(
            f"config.data.tfds_keys={keys!r}: expected a mapping of field name -> TFDS feature "
            "path ('' when absent)"
        )
    for name in ("data_dir", "shapes_config"):
        if cfg[name] is not None and not isinstance(cfg[name], str):
            raise ConfigError(f"config.data.{name}={cfg[name]!r}: expected None or a string")
    if not isinstance(cfg.captions_file, str):
        raise ConfigError(f"config.data.captions_file={cfg.captions_file!r}: expected a file name")
    maps, suffixes = _folder_pairing(cfg)
    if (maps or suffixes) and not cfg.name.startswith("folder:"):
        raise ConfigError(
            f"config.data.folder_maps / folder_suffixes pair maps with a 'folder:' dataset, but "
            f"config.data.name={cfg.name!r}; clear them"
        )
    for field, folder in maps.items():
        if field in _NOT_MAPS or not isinstance(folder, str) or not folder:
            raise ConfigError(
                f"config.data.folder_maps.{field}={folder!r}: expected a map field (not one of "
                f"{', '.join(sorted(_NOT_MAPS))}) -> the folder of its maps"
            )
    for key, suffix in suffixes.items():
        if (key != "image" and key not in maps) or not isinstance(suffix, str):
            raise ConfigError(
                f"config.data.folder_suffixes.{key}={suffix!r}: expected 'image' or a field of "
                f"config.data.folder_maps ({', '.join(maps) or 'none'}) -> a file-stem ending"
            )
    for name in ("worker_threads", "prefetch"):
        if not _is_int(cfg[name]) or cfg[name] < 0:
            raise ConfigError(f"config.data.{name}={cfg[name]!r}: expected an integer >= 0")


# Fields a folder provides itself, never as paired maps.
_NOT_MAPS = frozenset({"image", "label", "caption", "file", "index"})


def _folder_pairing(cfg: Any) -> tuple[dict, dict]:
    """(folder_maps, folder_suffixes) as dicts; configs written before they existed lack them."""
    return tuple(dict(cfg.get(name, {}).items()) for name in ("folder_maps", "folder_suffixes"))


def _open_checked(cfg: Any, split: str, process_count: int) -> Any:
    """Validates `cfg` and opens its source: ConfigError for anything the config gets wrong."""
    _check_fields(cfg, process_count)
    maps, suffixes = _folder_pairing(cfg)
    try:
        source = sources.open_source(
            cfg.name,
            split=split,
            image_size=int(cfg.image_size),
            data_dir=cfg.data_dir,
            tfds_keys=dict(cfg.tfds_keys.items()),
            shapes_config=cfg.shapes_config,
            folder_labels=cfg.folder_labels,
            captions_file=cfg.captions_file,
            folder_maps=maps,
            folder_suffixes=suffixes,
        )
    except sources.SourceUnavailableError as e:
        raise ConfigError(f"config.data.name={cfg.name!r} (split {split!r}): {e}") from e
    provided = set(source.fields) | {"index"}
    for field in cfg.fields:
        if field not in provided:
            hint = ""
            if field == "label" and cfg.name.startswith("folder:"):
                hint = "; set config.data.folder_labels=True to label images by sub-folder"
            elif field == "caption" and cfg.name.startswith("folder:"):
                hint = f"; add {cfg.captions_file} to the folder"
            elif cfg.name.startswith("folder:"):
                hint = f"; pair a folder of maps with config.data.folder_maps.{field}=PATH"
            elif cfg.name.startswith("tfds:"):
                hint = "; map it to a TFDS feature in config.data.tfds_keys"
            raise ConfigError(
                f"config.data.fields: {field!r} is not provided by {source.name} "
                f"(it provides: {', '.join(sorted(provided))}){hint}"
            )
    if len(source) < cfg.batch_size:
        raise ConfigError(
            f"config.data.batch_size={cfg.batch_size} exceeds the {len(source)} examples of "
            f"{source.name}; a global batch must fit in one epoch"
        )
    return source


def validate(data_config: Any, *, process_count: int = 1) -> None:
    """Checks `config.data`; raises ConfigError naming the field, the value and what works."""
    _open_checked(data_config, _resolve_split(data_config, None), process_count)


# ---------------------------------------------------------------------------------------------
# Per-example transform
# ---------------------------------------------------------------------------------------------


def _plan_geometry(h: int, w: int, size: int, crop: Any, rng: np.random.Generator) -> tuple:
    """Returns the resize/crop plan shared by the image and its spatial maps."""
    if crop is None:
        # Shorter side to `size`, then the centred size x size window.
        if w <= h:
            new_w, new_h = size, max(size, round(h * size / w))
        else:
            new_w, new_h = max(size, round(w * size / h)), size
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return ("short", (new_w, new_h), (left, top, left + size, top + size))
    side = math.sqrt(rng.uniform(crop[0], crop[1])) * min(h, w)
    x0 = rng.uniform(0.0, w - side)
    y0 = rng.uniform(0.0, h - side)
    return ("box", (x0, y0, x0 + side, y0 + side))


def _apply_geometry(img: Image.Image, plan: tuple, size: int, resample: int) -> Image.Image:
    if plan[0] == "short":
        _, new_size, window = plan
        if img.size != new_size:
            img = img.resize(new_size, resample=resample)
        return img.crop(window) if img.size != (size, size) else img
    return img.resize((size, size), resample=resample, box=plan[1])


def _resize_map(value: np.ndarray, plan: tuple, size: int, nearest: bool) -> np.ndarray:
    """Applies the image's crop/resize to a [H, W] or [H, W, C] map, channel by channel."""
    squeeze = value.ndim == 2
    arr = value[..., None] if squeeze else value
    resample = Image.NEAREST if nearest else Image.BILINEAR
    channels = []
    for c in range(arr.shape[-1]):
        # Mode F (float32) keeps any integer id < 2**24 exact under nearest sampling.
        img = Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32), mode="F")
        channels.append(np.asarray(_apply_geometry(img, plan, size, resample)))
    out = np.stack(channels, axis=-1)
    if squeeze:
        out = out[..., 0]
    if nearest and value.dtype.kind in "iub":
        return out.astype(np.int32)
    if value.dtype == np.uint8:
        return (out / 255.0).astype(np.float32)
    return out.astype(np.float32)


class _Transform:
    """Turns one source example into the output fields (see the module docstring)."""

    def __init__(self, cfg: Any, source_name: str):
        self.size = int(cfg.image_size)
        self.crop = None if cfg.random_crop is None else tuple(float(v) for v in cfg.random_crop)
        self.flip = bool(cfg.random_flip)
        self.fields = tuple(cfg.fields)
        self.source_name = source_name
        self.conversions = sources.ConversionLog(source_name)

    def __call__(self, example: Mapping[str, Any], index: int, rng: np.random.Generator) -> dict:
        where = f"{self.source_name} example {index}"
        if "image" not in example:
            raise DataError(f"{where}: has no 'image' (fields: {', '.join(sorted(example))})")
        rgb = sources.array_to_rgb(example["image"], conversions=self.conversions, where=where)
        h, w = rgb.shape[:2]
        plan = _plan_geometry(h, w, self.size, self.crop, rng)
        flip = self.flip and rng.random() < 0.5
        out: dict[str, Any] = {}
        spatial = []  # fields that follow the image's geometry (and flip)
        for field in self.fields:
            if field == "index":
                out[field] = np.int32(index)
                continue
            if field not in example:
                raise DataError(f"{where}: has no field {field!r}")
            value = example[field]
            if field == "image":
                img = _apply_geometry(Image.fromarray(rgb), plan, self.size, Image.BICUBIC)
                arr = np.asarray(img, dtype=np.float32)
                out[field] = arr / np.float32(127.5) - np.float32(1.0)
                spatial.append(field)
            elif field == "label":
                label = np.asarray(value)
                if label.size != 1 or label.dtype.kind not in "iub":
                    raise DataError(f"{where}: label {value!r} is not one integer")
                out[field] = np.int32(label.item())
            elif isinstance(value, str | bytes) or (
                isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "SUO"
            ):
                out[field] = sources.to_text(value, where=f"{where} field {field!r}")
            elif isinstance(value, list | tuple) or (
                isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "SUO"
            ):
                # Several texts (e.g. coco_captions): one per visit, chosen by position.
                if len(value) == 0:
                    raise DataError(f"{where}: field {field!r} holds no text")
                pick = value[int(rng.integers(len(value)))]
                out[field] = sources.to_text(pick, where=f"{where} field {field!r}")
            else:
                arr = np.asarray(value)
                if field in sources.MAP_FIELDS and arr.shape[:2] != (h, w):
                    raise DataError(
                        f"{where}: its {field!r} map is {'x'.join(map(str, arr.shape[:2]))} "
                        f"(height x width) but its image is {h}x{w}; a map must have its "
                        f"image's size"
                    )
                if arr.ndim >= 2 and arr.shape[:2] == (h, w):
                    nearest = field in sources.LABEL_MAP_FIELDS
                    arr = _resize_map(arr, plan, self.size, nearest=nearest)
                    spatial.append(field)
                out[field] = arr
        if flip:
            for field in spatial:
                out[field] = np.ascontiguousarray(out[field][:, ::-1])
        return out


def _stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Batches examples: numeric fields stacked, text fields as an object array of str."""
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if isinstance(values[0], str):
            batch[key] = np.array(values, dtype=object)
            continue
        try:
            batch[key] = np.stack(values)
        except ValueError as e:
            shapes = sorted({np.shape(v) for v in values})
            raise DataError(
                f"field {key!r} has different shapes across examples ({shapes[:4]}); "
                "remove it from config.data.fields"
            ) from e
    return batch


# ---------------------------------------------------------------------------------------------
# The iterator
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit shuffle seed per (seed, epoch), unrelated between neighbouring seeds."""
    entropy = [seed % _SEED_MOD, epoch, _SHUFFLE_STREAM]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class DataIterator:
    """Host-local batches of one global, checkpointable example stream (module docstring)."""

    def __init__(
        self,
        source: Any,
        data_config: Any,
        *,
        seed: int,
        split: str,
        process_index: int,
        process_count: int,
    ):
        cfg = data_config
        self.source = source
        self.seed = int(seed)
        self.split = split
        self.process_index = process_index
        self.process_count = process_count
        self.global_batch_size = int(cfg.batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.num_examples = len(source)
        self.steps_per_epoch = self.num_examples // self.global_batch_size
        if self.steps_per_epoch < 1 or self.global_batch_size % process_count:
            raise ConfigError(
                f"config.data.batch_size={self.global_batch_size} must be at most the "
                f"{self.num_examples} examples of {source.name} and a multiple of the "
                f"process count {process_count}"
            )
        self.num_epochs = cfg.num_epochs
        self.shuffle = bool(cfg.shuffle)
        self._threads = int(cfg.worker_threads)
        self._prefetch = int(cfg.prefetch)
        self._transform = _Transform(cfg, source.name)
        self._fingerprint = {
            "name": str(source.name),
            "split": split,
            "num_examples": self.num_examples,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
        }
        self._step = 0
        self._it = None

    # -- order ------------------------------------------------------------------------------

    def example_index(self, global_position: int) -> int:
        """The split index of the example at a global stream position (any process)."""
        step, offset = divmod(global_position, self.global_batch_size)
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        position = in_epoch * self.global_batch_size + offset
        if not self.shuffle:
            return position
        seed = _epoch_seed(self.seed, epoch)
        return int(index_shuffle(position, max_index=self.num_examples - 1, seed=seed, rounds=4))

    def _element(self, local_position: int) -> dict:
        step, offset = divmod(local_position, self.local_batch_size)
        g = step * self.global_batch_size + self.process_index * self.local_batch_size + offset
        index = self.example_index(g)
        rng = np.random.default_rng([self.seed % _SEED_MOD, g, _AUGMENT_STREAM])
        return self._transform(self.source[index], index, rng)

    def _make(self, start_step: int):
        bl = self.local_batch_size
        if self.num_epochs is None:
            stop = sys.maxsize
        else:
            stop = self.num_epochs * self.steps_per_epoch * bl
        start = min(start_step * bl, stop)
        options = grain.ReadOptions(
            num_threads=self._threads,
            prefetch_buffer_size=max(self._threads, self._prefetch * bl),
        )
        ds = grain.MapDataset.range(start, stop).map(self._element)
        ds = ds.to_iter_dataset(options).batch(bl, drop_remainder=True, batch_fn=_stack)
        return iter(ds)

    # -- iterator protocol ------------------------------------------------------------------

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make(self._step)
        batch = next(self._it)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """Global batches handed out so far (the position `get_state` records)."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._step // self.steps_per_epoch

    def close(self) -> None:
        """Stops the reader threads (they are restarted on the next `__next__`)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    # -- checkpointing ----------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable position: global batches consumed plus the order fingerprint."""
        return {
            "version": STATE_VERSION,
            "global_batches": self._step,
            "fingerprint": dict(self._fingerprint),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resumes at the batch after the saved position (any process count)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, Mapping) else None
            raise CheckpointError(
                f"data iterator state has version {version!r}; this code reads version "
                f"{STATE_VERSION} ({{'version', 'global_batches', 'fingerprint'}})"
            )
        step = state.get("global_batches")
        if not _is_int(step) or step < 0:
            raise CheckpointError(f"data iterator state global_batches={step!r}: expected >= 0")
        saved = dict(state.get("fingerprint") or {})
        diffs = [
            f"{k}: saved {saved.get(k)!r}, now {v!r}"
            for k, v in self._fingerprint.items()
            if saved.get(k) != v
        ]
        if diffs:
            raise CheckpointError(
                "data iterator state belongs to another data order (" + "; ".join(diffs) + "); "
                "restore with the data config and seed it was saved with, or start the data "
                "stream afresh"
            )
        self.close()
        self._step = int(step)


def create_iterator(
    data_config: Any,
    *,
    seed: int,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Validates `config.data` and returns this process's iterator over its batch slices."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not _is_int(seed):
        raise ConfigError(f"seed={seed!r}: expected an integer")
    if not _is_int(process_index) or not 0 <= process_index < max(int(process_count), 1):
        raise ConfigError(
            f"process_index={process_index!r}: expected 0 <= index < process_count={process_count}"
        )
    split = _resolve_split(data_config, split)
    source = _open_checked(data_config, split, process_count)
    return DataIterator(
        source,
        data_config,
        seed=seed,
        split=split,
        process_index=int(process_index),
        process_count=int(process_count),
    )


# ---------------------------------------------------------------------------------------------
# Global arrays
# ---------------------------------------------------------------------------------------------


def to_global(
    batch: Mapping[str, np.ndarray],
    mesh: Mesh,
    batch_axes: str | Sequence[str] = ("data", "fsdp"),
) -> dict[str, jax.Array]:
    """Host-local batch -> global jax.Arrays split over `batch_axes`; text fields are left out.

    Text fields (object/str arrays such as `caption`) are not returned: read them from the
    host-local batch, whose rows are this process's rows of the global batch, in order.
    """
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ConfigError(
            f"batch_axes={axes!r}: mesh has no axis {unknown[0]!r} (axes: {tuple(mesh.shape)})"
        )
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    shards = math.prod(mesh.shape[a] for a in axes)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OSU":
            continue
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % shards:
            raise ConfigError(
                f"config.data.batch_size={global_rows} is not divisible by the {shards} batch "
                f"shards of mesh axes {axes} ({dict(mesh.shape)})"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
