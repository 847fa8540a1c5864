"""Residual and resampling blocks of diffusion UNets (DDPM / ADM), NHWC.

`ResBlock` takes the time(+class) embedding. With `scale_shift_norm` it injects it
ADM-style after the second GroupNorm, h = norm(h) * (1 + scale) + shift; without, DDPM's
additive h = norm(conv(h) + proj(emb)). Resampling uses symmetric padding 1 for the
stride-2 conv (ADM / diffusers; DDPM's TF code padded SAME, i.e. (0, 1)), nearest-neighbour
upsampling and 2x2 average pooling.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from genctl_jax.nn.layers import CONV_AXES, LECUN_NORMAL, constrain_image, conv, dense, group_norm

ZEROS = nn.initializers.zeros_init()


def groups_for(channels: int, num_groups: int = 32) -> int:
    """`num_groups` when it divides `channels`, else the largest divisor of both.

    Widths that are multiples of 32 (every real config) get 32 groups; the concatenated skips
    of narrow test models (e.g. 16 + 32 = 48 channels) get a count that divides them.
    """
    return num_groups if channels % num_groups == 0 else math.gcd(channels, num_groups)


def upsample_nearest(x):
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def downsample_avg(x):
    """[B, H, W, C] -> [B, H/2, W/2, C], the mean of each 2x2 patch."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


def strided_conv(features: int, *, dtype=jnp.float32, name: str | None = None) -> nn.Conv:
    """A 3x3 stride-2 convolution padded by 1 on every side (halves even sizes)."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(2, 2),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(LECUN_NORMAL, CONV_AXES),
        bias_init=nn.with_logical_partitioning(ZEROS, ("vector",)),
        name=name,
    )


class Downsample(nn.Module):
    """Halves the resolution: a stride-2 3x3 conv (`use_conv`) or 2x2 average pooling."""

    features: int  # Output channels (must equal the input's without `use_conv`).
    use_conv: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            return constrain_image(strided_conv(self.features, dtype=self.dtype, name="conv")(x))
        return constrain_image(downsample_avg(x))


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour, then a 3x3 conv (`use_conv`)."""

    features: int  # Output channels (must equal the input's without `use_conv`).
    use_conv: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = upsample_nearest(x)
        if self.use_conv:
            x = conv(self.features, dtype=self.dtype, name="conv")(x)
        return constrain_image(x)


class ResBlock(nn.Module):
    """GN -> SiLU -> [resample] -> conv, + embedding, GN -> SiLU -> dropout -> conv, + skip.

    The last conv is zero-initialised (`zero_init_out`, as in DDPM/ADM), so a fresh block is
    the identity on its (resampled, 1x1-projected if the width changes) input.
    """

    features: int  # Output channels.
    dropout: float = 0.0  # Dropout before the last conv (active when train=True).
    scale_shift_norm: bool = True  # ADM scale-shift injection; False: DDPM's additive one.
    resample: str = "none"  # 'none', 'down' (2x2 average) or 'up' (nearest), BigGAN-style.
    zero_init_out: bool = True  # Zero the last conv's kernel.
    norm_groups: int = 32  # GroupNorm groups (see `groups_for` for widths it does not divide).
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params float32, GroupNorm float32.

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        """x [B, H, W, C_in], emb [B, E] -> [B, H', W', features]."""
        if self.resample not in ("none", "down", "up"):
            raise ValueError(f"resample={self.resample!r}: expected 'none', 'down' or 'up'")
        c_in = x.shape[-1]
        h = nn.silu(group_norm(c_in, groups_for(c_in, self.norm_groups), name="norm_1")(x))
        if self.resample != "none":
            fn = downsample_avg if self.resample == "down" else upsample_nearest
            h, x = fn(h), fn(x)
        h = conv(self.features, dtype=self.dtype, name="conv_1")(h)

        width = 2 * self.features if self.scale_shift_norm else self.features
        e = dense(width, ("embed", "mlp"), dtype=self.dtype, name="emb_proj")(nn.silu(emb))
        e = e.astype(jnp.float32)[:, None, None, :]
        norm_2 = group_norm(
            self.features, groups_for(self.features, self.norm_groups), name="norm_2"
        )
        if self.scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = norm_2(h) * (1.0 + scale) + shift
        else:
            h = norm_2(h + e)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        out_init = ZEROS if self.zero_init_out else LECUN_NORMAL
        h = conv(self.features, dtype=self.dtype, kernel_init=out_init, name="conv_2")(h)

        if c_in != self.features:
            x = conv(self.features, kernel_size=1, dtype=self.dtype, name="skip")(x)
        return constrain_image(x.astype(self.dtype) + h)
