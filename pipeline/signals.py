"""Preemption: SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) ask
every rank to stop at its next safe point instead of dying mid-batch.

The command line defers both signals from its first lines, before the seconds of heavy imports
(``defer_early``): a command that stops gracefully takes over what arrived meanwhile
(``StopRequest.install``); any other is interrupted by them as by Ctrl-C, saying what it
kept, and a deferred signal interrupts it at once (``interrupt_early``). This module imports
nothing heavy for that reason.
While sampling, a first Ctrl-C (SIGINT) is a stop request too, and a second stops at once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

from pipeline.console import fresh_line, say
from pipeline.errors import Interrupted

# Exit status of a run stopped by a signal with its finished members saved: rerun to resume.
# (75 is EX_TEMPFAIL in sysexits.h: "try again later".)
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


_early: list[int] = []  # stop signals received before a command took them over


def _record(signum, frame) -> None:
    _early.append(signum)


def defer_early() -> None:
    """Hold SIGTERM and SIGUSR1 until the command decides what they mean (call first); a
    Ctrl-C before the command begins (``allow_interrupts``) ends the process at once, in one
    line: nothing was done yet, and Python's KeyboardInterrupt would show a traceback of the
    imports it landed in."""
    # SIGINT's first: a script (or a test) that sees SIGTERM caught may send a Ctrl-C next
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it was
        signal.signal(signal.SIGINT, _interrupted_before)  # ignored (nohup, a script's &)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def _interrupted_before(signum, frame) -> None:
    sys.stderr.write("\npiadm: interrupted (Ctrl-C) before the command began: nothing was "
                     "done\n")
    sys.stderr.flush()
    os._exit(128 + signal.SIGINT)


def allow_interrupts() -> None:
    """From here a Ctrl-C raises KeyboardInterrupt, which the command turns into what it
    kept (where ``defer_early`` had held it: a process of the command line)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_before:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupt(signum, frame) -> None:
    # once: a second signal (srun and mpiexec may both deliver one) must not interrupt the
    # reporting of the first with a traceback; it ends the process as it always did
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    raise Interrupted(signum=signum)


@contextmanager
def interrupted_by_stop_signals():
    """For commands that do not stop gracefully: inside, a stop signal interrupts them as
    Ctrl-C does (``Interrupted`` with its ``signum``, which the command turns into what it
    kept), one that arrived while deferred at once; on leaving, the handlers before it."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    try:
        if _early:
            signum = _early[0]
            _early.clear()  # taken: a later command in this process starts afresh
            raise Interrupted(signum=signum)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def finished_before_stopping():
    """Inside, a stop signal or Ctrl-C waits for the block to end (a few writes that belong
    together, and the record of them), then interrupts as it would have; only in the main
    thread, where Python's handlers run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    kinds = (signal.SIGINT, *STOP_SIGNALS)
    previous = {sig: signal.getsignal(sig) for sig in kinds}
    for sig in kinds:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        if held[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum=held[0])


def signal_of(err: KeyboardInterrupt) -> int:
    """The signal that interrupted: a stop signal's (``Interrupted.signum``), else Ctrl-C's."""
    return getattr(err, "signum", signal.SIGINT)


def stopped_by(err: KeyboardInterrupt) -> tuple[str, int]:
    """How a command stopped at once by ``err`` says so, and its exit status (128 + the
    signal, as a shell reports a process the signal killed)."""
    signum = signal_of(err)
    what = ("interrupted (Ctrl-C)" if signum == signal.SIGINT else
            f"stopped by {signal.Signals(signum).name}")
    return what, 128 + signum


def settle_zarr_io(timeout_s: float = 10.0) -> None:
    """Let the Zarr reads and writes that a stop (or a failed write beside them) cut short
    finish (``timeout_s`` at most). Zarr runs them on its own event loop thread, which the
    interrupt does not reach: left pending, they are destroyed at exit, and Python prints
    their tracebacks after the stop's line, as if something else had failed; and a folder
    deleted under them is made again. Only where Zarr was imported (nothing heavy here)."""
    sync = sys.modules.get("zarr.core.sync")
    loop = getattr(sync, "loop", [None])[0] if sync else None
    if loop is None or loop.is_closed():
        return
    import asyncio

    async def rest() -> None:
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=timeout_s)

    try:
        sync.sync(rest(), loop=loop, timeout=timeout_s + 1)
    except Exception:  # a loop stopped or stuck: the exit goes on, as it would have
        pass


def ignore_stop_signals() -> None:
    """The work is over (done, stopped and saved, or failed with its message): a stop signal
    from now on has nothing to stop, so it is ignored. Not merely left to a handler: the
    interpreter's shutdown, which takes a few tenths of a second after a run, puts the default
    handling back (keeping only ignored signals), and a SIGTERM then would exit 143, telling
    the scheduler that a finished job failed, or hiding a stopped one's 75 or a failed one's 2.
    Ctrl-C too: a second press as the summary prints would turn its status into 130."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class Stopped(Exception):
    """A stop request came while calibrating or planning: nothing was cached; a rerun
    measures anew. ``collective``: rank 0 measures for all (``console.on_rank0``), and the
    others raise its stop as theirs (exit 75), not as a fault that aborts the job."""

    collective = True


class StopRequest:
    """A flag the signal handlers set; the sampling loop polls it between batches."""

    def __init__(self, tag: str = "", work: str = "the batch (or calibration rung)"):
        self.signal: int | None = None
        self.tag = tag  # "[rank r/N] " under MPI (pipeline.console.tag): each rank says it
        self.work = work  # what is finished before stopping, as the lines say it
        self._before: dict = {}  # the handlers install replaced

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        first, self.signal = self.signal is None, signum  # set first: a second signal
        if first:  # arriving while this one is said is not said again
            say(f"{fresh_line()}{self.tag}piadm: received {signal.Signals(signum).name}: "
                f"finishing {self.work} under way, then stopping")  # one write a line

    def _interrupt(self, signum, frame) -> None:
        # Ctrl-C: a user at a terminal, who may not want to wait for the batch twice
        if self.signal is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise Interrupted("the members marked done are kept: rerun the same command to "
                              "resume")
        self.signal = signum
        say(f"{fresh_line()}{self.tag}piadm: received SIGINT (Ctrl-C): finishing {self.work} "
            "under way, then stopping (Ctrl-C again stops at once)")

    def install(self) -> "StopRequest":
        """Handle the stop signals (main thread only), and a first Ctrl-C as one of them,
        counting one that arrived while they were deferred; returns self. ``uninstall`` (or
        leaving a ``with`` block) puts the handlers it replaced back."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopRequest.install: Python lets only the main thread handle "
                               "signals; in a worker thread give api.sample a function as "
                               "stop= (e.g. threading.Event().is_set) instead")
        for sig in STOP_SIGNALS:
            self._before.setdefault(sig, signal.signal(sig, self._handle))
        self._before.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, self._interrupt))
        if _early:
            self._handle(_early[0], None)
            _early.clear()
        return self

    def uninstall(self) -> None:
        """Put back the handlers ``install`` replaced. The flag stays as it is: a request
        that stopped a run stops the next one it is given too, so take a new one."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._before.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
