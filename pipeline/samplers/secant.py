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
an estimate, not a bound, so the tolerance is calibrated as for the other correctors. The
point's error is weighed as it will be at the path's end: the tolerance is divided by the
largest growth any direction's error can have from there on (``pcwindow.Tables.to_end``),
or an error accepted at the noisiest steps in the largest-variance modes grows to several
times the tolerance's scale (on grf up to e^{u/2}: 1.6e-3 from the sequential path at
512x512 where the same tolerance gave 2.0e-4 at 128x128).

The rebuild with these Thetas, across the ring's slots and with the correction along each
point's last change, is ``pipeline.samplers.secant_rebuild``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.fourier import half_weights
from pipeline.samplers.common import indices

# A point's measured slope counts MARGIN times, and never less than FLOOR of the bound L_n:
# the margin covers the other directions of the error, the floor the ones no secant has seen
# (measured on grf 32x32, docs/algorithms.md: floors 0.05 and 0.2 took the same rounds)
MARGIN, FLOOR = 2.0, 0.05
# A mode's estimate is used once its weight is INFORMED of its row's best-known mode's (and
# from then on, however much the best grows: ``learn``): a
# secant of the noisiest steps alone, whose slope hardly depends on the variance, is mostly
# the float32 rounding of the scores (a variance of 7 read for 0.07; a 3-D grf's float32 run
# then left float64's by 1.7e-5 where 2e-6 is its rounding). 1e-8 let it through; 1e-4 cost
# the DDPM-1000 grf a round, 1e-2 three
INFORMED = 1e-6


@dataclass
class Secants:
    """What a path remembers between rounds, per batch row: each slot's last evaluated state
    and score (B, p, *S) and its position (B, p) int64 (-1: none), the weighted sums of the
    modes' variance estimates (B, *F) float64 (F the rfft half-grid of the field), which of
    them are informed enough to use (B, *F) bool, the last round's largest measured slope
    (B,) (NaN: none yet), and this round's R = dPhi - Theta dY at each slot evaluated in both
    rounds (B, p, *F) complex, 0 at the others (``learn`` measures it,
    ``secant_rebuild.rebuild`` uses it)."""

    y: torch.Tensor
    g: torch.Tensor
    pos: np.ndarray
    num: torch.Tensor
    den: torch.Tensor
    known: torch.Tensor
    ell: np.ndarray
    along: torch.Tensor | None = None
    # where slots are split over ranks, each twice-evaluated point's reach
    # <dY, Yhat - Y> / |dY|^2 as w dY / |dY|^2 (B, p, *F) complex, to take against Yhat's
    # transform, and -<dY, Y> / |dY|^2 (B, p) float64 (``learn``, for
    # ``secant_rebuild.rebuild``)
    reach: tuple[torch.Tensor, torch.Tensor] | None = None
    pending: torch.Tensor | None = None  # this round's secant sums (2, B, *F), this rank's


def _dims(field: int) -> tuple[int, ...]:
    """The last ``field`` axes: a field's."""
    return tuple(range(-field, 0))


# Each batch row is transformed by calls of its own: a batched FFT rounds a row differently
# with the batch's size (MKL, 3-D fields: 3e-14 in float64), and a member's result must not
# depend on who shares its batch. The float64 work goes CHUNK_VALUES field values at a time
# (8 points of 512x512), so that its temporaries stay a few fields, not a few per point
# (512x512: 35 fields a point at the peak, against j_max's 21, when whole rows went at once);
# small fields take every row at once, as a loop per row costs more than their arithmetic
CHUNK_VALUES = 2**21


def row_chunks(rows: np.ndarray, size: int):
    """Slices of the sorted batch rows ``rows`` (P,) of points of ``size`` values: whole rows
    together up to CHUNK_VALUES values, a row with more alone in pieces of that many, so that
    how a row's points are grouped depends on that row alone."""
    if not len(rows):
        return
    per = max(1, CHUNK_VALUES // size)
    cuts = np.flatnonzero(np.diff(rows)) + 1
    lo = None
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
        if lo is not None and b - lo > per:
            yield slice(lo, a)
            lo = None
        if b - a > per:
            for c in range(a, b, per):
                yield slice(c, min(c + per, b))
        elif lo is None:
            lo = a
    if lo is not None:
        yield slice(lo, len(rows))


def rfft_rows(x: torch.Tensor, rows: np.ndarray, field: int) -> torch.Tensor:
    """The orthonormal real FFT of points x (J, *S) of the sorted batch rows ``rows`` (J,)
    over their ``field`` last axes, each row's points in one call: (J, *F)."""
    dims = _dims(field)
    cuts = np.flatnonzero(np.diff(rows)) + 1
    parts = [torch.fft.rfftn(part, dim=dims, norm="ortho")
             for part in torch.tensor_split(x, cuts.tolist())]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def irfft_rows(z: torch.Tensor, field: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``rfft_rows`` for z (B, M, *F), fields of shape ``field``: (B, M, *S)."""
    dims = _dims(len(field))
    out = torch.empty((*z.shape[:2], *field), dtype=z.real.dtype, device=z.device)
    for b in range(z.shape[0]):
        torch.fft.irfftn(z[b], s=field, dim=dims, norm="ortho", out=out[b])
    return out


def begin(states: torch.Tensor) -> Secants:
    """Nothing learned yet, for the slot states (B, p, *S)."""
    batch, p = states.shape[:2]
    half = half_weights(tuple(states.shape[2:])).shape  # the rfft half-grid
    zeros = torch.zeros((batch, *half), dtype=torch.float64, device=states.device)
    return Secants(torch.zeros_like(states), torch.zeros_like(states),
                   np.full((batch, p), -1), zeros, zeros.clone(), zeros > 0,
                   np.full(batch, np.nan))


def column(values, like: torch.Tensor) -> torch.Tensor:
    """Per-point numbers (J,) on ``like``'s device in its real dtype, shaped to broadcast
    against ``like`` (J, *F)."""
    v = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(like.device, like.real.dtype)
    return v.reshape(-1, *(1,) * (like.dim() - 1))


def _power(z: torch.Tensor) -> torch.Tensor:
    """|z|^2 of complex z, without abs's square root."""
    return z.real.square() + z.imag.square()


def _learn(sums: torch.Tensor, dy: torch.Tensor, dg: torch.Tensor, rows: np.ndarray, u, v0,
           vs, bound: float) -> None:
    """Add the secants of points (J,) of batch rows ``rows``, Fourier differences dy, dg
    (J, *F) complex128 at clocks u with v0, vS (J,), to ``sums`` (2, B, *F): the weighted
    variance estimates and their weights."""
    power = _power(dy)
    with np.errstate(divide="ignore"):
        lo, hi = -1 / v0, -1 / vs
    as_t = lambda a: column(a, dy)  # noqa: E731
    slope = (dg * dy.conj()).real / power.clamp_min(torch.finfo(torch.float64).tiny)
    slope = torch.minimum(torch.maximum(slope, as_t(lo)), as_t(hi))
    # r = -1 / (e^{-u} lambda + v0): lambda = (-1/r - v0) e^u, pinned as well as r moves with it
    weight = power * as_t(np.exp(-2 * np.asarray(u))) * slope.pow(4)
    lam = ((-1 / slope - as_t(v0)) * as_t(np.exp(u))).clamp(0, bound)
    weighted = torch.where(weight > 0, weight * lam, torch.zeros_like(weight))
    at = torch.from_numpy(rows).to(dy.device)
    sums[0].index_add_(0, at, weighted)
    sums[1].index_add_(0, at, weight)


def thetas(sec: Secants, rows: np.ndarray, decay, drift, u, v0, bound: float) -> torch.Tensor:
    """Theta per mode (J, *F) float64 at J points of batch rows ``rows`` with coefficients
    (J,), from their rows' averaged variance estimates (S where a mode has too little
    weight: ``j_max``'s value)."""
    at = torch.from_numpy(np.asarray(rows)).to(sec.num.device)
    num, den = sec.num[at], sec.den[at]
    lam = torch.where(sec.known[at], num / den.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(num, bound))
    col = lambda c: column(c, lam)  # noqa: E731
    return col(decay) - col(drift) / (col(np.exp(-np.asarray(u))) * lam + col(v0))


def learn(sec: Secants, states, g, pos, valid, t, bound: float, fold: bool = False) -> np.ndarray:
    """Step 1: sum the secants of this rank's points evaluated at the same position last round
    into ``sec.pending`` (they join every rank's in the round's Allreduce, ``reduce``, and the
    variance estimates from the next round on: learning lags a round so that it costs no
    collective of its own), and measure each such point's R = dPhi - Theta dY
    (``sec.along``) and slope ell (``slopes``) with the Theta the rebuild then takes:
    (B, M) float64, NaN at the others. states, g (B, M, *S) this rank's slots, pos, valid
    (B, M). With ``fold`` (slots split over ranks) it also keeps what the rebuild needs to
    fold the correction's reach into its one Allgather (``sec.reach``)."""
    twice = valid & (sec.pos == pos)
    pr, ps = twice.nonzero()
    sums = torch.zeros((2, *sec.num.shape), dtype=torch.float64, device=sec.num.device)
    field = states.dim() - 2
    diffs = []  # in the field's precision until the slopes are measured: 2 fields a point
    for part in row_chunks(pr, math.prod(states.shape[2:])):
        rows, (r_t, s_t) = pr[part], indices(states, pr[part], ps[part])
        dy = rfft_rows(states[r_t, s_t] - sec.y[r_t, s_t], rows, field)
        dg = rfft_rows(g[r_t, s_t] - sec.g[r_t, s_t], rows, field)
        k = pos[pr[part], ps[part]]
        _learn(sums, dy.to(torch.complex128), dg.to(torch.complex128), rows, t.u[k], t.v0[k],
               t.vs[k], bound)
        diffs.append((part, dy, dg))
    sec.pending = sums
    ell = np.full(pos.shape, np.nan)
    sec.along = torch.zeros((*pos.shape, *sec.num.shape[1:]), device=states.device,
                            dtype=torch.promote_types(states.dtype, torch.complex64))
    sec.reach = _reach_parts(sec, states, pr, ps, diffs) if fold else None
    for part, dy, dg in diffs:
        k = pos[pr[part], ps[part]]
        theta = thetas(sec, pr[part], t.decay[k], t.increment[k, 1], t.u[k], t.v0[k], bound)
        dy = dy.to(torch.complex128)
        missed = (column(t.decay[k], dy) * dy
                  + column(t.increment[k, 1], dy) * dg.to(torch.complex128) - theta * dy)
        ell[pr[part], ps[part]] = slopes(dy, missed, tuple(states.shape[2:]))
        sec.along[indices(states, pr[part], ps[part])] = missed.to(sec.along.dtype)
    return ell


def _reach_parts(sec: Secants, states, pr, ps, diffs) -> tuple[torch.Tensor, torch.Tensor]:
    """``Secants.reach`` of the points (pr, ps) evaluated twice, from ``learn``'s Fourier
    differences ``diffs``: zero at the other slots."""
    w = half_weights(tuple(states.shape[2:])).to(states.device)
    on = torch.zeros_like(sec.along)
    at = torch.zeros(sec.along.shape[:2], dtype=torch.float64, device=states.device)
    for part, dy, _ in diffs:
        r_t, s_t = indices(states, pr[part], ps[part])
        y = states[r_t, s_t].flatten(1)
        change = y - sec.y[r_t, s_t].flatten(1)
        dot = lambda x: (change * x).sum(-1, dtype=torch.float64)  # noqa: E731
        norm = dot(change).clamp_min(torch.finfo(torch.float64).tiny)
        on[r_t, s_t] = (dy.to(torch.complex128) * w
                        / norm.reshape(-1, *(1,) * (dy.dim() - 1))).to(on.dtype)
        at[r_t, s_t] = -dot(y) / norm
    return on, at


def absorb(sec: Secants, sums: torch.Tensor) -> None:
    """Add every rank's ``pending`` secant sums (2, B, *F), summed over ranks, to the
    variance estimates: the next round's Thetas use them."""
    sec.num += sums[0]
    sec.den += sums[1]
    # once informed, a mode stays so: the best mode's weight grows by orders of magnitude as
    # the noise falls (its slope nears -1/v0, weighed as r^4), and measured against it the
    # largest-variance modes, learned in the first rounds, fell back to S halfway along the
    # path, where the error they then let through grows to the end of it undamped
    sec.known |= sec.den > INFORMED * sec.den.flatten(1).amax(1).reshape(
        -1, *(1,) * (sec.den.dim() - 1))


def reduce(sec: Secants, local: torch.Tensor, comm) -> torch.Tensor:
    """The round's Allreduce of the points' numbers ``local`` (float64, any shape) with this
    rank's ``pending`` secant sums in the same buffer; the sums are absorbed. Returns the
    summed ``local``."""
    pending = sec.pending.to("cpu")
    summed = comm.allreduce_sum(torch.cat([local.flatten(), pending.flatten()]))
    absorb(sec, summed[local.numel():].view(pending.shape).to(sec.num.device))
    return summed[:local.numel()].view(local.shape)


def slopes(dy, missed, field: tuple[int, ...]) -> np.ndarray:
    """The measured slopes ell (J,) float64 of J points evaluated twice, from the Fourier
    differences dy (J, *F) complex128 of their states and what Theta missed along them,
    missed = dPhi - Theta dY (J, *F): |missed| / |dY| over a field of shape ``field``."""
    w = half_weights(field).to(dy.device)
    size = lambda z: (_power(z) * w).flatten(1).sum(1).sqrt()  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        return (size(missed) / size(dy)).cpu().numpy()


def certificate(sec: Secants, ell, pos, t) -> np.ndarray:
    """The certificate's L at each chain point (B, p) float64 from the measured slopes
    ell (B, p) (NaN: none) at chain positions pos (B, p): min(L, max(MARGIN ell, FLOOR L)), a
    point without its own slope taking its window's largest, else the last round's."""
    seen = ~np.isnan(ell)
    worst = np.where(seen.any(1), np.where(seen, ell, -np.inf).max(1), sec.ell)
    sec.ell = worst
    ell = np.where(seen, ell, worst[:, None])
    bound_l = t.lipschitz[pos]
    return np.where(np.isnan(ell), bound_l,
                    np.minimum(bound_l, np.maximum(MARGIN * ell, FLOOR * bound_l)))


def remember(sec: Secants, states, g, pos, valid) -> None:
    """Keep this round's evaluated states and scores for the next round's secants: states
    and g (B, slots, *S), pos and valid (B, slots)."""
    vr, vc = valid.nonzero()
    v_r, v_c = indices(states, vr, vc)
    sec.y[v_r, v_c] = states[v_r, v_c]
    sec.g[v_r, v_c] = g[v_r, v_c]
    sec.pos = np.where(valid, pos, sec.pos)
