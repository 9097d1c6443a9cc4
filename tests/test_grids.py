"""OU-clock grids and their blocks (docs/algorithms.md sections 3 and 4)."""
import math

import numpy as np
import pytest
import torch

from pipeline.clock import OU, VE, DiscreteVP, VPLinear
from pipeline.grids import GRIDS, block_edges, make_grid

F64 = torch.float64


@pytest.mark.parametrize("kind", sorted(GRIDS))
@pytest.mark.parametrize("steps,u_min,u_max", [(1, 0.1, 2.0), (7, 1e-3, 10.0), (200, 2e-3, 12.0),
                                               (33, 1.5, 4.0)])
def test_grid_endpoints_monotone_and_length(kind, steps, u_min, u_max):
    grid = make_grid(kind, steps, u_min=u_min, u_max=u_max, block_size=10)
    assert grid.u.dtype == F64
    assert grid.u.shape == (steps + 1,) and grid.steps == steps
    assert float(grid.u[0]) == u_max and float(grid.u[-1]) == u_min
    assert bool((grid.u[:-1] > grid.u[1:]).all())
    assert bool((grid.h > 0).all())
    assert math.isclose(float(grid.h.sum()), u_max - u_min, rel_tol=1e-12)


@pytest.mark.parametrize("knee", [0.5, 1.0, 2.0])
def test_ou_grid_is_geometric_below_knee_and_uniform_above(knee):
    steps, u_min, u_max = 120, 1e-3, 10.0
    u = make_grid("ou", steps, u_min=u_min, u_max=u_max, block_size=8, knee=knee).u
    # Equal spacing in phi(u) = log u (u < knee), log knee + (u - knee)/knee (u >= knee).
    dphi = (math.log(knee) + (u_max - knee) / knee - math.log(u_min)) / steps
    below = u < knee
    pairs_below = below[:-1] & below[1:]
    pairs_above = (u[:-1] >= knee) & (u[1:] >= knee)
    assert int(pairs_below.sum()) > 10 and int(pairs_above.sum()) > 10
    ratios = (u[:-1] / u[1:])[pairs_below]
    torch.testing.assert_close(ratios, torch.full_like(ratios, math.exp(dphi)),
                               rtol=1e-10, atol=0)
    h = (u[:-1] - u[1:])[pairs_above]
    torch.testing.assert_close(h, torch.full_like(h, knee * dphi), rtol=1e-10, atol=0)


def test_ou_grid_step_is_continuous_across_knee():
    u = make_grid("ou", 400, u_min=1e-3, u_max=10.0, block_size=8, knee=1.0).u
    h = u[:-1] - u[1:]
    rel = h / u[:-1]
    # h_j / u_j is dphi below the knee and at most dphi above it: no jump at the knee.
    dphi = (10.0 - 1.0 - math.log(1e-3)) / 400
    assert float(rel.max()) <= dphi * (1 + 1e-9)
    assert float(h.max()) <= dphi * (1 + 1e-9)


def test_uniform_ddpm_grid_lands_on_integer_indices():
    process = DiscreteVP()
    u_min = float(process.u_of_t(torch.tensor(0.0, dtype=F64)))
    u_max = float(process.u_of_t(torch.tensor(999.0, dtype=F64)))
    grid = make_grid("uniform", 999, u_min=u_min, u_max=u_max, block_size=100, process=process)
    betas = np.linspace(1e-4, 0.02, 1000)
    table = -np.log(np.cumprod(1 - betas))
    np.testing.assert_allclose(grid.u.numpy(), table[::-1], rtol=1e-11)
    torch.testing.assert_close(process.t_of_u(grid.u), torch.arange(999, -1, -1, dtype=F64),
                               rtol=0, atol=1e-8)


def test_uniform_ddpm_grid_with_stride_lands_on_strided_indices():
    process = DiscreteVP()
    ends = process.u_of_t(torch.tensor([0.0, 999.0], dtype=F64)).tolist()
    grid = make_grid("uniform", 111, u_min=ends[0], u_max=ends[1], block_size=20,
                     process=process)
    torch.testing.assert_close(process.t_of_u(grid.u), torch.arange(999, -1, -9, dtype=F64),
                               rtol=0, atol=1e-8)


def test_uniform_grid_is_uniform_in_native_time():
    for process in (VE(), VPLinear(), OU()):
        grid = make_grid("uniform", 50, u_min=0.01, u_max=8.0, block_size=7, process=process)
        dt = torch.diff(process.t_of_u(grid.u))
        torch.testing.assert_close(dt, torch.full_like(dt, float(dt.mean())), rtol=1e-9, atol=0)


@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_edm_grid_matches_karras_formula(rho):
    steps, sigma_min, sigma_max = 40, 0.002, 80.0
    u_min, u_max = math.log(1 + sigma_min**2), math.log(1 + sigma_max**2)
    grid = make_grid("edm", steps, u_min=u_min, u_max=u_max, block_size=10, rho=rho)
    i = np.arange(steps + 1)
    sigma = (sigma_max ** (1 / rho)
             + i / steps * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    np.testing.assert_allclose(grid.u.numpy(), np.log1p(sigma**2), rtol=1e-9)


@pytest.mark.parametrize("steps,block_size", [(1, 1), (10, 1), (10, 3), (10, 10), (10, 25),
                                              (999, 100), (1000, 100), (64, 7)])
def test_block_edges_cover_steps(steps, block_size):
    edges = block_edges(steps, block_size)
    assert edges[0] == 0 and edges[-1] == steps
    sizes = np.diff(edges)
    assert len(sizes) == math.ceil(steps / block_size)
    assert all(s == block_size for s in sizes[:-1])
    assert 1 <= sizes[-1] <= block_size
    grid = make_grid("ou", steps, u_min=0.01, u_max=5.0, block_size=block_size)
    assert grid.edges == edges
    assert [i for lo, hi in grid.blocks for i in range(lo, hi)] == list(range(steps))


@pytest.mark.parametrize("kwargs", [
    dict(kind="ou", steps=10, u_min=2.0, u_max=2.0, block_size=5),
    dict(kind="ou", steps=10, u_min=3.0, u_max=2.0, block_size=5),
    dict(kind="ou", steps=10, u_min=0.0, u_max=2.0, block_size=5),
    dict(kind="ou", steps=0, u_min=0.1, u_max=2.0, block_size=5),
    dict(kind="ou", steps=-3, u_min=0.1, u_max=2.0, block_size=5),
    dict(kind="karras", steps=10, u_min=0.1, u_max=2.0, block_size=5),
    dict(kind="ou", steps=10, u_min=0.1, u_max=2.0, block_size=0),
])
def test_bad_grid_arguments_raise(kwargs):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError):
        make_grid(kind, **kwargs)


def test_unknown_grid_kind_error_names_the_options():
    with pytest.raises(ValueError) as info:
        make_grid("karras", 10, u_min=0.1, u_max=2.0, block_size=5)
    for kind in GRIDS:
        assert kind in str(info.value)


def test_block_edges_rejects_non_positive_block_size():
    with pytest.raises(ValueError):
        block_edges(10, 0)
    with pytest.raises(ValueError):
        block_edges(10, -2)
