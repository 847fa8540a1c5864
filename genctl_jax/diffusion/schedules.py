"""Noise schedules of discrete-time Gaussian diffusion and the forward process.

A schedule is the sequence beta_0..beta_{T-1}; everything else follows from it:
alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s, and
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), whose signal-to-noise
ratio is SNR(t) = alpha_bar_t / (1 - alpha_bar_t).

Schedules are computed in float64 numpy and stored as float32 arrays. The kinds follow
the definitions of `diffusers` (`linear`, `scaled_linear`, `squaredcos_cap_v2` = our
`cosine`, `rescale_betas_zero_snr`), so alphas_cumprod agree with its schedulers to
float32 precision (about 1e-6; diffusers takes the cumulative product in float32).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genctl_jax.errors import ConfigError

KINDS = ("linear", "cosine", "scaled_linear")
PREDICTION_TYPES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


@flax.struct.dataclass
class Schedule:
    """Per-timestep float32 tables [T]; pass it into jitted functions as a pytree."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array  # alpha_bar_t.
    sqrt_alphas_cumprod: jax.Array  # Scale of x_0 in x_t.
    sqrt_one_minus_alphas_cumprod: jax.Array  # Scale of the noise in x_t.
    num_timesteps: int = flax.struct.field(pytree_node=False)  # T, static under jit.


def make_schedule(
    kind: str,
    num_timesteps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
    zero_terminal_snr: bool = False,
) -> Schedule:
    """Builds a schedule.

    - `linear` (DDPM): betas evenly spaced from beta_start to beta_end.
    - `scaled_linear` (Stable Diffusion, with 0.00085 -> 0.012): evenly spaced in sqrt(beta).
    - `cosine` (improved DDPM): alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2) at
      u = t/T, betas = 1 - alpha_bar(u_{t+1}) / alpha_bar(u_t) clipped at max_beta
      (beta_start and beta_end are unused).
    - `zero_terminal_snr` (Lin et al. 2023): shift and scale sqrt(alpha_bar) so the last
      step is exactly 0 (pure noise) and the first is unchanged, then recompute betas.
    """
    if kind not in KINDS:
        raise ConfigError(f"schedule={kind!r}: expected one of {', '.join(map(repr, KINDS))}")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ConfigError(f"num_timesteps={num_timesteps!r}: expected an integer >= 2")
    n = num_timesteps
    if kind == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=np.float64) ** 2
    else:
        u = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((u + cosine_s) / (1.0 + cosine_s) * math.pi / 2) ** 2
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    if zero_terminal_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return _from_betas(betas)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    # Undo the cumulative product; the last alpha is 0, so the last beta is exactly 1.
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def _from_betas(betas: np.ndarray) -> Schedule:
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)

    def f32(a):
        return jnp.asarray(a, jnp.float32)

    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(alphas_cumprod),
        sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
        num_timesteps=len(betas),
    )


# ----------------------------------------------------------------------------- forward process


def gather(table: jax.Array, t, ndim: int) -> jax.Array:
    """table[t] shaped to broadcast over an NHWC batch of rank `ndim` (t: [B] or scalar)."""
    t = jnp.asarray(t, jnp.int32)
    values = table[t]
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise; t int32 [B] in [0, T-1]."""
    a = gather(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * x0 + s * noise


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """alpha_bar_t / (1 - alpha_bar_t), shaped like t; 0 at a zero-terminal-SNR last step.

    From the float64-made sqrt tables: 1 - alpha_bar in float32 is 2e-4 off at t = 0. The
    denominator never vanishes: alpha_bar_0 = 1 - beta_0 < 1 for every kind.
    """
    t = jnp.asarray(t, jnp.int32)
    return jnp.square(schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t])


# ----------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """The `config.diffusion` block: the forward process and the training objective."""
    c = ml_collections.ConfigDict()
    c.schedule = "linear"  # Betas: 'linear' (DDPM), 'cosine' (improved DDPM), 'scaled_linear' (SD).
    c.num_timesteps = 1000  # T, the number of training timesteps.
    c.beta_start = 1e-4  # First beta (linear, scaled_linear; SD uses 0.00085).
    c.beta_end = 0.02  # Last beta (linear, scaled_linear; SD uses 0.012).
    c.zero_terminal_snr = False  # Rescale so the last step is pure noise (use with 'v').
    c.prediction_type = "eps"  # Model output: 'eps' (noise), 'x0' (clean image) or 'v'.
    c.loss_weighting = "uniform"  # Per-example MSE weight: 'uniform' or 'min_snr' (min-SNR-gamma).
    c.min_snr_gamma = 5.0  # gamma of 'min_snr': the SNR above which weights are capped.
    return c


def validate(diffusion_config: ml_collections.ConfigDict) -> None:
    """Checks `config.diffusion`; raises one ConfigError naming the field."""
    d = diffusion_config

    def one_of(field, accepted):
        if d[field] not in accepted:
            raise ConfigError(
                f"config.diffusion.{field}={d[field]!r}: expected one of "
                f"{', '.join(map(repr, accepted))}"
            )

    one_of("schedule", KINDS)
    one_of("prediction_type", PREDICTION_TYPES)
    one_of("loss_weighting", LOSS_WEIGHTINGS)
    n = d.num_timesteps
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(
            f"config.diffusion.num_timesteps={d.num_timesteps!r}: expected an integer >= 2"
        )
    if d.schedule != "cosine":
        for field in ("beta_start", "beta_end"):
            v = d[field]
            if not isinstance(v, int | float) or not 0.0 < v < 1.0:
                raise ConfigError(f"config.diffusion.{field}={v!r}: expected a number in (0, 1)")
        if d.beta_start > d.beta_end:
            raise ConfigError(
                f"config.diffusion.beta_start={d.beta_start!r} is above beta_end="
                f"{d.beta_end!r}: expected beta_start <= beta_end"
            )
    if not isinstance(d.zero_terminal_snr, bool):
        raise ConfigError(
            f"config.diffusion.zero_terminal_snr={d.zero_terminal_snr!r}: expected True or False"
        )
    if d.zero_terminal_snr and d.prediction_type == "eps":
        # At SNR 0 the input holds no signal, so x0 cannot be recovered from predicted noise.
        raise ConfigError(
            "config.diffusion.prediction_type='eps' cannot be used with zero_terminal_snr=True "
            "(x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) is undefined at the last "
            "step); use prediction_type='v' (Lin et al. 2023) or 'x0'"
        )
    g = d.min_snr_gamma
    if isinstance(g, bool) or not isinstance(g, int | float) or not g > 0:
        raise ConfigError(
            f"config.diffusion.min_snr_gamma={g!r}: expected a number > 0 (5.0 in the paper)"
        )


def from_config(diffusion_config: ml_collections.ConfigDict) -> Schedule:
    """The schedule of `config.diffusion` (cosine uses s=0.008 and max_beta=0.999)."""
    d = diffusion_config
    return make_schedule(
        d.schedule,
        d.num_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        zero_terminal_snr=d.zero_terminal_snr,
    )
