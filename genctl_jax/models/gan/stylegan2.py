"""StyleGAN2 (Karras et al. 2020): mapping network, synthesis network, generator, residual D.

Mapping: z -> pixel norm (z * rsqrt(mean(z^2) + 1e-8)) -> [with `num_classes` > 0: concat a
pixel-normed learned label embedding of width w_dim] -> `mapping_layers` equalised dense
layers of width w_dim (lr x 0.01), each followed by leaky ReLU 0.2 times sqrt(2) -> w.

Synthesis, one block per resolution 4, 8, ..., `resolution`, with min(channel_base // r,
channel_max) channels at resolution r (block b4 gets a learned 4x4 constant and one style
layer; every other block two, the first doubling the resolution). A style layer is a
ModulatedConv without bias (or, with `style_block="adain"`, StyleGAN-1's plain conv), noise,
bias, leaky ReLU 0.2 times sqrt(2) (and for "adain" then AdaIN(w)). Each block ends in a toRGB
(1x1 ModulatedConv without demodulation, in both style-block kinds). `architecture="skip"`
(StyleGAN2's G): the image is the sum of every block's toRGB, each earlier sum upsampled;
"resnet": a block adds a 1x1 skip conv of its upsampled input to its second layer, both times
sqrt(1/2), and only the last block has a toRGB.

w indexing (StyleGAN2's): num_ws = 2 log2(resolution) - 2. Block b4 uses ws[0] for its
layer and ws[1] for its toRGB; block level l >= 1 (resolution 4 * 2^l) uses ws[2l - 1] and
ws[2l] for its two layers and ws[2l + 1] for its toRGB, so a toRGB shares its index with the
next block's first layer and the last w drives only the last toRGB. "adain" and "resnet" keep
the same indexing (resnet's unused toRGB indices are still the next block's first layer).

Resampling: the layers upsample nearest x2 before the conv (see `ModulatedConv`); the skip
image is upsampled bilinearly, which is StyleGAN2's [1, 3, 3, 1] FIR upsampling away from the
border (we repeat the edge where it zero-pads). D downsamples by a 2x2 mean: after conv1's 3x3
conv and before the 1x1 skip conv (where the order does not matter); StyleGAN2 blurs and
strides instead.

Discriminator (StyleGAN2's "resnet" D): fromRGB (1x1, lrelu) -> per resolution down to 8 a
block [conv0 3x3 lrelu, conv1 3x3 lrelu down; skip 1x1 down, no bias; (skip + conv1) both
times sqrt(1/2)] -> epilogue b4: minibatch std (group 4, 1 feature), conv 3x3 lrelu, dense
lrelu, dense -> one logit; with `num_classes` > 0 the last dense has 4x4-block width and the
logit is its dot product with a label embedding over sqrt(width) (projection D).

Truncation, the tracked w_avg and style mixing are pure functions (`truncate`,
`update_w_avg`, `mix_styles`): state lives with the caller (the trainer). Parameter names:
dense kernels (embed, mlp) / (mlp, embed) alternating, conv kernels and the style affines as
in `nn.gan_layers`, label tables (vocab, embed), the constant (kernel_h, kernel_w, conv_in),
biases and noise strengths (vector). Convolution weights from official checkpoints do not map
one to one (resampling differs; D flattens NHWC where PyTorch flattens NCHW).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from genctl_jax.errors import ConfigError
from genctl_jax.nn.blocks import downsample_avg, upsample_nearest
from genctl_jax.nn.embeddings import class_embedding
from genctl_jax.nn.gan_layers import (
    AdaIN,
    EqualizedConv,
    EqualizedDense,
    ModulatedConv,
    NoiseInjection,
    minibatch_stddev,
)
from genctl_jax.nn.layers import constrain_image

ARCHITECTURES = ("skip", "resnet")
STYLE_BLOCKS = ("modulated", "adain")
CONST_AXES = ("kernel_h", "kernel_w", "conv_in")  # The 4x4 constant is conv1's input.
SQRT2 = math.sqrt(2.0)
SQRT_HALF = math.sqrt(0.5)


# ------------------------------------------------------------------ config


def default_config() -> ml_collections.ConfigDict:
    """The `config.model` block of a StyleGAN2 (G and D), every field at its default."""
    m = ml_collections.ConfigDict()
    m.name = "stylegan2"
    m.resolution = 256  # Image side in pixels, a power of two >= 4 (= config.data.image_size).
    m.img_channels = 3  # Channels of generated and discriminated images.
    m.z_dim = 512  # Latent width.
    m.w_dim = 512  # Intermediate latent (style) width; also the mapping's hidden width.
    m.num_classes = 0  # 0: unconditional; N: labels in [0, N) condition mapping and D.
    m.mapping_layers = 8  # Dense layers of the mapping network.
    m.mapping_lr_multiplier = 0.01  # Learning-rate scale of the mapping layers.
    m.channel_base = 32768  # Channels at resolution r: min(channel_base // r, channel_max).
    m.channel_max = 512  # Cap on the channels of any block (G and D).
    m.architecture = "skip"  # G: 'skip' (summed toRGBs) or 'resnet'; D is always residual.
    m.style_block = "modulated"  # 'modulated' (StyleGAN2) or 'adain' (StyleGAN-1 conv + AdaIN).
    m.fused_modconv = False  # Grouped per-sample conv (inference) vs scale in/out (training).
    m.style_mixing_prob = 0.9  # Chance per sample that a second z takes over the later ws.
    m.w_avg_beta = 0.995  # EMA decay of the tracked w average (`update_w_avg`).
    m.mbstd_group_size = 4  # Minibatch-std group in D (batch must be a multiple of it).
    m.mbstd_num_features = 1  # Minibatch-std channels appended in D.
    m.dtype = "float32"  # Compute dtype; params float32, styles and norms float32.
    return m


def tiny_config() -> ml_collections.ConfigDict:
    """A small StyleGAN2 for tests: 16 x 16 images, 6 ws, widths 32/32/16, 2 mapping layers."""
    m = default_config()
    m.update(
        resolution=16,
        z_dim=32,
        w_dim=32,
        mapping_layers=2,
        channel_base=256,
        channel_max=32,
    )
    return m


def num_ws_for(resolution: int) -> int:
    """ws consumed by the synthesis network: 2 log2(resolution) - 2 (18 at 1024 px)."""
    return 2 * int(math.log2(resolution)) - 2


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """min(channel_base // resolution, channel_max), StyleGAN2's width rule."""
    return min(channel_base // resolution, channel_max)


# ------------------------------------------------------------------ functional pieces


def pixel_norm(x, epsilon: float = 1e-8):
    """x * rsqrt(mean(x^2) + epsilon) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + epsilon)


def lrelu(x, gain: float = 1.0):
    """StyleGAN2's bias_act 'lrelu': leaky ReLU 0.2 times sqrt(2) (times an extra gain)."""
    return nn.leaky_relu(x, 0.2) * (SQRT2 * gain)


def broadcast_ws(w, num_ws: int):
    """[B, w_dim] -> [B, num_ws, w_dim], the same w for every layer."""
    return jnp.broadcast_to(w[:, None, :], (w.shape[0], num_ws, w.shape[-1]))


def truncate(ws, w_avg, psi, cutoff: int | None = None):
    """The truncation trick: w_avg + psi * (w - w_avg) on ws[..., :cutoff, :] (all by default).

    ws [..., num_ws, w_dim], w_avg [w_dim], psi a float (may be traced). Written
    ws + (1 - psi) * (w_avg - ws), so psi = 1 returns ws exactly; the other ws are untouched.
    """
    ws = jnp.asarray(ws)
    w_avg = jnp.asarray(w_avg, ws.dtype)
    out = ws + (1.0 - jnp.asarray(psi, ws.dtype)) * (w_avg - ws)
    if cutoff is None:
        return out
    keep = (jnp.arange(ws.shape[-2]) < cutoff)[:, None]
    return jnp.where(keep, out, ws)


def update_w_avg(w_avg, w, beta: float = 0.995):
    """beta * w_avg + (1 - beta) * mean(w): the tracked average of w (StyleGAN2's w_avg).

    w [..., w_dim] is averaged over every axis but the last (mapping outputs, or their
    broadcast ws before mixing). The result is a stop-gradient state for the next call; it
    starts at zeros(w_dim).
    """
    w = jnp.asarray(w, jnp.float32)
    mean = jnp.mean(w.reshape(-1, w.shape[-1]), axis=0)
    return jax.lax.stop_gradient(beta * jnp.asarray(w_avg, jnp.float32) + (1.0 - beta) * mean)


def mix_styles(rng, ws1, ws2, prob):
    """Style mixing per sample: ws1 before a crossover index, ws2 from it on.

    ws1, ws2 [B, num_ws, w_dim]. Each sample independently mixes with probability `prob`
    (may be traced), with a crossover c drawn uniformly from [1, num_ws - 1], giving
    ws1[:c] ++ ws2[c:]; an unmixed sample is ws1 unchanged. (StyleGAN2 draws one crossover
    per batch; per sample gives every step a spread of crossovers.)
    """
    b, n = ws1.shape[:2]
    if n < 2:
        raise ValueError(f"mix_styles: ws have {n} entries per sample; mixing needs >= 2")
    mix_key, cut_key = jax.random.split(rng)
    mixed = jax.random.uniform(mix_key, (b,)) < prob
    crossover = jnp.where(mixed, jax.random.randint(cut_key, (b,), 1, n), n)
    take_first = jnp.arange(n)[None, :] < crossover[:, None]
    return jnp.where(take_first[..., None], ws1, ws2)


def upsample_image(img):
    """[B, H, W, C] -> [B, 2H, 2W, C] bilinear: [1, 3, 3, 1] / 4 taps, edges repeated."""
    b, h, w, c = img.shape
    return jax.image.resize(img, (b, 2 * h, 2 * w, c), "linear")


def _check_choice(value, accepted, field: str):
    if value not in accepted:
        raise ValueError(f"{field}={value!r}: expected one of {', '.join(accepted)}")


def _check_resolution(resolution: int):
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"resolution={resolution}: expected a power of two >= 4")


def _bias(module: nn.Module, features: int):
    init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vector",))
    return module.param("bias", init, (features,), jnp.float32)


# ------------------------------------------------------------------ mapping


class MappingNetwork(nn.Module):
    """z [B, z_dim] (+ labels [B]) -> w [B, w_dim] float32."""

    z_dim: int = 512  # Latent width.
    w_dim: int = 512  # Output and hidden width.
    num_classes: int = 0  # > 0: a learned label embedding (width w_dim) joins z.
    num_layers: int = 8  # Equalised dense layers.
    lr_multiplier: float = 0.01  # Learning-rate scale of every layer.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the dense layers.

    @nn.compact
    def __call__(self, z, labels=None):
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z has shape {z.shape}; expected [B, {self.z_dim}]")
        x = pixel_norm(z)
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(
                    f"this mapping network is class-conditional (num_classes="
                    f"{self.num_classes}): pass labels [B] in [0, {self.num_classes})"
                )
            y = class_embedding(self.num_classes, self.w_dim, name="label_embed")(labels)
            x = jnp.concatenate([x, pixel_norm(y)], axis=-1)
        elif labels is not None:
            raise ValueError("labels given to an unconditional mapping network (num_classes=0)")
        x = x.astype(self.dtype)
        for i in range(self.num_layers):
            axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
            dense = EqualizedDense(
                self.w_dim, axes, lr_multiplier=self.lr_multiplier, dtype=self.dtype, name=f"fc{i}"
            )
            x = lrelu(dense(x))
        return nn.with_logical_constraint(x.astype(jnp.float32), ("batch", "channels"))


# ------------------------------------------------------------------ synthesis


class StyleLayer(nn.Module):
    """(Up x2,) conv styled by w, noise, bias, lrelu * sqrt(2) * gain (then AdaIN for "adain")."""

    features: int  # Output channels.
    upsample: bool = False  # Nearest x2 before the conv.
    style_block: str = "modulated"  # 'modulated' (ModulatedConv) or 'adain' (conv + AdaIN).
    fused: bool = False  # Fused (grouped) modulated conv.
    gain: float = 1.0  # Extra output gain (sqrt(1/2) on a resnet block's second layer).
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, w, deterministic: bool = False):
        if self.style_block == "modulated":
            x = ModulatedConv(
                self.features,
                upsample=self.upsample,
                fused=self.fused,
                use_bias=False,
                dtype=self.dtype,
                name="conv",
            )(x, w)
        else:
            if self.upsample:
                x = upsample_nearest(x)
            x = EqualizedConv(self.features, use_bias=False, dtype=self.dtype, name="conv")(x)
        x = NoiseInjection(name="noise")(x, deterministic=deterministic)
        x = lrelu(x + _bias(self, self.features).astype(x.dtype), self.gain)
        if self.style_block == "adain":
            x = AdaIN(dtype=self.dtype, name="adain")(x, w)
        return constrain_image(x.astype(self.dtype))


class SynthesisBlock(nn.Module):
    """One resolution: const + layer (b4) or up-layer + layer, then toRGB (see module doc)."""

    features: int  # Channels of this block.
    img_channels: int = 3
    first: bool = False  # The 4x4 block: starts from the learned constant.
    last: bool = False  # The output block (always has a toRGB).
    architecture: str = "skip"  # 'skip' or 'resnet'.
    style_block: str = "modulated"
    fused: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, img, ws, deterministic: bool = False):
        """x [B, H, W, C_in] or None (b4), img [B, H, W, img_channels] float32 or None,
        ws [B, n, w_dim] (n = 2 for b4, else 3: the layers' ws, then toRGB's) ->
        (x [B, H', W', features], img or None)."""
        dt, resnet = self.dtype, self.architecture == "resnet"

        def layer(name, upsample=False, gain=1.0):
            return StyleLayer(
                self.features,
                upsample=upsample,
                style_block=self.style_block,
                fused=self.fused,
                gain=gain,
                dtype=dt,
                name=name,
            )

        if self.first:
            init = nn.with_logical_partitioning(nn.initializers.normal(1.0), CONST_AXES)
            const = self.param("const", init, (4, 4, self.features), jnp.float32)
            x = jnp.broadcast_to(const.astype(dt), (ws.shape[0], 4, 4, self.features))
            x = layer("conv1")(x, ws[:, 0], deterministic)
            rgb_w = ws[:, 1]
        else:
            if resnet:
                skip = EqualizedConv(
                    self.features, 1, use_bias=False, gain=SQRT_HALF, dtype=dt, name="skip"
                )(upsample_nearest(x))
            x = layer("conv0", upsample=True)(x, ws[:, 0], deterministic)
            x = layer("conv1", gain=SQRT_HALF if resnet else 1.0)(x, ws[:, 1], deterministic)
            if resnet:
                x = constrain_image(skip + x)
            rgb_w = ws[:, 2]
        if self.architecture == "skip" or self.last:
            torgb = ModulatedConv(
                self.img_channels,
                kernel_size=1,
                demodulate=False,
                fused=self.fused,
                dtype=dt,
                name="torgb",
            )
            rgb = torgb(x, rgb_w).astype(jnp.float32)
            img = rgb if img is None else upsample_image(img) + rgb
            img = constrain_image(img)
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, w_dim] -> images [B, resolution, resolution, img_channels] float32."""

    resolution: int = 256  # Output side, a power of two >= 4.
    img_channels: int = 3
    channel_base: int = 32768  # Channels at r: min(channel_base // r, channel_max).
    channel_max: int = 512
    architecture: str = "skip"  # 'skip' (sum of upsampled toRGBs) or 'resnet'.
    style_block: str = "modulated"  # 'modulated' or 'adain' (StyleGAN-1 block).
    fused_modconv: bool = False
    dtype: jnp.dtype = jnp.float32

    @property
    def num_ws(self) -> int:
        return num_ws_for(self.resolution)

    @nn.compact
    def __call__(self, ws, deterministic: bool = False):
        """deterministic: no noise (else drawn from the "noise" rng stream)."""
        _check_resolution(self.resolution)
        _check_choice(self.architecture, ARCHITECTURES, "architecture")
        _check_choice(self.style_block, STYLE_BLOCKS, "style_block")
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(
                f"ws has shape {ws.shape}; expected [B, {self.num_ws}, w_dim] for "
                f"resolution {self.resolution}"
            )
        ws = nn.with_logical_constraint(ws.astype(jnp.float32), ("batch", None, "channels"))
        levels = int(math.log2(self.resolution)) - 1
        x = img = None
        for level in range(levels):
            res = 4 * 2**level
            start = max(2 * level - 1, 0)
            n = 2 if level == 0 else 3
            block = SynthesisBlock(
                channels_at(res, self.channel_base, self.channel_max),
                img_channels=self.img_channels,
                first=level == 0,
                last=level == levels - 1,
                architecture=self.architecture,
                style_block=self.style_block,
                fused=self.fused_modconv,
                dtype=self.dtype,
                name=f"b{res}",
            )
            x, img = block(x, img, ws[:, start : start + n], deterministic)
        return img


# ------------------------------------------------------------------ generator


class Generator(nn.Module):
    """Mapping + synthesis: (z [B, z_dim], labels [B] | None) -> [B, res, res, C] float32.

    Methods for the trainer (`apply(..., method=...)`): `map` (z -> ws [B, num_ws, w_dim]) and
    `synthesize` (ws -> images), so path-length regularisation, w_avg tracking and style
    mixing can run between them. Params: {'mapping': ..., 'synthesis': ...}.
    """

    resolution: int = 256  # Image side, a power of two >= 4.
    img_channels: int = 3
    z_dim: int = 512
    w_dim: int = 512
    num_classes: int = 0  # > 0: class-conditional mapping.
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    channel_base: int = 32768
    channel_max: int = 512
    architecture: str = "skip"  # 'skip' or 'resnet'.
    style_block: str = "modulated"  # 'modulated' or 'adain'.
    fused_modconv: bool = False
    style_mixing_prob: float = 0.9  # Used by __call__ when given z_mix.
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.mapping = MappingNetwork(
            z_dim=self.z_dim,
            w_dim=self.w_dim,
            num_classes=self.num_classes,
            num_layers=self.mapping_layers,
            lr_multiplier=self.mapping_lr_multiplier,
            dtype=self.dtype,
        )
        self.synthesis = SynthesisNetwork(
            resolution=self.resolution,
            img_channels=self.img_channels,
            channel_base=self.channel_base,
            channel_max=self.channel_max,
            architecture=self.architecture,
            style_block=self.style_block,
            fused_modconv=self.fused_modconv,
            dtype=self.dtype,
        )

    @property
    def num_ws(self) -> int:
        return num_ws_for(self.resolution)

    def map(self, z, labels=None):
        """z [B, z_dim] (+ labels [B]) -> ws [B, num_ws, w_dim], every row the same w."""
        return broadcast_ws(self.mapping(z, labels), self.num_ws)

    def synthesize(self, ws, deterministic: bool = False):
        """ws [B, num_ws, w_dim] -> images; `deterministic`: no noise."""
        return self.synthesis(ws, deterministic)

    def __call__(
        self,
        z,
        labels=None,
        *,
        z_mix=None,
        w_avg=None,
        psi=1.0,
        cutoff: int | None = None,
        deterministic: bool = False,
    ):
        """z_mix [B, z_dim]: style mixing with `style_mixing_prob` (rng stream "mixing");
        w_avg [w_dim], psi, cutoff: `truncate` the ws; deterministic: no noise."""
        ws = self.map(z, labels)
        if z_mix is not None:
            ws2 = self.map(z_mix, labels)
            ws = mix_styles(self.make_rng("mixing"), ws, ws2, self.style_mixing_prob)
        if w_avg is not None:
            ws = truncate(ws, w_avg, psi, cutoff)
        elif cutoff is not None or not (isinstance(psi, int | float) and psi == 1.0):
            raise ValueError("truncation (psi != 1 or cutoff) needs w_avg, the tracked mean w")
        return self.synthesize(ws, deterministic)


# ------------------------------------------------------------------ discriminator


class DiscriminatorBlock(nn.Module):
    """StyleGAN2's residual D block: (skip(down(x)) + down(conv1(conv0(x)))), halving H, W."""

    tmp_features: int  # conv0's width (this resolution's channels).
    out_features: int  # conv1's and the skip's width (the next resolution's channels).
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dt = self.dtype
        skip = EqualizedConv(
            self.out_features, 1, use_bias=False, gain=SQRT_HALF, dtype=dt, name="skip"
        )(downsample_avg(x))
        x = lrelu(EqualizedConv(self.tmp_features, 3, dtype=dt, name="conv0")(x))
        x = EqualizedConv(self.out_features, 3, dtype=dt, name="conv1")(x)
        x = lrelu(downsample_avg(x), SQRT_HALF)
        return constrain_image(skip + x)


class DiscriminatorEpilogue(nn.Module):
    """4x4 features -> minibatch std, conv, dense, dense: [B, out_features] float32."""

    features: int  # Channels at 4x4.
    out_features: int = 1  # 1 logit, or the projection width when conditional.
    mbstd_group_size: int = 4
    mbstd_num_features: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dt = self.dtype
        x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_features)
        x = lrelu(EqualizedConv(self.features, 3, dtype=dt, name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        x = lrelu(EqualizedDense(self.features, ("embed", "mlp"), dtype=dt, name="fc")(x))
        out = EqualizedDense(self.out_features, ("mlp", "embed"), dtype=dt, name="out")(x)
        return out.astype(jnp.float32)


class Discriminator(nn.Module):
    """(images [B, res, res, C], labels [B] | None) -> logits [B] float32 (StyleGAN2 resnet D)."""

    resolution: int = 256  # Image side, a power of two >= 4.
    img_channels: int = 3
    num_classes: int = 0  # > 0: projection conditioning on labels [B].
    channel_base: int = 32768
    channel_max: int = 512
    mbstd_group_size: int = 4  # Batch must be a multiple of min(group, batch).
    mbstd_num_features: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, labels=None):
        _check_resolution(self.resolution)
        res, c = self.resolution, self.img_channels
        if images.ndim != 4 or images.shape[1:] != (res, res, c):
            raise ValueError(f"images have shape {images.shape}; expected [B, {res}, {res}, {c}]")
        if self.num_classes == 0 and labels is not None:
            raise ValueError("labels given to an unconditional discriminator (num_classes=0)")
        if self.num_classes > 0 and labels is None:
            raise ValueError(
                f"this discriminator is class-conditional (num_classes={self.num_classes}): "
                f"pass labels [B] in [0, {self.num_classes})"
            )

        def ch(r):
            return channels_at(r, self.channel_base, self.channel_max)

        dt = self.dtype
        x = constrain_image(images.astype(dt))
        x = lrelu(EqualizedConv(ch(res), 1, dtype=dt, name="fromrgb")(x))
        while res > 4:
            x = DiscriminatorBlock(ch(res), ch(res // 2), dtype=dt, name=f"b{res}")(x)
            res //= 2
        width = ch(4)
        out = DiscriminatorEpilogue(
            width,
            out_features=width if self.num_classes > 0 else 1,
            mbstd_group_size=self.mbstd_group_size,
            mbstd_num_features=self.mbstd_num_features,
            dtype=dt,
            name="b4",
        )(x)
        if self.num_classes == 0:
            return out[:, 0]
        cmap = class_embedding(self.num_classes, width, name="label_embed")(labels)
        return jnp.sum(out * cmap.astype(jnp.float32), axis=-1) / math.sqrt(width)


# ------------------------------------------------------------------ factory


class Networks(NamedTuple):
    """The two networks a StyleGAN2 trainer builds from one `config.model`."""

    generator: Generator
    discriminator: Discriminator


FIELDS = tuple(k for k in default_config() if k != "name")


def _with_defaults(model_config) -> ml_collections.ConfigDict:
    """`default_config()` overridden by the given fields (not type-checked: `validate` is)."""
    m = default_config().to_dict()
    m.update({key: model_config[key] for key in model_config if key in m})
    return ml_collections.ConfigDict(m, type_safe=False)


def generator_from_config(model_config) -> Generator:
    """The Generator of `config.model`; absent fields take `default_config()`'s values."""
    m = _with_defaults(model_config)
    return Generator(
        resolution=m.resolution,
        img_channels=m.img_channels,
        z_dim=m.z_dim,
        w_dim=m.w_dim,
        num_classes=m.num_classes,
        mapping_layers=m.mapping_layers,
        mapping_lr_multiplier=m.mapping_lr_multiplier,
        channel_base=m.channel_base,
        channel_max=m.channel_max,
        architecture=m.architecture,
        style_block=m.style_block,
        fused_modconv=m.fused_modconv,
        style_mixing_prob=m.style_mixing_prob,
        dtype=jnp.dtype(m.dtype),
    )


def discriminator_from_config(model_config) -> Discriminator:
    """The Discriminator of `config.model`; absent fields take `default_config()`'s values."""
    m = _with_defaults(model_config)
    return Discriminator(
        resolution=m.resolution,
        img_channels=m.img_channels,
        num_classes=m.num_classes,
        channel_base=m.channel_base,
        channel_max=m.channel_max,
        mbstd_group_size=m.mbstd_group_size,
        mbstd_num_features=m.mbstd_num_features,
        dtype=jnp.dtype(m.dtype),
    )


def from_config(model_config) -> Networks:
    """Both networks of `config.model`."""
    return Networks(generator_from_config(model_config), discriminator_from_config(model_config))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate(config) -> None:
    """Checks `config.model` (and `config.data.image_size`, when present) before compiling."""
    unknown = sorted(set(config.model.keys()) - set(FIELDS) - {"name"})
    if unknown:
        raise ConfigError(
            f"config.model.{unknown[0]} is not a stylegan2 field; accepted: {', '.join(FIELDS)}"
        )
    m = _with_defaults(config.model)
    res = m.resolution
    if not _is_int(res) or res < 4 or res & (res - 1):
        raise ConfigError(f"config.model.resolution={res!r}: expected a power of two >= 4")
    for field in ("img_channels", "z_dim", "w_dim", "mapping_layers", "channel_max"):
        if not _is_int(m[field]) or m[field] < 1:
            raise ConfigError(f"config.model.{field}={m[field]!r}: expected an integer >= 1")
    if not _is_int(m.channel_base) or m.channel_base < res:
        raise ConfigError(
            f"config.model.channel_base={m.channel_base!r}: expected an integer >= the "
            f"resolution {res}, so every block has min(channel_base // r, channel_max) >= 1 "
            f"channels"
        )
    if not _is_int(m.num_classes) or m.num_classes < 0:
        raise ConfigError(
            f"config.model.num_classes={m.num_classes!r}: expected an integer >= 0 "
            f"(0 = unconditional)"
        )
    for field, accepted in (("architecture", ARCHITECTURES), ("style_block", STYLE_BLOCKS)):
        if m[field] not in accepted:
            raise ConfigError(
                f"config.model.{field}={m[field]!r}: expected one of {', '.join(accepted)}"
            )
    if not isinstance(m.fused_modconv, bool):
        raise ConfigError(f"config.model.fused_modconv={m.fused_modconv!r}: expected a bool")
    for field in ("style_mixing_prob", "w_avg_beta"):
        if not _is_number(m[field]) or not 0.0 <= m[field] <= 1.0:
            raise ConfigError(f"config.model.{field}={m[field]!r}: expected a number in [0, 1]")
    if not _is_number(m.mapping_lr_multiplier) or m.mapping_lr_multiplier <= 0:
        raise ConfigError(
            f"config.model.mapping_lr_multiplier={m.mapping_lr_multiplier!r}: expected a "
            f"number > 0 (StyleGAN2 uses 0.01)"
        )
    for field in ("mbstd_group_size", "mbstd_num_features"):
        if not _is_int(m[field]) or m[field] < 1:
            raise ConfigError(f"config.model.{field}={m[field]!r}: expected an integer >= 1")
    width4 = channels_at(4, m.channel_base, m.channel_max)
    if width4 % m.mbstd_num_features:
        raise ConfigError(
            f"config.model.mbstd_num_features={m.mbstd_num_features} does not divide the "
            f"{width4} channels of D's 4x4 block"
        )
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.dtype={m.dtype!r}: expected float32, bfloat16 or float16")
    data = config.get("data")
    size = data.get("image_size") if data is not None else None
    if size is not None and size != res:
        raise ConfigError(
            f"config.data.image_size={size} differs from config.model.resolution={res}; set "
            f"both to the same power of two"
        )
