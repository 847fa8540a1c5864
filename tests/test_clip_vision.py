"""CLIP vision tower, full CLIP and CLIP score: transformers parity, round trips, sharding."""

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
from jax.sharding import PartitionSpec as P

from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.metrics import clip_score
from genctl_jax.models import clip_vision
from genctl_jax.models.clip_vision import CLIPConfig, CLIPPreprocessing, CLIPVisionConfig
from genctl_jax.models.text import clip as text_clip
from genctl_jax.parallel import mesh as mesh_lib

BATCH, LENGTH, SIZE = 4, 16, 32  # Every forward uses these shapes: each config compiles once.
ROW_TOKENS = (16, 9, 3, 12)  # Tokens per row, BOS and EOS included; the rest is padding.
BOS, EOS = 52, 53
TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=LENGTH,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=EOS,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=SIZE,
    patch_size=8,
)
PROJECTION = 24
# A standalone tower unlike CLIPModel's: exact gelu, another epsilon, 16-pixel patches.
VISION_ALONE = dict(
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=SIZE,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    projection_dim=20,
)
# The preprocessing of the test CLIP: shortest side to 32, then a 32x32 center crop.
PROCESSOR = dict(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
PROMPTS = ["a cat", "the dog", "the cat and the dog", "a dog"]

Reference = collections.namedtuple("Reference", "model directory")


def perturb(model, seed):
    """Noise on every torch parameter, so layer norms and biases are not at their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def clip_tokenizer():
    """A byte-level BPE in CLIP's layout (letters, letters + '</w>', specials 52/53, merges)."""
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab |= {f"{c}</w>": len(letters) + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def strip_prefix(directory, prefix="vision_model."):
    """Rewrites model.safetensors without `prefix`: transformers 5's CLIPVisionModel layout."""
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    safetensors.numpy.save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """transformers models with random weights saved by `save_pretrained` (safetensors)."""
    out = {}
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=TEXT, vision_config=VISION, projection_dim=PROJECTION
    )
    model = perturb(transformers.CLIPModel(config).eval(), 0)
    directory = tmp_path_factory.mktemp("clip")
    model.save_pretrained(directory, safe_serialization=True)
    clip_tokenizer().save_pretrained(directory)
    transformers.CLIPImageProcessorPil(**PROCESSOR).save_pretrained(directory)
    out["clip"] = Reference(model, directory)
    for seed, (name, cls) in enumerate(
        [
            ("vision_projection", transformers.CLIPVisionModelWithProjection),
            ("vision", transformers.CLIPVisionModel),
        ],
        start=1,
    ):
        torch.manual_seed(seed)
        model = perturb(cls(transformers.CLIPVisionConfig(**VISION_ALONE)).eval(), seed)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory, safe_serialization=True)
        if name == "vision":
            strip_prefix(directory)  # Whatever this transformers writes, test that layout.
        out[name] = Reference(model, directory)
    return out


def pixels(seed=0):
    """[BATCH, SIZE, SIZE, 3] CLIP-normalised-like pixel values (NHWC)."""
    return np.random.default_rng(seed).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


def token_ids(seed=0):
    rng = np.random.default_rng(seed)
    ids = np.full((BATCH, LENGTH), EOS, np.int32)
    mask = np.zeros((BATCH, LENGTH), np.int32)
    for row, n in enumerate(ROW_TOKENS):
        ids[row, :n] = [BOS, *rng.choice(BOS, n - 2), EOS]
        mask[row, :n] = 1
    return ids, mask


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def max_diff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def images(height=40, width=48, batch=BATCH):
    """[batch, height, width, 3] smooth test images in [-1, 1], different per row."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rows = [np.stack([np.sin(3 * x + k), np.cos(2 * y * k), x * y - 0.5], -1) for k in range(batch)]
    return np.stack(rows).astype(np.float32)


def test_clip_model_matches_transformers(checkpoints):
    ref = checkpoints["clip"]
    module, params = clip_vision.load_pretrained(ref.directory)
    assert module.config.projection_dim == PROJECTION and module.config.vision.with_projection
    pix, (ids, mask) = pixels(), token_ids()
    out = jax.jit(module.apply)({"params": params}, pix, ids, mask)
    vision, vision_params = clip_vision.load_vision_pretrained(
        ref.directory, output_hidden_states=True
    )
    tower = jax.jit(vision.apply)({"params": vision_params}, pix)

    torch_ids, torch_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    with torch.no_grad():
        theirs = ref.model(pixel_values=nchw(pix), input_ids=torch_ids, attention_mask=torch_mask)
        tower_theirs = ref.model.vision_model(pixel_values=nchw(pix), output_hidden_states=True)
        features = ref.model.get_image_features(pixel_values=nchw(pix)).pooler_output.numpy()

    assert out.image_embeds.shape == (BATCH, PROJECTION)
    assert out.vision.last_hidden_state.shape == (BATCH, (SIZE // 8) ** 2 + 1, 32)
    assert np.abs(theirs.logits_per_image.numpy()).mean() > 0.1
    assert max_diff(out.image_embeds, theirs.image_embeds) <= 1e-4
    assert max_diff(out.text_embeds, theirs.text_embeds) <= 1e-4
    assert max_diff(out.logits_per_image, theirs.logits_per_image) <= 1e-4
    expected_text = theirs.text_model_output.last_hidden_state.numpy()
    assert max_diff(out.text_last_hidden_state, expected_text) <= 1e-4
    expected_last = tower_theirs.last_hidden_state.numpy()
    assert max_diff(out.vision.last_hidden_state, expected_last) <= 1e-4
    assert max_diff(out.vision.pooler_output, tower_theirs.pooler_output.numpy()) <= 1e-4
    assert max_diff(out.vision.image_embeds, features) <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(out.image_embeds, axis=-1), 1.0, rtol=1e-6)

    # The vision tower alone, loaded from the CLIPModel directory, with every layer's state.
    assert max_diff(tower.image_embeds, features) <= 1e-4
    assert len(tower.hidden_states) == len(tower_theirs.hidden_states) == 3
    for ours, expected in zip(tower.hidden_states, tower_theirs.hidden_states, strict=True):
        assert max_diff(ours, expected.numpy()) <= 1e-4
    np.testing.assert_array_equal(tower.hidden_states[-1], tower.last_hidden_state)


@pytest.mark.parametrize("name", ["vision_projection", "vision"])
def test_vision_models_match_transformers(checkpoints, name):
    ref = checkpoints[name]
    keys = safetensors.numpy.load_file(ref.directory / "model.safetensors").keys()
    prefixed = name == "vision_projection"
    assert all(k.startswith(("vision_model.", "visual_")) == prefixed for k in keys)
    module, params = clip_vision.load_vision_pretrained(ref.directory)
    assert module.config.with_projection == prefixed
    out = jax.jit(module.apply)({"params": params}, pixels(1))
    with torch.no_grad():
        theirs = ref.model(pixel_values=nchw(pixels(1)))
    assert max_diff(out.last_hidden_state, theirs.last_hidden_state.numpy()) <= 1e-4
    if prefixed:
        assert out.image_embeds.shape == (BATCH, VISION_ALONE["projection_dim"])
        assert np.abs(theirs.image_embeds.numpy()).mean() > 0.1
        assert max_diff(out.image_embeds, theirs.image_embeds.numpy()) <= 1e-4
    else:
        assert out.image_embeds is None
        assert max_diff(out.pooler_output, theirs.pooler_output.numpy()) <= 1e-4


@pytest.mark.parametrize(
    "name, cls, loader",
    [
        ("clip", transformers.CLIPModel, clip_vision.load_pretrained),
        (
            "vision_projection",
            transformers.CLIPVisionModelWithProjection,
            clip_vision.load_vision_pretrained,
        ),
        ("vision", transformers.CLIPVisionModel, clip_vision.load_vision_pretrained),
    ],
)
def test_export_round_trip_is_exact(checkpoints, tmp_path, name, cls, loader):
    ref = checkpoints[name]
    module, params = loader(ref.directory)
    written = clip_vision.save_pretrained(tmp_path, module, params)
    with pytest.raises(CheckpointError, match="exists"):
        clip_vision.save_pretrained(tmp_path, module, params)

    # Byte-exact tensors; the keys are the source's, with the `vision_model.` prefix.
    source = safetensors.numpy.load_file(ref.directory / "model.safetensors")
    ours = safetensors.numpy.load_file(written)
    if name == "vision":
        source = {f"vision_model.{k}": v for k, v in source.items()}
    assert sorted(ours) == sorted(source)
    for key, value in source.items():
        assert ours[key].dtype == value.dtype and np.array_equal(ours[key], value), key

    reloaded = cls.from_pretrained(tmp_path).eval()
    expected, got = ref.model.state_dict(), reloaded.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    again_module, again = loader(tmp_path)
    assert again_module.config == module.config
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_preprocessing_crop_and_normalisation_are_exact(tmp_path):
    # 32 x 40: the short side already has the target size, so only crop + normalise run.
    u8 = np.random.default_rng(0).integers(0, 256, (2, SIZE, 40, 3), dtype=np.uint8)
    ours = np.asarray(CLIPPreprocessing.for_image_size(SIZE)(u8 / 127.5 - 1.0))
    processor = transformers.CLIPImageProcessorPil(**PROCESSOR)
    theirs = processor(images=list(u8), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    mean, std = np.array(clip_vision.OPENAI_CLIP_MEAN), np.array(clip_vision.OPENAI_CLIP_STD)
    direct = (u8[:, :, 4:36] / 255.0 - mean) / std  # left = (40 - 32) // 2
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    assert max_diff(ours, direct) <= 1e-5
    assert max_diff(ours, theirs) <= 1e-5

    # Custom mean/std and sizes from preprocessor_config.json; gray images become RGB.
    custom = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 36}, crop_size={"height": SIZE, "width": SIZE},
        image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3],
    )  # fmt: skip
    custom.save_pretrained(tmp_path)
    config = clip_vision.tiny_vision_config()
    loaded = clip_vision.load_preprocessing(tmp_path, config)
    assert loaded == CLIPPreprocessing(36, None, (SIZE, SIZE), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    gray = np.random.default_rng(1).integers(0, 256, (1, 36, 36, 1), dtype=np.uint8)
    direct = (np.repeat(gray[:, 2:34, 2:34] / 255.0, 3, -1) - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.3]
    assert max_diff(loaded(gray / 127.5 - 1.0), direct) <= 1e-5
    assert clip_vision.load_preprocessing(None, config) == CLIPPreprocessing.for_image_size(SIZE)


def test_preprocessing_resize_is_within_one_level_of_pil():
    """jax bicubic vs PIL bicubic (CLIPImageProcessorPil), measured in uint8 levels."""
    processor = transformers.CLIPImageProcessorPil(**PROCESSOR)
    std = np.array(clip_vision.OPENAI_CLIP_STD)
    rng = np.random.default_rng(0)
    worst = {}
    for height, width in [(40, 56), (64, 64), (24, 20), (120, 90)]:  # Down, down, up, down.
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.08).astype(float)  # Sharp edges.
        checks = ((np.floor(x * 8) + np.floor(y * 8)) % 2) * 0.7 + 0.1
        image = np.stack([0.5 + 0.5 * np.sin(6 * x + 2 * y), disc, checks], -1)
        image += rng.normal(0, 0.03, image.shape)
        u8 = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
        ours = np.asarray(CLIPPreprocessing.for_image_size(SIZE)(u8[None] / 127.5 - 1.0))[0]
        theirs = processor(images=[u8], return_tensors="np")["pixel_values"][0]
        levels = np.abs(ours - theirs.transpose(1, 2, 0)) * std * 255
        worst[(height, width)] = float(levels.max())
        assert levels.max() <= 1.5, (height, width, levels.max())
        assert levels.mean() <= 0.5, (height, width, levels.mean())
    # The resizes did run: PIL's uint8 rounding leaves a visible, bounded difference.
    assert max(worst.values()) > 0.1


def test_pair_scores_clamp_negative_cosines():
    image = jnp.array([[1.0, 0.0], [2.0, 0.0], [0.6, 0.8], [0.0, 0.0]])
    text = jnp.array([[3.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(clip_score.cosine_similarity(image, text), [1, -1, 0.6, 0], 1e-6)
    np.testing.assert_allclose(clip_score.pair_scores(image, text), [100, 0, 60, 0], 1e-5)


def test_clip_score_matches_numpy_from_transformers_embeddings(checkpoints):
    ref = checkpoints["clip"]
    scorer = clip_score.CLIPScorer.load(ref.directory)
    assert scorer.preprocessing == CLIPPreprocessing.for_image_size(SIZE)
    batch = images()
    ids, mask = scorer.tokenize(PROMPTS)
    assert ids.shape == (BATCH, LENGTH) and ids[0, 0] == BOS
    ours = scorer.pair_scores(batch, ids, mask)

    pix = np.asarray(scorer.preprocessing(batch))
    with torch.no_grad():
        image = ref.model.get_image_features(pixel_values=nchw(pix)).pooler_output.numpy()
        text = ref.model.get_text_features(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).pooler_output.numpy()
    cos = (image * text).sum(-1) / np.linalg.norm(image, axis=-1) / np.linalg.norm(text, axis=-1)
    expected = 100 * np.maximum(cos, 0)
    assert (cos < 0).any() and (cos > 0).any(), cos  # Both sides of the clamp are exercised.
    assert ours.shape == (BATCH,) and ours.max() > 1.0
    assert max_diff(ours, expected) <= 1e-3
    np.testing.assert_array_equal(ours[cos < 0], 0.0)
    mean = scorer.score(batch, PROMPTS)
    assert abs(mean - expected.mean()) <= 1e-3
    # The per-pair clamp differs from torchmetrics' clamp of the mean when some cos < 0.
    assert abs(mean - max(100 * cos.mean(), 0)) > 0.1


def test_sharded_clip_score_equals_single_device(checkpoints):
    ref = checkpoints["clip"]
    single = clip_score.CLIPScorer.load(ref.directory)
    ids, mask = single.tokenize(PROMPTS)
    expected = single.pair_scores(images(), ids, mask)

    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    sharded = clip_score.CLIPScorer.load(ref.directory, mesh=mesh)
    layer = sharded.params["vision_model"]["layers_0"]
    assert layer["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    kernel = sharded.params["vision_model"]["patch_embedding"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert sharded.batch_multiple == 4
    got = sharded.pair_scores(images(), ids, mask)
    assert max_diff(got, expected) <= 1e-4
    # 3 rows do not split over 4 batch shards: padded, scored, and the padding dropped.
    three = sharded.pair_scores(images()[:3], ids[:3], mask[:3])
    assert max_diff(three, expected[:3]) <= 1e-4


def test_bfloat16_remat_tower_is_close_and_differentiable(checkpoints):
    ref = checkpoints["vision_projection"]
    module, params = clip_vision.load_vision_pretrained(ref.directory)
    low = module.clone(dtype=jnp.bfloat16, remat=True)

    def loss(pix, m):
        return jnp.sum(m.apply({"params": params}, pix).image_embeds ** 2)

    full = jax.jit(lambda p: module.apply({"params": params}, p).image_embeds)(pixels(2))
    half = jax.jit(lambda p: low.apply({"params": params}, p).image_embeds)(pixels(2))
    assert half.dtype == jnp.float32
    assert 0 < max_diff(half, full) <= 0.05 * np.abs(full).max()
    grad = jax.jit(jax.grad(lambda p: loss(p, low)))(pixels(2))
    assert grad.shape == (BATCH, SIZE, SIZE, 3) and np.isfinite(grad).all()
    assert np.abs(grad).max() > 0


def test_missing_tensor_names_the_key_and_shape(checkpoints, tmp_path):
    source = checkpoints["clip"].directory
    tensors = safetensors.numpy.load_file(source / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path)
    del tensors["vision_model.encoder.layers.1.mlp.fc2.weight"]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"'vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight'.*shape \(32, 48\)",
    ):
        clip_vision.load_pretrained(tmp_path)
    del tensors["logit_scale"]
    tensors["vision_model.encoder.layers.1.mlp.fc2.weight"] = np.zeros((32, 48), np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'logit_scale' is missing"):
        clip_vision.load_pretrained(tmp_path)
    # The vision tower alone does not need the text tower or logit_scale.
    module, params = clip_vision.load_vision_pretrained(tmp_path)
    assert params["visual_projection"]["kernel"].shape == (32, PROJECTION)


def test_bad_images_are_refused(checkpoints):
    module, params = clip_vision.load_vision_pretrained(checkpoints["vision"].directory)
    apply = jax.jit(module.apply)
    variables = {"params": params}
    with pytest.raises(ValueError, match=r"shape \(2, 24, 24, 3\).*\[batch, 32, 32, 3\]"):
        apply(variables, jnp.zeros((2, 24, 24, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 32, 32, 4\)"):
        apply(variables, jnp.zeros((2, 32, 32, 4)))
    with pytest.raises(ValueError, match=r"shape \(32, 32, 3\)"):
        apply(variables, jnp.zeros((32, 32, 3)))
    with pytest.raises(TypeError, match="dtype uint8"):
        apply(variables, jnp.zeros((2, 32, 32, 3), jnp.uint8))

    preprocess = CLIPPreprocessing.for_image_size(SIZE)
    with pytest.raises(ValueError, match=r"shape \(2, 40, 40, 4\).*\[batch, height, width, 3\]"):
        preprocess(jnp.zeros((2, 40, 40, 4)))
    with pytest.raises(ValueError, match=r"shape \(40, 40, 3\)"):
        preprocess(jnp.zeros((40, 40, 3)))
    with pytest.raises(TypeError, match="dtype uint8.*x / 127.5 - 1"):
        preprocess(jnp.zeros((2, 40, 40, 3), jnp.uint8))
    with pytest.raises(ValueError, match="center crop"):
        CLIPPreprocessing(shortest_edge=16, crop_size=(SIZE, SIZE))(jnp.zeros((1, 40, 40, 3)))


def test_scorer_refusals(checkpoints):
    scorer = clip_score.CLIPScorer.load(checkpoints["clip"].directory)
    ids, mask = token_ids()
    with pytest.raises(ValueError, match=r"input_ids of shape \(4, 16\) for 3 images"):
        scorer.pair_scores(images(batch=3), ids, mask)
    with pytest.raises(ValueError, match="3 images and 4 prompts"):
        scorer.score(images(batch=3), PROMPTS)
    with pytest.raises(ValueError, match="image_embeds"):
        clip_score.pair_scores(jnp.ones((2, 4)), jnp.ones((3, 4)))
    model = scorer.model
    with pytest.raises(ValueError, match="has no tokenizer"):
        clip_score.CLIPScorer(model, scorer.params).tokenize(["a cat"])
    with pytest.raises(ConfigError, match=r"makes \(24, 24\) images.*takes \(32, 32\)"):
        clip_score.CLIPScorer(model, scorer.params, CLIPPreprocessing.for_image_size(24))


def test_configs_round_trip_and_refuse_bad_fields(tmp_path):
    for vision in (
        clip_vision.tiny_vision_config(),
        clip_vision.tiny_vision_config(projection_dim=8, with_projection=True),
    ):
        assert CLIPVisionConfig.from_hf(vision.to_hf()) == vision
    full = clip_vision.tiny_config()
    assert CLIPConfig.from_hf(full.to_hf()) == full
    assert transformers.CLIPConfig(**full.to_hf()).vision_config.patch_size == 8

    legacy = {
        "model_type": "clip",
        "projection_dim": 768,
        "vision_config": {"hidden_size": 64},
        "vision_config_dict": {"hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14},
    }
    parsed = CLIPVisionConfig.from_hf(legacy)
    assert (parsed.hidden_size, parsed.patch_size, parsed.image_size) == (1024, 14, 224)
    assert parsed.with_projection and parsed.projection_dim == 768
    assert parsed.num_positions == 257

    with pytest.raises(ConfigError, match="model_type='clip_vision_model' is not a full CLIP"):
        CLIPConfig.from_hf(clip_vision.tiny_vision_config().to_hf())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type='bert' is not a CLIP vision model"):
        clip_vision.load_vision_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="hidden_size=30 is not divisible"):
        clip_vision.tiny_vision_config(hidden_size=30)
    with pytest.raises(ConfigError, match="patch_size=64 is larger"):
        clip_vision.tiny_vision_config(patch_size=64)
    with pytest.raises(ConfigError, match="both towers must project"):
        CLIPConfig(full.text, clip_vision.tiny_vision_config(), 16)
    with pytest.raises(ConfigError, match="resample=0 is not supported"):
        CLIPPreprocessing.from_hf({"resample": 0})
    with pytest.raises(TypeError, match="CLIPModel or CLIPVisionEncoder"):
        clip_vision.save_pretrained(
            tmp_path, text_clip.CLIPTextEncoder(text_clip.tiny_config()), {}
        )
    assert nn.get_partition_spec(
        jax.eval_shape(
            lambda: clip_vision.CLIPVisionEncoder(clip_vision.tiny_vision_config()).init(
                jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))
            )
        )["params"]
    )["position_embedding"] == P("length", "embed")
