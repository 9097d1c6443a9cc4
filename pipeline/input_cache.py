"""An input selection's statistics kept between runs (``$PIADM_CACHE/input_statistics.json``).

A run streams once over its input selection before it samples (NaN/Inf, mean, std and the
fingerprint its store records), on rank 0: a resume, a grown store and every job of an array
after the first read the same files again, about a minute per 10 GB. The entry is keyed by
the selection (the store's real path, the variable, its dims, shape, dtype and item labels)
and by every file of the variable and the store's metadata (path, size, mtime and inode): a
chunk rewritten, a store replaced or regenerated is another key, and is read through again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from pipeline.cache import cache_path, positive, read_entry, update_cache

ROOT_METADATA = ("zarr.json", ".zmetadata", ".zgroup", ".zattrs")


def cache_file() -> Path:
    """Where input statistics are kept: $PIADM_CACHE/input_statistics.json."""
    return cache_path("input_statistics.json")


def selection_key(var, path: str | Path) -> str | None:
    """The key of the selection ``var`` (items, *field) of the Zarr store at ``path``, or None
    where its variable is no folder of the store (then nothing is kept)."""
    root = Path(os.path.realpath(path))
    folder = root / str(var.name)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256(json.dumps(
        [str(root), str(var.name), list(map(str, var.dims)), list(var.shape), str(var.dtype),
         [str(v) for v in var[var.dims[0]].values]]).encode())
    files = [root / name for name in ROOT_METADATA if (root / name).is_file()]
    for where, dirs, names in os.walk(folder):
        dirs.sort()
        files += [Path(where) / name for name in sorted(names)]
    for file in files:
        st = os.stat(file)
        digest.update(f"{file.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0"
                      f"{st.st_ino}\n".encode())
    return digest.hexdigest()


def _valid(entry: dict) -> bool:
    return (math.isfinite(entry["mean"]) and positive(entry["std"])
            and len(entry["fingerprint"]) == 6
            and all(math.isfinite(float(v)) for v in entry["fingerprint"]))


def kept_statistics(key: str | None) -> tuple[float, float, tuple[float, ...]] | None:
    """The (mean, std, fingerprint) kept under ``key``, or None."""
    entry = read_entry(cache_file(), key, _valid) if key else None
    if entry is None:
        return None
    return float(entry["mean"]), float(entry["std"]), tuple(map(float, entry["fingerprint"]))


def keep_statistics(key: str | None, stats: tuple[float, float, tuple[float, ...]]) -> None:
    """Keep ``stats`` (mean, std, fingerprint) under ``key`` (nothing where it is None)."""
    if key:
        mean, std, fingerprint = stats
        update_cache(cache_file(), key, {"mean": mean, "std": std,
                                         "fingerprint": list(fingerprint)})
