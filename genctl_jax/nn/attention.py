"""Multi-head self-attention over the pixels of an NHWC feature map (DDPM/ADM style).

GroupNorm -> q, k, v projections -> `jax.nn.dot_product_attention` -> output
projection -> residual. Projection kernels are named ('embed', 'heads', 'head_dim')
and ('heads', 'head_dim', 'embed'), so `fsdp` shards the model width and `tensor`
splits heads; logits and softmax run in float32 whatever the compute dtype.
`attend` (the attention itself, with an optional key padding mask) and `MultiAxisDense`
are shared with the Stable-Diffusion transformer blocks of `genctl_jax.nn.transformer`.
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
    use_bias: bool = True  # Add a bias (Stable Diffusion's q/k/v projections have none).

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
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", _logical(nn.initializers.zeros_init(), self.bias_axes), self.out_shape
            )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        return y if bias is None else y + bias


# Unmasked 16-bit attention on a GPU runs cuDNN's fused (flash) kernel, which never stores
# the [B, heads, L, S] logits: XLA's attention keeps them (float32) for the backward pass,
# 88 GiB for a Stable-Diffusion UNet at 64 x 64 latents and batch 16. False keeps XLA's
# attention everywhere (bench/unet_cond_step.py --attention xla compares the two).
FUSED_ON_GPU = True


def _fused(q, k, v):
    """cuDNN's fused attention of q, k, v, or None where it does not apply."""
    if not FUSED_ON_GPU or jax.default_backend() != "gpu":
        return None
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    try:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except NotImplementedError:  # A head dim or cuDNN version outside the kernel's range.
        return None


def attend(q, k, v, mask=None):
    """softmax(q k^T / sqrt(head_dim)) v for [B, L, heads, head_dim] q and [B, S, heads, ...] k, v.

    mask: [B, S] bool, True = a key to attend to, or None (all). A query whose row has no
    key left gets zeros (attention over nothing), not the uniform average a fully masked
    softmax would give, so masked keys never leak into the output. Logits and softmax run in
    float32 whatever the input dtype (XLA's implementation and cuDNN's fused kernel alike).
    Masked attention (cross-attention to padded text, a short context) stays on XLA: cuDNN
    takes a mask as a bias and trains with one only at even lengths (77 tokens are not).
    """
    if mask is None:
        a = _fused(q, k, v)
        if a is None:
            a = jax.nn.dot_product_attention(q, k, v)
    else:
        a = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        a = jnp.where(mask.any(axis=-1)[:, None, None, None], a, jnp.zeros_like(a))
    return nn.with_logical_constraint(a, HEADS_ACTIVATION)


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

        a = attend(project("query"), project("key"), project("value"))
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
