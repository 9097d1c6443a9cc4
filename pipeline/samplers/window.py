"""ParaDiGMS sliding-window Picard sampler (docs/algorithms.md section 4), in the block framework.

Each trajectory keeps a window of p steps starting at its accepted state y_b. A sweep evaluates
the window's p scores in one batched call and rebuilds its states with one prefix sum (the
same unrolled recurrence as a Picard block: with E_c the product of the decays of steps
b .. b+c-1, y_{b+c} = E_c (y_b + sum_{k<c} (drift_k g_k + noise_k xi_k) / E_{k+1})); then it
accepts every state up to and including the first one whose residual is over tolerance (at
least one), slides the window there and fills the new tail with the window's end state. Noise
for step j is keyed by j, so sliding never changes it. With tol = 0 the window advances one
step per sweep: the sequential sampler.

Across ranks the window lives in p ring slots (``pipeline.samplers.ring``), as in pc-window:
sliding frees the accepted points' slots and nothing moves between ranks. A round costs two
buffer collectives: the Allgather of ``ring.chain_prefix`` (the prefix sums and the end state)
and one Allreduce of the p point residuals, from which every rank takes the same acceptance.
"""
from __future__ import annotations

import torch

from pipeline.decomposition import slice_bounds
from pipeline.grids import Grid
from pipeline.integrators import step_coefficients
from pipeline.noise import Noise
from pipeline.samplers.common import LIKELY_CAUSE, field_mean, finish, per_point, point_mask
from pipeline.samplers.options import (WINDOW_POINTS, Options, PicardDivergence, Stats,
                                      window_points)
from pipeline.samplers.ring import chain_index, chain_prefix, evaluate_window


def _padded(c: torch.Tensor, p: int, value: float) -> torch.Tensor:
    return torch.cat([c, torch.full((p,), value, dtype=c.dtype)])


def _fill(states, xi, freed, chain, e, y_end, noise: Noise | None, n: int):
    """Freed slots (B, M) bool with chain index ``chain`` now hold position e + chain: the
    window's end state ``y_end`` (B, *S) and, for the SDE, the keyed noise of that step."""
    states = torch.where(point_mask(freed, states), y_end[:, None], states)
    if noise is not None:
        drawn = [(r, col, step) for r, col in freed.nonzero().tolist()
                 if (step := int(e[r] + chain[r, col])) < n]
        xi[freed] = 0.0  # past the last step: no noise
        if drawn:  # one call for the round's new points
            rows, cols, steps = zip(*drawn)
            xi[list(rows), list(cols)] = noise.path_at(rows, steps).to(xi)
    return states, xi


def _accept(r, chain, width, start, y_end, tol: float, p: int, comm):
    """Step 3's acceptance, the same on every rank: the residuals ``r`` (B, own points) of
    this rank's points at ``chain`` (B, own points) joined by one Allreduce into r_all (B, p),
    and each row's accepted points, up to its first over ``tol`` (NaN counts as over) and at
    most its ``width`` (B,). PicardDivergence where the new start is NaN, or the window's
    end state ``y_end`` (B, *S) is: either would carry on into every later step. Returns
    (accepted (B,), r_all)."""
    batch = r.shape[0]
    local = torch.zeros((batch, p), dtype=torch.float64)
    local.scatter_(1, chain, r)
    r_all = comm.allreduce_sum(local)
    over = ~(r_all <= tol**2)
    first = torch.where(over.any(1), over.int().argmax(1), p)
    active = width > 0
    nan_start = (first < p) & ~torch.isfinite(r_all[torch.arange(batch), first.clamp(max=p - 1)])
    bad = active & (nan_start | ~torch.isfinite(y_end.flatten(1)).all(1).cpu())
    if bool(bad.any()):  # named at its first NaN point, not its window's start
        near = start + torch.where(nan_start, first, width)
        raise PicardDivergence(
            f"the window sampler went NaN/Inf near step {int(near[bad].min())}: "
            f"{LIKELY_CAUSE}; if sequential-sde stays finite there, lower sampler.tol")
    return torch.minimum(first, width), r_all


def _window(model, y0, grid: Grid, noise: Noise, *, comm, options: Options, stochastic: bool):
    if options.tol is None:
        raise ValueError("sampler.tol must be set for the window sampler (ParaDiGMS uses 0.1)")
    n, p = grid.steps, window_points(options.window, WINDOW_POINTS, grid.steps)
    bounds = [slice_bounds(p, comm.size, r) for r in range(comm.size)]
    lo, hi = bounds[comm.rank]
    steps = step_coefficients(grid.u, stochastic=stochastic, form=options.form)
    u = _padded(grid.u[:-1], 2 * p, float(grid.u[-1])).numpy()
    decay = _padded(steps.decay, 2 * p, 1.0)
    drift, var = _padded(steps.drift, 2 * p, 0.0), _padded(steps.var, 2 * p, 1.0)
    coef_noise = _padded(steps.noise, 2 * p, 0.0)
    step_noise = noise if stochastic else None
    batch = y0.shape[0]
    start = torch.zeros(batch, dtype=torch.long)
    states = y0[:, None].expand(batch, hi - lo, *y0.shape[1:]).clone()
    xi = torch.zeros_like(states)
    chain = torch.from_numpy(chain_index(lo, hi, start, p))
    states, xi = _fill(states, xi, torch.ones_like(chain, dtype=torch.bool), chain, start, y0,
                       step_noise, n)
    y_out = y0.clone()
    rows_all = torch.arange(batch)
    rounds, calls, history, advances = 0, 0, [], []
    while bool((start < n).any()):
        # 1. one batched model call at every window point this rank owns
        *index, g = evaluate_window(model, states, start, bounds, p, n, u, comm.rank)
        width, chain, pos, valid = map(torch.from_numpy, index)
        # 2. the prefix sum along the chain across ranks (ring.chain_prefix), with E_c the
        # decay products from the window start, c = 0 .. p
        e = torch.cat([torch.ones(batch, 1, dtype=torch.float64),
                       torch.cumprod(decay[start[:, None] + torch.arange(p)], 1)], 1)
        b = per_point(drift[pos], g) * g + per_point(coef_noise[pos], g) * xi
        w = torch.where(point_mask(valid, b), b / per_point(e.gather(1, chain + 1), b),
                        torch.zeros_like(b))
        sums, total, _ = chain_prefix(w, states, start, width, bounds, p, comm)
        new = per_point(e.gather(1, chain), sums) * sums
        y_end = per_point(e[rows_all, width][:, None], total[:, None])[:, 0] * total
        # 3. residual of point c >= 1 against the step that produced it (chain 0 is exact),
        # one Allreduce, and the same acceptance on every rank
        r = field_mean((new - states) ** 2, 2).cpu().double() / var[(pos - 1).clamp(min=0)]
        r = torch.where(valid & (chain > 0), r, torch.zeros_like(r))
        accept, r_all = _accept(r, chain, width, start, y_end, options.tol, p, comm)
        # 4. slide: kept points take their new values, freed slots the end state and new noise
        freed = valid & (chain < accept[:, None])
        states = torch.where(point_mask(valid, new), new, states)
        done = (width > 0) & (start + accept >= n)
        y_out[done] = y_end[done]
        e_next = start + p
        start = start + accept
        states, xi = _fill(states, xi, freed, chain, e_next, y_end, step_noise, n)
        rounds += 1
        calls += int(width.sum())
        history.append(float(r_all.max()))
        advances.append(int(accept.max()))
        if options.on_sweep is not None:
            options.on_sweep(int(start.min()), rounds, history[-1])
    stats = Stats(rounds=rounds, model_calls=calls / batch, residuals=tuple(history),
                  sweeps=tuple(advances))
    return finish(model, y_out, stats, float(grid.u[-1]), options)


def window_sde(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
               options: Options = Options()):
    """Sliding-window Picard on the reverse SDE from y0 (B, *S); returns (y (B, *S), Stats)."""
    return _window(model, y0, grid, noise, comm=comm, options=options, stochastic=True)


def window_ode(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
               options: Options = Options()):
    """Sliding-window Picard on the probability-flow ODE; returns (y (B, *S), Stats)."""
    return _window(model, y0, grid, noise, comm=comm, options=options, stochastic=False)
