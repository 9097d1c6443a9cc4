import math

import numpy as np
import pytest

from pipeline.evaluation import crps, energy_spectra, ensemble_mean_rmse, rank_histogram, spread_skill


def test_energy_spectrum_of_one_mode_sits_at_its_wavenumber_with_its_energy():
    n, k = 32, 3
    x = np.arange(n) * 2 * math.pi / n
    psi = np.cos(k * x)[None, :] * np.ones((n, 1))  # stream function cos(3x)
    w = k**2 * psi  # vorticity = -lap psi
    ks, e = energy_spectra(w)
    e = e[0]  # one field
    u_sq = (k * np.sin(k * x)) ** 2  # v = -dpsi/dx; u = 0
    assert np.argmax(e) == k - 1 and math.isclose(e.sum(), 0.5 * u_sq.mean(), rel_tol=1e-10)


def test_a_reliable_ensemble_scores_as_one():
    rng = np.random.default_rng(1)
    centre = rng.standard_normal((50, 8, 8))
    draws = centre[None] + rng.standard_normal((11, 50, 8, 8))  # truth = one more draw
    ens, truth = draws[:10], draws[10]
    assert abs(spread_skill(ens, truth) - 1) < 0.05
    hist = rank_histogram(ens, truth)
    assert hist.sum() == truth.size and hist.min() > 0.8 * hist.mean() and hist.max() < 1.2 * hist.mean()
    assert ensemble_mean_rmse(ens, truth) > 0.9
    # CRPS rewards the right centre: shifting the truth makes it worse.
    assert crps(ens, truth) < crps(ens, truth + 2.0)


def test_an_underdispersive_ensemble_has_a_u_shaped_histogram():
    rng = np.random.default_rng(2)
    truth = rng.standard_normal(4000)
    ens = 0.3 * rng.standard_normal((9, 4000))
    hist = rank_histogram(ens, truth)
    assert hist[0] > 3 * hist[5] and hist[-1] > 3 * hist[5] and spread_skill(ens, truth) < 0.5


def test_crps_is_the_members_empirical_distributions():
    """The standard estimator, E|X - y| - E|X - X'| / 2 over the M x M pairs: the MAE for one
    member (the fair one, over M (M - 1) pairs, would be smaller)."""
    rng = np.random.default_rng(3)
    ens, truth = rng.standard_normal((3, 5, 4)), rng.standard_normal((5, 4))
    spread = np.abs(ens[:, None] - ens[None]).mean((0, 1))
    expected = (np.abs(ens - truth).mean(0) - spread / 2).mean()
    assert crps(ens, truth) == pytest.approx(expected, rel=1e-12)
    assert crps(ens[:1], truth) == pytest.approx(np.abs(ens[0] - truth).mean(), rel=1e-12)


@pytest.mark.parametrize("n", [8, 9, 32])
def test_the_shells_are_summed_point_by_point_as_their_definition_says(n):
    """The shells were summed by a one-hot (n*n, n/2) matrix, n^3/2 values: 4 GB of it for a
    1024 x 1024 field. Summed run by run now, each shell |k| = 1 .. n/2 (rounded) holds the
    density of exactly its points."""
    from pipeline.evaluation import power_spectra

    fields = np.random.default_rng(n).standard_normal((3, n, n))
    k, spectra = power_spectra(fields)
    k1 = np.fft.fftfreq(n, 1.0 / n)
    shell = np.rint(np.hypot(k1[:, None], k1[None, :]))
    density = np.abs(np.fft.fft2(fields, norm="forward")) ** 2
    wanted = np.stack([[d[shell == s].sum() for s in k] for d in density])
    np.testing.assert_allclose(spectra, wanted, rtol=1e-12)
    assert list(k) == list(range(1, n // 2 + 1))
