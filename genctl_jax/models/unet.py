"""The ADM / DDPM diffusion UNet: timestep(+class)-conditioned, NHWC, logically sharded.

Architecture (Ho et al. 2020 "DDPM"; Dhariwal & Nichol 2021 "ADM"):

- `conv_in` (3x3) to `channels`; a sinusoidal timestep embedding (width `channels`,
  [cos | sin] as in ADM/diffusers) through dense -> SiLU -> dense of width 4 x `channels`;
  with `num_classes` = N > 0 a learned table of N + 1 rows is added to it, row N being
  the null class of classifier-free guidance (used when `labels` is None).
- Down path: per level `num_res_blocks` ResBlocks of width `channels x channel_mult[level]`,
  each followed by self-attention where the feature map's height is in
  `attention_resolutions`; between levels a downsample (stride-2 conv, or a BigGAN-style
  ResBlock with `resblock_updown`). Every block output is kept as a skip.
- Middle: ResBlock, attention, ResBlock (always, as in DDPM and ADM).
- Up path: per level `num_res_blocks + 1` ResBlocks, each on the concatenation with one
  skip, attention at the same resolutions, and an upsample (nearest + conv, or an up
  ResBlock) between levels.
- GroupNorm -> SiLU -> `conv_out` (3x3).

Zero initialisation (DDPM and ADM): the last conv of every ResBlock, the output projection of
every attention block and `conv_out` start at zero, so a fresh UNet outputs exactly zero and
each residual block starts as the identity on its skip path. Other kernels are LeCun-normal
(Flax's default; DDPM used fan-avg uniform, ADM PyTorch's default), biases zero.

Logical names of the parameters: conv kernels (kernel_h, kernel_w, conv_in, conv_out);
time MLP (embed, mlp) then (mlp, embed); each ResBlock's embedding projection (embed, mlp);
attention q/k/v (embed, heads, head_dim) with biases (heads, head_dim) and the output
projection (heads, head_dim, embed); the class table (vocab, embed); biases and GroupNorm
scales (vector). Under `configlib.DEFAULT_RULES` fsdp shards conv output channels and every
`embed` dimension, tensor shards heads, MLP hidden and the class table.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from genctl_jax.errors import ConfigError
from genctl_jax.nn.attention import AttentionBlock
from genctl_jax.nn.blocks import ZEROS, Downsample, ResBlock, Upsample, groups_for
from genctl_jax.nn.embeddings import TimestepEmbedding, class_embedding
from genctl_jax.nn.layers import constrain_image, conv, group_norm

NORM_GROUPS = 32


def default_config() -> ml_collections.ConfigDict:
    """The `config.model` block of a UNet, every field at its default (one line each)."""
    m = ml_collections.ConfigDict()
    m.name = "unet"
    m.in_channels = 3  # Channels of the noisy input image.
    m.out_channels = 3  # Channels predicted (eps, x0 or v); 6 for eps + learned variance.
    m.channels = 128  # Base width: level l has channels x channel_mult[l] channels.
    m.channel_mult = (1, 2, 2, 2)  # Width multiplier per level; a level halves the resolution.
    m.num_res_blocks = 2  # ResBlocks per level on the way down (the way up has one more).
    m.attention_resolutions = (16,)  # Feature-map sizes in pixels with self-attention.
    m.num_heads = -1  # Attention heads (fixed count); -1: use head_dim instead.
    m.head_dim = 64  # Channels per attention head; -1: use num_heads instead.
    m.dropout = 0.1  # Dropout inside ResBlocks (train=True only).
    m.num_classes = 0  # 0: unconditional; N > 0: N classes + the learned null class N.
    m.resblock_updown = False  # Resample with BigGAN-style ResBlocks (else conv / nearest+conv).
    m.remat = False  # Rematerialise each ResBlock and attention block in the backward pass.
    m.dtype = "float32"  # Compute dtype; params float32, GroupNorm and softmax float32.
    m.scale_shift_norm = True  # ADM scale-shift embedding injection; False: DDPM's additive.
    # Pixels per side folded into channels before the first conv (and unfolded after the
    # last): p=2 runs the whole network at half resolution, ~4x cheaper.
    m.patch_size = 1
    return m


def tiny_config() -> ml_collections.ConfigDict:
    """A small class-conditional UNet for tests: 16 x 16 inputs, widths 16/32, attention at 8."""
    m = default_config()
    m.update(
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_heads=-1,
        head_dim=16,
        dropout=0.0,
        num_classes=48,
    )
    return m


def ddpm_cifar10_config() -> ml_collections.ConfigDict:
    """DDPM's CIFAR-10 UNet (32 x 32, unconditional, 35.75M params, REFERENCES.md).

    ch 128, mult (1, 2, 2, 2), 2 ResBlocks per level, one-head attention at 16 x 16, dropout
    0.1, GroupNorm 32, additive embedding injection, conv resampling.
    """
    m = default_config()
    m.update(num_heads=1, head_dim=-1, scale_shift_norm=False, resblock_updown=False)
    return m


class UNet(nn.Module):
    """eps/x0/v predictor: (x [B,H,W,C], t [B], labels [B] | None) -> [B,H,W,out_channels]."""

    in_channels: int = 3  # Channels of the noisy input image.
    out_channels: int = 3  # Channels of the prediction.
    channels: int = 128  # Base width.
    channel_mult: Sequence[int] = (1, 2, 2, 2)  # Width multiplier per level.
    num_res_blocks: int = 2  # ResBlocks per level on the way down.
    attention_resolutions: Sequence[int] = (16,)  # Feature-map heights with self-attention.
    num_heads: int = -1  # Heads per attention block; -1: channels // head_dim.
    head_dim: int = 64  # Channels per head; -1: use num_heads.
    dropout: float = 0.1  # ResBlock dropout (train=True).
    num_classes: int = 0  # 0: unconditional; N: class-conditional + null class N.
    resblock_updown: bool = False  # BigGAN-style resampling ResBlocks.
    remat: bool = False  # nn.remat every ResBlock and attention block.
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params float32.
    scale_shift_norm: bool = True  # ADM scale-shift (True) or DDPM additive (False) injection.
    patch_size: int = 1  # p x p pixels folded into channels at the input, unfolded at the output.

    def heads_for(self, width: int) -> int:
        return self.num_heads if self.head_dim <= 0 else width // self.head_dim

    @nn.compact
    def __call__(self, x, t, labels=None, *, train: bool = False):
        """x [B, H, W, in_channels] float, t [B] int or float timesteps, labels [B] int32 in
        [0, num_classes] (num_classes = the null class) or None (all null) when
        class-conditional, None otherwise -> [B, H, W, out_channels] float32."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x has shape {x.shape}; expected [B, H, W, {self.in_channels}]")
        batch = x.shape[0]
        if jnp.shape(t) != (batch,):
            raise ValueError(f"t has shape {jnp.shape(t)}; expected [{batch}]")
        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        dt = self.dtype
        mults = tuple(self.channel_mult)
        attn_res = tuple(self.attention_resolutions)

        def res_block(h, features, name, resample="none"):
            block = res_cls(
                features,
                dropout=self.dropout,
                scale_shift_norm=self.scale_shift_norm,
                resample=resample,
                norm_groups=NORM_GROUPS,
                dtype=dt,
                name=name,
            )
            return block(h, emb, train)

        def attention(h, name):
            heads = self.heads_for(h.shape[-1])
            return attn_cls(heads, dtype=dt, norm_groups=NORM_GROUPS, name=name)(h)

        # Timestep (+ class) embedding.
        emb_dim = 4 * self.channels
        emb = TimestepEmbedding(emb_dim, self.channels, dtype=dt, name="time_embed")(t)
        if self.num_classes > 0:
            if labels is None:
                labels = jnp.full((batch,), self.num_classes, jnp.int32)
            table = class_embedding(self.num_classes + 1, emb_dim, dtype=dt, name="class_embed")
            emb = emb + table(labels)
        elif labels is not None:
            raise ValueError("labels given to an unconditional UNet (num_classes=0)")
        emb = nn.with_logical_constraint(emb, ("batch", "channels"))

        # Down path.
        x = _fold(x, self.patch_size)
        h = constrain_image(conv(self.channels, dtype=dt, name="conv_in")(x.astype(dt)))
        skips = [h]
        for level, mult in enumerate(mults):
            for i in range(self.num_res_blocks):
                h = res_block(h, self.channels * mult, f"down_{level}_res_{i}")
                if h.shape[1] in attn_res:
                    h = attention(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level < len(mults) - 1:
                name = f"down_{level}_downsample"
                if self.resblock_updown:
                    h = res_block(h, h.shape[-1], name, resample="down")
                else:
                    h = Downsample(h.shape[-1], dtype=dt, name=name)(h)
                skips.append(h)

        # Middle.
        h = res_block(h, h.shape[-1], "mid_res_0")
        h = attention(h, "mid_attn")
        h = res_block(h, h.shape[-1], "mid_res_1")

        # Up path.
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(h, self.channels * mult, f"up_{level}_res_{i}")
                if h.shape[1] in attn_res:
                    h = attention(h, f"up_{level}_attn_{i}")
            if level > 0:
                name = f"up_{level}_upsample"
                if self.resblock_updown:
                    h = res_block(h, h.shape[-1], name, resample="up")
                else:
                    h = Upsample(h.shape[-1], dtype=dt, name=name)(h)

        h = nn.silu(
            group_norm(h.shape[-1], groups_for(h.shape[-1], NORM_GROUPS), name="norm_out")(h)
        )
        p = self.patch_size
        out = conv(self.out_channels * p * p, dtype=dt, kernel_init=ZEROS, name="conv_out")(h)
        return _unfold(out.astype(jnp.float32), p)


def _fold(x, p: int):
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p patch becomes one pixel."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def _unfold(x, p: int):
    """The inverse of `_fold`."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


FIELDS = tuple(k for k in default_config() if k != "name")


def _with_defaults(model_config) -> ml_collections.ConfigDict:
    """`default_config()` overridden by the given fields (not type-checked: `validate` is)."""
    m = default_config().to_dict()
    m.update({key: model_config[key] for key in model_config if key in m})
    return ml_collections.ConfigDict(m, type_safe=False)


def from_config(model_config) -> UNet:
    """Builds the UNet from `config.model`; absent fields take `default_config()`'s values."""
    m = _with_defaults(model_config)
    return UNet(
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        channels=m.channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        dropout=m.dropout,
        num_classes=m.num_classes,
        resblock_updown=m.resblock_updown,
        remat=m.remat,
        dtype=jnp.dtype(m.dtype),
        scale_shift_norm=m.scale_shift_norm,
        patch_size=m.patch_size,
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(config) -> None:
    """Checks `config.model` (and `config.data.image_size`) before anything is compiled."""
    unknown = sorted(set(config.model.keys()) - set(FIELDS) - {"name"})
    if unknown:
        raise ConfigError(
            f"config.model.{unknown[0]} is not a unet field; accepted: {', '.join(FIELDS)}"
        )
    m = _with_defaults(config.model)
    for field in ("in_channels", "out_channels", "channels", "num_res_blocks"):
        if not _is_int(m[field]) or m[field] < 1:
            raise ConfigError(f"config.model.{field}={m[field]!r}: expected an integer >= 1")
    if not _is_int(m.num_classes) or m.num_classes < 0:
        raise ConfigError(
            f"config.model.num_classes={m.num_classes!r}: expected an integer >= 0 "
            f"(0 = unconditional)"
        )
    for field in ("resblock_updown", "remat", "scale_shift_norm"):
        if not isinstance(m[field], bool):
            raise ConfigError(f"config.model.{field}={m[field]!r}: expected True or False")
    if not isinstance(m.dropout, int | float) or not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"config.model.dropout={m.dropout!r}: expected 0 <= dropout < 1")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.dtype={m.dtype!r}: expected float32, bfloat16 or float16")
    mults = tuple(m.channel_mult)
    if not mults or not all(_is_int(v) and v >= 1 for v in mults):
        raise ConfigError(
            f"config.model.channel_mult={mults!r}: expected a non-empty tuple of integers >= 1"
        )
    for mult in mults:
        width = m.channels * mult
        if width > NORM_GROUPS and width % NORM_GROUPS:
            raise ConfigError(
                f"config.model.channels={m.channels} x channel_mult {mult} = {width} channels "
                f"cannot be split into {NORM_GROUPS} GroupNorm groups; use widths <= "
                f"{NORM_GROUPS} or multiples of {NORM_GROUPS}"
            )

    if not _is_int(m.patch_size) or m.patch_size < 1:
        raise ConfigError(f"config.model.patch_size={m.patch_size!r}: expected an integer >= 1")
    size = config.data.image_size
    factor = m.patch_size * 2 ** (len(mults) - 1)
    if size % factor:
        raise ConfigError(
            f"config.data.image_size={size} is not divisible by {factor}, the downsampling of "
            f"patch_size={m.patch_size} and {len(mults)} levels (config.model.channel_mult="
            f"{mults}); use a multiple of {factor}"
        )
    resolutions = [size // m.patch_size // 2**level for level in range(len(mults))]
    attn = tuple(m.attention_resolutions)
    for res in attn:
        if res not in resolutions:
            raise ConfigError(
                f"config.model.attention_resolutions={attn}: {res} px never occurs; with "
                f"config.data.image_size={size} and {len(mults)} levels the feature maps are "
                f"{', '.join(map(str, resolutions))} px"
            )

    heads, head_dim = m.num_heads, m.head_dim
    one_set = _is_int(heads) and _is_int(head_dim)
    one_set = one_set and ((heads >= 1 and head_dim == -1) or (head_dim >= 1 and heads == -1))
    if not one_set:
        raise ConfigError(
            f"config.model.num_heads={heads!r}, head_dim={head_dim!r}: set exactly one of them "
            f"to a positive integer and the other to -1"
        )
    # Widths that get attention: the listed levels, plus the middle block (the last level).
    attn_widths = {m.channels * mults[-1]}
    attn_widths |= {m.channels * mults[resolutions.index(res)] for res in attn}
    for width in sorted(attn_widths):
        if head_dim > 0 and width % head_dim:
            raise ConfigError(
                f"config.model.head_dim={head_dim} does not divide the {width} channels of an "
                f"attention block; use a divisor of {width}"
            )
        if heads > 0 and width % heads:
            raise ConfigError(
                f"config.model.num_heads={heads} does not divide the {width} channels of an "
                f"attention block; use a divisor of {width}"
            )
