"""ControlNet: zero init, diffusers parity and from_unet, conversion round trip, refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from genctl_jax import configlib, models
from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.io import hf_weights
from genctl_jax.models import controlnet, unet, unet_diffusers
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.parallel import sharding

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

BATCH, SIZE, TOKENS = 2, 16, 7
HINT = (8, 16)  # One stride-2 step: conditions at twice the latent size.
# A tiny UNet2DConditionModel with SD 1.x's block types (cross-attention at level 0 and the
# middle), 2 heads, 16-wide text tokens, a pooled vector (class_embed_type='projection').
UNET = dict(
    sample_size=SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=32,
    class_embed_type="projection",
    projection_class_embeddings_input_dim=8,
)
CONTROLNET = dict(
    {k: v for k, v in UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")},
    conditioning_channels=3,
    conditioning_embedding_out_channels=HINT,
)
# Skips of the tiny SD layout: conv_in, 2 ResBlocks (+ attention) and the downsample at level
# 0, 2 ResBlocks at level 1; then the middle.
SKIP_SHAPES = [(BATCH, 16, 16, 32)] * 3 + [(BATCH, 8, 8, 32)] + [(BATCH, 8, 8, 64)] * 2
MID_SHAPE = (BATCH, 8, 8, 64)
UNET_CONFIG = unet_diffusers.config_from_diffusers(UNET).to_dict()
ZERO_CONVS = (
    "controlnet_down_blocks.",
    "controlnet_mid_block.",
    "controlnet_cond_embedding.conv_out.",
)


def sd_inputs(seed=0):
    """x, t, condition (2x the latent size, in [0, 1]), context, a padding mask, pooled."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, SIZE, SIZE, 4), dtype=np.float32)
    t = np.array([37, 801], np.int32)
    condition = rng.uniform(size=(BATCH, 2 * SIZE, 2 * SIZE, 3)).astype(np.float32)
    context = rng.standard_normal((BATCH, TOKENS, 16), dtype=np.float32)
    mask = (np.arange(TOKENS)[None, :] < np.array([[7], [4]])).astype(np.int32)
    pooled = rng.standard_normal((BATCH, 8), dtype=np.float32)
    return x, t, condition, context, mask, pooled


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def nhwc(a):
    return a.permute(0, 2, 3, 1).numpy()


def perturb_1d(model, scale=0.1):
    """GroupNorm/LayerNorm scales start at 1 and biases at 0: move them, so they matter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn_like(p))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Random diffusers UNet and (independent) ControlNet, saved and loaded into ours."""
    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(**UNET).eval()
    perturb_1d(ref_unet)
    unet_dir = tmp_path_factory.mktemp("sd_unet")
    ref_unet.save_pretrained(unet_dir, safe_serialization=True)
    torch.manual_seed(1)
    ref_cn = diffusers.ControlNetModel(**CONTROLNET).eval()
    perturb_1d(ref_cn)
    with torch.no_grad():  # The zero convs and hint conv_out: random, else parity is trivial.
        for name, p in ref_cn.named_parameters():
            if name.startswith(ZERO_CONVS):
                p.copy_(0.1 * torch.randn_like(p))
    cn_dir = tmp_path_factory.mktemp("sd_controlnet")
    ref_cn.save_pretrained(cn_dir, safe_serialization=True)

    unet_module, unet_params = unet_diffusers.load_diffusers(unet_dir)
    cn_module, cn_params = unet_diffusers.load_diffusers_controlnet(
        cn_dir, base=unet_module, conditioning_channels=3
    )

    @jax.jit
    def control(params, scale, x, t, condition, context, pooled):
        return cn_module.apply(
            {"params": params},
            x,
            t,
            condition,
            context=context,
            pooled=pooled,
            conditioning_scale=scale,
        )

    @jax.jit
    def denoise(params, down, mid, x, t, context, mask, pooled):
        return unet_module.apply(
            {"params": params},
            x,
            t,
            context=context,
            context_mask=mask,
            pooled=pooled,
            down_residuals=down,
            mid_residual=mid,
        )

    def eager(params, x, t, context, mask, pooled, down=None, mid=None):
        """Op by op, not jitted: the residual additions are the only extra operations, so
        all-zero residuals must give the same bits. (Jitted, XLA may pick other kernels for
        the program with residual inputs: last-bit differences, not a property of the model.)"""
        return unet_module.apply(
            {"params": params},
            x,
            t,
            context=context,
            context_mask=mask,
            pooled=pooled,
            down_residuals=down,
            mid_residual=mid,
        )

    return dict(
        ref_unet=ref_unet,
        ref_cn=ref_cn,
        cn_dir=cn_dir,
        unet_dir=unet_dir,
        unet_module=unet_module,
        unet_params=unet_params,
        cn_module=cn_module,
        cn_params=cn_params,
        control=control,
        denoise=denoise,
        eager=eager,
    )


@pytest.fixture(scope="module")
def fresh(sd):
    """A freshly initialised ControlNet with the imported base UNet's trunk copied in."""
    module = sd["cn_module"]
    x, t, condition, context, _, pooled = sd_inputs()
    init = jax.jit(module.init)(jax.random.key(3), x, t, condition, context=context, pooled=pooled)
    return controlnet.init_from_unet(init, sd["unet_params"])


def test_residuals_and_controlled_unet_match_diffusers(sd):
    x, t, condition, context, mask, pooled = sd_inputs()
    assert sd["cn_module"].conditioning_factor == 2 and unet.num_skips(sd["cn_module"]) == 6
    for scale in (1.0, 0.5):
        down, mid = sd["control"](sd["cn_params"], scale, x, t, condition, context, pooled)
        with torch.no_grad():
            ref_down, ref_mid = sd["ref_cn"](
                nchw(x),
                torch.from_numpy(t).long(),
                encoder_hidden_states=torch.from_numpy(context),
                controlnet_cond=nchw(condition),
                conditioning_scale=scale,
                class_labels=torch.from_numpy(pooled),
                return_dict=False,
            )
        assert [r.shape for r in down] == SKIP_SHAPES and mid.shape == MID_SHAPE
        assert len(ref_down) == len(down)
        for ours, theirs in zip([*down, mid], [*ref_down, ref_mid], strict=True):
            theirs = nhwc(theirs)
            assert np.abs(theirs).mean() > 0.05 * scale
            diff = np.abs(np.asarray(ours) - theirs).max()
            assert diff <= 1e-4, diff

    # The base UNet with the (scale 0.5) residuals, ours and diffusers'.
    out = np.asarray(sd["denoise"](sd["unet_params"], down, mid, x, t, context, mask, pooled))
    with torch.no_grad():
        ref_out = sd["ref_unet"](
            nchw(x),
            torch.from_numpy(t).long(),
            encoder_hidden_states=torch.from_numpy(context),
            encoder_attention_mask=torch.from_numpy(mask),
            class_labels=torch.from_numpy(pooled),
            down_block_additional_residuals=tuple(ref_down),
            mid_block_additional_residual=ref_mid,
        ).sample
    diff = np.abs(out - nhwc(ref_out)).max()
    assert diff <= 1e-4, diff
    uncontrolled = np.asarray(sd["eager"](sd["unet_params"], x, t, context, mask, pooled))
    assert np.abs(out - uncontrolled).mean() > 1e-2  # the residuals steer the output


def test_fresh_controlnet_leaves_the_unet_output_bitwise_unchanged(sd, fresh):
    x, t, condition, context, mask, pooled = sd_inputs(seed=4)
    down, mid = sd["control"](fresh, 1.0, x, t, condition, context, pooled)
    assert [r.shape for r in down] == SKIP_SHAPES and mid.shape == MID_SHAPE
    assert not any(np.any(np.asarray(r)) for r in [*down, mid])  # exactly zero
    inputs = (sd["unet_params"], x, t, context, mask, pooled)
    uncontrolled = np.asarray(sd["eager"](*inputs))
    assert np.abs(uncontrolled).mean() > 0.1
    np.testing.assert_array_equal(np.asarray(sd["eager"](*inputs, down, mid)), uncontrolled)
    jitted = np.asarray(sd["denoise"](sd["unet_params"], down, mid, *inputs[1:]))
    np.testing.assert_allclose(jitted, uncontrolled, atol=1e-5)


def test_init_from_unet_equals_diffusers_from_unet(sd, fresh):
    ref = diffusers.ControlNetModel.from_unet(
        sd["ref_unet"], conditioning_embedding_out_channels=HINT, conditioning_channels=3
    )
    config = unet_diffusers.controlnet_config_from_diffusers(dict(ref.config))
    base = unet_diffusers.config_from_diffusers(UNET)
    assert (
        config.to_dict()
        == controlnet.config_from_unet(base, hint_channels=HINT, conditioning_factor=2).to_dict()
    )
    ours = hf_weights.export_params(unet_diffusers.controlnet_weight_map(config), fresh)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(ours) == set(theirs)
    copied = zeros = 0
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
        if key.startswith(ZERO_CONVS):
            assert not np.any(ours[key]) and not np.any(value), key
            zeros += 1
        elif not key.startswith("controlnet_cond_embedding."):  # hint encoder: random init
            np.testing.assert_array_equal(ours[key], value, err_msg=key)
            copied += 1
    assert (zeros, copied) == (2 * 7 + 2, len(theirs) - 16 - 2 * 3)
    assert np.abs(ours["down_blocks.0.attentions.0.proj_in.weight"]).mean() > 0.01
    # Trunk arrays are copies, not the UNet's buffers (donating one must not free the other).
    assert fresh["conv_in"]["kernel"] is not sd["unet_params"]["conv_in"]["kernel"]


def test_export_round_trip_is_exact(sd, tmp_path):
    config = unet_diffusers.controlnet_config_from_diffusers(hf_weights.read_config(sd["cn_dir"]))
    unet_diffusers.save_diffusers_controlnet(tmp_path, config, {"params": sd["cn_params"]})
    with pytest.raises(CheckpointError, match="overwrite=True"):
        unet_diffusers.save_diffusers_controlnet(tmp_path, config, sd["cn_params"])
    back = diffusers.ControlNetModel.from_pretrained(tmp_path)
    expected, got = sd["ref_cn"].state_dict(), back.state_dict()
    assert set(got) == set(expected) and len(got) == 174
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    _, params = unet_diffusers.load_diffusers_controlnet(tmp_path)
    same = jax.tree.map(np.array_equal, params, sd["cn_params"])
    assert all(jax.tree.leaves(same))


def test_sharded_load_and_init_from_unet_keep_the_logical_shardings(sd):
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    rules = configlib.DEFAULT_RULES
    _, cn = unet_diffusers.load_diffusers_controlnet(sd["cn_dir"], mesh=mesh, rules=rules)
    _, base = unet_diffusers.load_diffusers(sd["unet_dir"], mesh=mesh, rules=rules)
    assert cn["hint_encoder"]["conv_out"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    assert cn["zero_conv_5"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    cross = cn["down_0_attn_1"]["block_0"]["cross_attn"]
    assert cross["key"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    np.testing.assert_array_equal(
        np.asarray(cn["zero_conv_mid"]["kernel"]), sd["cn_params"]["zero_conv_mid"]["kernel"]
    )
    merged = controlnet.init_from_unet(cn, base)
    for path in (("mid_attn", "proj_in", "kernel"), ("time_embed", "dense_1", "kernel")):
        ours, theirs = merged, base
        for key in path:
            ours, theirs = ours[key], theirs[key]
        assert ours.sharding == theirs.sharding and ours.sharding.spec[-1] == "fsdp"
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    hint = merged["hint_encoder"]["conv_0"]["kernel"]
    assert hint is cn["hint_encoder"]["conv_0"]["kernel"]  # the ControlNet's own: kept as is


def test_pixel_space_adm_controlnet_zero_init_and_residual_shapes():
    """A class-conditional ADM-style UNet (scale-shift, BigGAN resampling, 2x2 patches):
    conditions at x's size, so the hint encoder's one stride-2 step undoes the patch fold."""
    m = unet.tiny_config()
    m.update(resblock_updown=True, patch_size=2, attention_resolutions=(8,))
    cm = controlnet.config_from_unet(m, hint_channels=HINT, conditioning_factor=1)
    config = configlib.base_config()
    config.model, config.data.image_size = cm, SIZE
    models.validate(config)
    base, cn = unet.from_config(m), models.build(cm)
    assert isinstance(cn, controlnet.ControlNet) and unet.num_skips(cn) == 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SIZE, SIZE, 3), dtype=np.float32)
    condition = rng.uniform(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
    t, labels = np.array([5, 900], np.int32), np.array([3, 48], np.int32)  # 48: null class
    unet_params = nn.unbox(jax.jit(base.init)(jax.random.key(0), x, t, labels))["params"]
    unet_params = jax.tree.map(  # zero-initialised layers would give a zero output
        lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), unet_params
    )
    params = controlnet.init_from_unet(
        jax.jit(cn.init)(jax.random.key(1), x, t, condition, labels), unet_params
    )
    boxed = jax.eval_shape(cn.init, jax.random.key(1), x, t, condition, labels)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert len(leaves) == len(jax.tree.leaves(params)) > 40
    for leaf in leaves:  # logical names on every parameter, one per dimension
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, leaf
    assert boxed["zero_conv_0"]["kernel"].names == ("kernel_h", "kernel_w", "conv_in", "conv_out")

    control = jax.jit(
        lambda p, s: cn.apply({"params": p}, x, t, condition, labels, conditioning_scale=s)
    )

    def forward(down=None, mid=None):  # op by op: see `sd`'s `eager`
        return np.asarray(
            base.apply({"params": unet_params}, x, t, labels, down_residuals=down, mid_residual=mid)
        )

    down, mid = control(params, 1.0)
    shapes = [(BATCH, 8, 8, 16)] * 2 + [(BATCH, 4, 4, 16), (BATCH, 4, 4, 32)]
    assert [r.shape for r in down] == shapes and mid.shape == (BATCH, 4, 4, 32)
    assert not any(np.any(np.asarray(r)) for r in [*down, mid])
    uncontrolled = forward()
    assert np.abs(uncontrolled).mean() > 0.1
    np.testing.assert_array_equal(forward(down, mid), uncontrolled)

    # Trained (here: random) zero convs and hint output: non-zero residuals, linear in the scale.
    def randomize(layer):
        kernel = 0.1 * rng.standard_normal(layer["kernel"].shape).astype(np.float32)
        return {"kernel": kernel, "bias": layer["bias"]}

    params = {
        k: randomize(v) if k.startswith(controlnet.ZERO_CONV_PREFIX) else v
        for k, v in params.items()
    }
    params["hint_encoder"] = dict(
        params["hint_encoder"], conv_out=randomize(params["hint_encoder"]["conv_out"])
    )
    (down, mid), (half_down, half_mid) = control(params, 1.0), control(params, 0.5)
    for full, half in zip([*down, mid], [*half_down, half_mid], strict=True):
        assert np.abs(np.asarray(full)).mean() > 1e-2
        np.testing.assert_allclose(np.asarray(half), 0.5 * np.asarray(full), rtol=1e-6)
    assert np.abs(forward(down, mid) - uncontrolled).mean() > 1e-3


def test_sd15_controlnet_has_diffusers_layout_and_parameter_count():
    m = controlnet.sd15_config()
    assert m.conditioning_factor == 8 and m.hint_channels == (16, 32, 96, 256)
    config = configlib.base_config()
    config.model, config.data.image_size = m, 64
    models.validate(config)
    boxed = controlnet.abstract_params(controlnet.from_config(m))
    leaves = {
        tuple(k.key for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))
    }
    assert sum(v.size for v in leaves.values()) == 361_279_120
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    shardings = sharding.logical_to_shardings(boxed, mesh, configlib.DEFAULT_RULES, "params")
    fraction = sharding.check_sufficiently_sharded(nn.unbox(boxed), shardings, mesh, 0.05, "params")
    assert fraction < 0.001, fraction

    diffusers_config = unet_diffusers.diffusers_controlnet_config(m)
    assert (
        unet_diffusers.controlnet_config_from_diffusers(diffusers_config).to_dict() == m.to_dict()
    )
    with torch.device("meta"):  # shapes only
        ref = diffusers.ControlNetModel(
            **{k: v for k, v in diffusers_config.items() if k[0] != "_"}
        )
    state = ref.state_dict()
    assert sum(v.numel() for v in state.values()) == 361_279_120
    tensors = unet_diffusers.controlnet_weight_map(m)
    assert {t.hf for t in tensors} == set(state) and len(tensors) == len(state)
    for t in tensors:
        assert t.hf_shape(leaves[t.flax].shape) == tuple(state[t.hf].shape), t


@pytest.mark.parametrize(
    "overrides",
    [
        dict(remat=True, dropout=0.1),
        dict(dtype="bfloat16", conditioning_factor=1, hint_channels=(8,)),
    ],
)
def test_text_variants_trace_to_the_right_shapes(overrides):
    m = controlnet.tiny_text_config()
    m.update(overrides)
    cn = controlnet.from_config(m)
    x, t, condition, context, mask, pooled = (jnp.asarray(a) for a in sd_inputs())
    condition = condition[:, : SIZE * m.conditioning_factor, : SIZE * m.conditioning_factor]
    kwargs = dict(context=context, context_mask=mask, pooled=pooled, train=True)
    scale = jnp.array([1.0, 0.5])  # one scale per example

    def forward():
        variables = cn.init(jax.random.key(0), x, t, condition, **kwargs)
        rngs = {"dropout": jax.random.key(1)}
        return cn.apply(variables, x, t, condition, conditioning_scale=scale, rngs=rngs, **kwargs)

    down, mid = jax.eval_shape(forward)
    assert [r.shape for r in down] == [(BATCH, 16, 16, 32)] * 2 + [
        (BATCH, 8, 8, 32),
        (BATCH, 8, 8, 64),
    ]
    assert mid.shape == (BATCH, 8, 8, 64) and mid.dtype == jnp.dtype(m.dtype)


def test_bad_call_inputs_are_refused(sd):
    cn, base = sd["cn_module"], sd["unet_module"]
    x, t, condition, context, mask, pooled = (jnp.asarray(a) for a in sd_inputs())

    def trace_cn(condition=condition, scale=1.0):
        def f():
            variables = cn.init(jax.random.key(0), x, t, condition, context=context, pooled=pooled)
            return cn.apply(
                variables, x, t, condition, context=context, pooled=pooled, conditioning_scale=scale
            )

        return jax.eval_shape(f)

    with pytest.raises(
        ValueError,
        match=r"condition has 1 channels .* takes 3 \(config.model.conditioning_channels=3\)",
    ):
        trace_cn(condition[..., :1])
    with pytest.raises(
        ValueError, match=r"expected \[2, 32, 32, 3\]: conditioning_factor=2 times x's 16 x 16"
    ):
        trace_cn(condition[:, :16, :16])
    with pytest.raises(
        ValueError, match=r"conditioning_scale has shape \(3,\); expected a scalar or \[2\]"
    ):
        trace_cn(scale=jnp.ones(3))

    def trace_unet(down, mid):
        def f():
            variables = base.init(jax.random.key(0), x, t, context=context, pooled=pooled)
            return base.apply(
                variables,
                x,
                t,
                context=context,
                pooled=pooled,
                down_residuals=down,
                mid_residual=mid,
            )

        return jax.eval_shape(f)

    down = [jnp.zeros(s) for s in SKIP_SHAPES]
    assert trace_unet(down, jnp.zeros(MID_SHAPE)).shape == (BATCH, SIZE, SIZE, 4)
    with pytest.raises(ValueError, match=r"down_residuals has 5 arrays; this UNet keeps 6 skips"):
        trace_unet(down[:5], None)
    with pytest.raises(
        ValueError,
        match=r"down_residuals\[3\] has shape \(2, 16, 16, 32\); expected \(2, 8, 8, 32\)",
    ):
        trace_unet(down[:3] + down[:1] + down[4:], None)
    with pytest.raises(
        ValueError, match=r"mid_residual has shape \(2, 8, 8, 32\); expected \(2, 8, 8, 64\)"
    ):
        trace_unet(None, jnp.zeros((BATCH, 8, 8, 32)))


def test_mismatched_base_and_conditioning_channels_are_refused(sd):
    base = unet_diffusers.config_from_diffusers(
        dict(
            UNET,
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"the ControlNet at .*sd_controlnet.* \(config.json\) has channel_mult=\(1, 2\) "
        r"but the base UNet has channel_mult=\(1, 2, 2\)",
    ):
        unet_diffusers.load_diffusers_controlnet(sd["cn_dir"], base=base)
    other = dict(UNET_CONFIG, num_heads=4)
    with pytest.raises(ConfigError, match=r"heads per level \(2, 2\).*heads per level \(4, 4\)"):
        unet_diffusers.load_diffusers_controlnet(sd["cn_dir"], base=other)
    with pytest.raises(
        ConfigError, match=r"takes conditioning_channels=3 \(config.json\), not the 1 asked for"
    ):
        unet_diffusers.load_diffusers_controlnet(sd["cn_dir"], conditioning_channels=1)
    # init_from_unet with a UNet of another width: the first differing param is named.
    narrow = unet.from_config(dict(UNET_CONFIG, channels=16))
    abstract = unet_diffusers.abstract_params(narrow, dict(UNET_CONFIG, channels=16))
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.unbox(abstract))
    with pytest.raises(
        ConfigError,
        match=r"UNet's param conv_in\['bias'\] is \(16,\), the ControlNet's has shape \(32,\)",
    ):
        controlnet.init_from_unet(sd["cn_params"], zeros)


def tiny_controlnet_config():
    config = configlib.base_config()
    config.model = controlnet.tiny_text_config()
    config.data.image_size = SIZE
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(conditioning_factor=3), r"conditioning_factor=3: expected a power of two >= 1"),
        (
            dict(conditioning_factor=4),
            r"hint_channels=\(8, 16\) has 1 stride-2 steps, too few .* = 4; give at least 3 widths",
        ),
        (dict(hint_channels=()), r"hint_channels=\(\): expected a non-empty tuple"),
        (dict(conditioning_channels=0), r"conditioning_channels=0: expected an integer >= 1"),
        (dict(channels=48), r"channels=48 x channel_mult 1 = 48 channels cannot be split"),
        (dict(out_channels=4), r"config.model.out_channels is not a controlnet field"),
    ],
)
def test_bad_controlnet_configs_name_the_field(overrides, message):
    config = tiny_controlnet_config()
    config.model = ml_collections.ConfigDict(dict(config.model.to_dict(), **overrides))
    with pytest.raises(ConfigError, match=message):
        models.validate(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(global_pool_conditions=True), r"global_pool_conditions=True is not supported"),
        (
            dict(controlnet_conditioning_channel_order="bgr"),
            r"channel_order='bgr' is not supported.*'rgb'",
        ),
        (
            dict(conditioning_embedding_out_channels=[]),
            r"conditioning_embedding_out_channels=\[\]: expected a non-empty",
        ),
        (
            dict(_class_name="UNet2DConditionModel"),
            r"reads only ControlNetModel \(a UNet2DConditionModel loads with load_diffusers\)",
        ),
        (
            dict(mid_block_type="UNetMidBlock2D"),
            r"mid_block_type='UNetMidBlock2D' is not supported",
        ),
        (dict(some_new_option=1), r"'some_new_option' is unknown"),
    ],
)
def test_unsupported_diffusers_controlnet_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        unet_diffusers.controlnet_config_from_diffusers(dict(CONTROLNET, **overrides))


def test_export_refuses_hint_encoders_diffusers_cannot_hold():
    m = controlnet.tiny_text_config()
    m.conditioning_factor = 1  # two widths: diffusers would downsample by 2
    with pytest.raises(
        ConfigError,
        match=r"conditioning_factor=1 with hint_channels=\(8, 16\) has no equivalent .* "
        r"expected conditioning_factor=2",
    ):
        unet_diffusers.controlnet_weight_map(m)
    pixel = controlnet.config_from_unet(
        unet.tiny_config(), hint_channels=HINT, conditioning_factor=2
    )
    with pytest.raises(ConfigError, match=r"context_dim=0 .*always cross-attends"):
        unet_diffusers.diffusers_controlnet_config(pixel)
