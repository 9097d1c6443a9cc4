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

import torch

from pipeline.decomposition import owner_of, slice_bounds
from pipeline.grids import Grid
from pipeline.integrators import Steps, step_coefficients
from pipeline.noise import Noise
from pipeline.samplers.common import finish, evaluate, per_point, prefix_states, residual
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


def sweep(y0, b, e, *, comm, scan=None):
    """The states of one Picard sweep over a rank's slice [lo, hi) of a block (section 3),
    from its increments.

    y0 (B, *S) block start; b (B, n, *S) the increments drift_j g_j + noise_j xi_j at the
    previous sweep's states; e (n+1,) = E_lo..E_hi float64; scan: the prefix sum's dtype
    (``scan_dtype``; None: the fields'). Returns (inputs for the next sweep, states
    y_{lo+1..hi}), both (B, n, *S).
    """
    scan = scan or b.dtype
    first, after = prefix_states(y0.to(scan), b.to(scan), e, comm=comm)
    first, after = first.to(b.dtype), after.to(b.dtype)
    return torch.cat([first, after[:, :-1]], 1), after


class _Redo:
    """Members of a block whose sweeps diverged, each run on step by step from the last
    state its sweeps had made exact, a step a round beside the others' sweeps (in the same
    batched call), so that a member that diverged at sweep k ends at round k + (M - k) = M:
    a block takes no more rounds than steps whichever sweeps its members diverge at. Every
    rank steps them alike."""

    def __init__(self, like: torch.Tensor):
        self.rows = torch.zeros(0, dtype=torch.long)
        self.at = torch.zeros(0, dtype=torch.long)  # each member's next step in the block
        self.y = like.new_zeros((0, *like.shape[1:]))

    def add(self, rows: torch.Tensor, k: int, y: torch.Tensor) -> None:
        """Members ``rows`` (R,), exact at y (R, *S) after the block's first k steps."""
        self.rows = torch.cat([self.rows, rows])
        self.at = torch.cat([self.at, torch.full((rows.numel(),), k, dtype=torch.long)])
        self.y = torch.cat([self.y, y])

    def moving(self, m: int) -> torch.Tensor:
        """Which of them still have steps to take in a block of m, (R,) bool."""
        return self.at < m

    def step(self, g: torch.Tensor, steps: Steps, noise: Noise | None, start: int,
             m: int) -> None:
        """One step of the moving members, g (moving, *S) their scores; the step's noise
        drawn by its key (row, global step), as the sequential sampler's."""
        moving = self.moving(m)
        at, y = self.at[moving], self.y[moving]

        def each(c: torch.Tensor) -> torch.Tensor:  # a member's own step's coefficient
            return c[at].to(y.device, y.dtype).reshape(-1, *(1,) * (y.dim() - 1))

        y = each(steps.decay) * y + each(steps.drift) * g
        if noise is not None:
            xi = noise.path_at(self.rows[moving].tolist(), (start + at).tolist())
            y = y + each(steps.noise) * xi
        self.y[moving], self.at[moving] = y, at + 1


def _scores(model, inputs, u, redo: _Redo, u_block, m: int):
    """One batched model call: the sweep's points inputs (B, n, *S) at clocks u (n,) and the
    moving redone members at their next steps' clocks (``u_block`` (M,) the block's).
    Returns (g (B, n, *S), g of the redone members (moving, *S))."""
    moving = redo.moving(m)
    if not bool(moving.any()):  # the usual round: the sweep's own call, as before
        return evaluate(model, inputs, u), redo.y[:0]
    b, n, shape = *inputs.shape[:2], inputs.shape[2:]
    ys = torch.cat([inputs.reshape(b * n, *shape), redo.y[moving]])
    us = torch.cat([u.to(ys.device, ys.dtype).expand(b, n).reshape(-1),
                    u_block[redo.at[moving]].to(ys.device, ys.dtype)])
    g = model(ys, us)
    return g[: b * n].reshape(inputs.shape), g[b * n:]


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
    redo = _Redo(y0)
    history, calls, sweeps, rounds = [], 0.0, 0, 0
    while True:
        sweeping = rows.numel() > 0 and sweeps < min(options.max_sweeps, m)
        stepping = int(redo.moving(m).sum())
        if not sweeping and not stepping:
            break
        rounds += 1
        # 1. one batched model call at every point of the slice (and a redone member's step)
        g, g_redo = _scores(model, inputs[rows] if sweeping else inputs[:0], u[lo:hi], redo,
                            u, m)
        if stepping:
            redo.step(g_redo, steps, noise, start, m)
            calls += stepping
        if not sweeping:
            continue
        sweeps += 1
        # 2. one prefix sum (Exscan) of the increments
        b = per_point(mine.drift, g) * g
        if noise_term is not None:
            b = b + noise_term[rows]
        new_inputs, new_after = sweep(y0[rows], b, e[lo : hi + 1], comm=comm, scan=scan)
        # 3. the residual, the same on every rank (one Allreduce); 4. stop the settled rows
        r = comm.allreduce_max(residual(new_after, after[rows], mine.var)).cpu()
        inputs[rows], after[rows] = new_inputs, new_after
        calls += rows.numel() * m
        history.append(float(r.max()))
        if options.on_sweep is not None:
            options.on_sweep(start, sweeps, history[-1])
        bad = ~torch.isfinite(r) | (r > options.divergence_threshold)
        if bool(bad.any()):
            _diverged(rows[bad], sweeps, after, y0, redo, (start, m, lo), comm=comm,
                      options=options, history=history)
        keep = ~bad if options.tol is None else ~bad & (r > options.tol**2)
        rows = rows[keep]
    owner = owner_of(m, comm.size, m - 1)
    y_end = comm.bcast(after[:, -1] if comm.rank == owner else torch.empty_like(y0), owner)
    if redo.rows.numel():
        if not bool(torch.isfinite(redo.y).all()):
            raise PicardDivergence(
                f"the sequential steps from step {start} also give NaN/Inf: the model or the "
                "grid is broken there (check model output and sampler.u_min)")
        y_end[redo.rows] = redo.y
    # rows left sweeping at max_sweeps, short of the block's points, never reached tol
    unsettled = int(options.tol is not None and rows.numel() > 0 and sweeps < m)
    return y_end, Stats(rounds=rounds, model_calls=calls / batch, residuals=tuple(history),
                        sweeps=(sweeps,), fallbacks=int(redo.rows.numel() > 0),
                        unsettled=unsettled)


def _diverged(rows, k: int, after, y0, redo: _Redo, block, *, comm, options: Options,
              history) -> None:
    """Members ``rows`` whose residual went NaN/Inf or past the threshold at sweep k: run
    them on step by step from their state after the block's first k steps, which k sweeps
    made exact (each from the block start where its state is not finite), or raise, per
    ``on_divergence``. ``block``: (its first global step, its steps M, this rank's first)."""
    start, m, lo = block
    if options.on_divergence != "sequential":
        raise PicardDivergence(
            f"Picard residual went NaN/Inf or above {options.divergence_threshold:g} "
            f"(history {history[-3:]}) in the block starting at step {start}: use a smaller "
            "sampler.block_size, or set sampler.on_divergence = 'sequential'"
        )
    # the exact state lies in the rank that holds step k (the garbage that tripped the
    # threshold lies further on)
    owner = owner_of(m, comm.size, k - 1)
    at = comm.bcast(after[rows, k - 1 - lo] if comm.rank == owner else
                    torch.empty_like(y0[rows]), owner)
    # on the host, as ``rows`` is: a GPU mask cannot index a host tensor
    fine = torch.isfinite(at.flatten(1)).all(1).cpu()
    redo.add(rows[fine], k, at[fine])
    # where the model broke before step k (once: a lasting fault fails the steps too), from
    # the block start: these take k + M rounds
    redo.add(rows[~fine], 0, y0[rows[~fine]])


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
