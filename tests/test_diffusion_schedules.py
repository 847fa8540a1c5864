"""Noise schedules, the forward process and the parameterisations, against closed forms and
PyTorch `diffusers`."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from genctl_jax.diffusion import prediction, schedules
from genctl_jax.errors import ConfigError

T = 1000
SD = dict(beta_start=0.00085, beta_end=0.012)


def f64(a):
    return np.asarray(a, np.float64)


# ----------------------------------------------------------------------------- closed forms


def test_linear_schedule_closed_form():
    s = schedules.make_schedule("linear", T)
    betas = f64(s.betas)
    assert s.num_timesteps == T and s.betas.dtype == jnp.float32
    assert betas[0] == pytest.approx(1e-4, rel=1e-6)
    assert betas[-1] == pytest.approx(0.02, rel=1e-6)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-4)
    exact = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    np.testing.assert_allclose(f64(s.alphas), 1 - betas, atol=1e-7)
    np.testing.assert_allclose(f64(s.alphas_cumprod), exact, rtol=1e-6)
    # The DDPM schedule ends with SNR ~4e-5: alpha_bar_{T-1} = 4.0358e-5.
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-4)
    np.testing.assert_allclose(f64(s.sqrt_alphas_cumprod), np.sqrt(exact), rtol=1e-6)
    # Precomputed in float64: better than sqrt(1 - float32 alpha_bar) near t = 0.
    np.testing.assert_allclose(f64(s.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - exact), rtol=1e-6)


def test_scaled_linear_schedule_closed_form():
    s = schedules.make_schedule("scaled_linear", T, **SD)
    root = np.sqrt(f64(s.betas))
    assert root[0] == pytest.approx(math.sqrt(0.00085), rel=1e-6)
    assert root[-1] == pytest.approx(math.sqrt(0.012), rel=1e-6)
    np.testing.assert_allclose(
        np.diff(root), (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1), rtol=1e-3
    )


def test_cosine_schedule_closed_form():
    s = schedules.make_schedule("cosine", T)

    def alpha_bar(u, s_=0.008):
        return math.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2

    # alpha_bar_t of step t is the continuous alpha_bar at (t + 1) / T, relative to u = 0.
    for t in (0, 1, 10, 250, 500, 900, 990):
        expected = alpha_bar((t + 1) / T) / alpha_bar(0.0)
        assert float(s.alphas_cumprod[t]) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert float(s.betas.max()) == pytest.approx(0.999)  # The cap bites at the end.
    assert float(s.betas[-1]) == pytest.approx(0.999)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_closed_form(kind):
    kw = SD if kind == "scaled_linear" else {}
    base = schedules.make_schedule(kind, T, **kw)
    z = schedules.make_schedule(kind, T, zero_terminal_snr=True, **kw)
    assert float(z.alphas_cumprod[-1]) == 0.0  # Exactly: pure noise at the last step.
    assert float(z.betas[-1]) == 1.0
    assert float(schedules.snr(z, jnp.array([T - 1]))[0]) == 0.0
    # sqrt(alpha_bar) is an affine map of the original fixing the first value.
    old = np.sqrt(f64(base.alphas_cumprod))
    new = np.sqrt(f64(z.alphas_cumprod))
    assert new[0] == pytest.approx(old[0], rel=1e-6)
    np.testing.assert_allclose(new, (old - old[-1]) * old[0] / (old[0] - old[-1]), atol=2e-6)


def test_q_sample_and_snr_closed_form():
    s = schedules.make_schedule("linear", T)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    t = np.array([0, 500, 999], np.int32)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t][:, None, None, None]
    out = schedules.q_sample(s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(out), np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise, 1e-5)
    np.testing.assert_allclose(np.asarray(schedules.snr(s, t)), (ab / (1 - ab)).ravel(), 1e-5)


# ----------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize(
    "kind,theirs,kw",
    [
        ("linear", "linear", {}),
        ("scaled_linear", "scaled_linear", SD),
        ("cosine", "squaredcos_cap_v2", {}),
    ],
)
def test_schedule_matches_diffusers(kind, theirs, kw, zero_snr):
    ref = DDPMScheduler(
        num_train_timesteps=T, beta_schedule=theirs, rescale_betas_zero_snr=zero_snr, **kw
    )
    s = schedules.make_schedule(kind, T, zero_terminal_snr=zero_snr, **kw)
    # diffusers multiplies out alpha_bar in float32, we in float64: measured max 7.7e-7.
    np.testing.assert_allclose(
        np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6
    )
    if not zero_snr:
        np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(s.alphas), ref.alphas.numpy(), rtol=0, atol=1e-6)
    else:
        # diffusers rescales float32 betas in float32, and 1 - ab_t / ab_{t-1} of tiny
        # alpha_bars loses digits (7e-6 off); its rescaling run in float64 is exact.
        unscaled = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs, **kw).betas
        exact = rescale_zero_terminal_snr(unscaled.double()).numpy()
        np.testing.assert_allclose(np.asarray(s.betas), exact, rtol=0, atol=1e-6)
        assert ref.alphas_cumprod[-1].item() == float(s.alphas_cumprod[-1]) == 0.0


def test_q_sample_and_velocity_match_diffusers():
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD)
    s = schedules.make_schedule("scaled_linear", T, **SD)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)  # NCHW for torch.
    eps = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    t = np.array([0, 1, 517, 999])
    want_xt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t))
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t))
    nhwc = (0, 2, 3, 1)
    x0j, epsj = jnp.asarray(x0.transpose(nhwc)), jnp.asarray(eps.transpose(nhwc))
    xt = schedules.q_sample(s, x0j, jnp.asarray(t, jnp.int32), epsj)
    v = prediction.training_target("v", x0j, epsj, jnp.asarray(t, jnp.int32), s)
    np.testing.assert_allclose(np.asarray(xt), want_xt.numpy().transpose(nhwc), atol=1e-6)
    np.testing.assert_allclose(np.asarray(v), want_v.numpy().transpose(nhwc), atol=1e-6)


# ----------------------------------------------------------------------------- parameterisations


# Not eps with zero terminal SNR: x0 from eps is undefined at SNR 0 (validation refuses it).
@pytest.mark.parametrize(
    "ptype,zero_snr", [("eps", False), ("x0", False), ("v", False), ("x0", True), ("v", True)]
)
def test_parameterisation_round_trip(ptype, zero_snr):
    s = schedules.make_schedule("linear", T, zero_terminal_snr=zero_snr)
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(-1, 1, (6, 4, 4, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((6, 4, 4, 3)), jnp.float32)
    t = jnp.array([0, 1, 100, 500, 998, 999], jnp.int32)
    xt = schedules.q_sample(s, x0, t, eps)
    out = prediction.training_target(ptype, x0, eps, t, s)
    x0_back, eps_back = prediction.to_x0_and_eps(ptype, out, xt, t, s)
    # From eps, x0 = (x_t - s eps) / a amplifies float32 rounding by 1/a = 156 at t=999:
    # exact to 1e-5 up to t=500, and to 1e-5/a beyond.
    n = 4 if ptype == "eps" else 6
    np.testing.assert_allclose(np.asarray(x0_back)[:n], np.asarray(x0)[:n], atol=1e-5)
    np.testing.assert_allclose(np.asarray(x0_back), np.asarray(x0), atol=2e-3)
    np.testing.assert_allclose(np.asarray(eps_back), np.asarray(eps), atol=1e-5)
    # Each parameterisation converts to the others through (x0, eps).
    for other in ("eps", "x0", "v"):
        o = prediction.training_target(other, x0_back, eps_back, t, s)
        want = prediction.training_target(other, x0, eps, t, s)
        np.testing.assert_allclose(np.asarray(o)[:n], np.asarray(want)[:n], atol=1e-5)


def test_min_snr_weights_formula_and_zero_snr():
    gamma = 5.0
    snr = np.array([0.0, 1e-4, 0.5, 1.0, 4.99, 5.0, 5.01, 100.0, 1e4], np.float32)
    eps_w = prediction.loss_weight("min_snr", "eps", jnp.asarray(snr), gamma)
    v_w = prediction.loss_weight("min_snr", "v", jnp.asarray(snr), gamma)
    x0_w = prediction.loss_weight("min_snr", "x0", jnp.asarray(snr), gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        want_eps = np.where(snr > 0, np.minimum(snr, gamma) / snr, 1.0)  # limit 1 at SNR 0
    np.testing.assert_allclose(np.asarray(eps_w), want_eps, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v_w), np.minimum(snr, gamma) / (snr + 1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(x0_w), np.minimum(snr, gamma), rtol=1e-6)
    for w in (eps_w, v_w, x0_w):
        assert np.isfinite(np.asarray(w)).all()
    uniform = prediction.loss_weight("uniform", "v", jnp.asarray(snr), gamma)
    np.testing.assert_array_equal(np.asarray(uniform), np.ones_like(snr))


def test_min_snr_weights_give_one_objective_across_parameterisations():
    """weight x model-space MSE = min(SNR, gamma) x (x0 MSE) for every prediction type."""
    s = schedules.make_schedule("cosine", T)
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.uniform(-1, 1, (5, 4, 4, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((5, 4, 4, 3)), jnp.float32)
    t = jnp.array([3, 100, 400, 700, 950], jnp.int32)
    xt = schedules.q_sample(s, x0, t, eps)
    # A wrong model: its x0 is off by a fixed error; each parameterisation sees it differently.
    x0_hat = x0 + 0.1 * jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    snr = schedules.snr(s, t)
    x0_mse = jnp.mean((x0_hat - x0) ** 2, axis=(1, 2, 3))
    for ptype in ("eps", "x0", "v"):
        eps_hat = prediction.to_x0_and_eps("x0", x0_hat, xt, t, s)[1]
        out = prediction.training_target(ptype, x0_hat, eps_hat, t, s)
        target = prediction.training_target(ptype, x0, eps, t, s)
        mse = jnp.mean((out - target) ** 2, axis=(1, 2, 3))
        weighted = prediction.loss_weight("min_snr", ptype, snr, 5.0) * mse
        np.testing.assert_allclose(
            np.asarray(weighted), np.asarray(jnp.minimum(snr, 5.0) * x0_mse), rtol=2e-3
        )


# ----------------------------------------------------------------------------- config


def test_default_config_validates_and_builds():
    c = schedules.default_config()
    schedules.validate(c)
    s = schedules.from_config(c)
    assert s.num_timesteps == 1000
    np.testing.assert_array_equal(
        np.asarray(s.betas), np.asarray(schedules.make_schedule("linear").betas)
    )
    c.schedule, c.num_timesteps, c.zero_terminal_snr, c.prediction_type = "cosine", 64, True, "v"
    schedules.validate(c)
    assert float(schedules.from_config(c).alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize(
    "field,value,fragments",
    [
        ("schedule", "sigmoid", ["config.diffusion.schedule='sigmoid'", "'cosine'"]),
        ("prediction_type", "epsilon", ["prediction_type='epsilon'", "'eps', 'x0', 'v'"]),
        ("loss_weighting", "snr", ["loss_weighting='snr'", "'min_snr'"]),
        ("num_timesteps", 1, ["num_timesteps=1", ">= 2"]),
        ("beta_end", 1.5, ["beta_end=1.5", "(0, 1)"]),
        ("beta_start", 0.5, ["beta_start=0.5", "beta_end"]),
        ("min_snr_gamma", 0.0, ["min_snr_gamma=0.0", "> 0"]),
        ("zero_terminal_snr", True, ["prediction_type='eps'", "zero_terminal_snr", "'v'"]),
    ],
)
def test_bad_diffusion_config(field, value, fragments):
    c = schedules.default_config()
    c[field] = value
    with pytest.raises(ConfigError) as info:
        schedules.validate(c)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_direct_arguments():
    with pytest.raises(ConfigError, match="schedule='quadratic'"):
        schedules.make_schedule("quadratic")
    x = jnp.zeros((1, 2, 2, 1))
    s = schedules.make_schedule("linear", 10)
    with pytest.raises(ConfigError, match="prediction_type='epsilon'.*'eps', 'x0', 'v'"):
        prediction.to_x0_and_eps("epsilon", x, x, jnp.zeros((1,), jnp.int32), s)
    with pytest.raises(ConfigError, match="loss_weighting='p2'.*'uniform', 'min_snr'"):
        prediction.loss_weight("p2", "eps", jnp.ones((1,)), 5.0)
