"""Embeddings of diffusion timesteps, class labels and conditioning vectors, with logical names.

`sinusoidal_embedding` is the Transformer position encoding applied to (possibly
fractional) timesteps. Its defaults follow ADM / diffusers' `UNet2DModel`
(`flip_sin_to_cos=True`, `freq_shift=0`: [cos | sin], frequencies
max_period^(-i/half)); DDPM's TF code is `flip_sin_to_cos=False, freq_shift=1`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from genctl_jax.nn.layers import dense


def sinusoidal_embedding(
    t,
    dim: int,
    *,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
):
    """[B] timesteps (int or float) -> [B, dim] float32.

    With half = dim // 2 and f_i = max_period^(-i / (half - freq_shift)), i < half, the
    embedding is [cos(t f) | sin(t f)] (or [sin | cos] with `flip_sin_to_cos=False`); an odd
    `dim` gets a trailing zero column. Always computed in float32: bfloat16 cannot resolve
    t * f for t in the hundreds.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoid of width `sinusoid_dim` -> dense -> SiLU -> dense, both `features` wide."""

    features: int  # Output width (4 x the UNet's base width in DDPM/ADM).
    sinusoid_dim: int  # Width of the sinusoidal encoding fed to the MLP.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the MLP; params stay float32.

    @nn.compact
    def __call__(self, t):
        emb = sinusoidal_embedding(t, self.sinusoid_dim).astype(self.dtype)
        return _mlp(emb, self.features, self.dtype)


class VectorEmbedding(nn.Module):
    """A conditioning vector [B, D] (e.g. pooled text) -> dense -> SiLU -> dense, `features` wide.

    The layout of diffusers' `class_embed_type="projection"` (a `TimestepEmbedding` applied
    to the raw vector): added to the time embedding, it reaches every ResBlock's injection.
    """

    features: int  # Output width (the UNet's time-embedding width).
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the MLP; params stay float32.

    @nn.compact
    def __call__(self, v):
        return _mlp(v.astype(self.dtype), self.features, self.dtype)


def _mlp(x, features: int, dtype):
    """dense -> SiLU -> dense, created in the calling module (params `dense_0`, `dense_1`)."""
    # (embed, mlp) then (mlp, embed): fsdp shards the embed side, tensor the hidden one.
    x = dense(features, ("embed", "mlp"), dtype=dtype, name="dense_0")(x)
    return dense(features, ("mlp", "embed"), dtype=dtype, name="dense_1")(nn.silu(x))


def class_embedding(
    num_embeddings: int, features: int, *, dtype=jnp.float32, name: str | None = None
) -> nn.Embed:
    """A learned table [num_embeddings, features] named ('vocab', 'embed'), N(0, 1) init."""
    return nn.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")
        ),
        name=name,
    )
