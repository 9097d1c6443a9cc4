"""A group's walk through its share of the store's batches: each claimed by the group's lead
rank before it is sampled (``pipeline.claims``), the sampler calls cut from the batches
claimed (``work.cut_calls``), and a stop that any rank of the group saw, agreed by all."""
from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

import torch

from pipeline.claims import STALE_S, batch_key, claim, claims_dir, live_jobs, release
from pipeline.done_record import members_left
from pipeline.errors import PiadmError, WriteFailed
from pipeline.work import PAUSE, cut_calls

if TYPE_CHECKING:
    from pipeline.inputs import Items
    from pipeline.progress import Progress

CLAIM_POLL_S = 0.5  # how often a job waiting on another job's batches looks again


def claimed_calls(mine, size: int, slices, stop, tally, bar: Progress, items: Items, path,
                  job: str):
    """Every rank of a group, in step: yields the (item, members) sampler calls, at most
    ``size`` members of one item each, of the store's batches in ``mine`` ((item, members,
    members left) each) that the group's lead has claimed for it, in order (``cut_calls``:
    consecutive batches share a call). Stops early, with ``tally.stopped`` set (``tally``:
    the caller's record of the run), when a stop signal reaches any rank of ``slices``:
    before each call, and while waiting for another job's batches."""
    for call in cut_calls(_claims(mine, slices, stop, tally, bar, items, path, job), size):
        if stop_agreed(slices, stop):  # the group stops together; its claims die with it
            tally.stopped = True
            return
        yield call


def _claims(mine, slices, stop, tally, bar: Progress, items: Items, path, job: str):
    """Every rank of a group, in step: yields (item, members still to write) for each batch
    of ``mine`` once the group's lead has claimed it, and ``PAUSE`` before waiting: a batch
    a live job holds waits till the rest are done, one another job finished only advances
    ``bar``."""
    folder = claims_dir(path)
    # a deque: 262,144 batches took 4.8 s to pop from the front of a list
    queue, deferred = collections.deque(mine), []  # deferred: batches another live job holds
    told = False
    while queue or deferred:
        if not queue:  # what is left is another job's: wait for it, or for it to die
            yield PAUSE  # the members held for a call are sampled first
            if not told and bar.speak:  # a wait of up to a minute, said once, not in silence
                jobs = ", ".join(j for j in live_jobs(folder) if j != job) or "another job"
                many = "es" if len(deferred) > 1 else ""
                bar.note(f"waiting for {len(deferred)} batch{many} that {jobs} holds (taken "
                         f"over if its heartbeat stops for {STALE_S:.0f} s)", now=True)
            told = True
            if stop_agreed(slices, stop):
                tally.stopped = True
                return
            time.sleep(CLAIM_POLL_S)
            queue, deferred = collections.deque(deferred), []
        item, members, left = queue.popleft()
        state, now = slices.bcast_object(
            _lead_claim(path, folder, item, members, job) if slices.rank == 0 else None, 0)
        if state == "failed":  # the group's ranks together, not its lead alone
            raise now
        if state == "theirs":
            deferred.append((item, members, left))
            continue
        if len(now) < len(left):  # written by another job meanwhile (all, or part: a dead one)
            bar.advance(len(left) - len(now), f"{items.dim} {items.labels[item]}: another job's",
                        own=False)
        if now:
            yield item, now


def _lead_claim(path, folder, item: int, members, job: str):
    """``_claim_state``, or (``failed``, the user error to raise) where the claim cannot be
    made: the store's own refusal (``StoreExists``: replaced meanwhile) as it is, a file the
    system refuses (a full disk) as a ``WriteFailed`` that says what is kept."""
    try:
        return _claim_state(path, folder, item, members, job)
    except PiadmError as err:
        return "failed", err
    except OSError as err:  # nothing of the batch is written yet
        return "failed", WriteFailed.of(err, f"claiming a batch of {path}")


def _claim_state(path, folder, item: int, members, job: str) -> tuple[str, tuple[int, ...]]:
    """Lead rank: (``done``, ()) when the batch is written already; (``ours``, the members
    still to write) when claimed now or before, or taken over from a dead job, which may
    have written part of it; (``theirs``, ()) while a live job is on it."""
    if not members_left(path, item, members):
        return "done", ()
    key = batch_key(item, members[0])
    if not claim(folder, key, job):
        return "theirs", ()
    now = members_left(path, item, members)  # read now that no one else writes it
    if not now:  # another job's, written between the two looks: nothing to hold it for
        release(folder, key, job)
    return "ours", now


def stop_agreed(comm, stop) -> bool:
    """Whether a stop signal reached any rank of ``comm`` (every rank calls it)."""
    flag = torch.tensor([1.0 if stop else 0.0], dtype=torch.float64)
    return float(comm.allreduce_max(flag)[0]) > 0
