"""What the denoiser predicts: eps, x0 or v, and the loss weights across timesteps.

With a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t) and x_t = a x0 + s eps:

- `eps`: the noise;         x0 = (x_t - s eps) / a.
- `x0`:  the clean sample;  eps = (x_t - a x0) / s.
- `v`:   v = a eps - s x0;  x0 = a x_t - s v,  eps = s x_t + a v   (a^2 + s^2 = 1).

A training loss composes the pieces, e.g.

    target = training_target(ptype, x0, eps, t, schedule)
    mse = mean((model_output - target)^2 over H, W, C)             # [B]
    loss = mean(loss_weight(kind, ptype, snr(schedule, t), gamma) * mse)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genctl_jax.diffusion.schedules import LOSS_WEIGHTINGS, PREDICTION_TYPES, Schedule, gather
from genctl_jax.errors import ConfigError


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type={prediction_type!r}: expected one of "
            f"{', '.join(map(repr, PREDICTION_TYPES))}"
        )


def _scales(schedule: Schedule, t, ndim: int) -> tuple[jax.Array, jax.Array]:
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t): the tables q_sample uses.

    They were computed in float64; 1 - alpha_bar in float32 loses ~1e-3 of its value near
    t = 0 (alpha_bar_0 = 0.9999), which would make the conversions disagree with q_sample.
    """
    return (
        gather(schedule.sqrt_alphas_cumprod, t, ndim),
        gather(schedule.sqrt_one_minus_alphas_cumprod, t, ndim),
    )


def to_x0_and_eps(
    prediction_type: str, model_output: jax.Array, x_t: jax.Array, t, schedule: Schedule
) -> tuple[jax.Array, jax.Array]:
    """The (x0, eps) pair implied by a model output at x_t; t int32 [B] or a scalar.

    eps-prediction is undefined at SNR 0 (a zero-terminal-SNR last step): x0 is then
    inf/nan, which is why config validation refuses that combination.
    """
    _check(prediction_type)
    out = model_output.astype(jnp.float32)
    a, s = _scales(schedule, t, x_t.ndim)
    if prediction_type == "eps":
        return (x_t - s * out) / a, out
    if prediction_type == "x0":
        return out, (x_t - a * out) / s
    return a * x_t - s * out, a * out + s * x_t


def training_target(
    prediction_type: str, x0: jax.Array, eps: jax.Array, t, schedule: Schedule
) -> jax.Array:
    """What the model should output for x_t = q_sample(schedule, x0, t, eps).

    Also the inverse of `to_x0_and_eps`: the model output that implies (x0, eps).
    """
    _check(prediction_type)
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    a, s = _scales(schedule, t, x0.ndim)
    return a * eps - s * x0


def loss_weight(kind: str, prediction_type: str, snr: jax.Array, gamma: float = 5.0) -> jax.Array:
    """Per-example weight of the MSE measured in the model's own output space.

    `min_snr` (Hang et al. 2023) weights every timestep as min(SNR, gamma) times the MSE
    on x0. Since |eps err|^2 = SNR |x0 err|^2 and |v err|^2 = (SNR + 1) |x0 err|^2, the
    weight on the model-space MSE is min(SNR, gamma) / SNR for eps, min(SNR, gamma) /
    (SNR + 1) for v and min(SNR, gamma) for x0, so the three parameterisations optimise
    the same objective. At SNR = 0 (zero terminal SNR) the eps weight is its limit 1, the
    others 0; nothing is NaN. `uniform` is 1 everywhere.
    """
    _check(prediction_type)
    snr = jnp.asarray(snr, jnp.float32)
    if kind == "uniform":
        return jnp.ones_like(snr)
    if kind != "min_snr":
        raise ConfigError(
            f"loss_weighting={kind!r}: expected one of {', '.join(map(repr, LOSS_WEIGHTINGS))}"
        )
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "eps":
        # min(SNR, g) / SNR = g / max(SNR, g): the same value, but 1 rather than 0/0 at SNR 0.
        return gamma / jnp.maximum(snr, gamma)
    if prediction_type == "v":
        return clipped / (snr + 1.0)
    return clipped
