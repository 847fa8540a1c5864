"""Stable-Diffusion-style spatial transformer: text cross-attention over an NHWC feature map.

The layout of diffusers' `Transformer2DModel` with `BasicTransformerBlock`s (LDM's
`SpatialTransformer`): GroupNorm (eps 1e-6) -> `proj_in` (1x1 conv, or a linear layer with
`linear_projection`) -> `depth` blocks of [LayerNorm -> self-attention -> residual;
LayerNorm -> cross-attention to `context` -> residual; LayerNorm -> GEGLU feed-forward ->
residual] -> `proj_out` -> residual. q/k/v projections have no bias, output projections do.

Parameters carry logical names: attention kernels ('embed', 'heads', 'head_dim') and
('heads', 'head_dim', 'embed') as in `attention.AttentionBlock`; the GEGLU input kernel is
[C, 2, 4C] named ('embed', None, 'mlp') (value and gate of one hidden unit stay together when
`tensor` splits the hidden width) and its output ('mlp', 'embed'); `proj_in`/`proj_out` are
pointwise convolutions in either form, named like conv kernels. LayerNorm, GroupNorm and the
softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from genctl_jax.nn.attention import HEADS_ACTIVATION, OUT_AXES, QKV_AXES, MultiAxisDense, attend
from genctl_jax.nn.blocks import ZEROS, groups_for
from genctl_jax.nn.layers import (
    LECUN_NORMAL,
    constrain_image,
    constrain_tokens,
    conv,
    dense,
    group_norm,
    layer_norm,
)


class Attention(nn.Module):
    """Multi-head attention of tokens x [B, L, C] to themselves, or to `context` [B, S, D]."""

    num_heads: int  # Heads; must divide C.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the projections; params stay float32.

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        """mask: [B, S] bool (True = attend) for the context's tokens, or None (all)."""
        c = x.shape[-1]
        if c % self.num_heads:
            raise ValueError(f"{c} channels cannot be split into {self.num_heads} heads")
        source = x if context is None else context

        def project(name, inputs):
            y = MultiAxisDense(
                (self.num_heads, c // self.num_heads),
                QKV_AXES,
                ("heads", "head_dim"),
                1,
                use_bias=False,
                dtype=self.dtype,
                name=name,
            )(inputs)
            return nn.with_logical_constraint(y, HEADS_ACTIVATION)

        a = attend(project("query", x), project("key", source), project("value", source), mask)
        return MultiAxisDense((c,), OUT_AXES, ("vector",), 2, dtype=self.dtype, name="out")(a)


class FeedForward(nn.Module):
    """GEGLU: proj to 2 x `mult` C (value, gate) -> value * gelu(gate) -> proj back to C."""

    mult: int = 4  # Hidden width over the input width.
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params stay float32.

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        inner = self.mult * c
        h = MultiAxisDense(
            (2, inner), ("embed", None, "mlp"), (None, "mlp"), 1, dtype=self.dtype, name="proj"
        )(x)
        h = h[..., 0, :] * nn.gelu(h[..., 1, :], approximate=False)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(c, ("mlp", "embed"), dtype=self.dtype, name="out")(h)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    num_heads: int  # Heads of both attentions.
    dtype: jnp.dtype = jnp.float32  # Compute dtype; LayerNorm and softmax float32.

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        """x [B, L, C], context [B, S, D], context_mask [B, S] bool or None -> [B, L, C]."""
        heads, dt = self.num_heads, self.dtype
        x = x + Attention(heads, dtype=dt, name="self_attn")(layer_norm(name="norm_1")(x))
        h = layer_norm(name="norm_2")(x)
        x = x + Attention(heads, dtype=dt, name="cross_attn")(h, context, context_mask)
        x = x + FeedForward(dtype=dt, name="ff")(layer_norm(name="norm_3")(x))
        return constrain_tokens(x)


class SpatialTransformer(nn.Module):
    """x + proj_out(blocks(proj_in(GroupNorm(x)), context)) on [B, H, W, C] (H*W tokens).

    `proj_out` starts at zero (`zero_init_out`, as LDM does), so a fresh block is the identity.
    """

    num_heads: int  # Heads per attention; must divide C.
    depth: int = 1  # TransformerBlocks in sequence.
    linear_projection: bool = False  # proj_in/proj_out as linear layers on tokens (else 1x1 conv).
    zero_init_out: bool = True  # Zero proj_out's kernel.
    norm_groups: int = 32  # GroupNorm groups (see `blocks.groups_for`).
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params float32, norms and softmax float32.

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        """x [B, H, W, C], context [B, S, D], context_mask [B, S] bool or None -> like x."""
        b, height, width, c = x.shape
        dt = self.dtype
        out_init = ZEROS if self.zero_init_out else LECUN_NORMAL

        def pointwise(name, init=LECUN_NORMAL):
            if self.linear_projection:  # A 1x1 conv in all but layout: named like one.
                return dense(c, ("conv_in", "conv_out"), dtype=dt, kernel_init=init, name=name)
            return conv(c, kernel_size=1, dtype=dt, kernel_init=init, name=name)

        h = group_norm(c, groups_for(c, self.norm_groups), epsilon=1e-6, name="norm")(x)
        if self.linear_projection:
            h = pointwise("proj_in")(h.reshape(b, height * width, c))
        else:
            h = pointwise("proj_in")(h).reshape(b, height * width, c)
        h = constrain_tokens(h)
        context = constrain_tokens(context.astype(dt))
        for j in range(self.depth):
            h = TransformerBlock(self.num_heads, dtype=dt, name=f"block_{j}")(
                h, context, context_mask
            )
        if self.linear_projection:
            h = pointwise("proj_out", out_init)(h).reshape(b, height, width, c)
        else:
            h = pointwise("proj_out", out_init)(h.reshape(b, height, width, c))
        return constrain_image(x + h.astype(x.dtype))
