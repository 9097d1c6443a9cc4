"""A score model watched as it is called: each call's wall seconds handed to a callback (the
bench's clock of a rank's model time, a calibration's word that it is still going), the
model's attributes (shape, data_bound, ...) its own."""
from __future__ import annotations

import time

from pipeline.progress import clock


class Watched:
    """``model``, calling ``after(seconds)`` once each of its calls returns (``sync()`` first,
    where given: a GPU's queued kernels are the call's time)."""

    def __init__(self, model, after, sync=None):
        self._model, self._after, self._sync = model, after, sync

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._model(*args, **kwargs)
        if self._sync is not None:
            self._sync()
        self._after(time.perf_counter() - start)
        return out


# Seconds of a long run (a calibration's sequential path, a rung) between lines that say it
# is still going: on a network one takes minutes, which a batch log showed as silence
HEARTBEAT_S = 30.0


class _Heartbeat:
    """Counts a run's batched model calls (``Watched`` tells it of each) and says every
    ``HEARTBEAT_S`` s how far the run has come."""

    def __init__(self, say, what: str):
        self._say, self._what = say, what
        self._calls, self._start = 0, time.perf_counter()
        self._last = self._start

    def __call__(self, seconds: float) -> None:
        self._calls += 1
        now = time.perf_counter()
        if now - self._last >= HEARTBEAT_S:
            plural = "s" if self._calls != 1 else ""
            self._say(f"  ... {self._what}: {self._calls} batched model call{plural} so far, "
                      f"{clock(now - self._start)}")
            self._last = now


def heard(model, say, what: str) -> Watched:
    """``model``, saying every ``HEARTBEAT_S`` s how far the run calling it has come."""
    return Watched(model, _Heartbeat(say, what))
