"""Block-parallel Picard samplers PIADM-SDE and PIADM-ODE (docs/algorithms.md section 3).

Inside a block of M steps with start state y_0 and E_m = prod_{j<m} decay_j (= e^{t_m/2}),

    y_m = E_m ( y_0 + sum_{j<m} b_j / E_{j+1} ),   b_j = drift_j g_j + noise_j xi_j.

A sweep evaluates every g_j at the previous sweep's states in one batched call, then rebuilds
every y_m with one prefix sum. Each rank owns a contiguous slice [lo, hi) of the block's steps:
it evaluates its own g_j, takes a local cumsum and adds the exclusive scan of the slice totals
over the communicator (section 3). A member stops sweeping once its residual is within
tolerance; its states freeze there, so its result does not depend on who shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.decomposition import owner_of, slice_bounds
from pipeline.grids import Grid
from pipeline.integrators import Steps, step_coefficients
from pipeline.noise import Noise
from pipeline.samplers.common import finish, evaluate, per_point, prefix_states, residual, run_steps
from pipeline.samplers.corrector import langevin_corrector
from pipeline.samplers.options import Options, PicardDivergence, Stats


# The most a block's linear part E_m may grow across it for its prefix sum to run in the
# fields' own float32 (or lower): y_m = E_m (y0 + sum_j b_j / E_{j+1}) holds y_m / E_m beside
# y0, so a growth of 2^k costs k of float32's 24 bits. The ODE, whose score nearly cancels the
# growth, ended 1.0 from its path at u_max = 40 (growth e^20); past 2^8 the sum is float64.
SCAN_GROWTH = 2.0**8


def scan_dtype(e: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the prefix sum of a block whose products are e (M+1,) float64, for fields
    of ``dtype``: theirs, or float64 where their range would cost float32 its digits
    (``SCAN_GROWTH``). The same on every rank: from the whole block."""
    wide = dtype != torch.float64 and float(e.max() / e.min()) > SCAN_GROWTH
    return torch.float64 if wide else dtype


def sweep(model, y0, inputs, u, drift, e, noise_term, *, comm, scan=None):
    """One Picard sweep over a rank's slice [lo, hi) of a block (section 3).

    y0 (B, *S) block start; inputs (B, n, *S) states y_lo..y_{hi-1} of the previous sweep;
    u (n,) their clocks; drift (n,) and e (n+1,) = E_lo..E_hi float64; noise_term (B, n, *S)
    or None; scan: the prefix sum's dtype (``scan_dtype``; None: the fields'). Returns
    (inputs for the next sweep, states y_{lo+1..hi}), both (B, n, *S).
    """
    b = per_point(drift, inputs) * evaluate(model, inputs, u)
    if noise_term is not None:
        b = b + noise_term
    scan = scan or b.dtype
    first, after = prefix_states(y0.to(scan), b.to(scan), e, comm=comm)
    first, after = first.to(b.dtype), after.to(b.dtype)
    return torch.cat([first, after[:, :-1]], 1), after


def picard_block(model, y0, u, steps: Steps, noise: Noise | None, start: int, *, comm,
                 options: Options):
    """Sweep one block of M steps from y0 (B, *S) until tolerance or ``max_sweeps``.

    u (M,) clocks of the block's steps, steps their coefficients, ``start`` the global index of
    the block's first step (the noise key); noise None for the ODE. Returns (y_end, Stats).
    """
    m, batch, shape = u.numel(), y0.shape[0], y0.shape[1:]
    lo, hi = slice_bounds(m, comm.size, comm.rank)
    e = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(steps.decay, 0)])
    scan = scan_dtype(e, y0.dtype)
    mine = steps.slice(lo, hi)
    noise_term = None
    if noise is not None:
        xi = noise.path(start + lo, start + hi)
        noise_term = per_point(mine.noise, xi) * xi
    inputs = y0[:, None].expand(batch, hi - lo, *shape).clone()
    after = inputs.clone()
    rows = torch.arange(batch)
    history, calls, sweeps, diverged = [], 0, 0, []
    while rows.numel() and sweeps < min(options.max_sweeps, m):
        sweeps += 1
        # 1. one batched model call at every point of the slice, 2. one prefix sum (Exscan)
        new_inputs, new_after = sweep(
            model, y0[rows], inputs[rows], u[lo:hi], mine.drift, e[lo : hi + 1],
            None if noise_term is None else noise_term[rows], comm=comm, scan=scan,
        )
        # 3. the residual, the same on every rank (one Allreduce); 4. stop the settled rows
        r = comm.allreduce_max(residual(new_after, after[rows], mine.var)).cpu()
        inputs[rows], after[rows] = new_inputs, new_after
        calls += rows.numel() * m
        history.append(float(r.max()))
        if options.on_sweep is not None:
            options.on_sweep(start, sweeps, history[-1])
        bad = ~torch.isfinite(r) | (r > options.divergence_threshold)
        diverged += [(row, sweeps) for row in rows[bad].tolist()]
        keep = ~bad if options.tol is None else ~bad & (r > options.tol**2)
        rows = rows[keep]
    owner = owner_of(m, comm.size, m - 1)
    y_end = comm.bcast(after[:, -1] if comm.rank == owner else torch.empty_like(y0), owner)
    # rows left sweeping at max_sweeps, short of the block's points, never reached tol
    unsettled = int(options.tol is not None and rows.numel() > 0 and sweeps < m)
    stats = Stats(rounds=sweeps, model_calls=calls / batch, residuals=tuple(history),
                  sweeps=(sweeps,), unsettled=unsettled)
    if diverged:
        # after k sweeps a block's first k states are exact: the redo starts after the last
        # state every diverged row has exact (the garbage that tripped the threshold lies
        # further on), from the rank that holds it
        rows_out, exact = [row for row, _ in diverged], min(k for _, k in diverged)
        owner = owner_of(m, comm.size, exact - 1)
        at = comm.bcast(after[rows_out, exact - 1 - lo] if comm.rank == owner else
                        torch.empty_like(y0[rows_out]), owner)
        y_end, extra = _fallback(model, _Block(y0, u, steps, noise, start), y_end, rows_out,
                                 (exact, at), options=options, history=history)
        stats += extra
    return y_end, stats


@dataclass(frozen=True)
class _Block:
    """A block as ``picard_block`` was given it: start states, clocks, coefficients, noise
    (None for the ODE) and the global index of its first step."""

    y0: torch.Tensor
    u: torch.Tensor
    steps: Steps
    noise: Noise | None
    start: int


def _fallback(model, block: _Block, y_end, rows, restart, *, options: Options, history):
    """Redo the diverged ``rows`` of ``block`` step by step (every rank alike) or raise, per
    ``on_divergence``; ``y_end`` (B, *S) the block's end states so far; ``restart`` (k, the
    rows' exact states after the block's first k steps, (len(rows), *S)): the redo runs the
    steps from k on (from the block start, where those states are not finite)."""
    y0, u, steps, noise, start = block.y0, block.u, block.steps, block.noise, block.start
    if options.on_divergence != "sequential":
        raise PicardDivergence(
            f"Picard residual went NaN/Inf or above {options.divergence_threshold:g} "
            f"(history {history[-3:]}) in the block starting at step {start}: use a smaller "
            "sampler.block_size, or set sampler.on_divergence = 'sequential'"
        )
    m, (k, at) = u.numel(), restart
    if not bool(torch.isfinite(at).all()):  # the model broke at the start: redo it all
        k, at = 0, y0[rows]
    xi = None if noise is None else noise.path(start + k, start + m, rows)
    y_end = y_end.clone()
    y_end[rows] = run_steps(model, at, u[k:], steps.slice(k, m), xi)
    if not torch.isfinite(y_end[rows]).all():
        raise PicardDivergence(
            f"the sequential steps from step {start} also give NaN/Inf: the model or the grid "
            "is broken there (check model output and sampler.u_min)"
        )
    return y_end, Stats(rounds=m - k, model_calls=len(rows) * (m - k) / y0.shape[0],
                        fallbacks=1)


def _piadm(model, y0, grid: Grid, noise: Noise, *, comm, options: Options, stochastic: bool):
    steps = step_coefficients(grid.u, stochastic=stochastic, form=options.form)
    y, stats = y0, Stats()
    for n, (a, b) in enumerate(grid.blocks):
        y, s = picard_block(model, y, grid.u[a:b], steps.slice(a, b),
                            noise if stochastic else None, a, comm=comm, options=options)
        stats += s
        # none at u = 0 (a scheduler's grid may end there): no noise left to correct at
        if not stochastic and options.corrector_steps > 0 and float(grid.u[b]) > 0:
            y, s = langevin_corrector(model, y, float(grid.u[b]), noise, n, comm=comm,
                                      options=options)
            stats += s
    return finish(model, y, stats, float(grid.u[-1]), options)


def piadm_sde(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
              options: Options = Options()):
    """PIADM-SDE: block Picard on the reverse SDE from y0 (B, *S); returns (y (B, *S), Stats)."""
    return _piadm(model, y0, grid, noise, comm=comm, options=options, stochastic=True)


def piadm_ode(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
              options: Options = Options()):
    """PIADM-ODE: block Picard on the probability-flow ODE, each block followed by the
    Langevin corrector (off when ``corrector_steps = 0``); returns (y (B, *S), Stats)."""
    return _piadm(model, y0, grid, noise, comm=comm, options=options, stochastic=False)
