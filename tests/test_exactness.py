"""Each sampler's ensemble matches the exact target statistics within sampling error."""
import dataclasses
import math

import pytest
import torch

from models.gmm import GaussianMixture, mode_fractions
from models.grf import GaussianRandomField, _shell_mean, radial_spectrum, wavenumbers
from pipeline.comm import SerialComm
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.samplers import SAMPLERS, Options

U_MIN = 1e-3
OPTS = {
    "sequential-sde": Options(), "sequential-ode": Options(),
    "piadm-sde": Options(max_sweeps=100, tol=0.1),
    "piadm-ode": Options(max_sweeps=100, tol=1e-3),
    "piadm-ode-predictor": Options(max_sweeps=100, tol=1e-3, corrector_steps=0),
    "window": Options(window=40, tol=0.1),
    "pc-window": Options(tol=1e-3),
    "pc-window-ode": Options(tol=1e-5),
    "pc-window-secant": Options(tol=1e-3, theta="secant"),  # the learned corrector
}


def _sampler(name: str):
    """The sampler a case of OPTS runs (a case may be a sampler with other options)."""
    return SAMPLERS[name.removesuffix("-predictor").removesuffix("-secant")]


def _chi2_of_spectrum(model, y):
    """z-scores of the shell spectra, with the number of independent rfft coefficients."""
    _, est = radial_spectrum(y, len(model.shape))
    _, true = _shell_mean(model.marginal_spectrum(U_MIN), model.shape)
    shell = torch.round(wavenumbers(model.shape)).long().flatten()
    counts = torch.bincount(shell, minlength=len(true) + 2)[1 : len(true) + 1].double()
    z = (est / true - 1) * torch.sqrt(counts * y.shape[0])
    return z


@pytest.mark.parametrize("shape,members", [((64, 64), 8), ((6, 10, 8), 24)])
@pytest.mark.parametrize("method", list(OPTS))
def test_grf_spectrum_matches_exact_target(method, shape, members):
    model = GaussianRandomField(shape, length=4.0)
    grid = make_grid("ou", 400, u_min=U_MIN, u_max=10.0, block_size=50)
    noise = Noise(11, tuple((0, m) for m in range(members)), shape, torch.float64)
    options = dataclasses.replace(OPTS[method], data_bound=model.data_bound)
    y, _ = _sampler(method)(model, noise.prior(), grid, noise, comm=SerialComm(),
                            options=options)
    z = _chi2_of_spectrum(model, y)
    k = z.numel()
    assert z.abs().max() < 4.5, z
    assert float((z**2).sum()) < k + 5 * math.sqrt(2 * k)


@pytest.mark.parametrize("method", ["sequential-sde", "sequential-ode", "piadm-sde", "piadm-ode",
                                    "window", "pc-window", "pc-window-ode",
                                    "pc-window-secant"])
def test_gmm_mode_weights_within_three_standard_errors(method):
    model = GaussianMixture.random((8,), components=3, weights=[0.5, 0.3, 0.2], seed=1)
    grid = make_grid("ou", 200, u_min=U_MIN, u_max=10.0, block_size=40)
    n = 400
    noise = Noise(5, tuple((0, m) for m in range(n)), (8,), torch.float64)
    options = dataclasses.replace(OPTS[method], data_bound=model.data_bound)
    y, _ = _sampler(method)(model, noise.prior(), grid, noise, comm=SerialComm(),
                            options=options)
    frac = mode_fractions(model, y, U_MIN)
    se = torch.sqrt(model.weights * (1 - model.weights) / n)
    assert bool(((frac - model.weights).abs() <= 3 * se).all()), (frac, model.weights)
