"""StyleGAN2 inversion (latent optimisation, encoder) and CLIP editing (StyleCLIP, NADA).

On the tiny StyleGAN2 with random weights and a tiny random CLIP that transformers writes
(the shapes of tests/test_clip_vision.py). Every generator batch has 2N rows, so the few
jitted functions compile once each.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_clip_vision import LENGTH, PROCESSOR, PROJECTION, TEXT, VISION, clip_tokenizer, perturb

from genctl_jax.errors import ConfigError, DataError
from genctl_jax.gan import clip_editing, inversion
from genctl_jax.models.gan import stylegan2

N = 4  # Targets of each kind (one w; a w per layer): image batches have 2N rows.
PROMPTS = ["a cat", "the dog"]  # Every text batch: the text tower compiles once.
STEPS = 100  # Of each inversion.


def per_image_mse(a, b):
    return np.mean(np.square(np.asarray(a) - np.asarray(b)), axis=(1, 2, 3))


@pytest.fixture(scope="module")
def gan():
    """(generator, params, w_avg, render(ws), sample(key) -> 2N ws) of the tiny config."""
    g = stylegan2.generator_from_config(stylegan2.tiny_config())
    z = jnp.zeros((1, g.z_dim))
    params = jax.jit(lambda key: g.init(key, z, deterministic=True)["params"])(jax.random.key(0))
    params = nn.unbox(params)
    w_avg = inversion.estimate_w_avg(g, params, jax.random.key(1), 2048)
    render = jax.jit(lambda ws: inversion.synthesize(g, params, ws))
    sample = jax.jit(lambda key: inversion.random_ws(g, params, key, 2 * N))
    return g, params, w_avg, render, sample


@pytest.fixture(scope="module")
def targets(gan):
    """ws [2N, num_ws, w_dim]: N from one w each (W), N with an independent w per layer (W+)."""
    g, _, _, render, sample = gan
    in_w = sample(jax.random.key(2))[:N]
    per_layer = jnp.concatenate([sample(jax.random.key(3 + i))[:, 0] for i in range(3)])
    in_w_plus = per_layer[: N * g.num_ws].reshape(N, g.num_ws, g.w_dim)
    ws = jnp.concatenate([in_w, in_w_plus])
    return ws, render(ws)


def colour_means(scale, images):
    """[B, C] mean colour of each image, times `scale` [C]: a feature function with params."""
    return jnp.mean(images, axis=(1, 2)) * scale


def test_inversion_reconstructs_w_and_w_plus_targets(gan, targets):
    g, params, w_avg, render, _ = gan
    ws, images = targets
    start_images = render(jnp.broadcast_to(w_avg, ws.shape))
    start = per_image_mse(start_images, images)
    features = inversion.ParamFn(colour_means, jnp.array([1.0, 2.0, 3.0]))
    start_features = np.mean(np.square(features(start_images) - features(images)))
    fits = {
        space: inversion.invert_latent(
            g,
            params,
            images,
            w_avg=w_avg,
            space=space,
            steps=STEPS,
            learning_rate=0.1,
            feature_fn=features,
            feature_weight=0.5,
        )
        for space in inversion.SPACES
    }
    mse = {space: per_image_mse(fit.images, images) for space, fit in fits.items()}
    print({space: (m[:N].mean(), m[N:].mean()) for space, m in mse.items()}, start.mean())
    assert mse["w"][:N].mean() < 0.2 * start[:N].mean()  # W targets, inverted in W.
    assert mse["w+"][N:].mean() < 0.2 * start[N:].mean()  # W+ targets, inverted in W+.
    assert mse["w+"][N:].mean() < 0.5 * mse["w"][N:].mean()  # W cannot reach W+ targets.
    for fit in fits.values():
        assert fit.ws.shape == (2 * N, g.num_ws, g.w_dim) and fit.losses.shape == (STEPS + 1,)
        # The first loss is at w_avg: pixel MSE + feature_weight * feature MSE.
        np.testing.assert_allclose(fit.losses[0], start.mean() + 0.5 * start_features, rtol=1e-4)
        assert fit.losses[-1] < 0.2 * fit.losses[0]
        np.testing.assert_allclose(render(fit.ws), fit.images, atol=1e-5)
    w = np.asarray(fits["w"].ws)
    assert np.array_equal(w, np.broadcast_to(w[:, :1], w.shape))  # One w per image.


def test_wrong_targets_are_refused_with_both_shapes(gan, targets):
    g, params, w_avg, _, _ = gan
    _, images = targets
    too_big = jnp.zeros((2, 32, 32, 3))
    with pytest.raises(DataError, match=r"\(2, 32, 32, 3\).*16x16 images with 3 channels"):
        inversion.invert_latent(g, params, too_big, w_avg=w_avg, steps=1)
    with pytest.raises(ValueError, match=r"\(8, 16, 16, 1\).*resolution=16, img_channels=3"):
        inversion.invert_latent(g, params, images[..., :1], w_avg=w_avg, steps=1)
    with pytest.raises(ConfigError, match="space='z'"):
        inversion.invert_latent(g, params, images, w_avg=w_avg, space="z", steps=1)
    with pytest.raises(DataError, match=r"w_avg of shape \(16,\)"):
        inversion.invert_latent(g, params, images, w_avg=w_avg[:16], steps=1)


def test_encoder_beats_w_avg_on_held_out_samples(gan):
    g, params, w_avg, render, sample = gan
    trained = inversion.train_encoder(
        g, params, w_avg=w_avg, rng=jax.random.key(10), steps=300, batch_size=2 * N,
        learning_rate=2e-3,
    )  # fmt: skip
    held_out = render(sample(jax.random.key(11)))
    ws, recon = inversion.encode(trained.encoder, trained.params, g, params, held_out, w_avg)
    baseline = per_image_mse(render(jnp.broadcast_to(w_avg, ws.shape)), held_out).mean()
    encoded = per_image_mse(recon, held_out).mean()
    print(f"encoder mse {encoded:.4f}, w_avg baseline {baseline:.4f}")
    assert ws.shape == (2 * N, g.num_ws, g.w_dim)
    assert encoded < 0.5 * baseline
    assert trained.losses[-30:].mean() < 0.7 * trained.losses[:30].mean()


@pytest.fixture(scope="module")
def clip_ref(tmp_path_factory):
    """(directory, torch model): a random-weight transformers CLIPModel in test_clip_vision's
    shapes, saved as Hugging Face does, with its tokenizer and preprocessor config."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=TEXT, vision_config=VISION, projection_dim=PROJECTION
    )
    model = perturb(transformers.CLIPModel(config).eval(), 0)
    directory = tmp_path_factory.mktemp("guide_clip")
    model.save_pretrained(directory, safe_serialization=True)
    clip_tokenizer().save_pretrained(directory)
    transformers.CLIPImageProcessorPil(**PROCESSOR).save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def guide(clip_ref):
    return clip_editing.load_clip_guidance(clip_ref[0])


def test_clip_guidance_matches_transformers(targets, guide, clip_ref):
    _, images = targets
    _, model = clip_ref
    embedder = guide.image_fn.apply
    assert isinstance(embedder, clip_editing.CLIPImageEmbedder)
    image_embeds = np.asarray(jax.jit(embedder)(guide.image_fn.params, images))
    text_embeds = np.asarray(guide.text_embedding(PROMPTS))
    assert image_embeds.shape == (2 * N, PROJECTION) and text_embeds.shape == (2, PROJECTION)

    pixels = np.array(embedder.preprocessing(images)).transpose(0, 3, 1, 2).copy()
    tokens = clip_tokenizer()(PROMPTS, padding="max_length", max_length=LENGTH, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    unit = lambda x: x.numpy() / np.linalg.norm(x.numpy(), axis=-1, keepdims=True)
    np.testing.assert_allclose(image_embeds, unit(image), atol=1e-4)
    np.testing.assert_allclose(text_embeds, unit(text), atol=1e-4)


def test_styleclip_raises_similarity_within_the_l2_bound(gan, guide):
    g, params, _, _, sample = gan
    start = sample(jax.random.key(20))
    text = guide.text_embedding(PROMPTS)[0]
    runs = {
        weight: clip_editing.styleclip_optimize(
            g,
            params,
            guide.image_fn,
            text,
            start,
            steps=60,
            learning_rate=0.05,
            l2_weight=weight,
        )
        for weight in (0.001, 0.1)
    }
    distance = {
        w: float(jnp.mean(jnp.sum(jnp.square(r.ws - start), (1, 2)))) for w, r in runs.items()
    }
    final_cos = {w: float(r.similarity[-1]) for w, r in runs.items()}
    print({w: (float(r.similarity[0]), final_cos[w], distance[w]) for w, r in runs.items()})
    weak, strong = runs[0.001], runs[0.1]
    assert final_cos[0.001] > float(weak.similarity[0]) + 0.2  # CLIP finds the images closer.
    assert final_cos[0.1] > float(strong.similarity[0])
    assert distance[0.1] < 0.5 * distance[0.001]  # A larger l2_weight stays nearer the start.
    for weight, run in runs.items():
        # The L2 term is part of a loss that fell: it is at most the loss at the start.
        final_loss = 1 - final_cos[weight] + weight * distance[weight]
        np.testing.assert_allclose(run.losses[-1], final_loss, rtol=1e-4)
        assert final_loss < float(run.losses[0])
        assert weight * distance[weight] <= float(run.losses[0])
        np.testing.assert_allclose(run.losses[0], 1 - run.similarity[0], atol=1e-5)
        assert run.losses.shape == run.similarity.shape == (61,)


def test_nada_turns_the_generator_along_the_text_direction(gan, guide):
    g, params, _, _, sample = gan
    before = jax.tree.map(np.array, params)
    source, target = guide.text_embedding(PROMPTS)  # From "a cat" to "the dog".
    result = clip_editing.nada_finetune(
        g, params, guide.image_fn, source, target, rng=jax.random.key(30), steps=60,
        batch_size=N, learning_rate=0.02,
    )  # fmt: skip
    history = np.asarray(result.losses)
    print("nada losses", history[:3], history[-3:])
    assert np.isfinite(history).all()
    assert history[0] == pytest.approx(1.0, abs=1e-6)  # The copy starts equal: no direction.
    assert history[-10:].mean() < history[:10].mean() - 0.15
    # The frozen generator is untouched, bit for bit; only the synthesis copy moved.
    same = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), before, params)
    assert all(jax.tree.leaves(same))
    same = jax.tree.map(
        lambda a, b: np.array_equal(a, b), before["mapping"], result.params["mapping"]
    )
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before["synthesis"], result.params["synthesis"]
    )
    assert any(jax.tree.leaves(moved))
    # On held-out ws: the fine-tuned copy's change follows the text; an untouched copy's is nil.
    ws = sample(jax.random.key(31))
    args = (guide.image_fn, source, target, ws)
    tuned = float(clip_editing.nada_directional_loss(g, params, result.params, *args))
    untouched = float(clip_editing.nada_directional_loss(g, params, before, *args))
    print(f"directional loss: tuned {tuned:.3f}, untouched {untouched:.3f}")
    assert untouched == pytest.approx(1.0, abs=1e-6)
    assert tuned < untouched - 0.2
