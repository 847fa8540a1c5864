"""The diffusion UNet: ADM / DDPM and Stable Diffusion (text cross-attention), NHWC, sharded.

Architecture (Ho et al. 2020 "DDPM"; Dhariwal & Nichol 2021 "ADM"; Rombach et al. 2022
"LDM" / Stable Diffusion, whose UNet is ADM's with transformer blocks for attention):

- `conv_in` (3x3) to `channels`; a sinusoidal timestep embedding (width `channels`,
  [cos | sin] as in ADM/diffusers) through dense -> SiLU -> dense of width 4 x `channels`;
  with `num_classes` = N > 0 a learned table of N + 1 rows is added to it, row N being
  the null class of classifier-free guidance (used when `labels` is None); with `pooled_dim`
  > 0 a pooled text vector through dense -> SiLU -> dense is added too (diffusers'
  `class_embed_type="projection"`), so it reaches every ResBlock like the timestep does.
- Down path: per level `num_res_blocks` ResBlocks of width `channels x channel_mult[level]`,
  each followed by an attention block where the feature map's height is in
  `attention_resolutions` (or the level is in `attention_levels`, whatever the input size);
  between levels a downsample (stride-2 conv, or a BigGAN-style ResBlock with
  `resblock_updown`). Every block output is kept as a skip.
- Middle: ResBlock, attention, ResBlock (always, as in DDPM, ADM and Stable Diffusion).
- Up path: per level `num_res_blocks + 1` ResBlocks, each on the concatenation with one
  skip, attention at the same places, and an upsample (nearest + conv, or an up ResBlock)
  between levels.
- GroupNorm -> SiLU -> `conv_out` (3x3).

Attention blocks are ADM's self-attention (`nn.attention.AttentionBlock`) when `context_dim`
is 0; with `context_dim` > 0 every one is a Stable-Diffusion spatial transformer
(`nn.transformer.SpatialTransformer`: `transformer_depth` blocks of self-attention,
cross-attention to the text tokens `context` [B, L, context_dim] under `context_mask`, and a
GEGLU feed-forward). `sd15_config()` is Stable Diffusion 1.x's UNet (859.5M params, the layout
of diffusers' `UNet2DConditionModel`; `models.unet_diffusers` converts its weights): additive
embedding injection (`scale_shift_norm=False`), 8 heads at every level, cross-attention at
the first three levels. Heads: `num_heads` fixed per block, or `head_dim` channels each.

ControlNet: `UNetTrunk` holds the fields and the part a ControlNet copies (`encode`: the
embeddings, `conv_in`, the down path and the middle); `UNet` adds the up path and `conv_out`,
and `models.controlnet.ControlNet` the condition's hint encoder and zero convs, so both name
their trunk parameters alike. `UNet.__call__` takes a ControlNet's outputs as `down_residuals`
(one per skip, `num_skips` of them, added to the skips in the order the down path made them)
and `mid_residual` (added to the middle block's output), as diffusers' UNet2DConditionModel
takes `down_block_additional_residuals` and `mid_block_additional_residual`.

Zero initialisation (DDPM and ADM; LDM for `proj_out`): the last conv of every ResBlock, the
output projection of every attention block, the `proj_out` of every transformer and
`conv_out` start at zero, so a fresh UNet outputs exactly zero and each residual block starts
as the identity on its skip path. Other kernels are LeCun-normal (Flax's default; DDPM used
fan-avg uniform, ADM PyTorch's default), biases zero.

Logical names of the parameters: conv kernels (kernel_h, kernel_w, conv_in, conv_out);
time MLP (embed, mlp) then (mlp, embed), the pooled-vector MLP alike; each ResBlock's
embedding projection (embed, mlp); attention q/k/v (embed, heads, head_dim) with biases
(heads, head_dim) and the output projection (heads, head_dim, embed); transformer GEGLU
(embed, None, mlp) then (mlp, embed), linear proj_in/proj_out (conv_in, conv_out); the class
table (vocab, embed); biases and norm scales (vector). Under `configlib.DEFAULT_RULES` fsdp
shards conv output channels and every `embed` dimension, tensor shards heads, MLP hidden and
the class table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from genctl_jax.errors import ConfigError
from genctl_jax.nn.attention import AttentionBlock
from genctl_jax.nn.blocks import ZEROS, Downsample, ResBlock, Upsample, groups_for
from genctl_jax.nn.embeddings import TimestepEmbedding, VectorEmbedding, class_embedding
from genctl_jax.nn.layers import constrain_image, conv, group_norm
from genctl_jax.nn.transformer import SpatialTransformer

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
    m.attention_resolutions = (16,)  # Feature-map sizes in pixels with attention blocks.
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
    # Levels (0 = full resolution) with attention at any input size; instead of the above.
    m.attention_levels = ()
    m.context_dim = 0  # Text-token width cross-attended to; 0: no text, ADM self-attention.
    m.transformer_depth = 1  # TransformerBlocks per attention site (needs context_dim > 0).
    m.use_linear_projection = False  # Transformer proj_in/out linear (SD 2.x), else 1x1 conv.
    m.pooled_dim = 0  # Width of a pooled text vector added to the time embedding; 0: none.
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


def tiny_text_config() -> ml_collections.ConfigDict:
    """A small text-conditional UNet for tests: widths 32/64, cross-attention (2 heads) at level
    0 and the middle, 16-wide text tokens, an 8-wide pooled vector."""
    m = default_config()
    m.update(
        in_channels=4,
        out_channels=4,
        channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        attention_levels=(0,),
        num_heads=2,
        head_dim=-1,
        dropout=0.0,
        scale_shift_norm=False,
        context_dim=16,
        pooled_dim=8,
    )
    return m


def sd15_config() -> ml_collections.ConfigDict:
    """Stable Diffusion 1.x's UNet (CompVis / runwayml v1-5; 859,520,964 params).

    64 x 64 x 4 latents, widths 320 x (1, 2, 4, 4), 2 ResBlocks per level, additive embedding
    injection, one transformer block (8 heads) after each ResBlock of the first three levels
    and in the middle, cross-attention to 768-wide CLIP ViT-L/14 tokens, 1x1-conv projections.
    diffusers' `UNet2DConditionModel` with its default blocks and cross_attention_dim=768.
    """
    m = default_config()
    m.update(
        in_channels=4,
        out_channels=4,
        channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(),
        attention_levels=(0, 1, 2),
        num_heads=8,
        head_dim=-1,
        dropout=0.0,
        scale_shift_norm=False,
        context_dim=768,
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


class UNetTrunk(nn.Module):
    """The part of the UNet that a ControlNet copies: embeddings, `conv_in`, down path, middle.

    Holds the fields and `encode`, shared by `UNet` and `models.controlnet.ControlNet`; not
    called on its own. `encode` runs from a subclass's compact `__call__`, so its layers are
    created in, and named under, that module (`conv_in`, `time_embed`, `down_{l}_res_{i}`,
    `mid_attn`, ...): a ControlNet's copy has the UNet's parameter names.
    """

    in_channels: int = 3  # Channels of the noisy input image.
    channels: int = 128  # Base width.
    channel_mult: Sequence[int] = (1, 2, 2, 2)  # Width multiplier per level.
    num_res_blocks: int = 2  # ResBlocks per level on the way down.
    attention_resolutions: Sequence[int] = (16,)  # Feature-map heights with attention.
    num_heads: int = -1  # Heads per attention block; -1: channels // head_dim.
    head_dim: int = 64  # Channels per head; -1: use num_heads.
    dropout: float = 0.1  # ResBlock dropout (train=True).
    num_classes: int = 0  # 0: unconditional; N: class-conditional + null class N.
    resblock_updown: bool = False  # BigGAN-style resampling ResBlocks.
    remat: bool = False  # nn.remat every ResBlock and attention block.
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params float32.
    scale_shift_norm: bool = True  # ADM scale-shift (True) or DDPM additive (False) injection.
    patch_size: int = 1  # p x p pixels folded into channels at the input, unfolded at the output.
    attention_levels: Sequence[int] = ()  # Levels with attention, whatever the input size.
    context_dim: int = 0  # Text-token width; > 0: attention blocks are SpatialTransformers.
    transformer_depth: int = 1  # TransformerBlocks per SpatialTransformer.
    use_linear_projection: bool = False  # SpatialTransformer proj_in/out linear, else 1x1 conv.
    pooled_dim: int = 0  # Width of the pooled vector added to the time embedding; 0: none.

    def heads_for(self, width: int) -> int:
        return self.num_heads if self.head_dim <= 0 else width // self.head_dim

    def encode(
        self,
        x,
        t,
        labels=None,
        *,
        context=None,
        context_mask=None,
        pooled=None,
        train: bool = False,
        hint=None,
    ) -> tuple[jax.Array, list[jax.Array], Layers]:
        """The embeddings, conv_in, down path and middle block (inputs as `UNet.__call__`).

        hint: an optional [B, H/p, W/p, channels] feature map added to conv_in's output (a
        ControlNet's encoded condition). Returns (h, skips, layers): the middle block's output,
        the skips in the order the down path made them (conv_in's output (+ hint), then every
        ResBlock / attention pair and every downsample), and the block factories bound to this
        call's embedding and text, for the layers that follow.
        """
        self.check_x(x)
        batch = x.shape[0]
        if jnp.shape(t) != (batch,):
            raise ValueError(f"t has shape {jnp.shape(t)}; expected [{batch}]")
        context, context_mask = self._text_inputs(context, context_mask, batch)
        dt = self.dtype
        mults = tuple(self.channel_mult)

        # Timestep (+ class, + pooled text) embedding.
        emb_dim = 4 * self.channels
        emb = TimestepEmbedding(emb_dim, self.channels, dtype=dt, name="time_embed")(t)
        if self.num_classes > 0:
            if labels is None:
                labels = jnp.full((batch,), self.num_classes, jnp.int32)
            table = class_embedding(self.num_classes + 1, emb_dim, dtype=dt, name="class_embed")
            emb = emb + table(labels)
        elif labels is not None:
            raise ValueError("labels given to an unconditional UNet (num_classes=0)")
        if self.pooled_dim > 0:
            if pooled is None:
                raise ValueError(
                    f"this UNet adds a pooled vector to its time embedding (pooled_dim="
                    f"{self.pooled_dim}): pass pooled [B, {self.pooled_dim}]"
                )
            if jnp.shape(pooled) != (batch, self.pooled_dim):
                raise ValueError(
                    f"pooled has shape {jnp.shape(pooled)}; expected [{batch}, {self.pooled_dim}]"
                )
            emb = emb + VectorEmbedding(emb_dim, dtype=dt, name="pooled_embed")(pooled)
        elif pooled is not None:
            raise ConfigError(
                "pooled given to a UNet without a pooled-vector embedding "
                "(config.model.pooled_dim=0); set pooled_dim to the vector's width or pass "
                "pooled=None"
            )
        emb = nn.with_logical_constraint(emb, ("batch", "channels"))
        layers = Layers(self, emb, context, context_mask, train)

        # Down path.
        x = _fold(x, self.patch_size)
        h = constrain_image(conv(self.channels, dtype=dt, name="conv_in")(x.astype(dt)))
        if hint is not None:
            if hint.shape != h.shape:
                raise ValueError(
                    f"hint has shape {hint.shape}; expected {h.shape}, conv_in's output"
                )
            h = constrain_image(h + hint.astype(dt))
        skips = [h]
        for level, mult in enumerate(mults):
            for i in range(self.num_res_blocks):
                h = layers.res_block(h, self.channels * mult, f"down_{level}_res_{i}")
                if layers.has_attention(h, level):
                    h = layers.attention(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level < len(mults) - 1:
                name = f"down_{level}_downsample"
                if self.resblock_updown:
                    h = layers.res_block(h, h.shape[-1], name, resample="down")
                else:
                    h = Downsample(h.shape[-1], dtype=dt, name=name)(h)
                skips.append(h)

        # Middle.
        h = layers.res_block(h, h.shape[-1], "mid_res_0")
        h = layers.attention(h, "mid_attn")
        h = layers.res_block(h, h.shape[-1], "mid_res_1")
        return h, skips, layers

    def check_x(self, x) -> None:
        """Raises ValueError unless x is [B, H, W, in_channels]."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x has shape {x.shape}; expected [B, H, W, {self.in_channels}]")

    def _text_inputs(self, context, context_mask, batch: int):
        """Checks `context` and `context_mask`; returns them with the mask as bool (or None)."""
        if self.context_dim == 0:
            if context is not None or context_mask is not None:
                raise ConfigError(
                    "context given to a UNet without cross-attention (config.model.context_dim="
                    "0); set context_dim to the width of the text encoder's tokens (e.g. 768 "
                    "for CLIP ViT-L/14) or pass context=None"
                )
            return None, None
        if context is None:
            raise ValueError(
                f"this UNet cross-attends to text (context_dim={self.context_dim}): pass "
                f"context [B, L, {self.context_dim}] (for the unconditional branch of "
                f"guidance, the empty prompt's tokens)"
            )
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context has shape {context.shape}; expected [{batch}, L, {self.context_dim}]"
            )
        if context_mask is None:
            return context, None
        if jnp.shape(context_mask) != context.shape[:2]:
            raise ValueError(
                f"context_mask has shape {jnp.shape(context_mask)}; expected "
                f"{tuple(context.shape[:2])}, one entry per context token"
            )
        return context, jnp.asarray(context_mask).astype(bool)


@dataclasses.dataclass(frozen=True)
class Layers:
    """The UNet's ResBlocks and attention blocks bound to one call's embedding and text.

    Blocks are created in the scope of the module whose compact method is running (`module`'s
    `__call__`), under the names given.
    """

    module: UNetTrunk  # Supplies the configuration (widths, heads, dropout, remat, dtype).
    emb: jax.Array  # [B, 4 x channels] timestep (+ class, + pooled) embedding.
    context: jax.Array | None  # [B, L, context_dim] text tokens, or None.
    context_mask: jax.Array | None  # [B, L] bool, or None (all tokens).
    train: bool  # Dropout active.

    def res_block(self, h, features: int, name: str, resample: str = "none"):
        m = self.module
        cls = nn.remat(ResBlock, static_argnums=(3,)) if m.remat else ResBlock
        block = cls(
            features,
            dropout=m.dropout,
            scale_shift_norm=m.scale_shift_norm,
            resample=resample,
            norm_groups=NORM_GROUPS,
            dtype=m.dtype,
            name=name,
        )
        return block(h, self.emb, self.train)

    def has_attention(self, h, level: int) -> bool:
        m = self.module
        return level in tuple(m.attention_levels) or h.shape[1] in tuple(m.attention_resolutions)

    def attention(self, h, name: str):
        m = self.module
        heads = m.heads_for(h.shape[-1])
        if m.context_dim > 0:
            cls = nn.remat(SpatialTransformer) if m.remat else SpatialTransformer
            block = cls(
                heads,
                depth=m.transformer_depth,
                linear_projection=m.use_linear_projection,
                norm_groups=NORM_GROUPS,
                dtype=m.dtype,
                name=name,
            )
            return block(h, self.context, self.context_mask)
        cls = nn.remat(AttentionBlock) if m.remat else AttentionBlock
        return cls(heads, dtype=m.dtype, norm_groups=NORM_GROUPS, name=name)(h)


class UNet(UNetTrunk):
    """eps/x0/v predictor: (x [B,H,W,C], t [B], labels [B] | None) -> [B,H,W,out_channels].

    Text-conditional variants (`context_dim`/`pooled_dim` > 0) also take the keyword inputs
    `context`, `context_mask` and `pooled`; a ControlNet's outputs enter as `down_residuals` and
    `mid_residual` (see `__call__`). The fields other than `out_channels` are `UNetTrunk`'s.
    """

    out_channels: int = 3  # Channels of the prediction.

    @nn.compact
    def __call__(
        self,
        x,
        t,
        labels=None,
        *,
        context=None,
        context_mask=None,
        pooled=None,
        down_residuals=None,
        mid_residual=None,
        train: bool = False,
    ):
        """x [B, H, W, in_channels] float, t [B] int or float timesteps, labels [B] int32 in
        [0, num_classes] (num_classes = the null class) or None (all null) when
        class-conditional, None otherwise; with `context_dim` > 0, context [B, L, context_dim]
        float text tokens and context_mask [B, L] int/bool (1 = a token, 0 = padding; None: all
        tokens; a row without tokens gets no cross-attention); with `pooled_dim` > 0, pooled
        [B, pooled_dim] float -> [B, H, W, out_channels] float32.

        down_residuals: None, or one array per skip (`num_skips`: conv_in's output, then each
        down block's), each of its skip's shape, added to the skips before the up path uses
        them; mid_residual: None, or an array of the middle block's output shape, added to it.
        A ControlNet's outputs (diffusers' `down_block_additional_residuals` and
        `mid_block_additional_residual`).
        """
        h, skips, layers = self.encode(
            x,
            t,
            labels,
            context=context,
            context_mask=context_mask,
            pooled=pooled,
            train=train,
        )
        dt = self.dtype
        mults = tuple(self.channel_mult)
        if down_residuals is not None:
            skips = _add_residuals(skips, down_residuals)
        if mid_residual is not None:
            if jnp.shape(mid_residual) != h.shape:
                raise ValueError(
                    f"mid_residual has shape {jnp.shape(mid_residual)}; expected {h.shape}, the "
                    f"middle block's output"
                )
            h = constrain_image(h + mid_residual.astype(h.dtype))

        # Up path.
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = layers.res_block(h, self.channels * mult, f"up_{level}_res_{i}")
                if layers.has_attention(h, level):
                    h = layers.attention(h, f"up_{level}_attn_{i}")
            if level > 0:
                name = f"up_{level}_upsample"
                if self.resblock_updown:
                    h = layers.res_block(h, h.shape[-1], name, resample="up")
                else:
                    h = Upsample(h.shape[-1], dtype=dt, name=name)(h)

        h = nn.silu(
            group_norm(h.shape[-1], groups_for(h.shape[-1], NORM_GROUPS), name="norm_out")(h)
        )
        p = self.patch_size
        out = conv(self.out_channels * p * p, dtype=dt, kernel_init=ZEROS, name="conv_out")(h)
        return _unfold(out.astype(jnp.float32), p)


def num_skips(module: UNetTrunk) -> int:
    """How many skips the down path keeps: conv_in's output, one per down ResBlock, one per
    downsample (the count of a ControlNet's down residuals)."""
    levels = len(tuple(module.channel_mult))
    return 1 + levels * module.num_res_blocks + levels - 1


def _add_residuals(skips: list, residuals) -> list:
    """`skips` with `residuals` (a sequence, one per skip, same shapes) added in order."""
    residuals = list(residuals)
    if len(residuals) != len(skips):
        raise ValueError(
            f"down_residuals has {len(residuals)} arrays; this UNet keeps {len(skips)} skips "
            f"(conv_in's output, then each down block's), one residual each"
        )
    out = []
    for i, (skip, residual) in enumerate(zip(skips, residuals, strict=True)):
        if jnp.shape(residual) != skip.shape:
            raise ValueError(
                f"down_residuals[{i}] has shape {jnp.shape(residual)}; expected {skip.shape}, "
                f"the shape of skip {i}"
            )
        out.append(constrain_image(skip + residual.astype(skip.dtype)))
    return out


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
        attention_levels=tuple(m.attention_levels),
        context_dim=m.context_dim,
        transformer_depth=m.transformer_depth,
        use_linear_projection=m.use_linear_projection,
        pooled_dim=m.pooled_dim,
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
    for field in ("resblock_updown", "remat", "scale_shift_norm", "use_linear_projection"):
        if not isinstance(m[field], bool):
            raise ConfigError(f"config.model.{field}={m[field]!r}: expected True or False")
    if not isinstance(m.dropout, int | float) or not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"config.model.dropout={m.dropout!r}: expected 0 <= dropout < 1")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.dtype={m.dtype!r}: expected float32, bfloat16 or float16")
    _validate_text(m)
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
    levels = tuple(m.attention_levels)
    out_of_range = any(not _is_int(v) or not 0 <= v < len(mults) for v in levels)
    if out_of_range or len(set(levels)) < len(levels):
        raise ConfigError(
            f"config.model.attention_levels={levels!r}: expected distinct level indices in "
            f"0..{len(mults) - 1} (0 = full resolution; config.model.channel_mult={mults})"
        )
    if levels and attn:
        raise ConfigError(
            f"config.model.attention_levels={levels} and attention_resolutions={attn} both "
            f"place attention; set one of them and the other to ()"
        )
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
    attn_widths |= {m.channels * mults[level] for level in levels}
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


def _validate_text(m) -> None:
    """The text-conditioning fields: widths, and no transformer setting without cross-attention."""
    for field in ("context_dim", "pooled_dim"):
        if not _is_int(m[field]) or m[field] < 0:
            raise ConfigError(
                f"config.model.{field}={m[field]!r}: expected an integer >= 0 (0 = none)"
            )
    if not _is_int(m.transformer_depth) or m.transformer_depth < 1:
        raise ConfigError(
            f"config.model.transformer_depth={m.transformer_depth!r}: expected an integer >= 1"
        )
    if m.context_dim == 0:
        for field, default in (("transformer_depth", 1), ("use_linear_projection", False)):
            if m[field] != default:
                raise ConfigError(
                    f"config.model.{field}={m[field]!r} configures cross-attention transformer "
                    f"blocks, but config.model.context_dim=0 (no cross-attention); set "
                    f"context_dim to the text-token width (e.g. 768 for CLIP ViT-L/14) or "
                    f"{field}={default!r}"
                )
