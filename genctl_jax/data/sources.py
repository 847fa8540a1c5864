"""Random-access example sources: the embedded shapes set, any prepared TFDS set, image folders.

A source has `__len__`, `__getitem__(i) -> dict` (canonical field names: `image`, `label`,
`caption`, control maps, ...), a `name` and a `fields` frozenset naming what its examples
hold. Sources do no resizing or augmentation; `pipeline.py` does that for every source alike.

Errors: data the config points at that is not there (no such folder, an empty folder, a TFDS
set that is not registered or not prepared, an unknown split) raise `SourceUnavailableError`,
a `DataError`; `pipeline.validate` re-raises those as `ConfigError` naming the config field.
Bad data inside an existing set (an unreadable image, a missing caption) raises `DataError`.

Colour policy (every source, see `array_to_rgb` and `folder.pil_to_rgb`): examples come out
as RGB uint8. Grey-scale is replicated to three channels; 16-bit grey is scaled to 8 bits
(v / 257); an alpha channel is composited on a white background and then dropped. Each kind
of conversion is logged once per source (or iterator) at INFO level.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from genctl_jax.errors import DataError

log = logging.getLogger(__name__)

# Accepted values of `config.data.name`, used in error messages.
NAME_FORMS = "'shapes', 'tfds:NAME[:SPLIT]' or 'folder:PATH'"

# tfds names may carry a version (`mnist:3.0.1`), so the split is what follows it.
_TFDS_NAME = re.compile(r"^tfds:(?P<name>[^:\[\]]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")


class SourceUnavailableError(DataError):
    """The data a name points at does not exist or is not prepared (how to fix is in the text)."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed `config.data.name`: kind ('shapes' | 'tfds' | 'folder'), argument, split."""

    kind: str
    arg: str
    split: str | None


def parse_name(name: str) -> SourceSpec:
    """Parses 'shapes', 'tfds:NAME[:SPLIT]' or 'folder:PATH'; raises DataError otherwise."""
    if not isinstance(name, str):
        raise DataError(f"dataset name {name!r} is not a string; use {NAME_FORMS}")
    if name == "shapes":
        return SourceSpec("shapes", "", None)
    if name.startswith("folder:"):
        path = name[len("folder:") :]
        if not path:
            raise DataError(f"dataset name {name!r} has no path; use 'folder:/path/to/images'")
        return SourceSpec("folder", path, None)
    if name.startswith("tfds:"):
        match = _TFDS_NAME.match(name)
        if not match:
            raise DataError(
                f"dataset name {name!r} is not 'tfds:NAME[:SPLIT]' "
                "(NAME may be 'name/config' or 'name:1.2.3'; e.g. 'tfds:cifar10:train[:90%]')"
            )
        return SourceSpec("tfds", match["name"], match["split"])
    raise DataError(f"unknown dataset name {name!r}; use {NAME_FORMS}")


# ---------------------------------------------------------------------------------------------
# Colour policy
# ---------------------------------------------------------------------------------------------


class ConversionLog:
    """Logs each kind of colour conversion once (thread-safe; one per source or iterator)."""

    def __init__(self, dataset: str):
        self._dataset = dataset
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def note(self, kind: str, how: str, where: str) -> None:
        """Logs `kind` (e.g. 'RGBA') converted by `how` the first time it is seen."""
        with self._lock:
            if kind in self._seen:
                return
            self._seen.add(kind)
        log.info(
            "%s: converting %s image %s to RGB (%s); further %s images are converted silently.",
            self._dataset,
            kind,
            where,
            how,
            kind,
        )


# Spatial maps holding class ids: read as ids, resampled nearest-neighbour, never blended.
LABEL_MAP_FIELDS = frozenset({"segmentation", "mask", "instance", "instances"})
# Spatial maps that must have their image's height and width.
MAP_FIELDS = LABEL_MAP_FIELDS | {"edges", "depth"}

ALPHA_HOW = "alpha composited on a white background, then dropped"


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blends uint8 RGB [H,W,3] over white using uint8 alpha [H,W]; exact integer rounding."""
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def array_to_rgb(image: Any, *, conversions: ConversionLog, where: str) -> np.ndarray:
    """Returns an RGB uint8 [H,W,3] array from grey/grey+alpha/RGB/RGBA uint8 or 16-bit arrays."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4) or min(arr.shape[:2]) < 1:
        raise DataError(
            f"{where}: image has shape {arr.shape}; expected [H, W] or [H, W, C] with C in 1..4"
        )
    if arr.dtype == np.uint16:
        conversions.note("16-bit", "scaled to 8 bits as round(v / 257)", where)
        arr = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise DataError(f"{where}: image has dtype {arr.dtype}; expected uint8 or uint16")
    channels = arr.shape[-1]
    if channels == 3:
        return arr
    if channels == 4:
        conversions.note("RGBA", ALPHA_HOW, where)
        return composite_on_white(arr[..., :3], arr[..., 3])
    grey = np.repeat(arr[..., :1], 3, axis=-1)
    if channels == 1:
        conversions.note("grey-scale", "grey replicated to R, G and B", where)
        return grey
    conversions.note("grey+alpha", "grey replicated to RGB, " + ALPHA_HOW, where)
    return composite_on_white(grey, arr[..., 1])


def to_text(value: Any, *, where: str) -> str:
    """Decodes a str/bytes scalar (numpy or Python) to str."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: text is not valid UTF-8 ({e})") from e
    if isinstance(value, str):
        return value
    raise DataError(f"{where}: expected text, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# In-memory source (tests, small generated sets)
# ---------------------------------------------------------------------------------------------


class InMemorySource:
    """A list of example dicts; useful for tests and tiny generated sets."""

    def __init__(self, examples: Sequence[Mapping[str, Any]], name: str = "memory"):
        if not examples:
            raise SourceUnavailableError(f"{name}: the in-memory source holds no examples")
        self._examples = list(examples)
        self.name = name
        self.fields = frozenset(self._examples[0])

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._examples[index])


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------


def tensorflow_available() -> bool:
    """True when TensorFlow can be imported (it is not a dependency of this project)."""
    return importlib.util.find_spec("tensorflow") is not None


def choose_tfds_reader(
    available_formats: set[str], random_access_formats: set[str], *, tf_available: bool
) -> str:
    """Returns 'data_source' (random access, no TF) or 'load' (tfds.load, needs TF)."""
    if available_formats & random_access_formats:
        return "data_source"
    if tf_available:
        return "load"
    formats = ", ".join(sorted(available_formats)) or "none"
    raise SourceUnavailableError(
        f"the dataset is prepared only as {formats}, which has no random access without "
        f"TensorFlow; re-prepare it with `tfds build NAME --file_format=array_record "
        f"--data_dir=DATA_DIR` (accepted formats: {', '.join(sorted(random_access_formats))})"
    )


def _feature_at(features: Any, path: str) -> Any | None:
    """Walks a '/'-separated path through nested feature dicts; None when absent."""
    node = features
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError, IndexError):
            return None
    return node


class TfdsSource:
    """A prepared TFDS split read by random access, with fields renamed to canonical names."""

    def __init__(
        self,
        name: str,
        *,
        split: str,
        data_dir: str | None = None,
        keys: Mapping[str, str] | None = None,
    ):
        import tensorflow_datasets as tfds  # noqa: PLC0415 - slow import, only when used

        self.name = f"tfds:{name}:{split}"
        prepare = (
            f"prepare it first, e.g. `tfds build {name.split(':')[0]} "
            f"--file_format=array_record --data_dir={data_dir or '~/tensorflow_datasets'}` "
            "on a machine with internet (or copy a prepared copy into data.data_dir)"
        )
        try:
            # Only builds the builder object: never downloads or prepares anything.
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise SourceUnavailableError(
                f"{self.name}: TFDS has no dataset {name!r} (not registered and not found in "
                f"data_dir={data_dir!r}); check the name against tfds.list_builders()"
            ) from e
        except Exception as e:  # config-not-found and friends
            raise SourceUnavailableError(f"{self.name}: cannot open TFDS builder: {e}") from e
        if not builder.is_prepared():
            raise SourceUnavailableError(
                f"{self.name}: TFDS dataset {name!r} is not prepared in {builder.data_dir}; "
                f"{prepare}"
            )
        info = builder.info
        random_access = {f.value for f in tfds.core.file_adapters.FileFormat.with_random_access()}
        available = {f.value for f in info.available_file_formats()}
        try:
            reader = choose_tfds_reader(
                available, random_access, tf_available=tensorflow_available()
            )
        except SourceUnavailableError as e:
            raise SourceUnavailableError(f"{self.name}: {e}".replace("NAME", name)) from None
        try:
            if reader == "data_source":
                self._data = builder.as_data_source(split=split)
            else:
                self._data = _materialise_with_tf(tfds, builder, split)
        except Exception as e:
            splits = ", ".join(sorted(info.splits)) or "none"
            raise SourceUnavailableError(
                f"{self.name}: cannot read split {split!r} ({e}); available splits: {splits}"
            ) from e

        features = info.features
        self._keys = {k: v for k, v in dict(keys or {}).items() if v}
        self._renamed = set(self._keys.values())
        fields = {k for k, path in self._keys.items() if _feature_at(features, path) is not None}
        fields |= {k for k in features if k not in self._renamed}
        self.fields = frozenset(fields)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            raw = self._data[index]
        except Exception as e:  # a decode failure deep in tfds: name the example
            raise DataError(f"{self.name}: cannot read example {index}: {e}") from e
        out = {k: v for k, v in raw.items() if k not in self._renamed}
        for canonical, path in self._keys.items():
            value = _feature_at(raw, path)
            if value is not None:
                out[canonical] = value
        return out


def _materialise_with_tf(tfds: Any, builder: Any, split: str) -> list[dict[str, Any]]:
    """Reads a TFRecord-only split into memory through tf.data (only when TF is installed)."""
    log.warning(
        "%s has no random-access files; reading split %r into memory through tf.data. "
        "Re-prepare it with --file_format=array_record for large sets.",
        builder.name,
        split,
    )
    ds = builder.as_dataset(split=split, shuffle_files=False)
    return list(tfds.as_numpy(ds))


# ---------------------------------------------------------------------------------------------
# Shapes (the embedded procedural set, built by genctl_jax.data.shapes_tfds)
# ---------------------------------------------------------------------------------------------


class ShapesSource:
    """The embedded shapes set through `shapes_tfds.shapes_data_source` (built on first use).

    The stored resolution is the builder config's: `config` when given (e.g. 'tiny16'; the
    pipeline then resizes to its own image_size), else the config named after `image_size`.
    """

    def __init__(
        self,
        *,
        split: str,
        image_size: int,
        config: str | None = None,
        data_dir: str | None = None,
    ):
        self.name = f"shapes:{split}"
        # A named config fixes the stored resolution; only without one does image_size pick it.
        stored_size = image_size if config is None else None
        try:
            from genctl_jax.data import shapes_tfds  # noqa: PLC0415 - optional, heavy
        except ImportError as e:
            raise SourceUnavailableError(
                f"{self.name}: the shapes dataset module genctl_jax.data.shapes_tfds cannot be "
                f"imported ({e})"
            ) from e
        try:
            self._data = shapes_tfds.shapes_data_source(
                split, image_size=stored_size, config=config, data_dir=data_dir
            )
        except DataError:
            raise
        except Exception as e:  # bad config / split (their ConfigError), unreadable files
            hint = "" if config else " (or name a builder config in config.data.shapes_config)"
            raise SourceUnavailableError(
                f"{self.name}: cannot open the shapes dataset (split={split!r}, "
                f"image_size={stored_size}, config={config!r}, data_dir={data_dir!r}): {e}{hint}"
            ) from e
        info = getattr(self._data, "dataset_info", None)
        features = getattr(info, "features", None)
        if features is not None:
            self.fields = frozenset(features)
        else:  # not a tfds source: look at one example
            self.fields = frozenset(self._data[0]) if len(self._data) else frozenset()

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return dict(self._data[index])
        except Exception as e:
            raise DataError(f"{self.name}: cannot read example {index}: {e}") from e


def open_source(
    name: str,
    *,
    split: str,
    image_size: int,
    data_dir: str | None = None,
    tfds_keys: Mapping[str, str] | None = None,
    shapes_config: str | None = None,
    folder_labels: bool = False,
    captions_file: str = "captions.jsonl",
    folder_maps: Mapping[str, str] | None = None,
    folder_suffixes: Mapping[str, str] | None = None,
) -> Any:
    """Opens the source a `config.data.name` points at (split already resolved by the caller)."""
    spec = parse_name(name)
    if spec.kind == "shapes":
        return ShapesSource(
            split=split, image_size=image_size, config=shapes_config, data_dir=data_dir
        )
    if spec.kind == "tfds":
        return TfdsSource(spec.arg, split=split, data_dir=data_dir, keys=tfds_keys)
    from genctl_jax.data.folder import FolderSource  # noqa: PLC0415 - avoids an import cycle

    return FolderSource(
        spec.arg,
        split=split,
        labels=folder_labels,
        captions_file=captions_file,
        maps=dict(folder_maps or {}),
        suffixes=dict(folder_suffixes or {}),
    )
