"""Warning filters changed for a while, one thread at a time.

``warnings.catch_warnings`` saves the process's list of filters on entry and puts it back on
exit. Two threads inside at once put back each other's lists: a script calling the API from
two threads was left with piadm's filters for good, or saw a warning they were to hide. piadm's
blocks share one lock, so they nest in one thread or wait in another instead of interleaving.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

_LOCK = threading.RLock()


@contextlib.contextmanager
def catching(record: bool = False):
    """``warnings.catch_warnings(record=record)`` held by one thread at a time: set the filters
    inside the block; the list of warnings caught when ``record``."""
    with _LOCK, warnings.catch_warnings(record=record) as caught:
        yield caught
