"""pc-window's learned corrector, ``sampler.theta = "secant"`` (docs/algorithms.md section 5,
"A corrector learned from secants").

The rebuild Yhat_{n+1} = Theta_n Yhat_n + Phi_n(Y_n) - Theta_n Y_n is exact in one sweep where
Theta_n is the step's Jacobian. ``j_max`` takes one number for every direction: exact only in
the data's largest-variance ones. Here Theta_n is diagonal in the field's Fourier modes (on a
periodic field a statistically homogeneous score is nearly so), one value per mode, learned
from the model's own answers: a window point evaluated at two states Y and Y' in two rounds
gives, per mode m, the secant r_m = Re(conj(dY_m) dg_m) / |dY_m|^2 of its scores. Read as the
score slope of a Gaussian mode, r = -1 / (e^{-u} lambda + v0), it names an effective variance
lambda_m of the data's mode m; its estimates are averaged over every secant of the path,
weighted by how well each pins lambda down (|dY_m|^2 (d r / d lambda)^2), so that those of the
noisiest steps, where r hardly depends on lambda, count for little. A point then takes
Theta_n,m = decay_n + drift_n r_n,m with r at its own clock from the averaged lambda: inside
[alpha_n, J_max] as ``j_max``'s bound S requires, and the Gaussian's exact slope where the
model is one.

The same secants measure what the certificate's L_n assumes: the residual slope
ell_n = |dPhi_n - Theta_n dY| / |dY| along the change the point just made, which is the error's
direction. A point's L_n becomes min(L_n, max(MARGIN ell, FLOOR L_n)), ell its own where it
was evaluated twice, else the largest of its window's (or of the last round that had one):
an estimate, not a bound, so the tolerance is calibrated as for the other correctors.

Only the whole window on every rank (one rank, or ``window_split = "replicated"``) runs it:
the rebuild is a scan over the window's points in Fourier space.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.samplers.common import indices

# A point's measured slope counts MARGIN times, and never less than FLOOR of the bound L_n:
# the margin covers the other directions of the error, the floor the ones no secant has seen
# (measured on grf 32x32 and gmm, docs/algorithms.md: floors 0.05 and 0.2 took the same rounds)
MARGIN, FLOOR = 2.0, 0.05


@dataclass
class Secants:
    """What a path remembers between rounds, per batch row: each slot's last evaluated state
    and score (B, p, *S) and its position (B, p) int64 (-1: none), the weighted sums of the
    modes' variance estimates (B, *F) float64 (F the rfft half-grid of the field), and the
    last round's largest measured slope (B,) (NaN: none yet)."""

    y: torch.Tensor
    g: torch.Tensor
    pos: np.ndarray
    num: torch.Tensor
    den: torch.Tensor
    ell: np.ndarray


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    """The field axes of x (B, M, *S)."""
    return tuple(range(2 - x.dim(), 0))


def _fourier(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal real FFT of x (B, M, *S) over its field axes."""
    return torch.fft.rfftn(x, dim=_dims(x), norm="ortho")


def _weights(shape: tuple[int, ...]) -> torch.Tensor:
    """How many modes of the full spectrum each rfft coefficient stands for (1 or 2), shaped
    like the half-grid of a field of ``shape``: the norms below count every mode once."""
    n = shape[-1]
    w = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w.expand(*shape[:-1], n // 2 + 1)


def start(states: torch.Tensor) -> Secants:
    """Nothing learned yet, for the slot states (B, p, *S)."""
    batch, p = states.shape[:2]
    half = _fourier(states[:1, :1]).shape[2:]
    zeros = torch.zeros((batch, *half), dtype=torch.float64, device=states.device)
    return Secants(torch.zeros_like(states), torch.zeros_like(states),
                   np.full((batch, p), -1), zeros, zeros.clone(), np.full(batch, np.nan))


def _column(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Per-point numbers (B, M) shaped to broadcast against (B, M, *F), float64."""
    v = torch.from_numpy(np.ascontiguousarray(values)).to(like.device, torch.float64)
    return v.reshape(*v.shape, *(1,) * (like.dim() - 2))


def _learn(sec: Secants, dy: torch.Tensor, dg: torch.Tensor, rows: np.ndarray, u, v0, vs,
           bound: float) -> torch.Tensor:
    """Add the secants of points (P,) of batch rows ``rows``, Fourier differences dy, dg
    (P, *F) complex128 at clocks u with v0, vS (P,), to the variance estimates; returns the
    slopes r (P, *F), within the score's range [-1/v0, -1/vS]."""
    power = dy.abs().square()
    with np.errstate(divide="ignore"):
        lo, hi = -1 / v0, -1 / vs
    shape = (-1, *(1,) * (dy.dim() - 1))
    as_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(  # noqa: E731
        dy.device).reshape(shape)
    slope = (dg * dy.conj()).real / power.clamp_min(torch.finfo(torch.float64).tiny)
    slope = torch.minimum(torch.maximum(slope, as_t(lo)), as_t(hi))
    # r = -1 / (e^{-u} lambda + v0): lambda = (-1/r - v0) e^u, pinned as well as r moves with it
    weight = power * as_t(np.exp(-2 * np.asarray(u))) * slope.pow(4)
    lam = ((-1 / slope - as_t(v0)) * as_t(np.exp(u))).clamp(0, bound)
    weighted = torch.where(weight > 0, weight * lam, torch.zeros_like(weight))
    at = torch.from_numpy(rows).to(dy.device)
    sec.num.index_add_(0, at, weighted)
    sec.den.index_add_(0, at, weight)
    return slope


def _thetas(sec: Secants, decay, drift, u, v0, bound: float) -> torch.Tensor:
    """Theta per mode (B, M, *F) float64 at points with coefficients (B, M) from the averaged
    variance estimates (S where a mode has none: ``j_max``'s value)."""
    lam = torch.where(sec.den > 0, sec.num / sec.den.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(sec.num, bound))[:, None]
    like = lam.expand(-1, decay.shape[1], *lam.shape[2:])
    return _column(decay, like) - _column(drift, like) / (
        _column(np.exp(-u), like) * lam + _column(v0, like))


def corrector_round(sec: Secants, states, g, xi, start, width, pos, valid, t, bound: float):
    """The rebuild and certificate slopes of one round with the whole window (p slots).

    states, g, xi (B, p, *S): slot states, scores (zero where not valid) and step noise;
    start, width (B,) int; pos, valid (B, p): slot positions and evaluated points; t the
    window's ``pcwindow.Tables`` (its ``lipschitz`` the bound L_n); bound S. Returns (Yhat at
    each slot (B, p, *S), the state after the window's last point (B, *S), the Tweedie mean
    at its last point (B, 1, *S), the certificate's L at each chain point (B, p) float64)."""
    batch, p = pos.shape
    start, width = np.asarray(start), np.asarray(width)
    order = ((start % p)[:, None] + np.arange(p)[None]) % p  # the slot of each chain index
    rows = np.repeat(np.arange(batch), p).reshape(batch, p)
    r_t, o_t = indices(states, rows, order)
    y, score, noise = states[r_t, o_t], g[r_t, o_t], xi[r_t, o_t]
    k, ok = pos[rows, order], valid[rows, order]
    u, v0 = t.u[k], t.v0[k]
    vs = np.exp(-u) * bound + v0 if np.isfinite(bound) else np.full_like(u, np.inf)
    decay, drift, step_noise = t.decay[k], t.increment[k, 1], t.increment[k, 2]
    # 1. what the points evaluated twice teach, before the rebuild uses it
    twice = ok & (sec.pos[rows, order] == k)
    pr, pc = twice.nonzero()
    slot_r, slot_c = indices(states, pr, order[pr, pc])
    dy = dg = None
    if len(pr):
        dy = _fourier(states[slot_r, slot_c][None] - sec.y[slot_r, slot_c][None])[0].to(
            torch.complex128)
        dg = _fourier(g[slot_r, slot_c][None] - sec.g[slot_r, slot_c][None])[0].to(
            torch.complex128)
        _learn(sec, dy, dg, pr, u[pr, pc], v0[pr, pc], vs[pr, pc], bound)
    theta = _thetas(sec, decay, drift, u, v0, bound)
    # 2. the rebuild: a scan over the chain in Fourier space, exact per mode where Theta is
    mask = torch.from_numpy(ok).to(states.device)
    coef = lambda c: torch.from_numpy(c).to(states.device, states.dtype).reshape(  # noqa: E731
        *c.shape, *(1,) * (states.dim() - 2))
    phi = coef(decay) * y + coef(drift) * score + coef(step_noise) * noise
    fy, fphi = _fourier(y), _fourier(phi)
    th = theta.to(states.dtype)
    out = torch.empty((batch, p + 1, *fy.shape[2:]), dtype=fy.dtype, device=fy.device)
    out[:, 0] = fy[:, 0]
    for c in range(p):
        step = fphi[:, c] + th[:, c] * (out[:, c] - fy[:, c])
        keep = mask[:, c].reshape(-1, *(1,) * (step.dim() - 1))
        out[:, c + 1] = torch.where(keep, step, out[:, c])
    rebuilt = torch.fft.irfftn(out, s=states.shape[2:], dim=_dims(out), norm="ortho")
    prefix = torch.empty_like(states)
    prefix[r_t, o_t] = rebuilt[:, :p]
    every, last = np.arange(batch), np.maximum(width - 1, 0)
    e_t, w_t, l_t = indices(states, every, width, last)
    y_end = rebuilt[e_t, w_t]
    x0 = (y[e_t, l_t] + coef(v0[every, last][:, None])[:, 0] * score[e_t, l_t]) \
        * coef(t.tweedie[k[every, last]][:, None])[:, 0]
    x0 = torch.where(torch.from_numpy(width > 0).to(x0.device).reshape(
        -1, *(1,) * (x0.dim() - 1)), x0, torch.zeros_like(x0))[:, None]
    # 3. the measured slopes of the residual map Phi - Theta along the points' own changes
    ell = np.full((batch, p), np.nan)
    if len(pr):
        w = _weights(tuple(states.shape[2:])).to(dy.device)
        size = lambda z: (z.abs().square() * w).flatten(1).sum(1).sqrt()  # noqa: E731
        dphi = _column(decay[pr, pc][None], dy[None])[0] * dy \
            + _column(drift[pr, pc][None], dy[None])[0] * dg
        resid = dphi - theta[torch.from_numpy(pr), torch.from_numpy(pc)] * dy
        with np.errstate(invalid="ignore", divide="ignore"):
            ell[pr, pc] = (size(resid) / size(dy)).cpu().numpy()
    seen = ~np.isnan(ell)
    worst = np.where(seen.any(1), np.where(seen, ell, -np.inf).max(1), sec.ell)
    sec.ell = worst
    ell = np.where(seen, ell, worst[:, None])
    bound_l = t.lipschitz[k]
    lips = np.where(np.isnan(ell), bound_l,
                    np.minimum(bound_l, np.maximum(MARGIN * ell, FLOOR * bound_l)))
    # 4. remember this round's evaluations for the next one's secants
    vr, vc = valid.nonzero()
    v_r, v_c = indices(states, vr, vc)
    sec.y[v_r, v_c] = states[v_r, v_c]
    sec.g[v_r, v_c] = g[v_r, v_c]
    sec.pos = np.where(valid, pos, sec.pos)
    return prefix, y_end, x0, lips
