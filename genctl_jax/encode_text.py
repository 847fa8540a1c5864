"""Encode a dataset's captions once with a frozen text encoder, into a text cache.

  python -m genctl_jax.encode_text --config configs/t2i_t5.py:encoder=DIR --out CACHE_DIR \
      [--split train] [--batch_size 64] [--overwrite]

then train with `--config.text.cache_dir=CACHE_DIR`: each step reads example i's
embedding from record i instead of running the encoder. The encoder, tokenizer and max
length are the config's `config.text`; its weights come from `config.text.pretrained`,
sharded over the config's mesh (so an encoder larger than one device works).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from genctl_jax import cli

config_flags.DEFINE_config_file("config", None, "Text-to-image config file (path[:arg]).")
flags.DEFINE_string("out", None, "Directory to write the cache into.")
flags.DEFINE_string("split", None, "Split to encode (default: config.data.split).")
flags.DEFINE_integer("batch_size", 64, "Captions per encoder call.")
flags.DEFINE_bool("overwrite", False, "Replace an existing cache in --out.")
flags.mark_flags_as_required(["config", "out"])

FLAGS = flags.FLAGS


def main(argv):
    del argv

    def encode():
        from genctl_jax.data import text_cache

        config = FLAGS.config
        count = text_cache.encode_captions(
            config, FLAGS.out, FLAGS.split or config.data.split, FLAGS.batch_size, FLAGS.overwrite
        )
        print(f"wrote {count} caption embeddings to {FLAGS.out}")

    cli.run(encode)


if __name__ == "__main__":
    app.run(main)
