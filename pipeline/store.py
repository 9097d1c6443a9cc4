"""The ensemble store: a chunked Zarr (format 3) group that xarray opens.

Layout: variable ``field`` with dims (member, *field dims), one chunk per member batch and the
whole field per chunk, so each writer owns whole chunks; per-member ``rounds`` and
``model_calls``; provenance in the attributes. The interface is small and explicit: create,
write a member range, finalize.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

FIELD_DIMS = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}


class StoreExists(FileExistsError):
    """The output path already holds data and overwriting was not asked for."""


def check_target(path: str | Path, overwrite: bool) -> None:
    """Refuse to touch an existing path unless ``overwrite``; raises StoreExists."""
    if Path(path).exists() and not overwrite:
        raise StoreExists(
            f"output {path} already exists: set output.overwrite = true to replace it, "
            "or choose another output.path"
        )


def create_store(path: str | Path, *, shape: tuple[int, ...], members: int, member_chunk: int,
                 dtype: str, attrs: dict, overwrite: bool) -> None:
    """Create the (empty) store for ``members`` fields of ``shape``; metadata only."""
    check_target(path, overwrite)
    if Path(path).exists():
        shutil.rmtree(path)
    dims = ("member", *FIELD_DIMS[len(shape)])
    chunks = (member_chunk, *shape)
    field = da.zeros((members, *shape), dtype=dtype, chunks=chunks)
    per_member = da.zeros(members, dtype="float64", chunks=member_chunk)
    coords = {"member": np.arange(members)}
    coords.update({d: np.arange(n) for d, n in zip(dims[1:], shape)})
    ds = xr.Dataset(
        {"field": (dims, field), "rounds": ("member", per_member),
         "model_calls": ("member", per_member)},
        coords=coords, attrs=attrs,
    )
    ds["member"].attrs.update(standard_name="realization", units="1")
    ds.to_zarr(path, mode="w", compute=False, consolidated=False, zarr_format=3)


def write_members(path: str | Path, start: int, field: np.ndarray, rounds: float,
                  model_calls: float) -> None:
    """Write members [start, start + len(field)) : whole chunks, so concurrent writers are safe."""
    group = zarr.open_group(path, mode="r+")
    stop = start + field.shape[0]
    group["field"][start:stop] = field
    group["rounds"][start:stop] = rounds
    group["model_calls"][start:stop] = model_calls


def finalize(path: str | Path) -> None:
    """Consolidate the metadata once, after every write."""
    with warnings.catch_warnings():
        # Zarr 3 calls consolidated metadata an extension; xarray reads it and it saves listing.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(path)
