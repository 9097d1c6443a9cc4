"""The Navier-Stokes solver: Taylor-Green decay against the analytic solution, and the
nonlinear term conserving energy and enstrophy when viscosity, drag and forcing are off."""
import math

import torch

from pipeline.kolmogorov import Flow, Spectral, advance, coarse_grain, random_vorticity
from pipeline.settings import DataConfig

D = DataConfig()  # the solver's step limits, as generate-data runs it


def _grid(n):
    x = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return torch.meshgrid(x, x, indexing="ij")  # (y, x)


def test_taylor_green_vortex_decays_like_the_analytic_solution():
    n, k, nu = 32, 2, 0.02
    y, x = _grid(n)
    w0 = 2 * k * torch.cos(k * x) * torch.cos(k * y)
    sp = Spectral(Flow(n, nu=nu, drag=0.0, k_f=4, forcing=0.0))
    w_hat, t = torch.fft.rfft2(w0), 0.0
    for duration in (1.0, 2.0):  # check at t = 1 and t = 3
        w_hat, t = advance(sp, w_hat, duration, cfl=D.cfl, dt_max=D.dt_max), t + duration
        w = torch.fft.irfft2(w_hat, s=(n, n))
        exact = w0 * math.exp(-2 * nu * k**2 * t)
        assert float((w - exact).norm() / exact.norm()) < 0.01


def _energy_enstrophy(sp, w_hat):
    u, v = sp.velocity(w_hat)
    w = torch.fft.irfft2(w_hat, s=(sp.n, sp.n))
    return float((u**2 + v**2).mean()), float((w**2).mean())


def test_advection_conserves_energy_and_enstrophy_without_dissipation():
    n = 32
    sp = Spectral(Flow(n, nu=0.0, drag=0.0, k_f=4, forcing=0.0))
    w_hat = torch.fft.rfft2(random_vorticity(n, seed=1)) * sp.dealias
    e0, z0 = _energy_enstrophy(sp, w_hat)
    w1 = advance(sp, w_hat, 1.0, cfl=0.2, dt_max=D.dt_max)
    e1, z1 = _energy_enstrophy(sp, w1)
    assert abs(e1 / e0 - 1) < 1e-4 and abs(z1 / z0 - 1) < 1e-4
    assert float((w1 - w_hat).abs().max()) > 0.1  # the flow did evolve


def test_coarse_grain_is_a_block_average():
    w = torch.arange(16.0).reshape(4, 4)
    assert torch.equal(coarse_grain(w, 2), torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
