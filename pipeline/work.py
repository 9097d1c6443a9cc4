"""The work of filling a store: its (item, batch) pairs with members left, and the sampler
calls a batch is cut into (the store's batches are its units of claiming and writing;
ensemble.batch_size members at most make one call)."""
from __future__ import annotations

import numpy as np


def work_list(done: np.ndarray, batches: list[tuple[int, ...]], only: tuple[int, ...]):
    """(item, members) pairs still to do: every batch of every item in ``only`` (all if
    empty) with a member not done."""
    items = only or range(done.shape[0])
    return [(i, b) for i in items for b in batches if not done[i, list(b)].all()]


def batch_note(unit: int, size: int) -> str:
    """How a store made in batches of ``unit`` members is filled at ensemble.batch_size
    ``size``, in parentheses (empty when they agree)."""
    if size < unit:
        return f" ({size} member(s) a call: ensemble.batch_size)"
    if size > unit:
        return f" (ensemble.batch_size = {size} sets the batches of a new store)"
    return ""


def member_calls(left: tuple[int, ...], size: int) -> list[tuple[int, ...]]:
    """The sampler calls for the members ``left`` of one of the store's batches: runs of
    consecutive members (each written as a run), cut into at most ``size`` members each."""
    runs, calls = [], []
    for m in left:
        if runs and m == runs[-1][-1] + 1:
            runs[-1].append(m)
        else:
            runs.append([m])
    for run in runs:
        calls += [tuple(run[a:a + size]) for a in range(0, len(run), size)]
    return calls
