"""FID / KID / IS math against numpy and scipy references, closed forms and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg, stats

from genctl_jax.errors import DataError
from genctl_jax.metrics.distribution import (
    FeatureStatistics,
    GaussianStats,
    fid,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_stats,
    save_stats,
    trace_sqrtm_product,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _trace_sqrtm_by_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), an independent route to scipy's."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(w)) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum())


def _streamed(batches) -> FeatureStatistics:
    acc = FeatureStatistics()
    for batch in batches:
        acc.update(batch)
    return acc


def test_streaming_statistics_match_numpy_over_uneven_offset_batches():
    # The 1e5 offset makes raw sums of x x^T lose ~1e-7 relative; the merge must not.
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(5, 5))
    batches = [(rng.normal(size=(b, 5)) @ mix + 1e5).astype(np.float32) for b in (7, 1, 30, 12)]
    acc = _streamed(batches)
    x = np.concatenate(batches).astype(np.float64)
    ref_cov = np.cov(x, rowvar=False)
    assert acc.n == 50
    np.testing.assert_allclose(acc.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.covariance, ref_cov, rtol=0, atol=1e-9 * np.abs(ref_cov).max())
    result = acc.result()
    np.testing.assert_array_equal(result.sigma, acc.covariance)
    assert result.n == 50


def test_fid_of_statistics_with_themselves_is_zero():
    rng = np.random.default_rng(1)
    acc = _streamed([rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))])
    assert abs(fid(acc.result(), acc.result())) < 1e-6


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 3.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 2.0])
    expected = ((mu1 - mu2) ** 2).sum() + s1.sum() + s2.sum() - 2 * np.sqrt(s1 * s2).sum()
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_commuting_covariances_closed_form():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    stats_a, stats_b = GaussianStats(mu1, s1, 10), GaussianStats(mu2, s2, 10)
    assert fid(stats_a, stats_b) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("d", [2, 8, 32])
def test_trace_sqrtm_product_matches_scipy_and_eigen_route(d):
    rng = np.random.default_rng(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert not np.allclose(s1 @ s2, s2 @ s1)  # A case the commuting closed form cannot cover.
    got = trace_sqrtm_product(s1, s2)
    assert got == pytest.approx(np.trace(linalg.sqrtm(s1 @ s2)).real, rel=1e-9)
    assert got == pytest.approx(_trace_sqrtm_by_eigh(s1, s2), rel=1e-8)


def test_trace_sqrtm_product_retries_with_eps_when_result_is_not_finite(monkeypatch):
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, 4), _random_spd(rng, 4)
    calls, real_sqrtm = [], linalg.sqrtm

    def sqrtm_failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(linalg, "sqrtm", sqrtm_failing_once)
    got = trace_sqrtm_product(s1, s2, eps=1e-2)
    shifted1, shifted2 = s1 + 1e-2 * np.eye(4), s2 + 1e-2 * np.eye(4)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], shifted1 @ shifted2, rtol=1e-12)
    assert got == pytest.approx(_trace_sqrtm_by_eigh(shifted1, shifted2), rel=1e-8)
    assert abs(got - _trace_sqrtm_by_eigh(s1, s2)) > 1e-3  # The shift did take effect.


def test_trace_sqrtm_product_refuses_large_imaginary_part():
    # sqrtm(-I) = i I: imaginary part 1 on the diagonal, far above the 1e-3 tolerance.
    with pytest.raises(ValueError, match="imaginary part of 1 "):
        trace_sqrtm_product(np.eye(3), -np.eye(3))


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"means must be vectors of equal length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_fid_from_samples_approaches_closed_form():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 0.5, 1.5, 1.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, -1.0, 0.5, 0.0])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    x = rng.multivariate_normal(mu1, s1, size=20000)
    y = rng.multivariate_normal(mu2, s2, size=20000)
    got = fid(_streamed(np.array_split(x, 7)).result(), _streamed(np.array_split(y, 3)).result())
    assert got == pytest.approx(expected, rel=0.03)


def _kid_brute_force(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape
    k = lambda u, v: (sum(ui * vi for ui, vi in zip(u, v, strict=True)) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def test_kid_matches_brute_force_on_small_sets():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(4, 3)), rng.normal(loc=0.7, size=(4, 3))
    # Subsets of the full size are permutations, which leave the estimator unchanged.
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=10)
    assert mean == pytest.approx(_kid_brute_force(x, y), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_for_equal_distributions():
    # Including the i == j kernel terms would bias each draw by about +0.33 here.
    values = []
    for seed in range(400):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
        values.append(kernel_inception_distance(x, y, num_subsets=1, subset_size=50)[0])
    standard_error = np.std(values) / np.sqrt(len(values))
    assert abs(np.mean(values)) < 4 * standard_error
    assert standard_error < 0.01


def test_kid_near_zero_for_same_distribution_and_positive_for_different():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    same_mean, same_std = kernel_inception_distance(x, y, num_subsets=50, subset_size=500)
    assert abs(same_mean) < same_std
    shifted = rng.normal(loc=0.5, size=(2000, 8))
    diff_mean, diff_std = kernel_inception_distance(x, shifted, num_subsets=50, subset_size=500)
    assert diff_mean > 10 * diff_std
    assert diff_mean > 100 * abs(same_mean)


def test_kid_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same width"):
        kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.full((40, 10), 3.0), num_splits=4)
    assert mean == pytest.approx(1.0, abs=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_of_confident_balanced_predictions_is_class_count():
    k = 7
    logits = 50.0 * np.eye(k)[np.arange(10 * k) % k]
    mean, std = inception_score(logits, num_splits=1)
    assert mean == pytest.approx(k, rel=1e-6)
    assert std == 0.0


def test_inception_score_matches_scipy_kl_per_split():
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3.0, size=(23, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for part in (probs[0:7], probs[7:15], probs[15:23]):  # Bounds i * 23 // 3.
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean([stats.entropy(p, marginal) for p in part])))
    mean, std = inception_score(logits, num_splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)


def test_inception_score_needs_a_sample_per_split():
    with pytest.raises(ValueError, match="num_splits <= samples"):
        inception_score(np.zeros((3, 4)), num_splits=10)


def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    acc = _streamed([rng.normal(size=(20, 4)), rng.normal(size=(5, 4))])
    path = tmp_path / "ref_stats.npz"
    acc.save(path)
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded.mu, acc.mean)
    np.testing.assert_array_equal(loaded.sigma, acc.covariance)
    assert loaded.n == 25
    with np.load(path) as raw:
        assert sorted(raw.files) == ["mu", "n", "sigma"]


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "stats.npz"
    first = GaussianStats(np.zeros(2), np.eye(2), 3)
    save_stats(path, first)
    with pytest.raises(FileExistsError, match="stats.npz already exists"):
        save_stats(path, GaussianStats(np.ones(2), np.eye(2), 4))
    assert load_stats(path).n == 3
    save_stats(path, GaussianStats(np.ones(2), 2 * np.eye(2), 4), overwrite=True)
    replaced = load_stats(path)
    assert replaced.n == 4
    np.testing.assert_array_equal(replaced.sigma, 2 * np.eye(2))


def test_load_names_missing_key_and_path(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, mu=np.zeros(2), n=np.int64(3))
    with pytest.raises(DataError, match=r"partial\.npz has no key 'sigma'"):
        load_stats(path)


def test_update_names_batch_and_count_of_non_finite_values():
    acc = FeatureStatistics()
    acc.update(np.zeros((4, 3)))
    bad = np.ones((5, 3))
    bad[1, 2], bad[3, 0], bad[4, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(DataError, match=r"batch 1 holds 3 non-finite"):
        acc.update(bad)
    assert acc.n == 4


def test_update_refuses_width_change_and_non_2d():
    acc = FeatureStatistics()
    acc.update(np.zeros((0, 3)))  # An empty batch still fixes the width.
    acc.update(np.zeros((4, 3)))
    with pytest.raises(DataError, match=r"batch 2 has width 5, but earlier batches had width 3"):
        acc.update(np.zeros((2, 5)))
    with pytest.raises(DataError, match=r"batch 3 must be 2-D"):
        acc.update(np.zeros((2, 3, 1)))


def test_covariance_needs_two_samples():
    acc = FeatureStatistics()
    acc.update(np.ones((1, 3)))
    np.testing.assert_array_equal(acc.mean, np.ones(3))
    with pytest.raises(DataError, match="at least 2 samples, got 1"):
        _ = acc.covariance
