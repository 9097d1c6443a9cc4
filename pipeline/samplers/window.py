"""ParaDiGMS sliding-window Picard sampler (ALGORITHM.md section 5), in the block framework.

Each trajectory keeps a window of p steps starting at its accepted state w0. A sweep evaluates
the window's p scores in one batched call and rebuilds its states with one prefix sum (the
same unrolled recurrence as a Picard block); then it accepts every state up to and including
the first one whose residual is over tolerance (at least one), slides the window there and
fills the new tail with the last state. Noise for step j is keyed by j, so sliding never
changes it. With tol = 0 the window advances one step per sweep: the sequential sampler.
"""
from __future__ import annotations

import torch

from pipeline.comm import SerialComm
from pipeline.grids import Grid
from pipeline.integrators import step_coefficients
from pipeline.noise import Noise
from pipeline.samplers.common import finish, evaluate, field_mean, per_point
from pipeline.samplers.options import Options, PicardDivergence, Stats


def _padded(c: torch.Tensor, p: int, value: float) -> torch.Tensor:
    return torch.cat([c, torch.full((p,), value, dtype=c.dtype)])


def _slide(states, xi, accept, w0, p, n, noise: Noise, stochastic: bool):
    """Shift each row's window by accept[b] and fill the new tail (last state, fresh noise)."""
    pos = torch.arange(p + 1)[None] + accept[:, None]
    idx = pos.clamp(max=p).reshape(*pos.shape, *(1,) * (states.dim() - 2))
    states = states.gather(1, idx.expand_as(states))
    if not stochastic:
        return states, xi
    src = (pos[:, :p]).clamp(max=p - 1).reshape(-1, p, *(1,) * (xi.dim() - 2))
    xi = xi.gather(1, src.expand_as(xi))
    for b in range(states.shape[0]):
        k = int(accept[b])
        new_steps = range(int(w0[b]) + p, min(int(w0[b]) + k + p, n))
        xi[b, p - k :] = 0
        if len(new_steps):
            xi[b, p - k : p - k + len(new_steps)] = noise.path(new_steps.start, new_steps.stop, [b])[0]
    return states, xi


def _window(model, y0, grid: Grid, noise: Noise, *, comm, options: Options, stochastic: bool):
    if comm.size != 1:
        raise NotImplementedError("the window sampler runs on one rank per trajectory group")
    if options.tol is None:
        raise ValueError("sampler.tol must be set for the window sampler (ParaDiGMS uses 0.1)")
    n, p = grid.steps, min(options.window, grid.steps)
    steps = step_coefficients(grid.u, stochastic=stochastic, form=options.form)
    u, decay = _padded(grid.u[:-1], p, float(grid.u[-1])), _padded(steps.decay, p, 1.0)
    drift, var = _padded(steps.drift, p, 0.0), _padded(steps.var, p, 1.0)
    coef_noise = _padded(steps.noise, p, 0.0)
    batch = y0.shape[0]
    states = y0[:, None].expand(batch, p + 1, *y0.shape[1:]).clone()
    xi = noise.path(0, p) if stochastic else torch.zeros_like(states[:, 1:])
    w0 = torch.zeros(batch, dtype=torch.long)
    rounds, calls, history, advances = 0, 0, [], []
    while bool((w0 < n).any()):
        rows = (w0 < n).nonzero().flatten()
        idx = w0[rows, None] + torch.arange(p)[None]
        valid = idx < n
        cur = states[rows]
        g = torch.zeros_like(cur[:, 1:])
        g[valid] = evaluate(model, cur[:, :p][valid][None], u[idx][valid])[0]
        b = per_point(drift[idx], g) * g + per_point(coef_noise[idx], g) * xi[rows]
        e = torch.cumprod(decay[idx], 1)
        after = per_point(e, b) * (cur[:, :1] + torch.cumsum(b / per_point(e, b), 1))
        r = field_mean((after - cur[:, 1:]) ** 2, 2) / var[idx].to(after.dtype)
        r = torch.where(valid, r, torch.zeros_like(r))
        over = ~(r <= options.tol**2)  # NaN counts as over tolerance
        first = torch.where(over.any(1), over.int().argmax(1) + 1, p)
        accept = torch.minimum(first, n - w0[rows])
        cur[:, 1:] = after
        cur, xi_rows = _slide(cur, xi[rows], accept, w0[rows], p, n,
                              noise.subset(rows.tolist()), stochastic)
        if not torch.isfinite(cur[:, 0]).all():
            raise PicardDivergence(
                f"the window sampler accepted a NaN/Inf state near step {int(w0[rows].min())}: "
                "check the model there, or lower sampler.tol"
            )
        states[rows], xi[rows] = cur, xi_rows
        w0[rows] += accept
        rounds += 1
        calls += int(valid.sum())
        history.append(float(r.max()))
        advances.append(int(accept.max()))
    y = states[:, 0]
    stats = Stats(rounds=rounds, model_calls=calls / batch, residuals=tuple(history),
                  sweeps=tuple(advances))
    return finish(model, y, stats, float(grid.u[-1]), options)


def window_sde(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm=SerialComm(),
               options: Options = Options()):
    """Sliding-window Picard on the reverse SDE from y0 (B, *S); returns (y (B, *S), Stats)."""
    return _window(model, y0, grid, noise, comm=comm, options=options, stochastic=True)


def window_ode(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm=SerialComm(),
               options: Options = Options()):
    """Sliding-window Picard on the probability-flow ODE; returns (y (B, *S), Stats)."""
    return _window(model, y0, grid, noise, comm=comm, options=options, stochastic=False)
