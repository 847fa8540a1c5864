"""Multi-head self-attention over the pixels of an NHWC feature map (DDPM/ADM style).

GroupNorm -> q, k, v projections -> `jax.nn.dot_product_attention` -> output
projection -> residual. Projection kernels are named ('embed', 'heads', 'head_dim')
and ('heads', 'head_dim', 'embed'), so `fsdp` shards the model width and `tensor`
splits heads; logits and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from genctl_jax.nn.blocks import groups_for
from genctl_jax.nn.layers import constrain_image, group_norm

QKV_AXES = ("embed", "heads", "head_dim")
OUT_AXES = ("heads", "head_dim", "embed")
# [B, L, heads, head_dim] activations inside the block.
HEADS_ACTIVATION = ("batch", "length", "heads", "head_dim")


def _logical(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


class MultiAxisDense(nn.Module):
    """y = x . kernel + bias over the last `num_in_axes` dims of x; kernel is in + out shape.

    Flax's `DenseGeneral` creates a multi-axis kernel flat and reshapes it, which breaks
    logically partitioned kernels inside a mesh (the shape check at apply time constrains the
    flat 2-D kernel with the 3-D names); this layer creates the kernel in its final shape.
    """

    out_shape: tuple[int, ...]  # Trailing output dims, e.g. (heads, head_dim) or (channels,).
    kernel_axes: tuple[str, ...]  # Logical names of the kernel's in + out dims.
    bias_axes: tuple[str, ...]  # Logical names of the bias (the out dims).
    num_in_axes: int = 1  # Trailing input dims contracted.
    zero_init: bool = False  # Zero kernel (else LeCun normal over the contracted dims).
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params float32.

    @nn.compact
    def __call__(self, x):
        n_in, n_out = self.num_in_axes, len(self.out_shape)
        in_shape = tuple(x.shape[-n_in:])
        if self.zero_init:
            init = nn.initializers.zeros_init()
        else:
            init = nn.initializers.lecun_normal(
                in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
            )
        kernel = self.param(
            "kernel", _logical(init, self.kernel_axes), in_shape + tuple(self.out_shape)
        )
        bias = self.param(
            "bias", _logical(nn.initializers.zeros_init(), self.bias_axes), self.out_shape
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        return y + bias


class AttentionBlock(nn.Module):
    """x + out(attention(q, k, v of GroupNorm(x))) on [B, H, W, C], attending over H*W."""

    num_heads: int  # Heads; must divide the channel count.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the projections; params stay float32.
    zero_init_out: bool = True  # Zero the output projection (ADM/DDPM): the block starts as x.
    norm_groups: int = 32  # GroupNorm groups (see `blocks.groups_for`).

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"{c} channels cannot be split into {self.num_heads} heads")
        head_dim = c // self.num_heads
        h = group_norm(c, groups_for(c, self.norm_groups), name="norm")(x)
        h = h.reshape(b, height * width, c).astype(self.dtype)

        def project(name):
            y = MultiAxisDense(
                (self.num_heads, head_dim),
                QKV_AXES,
                ("heads", "head_dim"),
                1,
                dtype=self.dtype,
                name=name,
            )(h)
            return nn.with_logical_constraint(y, HEADS_ACTIVATION)

        q, k, v = project("query"), project("key"), project("value")
        # Scale 1/sqrt(head_dim); the XLA implementation keeps logits/softmax in float32.
        a = jax.nn.dot_product_attention(q, k, v)
        a = nn.with_logical_constraint(a, HEADS_ACTIVATION)
        out = MultiAxisDense(
            (c,),
            OUT_AXES,
            ("vector",),
            2,
            zero_init=self.zero_init_out,
            dtype=self.dtype,
            name="out",
        )(a)
        return constrain_image(x + out.reshape(b, height, width, c).astype(x.dtype))
