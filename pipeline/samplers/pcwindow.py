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
     before it, extrapolated (ODE) (``pipeline.samplers.predictor``).

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

from pipeline.decomposition import slice_bounds
from pipeline.grids import Grid
from pipeline.integrators import Steps, step_coefficients
from pipeline.noise import Noise
from pipeline.samplers import secant, secant_rebuild
from pipeline.samplers.common import check_rows, finish, indices, per_point, point_mask
from pipeline.samplers.options import PC_WINDOW_POINTS, THETAS, Options, Stats, window_points
from pipeline.samplers.predictor import ODE_LAG, ODE_TERMS, denoiser_nodes, refill
from pipeline.samplers.ring import chain_index, chain_prefix, evaluate_shared, evaluate_window

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


def _col(c: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Per-row coefficients (B,) shaped to broadcast against (B, *S)."""
    return torch.from_numpy(c).to(like.device, like.dtype).reshape(-1, *(1,) * (like.dim() - 1))


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


def _first_guesses(y0, lo: int, hi: int, p: int, terms: int, t: Tables, noise: Noise | None,
                   n: int):
    """The first window on this rank's slots lo..hi of p: the predictor's states from y0
    (B, *S) with the denoiser at the prior mean, 0, and their step noise (``noise`` None: the
    ODE, none kept). Returns (states (B, hi - lo, *S), xi (B, hi - lo, *S) or None)."""
    batch, shape = y0.shape[0], y0.shape[1:]
    start = np.zeros(batch, dtype=np.int64)
    states = torch.empty((batch, hi - lo, *shape), dtype=y0.dtype, device=y0.device)
    xi = None if noise is None else torch.zeros_like(states)
    chain = chain_index(lo, hi, start, p)
    zero = torch.zeros((batch, terms, *shape), dtype=y0.dtype, device=y0.device)
    return refill(states, xi, np.ones_like(chain, dtype=bool), chain, start, y0, zero,
                  np.full((batch, terms), -1), t, noise, n)


def _acceptance(prefix, states, y_e, chain, valid, start, width, p: int, ell, sec,
                t: Tables, tol: float, stochastic: bool, ring):
    """Step 3 from this rank's slots, in one Allreduce of every point's numbers: (accepted
    (B,) int64, bound / scale (B,), the RMS of Yhat at chain points 0..p (B, p + 1)), the
    same on every rank. prefix, states (B, M, *S): Yhat and Y at the rank's slots, of chain
    indices ``chain`` (B, M), evaluated where ``valid``; y_e (B, *S): the state after the
    window; ell (B, M): the learned corrector's measured slopes (NaN: none) with its
    ``secant.Secants`` sec, or both None."""
    batch = chain.shape[0]
    learned = sec is not None
    local = np.zeros((batch, 3 if learned else 2, p))
    r_idx, s_idx = valid.nonzero()
    c_idx = chain[r_idx, s_idx]
    local[r_idx, 0, c_idx] = rms(prefix - states).cpu().numpy()[r_idx, s_idx]
    local[r_idx, 1, c_idx] = rms(prefix).cpu().numpy()[r_idx, s_idx]
    slopes = None
    if learned:  # each point's slope from the rank that holds it, 1 + ell (0: none); this
        # round's secants ride along in the same buffer, for the next round's Thetas
        local[r_idx, 2, c_idx] = np.where(np.isnan(ell), 0.0, ell + 1)[r_idx, s_idx]
        summed = secant.reduce(sec, torch.from_numpy(local), ring).numpy()
        ell_chain = np.where(summed[:, 2] > 0, summed[:, 2] - 1, np.nan)
        slopes = secant.certificate(sec, ell_chain, start[:, None] + np.arange(p), t)
    else:
        summed = ring.allreduce_sum(torch.from_numpy(local)).numpy()
    y_rms = np.concatenate([summed[:, 1], np.zeros((batch, 1))], 1)
    y_rms[np.arange(batch), width] = rms(y_e[:, None]).cpu().numpy()[:, 0]
    accepted, bound = accept(summed[:, 0], y_rms, start, width, t, tol, stochastic, slopes)
    return accepted, bound, y_rms


def _pc_window(model, y0, grid: Grid, noise: Noise, *, comm, options: Options,
               stochastic: bool):
    if options.tol is None:
        raise ValueError("pc-window needs sampler.tol (a number, or 'auto' to calibrate it)")
    n = grid.steps
    p = window_points(options.window, PC_WINDOW_POINTS, n)
    # the ranks that split the ring's slots: replicated, each rank holds them all
    shared = options.window_split == "replicated" and comm.size > 1
    ring = comm.alone() if shared else comm
    lo, hi = slice_bounds(p, ring.size, ring.rank)
    bounds = [slice_bounds(p, ring.size, r) for r in range(ring.size)]
    steps = step_coefficients(grid.u, stochastic=stochastic, form=options.form)
    t = tables(grid, steps, options.data_bound, p, options.theta if stochastic else "one")
    learned = stochastic and options.theta == "secant"
    step_noise = noise if stochastic else None
    batch = y0.shape[0]
    start = np.zeros(batch, dtype=np.int64)
    terms, lag = (1, 1) if stochastic else (ODE_TERMS, min(ODE_LAG, max(1, (p - 1) // 2)))
    states, xi = _first_guesses(y0, lo, hi, p, terms, t, step_noise, n)
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
        ell = None
        if learned:  # the corrector learned per mode (secant.py, secant_rebuild.py)
            ell = secant.learn(sec, states, g, pos, valid, t, options.data_bound,
                               fold=len(bounds) > 1)
            prefix, y_e, x0hat = secant_rebuild.rebuild(sec, states, g, xi, start, width, pos,
                                                        valid, t, options.data_bound, bounds,
                                                        ring)
        else:
            prefix, y_e, x0hat = _rebuild(states, g, xi, start, width, pos, valid, nodes, t, p,
                                          bounds, ring)
        # 3. certified acceptance, the same on every rank
        accepted, bound, y_rms = _acceptance(prefix, states, y_e, chain, valid, start, width, p,
                                             ell, sec, t, options.tol, stochastic, ring)
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
        states, xi = refill(states, xi, freed, chain, e, y_e, x0hat, nodes, t, step_noise, n)
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
