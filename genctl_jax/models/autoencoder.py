"""A convolutional image autoencoder: the foundation's reference model.

Small on purpose: it exercises every piece of the shared training core (logical
sharding of conv kernels, dropout randomness, EMA, sample hooks) and is the
encoder/decoder skeleton that the latent-diffusion VAE grows from.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genctl_jax.errors import ConfigError
from genctl_jax.nn.layers import constrain_image, conv, group_norm


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a residual connection."""

    features: int  # Output channels.
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = conv(self.features, dtype=self.dtype)(nn.silu(group_norm(x.shape[-1])(x)))
        h = nn.silu(group_norm(self.features)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.features, dtype=self.dtype)(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, kernel_size=1, dtype=self.dtype)(x)
        return constrain_image(x + h)


class Encoder(nn.Module):
    """Image -> latent code, halving the resolution at each level but the last."""

    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    latent_channels: int
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = conv(self.channels, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, self.dropout, self.dtype)(h, train=train)
            if level < len(self.channel_mult) - 1:
                h = conv(self.channels * mult, strides=2, dtype=self.dtype)(h)
        h = nn.silu(group_norm(h.shape[-1])(h))
        return conv(self.latent_channels, dtype=self.dtype, name="to_latent")(h)


class Decoder(nn.Module):
    """Latent code -> image, doubling the resolution at each level but the first."""

    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, z, *, train: bool):
        top = self.channels * self.channel_mult[-1]
        h = conv(top, dtype=self.dtype, name="from_latent")(z.astype(self.dtype))
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, self.dropout, self.dtype)(h, train=train)
            if level > 0:
                n, height, width, c = h.shape
                h = jax.image.resize(h, (n, 2 * height, 2 * width, c), "nearest")
                h = conv(self.channels * mult, dtype=self.dtype)(h)
        h = nn.silu(group_norm(h.shape[-1])(h))
        out = conv(self.out_channels, dtype=self.dtype, name="conv_out")(h)
        return out.astype(jnp.float32)


class Autoencoder(nn.Module):
    """Encoder + decoder; the code has `latent_channels` channels at 1/2^(levels-1) size."""

    channels: int = 32  # Width of the first level.
    channel_mult: Sequence[int] = (1, 2, 2)  # Width multiplier per resolution level.
    num_res_blocks: int = 1  # Residual blocks per level.
    latent_channels: int = 4  # Channels of the bottleneck code.
    out_channels: int = 3
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params stay float32.

    def setup(self):
        shared = dict(
            channels=self.channels,
            channel_mult=tuple(self.channel_mult),
            num_res_blocks=self.num_res_blocks,
            dropout=self.dropout,
            dtype=self.dtype,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)

    def encode(self, x, *, train: bool = False):
        return self.encoder(x, train=train)

    def decode(self, z, *, train: bool = False):
        return self.decoder(z, train=train)

    def __call__(self, x, *, train: bool = False):
        return self.decode(self.encode(x, train=train), train=train)


def from_config(model_config) -> Autoencoder:
    """Builds the model from `config.model` (fields named as the module's)."""
    return Autoencoder(
        channels=model_config.channels,
        channel_mult=tuple(model_config.channel_mult),
        num_res_blocks=model_config.num_res_blocks,
        latent_channels=model_config.latent_channels,
        dropout=model_config.dropout,
        dtype=jnp.dtype(model_config.dtype),
    )


def validate(config) -> None:
    """Checks the fields `from_config` reads against the data they will see."""
    m = config.model
    for field in ("channels", "num_res_blocks", "latent_channels"):
        if not isinstance(m.get(field), int) or m.get(field) < 1:
            raise ConfigError(f"config.model.{field}={m.get(field)!r}: expected an integer >= 1")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"config.model.dropout={m.dropout!r}: expected 0 <= dropout < 1")
    for mult in m.channel_mult:
        width = m.channels * mult
        if width > 32 and width % 32:
            raise ConfigError(
                f"config.model.channels={m.channels} x channel_mult {mult} = {width} channels "
                f"cannot be split into 32 GroupNorm groups; use a multiple of 32"
            )
    factor = 2 ** (len(m.channel_mult) - 1)
    if config.data.image_size % factor:
        raise ConfigError(
            f"config.data.image_size={config.data.image_size} is not divisible by {factor}, "
            f"the downsampling of {len(m.channel_mult)} levels (config.model.channel_mult="
            f"{tuple(m.channel_mult)}); use a multiple of {factor}"
        )
