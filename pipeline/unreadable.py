"""What to tell of a Zarr store that xarray cannot read as a piadm command asks: its data
in a group of the store, or its times in units no calendar takes. For the conditioning
input and the truth alike."""
from __future__ import annotations

from pathlib import Path


def in_groups(path: str, key: str) -> str:
    """Where the Zarr store at ``path`` holds its data in groups (xarray's ``to_zarr(...,
    group=...)``), the words that name them and the path to give ``key``; else ""."""
    import zarr

    try:
        groups = sorted(name for name, _ in zarr.open_group(path, mode="r").groups())
    except Exception:  # not a group, or unreadable: the caller's own words stand
        return ""
    return (f"its data lies in the group(s) {', '.join(groups[:5])}: set {key} to "
            f"{str(Path(path) / groups[0])!r}, say" if groups else "")


def undecodable_times(said: str) -> str:
    """What to tell of a store whose times xarray could not decode (its error's first line,
    ``said``): units no calendar takes ("months since ...", which xarray decodes on none), or
    cftime to install; "" for another error."""
    if "decode time units" in said:  # cftime, installed or not, decodes no such unit either
        return (f"its time coordinate cannot be decoded ({said.split('. Try')[0]}): write its "
                "times in seconds, hours or days since a date, or as plain numbers")
    return ("its time coordinate is on a calendar numpy cannot hold: pip install cftime"
            if "cftime" in said else "")


def not_a_store(path: str, key: str, err: Exception) -> str:
    """What to tell of the store ``path`` (the setting ``key``) that xarray failed to open
    with ``err`` (zarr raises many kinds for a folder that is no store): its times, or that it
    is no readable store, with zarr's own first line."""
    said = str(err).splitlines()[0] if str(err) else ""
    times = undecodable_times(said)
    if times:
        return f"{key} {path}: {times}"
    return (f"{key} {path} is not a readable Zarr store ({type(err).__name__}: {said}): point "
            f"{key} at a store of xarray's to_zarr or piadm generate-data")
