"""diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x/2.x layout) <-> `models.unet`.

A diffusers checkpoint directory holds `config.json` and `diffusion_pytorch_model.safetensors`
(or its sharded index). `config_from_diffusers` turns the config into our `config.model`
(refusing, with the key and the accepted values, every option that `models.unet` does not
implement), `weight_map` lists one `hf_weights.Tensor` per parameter, and `load_diffusers` /
`save_diffusers` read and write the directory. Supported layouts: `CrossAttnDownBlock2D` /
`DownBlock2D` levels mirrored by `CrossAttnUpBlock2D` / `UpBlock2D`, the
`UNetMidBlock2DCrossAttn` middle, `default` or `scale_shift` embedding injection, an optional
class table (`num_class_embeds`) or pooled-vector MLP (`class_embed_type="projection"`).

Module correspondence (ours <- diffusers): `down_{l}_res_{i}` <- `down_blocks.{l}.resnets.{i}`,
`down_{l}_attn_{i}` <- `down_blocks.{l}.attentions.{i}`, `down_{l}_downsample` <-
`down_blocks.{l}.downsamplers.0`, `mid_{res_0, attn, res_1}` <- `mid_block.{resnets.0,
attentions.0, resnets.1}`, `up_{l}_*` <- `up_blocks.{levels - 1 - l}.*`; in a transformer
`block_{j}` <- `transformer_blocks.{j}` with `self_attn`/`cross_attn`/`ff` <- `attn1`/`attn2`/`ff`.
A diffusers class table of N rows becomes `num_classes = N - 1`: our last row is the null
class used when `labels` is None.

diffusers' `ControlNetModel` <-> `models.controlnet` (`controlnet_config_from_diffusers`,
`controlnet_weight_map`, `load_diffusers_controlnet`, `save_diffusers_controlnet`): its trunk
(conv_in, embeddings, down blocks, middle) has the UNet's keys and goes through the same
per-block maps; `controlnet_cond_embedding.{conv_in, blocks.{k}, conv_out}` <-
`hint_encoder/{conv_in, conv_{k}, conv_out}`, `controlnet_down_blocks.{k}` <- `zero_conv_{k}`,
`controlnet_mid_block` <- `zero_conv_mid`. Its hint encoder halves the resolution at every
step, so `conditioning_factor` = 2 ** (len(conditioning_embedding_out_channels) - 1).
Refused: `global_pool_conditions`, BGR channel order, a middle block without attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from genctl_jax.errors import ConfigError
from genctl_jax.io import hf_weights
from genctl_jax.io.hf_weights import Tensor
from genctl_jax.models import controlnet, unet

DIFFUSERS_CLASS = "UNet2DConditionModel"
STEM = "diffusion_pytorch_model"
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers' defaults for the keys we map (a config.json may omit any of them).
_DEFAULTS = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
    "up_block_types": (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP),
    "attention_head_dim": 8,  # Really heads per block (diffusers issue 2011).
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "dropout": 0.0,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
}
# Keys whose other values change the architecture in ways models.unet does not implement:
# each must hold one of the listed values (absent: diffusers' default, the first one).
_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"),
    "norm_num_groups": (unet.NORM_GROUPS,),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}
# Keys with no effect on the weights or our numerics: the default input size, the float32
# upcast of attention (ours always computes logits and softmax in float32), and the heads of
# an `addition_embed_type` that `_FIXED` already refuses.
_IGNORED = ("sample_size", "upcast_attention", "addition_embed_type_num_heads")


def _per_level(d: Mapping[str, Any], key: str, levels: int) -> list:
    value = d.get(key, _DEFAULTS[key])
    if isinstance(value, list | tuple):
        if len(value) != levels:
            raise ConfigError(
                f"config.json: {key}={value!r} has {len(value)} entries for {levels} levels"
            )
        return list(value)
    return [value] * levels


def _uniform(d: Mapping[str, Any], key: str, levels: int) -> int:
    values = _per_level(d, key, levels)
    if len(set(map(repr, values))) != 1 or not unet._is_int(values[0]):
        raise ConfigError(
            f"config.json: {key}={d[key]!r}: models.unet takes one integer for every level"
        )
    return values[0]


def config_from_diffusers(diffusers_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Our `config.model` for a diffusers `UNet2DConditionModel` config (its config.json)."""
    d = dict(diffusers_config)
    name = d.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise ConfigError(
            f"config.json: _class_name={name!r}; this converter reads only {DIFFUSERS_CLASS}"
        )
    known = set(_DEFAULTS) | set(_FIXED) | set(_IGNORED)
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ConfigError(
            f"config.json: key {unknown[0]!r} is unknown to this converter (written by a newer "
            f"diffusers?); it reads {', '.join(sorted(known))}"
        )
    for key, accepted in _FIXED.items():
        if key in d and d[key] not in accepted:
            raise ConfigError(
                f"config.json: {key}={d[key]!r} is not supported by models.unet; accepted: "
                f"{' or '.join(map(repr, accepted))}"
            )

    widths = list(d.get("block_out_channels", _DEFAULTS["block_out_channels"]))
    n = len(widths)
    down = list(d.get("down_block_types", _DEFAULTS["down_block_types"]))
    if len(down) != n or any(kind not in (CROSS_DOWN, PLAIN_DOWN) for kind in down):
        raise ConfigError(
            f"config.json: down_block_types={down!r}: expected {n} entries (one per "
            f"block_out_channels), each {CROSS_DOWN!r} or {PLAIN_DOWN!r}"
        )
    levels = [level for level, kind in enumerate(down) if kind == CROSS_DOWN]
    mirror = [CROSS_UP if level in levels else PLAIN_UP for level in reversed(range(n))]
    up = list(d.get("up_block_types", _DEFAULTS["up_block_types"]))
    if up != mirror:
        raise ConfigError(
            f"config.json: up_block_types={up!r} does not mirror down_block_types={down!r}; "
            f"models.unet needs {mirror!r}"
        )
    channels = widths[0]
    if any(not unet._is_int(w) or w % channels for w in widths):
        raise ConfigError(
            f"config.json: block_out_channels={widths!r}: every width must be a multiple of the "
            f"first, {channels}"
        )

    # Heads: one count at every transformer (attention levels and the middle, the last
    # level), else one head width; diffusers gives a count per level.
    heads = _per_level(d, "attention_head_dim", n)
    sites = sorted(set(levels) | {n - 1})
    for level in sites:
        if not unet._is_int(heads[level]) or heads[level] < 1 or widths[level] % heads[level]:
            raise ConfigError(
                f"config.json: attention_head_dim={heads!r} (heads per level): "
                f"{heads[level]!r} heads at level {level} do not split its {widths[level]} "
                f"channels"
            )
    num_heads, head_dim = heads[sites[0]], -1
    if len({heads[level] for level in sites}) > 1:
        head_dims = {widths[level] // heads[level] for level in sites}
        if len(head_dims) > 1:
            raise ConfigError(
                f"config.json: attention_head_dim={heads!r} gives transformers at levels "
                f"{sites} neither one head count nor one head width; models.unet needs one"
            )
        num_heads, head_dim = -1, head_dims.pop()

    scale_shift = d.get("resnet_time_scale_shift", "default")
    if scale_shift not in ("default", "scale_shift"):
        raise ConfigError(
            f"config.json: resnet_time_scale_shift={scale_shift!r}: accepted 'default' "
            f"(additive) or 'scale_shift'"
        )
    class_type = d.get("class_embed_type")
    num_class_embeds = d.get("num_class_embeds")
    pooled_dim = 0
    if class_type == "projection":
        pooled_dim = d.get("projection_class_embeddings_input_dim")
        if not unet._is_int(pooled_dim) or pooled_dim < 1:
            raise ConfigError(
                f"config.json: class_embed_type='projection' needs an integer "
                f"projection_class_embeddings_input_dim, got {pooled_dim!r}"
            )
    elif class_type is not None:
        raise ConfigError(
            f"config.json: class_embed_type={class_type!r}: accepted None (with or without "
            f"num_class_embeds) or 'projection' (a pooled vector, our pooled_dim)"
        )
    if num_class_embeds is not None and (class_type is not None or num_class_embeds < 2):
        raise ConfigError(
            f"config.json: num_class_embeds={num_class_embeds!r} with class_embed_type="
            f"{class_type!r}: a class table needs class_embed_type None and >= 2 rows (the "
            f"last one is our null class)"
        )

    m = unet.default_config()
    m.update(
        in_channels=d.get("in_channels", _DEFAULTS["in_channels"]),
        out_channels=d.get("out_channels", _DEFAULTS["out_channels"]),
        channels=channels,
        channel_mult=tuple(w // channels for w in widths),
        num_res_blocks=_uniform(d, "layers_per_block", n),
        attention_resolutions=(),
        attention_levels=tuple(levels),
        num_heads=num_heads,
        head_dim=head_dim,
        dropout=float(d.get("dropout", _DEFAULTS["dropout"])),
        num_classes=num_class_embeds - 1 if num_class_embeds else 0,
        scale_shift_norm=scale_shift == "scale_shift",
        context_dim=_uniform(d, "cross_attention_dim", n),
        transformer_depth=_uniform(d, "transformer_layers_per_block", n),
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        pooled_dim=pooled_dim,
    )
    return m


def _diffusers_layout(model_config) -> ml_collections.ConfigDict:
    """`config.model` with defaults, refusing settings that diffusers' layout cannot express."""
    m = unet._with_defaults(model_config)
    problems = (
        (m.context_dim < 1, "context_dim", "> 0: UNet2DConditionModel always cross-attends"),
        (m.attention_resolutions, "attention_resolutions", "(): set attention_levels instead"),
        (m.resblock_updown, "resblock_updown", "False: diffusers resamples with convs"),
        (m.patch_size != 1, "patch_size", "1: diffusers has no patch folding"),
        (
            m.num_classes and m.pooled_dim,
            "pooled_dim",
            "0 with num_classes > 0: one class_embedding",
        ),
    )
    for bad, field, accepted in problems:
        if bad:
            raise ConfigError(
                f"config.model.{field}={m[field]!r} has no equivalent in diffusers' "
                f"UNet2DConditionModel; expected {accepted}"
            )
    return m


def diffusers_config(model_config, sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` config.json of our `config.model`."""
    m = _diffusers_layout(model_config)
    widths = [m.channels * k for k in m.channel_mult]
    levels = set(m.attention_levels)
    heads = m.num_heads if m.head_dim <= 0 else [w // m.head_dim for w in widths]
    return {
        "_class_name": DIFFUSERS_CLASS,
        "sample_size": sample_size,
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "block_out_channels": widths,
        "layers_per_block": m.num_res_blocks,
        "down_block_types": [CROSS_DOWN if i in levels else PLAIN_DOWN for i in range(len(widths))],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [
            CROSS_UP if i in levels else PLAIN_UP for i in reversed(range(len(widths)))
        ],
        "attention_head_dim": heads,
        "cross_attention_dim": m.context_dim,
        "transformer_layers_per_block": m.transformer_depth,
        "use_linear_projection": m.use_linear_projection,
        "dropout": m.dropout,
        "resnet_time_scale_shift": "scale_shift" if m.scale_shift_norm else "default",
        "class_embed_type": "projection" if m.pooled_dim else None,
        "projection_class_embeddings_input_dim": m.pooled_dim or None,
        "num_class_embeds": m.num_classes + 1 if m.num_classes else None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "norm_num_groups": unet.NORM_GROUPS,
        "norm_eps": 1e-5,
    }


def _conv(ours: tuple[str, ...], theirs: str) -> list[Tensor]:
    return [
        Tensor((*ours, "kernel"), f"{theirs}.weight", "conv"),
        Tensor((*ours, "bias"), f"{theirs}.bias"),
    ]


def _linear(ours: tuple[str, ...], theirs: str) -> list[Tensor]:
    return [
        Tensor((*ours, "kernel"), f"{theirs}.weight", "linear"),
        Tensor((*ours, "bias"), f"{theirs}.bias"),
    ]


def _norm(ours: tuple[str, ...], theirs: str) -> list[Tensor]:
    return [Tensor((*ours, "scale"), f"{theirs}.weight"), Tensor((*ours, "bias"), f"{theirs}.bias")]


def _resnet(ours: str, theirs: str, shortcut: bool) -> list[Tensor]:
    """ResBlock <- ResnetBlock2D; `shortcut`: the width changes, so a 1x1 conv_shortcut."""
    out = [
        *_norm((ours, "norm_1"), f"{theirs}.norm1"),
        *_conv((ours, "conv_1"), f"{theirs}.conv1"),
        *_linear((ours, "emb_proj"), f"{theirs}.time_emb_proj"),
        *_norm((ours, "norm_2"), f"{theirs}.norm2"),
        *_conv((ours, "conv_2"), f"{theirs}.conv2"),
    ]
    return out + (_conv((ours, "skip"), f"{theirs}.conv_shortcut") if shortcut else [])


def _attention(ours: tuple[str, ...], theirs: str) -> list[Tensor]:
    """Attention <- diffusers `Attention`: q/k/v kernels [in, heads, head_dim], no biases."""
    out = [
        Tensor((*ours, name, "kernel"), f"{theirs}.to_{short}.weight", "linear")
        for name, short in (("query", "q"), ("key", "k"), ("value", "v"))
    ]
    out.append(Tensor((*ours, "out", "kernel"), f"{theirs}.to_out.0.weight", "linear", 2))
    out.append(Tensor((*ours, "out", "bias"), f"{theirs}.to_out.0.bias"))
    return out


def _transformer(ours: str, theirs: str, m) -> list[Tensor]:
    """SpatialTransformer <- Transformer2DModel (continuous input, layer_norm blocks)."""
    project = _linear if m.use_linear_projection else _conv
    out = [
        *_norm((ours, "norm"), f"{theirs}.norm"),
        *project((ours, "proj_in"), f"{theirs}.proj_in"),
        *project((ours, "proj_out"), f"{theirs}.proj_out"),
    ]
    for j in range(m.transformer_depth):
        block, src = (ours, f"block_{j}"), f"{theirs}.transformer_blocks.{j}"
        for k in (1, 2, 3):
            out += _norm((*block, f"norm_{k}"), f"{src}.norm{k}")
        out += _attention((*block, "self_attn"), f"{src}.attn1")
        out += _attention((*block, "cross_attn"), f"{src}.attn2")
        # GEGLU: our [C, 2, inner] kernel is torch's [2 * inner, C], value half first.
        out.append(
            Tensor((*block, "ff", "proj", "kernel"), f"{src}.ff.net.0.proj.weight", "linear")
        )
        out.append(Tensor((*block, "ff", "proj", "bias"), f"{src}.ff.net.0.proj.bias", "vector"))
        out += _linear((*block, "ff", "out"), f"{src}.ff.net.2")
    return out


def _trunk_tensors(m) -> tuple[list[Tensor], int, list[int]]:
    """The tensors of `unet.UNetTrunk.encode`'s layers (embeddings, conv_in, down path, middle),
    named as in both `UNet2DConditionModel` and `ControlNetModel`; with the middle's width and
    the width of every skip, in order."""
    widths = [m.channels * k for k in m.channel_mult]
    n, levels = len(widths), set(m.attention_levels)
    tensors = [
        *_conv(("conv_in",), "conv_in"),
        *_linear(("time_embed", "dense_0"), "time_embedding.linear_1"),
        *_linear(("time_embed", "dense_1"), "time_embedding.linear_2"),
    ]
    if m.num_classes:
        tensors.append(Tensor(("class_embed", "embedding"), "class_embedding.weight"))
    if m.pooled_dim:
        tensors += _linear(("pooled_embed", "dense_0"), "class_embedding.linear_1")
        tensors += _linear(("pooled_embed", "dense_1"), "class_embedding.linear_2")

    # Walk the down path as `unet.UNetTrunk.encode` does, tracking widths to know which
    # ResBlocks have a skip conv.
    h, skips = widths[0], [widths[0]]
    for level, width in enumerate(widths):
        src = f"down_blocks.{level}"
        for i in range(m.num_res_blocks):
            tensors += _resnet(f"down_{level}_res_{i}", f"{src}.resnets.{i}", h != width)
            h = width
            if level in levels:
                tensors += _transformer(f"down_{level}_attn_{i}", f"{src}.attentions.{i}", m)
            skips.append(h)
        if level < n - 1:
            tensors += _conv((f"down_{level}_downsample", "conv"), f"{src}.downsamplers.0.conv")
            skips.append(h)
    tensors += _resnet("mid_res_0", "mid_block.resnets.0", False)
    tensors += _transformer("mid_attn", "mid_block.attentions.0", m)
    tensors += _resnet("mid_res_1", "mid_block.resnets.1", False)
    return tensors, h, skips


def weight_map(model_config) -> list[Tensor]:
    """One `Tensor` per parameter of `unet.from_config(model_config)`, keyed as in diffusers."""
    m = _diffusers_layout(model_config)
    widths = [m.channels * k for k in m.channel_mult]
    n, levels = len(widths), set(m.attention_levels)
    tensors, h, skips = _trunk_tensors(m)
    tensors += [*_norm(("norm_out",), "conv_norm_out"), *_conv(("conv_out",), "conv_out")]
    for level in reversed(range(n)):
        src = f"up_blocks.{n - 1 - level}"
        for i in range(m.num_res_blocks + 1):
            c_in = h + skips.pop()
            tensors += _resnet(f"up_{level}_res_{i}", f"{src}.resnets.{i}", c_in != widths[level])
            h = widths[level]
            if level in levels:
                tensors += _transformer(f"up_{level}_attn_{i}", f"{src}.attentions.{i}", m)
        if level > 0:
            tensors += _conv((f"up_{level}_upsample", "conv"), f"{src}.upsamplers.0.conv")
    return tensors


def abstract_params(module: unet.UNet, model_config) -> Any:
    """The boxed (logically named) abstract `params` tree of `module`, nothing materialised."""
    m = unet._with_defaults(model_config)
    size = 2 ** (len(m.channel_mult) - 1)  # Attention is per level: any size that divides.

    def init():
        x = jnp.zeros((1, size, size, m.in_channels))
        t = jnp.zeros((1,), jnp.int32)
        labels = jnp.zeros((1,), jnp.int32) if m.num_classes else None
        context = jnp.zeros((1, 1, m.context_dim)) if m.context_dim else None
        pooled = jnp.zeros((1, m.pooled_dim)) if m.pooled_dim else None
        return module.init(jax.random.key(0), x, t, labels, context=context, pooled=pooled)

    return jax.eval_shape(init)["params"]


def load_diffusers(
    directory: str | Path, *, mesh: jax.sharding.Mesh | None = None, rules: Any = None
) -> tuple[unet.UNet, dict]:
    """(module, params) of a diffusers UNet2DConditionModel directory (or cached repo id).

    Apply as `module.apply({"params": params}, x, t, context=..., context_mask=...)`. With a
    mesh, each parameter is read straight into its shards under `rules` (default
    `configlib.DEFAULT_RULES`); weights are cast to float32 (our params dtype).
    """
    directory = hf_weights.resolve_directory(directory)
    model_config = config_from_diffusers(hf_weights.read_config(directory))
    module = unet.from_config(model_config)
    checkpoint = hf_weights.open_checkpoint(directory, stem=STEM)
    params = hf_weights.load_params(
        abstract_params(module, model_config),
        weight_map(model_config),
        checkpoint,
        mesh,
        rules,
        source=str(directory),
    )
    return module, params


def save_diffusers(
    directory: str | Path,
    model_config,
    params: Mapping,
    overwrite: bool = False,
    *,
    sample_size: int | None = None,
) -> Path:
    """Writes `params` (the `params` tree, or `{"params": tree}`) as a diffusers directory.

    `diffusers.UNet2DConditionModel.from_pretrained(directory)` then loads the same weights;
    `sample_size` (the default latent size pipelines read) goes into config.json.
    """
    if set(params) == {"params"}:
        params = params["params"]
    tensors = hf_weights.export_params(weight_map(model_config), params)
    config = diffusers_config(model_config, sample_size)
    return hf_weights.save_checkpoint(directory, tensors, config, stem=STEM, overwrite=overwrite)


# --- ControlNetModel <-> models.controlnet ----------------------------------------------------

CONTROLNET_CLASS = "ControlNetModel"
CONTROLNET_HINT = "controlnet_cond_embedding"
# ControlNetModel's own keys whose other values models.controlnet does not implement.
_CONTROLNET_FIXED = {
    "controlnet_conditioning_channel_order": ("rgb",),
    "global_pool_conditions": (False,),
}
# UNet2DConditionModel keys that ControlNetModel does not take (from_pretrained ignores them).
_UNET_ONLY = (
    "attention_type",
    "center_input_sample",
    "class_embeddings_concat",
    "conv_in_kernel",
    "conv_out_kernel",
    "cross_attention_norm",
    "dropout",
    "dual_cross_attention",
    "mid_block_only_cross_attention",
    "out_channels",
    "resnet_out_scale_factor",
    "resnet_skip_time_act",
    "reverse_transformer_layers_per_block",
    "sample_size",
    "time_cond_proj_dim",
    "time_embedding_act_fn",
    "time_embedding_dim",
    "time_embedding_type",
    "timestep_post_act",
    "up_block_types",
)
_CONTROLNET_DEFAULTS = {
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
}


def controlnet_config_from_diffusers(
    diffusers_config: Mapping[str, Any],
) -> ml_collections.ConfigDict:
    """Our ControlNet `config.model` for a diffusers `ControlNetModel` config (its config.json).

    The trunk keys are read as `config_from_diffusers` reads a UNet's; the hint encoder halves
    the resolution at every step, so `conditioning_factor` = 2 ** (steps).
    """
    d = {k: v for k, v in diffusers_config.items() if k not in _UNET_ONLY}
    name = d.pop("_class_name", CONTROLNET_CLASS)
    if name != CONTROLNET_CLASS:
        raise ConfigError(
            f"config.json: _class_name={name!r}; this converter reads only {CONTROLNET_CLASS} "
            f"(a {DIFFUSERS_CLASS} loads with load_diffusers)"
        )
    for key, accepted in _CONTROLNET_FIXED.items():
        value = d.pop(key, accepted[0])
        if value not in accepted:
            raise ConfigError(
                f"config.json: {key}={value!r} is not supported by models.controlnet; accepted: "
                f"{' or '.join(map(repr, accepted))}"
            )
    channels = d.pop("conditioning_channels", _CONTROLNET_DEFAULTS["conditioning_channels"])
    key = "conditioning_embedding_out_channels"
    hint = d.pop(key, _CONTROLNET_DEFAULTS[key])
    if not unet._is_int(channels) or channels < 1:
        raise ConfigError(
            f"config.json: conditioning_channels={channels!r}: expected an integer >= 1"
        )
    if not isinstance(hint, list | tuple) or not hint or not all(unet._is_int(w) for w in hint):
        raise ConfigError(f"config.json: {key}={hint!r}: expected a non-empty list of integers")
    # A ControlNetModel has no up path: read the trunk as a UNet whose up path mirrors it.
    down = d.get("down_block_types", _DEFAULTS["down_block_types"])
    if isinstance(down, list | tuple):
        d["up_block_types"] = [CROSS_UP if k == CROSS_DOWN else PLAIN_UP for k in reversed(down)]
    d["out_channels"] = d.get("in_channels", _DEFAULTS["in_channels"])
    base = config_from_diffusers({**d, "_class_name": DIFFUSERS_CLASS})
    return controlnet.config_from_unet(
        base,
        conditioning_channels=channels,
        hint_channels=tuple(hint),
        conditioning_factor=2 ** (len(hint) - 1),
    )


def _controlnet_layout(model_config) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(ControlNet config with defaults, its trunk as a UNet config), refusing what diffusers'
    ControlNetModel cannot express."""
    m = controlnet._with_defaults(model_config)
    steps = len(m.hint_channels) - 1
    if m.conditioning_factor != 2**steps:
        raise ConfigError(
            f"config.model.conditioning_factor={m.conditioning_factor} with hint_channels="
            f"{tuple(m.hint_channels)} has no equivalent in diffusers' ControlNetModel, whose "
            f"hint encoder halves the resolution at each of its {steps} steps; expected "
            f"conditioning_factor={2**steps} (or {m.conditioning_factor.bit_length()} "
            f"hint_channels)"
        )
    return m, _diffusers_layout(controlnet.unet_config(m))


def diffusers_controlnet_config(model_config) -> dict[str, Any]:
    """The diffusers `ControlNetModel` config.json of our ControlNet `config.model`."""
    m, base = _controlnet_layout(model_config)
    config = diffusers_config(base)
    for key in _UNET_ONLY:
        config.pop(key, None)
    config.update(
        _class_name=CONTROLNET_CLASS,
        conditioning_channels=m.conditioning_channels,
        conditioning_embedding_out_channels=list(m.hint_channels),
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )
    return config


def controlnet_weight_map(model_config) -> list[Tensor]:
    """One `Tensor` per parameter of `controlnet.from_config(model_config)`, keyed as in
    diffusers' `ControlNetModel`: the trunk as in `weight_map`, `hint_encoder/conv_in`,
    `conv_{k}`, `conv_out` <- `controlnet_cond_embedding.conv_in`, `blocks.{k}`, `conv_out`,
    `zero_conv_{k}` <- `controlnet_down_blocks.{k}`, `zero_conv_mid` <- `controlnet_mid_block`."""
    m, base = _controlnet_layout(model_config)
    tensors, _, skips = _trunk_tensors(base)
    hint = controlnet.HINT_ENCODER
    tensors += _conv((hint, "conv_in"), f"{CONTROLNET_HINT}.conv_in")
    for k in range(2 * (len(m.hint_channels) - 1)):
        tensors += _conv((hint, f"conv_{k}"), f"{CONTROLNET_HINT}.blocks.{k}")
    tensors += _conv((hint, "conv_out"), f"{CONTROLNET_HINT}.conv_out")
    for k in range(len(skips)):
        tensors += _conv((f"{controlnet.ZERO_CONV_PREFIX}{k}",), f"controlnet_down_blocks.{k}")
    tensors += _conv((f"{controlnet.ZERO_CONV_PREFIX}mid",), "controlnet_mid_block")
    return tensors


def load_diffusers_controlnet(
    directory: str | Path,
    *,
    base: Any = None,
    conditioning_channels: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> tuple[controlnet.ControlNet, dict]:
    """(module, params) of a diffusers ControlNetModel directory (or cached repo id).

    base: the base UNet's `config.model` (or its `unet.UNet` module), checked to have the
    ControlNet's trunk layout; conditioning_channels: checked against config.json's. Apply as
    `module.apply({"params": params}, x, t, condition, context=..., conditioning_scale=...)`.
    With a mesh, each parameter is read straight into its shards under `rules` (default
    `configlib.DEFAULT_RULES`); weights are cast to float32.
    """
    directory = hf_weights.resolve_directory(directory)
    model_config = controlnet_config_from_diffusers(hf_weights.read_config(directory))
    if base is not None:
        controlnet.check_matches_unet(
            model_config,
            base,
            controlnet_source=f"the ControlNet at {directory} (config.json)",
            unet_source="the base UNet",
        )
    if conditioning_channels is not None and conditioning_channels != (
        model_config.conditioning_channels
    ):
        raise ConfigError(
            f"the ControlNet at {directory} takes conditioning_channels="
            f"{model_config.conditioning_channels} (config.json), not the {conditioning_channels} "
            f"asked for; pass condition images with {model_config.conditioning_channels} channels"
        )
    module = controlnet.from_config(model_config)
    checkpoint = hf_weights.open_checkpoint(directory, stem=STEM)
    params = hf_weights.load_params(
        controlnet.abstract_params(module),
        controlnet_weight_map(model_config),
        checkpoint,
        mesh,
        rules,
        source=str(directory),
    )
    return module, params


def save_diffusers_controlnet(
    directory: str | Path, model_config, params: Mapping, overwrite: bool = False
) -> Path:
    """Writes ControlNet `params` (the tree, or `{"params": tree}`) as a diffusers directory
    that `diffusers.ControlNetModel.from_pretrained(directory)` loads."""
    if set(params) == {"params"}:
        params = params["params"]
    tensors = hf_weights.export_params(controlnet_weight_map(model_config), params)
    config = diffusers_controlnet_config(model_config)
    return hf_weights.save_checkpoint(directory, tensors, config, stem=STEM, overwrite=overwrite)
