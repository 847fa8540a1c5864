"""ControlNet (Zhang, Rao & Agrawala 2023) for every `models.unet` variant, NHWC, sharded.

A trainable copy of the base UNet's trunk (`unet.UNetTrunk.encode`: the timestep, class and
pooled-text embeddings, `conv_in`, the down levels and the middle block, with the UNet's
parameter names) reads the noisy input x like the UNet does, plus a condition image (edges,
depth, pose, ...) through a small conv "hint encoder" whose output is added to `conv_in`'s.
A zero-initialised 1x1 conv on each of the trunk's skips (conv_in's output (+ hint), then
every down block's output, `unet.num_skips` of them) and one on the middle block's output give
the residuals; each is multiplied by a per-call `conditioning_scale`. The frozen base UNet
adds them to its own skips and middle output (`UNet.__call__(..., down_residuals=...,
mid_residual=...)`), as diffusers' `ControlNetModel` feeds `UNet2DConditionModel`'s
`down_block_additional_residuals` / `mid_block_additional_residual`.

Hint encoder (diffusers' `ControlNetConditioningEmbedding`, params under `hint_encoder`):
`conv_in` 3x3 to `hint_channels[0]` -> SiLU, then for each step i to `hint_channels[i + 1]` a
3x3 conv (`conv_{2i}`) -> SiLU -> 3x3 conv (`conv_{2i+1}`) -> SiLU, then the zero-initialised
3x3 `conv_out` to the UNet's base width. The condition image is `conditioning_factor` times
the side of x (8 for Stable Diffusion: 512-pixel conditions, 64-latent x; 1 for a pixel-space
UNet), so the encoder downsamples by `conditioning_factor x patch_size`: the first log2 of that
many `conv_{2i+1}` have stride 2 (padding 1 on every side), the rest stride 1. diffusers'
layout is `hint_channels` = (16, 32, 96, 256) with every step strided, i.e. factor 8.

Zero initialisation: the zero convs (kernel and bias) and the hint encoder's `conv_out` start
at zero, so a fresh ControlNet returns exactly-zero residuals, and the base UNet's additions
of them change no bit of its output (op by op; a jitted program with residual inputs may get
other XLA kernels, ~1e-6 apart). `init_from_unet` copies the base UNet's trunk parameters
into a fresh ControlNet (diffusers' `ControlNetModel.from_unet`).

Text: the ControlNet cross-attends to the same `context` as the base UNet, under the same
`context_mask` (diffusers' ControlNetModel has no text mask; parity holds without one).
Not implemented: diffusers' `guess_mode` (scales rising from 0.1 to 1 over the residuals) and
`global_pool_conditions`.

Logical names: the trunk's are the UNet's; the hint encoder's and zero convs' kernels are
conv kernels (kernel_h, kernel_w, conv_in, conv_out), biases `vector`, so one rules table
shards both networks. `models.unet_diffusers` converts diffusers `ControlNetModel` weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from genctl_jax.errors import ConfigError
from genctl_jax.models import unet
from genctl_jax.nn.blocks import ZEROS, strided_conv
from genctl_jax.nn.layers import constrain_image, conv

HINT_ENCODER = "hint_encoder"  # Name of the hint encoder's params.
ZERO_CONV_PREFIX = "zero_conv_"  # zero_conv_{k}: the k-th down residual's; zero_conv_mid.
# config.model fields of the UNet that the ControlNet's trunk copies (all but out_channels).
TRUNK_FIELDS = tuple(k for k in unet.FIELDS if k != "out_channels")
# Trunk fields that do not change the parameters (compute and regularisation settings).
_NON_LAYOUT = ("dropout", "remat", "dtype")


def default_config() -> ml_collections.ConfigDict:
    """The `config.model` block of a ControlNet: the base UNet's trunk fields (see
    `unet.default_config`, all but `out_channels`) plus the condition's (one line each)."""
    m = unet.default_config()
    del m["out_channels"]
    m.name = "controlnet"
    m.conditioning_channels = 3  # Channels of the condition image (3: RGB edges, depth, ...).
    m.hint_channels = (16, 32, 96, 256)  # Hint encoder widths, one per step (diffusers').
    # Condition image side / x side: 8 for latent diffusion with an 8x VAE (SD), 1 for pixels.
    m.conditioning_factor = 1
    return m


FIELDS = tuple(k for k in default_config() if k != "name")


def config_from_unet(
    unet_model_config,
    *,
    conditioning_channels: int = 3,
    hint_channels: Sequence[int] = (16, 32, 96, 256),
    conditioning_factor: int,
) -> ml_collections.ConfigDict:
    """The ControlNet `config.model` for a base UNet's `config.model` (its trunk fields copied).

    conditioning_factor: the condition image's side over x's (8 for SD's latents, 1 for a
    pixel-space UNet); the other defaults are diffusers' `ControlNetModel.from_unet`'s.
    """
    base = unet._with_defaults(unet_model_config)
    m = default_config()
    m.update({k: base[k] for k in TRUNK_FIELDS})
    m.update(
        conditioning_channels=conditioning_channels,
        hint_channels=tuple(hint_channels),
        conditioning_factor=conditioning_factor,
    )
    return m


def tiny_config() -> ml_collections.ConfigDict:
    """For tests: `unet.tiny_config()`'s trunk (pixel space, class-conditional), hint 8/16."""
    return config_from_unet(unet.tiny_config(), hint_channels=(8, 16), conditioning_factor=1)


def tiny_text_config() -> ml_collections.ConfigDict:
    """For tests: `unet.tiny_text_config()`'s trunk, conditions at twice x's size, hint 8/16."""
    return config_from_unet(unet.tiny_text_config(), hint_channels=(8, 16), conditioning_factor=2)


def sd15_config() -> ml_collections.ConfigDict:
    """The ControlNet of Stable Diffusion 1.x (lllyasviel/sd-controlnet-*; 361,279,120 params):
    `unet.sd15_config()`'s trunk, RGB conditions at 8x the latent size (512 px)."""
    return config_from_unet(unet.sd15_config(), conditioning_factor=8)


class HintEncoder(nn.Module):
    """Condition [B, H, W, C] -> [B, H / downsample, W / downsample, features] (module doc)."""

    features: int  # Output channels: the UNet's base width (conv_in's output).
    channels: Sequence[int] = (16, 32, 96, 256)  # Widths, one per step.
    downsample: int = 8  # Total stride, a power of two <= 2 ** (len(channels) - 1).
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params float32.

    @nn.compact
    def __call__(self, c):
        widths = tuple(self.channels)
        strided = self.downsample.bit_length() - 1
        if self.downsample != 2**strided or strided > len(widths) - 1:
            raise ValueError(
                f"HintEncoder downsample={self.downsample}: expected a power of two <= "
                f"{2 ** (len(widths) - 1)} (one stride-2 conv per step of channels={widths})"
            )
        dt = self.dtype
        h = nn.silu(conv(widths[0], dtype=dt, name="conv_in")(c.astype(dt)))
        for i in range(len(widths) - 1):
            h = nn.silu(conv(widths[i], dtype=dt, name=f"conv_{2 * i}")(h))
            name = f"conv_{2 * i + 1}"
            if i < strided:
                h = strided_conv(widths[i + 1], dtype=dt, name=name)(h)
            else:
                h = conv(widths[i + 1], dtype=dt, name=name)(h)
            h = nn.silu(h)
        out = conv(self.features, dtype=dt, kernel_init=ZEROS, name="conv_out")(h)
        return constrain_image(out)


class ControlNet(unet.UNetTrunk):
    """(x, t, condition, labels) -> (down residuals, mid residual) for the base UNet.

    The fields other than the three below are the base UNet's (`unet.UNetTrunk`); they must
    describe the same layout for `init_from_unet` and for the residuals to fit.
    """

    conditioning_channels: int = 3  # Channels of the condition image.
    hint_channels: Sequence[int] = (16, 32, 96, 256)  # Hint encoder widths, one per step.
    conditioning_factor: int = 1  # Condition image side / x side (8 for SD latents).

    @nn.compact
    def __call__(
        self,
        x,
        t,
        condition,
        labels=None,
        *,
        context=None,
        context_mask=None,
        pooled=None,
        conditioning_scale=1.0,
        train: bool = False,
    ) -> tuple[list[jax.Array], jax.Array]:
        """x, t, labels, context, context_mask, pooled, train: as the base `UNet.__call__`;
        condition [B, f H, f W, conditioning_channels] float (f = `conditioning_factor`);
        conditioning_scale: a float, or a [B] array (one scale per example).

        Returns (down, mid), in the compute dtype and already multiplied by
        `conditioning_scale`: `unet.num_skips(self)` arrays, each of the shape of the base
        UNet's skip it is added to, and one of the middle block output's shape; the base UNet
        takes them as `down_residuals` and `mid_residual`.
        """
        self._check_condition(x, condition)
        hint = HintEncoder(
            self.channels,
            tuple(self.hint_channels),
            self.conditioning_factor * self.patch_size,
            dtype=self.dtype,
            name=HINT_ENCODER,
        )(condition)
        h, skips, _ = self.encode(
            x,
            t,
            labels,
            context=context,
            context_mask=context_mask,
            pooled=pooled,
            train=train,
            hint=hint,
        )
        scale = jnp.asarray(conditioning_scale, self.dtype)
        if scale.ndim == 1 and scale.shape == (x.shape[0],):
            scale = scale[:, None, None, None]
        elif scale.ndim != 0:
            raise ValueError(
                f"conditioning_scale has shape {scale.shape}; expected a scalar or [{x.shape[0]}]"
            )

        def zero_conv(h, name):
            out = conv(h.shape[-1], 1, dtype=self.dtype, kernel_init=ZEROS, name=name)(h)
            return constrain_image(out * scale)

        down = [zero_conv(s, f"{ZERO_CONV_PREFIX}{k}") for k, s in enumerate(skips)]
        return down, zero_conv(h, f"{ZERO_CONV_PREFIX}mid")

    def _check_condition(self, x, condition) -> None:
        f, c = self.conditioning_factor, self.conditioning_channels
        self.check_x(x)
        b, height, width, _ = x.shape
        if condition.ndim == 4 and condition.shape[-1] != c:
            raise ValueError(
                f"condition has {condition.shape[-1]} channels (shape {condition.shape}); this "
                f"ControlNet takes {c} (config.model.conditioning_channels={c})"
            )
        expected = (b, f * height, f * width, c)
        if condition.shape != expected:
            raise ValueError(
                f"condition has shape {condition.shape}; expected [{b}, {f * height}, "
                f"{f * width}, {c}]: conditioning_factor={f} times x's {height} x {width}"
            )


def _with_defaults(model_config) -> ml_collections.ConfigDict:
    m = default_config().to_dict()
    m.update({key: model_config[key] for key in model_config if key in m})
    return ml_collections.ConfigDict(m, type_safe=False)


def unet_config(model_config, out_channels: int | None = None) -> ml_collections.ConfigDict:
    """The base UNet's `config.model` that this ControlNet config copies the trunk of
    (`out_channels`, which the trunk lacks: given, else `in_channels`)."""
    m = _with_defaults(model_config)
    base = unet.default_config()
    base.update({k: m[k] for k in TRUNK_FIELDS})
    base.out_channels = m.in_channels if out_channels is None else out_channels
    return base


def from_config(model_config) -> ControlNet:
    """Builds the ControlNet from `config.model`; absent fields take `default_config()`'s."""
    m = _with_defaults(model_config)
    kwargs = {k: getattr(unet.from_config(unet_config(m)), k) for k in TRUNK_FIELDS}
    return ControlNet(
        **kwargs,
        conditioning_channels=m.conditioning_channels,
        hint_channels=tuple(m.hint_channels),
        conditioning_factor=m.conditioning_factor,
    )


def validate(config) -> None:
    """Checks `config.model` (a ControlNet's) and `config.data.image_size` (x's side)."""
    unknown = sorted(set(config.model.keys()) - set(FIELDS) - {"name"})
    if unknown:
        raise ConfigError(
            f"config.model.{unknown[0]} is not a controlnet field; accepted: {', '.join(FIELDS)}"
        )
    m = _with_defaults(config.model)
    view = ml_collections.ConfigDict(
        {"model": unet_config(m), "data": {"image_size": config.data.image_size}}
    )
    unet.validate(view)
    if not unet._is_int(m.conditioning_channels) or m.conditioning_channels < 1:
        raise ConfigError(
            f"config.model.conditioning_channels={m.conditioning_channels!r}: expected an "
            f"integer >= 1"
        )
    widths = m.hint_channels
    if (
        not isinstance(widths, tuple | list)
        or not widths
        or not all(unet._is_int(w) and w >= 1 for w in widths)
    ):
        raise ConfigError(
            f"config.model.hint_channels={widths!r}: expected a non-empty tuple of integers >= 1"
        )
    f = m.conditioning_factor
    if not unet._is_int(f) or f < 1 or f & (f - 1):
        raise ConfigError(
            f"config.model.conditioning_factor={f!r}: expected a power of two >= 1 (the "
            f"condition image's side over x's: 8 for SD latents, 1 for pixel space)"
        )
    stride = f * m.patch_size
    if stride > 2 ** (len(widths) - 1):
        raise ConfigError(
            f"config.model.hint_channels={tuple(widths)!r} has {len(widths) - 1} stride-2 steps, "
            f"too few to downsample the condition by conditioning_factor={f} x patch_size="
            f"{m.patch_size} = {stride}; give at least {stride.bit_length()} widths"
        )


def _heads_per_level(m) -> tuple[int, ...]:
    return tuple(
        m.num_heads if m.head_dim <= 0 else m.channels * k // m.head_dim for k in m.channel_mult
    )


def check_matches_unet(
    model_config,
    unet_model_config,
    *,
    controlnet_source: str = "the ControlNet's config.model",
    unet_source: str = "the base UNet's config.model",
) -> None:
    """Raises ConfigError unless the ControlNet config's trunk has the base UNet's layout
    (every trunk field but dropout, remat and dtype; heads compared per level). Either config
    may also be given as its module (`ControlNet`, `unet.UNet`)."""
    m = _with_defaults(_fields_of(model_config))
    base = unet._with_defaults(_fields_of(unet_model_config))

    def norm(v):
        return tuple(v) if isinstance(v, list | tuple) else v

    for field in TRUNK_FIELDS:
        if field in _NON_LAYOUT or field in ("num_heads", "head_dim"):
            continue
        if norm(m[field]) != norm(base[field]):
            raise ConfigError(
                f"{controlnet_source} has {field}={norm(m[field])!r} but {unet_source} has "
                f"{field}={norm(base[field])!r}: a ControlNet copies the base UNet's embeddings, "
                f"conv_in, down levels and middle block, so their layouts must be equal"
            )
    if _heads_per_level(m) != _heads_per_level(base):
        raise ConfigError(
            f"{controlnet_source} has num_heads={m.num_heads}, head_dim={m.head_dim} "
            f"(heads per level {_heads_per_level(m)}) but {unet_source} has num_heads="
            f"{base.num_heads}, head_dim={base.head_dim} (heads per level "
            f"{_heads_per_level(base)}); the attention layouts must be equal"
        )


def _fields_of(config_or_module) -> Mapping:
    if isinstance(config_or_module, unet.UNetTrunk):
        return {k: getattr(config_or_module, k) for k in TRUNK_FIELDS}
    return config_or_module


def is_controlnet_only(name: str) -> bool:
    """Whether a top-level param name is the ControlNet's own (not copied from the UNet)."""
    return name == HINT_ENCODER or name.startswith(ZERO_CONV_PREFIX)


def init_from_unet(controlnet_params: Mapping, unet_params: Mapping) -> dict[str, Any]:
    """A fresh ControlNet's params with the base UNet's trunk copied in (`from_unet`).

    controlnet_params: a ControlNet's freshly initialised `params` (its `hint_encoder` and
    zero convs are kept: at their init, the zero convs and hint `conv_out` zero);
    unet_params: the base UNet's `params` (its up path and output layers are not used). Either
    may be wrapped as {"params": tree}; boxes (logical names) are dropped. The trunk arrays are
    copies (on the same devices and shardings), so donating one network's buffers never
    invalidates the other's.
    """
    controlnet_params = nn.unbox(_params(controlnet_params))
    unet_params = nn.unbox(_params(unet_params))
    out: dict[str, Any] = {}
    for name, value in controlnet_params.items():
        if is_controlnet_only(name):
            out[name] = value
            continue
        if name not in unet_params:
            raise ConfigError(
                f"the base UNet's params have no {name!r}, which the ControlNet's trunk has; "
                f"build the ControlNet with controlnet.config_from_unet(<the UNet's "
                f"config.model>) (check_matches_unet names the differing field)"
            )
        source = unet_params[name]
        ours = jax.tree_util.tree_flatten_with_path(value)[0]
        theirs = dict(jax.tree_util.tree_flatten_with_path(source)[0])
        for path, leaf in ours:
            key = f"{name}{jax.tree_util.keystr(path)}"
            if path not in theirs or jnp.shape(theirs[path]) != jnp.shape(leaf):
                found = jnp.shape(theirs[path]) if path in theirs else "missing"
                raise ConfigError(
                    f"the base UNet's param {key} is {found}, the ControlNet's has shape "
                    f"{jnp.shape(leaf)}: the two configs describe different layouts "
                    f"(controlnet.check_matches_unet names the differing field)"
                )
        if len(theirs) != len(ours):
            raise ConfigError(
                f"the base UNet's {name!r} has {len(theirs)} params, the ControlNet's "
                f"{len(ours)}: the two configs describe different layouts"
            )
        out[name] = jax.tree.map(jnp.copy, source)
    return out


def _params(tree: Mapping) -> Mapping:
    return tree["params"] if set(tree) == {"params"} else tree


def example_inputs(module: ControlNet, batch: int = 1, size: int | None = None) -> dict:
    """Zero inputs of the right shapes for `module.init` (x of side `size`, by default the
    smallest every level divides), as keyword arguments."""
    levels = len(tuple(module.channel_mult))
    size = size or module.patch_size * 2 ** (levels - 1)
    f = module.conditioning_factor
    return dict(
        x=jnp.zeros((batch, size, size, module.in_channels)),
        t=jnp.zeros((batch,), jnp.int32),
        condition=jnp.zeros((batch, f * size, f * size, module.conditioning_channels)),
        labels=jnp.zeros((batch,), jnp.int32) if module.num_classes else None,
        context=jnp.zeros((batch, 1, module.context_dim)) if module.context_dim else None,
        pooled=jnp.zeros((batch, module.pooled_dim)) if module.pooled_dim else None,
    )


def abstract_params(module: ControlNet) -> Any:
    """The boxed (logically named) abstract `params` tree of `module`, nothing materialised."""

    def init():
        return module.init(jax.random.key(0), **example_inputs(module))

    return jax.eval_shape(init)["params"]
