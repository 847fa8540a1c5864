"""Prompts to model inputs: tokenisation, the shapes vocabulary, the text cache, fidelity."""

import logging

import ml_collections
import numpy as np
import pytest

from genctl_jax.data import shapes, text_cache
from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.metrics import fidelity
from genctl_jax.models.text import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def shapes_tok():
    return tokenizer_lib.shapes_tokenizer()


def test_shapes_tokenizer_covers_every_caption(shapes_tok):
    rng = np.random.default_rng(0)
    captions = [
        shapes.make_caption(
            [
                dict(
                    shape=rng.choice(shapes.SHAPES),
                    colour=rng.choice(shapes.COLOURS),
                    size=rng.choice(shapes.SIZES),
                    position=position,
                )
            ]
        )
        for position in shapes.POSITIONS
    ]
    ids, mask = tokenizer_lib.tokenize(shapes_tok, captions, 12)
    assert ids.shape == mask.shape == (9, 12) and ids.dtype == np.int32
    unk = shapes_tok.convert_tokens_to_ids("<unk>")
    assert not np.any(ids == unk)
    lengths = mask.sum(1)
    # "a small red circle in the top left" is 8 words + </s>; "on the left" one fewer.
    assert lengths.max() == 9 and lengths.min() == 8
    assert all(ids[i, lengths[i] - 1] == shapes_tok.eos_token_id for i in range(9))
    assert np.all(ids[mask == 0] == shapes_tok.pad_token_id)
    empty_ids, empty_mask = tokenizer_lib.tokenize(shapes_tok, "", 12)
    assert empty_mask.sum() == 1 and empty_ids[0, 0] == shapes_tok.eos_token_id


def test_tokenize_truncates_with_warning_and_refuses_bad_prompts(shapes_tok, caplog):
    long = "a small red circle in the top left and a large blue star"
    with caplog.at_level(logging.WARNING):
        ids, mask = tokenizer_lib.tokenize(shapes_tok, [long, "a red star"], 6)
    assert "truncated to the encoder's max length 6" in caplog.text
    assert mask[0].sum() == 6 and mask[1].sum() == 4
    with pytest.raises(ValueError, match="no prompts given"):
        tokenizer_lib.tokenize(shapes_tok, [], 6)
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        tokenizer_lib.tokenize(shapes_tok, ["a red star", 3], 6)
    with pytest.raises(ConfigError, match="tokenizer has 35 tokens but the text encoder's vocab"):
        tokenizer_lib.check_vocab(shapes_tok, 20, "config.text.tokenizer")


def cache_config(max_length=4):
    config = ml_collections.ConfigDict()
    config.data = dict(name="shapes", shapes_config="tiny16")
    config.text = dict(
        encoder="t5", pretrained="", tokenizer="shapes", max_length=max_length, output="last"
    )
    return config


def test_text_cache_round_trip_and_fingerprint(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {
            "hidden": rng.normal(size=(4, 3)).astype(np.float32),
            "mask": np.array([1, 1, i % 2, 0]),
            "pooled": rng.normal(size=(5,)).astype(np.float32),
        }
        for i in range(7)
    ]
    empty = {"hidden": np.zeros((4, 3)), "mask": np.array([1, 0, 0, 0]), "pooled": np.ones(5)}
    meta = {
        "fingerprint": text_cache.fingerprint(cache_config(), "train"),
        "layout": text_cache.layout(3, 5, 4),
    }
    assert text_cache.write(tmp_path, rows, empty, meta) == 7
    with pytest.raises(CheckpointError, match="already holds a text cache; pass --overwrite"):
        text_cache.write(tmp_path, rows, empty, meta)

    cache = text_cache.TextCache(tmp_path)
    assert len(cache) == 7
    got = cache.read([5, 0, 5])
    np.testing.assert_array_equal(got["hidden"][0], rows[5]["hidden"])
    np.testing.assert_array_equal(got["pooled"][1], rows[0]["pooled"])
    np.testing.assert_array_equal(got["mask"][2], rows[5]["mask"])
    assert got["mask"].dtype == np.int32
    np.testing.assert_array_equal(cache.empty["pooled"], np.ones(5))

    cache.check(cache_config(), "train")
    with pytest.raises(ConfigError, match="was made with text.max_length=4, but this run has 8"):
        cache.check(cache_config(max_length=8), "train")
    with pytest.raises(ConfigError, match="outside the text cache's 7 rows"):
        cache.read([7])
    with pytest.raises(ConfigError, match="holds no text cache"):
        text_cache.TextCache(tmp_path / "nothing")


def test_caption_fidelity_of_dataset_images():
    examples = [shapes.generate_example(i, seed=3, image_size=32, max_objects=1) for i in range(12)]
    images = np.stack([e["image"] for e in examples])
    captions = [e["caption"] for e in examples]
    right = fidelity.caption_fidelity(images, captions)
    assert right["colour_shape"] >= 0.9 and right["all"] >= 0.8
    # The same images judged against other examples' captions.
    wrong = fidelity.caption_fidelity(images, captions[1:] + captions[:1])
    assert wrong["colour_shape"] <= 0.3
    with pytest.raises(ValueError, match="as many captions as images"):
        fidelity.caption_fidelity(images, captions[:3])
