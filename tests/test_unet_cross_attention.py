"""The text-conditional (Stable Diffusion) UNet: diffusers parity, conversion, masks, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from genctl_jax import configlib, models
from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.io import hf_weights
from genctl_jax.models import unet, unet_diffusers
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.parallel import sharding

BATCH, SIZE, TOKENS = 4, 16, 7
# A tiny UNet2DConditionModel with SD 1.x's block types: cross-attention at level 0 and the
# middle, 2 heads, 16-wide text tokens, a pooled vector through class_embed_type='projection'.
TINY = dict(
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
# SD 2.x-style options: linear projections, 2 transformer blocks, heads per level giving one
# head width (16), scale-shift injection; no pooled vector.
TINY_LINEAR = dict(
    TINY,
    layers_per_block=1,
    use_linear_projection=True,
    transformer_layers_per_block=2,
    attention_head_dim=(2, 4),
    resnet_time_scale_shift="scale_shift",
    class_embed_type=None,
    projection_class_embeddings_input_dim=None,
)
# runwayml/stable-diffusion-v1-5 unet/config.json (the keys it sets).
SD15 = dict(
    _class_name="UNet2DConditionModel",
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)


def text_inputs(lengths=(7, 5, 3, 1), pooled_dim=8, seed=0):
    """x, t, context, a padding mask with `lengths` tokens per row, pooled (numpy)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, SIZE, SIZE, 4), dtype=np.float32)
    t = np.array([0, 251, 500, 999], np.int32)
    context = rng.standard_normal((BATCH, TOKENS, 16), dtype=np.float32)
    mask = (np.arange(TOKENS)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    pooled = rng.standard_normal((BATCH, pooled_dim), dtype=np.float32) if pooled_dim else None
    return x, t, context, mask, pooled


def diffusers_checkpoint(directory, config, seed=0):
    """A random UNet2DConditionModel (1-D params perturbed off 1/0) saved as safetensors."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:  # GroupNorm/LayerNorm scales start at 1, biases at 0.
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(directory, safe_serialization=True)
    return ref


def diffusers_forward(ref, x, t, context, mask, pooled):
    import torch

    with torch.no_grad():
        out = ref(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            torch.from_numpy(t).long(),
            encoder_hidden_states=torch.from_numpy(context),
            encoder_attention_mask=None if mask is None else torch.from_numpy(mask),
            class_labels=None if pooled is None else torch.from_numpy(pooled),
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The TINY diffusers model, its directory, and ours loaded from it with a jitted apply."""
    directory = tmp_path_factory.mktemp("tiny_sd")
    ref = diffusers_checkpoint(directory, TINY)
    module, params = unet_diffusers.load_diffusers(directory)

    def forward(params, x, t, context, mask, pooled):
        return module.apply(
            {"params": params}, x, t, context=context, context_mask=mask, pooled=pooled
        )

    return ref, directory, module, params, forward, jax.jit(forward)


def test_forward_matches_diffusers_unet2dconditionmodel(tiny):
    ref, _, module, params, _, apply = tiny
    assert module.context_dim == 16 and module.pooled_dim == 8 and module.attention_levels == (0,)
    inputs = text_inputs()
    ours = np.asarray(apply(params, *inputs))
    theirs = diffusers_forward(ref, *inputs)
    assert np.abs(theirs).mean() > 0.1
    diff = np.abs(ours - theirs).max()
    assert diff <= 1e-4, diff


def test_linear_projection_depth_2_scale_shift_matches_diffusers(tmp_path):
    ref = diffusers_checkpoint(tmp_path, TINY_LINEAR, seed=1)
    module, params = unet_diffusers.load_diffusers(tmp_path)
    assert (module.use_linear_projection, module.transformer_depth) == (True, 2)
    assert (module.num_heads, module.head_dim, module.scale_shift_norm) == (-1, 16, True)
    assert params["mid_attn"]["proj_in"]["kernel"].shape == (64, 64)  # linear, not 1x1 conv
    x, t, context, mask, _ = text_inputs(pooled_dim=0)
    ours = jax.jit(module.apply)({"params": params}, x, t, context=context, context_mask=mask)
    theirs = diffusers_forward(ref, x, t, context, mask, None)
    assert np.abs(theirs).mean() > 0.1
    diff = np.abs(np.asarray(ours) - theirs).max()
    assert diff <= 1e-4, diff


def test_export_round_trip_gives_diffusers_the_same_state_dict(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    ref, directory, _, params, _, _ = tiny
    config = unet_diffusers.config_from_diffusers(hf_weights.read_config(directory))
    unet_diffusers.save_diffusers(tmp_path, config, params, sample_size=SIZE)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        unet_diffusers.save_diffusers(tmp_path, config, params)
    back = UNet2DConditionModel.from_pretrained(tmp_path)
    assert back.config.sample_size == SIZE
    expected, got = ref.state_dict(), back.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_context_mask_changes_the_output_and_masked_tokens_do_not_matter(tiny):
    *_, params, _, apply = tiny
    x, t, context, mask, pooled = text_inputs(lengths=(7, 4, 1, 0))
    full = np.ones_like(mask)
    padded = np.asarray(apply(params, x, t, context, mask, pooled))
    unpadded = np.asarray(apply(params, x, t, context, full, pooled))
    np.testing.assert_array_equal(padded[0], unpadded[0])  # row 0 has all 7 tokens
    assert np.abs(padded[1:] - unpadded[1:]).mean(axis=(1, 2, 3)).min() > 1e-3
    # New values in the masked positions (every position of the token-less last row).
    noise = np.random.default_rng(5).standard_normal(context.shape).astype(np.float32)
    other = np.where(mask[..., None] > 0, context, 10 * noise)
    np.testing.assert_array_equal(np.asarray(apply(params, x, t, other, mask, pooled)), padded)
    # Pooled text and context both matter.
    assert np.abs(np.asarray(apply(params, x, t, context, mask, -pooled)) - padded).mean() > 1e-3
    assert np.abs(np.asarray(apply(params, x, t, other, full, pooled)) - unpadded).mean() > 1e-3


def test_sharded_fsdp4_tensor2_matches_single_device(tiny):
    _, directory, _, params, forward, apply = tiny
    inputs = text_inputs()
    expected = np.asarray(apply(params, *inputs))

    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    rules = configlib.DEFAULT_RULES
    _, sharded = unet_diffusers.load_diffusers(directory, mesh=mesh, rules=rules)
    block = sharded["down_0_attn_0"]["block_0"]
    assert block["cross_attn"]["key"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert block["self_attn"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert block["ff"]["proj"]["kernel"].sharding.spec == P("fsdp", None, "tensor")
    assert block["ff"]["out"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert sharded["pooled_embed"]["dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    on_mesh = [jax.device_put(a, batch) for a in inputs]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(forward)(sharded, *on_mesh)
    assert out.sharding.is_equivalent_to(batch, out.ndim)  # batch split 4 ways, as given
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_is_close_to_float32(tiny):
    _, _, module, params, _, apply = tiny
    inputs = text_inputs()
    f32 = np.asarray(apply(params, *inputs))
    bf16_module = module.clone(dtype=jnp.bfloat16)
    x, t, context, mask, pooled = inputs
    bf16 = jax.jit(bf16_module.apply)(
        {"params": params}, x, t, context=context, context_mask=mask, pooled=pooled
    )
    assert bf16.dtype == jnp.float32
    error = float(np.linalg.norm(np.asarray(bf16) - f32) / np.linalg.norm(f32))
    assert 0 < error < 0.05, error


@pytest.mark.parametrize(
    "overrides",
    [
        dict(remat=True, transformer_depth=2, use_linear_projection=True),
        dict(dtype="bfloat16", num_classes=5),
        dict(attention_levels=(), attention_resolutions=(8,), num_heads=-1, head_dim=16),
    ],
)
def test_text_variants_trace_to_the_right_shape(overrides):
    m = unet.tiny_text_config()
    m.update(dropout=0.1, **overrides)
    model = unet.from_config(m)
    x, t, context, mask, pooled = (jnp.asarray(a) for a in text_inputs())
    labels = jnp.arange(BATCH) if m.num_classes else None
    kwargs = dict(context=context, context_mask=mask, pooled=pooled)

    def forward():
        variables = model.init(jax.random.PRNGKey(0), x, t, labels, **kwargs)
        rngs = {"dropout": jax.random.PRNGKey(1)}
        return model.apply(variables, x, t, labels, train=True, rngs=rngs, **kwargs)

    out = jax.eval_shape(forward)
    assert out.shape == (BATCH, SIZE, SIZE, 4) and out.dtype == jnp.float32


def test_training_step_shape_with_dropout_and_zero_init():
    m = unet.tiny_text_config()
    m.update(dropout=0.1, channel_mult=(1,))  # one level: a third of the compile time
    model = unet.from_config(m)
    x, t, context, mask, pooled = (jnp.asarray(a[:2]) for a in text_inputs())
    variables = jax.jit(model.init)(
        jax.random.PRNGKey(0), x, t, context=context, context_mask=mask, pooled=pooled
    )
    params = nn.unbox(variables)["params"]

    @jax.jit
    def loss_and_grads(params, key):
        def loss_fn(p):
            out = model.apply(
                {"params": p},
                x,
                t,
                context=context,
                context_mask=mask,
                pooled=pooled,
                train=True,
                rngs={"dropout": key},
            )
            return jnp.mean(jnp.square(out - x))

        return jax.value_and_grad(loss_fn)(params)

    # Zero-initialised conv_out / proj_out: a fresh UNet predicts exactly zero.
    loss, _ = loss_and_grads(params, jax.random.PRNGKey(1))
    np.testing.assert_allclose(loss, jnp.mean(jnp.square(x)), rtol=1e-6)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)
    (loss_a, grads), (loss_b, _) = (loss_and_grads(params, jax.random.PRNGKey(k)) for k in (1, 2))
    assert np.isfinite(loss_a) and loss_a != loss_b  # dropout is active
    cross = grads["down_0_attn_0"]["block_0"]["cross_attn"]
    for leaf in (cross["key"]["kernel"], grads["pooled_embed"]["dense_0"]["kernel"]):
        assert np.isfinite(leaf).all() and np.abs(leaf).max() > 0


def test_sd15_config_has_diffusers_sd15_layout_and_parameter_count():
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    m = unet.sd15_config()
    assert unet_diffusers.config_from_diffusers(SD15).to_dict() == m.to_dict()
    config = configlib.base_config()
    config.model, config.data.image_size = m, 64
    models.validate(config)
    boxed = unet_diffusers.abstract_params(unet.from_config(m), m)
    leaves = {
        tuple(k.key for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))
    }
    assert sum(v.size for v in leaves.values()) == 859_520_964
    # Under the default rules fsdp shards all but biases, norm scales and the 4-channel convs.
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    shardings = sharding.logical_to_shardings(boxed, mesh, configlib.DEFAULT_RULES, "params")
    fraction = sharding.check_sufficiently_sharded(nn.unbox(boxed), shardings, mesh, 0.05, "params")
    assert fraction < 0.001, fraction

    with torch.device("meta"):  # shapes only, nothing allocated
        ref = UNet2DConditionModel(**{k: v for k, v in SD15.items() if k[0] != "_"})
    state = ref.state_dict()
    assert sum(v.numel() for v in state.values()) == 859_520_964
    tensors = unet_diffusers.weight_map(m)
    assert {t.hf for t in tensors} == set(state) and len(tensors) == len(state)
    for t in tensors:
        assert t.hf_shape(leaves[t.flax].shape) == tuple(state[t.hf].shape), t


def config_of(**model):
    config = configlib.base_config()
    config.model = unet.tiny_text_config()
    config.model.update(model)
    config.data.image_size = SIZE
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(context_dim=-1), r"context_dim=-1: expected an integer >= 0"),
        (dict(pooled_dim=-2), r"pooled_dim=-2: expected an integer >= 0"),
        (dict(transformer_depth=0), r"transformer_depth=0: expected an integer >= 1"),
        (
            dict(context_dim=0, transformer_depth=2),
            r"transformer_depth=2 configures cross-attention.*context_dim=0",
        ),
        (
            dict(context_dim=0, use_linear_projection=True),
            r"use_linear_projection=True configures cross-attention.*context_dim=0",
        ),
        (dict(attention_levels=(2,)), r"attention_levels=\(2,\): expected distinct level .* 0..1"),
        (dict(attention_levels=(0, 0)), r"attention_levels=\(0, 0\): expected distinct"),
        (
            dict(attention_resolutions=(16,)),
            r"attention_levels=\(0,\) and attention_resolutions=\(16,\) both place attention",
        ),
        (dict(num_heads=3), r"num_heads=3 does not divide the 32 channels"),
    ],
)
def test_bad_text_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        models.validate(config_of(**overrides))


def test_text_inputs_are_checked_at_call_time():
    x, t, context, mask, pooled = (jnp.asarray(a) for a in text_inputs())
    text = unet.from_config(unet.tiny_text_config())

    def trace(model, x=x, **kwargs):
        return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **kwargs))

    trace(text, context=context, context_mask=mask, pooled=pooled)
    with pytest.raises(ConfigError, match=r"context_dim=0\); set context_dim"):
        trace(unet.from_config(unet.tiny_config()), x=x[..., :3], context=context)
    with pytest.raises(ValueError, match=r"pass context \[B, L, 16\]"):
        trace(text, pooled=pooled)
    with pytest.raises(ValueError, match=r"context has shape \(4, 7, 8\); expected \[4, L, 16\]"):
        trace(text, context=context[..., :8], pooled=pooled)
    with pytest.raises(ValueError, match=r"context_mask has shape \(4, 6\); expected \(4, 7\)"):
        trace(text, context=context, context_mask=mask[:, :6], pooled=pooled)
    with pytest.raises(ValueError, match=r"pooled_dim=8\): pass pooled \[B, 8\]"):
        trace(text, context=context)
    m = unet.tiny_text_config()
    m.pooled_dim = 0
    with pytest.raises(ConfigError, match=r"pooled_dim=0\); set pooled_dim"):
        trace(unet.from_config(m), context=context, pooled=pooled)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_num_groups=16), r"norm_num_groups=16 is not supported.*accepted: 32"),
        (dict(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")), r"does not mirror"),
        (dict(class_embed_type="timestep"), r"class_embed_type='timestep'"),
        (dict(attention_head_dim=3), r"3 heads at level 0 do not split its 32 channels"),
        (dict(attention_head_dim=(2, 2)), None),  # one head count: fine
        (dict(attention_head_dim=(2, 8)), r"neither one head count nor one head width"),
        (dict(transformer_layers_per_block=(1, 2)), r"one integer for every level"),
        (dict(addition_embed_type="text_time"), r"addition_embed_type='text_time' is not"),
        (dict(some_new_option=True), r"'some_new_option' is unknown to this converter"),
    ],
)
def test_unsupported_diffusers_configs_are_refused(overrides, message):
    config = dict(TINY, **overrides)
    if message is None:
        assert unet_diffusers.config_from_diffusers(config).num_heads == 2
        return
    with pytest.raises(ConfigError, match=message):
        unet_diffusers.config_from_diffusers(config)


def test_weight_map_refuses_layouts_diffusers_cannot_hold():
    m = unet.tiny_text_config()
    m.update(attention_levels=(), attention_resolutions=(16,))
    with pytest.raises(ConfigError, match=r"attention_resolutions=\(16,\).*attention_levels"):
        unet_diffusers.weight_map(m)
    with pytest.raises(ConfigError, match=r"context_dim=0 .*always cross-attends"):
        unet_diffusers.weight_map(unet.tiny_config())
    m = unet.tiny_text_config()
    m.num_classes = 3
    with pytest.raises(ConfigError, match=r"pooled_dim=8 .*one class_embedding"):
        unet_diffusers.weight_map(m)
