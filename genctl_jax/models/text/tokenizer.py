"""Prompts -> padded token ids and attention masks, with Hugging Face tokenizers.

Any tokenizer `transformers.AutoTokenizer` reads from a local directory works (T5's
sentencepiece-style Unigram, CLIP's BPE, the word-level vocabulary of the shapes
captions). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.io.hf_weights import resolve_directory


def load_tokenizer(directory: str | Path):
    """`AutoTokenizer` from a local directory (or the local HF cache), offline."""
    import transformers  # Imported on use: it takes seconds.

    path = resolve_directory(directory)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot load a tokenizer from {path}: {e}. The directory needs the files that "
            f"`tokenizer.save_pretrained` writes (tokenizer.json or the vocabulary files)"
        ) from e


def check_vocab(tokenizer, vocab_size: int, where: str) -> None:
    """Refuses a tokenizer that can emit ids the encoder's embedding table does not have."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the text encoder's "
            f"vocabulary has {vocab_size}; use the tokenizer saved with the encoder's weights"
        )


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int):
    """(ids int32 [B, max_length], mask int32 [B, max_length]); longer prompts are truncated.

    A prompt that does not fit is cut at `max_length` tokens with a warning naming it.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass at least one (the empty string is allowed)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str: {prompt!r}")
    full = tokenizer(prompts, padding=False, truncation=False)["input_ids"]
    for prompt, ids in zip(prompts, full, strict=True):
        if len(ids) > max_length:
            logging.warning(
                "prompt %r has %d tokens; truncated to the encoder's max length %d",
                prompt,
                len(ids),
                max_length,
            )
    out = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def shapes_tokenizer():
    """A word-level tokenizer of the shapes captions' vocabulary (T5's special ids).

    `<pad>` 0, `</s>` 1 (appended to every prompt), `<unk>` 2, then the words of
    `shapes.make_caption`'s grammar; lower-cased, punctuation split off. Built the same
    way every time, so a run needs no tokenizer files.
    """
    import tokenizers
    import transformers

    from genctl_jax.data import shapes

    names = (*shapes.SHAPES, *shapes.COLOURS, *shapes.SIZES, *shapes.POSITIONS)
    words = {w for name in names for w in name.split()}
    words |= {"a", "an", "in", "on", "at", "the", "and", "centre", ",", "."}
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab |= {w: i + len(vocab) for i, w in enumerate(sorted(words))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
