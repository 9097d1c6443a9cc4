"""The SHA-256 of a model's files, read once per process.

A start asks for a model's identity several times (the store's check and its provenance, the
calibration key, the planner's profiles) and a checkpoint may be large, so each answer is
kept for as long as the files are unchanged. No torch: the model need not be built to ask.
"""
from __future__ import annotations

import functools
import hashlib
import os


def files_digest(paths, tail: bytes = b"") -> str:
    """SHA-256 (hex) over the bytes of ``paths`` in order, then ``tail``; read once per
    process while each file keeps its inode, size, mtime and ctime (a file changed or saved
    anew since is read again)."""
    return _digest(tuple((str(p), *_stamp(p)) for p in paths), tail)


def _stamp(path) -> tuple[int, ...]:
    """What changes whenever the file does (a save by rename is a new inode)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@functools.lru_cache(maxsize=16)
def _digest(files: tuple[tuple, ...], tail: bytes) -> str:
    h = hashlib.sha256()
    for path, *_ in files:
        _feed(h, path)
    h.update(tail)
    return h.hexdigest()


def _feed(h, path: str) -> None:
    """Hash the file at ``path`` into ``h`` a MiB at a time: a large network's bytes are
    never all in memory at once."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
