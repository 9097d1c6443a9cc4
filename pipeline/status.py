"""``piadm status``: how much of an ensemble store is done, read from its ``done`` array."""
from __future__ import annotations

from pathlib import Path

import zarr

from pipeline.store import done_members, stored_digest


class NotAStore(FileNotFoundError):
    """The path is not a piadm ensemble store."""


def report(path: str) -> tuple[str, bool]:
    """A short text of members done per item and in all; and whether every member is done."""
    if not Path(path).exists() or stored_digest(path) is None:
        raise NotAStore(f"{path} is not a piadm ensemble store: pass the output.path of a run")
    group = zarr.open_group(path, mode="r")
    done = done_members(path)
    dim = next(d for d in group["done"].metadata.dimension_names if d != "member")
    labels = group[dim][:]
    lines = [f"{path}: {int(done.sum())}/{done.size} members done"]
    if done.shape[0] > 1:
        lines += [f"  {dim} {label}: {int(row.sum())}/{row.size}" for label, row in zip(labels, done)]
    complete = bool(done.all())
    lines.append("complete" if complete else "incomplete: rerun the same config to finish")
    return "\n".join(lines), complete
