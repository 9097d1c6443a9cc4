"""Ensemble and field metrics: energy spectra, ensemble-mean RMSE, CRPS, spread/skill, rank
histograms. Arrays are numpy with the member axis first for ensembles: ens (M, *S) against
truth (*S); metrics average over every other axis."""
from __future__ import annotations

import numpy as np
import scoringrules


def _radial(density: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum spectral densities (N, n, n) over shells |k| = 1 .. n/2 (rounded): (k, (N, n/2))."""
    k1 = np.fft.fftfreq(n, 1.0 / n)
    shell = np.rint(np.sqrt(k1[:, None] ** 2 + k1[None, :] ** 2)).astype(int).ravel()
    k = np.arange(1, n // 2 + 1)
    # the points of each shell in turn, summed a run at a time: a one-hot (n*n, n/2) matrix
    # took n^3/2 values, 4 GB at 1024 x 1024 (every shell of 1 .. n/2 holds (k, 0))
    order = np.argsort(shell, kind="stable")
    kept = order[(shell[order] >= 1) & (shell[order] <= n // 2)]
    starts = np.searchsorted(shell[kept], k)
    return k, np.add.reduceat(density.reshape(-1, n * n)[:, kept], starts, axis=1)


def energy_spectra(vorticity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially binned kinetic energy spectra of periodic vorticity fields (..., n, n) on
    [0, 2 pi)^2, one per field: (k = 1 .. n/2, E (N, n/2)) with N the product of the leading
    axes; sum_k E(k) = the field's kinetic energy (1/2 <|u|^2>) up to the shells cut at n/2."""
    n = vorticity.shape[-1]
    w_hat = np.fft.fft2(vorticity, norm="forward")
    k1 = np.fft.fftfreq(n, 1.0 / n)
    k2 = k1[:, None] ** 2 + k1[None, :] ** 2
    density = np.where(k2 > 0, np.abs(w_hat) ** 2 / np.where(k2 > 0, k2, 1), 0.0) / 2
    return _radial(density.reshape(-1, n, n), n)


def power_spectra(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially binned power spectra of periodic fields (..., n, n), one per field:
    (k = 1 .. n/2, P (N, n/2)), with sum_k P(k) = the field's variance up to the shells cut at
    n/2."""
    n = field.shape[-1]
    density = np.abs(np.fft.fft2(field, norm="forward")) ** 2
    return _radial(density.reshape(-1, n, n), n)


def ensemble_mean_rmse(ens: np.ndarray, truth: np.ndarray) -> float:
    """Root mean square error of the ensemble mean: ens (M, *S), truth (*S)."""
    return float(np.sqrt(((ens.mean(0) - truth) ** 2).mean()))


def crps(ens: np.ndarray, truth: np.ndarray) -> float:
    """Mean CRPS (over the points) of the members' empirical distribution, ens (M, ...):
    the standard estimator, named, since scoringrules' default has changed between
    versions. It is the MAE for one member, so it compares with a deterministic baseline's;
    it grows as members are fewer (by about E|X - X'| / 2M), so compare ensembles of one
    size."""
    return float(np.mean(scoringrules.crps_ensemble(truth, np.moveaxis(ens, 0, -1), m_axis=-1,
                                                    estimator="qd")))


def spread_variance(ens: np.ndarray) -> np.ndarray:
    """The ensemble spread's square at each point of ens (M, *S) -> (*S): the members'
    unbiased variance times the finite-ensemble factor (M + 1) / M, so that its mean matches
    the squared error of the ensemble mean of a reliable ensemble; needs M >= 2."""
    m = ens.shape[0]
    return ens.var(0, ddof=1) * (m + 1) / m


def spread_skill(ens: np.ndarray, truth: np.ndarray) -> float:
    """Ensemble spread over ensemble-mean RMSE (``spread_variance``): about 1 for a reliable
    ensemble. ens (M, *S), truth (*S)."""
    return float(np.sqrt(spread_variance(ens).mean()) / ensemble_mean_rmse(ens, truth))


def rank_histogram(ens: np.ndarray, truth: np.ndarray,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Counts (M + 1,) of the truth's rank among the members ``ens`` (M, *shape), over every
    point of ``truth`` (*shape); ties split at random by ``rng`` (a fixed generator if None:
    a caller scoring several items passes one, so that their ties are not split alike)."""
    m = ens.shape[0]
    below = (ens < truth[None]).sum(0).ravel()
    ties = (ens == truth[None]).sum(0).ravel()
    rng = np.random.default_rng(0) if rng is None else rng
    rank = below + np.floor(rng.random(below.shape) * (ties + 1)).astype(int)
    return np.bincount(rank, minlength=m + 1)
