"""The T5 encoder against transformers' `T5EncoderModel` on tiny random checkpoints.

Two architectures: original T5 (relu FFN, tied embeddings) and T5 v1.1 / Flan (gated-gelu,
untied). Weights come from transformers' own `save_pretrained` (single file, sharded index,
a full encoder-decoder checkpoint) and go back through ours into transformers unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from genctl_jax import configlib
from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.models.text import t5, tokenizer
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.parallel import sharding

STYLES = {
    "relu": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "gated": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
# Length 12 with 8 buckets / max distance 16 reaches every bucket of both directions.
BATCH, LENGTH = 4, 12
LENGTHS = (12, 7, 3, 9)  # Tokens per row; the rest is padding.


def hf_config(style: str) -> transformers.T5Config:
    tiny = t5.PRESETS["tiny"]
    return transformers.T5Config(
        vocab_size=tiny.vocab_size,
        d_model=tiny.d_model,
        d_kv=tiny.d_kv,
        d_ff=tiny.d_ff,
        num_layers=tiny.num_layers,
        num_heads=tiny.num_heads,
        relative_attention_num_buckets=tiny.relative_attention_num_buckets,
        relative_attention_max_distance=tiny.relative_attention_max_distance,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        **STYLES[style],
    )


def hf_model(style: str, cls=transformers.T5EncoderModel, seed: int = 0):
    """A random transformers model; every weight (norm scales included) scaled by 1 +- 0.3."""
    torch.manual_seed(seed)
    model = cls(hf_config(style)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p))
    return model


def inputs(lengths=LENGTHS, seed: int = 0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(LENGTH)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(3, t5.PRESETS["tiny"].vocab_size, (len(lengths), LENGTH), dtype=np.int32)
    return ids * mask, mask  # Padding is id 0, as T5 tokenizers pad.


def hf_hidden(model, ids, mask) -> np.ndarray:
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    with torch.no_grad():
        out = encoder(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        )
    return out.last_hidden_state.numpy()


@functools.partial(jax.jit, static_argnums=0)
def encode(module, params, ids, mask):
    return module.apply({"params": params}, ids, mask)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """style -> (transformers T5EncoderModel, the directory its save_pretrained wrote)."""
    cache = {}

    def get(style):
        if style not in cache:
            model = hf_model(style)
            directory = tmp_path_factory.mktemp(style)
            model.save_pretrained(directory)
            cache[style] = model, directory
        return cache[style]

    return get


def flat(tree) -> dict:
    return {
        sharding._path_str(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


# ---- config ----


def test_config_round_trips_and_reads_hub_configs():
    for preset in t5.PRESETS.values():
        assert t5.T5Config.from_hf(preset.to_hf()) == preset
    # google/flan-t5-xxl's config.json (decoder and generation fields are ignored).
    xxl = t5.T5Config.from_hf(
        {
            "architectures": ["T5ForConditionalGeneration"],
            "d_ff": 10240,
            "d_kv": 64,
            "d_model": 4096,
            "decoder_start_token_id": 0,
            "dropout_rate": 0.1,
            "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-06,
            "model_type": "t5",
            "num_decoder_layers": 24,
            "num_heads": 64,
            "num_layers": 24,
            "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": 32,
            "tie_word_embeddings": False,
            "vocab_size": 32128,
        }
    )
    assert xxl == t5.PRESETS["t5-v1_1-xxl"]
    # t5-small's config.json predates feed_forward_proj and max_distance: HF defaults apply.
    old = {"model_type": "t5", "d_model": 512, "d_ff": 2048, "num_heads": 8, "num_layers": 6}
    assert t5.T5Config.from_hf(old) == t5.PRESETS["t5-small"]
    assert t5.PRESETS["t5-small"].feed_forward_proj == "relu"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model_type": "bert"}, "model_type='bert'"),
        ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu'.*relu, gated-gelu"),
        ({"num_heads": 0}, "num_heads=0"),
        ({"d_ff": 64.0}, "d_ff=64.0"),
        ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets=2"),
        ({"relative_attention_max_distance": 8}, "relative_attention_max_distance=8"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon=0"),
    ],
)
def test_bad_config_values_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        t5.T5Config.from_hf({**t5.PRESETS["t5-small"].to_hf(), **fields})


def test_xxl_has_4_76b_params_and_fsdp_tensor_shards_them():
    config = t5.PRESETS["t5-v1_1-xxl"]
    module = t5.T5Encoder(config)
    ids = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids))["params"]
    d, layer = config.d_model, 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096
    count = sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(boxed)))
    assert count == 32128 * d + 24 * layer + 32 * 64 + d == 4_762_310_656
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    shardings = sharding.logical_to_shardings(boxed, mesh, configlib.DEFAULT_RULES, "t5")
    fraction = sharding.check_sufficiently_sharded(nn.unbox(boxed), shardings, mesh, 0.05, "t5")
    assert fraction < 1e-4  # Only norm scales and the 32 x 64 bias table stay whole.
    q = shardings["layer_0"]["attention"]["q"]["kernel"]
    assert q.shard_shape((4096, 64, 64)) == (1024, 32, 64)
    assert shardings["layer_7"]["mlp"]["wo"]["kernel"].spec == P("tensor", "fsdp")
    assert shardings["shared"]["embedding"].spec == P("tensor", "fsdp")


def test_relative_buckets_match_transformers_on_rounding_edges():
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for num_buckets, max_distance, length in ((32, 128, 300), (8, 16, 40), (64, 256, 600)):
        ours = t5.relative_position_buckets(length, num_buckets, max_distance)
        position = torch.arange(length)
        theirs = bucket(position[None, :] - position[:, None], True, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, theirs.numpy())
        # Every bucket but `num_buckets // 2` (forward distance 0, which cannot occur) is used.
        assert len(np.unique(ours)) == num_buckets - 1


# ---- parity with transformers ----


@pytest.mark.parametrize("style", list(STYLES))
def test_matches_transformers_with_padding(saved, style):
    model, directory = saved(style)
    module, params = t5.load_pretrained(directory)
    assert module.config == dataclasses.replace(t5.PRESETS["tiny"], **STYLES[style])
    ids, mask = inputs()
    hidden, pooled = encode(module, params, ids, mask)
    assert hidden.shape == (BATCH, LENGTH, 32) and hidden.dtype == jnp.float32
    expected = hf_hidden(model, ids, mask)
    diff = float(np.abs(np.asarray(hidden) - expected).max())
    print(f"{style}: max |ours - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    assert np.abs(expected).max() > 0.5
    # The mask matters: without it the valid tokens of padded rows would change.
    unmasked = hf_hidden(model, ids, np.ones_like(mask))
    assert np.abs(unmasked[1, :7] - expected[1, :7]).max() > 1e-2
    m = mask[..., None]
    np.testing.assert_allclose(
        np.asarray(pooled), (expected * m).sum(1) / m.sum(1), atol=1e-4, rtol=0
    )


def test_sharded_index_and_encoder_decoder_checkpoints_load(saved, tmp_path):
    model, directory = saved("gated")
    module, params = t5.load_pretrained(directory)
    ids, mask = inputs()
    expected = np.asarray(encode(module, params, ids, mask)[0])

    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    sharded_module, sharded_params = t5.load_pretrained(tmp_path / "sharded")
    assert sharded_module == module
    out = np.asarray(encode(sharded_module, sharded_params, ids, mask)[0])
    np.testing.assert_array_equal(out, expected)

    full = hf_model("relu", transformers.T5ForConditionalGeneration, seed=1)
    full.save_pretrained(tmp_path / "full")
    keys = safetensors.numpy.load_file(tmp_path / "full" / "model.safetensors").keys()
    assert any(k.startswith("decoder.block.1.") for k in keys)
    full_module, full_params = t5.load_pretrained(tmp_path / "full")
    hidden = np.asarray(encode(full_module, full_params, ids, mask)[0])
    diff = float(np.abs(hidden - hf_hidden(full, ids, mask)).max())
    print(f"T5ForConditionalGeneration encoder: max |ours - transformers| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("style", list(STYLES))
def test_save_pretrained_round_trips_exactly_through_transformers(saved, tmp_path, style):
    model, directory = saved(style)
    module, params = t5.load_pretrained(directory)
    t5.save_pretrained(tmp_path, module, params)
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        t5.save_pretrained(tmp_path, module, params)

    back = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
    theirs, ours = model.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    ids, mask = inputs()
    np.testing.assert_array_equal(hf_hidden(back, ids, mask), hf_hidden(model, ids, mask))
    # Our config.json means the same to transformers (5 keeps the tie flag in its own field).
    assert back.config.scale_decoder_outputs == STYLES[style]["tie_word_embeddings"]
    assert back.config.is_gated_act == (style == "gated")
    again_module, again = t5.load_pretrained(tmp_path)
    assert again_module == module
    first, second = flat(params), flat(again)
    assert first.keys() == second.keys()
    for key, value in first.items():
        np.testing.assert_array_equal(second[key], value, err_msg=key)


# ---- sharding ----


def test_mesh_load_shards_params_and_gives_the_single_device_output(saved):
    _, directory = saved("relu")
    module, params = t5.load_pretrained(directory)
    ids, mask = inputs()
    expected_hidden, expected_pooled = encode(module, params, ids, mask)

    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    module, sharded = t5.load_pretrained(directory, mesh=mesh)
    q = sharded["layer_0"]["attention"]["q"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (8, 2, 8)  # Global (32, 4, 8).
    embedding = sharded["shared"]["embedding"]
    assert embedding.sharding.spec == P("tensor", "fsdp")
    assert embedding.addressable_shards[0].data.shape == (50, 8)  # Global (100, 32).
    wo = sharded["layer_1"]["mlp"]["wo"]["kernel"]
    assert wo.sharding.spec == P("tensor", "fsdp")
    for key, value in flat(params).items():
        np.testing.assert_array_equal(flat(sharded)[key], value, err_msg=key)

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    ids_s, mask_s = jax.device_put(ids, batch), jax.device_put(mask, batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(configlib.DEFAULT_RULES):
        hidden, pooled = jax.jit(module.apply)({"params": sharded}, ids_s, mask_s)
    assert hidden.sharding.is_equivalent_to(batch, 3)  # Batch split 4 ways, not gathered.
    assert hidden.addressable_shards[0].data.shape == (1, LENGTH, 32)
    diff = float(np.abs(np.asarray(hidden) - np.asarray(expected_hidden)).max())
    print(f"mesh fsdp=4 x tensor=2 vs one device: max diff = {diff:.2e}")
    assert diff <= 1e-5
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(expected_pooled), atol=1e-5)


def test_bfloat16_compute_and_remat_gradients(saved):
    _, directory = saved("gated")
    module, params = t5.load_pretrained(directory)
    ids, mask = inputs()
    reference = np.asarray(encode(module, params, ids, mask)[0])
    low, _ = t5.load_pretrained(directory, dtype=jnp.bfloat16)
    hidden = encode(low, params, ids, mask)[0]
    assert hidden.dtype == jnp.float32  # Residual stream and final norm stay float32.
    error = float(np.abs(np.asarray(hidden) - reference).max())
    assert 0 < error < 0.1 * np.abs(reference).max()

    def loss(p, m):
        hidden, pooled = m.apply({"params": p}, ids, mask)
        return jnp.sum(hidden[..., :4] ** 2) + jnp.sum(pooled)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain = flat(grad(params, module))
    remat = flat(grad(params, t5.T5Encoder(module.config, remat=True)))
    assert np.abs(plain["layer_0/attention/q/kernel"]).max() > 1e-3
    for key, value in plain.items():
        np.testing.assert_allclose(remat[key], value, atol=1e-5, rtol=1e-5, err_msg=key)


# ---- tokenizer + encoder ----

SENTENCES = [
    "a red circle above a blue square",
    "two green triangles next to a yellow star",
    "a small blue circle on a white background",
    "the big red square is left of the green circle",
    "three yellow stars below a purple triangle",
]


def build_tokenizer(directory):
    """A tiny sentencepiece-style Unigram T5 tokenizer: <pad>=0, </s>=1, <unk>=2, appends </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    wrapped = transformers.T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    wrapped.save_pretrained(directory)


def test_tokenizer_and_encoder_from_one_directory(saved, tmp_path, caplog):
    model, _ = saved("gated")
    model.save_pretrained(tmp_path)
    build_tokenizer(tmp_path)

    tok = tokenizer.load_tokenizer(tmp_path)
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    module, params = t5.load_pretrained(tmp_path)
    tokenizer.check_vocab(tok, module.config.vocab_size, "test")
    too_long = " ".join(SENTENCES[:3])
    prompts = ["a red circle", "two green triangles next to a yellow star", "", too_long]
    ids, mask = tokenizer.tokenize(tok, prompts, max_length=LENGTH)
    assert "truncated to the encoder's max length 12" in caplog.text
    assert ids.shape == mask.shape == (BATCH, LENGTH)
    lengths = mask.sum(1)
    assert lengths[2] == 1 and lengths[3] == LENGTH  # "" is just </s>; the long one is cut.
    assert 1 < lengths[0] < lengths[1]
    assert np.all(ids[np.arange(BATCH), lengths - 1] == 1)  # Every row ends with </s>.
    assert np.all(ids[mask == 0] == 0) and not np.any(ids[mask == 1] == 2)

    hidden, _ = encode(module, params, ids, mask)
    diff = float(np.abs(np.asarray(hidden) - hf_hidden(model, ids, mask)).max())
    print(f"tokenized prompts: max |ours - transformers| = {diff:.2e}")
    assert diff <= 1e-4


# ---- bad input ----


def test_pickle_only_directory_is_refused_with_the_conversion_recipe(saved, tmp_path):
    _, directory = saved("relu")
    shutil.copy(directory / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickles.*save_pre"):
        t5.load_pretrained(tmp_path)


def test_missing_tensor_and_mismatched_config_name_key_and_shapes(saved, tmp_path):
    _, directory = saved("relu")
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    missing = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    del tensors[missing]
    (tmp_path / "missing").mkdir()
    safetensors.numpy.save_file(tensors, tmp_path / "missing" / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path / "missing")
    with pytest.raises(
        CheckpointError, match=rf"'{missing}' is missing \(expected shape \(32, 64\)"
    ):
        t5.load_pretrained(tmp_path / "missing")

    shutil.copytree(directory, tmp_path / "wide")
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**config, "d_ff": 48}))
    wi = r"'encoder\.block\.0\.layer\.1\.DenseReluDense\.wi\.weight'"
    with pytest.raises(CheckpointError, match=rf"{wi} has shape \(64, 32\), expected \(48, 32\)"):
        t5.load_pretrained(tmp_path / "wide")

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ConfigError, match="model_type='clip'"):
        t5.load_pretrained(tmp_path / "other")


def test_encoder_refuses_mismatched_input_shapes():
    module = t5.T5Encoder(t5.PRESETS["tiny"])
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"\(2, 5\) and \(2, 4\)"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids[:, :4]))
