"""Filling an ensemble store: work items x member batches over the rank grid, resumable.

The work is every (item, member batch) of the store not yet done. Groups of ranks take
contiguous shares of it; a group's time slices split each batch's Picard blocks and its first
slice hands the result to the writer, which marks the members done after their data. Between
batches each group agrees whether a stop signal arrived; a stopped run exits with
``EXIT_PREEMPTED`` and a rerun of the same config does the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time

import numpy as np
import torch

from models import build_model
from models.user_code import one_line, raised_at
from pipeline.calibrate import Calibration
from pipeline.claimed import claimed_calls
from pipeline.claims import Heartbeat, batch_key, claims_dir, holds, new_job_id, release
from pipeline.comm import SerialComm
from pipeline.console import on_every_rank, on_rank0, print0, say
from pipeline.decomposition import share
from pipeline.done_record import done_members, write_batch
from pipeline.errors import (NetworkFailed, OutOfMemory, PiadmError, UnitsOverflow,
                             is_out_of_memory)
from pipeline.inputs import Items
from pipeline.labels import label_text
from pipeline.layout import RankGrid, rank_grid
from pipeline.memory import memory_sharing
from pipeline.memory_check import check_memory, round_points
from pipeline.noise import Noise
from pipeline.progress import Progress, every_for
from pipeline.run import (DTYPES, member_batches, model_data_bound, sample_batch, sampler_grid,
                          sampler_options, unbounded_note)
from pipeline.run_end import Halt, Summary, Tally, finish, raised_by_group
from pipeline.run_items import bind_field, field_scale, load_items
from pipeline.run_start import start_up
from pipeline.samplers import REGISTRY
from pipeline.samplers.options import RanksParted
from pipeline.settings import Config
from pipeline.signals import StopRequest
from pipeline.store import ASKED, StoreSpec
from pipeline.store_attrs import member_batch, read_attrs
from pipeline.store_match import mixed_revision
from pipeline.work import batch_note, call_batch, work_list, write_runs
from pipeline.writer import make_writer


def takes_writes(path: str) -> bool:
    """Whether this process may write into the store at ``path``: not on a read-only mount,
    nor without permission."""
    return os.access(path, os.W_OK)


def not_begun(path: str) -> Summary:
    """The summary of a run stopped before its first batch: nothing written."""
    return Summary(path, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, True, began=False)


def sample_to_store(cfg: Config, *, ranks: RankGrid | None = None, device="cpu",
                    stop: StopRequest | None = None, attrs: dict | None = None) -> Summary:
    """Fill ``cfg``'s ensemble store (creating, resuming or growing it), printing progress on
    rank 0; ``attrs`` are extra store attributes (the planner's choice)."""
    ranks = ranks or rank_grid(SerialComm(), 1)
    stop = stop if stop is not None else StopRequest()
    # the same files on every rank, unless a node's copy differs or is missing
    model = on_every_rank(ranks.world, build_model, cfg.model, device)
    sharing = memory_sharing(ranks.world, device)  # collective: before rank 0 alone checks
    on_rank0(ranks.world, lambda: check_memory(  # at the most members a call holds
        cfg, tuple(model.shape), torch.device(device), sharing=sharing,
        time_slices=ranks.slices.size,
        batch=call_batch(cfg.ensemble.batch_size, cfg.ensemble.members)))
    started = start_up(cfg, model, ranks.world, stop, device, attrs or {})
    if started is None:
        return not_begun(cfg.output.path)
    spec, state, tol = started
    items, scale, done, mine, unit, skipped = _open_work(cfg, model, spec, state, ranks)
    if (not done.all() and cfg.sampler.method.startswith("pc-window")
            and not math.isfinite(model_data_bound(model, cfg.model))):
        print0(ranks.world, unbounded_note(model.shape))  # where members are left to sample
    if bool(done.all()) and not on_rank0(ranks.world, takes_writes, spec.path):
        # a finished store on a read-only mount (an archive, a project's shared copy): nothing
        # to sample, no claim to make, and its record is already complete
        on_rank0(ranks.world, say, f"piadm: {spec.path} is complete and read-only here: left "
                                   "as it is")
        return Summary(spec.path, 0, int(done.sum()), 0, 0, 0.0, 0.0, 0.0, 0.0, False)
    return _fill(cfg, ranks, model, tol, spec, mine, items=items, scale=scale, stop=stop,
                 device=device, skipped=skipped, unit=unit, before=(int(done.sum()), done.size))


def _open_work(cfg: Config, model, spec: StoreSpec, state: str, ranks: RankGrid):
    """Every rank, once the store exists: the input items, the (mean, std) the model's fields
    are in, the store's done flags (items, members), this group's share of the (item,
    members) batches left, the store's batch size and the members of the job's items done
    already; rank 0 says what the store holds."""
    items = load_items(cfg, check=False)
    scale = field_scale(model, spec.attrs["input_mean"], spec.attrs["input_std"])
    # rank 0 reads, every rank gets the same: another job writing meanwhile must not give two
    # ranks of a group different work lists (they would wait in different collectives)
    done, unit, mixed = on_rank0(ranks.world, lambda: (
        done_members(spec.path), member_batch(spec.path),
        mixed_revision(read_attrs(spec.path) or {}, spec.attrs)))
    size = cfg.ensemble.batch_size
    todo = [(i, b, tuple(m for m in b if not done[i, m]))
            for i, b in work_list(done, member_batches(cfg.ensemble.members, unit),
                                  cfg.parallel.items)]
    mine = share(todo, ranks.groups, ranks.group)
    left = sum(len(rest) for _, _, rest in todo)
    # a job of some items counts theirs apart: other jobs' members are not its to skip
    ours = done[list(cfg.parallel.items)] if cfg.parallel.items else done
    mine_line = (f"; this job's items: {int(ours.sum())} of {ours.size} done"
                 if cfg.parallel.items else "")
    print0(ranks.world, f"store {spec.path} {state}: {int(done.sum())} of {done.size} members "
                        f"done{mine_line}, {left} to sample"
           + (f" in its batches of {unit}{batch_note(unit, size)}" if unit != size else ""))
    if mixed and left and done.any():
        print0(ranks.world, f"note: the members left are sampled by {mixed}: both lie within "
                            "sampler.tol of the same sequential path, and the store's history "
                            "says which run wrote which")
    return items, scale, done, mine, unit, int(ours.sum())


class _ProgressHook:
    """The samplers' ``on_sweep`` for a call of ``members`` members (``functools.partial``),
    told to the progress bar: what the call in flight is doing, and how far along its steps
    it is (for the ETA before the first call ends)."""

    def __init__(self, bar: Progress, method: str, steps: int):
        self.bar, self.steps = bar, steps
        self.what = ("sequential" if REGISTRY[method].reference == method else
                     "block" if REGISTRY[method].blocked else "window")

    def __call__(self, members: int, step: int, sweep: int, residual: float) -> None:
        part = members * step / self.steps
        if self.what == "sequential":
            self.bar.note(f"step {step}/{self.steps}", part)
        else:
            self.bar.note(f"{self.what} from step {step}/{self.steps}: round {sweep}, "
                          f"residual {math.sqrt(residual):.1e}", part)


def _fill(cfg: Config, ranks: RankGrid, model, tol: Calibration, spec: StoreSpec, mine, *,
          items: Items, scale, stop, device, skipped: int, unit: int,
          before: tuple[int, int]) -> Summary:
    """Every rank: sample the group's share ``mine`` of the store's (item, members) batches
    of ``unit``, the model's fields being the data less ``scale``'s mean over its std, the
    group's lead rank writing them; then agree what the run did (``run_end.finish``)."""
    world, slices, s = ranks.world, ranks.slices, cfg.sampler
    mean, std = scale
    grid = sampler_grid(s, model)
    options = sampler_options(s, tol=tol.tol, data_bound=model_data_bound(model, cfg.model))
    tally = Tally(time.perf_counter(),
                   stop_cause="by a signal" if isinstance(stop, StopRequest) else "on request")
    bar = Progress(world, sum(len(left) for _, _, left in mine),
                   f"group {ranks.group + 1}/{ranks.groups} members", speak=slices.rank == 0,
                   every=every_for(ranks.groups))
    hook = _ProgressHook(bar, s.method, grid.steps)
    bound, bound_item = model, None
    halt = Halt(stop)
    folder = claims_dir(spec.path)
    last = {(item, batch[0]): max(left) for item, batch, left in mine if left}
    writer = beat = None
    try:  # the heartbeat lasts until every group is done: their claims stay alive till then
        writer = _started(world, slices.rank == 0, lambda: make_writer(cfg.output.background),
                          lambda made: made.close())
        job = on_rank0(world, new_job_id, folder)
        # made at once: under SLURM new_job_id has made its beat file, which the heartbeat's
        # stop removes whether or not it started
        beat = Heartbeat(folder, job) if world.rank == 0 else None
        _started(world, world.rank == 0, lambda: beat, Heartbeat.stop)
        for item, members in raised_by_group(ranks, claimed_calls(
                mine, cfg.ensemble.batch_size, slices, halt, tally, bar, items, spec.path, job),
                halt):
            if item != bound_item:  # the work is ordered by item: read each input once
                raw = items.field(item)
                bound = bind_field(model, cfg.model.condition,
                              None if raw is None else (raw - mean) / std, device)
                bound_item = item
            noise = Noise.members(s.seed, item, members, model.shape, DTYPES[s.dtype], device,
                                  s.noise)
            told = dataclasses.replace(options, on_sweep=functools.partial(hook, len(members)))
            batch = _sampled(cfg, ranks, spec, bound, noise, grid, told, device)
            if isinstance(batch, PiadmError):
                # a rank that is its group stops it alone: the other groups agree on the
                # failure in finish (one line, exit 2); no further batch is claimed
                halt.error = halt.error or batch
                break
            for lo, hi in write_runs(members, unit) if writer is not None else ():
                start = members[lo] - members[lo] % unit  # the store batch's claim
                key = batch_key(item, start)
                owned = functools.partial(holds, folder, key, job)
                halt.attempt(_submit, writer, spec, item, members[lo:hi], batch, slice(lo, hi),
                             scale, owned)
                if members[hi - 1] == last.get((item, start)):  # the batch's last: given
                    halt.attempt(writer.submit, release, folder, key, job)  # back once written
            tally.add(len(members), batch.stats)
            label = label_text(items.labels[item])
            bar.advance(len(members), f"{items.dim} {label}: {batch.stats.rounds} rounds")
        bar.close()
        if writer is not None:  # every member this rank sampled is written and marked done
            halt.attempt(writer.close, after_error=True)
        return finish(cfg, spec, ranks, writer, tally, skipped=skipped, job=job, before=before,
                       failed=halt.error)
    except BaseException as err:
        if writer is not None and isinstance(err, Exception):
            # the members sampled before the failure are written first
            with contextlib.suppress(Exception):
                writer.close()
        elif writer is not None:  # a Ctrl-C (a second one too): the batches queued are
            # dropped and the write under way awaited, so that nothing is written once this
            # has raised (a script may delete the store next); a further Ctrl-C ends the wait
            writer.abandon(wait=True)
        raise
    finally:
        if beat is not None:
            beat.stop()


def _started(world, here: bool, make, stop):
    """``make()`` (a writer, a heartbeat: work on a thread of its own), started, on the
    ranks where ``here``, None elsewhere; its failure to start (no room for a thread's stack)
    raised on every rank of ``world`` together (``on_every_rank``: one line, not one rank's
    abort), each rank first undoing with ``stop`` what it made (started or not: a Ctrl-C may
    come at any moment)."""
    made = []

    def begin():
        made.append(make())
        made[0].start()

    try:
        on_every_rank(world, begin if here else lambda: None)
    except BaseException:
        for thing in made:
            with contextlib.suppress(Exception):
                stop(thing)
        raise
    return made[0] if made else None


def _sampled(cfg: Config, ranks: RankGrid, spec: StoreSpec, model, noise: Noise, grid,
             options, device):
    """The group's ``Batch`` of ``noise``'s members, or the user error (a member gone
    NaN/Inf, memory running out) to keep where this rank is its group and others run:
    where time slices share the call, one may fail inside the sampler while the others wait
    in its collective, so it is raised (the command line's abort ends them), and where the
    group is the job, raised too (every rank of it raises it)."""
    out_of_memory = None
    try:
        return sample_batch(model, noise, method=cfg.sampler.method, grid=grid,
                            options=options, comm=ranks.slices)
    except RanksParted as err:  # raised by the group's ranks: by all of one group's
        raise err.everywhere() if ranks.groups == 1 else err
    except PiadmError as err:  # a member gone NaN/Inf
        failed = err
    except Exception as err:
        if is_out_of_memory(err):
            out_of_memory = True
        elif where := raised_at(err):  # the user's own network, past its 2-item probe
            failed = NetworkFailed(
                f"the network failed in a call of {len(noise.keys)} member(s) "
                f"({one_line(err, where)}): fix the code at that line; "
                "the members written before it are kept, and the same command resumes after "
                "them")
        else:  # piadm's own: its traceback
            raise
    if out_of_memory:  # made out of the except: the failed call's frames (its tensors, on
        # a GPU) are let go, not kept in the error's context
        plan = json.loads(spec.attrs.get("plan_settings", "{}"))
        failed = OutOfMemory(_out_of_memory(
            cfg, ranks.world.rank, device, len(noise.keys), spec.attrs.get(ASKED),
            plan.get("ensemble.batch_size")))
    if ranks.slices.size > 1 or ranks.groups == 1:
        raise failed
    return failed


def _out_of_memory(cfg: Config, rank: int, device, members: int, asked=None,
                   plan_batch=None) -> str:
    """The one line of a call of ``members`` that ran out of memory; ``asked``: the batch
    size the config asked when an ``"auto"`` run's plan was made, ``plan_batch`` the plan's
    (a resume keeps the plan's unless another is asked)."""
    s = cfg.sampler
    key, n = round_points(s)
    now = cfg.ensemble.batch_size
    lower = "lower "
    if members > 1:
        lower += f"ensemble.batch_size below {members}"
        if asked is not None and now == plan_batch != asked:  # only another asked replaces it
            lower += (f" (now {now}, the plan's; any size but the {asked} the plan was made "
                      "for replaces it)")
        elif now != members:
            lower += f" (now {now})"
        lower += ", "
    # a sequential sampler's state is its fields and its noise block, which slices do not split
    sequential = REGISTRY[s.method].reference == s.method
    rest = "the field (model.shape)" if sequential else f"sampler.{key}, or add time slices"
    points = "" if sequential else f" ({n} points of sampler.{key})"
    return (f"sample: rank {rank} ran out of memory ({device}) sampling {members} members at "
            f"once with {s.method}{points}: {lower}{rest}; the members written so far are "
            "kept, and the same command resumes after them")


def _submit(writer, spec: StoreSpec, item: int, members, batch, rows: slice, scale,
            owned) -> None:
    """Hand the ``rows`` of ``batch`` (fields (call members, *shape), normalised), the
    consecutive ``members`` of one of the store's batches, to ``writer``, back in the data's
    units ``scale`` (mean, std) and the store's dtype; ``owned``: whether this job still holds
    the claim on that store batch (``done_record.write_batch``)."""
    mean, std = scale
    with np.errstate(over="ignore", invalid="ignore"):  # said below, once
        field = (batch.fields[rows].cpu().numpy() * std + mean).astype(spec.dtype)
    bad = ~np.isfinite(field.reshape(len(field), -1)).all(1)
    if bad.any():  # finite as sampled: the units or the store's dtype overflowed
        raise UnitsOverflow(f"member {members[int(np.flatnonzero(bad)[0])]} of item {item} is "
                          f"finite as sampled but not in the data's units (mean {mean:.6g}, "
                          f"std {std:.6g}) as {np.dtype(spec.dtype).name}: nothing of it is "
                          "written; check the model's normalisation (its checkpoint's sidecar "
                          "or the input's statistics)")
    writer.submit(write_batch, spec.path, variable=spec.variable, item=item,
                  start=members[0], field=field,
                  seed=np.array(batch.seeds[rows]), rounds=batch.stats.rounds,
                  model_calls=batch.stats.model_calls, residuals=batch.stats.residuals,
                  digest=spec.digest, model=spec.attrs.get("model_sha256"), owned=owned)
