"""pc-window's step 2 with the learned corrector (``pipeline.samplers.secant``'s Thetas):
Yhat_{n+1} = Theta_n Yhat_n + Phi_n(Y_n) - Theta_n Y_n per Fourier mode, on one rank or across
the ring's slots (docs/algorithms.md section 5, "A corrector learned from secants" and "Two
collectives a round").

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

import numpy as np
import torch

from pipeline.fourier import half_weights
from pipeline.samplers.common import indices, point_mask
from pipeline.samplers.ring import run_starts
from pipeline.samplers.secant import (CHUNK_VALUES, Secants, column, irfft_rows, rfft_rows,
                                      row_chunks, thetas)


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
    coef = lambda c: column(c, states[0])  # noqa: E731  (J,) against points (J, *S)
    # what Theta misses along a point's last change, where it has one (``learn``)
    twice = valid & (sec.pos == pos)
    along = sec.along
    # a point not evaluated this round passes its input on: theta 1, no term
    rows, slots = valid.nonzero()
    for part in row_chunks(rows, math.prod(field)):
        r, at = rows[part], slots[part]
        r_t, s_t = indices(states, r, at)
        k = pos[r, at]
        phi = coef(t.decay[k]) * states[r_t, s_t] + coef(t.increment[k, 1]) * g[r_t, s_t]
        if xi is not None:
            phi = phi + coef(t.increment[k, 2]) * xi[r_t, s_t]
        fy = rfft_rows(states[r_t, s_t], r, len(field))
        theta = thetas(sec, r, t.decay[k], t.increment[k, 1], t.u[k], t.v0[k], bound)
        th[r_t, s_t] = theta.to(states.dtype)
        terms[r_t, s_t] = rfft_rows(phi, r, len(field)) - th[r_t, s_t] * fy
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
        x0[r_t] = rfft_rows(mean, holder, len(field))
    high = np.arange(lo, hi)[None] >= head[:, None]
    if len(bounds) > 1:  # terms become each slot's Yhat, its correction included
        end, x0hat = _split_ring(th, terms, along, sec.reach, base, x0, high, start, bounds,
                                 comm)
        sec.reach = None
        return irfft_rows(terms, field), irfft_rows(end[:, None], field)[:, 0], \
            irfft_rows(x0hat[:, None], field)
    end, x0hat = _whole_ring(th, terms, base, x0, head, comm)
    # terms now holds each slot's Yhat
    prefix = irfft_rows(terms, field)
    # the second scan: each point's correction along its last change, as its Yhat from the
    # first one calls for it, carried down the window by the same Thetas
    _scale_along(along, twice, states, sec.y, prefix)
    zero = torch.zeros_like(base)
    shift, _ = _whole_ring(th, along, zero, None, head, comm)
    prefix += irfft_rows(along, field)
    y_end = irfft_rows((end + shift)[:, None], field)[:, 0]
    x0_field = irfft_rows(x0hat[:, None], field)
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
    its two runs, without their maps, each slot's term (B, p, *F) replaced by its Yhat. Returns
    (the end state (B, *F), the denoiser's transform ``x0`` (B, *F), None where x0 is None);
    the Allgather of x0 is kept so that a round makes the same collectives on any
    communicator.

    The terms and Thetas are taken in chain order once and each state written into a stack of
    them by one fused product a slot, (p, B, *F): a round's scans are most of its tensor
    operations otherwise (on a GPU each is a kernel launch)."""
    batch, p = th.shape[:2]
    order = (head[None] + np.arange(p)[:, None]) % p  # (p, B): the slot of each chain index
    o_t, r_t = indices(terms, order, np.tile(np.arange(batch), (p, 1)))
    th_c, terms_c = th[r_t, o_t].unbind(0), terms[r_t, o_t].unbind(0)
    states = torch.empty((p + 1, *base.shape), dtype=terms.dtype, device=terms.device)
    states[0] = base
    out = states.unbind(0)
    for j in range(p):
        torch.addcmul(terms_c[j], th_c[j], out[j], out=out[j + 1])
    terms[r_t, o_t] = states[:p]
    if x0 is None:  # the second scan: nothing to gather
        return states[p], None
    x0hat = torch.view_as_complex(comm.allgather(torch.view_as_real(x0))[0].contiguous())
    return states[p], x0hat


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
    own = x[:, comm.rank]
    own_at = torch.where(point_mask(torch.from_numpy(high), terms), own[:, :1], own[:, 1:])
    terms += before * own_at
    along.mul_(_scalars(dots[:, comm.rank, :m] + at, along))
    _scan_own(th, along, shifts, high, comm.rank)
    terms += along
    return end + shift_end, gathered[:, :, 4].sum(1)


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
    maps, sums = a[r_t, o_t].transpose(0, 1).unbind(0), c[r_t, o_t].transpose(0, 1).unbind(0)
    runs = first.shape[1]
    states = torch.empty((runs + 1, *base.shape), dtype=c.dtype, device=c.device)
    x = states.unbind(0)  # each run's input in chain order; x[busy] the end state
    x[0].copy_(base)
    for i in range(busy):
        torch.mul(maps[i], x[i], out=x[i + 1])
        x[i + 1].add_(sums[i])
    if busy + 1 < runs:  # the empty runs pass the end state on
        states[busy + 1:runs] = x[busy]
    inputs = torch.empty_like(c)
    inputs[r_t, o_t] = states[:runs].transpose(0, 1)
    return inputs, x[busy]


def _local_scan(th, terms, high):
    """This rank's two runs (``ring``'s high and low) scanned from a zero input, per mode:
    returns (their products of Thetas A (B, 2, *F) real, their sums C (B, 2, *F)) and each
    slot's product of the Thetas before it in its run (B, M, *F); each slot's term
    (B, M, *F) is replaced by its run's state there from a zero input. theta (B, M, *F),
    terms zero with theta 1 at points not evaluated; high (B, M) bool, a row's low slots
    first (the ring's: a rank's slots before the window's head, then those past it)."""
    batch, half = high.shape[0], terms.shape[2:]
    low = (~high).sum(1)
    ones = torch.ones((batch, 2, *half), dtype=th.dtype, device=th.device)
    zeros = torch.zeros((batch, 2, *half), dtype=terms.dtype, device=terms.device)
    before, a = _scan_runs(th, None, low, ones)
    states, c = _scan_runs(th, terms, low, zeros)
    terms.copy_(states)
    return a, c, before


def _scan_runs(th, terms, low: np.ndarray, inputs):
    """x_{j+1} = th_j x_j + terms_j (terms None: a product) over this rank's slots in order,
    each run from its own input: a row's low run (``ring``'s, before the window's head) is
    its first low (B,) slots, from inputs[:, 1], its high run the rest, from inputs[:, 0]
    (inputs (B, 2, *F)). th (B, M, *F) real, terms (B, M, *F). Returns (the state entering
    each slot (B, M, *F), each run's state after its last slot (B, 2, *F), an empty run's its
    input).

    The states are written into a stack, (M + 1, B, *F), by a product and a sum a slot, the
    same arithmetic as ``th * x + term`` (so the same numbers): two tensor operations a slot,
    where indexing both runs' states at every slot took a dozen."""
    batch, m = th.shape[:2]
    stack = torch.empty((m + 1, batch, *inputs.shape[2:]), dtype=inputs.dtype,
                        device=inputs.device)
    stack[0] = torch.where(point_mask(torch.from_numpy(low == 0), inputs[:, 0]), inputs[:, 0],
                           inputs[:, 1])
    x, thetas = stack.unbind(0), th.transpose(0, 1).unbind(0)
    added = None if terms is None else terms.transpose(0, 1).unbind(0)
    ends = inputs.clone()
    for j in range(m):
        rows = np.nonzero(low == j)[0] if j else ()
        if len(rows):  # these rows' high runs start here: their low runs end
            (r_t,) = indices(inputs, rows)
            ends[r_t, 1] = x[j][r_t]
            x[j][r_t] = inputs[r_t, 0]
        torch.mul(thetas[j], x[j], out=x[j + 1])
        if added is not None:
            x[j + 1].add_(added[j])
    for run, rows in ((1, low == m), (0, low < m)):  # low == m: no high run
        if m and rows.any():
            (r_t,) = indices(inputs, np.nonzero(rows)[0])
            ends[r_t, run] = stack[m][r_t]
    return stack[:m].transpose(0, 1), ends


def _carried(th, along, high) -> torch.Tensor:
    """U_j = T_j R_j (B, M, *F): each slot's ``along`` R_j times the product T_j of the
    Thetas after it in its run, what its term adds to the run's end (a stack built from the
    last slot back, as ``_scan_runs`` builds its states)."""
    batch, m = high.shape
    low = (~high).sum(1)
    after = torch.empty((m, batch, *th.shape[2:]), dtype=th.dtype, device=th.device)
    t, thetas = after.unbind(0), th.transpose(0, 1).unbind(0)
    if m:
        t[m - 1].fill_(1)
    for j in reversed(range(m - 1)):
        torch.mul(thetas[j + 1], t[j + 1], out=t[j])
        (rows,) = np.nonzero(low == j + 1)  # the last slot of these rows' low runs
        if len(rows):
            t[j][indices(after, rows)[0]] = 1
    return after.transpose(0, 1) * along


def _scan_own(th, terms, inputs, high, rank: int) -> None:
    """Scan this rank's slots from its two runs' inputs (taken from every run's, inputs
    (B, 2R, *F)), each slot's term (B, M, *F) replaced by its state."""
    batch = high.shape[0]
    own = inputs.view(batch, -1, 2, *inputs.shape[2:])[:, rank]
    states, _ = _scan_runs(th, terms, (~high).sum(1), own)
    terms.copy_(states)


def _gather(parts: torch.Tensor, comm) -> torch.Tensor:
    """Every rank's complex parts (B, K, *F), in one Allgather: (B, R, K, *F)."""
    gathered = comm.allgather(torch.view_as_real(parts))
    return torch.view_as_complex(gathered.contiguous()).transpose(0, 1)


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
