"""Index maths of the ring window (docs/algorithms.md, "Distributed form"): pure, no MPI.

A window of ``p`` points lives in ``p`` ring slots: trajectory position n sits in slot n mod p,
so sliding the window frees the slots of the accepted points and nothing else moves. Ranks own
contiguous slot ranges (``pipeline.decomposition.slice_bounds``). Seen from the window start b,
slot s holds chain index c = (s - b) mod p, i.e. position b + c; a rank's slots form at most
two runs of consecutive chain indices: the *high* run (slots >= b mod p, the window's head)
and the *low* run (slots < b mod p, the part that wrapped around the ring).
"""
from __future__ import annotations

import torch

HIGH, LOW = 0, 1


def chain_index(lo: int, hi: int, start: torch.Tensor, p: int) -> torch.Tensor:
    """Chain index (B, hi - lo) long of slots lo..hi-1 for window starts ``start`` (B,)."""
    slots = torch.arange(lo, hi)
    return (slots[None] - start[:, None]) % p


def run_starts(bounds: list[tuple[int, int]], start: torch.Tensor, p: int) -> torch.Tensor:
    """First chain index of every rank's high and low run, (B, ranks, 2) long; ``p`` for a run
    that is empty. ``bounds`` are the ranks' slot ranges [lo, hi), ``start`` the window starts.
    Runs never overlap, so a run precedes another exactly when its first index is smaller."""
    head = (start % p)[:, None]  # the slot of position b
    lo = torch.tensor([b[0] for b in bounds])[None]
    hi = torch.tensor([b[1] for b in bounds])[None]
    high = torch.where(hi > head, torch.maximum(lo, head) - head, p)
    low = torch.where((lo < head) & (hi > lo), lo + p - head, p)
    return torch.stack([high, low], -1)


def before(starts: torch.Tensor, rank: int) -> torch.Tensor:
    """(B, 2, ranks, 2) bool: whether each run of every rank precedes this rank's high and
    low run in the chain (the runs whose totals make up that run's offset)."""
    mine = starts[:, rank]  # (B, 2)
    return starts[:, None, :, :] < mine[:, :, None, None]
