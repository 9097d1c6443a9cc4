"""How a run's ranks end it together: what they agree on as it ends (members written,
rounds, calls, a stop, a failure), the store's record of the run, written once under its
lock, and a write failure raised on every rank as one line. ``ensemble.py`` fills the store;
this module closes it."""
from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field

import torch

from pipeline.claims import claims_dir, clear_batch_claims, clear_left_by_dead, holding
from pipeline.console import on_every_rank, on_rank0
from pipeline.done_record import done_members, still_ours
from pipeline.errors import PiadmError, WriteFailed, naming
from pipeline.layout import RankGrid
from pipeline.samplers.options import REPLICABLE
from pipeline.store import StoreExists, StoreSpec, finalize
from pipeline.store_attrs import read_attrs
from pipeline.store_match import mixed_revision
from pipeline.target import delete_leftovers


@dataclass(frozen=True)
class Summary:
    """What ``sample_to_store`` did: members written by this run, those found done, parallel
    rounds in all (the slowest group's batches, one after another), the most rounds one batch
    took, model calls per member, wall seconds, seconds a writer spent writing and the seconds
    compute waited for it (the most of any group's lead), whether a signal stopped it, the
    Picard blocks that diverged and were redone step by step (``Stats.fallbacks``, summed over
    the batches), those that stopped at max_sweeps above the tolerance (``Stats.unsettled``),
    and the store's members done and in all as the run ended (other jobs' included)."""

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
    unsettled: int = 0
    began: bool = True  # False: a stop signal came during start-up, and nothing was written
    held: tuple[int, ...] = ()  # (done, all) in the store as the run ended; () where unread


class Halt:
    """What stops a group's loop: a stop signal, or a write that failed on this rank (its
    lead's). A failed write stops the group as a signal would (``stop_agreed``), so that
    every rank reaches ``finish`` and raises there, none waiting in a collective."""

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
            except Exception as err:  # raised again in finish, on this rank
                self.error = self.error or err


@dataclass
class Tally:
    """What this group has sampled so far: members, rounds of each batch, model calls."""

    start: float
    rounds: list = field(default_factory=list)
    calls: float = 0.0
    count: int = 0
    stopped: bool = False
    fallbacks: int = 0
    unsettled: int = 0
    stop_cause: str = "by a signal"  # or "on request": the API's stop function asked

    def add(self, members: int, stats) -> None:
        """Count a batch of ``members`` sampled with ``stats`` (its ``Stats``)."""
        self.count += members
        self.rounds.append(stats.rounds)
        self.calls += stats.model_calls * members
        self.fallbacks += stats.fallbacks
        self.unsettled += stats.unsettled


def _finalize_alone(spec: StoreSpec, note: str, job: str, known: tuple[int, int],
                    wrote: bool) -> tuple[int, int]:
    """``finalize`` under the store's lock: two jobs finishing together would each read the
    history, append their line and write it back, and one line would be lost. A store that
    another configuration's run replaced meanwhile is not this run's to write its line into
    (``still_ours``): a run that found nothing left to do in it never wrote a batch, the
    check every batch write makes. ``known``: (members done at the run's start plus those it
    wrote, the store's members). Returns the store's members done and in all (another job
    sharing it may have written some). ``wrote``: whether this run wrote members."""
    path = spec.path
    with holding(claims_dir(path), "finalize", job), naming(path):
        try:
            still_ours(path, spec.digest, spec.attrs.get("model_sha256"))
        except StoreExists:  # its own words: this run may have had nothing left to write
            raise StoreExists(f"output {path} was replaced, grown or deleted by another run "
                              "while this one worked on it: this run's line of its history is "
                              "not written there; rerun it once the other run is done, or on "
                              "another output.path") from None
        if wrote:  # which revision of the sampler wrote them, where the store's first differ
            mixed = mixed_revision(read_attrs(path) or {}, spec.attrs)
            note += f", by {mixed}" if mixed else ""
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
    """(members done, members) of the store at ``path``, from its ``done`` record."""
    done = done_members(path)
    return int(done.sum()), int(done.size)


# The errors of a disk that takes no more: full, over quota, failing, or mounted read-only
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


def _record(spec: StoreSpec, note: str, job: str, known: tuple[int, int],
            wrote: bool) -> tuple[int, int]:
    """Rank 0: ``_finalize_alone`` (and its count of the store's members), a disk that takes
    no more (``DISK_FULL``) said as what it is: the members are kept, the store's record of
    the run is what is missing."""
    try:
        return _finalize_alone(spec, note, job, known, wrote)
    except OSError as err:
        if err.errno not in DISK_FULL:  # a store gone, say: its own words
            raise
        where = f" ({err.filename})" if err.filename not in (None, spec.path) else ""
        raise WriteFailed(f"the members are written to {spec.path}, but recording the run "
                          f"there ({note}: its history line and the consolidated metadata "
                          f"readers open) failed: {err.strerror or err}{where}; fix the cause "
                          "(free space, the mount) and rerun the same command: it samples "
                          "nothing again, and completes the metadata", errno=err.errno) from err


def finish(cfg, spec, ranks, writer, tally: Tally, *, skipped: int, job: str,
           before: tuple[int, int], failed: Exception | None = None) -> Summary:
    """Every rank of ``ranks``: agree, in two reductions, on what the groups did (``tally``,
    this rank's write failure ``failed``), raise a failure on every rank as one line, else
    record the run in the store (rank 0) and return its ``Summary``. ``before``: the store's
    (members done, members) as the run began; ``skipped``: those this run found done."""
    world, slices = ranks.world, ranks.slices
    world.barrier(idle=True)  # groups done early sleep: others on the node may need its cores
    lead = slices.rank == 0  # a group's counts once, from its lead
    local = _packed(stopped=tally.stopped, rounds=sum(tally.rounds),
                    calls=tally.calls if lead else 0, written=tally.count if lead else 0,
                    batch_rounds=max(tally.rounds, default=0), failed=failed is not None,
                    fallbacks=tally.fallbacks if lead else 0,
                    unsettled=tally.unsettled if lead else 0,
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
    seconds = time.perf_counter() - tally.start  # the sampling's, not the record's below
    held = on_rank0(world, _record, spec, note, job, (before[0] + written, before[1]),
                    written > 0)
    return Summary(spec.path, written, skipped, int(peak["rounds"]), int(peak["batch_rounds"]),
                   total["calls"] / max(written, 1), seconds,
                   peak["write_s"], peak["wait_s"], preempted, int(total["fallbacks"]),
                   int(total["unsettled"]), held=held)


def raised_by_group(ranks: RankGrid, calls, halt: Halt):
    """``calls`` until a user error every rank of a group raises (the lead's claim that
    failed): collective where the group is the whole job (one line, no abort); else kept as
    the group's failure (``halt``), which ``finish`` agrees on with the other groups, so
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
# written, a failure, fallbacks to sequential steps, blocks left above the tolerance, and the
# seconds each group's lead spent writing and sampling waited for its writer (the summary says
# the most of any group)
_AGREED = ("stopped", "rounds", "calls", "written", "batch_rounds", "failed", "fallbacks",
           "unsettled", "write_s", "wait_s")


def _packed(**values) -> torch.Tensor:
    """``values`` (every name of ``_AGREED``) as one float64 tensor, in that order."""
    return torch.tensor([float(values[name]) for name in _AGREED], dtype=torch.float64)


def _unpacked(reduced: torch.Tensor) -> dict[str, float]:
    """A reduced ``_packed`` tensor by name."""
    return dict(zip(_AGREED, reduced.tolist()))
