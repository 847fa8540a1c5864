"""A local folder of images as a random-access source: optional captions, labels, paired maps.

Layout and rules:
- Images are found recursively under the folder: files whose extension (any case) is one of
  .jpg .jpeg .png .webp .bmp. Hidden files and folders (names starting with '.') are skipped.
  Order is the sorted list of relative POSIX paths, so it is the same on every host.
- Class labels (`labels=True`): the label of `cat/x.png` is the index of `cat` in the sorted
  list of top-level sub-folder names (`class_names`); images directly in the root are an error.
- Captions: if `<folder>/<captions_file>` (default `captions.jsonl`) exists, each non-empty
  line is a JSON object `{"file": "relative/path.png", "caption": "text"}` where `file` is the
  POSIX path relative to the folder. Every image must have exactly one caption, else
  `DataError` lists the first few images without one. Entries naming files that are not
  images in the folder are logged and ignored.
- Decoding applies the EXIF orientation, then the colour policy of `pil_to_rgb` (grey
  replicated, 16-bit grey scaled by 1/257, alpha composited on white, palettes expanded).
  An unreadable or truncated file raises `DataError` naming the file.
- Paired maps (`maps={field: folder}`, e.g. {"segmentation": "../labels"}; a relative folder
  is taken from the image folder): each image pairs with the file of the map folder that has
  the same relative path apart from the extension (`city/x.jpg` <- `city/x.png`). With
  `suffixes={"image": "_leftImg8bit", field: "_gtFine_labelIds"}` those endings of the file
  stems are dropped before pairing (the Cityscapes layout), and map files whose stem lacks its
  suffix are ignored (`_color.png`, `_instanceIds.png` beside the label ids). Every image must
  have its map, else `DataError` lists the first few without one. A label map
  (`sources.LABEL_MAP_FIELDS`: `segmentation`, `mask`, ...) is read as one class id per pixel
  (PNG modes L, P, I;16 or I: palette indices are ids, never colours); other maps (`edges`,
  `depth`) as grey uint8, 16-bit ones as float32 values. A map whose size differs from its
  image's raises `DataError` naming both files and both sizes.
- A folder has a single split, 'train'.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from genctl_jax.data.sources import (
    ALPHA_HOW,
    LABEL_MAP_FIELDS,
    ConversionLog,
    SourceUnavailableError,
    composite_on_white,
)
from genctl_jax.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
FOLDER_SPLITS = ("train",)
_SHOW = 5  # how many offending files an error message lists


def list_images(root: str | os.PathLike) -> list[str]:
    """Sorted relative POSIX paths of the images under `root` (recursive, hidden skipped)."""
    root = pathlib.Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = pathlib.Path(dirpath).relative_to(root)
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / f).as_posix())
    return sorted(found)


def check_folder(path: str | os.PathLike) -> list[str]:
    """Lists the images of a folder; raises SourceUnavailableError if missing or empty."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise SourceUnavailableError(f"folder {str(path)!r} does not exist")
    if not p.is_dir():
        raise SourceUnavailableError(f"{str(path)!r} is not a folder")
    files = list_images(p)
    if not files:
        raise SourceUnavailableError(
            f"empty folder {str(path)!r}: no image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) found under it"
        )
    return files


def _listed(files: list[str]) -> str:
    return ", ".join(files[:_SHOW]) + (", ..." if len(files) > _SHOW else "")


def read_captions(path: pathlib.Path, files: list[str]) -> list[str]:
    """Reads `captions.jsonl` and returns one caption per file of `files`, in that order."""
    by_file: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from e
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("file"), str)
                and isinstance(entry.get("caption"), str)
            ):
                raise DataError(
                    f'{where}: expected {{"file": "relative/path.png", "caption": "text"}}, '
                    f"got {line.strip()[:120]}"
                )
            name = pathlib.PurePosixPath(entry["file"]).as_posix()
            if name in by_file:
                raise DataError(f"{where}: second caption for {name!r}")
            by_file[name] = entry["caption"]
    missing = [f for f in files if f not in by_file]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of {len(files)} images have no caption: {_listed(missing)}; "
            'add a line {"file": "<relative path>", "caption": "..."} for each'
        )
    extra = len(by_file) - len(files)
    if extra:
        log.warning("%s: %d captions name files that are not images here; ignored", path, extra)
    return [by_file[f] for f in files]


def pil_to_rgb(img: Image.Image, *, conversions: ConversionLog, where: str) -> np.ndarray:
    """Returns an RGB uint8 [H,W,3] array from a PIL image in any common mode."""
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if mode == "RGB" and not has_alpha:
        return np.asarray(img)
    if mode.startswith("I"):  # I;16*, I: 16-bit grey (how PNG loads); assumes a 0..65535 range
        conversions.note(mode, "16-bit grey scaled to 8 bits as round(v / 257), replicated", where)
        grey = np.asarray(img).astype(np.float32)
        grey = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        raise DataError(f"{where}: floating-point images (mode F) are not supported")
    if has_alpha:
        conversions.note(mode, ALPHA_HOW, where)
        rgba = np.asarray(img.convert("RGBA"))
        return composite_on_white(rgba[..., :3], rgba[..., 3])
    how = "grey replicated to R, G and B" if mode in ("L", "1") else "converted by PIL"
    conversions.note(mode, how, where)
    return np.asarray(img.convert("RGB"))


def decode_image_file(path: str | os.PathLike, *, conversions: ConversionLog) -> np.ndarray:
    """Reads an image file as RGB uint8; any decode failure raises DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here
            img = ImageOps.exif_transpose(img)
            return pil_to_rgb(img, conversions=conversions, where=str(path))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image file {str(path)!r}: {e}") from e


def decode_map_file(
    path: str | os.PathLike, *, label: bool, conversions: ConversionLog
) -> np.ndarray:
    """Reads a paired map: class ids ([H, W], uint8 or int32) if `label`, else grey [H, W]."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode.startswith("I"):  # 16/32-bit: ids, or raw values (depth) kept as floats
                arr = np.asarray(img)
                return arr.astype(np.int32) if label else arr.astype(np.float32)
            if label:
                if mode in ("L", "P", "1"):  # a P image's pixels are palette indices: the ids
                    return np.asarray(img).astype(np.uint8)
                raise DataError(
                    f"label map {str(path)!r} has PIL mode {mode}; a label map stores one class "
                    f"id per pixel (PNG modes L, P or I;16): convert its colours to ids first"
                )
            if mode == "L":
                return np.asarray(img)
            conversions.note(mode, "converted to one grey channel by PIL", str(path))
            return np.asarray(img.convert("L"))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read map file {str(path)!r}: {e}") from e


def _pair_key(rel: str, suffix: str) -> str | None:
    """`rel` without its extension and `suffix` (the stem's ending); None if it lacks `suffix`."""
    stem = os.path.splitext(rel)[0]
    if not suffix:
        return stem
    return stem[: -len(suffix)] if stem.endswith(suffix) else None


class FolderSource:
    """Images under a folder (see the module docstring for the layout and rules)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str = "train",
        labels: bool = False,
        captions_file: str = "captions.jsonl",
        maps: dict[str, str] | None = None,
        suffixes: dict[str, str] | None = None,
    ):
        self.root = pathlib.Path(path).expanduser()
        self.name = f"folder:{path}"
        if split not in FOLDER_SPLITS:
            raise SourceUnavailableError(
                f"{self.name}: a folder has the single split 'train', not {split!r}"
            )
        self.files = check_folder(self.root)
        self._conversions = ConversionLog(self.name)
        fields = {"image", "file"}

        self.class_names: list[str] = []
        self._labels: list[int] | None = None
        if labels:
            at_root = [f for f in self.files if "/" not in f]
            if at_root:
                raise DataError(
                    f"{self.name}: class labels come from sub-folder names, but "
                    f"{len(at_root)} images lie directly in the folder: "
                    f"{', '.join(at_root[:_SHOW])}"
                )
            tops = [f.split("/", 1)[0] for f in self.files]
            self.class_names = sorted(set(tops))
            index = {c: i for i, c in enumerate(self.class_names)}
            self._labels = [index[t] for t in tops]
            fields.add("label")

        self._captions: list[str] | None = None
        captions_path = self.root / captions_file
        if captions_file and captions_path.is_file():
            self._captions = read_captions(captions_path, self.files)
            fields.add("caption")

        # field -> the map file of each image, in `self.files` order.
        self._maps = self._pair_maps(maps or {}, suffixes or {})
        fields.update(self._maps)
        self.fields = frozenset(fields)

    def _pair_maps(self, maps: dict[str, str], suffixes: dict[str, str]) -> dict:
        if not maps:
            return {}
        image_suffix = suffixes.get("image", "")
        keys = [_pair_key(f, image_suffix) for f in self.files]
        lacking = [f for f, key in zip(self.files, keys, strict=True) if key is None]
        if lacking:
            raise DataError(
                f"{self.name}: {len(lacking)} of {len(self.files)} images do not end in the "
                f"stem suffix {image_suffix!r} (config.data.folder_suffixes.image) that pairing "
                f"drops: {_listed(lacking)}"
            )
        paired = {}
        for field, folder in maps.items():
            folder = pathlib.Path(folder).expanduser()
            folder = (folder if folder.is_absolute() else self.root / folder).resolve()
            if folder.is_relative_to(self.root.resolve()):
                raise SourceUnavailableError(
                    f"the {field!r} maps' folder {str(folder)!r} lies inside the image folder, "
                    f"so its files would be read as images too; put it beside the image folder"
                )
            suffix = suffixes.get(field, "")
            by_key: dict[str, str] = {}
            for rel in check_folder(folder):
                key = _pair_key(rel, suffix)
                if key is None:
                    continue  # another kind of file beside the maps (e.g. Cityscapes' _color)
                if key in by_key:
                    raise DataError(
                        f"{folder}: {by_key[key]} and {rel} both pair with the same image; keep one"
                    )
                by_key[key] = rel
            missing = [f for f, key in zip(self.files, keys, strict=True) if key not in by_key]
            if missing:
                raise DataError(
                    f"{self.name}: {len(missing)} of {len(self.files)} images have no {field!r} "
                    f"map in {folder}: {_listed(missing)}; each needs a file with the same "
                    f"relative path and stem (after config.data.folder_suffixes) and an image "
                    f"extension"
                )
            paired[field] = [folder / by_key[key] for key in keys]
        return paired

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rel = self.files[index]
        out: dict[str, Any] = {
            "image": decode_image_file(self.root / rel, conversions=self._conversions),
            "file": rel,
        }
        if self._labels is not None:
            out["label"] = self._labels[index]
        if self._captions is not None:
            out["caption"] = self._captions[index]
        for field, files in self._maps.items():
            value = decode_map_file(
                files[index], label=field in LABEL_MAP_FIELDS, conversions=self._conversions
            )
            if value.shape[:2] != out["image"].shape[:2]:
                (h, w), (mh, mw) = out["image"].shape[:2], value.shape[:2]
                raise DataError(
                    f"mismatched pair: {field} map {str(files[index])!r} is {mw}x{mh} pixels "
                    f"but its image {str(self.root / rel)!r} is {w}x{h}; a map must have its "
                    f"image's size"
                )
            out[field] = value
        return out
