"""pc-window's predictor, step 4 (docs/algorithms.md section 5): the states that enter the
window are guessed without a model call, by steps with the denoiser given,

    Psi_j(y) = alpha_j y + beta_j x0hat_j + noise_j xi_j,   alpha_j = decay_j - drift_j / v0_j,
                                                             beta_j = drift_j e^{-u_j/2} / v0_j,

from the window's end state Y_e, where x0hat_j is the last evaluated point's Tweedie mean,
frozen (SDE), or the polynomial in u through the Tweedie means at a few of the window's last
points, extrapolated (ODE). Psi is affine, so a predicted state is a few coefficients per
given field in closed form; only the SDE's noise is accumulated step by step. ``t`` is
always the window's coefficient tables, ``pcwindow.Tables`` (not imported: pcwindow imports
this module).
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.noise import Noise
from pipeline.samplers.common import indices, per_point

# The ODE's predictor extrapolates the denoiser through its values at the window's last point
# and every ODE_LAG-th point before it (a quadratic); the SDE's freezes it, since along the
# reverse SDE the denoiser is a martingale and its own value the best forecast (measured,
# docs/algorithms.md)
ODE_TERMS, ODE_LAG = 3, 8


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


def _coefficients(e: np.ndarray, depth: int, t,
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


def predict(y_e: torch.Tensor, x0hat: torch.Tensor, e, upto, t, noise: Noise | None,
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


def denoiser_nodes(start, width, terms: int, lag: int) -> np.ndarray:
    """Positions (B, terms) int64 of the window points whose denoiser values the predictor
    extrapolates: the window's last point and every ``lag``-th one before it; -1 where the
    window (start, width (B,) int) is too short."""
    start, width = np.asarray(start), np.asarray(width)
    pos = (start + width - 1)[:, None] - lag * np.arange(terms)[None]
    return np.where((pos >= start[:, None]) & (width[:, None] > 0), pos, -1)


def refill(states, xi, freed, chain, e, y_e, x0hat, nodes, t, noise, n):
    """Put the predictor's states and noise into the freed slots: slot with chain index c
    now holds position e + c (only positions before n matter). The ODE (``noise`` None, no
    noise kept) forms only its own slots' points. states and xi (B, slots, *S), freed and
    chain (B, slots), e (B,), y_e (B, *S), x0hat (B, nodes, *S); returns (states, xi)."""
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
