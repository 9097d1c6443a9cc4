"""The grid a learned model was trained on, recorded with its checkpoint so that ensemble
stores carry physical coordinates (``pipeline.store``) that line up with the training data."""
from __future__ import annotations

DESCRIPTIVE = ("units", "long_name", "standard_name", "axis")


def _plain(attrs) -> dict:
    """The descriptive attributes, as JSON-safe text."""
    return {k: str(v) for k, v in attrs.items() if k in DESCRIPTIVE}


def grid_of(field) -> dict:
    """``{"dims": [...], "coords": {dim: {"values": [...], "attrs": {...}}}, "attrs": {...}}``
    of an xarray DataArray (items, *field dims): the field dims in order (a store takes them
    by position where they are named otherwise), their coordinates and the variable's
    descriptive attributes (units, long_name, standard_name)."""
    coords = {d: {"values": field[d].values.tolist(), "attrs": _plain(field[d].attrs)}
              for d in field.dims[1:] if d in field.coords}
    return {"dims": [str(d) for d in field.dims[1:]], "coords": coords,
            "attrs": _plain(field.attrs)}
