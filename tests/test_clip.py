"""CLIP text encoder: transformers parity, weight round trips, sharding, tokenizer, refusals."""

import collections
import json
import shutil
import string

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
from genctl_jax.models.text import clip, tokenizer
from genctl_jax.models.text.clip import CLIPTextConfig
from genctl_jax.parallel import mesh as mesh_lib

BATCH, LENGTH = 4, 16  # Every forward uses this shape, so each config compiles once.
ROW_TOKENS = (16, 9, 3, 12)  # Tokens per row, BOS and EOS included; the rest is padding.

# OpenAI-style legacy config: eos_token_id=2 means "pool the largest id" (the real EOS, 98).
LEGACY = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=LENGTH,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# OpenCLIP-style: exact gelu, a projection, and a real EOS id below some token ids (the
# tokenizer's merged words), so the legacy argmax rule would pool the wrong token.
PROJECTED = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=LENGTH,
    hidden_act="gelu",
    bos_token_id=52,
    eos_token_id=53,
    pad_token_id=53,
    projection_dim=24,
)

Reference = collections.namedtuple("Reference", "model directory ids mask")


def perturb(model, seed):
    """Noise on every torch parameter, so layer norms and biases are not at their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def padded_ids(bos, eos, tokens, seed):
    """[BATCH, LENGTH] ids: BOS, random tokens, EOS, then EOS as padding (as CLIP pads)."""
    rng = np.random.default_rng(seed)
    ids = np.full((BATCH, LENGTH), eos, np.int32)
    mask = np.zeros((BATCH, LENGTH), np.int32)
    for row, n in enumerate(ROW_TOKENS):
        ids[row, :n] = [bos, *rng.choice(tokens, n - 2), eos]
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """transformers models with random weights, saved as safetensors checkpoints."""
    out = {}
    specs = [
        # Legacy: EOS (98) is the largest id, BOS 97, words below.
        ("legacy_quick_gelu", transformers.CLIPTextModel, LEGACY, range(3, 97), 97, 98),
        # Words on both sides of BOS/EOS.
        (
            "projected_gelu",
            transformers.CLIPTextModelWithProjection,
            PROJECTED,
            [*range(52), *range(54, 64)],
            52,
            53,
        ),
    ]
    for seed, (name, cls, fields, tokens, bos, eos) in enumerate(specs):
        torch.manual_seed(seed)
        model = perturb(cls(transformers.CLIPTextConfig(**fields)).eval(), seed)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory, safe_serialization=True)
        out[name] = Reference(model, directory, *padded_ids(bos, eos, list(tokens), seed))
    return out


def hf_forward(model, ids, mask):
    """(last_hidden_state, pooled or text_embeds, hidden_states[-2]) of a transformers model."""
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True,
        )
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.last_hidden_state.numpy(), pooled.numpy(), out.hidden_states[-2].numpy()


def forward(module, params, ids, mask):
    hidden, pooled = jax.jit(module.apply)({"params": params}, ids, mask)
    return np.asarray(hidden), np.asarray(pooled)


def max_diff(a, b):
    assert a.shape == b.shape
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("name", ["legacy_quick_gelu", "projected_gelu"])
def test_last_pooled_and_penultimate_match_transformers(checkpoints, name):
    ref = checkpoints[name]
    last, pooled, penultimate = hf_forward(ref.model, ref.ids, ref.mask)
    module, params = clip.load_pretrained(ref.directory)
    hidden, ours_pooled = forward(module, params, ref.ids, ref.mask)
    ours_penultimate, same_pooled = forward(
        module.clone(output="penultimate"), params, ref.ids, ref.mask
    )

    width = PROJECTED["projection_dim"] if name == "projected_gelu" else 32
    assert hidden.shape == (BATCH, LENGTH, 32) and ours_pooled.shape == (BATCH, width)
    assert np.abs(last).mean() > 0.1 and np.abs(pooled).mean() > 0.1
    assert max_diff(hidden, last) <= 1e-4
    assert max_diff(ours_pooled, pooled) <= 1e-4
    assert max_diff(ours_penultimate, penultimate) <= 1e-4
    np.testing.assert_array_equal(same_pooled, ours_pooled)
    # The penultimate state is un-normed: it is far from the final-LN'd output.
    assert max_diff(ours_penultimate, hidden) > 0.1


def test_eos_rule_follows_transformers():
    ids = jnp.array([[5, 9, 3, 3], [5, 3, 9, 3]])
    np.testing.assert_array_equal(clip.eos_positions(ids, 3), [2, 1])  # First EOS.
    np.testing.assert_array_equal(clip.eos_positions(ids, 2), [1, 2])  # Legacy: largest id.


def test_save_pretrained_round_trips_through_transformers(checkpoints, tmp_path):
    for name, cls in [
        ("legacy_quick_gelu", transformers.CLIPTextModel),
        ("projected_gelu", transformers.CLIPTextModelWithProjection),
    ]:
        ref = checkpoints[name]
        module, params = clip.load_pretrained(ref.directory)
        clip.save_pretrained(tmp_path / name, module, params)
        with pytest.raises(CheckpointError, match="exists"):
            clip.save_pretrained(tmp_path / name, module, params)

        reloaded = cls.from_pretrained(tmp_path / name).eval()
        expected, got = ref.model.state_dict(), reloaded.state_dict()
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
        theirs = hf_forward(ref.model, ref.ids, ref.mask)
        for a, b in zip(hf_forward(reloaded, ref.ids, ref.mask), theirs, strict=True):
            np.testing.assert_array_equal(a, b)

        again_module, again = clip.load_pretrained(tmp_path / name)
        assert again_module.config == module.config
        jax.tree.map(np.testing.assert_array_equal, again, params)


def test_full_clip_model_config_gives_projected_text_features(checkpoints, tmp_path):
    ref = checkpoints["projected_gelu"]
    text_config = {k: v for k, v in PROJECTED.items() if k != "projection_dim"}
    vision_config = dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    torch.manual_seed(3)
    config = transformers.CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=24
    )
    model = perturb(transformers.CLIPModel(config).eval(), 3)
    model.save_pretrained(tmp_path, safe_serialization=True)

    module, params = clip.load_pretrained(tmp_path)
    assert module.config.with_projection and module.config.projection_dim == 24
    with torch.no_grad():
        expected = model.get_text_features(
            input_ids=torch.from_numpy(ref.ids).long(),
            attention_mask=torch.from_numpy(ref.mask).long(),
        ).pooler_output.numpy()
    _, pooled = forward(module, params, ref.ids, ref.mask)
    assert np.abs(expected).mean() > 0.1
    assert max_diff(pooled, expected) <= 1e-4


def test_sharded_forward_matches_single_device(checkpoints):
    ref = checkpoints["projected_gelu"]
    module, params = clip.load_pretrained(ref.directory)
    expected_hidden, expected_pooled = forward(module, params, ref.ids, ref.mask)

    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    rules = configlib.DEFAULT_RULES
    module, sharded = clip.load_pretrained(ref.directory, mesh=mesh, rules=rules)
    layer = sharded["layers_0"]
    assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert layer["self_attn"]["out_proj"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert layer["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert sharded["token_embedding"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert sharded["position_embedding"].sharding.spec == P(None, "fsdp")

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    ids, mask = (jax.device_put(a, batch) for a in (ref.ids, ref.mask))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hidden, pooled = jax.jit(module.apply)({"params": sharded}, ids, mask)
    assert hidden.sharding.is_equivalent_to(batch, hidden.ndim)
    assert max_diff(hidden, expected_hidden) <= 1e-5
    assert max_diff(pooled, expected_pooled) <= 1e-5


def test_bfloat16_compute_with_remat_stays_close_to_float32(checkpoints):
    ref = checkpoints["projected_gelu"]
    module, params = clip.load_pretrained(ref.directory)
    hidden, pooled = forward(module, params, ref.ids, ref.mask)
    low = module.clone(dtype=jnp.bfloat16, remat=True)
    low_hidden, low_pooled = forward(low, params, ref.ids, ref.mask)
    assert low_hidden.dtype == np.float32 and low_pooled.dtype == np.float32
    assert 0 < max_diff(low_hidden, hidden) <= 0.1
    assert max_diff(low_pooled, pooled) <= 0.1 * np.abs(pooled).max()


def clip_tokenizer():
    """A byte-level BPE in CLIP's layout: letters, letters + '</w>', specials, then merges.

    The merged words get ids above <|endoftext|>, as many real tokens do in OpenCLIP.
    """
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab |= {f"{c}</w>": len(letters) + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def test_tokenizer_to_encoder_end_to_end(checkpoints):
    ref = checkpoints["projected_gelu"]
    clip_tokenizer().save_pretrained(ref.directory)

    tok = tokenizer.load_tokenizer(ref.directory)
    module, params = clip.load_pretrained(ref.directory)
    tokenizer.check_vocab(tok, module.config.vocab_size, "clip")
    ids, mask = tokenizer.tokenize(tok, ["a cat", "the dog", "the cat and the dog", ""], LENGTH)
    assert ids.shape == (BATCH, LENGTH)
    cat = tok.convert_tokens_to_ids("cat</w>")
    np.testing.assert_array_equal(ids[0, :5], [52, 26, cat, 53, 53])
    np.testing.assert_array_equal(mask[0, :5], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(ids[3, :2], [52, 53])
    # Words rank above EOS, so only the first-EOS rule pools the right token.
    assert (ids[:3].argmax(-1) != clip.eos_positions(jnp.asarray(ids[:3]), 53)).all()

    last, pooled, _ = hf_forward(ref.model, ids, mask)
    hidden, ours_pooled = forward(module, params, ids, mask)
    assert max_diff(hidden, last) <= 1e-4
    assert max_diff(ours_pooled, pooled) <= 1e-4

    with pytest.raises(ConfigError, match=f"{len(tok)} tokens"):
        tokenizer.check_vocab(tok, 50, "clip")


def test_missing_tensor_names_the_key_and_shape(checkpoints, tmp_path):
    source = checkpoints["projected_gelu"].directory
    tensors = safetensors.numpy.load_file(source / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path)
    # Older checkpoints also store the position_ids buffer; it is not a parameter.
    tensors["text_model.embeddings.position_ids"] = np.arange(LENGTH, dtype=np.int64)[None]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    _, params = clip.load_pretrained(tmp_path)
    assert params["position_embedding"].shape == (LENGTH, 32)

    del tensors["text_model.encoder.layers.1.mlp.fc1.bias"]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"'text_model\.encoder\.layers\.1\.mlp\.fc1\.bias'.*shape \(64,\)"
    ):
        clip.load_pretrained(tmp_path)


def test_other_model_types_and_bad_fields_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ConfigError, match="model_type='bert' is not a CLIP text encoder"):
        clip.load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="hidden_act='relu'.*quick_gelu, gelu"):
        CLIPTextConfig.from_hf({"model_type": "clip_text_model", "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="hidden_size=30 is not divisible"):
        clip.tiny_config(hidden_size=30)
    with pytest.raises(ConfigError, match="output='middle'"):
        clip.CLIPTextEncoder(clip.tiny_config(), output="middle")


def test_hf_config_round_trip_and_full_clip_configs():
    config = clip.tiny_config(projection_dim=16, with_projection=True)
    assert CLIPTextConfig.from_hf(config.to_hf()) == config
    assert CLIPTextConfig.from_hf(clip.tiny_config().to_hf()) == clip.tiny_config()
    # A CLIPModel config: text fields nested, projection at the top, legacy text_config_dict.
    full = {
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": {"hidden_size": 64, "eos_token_id": 2},
        "text_config_dict": {"hidden_size": 768, "num_attention_heads": 12},
    }
    parsed = CLIPTextConfig.from_hf(full)
    assert (parsed.hidden_size, parsed.num_attention_heads, parsed.eos_token_id) == (768, 12, 2)
    assert parsed.with_projection and parsed.projection_dim == 768
    assert parsed.hidden_act == "quick_gelu" and parsed.max_position_embeddings == 77
    assert not CLIPTextConfig.from_hf({"model_type": "clip_text_model"}).with_projection
    assert [t.hf for t in clip.weight_map(parsed)][-1] == "text_projection.weight"
