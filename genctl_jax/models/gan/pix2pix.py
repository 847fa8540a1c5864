"""pix2pix and pix2pixHD networks: U-Net and global generators, PatchGAN discriminators. NHWC.

Architectures (Isola et al. 2017 "pix2pix"; Wang et al. 2018 "pix2pixHD"):

- `UNetGenerator`: encoder C64-C128-C256-C512-C512-C512-C512-C512 (4x4 stride-2 convs, padding
  1, LeakyReLU 0.2 before every conv but the first), decoder of 4x4 stride-2 transposed convs
  (ReLU before each), each decoder output concatenated with the mirror encoder output, tanh.
  Dropout 0.5 on the first three decoder blocks, as in the paper and its Lua code (the PyTorch
  port moves it one block outwards). `dropout_at_test` keeps it on at eval, the paper's only
  source of noise.
- `PatchDiscriminator`: C64-C128-C256-C512 (4x4 convs, strides 2, 2, 2, 1) then a 4x4 stride-1
  conv to one logit per patch; LeakyReLU 0.2; no norm on the first layer. With num_layers=3
  and any padding its receptive field is 70 x 70 (`receptive_field`).
- `MultiScaleDiscriminator`: pix2pixHD's `num_scales` PatchDiscriminators, the input average
  pooled (3x3, stride 2, padding 1, pads not counted) between scales.
- `GlobalGenerator`: pix2pixHD's c7s1-64, d128, d256, ..., `num_res_blocks` residual blocks,
  u..., c7s1-3 and tanh, with reflection padding before the 7x7 convs and inside the residual
  blocks and zero padding in the strided ones.

Choices that differ from the papers (the same in every network here):

- Normalisation is parameter-free instance norm (float32), or none. pix2pix used BatchNorm at
  batch size 1, which is instance norm with running statistics; dropping those leaves train
  and eval alike and nothing to synchronise. Convs followed by a norm have no bias (the mean
  subtraction cancels it). The innermost encoder conv of the U-Net is never normalised: the
  instance norm of its 1x1 map is identically zero (the reference code leaves it out too).
- Kernels start N(0, 0.02) as in both papers' code; biases zero. No spectral norm.
- Up-sampling in `GlobalGenerator` is a 3x3 stride-2 transposed conv by default (pix2pixHD),
  or nearest x2 + 3x3 conv (`upsample="nearest"`, no checkerboard artefacts).

Discriminators take `(image, condition)` and see concat(condition, image) on channels, as
pix2pix's D sees concat(input, output); they return one `(logits, features)` pair per scale
(full resolution first): logits [B, h, w, 1] float32 and the activation after every hidden
block, for pix2pixHD's feature-matching loss (`gan.losses.feature_matching`). XLA drops the
features when a caller ignores them.

Logical names: conv and transposed-conv kernels (kernel_h, kernel_w, conv_in, conv_out),
biases (vector). `from_config(config.model)` builds `GanNetworks(generator, discriminator)`
from the `generator` and `discriminator` sections, whose fields are the modules' own.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from genctl_jax.errors import ConfigError
from genctl_jax.nn.blocks import upsample_nearest
from genctl_jax.nn.gan_layers import instance_norm
from genctl_jax.nn.layers import CONV_AXES, constrain_image

INIT_STD = 0.02  # Kernel init N(0, 0.02^2), as in the pix2pix / pix2pixHD code.
MAX_MULT = 8  # Widths stop growing at 8 x base_channels (C512 for base 64).
LEAKY_SLOPE = 0.2
NORMS = ("instance", "none")
DTYPES = ("float32", "bfloat16", "float16")


class GanNetworks(NamedTuple):
    """The networks a GAN family's `from_config` builds (encoder: SPADE's VAE, else None)."""

    generator: nn.Module
    discriminator: nn.Module
    encoder: nn.Module | None = None


# ------------------------------------------------------------------ layers


def _conv(
    features: int,
    kernel_size: int,
    strides: int = 1,
    padding: int = 0,
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A square conv with symmetric explicit zero `padding` (0: VALID), N(0, 0.02) kernel."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vector",)),
        name=name,
    )


def _conv_transpose(
    features: int,
    kernel_size: int,
    padding: tuple[int, int],
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    name: str | None = None,
) -> nn.ConvTranspose:
    """A stride-2 transposed conv; `padding` (lo, hi) pads the dilated input on both axes.

    PyTorch's ConvTranspose2d(padding=p, output_padding=q) is (k - 1 - p, k - 1 - p + q).
    """
    return nn.ConvTranspose(
        features,
        (kernel_size, kernel_size),
        strides=(2, 2),
        padding=(padding, padding),
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vector",)),
        name=name,
    )


def _norm(x, kind: str):
    """Instance norm (float32, back in x's dtype) or the identity."""
    if kind == "instance":
        return instance_norm(x).astype(x.dtype)
    if kind == "none":
        return x
    raise ValueError(f"norm={kind!r}: expected one of {NORMS}")


def reflect_pad(x, pad: int):
    """Mirror-pads H and W of an NHWC map by `pad`, edge not repeated (PyTorch ReflectionPad2d)."""
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def avg_pool_3x3(x):
    """3x3 stride-2 average pool, padding 1, pads not counted: pix2pixHD's D down-sampling.

    [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]; border windows average their in-image pixels.
    """
    window, strides = (1, 3, 3, 1), (1, 2, 2, 1)
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    sums = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, window, strides, pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), jnp.float32)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
    return (sums / counts).astype(x.dtype)


def receptive_field(num_layers: int) -> int:
    """Input pixels per side seen by one PatchGAN logit: 9 * 2^num_layers - 2 (70 for 3)."""
    return 9 * 2**num_layers - 2


def patch_output_size(size: int, num_layers: int, padding: int = 1) -> int:
    """Side of a PatchDiscriminator's logit grid for a `size`-pixel input."""
    for stride in [2] * num_layers + [1, 1]:
        size = (size + 2 * padding - 4) // stride + 1
    return size


def pooled_size(size: int) -> int:
    """Side after `avg_pool_3x3`: ceil(size / 2)."""
    return (size - 1) // 2 + 1


# ------------------------------------------------------------------ generators


class UNetGenerator(nn.Module):
    """pix2pix's U-Net: x [B, H, W, C_in] -> [B, H, W, out_channels] in (-1, 1), float32.

    H and W must be multiples of 2^num_downs. Params: encoder `down_{i}`, decoder `up_{i}` (the
    transposed conv back to down_{i}'s input resolution; `up_0` makes the image).
    """

    out_channels: int = 3  # Channels of the generated image.
    base_channels: int = 64  # Width of the first encoder conv; level i has min(2^i, 8) x it.
    num_downs: int = 8  # Stride-2 encoder convs (8: 256 px down to 1 x 1).
    norm: str = "instance"  # 'instance' or 'none' (parameter-free, float32).
    dropout_rate: float = 0.5  # Dropout in the first `num_dropout_blocks` decoder blocks.
    num_dropout_blocks: int = 3  # Decoder blocks with dropout, innermost first.
    dropout_at_test: bool = False  # Keep dropout on with train=False (the paper's test noise).
    dtype: jnp.dtype = jnp.float32  # Conv compute dtype; params and norms float32.

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        n, dt = self.num_downs, self.dtype
        factor = 2**n
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"UNetGenerator: x has shape {x.shape}; expected [B, H, W, C] with H and W "
                f"multiples of 2^num_downs = {factor}"
            )
        widths = [self.base_channels * min(2**i, MAX_MULT) for i in range(n)]
        normed = self.norm != "none"

        h, skips = x.astype(dt), []
        for i, width in enumerate(widths):
            use_norm = normed and 0 < i < n - 1  # Not the first, nor the 1x1 bottleneck.
            if i > 0:
                h = nn.leaky_relu(h, LEAKY_SLOPE)
            h = _conv(width, 4, 2, 1, use_bias=not use_norm, dtype=dt, name=f"down_{i}")(h)
            h = constrain_image(_norm(h, self.norm) if use_norm else h)
            skips.append(h)

        skips.pop()  # The bottleneck is h itself.
        deterministic = not (train or self.dropout_at_test)
        for i in reversed(range(n)):
            last = i == 0
            features = self.out_channels if last else widths[i - 1]
            h = nn.relu(h)
            # PyTorch's ConvTranspose2d(4, stride 2, padding 1): pads (2, 2), doubles the size.
            up = _conv_transpose(
                features, 4, (2, 2), use_bias=last or not normed, dtype=dt, name=f"up_{i}"
            )
            h = up(h)
            if last:
                break
            h = _norm(h, self.norm)
            if n - 1 - i < self.num_dropout_blocks:
                h = nn.Dropout(self.dropout_rate, deterministic=deterministic)(h)
            h = constrain_image(jnp.concatenate([skips.pop(), h], axis=-1))
        return jnp.tanh(h.astype(jnp.float32))


class ResnetBlock(nn.Module):
    """pix2pixHD's residual block: x + norm(conv(pad(relu(norm(conv(pad(x))))))), width kept."""

    norm: str = "instance"  # 'instance' or 'none'.
    dropout_rate: float = 0.0  # Dropout between the two convs (pix2pixHD's use_dropout: 0.5).
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        c, use_bias = x.shape[-1], self.norm == "none"
        h = _conv(c, 3, use_bias=use_bias, dtype=self.dtype, name="conv_0")(reflect_pad(x, 1))
        h = nn.relu(_norm(h, self.norm))
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        h = _conv(c, 3, use_bias=use_bias, dtype=self.dtype, name="conv_1")(reflect_pad(h, 1))
        return constrain_image(x + _norm(h, self.norm))


class GlobalGenerator(nn.Module):
    """pix2pixHD's global generator: x [B, H, W, C_in] -> [B, H, W, out_channels] in (-1, 1).

    H and W must be multiples of 2^num_downsampling, and the bottleneck at least 2 x 2 (its
    reflection padding mirrors one pixel).
    """

    out_channels: int = 3  # Channels of the generated image.
    base_channels: int = 64  # Width of the first 7x7 conv; doubled by every down-sampling.
    num_downsampling: int = 4  # Stride-2 convs (pix2pixHD's n_downsample_global).
    num_res_blocks: int = 9  # Residual blocks at the bottleneck (n_blocks_global).
    norm: str = "instance"  # 'instance' or 'none' (parameter-free, float32).
    upsample: str = "transpose"  # 'transpose' (3x3 stride-2 transposed conv) or 'nearest'.
    dropout_rate: float = 0.0  # Dropout inside the residual blocks (train=True only).
    dtype: jnp.dtype = jnp.float32  # Conv compute dtype; params and norms float32.

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        nd, dt = self.num_downsampling, self.dtype
        factor = 2**nd
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"GlobalGenerator: x has shape {x.shape}; expected [B, H, W, C] with H and W "
                f"multiples of 2^num_downsampling = {factor}"
            )
        if min(x.shape[1:3]) < 2 * factor:
            raise ValueError(
                f"GlobalGenerator: a {x.shape[1]} x {x.shape[2]} input leaves a bottleneck "
                f"under 2 x 2 after {nd} down-samplings; use inputs of at least {2 * factor} px"
            )
        use_bias = self.norm == "none"

        def norm_relu(h):
            return constrain_image(nn.relu(_norm(h, self.norm)))

        h = _conv(self.base_channels, 7, use_bias=use_bias, dtype=dt, name="conv_in")(
            reflect_pad(x.astype(dt), 3)
        )
        h = norm_relu(h)
        for i in range(nd):
            width = self.base_channels * 2 ** (i + 1)
            h = norm_relu(_conv(width, 3, 2, 1, use_bias=use_bias, dtype=dt, name=f"down_{i}")(h))
        for i in range(self.num_res_blocks):
            block = ResnetBlock(self.norm, self.dropout_rate, dtype=dt, name=f"res_{i}")
            h = block(h, train=train)
        for i in reversed(range(nd)):
            width, name = self.base_channels * 2**i, f"up_{i}"
            if self.upsample == "transpose":
                # PyTorch's ConvTranspose2d(3, stride 2, padding 1, output_padding 1).
                up = _conv_transpose(width, 3, (1, 2), use_bias=use_bias, dtype=dt, name=name)
                h = up(h)
            elif self.upsample == "nearest":
                h = _conv(width, 3, 1, 1, use_bias=use_bias, dtype=dt, name=name)(
                    upsample_nearest(h)
                )
            else:
                raise ValueError(
                    f"GlobalGenerator.upsample={self.upsample!r}: expected 'transpose' or 'nearest'"
                )
            h = norm_relu(h)
        h = _conv(self.out_channels, 7, dtype=dt, name="conv_out")(reflect_pad(h, 3))
        return jnp.tanh(h.astype(jnp.float32))


# ------------------------------------------------------------------ discriminators


def _with_condition(image, condition):
    """concat(condition, image) on channels (pix2pix's D input), or the image alone."""
    if condition is None:
        return image
    if condition.shape[:3] != image.shape[:3]:
        raise ValueError(
            f"condition has shape {condition.shape} and image {image.shape}; expected the same "
            f"[B, H, W]"
        )
    return jnp.concatenate([condition.astype(image.dtype), image], axis=-1)


class PatchDiscriminator(nn.Module):
    """PatchGAN: (image, condition) -> (logits [B, h, w, 1] float32, hidden activations).

    `num_layers` stride-2 4x4 convs, one stride-1 4x4 conv at min(2^num_layers, 8) x base
    width, then the stride-1 4x4 conv to one channel. Each logit sees
    `receptive_field(num_layers)` pixels per side (70 for 3); the grid side is
    `patch_output_size(size, num_layers, padding)`.
    Instance norm couples all positions of an image, so the strict receptive field holds
    for norm='none'; with a norm only the convolutions are local.
    """

    base_channels: int = 64  # Width of the first conv; layer i has min(2^i, 8) x it.
    num_layers: int = 3  # Stride-2 convs (3: 70 x 70 patches; SPADE's n_layers_D=4).
    norm: str = "instance"  # 'instance' or 'none'; never on the first layer.
    padding: int = 1  # Zero padding of every 4x4 conv (pix2pix 1; pix2pixHD and SPADE 2).
    dtype: jnp.dtype = jnp.float32  # Conv compute dtype; params and norms float32.

    @nn.compact
    def __call__(self, image, condition=None):
        h = _with_condition(image, condition).astype(self.dtype)
        features = []
        for i in range(self.num_layers + 1):
            width = self.base_channels * min(2**i, MAX_MULT)
            stride = 2 if i < self.num_layers else 1
            use_norm = i > 0 and self.norm != "none"
            conv = _conv(
                width, 4, stride, self.padding, use_bias=not use_norm, dtype=self.dtype,
                name=f"conv_{i}",
            )  # fmt: skip
            h = conv(h)
            h = _norm(h, self.norm) if use_norm else h
            h = constrain_image(nn.leaky_relu(h, LEAKY_SLOPE))
            features.append(h)
        logits = _conv(1, 4, 1, self.padding, dtype=self.dtype, name="conv_out")(h)
        return logits.astype(jnp.float32), features


class MultiScaleDiscriminator(nn.Module):
    """pix2pixHD's discriminator: a PatchDiscriminator `scale_{s}` per scale.

    (image, condition) -> [(logits, features)] * num_scales, full resolution first; scale s
    sees concat(condition, image) pooled s times by `avg_pool_3x3`.
    """

    num_scales: int = 3  # Discriminators (pix2pixHD 3, SPADE 2, pix2pix 1).
    base_channels: int = 64  # Each scale's first conv width.
    num_layers: int = 3  # Stride-2 convs per scale.
    norm: str = "instance"  # 'instance' or 'none'.
    padding: int = 1  # Zero padding of the 4x4 convs.
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image, condition=None):
        x = _with_condition(image, condition)
        outputs = []
        for s in range(self.num_scales):
            if s > 0:
                x = constrain_image(avg_pool_3x3(x))
            d = PatchDiscriminator(
                self.base_channels, self.num_layers, self.norm, self.padding, self.dtype,
                name=f"scale_{s}",
            )  # fmt: skip
            outputs.append(d(x))
        return outputs


# ------------------------------------------------------------------ configs

GENERATORS = {"unet": UNetGenerator, "global": GlobalGenerator}
_NOT_CONFIG = ("parent", "name", "dtype")


def module_fields(cls) -> dict:
    """{field: default} of a module's configurable fields (not parent, name or dtype)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.name not in _NOT_CONFIG and f.default is not dataclasses.MISSING
    }


def section(cls, **overrides) -> ml_collections.ConfigDict:
    """A config section holding `cls`'s fields at their defaults, then `overrides`."""
    fields = module_fields(cls)
    unknown = sorted(set(overrides) - set(fields) - {"kind"})
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {unknown[0]!r}")
    return ml_collections.ConfigDict({**fields, **overrides})


def default_config() -> ml_collections.ConfigDict:
    """pix2pix (Isola et al. 2017): 256 px U-Net generator, one 70 x 70 PatchGAN.

    `generator` holds `kind` ('unet' or 'global') and that generator's fields, `discriminator`
    MultiScaleDiscriminator's fields; each field is documented on its module.
    """
    m = ml_collections.ConfigDict()
    m.name = "pix2pix"
    m.dtype = "float32"  # Compute dtype of both networks; params float32.
    m.generator = section(UNetGenerator, kind="unet")
    m.discriminator = section(MultiScaleDiscriminator, num_scales=1)
    return m


def pix2pixhd_config() -> ml_collections.ConfigDict:
    """pix2pixHD's global network (Wang et al. 2018): 4 down-samplings, 9 residual blocks,
    3 scales of 70 x 70 PatchGANs padded by 2 as in its code."""
    m = default_config()
    m.generator = section(GlobalGenerator, kind="global")
    m.discriminator = section(MultiScaleDiscriminator, num_scales=3, padding=2)
    return m


def tiny_config() -> ml_collections.ConfigDict:
    """A tiny pix2pix for tests: 16 px, U-Net of widths 8-64 over 4 levels, one 2-layer D."""
    m = default_config()
    m.generator = section(UNetGenerator, kind="unet", base_channels=8, num_downs=4)
    m.discriminator = section(MultiScaleDiscriminator, num_scales=1, base_channels=8, num_layers=2)
    return m


def tiny_hd_config() -> ml_collections.ConfigDict:
    """A tiny pix2pixHD for tests: 16 px, 2 down-samplings, 1 residual block, 2 scales."""
    m = default_config()
    m.generator = section(
        GlobalGenerator, kind="global", base_channels=8, num_downsampling=2, num_res_blocks=1
    )
    m.discriminator = section(
        MultiScaleDiscriminator, num_scales=2, base_channels=8, num_layers=1, padding=2
    )
    return m


def build_section(cls, fields, dtype, drop=("kind",)) -> nn.Module:
    """`cls` from a config section: absent fields at their defaults, `drop` keys ignored."""
    kwargs = {k: v for k, v in fields.items() if k not in drop}
    for k, v in kwargs.items():
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    return cls(**kwargs, dtype=jnp.dtype(dtype))


def from_config(model_config) -> GanNetworks:
    """GanNetworks(generator, discriminator) from `config.model` (see `default_config`)."""
    g = model_config.generator
    kind = g.get("kind", "unet")
    if kind not in GENERATORS:
        raise ConfigError(
            f"config.model.generator.kind={kind!r}: expected one of {sorted(GENERATORS)}"
        )
    dtype = model_config.get("dtype", "float32")
    return GanNetworks(
        build_section(GENERATORS[kind], g, dtype),
        build_section(MultiScaleDiscriminator, model_config.discriminator, dtype),
    )


# ------------------------------------------------------------------ validation


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_keys(prefix: str, section_config, allowed) -> None:
    """ConfigError naming the first key of `section_config` not in `allowed`."""
    unknown = sorted(set(section_config.keys()) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]} is not a known field; accepted: {', '.join(sorted(allowed))}"
        )


def check_int(prefix: str, s, field: str, lo: int = 1, hi: int | None = None) -> None:
    """ConfigError unless s[field] is an integer in [lo, hi]."""
    v = s[field]
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{prefix}.{field}={v!r}: expected an integer {span}")


def check_choice(prefix: str, s, field: str, choices) -> None:
    if s[field] not in choices:
        raise ConfigError(f"{prefix}.{field}={s[field]!r}: expected one of {', '.join(choices)}")


def check_rate(prefix: str, s, field: str) -> None:
    v = s[field]
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
        raise ConfigError(f"{prefix}.{field}={v!r}: expected a number in [0, 1)")


def check_bool(prefix: str, s, field: str) -> None:
    if not isinstance(s[field], bool):
        raise ConfigError(f"{prefix}.{field}={s[field]!r}: expected True or False")


def check_dtype(model_config) -> None:
    dtype = model_config.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"config.model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")


def merged(cls, section_config, extra=()) -> ml_collections.ConfigDict:
    """`cls`'s defaults overridden by the section's fields (after `check_keys`)."""
    fields = {**module_fields(cls), **{k: section_config[k] for k in section_config}}
    return ml_collections.ConfigDict({k: v for k, v in fields.items() if k not in extra})


def validate_discriminator(d_config, image_size: int) -> None:
    """Checks `config.model.discriminator` for `image_size`-pixel inputs."""
    prefix = "config.model.discriminator"
    check_keys(prefix, d_config, module_fields(MultiScaleDiscriminator))
    d = merged(MultiScaleDiscriminator, d_config)
    for field in ("num_scales", "base_channels", "num_layers"):
        check_int(prefix, d, field)
    check_int(prefix, d, "padding", lo=0)
    check_choice(prefix, d, "norm", NORMS)
    size = image_size
    for _ in range(d.num_scales - 1):
        size = pooled_size(size)
    out = patch_output_size(size, d.num_layers, d.padding)
    if out < 1:
        raise ConfigError(
            f"{prefix}: the coarsest of num_scales={d.num_scales} scales is {size} px, too "
            f"small for num_layers={d.num_layers} with padding={d.padding} (no logit left); "
            f"use fewer scales or layers, or larger images (config.data.image_size={image_size})"
        )


def validate(config) -> None:
    """Checks `config.model` against `config.data.image_size` before anything compiles."""
    m = config.model
    check_keys("config.model", m, ("name", "dtype", "generator", "discriminator"))
    check_dtype(m)
    size = config.data.image_size
    prefix = "config.model.generator"
    kind = m.generator.get("kind", "unet")
    if kind not in GENERATORS:
        raise ConfigError(f"{prefix}.kind={kind!r}: expected one of {sorted(GENERATORS)}")
    cls = GENERATORS[kind]
    check_keys(prefix, m.generator, (*module_fields(cls), "kind"))
    g = merged(cls, m.generator, extra=("kind",))
    for field in ("out_channels", "base_channels"):
        check_int(prefix, g, field)
    check_choice(prefix, g, "norm", NORMS)
    check_rate(prefix, g, "dropout_rate")
    if kind == "unet":
        check_int(prefix, g, "num_downs")
        check_int(prefix, g, "num_dropout_blocks", lo=0, hi=g.num_downs - 1)
        check_bool(prefix, g, "dropout_at_test")
        factor, what = 2**g.num_downs, f"num_downs={g.num_downs}"
    else:
        check_int(prefix, g, "num_downsampling")
        check_int(prefix, g, "num_res_blocks", lo=0)
        check_choice(prefix, g, "upsample", ("transpose", "nearest"))
        factor, what = 2**g.num_downsampling, f"num_downsampling={g.num_downsampling}"
        if size < 2 * factor:
            raise ConfigError(
                f"config.data.image_size={size} leaves a bottleneck under 2 x 2 after "
                f"{prefix}.{what}; use images of at least {2 * factor} px or fewer down-samplings"
            )
    if size % factor:
        raise ConfigError(
            f"config.data.image_size={size} is not a multiple of {factor}, the down-sampling of "
            f"{prefix}.{what}; use a multiple of {factor}"
        )
    validate_discriminator(m.discriminator, size)
