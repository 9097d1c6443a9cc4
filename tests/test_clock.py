"""The OU clock of every forward process (docs/algorithms.md section 1)."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from pipeline.clock import (OU, PROCESSES, VE, DiscreteVP, Flow, VPCosine, VPLinear,
                            noise_std, signal)

F64 = torch.float64

# A sensible native-time range for each process class (native t increasing).
T_RANGE = {
    OU: (1e-4, 20.0),
    VPLinear: (1e-4, 1.0),
    VPCosine: (1e-3, VPCosine().t_max),
    DiscreteVP: (0.0, 999.0),
    VE: (1e-3, 100.0),
    Flow: (1e-3, 0.999),
}


def native_times(process, n=2001):
    lo, hi = T_RANGE[type(process)]
    return torch.linspace(lo, hi, n, dtype=F64)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_t_of_u_inverts_u_of_t(name):
    process = PROCESSES[name]()
    t = native_times(process)
    torch.testing.assert_close(process.t_of_u(process.u_of_t(t)), t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_u_of_t_inverts_t_of_u(name):
    process = PROCESSES[name]()
    t = native_times(process)
    lo, hi = process.u_of_t(t[[0, -1]]).tolist()
    u = torch.linspace(lo, hi, 2001, dtype=F64)
    torch.testing.assert_close(process.u_of_t(process.t_of_u(u)), u, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_u_strictly_increasing_and_positive_in_t(name):
    process = PROCESSES[name]()
    u = process.u_of_t(native_times(process))
    assert u.dtype == F64
    assert bool((u[1:] > u[:-1]).all())
    assert bool((u > 0).all())


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_clock_keeps_shape(name):
    process = PROCESSES[name]()
    lo, hi = T_RANGE[type(process)]
    t = torch.linspace(lo, hi, 12, dtype=F64).reshape(3, 4)
    assert process.u_of_t(t).shape == (3, 4)
    assert process.t_of_u(process.u_of_t(t)).shape == (3, 4)


def test_signal_and_noise_std_are_a_vp_pair():
    u = torch.linspace(1e-6, 30, 501, dtype=F64)
    torch.testing.assert_close(signal(u), torch.exp(-u / 2), rtol=1e-14, atol=0)
    torch.testing.assert_close(signal(u) ** 2 + noise_std(u) ** 2, torch.ones_like(u),
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("beta_min,beta_max", [(0.1, 20.0), (0.05, 5.0)])
def test_vp_linear_u_is_integral_of_beta(beta_min, beta_max):
    process = VPLinear(beta_min, beta_max)
    t = np.linspace(0.0, 1.0, 23)
    expected = [quad(lambda s: beta_min + s * (beta_max - beta_min), 0, ti)[0] for ti in t]
    got = process.u_of_t(torch.tensor(t, dtype=F64))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_vp_cosine_u_is_minus_log_alpha_bar():
    process = VPCosine()
    t = np.linspace(0.0, process.t_max, 37)
    f = lambda x: math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = [-math.log(f(ti) / f(0.0)) for ti in t]
    got = process.u_of_t(torch.tensor(t, dtype=F64))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-11, atol=1e-13)


def test_vp_cosine_t_max_keeps_alpha_bar_positive():
    u = VPCosine().u_of_t(torch.tensor(VPCosine().t_max, dtype=F64))
    assert math.isfinite(float(u)) and float(u) > 5


@pytest.mark.parametrize("beta_start,beta_end,steps", [(1e-4, 0.02, 1000), (1e-3, 0.05, 50)])
def test_discrete_vp_u_at_integers_is_minus_log_cumprod(beta_start, beta_end, steps):
    process = DiscreteVP(beta_start, beta_end, steps)
    betas = np.linspace(beta_start, beta_end, steps)
    expected = -np.log(np.cumprod(1 - betas))
    index = torch.arange(steps, dtype=F64)
    np.testing.assert_allclose(process.u_of_t(index).numpy(), expected, rtol=1e-11)
    torch.testing.assert_close(process.t_of_u(torch.tensor(expected)), index,
                               rtol=0, atol=1e-8)


def test_discrete_vp_interpolates_linearly_between_indices():
    process = DiscreteVP()
    i = torch.arange(999, dtype=F64)
    mid = process.u_of_t(i + 0.25)
    torch.testing.assert_close(mid, 0.75 * process.u_of_t(i) + 0.25 * process.u_of_t(i + 1),
                               rtol=1e-13, atol=0)


def test_ve_signal_is_one_over_sqrt_one_plus_sigma_squared():
    sigma = torch.logspace(-3, 2, 301, dtype=F64)
    u = VE().u_of_t(sigma)
    torch.testing.assert_close(signal(u), 1 / torch.sqrt(1 + sigma**2), rtol=1e-13, atol=0)
    torch.testing.assert_close(VE().input_scale(u), torch.sqrt(1 + sigma**2),
                               rtol=1e-13, atol=0)


def test_flow_vp_equivalent_coefficients():
    t = torch.linspace(1e-3, 0.999, 301, dtype=F64)
    u = Flow().u_of_t(t)
    a, s = signal(u), noise_std(u)
    torch.testing.assert_close(a / (a + s), 1 - t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s / (a + s), t, rtol=1e-12, atol=1e-14)
    # x_flow = (1 - t) x_0 + t z = x_VP / (a + s): the input scale is 1 / (a + s).
    torch.testing.assert_close(Flow().input_scale(u) * a, 1 - t, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("process", [OU(), VPLinear(), VPCosine(), DiscreteVP()])
def test_vp_processes_have_unit_input_scale(process):
    u = torch.linspace(0.01, 5, 11, dtype=F64)
    assert bool((process.input_scale(u) == 1).all())


def test_a_discrete_schedules_table_follows_the_times_device():
    """Its table is built on the host; a GPU's times searched or indexed it there and raised
    (every diffusers network, and a module of the ddpm process, on a GPU). The meta device
    stands in for one: a host tensor meeting it raises as a GPU's would."""
    clock = DiscreteVP()
    u = torch.rand(4, dtype=torch.float64, device="meta")
    assert clock.t_of_u(u).device.type == "meta"
    assert clock.u_of_t(torch.rand(4, dtype=torch.float64, device="meta")).device.type == "meta"
