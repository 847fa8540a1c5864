"""StyleGAN2 inversion: find the latents that make the generator reproduce given images.

Two routes, both on a `stylegan2.Generator` and its params (a trained run's come from
`genctl_jax.trainers.saved_run.load(workdir).params['generator']`, its tracked average from
`...params['buffers']['w_avg']`):

- Optimisation (`invert_latent`): start every image at w_avg and run Adam on its latent so
  that G(latent) matches the image: pixel MSE, plus, optionally, a feature distance
  (`feature_fn`, e.g. CLIP image embeddings or any network's features) and a pull towards
  w_avg. space='w' optimises one w per image, used by every layer (StyleGAN2's projector);
  space='w+' one w per layer (Abdal et al.'s Image2StyleGAN), which reaches more images but
  leaves the region the mapping network covers. The whole loop is one `jax.jit` (`lax.scan`).
- Encoder (`LatentEncoder`, `train_encoder`): a small conv net predicts W+ offsets from
  w_avg in one forward pass. It is trained on the generator's own samples, whose true ws
  are known, with reconstruction MSE ||G(E(x)) - x||^2 plus ||E(x) - w||^2 (`encoder_loss`).
  Its prediction is also a good `init` for `invert_latent`.

The generator's noise inputs are off throughout (`synthesize(..., deterministic=True)`):
StyleGAN2's projector optimises per-layer noise maps with a regulariser on them, which our
synthesis network does not take as inputs, so there is no noise to regularise. The
projector's other regulariser, noise added to the latent early in the optimisation
(`latent_noise`, decaying to 0 over the first `noise_ramp` of the steps), is available.

Images are NHWC float in [-1, 1] at the generator's resolution and channels; anything else
is refused with a `DataError` naming both shapes. Functions of images that carry params
(a CLIP tower) can be passed as `ParamFn(apply, params)`: jitted loops then take the
params as arguments instead of baking them into the program as constants.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from genctl_jax.errors import ConfigError, DataError
from genctl_jax.models.gan import stylegan2
from genctl_jax.nn.layers import constrain_image, conv, dense

SPACES = ("w", "w+")


# ------------------------------------------------------------------ functions of images


@dataclasses.dataclass(frozen=True)
class ParamFn:
    """A function of images with its params: `self(x) == apply(params, x)`.

    `apply` should be hashable and the same object from call to call (a module-level
    function, or a frozen dataclass of Flax modules) so that a jitted loop compiles once.
    """

    apply: Callable[[Any, jax.Array], Any]  # (params, images) -> features (any pytree).
    params: Any  # Passed to `apply`; traced, not baked in.

    def __call__(self, x):
        return self.apply(self.params, x)


@dataclasses.dataclass(frozen=True)
class _Plain:
    """A plain fn(x) in ParamFn's (params, x) form; hashed by the function."""

    fn: Callable[[jax.Array], Any]

    def __call__(self, params, x):
        del params
        return self.fn(x)


def split_fn(fn: Callable | ParamFn | None) -> tuple[Callable | None, Any]:
    """(apply(params, x), params) of a `ParamFn` or a plain fn(x) (params None); None -> None."""
    if fn is None:
        return None, None
    if isinstance(fn, ParamFn):
        return fn.apply, fn.params
    if not callable(fn):
        raise TypeError(f"expected a function of images or a ParamFn, got {type(fn).__name__}")
    return _Plain(fn), None


# ------------------------------------------------------------------ checks and helpers


def check_images(generator: stylegan2.Generator, images, what: str = "target_images") -> None:
    """Refuses anything but a non-empty float [B, res, res, img_channels] batch."""
    shape = tuple(getattr(images, "shape", ()))
    res, c = generator.resolution, generator.img_channels
    if len(shape) != 4 or shape[1:] != (res, res, c) or shape[0] == 0:
        raise DataError(
            f"{what} of shape {shape}: the generator makes {res}x{res} images with {c} "
            f"channels (resolution={res}, img_channels={c}); expected [batch, {res}, {res}, "
            f"{c}] with values in [-1, 1] (resize or convert the images first)"
        )
    if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating):
        raise DataError(
            f"{what} of dtype {jnp.asarray(images).dtype}: expected floats in [-1, 1] "
            f"(convert uint8 with x / 127.5 - 1)"
        )


def check_w_avg(generator: stylegan2.Generator, w_avg) -> jax.Array:
    """w_avg as a float32 [w_dim] array, or a DataError naming the shape."""
    w_avg = jnp.asarray(w_avg, jnp.float32)
    if w_avg.shape != (generator.w_dim,):
        raise DataError(
            f"w_avg of shape {w_avg.shape}: expected [{generator.w_dim}] (the generator's "
            f"w_dim), e.g. a run's params['buffers']['w_avg'] or `estimate_w_avg`"
        )
    return w_avg


def check_ws(generator: stylegan2.Generator, ws, what: str = "ws") -> jax.Array:
    """ws as float32 [B, num_ws, w_dim], or a DataError naming the shape."""
    ws = jnp.asarray(ws, jnp.float32)
    n, d = generator.num_ws, generator.w_dim
    if ws.ndim != 3 or ws.shape[1:] != (n, d) or ws.shape[0] == 0:
        raise DataError(
            f"{what} of shape {ws.shape}: expected [batch, {n}, {d}] (num_ws={n} for "
            f"resolution {generator.resolution}, w_dim={d})"
        )
    return ws


def synthesize(generator: stylegan2.Generator, gen_params, ws):
    """Images [B, res, res, C] of ws [B, num_ws, w_dim], with the noise inputs off."""
    return generator.apply({"params": gen_params}, ws, True, method="synthesize")


def random_ws(generator: stylegan2.Generator, gen_params, rng, n: int):
    """ws [n, num_ws, w_dim] of n fresh z (random labels for a class-conditional G)."""
    k_z, k_label = jax.random.split(rng)
    z = jax.random.normal(k_z, (n, generator.z_dim), jnp.float32)
    labels = None
    if generator.num_classes > 0:
        labels = jax.random.randint(k_label, (n,), 0, generator.num_classes)
    return generator.apply({"params": gen_params}, z, labels, method="map")


@functools.partial(jax.jit, static_argnames=("generator", "num_samples"))
def _mean_w(generator, gen_params, rng, num_samples):
    return jnp.mean(random_ws(generator, gen_params, rng, num_samples)[:, 0], axis=0)


def estimate_w_avg(
    generator: stylegan2.Generator, gen_params, rng, num_samples: int = 10_000
) -> jax.Array:
    """[w_dim] mean of the mapping's output over `num_samples` fresh z.

    For a generator without a tracked average (a trained run has `buffers['w_avg']`).
    """
    return _mean_w(generator, nn.unbox(gen_params), rng, num_samples)


def _mse(a, b):
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def _tree_mse(a, b):
    """Mean over leaves of each leaf's mean squared difference."""
    leaves = jax.tree.leaves(jax.tree.map(_mse, a, b))
    return sum(leaves) / len(leaves)


# ------------------------------------------------------------------ optimisation


class Inversion(NamedTuple):
    """What `invert_latent` returns."""

    ws: jax.Array  # [B, num_ws, w_dim] the found latents (rows equal for space='w').
    images: jax.Array  # [B, res, res, C] G(ws), noise off.
    losses: jax.Array  # [steps + 1] the loss before each update, then at the returned ws.


@functools.partial(
    jax.jit, static_argnames=("generator", "space", "steps", "feature_apply", "noisy")
)
def _invert(
    generator,
    gen_params,
    target,
    w_avg,
    init,
    rng,
    learning_rate,
    feature_weight,
    w_avg_weight,
    latent_noise,
    noise_ramp,
    feature_params,
    *,
    space,
    steps,
    feature_apply,
    noisy,
):
    num_ws = generator.num_ws
    expand = (lambda w: stylegan2.broadcast_ws(w, num_ws)) if space == "w" else (lambda w: w)
    target = target.astype(jnp.float32)
    target_features = None
    if feature_apply is not None:
        target_features = jax.lax.stop_gradient(feature_apply(feature_params, target))

    def loss_fn(latent, noise):
        ws = expand(latent + noise)
        images = synthesize(generator, gen_params, ws)
        loss = _mse(images, target)
        if feature_apply is not None:
            features = feature_apply(feature_params, images)
            loss = loss + feature_weight * _tree_mse(features, target_features)
        return loss + w_avg_weight * _mse(ws, jnp.broadcast_to(w_avg, ws.shape)), images

    optimizer = optax.adam(learning_rate)

    def body(carry, step):
        latent, opt_state = carry
        noise = jnp.zeros_like(latent)
        if noisy:
            ramp = jnp.maximum(0.0, 1.0 - step / jnp.maximum(noise_ramp * steps, 1e-8))
            scale = latent_noise * jnp.square(ramp)
            noise = scale * jax.random.normal(jax.random.fold_in(rng, step), latent.shape)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(latent, noise)
        updates, opt_state = optimizer.update(grads, opt_state, latent)
        return (optax.apply_updates(latent, updates), opt_state), loss

    carry = (init, optimizer.init(init))
    (latent, _), losses = jax.lax.scan(body, carry, jnp.arange(steps))
    final_loss, images = loss_fn(latent, jnp.zeros_like(latent))
    return expand(latent), images, jnp.append(losses, final_loss)


def invert_latent(
    generator: stylegan2.Generator,
    gen_params,
    target_images,
    *,
    w_avg,
    space: str = "w+",
    steps: int = 500,
    learning_rate: float = 0.05,
    rng=None,
    init=None,
    feature_fn: Callable | ParamFn | None = None,
    feature_weight: float = 0.0,
    w_avg_weight: float = 0.0,
    latent_noise: float = 0.0,
    noise_ramp: float = 0.75,
) -> Inversion:
    """Optimises latents so that G(latents) reproduces `target_images` (see module docstring).

    loss = mean (G(ws) - target)^2
           + feature_weight * mean (feature_fn(G(ws)) - feature_fn(target))^2
           + w_avg_weight * mean (ws - w_avg)^2

    target_images [B, res, res, C] in [-1, 1]; w_avg [w_dim] (the start, unless `init`);
    space 'w' (latent [B, w_dim], broadcast to every layer) or 'w+' ([B, num_ws, w_dim]);
    init: a start of that shape (e.g. a `LatentEncoder`'s prediction; for 'w', its mean over
    layers); feature_fn: images -> features (a pytree; a `ParamFn` to pass params as
    arguments), compared to the target's; latent_noise: std of Gaussian noise added to the
    latent, scaled by (1 - t / (noise_ramp * steps))^2 (needs `rng`). The loop is one jit:
    a new generator, `space`, `steps` or `feature_fn` compiles again; the rest is traced.
    """
    if space not in SPACES:
        raise ConfigError(f"space={space!r}: expected one of {', '.join(SPACES)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps={steps!r}: expected an integer >= 1")
    check_images(generator, target_images)
    target = jnp.asarray(target_images, jnp.float32)
    w_avg = check_w_avg(generator, w_avg)
    b, n, d = target.shape[0], generator.num_ws, generator.w_dim
    shape = (b, d) if space == "w" else (b, n, d)
    if init is None:
        init = jnp.broadcast_to(w_avg, shape)
    init = jnp.asarray(init, jnp.float32)
    if init.shape != shape:
        raise DataError(
            f"init of shape {init.shape}: space={space!r} for {b} images starts from "
            f"[{', '.join(map(str, shape))}]"
        )
    noisy = latent_noise > 0
    if noisy and rng is None:
        raise ConfigError(f"latent_noise={latent_noise}: needs rng, the key the noise comes from")
    feature_apply, feature_params = split_fn(feature_fn)
    ws, images, losses = _invert(
        generator,
        nn.unbox(gen_params),
        target,
        w_avg,
        init,
        jax.random.key(0) if rng is None else rng,
        jnp.float32(learning_rate),
        jnp.float32(feature_weight),
        jnp.float32(w_avg_weight),
        jnp.float32(latent_noise),
        jnp.float32(noise_ramp),
        feature_params,
        space=space,
        steps=steps,
        feature_apply=feature_apply,
        noisy=noisy,
    )
    return Inversion(ws, images, losses)


# ------------------------------------------------------------------ encoder


def _lrelu(x):
    return nn.leaky_relu(x, 0.2)


class LatentEncoder(nn.Module):
    """images [B, R, R, C] in [-1, 1], w_avg [w_dim] -> ws [B, num_ws, w_dim] = w_avg + offsets.

    A 3x3 conv, then stride-2 3x3 convs (leaky ReLU 0.2) down to 4x4 (stages past the end of
    `features` repeat its last width), a dense hidden layer and a dense layer to
    num_ws * w_dim offsets. That last layer starts at zero, so a fresh encoder predicts w_avg
    for every image: the baseline its training has to beat.
    """

    num_ws: int  # ws per image (the generator's num_ws).
    w_dim: int  # Width of each w.
    features: Sequence[int] = (32, 64, 128)  # Widths of conv_in, then each stride-2 stage.
    hidden: int = 256  # Width of the dense layer before the output.
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params and the output float32.

    @classmethod
    def for_generator(cls, generator: stylegan2.Generator, **fields) -> LatentEncoder:
        """An encoder predicting `generator`'s ws."""
        return cls(num_ws=generator.num_ws, w_dim=generator.w_dim, **fields)

    @nn.compact
    def __call__(self, images, w_avg):
        if images.ndim != 4 or images.shape[1] != images.shape[2]:
            raise DataError(f"images of shape {images.shape}: expected square NHWC [B, R, R, C]")
        width = lambda i: self.features[min(i, len(self.features) - 1)]
        x = _lrelu(conv(width(0), dtype=self.dtype, name="conv_in")(images.astype(self.dtype)))
        stage = 0
        while x.shape[1] > 4:
            stage += 1
            x = conv(width(stage), strides=2, dtype=self.dtype, name=f"down{stage}")(x)
            x = constrain_image(_lrelu(x))
        x = x.reshape(x.shape[0], -1)
        x = _lrelu(dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc")(x))
        offsets = dense(
            self.num_ws * self.w_dim,
            ("mlp", "embed"),
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros_init(),
            name="out",
        )(x)
        offsets = offsets.astype(jnp.float32).reshape(-1, self.num_ws, self.w_dim)
        return jnp.asarray(w_avg, jnp.float32) + offsets


def encoder_loss(
    encoder: LatentEncoder,
    encoder_params,
    generator: stylegan2.Generator,
    gen_params,
    images,
    w_avg,
    true_ws=None,
    *,
    latent_weight: float = 1.0,
    w_avg_weight: float = 0.0,
):
    """(loss, metrics) of an encoder on images (and, for G's samples, their true ws).

    loss = mean (G(E(x)) - x)^2 + latent_weight * mean (E(x) - true_ws)^2 [with true_ws]
           + w_avg_weight * mean (E(x) - w_avg)^2
    metrics: 'mse' (the reconstruction term), 'latent_mse' (with true_ws), 'w_avg_distance'.
    """
    ws = encoder.apply({"params": encoder_params}, images, w_avg)
    mse = _mse(synthesize(generator, gen_params, ws), images)
    distance = _mse(ws, jnp.broadcast_to(w_avg, ws.shape))
    loss = mse + w_avg_weight * distance
    metrics = {"mse": mse, "w_avg_distance": distance}
    if true_ws is not None:
        metrics["latent_mse"] = _mse(ws, true_ws)
        loss = loss + latent_weight * metrics["latent_mse"]
    return loss, metrics


class EncoderTraining(NamedTuple):
    """What `train_encoder` returns."""

    encoder: LatentEncoder
    params: Any  # The trained encoder params.
    losses: np.ndarray  # [steps] float32 training loss per step.


def train_encoder(
    generator: stylegan2.Generator,
    gen_params,
    *,
    w_avg,
    rng,
    steps: int = 1000,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    encoder: LatentEncoder | None = None,
    encoder_params=None,
    latent_weight: float = 1.0,
    w_avg_weight: float = 0.0,
    mixing_prob: float = 0.0,
) -> EncoderTraining:
    """Trains a `LatentEncoder` on the generator's own samples (noise off) with Adam.

    Each step draws batch_size fresh z (key fold_in(rng, step)), maps them to ws (with
    `mixing_prob`, style-mixed with a second z's ws, so the encoder also sees W+ latents),
    renders them and takes one step on `encoder_loss` with the true ws. The generator is not
    trained. encoder: default `LatentEncoder.for_generator(generator)`; encoder_params: to go on
    training (default: a fresh init from rng).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps={steps!r}: expected an integer >= 1")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected an integer >= 1")
    gen_params = nn.unbox(gen_params)
    w_avg = check_w_avg(generator, w_avg)
    encoder = encoder or LatentEncoder.for_generator(generator)
    if (encoder.num_ws, encoder.w_dim) != (generator.num_ws, generator.w_dim):
        raise ConfigError(
            f"encoder predicts {encoder.num_ws} ws of width {encoder.w_dim}; the generator "
            f"takes num_ws={generator.num_ws}, w_dim={generator.w_dim}"
        )
    init_key, rng = jax.random.split(rng)
    if encoder_params is None:
        res, c = generator.resolution, generator.img_channels
        example = jnp.zeros((1, res, res, c), jnp.float32)
        encoder_params = jax.jit(encoder.init)(init_key, example, w_avg)["params"]
    encoder_params = nn.unbox(encoder_params)
    optimizer = optax.adam(learning_rate)

    def step(params, opt_state, gen_params, key):
        k_ws, k_mix, k_cross = jax.random.split(key, 3)
        ws = random_ws(generator, gen_params, k_ws, batch_size)
        if mixing_prob > 0:
            ws_mix = random_ws(generator, gen_params, k_mix, batch_size)
            ws = stylegan2.mix_styles(k_cross, ws, ws_mix, mixing_prob)
        images = synthesize(generator, gen_params, ws)
        loss_fn = lambda p: encoder_loss(
            encoder,
            p,
            generator,
            gen_params,
            images,
            w_avg,
            ws,
            latent_weight=latent_weight,
            w_avg_weight=w_avg_weight,
        )
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, encoder_params)  # The caller's params are not donated.
    opt_state = optimizer.init(params)
    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, gen_params, jax.random.fold_in(rng, i))
        losses.append(loss)
    return EncoderTraining(encoder, params, np.asarray(jnp.stack(losses), np.float32))


@functools.partial(jax.jit, static_argnames=("encoder", "generator"))
def _encode(encoder, encoder_params, generator, gen_params, images, w_avg):
    ws = encoder.apply({"params": encoder_params}, images, w_avg)
    return ws, synthesize(generator, gen_params, ws)


def encode(
    encoder: LatentEncoder,
    encoder_params,
    generator: stylegan2.Generator,
    gen_params,
    images,
    w_avg,
) -> tuple[jax.Array, jax.Array]:
    """(ws [B, num_ws, w_dim], G(ws) noise off) of images [B, res, res, C] in [-1, 1]."""
    check_images(generator, images, "images")
    return _encode(
        encoder,
        nn.unbox(encoder_params),
        generator,
        nn.unbox(gen_params),
        jnp.asarray(images, jnp.float32),
        check_w_avg(generator, w_avg),
    )
