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

Across the ring's slots (``pipeline.samplers.ring``) the rebuild is a linear recurrence per
mode, so each run of a rank's consecutive slots is one affine map per mode,
Yhat_out = A Yhat_in + C (A the product of its Thetas): one Allgather of every rank's maps
(with Y_b and the denoiser the predictor needs) lets every rank chain them in the window's
order, and each rank then scans its own slots from its runs' inputs. A round's secants
join every rank's in the round's Allreduce of the points' changes (with the measured
slopes) and the variance estimates from the next round on: learning a round late costs no
collective of its own, and up to a round (docs/algorithms.md, "Two collectives a round").

Off the Fourier modes (a mixture's, a network's Jacobian) Theta misses part of the step's
response. A point evaluated in two rounds knows that part along the change it made: the
secant equation J dY = dPhi holds, so R = dPhi - Theta dY is what Theta misses along dY. The
rebuild adds R <dY, Yhat - Y> / |dY|^2 to the point's step, a rank-one (Broyden) correction
that makes the step exact where the new change Yhat - Y (from the first scan) lies along dY,
carried down the window by a second scan with the same Thetas. The reach is taken from the
first scan's Yhat, not from the corrected one, so that the correction is affine in each
run's input like the rest of the scan; across ranks the second scan rides in the first's
Allgather (``_split_ring``: 2 half-fields a slot more). Two collectives a round, as
``j_max`` takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.fourier import half_weights
from pipeline.samplers.common import indices, point_mask
from pipeline.samplers.ring import run_starts

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
    rounds (B, p, *F) complex, 0 at the others (``learn`` measures it, ``rebuild`` uses it)."""

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
    # transform, and -<dY, Y> / |dY|^2 (B, p) float64 (``learn``, for ``rebuild``)
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


def _chunks(rows: np.ndarray, size: int):
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


def _rfft(x: torch.Tensor, rows: np.ndarray, field: int) -> torch.Tensor:
    """The orthonormal real FFT of points x (J, *S) of the sorted batch rows ``rows`` (J,)
    over their ``field`` last axes, each row's points in one call: (J, *F)."""
    dims = _dims(field)
    cuts = np.flatnonzero(np.diff(rows)) + 1
    parts = [torch.fft.rfftn(part, dim=dims, norm="ortho")
             for part in torch.tensor_split(x, cuts.tolist())]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _inverse(z: torch.Tensor, field: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``_rfft`` for z (B, M, *F), fields of shape ``field``: (B, M, *S)."""
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


def _column(values, like: torch.Tensor) -> torch.Tensor:
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
    as_t = lambda a: _column(a, dy)  # noqa: E731
    slope = (dg * dy.conj()).real / power.clamp_min(torch.finfo(torch.float64).tiny)
    slope = torch.minimum(torch.maximum(slope, as_t(lo)), as_t(hi))
    # r = -1 / (e^{-u} lambda + v0): lambda = (-1/r - v0) e^u, pinned as well as r moves with it
    weight = power * as_t(np.exp(-2 * np.asarray(u))) * slope.pow(4)
    lam = ((-1 / slope - as_t(v0)) * as_t(np.exp(u))).clamp(0, bound)
    weighted = torch.where(weight > 0, weight * lam, torch.zeros_like(weight))
    at = torch.from_numpy(rows).to(dy.device)
    sums[0].index_add_(0, at, weighted)
    sums[1].index_add_(0, at, weight)


def _thetas(sec: Secants, rows: np.ndarray, decay, drift, u, v0, bound: float) -> torch.Tensor:
    """Theta per mode (J, *F) float64 at J points of batch rows ``rows`` with coefficients
    (J,), from their rows' averaged variance estimates (S where a mode has too little
    weight: ``j_max``'s value)."""
    at = torch.from_numpy(np.asarray(rows)).to(sec.num.device)
    num, den = sec.num[at], sec.den[at]
    lam = torch.where(sec.known[at], num / den.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(num, bound))
    col = lambda c: _column(c, lam)  # noqa: E731
    return col(decay) - col(drift) / (col(np.exp(-np.asarray(u))) * lam + col(v0))


def _chain(first: np.ndarray, a: torch.Tensor, c: torch.Tensor, base: torch.Tensor, p: int):
    """Every run's input state and the window's end state, per mode, the same on every rank:
    runs (B, R) of first chain index ``first`` (p: empty), maps a (B, R, *F) real and
    c (B, R, *F) complex, taken in chain order from Y_b's transform ``base`` (B, *F). The
    maps are put in chain order once and the empty runs (most of them on many ranks: a rank's
    slots lie on one side of the window's head in most rounds) left out: they would pass the
    state on unchanged, which is what their inputs are."""
    order = np.argsort(first, axis=1, kind="stable")
    rows = np.arange(first.shape[0])[:, None]
    busy = int((first < p).sum(1).max())
    r_t, o_t = indices(c, rows, order)
    a_in, c_in = a[r_t, o_t], c[r_t, o_t]
    state, states = base, []
    for i in range(busy):
        states.append(state)
        state = a_in[:, i] * state + c_in[:, i]
    states += [state] * (first.shape[1] - busy)
    inputs = torch.empty_like(c)
    inputs[r_t, o_t] = torch.stack(states, 1)
    return inputs, state


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
    for part in _chunks(pr, math.prod(states.shape[2:])):
        rows, (r_t, s_t) = pr[part], indices(states, pr[part], ps[part])
        dy = _rfft(states[r_t, s_t] - sec.y[r_t, s_t], rows, field)
        dg = _rfft(g[r_t, s_t] - sec.g[r_t, s_t], rows, field)
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
        theta = _thetas(sec, pr[part], t.decay[k], t.increment[k, 1], t.u[k], t.v0[k], bound)
        dy = dy.to(torch.complex128)
        missed = (_column(t.decay[k], dy) * dy
                  + _column(t.increment[k, 1], dy) * dg.to(torch.complex128) - theta * dy)
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


def rebuild(sec: Secants, states, g, xi, start, width, pos, valid, t, bound: float, bounds, comm):
    """Step 2 with the learned Theta on this rank's slots lo..hi of ``bounds``: (Yhat at each
    own slot (B, M, *S), the state after the window's last point (B, *S), the Tweedie mean at
    its last point (B, 1, *S)), the second and third the same on every rank. One Allgather:
    every rank's run maps for both scans."""
    start, width = np.asarray(start), np.asarray(width)
    lo, hi = bounds[comm.rank]
    p = bounds[-1][1]
    batch, m = pos.shape
    field = tuple(states.shape[2:])
    half = half_weights(field).shape
    complex_dtype = torch.promote_types(states.dtype, torch.complex64)
    th = torch.ones((batch, m, *half), dtype=states.dtype, device=states.device)
    terms = torch.zeros((batch, m, *half), dtype=complex_dtype, device=states.device)
    base, x0 = (torch.zeros((batch, *half), dtype=complex_dtype, device=states.device)
                for _ in range(2))
    head = start % p
    coef = lambda c: _column(c, states[0])  # noqa: E731  (J,) against points (J, *S)
    # what Theta misses along a point's last change, where it has one (``learn``)
    twice = valid & (sec.pos == pos)
    along = sec.along
    # a point not evaluated this round passes its input on: theta 1, no term
    rows, slots = valid.nonzero()
    for part in _chunks(rows, math.prod(field)):
        r, at = rows[part], slots[part]
        r_t, s_t = indices(states, r, at)
        k = pos[r, at]
        phi = coef(t.decay[k]) * states[r_t, s_t] + coef(t.increment[k, 1]) * g[r_t, s_t]
        if xi is not None:
            phi = phi + coef(t.increment[k, 2]) * xi[r_t, s_t]
        fy = _rfft(states[r_t, s_t], r, len(field))
        theta = _thetas(sec, r, t.decay[k], t.increment[k, 1], t.u[k], t.v0[k], bound)
        th[r_t, s_t] = theta.to(states.dtype)
        terms[r_t, s_t] = _rfft(phi, r, len(field)) - th[r_t, s_t] * fy
        # Y_b's transform, from the rank that holds it (every valid row's head is valid)
        (own,) = np.nonzero(at == head[r] - lo)
        base[indices(base, r[own])[0]] = fy[indices(fy, own)[0]]
    # the Tweedie mean at the window's last point from the rank that holds it: the
    # predictor's frozen denoiser
    last = start + width - 1
    (holder,) = np.nonzero((width > 0) & (last % p >= lo) & (last % p < hi))
    if len(holder):
        k_last = last[holder]
        r_t, s_t = indices(states, holder, k_last % p - lo)
        mean = (states[r_t, s_t] + coef(t.v0[k_last]) * g[r_t, s_t]) * coef(t.tweedie[k_last])
        x0[r_t] = _rfft(mean, holder, len(field))
    high = np.arange(lo, hi)[None] >= head[:, None]
    if len(bounds) > 1:  # terms become each slot's Yhat, its correction included
        end, x0hat = _split_ring(th, terms, along, sec.reach, base, x0, high, start, bounds,
                                 comm)
        sec.reach = None
        return _inverse(terms, field), _inverse(end[:, None], field)[:, 0], \
            _inverse(x0hat[:, None], field)
    end, x0hat = _whole_ring(th, terms, base, x0, head, comm)
    # terms now holds each slot's Yhat
    prefix = _inverse(terms, field)
    # the second scan: each point's correction along its last change, as its Yhat from the
    # first one calls for it, carried down the window by the same Thetas
    _scale_along(along, twice, states, sec.y, prefix)
    zero = torch.zeros_like(base)
    shift, _ = _whole_ring(th, along, zero, None, head, comm)
    prefix += _inverse(along, field)
    y_end = _inverse((end + shift)[:, None], field)[:, 0]
    x0_field = _inverse(x0hat[:, None], field)
    return prefix, y_end, x0_field


def _scale_along(along, twice: np.ndarray, states, last, prefix) -> None:
    """Scale each point's ``along`` (B, M, *F) by how far its new change Yhat - Y reaches
    along its last one dY = Y - Y_last, <dY, Yhat - Y> / |dY|^2 (0 where ``twice`` (B, M)
    is false: no last change)."""
    rows, slots = twice.nonzero()
    reach = torch.zeros(twice.shape, dtype=torch.float64, device=states.device)
    per = max(1, CHUNK_VALUES // math.prod(states.shape[2:]))
    for c in range(0, len(rows), per):  # CHUNK_VALUES field values at a time
        r_t, s_t = indices(states, rows[c:c + per], slots[c:c + per])
        dy = (states[r_t, s_t] - last[r_t, s_t]).flatten(1)
        dot = lambda x: (dy * x).sum(-1, dtype=torch.float64)  # noqa: E731
        reach[r_t, s_t] = dot((prefix[r_t, s_t] - states[r_t, s_t]).flatten(1)) / dot(
            dy).clamp_min(torch.finfo(torch.float64).tiny)
    along.mul_(reach.reshape(*reach.shape, *(1,) * (along.dim() - 2)).to(along.real.dtype))


def _whole_ring(th, terms, base, x0, head, comm):
    """The rebuild where this rank holds all p slots (one rank, or a replicated window): one
    scan in chain order from Y_b's transform ``base`` (B, *F), as ``_split_ring`` would chain
    its two runs, without their maps, each slot's term (B, p, *F) replaced by its Yhat as it
    is used. Returns (the end state (B, *F), the denoiser's transform ``x0`` (B, *F), None
    where x0 is None); the Allgather of x0 is kept so that a round makes the same
    collectives on any communicator."""
    batch, p = th.shape[:2]
    rows = torch.arange(batch, device=terms.device)
    order = torch.from_numpy((head[None] + np.arange(p)[:, None]) % p).to(terms.device)
    state = base
    for slot in order:  # the slot of each chain index, per row
        term = terms[rows, slot]
        terms[rows, slot] = state
        state = torch.addcmul(term, th[rows, slot], state)
    if x0 is None:  # the second scan: nothing to gather
        return state, None
    x0hat = torch.view_as_complex(comm.allgather(torch.view_as_real(x0))[0].contiguous())
    return state, x0hat


def _split_ring(th, terms, along, reach, base, x0, high, start, bounds, comm):
    """The rebuild across ranks in one Allgather: this rank's two runs of slots as maps per
    mode, every rank's gathered and chained in the window's order, with what the second scan
    needs to chain the corrections along the points' last changes; then this rank's slots
    scanned from its runs' inputs. Each slot's term (B, M, *F) is replaced by its Yhat, its
    correction included, and ``along`` (B, M, *F) by that correction. reach: ``learn``'s
    ``Secants.reach``. Returns (the end state (B, *F), the denoiser's transform (B, *F)).

    A run's correction is not affine in its input (each point's reach is its new change's
    projection on its last one, <a_j, x> + b_j in the run's input x), so each rank sends, per
    slot, a_j = P_j w dY_j / |dY_j|^2 (P_j the run's product of Thetas before the slot) and
    U_j = T_j R_j (T_j the product after it), 2 half-fields a slot: every rank then forms
    every run's sum sum_j U_j (<a_j, x> + b_j) once the first chain gave each run its x."""
    batch, m = high.shape
    p, ranks, most = bounds[-1][1], len(bounds), max(b - a for a, b in bounds)
    a, c, before = _local_scan(th, terms, high)  # terms: each slot's state from a zero input
    on, at = reach
    at = at + (on.conj() * terms).real.flatten(2).sum(-1, dtype=torch.float64)  # b_j
    on = on * before  # a_j
    carried = _carried(th, along, high)  # U_j
    weighed = carried * _scalars(at, carried)
    in_high = point_mask(torch.from_numpy(high), weighed)
    sums = torch.stack([torch.where(in_high, weighed, 0).sum(1),
                        torch.where(in_high, 0, weighed).sum(1)], 1)  # sum_j U_j b_j per run
    parts = [torch.complex(a[:, 0], a[:, 1])[:, None], c, base[:, None], x0[:, None], sums,
             _padded(on, most), _padded(carried, most)]
    gathered = _gather(torch.cat(parts, 1), comm)  # (B, R, 7 + 2 most, *F)
    first = run_starts(bounds, start, p).reshape(batch, -1)  # (B, 2R): high, low per rank
    maps_a = torch.stack([gathered[:, :, 0].real, gathered[:, :, 0].imag], 2).flatten(1, 2)
    inputs, end = _chain(first, maps_a, gathered[:, :, 1:3].flatten(1, 2),
                         gathered[:, :, 3].sum(1), p)
    # every rank's reaches against its runs' inputs, and every run's sum of corrections
    sides = _sides(bounds, start, p, most).to(th.device)  # (B, R, most): 0 high, 1 low
    x = inputs.view(batch, ranks, 2, *inputs.shape[2:])
    x_at = torch.gather(x, 2, sides.reshape(*sides.shape, *(1,) * (x.dim() - 3)).expand(
        *sides.shape, *x.shape[3:]))
    a_all, u_all = gathered[:, :, 7:7 + most], gathered[:, :, 7 + most:]
    dots = (a_all.conj() * x_at).real.flatten(3).sum(-1, dtype=torch.float64)  # (B, R, most)
    runs = gathered[:, :, 5:7].clone()
    for run in (0, 1):
        runs[:, :, run] += (u_all * _scalars(dots * (sides == run), u_all)).sum(2)
    shifts, shift_end = _chain(first, maps_a, runs.flatten(1, 2), torch.zeros_like(end), p)
    # this rank's slots: Yhat from its runs' inputs, the corrections from their shifts
    own, run_at = x[:, comm.rank], _run_at(high, th.device)
    for j in range(m):
        terms[:, j] += before[:, j] * own[run_at(j)]
    along.mul_(_scalars(dots[:, comm.rank, :m] + at, along))
    _scan_own(th, along, shifts, high, comm.rank)
    terms += along
    return end + shift_end, gathered[:, :, 4].sum(1)


def _scalars(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Numbers x (*L) float64, in ``like``'s real dtype, shaped to broadcast against ``like``
    (*L, *F)."""
    return x.to(like.real.dtype).reshape(*x.shape, *(1,) * (like.dim() - x.dim()))


def _padded(x: torch.Tensor, most: int) -> torch.Tensor:
    """Per-slot x (B, M, *F) with zero slots after its M up to ``most``."""
    if x.shape[1] == most:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], most - x.shape[1], *x.shape[2:]))], 1)


def _sides(bounds, start, p: int, most: int) -> torch.Tensor:
    """Which run each rank's slot is in, 0 high (at or past the window's head) and 1 low,
    (B, R, most) int64; a rank's padding past its own slots counts as low (it sends zeros)."""
    head = (np.asarray(start) % p)[:, None, None]
    slot = np.array([[lo + j for j in range(most)] for lo, _ in bounds])[None]
    mine = np.arange(most)[None, None] < np.array([hi - lo for lo, hi in bounds])[None, :, None]
    return torch.from_numpy(np.where(mine & (slot >= head), 0, 1))


def _run_at(high: np.ndarray, device):
    """Slot j's run in a (B, 2, *F) per-run tensor as an index, for high (B, M) bool: a
    view (every row's slot on one side of the window's head, as on most ranks in most
    rounds) or each row's run."""
    if high.all() or not high.any():
        run = 0 if high.all() else 1
        return lambda j: (slice(None), run)
    side = torch.from_numpy(np.where(high, 0, 1)).to(device)
    rows = torch.arange(high.shape[0], device=device)
    return lambda j: (rows, side[:, j])


def _local_scan(th, terms, high):
    """This rank's two runs (``ring``'s high and low) scanned from a zero input, per mode:
    returns (their products of Thetas A (B, 2, *F) real, their sums C (B, 2, *F)) and each
    slot's product of the Thetas before it in its run (B, M, *F); each slot's term
    (B, M, *F) is replaced by its run's state there from a zero input. theta (B, M, *F),
    terms zero with theta 1 at points not evaluated; high (B, M) bool."""
    batch, m = high.shape
    half = terms.shape[2:]
    a = torch.ones((batch, 2, *half), dtype=th.dtype, device=th.device)
    c = torch.zeros((batch, 2, *half), dtype=terms.dtype, device=terms.device)
    before = torch.empty_like(th)
    run_at = _run_at(high, th.device)
    for j in range(m):
        at = run_at(j)
        before[:, j] = a[at]
        term = terms[:, j].clone()
        terms[:, j] = c[at]
        c[at] = th[:, j] * c[at] + term
        a[at] = th[:, j] * a[at]
    return a, c, before


def _carried(th, along, high) -> torch.Tensor:
    """U_j = T_j R_j (B, M, *F): each slot's ``along`` R_j times the product T_j of the
    Thetas after it in its run, what its term adds to the run's end."""
    batch, m = high.shape
    after = torch.ones((batch, 2, *th.shape[2:]), dtype=th.dtype, device=th.device)
    out = torch.empty_like(along)
    run_at = _run_at(high, th.device)
    for j in reversed(range(m)):
        at = run_at(j)
        out[:, j] = after[at] * along[:, j]
        after[at] = th[:, j] * after[at]
    return out


def _gather(parts: torch.Tensor, comm) -> torch.Tensor:
    """Every rank's complex parts (B, K, *F), in one Allgather: (B, R, K, *F)."""
    gathered = comm.allgather(torch.view_as_real(parts))
    return torch.view_as_complex(gathered.contiguous()).transpose(0, 1)


def _scan_own(th, terms, inputs, high, rank: int) -> None:
    """Scan this rank's slots from its two runs' inputs (taken from every run's, inputs
    (B, 2R, *F)), each slot's term (B, M, *F) replaced by its state."""
    batch = high.shape[0]
    cur = inputs.view(batch, -1, 2, *inputs.shape[2:])[:, rank].clone()
    run_at = _run_at(high, terms.device)
    for j in range(high.shape[1]):
        at = run_at(j)
        term = terms[:, j].clone()
        terms[:, j] = cur[at]
        cur[at] = th[:, j] * cur[at] + term


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
    """Keep this round's evaluated states and scores for the next round's secants."""
    vr, vc = valid.nonzero()
    v_r, v_c = indices(states, vr, vc)
    sec.y[v_r, v_c] = states[v_r, v_c]
    sec.g[v_r, v_c] = g[v_r, v_c]
    sec.pos = np.where(valid, pos, sec.pos)
