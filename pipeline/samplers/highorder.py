"""Sequential second-order samplers of the probability-flow ODE (docs/algorithms.md section 7).

Both are written on the denoised mean D(y, u) = (y + s^2 score) / a (Tweedie), the quantity
their papers step with, on the OU clock's VP state y:

- ``dpmpp-2m``: DPM-Solver++(2M) of Lu et al. (2022), multistep in the half log-SNR
  lambda = log(a / s): y_i = (s_i / s_{i-1}) y_{i-1} + a_i (1 - e^{-h_i}) D', h_i = lambda_i -
  lambda_{i-1}, with D' = (1 + 1/(2 r)) D_{i-1} - 1/(2 r) D_{i-2}, r = h_{i-1} / h_i, and
  D' = D_{i-1} on the first step. One model call a step.
- ``dpmpp-2m-sde``: its SDE form. The reverse SDE's linear part is integrated exactly in
  lambda, y_i = (s_i / s_{i-1}) e^{-h} y_{i-1} + 2 a_i int e^{-2 (lambda_i - l)} D(l) dl +
  s_i sqrt(1 - e^{-2h}) xi_i, and D is taken linear in lambda through the last two denoised
  means: D' = D_{i-1} + k (D_{i-1} - D_{i-2}), k = (h - (1 - e^{-2h}) / 2) / ((1 - e^{-2h}) r h)
  (-> 1 / (2 r) as h -> 0, the ODE's). Its first step is DDPM's ancestral step, with the same
  keyed noise xi_i as ``sequential-sde``. One model call a step.
- ``edm-heun``: the second-order sampler of Karras et al. (2022): Euler in sigma = s / a on
  the VE state x = y / a, d = (x - D) / sigma, corrected by the slope at the step's end
  (Heun). Two model calls a step. With churn each step first lifts sigma to sigma (1 + gamma)
  by adding Gaussian noise of variance sigma^2 ((1 + gamma)^2 - 1), then steps from there.

Each returns after ``grid.steps`` steps with Stats whose rounds are its sequential model calls.
"""
from __future__ import annotations

import math

import torch

from pipeline.clock import noise_std, signal
from pipeline.decomposition import slice_bounds
from pipeline.grids import Grid
from pipeline.noise import Noise
from pipeline.samplers.common import check_finite, denoise, evaluate, finish, per_point, point_mask
from pipeline.samplers.options import Options, Stats


def half_log_snr(u: torch.Tensor) -> torch.Tensor:
    """lambda(u) = log(a / s) = -u/2 - log(1 - e^{-u}) / 2, float64 (N,)."""
    return -0.5 * u - 0.5 * torch.log(-torch.expm1(-u))


def dpmpp_2m_coefficients(u: torch.Tensor):
    """DPM-Solver++(2M) as an affine recurrence y_{i+1} = c_i y_i + e_i (alpha_i D_i + beta_i
    D_{i-1}) on the clocks u (N+1,): returns (c, e, alpha, beta), each float64 (N,)."""
    lam = half_log_snr(u)
    h = lam[1:] - lam[:-1]
    c = noise_std(u[1:]) / noise_std(u[:-1])
    e = -signal(u[1:]) * torch.expm1(-h)
    alpha, beta = torch.ones_like(h), torch.zeros_like(h)
    r = h[:-1] / h[1:]
    alpha[1:], beta[1:] = 1 + 1 / (2 * r), -1 / (2 * r)
    return c, e, *_first_order_into_zero(h, alpha, beta)


def _first_order_into_zero(h: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """(alpha, beta) with a step into u = 0 (a scheduler's grid may end there: h infinite)
    made first order: its value is the denoised mean D itself, which no extrapolation in
    lambda reaches (diffusers' lower_order_final)."""
    final = ~torch.isfinite(h)
    return alpha.masked_fill(final, 1.0), beta.masked_fill(final, 0.0)


def dpmpp_2m(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
             options: Options = Options()):
    """DPM-Solver++(2M) from y0 (B, *S) at u_max to u_min; returns (y (B, *S), Stats)."""
    u = grid.u.to(torch.float64)
    c, e, alpha, beta = dpmpp_2m_coefficients(u)
    y, previous = y0, torch.zeros_like(y0)  # beta_0 = 0: the first step is first order
    for i in range(grid.steps):
        d = denoise(model, y, float(u[i]))
        y = float(c[i]) * y + float(e[i]) * (float(alpha[i]) * d + float(beta[i]) * previous)
        previous = d
        if (i + 1) % 50 == 0 or i + 1 == grid.steps:  # a NaN shows within 50 steps, no sync per step
            check_finite(y, noise.keys, f"by step {i + 1}")
    stats = Stats(rounds=grid.steps, model_calls=float(grid.steps), sweeps=(1,) * grid.steps)
    return finish(model, y, stats, float(u[-1]), options)


def dpmpp_2m_sde_coefficients(u: torch.Tensor):
    """DPM-Solver++(2M) SDE as y_{i+1} = c_i y_i + e_i (alpha_i D_i + beta_i D_{i-1}) + g_i xi_i
    on the clocks u (N+1,): returns (c, e, alpha, beta, g), each float64 (N,)."""
    lam = half_log_snr(u)
    h = lam[1:] - lam[:-1]
    s_next = noise_std(u[1:])
    damp = -torch.expm1(-2 * h)  # 1 - e^{-2h}
    c = s_next / noise_std(u[:-1]) * torch.exp(-h)
    e = signal(u[1:]) * damp
    g = s_next * torch.sqrt(damp)
    alpha, beta = torch.ones_like(h), torch.zeros_like(h)
    r = h[:-1] / h[1:]
    k = (h[1:] - damp[1:] / 2) / (damp[1:] * r * h[1:])
    alpha[1:], beta[1:] = 1 + k, -k
    return c, e, *_first_order_into_zero(h, alpha, beta), g


def dpmpp_2m_sde(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
                 options: Options = Options()):
    """DPM-Solver++(2M) SDE from y0 (B, *S) at u_max to u_min, its noise keyed like
    ``sequential-sde``'s; returns (y (B, *S), Stats)."""
    u = grid.u.to(torch.float64)
    c, e, alpha, beta, g = dpmpp_2m_sde_coefficients(u)
    y, previous = y0, torch.zeros_like(y0)
    for lo, hi in grid.blocks:  # noise drawn a block at a time, as the sequential sampler's
        xi = noise.path(lo, hi)
        for i in range(lo, hi):
            d = denoise(model, y, float(u[i]))
            y = (float(c[i]) * y + float(e[i]) * (float(alpha[i]) * d + float(beta[i]) * previous)
                 + float(g[i]) * xi[:, i - lo])
            previous = d
        check_finite(y, noise.keys, f"between steps {lo} and {hi}")
    stats = Stats(rounds=grid.steps, model_calls=float(grid.steps), sweeps=(1,) * grid.steps)
    return finish(model, y, stats, float(u[-1]), options)


def edm_heun(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
             options: Options = Options()):
    """EDM's Heun sampler from y0 (B, *S), with its churn when ``options.churn`` > 0 (the
    churn noise of step i is ``noise.path``'s xi_i); returns (y (B, *S), Stats)."""
    u = grid.u.to(torch.float64)
    a = signal(u)
    sigma = noise_std(u) / a
    gamma = churn_gamma(options.churn, grid.steps)
    x = y0 / float(a[0])  # the VE state
    for lo, hi in grid.blocks:
        xi = noise.path(lo, hi) if gamma > 0 else None
        for i in range(lo, hi):
            x = _heun_step(model, x, float(sigma[i]), float(sigma[i + 1]), gamma,
                           None if xi is None else xi[:, i - lo])
        check_finite(x, noise.keys, f"between steps {lo} and {hi}")
    sweeps = tuple(1 if float(level) == 0 else 2 for level in sigma[1:])  # Euler into u = 0
    stats = Stats(rounds=sum(sweeps), model_calls=float(sum(sweeps)), sweeps=sweeps)
    return finish(model, x * float(a[-1]), stats, float(u[-1]), options)


def churn_gamma(churn: float, steps: int) -> float:
    """How far ``edm-heun`` lifts each step's noise level, sigma (1 + gamma), for ``churn``
    over ``steps`` steps (EDM's S_churn / N, capped at sqrt(2) - 1)."""
    return min(churn / steps, math.sqrt(2) - 1)


def _ve_denoise(model, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D at the VE state x (B, *S) of noise level sigma: the VP state is x a, u = log(1 +
    sigma^2)."""
    u = math.log1p(sigma**2)
    return denoise(model, x * math.exp(-u / 2), u)


def _heun_step(model, x, sigma: float, sigma_next: float, gamma: float, xi):
    """One Heun step of dx/dsigma = (x - D) / sigma from sigma to sigma_next, after raising the
    level to sigma (1 + gamma) with noise xi (churn; none when gamma = 0)."""
    level = sigma * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(level**2 - sigma**2) * xi
    d = (x - _ve_denoise(model, x, level)) / level
    end = x + (sigma_next - level) * d
    if sigma_next == 0:  # into the data (a scheduler's grid): Euler's step is D, as in EDM
        return end
    d_end = (end - _ve_denoise(model, end, sigma_next)) / sigma_next
    return x + (sigma_next - level) * 0.5 * (d + d_end)


def _chain(c: torch.Tensor, e0beta0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """How the values a slice's steps i = lo .. hi-1 produce depend on the two things it gets
    from before it, its input y_lo and the halo D_{lo-1} (through step lo's beta term): for
    c = c_lo .. c_{hi-1} (hi - lo,) returns (P, Q), each (hi - lo,) float64, with y_{i+1} =
    (a run from zero) + P_i y_lo + Q_i D_{lo-1}."""
    p = torch.cumprod(c, 0)
    return p, e0beta0 * p / c[0]


def dpmpp_2m_window(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
                    options: Options = Options()):
    """A sliding Picard window over DPM-Solver++(2M) (docs/algorithms.md section 7) from y0
    (B, *S): every round evaluates the denoised mean at all points from the first unsettled
    one, in one batched call, and rebuilds the path from them; a row's window start moves to
    its first point whose input changed by more than tol (mean square <= tol^2 settles it).
    The N points are cut into one contiguous slice per rank of ``comm`` (time slices); a round
    costs one Allgather (each slice's end state and last denoised mean) and one Allreduce (the
    next window starts). Returns (y (B, *S), Stats)."""
    if options.tol is None:
        raise ValueError("dpmpp-2m-window needs a tolerance (options.tol)")
    u = grid.u.to(torch.float64)
    n, batch = grid.steps, y0.shape[0]
    if n < comm.size:
        raise ValueError(f"dpmpp-2m-window: {n} steps over {comm.size} time slices leaves a "
                         "slice empty: use at most as many time slices as steps")
    c, e, alpha, beta = dpmpp_2m_coefficients(u)
    a, s = signal(u), noise_std(u)
    bounds = [slice_bounds(n, comm.size, q) for q in range(comm.size)]
    lo, hi = bounds[comm.rank]
    # (P, Q) of every slice's last point: how each slice's end depends on its input and halo
    ends = [tuple(float(t[-1]) for t in _chain(c[b0:b1], float(e[b0] * beta[b0])))
            for b0, b1 in bounds]
    p_own, q_own = _chain(c[lo:hi], float(e[lo] * beta[lo]))
    inputs = y0[:, None].expand(batch, hi - lo, *y0.shape[1:]).clone()  # own points y_lo ..
    dens = torch.zeros_like(inputs)
    end = y0.clone()
    start = torch.zeros(batch, dtype=torch.long)  # each row's first unsettled point
    active = torch.ones(batch, dtype=torch.bool)
    rounds, calls, history = 0, 0, []
    while bool(active.any()) and rounds < max(options.max_sweeps, n):
        rounds += 1
        rows = active.nonzero()[:, 0]
        first = int(start[rows].min())
        calls += rows.numel() * (n - first)
        here = max(first, lo)  # this slice's points in the window
        if here < hi:
            g = evaluate(model, inputs[rows, here - lo:], u[here:hi])
            fresh = ((inputs[rows, here - lo:] + per_point(s[here:hi] ** 2, g) * g)
                     / per_point(a[here:hi], g))
            mine = torch.arange(here, hi)[None] >= start[rows, None]  # (rows, points) re-evaluated
            dens[rows, here - lo:] = torch.where(point_mask(mine, g), fresh, dens[rows, here - lo:])
        old = inputs[rows].clone()
        new, y_end = _rebuild(inputs[rows], dens[rows], start[rows], c, e, alpha, beta, lo, hi,
                              p_own, q_own, ends, bounds, comm)
        inputs[rows] = new
        end[rows] = y_end
        change = ((new - old) ** 2).flatten(2).mean(-1).cpu()  # (rows, own points), on the host
        moved = (change > options.tol**2) & (torch.arange(lo, hi)[None] > start[rows, None])
        local = torch.stack([torch.where(moved.any(1), moved.float().argmax(1) + lo, n).double(),
                             -change.amax(1).double()], 1)
        shared = comm.allreduce_min(local)  # the first unsettled point, the largest change
        history.append(float(-shared[:, 1].min()))
        if options.on_sweep is not None:
            options.on_sweep(first, rounds, history[-1])
        # at least one point settles a round
        start[rows] = torch.maximum(shared[:, 0].long(), start[rows] + 1)
        active[rows] = start[rows] < n
    check_finite(end, noise.keys, "by the end of the window")
    stats = Stats(rounds=rounds, model_calls=calls / batch, residuals=tuple(history),
                  sweeps=(rounds,))
    return finish(model, end, stats, float(u[-1]), options)


def _rebuild(inputs, dens, start, c, e, alpha, beta, lo, hi, p_own, q_own, ends, bounds, comm):
    """The path rebuilt from the denoised means ``dens`` on this slice's points lo .. hi-1
    (inputs, dens (R, hi - lo, *S); start (R,) each row's window start, before which a point
    stays as it was). The slice first runs from zero input and zero halo, the slices' ends and
    last denoised means are gathered, and each slice's true input y_lo and halo D_{lo-1} are
    then composed from them (``_chain``). Returns (new inputs (R, hi - lo, *S), the path's end
    y_N (R, *S), the same on every rank)."""
    runs = torch.empty_like(inputs)  # the run from zero: y_{i+1} for i = lo .. hi-1
    first = inputs[:, 0]
    y = torch.where(point_mask(start >= lo, first), first, torch.zeros_like(first))
    for i in range(lo, hi):
        prev = dens[:, i - lo - 1] if i > lo else torch.zeros_like(y)
        step = float(c[i]) * y + float(e[i]) * (float(alpha[i]) * dens[:, i - lo]
                                                 + float(beta[i]) * prev)
        # before the row's window the point stays as it was
        kept = inputs[:, i + 1 - lo] if i + 1 < hi else torch.zeros_like(y)
        y = torch.where(point_mask(i + 1 <= start, step), kept, step)
        runs[:, i - lo] = y
    gathered = comm.allgather(torch.stack([runs[:, -1], dens[:, -1]], 1))  # (ranks, R, 2, *S)
    y_in = torch.zeros_like(y)  # the input of slice q, composed slice by slice
    for q, (b0, _) in enumerate(bounds):
        if q == comm.rank:
            y_lo, halo = y_in, gathered[q - 1, :, 1] if q else torch.zeros_like(y)
        p_end, q_end = ends[q]
        # the coefficient times the field first: a bool mask times a Python float is a
        # float32 tensor, which rounded the coefficient (1e-8 off in float64, 3 slices up)
        y_in = (gathered[q, :, 0] + p_end * y_in * point_mask(start < b0, y_in)
                + (q_end * gathered[q - 1, :, 1] * point_mask(start <= b0, y_in) if q else 0.0))
    if comm.rank:  # slice 0 starts from y_0 itself and has no halo (beta_0 = 0)
        shape = (1, -1) + (1,) * (y.dim() - 1)
        runs = (runs + (point_mask(start < lo, y) * y_lo)[:, None] * p_own.to(y).reshape(shape)
                + (point_mask(start <= lo, y) * halo)[:, None] * q_own.to(y).reshape(shape))
    new = torch.cat([torch.where(point_mask(start < lo, y), y_lo, inputs[:, 0])[:, None],
                     runs[:, :-1]], 1)
    return new, y_in
