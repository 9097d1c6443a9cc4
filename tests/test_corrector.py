"""The PIADM-ODE Langevin corrector: its Picard sweeps solve BAOAB, which keeps a Gaussian
target's marginal invariant."""
import math

import torch

from models.grf import GaussianRandomField
from pipeline.clock import noise_std
from pipeline.noise import Noise
from pipeline.samplers import Options
from pipeline.samplers.corrector import langevin_corrector
from pipeline.comm import SerialComm

U_END = 0.05


def _plain_baoab(model, x, u, noise, block, options):
    """A direct sequential BAOAB loop with the same constants and noise."""
    s = float(noise_std(torch.tensor(u, dtype=torch.float64)))
    n, gamma = options.corrector_steps, options.corrector_gamma / s
    delta = options.corrector_length / n * s
    d = math.exp(-gamma * delta)
    v, zeta = noise.corrector(block, 0, n)
    uu = torch.full((x.shape[0],), u, dtype=torch.float64)
    for j in range(n):
        v = v + 0.5 * delta * model(x, uu)
        x = x + 0.5 * delta * v
        v = d * v + math.sqrt(1 - d * d) * zeta[:, j]
        x = x + 0.5 * delta * v
        v = v + 0.5 * delta * model(x, uu)
    return x


def test_corrector_with_as_many_sweeps_as_steps_is_the_sequential_baoab_run():
    model = GaussianRandomField((12, 10))
    noise = Noise(3, tuple((0, m) for m in range(3)), (12, 10), torch.float64)
    opts = Options(corrector_steps=6, corrector_sweeps=6, corrector_length=1.5)
    x0 = model.sample(3, 0)
    x, stats = langevin_corrector(model, x0, U_END, noise, 2, comm=SerialComm(), options=opts)
    ref = _plain_baoab(model, x0, U_END, noise, 2, opts)
    assert float((x - ref).norm() / ref.norm()) <= 1e-10
    assert stats.rounds == 6 and stats.model_calls == 36


class _Impulses:
    """Corrector noise with a unit impulse in one input per batch row: row 1 the start
    velocity, row 2 + n the increment of step n (row 0 gets none: it carries x0)."""

    def __init__(self, field, steps):
        self.field, self.steps = field, steps

    def corrector(self, block, lo, hi):
        rows = self.steps + 2
        v0 = torch.zeros(rows, *self.field.shape, dtype=torch.float64)
        zeta = torch.zeros(rows, hi - lo, *self.field.shape, dtype=torch.float64)
        v0[1] = self.field
        for n in range(lo, hi):
            zeta[2 + n, n - lo] = self.field
        return v0, zeta


def test_corrector_keeps_the_exact_marginal_invariant():
    # For the Gaussian target the corrector is linear and acts on each Fourier mode alone, so
    # the output variance per mode follows exactly from its response to unit impulses.
    model = GaussianRandomField((16,), length=8.0)
    opts = Options()
    impulse = torch.zeros(16, dtype=torch.float64)
    impulse[0] = 1.0
    x0 = torch.zeros(opts.corrector_steps + 2, 16, dtype=torch.float64)
    x0[0] = impulse
    noise = _Impulses(impulse, opts.corrector_steps)
    x, _ = langevin_corrector(model, x0, U_END, noise, 0, comm=SerialComm(), options=opts)
    gain = torch.fft.rfft(x, norm="ortho") / torch.fft.rfft(impulse, norm="ortho")
    true = model.marginal_spectrum(U_END)
    out = gain[0].abs() ** 2 * true + (gain[1:].abs() ** 2).sum(0)
    stiffness = float(noise_std(torch.tensor(U_END)) ** 2 / true.min())
    assert stiffness > 0.6  # the test must reach modes where the step size matters
    assert torch.allclose(out, true, rtol=3e-3), out / true
    assert float(gain[0].abs().max()) < 0.999  # it does move the state

