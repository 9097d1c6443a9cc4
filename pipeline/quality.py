"""Exact quality of a deterministic sampler on the Gaussian random field (docs/algorithms.md
section 7).

The ``grf`` score is linear and diagonal in Fourier space, so every probability-flow sampler
here is a linear map with one gain g_k per Fourier mode: started from N(0, I) its output is
Gaussian with mode variances g_k^2, while its target (the VP marginal at the grid's end, or the
Tweedie mean's law with ``denoise_final``) has variances t_k. The Wasserstein-2 distance
between the two centred Gaussians with commuting covariances is then exact, with no sampling
error: W2^2 = sum_k w_k (|g_k| - sqrt(t_k))^2, w_k the mode's multiplicity in the half
spectrum. It is reported relative to the target's total standard deviation sqrt(sum_k w_k t_k).
"""
from __future__ import annotations

import torch

from models.grf import GaussianRandomField, _full_weights, target_spectrum
from pipeline.grids import Grid
from pipeline.noise import Noise
from pipeline.samplers import SAMPLERS, Options

# sequential samplers with no noise after the prior draw: linear maps, fixed by their gains (a
# parallel sampler that stops on a tolerance is not linear: when it stops depends on its input)
DETERMINISTIC = ("sequential-ode", "dpmpp-2m", "edm-heun")


def grf_gains(model: GaussianRandomField, method: str, grid: Grid,
              options: Options = Options()) -> torch.Tensor:
    """The per-mode gains g_k of ``method`` on ``grid`` (the rfft half-grid shape), from one
    run on a unit impulse, whose spectrum is 1 at every mode."""
    if method not in DETERMINISTIC:
        raise ValueError(f"{method!r} adds noise along its path: grf_gains needs a "
                         f"deterministic sampler, one of {', '.join(DETERMINISTIC)}")
    impulse = torch.zeros((1, *model.shape), dtype=torch.float64)
    impulse.view(1, -1)[0, 0] = 1.0
    noise = Noise.members(0, 0, [0], model.shape, torch.float64)
    out, _ = SAMPLERS[method](model, impulse, grid, noise, options=options)
    return torch.fft.rfftn(out[0], dim=model.dims).real


def grf_w2(model: GaussianRandomField, method: str, grid: Grid,
           options: Options = Options()) -> float:
    """Relative W2 of ``method``'s output law on ``grid`` to its exact target (see above)."""
    gains = grf_gains(model, method, grid, options)
    target = target_spectrum(model, float(grid.u[-1]), options.denoise_final).cpu()
    weights = _full_weights(model.shape)
    w2 = (weights * (gains.abs() - target.sqrt()) ** 2).sum()
    return float((w2 / (weights * target).sum()).sqrt())
