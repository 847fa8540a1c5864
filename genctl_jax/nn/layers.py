"""Flax layers whose parameters carry logical axis names, so any model built from them shards.

Factories return plain `flax.linen` modules, so parameter paths stay flat
(`conv_in/kernel`), as checkpoint converters expect. Convolution kernels are
(kernel_h, kernel_w, conv_in, conv_out); dense kernels are named by the caller;
biases and norm scales are `vector` (kept replicated). Normalisation runs in float32.
Token activations [B, L, C] are pinned with `constrain_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

CONV_AXES = ("kernel_h", "kernel_w", "conv_in", "conv_out")
LECUN_NORMAL = nn.initializers.lecun_normal()


def _logical(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def conv(
    features: int,
    kernel_size: int = 3,
    strides: int = 1,
    *,
    dtype=jnp.float32,
    use_bias: bool = True,
    kernel_init=LECUN_NORMAL,
    name: str | None = None,
) -> nn.Conv:
    """A SAME-padded square NHWC convolution computing in `dtype`."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding="SAME",
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=_logical(kernel_init, CONV_AXES),
        bias_init=_logical(nn.initializers.zeros_init(), ("vector",)),
        name=name,
    )


def dense(
    features: int,
    axes: Sequence[str] = ("embed", "mlp"),
    *,
    dtype=jnp.float32,
    use_bias: bool = True,
    kernel_init=LECUN_NORMAL,
    name: str | None = None,
) -> nn.Dense:
    """A dense layer whose kernel's (input, output) dimensions are named `axes`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=_logical(kernel_init, axes),
        bias_init=_logical(nn.initializers.zeros_init(), ("vector",)),
        name=name,
    )


def group_norm(
    channels: int, num_groups: int = 32, epsilon: float = 1e-5, *, name: str | None = None
) -> nn.GroupNorm:
    """GroupNorm in float32; at most one group per channel for narrow (tiny) models."""
    return nn.GroupNorm(
        num_groups=min(num_groups, channels),
        epsilon=epsilon,
        dtype=jnp.float32,
        scale_init=_logical(nn.initializers.ones_init(), ("vector",)),
        bias_init=_logical(nn.initializers.zeros_init(), ("vector",)),
        name=name,
    )


def layer_norm(epsilon: float = 1e-5, *, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis, in float32, scale and bias named `vector`."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=jnp.float32,
        scale_init=_logical(nn.initializers.ones_init(), ("vector",)),
        bias_init=_logical(nn.initializers.zeros_init(), ("vector",)),
        name=name,
    )


def constrain_image(x):
    """Pins an NHWC activation to the batch layout at a block boundary."""
    return nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))


def constrain_tokens(x):
    """Pins a [B, L, C] token activation (pixels or text tokens) to the batch layout."""
    return nn.with_logical_constraint(x, ("batch", "length", "channels"))
