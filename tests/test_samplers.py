"""DDPM / DDIM samplers against PyTorch `diffusers` step loops, guidance, keys and sharding."""

import dataclasses
import functools
import math
import re

import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from genctl_jax.diffusion import samplers, schedules
from genctl_jax.errors import ConfigError

T = 1000
SHAPE = (2, 8, 8, 3)  # NHWC; diffusers gets the NCHW transpose.
SD = dict(beta_start=0.00085, beta_end=0.012)
THEIR_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
THEIR_PTYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def nhwc(a):
    return a.numpy().transpose(0, 2, 3, 1)


def ideal_gain(alphas_cumprod, ptype, data_std):
    """Output = gain(t) * x_t is the exact denoiser for data ~ N(0, data_std^2): a model
    that keeps trajectories bounded, so differences measure the step maths."""
    ab = np.asarray(alphas_cumprod, np.float64)
    a, s, var = np.sqrt(ab), np.sqrt(1 - ab), data_std**2
    den = a * a * var + s * s
    return {"eps": s / den, "x0": a * var / den, "v": a * s * (1 - var) / den}[ptype].astype(
        np.float32
    )


def _make(kind, zero_snr=False):
    kw = SD if kind == "scaled_linear" else {}
    return schedules.make_schedule(kind, T, zero_terminal_snr=zero_snr, **kw), kw


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
    # (7, 6) has an x.5 rounding tie; at (50, 29) and (999, 13) diffusers' trailing arange
    # yields one timestep too many, -1, which we leave out; (1000, 1000) visits every step.
    pairs = [(1000, 1), (1000, 3), (1000, 10), (1000, 50), (1000, 999), (1000, 1000)]
    pairs += [(7, 6), (50, 29), (999, 13), (4000, 7)]
    extra = set()
    for num_train, n in pairs:
        ours = samplers.timesteps(num_train, n, spacing)
        assert len(ours) == n and (np.diff(ours) < 0).all() and ours.min() >= 0
        for cls in (DDIMScheduler, DDPMScheduler):
            ref = cls(num_train_timesteps=num_train, timestep_spacing=spacing)
            ref.set_timesteps(n)
            theirs = ref.timesteps.numpy()
            if len(theirs) == n + 1:
                assert spacing == "trailing" and theirs[-1] == -1
                extra.add((num_train, n))
                theirs = theirs[:n]
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{cls.__name__} {num_train} {n}")
    if spacing == "trailing":
        assert extra == {(50, 29), (999, 13)}
    assert samplers.timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert samplers.timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert samplers.timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]


def test_timesteps_reject_too_many_steps():
    with pytest.raises(ConfigError, match=r"num_steps=1001: expected an integer in \[1, 1000\]"):
        samplers.timesteps(1000, 1001, "leading")
    with pytest.raises(ConfigError, match="spacing='even'.*'leading', 'trailing', 'linspace'"):
        samplers.timesteps(1000, 10, "even")


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 1.5), (0.995, 1e6)])
def test_dynamic_threshold_matches_diffusers(ratio, max_value):
    rng = np.random.default_rng(0)
    # Per-sample scales put the quantile below 1, between 1 and 1.5, and above 1.5.
    x0 = rng.standard_normal((4, 8, 8, 3)) * np.array([0.2, 0.8, 1.2, 3.0])[:, None, None, None]
    x0 = x0.astype(np.float32)
    ref = DDPMScheduler(
        thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value
    )
    want = nhwc(ref._threshold_sample(nchw(x0)))
    got = samplers.clip_x0(jnp.asarray(x0), "dynamic", ratio, max_value)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
    if max_value == 1.0:  # diffusers' default sample_max_value makes it static clipping.
        np.testing.assert_array_equal(np.asarray(got), np.clip(x0, -1, 1))
    else:  # The wide samples (quantile > 1) are rescaled: not what static clipping gives.
        for i in (2, 3):
            assert np.abs(np.asarray(got)[i] - np.clip(x0[i], -1, 1)).max() > 0.05


# ----------------------------------------------------------------------------- step parity


def _trajectory_diff(
    sampler,
    kind,
    ptype,
    spacing,
    clip,
    *,
    variance="fixed_small",
    eta=0.0,
    zero_snr=False,
    dyn=(0.995, 1.0),
    data_std=0.5,
    num_steps=50,
    monkeypatch=None,
):
    """Max |ours - diffusers| along a trajectory fed the same model and the same noise."""
    rng = np.random.default_rng(0)
    ours, kw = _make(kind, zero_snr)
    config = dict(
        num_train_timesteps=T,
        beta_schedule=THEIR_KIND[kind],
        prediction_type=THEIR_PTYPE[ptype],
        clip_sample=clip == "static",
        thresholding=clip == "dynamic",
        dynamic_thresholding_ratio=dyn[0],
        sample_max_value=dyn[1],
        timestep_spacing=spacing,
        rescale_betas_zero_snr=zero_snr,
        **kw,
    )
    clip_kw = dict(
        prediction_type=ptype, clip=clip, dynamic_percentile=dyn[0], dynamic_max_value=dyn[1]
    )
    if sampler == "ddpm":
        ref = DDPMScheduler(variance_type=variance, **config)
        step = jax.jit(functools.partial(samplers.ddpm_step, variance=variance, **clip_kw))
    else:
        ref = DDIMScheduler(set_alpha_to_one=True, **config)
        step = jax.jit(functools.partial(samplers.ddim_step, eta=eta, **clip_kw))
    ref.set_timesteps(num_steps)
    ts = ref.timesteps.numpy()
    gain = ideal_gain(ours.alphas_cumprod, ptype, data_std)
    wobble = (0.1 * rng.standard_normal((len(ts), *SHAPE))).astype(np.float32)
    noise = rng.standard_normal((len(ts), *SHAPE)).astype(np.float32)
    if sampler == "ddpm" and ts[-1] > 0:
        # diffusers' DDPM adds noise whenever t > 0, so also on a trailing last step; we
        # add none there (see samplers' docstring).
        noise[-1] = 0.0

    def model(x, i, t):  # The same numpy function of each side's own x.
        return (gain[t] * x + wobble[i]).astype(np.float32)

    current = {"i": 0}
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, **k: nchw(noise[current["i"]]))
    x_ref = x_ours = rng.standard_normal(SHAPE).astype(np.float32)
    worst = 0.0
    for i, t in enumerate(ts):
        current["i"] = i
        out_ref, out_ours = model(x_ref, i, t), model(x_ours, i, t)
        if sampler == "ddpm":
            x_ref = nhwc(ref.step(nchw(out_ref), int(t), nchw(x_ref)).prev_sample)
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        else:
            res = ref.step(
                nchw(out_ref),
                int(t),
                nchw(x_ref),
                eta=eta,
                use_clipped_model_output=True,
                variance_noise=nchw(noise[i]),
            )
            x_ref = nhwc(res.prev_sample)
            t_prev = t - T // num_steps  # diffusers' DDIM rule (see samplers' docstring).
        x_ours, _ = step(ours, jnp.asarray(x_ours), out_ours, int(t), int(t_prev), noise[i])
        x_ours = np.asarray(x_ours)
        assert np.isfinite(x_ours).all()
        worst = max(worst, float(np.abs(x_ours - x_ref).max()))
    return worst


DDPM_CASES = [
    # kind, ptype, spacing, clip, variance, extra
    ("linear", "eps", "leading", "static", "fixed_small", {}),
    ("linear", "eps", "linspace", "none", "fixed_large", {}),
    ("linear", "v", "trailing", "none", "fixed_small", {}),
    ("linear", "v", "trailing", "static", "fixed_large", {}),
    ("cosine", "x0", "leading", "dynamic", "fixed_small", dict(dyn=(0.9, 1.5), data_std=1.5)),
    ("scaled_linear", "v", "trailing", "none", "fixed_small", dict(zero_snr=True)),
]


@pytest.mark.parametrize("kind,ptype,spacing,clip,variance,extra", DDPM_CASES)
def test_ddpm_trajectory_matches_diffusers(
    kind, ptype, spacing, clip, variance, extra, monkeypatch
):
    diff = _trajectory_diff(
        "ddpm", kind, ptype, spacing, clip, variance=variance, monkeypatch=monkeypatch, **extra
    )
    assert diff < 1e-5  # Measured 1.8e-6 .. 3.9e-6.


DDIM_CASES = [
    # kind, ptype, spacing, clip, eta, extra
    ("linear", "eps", "leading", "static", 0.0, {}),
    ("linear", "eps", "trailing", "none", 1.0, {}),
    ("linear", "v", "linspace", "none", 0.5, {}),
    ("linear", "x0", "leading", "static", 0.5, {}),
    ("linear", "eps", "leading", "dynamic", 0.0, dict(dyn=(0.995, 1.5), data_std=1.5)),
    ("scaled_linear", "x0", "trailing", "dynamic", 0.5, dict(dyn=(0.9, 1.5), data_std=1.5)),
    ("cosine", "v", "linspace", "static", 1.0, {}),
    ("scaled_linear", "v", "trailing", "none", 0.0, dict(zero_snr=True)),
]


@pytest.mark.parametrize("kind,ptype,spacing,clip,eta,extra", DDIM_CASES)
def test_ddim_trajectory_matches_diffusers(kind, ptype, spacing, clip, eta, extra, monkeypatch):
    diff = _trajectory_diff(
        "ddim", kind, ptype, spacing, clip, eta=eta, monkeypatch=monkeypatch, **extra
    )
    assert diff < 1e-5


def test_last_step_adds_no_noise_and_returns_x0():
    s, _ = _make("linear")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    out = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    z = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    for variance in ("fixed_small", "fixed_large"):
        with_noise, x0 = samplers.ddpm_step(s, x, out, 19, -1, z, variance=variance, clip="static")
        without, _ = samplers.ddpm_step(s, x, out, 19, -1, None, variance=variance, clip="static")
        np.testing.assert_array_equal(np.asarray(with_noise), np.asarray(without))
        np.testing.assert_allclose(np.asarray(with_noise), np.asarray(x0), atol=1e-6)
    last, x0 = samplers.ddim_step(s, x, out, 19, -1, z, eta=1.0, clip="static")
    np.testing.assert_allclose(np.asarray(last), np.asarray(x0), atol=1e-6)
    assert float(jnp.abs(x0).max()) <= 1.0


def test_ddim_eta_one_is_the_ddpm_posterior():
    """With eta=1, DDIM's update equals the DDPM posterior step (DDIM paper, sec. 4.1)."""
    s, _ = _make("cosine")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 4, 4, 3)), jnp.float32)
    out = jnp.asarray(rng.standard_normal((4, 4, 4, 3)), jnp.float32)
    z = jnp.asarray(rng.standard_normal((4, 4, 4, 3)), jnp.float32)
    t, t_prev = jnp.array([900, 500, 100, 20]), jnp.array([800, 300, 50, 0])  # per example
    ddim, _ = samplers.ddim_step(s, x, out, t, t_prev, z, eta=1.0, prediction_type="v")
    ddpm, _ = samplers.ddpm_step(s, x, out, t, t_prev, z, prediction_type="v")
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), atol=2e-5)


# ----------------------------------------------------------------------------- sample


def toy_model(schedule, ptype, data_std=0.5):
    """The ideal Gaussian denoiser plus a class embedding: JAX and numpy twins."""
    gain = ideal_gain(schedule.alphas_cumprod, ptype, data_std)
    emb = np.random.default_rng(7).standard_normal((11, 3)).astype(np.float32) * 0.3

    def jax_fn(x, t, cond):
        g = jnp.asarray(gain)[t][:, None, None, None]
        return g * x + jnp.asarray(emb)[cond][:, None, None, :]

    def np_fn(x, t, cond):
        return (gain[t][:, None, None, None] * x + emb[cond][:, None, None, :]).astype(np.float32)

    return jax_fn, np_fn


def test_sample_ddim_with_guidance_matches_diffusers():
    s, _ = _make("linear")
    jax_fn, np_fn = toy_model(s, "v")
    opts = samplers.SamplerOptions(
        sampler="ddim", num_steps=20, spacing="trailing", guidance_scale=3.0, prediction_type="v"
    )
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    cond, uncond = np.array([1, 4], np.int32), np.array([10, 10], np.int32)
    got = jax.jit(lambda x: samplers.sample(jax_fn, s, jax.random.key(0), x, opts, cond, uncond))(
        jnp.asarray(x)
    )

    ref = DDIMScheduler(
        num_train_timesteps=T,
        prediction_type="v_prediction",
        clip_sample=True,
        timestep_spacing="trailing",
    )
    ref.set_timesteps(20)
    for t in ref.timesteps.numpy():
        c, u = np_fn(x, np.full(2, t), cond), np_fn(x, np.full(2, t), uncond)
        out = u + 3.0 * (c - u)
        x = nhwc(ref.step(nchw(out), int(t), nchw(x), use_clipped_model_output=True).prev_sample)
    np.testing.assert_allclose(np.asarray(got), x, rtol=0, atol=1e-5)


def test_sample_ddpm_noise_comes_from_the_key(monkeypatch):
    """Start noise = normal(split(key)[0]); step i's = normal(fold_in(split(key)[1], i))."""
    s, _ = _make("linear")
    jax_fn, np_fn = toy_model(s, "eps")
    n = 20
    opts = samplers.SamplerOptions(sampler="ddpm", num_steps=n, spacing="leading", clip="none")
    key = jax.random.key(42)
    cond = np.array([2, 3], np.int32)
    got = samplers.sample(jax_fn, s, key, SHAPE, opts, cond)

    k0, k1 = jax.random.split(key)
    x = np.asarray(jax.random.normal(k0, SHAPE))
    noise = [np.asarray(jax.random.normal(jax.random.fold_in(k1, i), SHAPE)) for i in range(n)]
    ref = DDPMScheduler(num_train_timesteps=T, clip_sample=False)
    ref.set_timesteps(n)
    for i, t in enumerate(ref.timesteps.numpy()):
        monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, i=i, **k: nchw(noise[i]))
        out = np_fn(x, np.full(2, t), cond)
        x = nhwc(ref.step(nchw(out), int(t), nchw(x)).prev_sample)
    np.testing.assert_allclose(np.asarray(got), x, rtol=0, atol=1e-5)


def test_sample_is_deterministic_per_key():
    s, _ = _make("cosine")
    jax_fn, _ = toy_model(s, "eps")
    opts = samplers.SamplerOptions(sampler="ddim", num_steps=10, eta=1.0)
    cond = jnp.array([0, 1], jnp.int32)
    run = jax.jit(lambda key: samplers.sample(jax_fn, s, key, SHAPE, opts, cond))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).mean()) > 0.1


def test_guidance_scale_one_runs_the_conditional_model_only():
    s, _ = _make("linear")
    jax_fn, _ = toy_model(s, "eps")
    batches = []

    def counting(x, t, cond):
        batches.append(x.shape[0])  # Runs at trace time.
        return jax_fn(x, t, cond)

    cond, uncond = jnp.array([1, 2], jnp.int32), jnp.array([10, 10], jnp.int32)
    key = jax.random.key(0)
    one = samplers.SamplerOptions(num_steps=8, guidance_scale=1.0)
    with_uncond = samplers.sample(counting, s, key, SHAPE, one, cond, uncond)
    without = samplers.sample(counting, s, key, SHAPE, one, cond)
    np.testing.assert_array_equal(np.asarray(with_uncond), np.asarray(without))
    assert set(batches) == {2}
    batches.clear()
    two = dataclasses.replace(one, guidance_scale=2.0)
    samplers.sample(counting, s, key, SHAPE, two, cond, uncond)
    assert set(batches) == {4}  # One batched forward of cond and uncond.


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guidance_combines_cond_and_uncond(w):
    """An x0-model whose output is its condition's embedding: DDIM's last step returns
    x0 itself, so the sample is exactly u + w (c - u). Conditions are pytrees."""
    s, _ = _make("linear")
    emb = jnp.asarray(np.random.default_rng(5).standard_normal((11, 3)), jnp.float32)

    def model_fn(x, t, cond):
        e = emb[cond["label"]] + cond["shift"]
        return jnp.broadcast_to(e[:, None, None, :], x.shape) + 0 * x

    cond = {"label": jnp.array([1, 2]), "shift": jnp.array([[0.5, 0, 0], [0, 0, -0.5]])}
    uncond = {"label": jnp.array([10, 10]), "shift": jnp.zeros((2, 3))}
    opts = samplers.SamplerOptions(num_steps=5, clip="none", prediction_type="x0", guidance_scale=w)
    got = samplers.sample(model_fn, s, jax.random.key(0), SHAPE, opts, cond, uncond)
    c = emb[cond["label"]] + cond["shift"]
    u = emb[uncond["label"]]
    want = jnp.broadcast_to((u + w * (c - u))[:, None, None, :], SHAPE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_sharded_sampling_matches_single_device():
    s, _ = _make("linear")
    rng = np.random.default_rng(6)
    mix = jnp.asarray(rng.standard_normal((3, 3)) * 0.3, jnp.float32)
    emb = jnp.asarray(rng.standard_normal((11, 3)), jnp.float32)

    def model_fn(x, t, cond):  # A fixed linear map of x plus embeddings of t and the condition.
        h = jnp.einsum("bhwc,cd->bhwd", x, mix) * (t[:, None, None, None] / T)
        return h + emb[cond["label"]][:, None, None, :] + 0.1 * cond["vec"][:, None, None, :]

    opts = samplers.SamplerOptions(
        sampler="ddpm", num_steps=10, guidance_scale=2.0, clip="dynamic", dynamic_max_value=1.5
    )
    b = 8
    noise = rng.standard_normal((b, 8, 8, 3)).astype(np.float32)
    cond = {"label": np.arange(b, dtype=np.int32), "vec": rng.standard_normal((b, 3))}
    uncond = {"label": np.full(b, 10, np.int32), "vec": np.zeros((b, 3))}

    def fn(key, x, c, u):
        return samplers.sample(model_fn, s, key, x, opts, c, u)

    key = jax.random.key(0)
    single = jax.jit(fn)(key, noise, cond, uncond)

    mesh = jax.make_mesh(
        (2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    args = (key, *jax.tree.map(lambda a: jax.device_put(a, batch), (noise, cond, uncond)))
    sharded = jax.jit(fn)(*args)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=0, atol=1e-5)
    assert sharded.sharding.spec == P(("data", "fsdp"))
    # With the partitionable RNG (what real meshes use) the compiled loop moves no data
    # between devices: guidance, thresholding and the steps are all per-example.
    with jax.threefry_partitionable(True):
        text = jax.jit(fn).lower(*args).compile().as_text()
    collectives = re.findall(r"all-gather|all-reduce|all-to-all|collective-permute", text)
    assert not collectives, collectives[:5]


# ----------------------------------------------------------------------------- options


def _configs(**sampling):
    d = schedules.default_config()
    c = samplers.default_config()
    for k, v in sampling.items():
        if k in c:
            c[k] = v
        else:
            d[k] = v
    return c, d


def test_default_config_round_trip():
    c, d = _configs()
    samplers.validate(c, d)
    opts = samplers.options_from_config(c, d)
    assert opts == samplers.SamplerOptions()
    hash(opts)
    c, d = _configs(sampler="ddpm", num_steps=1000, guidance_scale=3, prediction_type="v")
    samplers.validate(c, d)
    opts = samplers.options_from_config(c, d)
    assert (opts.sampler, opts.guidance_scale, opts.prediction_type) == ("ddpm", 3.0, "v")
    assert opts.dynamic_max_value == math.inf


@pytest.mark.parametrize(
    "change,fragments",
    [
        (dict(sampler="euler"), ["config.sampling.sampler='euler'", "'ddpm', 'ddim'"]),
        (dict(num_steps=1001), ["config.sampling.num_steps=1001", "num_timesteps=1000"]),
        (dict(num_steps=0), ["num_steps=0", ">= 1"]),
        (dict(eta=-0.1), ["config.sampling.eta=-0.1", "[0, 1]"]),
        (dict(guidance_scale=-1.0), ["guidance_scale=-1.0", ">= 0"]),
        (dict(spacing="uniform"), ["spacing='uniform'", "'leading', 'trailing', 'linspace'"]),
        (dict(clip="soft"), ["clip='soft'", "'none', 'static', 'dynamic'"]),
        (dict(variance="learned"), ["variance='learned'", "'fixed_small', 'fixed_large'"]),
        (dict(dynamic_percentile=1.5), ["dynamic_percentile=1.5", "(0, 1]"]),
        (dict(dynamic_max_value=0.5), ["dynamic_max_value=0.5", ">= 1"]),
        (dict(prediction_type="sample"), ["prediction_type='sample'", "'eps', 'x0', 'v'"]),
    ],
)
def test_bad_sampling_config(change, fragments):
    c, d = _configs(**change)
    with pytest.raises(ConfigError) as info:
        samplers.validate(c, d)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_sample_refuses_bad_use():
    s, _ = _make("linear")
    jax_fn, _ = toy_model(s, "eps")
    guided = samplers.SamplerOptions(num_steps=4, guidance_scale=3.0)
    with pytest.raises(ConfigError, match="guidance_scale=3.0.*needs both cond and uncond"):
        samplers.sample(jax_fn, s, jax.random.key(0), SHAPE, guided, jnp.array([1, 2]))
    # Without any condition guidance is a no-op, not an error.
    calls = []

    def unconditional(x, t, cond):
        calls.append(x.shape[0])
        return 0.1 * x

    plain = dataclasses.replace(guided, guidance_scale=1.0)
    a = samplers.sample(unconditional, s, jax.random.key(0), SHAPE, guided)
    b = samplers.sample(unconditional, s, jax.random.key(0), SHAPE, plain)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(calls) == {SHAPE[0]}
    small = schedules.make_schedule("linear", 10)
    with pytest.raises(ConfigError, match="num_steps=50: expected at most"):
        samplers.sample(jax_fn, small, jax.random.key(0), SHAPE, samplers.SamplerOptions())
