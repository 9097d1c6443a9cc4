"""Exact quality of a sequential sampler on the Gaussian random field (docs/algorithms.md
section 7).

The ``grf`` score is linear and diagonal in Fourier space, so every sequential sampler here is
a linear map of its inputs, mode by mode: of the prior draw (gain g_k) and, for an SDE sampler,
of each step's noise xi_j (gain g_jk). Started from N(0, I) with white noise its output is
Gaussian with mode variances v_k = g_k^2 + sum_j g_jk^2, while its target (the VP marginal at
the grid's end, or the Tweedie mean's law with ``denoise_final``) has variances t_k. The
Wasserstein-2 distance between the two centred Gaussians with commuting covariances is then
exact, with no sampling error: W2^2 = sum_k w_k (sqrt(v_k) - sqrt(t_k))^2, w_k the mode's
multiplicity in the half spectrum. It is reported relative to the target's total standard
deviation sqrt(sum_k w_k t_k). Every gain is read from a run on a unit impulse, whose spectrum
is 1 at every mode: one run for an ODE sampler, one more per step for an SDE sampler.
"""
from __future__ import annotations

import dataclasses

import torch

from models.emulate import Emulated
from models.grf import GaussianRandomField, target_spectrum
from pipeline.comm import SerialComm
from pipeline.fourier import half_weights
from pipeline.grids import Grid
from pipeline.noise import Noise
from pipeline.samplers import REGISTRY, SAMPLERS, Options
from pipeline.samplers.options import CHURNS

# sequential samplers with no noise after the prior draw: linear maps, fixed by their gains (a
# parallel sampler that stops on a tolerance is not linear: when it stops depends on its input)
DETERMINISTIC = tuple(m for m, entry in REGISTRY.items() if entry.linear == "prior")
# sequential samplers that draw step noise with Noise.path, and nothing else: linear in it too
# (as is edm-heun with churn)
STOCHASTIC = tuple(m for m, entry in REGISTRY.items() if entry.linear == "path")


def draws_noise(method: str, options: Options = Options()) -> bool:
    """Whether ``method`` with ``options`` adds noise along its path (its exact W2 then takes
    one impulse run per step, not one run)."""
    return method not in DETERMINISTIC or (method == CHURNS and options.churn > 0)


IMPULSE_ROWS = 64  # noise impulses per run: bounds the memory of a block of path noise


class ImpulseNoise:
    """Stands in for ``pipeline.noise.Noise`` with unit impulses at pixel 0: row r starts from
    the impulse when ``prior_rows[r]``, and takes it as the noise of step ``steps[r]`` (-1:
    none); every other draw is zero."""

    def __init__(self, shape, prior_rows, steps):
        self.shape, self.prior_rows, self.steps = tuple(shape), list(prior_rows), list(steps)
        self.keys = tuple(range(len(self.steps)))

    def _impulses(self, rows: int, points: int) -> torch.Tensor:
        return torch.zeros((rows, points, *self.shape), dtype=torch.float64)

    def prior(self) -> torch.Tensor:
        """The prior draws (rows, *shape) float64: the impulse in the rows whose prior is on,
        zeros in the others."""
        out = self._impulses(len(self.keys), 1)[:, 0]
        for r, on in enumerate(self.prior_rows):
            out.view(len(self.keys), -1)[r, 0] = float(on)
        return out

    def path(self, lo: int, hi: int, rows=None) -> torch.Tensor:
        """The draws (len(rows), hi - lo, *shape) float64 of steps [lo, hi): a row's impulse
        at its step, zeros elsewhere."""
        rows = range(len(self.keys)) if rows is None else rows
        out = self._impulses(len(rows), hi - lo)
        for i, r in enumerate(rows):
            if lo <= self.steps[r] < hi:
                out[i, self.steps[r] - lo].view(-1)[0] = 1.0
        return out


def grf_gains(model: GaussianRandomField, method: str, grid: Grid,
              options: Options = Options()) -> torch.Tensor:
    """The per-mode gains g_k of ``method`` on ``grid`` (the rfft half-grid shape), from one
    run on a unit impulse, whose spectrum is 1 at every mode."""
    if draws_noise(method, options):
        raise ValueError(f"{method!r} adds noise along its path: grf_gains needs a "
                         f"deterministic sampler, one of {', '.join(DETERMINISTIC)}")
    impulse = torch.zeros((1, *model.shape), dtype=torch.float64)
    impulse.view(1, -1)[0, 0] = 1.0
    noise = Noise.members(0, 0, [0], model.shape, torch.float64)
    out, _ = SAMPLERS[method](model, impulse, grid, noise, comm=SerialComm(), options=options)
    return torch.fft.rfftn(out[0], dim=model.dims).real


def grf_variances(model: GaussianRandomField, method: str, grid: Grid,
                  options: Options = Options()) -> torch.Tensor:
    """The per-mode output variances v_k of ``method`` on ``grid`` (the rfft half-grid shape)
    from N(0, I) and white step noise (see above)."""
    if not draws_noise(method, options):
        return grf_gains(model, method, grid, options) ** 2
    if method not in STOCHASTIC + DETERMINISTIC:
        raise ValueError(f"{method!r} is not a sequential sampler: grf_variances takes one of "
                         f"{', '.join(DETERMINISTIC + STOCHASTIC)}")
    inputs = [-1, *range(grid.steps)]  # the prior, then each step's noise
    total = 0.0
    for a in range(0, len(inputs), IMPULSE_ROWS):
        chunk = inputs[a : a + IMPULSE_ROWS]
        noise = ImpulseNoise(model.shape, [j < 0 for j in chunk], chunk)
        out, _ = SAMPLERS[method](model, noise.prior(), grid, noise,
                                  comm=SerialComm(), options=options)
        total = total + (torch.fft.rfftn(out, dim=model.dims).real ** 2).sum(0)
    return total


def grf_w2(model: GaussianRandomField, method: str, grid: Grid,
           options: Options = Options()) -> float:
    """Relative W2 of ``method``'s output law on ``grid`` to its exact target (see above)."""
    # a law, not a timing: never through an emulated device (models.emulate), whose sleeps
    # over the impulse runs would take hours
    if isinstance(model, Emulated):
        model = model.base
    # the impulse runs draw their inputs on the host, in float64: so does the law's model
    model = dataclasses.replace(model, device="cpu")
    variances = grf_variances(model, method, grid, options)
    target = target_spectrum(model, float(grid.u[-1]), options.denoise_final).cpu()
    weights = half_weights(model.shape)
    w2 = (weights * (variances.sqrt() - target.sqrt()) ** 2).sum()
    return float((w2 / (weights * target).sum()).sqrt())
