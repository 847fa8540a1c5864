"""pix2pix / pix2pixHD / SPADE networks: receptive field, shapes, skips, dropout, pooling, labels.

Params for numeric checks come from `random_params` (numpy, scaled 1/sqrt(fan_in), on the
shapes of `jax.eval_shape(init)`), which skips compiling each network's random init; shape
and sharding checks trace `init` abstractly.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from genctl_jax import configlib
from genctl_jax.errors import ConfigError
from genctl_jax.models.gan import pix2pix, spade
from genctl_jax.parallel import sharding

KEY = jax.random.PRNGKey(0)


def abstract_init(module, *args, **kwargs):
    """The boxed param tree of `module` on `args`, as ShapeDtypeStructs (nothing compiled)."""
    return jax.eval_shape(lambda *a: module.init(KEY, *a, **kwargs), *args)["params"]


def random_params(module, *args, seed=0, **kwargs):
    """{'params': ...} with N(0, 1/fan_in) kernels and zero biases, built in numpy."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if leaf.ndim == 1:
            return np.zeros(leaf.shape, np.float32)
        fan_in = math.prod(leaf.shape[:-1])
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return {"params": jax.tree.map(fill, nn.unbox(abstract_init(module, *args, **kwargs)))}


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv_out(size, padding, stride, kernel=4):
    return (size + 2 * padding - kernel) // stride + 1


# ------------------------------------------------------------------ PatchGAN


def test_patchgan_sees_exactly_70x70_pixels():
    d = pix2pix.PatchDiscriminator(base_channels=4, num_layers=3, norm="none", padding=1)
    image, cond = randn(0, 1, 96, 96, 3), randn(1, 1, 96, 96, 2)
    params = random_params(d, image, cond)

    # 96 -> 48 -> 24 -> 12 (stride 2, pad 1) -> 11 -> 10 (stride 1, pad 1).
    logits, features = jax.jit(d.apply)(params, image, cond)
    assert logits.shape == (1, 10, 10, 1) and logits.dtype == jnp.float32
    assert [f.shape[1] for f in features] == [48, 24, 12, 11]
    assert pix2pix.patch_output_size(96, 3, 1) == 10

    def center_logit(image, cond):
        return d.apply(params, image, cond)[0][0, 5, 5, 0]

    g_image, g_cond = jax.jit(jax.grad(center_logit, argnums=(0, 1)))(image, cond)
    support = (np.abs(g_image).sum(-1) + np.abs(g_cond).sum(-1))[0] > 0
    rows, cols = np.nonzero(support.any(1))[0], np.nonzero(support.any(0))[0]
    # Logit o's window starts at 8 * o - 23 (total stride 8, total padding 1+2+4+8+8).
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (17, 86, 17, 86)
    assert support.sum() == 70 * 70 == pix2pix.receptive_field(3) ** 2

    # pix2pix's 256 px case: a 30 x 30 grid of 70 x 70 patches.
    big = abstract_init(d, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    shape = jax.eval_shape(
        d.apply, {"params": big}, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    )[0].shape
    assert shape == (1, 30, 30, 1)


# ------------------------------------------------------------------ U-Net generator


@pytest.fixture(scope="module")
def unet():
    g = pix2pix.UNetGenerator(base_channels=8, num_downs=4)
    x = randn(2, 2, 16, 16, 3)
    params = random_params(g, x, seed=3)

    def run(params, x, seed, train):
        return g.apply(params, x, train=train, rngs={"dropout": jax.random.PRNGKey(seed)})

    return g, x, params, jax.jit(run, static_argnums=3)


def test_unet_generator_shape_range_and_skips(unet):
    g, x, params, run = unet
    y = run(params, x, 0, False)
    assert y.shape == (2, 16, 16, 3) and y.dtype == jnp.float32
    assert 0 < np.abs(y).max() < 1
    assert not np.allclose(y[0], y[1], atol=1e-3)  # Depends on the input.

    # Zero the innermost encoder conv: the bottleneck is 0 whatever the input, so any input
    # dependence left comes through the skips.
    cut = jax.tree.map(np.copy, params)
    inner = cut["params"][f"down_{g.num_downs - 1}"]
    inner["kernel"][:] = 0.0
    inner["bias"][:] = 0.0
    y_cut = run(cut, x, 0, False)
    assert np.abs(np.asarray(y_cut) - np.asarray(y)).max() > 1e-3  # The bottleneck mattered,
    assert np.abs(y_cut[0] - y_cut[1]).mean() > 1e-2  # and the skips carry the input.


def test_unet_dropout_only_in_training(unet):
    g, x, params, run = unet
    eval_a, eval_b = run(params, x, 1, False), run(params, x, 2, False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_a2, train_b = (run(params, x, s, True) for s in (1, 1, 2))
    np.testing.assert_array_equal(train_a, train_a2)  # Same rng, same mask.
    assert np.abs(train_a - train_b).mean() > 1e-3
    assert np.abs(train_a - eval_a).mean() > 1e-3

    noisy = pix2pix.UNetGenerator(base_channels=8, num_downs=4, dropout_at_test=True)
    a, b = (noisy.apply(params, x, rngs={"dropout": jax.random.PRNGKey(s)}) for s in (1, 2))
    assert np.abs(a - b).mean() > 1e-3  # The paper's test-time noise.


def test_unet_rejects_sizes_it_cannot_halve():
    g = pix2pix.UNetGenerator(base_channels=8, num_downs=4)
    with pytest.raises(ValueError, match="multiples of 2\\^num_downs = 16"):
        abstract_init(g, jnp.zeros((1, 24, 24, 3)))


# ------------------------------------------------------------------ multi-scale D


def np_avg_pool_3x3(x):
    """3x3 stride-2 pad-1 average over in-image pixels only (count_include_pad=False)."""
    b, h, w, c = x.shape
    out = np.zeros((b, (h - 1) // 2 + 1, (w - 1) // 2 + 1, c))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            rows = slice(max(2 * i - 1, 0), min(2 * i + 2, h))
            cols = slice(max(2 * j - 1, 0), min(2 * j + 2, w))
            out[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
    return out


def test_avg_pool_matches_numpy_at_the_borders():
    x = randn(4, 2, 7, 10, 3)
    pooled = pix2pix.avg_pool_3x3(x)
    assert pooled.shape == (2, 4, 5, 3)
    np.testing.assert_allclose(pooled, np_avg_pool_3x3(x), rtol=1e-5, atol=1e-6)
    # Corner (0, 0) averages 2 x 2 in-image pixels, not 9 with zeros.
    np.testing.assert_allclose(pooled[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-5)


def test_multiscale_discriminator_scales():
    d = pix2pix.MultiScaleDiscriminator(num_scales=3, base_channels=4, num_layers=1, padding=2)
    image, cond = randn(5, 2, 20, 20, 3), randn(6, 2, 20, 20, 1)
    params = random_params(d, image, cond)
    outputs = jax.jit(d.apply)(params, image, cond)
    assert len(outputs) == 3
    size = 20
    for s, (logits, features) in enumerate(outputs):
        if s > 0:
            size = (size - 1) // 2 + 1  # 20, 10, 5
        l0 = conv_out(size, 2, 2)
        l1 = conv_out(l0, 2, 1)
        assert [f.shape for f in features] == [(2, l0, l0, 4), (2, l1, l1, 8)]
        assert logits.shape == (2, conv_out(l1, 2, 1), conv_out(l1, 2, 1), 1)

    # Scale 2 is scale_2's PatchGAN on concat(cond, image) pooled twice in numpy.
    x = np.concatenate([cond, image], axis=-1)
    pooled = np.float32(np_avg_pool_3x3(np_avg_pool_3x3(x)))
    patch = pix2pix.PatchDiscriminator(4, 1, padding=2)
    ref, _ = jax.jit(patch.apply)({"params": params["params"]["scale_2"]}, pooled)
    np.testing.assert_allclose(outputs[2][0], ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ global generator


def test_global_generator_shapes_and_reflection():
    x = randn(7, 2, 6, 5, 3)
    np.testing.assert_array_equal(
        pix2pix.reflect_pad(x, 3), np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="reflect")
    )

    g = pix2pix.GlobalGenerator(base_channels=8, num_downsampling=2, num_res_blocks=1)
    x = randn(8, 2, 16, 24, 3)
    y = jax.jit(g.apply)(random_params(g, x), x)
    assert y.shape == (2, 16, 24, 3) and 0 < np.abs(y).max() < 1
    p = nn.unbox(abstract_init(g, x))
    assert p["conv_in"]["kernel"].shape == (7, 7, 3, 8)
    assert p["res_0"]["conv_0"]["kernel"].shape == (3, 3, 32, 32)
    assert p["up_0"]["kernel"].shape == (3, 3, 16, 8)

    nearest = pix2pix.GlobalGenerator(
        out_channels=1, base_channels=8, num_downsampling=2, num_res_blocks=0, upsample="nearest"
    )
    shape = jax.eval_shape(lambda x: nearest.init_with_output(KEY, x)[0], x).shape
    assert shape == (2, 16, 24, 1)
    with pytest.raises(ValueError, match="bottleneck"):
        abstract_init(g, jnp.zeros((1, 4, 4, 3)))


# ------------------------------------------------------------------ SPADE


def test_spade_generator_follows_the_label_map():
    nets = spade.from_config(spade.tiny_config())
    g = nets.generator
    labels = np.zeros((1, 64, 64), np.int32)
    labels[:, 16:48, 32:] = 2
    params = random_params(g, labels, seed=9)
    run = jax.jit(g.apply)
    y = run(params, labels)
    assert y.shape == (1, 64, 64, 3) and 0 < np.abs(y).max() < 1

    # A 16 x 16 block between the 2 x 2 grid's samples: the first blocks see it at 4 x 4, the
    # last ones pixel by pixel. Random weights spread it through every 3x3 conv, so the local
    # effect is a few times, not orders of magnitude, the rest.
    changed = labels.copy()
    changed[:, 8:24, 8:24] = 4
    diff = np.abs(run(params, changed) - y).mean(-1)[0]
    region = np.zeros((64, 64), bool)
    region[8:24, 8:24] = True
    assert diff[region].mean() > 1e-2 and diff[region].mean() > 2 * diff[~region].mean()

    # A float map is used as given: the one-hot of the ids gives the same image.
    np.testing.assert_allclose(run(params, jax.nn.one_hot(labels, 5)), y, atol=1e-6)


def test_spade_vae_encoder_and_kl():
    nets = spade.from_config(spade.tiny_config(use_vae=True))
    g, enc = nets.generator, nets.encoder
    image = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    mu, logvar = jax.eval_shape(lambda x: enc.init_with_output(KEY, x)[0], image)
    assert mu.shape == logvar.shape == (2, 16)
    labels = jax.ShapeDtypeStruct((2, 64, 64), jnp.int32)

    def generate(labels, z=None, rngs=KEY):
        return g.init_with_output(rngs, labels, z)[0]

    z = jax.ShapeDtypeStruct((2, 16), jnp.float32)
    assert jax.eval_shape(generate, labels, z).shape == (2, 64, 64, 3)
    # Without z, it is drawn from the 'latent' stream.
    rngs = {"params": KEY, "latent": KEY}
    assert jax.eval_shape(lambda y: generate(y, rngs=rngs), labels).shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="expected \\[2, 16\\]"):
        jax.eval_shape(generate, labels, jax.ShapeDtypeStruct((2, 8), jnp.float32))

    # KL(N(mu, s^2) || N(0, 1)) = 0.5 (s^2 + mu^2 - 1 - ln s^2) per dimension.
    mu = np.array([[0.0, 1.0, -2.0], [0.5, 0.0, 0.0]])
    var = np.array([[1.0, 1.0, 4.0], [0.25, 2.0, 1.0]])
    per_dim = 0.5 * (var + mu**2 - 1.0 - np.log(var))
    expected = per_dim.sum(1).mean()  # (0 + 0.5 + 2.8069) and (0.3181 + 0.1534) over 2.
    kl = spade.kl_divergence(mu, np.log(var))
    np.testing.assert_allclose(kl, expected, rtol=1e-6)
    assert float(spade.kl_divergence(np.zeros((3, 4)), np.zeros((3, 4)))) == 0.0

    z = spade.reparameterize(KEY, jnp.full((20000, 2), 2.0), jnp.full((20000, 2), np.log(0.25)))
    np.testing.assert_allclose([z.mean(), z.std()], [2.0, 0.5], atol=0.02)


def test_label_ids_are_checked_on_the_host():
    ids = np.array([[[0, 1], [2, 5]]])
    with pytest.raises(ValueError, match="span \\[0, 5\\].*num_classes=5"):
        spade.one_hot_labels(ids, 5)
    with pytest.raises(ValueError, match="num_classes=5 channels"):
        spade.one_hot_labels(np.zeros((1, 2, 2, 4), np.float32), 5)
    # Traced ids cannot be checked: an out-of-range id one-hots to zeros.
    out = jax.jit(lambda i: spade.one_hot_labels(i, 5))(ids)
    np.testing.assert_array_equal(out[0, 1, 1], np.zeros(5))
    np.testing.assert_array_equal(out[0, 1, 0], np.eye(5)[2])


# ------------------------------------------------------------------ sharding and configs


def full_size_networks():
    """(name, module, abstract inputs) for every network at its paper size."""
    img = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((2, 256, 256), jnp.int32)
    p2p = pix2pix.from_config(pix2pix.default_config())
    hd = pix2pix.from_config(pix2pix.pix2pixhd_config())
    gau = spade.from_config(spade.default_config())
    vae_cfg = spade.default_config()
    vae_cfg.generator.use_vae = True
    vae = spade.from_config(vae_cfg)
    one_hot = jax.ShapeDtypeStruct((2, 256, 256, 151), jnp.float32)
    z = jax.ShapeDtypeStruct((2, 256), jnp.float32)
    return [
        ("unet", p2p.generator, (img,)),
        ("patchgan", p2p.discriminator, (img, img)),
        ("global", hd.generator, (img,)),
        ("pix2pixhd_d", hd.discriminator, (img, img)),
        ("spade", gau.generator, (labels,)),
        ("spade_d", gau.discriminator, (img, one_hot)),
        ("spade_vae", vae.generator, (labels, z)),
        ("style_encoder", vae.encoder, (img,)),
    ]


def test_every_param_carries_logical_names_and_shards():
    mesh = jax.make_mesh((2, 4, 1), configlib.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    rules = configlib.DEFAULT_RULES
    for name, module, args in full_size_networks():
        boxed = abstract_init(module, *args)
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves, name
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), (name, leaf)
            assert len(leaf.names) == leaf.value.ndim and all(leaf.names), (name, leaf.names)
        shardings = sharding.logical_to_shardings(boxed, mesh, rules, name)
        fraction = sharding.check_sufficiently_sharded(nn.unbox(boxed), shardings, mesh, 0.05, name)
        assert fraction < 0.05, (name, fraction)


def check(config_fn, size, module=pix2pix, **edits):
    config = ml_collections.ConfigDict({"model": config_fn(), "data": {"image_size": size}})
    for path, value in edits.items():
        section, field = path.split("__")
        config.model[section][field] = value
    module.validate(config)
    return config


def test_configs_validate_and_build():
    for fn, size in [
        (pix2pix.default_config, 256),
        (pix2pix.pix2pixhd_config, 512),
        (pix2pix.tiny_config, 16),
        (pix2pix.tiny_hd_config, 16),
    ]:
        nets = pix2pix.from_config(check(fn, size).model)
        assert nets.encoder is None
    assert isinstance(pix2pix.from_config(pix2pix.tiny_hd_config()).generator,
                      pix2pix.GlobalGenerator)  # fmt: skip
    check(spade.default_config, 256, spade)
    nets = spade.from_config(check(lambda: spade.tiny_config(True), 64, spade).model)
    assert nets.encoder.z_dim == nets.generator.z_dim == 16
    assert nets.discriminator.num_scales == 2 and nets.discriminator.padding == 2

    bad = [
        (pix2pix.default_config, 200, {}, "image_size=200 is not a multiple of 256"),
        (pix2pix.default_config, 256, {"generator__num_dropout_blocks": 8}, "in \\[0, 7\\]"),
        (pix2pix.default_config, 256, {"generator__kind": "resnet"}, "kind='resnet'"),
        (pix2pix.default_config, 256, {"generator__num_res_blocks": 2}, "num_res_blocks"),
        (pix2pix.default_config, 256, {"generator__norm": "batch"}, "norm='batch'"),
        (pix2pix.tiny_config, 16, {"discriminator__num_layers": 4}, "no logit left"),
        (pix2pix.tiny_hd_config, 4, {}, "bottleneck under 2 x 2"),
    ]
    for fn, size, edits, message in bad:
        with pytest.raises(ConfigError, match=message):
            check(fn, size, **edits)
    with pytest.raises(ConfigError, match="num_upsampling_layers=4"):
        check(spade.default_config, 256, spade, generator__num_upsampling_layers=4)
    with pytest.raises(ConfigError, match="image_size=100 is not a multiple of 32"):
        check(spade.default_config, 100, spade)
