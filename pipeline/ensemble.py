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
import errno
import functools
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models import build_model
from pipeline.calibrate import Calibration, resolve_tol
from pipeline.claimed import claimed_calls, stop_agreed
from pipeline.claims import (Heartbeat, batch_key, claims_dir, clear_batch_claims,
                             clear_left_by_dead, holding, holds, new_job_id)
from pipeline.comm import SerialComm
from pipeline.console import on_every_rank, on_rank0, print0, say
from pipeline.decomposition import share
from pipeline.errors import (OutOfMemory, PiadmError, UnitsOverflow, WriteFailed,
                             is_out_of_memory, naming)
from pipeline.inputs import Items, label_text
from pipeline.identity import exact_model, growth, store_digests, stored_of, target_fate
from pipeline.layout import RankGrid, made_on, rank_grid
from pipeline.memory import gpu_identity, ranks_sharing
from pipeline.memory_check import check_memory, round_points
from pipeline.noise import Noise
from pipeline.progress import Progress, every_for
from pipeline.run import (DTYPES, member_batches, model_data_bound, sample_batch, sampler_grid,
                          sampler_options, unbounded_note)
from pipeline.run_items import (bind_field, bind_first_item, checked_items, field_scale,
                                first_item_model, load_items, measured_items, store_spec,
                                store_variable)
from pipeline.samplers import REFERENCE, REGISTRY
from pipeline.samplers.options import REPLICABLE, RanksParted
from pipeline.settings import Config
from pipeline.signals import StopRequest
from pipeline.store import (ASKED, StoreExists, StoreSpec, done_members, finalize, member_batch,
                            read_attrs, still_ours, stored_attribute, write_batch)
from pipeline.store_match import check_noise_of, check_output, is_stale
from pipeline.target import delete_leftovers, open_or_create, upgrade_identity
from pipeline.validation import check_variable
from pipeline.work import batch_note, call_batch, work_list, write_runs
from pipeline.writer import make_writer


@dataclass(frozen=True)
class Summary:
    """What ``sample_to_store`` did: members written by this run, those found done, parallel
    rounds in all (the slowest group's batches, one after another), the most rounds one batch
    took, model calls per member, wall seconds, seconds a writer spent writing and the seconds
    compute waited for it (the most of any group's lead), whether a signal stopped it, the
    Picard blocks that diverged and were redone step by step (``Stats.fallbacks``, summed over
    the batches), and the store's members done and in all as the run ended (other jobs'
    included)."""

    path: str
    members: int
    skipped: int
    rounds: int
    batch_rounds: int
    model_calls: float
    seconds: float
    write_s: float
    write_wait_s: float
    preempted: bool
    fallbacks: int = 0
    began: bool = True  # False: a stop signal came during start-up, and nothing was written
    held: tuple[int, ...] = ()  # (done, all) in the store as the run ended; () where unread


def _check_early(cfg: Config, model, device) -> tuple[float, float, tuple[float, ...]]:
    """Rank 0: the input (its layout, selection and one pass over its values) and the output
    target, before the start-up's costly work; returns the input's (mean, std, fingerprint)."""
    items = checked_items(cfg, model)
    if not cfg.output.variable:  # a name from the model or the input: checked once known
        trained_on = getattr(model, "variable", None)
        check_variable(store_variable(cfg, trained_on), items.dim, len(cfg.model.shape),
                       "the model's variable" if trained_on else "input.variable")
    fate = check_output(cfg, items, device)
    held = (read_attrs(cfg.output.path) or {}) if fate in ("resume", "upgrade", "grow") else {}
    if cfg.input.path and {"input_mean", "input_std"} <= held.keys():
        # the scale its members so far were drawn with: another piadm may round the same
        # statistics of the same fields otherwise, and the rest must match them bit for bit
        return float(held["input_mean"]), float(held["input_std"]), items.fingerprint
    return items.mean, items.std, items.fingerprint


def memory_sharing(world, device) -> int:
    """Every rank (collective): how many ranks share this rank's memory, the node's host
    memory or, on GPUs, one GPU's: counted by the GPU each rank holds, since a job that gives
    each task its own GPU (``--gpus-per-task=1``) shows every rank one device, which a count
    of the node's devices took for one GPU shared by all its ranks."""
    device = torch.device(device)
    if device.type != "cuda":
        return ranks_sharing(world.local_layout()[1], device)
    mine = (platform.node(), gpu_identity(device))
    return sum(other == mine for other in world.allgather_object(mine))


def _prepare(cfg: Config, stats: tuple, shape, trained_on, tol: Calibration,
             attrs: dict, grid: dict, scale: tuple[float, float],
             device) -> tuple[StoreSpec, str]:
    """Rank 0's creation: open or create the store, with the input's ``stats`` (mean, std,
    fingerprint) that ``_check_early`` measured and the ``scale`` its fields are in; a store
    it resumes or grows has its noise checked as it is now (``check_noise_of``)."""
    items = measured_items(cfg, stats)
    spec = store_spec(cfg, items, shape, trained_on, grid, scale)
    # a tolerance the planner set (it calibrates each sampler it weighs) is its, not the config's
    planned = "sampler.tol" in json.loads(attrs.get("plan_settings", "{}"))
    source = "plan" if planned and tol.source == "config" else tol.source
    spec.attrs.update(sampler_tol=tol.tol, sampler_tol_source=source, **attrs)
    fate, legacy = target_fate(cfg, spec.attrs.get("model_sha256"),
                               overwrite=cfg.output.overwrite)
    if fate == "upgrade":
        older = stored_of(cfg)
        lacked = tuple(older.lacked) if older is not None else ()
        upgrade_identity(spec.path, legacy, cfg.store_digest,
                         plan=spec.attrs.get("plan_config_sha256"), asked=spec.attrs.get(ASKED),
                         model=spec.attrs["model_sha256"] if exact_model(cfg) else None,
                         completed=older.config if lacked else None, lacked=lacked)
    state = open_or_create(spec, overwrite=cfg.output.overwrite,
                           growth=functools.partial(growth, cfg),
                           stale=functools.partial(is_stale, cfg, items))
    if state.startswith(("resumed", "grown")):  # another job may have made it meanwhile
        check_noise_of(cfg, device)
    return spec, state


def run_tolerance(cfg: Config, model, device, *, force: bool = False, store: bool = True,
                  stats: tuple | None = None,
                  say=say,
                  stopped=lambda: False) -> Calibration:
    """Rank 0: the tolerance of the run. For ``"auto"``: the one its store was made with (a
    resumed run; not with ``store`` False), else the cached or a new calibration (``force``:
    always new; ``stopped`` ends it between rungs, ``signals.Stopped``), on the first
    item's input when the model is conditioned (``stats``: the input's, when the run's
    checks measured them, so that the input is not read through again); ``say`` reports it."""
    s = cfg.sampler
    if REFERENCE[s.method] == s.method or (s.tol != "auto" and not force):
        return resolve_tol(cfg, model, device=device)  # the configured tol, or none at all
    stored = None if force or not store else stored_attribute(
        cfg.output.path, store_digests(cfg), "sampler_tol")
    bound = (first_item_model(cfg, model, device) if stats is None else
             bind_first_item(cfg, model, measured_items(cfg, stats), device))
    return resolve_tol(cfg, bound, device=device, stored=stored, force=force, say=say,
                       stopped=stopped)


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
    started = _start_up(cfg, model, ranks.world, stop, device, attrs or {})
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


def _start_up(cfg: Config, model, world, stop, device,
              attrs: dict) -> tuple[StoreSpec, str, Calibration] | None:
    """Every rank: rank 0's checks of the input and target, the run's tolerance, then the
    store it creates or opens; returns (spec, state, tol), or None when a stop signal came
    first (nothing written)."""
    from pipeline.signals import Stopped

    stats = on_rank0(world, _check_early, cfg, model, device)  # refused now, not after calibrating
    # stopped during start-up (before, during or after a calibration): exit before writing
    if stop_agreed(world, stop):
        return None
    try:
        tol = on_rank0(world, run_tolerance, cfg, model, device, stats=stats,
                       say=lambda text: print0(world, text), stopped=lambda: bool(stop))
    except Stopped:
        return None
    if stop_agreed(world, stop):
        return None
    with naming(cfg.output.path):  # a full disk met making it names no file
        spec, state = on_rank0(world, _prepare, cfg, stats, tuple(model.shape),
                               getattr(model, "variable", None), tol,
                               {**attrs, "made_on": made_on(device)},
                               getattr(model, "grid", {}), field_scale(model, *stats[:2]),
                               device)
    return spec, state, tol


def _open_work(cfg: Config, model, spec: StoreSpec, state: str, ranks: RankGrid):
    """Every rank, once the store exists: the input items, the (mean, std) the model's fields
    are in, the store's done flags (items, members), this group's share of the (item,
    members) batches left, the store's batch size and the members of the job's items done
    already; rank 0 says what the store holds."""
    items = load_items(cfg, check=False)
    scale = field_scale(model, spec.attrs["input_mean"], spec.attrs["input_std"])
    # rank 0 reads, every rank gets the same: another job writing meanwhile must not give two
    # ranks of a group different work lists (they would wait in different collectives)
    done, unit = on_rank0(ranks.world, lambda: (done_members(spec.path),
                                                member_batch(spec.path)))
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
    group's lead rank writing them; then agree what the run did (``_finish``)."""
    world, slices, s = ranks.world, ranks.slices, cfg.sampler
    mean, std = scale
    writer = _started(world, slices.rank == 0, lambda: make_writer(cfg.output.background),
                      lambda made: made.close())
    grid = sampler_grid(s, model)
    options = sampler_options(s, tol=tol.tol, data_bound=model_data_bound(model, cfg.model))
    tally = _Tally(time.perf_counter(),
                   stop_cause="by a signal" if isinstance(stop, StopRequest) else "on request")
    bar = Progress(world, sum(len(left) for _, _, left in mine),
                   f"group {ranks.group + 1}/{ranks.groups} members", speak=slices.rank == 0,
                   every=every_for(ranks.groups))
    hook = _ProgressHook(bar, s.method, grid.steps)
    bound, bound_item = model, None
    halt = _Halt(stop)
    folder = claims_dir(spec.path)
    job = on_rank0(world, new_job_id, folder)
    beat = None
    try:  # the heartbeat lasts until every group is done: their claims stay alive till then
        beat = _started(world, world.rank == 0, lambda: Heartbeat(folder, job).start(),
                        Heartbeat.stop)
        for item, members in _raised_by_group(ranks, claimed_calls(
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
                # failure in _finish (one line, exit 2); no further batch is claimed
                halt.error = halt.error or batch
                break
            for lo, hi in write_runs(members, unit) if writer is not None else ():
                start = members[lo] - members[lo] % unit  # the store batch's claim
                owned = functools.partial(holds, folder, batch_key(item, start), job)
                halt.attempt(_submit, writer, spec, item, members[lo:hi], batch, slice(lo, hi),
                             scale, owned)
            tally.add(len(members), batch.stats)
            label = label_text(items.labels[item])
            bar.advance(len(members), f"{items.dim} {label}: {batch.stats.rounds} rounds")
        bar.close()
        if writer is not None:  # every member this rank sampled is written and marked done
            halt.attempt(writer.close, after_error=True)
        return _finish(cfg, spec, ranks, writer, tally, skipped=skipped, job=job, before=before,
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


def _started(world, here: bool, start, stop):
    """``start()`` (a writer, a heartbeat: work on a thread of its own) on the ranks where
    ``here``, None elsewhere; its failure to start (no room for a thread's stack) raised on
    every rank of ``world`` together (``on_every_rank``: one line, not one rank's abort),
    each rank first undoing with ``stop`` what it started."""
    made = []
    try:
        on_every_rank(world, lambda: made.append(start()) if here else None)
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
        if not is_out_of_memory(err):
            raise
        out_of_memory = True
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
    the claim on that store batch (``store.write_batch``)."""
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


class _Halt:
    """What stops a group's loop: a stop signal, or a write that failed on this rank (its
    lead's). A failed write stops the group as a signal would (``stop_agreed``), so that
    every rank reaches ``_finish`` and raises there, none waiting in a collective."""

    def __init__(self, stop):
        self.stop, self.error = stop, None

    def __bool__(self) -> bool:
        return bool(self.stop) or self.error is not None

    def attempt(self, fn, *args, after_error: bool = False) -> None:
        """Run a write step unless one failed already (``after_error``: even then, e.g. to
        join the writer); keep the first error."""
        if self.error is None or after_error:
            try:
                fn(*args)
            except Exception as err:  # raised again in _finish, on this rank
                self.error = self.error or err


@dataclass
class _Tally:
    """What this group has sampled so far: members, rounds of each batch, model calls."""

    start: float
    rounds: list = field(default_factory=list)
    calls: float = 0.0
    count: int = 0
    stopped: bool = False
    fallbacks: int = 0
    stop_cause: str = "by a signal"  # or "on request": the API's stop function asked

    def add(self, members: int, stats) -> None:
        self.count += members
        self.rounds.append(stats.rounds)
        self.calls += stats.model_calls * members
        self.fallbacks += stats.fallbacks


def _finalize_alone(spec: StoreSpec, note: str, job: str,
                    known: tuple[int, int]) -> tuple[int, int]:
    """``finalize`` under the store's lock: two jobs finishing together would each read the
    history, append their line and write it back, and one line would be lost. A store that
    another configuration's run replaced meanwhile is not this run's to write its line into
    (``still_ours``): a run that found nothing left to do in it never wrote a batch, the
    check every batch write makes. ``known``: (members done at the run's start plus those it
    wrote, the store's members). Returns the store's members done and in all (another job
    sharing it may have written some)."""
    path = spec.path
    with holding(claims_dir(path), "finalize", job), naming(path):
        try:
            still_ours(path, spec.digest, spec.attrs.get("model_sha256"))
        except StoreExists:  # its own words: this run may have had nothing left to write
            raise StoreExists(f"output {path} was replaced, grown or deleted by another run "
                              "while this one worked on it: this run's line of its history is "
                              "not written there; rerun it once the other run is done, or on "
                              "another output.path") from None
        finalize(path, note)
        # every member done at the start or written by this run: complete, without reading
        # the store's done flags again (a file a batch: seconds on a store of 10,000 batches)
        count, size = known if known[0] == known[1] else _count_done(path)
        if count == size:  # no job needs the claims of a finished store
            clear_batch_claims(claims_dir(path))
            clear_left_by_dead(claims_dir(path))  # nor what killed jobs left
    # a replacement killed just before this run began looked alive then: its copy of the
    # old store goes now, not at the next run, which may never come
    delete_leftovers(path)
    return count, size


def _count_done(path) -> tuple[int, int]:
    done = done_members(path)
    return int(done.sum()), int(done.size)


# The errors of a disk that takes no more: full, over quota, failing, or mounted read-only
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


def _record(spec: StoreSpec, note: str, job: str, known: tuple[int, int]) -> tuple[int, int]:
    """Rank 0: ``_finalize_alone`` (and its count of the store's members), a disk that takes
    no more (``DISK_FULL``) said as what it is: the members are kept, the store's record of
    the run is what is missing."""
    try:
        return _finalize_alone(spec, note, job, known)
    except OSError as err:
        if err.errno not in DISK_FULL:  # a store gone, say: its own words
            raise
        where = f" ({err.filename})" if err.filename not in (None, spec.path) else ""
        raise WriteFailed(f"the members are written to {spec.path}, but recording the run "
                          f"there ({note}: its history line and the consolidated metadata "
                          f"readers open) failed: {err.strerror or err}{where}; fix the cause "
                          "(free space, the mount) and rerun the same command: it samples "
                          "nothing again, and completes the metadata", errno=err.errno) from err


def _finish(cfg, spec, ranks, writer, tally: "_Tally", *, skipped: int, job: str,
            before: tuple[int, int],
            failed: Exception | None = None):
    world, slices = ranks.world, ranks.slices
    world.barrier(idle=True)  # groups done early sleep: others on the node may need its cores
    lead = slices.rank == 0  # a group's counts once, from its lead
    local = _packed(stopped=tally.stopped, rounds=sum(tally.rounds),
                    calls=tally.calls if lead else 0, written=tally.count if lead else 0,
                    batch_rounds=max(tally.rounds, default=0), failed=failed is not None,
                    fallbacks=tally.fallbacks if lead else 0,
                    write_s=writer.busy if writer is not None else 0.0,
                    wait_s=writer.waited if writer is not None else 0.0)
    peak, total = _unpacked(world.allreduce_max(local)), _unpacked(world.allreduce_sum(local))
    if peak["failed"] > 0:  # the members written before it stay done: a rerun finishes
        _raise_together(world, spec, failed)
    preempted = bool(peak["stopped"] > 0)
    written = int(total["written"])
    note = (f"piadm stopped {tally.stop_cause} after {written} members" if preempted
            else f"piadm wrote {written} members")
    if skipped:  # a rerun says what it found, so a line of 0 is not read as a lost run
        note += f" ({skipped} already written)"
    if world.size > 1:  # members agree across layouts to rounding only: say which wrote them
        note += (f" on {world.size} ranks = {ranks.groups} group{'s' if ranks.groups > 1 else ''}"
                 f" x {slices.size} time slice{'s' if slices.size > 1 else ''}")
        if slices.size > 1 and cfg.sampler.method in REPLICABLE:
            note += f", window split {cfg.sampler.window_split}"
    held = on_rank0(world, _record, spec, note, job, (before[0] + written, before[1]))
    return Summary(spec.path, written, skipped, int(peak["rounds"]), int(peak["batch_rounds"]),
                   total["calls"] / max(written, 1), time.perf_counter() - tally.start,
                   peak["write_s"], peak["wait_s"], preempted, int(total["fallbacks"]),
                   held=held)


def _raised_by_group(ranks: RankGrid, calls, halt: "_Halt"):
    """``calls`` until a user error every rank of a group raises (the lead's claim that
    failed): collective where the group is the whole job (one line, no abort); else kept as
    the group's failure (``halt``), which ``_finish`` agrees on with the other groups, so
    that none waits for this one."""
    try:
        yield from calls
    except PiadmError as err:
        if ranks.groups == 1:
            raise err.everywhere() from None
        halt.error = halt.error or err


def _raise_together(world, spec, failed: Exception | None) -> None:
    """Raise, on every rank, the write failure one or more ranks met (``failed`` on this
    one, None where it wrote its batches): every rank is past the agreement that one failed,
    so the job ends on one line with the first failing rank's error, of its own kind
    (``console.on_every_rank``), not one line per rank and MPI's abort. A fault (no user
    error) is raised as it is, aborting the job."""
    if isinstance(failed, OSError) and not isinstance(failed, PiadmError):
        # a full disk or a lost mount says neither which store nor what is kept
        said = WriteFailed.of(failed, f"writing members to {spec.path}")
        said.__cause__ = failed
        failed = said
    if world.size == 1:
        raise failed
    fault = failed if failed is not None and not isinstance(failed, PiadmError) else None

    def met():
        if fault is not None:  # told as a write failure, so that every rank still agrees
            raise WriteFailed(f"writing members to {spec.path} failed: {type(fault).__name__}: "
                              f"{fault}")
        if failed is not None:
            raise failed

    try:
        on_every_rank(world, met)
    except PiadmError:  # whichever rank's error the ranks agreed on
        if fault is not None:  # a fault here is never hidden: its own traceback, ending the job
            raise fault from None
        raise


# What the ranks agree on as a run ends, reduced in one tensor by max and by sum: whether
# any stopped, rounds (a rank's batches' sum, and its largest batch's), model calls, members
# written, a failure, fallbacks to sequential steps, and the seconds each group's lead spent
# writing and sampling waited for its writer (the summary says the most of any group)
_AGREED = ("stopped", "rounds", "calls", "written", "batch_rounds", "failed", "fallbacks",
           "write_s", "wait_s")


def _packed(**values) -> torch.Tensor:
    """``values`` (every name of ``_AGREED``) as one float64 tensor, in that order."""
    return torch.tensor([float(values[name]) for name in _AGREED], dtype=torch.float64)


def _unpacked(reduced: torch.Tensor) -> dict[str, float]:
    """A reduced ``_packed`` tensor by name."""
    return dict(zip(_AGREED, reduced.tolist()))
