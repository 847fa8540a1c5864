"""SPADE / GauGAN (Park et al. 2019): a generator driven by a semantic label map. NHWC.

- `SPADEResBlock`: SPADE -> LeakyReLU(0.2) -> 3x3 conv, twice (the middle width is the
  smaller of input and output), plus a shortcut that is the identity, or SPADE -> 1x1 conv
  (no bias) when the width changes.
- `SPADEGenerator`: from a latent z (dense to a 16 x base_channels grid, `use_vae`) or from
  the label map resized to that grid (3x3 conv), then blocks at 16, 16, 16, 8, 4, 2, 1 x base
  with nearest x2 up-sampling between them, LeakyReLU, 3x3 conv and tanh. The grid is the
  image over 2^num_upsampling_layers: 5, 6 and 7 are GauGAN's 'normal', 'more' and 'most'
  (an extra up-sampling before the second middle block, and a last block at base / 2).
- `StyleEncoder`: GauGAN's VAE image encoder, 3x3 stride-2 convs (instance norm, LeakyReLU)
  to mu and log-variance; `reparameterize` and `kl_divergence` go with it.
- The discriminator is pix2pix.MultiScaleDiscriminator on (image, one-hot label map): two
  scales of 4 stride-2-or-1 4x4 conv layers padded by 2 (GauGAN's n_layers_D=4 counts the
  convs before the last, so it is num_layers=3 here).

Label maps enter as int ids [B, H, W] (`one_hot_labels`; ids are checked on the host when
they are concrete, inside jit an id >= num_classes one-hots to all zeros) or as a float map
[B, H, W, num_classes]. The image size is read from the label map.

Differences from GauGAN's code: SPADE normalises with parameter-free instance norm instead of
synchronised BatchNorm (`nn.gan_layers.SPADE`); no spectral norm anywhere; kernels start at
Flax's LeCun normal rather than Xavier with gain 0.02; the style encoder works at the training
resolution instead of resizing every image to 256 px (its dense layers' input width is fixed
by that resolution). Logical names: conv kernels CONV_AXES, the z dense (embed, mlp), the
encoder's heads (mlp, embed), biases (vector).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genctl_jax.errors import ConfigError
from genctl_jax.models.gan import pix2pix
from genctl_jax.models.gan.pix2pix import GanNetworks, MultiScaleDiscriminator
from genctl_jax.nn.blocks import strided_conv, upsample_nearest
from genctl_jax.nn.gan_layers import SPADE, instance_norm, resize_nearest
from genctl_jax.nn.layers import constrain_image, conv, dense

UPSAMPLING_LAYERS = (5, 6, 7)  # GauGAN's 'normal', 'more', 'most'.
SPADE_NORMS = ("instance", "group")


def one_hot_labels(labels, num_classes: int, dtype=jnp.float32):
    """[B, H, W] int ids -> [B, H, W, num_classes] one-hot; a [B, H, W, num_classes] map as is.

    Concrete ids (numpy, or a jax array outside jit that this host holds whole) must lie in
    [0, num_classes), else a ValueError; traced ids are not checked and one outside that range
    one-hots to zeros.
    """
    shape = tuple(labels.shape)
    if len(shape) == 4:
        if shape[-1] != num_classes:
            raise ValueError(
                f"label map has shape {shape}; a float map needs num_classes={num_classes} channels"
            )
        return jnp.asarray(labels, dtype)
    if len(shape) != 3 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels have shape {shape} and dtype {labels.dtype}; expected int ids [B, H, W] "
            f"or a float map [B, H, W, {num_classes}]"
        )
    if not isinstance(labels, jax.core.Tracer) and getattr(labels, "is_fully_addressable", True):
        ids = np.asarray(labels)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"label ids span [{lo}, {hi}]; expected 0 <= id < num_classes={num_classes} "
                f"(count a 'don't care' id among the classes)"
            )
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)


class SPADEResBlock(nn.Module):
    """GauGAN's residual block: x [B, H, W, C], label map [B, Hm, Wm, L] -> [B, H, W, features]."""

    features: int  # Output channels.
    spade_hidden: int = 128  # Width of each SPADE's shared conv on the label map.
    spade_norm: str = "instance"  # SPADE's parameter-free norm: 'instance' or 'group'.
    negative_slope: float = 0.2  # LeakyReLU slope after each SPADE (0: ReLU).
    dtype: jnp.dtype = jnp.float32  # Conv compute dtype; SPADE norms float32.

    @nn.compact
    def __call__(self, x, label_map):
        c_in, dt = x.shape[-1], self.dtype
        middle = min(c_in, self.features)
        spade = functools.partial(SPADE, norm=self.spade_norm, hidden=self.spade_hidden, dtype=dt)

        def act(h):
            return nn.leaky_relu(h, self.negative_slope)

        if c_in != self.features:
            shortcut = spade(name="norm_s")(x, label_map)
            shortcut = conv(self.features, 1, use_bias=False, dtype=dt, name="conv_s")(shortcut)
        else:
            shortcut = x.astype(dt)
        h = conv(middle, 3, dtype=dt, name="conv_0")(act(spade(name="norm_0")(x, label_map)))
        h = conv(self.features, 3, dtype=dt, name="conv_1")(act(spade(name="norm_1")(h, label_map)))
        return constrain_image(shortcut + h)


class SPADEGenerator(nn.Module):
    """labels [B, H, W] int ids (or a [B, H, W, num_classes] map), z [B, z_dim] with use_vae ->
    image [B, H, W, out_channels] in (-1, 1), float32.

    H and W must be multiples of 2^num_upsampling_layers. With use_vae and z=None, z is drawn
    N(0, I) from the 'latent' rng stream (sampling); without use_vae, z must be None.
    Params: `fc` (dense or conv), blocks `head_0`, `middle_0`, `middle_1`, `up_0`...`up_3`
    (`up_4` for 7 up-samplings), `conv_img`.
    """

    num_classes: int = 151  # Label channels (ADE20K: 150 classes + "don't care").
    out_channels: int = 3  # Image channels.
    base_channels: int = 64  # GauGAN's ngf; the first blocks are 16 x it wide.
    num_upsampling_layers: int = 5  # 5, 6 or 7 ('normal', 'more', 'most').
    use_vae: bool = False  # Start from z (StyleEncoder / N(0, I)) instead of the label map.
    z_dim: int = 256  # Latent width with use_vae.
    spade_hidden: int = 128  # Width of each SPADE's shared conv.
    spade_norm: str = "instance"  # SPADE's parameter-free norm: 'instance' or 'group'.
    negative_slope: float = 0.2  # LeakyReLU slope in the blocks and before conv_img.
    dtype: jnp.dtype = jnp.float32  # Conv compute dtype; params and norms float32.

    def blocks(self) -> list[tuple[str, int, bool]]:
        """(name, width, up-sample before) for every SPADEResBlock, in order."""
        nf, n = self.base_channels, self.num_upsampling_layers
        plan = [("head_0", 16 * nf, False), ("middle_0", 16 * nf, True)]
        plan.append(("middle_1", 16 * nf, n >= 6))
        plan += [(f"up_{i}", nf * 2 ** (3 - i), True) for i in range(4)]
        if n == 7:
            plan.append(("up_4", nf // 2, True))
        return plan

    @nn.compact
    def __call__(self, labels, z=None):
        n, dt = self.num_upsampling_layers, self.dtype
        if n not in UPSAMPLING_LAYERS:
            raise ValueError(
                f"SPADEGenerator.num_upsampling_layers={n}: expected one of {UPSAMPLING_LAYERS}"
            )
        label_map = one_hot_labels(labels, self.num_classes, dt)
        b, height, width = label_map.shape[:3]
        factor = 2**n
        if height % factor or width % factor:
            raise ValueError(
                f"SPADEGenerator: label map {height} x {width} is not a multiple of "
                f"2^num_upsampling_layers = {factor}"
            )
        grid = (height // factor, width // factor)
        top = 16 * self.base_channels

        if self.use_vae:
            if z is None:
                z = jax.random.normal(self.make_rng("latent"), (b, self.z_dim), jnp.float32)
            if z.shape != (b, self.z_dim):
                raise ValueError(f"z has shape {z.shape}; expected [{b}, {self.z_dim}]")
            h = dense(top * grid[0] * grid[1], ("embed", "mlp"), dtype=dt, name="fc")(z)
            h = h.reshape(b, *grid, top)
        else:
            if z is not None:
                raise ValueError("z given to a SPADEGenerator without use_vae; pass z=None")
            h = conv(top, 3, dtype=dt, name="fc")(resize_nearest(label_map, grid))
        h = constrain_image(h)

        for name, features, up in self.blocks():
            if up:
                h = upsample_nearest(h)
            block = SPADEResBlock(
                features, self.spade_hidden, self.spade_norm, self.negative_slope, dt, name=name
            )
            h = block(h, label_map)
        h = nn.leaky_relu(h, self.negative_slope)
        h = conv(self.out_channels, 3, dtype=dt, name="conv_img")(h)
        return jnp.tanh(h.astype(jnp.float32))


class StyleEncoder(nn.Module):
    """GauGAN's image encoder: image [B, H, W, C] -> (mu, logvar), each [B, z_dim] float32.

    `num_layers` 3x3 stride-2 convs (padding 1) of widths min(2^i, 8) x base, each instance
    normalised with LeakyReLU 0.2 between them, flattened into two dense heads. GauGAN uses 6
    at 256 px (a 4 x 4 map); the heads' input width fixes the resolution at init.
    """

    z_dim: int = 256  # Latent width (the generator's z_dim).
    base_channels: int = 64  # Width of the first conv (GauGAN's ndf).
    num_layers: int = 6  # Stride-2 convs.
    dtype: jnp.dtype = jnp.float32  # Conv compute dtype; params and norms float32.

    @nn.compact
    def __call__(self, image):
        h = image.astype(self.dtype)
        for i in range(self.num_layers):
            if i > 0:
                h = nn.leaky_relu(h, 0.2)
            width = self.base_channels * min(2**i, pix2pix.MAX_MULT)
            h = strided_conv(width, dtype=self.dtype, name=f"conv_{i}")(h)
            h = constrain_image(instance_norm(h).astype(self.dtype))
        h = nn.leaky_relu(h, 0.2).reshape(h.shape[0], -1)
        mu = dense(self.z_dim, ("mlp", "embed"), dtype=self.dtype, name="fc_mu")(h)
        logvar = dense(self.z_dim, ("mlp", "embed"), dtype=self.dtype, name="fc_logvar")(h)
        return mu.astype(jnp.float32), logvar.astype(jnp.float32)


def reparameterize(rng, mu, logvar):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) from `rng`."""
    eps = jax.random.normal(rng, mu.shape, jnp.float32)
    return mu + jnp.exp(0.5 * logvar) * eps


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent, averaged over the batch.

    -0.5 * mean_b sum_d (1 + logvar - mu^2 - exp(logvar)). GauGAN's KLDLoss also sums over
    its per-GPU batch, so its lambda_kld = 0.05 corresponds to 0.05 x that batch here.
    """
    mu, logvar = jnp.asarray(mu, jnp.float32), jnp.asarray(logvar, jnp.float32)
    per_sample = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)
    return jnp.mean(per_sample)


# ------------------------------------------------------------------ configs


def default_config() -> ml_collections.ConfigDict:
    """GauGAN at 256 px: base 64, 'normal' up-sampling, no VAE, 2-scale discriminator.

    Sections `generator` (SPADEGenerator's fields), `discriminator` (MultiScaleDiscriminator's)
    and `encoder` (StyleEncoder's but z_dim, which is the generator's; used with use_vae).
    """
    m = ml_collections.ConfigDict()
    m.name = "spade"
    m.dtype = "float32"  # Compute dtype of all networks; params float32.
    m.generator = pix2pix.section(SPADEGenerator)
    m.discriminator = pix2pix.section(MultiScaleDiscriminator, num_scales=2, padding=2)
    encoder = pix2pix.module_fields(StyleEncoder)
    del encoder["z_dim"]
    m.encoder = ml_collections.ConfigDict(encoder)
    return m


def tiny_config(use_vae: bool = False) -> ml_collections.ConfigDict:
    """A tiny GauGAN for tests: 64 px (a 2 x 2 grid), 5 classes, base 4, SPADE hidden 16."""
    m = default_config()
    m.generator.update(num_classes=5, base_channels=4, spade_hidden=16, use_vae=use_vae, z_dim=16)
    m.discriminator.update(base_channels=8, num_layers=2)
    m.encoder.update(base_channels=4, num_layers=4)
    return m


def from_config(model_config) -> GanNetworks:
    """GanNetworks(generator, discriminator, encoder or None) from `config.model`."""
    dtype = model_config.get("dtype", "float32")
    g = pix2pix.build_section(SPADEGenerator, model_config.generator, dtype)
    d = pix2pix.build_section(MultiScaleDiscriminator, model_config.discriminator, dtype)
    encoder = None
    if g.use_vae:
        e = dict(model_config.get("encoder", {}))
        encoder = pix2pix.build_section(StyleEncoder, {**e, "z_dim": g.z_dim}, dtype)
    return GanNetworks(g, d, encoder)


def validate(config) -> None:
    """Checks `config.model` against `config.data.image_size` before anything compiles."""
    m = config.model
    sections = ("name", "dtype", "generator", "discriminator", "encoder")
    pix2pix.check_keys("config.model", m, sections)
    pix2pix.check_dtype(m)
    size = config.data.image_size

    prefix = "config.model.generator"
    pix2pix.check_keys(prefix, m.generator, pix2pix.module_fields(SPADEGenerator))
    g = pix2pix.merged(SPADEGenerator, m.generator)
    for field in ("num_classes", "out_channels", "base_channels", "z_dim", "spade_hidden"):
        pix2pix.check_int(prefix, g, field)
    if g.num_upsampling_layers not in UPSAMPLING_LAYERS:
        raise ConfigError(
            f"{prefix}.num_upsampling_layers={g.num_upsampling_layers!r}: expected one of "
            f"{UPSAMPLING_LAYERS} (GauGAN's 'normal', 'more', 'most')"
        )
    if g.num_upsampling_layers == 7 and g.base_channels < 2:
        raise ConfigError(
            f"{prefix}.base_channels={g.base_channels}: 7 up-samplings end at base_channels / 2 "
            f"channels; use base_channels >= 2"
        )
    pix2pix.check_bool(prefix, g, "use_vae")
    pix2pix.check_choice(prefix, g, "spade_norm", SPADE_NORMS)
    if not isinstance(g.negative_slope, int | float) or not 0.0 <= g.negative_slope < 1.0:
        raise ConfigError(f"{prefix}.negative_slope={g.negative_slope!r}: expected 0 <= s < 1")
    factor = 2**g.num_upsampling_layers
    if size % factor:
        raise ConfigError(
            f"config.data.image_size={size} is not a multiple of {factor}, the up-sampling of "
            f"{prefix}.num_upsampling_layers={g.num_upsampling_layers}; use a multiple of "
            f"{factor}"
        )

    prefix = "config.model.encoder"
    encoder_fields = dict(pix2pix.module_fields(StyleEncoder))
    del encoder_fields["z_dim"]
    enc = m.get("encoder", ml_collections.ConfigDict())
    pix2pix.check_keys(prefix, enc, encoder_fields)
    e = ml_collections.ConfigDict({**encoder_fields, **{k: enc[k] for k in enc}})
    for field in ("base_channels", "num_layers"):
        pix2pix.check_int(prefix, e, field)
    if g.use_vae and size % 2**e.num_layers:
        raise ConfigError(
            f"config.data.image_size={size} is not a multiple of 2^{prefix}.num_layers = "
            f"{2**e.num_layers}; use fewer encoder layers or another image size"
        )
    pix2pix.validate_discriminator(m.discriminator, size)
