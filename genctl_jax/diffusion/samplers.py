"""DDPM and DDIM sampling: timestep spacings, single steps and the whole loop in one jit.

The step functions follow the conventions of `diffusers`' `DDPMScheduler.step` and
`DDIMScheduler.step` (tests compare whole trajectories with them), with these choices:

- A step goes from t to t_prev, the next entry of the timestep array (-1 after the last),
  where alpha_bar(-1) = 1 (diffusers' `set_alpha_to_one=True`). diffusers' DDIM instead
  jumps to t - T // num_steps, which is not the next timestep for `linspace` spacing or
  for `trailing` spacing when num_steps does not divide T; `ddim_step` takes t_prev
  explicitly, so either convention can be stepped.
- No noise is added on the last step (t_prev = -1). diffusers' DDPM adds noise whenever
  t > 0, which with `trailing` spacing and `fixed_large` variance adds noise of variance
  1 - alpha_bar_t to the final sample.
- DDIM re-derives eps from the clipped x0 (diffusers' `use_clipped_model_output=True`,
  as GLIDE does), so the step stays consistent with the x0 it used.
- The sample returned by `sample` is the last step's x0: clipped as `clip` says and not
  clipped otherwise (latents must not be clipped); convert images with clip to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genctl_jax.diffusion.prediction import to_x0_and_eps
from genctl_jax.diffusion.schedules import PREDICTION_TYPES, Schedule, gather
from genctl_jax.errors import ConfigError

SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("leading", "trailing", "linspace")
CLIPS = ("none", "static", "dynamic")
VARIANCES = ("fixed_small", "fixed_large")


def _one_of(field: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ConfigError(f"{field}={value!r}: expected one of {', '.join(map(repr, accepted))}")


# ----------------------------------------------------------------------------- timesteps


def timesteps(num_train_timesteps: int, num_steps: int, spacing: str) -> np.ndarray:
    """The descending int64 timesteps a sampler visits (diffusers' rules, steps_offset=0).

    - `leading`: 0, r, 2r, ... with r = T // num_steps (never reaches T - 1).
    - `trailing`: round(T - i * T / num_steps) - 1: starts at T - 1 (Lin et al. 2023).
      diffusers computes T - i * T / num_steps with np.arange, whose rounding decides
      some x.5 ties; we use the same arange, so the values are identical.
    - `linspace`: round(linspace(0, T - 1, num_steps)): both ends.
    """
    _one_of("spacing", spacing, SPACINGS)
    T, n = num_train_timesteps, num_steps
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= T:
        raise ConfigError(
            f"num_steps={n!r}: expected an integer in [1, {T}] (the number of training "
            f"timesteps T={T})"
        )
    if spacing == "leading":
        ts = np.arange(n) * (T // n)
    elif spacing == "trailing":
        # diffusers' exact float rule, rounding of x.5 ties included. Its arange sometimes
        # yields one extra value ~0 (t = -1, e.g. T=50, n=29); keeping n drops it.
        return (np.round(np.arange(T, 0, -T / n))[:n] - 1).astype(np.int64)
    else:
        ts = np.round(np.linspace(0, T - 1, n))
    return ts[::-1].astype(np.int64)


# ----------------------------------------------------------------------------- clipping


def clip_x0(
    x0: jax.Array, clip: str, percentile: float = 0.995, max_value: float = math.inf
) -> jax.Array:
    """Clips a predicted x0 [B, ...].

    - `none`: as is.
    - `static`: to [-1, 1].
    - `dynamic` (Imagen): per sample s = the `percentile` quantile of |x0| (linear
      interpolation), clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by
      s. diffusers' `thresholding=True` is this with `dynamic_thresholding_ratio` and
      `sample_max_value` (its default 1.0 makes s = 1, i.e. static clipping); Imagen has
      no upper bound (max_value = inf).
    """
    _one_of("clip", clip, CLIPS)
    if clip == "none":
        return x0
    if clip == "static":
        return jnp.clip(x0, -1.0, 1.0)
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.clip(jnp.quantile(flat, percentile, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


# ----------------------------------------------------------------------------- steps


def _alpha_bar_prev(schedule: Schedule, t_prev, ndim: int) -> jax.Array:
    """alpha_bar at t_prev, and 1 at t_prev < 0 (the clean end of the chain)."""
    t_prev = jnp.asarray(t_prev, jnp.int32)
    ab = gather(schedule.alphas_cumprod, jnp.maximum(t_prev, 0), ndim)
    is_final = t_prev.reshape(t_prev.shape + (1,) * (ndim - t_prev.ndim)) < 0
    return jnp.where(is_final, 1.0, ab)


def _not_last(t_prev, ndim: int) -> jax.Array:
    t_prev = jnp.asarray(t_prev, jnp.int32)
    return t_prev.reshape(t_prev.shape + (1,) * (ndim - t_prev.ndim)) >= 0


def ddpm_step(
    schedule: Schedule,
    x_t: jax.Array,
    model_output: jax.Array,
    t,
    t_prev,
    noise: jax.Array | None,
    *,
    prediction_type: str = "eps",
    variance: str = "fixed_small",
    clip: str = "none",
    dynamic_percentile: float = 0.995,
    dynamic_max_value: float = math.inf,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step x_t -> x_{t_prev}; returns (x_prev, predicted x0 after clipping).

    t, t_prev: int scalars or int32 [B]; t_prev = -1 on the last step. The mean is the
    posterior mean of q(x_prev | x_t, x0) at the clipped predicted x0. With
    b = 1 - alpha_bar_t / alpha_bar_prev (the beta of the whole jump), the variance is
    `fixed_small`: b (1 - alpha_bar_prev) / (1 - alpha_bar_t), clamped at 1e-20 as in
    diffusers, or `fixed_large`: b. `noise` ~ N(0, I) like x_t; none is added on the last
    step or when `noise` is None.
    """
    _one_of("variance", variance, VARIANCES)
    nd = x_t.ndim
    x_t = x_t.astype(jnp.float32)
    ab_t = gather(schedule.alphas_cumprod, t, nd)
    ab_prev = _alpha_bar_prev(schedule, t_prev, nd)
    x0, _ = to_x0_and_eps(prediction_type, model_output, x_t, t, schedule)
    x0 = clip_x0(x0, clip, dynamic_percentile, dynamic_max_value)

    alpha = ab_t / ab_prev
    beta = 1.0 - alpha
    mean = (jnp.sqrt(ab_prev) * beta / (1.0 - ab_t)) * x0 + (
        jnp.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab_t)
    ) * x_t
    if variance == "fixed_small":
        var = jnp.maximum((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20)
    else:
        var = beta
    if noise is None:
        return mean, x0
    std = jnp.where(_not_last(t_prev, nd), jnp.sqrt(var), 0.0)
    return mean + std * noise.astype(jnp.float32), x0


def ddim_step(
    schedule: Schedule,
    x_t: jax.Array,
    model_output: jax.Array,
    t,
    t_prev,
    noise: jax.Array | None,
    *,
    eta: float = 0.0,
    prediction_type: str = "eps",
    clip: str = "none",
    dynamic_percentile: float = 0.995,
    dynamic_max_value: float = math.inf,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step x_t -> x_{t_prev}; returns (x_prev, predicted x0 after clipping).

    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise, with
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)) (DDIM eq. 16):
    eta = 0 is deterministic, eta = 1 has DDPM's posterior variance. When x0 is clipped,
    eps is re-derived from the clipped x0. alpha_bar(t_prev < 0) = 1, so the last step
    returns x0 and adds no noise.
    """
    nd = x_t.ndim
    x_t = x_t.astype(jnp.float32)
    ab_t = gather(schedule.alphas_cumprod, t, nd)
    ab_prev = _alpha_bar_prev(schedule, t_prev, nd)
    x0, eps = to_x0_and_eps(prediction_type, model_output, x_t, t, schedule)
    if clip != "none":
        x0 = clip_x0(x0, clip, dynamic_percentile, dynamic_max_value)
        a = gather(schedule.sqrt_alphas_cumprod, t, nd)
        eps = (x_t - a * x0) / gather(schedule.sqrt_one_minus_alphas_cumprod, t, nd)

    sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))
    # max(., 0): at eta = 1 rounding can leave -1 ulp where the exact value is 0.
    direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
    x_prev = jnp.sqrt(ab_prev) * x0 + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise.astype(jnp.float32)
    return x_prev, x0


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How to sample; frozen and hashable, so it is a static argument under jit."""

    sampler: str = "ddim"  # 'ddpm' (ancestral) or 'ddim'.
    num_steps: int = 50  # Denoising steps, 1..T.
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like. Unused by 'ddpm'.
    spacing: str = "trailing"  # Timesteps: 'leading', 'trailing' or 'linspace'.
    guidance_scale: float = 1.0  # Classifier-free guidance w; 1 = conditional model only.
    clip: str = "static"  # Predicted x0: 'none', 'static' ([-1, 1]) or 'dynamic' (Imagen).
    dynamic_percentile: float = 0.995  # Quantile of |x0| for 'dynamic'.
    dynamic_max_value: float = math.inf  # Upper clamp of the 'dynamic' threshold.
    variance: str = "fixed_small"  # DDPM step variance: 'fixed_small' or 'fixed_large'.
    prediction_type: str = "eps"  # What the model outputs: 'eps', 'x0' or 'v'.

    def __post_init__(self):
        _check_fields(self)


def _check_fields(o: SamplerOptions, prefix: str = "config.sampling.") -> None:
    _one_of(prefix + "sampler", o.sampler, SAMPLERS)
    _one_of(prefix + "spacing", o.spacing, SPACINGS)
    _one_of(prefix + "clip", o.clip, CLIPS)
    _one_of(prefix + "variance", o.variance, VARIANCES)
    _one_of("config.diffusion.prediction_type", o.prediction_type, PREDICTION_TYPES)

    def number(field, ok, accepted):
        v = getattr(o, field)
        if isinstance(v, bool) or not isinstance(v, int | float) or not ok(v):
            raise ConfigError(f"{prefix}{field}={v!r}: expected {accepted}")

    n = o.num_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{prefix}num_steps={n!r}: expected an integer >= 1")
    number("eta", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1] (0 is deterministic DDIM)")
    number("guidance_scale", lambda v: v >= 0.0, "a number >= 0 (1 disables guidance)")
    number("dynamic_percentile", lambda v: 0.0 < v <= 1.0, "a quantile in (0, 1], e.g. 0.995")
    number("dynamic_max_value", lambda v: v >= 1.0, "a number >= 1 (inf: no upper bound)")


def validate_options(options: SamplerOptions, num_timesteps: int) -> None:
    """Checks options against a schedule of `num_timesteps` steps."""
    _check_fields(options)
    if options.num_steps > num_timesteps:
        raise ConfigError(
            f"config.sampling.num_steps={options.num_steps}: expected at most "
            f"config.diffusion.num_timesteps={num_timesteps}"
        )


def default_config() -> ml_collections.ConfigDict:
    """The `config.sampling` block (prediction_type comes from `config.diffusion`)."""
    c = ml_collections.ConfigDict()
    c.sampler = "ddim"  # 'ddpm' (ancestral) or 'ddim'.
    c.num_steps = 50  # Denoising steps, at most config.diffusion.num_timesteps.
    c.eta = 0.0  # DDIM noise in [0, 1]: 0 deterministic, 1 DDPM-like. Unused by 'ddpm'.
    c.spacing = "trailing"  # Timestep spacing: 'leading', 'trailing' or 'linspace'.
    c.guidance_scale = 1.0  # Classifier-free guidance w (>= 0); 1 disables it.
    c.clip = "static"  # Predicted x0: 'none' (latents), 'static' ([-1, 1]) or 'dynamic'.
    c.dynamic_percentile = 0.995  # 'dynamic': quantile of |x0| per sample (Imagen).
    c.dynamic_max_value = math.inf  # 'dynamic': upper clamp of the threshold (diffusers'
    # sample_max_value; inf is Imagen's rule, 1.0 reduces to 'static').
    c.variance = "fixed_small"  # DDPM variance: 'fixed_small' (posterior) or 'fixed_large'.
    return c


def options_from_config(
    sampling_config: ml_collections.ConfigDict, diffusion_config: ml_collections.ConfigDict
) -> SamplerOptions:
    """SamplerOptions from `config.sampling` and the model's `config.diffusion.prediction_type`."""
    s = sampling_config

    def num(v):  # 3 -> 3.0; anything else is left for the check to name.
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    return SamplerOptions(
        sampler=s.sampler,
        num_steps=s.num_steps,
        eta=num(s.eta),
        spacing=s.spacing,
        guidance_scale=num(s.guidance_scale),
        clip=s.clip,
        dynamic_percentile=num(s.dynamic_percentile),
        dynamic_max_value=num(s.dynamic_max_value),
        variance=s.variance,
        prediction_type=diffusion_config.prediction_type,
    )


def validate(
    sampling_config: ml_collections.ConfigDict, diffusion_config: ml_collections.ConfigDict
) -> None:
    """Checks `config.sampling` against `config.diffusion`; raises one ConfigError."""
    validate_options(
        options_from_config(sampling_config, diffusion_config), diffusion_config.num_timesteps
    )


# ----------------------------------------------------------------------------- the loop

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _interleave(a, b):
    """[B, ...] x 2 -> [2B, ...] as a0, b0, a1, b1, ...: each pair stays on its device."""
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def guided_output(
    model_fn: ModelFn, x: jax.Array, t, cond, uncond, guidance_scale: float
) -> jax.Array:
    """The (guided) model output at x, float32.

    guidance_scale == 1 runs the conditional model alone. Otherwise one forward on the
    doubled batch gives cond and uncond outputs, combined as u + w (c - u). The doubled
    batch interleaves the halves rather than concatenating them, so under batch sharding
    every example and its unconditional twin stay on the same device (a concatenation
    would move half the batch across devices twice per step).
    """
    n = x.shape[0]
    if guidance_scale == 1.0:
        return model_fn(x, jnp.full((n,), t, jnp.int32), cond).astype(jnp.float32)
    both = jax.tree.map(_interleave, cond, uncond)
    out = model_fn(_interleave(x, x), jnp.full((2 * n,), t, jnp.int32), both)
    out = out.astype(jnp.float32).reshape((n, 2) + out.shape[1:])
    c, u = out[:, 0], out[:, 1]
    return u + guidance_scale * (c - u)


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    key: jax.Array,
    noise_shape_or_initial_noise: Sequence[int] | jax.Array,
    options: SamplerOptions,
    cond: Any = None,
    uncond: Any = None,
) -> jax.Array:
    """Runs the whole denoising loop; returns the final x0 [B, ...] float32.

    `model_fn(x [B,...], t int32 [B], cond) -> output` in `options.prediction_type`.
    `cond`/`uncond`: arrays or pytrees of arrays with a leading batch axis. Both None is
    an unconditional model, for which guidance is a no-op; otherwise guidance_scale != 1
    needs both. Pure and jittable with `options` static.

    With k0, k1 = split(key), the start noise is normal(k0, shape) unless given, and step
    i's noise is normal(fold_in(k1, i)), so a key fixes the result. Sharded inputs stay
    sharded: nothing loops over or gathers the batch. A shape gives noise whose layout
    XLA picks; pass batch-sharded noise to pin it.
    """
    validate_options(options, schedule.num_timesteps)
    guidance_scale = options.guidance_scale
    if cond is None and uncond is None:
        guidance_scale = 1.0  # No condition: u + w (c - u) = c for every w.
    elif guidance_scale != 1.0 and (cond is None or uncond is None):
        raise ConfigError(
            f"config.sampling.guidance_scale={guidance_scale}: classifier-free guidance "
            f"needs both cond and uncond (got cond={'None' if cond is None else 'given'}, "
            f"uncond={'None' if uncond is None else 'given'}); pass the null condition as "
            "uncond or use guidance_scale=1"
        )
    init_key, step_key = jax.random.split(key)
    if isinstance(noise_shape_or_initial_noise, tuple | list):
        x = jax.random.normal(init_key, tuple(noise_shape_or_initial_noise), jnp.float32)
    else:
        x = jnp.asarray(noise_shape_or_initial_noise, jnp.float32)

    ts_np = timesteps(schedule.num_timesteps, options.num_steps, options.spacing)
    ts = jnp.asarray(ts_np, jnp.int32)
    ts_prev = jnp.asarray(np.append(ts_np[1:], -1), jnp.int32)
    clip_kw = dict(
        prediction_type=options.prediction_type,
        clip=options.clip,
        dynamic_percentile=options.dynamic_percentile,
        dynamic_max_value=options.dynamic_max_value,
    )
    stochastic = options.sampler == "ddpm" or options.eta > 0

    def body(i, x):
        t, t_prev = ts[i], ts_prev[i]
        out = guided_output(model_fn, x, t, cond, uncond, guidance_scale)
        noise = None
        if stochastic:
            noise = jax.random.normal(jax.random.fold_in(step_key, i), x.shape, jnp.float32)
        if options.sampler == "ddpm":
            x, _ = ddpm_step(
                schedule, x, out, t, t_prev, noise, variance=options.variance, **clip_kw
            )
        else:
            x, _ = ddim_step(schedule, x, out, t, t_prev, noise, eta=options.eta, **clip_kw)
        return x

    return jax.lax.fori_loop(0, len(ts_np), body, x)
