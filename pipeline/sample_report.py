"""What ``piadm sample`` says around a run (rank 0 prints it): the opening line (method,
model, members, layout, device), the note on a block sampler left without a tolerance, and
the closing summary, with what the parallel sampler bought over the sequential one for the
same members.
"""
from __future__ import annotations

import shlex

from typing import TYPE_CHECKING

from pipeline.progress import clock, stamp

if TYPE_CHECKING:  # names for the annotations alone: the module stays light to import
    from pipeline.layout import RankGrid
    from pipeline.run_end import Summary
    from pipeline.settings import Config


def opening(cfg: Config, ranks_launched: int, ranks: RankGrid, device) -> str:
    """The run's first line: what samples what, where to, on which layout and device."""
    guided = (f" (autoguided by {cfg.model.guide}, weight {cfg.model.guidance:g})"
              if cfg.model.guide else "")
    return (f"piadm sample: {cfg.sampler.method} on {cfg.model.kind} {list(cfg.model.shape)}"
            f"{guided}, "
            f"{cfg.ensemble.members} members per item -> {cfg.output.path}; {ranks_launched} "
            f"rank{'s' if ranks_launched > 1 else ''} = "
            f"{ranks.groups} group{'s' if ranks.groups > 1 else ''} x "
            f"{cfg.parallel.time_slices} time slice{'s' if ranks.slices.size > 1 else ''}, "
            f"{device}; started {stamp()}")


def fixed_sweeps_note(cfg: Config) -> str | None:
    """The note for a Picard block sampler with no tolerance, None for any other: every
    block then sweeps as many times as it has points (at most ``sampler.max_sweeps``)
    whatever its residual, so it buys no speed for many times the calls."""
    from pipeline.samplers import REGISTRY

    entry = REGISTRY.get(cfg.sampler.method)
    if entry is None or not entry.blocked or cfg.sampler.tol is not None:
        return None
    return (f"note: sampler.tol is unset, so each block of {cfg.sampler.method} "
            "sweeps as many times as it has steps (at most sampler.max_sweeps = "
            f"{cfg.sampler.max_sweeps}): as many rounds as the sequential sampler, "
            "at many times its calls; set sampler.tol (a number, or \"auto\" to "
            "calibrate one)")


def closing(cfg: Config, summary: Summary, *, start_up: float) -> str:
    """The run's summary: members written, rounds, calls (against the sequential sampler's),
    wall time after ``start_up`` seconds, and how to open the store."""
    share = summary.write_wait_s / summary.seconds if summary.seconds else 0.0
    store = shlex.quote(str(summary.path))  # to paste: a path may hold spaces
    where = "" if summary.preempted else (
        f"\n  open with        xarray.open_zarr({summary.path!r})\n"
        f"  then             piadm status {store} (--verify reads every member back); "
        f"piadm evaluate {store} --truth TRUTH_STORE scores it")
    held = (f"; the store holds {summary.held[0]} of {summary.held[1]}" if summary.held
            else "")  # other jobs sharing it may have written the rest
    calls = f"{summary.model_calls:.1f}".removesuffix(".0")  # a mean: 98.5 is not 98
    figures = (f"  parallel rounds  {summary.rounds} in all, at most {summary.batch_rounds} a "
               "batch (the slowest group's batches, one after another)\n"
               f"  model calls      {calls} per member\n"
               f"{against_sequential(cfg, summary)}"
               f"  wall time        {summary.seconds:.2f} s{_long(summary.seconds)} sampling, "
               f"{_rate(summary.members, summary.seconds)} (after {start_up:.1f} s "
               "of start-up: model, store, calibration or plan); writing "
               f"{summary.write_s:.2f} s; sampling "
               # not "of which": the wait also holds the writer thread's turn for a core
               f"waited {summary.write_wait_s:.2f} s ({100 * share:.1f}%) for the writer"
               if summary.members else "  no batch was finished before the stop"
               if summary.preempted else "  no member was left to sample")
    return (f"{'stopped' if summary.preempted else 'done'}: {summary.members} members "
            f"written to {summary.path} ({summary.skipped} were already done{held})\n"
            f"{figures}\n  ended            {stamp()}{where}")


def _long(seconds: float) -> str:
    """`` (3:02:11)`` for a run of a minute or more, read as the log's other durations."""
    return f" ({clock(seconds)})" if seconds >= 60 else ""


def _rate(members: int, seconds: float) -> str:
    """The sampling's pace: members a second, or seconds a member where it is under one."""
    if seconds <= 0 or members / seconds >= 1:
        return f"{members / max(seconds, 1e-9):.1f} members/s"
    return f"{seconds / members:.1f} s a member"


def against_sequential(cfg: Config, summary: Summary) -> str:
    """What the parallel sampler bought over the sequential one for the same members: the
    sequential path takes one round and one model call per step ("" for a sequential
    sampler, or when no member was sampled)."""
    from pipeline.samplers import REFERENCE

    s = cfg.sampler
    if REFERENCE[s.method] == s.method or not summary.members:
        return ""
    steps = s.steps + int(s.denoise_final)
    return (f"  vs sequential    {REFERENCE[s.method]} would take {steps} rounds and {steps} "
            f"model calls per batch and member; {s.method} took at most {summary.batch_rounds} "
            f"rounds ({_times(summary.batch_rounds, steps)}) for "
            f"{summary.model_calls / steps:.1f}x the calls\n")


def _times(ours: float, theirs: float) -> str:
    """``ours`` against ``theirs`` as "2.0x fewer", "1.1x more" or "as many"."""
    if ours == theirs:
        return "as many"
    if ours < theirs:
        return f"{theirs / max(ours, 1):.1f}x fewer"
    return f"{ours / theirs:.1f}x more"
