"""Sequential exponential-integrator samplers, the reference path (docs/algorithms.md section 2)."""
from __future__ import annotations

import torch

from pipeline.grids import Grid
from pipeline.integrators import step_coefficients
from pipeline.noise import Noise
from pipeline.samplers.common import check_finite, finish, run_steps
from pipeline.samplers.options import Options, Stats


def _sequential(model, y0, grid: Grid, noise: Noise, *, comm, options: Options,
                stochastic: bool):
    steps = step_coefficients(grid.u, stochastic=stochastic, form=options.form)
    y = y0
    # Block by block only to bound the noise held in memory; the path is one step at a time.
    for lo, hi in grid.blocks:
        xi = noise.path(lo, hi) if stochastic else None
        y = run_steps(model, y, grid.u[lo:hi], steps.slice(lo, hi), xi)
        check_finite(y, noise.keys, f"between steps {lo} and {hi}")  # once a block: no per-step sync
        if options.on_sweep is not None:  # a block is a "round" of progress, at its end step
            options.on_sweep(hi, hi - lo, 0.0)
    stats = Stats(rounds=grid.steps, model_calls=float(grid.steps), sweeps=(1,) * grid.steps)
    return finish(model, y, stats, float(grid.u[-1]), options)


def sequential_sde(model, y0: torch.Tensor, grid: Grid, noise: Noise, *,
                   comm, options: Options = Options()):
    """Sequential reverse SDE from y0 (B, *S) at u_max to u_min; returns (y (B, *S), Stats)."""
    return _sequential(model, y0, grid, noise, comm=comm, options=options, stochastic=True)


def sequential_ode(model, y0: torch.Tensor, grid: Grid, noise: Noise, *,
                   comm, options: Options = Options()):
    """Sequential probability-flow ODE from y0 (B, *S); returns (y (B, *S), Stats)."""
    return _sequential(model, y0, grid, noise, comm=comm, options=options, stochastic=False)
