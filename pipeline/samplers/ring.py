"""The ring window (docs/algorithms.md, "Distributed form"): index maths (no MPI) and the
round's two shared steps, the batched call on a rank's slots and the chain prefix.

A window of ``p`` points lives in ``p`` ring slots: trajectory position n sits in slot n mod p,
so sliding the window frees the slots of the accepted points and nothing else moves. Ranks own
contiguous slot ranges (``pipeline.decomposition.slice_bounds``). Seen from the window start b,
slot s holds chain index c = (s - b) mod p, i.e. position b + c; a rank's slots form at most
two runs of consecutive chain indices: the *high* run (slots >= b mod p, the window's head)
and the *low* run (slots < b mod p, the part that wrapped around the ring).

``chain_prefix`` sums a per-slot quantity along the chain across ranks with one Allgather of
every rank's two run totals; the samplers pass their communicator in.

``evaluate_shared`` is the other way to split a round (``sampler.window_split =
"replicated"``): every rank keeps all p slots, the round's points are cut evenly over the
ranks for the model call, and one Allgather of the scores gives every rank the whole round,
whose rest it then does on its own, as one rank would.

The index bookkeeping (window starts, chain indices, masks, positions) is numpy on the host:
a round does a few hundred such operations on arrays of a few elements, where a numpy
operation costs a microsecond and a torch one five or more, and on many ranks sharing a
node's cores that host time is what a round waits for (docs/planning.md). Fields stay torch.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from pipeline.decomposition import slice_bounds
from pipeline.samplers.common import indices, point_cumsum, point_mask
from pipeline.samplers.options import RanksParted

HIGH, LOW = 0, 1


def chain_index(lo: int, hi: int, start, p: int) -> np.ndarray:
    """Chain index (B, hi - lo) int64 of slots lo..hi-1 for window starts ``start`` (B,)."""
    return (np.arange(lo, hi)[None] - np.asarray(start)[:, None]) % p


@lru_cache(maxsize=64)
def _edges(bounds: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """The ranks' first and last-plus-one slots, each (1, ranks): built once per layout, not
    once per round."""
    lo, hi = np.array(bounds, dtype=np.int64).T
    return lo[None], hi[None]


def run_starts(bounds: list[tuple[int, int]], start, p: int) -> np.ndarray:
    """First chain index of every rank's high and low run, (B, ranks, 2) int64; ``p`` for a run
    that is empty. ``bounds`` are the ranks' slot ranges [lo, hi), ``start`` the window starts.
    Runs never overlap, so a run precedes another exactly when its first index is smaller."""
    head = (np.asarray(start) % p)[:, None]  # the slot of position b
    lo, hi = _edges(tuple(map(tuple, bounds)))
    high = np.where(hi > head, np.maximum(lo, head) - head, p)
    low = np.where((lo < head) & (hi > lo), lo + p - head, p)
    return np.stack([high, low], -1)


def before(starts: np.ndarray, rank: int) -> np.ndarray:
    """(B, 2, ranks, 2) bool: whether each run of every rank precedes this rank's high and
    low run in the chain (the runs whose totals make up that run's offset)."""
    mine = starts[:, rank]  # (B, 2)
    return starts[:, None, :, :] < mine[:, :, None, None]


def chain_prefix(w: torch.Tensor, states: torch.Tensor, start, width,
                 bounds: list[tuple[int, int]], p: int, comm, extra: torch.Tensor | None = None):
    """Exclusive chain prefix sums of w over the ring, from one Allgather.

    w (B, hi - lo, *S): this rank's per-slot terms (zero where not needed); states
    (B, hi - lo, *S): this rank's slot states, of which the one at chain index 0 is the base
    Y_b; start, width (B,) int: window starts and evaluated points; bounds: every rank's slot
    range. extra (B, K, *S) or None: terms summed over ranks in the same message. Returns
    (Y_b + the sum of w over the chain indices before each own slot (B, hi - lo, *S),
    Y_b + the sum of w over the whole window (B, *S), the sum of extra or None), the last two
    the same on every rank."""
    start, width = np.asarray(start), np.asarray(width)
    lo, hi = bounds[comm.rank]
    head = start % p
    own_base = torch.zeros_like(states[:, 0])  # Y_b where this rank holds it, else zero
    (owner,) = ((head >= lo) & (head < hi) & (width > 0)).nonzero()
    if len(owner):
        rows, cols = indices(states, owner, head[owner] - lo)
        own_base[rows] = states[rows, cols]
    if len(bounds) == 1:  # every row alike, so that a row's sums do not depend on its batch
        return _whole_ring_prefix(w, own_base, head, p, comm, extra)
    high_np = np.arange(lo, hi)[None] >= head[:, None]
    # a rank whose slots all lie on one side of the window start (most of them, most rounds)
    # has one run: the other's masked copy and scan would only add zeros
    one_run = high_np.all() or not high_np.any()
    if high_np.all():
        cum_high, cum_low = point_cumsum(w), torch.zeros_like(w)
    elif one_run:
        cum_high, cum_low = torch.zeros_like(w), point_cumsum(w)
    else:
        high = point_mask(torch.from_numpy(high_np), w)
        cum_high = point_cumsum(torch.where(high, w, 0.0))
        cum_low = point_cumsum(torch.where(high, 0.0, w))
    parts = [(own_base + cum_high[:, -1])[:, None], cum_low[:, -1:]]
    if extra is not None:
        parts.append(extra)
    gathered = comm.allgather(torch.cat(parts, 1)).transpose(0, 1)  # (B, ranks, parts, *S)
    totals = gathered[:, :, :2]
    prec = torch.from_numpy(before(run_starts(bounds, start, p), comm.rank)).to(
        totals.device, totals.dtype)
    # one batched product: (B, 2 runs, ranks x 2 totals) @ (B, ranks x 2 totals, field)
    offset = torch.bmm(prec.flatten(2), totals.flatten(3).flatten(1, 2)).view(
        totals.shape[:1] + (2,) + totals.shape[3:])
    base_high, base_low = (offset[:, HIGH] + own_base)[:, None], offset[:, LOW, None]
    if high_np.all():
        prefix = _plus_before(base_high, cum_high)
    elif one_run:
        prefix = _plus_before(base_low, cum_low)
    else:
        prefix = torch.where(high, _plus_before(base_high, cum_high),
                             _plus_before(base_low, cum_low))
    summed = None if extra is None else gathered[:, :, 2:].sum(1)
    return prefix, totals.sum((1, 2)), summed


def _whole_ring_prefix(w: torch.Tensor, base: torch.Tensor, head: np.ndarray, p: int, comm,
                       extra: torch.Tensor | None):
    """``chain_prefix`` where one rank holds all p slots (one rank, or a replicated window):
    the slots gathered in chain order and scanned once, where a window that wraps around the
    ring would be masked into two runs and scanned twice (a third of a one-rank round's host
    time at p = 96 on 32 x 32 fields). w (B, p, *S), base (B, *S) the Y_b, head (B,) its
    slots; ``comm`` has one rank, and its Allgather is kept so that a round makes the same
    collectives on any communicator (``tests/test_collectives.py`` counts them on one)."""
    order = (head[:, None] + np.arange(p)[None]) % p  # the slot of each chain index
    rows = np.repeat(np.arange(len(head)), p).reshape(order.shape)
    r, o = indices(w, rows, order)
    in_chain = w[r, o]
    cum = point_cumsum(in_chain)
    parts = [(base + cum[:, -1])[:, None]] + ([] if extra is None else [extra])
    gathered = comm.allgather(torch.cat(parts, 1))[0]
    prefix = torch.empty_like(w)
    prefix[r, o] = _plus_before(base[:, None], cum)
    return prefix, gathered[:, 0], None if extra is None else gathered[:, 1:]


def _plus_before(base: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """base (B, 1, *S) plus, at each point of ``cum`` (B, M, *S, an inclusive prefix sum of
    terms), the terms before it: the previous point's prefix, never the point's own prefix
    less its term, which leaves that term's rounding in the sum (a far guess that grows
    round after round, as the lagged step does past h = 2 ln 2, leaked into accepted points)."""
    out = torch.empty_like(cum)
    out[:, :1] = base
    torch.add(base, cum[:, :-1], out=out[:, 1:])
    return out


def window_points(start, lo: int, hi: int, p: int, n: int):
    """The window points before step n in slots lo..hi-1 for window starts ``start`` (B,):
    (width (B,), chain (B, hi - lo), positions, valid mask), numpy."""
    start = np.asarray(start)
    width = np.minimum(np.maximum(n - start, 0), p)  # np.clip costs 3 times as much
    chain = chain_index(lo, hi, start, p)
    pos = start[:, None] + chain
    return width, chain, pos, chain < width[:, None]


def evaluate_window(model, states: torch.Tensor, start, bounds, p: int, n: int,
                    u: np.ndarray, rank: int):
    """One round's batched model call on this rank's slots: the window points before step n.

    states (B, hi - lo, *S) slot states, start (B,) int window starts, u (N + 2p,) float64 the
    clock of each step (padded past n). Returns (width (B,), chain (B, hi - lo), positions,
    valid mask, all numpy, and scores (B, hi - lo, *S), zero where not valid)."""
    width, chain, pos, valid = window_points(start, *bounds[rank], p, n)
    if valid.all():  # every round but the last few: no gather or scatter
        x, clock = states.flatten(0, 1), torch.from_numpy(u[pos.ravel()])
        return width, chain, pos, valid, model(x, clock.to(x.device, x.dtype)).view_as(states)
    g = torch.zeros_like(states)
    if valid.any():
        (mask,) = indices(states, valid)
        x, clock = states[mask], torch.from_numpy(u[pos[valid]])
        g[mask] = model(x, clock.to(x.device, x.dtype))
    return width, chain, pos, valid, g


def evaluate_shared(model, states: torch.Tensor, start, p: int, n: int, u: np.ndarray, comm):
    """One round's model call with the whole window on every rank: the window points before
    step n split evenly over ``comm``'s ranks, each evaluating its share, the scores joined by
    one Allgather. states (B, p, *S) slot states, start (B,) int window starts, u the clocks.
    Returns (width, chain, positions, valid) as ``evaluate_window`` with the rank's range the
    whole ring, and scores (B, p, *S), zero where not valid, the same on every rank."""
    start = np.asarray(start)
    width, chain, pos, valid = window_points(start, 0, p, p, n)
    rows, slots = valid.nonzero()  # every rank lists the points in the same order
    total = len(rows)
    lo, hi = slice_bounds(total, comm.size, comm.rank)
    share = -(-total // comm.size)  # an Allgather's parts are equal: shorter ones are padded
    # one more row carries where this rank's windows start (a sum, exact in float32), so that
    # ranks whose arithmetic parted ways stop rather than join others' scores
    piece = states.new_zeros((share + 1, *states.shape[2:]))
    piece[share].view(-1)[0] = float(int(start.sum()) % 2**24)
    if hi > lo:
        r, s = indices(states, rows[lo:hi], slots[lo:hi])
        clock = torch.from_numpy(u[pos[rows[lo:hi], slots[lo:hi]]])
        piece[: hi - lo] = model(states[r, s], clock.to(states.device, states.dtype))
    sizes = [slice_bounds(total, comm.size, k) for k in range(comm.size)]
    gathered = comm.allgather(piece)
    starts = gathered[:, share].flatten(1)[:, 0]
    if not bool((starts == starts[0]).all()):
        raise RanksParted("the ranks of a replicated window disagree on where it starts: their "
                          "arithmetic differs (run every rank on the same kind of device, or "
                          "set sampler.window_split = 'slots')")
    joined = torch.cat([gathered[k, : b - a] for k, (a, b) in enumerate(sizes)])
    g = torch.zeros_like(states)
    r, s = indices(states, rows, slots)
    g[r, s] = joined
    return width, chain, pos, valid, g
