"""StyleGAN2 networks at the tiny 16 px config: shapes, w indexing, truncation, mixing, noise."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genctl_jax.configlib import DEFAULT_RULES
from genctl_jax.errors import ConfigError
from genctl_jax.models.gan import stylegan2
from genctl_jax.nn.gan_layers import AdaIN, ModulatedConv

TINY = stylegan2.tiny_config()
B, Z, RES, NUM_WS = 4, 32, 16, 6
# The w index each styled layer reads (module docstring): b4 uses 0, 1; level l >= 1 uses
# 2l - 1, 2l for its layers and 2l + 1 for its toRGB.
W_INDEX = {
    "b4/conv1": 0,
    "b4/torgb": 1,
    "b8/conv0": 1,
    "b8/conv1": 2,
    "b8/torgb": 3,
    "b16/conv0": 3,
    "b16/conv1": 4,
    "b16/torgb": 5,
}


def randn(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


class Net:
    """A generator with initialised params (noise strengths moved off 0) and jitted calls."""

    def __init__(self, **overrides):
        config = TINY.copy_and_resolve_references()
        config.update(overrides)
        self.module = g = stylegan2.generator_from_config(config)
        init = jax.jit(lambda key, z: g.init(key, z, deterministic=True)["params"])
        self.boxed = init(jax.random.PRNGKey(0), randn(0, B, Z))
        self.params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.5 if path[-1].key == "strength" else x, nn.unbox(self.boxed)
        )
        self.synth = jax.jit(
            lambda p, ws, key, det: g.apply(
                {"params": p}, ws, det, rngs={"noise": key}, method="synthesize"
            ),
            static_argnums=3,
        )
        self.map = jax.jit(lambda p, z: g.apply({"params": p}, z, method="map"))

    def image(self, ws, key=None, deterministic=True):
        key = jax.random.PRNGKey(1) if key is None else key
        return np.asarray(self.synth(self.params, ws, key, deterministic))

    def styles_seen(self, ws):
        """{layer path: the w it was called with} for every ModulatedConv / AdaIN."""

        def run(p, ws):
            seen = {}

            def record(next_fun, args, kwargs, context):
                module = context.module
                if context.method_name == "__call__" and isinstance(module, ModulatedConv | AdaIN):
                    path = module.path[1:]  # drop 'synthesis'
                    if path[-1] in ("conv", "adain"):
                        path = path[:-1]
                    seen.setdefault("/".join(path), []).append(args[1])
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(record):
                self.module.apply({"params": p}, ws, True, method="synthesize")
            return seen

        return jax.jit(run)(self.params, ws)


@pytest.fixture(scope="module")
def skip_net():
    return Net()


@pytest.fixture(scope="module")
def adain_net():
    return Net(style_block="adain")


@pytest.fixture(scope="module")
def resnet_net():
    return Net(architecture="resnet")


def assert_partitioned(boxed):
    known = {name for name, _ in DEFAULT_RULES}
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
        assert set(leaf.names) <= known, leaf.names


def test_widths_and_num_ws():
    assert [stylegan2.num_ws_for(r) for r in (4, 16, 256, 1024)] == [2, 6, 14, 18]
    assert [stylegan2.channels_at(r, 256, 32) for r in (4, 8, 16)] == [32, 32, 16]
    assert [stylegan2.channels_at(r, 32768, 512) for r in (64, 128, 1024)] == [512, 256, 32]


def test_generator_and_discriminator_shapes(skip_net):
    ws = skip_net.map(skip_net.params, randn(1, B, Z))
    assert ws.shape == (B, NUM_WS, 32) and skip_net.module.num_ws == NUM_WS
    np.testing.assert_array_equal(ws, jnp.broadcast_to(ws[:, :1], ws.shape))
    images = skip_net.image(ws)
    assert images.shape == (B, RES, RES, 3) and images.dtype == np.float32
    assert np.all(np.isfinite(images)) and images.std() > 0.01
    assert_partitioned(skip_net.boxed)
    const = skip_net.boxed["synthesis"]["b4"]["const"]
    assert const.value.shape == (4, 4, 32)

    disc = stylegan2.discriminator_from_config(TINY)
    boxed = jax.jit(disc.init)(jax.random.PRNGKey(2), images)["params"]
    assert_partitioned(boxed)
    assert boxed["b16"]["conv0"]["kernel"].value.shape == (3, 3, 16, 16)
    assert boxed["b8"]["skip"]["kernel"].value.shape == (1, 1, 32, 32)
    assert boxed["b4"]["conv"]["kernel"].value.shape == (3, 3, 33, 32)  # + minibatch std
    logits = jax.jit(disc.apply)({"params": boxed}, images)
    assert logits.shape == (B,) and logits.dtype == jnp.float32


@pytest.mark.parametrize("net", ["skip_net", "adain_net"])
def test_each_layer_reads_its_w_index(net, request):
    net = request.getfixturevalue(net)
    ws = randn(3, B, NUM_WS, 32)
    seen = net.styles_seen(ws)
    assert sorted(seen) == sorted(W_INDEX)
    for path, index in W_INDEX.items():
        assert len(seen[path]) == 1, path
        np.testing.assert_array_equal(seen[path][0], ws[:, index], err_msg=path)


@pytest.mark.parametrize("net", ["skip_net", "adain_net", "resnet_net"])
def test_every_w_changes_the_image(net, request):
    net = request.getfixturevalue(net)
    assert_partitioned(net.boxed)
    ws = randn(4, B, NUM_WS, 32)
    base = net.image(ws)
    assert base.shape == (B, RES, RES, 3)
    for i in range(NUM_WS):  # i = NUM_WS - 1 drives only the last toRGB
        changed = net.image(ws.at[:, i].add(1.0))
        assert np.abs(changed - base).max() > 1e-3, i
    # A w change reaches only its own sample.
    changed = net.image(ws.at[0, NUM_WS - 1].add(1.0))
    np.testing.assert_array_equal(changed[1:], base[1:])


def test_adain_blocks_replace_modulated_convs(adain_net):
    layer = adain_net.boxed["synthesis"]["b8"]["conv0"]
    assert set(layer) == {"conv", "noise", "bias", "adain"}
    assert set(layer["conv"]) == {"kernel"}  # plain equalised conv: no style affine
    assert "style" in layer["adain"]


def test_resnet_generator_has_one_torgb(resnet_net):
    synthesis = resnet_net.boxed["synthesis"]
    assert [b for b in ("b4", "b8", "b16") if "torgb" in synthesis[b]] == ["b16"]
    assert "skip" in synthesis["b8"] and "skip" in synthesis["b16"]


def test_noise_rngs_and_deterministic_mode(skip_net):
    ws = randn(5, B, NUM_WS, 32)
    k1, k2 = jax.random.PRNGKey(10), jax.random.PRNGKey(11)
    a = skip_net.image(ws, k1, deterministic=False)
    b = skip_net.image(ws, k2, deterministic=False)
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(a, skip_net.image(ws, k1, deterministic=False))
    det = skip_net.image(ws, k1)
    np.testing.assert_array_equal(det, skip_net.image(ws, k2))
    assert np.abs(det - a).max() > 1e-3


def test_mapping_pixel_norm_is_scale_invariant(skip_net):
    z = randn(6, B, Z)
    w = skip_net.map(skip_net.params, z)
    np.testing.assert_allclose(skip_net.map(skip_net.params, 3.7 * z), w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(skip_net.map(skip_net.params, 0.25 * z), w, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(skip_net.map(skip_net.params, randn(7, B, Z)) - w)).max() > 1e-3


def test_truncation(skip_net):
    g, p = skip_net.module, skip_net.params
    ws, w_avg = randn(8, B, NUM_WS, 32), randn(9, 32)
    np.testing.assert_array_equal(stylegan2.truncate(ws, w_avg, 1.0), ws)
    cut = stylegan2.truncate(ws, w_avg, 0.3, cutoff=2)
    np.testing.assert_allclose(cut[:, :2], w_avg + 0.3 * (ws[:, :2] - w_avg), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cut[:, 2:], ws[:, 2:])

    # Through Generator.__call__ (z_mix exercises mixing; psi = 0 must erase it too).
    call = jax.jit(
        lambda p, z, z_mix, w_avg, psi, key: g.apply(
            {"params": p},
            z,
            z_mix=z_mix,
            w_avg=w_avg,
            psi=psi,
            deterministic=True,
            rngs={"mixing": key},
        )  # fmt: skip
    )
    key = jax.random.PRNGKey(3)
    z1, z2 = randn(10, B, Z), randn(11, B, Z)
    avg_image = skip_net.image(stylegan2.broadcast_ws(jnp.tile(w_avg, (B, 1)), NUM_WS))
    for z in (z1, z2):
        np.testing.assert_allclose(call(p, z, z2, w_avg, 0.0, key), avg_image, atol=1e-5)
    # psi = 1 is the plain generator; mixing with itself changes nothing, with another z it does.
    plain = skip_net.image(skip_net.map(p, z1))
    np.testing.assert_allclose(call(p, z1, z1, w_avg, 1.0, key), plain, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(call(p, z1, z2, w_avg, 1.0, key)) - plain).max() > 1e-3
    with pytest.raises(ValueError, match="needs w_avg"):
        g.apply({"params": p}, z1, psi=0.5, deterministic=True)


def test_update_w_avg_is_an_ema():
    w_avg, w = randn(12, 32), randn(13, 5, 32)
    expected = 0.995 * np.asarray(w_avg) + 0.005 * np.asarray(w).mean(axis=0)
    np.testing.assert_allclose(stylegan2.update_w_avg(w_avg, w), expected, rtol=1e-6, atol=1e-6)
    ws = stylegan2.broadcast_ws(w, NUM_WS)
    np.testing.assert_allclose(stylegan2.update_w_avg(w_avg, ws), expected, rtol=1e-6, atol=1e-6)
    out = stylegan2.update_w_avg(w_avg, w, beta=0.5)
    np.testing.assert_allclose(out, 0.5 * (w_avg + w.mean(axis=0)), rtol=1e-6, atol=1e-6)


def test_mix_styles():
    ws1, ws2 = randn(14, 64, NUM_WS, 3), randn(15, 64, NUM_WS, 3)
    key = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(stylegan2.mix_styles(key, ws1, ws2, 0.0), ws1)
    mixed = np.asarray(stylegan2.mix_styles(key, ws1, ws2, 1.0))
    from_first = np.all(mixed == np.asarray(ws1), axis=-1)  # [B, num_ws]
    from_second = np.all(mixed == np.asarray(ws2), axis=-1)
    crossovers = from_first.sum(axis=1)
    assert np.all((crossovers >= 1) & (crossovers <= NUM_WS - 1))
    for b, c in enumerate(crossovers):
        assert from_first[b, :c].all() and from_second[b, c:].all(), b
    assert len(set(crossovers.tolist())) == NUM_WS - 1  # per sample, all crossovers occur
    half = np.asarray(stylegan2.mix_styles(key, ws1, ws2, 0.5))
    unmixed = np.all(half == np.asarray(ws1), axis=(1, 2))
    assert 10 < unmixed.sum() < 54


def test_conditional_mapping_and_projection_discriminator():
    mapping = stylegan2.MappingNetwork(z_dim=8, w_dim=16, num_classes=5, num_layers=2)
    z, labels = randn(16, 3, 8), jnp.array([0, 1, 4])
    boxed = mapping.init(jax.random.PRNGKey(5), z, labels)["params"]
    assert boxed["label_embed"]["embedding"].names == ("vocab", "embed")
    assert boxed["fc0"]["kernel"].value.shape == (24, 16)
    w = mapping.apply({"params": boxed}, z, labels)
    w2 = mapping.apply({"params": boxed}, z, jnp.array([2, 1, 4]))
    assert np.abs(np.asarray(w2[0] - w[0])).max() > 1e-3
    np.testing.assert_array_equal(w2[1:], w[1:])
    with pytest.raises(ValueError, match="pass labels"):
        mapping.apply({"params": boxed}, z)

    # Minibatch std (group 4 of 8: sample n is in group n % 2) and the label projection.
    disc = stylegan2.discriminator_from_config(TINY).clone(num_classes=5)
    images, labels = randn(17, 8, RES, RES, 3), jnp.arange(8) % 5
    boxed = jax.jit(disc.init)(jax.random.PRNGKey(6), images, labels)["params"]
    assert_partitioned(boxed)
    apply = jax.jit(disc.apply)
    logits = np.asarray(apply({"params": boxed}, images, labels))
    moved = np.asarray(apply({"params": boxed}, images.at[2].multiply(3.0), labels))
    same_group, other_group = [0, 4, 6], [1, 3, 5, 7]
    assert np.all(np.abs(moved[same_group] - logits[same_group]) > 1e-5), moved - logits
    np.testing.assert_array_equal(moved[other_group], logits[other_group])
    relabelled = np.asarray(apply({"params": boxed}, images, labels.at[0].set(3)))
    assert abs(relabelled[0] - logits[0]) > 1e-5
    np.testing.assert_array_equal(relabelled[1:], logits[1:])


def test_validate():
    def config(**model):
        m = TINY.copy_and_resolve_references()
        m.update(model)
        return ml_collections.ConfigDict({"model": m, "data": {"image_size": 16}})

    stylegan2.validate(config())
    stylegan2.validate(config(architecture="resnet", style_block="adain", num_classes=3))
    bad = [
        ({"architecture": "dense"}, "config.model.architecture='dense'"),
        ({"style_block": "spade"}, "config.model.style_block"),
        ({"resolution": 24}, "config.model.resolution=24"),
        ({"resolution": 32}, "config.data.image_size=16 differs"),
        ({"style_mixing_prob": 1.5}, "style_mixing_prob"),
        ({"channel_base": 8}, "channel_base=8"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            stylegan2.validate(config(**fields))
    c = config()
    c.model.unknown_field = 1
    with pytest.raises(ConfigError, match="unknown_field is not a stylegan2 field"):
        stylegan2.validate(c)
    networks = stylegan2.from_config(TINY)
    assert networks.generator.num_ws == NUM_WS and networks.discriminator.resolution == RES
