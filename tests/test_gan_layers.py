"""GAN layers against formulas recomputed in numpy from the modules' own params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genctl_jax.nn import gan_layers
from genctl_jax.nn.layers import CONV_AXES


def init(module, *args, **kwargs):
    """(boxed params, unboxed float64 numpy params) of `module` on `args`."""
    boxed = module.init(jax.random.PRNGKey(0), *args, **kwargs)["params"]
    return boxed, jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(boxed))


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def np_conv(x, k):
    """SAME cross-correlation of x [B, H, W, I] with k [kh, kw, I, O] (odd kernel), float64."""
    kh, kw = k.shape[:2]
    h, w = x.shape[1:3]
    xp = np.pad(np.float64(x), ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
    out = 0.0
    for dy in range(kh):
        for dx in range(kw):
            out = out + np.einsum("bhwi,io->bhwo", xp[:, dy : dy + h, dx : dx + w], k[dy, dx])
    return out


def np_instance_norm(x, eps):
    x = np.float64(x)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=(1, 2), keepdims=True) + eps)


def test_equalized_layers_scale_their_kernels_at_runtime():
    x = randn(0, 3, 6)
    dense = gan_layers.EqualizedDense(5, lr_multiplier=0.1, gain=2.0, bias_init=0.5)
    boxed, p = init(dense, x)
    assert boxed["kernel"].names == ("embed", "mlp") and boxed["bias"].names == ("vector",)
    # Stored N(0, 1/lr^2) and bias_init / lr, so the effective layer starts as He-init + 0.5.
    assert 5.0 < p["kernel"].std() < 15.0
    np.testing.assert_allclose(p["bias"] * 0.1, 0.5, rtol=1e-6)
    effective = p["kernel"] * 2.0 * 0.1 / np.sqrt(6)
    np.testing.assert_allclose(
        dense.apply({"params": boxed}, x), x @ effective + p["bias"] * 0.1, rtol=1e-5, atol=1e-5
    )

    x = randn(1, 2, 5, 5, 4)
    conv = gan_layers.EqualizedConv(3, kernel_size=3, gain=np.sqrt(2.0))
    boxed, p = init(conv, x)
    assert boxed["kernel"].names == CONV_AXES
    p["bias"] = np.arange(3.0)
    params = {"kernel": boxed["kernel"], "bias": jnp.arange(3.0)}
    effective = p["kernel"] * np.sqrt(2.0) / np.sqrt(3 * 3 * 4)
    np.testing.assert_allclose(
        conv.apply({"params": params}, x), np_conv(x, effective) + p["bias"], atol=1e-5
    )


def np_modulated_conv(p, x, w, demodulate, upsample):
    """StyleGAN2's formula per sample: scale, demodulate, ordinary conv, bias."""
    styles = w @ (p["affine"]["kernel"] / np.sqrt(w.shape[-1])) + p["affine"]["bias"]
    k = p["kernel"] / np.sqrt(np.prod(p["kernel"].shape[:3]))
    if upsample:
        x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    outs = []
    for b in range(x.shape[0]):
        kb = k * styles[b][None, None, :, None]
        if demodulate:
            kb = kb / np.sqrt(np.sum(kb**2, axis=(0, 1, 2)) + 1e-8)
        outs.append(np_conv(x[b : b + 1], kb)[0])
    return np.stack(outs) + p["bias"]


@pytest.mark.parametrize(
    "demodulate,upsample,fused",
    [(True, False, True), (True, True, False), (False, False, True), (False, True, False)],
)
def test_modulated_conv_matches_per_sample_formula(demodulate, upsample, fused):
    x, w = randn(2, 3, 5, 5, 4), randn(3, 3, 8)
    module = gan_layers.ModulatedConv(6, demodulate=demodulate, upsample=upsample, fused=fused)
    boxed, p = init(module, x, w)
    assert boxed["kernel"].names == CONV_AXES
    assert boxed["affine"]["kernel"].names == gan_layers.STYLE_AXES
    np.testing.assert_allclose(p["affine"]["bias"], 1.0)  # style bias starts at 1
    # Move the affine bias and output bias off their init so every term is exercised.
    boxed["bias"] = boxed["bias"].replace_boxed(jnp.linspace(-1.0, 1.0, 6))
    boxed["affine"]["bias"] = boxed["affine"]["bias"].replace_boxed(jnp.linspace(0.5, 1.5, 4))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(boxed))
    y = module.apply({"params": boxed}, x, w)
    assert y.shape == (3, 10 if upsample else 5, 10 if upsample else 5, 6)
    expected = np_modulated_conv(p, x, w, demodulate, upsample)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_demodulation_preserves_unit_variance():
    x, w = randn(4, 2, 24, 24, 64), randn(5, 2, 16)
    module = gan_layers.ModulatedConv(64, use_bias=False)
    boxed, _ = init(module, x[:1, :4, :4], w[:1])
    y = np.asarray(module.apply({"params": boxed}, x, w))
    # Interior pixels (no zero padding in their receptive field), every channel and sample.
    std = y[:, 1:-1, 1:-1].std(axis=(1, 2))
    assert np.all(np.abs(std - 1.0) < 0.1), (std.min(), std.max())
    assert abs(y[:, 1:-1, 1:-1].std() - 1.0) < 0.03


def np_minibatch_stddev(x, group_size, num_features):
    n, h, w, c = x.shape
    g = min(group_size, n)
    m = n // g
    stats = np.zeros((n, num_features))
    for i in range(n):
        members = np.float64(x[[i % m + j * m for j in range(g)]])  # [G, H, W, C]
        std = np.sqrt(members.var(axis=0) + 1e-8)
        chunks = std.reshape(h, w, num_features, c // num_features)
        stats[i] = chunks.mean(axis=(0, 1, 3))
    return np.concatenate([x, np.broadcast_to(stats[:, None, None], (n, h, w, num_features))], -1)


@pytest.mark.parametrize("batch,group,features", [(8, 4, 2), (2, 4, 1)])
def test_minibatch_stddev_matches_numpy(batch, group, features):
    x = randn(6, batch, 3, 3, 6) * np.arange(1, 7, dtype=np.float32)
    y = gan_layers.minibatch_stddev(jnp.asarray(x), group, features)
    assert y.shape == (batch, 3, 3, 6 + features)
    np.testing.assert_allclose(y, np_minibatch_stddev(x, group, features), rtol=1e-5)


def test_minibatch_stddev_rejects_uneven_groups():
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        gan_layers.minibatch_stddev(jnp.zeros((6, 2, 2, 3)), 4)


def np_resize_nearest(m, h, w):
    """PyTorch's nearest rule: output index i reads floor(i * in / out)."""
    rows = [int(np.floor(i * m.shape[1] / h)) for i in range(h)]
    cols = [int(np.floor(j * m.shape[2] / w)) for j in range(w)]
    return m[:, rows][:, :, cols]


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_spade_matches_formula(norm):
    x = randn(7, 2, 4, 4, 4) * 3.0 + 1.0
    labels = np.random.default_rng(8).integers(0, 5, (2, 6, 6))
    label_map = np.eye(5, dtype=np.float32)[labels]  # one-hot [2, 6, 6, 5]
    module = gan_layers.SPADE(norm=norm, num_groups=2, hidden=8)
    boxed, p = init(module, x, label_map)
    assert boxed["shared"]["kernel"].names == CONV_AXES
    boxed = jax.tree.map(lambda a: a + 0.05, boxed)  # exercise the zero-initialised biases
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(boxed))

    m = np_resize_nearest(label_map, 4, 4)
    np.testing.assert_array_equal(m[:, 2, 3], label_map[:, 3, 4])  # floor(2*6/4), floor(3*6/4)
    actv = np.maximum(np_conv(m, p["shared"]["kernel"]) + p["shared"]["bias"], 0.0)
    gamma = np_conv(actv, p["gamma"]["kernel"]) + p["gamma"]["bias"]
    beta = np_conv(actv, p["beta"]["kernel"]) + p["beta"]["bias"]
    if norm == "instance":
        normed = np_instance_norm(x, 1e-5)
    else:  # two groups of two channels
        normed = np.concatenate([np_group(x[..., :2]), np_group(x[..., 2:])], axis=-1)
    expected = normed * (1.0 + gamma) + beta
    y = module.apply({"params": boxed}, x, label_map)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def np_group(x, eps=1e-5):
    x = np.float64(x)
    return (x - x.mean(axis=(1, 2, 3), keepdims=True)) / np.sqrt(
        x.var(axis=(1, 2, 3), keepdims=True) + eps
    )


def test_spade_rejects_unknown_norm():
    with pytest.raises(ValueError, match="'instance' or 'group'"):
        gan_layers.SPADE(norm="batch").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 3))
        )


def test_adain_matches_formula():
    x, w = randn(9, 2, 4, 4, 3) * 2.0 - 1.0, randn(10, 2, 6)
    module = gan_layers.AdaIN()
    boxed, p = init(module, x, w)
    assert boxed["style"]["kernel"].names == gan_layers.STYLE_AXES
    boxed = jax.tree.map(lambda a: a + 0.1, boxed)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(boxed))
    style = w @ (p["style"]["kernel"] / np.sqrt(6)) + p["style"]["bias"]
    scale, bias = style[:, None, None, :3], style[:, None, None, 3:]
    expected = np_instance_norm(x, 1e-8) * (1.0 + scale) + bias
    np.testing.assert_allclose(module.apply({"params": boxed}, x, w), expected, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_noise_injection(per_channel):
    x = randn(11, 2, 8, 8, 3)
    module = gan_layers.NoiseInjection(per_channel=per_channel)
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    boxed = module.init(rngs, x)["params"]
    assert boxed["strength"].value.shape == ((3,) if per_channel else (1,))
    # Fresh: strength 0, the identity even with noise.
    np.testing.assert_array_equal(
        module.apply({"params": boxed}, x, rngs={"noise": rngs["noise"]}), x
    )

    strength = jnp.array([0.3, -0.2, 0.5]) if per_channel else jnp.array([0.3])
    params = {"strength": strength}
    noise = randn(12, 2, 8, 8, 1)
    y = module.apply({"params": params}, x, noise)
    np.testing.assert_allclose(y, x + np.asarray(strength) * noise, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(module.apply({"params": params}, x, deterministic=True), x)

    drawn = (module.apply({"params": params}, x, rngs={"noise": rngs["noise"]}) - x) / strength
    drawn = np.asarray(drawn)
    np.testing.assert_allclose(drawn, drawn[..., :1].repeat(3, -1), rtol=1e-4, atol=1e-5)
    assert 0.7 < drawn[..., 0].std() < 1.3
