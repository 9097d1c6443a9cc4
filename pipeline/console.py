"""Rank-0 work, named and kept in one place: who speaks, and what is done once
for everyone with the outcome shared."""
from __future__ import annotations

import os
import sys

from pipeline.errors import FailedElsewhere, raised_together


def tag(comm) -> str:
    """``[rank r/N] `` under MPI, so a log line says which rank speaks; empty on one rank."""
    return f"[rank {comm.rank}/{comm.size}] " if comm.size > 1 else ""


def say(text: str) -> None:
    """``text`` and its new line to stderr in one write (``print`` writes them apart: ranks
    sharing a terminal or log would put their lines between another's text and its new
    line), flushed; nothing where stderr was closed at start (``2>&-``)."""
    if sys.stderr is None:
        return
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def on_terminal() -> bool:
    """Whether stderr, where piadm reports, is a terminal (not a batch log)."""
    return sys.stderr is not None and sys.stderr.isatty()


def fresh_line() -> str:
    """A new line to start a message with on a terminal, where a progress bar (or the ^C
    echo) may hold the line; "" in a log file."""
    return "\n" if on_terminal() else ""


def print0(comm, *args) -> None:
    """Print to stderr on rank 0 only, tagged and flushed, so progress shows in batch logs
    (a command's result goes to stdout, ``out0``).
    The line and its newline go out in one write: a stop signal between the two (``print``
    writes them apart) would run the next line, the command's last word, onto this one."""
    if comm.rank == 0:
        say(tag(comm) + " ".join(map(str, args)))


def out0(comm, text: str, end: str = "\n") -> None:
    """A command's result (a table, the settings it chose, a document) to stdout on rank 0,
    in one write, flushed: what ``piadm plan ... > plan.txt`` keeps, where progress, notes and
    warnings go to stderr (``print0``). Untagged: a result is the job's, not a rank's."""
    if comm.rank == 0:
        out(text, end)


def out(text: str, end: str = "\n") -> None:
    """``out0`` from work only rank 0 does (``on_rank0``'s)."""
    if sys.stdout is not None:
        sys.stdout.write(f"{text}{end}")
        sys.stdout.flush()


def on_rank0(comm, fn, *args, idle: bool = False, **kwargs):
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its exception.

    For checks and creation that must happen once (the output store) while any failure must
    stop all ranks together, before anything else is written. ``idle``: the other ranks sleep
    while they wait instead of polling, leaving rank 0 the cores (for measuring)."""
    result, error = None, None
    if comm.rank == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # shared below, re-raised on every rank
            error = err
    if idle:
        comm.barrier(idle=True)
    result, error = comm.bcast_object((result, error), 0)
    if error is None:
        return result
    shared = raised_together(error)  # a user error: every rank raises it, the CLI exits 2
    if comm.rank != 0 and not getattr(shared, "collective", False):  # a fault: rank 0's
        raise FailedElsewhere(f"rank 0 failed: {type(error).__name__}: {error}") from None
    raise shared


def on_every_rank(comm, fn, *args, **kwargs):
    """Run ``fn`` on every rank and agree on its failure: a user error (``PiadmError``) on any
    rank is raised on every rank, with the first failing rank's message (naming the ranks
    where not all failed), so that none waits in a later collective for a rank that stopped.
    For work whose inputs should be the same on every rank but may not be: a config before it
    is compared across ranks (a PIADM_SET that differs between nodes), files read on each node.
    ``fn`` must run no collective on ``comm``."""
    from pipeline.errors import PiadmError

    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except PiadmError as err:
        error = err
    told = comm.allgather_object(None if error is None else _told(error))
    failed = [rank for rank, said in enumerate(told) if said is not None]
    if not failed:
        return result
    first = told[failed[0]]
    message = first["message"]
    if len(failed) < comm.size:
        message = f"{message} (on rank(s) {', '.join(map(str, failed))} of {comm.size})"
    shared = first["error"].everywhere(message)  # what its kind carries (rungs, errno) too
    if error is None or told[comm.rank]["message"] != first["message"]:  # another rank's
        raise shared from error
    # one traceback, through where this rank's error was raised, not the same line twice
    raise shared.with_traceback(error.__traceback__) from error.__cause__


def _told(error: Exception) -> dict:
    """A user error as the other ranks are told it: the error (what its kind carries: a
    reason, rungs, an errno) and its message."""
    return {"error": error, "message": str(error)}


class _PipeSafe:
    """A text stream whose reader may go away (``piadm sample | head``): from then on what is
    written goes nowhere, and the command finishes its work (a broken pipe raised in a
    progress line would stop it between writing members and recording them)."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())  # the buffered text drains there too
        finally:
            os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()
            self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_pipes() -> None:
    """Let the command outlive a reader of its stdout or stderr that closes early (the
    ``piadm`` command only: a script keeps its own streams)."""
    # None where the descriptor was closed at start (>&-): Python then drops what is written
    if sys.stdout is not None:
        sys.stdout = _PipeSafe(sys.stdout)
    if sys.stderr is not None:
        sys.stderr = _PipeSafe(sys.stderr)
