"""GAN losses and regularisers as pure functions of logits, features and networks.

Adversarial losses take one discriminator's logits (any shape) and average over all
elements; a multiscale discriminator's caller combines the scales (pix2pixHD sums them, SPADE
averages). Regularisers return the bare expectation: the caller applies the weight
(gamma / 2 for R1, pl_weight for path length) and, when the regulariser runs lazily as a
`Phase(every=N)`, multiplies by N (`lazy_scale`) so its average strength per step is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------- adversarial losses


def nonsaturating_d(real_logits, fake_logits):
    """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))) = softplus(-real) + softplus(fake)."""
    real, fake = _f32(real_logits), _f32(fake_logits)
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def nonsaturating_g(fake_logits):
    """-log sigmoid(D(G(z))) = softplus(-fake): Goodfellow's non-saturating generator loss."""
    return jnp.mean(jax.nn.softplus(-_f32(fake_logits)))


def hinge_d(real_logits, fake_logits):
    """mean(relu(1 - real)) + mean(relu(1 + fake)) (SPADE, BigGAN)."""
    real, fake = _f32(real_logits), _f32(fake_logits)
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def hinge_g(fake_logits):
    """-mean(fake): the generator raises the critic's score, with no margin."""
    return -jnp.mean(_f32(fake_logits))


def lsgan_d(real_logits, fake_logits):
    """0.5 * (mean((real - 1)^2) + mean(fake^2)): targets 1 and 0, halved as pix2pixHD's D."""
    real, fake = _f32(real_logits), _f32(fake_logits)
    return 0.5 * (jnp.mean(jnp.square(real - 1.0)) + jnp.mean(jnp.square(fake)))


def lsgan_g(fake_logits):
    """mean((fake - 1)^2): target 1, not halved (pix2pixHD's G term)."""
    return jnp.mean(jnp.square(_f32(fake_logits) - 1.0))


class GanLoss(NamedTuple):
    """A pair of adversarial losses: d(real_logits, fake_logits) and g(fake_logits)."""

    d: Callable
    g: Callable


GAN_LOSSES = {
    "nonsaturating": GanLoss(nonsaturating_d, nonsaturating_g),
    "hinge": GanLoss(hinge_d, hinge_g),
    "lsgan": GanLoss(lsgan_d, lsgan_g),
}


def gan_losses(kind: str) -> GanLoss:
    """The (d, g) losses called `kind`; a ValueError lists the accepted kinds."""
    if kind not in GAN_LOSSES:
        raise ValueError(f"GAN loss {kind!r} is not known; expected one of {sorted(GAN_LOSSES)}")
    return GAN_LOSSES[kind]


# ------------------------------------------------------------------ reconstruction


def l1(a, b):
    """mean |a - b| in float32."""
    return jnp.mean(jnp.abs(_f32(a) - _f32(b)))


def feature_matching(real_features: Sequence[Sequence], fake_features: Sequence[Sequence]):
    """pix2pixHD's discriminator feature matching: mean over scales of mean over layers of L1.

    `*_features[scale][layer]` are intermediate discriminator maps (leave the logits out);
    real ones are constants (stop_gradient). pix2pixHD sums over layers (weight 4 / (n_layers
    + 1) = 1 each for its 4 maps per scale) where we average, so its lambda_feat = 10 is about
    10 * layers per scale here.
    """
    if len(real_features) != len(fake_features) or not real_features:
        raise ValueError(
            f"feature_matching: {len(real_features)} real and {len(fake_features)} fake "
            "scales; expected the same non-zero number"
        )
    per_scale = []
    for scale, (real, fake) in enumerate(zip(real_features, fake_features, strict=True)):
        if len(real) != len(fake) or not real:
            raise ValueError(
                f"feature_matching: scale {scale} has {len(real)} real and {len(fake)} fake "
                "layers; expected the same non-zero number"
            )
        layers = [l1(jax.lax.stop_gradient(r), f) for r, f in zip(real, fake, strict=True)]
        per_scale.append(sum(layers) / len(layers))
    return sum(per_scale) / len(per_scale)


# ------------------------------------------------------------------ regularisers


def r1_penalty(d_fn: Callable, real_images):
    """E_x ||grad_x D(x)||^2 on real images (Mescheder et al. 2018), before gamma / 2.

    `d_fn(images) -> logits` with one logit per sample ([B] or [B, 1]); the gradient is of the
    logits' sum, so a discriminator that mixes samples (minibatch std) adds its cross terms,
    as in StyleGAN2. The loss is `gamma / 2 * r1_penalty(...) * interval` for a lazy R1 phase.
    """
    logits, vjp = jax.vjp(d_fn, real_images)
    (grads,) = vjp(jnp.ones_like(logits))
    grads = _f32(grads).reshape(grads.shape[0], -1)
    return jnp.mean(jnp.sum(jnp.square(grads), axis=1))


def path_length_penalty(g_fn: Callable, w, rng, pl_mean, decay: float = 0.01):
    """StyleGAN2's path-length regulariser: (penalty, new_pl_mean, lengths).

    images = g_fn(w) with w [B, num_ws, w_dim] and images [B, H, W, C];
    y = jax.random.normal(rng, images.shape) / sqrt(H * W); g = J_w^T y (one vjp);
    lengths = sqrt(mean_ws(sum_wdim g^2)); new_pl_mean = pl_mean + decay * (mean(lengths) -
    pl_mean); penalty = mean((lengths - new_pl_mean)^2). As in the official code the penalty
    uses the updated mean, whose decay * mean(lengths) term carries gradient; the returned
    new_pl_mean is a stop-gradient state to carry to the next call. The caller multiplies by
    pl_weight (2) and the lazy interval, usually on a reduced batch.
    """
    images, vjp = jax.vjp(g_fn, w)
    h, wd = images.shape[1:3]
    y = jax.random.normal(rng, images.shape, images.dtype) / math.sqrt(h * wd)
    (grads,) = vjp(y)
    lengths = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(_f32(grads)), axis=2), axis=1))
    pl_mean = _f32(pl_mean)
    updated = pl_mean + decay * (jnp.mean(lengths) - pl_mean)
    penalty = jnp.mean(jnp.square(lengths - updated))
    return penalty, jax.lax.stop_gradient(updated), lengths


def lazy_scale(interval: int) -> float:
    """Factor on a regulariser that runs every `interval` steps (StyleGAN2's lazy reg.)."""
    if interval < 1:
        raise ValueError(f"lazy regularisation interval {interval}: expected an integer >= 1")
    return float(interval)


def lazy_adam_hparams(learning_rate: float, b1: float, b2: float, interval: int):
    """(lr, b1, b2) for a network whose loss also has a lazy regulariser every `interval` steps.

    StyleGAN2 updates such a network interval + 1 times per `interval` steps, so it shrinks
    Adam's settings by c = interval / (interval + 1): lr * c, b1^c, b2^c. interval=0: as given.
    """
    if interval == 0:
        return learning_rate, b1, b2
    c = interval / (interval + 1)
    return learning_rate * c, b1**c, b2**c


# ------------------------------------------------------------------ EMA


def ema_update(ema_params, params, decay):
    """decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def ema_decay_for(
    batch_size: int, half_life_kimg: float = 10.0, rampup: float | None = None, step=None
):
    """StyleGAN2-ADA's EMA decay: the average's half-life is `half_life_kimg` thousand images.

    decay = 0.5 ** (batch_size / half_life_images). With `rampup` (0.05 in ADA) the half-life
    is capped at rampup * images seen so far (step * batch_size), so early averages forget the
    random init quickly; `step` may be traced.
    """
    half_life = jnp.asarray(half_life_kimg * 1000.0, jnp.float32)
    if rampup is not None:
        if step is None:
            raise ValueError("ema_decay_for: rampup needs the current step")
        half_life = jnp.minimum(half_life, jnp.asarray(step, jnp.float32) * batch_size * rampup)
    return 0.5 ** (batch_size / jnp.maximum(half_life, 1e-8))


# ------------------------------------------------------------------ CLIP guidance


def directional_clip_loss(
    src_img_emb, tgt_img_emb, src_text_emb, tgt_text_emb, normalize: bool = True
):
    """StyleGAN-NADA's directional loss: mean_b 1 - cos(dI_b, dT), both directions unit length.

    dI = E_I(generated) - E_I(source generator's image), dT = E_T(target) - E_T(source);
    image embeddings [B, D], text embeddings [D] or [B, D]. `normalize` first puts every
    embedding on the unit sphere, as CLIP encoders are used in NADA.
    """
    embs = [_f32(e) for e in (src_img_emb, tgt_img_emb, src_text_emb, tgt_text_emb)]
    if normalize:
        embs = [_unit(e) for e in embs]
    src_img, tgt_img, src_text, tgt_text = embs
    d_img, d_text = _unit(tgt_img - src_img), _unit(tgt_text - src_text)
    return jnp.mean(1.0 - jnp.sum(d_img * d_text, axis=-1))


def _unit(x, eps: float = 1e-7):
    """x / (||x|| + eps) over the last axis (NADA's epsilon)."""
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def _f32(x):
    """x in float32 at least (bfloat16 up-cast; float64 under x64 kept)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
