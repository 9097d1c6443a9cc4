"""An input selection's statistics kept between runs (``$PIADM_CACHE/input_statistics.json``).

A run streams once over its input selection before it samples (NaN/Inf, mean, std and the
fingerprint its store records), on rank 0: a resume, a grown store and every job of an array
after the first read the same files again, about a minute per 10 GB. The entry is keyed by
the selection (the store's real path, the variable, its dims, shape, dtype and item labels)
and by every file of the variable and the store's metadata, linked folders followed (path,
size, mtime and inode): a chunk rewritten, a store replaced or regenerated is another key,
and is read through again. Only where that is worth it: a selection of at least
``CACHED_FROM_BYTES``, whose variable has at most ``FILES_PER_MIB`` files per MiB of it (a
few items of a store of a million chunk files are read sooner than its files are listed).
A cache that cannot be kept is done without, unsaid.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from pipeline.cache import cache_path, positive, read_entry, update_cache

ROOT_METADATA = ("zarr.json", ".zmetadata", ".zgroup", ".zattrs")
FORMAT = 1  # of the entries: a change of what the statistics are must not read older ones
CACHED_FROM_BYTES = 64 * 2**20  # below, a pass takes well under a second: not kept
FILES_PER_MIB = 4  # past it, stating the files may cost more than the pass they save
LISTED_ANYWAY = 1000  # files a selection of any size may have listed


def cache_file() -> Path:
    """Where input statistics are kept: $PIADM_CACHE/input_statistics.json."""
    return cache_path("input_statistics.json")


def selection_key(var, path: str | Path) -> str | None:
    """The key of the selection ``var`` (items, *field) of the Zarr store at ``path``, or None
    where none is kept (a small selection, too many files, a variable that is no folder of the
    store, a file gone while listed)."""
    if var.nbytes < CACHED_FROM_BYTES:
        return None
    root = Path(os.path.realpath(path))
    folder = root / str(var.name)
    if not folder.is_dir():
        return None
    most = max(LISTED_ANYWAY, FILES_PER_MIB * var.nbytes // 2**20)
    digest = hashlib.sha256(json.dumps(
        [FORMAT, str(root), str(var.name), list(map(str, var.dims)), list(var.shape),
         str(var.dtype), [str(v) for v in var[var.dims[0]].values]]).encode())
    try:
        files = [root / name for name in ROOT_METADATA if (root / name).is_file()]
        seen = set()
        for where, dirs, names in os.walk(folder, followlinks=True):
            real = os.path.realpath(where)
            if real in seen:  # a link back up the tree
                dirs.clear()
                continue
            seen.add(real)
            dirs.sort()
            files += [Path(where) / name for name in sorted(names)]
            if len(files) > most:
                return None
        for file in files:
            st = os.stat(file)
            digest.update(f"{file.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0"
                          f"{st.st_ino}\n".encode())
    except OSError:  # a file gone while listed (a writer's temporary one), a folder unreadable
        return None
    return digest.hexdigest()


def _valid(entry: dict) -> bool:
    return (math.isfinite(entry["mean"]) and positive(entry["std"])
            and len(entry["fingerprint"]) == 6
            and all(math.isfinite(float(v)) for v in entry["fingerprint"]))


def kept_statistics(key: str | None) -> tuple[float, float, tuple[float, ...]] | None:
    """The (mean, std, fingerprint) kept under ``key``, or None."""
    entry = read_entry(cache_file(), key, _valid, quiet=True) if key else None
    if entry is None:
        return None
    return float(entry["mean"]), float(entry["std"]), tuple(map(float, entry["fingerprint"]))


def keep_statistics(key: str | None, stats: tuple[float, float, tuple[float, ...]]) -> None:
    """Keep ``stats`` (mean, std, fingerprint) under ``key`` (nothing where it is None)."""
    if key:
        mean, std, fingerprint = stats
        update_cache(cache_file(), key, {"mean": mean, "std": std,
                                         "fingerprint": list(fingerprint)}, quiet=True)
