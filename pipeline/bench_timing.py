"""How ``piadm bench`` times one sampler's run: wall seconds on the slowest rank, the time in
collectives and the collectives' own share of it, and the waiting split into waiting for
other ranks' model calls and for the rest (``model_waits``), with the peak memory."""
from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.memory import peak_since, start_peak
from pipeline.watched import Watched

# The bench's records of every collective, gathered once per timed run: (seconds in it, model
# seconds since the rank's previous collective) per rank and call
SPENT, MODEL = 0, 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading a clock
        torch.cuda.synchronize(device)


def _since(comm, before: dict) -> dict:
    """{kind: [count, seconds]} of this rank's collectives since the tally ``before``."""
    return {k: [v[0] - before.get(k, [0, 0.0])[0], v[1] - before.get(k, [0, 0.0])[1]]
            for k, v in comm.tally.items() if v[0] > before.get(k, [0, 0.0])[0]}


def _collectives(comm, mine: dict, own: dict) -> dict:
    """Every rank's tally ``mine`` merged with each kind's own seconds ``own``:
    {kind: [count as on every rank, the largest seconds, own seconds]}."""
    merged: dict = {}
    for part in comm.allgather_object(mine):
        for kind, (count, seconds) in part.items():
            entry = merged.setdefault(kind, [count, 0.0, round(own.get(kind, 0.0), 6)])
            entry[1] = round(max(entry[1], seconds), 6)
    return merged


class _ModelClock:
    """A rank's seconds in model calls (``Watched`` adds each call's): its model time between
    two collectives, for the bench's split of waiting for other ranks (``split_calls``). On a
    GPU each call is waited for, so that its kernels count as model time; that costs the
    overlap of a launch-bound loop, under MPI only."""

    def __init__(self):
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.seconds += seconds

    def restart(self) -> None:
        """Count the model's time from zero (a repeat's start)."""
        self.seconds = 0.0


def model_waits(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split the waiting in collectives. table (ranks, calls, 2) float64: per rank and
    collective, the seconds spent in it and the model seconds since that rank's previous
    collective. The last rank to arrive spent least in a call, and that least is the call's
    own time; every other rank waited the rest. Of that wait, the part that the last rank's
    extra model time explains (its model seconds less this rank's, at most the wait) is
    waiting for model calls. Returns (own seconds per call (calls,), each rank's seconds
    waiting for other ranks' model calls (ranks,))."""
    spent, model = table[..., SPENT], table[..., MODEL]
    last = spent.argmin(0)
    cols = np.arange(spent.shape[1])
    own = spent[last, cols]
    extra = np.clip(model[last, cols][None] - model, 0.0, spent - own[None])
    return own, extra.sum(1)


def split_calls(comm, calls: list) -> tuple[dict[str, float], float | None]:
    """From ``calls``, this rank's (kind, seconds, model seconds so far) of every collective in
    order: each kind's own seconds, and the seconds the rank that spent most in collectives
    waited for other ranks' model calls (``model_waits``). ({}, None) where the ranks' records
    do not pair up."""
    sizes = comm.allreduce_max(torch.tensor([len(calls), -len(calls)], dtype=torch.float64))
    if not calls or sizes[0] != -sizes[1]:  # the same verdict on every rank
        return {}, None
    spent = torch.tensor([s for _, s, _ in calls], dtype=torch.float64)
    clock = torch.tensor([m for _, _, m in calls], dtype=torch.float64)
    model = torch.diff(clock, prepend=clock.new_zeros(1))  # since the previous collective
    table = comm.allgather(torch.stack([spent, model], -1)).cpu().numpy()
    own, waits = model_waits(table)
    out: dict[str, float] = {}
    for (kind, _, _), seconds in zip(calls, own.tolist()):
        out[kind] = out.get(kind, 0.0) + seconds
    return out, float(waits[table[..., SPENT].sum(1).argmax()])


def timed_run(sampler, model, y0, grid, noise, *, comm, options, device, repeats=1):
    """Run one sampler ``repeats`` times; returns (y, stats, (wall seconds of each repeat,
    comm s, the collectives' own s, s waiting for other ranks' model calls, peak bytes),
    collectives), wall, comm and peak the largest over ranks; comm, own, the wait and the
    collectives those of the fastest repeat, whose wall the row's shares divide them by (peak:
    of the last). On a GPU an untimed first run pays for kernel loading and FFT plans."""
    if device.type == "cuda":
        sampler(model, y0, grid, noise, comm=comm, options=options)
    # the model's time between collectives, for splitting the waits
    clock = _ModelClock() if comm.size > 1 else None
    if clock is not None:
        model = Watched(model, clock.add, sync=lambda: _sync(device))
    walls, repeat = [], []
    for _ in range(repeats):
        comm.barrier()
        tally = {k: list(v) for k, v in comm.tally.items()}
        comm_before, baseline = comm.seconds, start_peak(device)
        if clock is not None:
            clock.restart()
        # the sampler's collectives, not the Allreduce below, which is the bench's own
        with comm.recording((lambda: clock.seconds) if clock else None) as calls:
            start = time.perf_counter()
            y, stats = sampler(model, y0, grid, noise, comm=comm, options=options)
            _sync(device)
            wall = time.perf_counter() - start
        mine = _since(comm, tally)
        local = torch.tensor([wall, comm.seconds - comm_before, peak_since(device, baseline)],
                             dtype=torch.float64)
        wall, comm_s, peak = (float(v) for v in comm.allreduce_max(local))
        walls.append(wall)
        repeat.append((comm_s, calls, mine))
    comm_s, calls, mine = repeat[walls.index(min(walls))]  # the same repeat on every rank
    own, model_wait = split_calls(comm, calls)
    return (y, stats, (walls, comm_s, sum(own.values()), model_wait, peak),
            _collectives(comm, mine, own))
