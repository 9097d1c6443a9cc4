"""Network parameterisations converted to the VP score on the OU clock (docs/algorithms.md section 1).

The exact networks are Gaussian posterior means of the GRF, written in each process's native
state x_n = alpha x_0 + beta eps with its native time: per Fourier mode of data variance lam,
x_n has variance v = alpha^2 lam + beta^2, E[eps | x_n] = beta x_n / v,
E[x_0 | x_n] = alpha lam x_n / v and the native score is -x_n / v.
"""

import pytest
import torch

from models.adapters import PREDICTIONS, NetworkAdapter
from models.grf import GaussianRandomField
from pipeline.clock import OU, VE, DiscreteVP, Flow, VPCosine, VPLinear

F64 = torch.float64
SHAPE = (8, 8)
GRF = GaussianRandomField(SHAPE)
U = torch.tensor([0.05, 0.4, 1.3, 3.0, 6.0], dtype=F64)


def fourier_multiply(x, coeff):
    """F^{-1}(coeff F x) for x (B, 8, 8) and per-row, per-mode coeff (B, 8, 5)."""
    xf = torch.fft.rfftn(x, dim=(-2, -1), norm="ortho")
    return torch.fft.irfftn(coeff * xf, s=SHAPE, dim=(-2, -1), norm="ortho")


def col(c):
    return c.reshape(-1, 1, 1)


def vp_native(process):
    """alpha, beta of a VP process at native time t: x = a x_0 + s eps, u = -2 log a."""
    def coefficients(t):
        u = process.u_of_t(t)
        return torch.exp(-u / 2), torch.sqrt(1 - torch.exp(-u))
    return coefficients


def ve_native(sigma):
    return torch.ones_like(sigma), sigma


def flow_native(t):
    return 1 - t, t


def vp_pair(alpha, beta):
    """VP-equivalent (a, s) of x_n = alpha x_0 + beta eps: x_VP = x_n / sqrt(alpha^2 + beta^2)."""
    r = torch.sqrt(alpha**2 + beta**2)
    return alpha / r, beta / r


def exact_network(native, prediction):
    """net(x_native (B, 8, 8), t_native (B,)) -> the exact native prediction."""
    lam = GRF.spectrum

    def net(x, t):
        alpha, beta = native(t)
        alpha, beta = col(alpha), col(beta)
        v = alpha**2 * lam + beta**2
        eps = fourier_multiply(x, beta / v)
        x0 = fourier_multiply(x, alpha * lam / v)
        a, s = vp_pair(alpha, beta)
        return {
            "eps": eps,
            "x0": x0,
            "v": a * eps - s * x0,
            "velocity": eps - x0,
            "score": fourier_multiply(x, -1 / v),
        }[prediction]

    return net


CASES = [
    ("ou", OU(), vp_native(OU())),
    ("vp-linear", VPLinear(), vp_native(VPLinear())),
    ("vp-cosine", VPCosine(), vp_native(VPCosine())),
    ("ddpm", DiscreteVP(), vp_native(DiscreteVP())),
    ("ve", VE(), ve_native),
    ("flow", Flow(), flow_native),
]


def test_hand_written_native_clocks_match_section_one():
    # VE: u = log(1 + sigma^2); flow: u = log(1 + (t / (1 - t))^2).
    sigma = torch.sqrt(torch.expm1(U))
    torch.testing.assert_close(VE().u_of_t(sigma), torch.log(1 + sigma**2), rtol=1e-13, atol=0)
    t = torch.linspace(0.01, 0.99, 9, dtype=F64)
    torch.testing.assert_close(Flow().u_of_t(t), torch.log(1 + (t / (1 - t)) ** 2),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "velocity", "score"])
@pytest.mark.parametrize("name,process,native", CASES, ids=[c[0] for c in CASES])
def test_adapter_returns_exact_vp_score(name, process, native, prediction):
    x = torch.randn(len(U), *SHAPE, dtype=F64, generator=torch.Generator().manual_seed(7)) * 2
    model = NetworkAdapter(exact_network(native, prediction), process, prediction, SHAPE)
    expected = GRF(x, U)
    got = model(x, U)
    assert got.dtype == F64 and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_exact_grf_score_is_minus_x_over_marginal_variance():
    x = torch.randn(1, *SHAPE, dtype=F64, generator=torch.Generator().manual_seed(1))
    u = 0.7
    expected = fourier_multiply(x, -1 / GRF.marginal_spectrum(u))
    torch.testing.assert_close(GRF(x, torch.tensor([u], dtype=F64)), expected,
                               rtol=1e-12, atol=1e-12)


def test_ve_native_score_differs_from_vp_score_by_the_input_scale():
    # A wrong adapter that forgot the chain rule would pass the native VE score straight through.
    x = torch.randn(len(U), *SHAPE, dtype=F64, generator=torch.Generator().manual_seed(3))
    native = exact_network(ve_native, "score")(x / col(torch.exp(-U / 2)),
                                               torch.sqrt(torch.expm1(U)))
    torch.testing.assert_close(native * col(torch.exp(U / 2)), GRF(x, U), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(native, GRF(x, U))


def test_unknown_prediction_raises_value_error_naming_options():
    with pytest.raises(ValueError, match="epsilon") as info:
        NetworkAdapter(lambda x, t: x, OU(), "epsilon", SHAPE)
    for option in ("score", "eps", "x0", "v", "velocity"):
        assert option in str(info.value)
    assert set(PREDICTIONS) == {"score", "eps", "x0", "v", "velocity"}
