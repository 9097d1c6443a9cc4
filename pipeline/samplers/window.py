"""ParaDiGMS sliding-window Picard sampler (docs/algorithms.md section 4), in the block framework.

Each trajectory keeps a window of p steps starting at its accepted state x0. A sweep evaluates
the window's p scores in one batched call and rebuilds its states with one prefix sum (the
same unrolled recurrence as a Picard block); then it accepts every state up to and including
the first one whose residual is over tolerance (at least one), slides the window there and
fills the new tail with the last state. Noise for step j is keyed by j, so sliding never
changes it. With tol = 0 the window advances one step per sweep: the sequential sampler.

Across ranks (section 6) each rank owns the window positions [lo, hi) of ``slice_bounds``: it
holds the states at positions lo..hi (inputs of its steps, and the one after its last), the
first position over tolerance is an Allreduce-min, and sliding moves states between ranks
with one all-to-all exchange (``_slide``).
"""
from __future__ import annotations

import torch

from pipeline.comm import SerialComm
from pipeline.decomposition import slice_bounds
from pipeline.grids import Grid
from pipeline.integrators import step_coefficients
from pipeline.noise import Noise
from pipeline.samplers.common import evaluate, field_mean, finish, per_point, prefix_states
from pipeline.samplers.options import Options, PicardDivergence, Stats

DEFAULT_WINDOW = 100  # p, as ParaDiGMS ships it


def _padded(c: torch.Tensor, p: int, value: float) -> torch.Tensor:
    return torch.cat([c, torch.full((p,), value, dtype=c.dtype)])


def _payload(t: torch.Tensor, dest: int, comm):
    """What goes into the exchange: the tensor itself for this rank, else a numpy copy (which
    pickles without torch's storage machinery)."""
    return t if dest == comm.rank else t.cpu().numpy()


def _slide(x0, after, xi, accept, p, comm):
    """Exchange window states after a sweep so every rank holds its positions shifted by
    ``accept`` (B,) per row. ``after`` (B, hi - lo, *S) are the fresh states at positions
    lo+1..hi, ``xi`` the noise of steps lo..hi-1. Returns (new x0 (B, *S), states at the new
    positions lo..hi (B, hi - lo + 1, *S), xi of the new steps lo..hi-1 with the tail that
    slid past the window left at zero (B, hi - lo, *S))."""
    bounds = [slice_bounds(p, comm.size, k) for k in range(comm.size)]
    lo, hi = bounds[comm.rank]
    outgoing = []
    for k, (klo, khi) in enumerate(bounds):
        parts = []
        for b, a in enumerate(accept.tolist()):
            # states: positions min(q, p) for q in [klo + a, khi + a]; the x0 at position a.
            for kind, q0, q1 in (("s", klo + a, khi + a), ("x0", a, a)):
                s0, s1 = max(min(q0, p), lo + 1), min(min(q1, p), hi)
                if s0 <= s1:
                    parts.append((kind, b, s0, _payload(after[b, s0 - lo - 1 : s1 - lo], k, comm)))
            t0, t1 = max(klo + a, lo), min(khi + a, p, hi)  # noise of steps [klo+a, khi+a)
            if t0 < t1:
                parts.append(("xi", b, t0, _payload(xi[b, t0 - lo : t1 - lo], k, comm)))
        outgoing.append(parts)
    states = torch.empty((x0.shape[0], hi - lo + 1, *x0.shape[1:]), dtype=after.dtype,
                         device=after.device)
    new_xi, new_x0 = torch.zeros_like(xi), torch.empty_like(x0)
    for parts in comm.alltoall_object(outgoing):
        for kind, b, start, values in parts:
            values, a = torch.as_tensor(values, device=after.device), int(accept[b])
            if kind == "x0":
                new_x0[b] = values[0]
            elif kind == "xi":
                new_xi[b, start - a - lo : start - a - lo + len(values)] = values
            else:
                # slot of position ``start``; slots whose position is past p repeat p
                first = max(start - a - lo, 0)
                states[b, first : first + len(values)] = values
                if start + len(values) - 1 == p:
                    states[b, first + len(values) :] = values[-1]
    return new_x0, states, new_xi


def _fresh_noise(xi, w0, accept, lo, hi, p, n, noise: Noise):
    """Fill the noise of steps that entered the window (slot j with j + accept >= p)."""
    for b in range(xi.shape[0]):
        first = max(lo, p - int(accept[b]))
        steps = range(int(w0[b]) + first, min(int(w0[b]) + hi, n))
        if len(steps):
            xi[b, first - lo : first - lo + len(steps)] = noise.path(steps.start, steps.stop, [b])[0]
    return xi


def _window(model, y0, grid: Grid, noise: Noise, *, comm, options: Options, stochastic: bool):
    if options.tol is None:
        raise ValueError("sampler.tol must be set for the window sampler (ParaDiGMS uses 0.1)")
    n, p = grid.steps, min(options.window or DEFAULT_WINDOW, grid.steps)
    lo, hi = slice_bounds(p, comm.size, comm.rank)
    steps = step_coefficients(grid.u, stochastic=stochastic, form=options.form)
    u, decay = _padded(grid.u[:-1], p, float(grid.u[-1])), _padded(steps.decay, p, 1.0)
    drift, var = _padded(steps.drift, p, 0.0), _padded(steps.var, p, 1.0)
    coef_noise = _padded(steps.noise, p, 0.0)
    batch = y0.shape[0]
    x0 = y0.clone()
    states = y0[:, None].expand(batch, hi - lo + 1, *y0.shape[1:]).clone()
    xi = torch.zeros_like(states[:, 1:])
    w0 = torch.zeros(batch, dtype=torch.long)
    if stochastic:
        xi = _fresh_noise(xi, w0, torch.full((batch,), p), lo, hi, p, n, noise)
    rounds, calls, history, advances = 0, 0, [], []
    while bool((w0 < n).any()):
        rows = (w0 < n).nonzero().flatten()
        idx = w0[rows, None] + torch.arange(lo, hi)[None]
        valid = idx < n
        cur = states[rows]
        g = torch.zeros_like(cur[:, 1:])
        on = valid.to(cur.device)
        g[on] = evaluate(model, cur[:, :-1][on][None], u[idx][valid])[0]
        b = per_point(drift[idx], g) * g + per_point(coef_noise[idx], g) * xi[rows]
        whole = w0[rows, None] + torch.arange(p)[None]
        e = torch.cat([torch.ones(len(rows), 1, dtype=torch.float64),
                       torch.cumprod(decay[whole], 1)], 1)[:, lo : hi + 1]
        _, after = prefix_states(x0[rows], b, e, comm=comm)
        r = field_mean((after - cur[:, 1:]) ** 2, 2).cpu() / var[idx].to(after.dtype)
        r = torch.where(valid, r, torch.zeros_like(r))
        over = ~(r <= options.tol**2)  # NaN counts as over tolerance
        local_first = torch.where(over.any(1), lo + over.int().argmax(1), p)
        first = torch.clamp(comm.allreduce_min(local_first) + 1, max=p)
        accept = torch.minimum(first, n - w0[rows])
        new_x0, new_states, new_xi = _slide(x0[rows], after, xi[rows], accept, p, comm)
        if not torch.isfinite(new_x0).all():
            raise PicardDivergence(
                f"the window sampler accepted a NaN/Inf state near step {int(w0[rows].min())}: "
                "check the model there, or lower sampler.tol"
            )
        w0[rows] += accept
        if stochastic:
            new_xi = _fresh_noise(new_xi, w0[rows], accept, lo, hi, p, n,
                                  noise.subset(rows.tolist()))
        x0[rows], states[rows], xi[rows] = new_x0, new_states, new_xi
        rounds += 1
        calls += int(comm.allreduce_sum(valid.sum().reshape(1))[0])
        history.append(float(comm.allreduce_max(r.amax().reshape(1) if r.numel()
                                                else torch.zeros(1, dtype=r.dtype))[0]))
        advances.append(int(accept.max()))
        if options.on_sweep is not None:
            options.on_sweep(int(w0.min()), rounds, history[-1])
    stats = Stats(rounds=rounds, model_calls=calls / batch, residuals=tuple(history),
                  sweeps=tuple(advances))
    return finish(model, x0, stats, float(grid.u[-1]), options)


def window_sde(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm=SerialComm(),
               options: Options = Options()):
    """Sliding-window Picard on the reverse SDE from y0 (B, *S); returns (y (B, *S), Stats)."""
    return _window(model, y0, grid, noise, comm=comm, options=options, stochastic=True)


def window_ode(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm=SerialComm(),
               options: Options = Options()):
    """Sliding-window Picard on the probability-flow ODE; returns (y (B, *S), Stats)."""
    return _window(model, y0, grid, noise, comm=comm, options=options, stochastic=False)
