"""Rank-0 output: the one place that decides who speaks (STYLE.md, 'rank-0 work has a name')."""
from __future__ import annotations

import sys


def print0(comm, *args, **kwargs) -> None:
    """Print to stderr on rank 0 only, flushed, so progress shows up in batch logs."""
    if comm.rank == 0:
        print(*args, file=sys.stderr, flush=True, **kwargs)
