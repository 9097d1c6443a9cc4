"""Work-efficient sliding window: predictor plus certified acceptance (docs/algorithms.md,
section "pc-window").

One step is y_{j+1} = Phi_j(y_j) = decay_j y_j + drift_j s(y_j, u_j) + noise_j xi_j. A window
of W <= p positions b .. b+W-1 starts at the accepted state Y_b. One round:

  1. evaluates the score at every window point in one batched call;
  2. rebuilds the window from the old states Y_k by
     Yhat_{n+1} = theta_n Yhat_n + Phi_n(Y_n) - theta_n Y_n,  Yhat_b = Y_b,
     one prefix sum once divided by the products P_n = theta_b ... theta_{n-1}:
     Yhat_n / P_n = Y_b + sum_{k=b}^{n-1} (Phi_k(Y_k) - theta_k Y_k) / P_{k+1}.
     theta_n is the step's largest Jacobian eigenvalue, J_max = decay - drift / vS (SDE): exact
     in the data's largest-variance directions, the ones that amplify an error; theta = 1
     (the whole step lagged, a plain prefix sum) for the ODE, where J_max measured no better;
  3. accepts the longest prefix whose error is certified, E_{n+1} <= tol * scale_n with
     E_{n+1} = theta_n E_n + L_n delta_n, E_{b+1} = 0, delta_k the RMS change of point k and
     L_k the largest |Jacobian eigenvalue - theta_k| of Phi_k over the score's eigenvalue range
     [-1/v0, -1/vS] (v0 = 1 - e^{-u}, vS = e^{-u} S + v0, S the data-covariance bound); at
     least one point, so never more rounds than steps; scale_n is the step's noise std (SDE)
     or 1 + RMS(Yhat_{n+1}) (ODE);
  4. refills the freed window slots past the window end by the predictor: steps with the
     denoiser given, not evaluated (no model call),
     Psi_j(y) = decay_j y + drift_j (e^{-u_j/2} x0hat_j - y) / v0_j + noise_j xi_j, where
     x0hat_j is the last evaluated point's Tweedie mean, frozen (SDE), or the quadratic in u
     through the Tweedie means of the window's last point and of every ODE_LAG-th point
     before it, extrapolated (ODE).

As tol -> 0 it is the sequential sampler with the same keyed noise. Every trajectory of a
batch keeps its own window, so its result does not depend on who shares its batch.

Across ranks (``pipeline.samplers.ring``): the window lives in p ring slots, each rank owns a
contiguous slot range and keeps the states and noise of its slots. A round costs two
collectives: one Allgather of each rank's run totals (two per rank: the window's head and the
part that wrapped around the ring) with the predictor's Tweedie means, from which
every rank forms its prefix offsets and the window's end state; and one Allreduce of the p
point changes, from which every rank takes the same acceptance. Freed slots are refilled
locally, regenerating the keyed noise of the predictor's steps.

Replicated (``Options.window_split``): every rank keeps the whole ring, evaluates an even share
of the round's points and joins the scores in one Allgather (``ring.evaluate_shared``); the
rest of the round is the one-rank round, the same on every rank. One collective a round and
calls within one point of each other, even where the window runs past the last step, for the
whole window's memory and host work on every rank and p B d words gathered a round. Each rank
ends its path by its own acceptance, so one more Allgather, of no points, checks that every
rank ended with it: a rank whose arithmetic parted ways would otherwise wait in the next
round's collective while the others have left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.comm import SerialComm
from pipeline.decomposition import slice_bounds
from pipeline.grids import Grid
from pipeline.integrators import Steps, step_coefficients
from pipeline.noise import Noise
from pipeline.samplers import secant
from pipeline.samplers.common import check_rows, finish, indices, per_point, point_mask
from pipeline.samplers.options import PC_WINDOW_POINTS, THETAS, Options, Stats, window_points
from pipeline.samplers.ring import chain_index, chain_prefix, evaluate_shared, evaluate_window

# The ODE's predictor extrapolates the denoiser through its values at the window's last point
# and every ODE_LAG-th point before it (a quadratic); the SDE's freezes it, since along the
# reverse SDE the denoiser is a martingale and its own value the best forecast (measured,
# docs/algorithms.md)
ODE_TERMS, ODE_LAG = 3, 8
# The rebuild divides a window's terms by products of theta and multiplies the sums back:
# theta is kept within e^{+-GROWTH_RANGE / p}, so no product over p steps leaves
# e^{+-GROWTH_RANGE}, far inside float32's range. Only coarse grids reach the limit (a step
# long enough to make J_max <= 0): there theta is the limit, the certificate uses it.
GROWTH_RANGE = 30.0


@dataclass(frozen=True)
class Tables:
    """Per-step float64 coefficients (N + 2p,), padded past the last step with a step that
    does nothing, so window positions past the end need no special case. numpy on the host,
    like the rest of a round's bookkeeping (``pipeline.samplers.ring``)."""

    u: np.ndarray
    noise: np.ndarray  # the step noise's std
    v0: np.ndarray  # 1 - e^{-u}: the marginal noise variance
    vs: np.ndarray  # e^{-u} S + v0: the largest marginal variance (``variance_bound``)
    alpha: np.ndarray  # predictor: decay - drift / v0
    beta: np.ndarray  # predictor: drift e^{-u/2} / v0 (the x0hat coefficient)
    lipschitz: np.ndarray  # L_k: the largest |Jacobian eigenvalue - theta_k| of Phi_k
    # the coefficients of Phi_k(y) - theta_k y on y, the score and the noise (decay - theta,
    # drift, noise), (N + 2p, 3): side by side, so that a round gathers them at once
    increment: np.ndarray
    # log P: the cumulative sum of log theta_k, (N + 2p + 1,); P_n / P_b = e^{growth[n] -
    # growth[b]}. None where theta = 1 (the ODE): nothing to scale
    growth: np.ndarray | None
    tweedie: np.ndarray  # e^{u/2}: x0hat = e^{u/2} (y + v0 s(y, u))
    decay: np.ndarray  # the step's own decay (1 past the last step), for a learned theta
    # G_k, at least 1: how much an error in the state at position k can grow by the path's end
    # (the product of the steps' largest |Jacobian eigenvalue| from k on), (N + 2p + 1,); the
    # learned corrector's certificate divides its tolerance by it. None: not used
    to_end: np.ndarray | None = None


def lipschitz(steps: Steps, u: torch.Tensor, bound: float,
              theta: torch.Tensor | float = 1.0) -> torch.Tensor:
    """L_k = max over the score's eigenvalues -lambda in [-1/v0, -1/vS] of
    |decay - theta - drift lambda|, (N,) float64, for clocks u (N,) of the steps, data-covariance
    bound ``bound`` (S; inf is the safe choice) and the rebuild's theta (N,) or a number."""
    v0 = -torch.expm1(-u)
    d = steps.decay - theta
    return torch.maximum((d - steps.drift / variance_bound(u, bound)).abs(),
                         (d - steps.drift / v0).abs())


def variance_bound(u: torch.Tensor, bound: float) -> torch.Tensor:
    """vS = e^{-u} S + (1 - e^{-u}), (N,): the largest marginal variance at clocks u (N,) for
    data-covariance bound S (inf where S is)."""
    if bound == float("inf"):
        return torch.full_like(u, bound)
    return torch.exp(-u) * bound - torch.expm1(-u)


def tables(grid: Grid, steps: Steps, bound: float, p: int, theta: str = "j_max") -> Tables:
    """The padded coefficient tables of ``grid`` for a window of p (see ``Tables``); ``theta``
    "j_max" (within ``GROWTH_RANGE``), "one", or "secant" (learned per mode by
    ``pipeline.samplers.secant``; its certificate keeps j_max's growth and bound)."""
    u = grid.u[:-1]
    v0 = -torch.expm1(-u)
    if theta not in THETAS:
        raise ValueError(f"theta = {theta!r}: use one of {', '.join(THETAS)}")
    pad = lambda t, value: torch.cat([t, torch.full((2 * p,), value, dtype=t.dtype)])  # noqa: E731
    factor, growth = torch.ones_like(u), None
    if theta in ("j_max", "secant"):
        limit = GROWTH_RANGE / p
        factor = (steps.decay - steps.drift / variance_bound(u, bound)).clamp(
            math.exp(-limit), math.exp(limit))
        logs = torch.cat([torch.zeros(1, dtype=u.dtype), torch.cumsum(torch.log(factor), 0)])
        growth = pad(logs, float(logs[-1])).numpy()
    dec, drift, noise = pad(steps.decay - factor, 0.0), pad(steps.drift, 0.0), pad(steps.noise, 0.0)
    alpha, to_end = steps.decay - steps.drift / v0, None
    if theta == "secant":  # eigenvalues between alpha and J_max, unclamped here
        top = (steps.decay - steps.drift / variance_bound(u, bound)).abs().maximum(alpha.abs())
        logs = torch.cat([torch.log(top).flip(0).cumsum(0).flip(0), torch.zeros(1 + 2 * p,
                                                                                 dtype=u.dtype)])
        to_end = logs.clamp_min(0).exp().numpy()
    return Tables(
        u=pad(u, float(grid.u[-1])).numpy(), noise=noise.numpy(), v0=pad(v0, 1.0).numpy(),
        vs=pad(variance_bound(u, bound), 1.0).numpy(),
        alpha=pad(alpha, 1.0).numpy(),
        beta=pad(steps.drift * torch.exp(-u / 2) / v0, 0.0).numpy(),
        lipschitz=pad(lipschitz(steps, u, bound, factor), 0.0).numpy(),
        increment=torch.stack([dec, drift, noise], 1).numpy(), growth=growth,
        tweedie=pad(torch.exp(u / 2), 1.0).numpy(), decay=pad(steps.decay, 1.0).numpy(),
        to_end=to_end,
    )


def growth(t: Tables, start, pos) -> np.ndarray:
    """P_pos / P_start, float64 shaped like pos: the product of theta over the steps from each
    row's window start (start (B,)) to positions pos (B, *)."""
    if t.growth is None:
        return np.ones(np.shape(pos))
    start = np.asarray(start).reshape(-1, *(1,) * (np.ndim(pos) - 1))
    return np.exp(t.growth[pos] - t.growth[start])


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the field dims of x (B, M, *S), float64 (B, M)."""
    field = x.flatten(2)
    return torch.linalg.vector_norm(field, dim=-1, dtype=torch.float64) / field.shape[-1] ** 0.5


def accept(delta, y_rms, start, width, t: Tables, tol: float, stochastic: bool,
           lipschitz: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: points to accept per trajectory and the certified bound of the last one.

    delta (B, p) float64: RMS change of chain point c (position start + c) this round; y_rms
    (B, p+1): RMS of the new states Yhat at chain points 0..p; start, width (B,) int: window
    start and evaluated points; lipschitz (B, p) float64: L at each chain point, where not the
    tables' bound (a learned theta's measured slopes). The SDE's scale is the step's noise,
    over the growth to the path's end where the tables give it (``Tables.to_end``). Returns
    (accepted (B,) int64 in [1, width], bound / scale (B,) float64), numpy; rows with width 0
    accept 0."""
    delta, y_rms = np.asarray(delta), np.asarray(y_rms)
    start, width = np.asarray(start), np.asarray(width)
    c = np.arange(delta.shape[1] + 1)
    pos = start[:, None] + c  # position of chain point c
    grow = growth(t, start, pos)
    # E_n / P_n is a plain sum (step 3), as Yhat_n / P_n is in step 2
    slopes = t.lipschitz[pos[:, :-1]] if lipschitz is None else lipschitz
    contrib = slopes * delta / grow[:, 1:]
    contrib[:, 0] = 0.0  # Y_b is exact
    bound = np.concatenate([np.zeros_like(contrib[:, :1]), np.cumsum(contrib, 1)], 1) * grow
    if stochastic:
        scale = t.noise[np.maximum(pos - 1, 0)]
        if t.to_end is not None:  # what the point's error becomes by the path's end
            scale = scale / t.to_end[pos]
    else:
        scale = 1 + y_rms
    ok = bound <= tol * scale  # NaN is never ok
    ok[:, 0] = True
    ok &= c[None] <= width[:, None]
    accepted = np.cumprod(ok[:, 1:], 1, dtype=np.int64).sum(1)
    accepted = np.minimum(np.maximum(accepted, 1), width)
    rows = np.arange(len(start))
    with np.errstate(invalid="ignore", divide="ignore"):  # a finished row's scale may be 0
        return accepted, bound[rows, accepted] / scale[rows, accepted]


def lagrange_weights(nodes: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Weights (B, J, K) float64 with which sum_i w[r, j, i] f(nodes[r, i]) is the polynomial
    through the points (nodes[r, i], f(nodes[r, i])) evaluated at ``at[r, j]``; nodes (B, K),
    at (B, J) float64. A NaN node is missing: it weighs 0 and the polynomial goes through the
    others (none: all weigh 0). Products in the nodes' order, so a row's weights do not depend
    on the other rows."""
    nodes, at = np.asarray(nodes, dtype=np.float64), np.asarray(at, dtype=np.float64)
    have = ~np.isnan(nodes)
    terms, every = nodes.shape[1], bool(have.all())
    w = np.ones(at.shape + (terms,))
    with np.errstate(invalid="ignore", divide="ignore"):  # a missing node's factors are NaN
        for i in range(terms):
            for m in range(terms):
                if m != i:
                    factor = (at - nodes[:, m, None]) / (nodes[:, i] - nodes[:, m])[:, None]
                    w[:, :, i] *= factor if every else np.where(have[:, m, None], factor, 1.0)
    if every:
        return w
    w = np.where(have[:, None, :], w, 0.0)
    few = have.sum(1) <= 1  # a constant (or nothing): the same weights everywhere
    w[few] = have[few][:, None, :]
    return w


def _coefficients(e: np.ndarray, depth: int, t: Tables,
                  nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predictor's Y_{e+j} = A_j Y_e + sum_i C_j[i] x0hat^(i) for j < depth, with the
    denoiser extrapolated from its values at clocks ``nodes`` (B, K) (NaN: missing):
    (A (B, depth), C (B, depth, K)) float64, per batch row.

    Psi_j(y) = alpha_j y + beta_j x0hat_j is affine in y, and x0hat_j a fixed combination of
    the given denoiser values, so a predicted state is a few coefficients per state in closed
    form: a step-by-step loop over fields would dispatch a few small kernels per step, the
    bulk of a round's host time on many ranks. The recurrence runs over the steps with every
    row at once, elementwise in numpy, so a row's values do not depend on the others (a loop
    per row in plain floats, the same products, cost 1.4 of 3.7 s on 256 gmm members)."""
    k = e[:, None] + np.arange(depth - 1)[None]
    weights = lagrange_weights(nodes, t.u[k])  # (B, depth - 1, K)
    alpha, beta = t.alpha[k], t.beta[k]
    on_y = np.ones((len(e), depth))
    on_x = np.zeros((len(e), depth, nodes.shape[1]))
    for j in range(depth - 1):
        on_y[:, j + 1] = alpha[:, j] * on_y[:, j]
        on_x[:, j + 1] = alpha[:, j, None] * on_x[:, j] + beta[:, j, None] * weights[:, j]
    return on_y, on_x


def _combine(on_y: np.ndarray, on_x0: np.ndarray, y: torch.Tensor,
             x0: torch.Tensor) -> torch.Tensor:
    """on_y (*P) y + sum_i on_x0 (*P, K)[..., i] x0^(i): fields (*P, *S) from coefficients
    (float64 numpy) and y (*Q, *S), x0 (*Q, K, *S) with Q broadcasting to P, in y's dtype."""
    shape = on_y.shape + (1,) * (y.dim() - on_y.ndim)
    out = torch.from_numpy(on_y).to(y.device, y.dtype).reshape(shape) * y
    c = torch.from_numpy(on_x0).to(y.device, y.dtype)
    for i in range(on_x0.shape[-1]):
        out = out + c[..., i].reshape(shape) * x0.select(on_y.ndim, i)
    return out


def predict(y_e: torch.Tensor, x0hat: torch.Tensor, e, upto, t: Tables, noise: Noise | None,
            n: int, nodes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: predictor states Y_{e+j} and noise xi_{e+j} for j = 0 .. max(upto), from
    Y_e = y_e (B, *S) with the denoiser frozen at x0hat (B, *S), or, given ``nodes`` (B, K)
    float64, extrapolated from its values x0hat (B, K, *S) at those clocks (NaN: missing) by
    the polynomial through them. e, upto (B,) int; row r needs j <= upto[r] (-1: none).
    Returns (states, noise), each (B, J + 1, *S); noise is zero past step n or where not
    needed, and for the ODE (``noise`` None)."""
    e, upto = np.asarray(e), np.asarray(upto)
    batch, depth = y_e.shape[0], int(upto.max()) + 1
    xi = torch.zeros((batch, depth, *y_e.shape[1:]), dtype=y_e.dtype, device=y_e.device)
    if depth == 0:  # no row needs a point
        return torch.empty_like(xi), xi
    if nodes is None:  # one node anywhere: a constant
        x0hat, nodes = x0hat[:, None], np.zeros((batch, 1))
    on_y, on_x0 = _coefficients(e, depth, t, np.asarray(nodes, dtype=np.float64))
    states = _combine(on_y, on_x0, y_e[:, None], x0hat[:, None])
    if noise is None:
        return states, xi
    k = e[:, None] + np.arange(depth - 1)[None]
    rows, cols = [], []  # every row's steps e .. min(e + upto, n - 1), drawn in one call
    for r in range(batch):
        count = max(0, min(int(e[r] + upto[r]) + 1, n) - int(e[r]))
        rows += [r] * count
        cols += range(count)
    if rows:
        xi[rows, cols] = noise.path_at(rows, [int(e[r]) + c for r, c in zip(rows, cols)]).to(xi)
    # the noise's part has no closed form as cheap: the steps' own draws, accumulated in place
    a = per_point(torch.from_numpy(t.alpha[k]), xi).unbind(1)
    c = per_point(torch.from_numpy(t.noise[k]), xi).unbind(1)
    acc = torch.zeros_like(states)
    sums, xs = acc.unbind(1), xi.unbind(1)
    for j in range(depth - 1):
        torch.mul(a[j], sums[j], out=sums[j + 1])
        sums[j + 1].addcmul_(c[j], xs[j])
    return states.add_(acc), xi


def _col(c: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Per-row coefficients (B,) shaped to broadcast against (B, *S)."""
    return torch.from_numpy(c).to(like.device, like.dtype).reshape(-1, *(1,) * (like.dim() - 1))


def denoiser_nodes(start, width, terms: int, lag: int) -> np.ndarray:
    """Positions (B, terms) int64 of the window points whose denoiser values the predictor
    extrapolates: the window's last point and every ``lag``-th one before it; -1 where the
    window (start, width (B,) int) is too short."""
    start, width = np.asarray(start), np.asarray(width)
    pos = (start + width - 1)[:, None] - lag * np.arange(terms)[None]
    return np.where((pos >= start[:, None]) & (width[:, None] > 0), pos, -1)


def _refill(states, xi, freed, chain, e, y_e, x0hat, nodes, t, noise, n):
    """Put the predictor's states and noise into the freed slots: slot with chain index c
    now holds position e + c (only positions before n matter). The ODE (``noise`` None, no
    noise kept) forms only its own slots' points."""
    need = freed & (e[:, None] + chain < n)
    if not need.any():
        return states, xi
    clocks = np.where(nodes >= 0, t.u[np.maximum(nodes, 0)], np.nan)
    rows, cols = need.nonzero()
    at = chain[rows, cols]
    r_t, c_t = indices(states, rows, cols)
    if noise is None:
        on_y, on_x0 = _coefficients(e, int(at.max()) + 1, t, clocks)
        states[r_t, c_t] = _combine(on_y[rows, at], on_x0[rows, at], y_e[r_t], x0hat[r_t])
        return states, xi
    upto = np.where(need, chain, -1).max(1)
    pred, pred_xi = predict(y_e, x0hat, e, upto, t, noise, n, clocks)
    (a_t,) = indices(states, at)
    states[r_t, c_t] = pred[r_t, a_t]
    xi[r_t, c_t] = pred_xi[r_t, a_t]
    return states, xi


def _rebuild(states, g, xi, start, width, pos, valid, nodes, t: Tables, p, bounds, comm):
    """Step 2 on this rank's slots: Yhat from one chain prefix sum of the old states' terms
    (Phi_k(Y_k) - theta_k Y_k) / P_{k+1} (``ring.chain_prefix``), times P_n. Returns (Yhat at
    each own point (B, hi - lo, *S), the state after the window's last point (B, *S), the
    Tweedie means at positions ``nodes`` (B, K) (B, K, *S), zero where a node is -1), the last
    two the same on every rank."""
    coef = t.increment[pos]
    if t.growth is not None:  # the division by P_{k+1} folds into the step's coefficients
        coef = coef / growth(t, start, pos + 1)[..., None]
    on_y, on_g, on_xi = per_point(torch.from_numpy(coef), states).unbind(2)
    d = torch.mul(on_y, states).addcmul_(on_g, g)
    if xi is not None:  # the ODE keeps no noise
        d.addcmul_(on_xi, xi)
    if not valid.all():
        d = torch.where(point_mask(torch.from_numpy(valid), d), d, torch.zeros_like(d))
    # the Tweedie means at the predictor's nodes, each from the rank that holds it
    rows, cols, terms = (valid[..., None] & (pos[..., None] == nodes[:, None])).nonzero()
    x0part = torch.zeros((states.shape[0], nodes.shape[1], *states.shape[2:]),
                         dtype=states.dtype, device=states.device)
    if len(rows):
        k = pos[rows, cols]
        rows, cols, terms = indices(states, rows, cols, terms)
        at = states[rows, cols]
        x0part[rows, terms] = torch.addcmul(at, _col(t.v0[k], at), g[rows, cols]).mul_(
            _col(t.tweedie[k], at))
    prefix, y_e, x0hat = chain_prefix(d, states, start, width, bounds, p, comm, extra=x0part)
    if t.growth is not None:
        prefix = prefix.mul_(per_point(torch.from_numpy(growth(t, start, pos)), prefix))
        y_e = y_e.mul_(_col(growth(t, start, np.asarray(start) + width), y_e))
    return prefix, y_e, x0hat


def _pc_window(model, y0, grid: Grid, noise: Noise, *, comm, options: Options,
               stochastic: bool):
    if options.tol is None:
        raise ValueError("pc-window needs sampler.tol (a number, or 'auto' to calibrate it)")
    n = grid.steps
    p = window_points(options.window, PC_WINDOW_POINTS, n)
    # the ranks that split the ring's slots: replicated, each rank holds them all
    shared = options.window_split == "replicated" and comm.size > 1
    ring = SerialComm() if shared else comm
    lo, hi = slice_bounds(p, ring.size, ring.rank)
    bounds = [slice_bounds(p, ring.size, r) for r in range(ring.size)]
    steps = step_coefficients(grid.u, stochastic=stochastic, form=options.form)
    t = tables(grid, steps, options.data_bound, p, options.theta if stochastic else "one")
    learned = stochastic and options.theta == "secant"
    step_noise = noise if stochastic else None
    batch, shape = y0.shape[0], y0.shape[1:]
    start = np.zeros(batch, dtype=np.int64)
    states = torch.empty((batch, hi - lo, *shape), dtype=y0.dtype, device=y0.device)
    xi = torch.zeros_like(states) if stochastic else None
    terms, lag = (1, 1) if stochastic else (ODE_TERMS, min(ODE_LAG, max(1, (p - 1) // 2)))
    chain = chain_index(lo, hi, start, p)
    nowhere = np.full((batch, terms), -1)  # the first guesses: the prior mean, 0
    states, xi = _refill(states, xi, np.ones_like(chain, dtype=bool), chain, start,
                         y0, torch.zeros((batch, terms, *shape), dtype=y0.dtype,
                                         device=y0.device), nowhere, t, step_noise, n)
    y_out = y0.clone()
    sec = secant.begin(states) if learned else None
    rounds, calls, history, advances = 0, 0, [], []
    rows = np.arange(batch)
    while (start < n).any():
        # 1. one batched model call at every window point this rank owns
        if shared:
            width, chain, pos, valid, g = evaluate_shared(model, states, start, p, n, t.u, comm)
        else:
            width, chain, pos, valid, g = evaluate_window(model, states, start, bounds, p, n,
                                                          t.u, comm.rank)
        # 2. whole-step increments, summed along the chain across ranks (ring.py)
        nodes = denoiser_nodes(start, width, terms, lag)
        if learned:  # the corrector learned per mode (secant.py)
            ell = secant.learn(sec, states, g, pos, valid, t, options.data_bound,
                               fold=len(bounds) > 1)
            prefix, y_e, x0hat = secant.rebuild(sec, states, g, xi, start, width, pos, valid,
                                                t, options.data_bound, bounds, ring)
        else:
            prefix, y_e, x0hat = _rebuild(states, g, xi, start, width, pos, valid, nodes, t, p,
                                          bounds, ring)
        # 3. certified acceptance, the same on every rank
        local = np.zeros((batch, 3 if learned else 2, p))
        r_idx, s_idx = valid.nonzero()
        c_idx = chain[r_idx, s_idx]
        local[r_idx, 0, c_idx] = rms(prefix - states).cpu().numpy()[r_idx, s_idx]
        local[r_idx, 1, c_idx] = rms(prefix).cpu().numpy()[r_idx, s_idx]
        slopes = None
        if learned:  # each point's slope from the rank that holds it, 1 + ell (0: none)
            local[r_idx, 2, c_idx] = np.where(np.isnan(ell), 0.0, ell + 1)[r_idx, s_idx]
        if learned:  # this round's secants ride along, for the next round's Thetas
            summed = secant.reduce(sec, torch.from_numpy(local), ring).numpy()
        else:
            summed = ring.allreduce_sum(torch.from_numpy(local)).numpy()
        if learned:
            ell_chain = np.where(summed[:, 2] > 0, summed[:, 2] - 1, np.nan)
            slopes = secant.certificate(sec, ell_chain, start[:, None] + np.arange(p), t)
        y_rms = np.concatenate([summed[:, 1], np.zeros((batch, 1))], 1)
        y_rms[rows, width] = rms(y_e[:, None]).cpu().numpy()[:, 0]
        accepted, bound = accept(summed[:, 0], y_rms, start, width, t, options.tol, stochastic,
                                 slopes)
        active = width > 0
        ok = ~active | np.isfinite(y_rms[rows, accepted])
        check_rows(torch.from_numpy(ok), noise.keys,
                   lambda r: f"by step {int(start[r] + accepted[r])}")
        # 4. slide: kept points take their new values, freed slots the predictor's (a freed
        # slot past the last step is never evaluated again: its value does not matter)
        freed = valid & (chain < accepted[:, None])
        if learned:
            secant.remember(sec, states, g, pos, valid)
        states = prefix
        done = active & (start + accepted >= n)
        if done.any():
            (finished,) = indices(y_out, done.nonzero()[0])
            y_out[finished] = y_e[finished]
        e = start + p
        start = start + accepted
        states, xi = _refill(states, xi, freed, chain, e, y_e, x0hat, nodes, t, step_noise, n)
        rounds += 1
        calls += int(width.sum())
        history.append(float(bound[active].max()) ** 2)
        advances.append(int(accepted.max()))
        if options.on_sweep is not None:
            options.on_sweep(int(start.min()), rounds, history[-1])
    if shared:  # every rank ended here: an Allgather of no points, its window starts checked
        evaluate_shared(model, states, start, p, n, t.u, comm)
    stats = Stats(rounds=rounds, model_calls=calls / batch, residuals=tuple(history),
                  sweeps=tuple(advances))
    return finish(model, y_out, stats, float(grid.u[-1]), options)


def pc_window_sde(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
                  options: Options = Options()):
    """Predictor-corrector window on the reverse SDE from y0 (B, *S); returns (y, Stats)."""
    return _pc_window(model, y0, grid, noise, comm=comm, options=options, stochastic=True)


def pc_window_ode(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm,
                  options: Options = Options()):
    """Predictor-corrector window on the probability-flow ODE from y0 (B, *S); returns
    (y, Stats)."""
    return _pc_window(model, y0, grid, noise, comm=comm, options=options, stochastic=False)
