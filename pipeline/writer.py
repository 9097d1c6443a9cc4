"""Writes that overlap compute: a bounded background writer, or the same interface inline.

The writer runs submitted jobs in order on one thread. ``submit`` blocks while ``depth`` jobs
wait, so memory stays bounded; an error in a job is raised in the caller at the next
``submit`` or at ``close``. ``busy`` is the seconds spent writing, ``waited`` the seconds the
caller spent blocked on the writer: the write cost that compute did not hide.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time

from pipeline.errors import thread_failed


class InlineWriter:
    """Runs each job at once, in the caller (``output.background = false``)."""

    def __init__(self):
        self.busy = self.waited = 0.0

    def start(self) -> "InlineWriter":
        """Nothing to start: returns itself, as ``BackgroundWriter.start``."""
        return self

    def submit(self, fn, *args, **kwargs) -> None:
        """Run ``fn(*args, **kwargs)`` now; its time counts as busy and as waited."""
        start = time.perf_counter()
        fn(*args, **kwargs)
        self.busy += time.perf_counter() - start
        self.waited = self.busy

    def close(self) -> None:
        """Nothing waits: every job ran when it was submitted."""
        return None

    def abandon(self, wait: bool = False) -> None:
        """Nothing is pending to drop."""
        return None


class BackgroundWriter:
    """Runs jobs on a worker thread, at most ``depth`` waiting."""

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.busy = self.waited = 0.0
        self._thread = threading.Thread(target=self._run, name="piadm-writer", daemon=True)

    def start(self) -> "BackgroundWriter":
        """Start the worker thread; returns itself. A Ctrl-C while it starts leaves no thread
        behind to wait for jobs forever (a notebook's process outlives the run)."""
        try:
            self._thread.start()
        except RuntimeError as err:  # "can't start new thread": no room for its stack
            raise thread_failed("the background writer's thread", err, "raise it or set "
                                "output.background = false") from None
        except BaseException:
            self._jobs.put(None)
            raise
        return self

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:  # after a failure, drain without writing
                start = time.perf_counter()
                try:
                    job[0](*job[1], **job[2])
                except BaseException as err:  # re-raised in the caller
                    self._error = err
                self.busy += time.perf_counter() - start

    def _raise(self) -> None:
        if self._error is not None:  # as it was raised, so a full disk is a one-line error
            raise self._error

    def submit(self, fn, *args, **kwargs) -> None:
        """Queue ``fn(*args, **kwargs)``, blocking while ``depth`` jobs wait; first raise an
        earlier job's error."""
        if self._thread.ident is None:  # its jobs would wait forever, and then block it
            raise RuntimeError("BackgroundWriter.submit before start()")
        self._raise()
        start = time.perf_counter()
        self._jobs.put((fn, args, kwargs))
        self.waited += time.perf_counter() - start

    def close(self) -> None:
        """Wait for every submitted job; raise the first error."""
        start = time.perf_counter()
        self._jobs.put(None)
        _join(self._thread)
        self.waited += time.perf_counter() - start
        self._raise()

    def abandon(self, wait: bool = False) -> None:
        """Drop the jobs still waiting and let the thread end after the one under way; with
        ``wait``, wait for that one (a Ctrl-C: nothing is written once the run has raised).
        What the dropped jobs would have written and marked done is sampled again by a
        rerun."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._jobs.get_nowait()
        self._jobs.put(None)
        if wait:
            _join(self._thread)


def _join(thread: threading.Thread) -> None:
    """Wait for ``thread`` where it runs (not one that never started)."""
    if thread.is_alive():
        thread.join()


def make_writer(background: bool):
    """The writer for ``output.background``, not yet started (``start``)."""
    return BackgroundWriter() if background else InlineWriter()
