"""The ADM/DDPM UNet: shapes, parameter count, sharding parity, conditioning, references."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from genctl_jax import configlib, models
from genctl_jax.errors import ConfigError
from genctl_jax.models import unet
from genctl_jax.nn import attention
from genctl_jax.nn.attention import AttentionBlock
from genctl_jax.nn.embeddings import sinusoidal_embedding
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.parallel import sharding

BATCH, SIZE = 8, 16  # The tiny model's inputs: 8 splits over data=2 x fsdp=4.


def model_of(**overrides):
    m = unet.tiny_config()
    m.update(overrides)
    return unet.from_config(m)


def inputs(batch=BATCH, size=SIZE, channels=3):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, channels))
    t = jnp.arange(batch, dtype=jnp.int32) * 997 % 1000
    labels = jnp.arange(batch, dtype=jnp.int32) % 5
    return x, t, labels


def perturb(params, scale=0.1, seed=7):
    """Adds noise to every leaf, so zero-initialised layers take part in the output.

    Host numpy noise: a jitted jax.random version costs ~10 s of compile on 2 CPU cores.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params
    )


@pytest.fixture(scope="module")
def tiny():
    """The tiny class-conditional model, its real init and perturbed params."""
    model = model_of()
    x, t, labels = inputs()
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x, t, labels))
    apply = jax.jit(model.apply)
    return model, params, perturb(params), apply


def param_count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_classes": 0},
        {"resblock_updown": True},
        {"scale_shift_norm": False},
        {"remat": True},
        {"dtype": "bfloat16"},
        {"num_heads": 2, "head_dim": -1, "out_channels": 6},
        {"channel_mult": (1, 2, 2), "attention_resolutions": (8, 4), "in_channels": 4},
        {"patch_size": 2, "attention_resolutions": (4,)},
    ],
)
def test_output_shape_and_dtype_of_every_variant(overrides):
    model = model_of(**overrides)
    x, t, labels = inputs(batch=2, channels=model.in_channels)
    labels = labels if model.num_classes else None

    def forward():
        variables = model.init(jax.random.PRNGKey(0), x, t, labels)
        return model.apply(
            variables, x, t, labels, train=True, rngs={"dropout": jax.random.PRNGKey(2)}
        )

    out = jax.eval_shape(forward)
    assert out.shape == (2, SIZE, SIZE, model.out_channels)
    assert out.dtype == jnp.float32


def test_ddpm_cifar10_variant_has_35_7m_params_and_32px_output():
    model = unet.from_config(unet.ddpm_cifar10_config())
    x, t = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
    variables = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), x, t)))
    count = param_count(variables)
    assert abs(count / 35.7e6 - 1) < 0.02, count
    assert count == 35_746_307  # DDPM's CIFAR-10 model, with one-head attention at 16 x 16.
    out = jax.eval_shape(lambda v: model.apply(v, x, t), variables)
    assert out.shape == (2, 32, 32, 3)


def test_fsdp_shards_the_large_params_of_the_cifar_model():
    model = unet.from_config(unet.ddpm_cifar10_config())
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t))["params"]
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    shardings = sharding.logical_to_shardings(boxed, mesh, configlib.DEFAULT_RULES, "params")
    fraction = sharding.check_sufficiently_sharded(nn.unbox(boxed), shardings, mesh, 0.05, "params")
    assert fraction < 0.01  # Only biases, norm scales and the 3-channel conv_out stay whole.
    assert shardings["down_1_res_0"]["conv_1"]["kernel"].spec == P(None, None, None, "fsdp")
    assert shardings["mid_attn"]["query"]["kernel"].spec[0] == "fsdp"
    assert shardings["time_embed"]["dense_1"]["kernel"].spec[1] == "fsdp"


def test_sharded_forward_matches_single_device(tiny):
    model, _, params, apply = tiny
    x, t, labels = inputs()
    expected = apply(params, x, t, labels)

    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    rules = configlib.DEFAULT_RULES
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, labels))
    shardings = sharding.logical_to_shardings(boxed, mesh, rules, "params")
    specs = {
        sharding._path_str(path): s.spec
        for path, s in jax.tree_util.tree_leaves_with_path(shardings)
    }
    assert specs["params/conv_in/kernel"] == P(None, None, None, "fsdp")
    assert specs["params/mid_attn/out/kernel"] == P("tensor", None, "fsdp")  # tensor=1 here
    assert specs["params/class_embed/embedding"] == P("tensor", "fsdp")
    assert sum("fsdp" in str(s) for s in specs.values()) >= 20

    sharded = jax.device_put(params, shardings)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    x_s, t_s, labels_s = (jax.device_put(a, batch) for a in (x, t, labels))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(model.apply)(sharded, x_s, t_s, labels_s)
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert float(jnp.abs(expected).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_zero_init_gives_zero_output_and_perturbed_params_do_not(tiny):
    _, params, perturbed, apply = tiny
    x, t, labels = inputs()
    assert np.all(np.asarray(apply(params, x, t, labels)) == 0.0)
    assert not np.any(params["params"]["conv_out"]["kernel"])
    assert not np.any(params["params"]["down_0_res_0"]["conv_2"]["kernel"])
    assert not np.any(params["params"]["mid_attn"]["out"]["kernel"])
    assert float(jnp.abs(apply(perturbed, x, t, labels)).mean()) > 1e-2


def test_null_class_and_labels(tiny):
    model, _, params, apply = tiny
    x, t, labels = inputs()
    null = jnp.full_like(labels, model.num_classes)
    unlabelled = apply(params, x, t, None)
    np.testing.assert_array_equal(np.asarray(unlabelled), np.asarray(apply(params, x, t, null)))
    other = apply(params, x, t, (labels + 1) % model.num_classes)
    labelled = apply(params, x, t, labels)
    assert float(jnp.abs(labelled - unlabelled).mean(axis=(1, 2, 3)).min()) > 1e-3
    assert float(jnp.abs(labelled - other).mean(axis=(1, 2, 3)).min()) > 1e-3
    # The timestep matters too.
    assert float(jnp.abs(apply(params, x, t + 1, labels) - labelled).mean()) > 1e-4
    with pytest.raises(ValueError, match="unconditional"):
        model_of(num_classes=0).init(jax.random.PRNGKey(0), x, t, labels)


def test_remat_resblock_updown_additive_grads_match_plain_with_dropout():
    """Gradients through dropout with and without nn.remat (same params, same rng)."""
    overrides = dict(resblock_updown=True, scale_shift_norm=False, num_classes=0, dropout=0.1)
    plain, remat = model_of(**overrides), model_of(remat=True, **overrides)
    x, t, _ = inputs(batch=2)
    params = perturb(nn.unbox(jax.jit(plain.init)(jax.random.PRNGKey(0), x, t)))
    assert "down_0_downsample" in params["params"]  # the down ResBlock
    assert params["params"]["down_0_downsample"]["emb_proj"]["kernel"].shape == (64, 16)

    def grads(model):
        def loss(p):
            out = model.apply(p, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
            return jnp.mean(jnp.square(out - x))

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_a, grads_a), (loss_b, grads_b) = grads(plain), grads(remat)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    assert float(jnp.abs(grads_a["params"]["conv_out"]["kernel"]).max()) > 0


def test_bfloat16_forward_is_close_to_float32(tiny):
    _, _, params, apply = tiny
    x, t, labels = inputs()
    bf16 = jax.jit(model_of(dtype="bfloat16").apply)(params, x, t, labels)
    f32 = apply(params, x, t, labels)
    assert bf16.dtype == jnp.float32
    error = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
    assert 0 < error < 0.05, error


def test_attention_block_matches_einsum_softmax():
    b, size, c, heads = 2, 4, 64, 4
    x = jax.random.normal(jax.random.PRNGKey(0), (b, size, size, c))
    block = AttentionBlock(num_heads=heads)
    params = perturb(nn.unbox(block.init(jax.random.PRNGKey(1), x)), scale=0.3)["params"]
    out = block.apply({"params": params}, x)

    # Reference: GroupNorm(32) by hand, then softmax(q k^T / sqrt(d)) v, projection, residual.
    g = x.reshape(b, size * size, 32, c // 32)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    h = ((g - mean) / jnp.sqrt(var + 1e-5)).reshape(b, size * size, c)
    h = h * params["norm"]["scale"] + params["norm"]["bias"]
    hi = jax.lax.Precision.HIGHEST
    q, k, v = (
        jnp.einsum("blc,chd->blhd", h, params[n]["kernel"], precision=hi) + params[n]["bias"]
        for n in ("query", "key", "value")
    )
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) / math.sqrt(c // heads)
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    a = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=hi)
    proj = jnp.einsum("bqhd,hdc->bqc", a, params["out"]["kernel"], precision=hi)
    expected = x + (proj + params["out"]["bias"]).reshape(x.shape)
    assert float(jnp.abs(expected - x).mean()) > 0.1
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5, rtol=1e-5)


def test_attend_sends_unmasked_16_bit_gpu_attention_to_cudnn_and_the_rest_to_xla(monkeypatch):
    """The dispatch rule of `attention.attend` (the GPU kernels themselves are measured on a
    GPU: bench/RESULTS.md); here the backend and the kernels are stand-ins that record calls."""
    calls = []

    def fake_attention(q, k, v, mask=None, implementation=None):
        if implementation == "cudnn" and q.shape[-1] > 256:
            raise NotImplementedError("head dim")
        calls.append((implementation, mask is not None))
        return q

    monkeypatch.setattr(attention.jax.nn, "dot_product_attention", fake_attention)
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    bf16 = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    mask = jnp.ones((1, 4), bool)
    attention.attend(bf16, bf16, bf16)
    attention.attend(bf16.astype(jnp.float32), bf16, bf16)  # float32: XLA
    attention.attend(bf16, bf16, bf16, mask)  # masked: XLA
    wide = jnp.zeros((1, 4, 2, 264), jnp.bfloat16)
    attention.attend(wide, wide, wide)  # cuDNN refuses: falls back to XLA
    assert calls == [("cudnn", False), (None, False), (None, True), (None, False)]
    monkeypatch.setattr(attention, "FUSED_ON_GPU", False)
    attention.attend(bf16, bf16, bf16)
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(attention, "FUSED_ON_GPU", True)
    attention.attend(bf16, bf16, bf16)
    assert calls[4:] == [(None, False), (None, False)]


def test_sinusoidal_embedding_matches_closed_form():
    t = np.array([0, 1, 17, 500, 999.5])
    for dim in (16, 9):
        half = dim // 2
        freqs = 10000.0 ** (-np.arange(half) / half)
        args = t[:, None] * freqs[None, :]
        expected = np.concatenate([np.cos(args), np.sin(args), np.zeros((5, dim % 2))], -1)
        got = np.asarray(sinusoidal_embedding(jnp.asarray(t), dim))
        assert got.shape == (5, dim) and got.dtype == np.float32
        # float32 t * f at t ~ 1000 is exact to ~1e-4 in the argument.
        np.testing.assert_allclose(got, expected, atol=5e-4)
    # DDPM's TF convention: [sin | cos], frequencies 10000^(-i / (half - 1)).
    freqs = 10000.0 ** (-np.arange(4) / 3)
    args = t[:, None] * freqs[None, :]
    got = sinusoidal_embedding(jnp.asarray(t), 8, flip_sin_to_cos=False, freq_shift=1)
    np.testing.assert_allclose(got, np.concatenate([np.sin(args), np.cos(args)], -1), atol=5e-4)


def config_of(image_size=16, **model):
    config = configlib.base_config()
    config.model = unet.tiny_config()
    config.model.update(model)
    config.data.image_size = image_size
    return config


def test_valid_configs_pass():
    models.validate(config_of())
    config = config_of(image_size=32)
    config.model = unet.ddpm_cifar10_config()
    models.validate(config)
    assert isinstance(models.build(config.model), unet.UNet)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=18, channel_mult=(1, 2, 2)), r"image_size=18 is not divisible by 4"),
        (
            dict(attention_resolutions=(4,)),
            r"attention_resolutions=\(4,\): 4 px never occurs.*16, 8",
        ),
        (dict(channels=48), r"channels=48 x channel_mult 1 = 48 channels cannot be split into 32"),
        (dict(num_heads=2, head_dim=16), r"num_heads=2, head_dim=16: set exactly one"),
        (dict(num_heads=-1, head_dim=-1), r"set exactly one of them"),
        (dict(head_dim=12), r"head_dim=12 does not divide the 32 channels"),
        (dict(num_heads=3, head_dim=-1), r"num_heads=3 does not divide the 32 channels"),
        (dict(num_classes=-1), r"num_classes=-1: expected an integer >= 0"),
        (dict(dropout=1.0), r"dropout=1.0"),
        (dict(channel_mult=()), r"channel_mult=\(\): expected a non-empty tuple"),
        (dict(channels=0), r"channels=0: expected an integer >= 1"),
        (dict(num_res_block=2), r"config.model.num_res_block is not a unet field"),
        (dict(patch_size=0), r"patch_size=0: expected an integer >= 1"),
        (
            dict(patch_size=4, attention_resolutions=(8,)),
            r"attention_resolutions=\(8,\): 8 px never occurs.*4, 2",
        ),
    ],
)
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        models.validate(config_of(**kwargs))


def test_wrongly_typed_fields_are_config_errors():
    config = config_of()
    config.model = ml_collections.ConfigDict(dict(name="unet", remat="yes"))
    with pytest.raises(ConfigError, match=r"remat='yes': expected True or False"):
        models.validate(config)


# ---- parity with diffusers' UNet2DModel (random weights, converted to our layout) ----


def diffusers_model(m, image_size):
    """UNet2DModel with the architecture of our model block `m` (as in bench/unet_step.py)."""
    from diffusers import UNet2DModel

    widths = [m.channels * k for k in m.channel_mult]
    attn = [image_size // 2**level in m.attention_resolutions for level in range(len(widths))]
    # Blocks without attention: BigGAN-style resampling needs diffusers' Resnet*sample blocks.
    plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
    plain = plain if m.resblock_updown else ("DownBlock2D", "UpBlock2D")
    return UNet2DModel(
        sample_size=image_size,
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        block_out_channels=tuple(widths),
        layers_per_block=m.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else plain[0] for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else plain[1] for a in reversed(attn)),
        attention_head_dim=m.head_dim,
        norm_num_groups=32,
        attn_norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if m.scale_shift_norm else "default",
        downsample_type="resnet" if m.resblock_updown else "conv",
        upsample_type="resnet" if m.resblock_updown else "conv",
        num_class_embeds=(m.num_classes + 1) if m.num_classes else None,
    )


def convert_from_diffusers(sd, abstract, levels, head_dim):
    """diffusers UNet2DModel state dict (numpy) -> our param tree; checks every shape."""

    def conv(name):
        return {"kernel": sd[f"{name}.weight"].transpose(2, 3, 1, 0), "bias": sd[f"{name}.bias"]}

    def dense(name):
        return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}

    def norm(name):
        return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}

    def res(prefix):
        out = {
            "norm_1": norm(f"{prefix}.norm1"),
            "conv_1": conv(f"{prefix}.conv1"),
            "emb_proj": dense(f"{prefix}.time_emb_proj"),
            "norm_2": norm(f"{prefix}.norm2"),
            "conv_2": conv(f"{prefix}.conv2"),
        }
        if f"{prefix}.conv_shortcut.weight" in sd:
            out["skip"] = conv(f"{prefix}.conv_shortcut")
        return out

    def attn(prefix):
        c = sd[f"{prefix}.to_q.weight"].shape[0]
        heads = c // head_dim
        out = {"norm": norm(f"{prefix}.group_norm")}
        for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
            out[ours] = {
                "kernel": sd[f"{prefix}.{theirs}.weight"].T.reshape(c, heads, head_dim),
                "bias": sd[f"{prefix}.{theirs}.bias"].reshape(heads, head_dim),
            }
        out["out"] = {
            "kernel": sd[f"{prefix}.to_out.0.weight"].T.reshape(heads, head_dim, c),
            "bias": sd[f"{prefix}.to_out.0.bias"],
        }
        return out

    def block(name):
        kind, *rest = name.split("_")
        if name == "mid_attn":
            return attn("mid_block.attentions.0")
        if kind == "mid":  # mid_res_{i}
            return res(f"mid_block.resnets.{rest[1]}")
        level, what = int(rest[0]), rest[1]
        base = f"down_blocks.{level}" if kind == "down" else f"up_blocks.{levels - 1 - level}"
        if what == "res":
            return res(f"{base}.resnets.{rest[2]}")
        if what == "attn":
            return attn(f"{base}.attentions.{rest[2]}")
        sampler = f"{base}.{'downsamplers' if kind == 'down' else 'upsamplers'}.0"
        return (
            res(sampler) if f"{sampler}.norm1.weight" in sd else {"conv": conv(f"{sampler}.conv")}
        )

    params = {
        "conv_in": conv("conv_in"),
        "conv_out": conv("conv_out"),
        "norm_out": norm("conv_norm_out"),
        "time_embed": {
            "dense_0": dense("time_embedding.linear_1"),
            "dense_1": dense("time_embedding.linear_2"),
        },
    }
    if "class_embedding.weight" in sd:
        params["class_embed"] = {"embedding": sd["class_embedding.weight"]}
    for name in abstract:
        if name not in params:
            params[name] = block(name)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), abstract, params)
    return {"params": jax.tree.map(jnp.asarray, params)}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_classes=10),  # scale-shift, conv resampling, 2 heads at 64 channels
        dict(scale_shift_norm=False, resblock_updown=True, num_classes=0),
    ],
    ids=["adm_class_conditional", "ddpm_additive_resblock_updown"],
)
def test_forward_matches_diffusers_unet2dmodel(overrides):
    torch = pytest.importorskip("torch")
    m = unet.tiny_config()
    m.update(channels=32, channel_mult=(1, 2), head_dim=32, **overrides)
    torch.manual_seed(0)
    reference = diffusers_model(m, SIZE).eval()
    sd = {k: v.detach().numpy() for k, v in reference.state_dict().items()}

    model = unet.from_config(m)
    x, t, labels = inputs()
    labels = labels if m.num_classes else None
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), x, t, labels)))
    params = convert_from_diffusers(sd, abstract["params"], len(m.channel_mult), m.head_dim)
    assert param_count(params) == sum(v.size for v in sd.values())
    ours = np.asarray(jax.jit(model.apply)(params, x, t, labels))

    with torch.no_grad():
        theirs = (
            reference(
                torch.from_numpy(np.array(x)).permute(0, 3, 1, 2),
                torch.from_numpy(np.array(t)).long(),
                class_labels=None if labels is None else torch.from_numpy(np.array(labels)).long(),
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )
    assert np.abs(theirs).mean() > 1e-2
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_patch_fold_is_a_pixel_permutation_that_unfold_inverts():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    folded = unet._fold(x, 2)
    assert folded.shape == (2, 2, 3, 12)
    # The pixel (row 1, col 2) lands in patch (0, 1) at slot (1, 0).
    np.testing.assert_array_equal(folded[0, 0, 1, 6:9], x[0, 1, 2])
    np.testing.assert_array_equal(unet._unfold(folded, 2), x)
