"""Underdamped Langevin corrector of PIADM-ODE, solved by parallel Picard sweeps (section 4).

Target: the VP marginal at the block's end clock u_end, with the score frozen there:
dx = v dr, dv = (s(x, u_end) - gamma v) dr + sqrt(2 gamma) dB, v_0 ~ N(0, I).
Near the data end the score's stiffness grows like 1/s(u)^2, so time is measured in units of
the marginal noise scale s = s(u_end): delta = (length / N) s and gamma = gamma_0 / s keep
the step stable and the damping ratio fixed at every noise level. On that uniform grid of N
steps, with D = e^{-gamma delta}, the velocity takes an exact Ornstein-Uhlenbeck step with the
force frozen and the position a symplectic-Euler step:

    v_{n+1} = D v_n + (1 - D)/gamma * s(x_n) + sqrt(1 - D^2) zeta_n,   x_{n+1} = x_n + delta v_{n+1}.

Both are prefix sums, so a sweep is one batched score call on the current x-path and two scans.
The Brownian increments zeta are drawn once per block (keyed noise), so N sweeps reproduce the
sequential Langevin run exactly.
"""
from __future__ import annotations

import math

import torch

from pipeline.clock import noise_std
from pipeline.decomposition import owner_of, slice_bounds
from pipeline.samplers.common import evaluate, prefix_states
from pipeline.samplers.options import Options, Stats


def langevin_corrector(model, x0: torch.Tensor, u_end: float, noise, block: int, *, comm,
                       options: Options):
    """Run the corrector from x0 (B, *S) at clock u_end; returns (x (B, *S), Stats)."""
    scale = float(noise_std(torch.tensor(u_end, dtype=torch.float64)))
    n, gamma = options.corrector_steps, options.corrector_gamma / scale
    delta = options.corrector_length / n * scale
    d = math.exp(-gamma * delta)
    lo, hi = slice_bounds(n, comm.size, comm.rank)
    v0, zeta = noise.corrector(block, lo, hi)
    e = torch.tensor([d**m for m in range(lo, hi + 1)], dtype=torch.float64)
    u = torch.full((hi - lo,), u_end, dtype=torch.float64)
    xs = x0[:, None].expand(-1, hi - lo, *x0.shape[1:]).clone()
    sweeps = min(options.corrector_sweeps, n)
    for _ in range(sweeps):
        b = (1 - d) / gamma * evaluate(model, xs, u) + math.sqrt(1 - d * d) * zeta
        _, v_after = prefix_states(v0, b, e, comm=comm)
        ones = torch.ones(hi - lo + 1, dtype=torch.float64)
        x_lo, x_after = prefix_states(x0, delta * v_after, ones, comm=comm)
        xs = torch.cat([x_lo, x_after[:, :-1]], 1)
    owner = owner_of(n, comm.size, n - 1)
    x_end = comm.bcast(x_after[:, -1] if comm.rank == owner else torch.empty_like(x0), owner)
    return x_end, Stats(rounds=sweeps, model_calls=float(sweeps * n))
