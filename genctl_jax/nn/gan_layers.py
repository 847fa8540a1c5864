"""Layers of the GAN family (ProGAN/StyleGAN2, SPADE, StyleGAN-1), NHWC, logically named.

Equalised learning rate (ProGAN): kernels are stored N(0, 1/lr_multiplier^2) and scaled at
every call by gain * lr_multiplier / sqrt(fan_in), so Adam's per-parameter step is the same
relative size for every layer and a small `lr_multiplier` slows a layer (StyleGAN's mapping
network) without changing its initial function. Kernel names follow `layers.py`: convolution
kernels (kernel_h, kernel_w, conv_in, conv_out), dense kernels named by the caller, biases and
strengths `vector`. Styles, demodulation and normalisation run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genctl_jax.nn.blocks import upsample_nearest
from genctl_jax.nn.layers import CONV_AXES, constrain_image, conv

# Style affines map a latent (w_dim, sharded like an embedding) to conv input channels.
STYLE_AXES = ("embed", "conv_in")
DEMOD_EPS = 1e-8  # Inside the demodulation rsqrt, as in StyleGAN2.


def _logical(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def _equalized_params(module, kernel_shape, axes):
    """(kernel, bias or None) of an equalised layer, before its runtime scale.

    The kernel is stored N(0, 1/lr^2) and the bias as bias_init / lr, so the effective layer
    (stored values times lr) starts He-initialised with bias `bias_init` for any multiplier.
    """
    lr = module.lr_multiplier
    init = _logical(nn.initializers.normal(1.0 / lr), axes)
    kernel = module.param("kernel", init, kernel_shape, jnp.float32)
    bias = None
    if module.use_bias:
        init = _logical(nn.initializers.constant(module.bias_init / lr), ("vector",))
        bias = module.param("bias", init, (module.features,), jnp.float32)
    return kernel, bias


def _conv(x, kernel, dtype, groups: int = 1):
    """SAME NHWC x HWIO convolution in `dtype`."""
    return jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


class EqualizedDense(nn.Module):
    """y = x @ (kernel * gain * lr_multiplier / sqrt(fan_in)) + bias * lr_multiplier."""

    features: int  # Output width.
    kernel_axes: Sequence[str] = ("embed", "mlp")  # Logical names of the (in, out) dims.
    use_bias: bool = True
    bias_init: float = 0.0  # Effective initial bias (StyleGAN2's style affines use 1).
    lr_multiplier: float = 1.0  # Learning-rate scale of this layer (0.01 in the mapping net).
    gain: float = 1.0  # Weight gain on top of 1/sqrt(fan_in).
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params float32.

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel, bias = _equalized_params(self, (fan_in, self.features), self.kernel_axes)
        kernel = kernel * (self.gain * self.lr_multiplier / math.sqrt(fan_in))
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if bias is not None:
            y = y + (bias * self.lr_multiplier).astype(self.dtype)
        return y


class EqualizedConv(nn.Module):
    """A SAME-padded square conv whose kernel is scaled by gain * lr_multiplier / sqrt(fan_in).

    fan_in = kernel_size^2 * input channels.
    """

    features: int  # Output channels.
    kernel_size: int = 3
    use_bias: bool = True
    bias_init: float = 0.0  # Effective initial bias.
    lr_multiplier: float = 1.0
    gain: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c_in, k = x.shape[-1], self.kernel_size
        kernel, bias = _equalized_params(self, (k, k, c_in, self.features), CONV_AXES)
        kernel = kernel * (self.gain * self.lr_multiplier / math.sqrt(k * k * c_in))
        y = _conv(x, kernel, self.dtype)
        if bias is not None:
            y = y + (bias * self.lr_multiplier).astype(self.dtype)
        return constrain_image(y)


class ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution, optionally doubling the resolution first.

    Per sample b, with style s = affine(w) (equalised dense, bias init 1):
    w'_{b,kij} = s_{b,i} * w_{kij}, and with `demodulate`
    w''_{b,kij} = w'_{b,kij} / sqrt(sum_{k,i} w'^2_{b,kij} + 1e-8), k the spatial tap, i the
    input and j the output channel. The base kernel carries the equalised scale 1/sqrt(fan_in);
    demodulation cancels it, and without demodulation (toRGB) it is StyleGAN2's style gain.

    `fused` runs one grouped convolution (feature_group_count = batch) with the per-sample
    kernels, as StyleGAN2 does at inference; unfused scales the input by s, convolves with
    the shared kernel and scales the output by the demodulation factor, which is the same map
    and avoids a batch-wide grouped conv (StyleGAN2's training path).

    Up-sampling is nearest-neighbour x2 followed by the SAME conv, not StyleGAN2's transposed
    conv + [1,3,3,1] FIR blur: simpler to shard and to check, and aliasing is not a goal here.
    Weights converted from official checkpoints therefore match only without `upsample`.
    """

    features: int  # Output channels.
    kernel_size: int = 3
    demodulate: bool = True  # False for toRGB layers.
    upsample: bool = False  # Nearest x2 before the conv.
    fused: bool = True  # Grouped conv with per-sample kernels (else scale input/output).
    use_bias: bool = True  # Per-channel bias after the conv (effective init 0).
    dtype: jnp.dtype = jnp.float32  # Conv compute dtype; styles and demodulation in float32.

    @nn.compact
    def __call__(self, x, w):
        """x [B, H, W, C_in], w [B, w_dim] -> [B, H', W', features]."""
        b, _, _, c_in = x.shape
        k = self.kernel_size
        styles = EqualizedDense(c_in, STYLE_AXES, bias_init=1.0, name="affine")(w)
        styles = styles.astype(jnp.float32)  # [B, C_in]
        init = _logical(nn.initializers.normal(1.0), CONV_AXES)
        kernel = self.param("kernel", init, (k, k, c_in, self.features), jnp.float32)
        kernel = kernel / math.sqrt(k * k * c_in)
        if self.upsample:
            x = upsample_nearest(x)

        if self.fused:
            kernels = styles[:, None, None, :, None] * kernel[None]  # [B, k, k, C_in, C_out]
            if self.demodulate:
                norm2 = jnp.sum(jnp.square(kernels), axis=(1, 2, 3), keepdims=True)
                kernels = kernels * jax.lax.rsqrt(norm2 + DEMOD_EPS)
            # Samples become channel groups: [1, H, W, B*C_in] with kernel [k, k, C_in, B*C_out].
            h, wd = x.shape[1:3]
            xg = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, h, wd, b * c_in)
            kg = jnp.transpose(kernels, (1, 2, 3, 0, 4)).reshape(k, k, c_in, b * self.features)
            y = _conv(xg, kg, self.dtype, groups=b)
            y = jnp.transpose(y.reshape(h, wd, b, self.features), (2, 0, 1, 3))
        else:
            xs = x.astype(jnp.float32) * styles[:, None, None, :]
            y = _conv(xs, kernel, self.dtype)
            if self.demodulate:
                # sum_{k,i} (s_i w_kij)^2 = sum_i s_i^2 * sum_k w_kij^2.
                norm2 = jnp.square(styles) @ jnp.sum(jnp.square(kernel), axis=(0, 1))
                y = y * jax.lax.rsqrt(norm2 + DEMOD_EPS)[:, None, None, :].astype(y.dtype)
        if self.use_bias:
            init = _logical(nn.initializers.zeros_init(), ("vector",))
            bias = self.param("bias", init, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return constrain_image(y.astype(self.dtype))


def minibatch_stddev(x, group_size: int = 4, num_features: int = 1, epsilon: float = 1e-8):
    """Appends `num_features` channels holding each group's feature std (StyleGAN's D layer).

    x [N, H, W, C] -> [N, H, W, C + num_features]. With G = min(group_size, N) and M = N / G,
    sample n is in group n % M (StyleGAN's reshape to [G, M, ...]). The channels split into
    `num_features` contiguous chunks; each chunk's std over its group (biased, epsilon inside
    the sqrt) is averaged over H, W and the chunk's channels and tiled over H x W.
    """
    n, h, w, c = x.shape
    g = min(group_size, n)
    if n % g or c % num_features:
        raise ValueError(
            f"minibatch_stddev: batch {n} must be a multiple of the group size {g} and "
            f"channels {c} a multiple of num_features={num_features}"
        )
    y = x.astype(jnp.float32).reshape(g, n // g, h, w, num_features, c // num_features)
    y = y - jnp.mean(y, axis=0)
    y = jnp.sqrt(jnp.mean(jnp.square(y), axis=0) + epsilon)  # [M, H, W, F, c]
    y = jnp.mean(y, axis=(1, 2, 4))  # [M, F]
    y = jnp.tile(y, (g, 1))[:, None, None, :]  # [N, 1, 1, F]; sample n gets row n % M.
    y = jnp.broadcast_to(y, (n, h, w, num_features)).astype(x.dtype)
    return jnp.concatenate([x, y], axis=-1)


def resize_nearest(x, size: tuple[int, int]):
    """[B, H, W, C] -> [B, *size, C]; output row i reads row floor(i * H / size[0]).

    The index rule of PyTorch's `interpolate(mode="nearest")`, which SPADE uses on label maps
    (jax.image.resize samples pixel centres, which picks the other pixel of a 2x2 block).
    """
    h, w = x.shape[1:3]
    rows = (jnp.arange(size[0]) * h) // size[0]
    cols = (jnp.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


def _normalize(x, axes, epsilon):
    """(x - mean) / sqrt(var + epsilon) over `axes`, in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon)


def instance_norm(x, epsilon: float = 1e-5):
    """Parameter-free per-sample, per-channel normalisation over H, W (NHWC), float32."""
    return _normalize(x, (1, 2), epsilon)


def group_norm(x, num_groups: int, epsilon: float = 1e-5):
    """Parameter-free GroupNorm: per sample over H, W and each of `num_groups` channel groups."""
    b, h, w, c = x.shape
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels do not split into {num_groups} groups")
    y = _normalize(x.reshape(b, h, w, num_groups, c // num_groups), (1, 2, 4), epsilon)
    return y.reshape(b, h, w, c)


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: norm(x) * (1 + gamma(m)) + beta(m) for a label map m.

    m is resized (nearest, `resize_nearest`) to x's size, then shared conv -> ReLU -> one conv
    each for gamma and beta (per pixel and channel). The paper normalises with synchronised
    BatchNorm; we use a parameter-free per-sample norm (`norm`): no running statistics to
    carry or synchronise, train and eval agree, and the SPADE code's `spadeinstance` option
    is the same choice.
    """

    norm: str = "instance"  # 'instance' or 'group' (parameter-free, float32).
    num_groups: int = 32  # Groups for norm='group' (capped at the channel count).
    hidden: int = 128  # Width of the shared conv on the label map.
    kernel_size: int = 3
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32  # Conv compute dtype.

    @nn.compact
    def __call__(self, x, label_map):
        """x [B, H, W, C], label_map [B, Hm, Wm, L] (one-hot or any map) -> [B, H, W, C]."""
        c = x.shape[-1]
        if self.norm == "instance":
            normed = instance_norm(x, self.epsilon)
        elif self.norm == "group":
            normed = group_norm(x, min(self.num_groups, c), self.epsilon)
        else:
            raise ValueError(f"SPADE.norm={self.norm!r}: expected 'instance' or 'group'")
        m = resize_nearest(label_map, x.shape[1:3])
        k = self.kernel_size
        actv = nn.relu(conv(self.hidden, k, dtype=self.dtype, name="shared")(m))
        gamma = conv(c, k, dtype=self.dtype, name="gamma")(actv).astype(jnp.float32)
        beta = conv(c, k, dtype=self.dtype, name="beta")(actv).astype(jnp.float32)
        return constrain_image((normed * (1.0 + gamma) + beta).astype(self.dtype))


class AdaIN(nn.Module):
    """StyleGAN-1's adaptive instance norm: norm(x) * (1 + scale(w)) + bias(w).

    scale and bias (per channel) come from one equalised dense layer on the style w (the first
    C outputs are the scale). StyleGAN-1 writes norm(x) * s + b with s's bias initialised to 1;
    the (1 + scale) form with zero bias init is the same function and parameter count.
    """

    epsilon: float = 1e-8  # StyleGAN-1's instance-norm epsilon.
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, w):
        """x [B, H, W, C], w [B, w_dim] -> [B, H, W, C]."""
        c = x.shape[-1]
        style = EqualizedDense(2 * c, STYLE_AXES, name="style")(w).astype(jnp.float32)
        scale, bias = style[:, None, None, :c], style[:, None, None, c:]
        y = instance_norm(x, self.epsilon) * (1.0 + scale) + bias
        return constrain_image(y.astype(self.dtype))


class NoiseInjection(nn.Module):
    """x + strength * noise, noise [B, H, W, 1] shared by all channels (StyleGAN2).

    `strength` starts at 0, so a fresh layer is the identity. StyleGAN2 learns one scalar;
    `per_channel` learns one per channel as StyleGAN-1 did. Without `noise`, it is drawn from
    the "noise" rng stream; `deterministic` then adds nothing (StyleGAN2's noise_mode='none').
    """

    per_channel: bool = False  # One strength per channel instead of a scalar.

    @nn.compact
    def __call__(self, x, noise=None, deterministic: bool = False):
        b, h, w, c = x.shape
        init = _logical(nn.initializers.zeros_init(), ("vector",))
        strength = self.param("strength", init, (c if self.per_channel else 1,), jnp.float32)
        if noise is None:
            if deterministic:
                return x
            noise = jax.random.normal(self.make_rng("noise"), (b, h, w, 1), jnp.float32)
        return (x + strength.astype(x.dtype) * noise.astype(x.dtype)).astype(x.dtype)
