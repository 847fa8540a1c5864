"""GAN losses and regularisers against closed forms, finite differences and full Jacobians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genctl_jax.gan import losses

REAL = np.array([0.5, -1.0, 2.0, 0.0])
FAKE = np.array([-0.3, 1.5, -2.5])


def softplus(x):
    return np.log1p(np.exp(x))


def test_adversarial_losses_closed_forms():
    np.testing.assert_allclose(
        losses.nonsaturating_d(REAL, FAKE),
        np.mean(-np.log(1 / (1 + np.exp(-REAL)))) + np.mean(-np.log(1 - 1 / (1 + np.exp(-FAKE)))),
        rtol=1e-6,
    )
    np.testing.assert_allclose(losses.nonsaturating_g(FAKE), softplus(-FAKE).mean(), rtol=1e-6)
    # relu(1 - real) = [0.5, 2, 0, 1]; relu(1 + fake) = [0.7, 2.5, 0].
    np.testing.assert_allclose(losses.hinge_d(REAL, FAKE), 3.5 / 4 + 3.2 / 3, rtol=1e-6)
    np.testing.assert_allclose(losses.hinge_g(FAKE), 1.3 / 3, rtol=1e-6)
    # (real - 1)^2 = [0.25, 4, 1, 1]; fake^2 = [0.09, 2.25, 6.25]; (fake - 1)^2 = [1.69, .25, 12.25]
    np.testing.assert_allclose(losses.lsgan_d(REAL, FAKE), 0.5 * (6.25 / 4 + 8.59 / 3), rtol=1e-6)
    np.testing.assert_allclose(losses.lsgan_g(FAKE), 14.19 / 3, rtol=1e-6)


def test_gan_losses_lookup():
    assert losses.gan_losses("hinge") == (losses.hinge_d, losses.hinge_g)
    assert losses.gan_losses("lsgan").g is losses.lsgan_g
    with pytest.raises(ValueError, match=r"'bogus'.*\['hinge', 'lsgan', 'nonsaturating'\]"):
        losses.gan_losses("bogus")


def test_l1_and_feature_matching():
    a, b = jnp.array([[1.0, -2.0], [0.5, 3.0]]), jnp.array([[0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(losses.l1(a, b), (1 + 2 + 0.5 + 2) / 4)

    real = [[jnp.zeros((2, 2)), jnp.ones((3,))], [jnp.full((4,), 2.0)]]
    fake = [[jnp.full((2, 2), 1.0), jnp.full((3,), 4.0)], [jnp.full((4,), -1.0)]]
    # scale 0: mean(1, 3) = 2; scale 1: 3; mean over scales 2.5.
    np.testing.assert_allclose(losses.feature_matching(real, fake), 2.5)
    g_real, g_fake = jax.grad(losses.feature_matching, argnums=(0, 1))(real, fake)
    assert all(not np.any(g) for g in jax.tree.leaves(g_real))  # real features are constants
    np.testing.assert_allclose(g_fake[1][0], np.full(4, -0.5 / 4))  # d/dfake of |fake - 2|
    with pytest.raises(ValueError, match="scale 1 has 1 real and 2 fake"):
        losses.feature_matching(real, [fake[0], fake[1] * 2])


def tiny_d(params, x):
    """A differentiable per-sample discriminator: [B, H, W, C] -> [B]."""
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return jnp.sin(h) @ params["w2"] + jnp.sum(x**2, axis=(1, 2, 3)) * 0.1


def test_r1_penalty_matches_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = {
            "w1": jnp.asarray(rng.standard_normal((18, 5))),
            "b1": jnp.asarray(rng.standard_normal(5)),
            "w2": jnp.asarray(rng.standard_normal(5)),
        }
        x = jnp.asarray(rng.standard_normal((2, 3, 3, 2)))

        def d_fn(images):
            return tiny_d(params, images)

        penalty = losses.r1_penalty(d_fn, x)
        assert penalty.dtype == jnp.float64
        # Central differences of each sample's logit w.r.t. each of its 18 pixels, one batch.
        eps = 1e-5
        basis = np.eye(18).reshape(18, 1, 3, 3, 2) * eps
        plus = d_fn((x[None] + basis).reshape(-1, 3, 3, 2)).reshape(18, 2)
        minus = d_fn((x[None] - basis).reshape(-1, 3, 3, 2)).reshape(18, 2)
        grads = (plus - minus) / (2 * eps)  # [pixel, sample]
        np.testing.assert_allclose(penalty, np.mean(np.sum(grads**2, axis=0)), rtol=1e-6)
        assert penalty > 0.1  # a trivial (zero) gradient would not pass


def tiny_g(a, w):
    """w [B, num_ws=3, w_dim=4] -> images [B, 4, 4, 2], nonlinear in w."""
    return (
        jnp.tanh(jnp.einsum("bnd,ndp->bp", w, a)).reshape(w.shape[0], 4, 4, 2) + w[:, :1, None, :2]
    )


def test_path_length_penalty_matches_full_jacobian():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((3, 4, 32)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((2, 3, 4)).astype(np.float32))
    key, pl_mean = jax.random.PRNGKey(3), 0.7

    def g_fn(ws):
        return tiny_g(a, ws)

    penalty, new_mean, lengths = losses.path_length_penalty(g_fn, w, key, pl_mean, decay=0.01)

    jac = np.asarray(jax.jacrev(g_fn)(w), np.float64)  # [B, 4, 4, 2, B, 3, 4]
    y = np.asarray(jax.random.normal(key, (2, 4, 4, 2)), np.float64) / np.sqrt(16)
    jty = np.einsum("bhwc,bhwcknd->knd", y, jac)  # [B, num_ws, w_dim]
    expected_lengths = np.sqrt(np.mean(np.sum(jty**2, axis=2), axis=1))
    np.testing.assert_allclose(lengths, expected_lengths, rtol=1e-5)
    expected_mean = pl_mean + 0.01 * (expected_lengths.mean() - pl_mean)
    np.testing.assert_allclose(new_mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(penalty, np.mean((expected_lengths - expected_mean) ** 2), rtol=1e-5)
    # The carried mean is a constant; the penalty's gradient reaches the generator.
    grad_new_mean = jax.grad(lambda ws: losses.path_length_penalty(g_fn, ws, key, 0.7)[1])(w)
    assert not np.any(grad_new_mean)
    grad_a = jax.grad(
        lambda aa: losses.path_length_penalty(lambda ws: tiny_g(aa, ws), w, key, 0.7)[0]
    )(a)
    assert np.abs(grad_a).sum() > 0


def test_lazy_regularisation_helpers():
    assert losses.lazy_scale(16) == 16.0
    with pytest.raises(ValueError, match=">= 1"):
        losses.lazy_scale(0)
    lr, b1, b2 = losses.lazy_adam_hparams(0.002, 0.0, 0.99, 16)
    np.testing.assert_allclose([lr, b1, b2], [0.002 * 16 / 17, 0.0, 0.99 ** (16 / 17)])
    assert losses.lazy_adam_hparams(0.002, 0.5, 0.99, 0) == (0.002, 0.5, 0.99)


def test_ema():
    ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    params = {"a": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(0.0)}}
    out = losses.ema_update(ema, params, 0.75)
    np.testing.assert_array_equal(out["a"], [1.5, 1.0])
    np.testing.assert_array_equal(out["b"]["c"], 3.0)

    np.testing.assert_allclose(losses.ema_decay_for(32, 10.0), 0.5 ** (32 / 10_000), rtol=1e-6)
    # Ramp-up: after 100 steps of 32 images the half-life is 0.05 * 3200 = 160 images.
    np.testing.assert_allclose(
        losses.ema_decay_for(32, 10.0, rampup=0.05, step=100), 0.5 ** (32 / 160), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.ema_decay_for(32, 10.0, rampup=0.05, step=10**6), 0.5 ** (32 / 10_000), rtol=1e-6
    )


def test_directional_clip_loss():
    e1, e2, e3 = np.eye(3)
    src_img, tgt_img = np.stack([e1, e1]), np.stack([e2, e2])
    # Same direction (also after scaling the text embeddings, which are normalised first).
    np.testing.assert_allclose(
        losses.directional_clip_loss(src_img, tgt_img, 3 * e1, 3 * e2), 0.0, atol=1e-6
    )
    np.testing.assert_allclose(
        losses.directional_clip_loss(src_img, tgt_img, e2, e1), 2.0, rtol=1e-6
    )
    # (e3 - (e1 + e2)/sqrt2) is orthogonal to (e2 - e1).
    np.testing.assert_allclose(
        losses.directional_clip_loss(src_img, tgt_img, (e1 + e2) / np.sqrt(2), e3), 1.0, atol=1e-6
    )
    # Per-sample text directions: parallel for one sample, opposite for the other -> mean 1.
    text_src, text_tgt = np.stack([e1, e2]), np.stack([e2, e1])
    np.testing.assert_allclose(
        losses.directional_clip_loss(src_img, tgt_img, text_src, text_tgt), 1.0, atol=1e-6
    )
