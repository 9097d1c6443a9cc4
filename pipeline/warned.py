"""Warning filters changed for a while, one thread at a time.

``warnings.catch_warnings`` saves the process's list of filters on entry and puts it back on
exit. Two threads inside at once put back each other's lists: a script calling the API from
two threads was left with piadm's filters for good, or saw a warning they were to hide. piadm's
blocks share one lock, so they nest in one thread or wait in another instead of interleaving.
A long block (an evaluation's scoring) holds it only to enter and to leave, so that a short
block elsewhere (opening a store) runs inside it rather than waiting minutes for it; long
blocks wait for each other. Blocks of other code (xarray's, a user's) take no such lock.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

_LOCK = threading.RLock()  # short blocks whole, and a long block's entry and exit
_LONG = threading.RLock()  # long blocks, one at a time


@contextlib.contextmanager
def catching(record: bool = False, long: bool = False):
    """``warnings.catch_warnings(record=record)`` kept from interleaving with piadm's other
    such blocks in other threads: set the filters inside the block; the list of warnings
    caught when ``record``. ``long``: a block that runs for long (see the module's note)."""
    if not long:
        with _LOCK, warnings.catch_warnings(record=record) as caught:
            yield caught
        return
    with _LONG:
        block = warnings.catch_warnings(record=record)
        with _LOCK:
            caught = block.__enter__()
        try:
            yield caught
        finally:
            with _LOCK:
                block.__exit__(None, None, None)
