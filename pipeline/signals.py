"""Preemption: SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) ask
every rank to stop at its next safe point instead of dying mid-batch."""
from __future__ import annotations

import signal
import sys

# Exit status of a run stopped by a signal with its finished members saved: rerun to resume.
# (75 is EX_TEMPFAIL in sysexits.h: "try again later".)
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A flag the signal handlers set; the sampling loop polls it between batches."""

    def __init__(self):
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            print(f"piadm: received {signal.Signals(signum).name}: finishing the current batch, "
                  "then stopping", file=sys.stderr, flush=True)
        self.signal = signum

    def install(self) -> "StopRequest":
        """Handle the stop signals (main thread only); returns self."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self
