"""Step coefficients and the sequential samplers (docs/algorithms.md section 2).

With ``form="eps"`` the sequential SDE/ODE are DDPM (posterior variance beta_tilde, DDIM eta=1)
and DDIM (eta=0); they are checked against plain loops in the usual alpha_bar notation, on
the DDPM table of 1000 steps built here independently, with the same keyed noise.
"""
import math

import pytest
import torch

from models.adapters import NetworkAdapter
from models.grf import GaussianRandomField
from pipeline.clock import DiscreteVP
from pipeline.comm import SerialComm
from pipeline.grids import make_grid
from pipeline.integrators import FORMS, step_coefficients
from pipeline.noise import Noise
from pipeline.samplers.options import Options
from pipeline.samplers.sequential import sequential_ode, sequential_sde

F64 = torch.float64
SHAPE = (8, 8)
GRF = GaussianRandomField(SHAPE)
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
ALPHAS = 1 - BETAS
ALPHA_BAR = torch.cumprod(ALPHAS, 0)


def eps_net(x, t):
    """Exact DDPM eps-network indexed by the integer timestep t (B,)."""
    index = torch.round(t).long()
    assert float((t - index).abs().max()) < 1e-8, "the grid must land on DDPM indices"
    ab = ALPHA_BAR[index]
    return -torch.sqrt(1 - ab).reshape(-1, 1, 1) * GRF(x, -torch.log(ab))


def ddpm_grid(steps, block_size=100):
    process = DiscreteVP()
    u_min = float(process.u_of_t(torch.tensor(0.0, dtype=F64)))
    u_max = float(process.u_of_t(torch.tensor(999.0, dtype=F64)))
    return make_grid("uniform", steps, u_min=u_min, u_max=u_max, block_size=block_size,
                     process=process)


def batch_noise():
    return Noise(5, ((0, 0), (3, 1)), SHAPE, dtype=F64)


def ddpm_ancestral(noise, timesteps):
    """Ho et al. ancestral sampling, variance beta_tilde, over adjacent timesteps t -> t - 1."""
    x = noise.prior()
    for j, t in enumerate(timesteps[:-1]):
        assert timesteps[j + 1] == t - 1
        eps = eps_net(x, torch.full((x.shape[0],), float(t), dtype=F64))
        mean = (x - BETAS[t] / torch.sqrt(1 - ALPHA_BAR[t]) * eps) / torch.sqrt(ALPHAS[t])
        var = BETAS[t] * (1 - ALPHA_BAR[t - 1]) / (1 - ALPHA_BAR[t])
        x = mean + torch.sqrt(var) * noise.path(j, j + 1)[:, 0]
    return x


def ddim(noise, timesteps, eta):
    """Song et al. DDIM over any decreasing timesteps, with x_T = noise.prior()."""
    x = noise.prior()
    for j, (t, p) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        ab_t, ab_p = ALPHA_BAR[t], ALPHA_BAR[p]
        eps = eps_net(x, torch.full((x.shape[0],), float(t), dtype=F64))
        x0 = (x - torch.sqrt(1 - ab_t) * eps) / torch.sqrt(ab_t)
        sigma = eta * torch.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))
        x = torch.sqrt(ab_p) * x0 + torch.sqrt(1 - ab_p - sigma**2) * eps
        if eta:
            x = x + sigma * noise.path(j, j + 1)[:, 0]
    return x


def rel_err(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def run(sampler, grid, form, model=None):
    model = model or NetworkAdapter(eps_net, DiscreteVP(), "eps", SHAPE)
    noise = batch_noise()
    return sampler(model, noise.prior(), grid, noise, comm=SerialComm(), options=Options(form=form))


def test_ddpm_table_matches_the_discrete_clock():
    grid = ddpm_grid(999)
    torch.testing.assert_close(grid.u, -torch.log(ALPHA_BAR).flip(0), rtol=1e-12, atol=0)


def test_eps_sde_is_ddpm_ancestral_sampling():
    grid = ddpm_grid(999)
    y, stats = run(sequential_sde, grid, "eps")
    assert y.dtype == F64 and y.shape == (2, *SHAPE)
    assert stats.rounds == 999 and stats.model_calls == 999
    assert rel_err(y, ddpm_ancestral(batch_noise(), list(range(999, -1, -1)))) <= 1e-10


def test_eps_ode_is_ddim():
    grid = ddpm_grid(999)
    y, _ = run(sequential_ode, grid, "eps")
    assert rel_err(y, ddim(batch_noise(), list(range(999, -1, -1)), eta=0.0)) <= 1e-10


@pytest.mark.parametrize("sampler,eta", [(sequential_sde, 1.0), (sequential_ode, 0.0)])
def test_eps_form_is_strided_ddim(sampler, eta):
    grid = ddpm_grid(111, block_size=25)  # indices 999, 990, ..., 0
    y, _ = run(sampler, grid, "eps", model=GRF)
    assert rel_err(y, ddim(batch_noise(), list(range(999, -1, -9)), eta)) <= 1e-10


def test_eps_sde_with_adjacent_steps_equals_ddim_eta_one():
    # The DDPM posterior variance is DDIM's sigma at eta = 1 (a check of the reference loops).
    ts = list(range(999, 979, -1))
    assert rel_err(ddpm_ancestral(batch_noise(), ts), ddim(batch_noise(), ts, 1.0)) <= 1e-12


def test_exponential_coefficients_match_section_two():
    u = torch.tensor([9.0, 6.5, 4.0, 2.2, 1.0, 0.31, 0.05, 0.004], dtype=F64)
    h = [float(u[j] - u[j + 1]) for j in range(len(u) - 1)]
    sde = step_coefficients(u, stochastic=True, form="exponential")
    ode = step_coefficients(u, stochastic=False, form="exponential")
    expect = lambda f: torch.tensor([f(hj) for hj in h], dtype=F64)
    for coefficients in (sde, ode):
        torch.testing.assert_close(coefficients.decay, expect(lambda x: math.exp(x / 2)),
                                   rtol=1e-14, atol=0)
    torch.testing.assert_close(sde.drift, expect(lambda x: 2 * (math.exp(x / 2) - 1)),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(sde.noise, expect(lambda x: math.sqrt(math.exp(x) - 1)),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(sde.var, expect(lambda x: math.exp(x) - 1), rtol=1e-13, atol=0)
    torch.testing.assert_close(ode.drift, expect(lambda x: math.exp(x / 2) - 1),
                               rtol=1e-13, atol=0)
    assert bool((ode.noise == 0).all()) and bool((ode.var == 1).all())


def test_exponential_is_the_default_form():
    u = torch.linspace(5, 0.1, 9, dtype=F64)
    default, explicit = step_coefficients(u, stochastic=True), step_coefficients(
        u, stochastic=True, form="exponential")
    for name in ("decay", "drift", "noise", "var"):
        assert torch.equal(getattr(default, name), getattr(explicit, name))


def test_eps_coefficients_are_the_ddim_algebra():
    u = torch.tensor([7.0, 3.0, 1.1, 0.2, 0.01], dtype=F64)
    a, s = torch.exp(-u / 2), torch.sqrt(1 - torch.exp(-u))
    sigma = (s[1:] / s[:-1]) * torch.sqrt(1 - a[:-1] ** 2 / a[1:] ** 2)
    for stochastic, sig in ((True, sigma), (False, torch.zeros_like(sigma))):
        c = step_coefficients(u, stochastic=stochastic, form="eps")
        # y' = a'/a (y - s eps) + sqrt(s'^2 - sigma^2) eps + sigma xi, eps = -s g.
        torch.testing.assert_close(c.decay, a[1:] / a[:-1], rtol=1e-13, atol=0)
        drift = -s[:-1] * (torch.sqrt(s[1:] ** 2 - sig**2) - a[1:] / a[:-1] * s[:-1])
        torch.testing.assert_close(c.drift, drift, rtol=1e-12, atol=0)
        torch.testing.assert_close(c.noise, sig, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sampler,c", [(sequential_sde, 2.0), (sequential_ode, 1.0)])
def test_exponential_sampler_is_the_section_two_loop(sampler, c):
    grid = make_grid("ou", 40, u_min=0.01, u_max=8.0, block_size=7)
    noise = batch_noise()
    y, _ = sampler(GRF, noise.prior(), grid, noise,
                   comm=SerialComm(), options=Options(form="exponential"))
    x = noise.prior()
    for j in range(grid.steps):
        h = float(grid.u[j] - grid.u[j + 1])
        g = GRF(x, grid.u[j].expand(x.shape[0]))
        x = math.exp(h / 2) * x + c * (math.exp(h / 2) - 1) * g
        if c == 2.0:
            x = x + math.sqrt(math.exp(h) - 1) * noise.path(j, j + 1)[:, 0]
    assert rel_err(y, x) <= 1e-12


def test_unknown_form_raises_value_error_naming_options():
    u = torch.linspace(3, 0.1, 5, dtype=F64)
    with pytest.raises(ValueError, match="heun") as info:
        step_coefficients(u, stochastic=True, form="heun")
    for form in FORMS:
        assert form in str(info.value)
    with pytest.raises(ValueError):
        run(sequential_ode, ddpm_grid(9, block_size=3), "heun", model=GRF)
