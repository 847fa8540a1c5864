"""Host-side math of the distribution metrics of generative-model papers: FID, KID and IS.

Everything here is numpy (and scipy for the matrix square root of FID) in float64 and
works on features computed elsewhere, normally by an Inception network run on the
accelerator: pool features for FID and KID, class logits for IS.

- `FeatureStatistics` streams feature batches into a mean and covariance;
  `GaussianStats` holds the result and `save_stats` / `load_stats` keep it in an `.npz`
  (keys `mu`, `sigma`, `n`), so reference-set statistics are computed once.
- `frechet_distance` / `fid`: the Frechet distance between two Gaussians, with
  `trace_sqrtm_product` following the reference pytorch-fid / TTUR code.
- `kernel_inception_distance`: unbiased MMD^2 with a cubic polynomial kernel
  (Binkowski et al. 2018), averaged over random subsets.
- `inception_score`: exp(E_x KL(p(y|x) || p(y))) over splits (Salimans et al. 2016).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import linalg, special

from genctl_jax.errors import DataError

_STATS_KEYS = ("mu", "sigma", "n")


@dataclass(frozen=True)
class GaussianStats:
    """Mean `mu` [D], covariance `sigma` [D, D] (float64) and the sample count `n` behind them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(
                f"GaussianStats needs mu of shape [D] and sigma of shape [D, D], "
                f"got {mu.shape} and {sigma.shape}"
            )
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", int(self.n))


class FeatureStatistics:
    """Running mean and covariance of [B, D] feature batches, in float64.

    Batches are merged with Chan et al.'s pairwise update (counts, means and centred
    sums of outer products), which stays accurate when features share a large offset,
    unlike raw sums of x and x x^T.
    """

    def __init__(self) -> None:
        self._n = 0
        self._batches = 0
        self._width: int | None = None
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # Sum over samples of (x - mean)(x - mean)^T.

    def update(self, features) -> None:
        """Adds a [B, D] batch; refuses (adding nothing) bad shapes and non-finite values.

        Batches are numbered from 0 in the order of `update` calls, for error messages.
        """
        index = self._batches
        self._batches += 1
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise DataError(f"feature batch {index} must be 2-D [batch, width], got {x.shape}")
        width = x.shape[1]
        if self._width is not None and width != self._width:
            raise DataError(
                f"feature batch {index} has width {width}, but earlier batches had width "
                f"{self._width}; all batches must come from the same feature layer"
            )
        bad = x.size - int(np.isfinite(x).sum())
        if bad:
            raise DataError(
                f"feature batch {index} holds {bad} non-finite (NaN or inf) value(s) out of "
                f"{x.size}; check the images and the feature network for overflow"
            )
        self._width = width
        if not len(x):
            return
        batch_n = len(x)
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        batch_m2 = centred.T @ centred
        if self._mean is None or self._m2 is None:
            self._n, self._mean, self._m2 = batch_n, batch_mean, batch_m2
            return
        total = self._n + batch_n
        delta = batch_mean - self._mean
        self._mean = self._mean + delta * (batch_n / total)
        self._m2 = self._m2 + batch_m2 + np.outer(delta, delta) * (self._n * batch_n / total)
        self._n = total

    @property
    def n(self) -> int:
        """Number of samples seen so far."""
        return self._n

    @property
    def mean(self) -> np.ndarray:
        """Feature mean [D]."""
        if self._mean is None:
            raise DataError("no features yet: call update() with at least one sample")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased (ddof=1) covariance [D, D], as numpy.cov(x, rowvar=False) gives."""
        if self._m2 is None or self._n < 2:
            raise DataError(f"a covariance needs at least 2 samples, got {self._n}")
        return self._m2 / (self._n - 1)

    def result(self) -> GaussianStats:
        """The statistics gathered so far."""
        return GaussianStats(self.mean, self.covariance, self._n)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Writes `result()` to `path` (see `save_stats`)."""
        save_stats(path, self.result(), overwrite=overwrite)


def save_stats(path: str | os.PathLike, stats: GaussianStats, *, overwrite: bool = False) -> None:
    """Writes `stats` to an `.npz` at exactly `path` with keys mu, sigma and n.

    An existing file is kept (FileExistsError) unless `overwrite=True`.
    """
    try:
        with open(path, "wb" if overwrite else "xb") as file:
            np.savez(file, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n))
    except FileExistsError:
        raise FileExistsError(
            f"{os.fspath(path)} already exists; pass overwrite=True to replace it"
        ) from None


def load_stats(path: str | os.PathLike) -> GaussianStats:
    """Reads statistics written by `save_stats`."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{os.fspath(path)} is not an .npz file of feature statistics")
    with data:
        for key in _STATS_KEYS:
            if key not in data.files:
                raise DataError(
                    f"statistics file {os.fspath(path)} has no key '{key}' "
                    f"(found {sorted(data.files)}; expected {list(_STATS_KEYS)})"
                )
        try:
            return GaussianStats(data["mu"], data["sigma"], int(data["n"]))
        except ValueError as error:
            raise DataError(f"statistics file {os.fspath(path)}: {error}") from None


def trace_sqrtm_product(sigma1, sigma2, eps: float = 1e-6) -> float:
    """Tr sqrtm(sigma1 @ sigma2), the cross term of FID, as pytorch-fid / TTUR compute it.

    If scipy's square root is not finite (near-singular product), eps * I is added to
    both covariances and it is retried; a diagonal imaginary part above 1e-3 means the
    inputs are not valid covariances and raises ValueError; a smaller one is dropped.
    """
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if largest > 1e-3:
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary part of {largest:.3g} on its "
                f"diagonal; are both inputs symmetric positive semi-definite covariances?"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr sqrtm(sigma1 sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of equal length, got {mu1.shape} and {mu2.shape}")
    width = mu1.size
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (width, width):
            raise ValueError(
                f"{name} must have shape ({width}, {width}) to match the means, got {sigma.shape}"
            )
    diff = mu1 - mu2
    return float(
        diff @ diff
        + np.trace(sigma1)
        + np.trace(sigma2)
        - 2.0 * trace_sqrtm_product(sigma1, sigma2)
    )


def fid(stats_a: GaussianStats, stats_b: GaussianStats) -> float:
    """Frechet Inception Distance between two feature statistics."""
    return frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)


def _feature_matrix(name: str, features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [samples, width], got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    return x


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of equal-size sets under k(a, b) = (a.b / d + 1)^3."""
    m, width = x.shape
    k_xx = (x @ x.T / width + 1.0) ** 3
    k_yy = (y @ y.T / width + 1.0) ** 3
    k_xy = (x @ y.T / width + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


def kernel_inception_distance(
    features_a, features_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std of unbiased MMD^2 over random subsets.

    Each subset takes min(subset_size, n_a, n_b) rows of each set without replacement,
    drawn by a numpy Generator seeded with `seed`.
    """
    x = _feature_matrix("features_a", features_a)
    y = _feature_matrix("features_b", features_b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"features_a and features_b must have the same width, got {x.shape[1]} and {y.shape[1]}"
        )
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}"
        )
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _unbiased_mmd2(
                x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
            )
            for _ in range(num_subsets)
        ]
    )
    return float(values.mean()), float(values.std())


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score: mean and std over splits of exp(E_x KL(p(y|x) || p(y))).

    logits: [N, classes]. Splits are contiguous with bounds i * N // num_splits, as in
    the original code, and p(y) is each split's mean of p(y|x).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [samples, classes], got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits hold non-finite values")
    n = len(logits)
    if num_splits < 1 or n < num_splits:
        raise ValueError(f"need 1 <= num_splits <= samples, got {num_splits} and {n} samples")
    log_p = logits - special.logsumexp(logits, axis=1, keepdims=True)
    bounds = [i * n // num_splits for i in range(1, num_splits)]
    scores = []
    for part in np.split(log_p, bounds):
        log_py = special.logsumexp(part, axis=0, keepdims=True) - np.log(len(part))
        kl = (np.exp(part) * (part - log_py)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
