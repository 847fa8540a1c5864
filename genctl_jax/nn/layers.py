"""Conv, Dense and GroupNorm with logical axis names on every parameter.

Kernels of convolutions are (kernel_h, kernel_w, conv_in, conv_out); dense kernels are
(embed, mlp) by default; biases and norm scales are `vector` (kept replicated).
Normalisation runs in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

CONV_AXES = ("kernel_h", "kernel_w", "conv_in", "conv_out")


def _logical(init, axes):
    return nn.with_logical_partitioning(init, axes)


class Conv(nn.Module):
    """2-D convolution (NHWC) whose kernel and bias carry logical names."""

    features: int  # Output channels.
    kernel_size: int = 3  # Square kernel side.
    strides: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32  # Compute dtype.
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        return nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.strides, self.strides),
            padding="SAME",
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=_logical(self.kernel_init, CONV_AXES),
            bias_init=_logical(nn.initializers.zeros_init(), ("vector",)),
        )(x)


class Dense(nn.Module):
    """Dense layer whose kernel is named `axes` (input, output) and bias `vector`."""

    features: int  # Output width.
    axes: Sequence[str] = ("embed", "mlp")  # Logical names of (input, output).
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32  # Compute dtype.
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        return nn.Dense(
            self.features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=_logical(self.kernel_init, tuple(self.axes)),
            bias_init=_logical(nn.initializers.zeros_init(), ("vector",)),
        )(x)


class GroupNorm(nn.Module):
    """GroupNorm computed in float32, cast back to the input dtype."""

    num_groups: int = 32  # Capped at the channel count for narrow tiny models.
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        groups = min(self.num_groups, x.shape[-1])
        y = nn.GroupNorm(
            num_groups=groups,
            epsilon=self.epsilon,
            dtype=jnp.float32,
            scale_init=_logical(nn.initializers.ones_init(), ("vector",)),
            bias_init=_logical(nn.initializers.zeros_init(), ("vector",)),
        )(x.astype(jnp.float32))
        return y.astype(x.dtype)


def constrain_image(x):
    """Pins an NHWC activation to the batch layout at a block boundary."""
    return nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))
