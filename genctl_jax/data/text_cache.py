"""Precomputed text embeddings of a dataset's captions, stored beside it as array_record.

`python -m genctl_jax.encode_text` runs a frozen encoder once over every caption of a split;
record i holds example i's hidden states, attention mask and pooled embedding, so a
training step reads rows by the example's `index` instead of running the encoder. The
empty prompt's embedding (what condition dropout and guidance use) is stored too, and
`meta.json` records what made the cache, so a run with another encoder, tokenizer, max
length or dataset is refused instead of silently training on the wrong embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.parallel.mesh import BATCH_AXES

RECORDS = "text_embeddings.array_record"
META = "meta.json"
EMPTY = "empty_prompt.npz"
FIELDS = ("hidden", "mask", "pooled")  # Per-example arrays, in this order in a record.


def fingerprint(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
    """What the embeddings depend on; a run must match it to use the cache."""
    t, d = config.text, config.data
    return {
        "data.name": d.name,
        "data.shapes_config": d.shapes_config,
        "split": split,
        "text.encoder": t.encoder,
        "text.pretrained": str(Path(t.pretrained).expanduser().resolve()) if t.pretrained else "",
        "text.tokenizer": t.tokenizer,
        "text.max_length": t.max_length,
        "text.output": t.output,
    }


def layout(hidden_size: int, pooled_size: int, max_length: int) -> dict[str, list[int]]:
    """Shapes of a row's arrays (meta.json's `layout`)."""
    return {"hidden": [max_length, hidden_size], "mask": [max_length], "pooled": [pooled_size]}


def _encode_row(row: Mapping[str, np.ndarray]) -> bytes:
    return b"".join(np.ascontiguousarray(row[f], np.float32).tobytes() for f in FIELDS)


def write(
    directory: str | Path,
    rows: Iterable[Mapping[str, np.ndarray]],
    empty: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    overwrite: bool = False,
) -> int:
    """Writes the rows (in example-index order), the empty prompt and meta; returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    directory = Path(directory)
    if (directory / META).exists() and not overwrite:
        raise CheckpointError(
            f"{directory} already holds a text cache; pass --overwrite to replace"
        )
    directory.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(directory / RECORDS), "group_size:1")
    count = 0
    try:
        for row in rows:
            writer.write(_encode_row(row))
            count += 1
    finally:
        writer.close()
    np.savez(directory / EMPTY, **{f: np.asarray(empty[f], np.float32) for f in FIELDS})
    (directory / META).write_text(json.dumps({**meta, "num_examples": count}, indent=2) + "\n")
    return count


class TextCache:
    """Random access to the rows of a cache directory."""

    def __init__(self, directory: str | Path):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.directory = Path(directory)
        if not (self.directory / META).is_file():
            raise ConfigError(
                f"config.text.cache_dir={str(directory)!r} holds no text cache ({META} missing); "
                f"create it with python -m genctl_jax.encode_text --config ... --out {directory}"
            )
        self.meta = json.loads((self.directory / META).read_text())
        self.shapes = {f: tuple(s) for f, s in self.meta["layout"].items()}
        self._sizes = [int(np.prod(self.shapes[f])) for f in FIELDS]
        self._source = ArrayRecordDataSource(str(self.directory / RECORDS))
        with np.load(self.directory / EMPTY) as f:
            self.empty = {k: f[k] for k in FIELDS}

    def __len__(self) -> int:
        return len(self._source)

    def check(self, config: ml_collections.ConfigDict, split: str) -> None:
        """Refuses a cache made with another encoder, tokenizer, length or dataset."""
        expected = fingerprint(config, split)
        for key, value in expected.items():
            if self.meta["fingerprint"].get(key) != value:
                raise ConfigError(
                    f"config.text.cache_dir={str(self.directory)!r} was made with {key}="
                    f"{self.meta['fingerprint'].get(key)!r}, but this run has {value!r}; "
                    f"re-run python -m genctl_jax.encode_text for this config"
                )

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows of the given example indices: hidden [B,L,D], mask [B,L] int32, pooled [B,P]."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise ConfigError(
                f"example index {bad[0]} is outside the text cache's {len(self)} rows; the "
                f"cache was made for another dataset or split"
            )
        flat = np.frombuffer(b"".join(self._source.__getitems__(indices)), np.float32)
        flat = flat.reshape(len(indices), sum(self._sizes))
        out, start = {}, 0
        for field, size in zip(FIELDS, self._sizes, strict=True):
            out[field] = flat[:, start : start + size].reshape(len(indices), *self.shapes[field])
            start += size
        out["mask"] = out["mask"].astype(np.int32)
        return out


def encode_captions(config, out, split: str, batch_size: int, overwrite: bool = False) -> int:
    """Encodes every caption of `split` with `config.text`'s frozen pretrained encoder (sharded
    over `config.mesh`) and writes the cache to `out`; returns the number of rows."""
    from genctl_jax.data import sources
    from genctl_jax.models import text as text_lib
    from genctl_jax.models.text import tokenizer as tokenizer_lib
    from genctl_jax.parallel import mesh as mesh_lib
    from genctl_jax.parallel import sharding

    t = config.text
    if not t.pretrained:
        raise ConfigError(
            "config.text.pretrained is '': a text cache needs a frozen pretrained encoder; "
            "set it to the encoder's directory"
        )
    if batch_size < 1:
        raise ConfigError(f"--batch_size={batch_size}: expected at least 1")
    mesh = mesh_lib.create_mesh(config.mesh, jax.devices())
    encoder = text_lib.build(t)
    tokenizer = text_lib.load_tokenizer(t)
    tokenizer_lib.check_vocab(tokenizer, encoder.vocab_size, "config.text.tokenizer")
    rules = sharding.rules_for(config.sharding, "text_encoder")
    boxed = encoder.abstract_params(t.max_length)
    shardings = sharding.logical_to_shardings(boxed, mesh, rules, "text_encoder")
    params = text_lib.load_pretrained_params(encoder, t, shardings)

    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-batch_size // shards) * shards  # Whole rows per batch shard.
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    encode = jax.jit(
        lambda p, ids, mask: encoder.module.apply({"params": p}, ids, mask),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )

    def run_encoder(prompts):
        ids, mask = tokenizer_lib.tokenize(tokenizer, prompts, t.max_length)
        pad = batch_size - len(prompts)
        ids, mask = (np.pad(a, ((0, pad), (0, 0))) for a in (ids, mask))
        with jax.set_mesh(mesh):
            hidden, pooled = encode(params, *jax.device_put((ids, mask), batch_sharding))
        hidden, pooled = jax.device_get((hidden, pooled))
        return [
            {"hidden": hidden[i], "mask": mask[i], "pooled": pooled[i]} for i in range(len(prompts))
        ]

    d = config.data
    source = sources.open_source(
        d.name,
        split=split,
        image_size=d.image_size,
        data_dir=d.data_dir,
        tfds_keys=d.tfds_keys,
        shapes_config=d.shapes_config,
        folder_labels=d.folder_labels,
        captions_file=d.captions_file,
    )

    def caption(i):
        value = source[i].get("caption")
        if value is None or isinstance(value, list | tuple) or np.ndim(value) > 0:
            raise ConfigError(
                f"example {i} of {d.name}:{split} has no single caption ({value!r}); the text "
                f"cache holds one caption per example"
            )
        return sources.to_text(value, where=f"{d.name}:{split} example {i}")

    def rows():
        for start in range(0, len(source), batch_size):
            stop = min(start + batch_size, len(source))
            yield from run_encoder([caption(i) for i in range(start, stop)])
            logging.info("encoded %d / %d captions", stop, len(source))

    meta = {
        "fingerprint": fingerprint(config, split),
        "layout": layout(encoder.hidden_size, encoder.pooled_size, t.max_length),
    }
    return write(out, rows(), run_encoder([""])[0], meta, overwrite=overwrite)
