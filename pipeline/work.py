"""The work of filling a store: its (item, batch) pairs with members left, and the sampler
calls they are sampled in (the store's batches are its units of claiming and writing;
ensemble.batch_size members of one item make a call, from one batch or several)."""
from __future__ import annotations

import itertools

import numpy as np


def work_list(done: np.ndarray, batches: list[tuple[int, ...]], only: tuple[int, ...]):
    """(item, members) pairs still to do: every batch of every item in ``only`` (all if
    empty) with a member not done."""
    items = only or range(done.shape[0])
    return [(i, b) for i in items for b in batches if not done[i, list(b)].all()]


def call_batch(batch_size: int, members: int) -> int:
    """The most members a sampler call holds: ``batch_size``, at most the ``members`` of an
    item (a call never spans two items; it may span several of the store's batches)."""
    return min(batch_size, members)


def batch_note(unit: int, size: int) -> str:
    """How a store made in batches of ``unit`` members is filled at ensemble.batch_size
    ``size``, in parentheses (empty when they agree)."""
    if size < unit:
        return f" ({size} member(s) a call: ensemble.batch_size)"
    if size > unit:
        return f" (up to {size} members a call, its batches together: ensemble.batch_size)"
    return ""


PAUSE = None  # in cut_calls' input: the caller is about to wait, so no call may hold members back


def cut_calls(batches, size: int):
    """The sampler calls, at most ``size`` members each, of the claimed store batches
    ``batches`` (an iterable of (item, members left) pairs, or ``PAUSE``): the members of
    consecutive batches of one item are sampled together, so a store made in small batches
    still fills calls of ``size``; another item, a pause or the end closes a call. Yields
    (item, members) pairs, lazily: a batch is claimed only when a call needs it."""
    item, held = None, []
    for entry in itertools.chain(batches, [PAUSE]):
        if entry is PAUSE or entry[0] != item:  # the call in the making closes
            calls, held = _whole_calls(held, size, close=True)
            yield from ((item, call) for call in calls)
        if entry is not PAUSE:
            item, left = entry
            calls, held = _whole_calls(held + list(left), size, close=False)
            yield from ((item, call) for call in calls)


def _whole_calls(held: list, size: int, close: bool) -> tuple[list[tuple[int, ...]], list]:
    """The calls of ``size`` that ``held`` fills (and a last shorter one with ``close``), and
    the members left over."""
    n = len(held) if close else len(held) - len(held) % size
    return [tuple(held[a:a + size]) for a in range(0, n, size)], held[n:]


def write_runs(call: tuple[int, ...], unit: int) -> list[tuple[int, int]]:
    """The [lo, hi) index ranges of the members ``call`` that are written as one region each:
    consecutive members within one of the store's batches of ``unit`` (the store's batches
    are its units of claiming, so each is written under its own claim)."""
    runs: list[list[int]] = []
    for i, m in enumerate(call):
        if runs and m == call[i - 1] + 1 and m // unit == call[i - 1] // unit:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(lo, hi) for lo, hi in runs]
