"""Weights from PyTorch-format checkpoints (Hugging Face `transformers` / `diffusers` layouts).

Only safetensors are read, never pickles. A converter lists one `Tensor` per Flax
parameter: its path in the Flax tree, its key in the checkpoint and how the layout
differs (`linear`: PyTorch [out, in] vs Flax [in..., out...]; `conv`: OIHW vs HWIO;
`vector`: 1-D in the checkpoint, any shape in Flax, e.g. a per-head bias; `same`: equal).
`import_params` reads each tensor lazily from a memory-mapped file and, given shardings,
places it straight into its shards, so a model larger than one device (a frozen T5-XXL)
is never gathered on one device; `export_params` inverts it, and `save_checkpoint` writes
the Hugging Face layout back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from absl import logging

from genctl_jax import configlib
from genctl_jax.errors import CheckpointError
from genctl_jax.parallel import sharding

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
KINDS = ("linear", "conv", "vector", "same")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Flax parameter and the checkpoint tensor it comes from."""

    flax: tuple[str, ...]  # Path in the Flax `params` tree.
    hf: str | tuple[str, ...]  # Checkpoint key; with several, the first one present is read.
    kind: str = "same"  # One of KINDS (see the module docstring).
    num_in_axes: int = 1  # For `linear`: leading Flax dims that are the input features.

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Tensor kind {self.kind!r} is not one of {KINDS}")

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else self.hf

    def hf_shape(self, flax_shape: Sequence[int]) -> tuple[int, ...]:
        """The checkpoint shape that this Flax shape corresponds to (up to `same` reshapes)."""
        if self.kind == "linear":
            n = self.num_in_axes
            return (math.prod(flax_shape[n:]), math.prod(flax_shape[:n]))
        if self.kind == "conv":
            kh, kw, cin, cout = flax_shape
            return (cout, cin, kh, kw)
        if self.kind == "vector":
            return (math.prod(flax_shape),)
        return tuple(flax_shape)

    def to_flax(self, value: np.ndarray, flax_shape: Sequence[int]) -> np.ndarray:
        if self.kind == "linear":
            return value.T.reshape(flax_shape)
        if self.kind == "conv":
            return value.transpose(2, 3, 1, 0)
        return value.reshape(flax_shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            n = self.num_in_axes
            flat = value.reshape(math.prod(value.shape[:n]), math.prod(value.shape[n:]))
            return np.ascontiguousarray(flat.T)
        if self.kind == "conv":
            return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        return value.reshape(self.hf_shape(value.shape))


class Checkpoint:
    """The tensors of one safetensors checkpoint (single file or sharded index), memory-mapped."""

    def __init__(self, files: Sequence[Path]):
        self.files = tuple(files)
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for path in self.files:
            with open(path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_size))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                self._entries[key] = (path, 8 + header_size, entry)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][2]["shape"])

    def get(self, key: str) -> np.ndarray:
        path, base, entry = self._entries[key]
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        if end == start:
            return np.zeros(entry["shape"], dtype)
        return np.memmap(path, dtype, "r", base + start, tuple(entry["shape"]))


def resolve_directory(path_or_repo: str | Path) -> Path:
    """A local checkpoint directory, or the snapshot of a repo id in the local HF cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if name.count("/") <= 1 and not path.exists():
        try:
            import huggingface_hub

            return Path(huggingface_hub.snapshot_download(name, local_files_only=True))
        except Exception as e:  # Not in the cache (or not a valid repo id).
            reason = f"{type(e).__name__}: {e}"
    else:
        reason = "not a directory"
    raise CheckpointError(
        f"{name!r} is neither a local directory nor a model in the local Hugging Face cache "
        f"({reason}). Download it on a machine with internet access (e.g. `hf download "
        f"{name}`) and pass the directory"
    )


def read_config(directory: str | Path, name: str = "config.json") -> dict[str, Any]:
    path = resolve_directory(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; a Hugging Face checkpoint directory has one")
    return json.loads(path.read_text())


def open_checkpoint(directory: str | Path, stem: str = "model") -> Checkpoint:
    """`{stem}.safetensors` or the shards named by `{stem}.safetensors.index.json`."""
    directory = resolve_directory(directory)
    index = directory / f"{stem}.safetensors.index.json"
    single = directory / f"{stem}.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard {missing[0].name}, which is missing")
        return Checkpoint(files)
    if single.is_file():
        return Checkpoint([single])
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds pickle weights ({', '.join(pickles)}) but no {single.name}; "
            f"genctl_jax never unpickles. Convert once where you trust the file: "
            f"`from_pretrained(dir)` then `save_pretrained(dir, safe_serialization=True)` with "
            f"transformers/diffusers, or `safetensors.torch.save_file(torch.load(f, "
            f"weights_only=True), '{single.name}')`"
        )
    raise CheckpointError(f"{directory} has neither {single.name} nor {index.name}")


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _check_covers(tensors: Sequence[Tensor], leaves: Mapping[tuple[str, ...], Any]) -> None:
    mapped = [t.flax for t in tensors]
    if len(set(mapped)) != len(mapped):
        raise ValueError("the weight map lists a Flax parameter twice")
    if set(mapped) != set(leaves):
        extra = sorted(set(mapped) - set(leaves))
        unmapped = sorted(set(leaves) - set(mapped))
        raise ValueError(
            f"weight map and model disagree: unmapped {unmapped[:3]}, extra {extra[:3]}"
        )


def import_params(
    tensors: Sequence[Tensor],
    checkpoint: Checkpoint,
    abstract_params: Mapping,
    shardings: Mapping | None = None,
    source: str = "checkpoint",
) -> dict:
    """Flax params (dtype and shape of `abstract_params`) from a checkpoint.

    abstract_params: the unboxed `params` tree of `jax.eval_shape(model.init, ...)`.
    shardings: an optional tree of `jax.sharding.Sharding` of the same structure; each
    parameter is then assembled from per-shard reads and never whole on one device.
    Checkpoint tensors the map does not name (a decoder, an unused head) are ignored.
    """
    leaves = dict(_leaves(abstract_params))
    _check_covers(tensors, leaves)
    flat_shardings = dict(_leaves(shardings)) if shardings is not None else {}
    out, used = {}, set()
    for t in tensors:
        abstract = leaves[t.flax]
        expected = t.hf_shape(abstract.shape)
        key = next((k for k in t.keys if k in checkpoint), None)
        if key is None:
            raise CheckpointError(
                f"{source}: tensor {t.keys[0]!r} is missing (expected shape {expected}, for "
                f"{'/'.join(t.flax)}); is this checkpoint for the same architecture as the config?"
            )
        used.add(key)
        found = checkpoint.shape(key)
        if found != expected:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {found}, expected {expected} (for "
                f"{'/'.join(t.flax)}); does config.json match the weights?"
            )
        value = t.to_flax(np.asarray(checkpoint.get(key)), abstract.shape).astype(abstract.dtype)
        if t.flax in flat_shardings:
            value = jax.make_array_from_callback(
                value.shape, flat_shardings[t.flax], lambda index, v=value: v[index]
            )
        out[t.flax] = value
    unused = len(checkpoint.keys()) - len(used)
    if unused:
        logging.info("%s: %d checkpoint tensors not used by this model", source, unused)
    return _nest(out)


def export_params(tensors: Sequence[Tensor], params: Mapping) -> dict[str, np.ndarray]:
    """The checkpoint tensors (first key of each `Tensor`) of Flax params."""
    leaves = dict(_leaves(params))
    _check_covers(tensors, leaves)
    return {t.keys[0]: t.to_hf(np.asarray(jax.device_get(leaves[t.flax]))) for t in tensors}


def save_checkpoint(
    directory: str | Path,
    hf_tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any] | None = None,
    stem: str = "model",
    overwrite: bool = False,
) -> Path:
    """Writes `{stem}.safetensors` (and `config.json`); refuses to replace files unless asked."""
    directory = Path(directory)
    targets = [directory / f"{stem}.safetensors"] + ([directory / "config.json"] if config else [])
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]} exists; pass overwrite=True to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    # "format": "pt" marks the file as PyTorch-layout for readers that check it. The reshape
    # keeps 0-d tensors (CLIP's logit_scale) 0-d: np.ascontiguousarray makes them (1,).
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in hf_tensors.items()},
        targets[0],
        metadata={"format": "pt"},
    )
    if config:
        targets[1].write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return targets[0]


def load_params(
    boxed_params: Mapping,
    tensors: Sequence[Tensor],
    checkpoint: Checkpoint,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    source: str = "checkpoint",
) -> dict:
    """A model's `params` from a checkpoint, sharded by their logical names.

    boxed_params: the `params` of `jax.eval_shape(model.init, ...)`, logical names kept. With
    a mesh, each parameter goes straight into the shards its names get under `rules`
    (default: `configlib.DEFAULT_RULES`).
    """
    shardings = None
    if mesh is not None:
        rules = configlib.DEFAULT_RULES if rules is None else rules
        shardings = sharding.logical_to_shardings(boxed_params, mesh, rules, source)
    return import_params(tensors, checkpoint, nn.unbox(boxed_params), shardings, source)
