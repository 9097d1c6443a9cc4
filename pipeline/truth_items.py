"""Which of the truth's fields ``piadm evaluate`` scores each ensemble item against: the one
of the item's own label (``paired_truth``: a float label snapped to the truth's, a store's
float32 label met by the truth's label that rounds to it), or those of a climatology range
(``truth_in_range``). Every refusal is an ``EvaluationError`` naming the fix."""
from __future__ import annotations

import numpy as np
import xarray as xr

from pipeline.errors import EvaluationError, InputError
from pipeline.labels import label_text, label_value, snapped


def _label_type(labels: np.ndarray) -> str:
    """What kind of labels ``labels`` holds, for a message: the numpy dtype, str, or the
    class of an object array's first (a cftime date)."""
    if labels.dtype.kind == "O" and labels.size:
        return type(labels.flat[0]).__name__
    return {"U": "str", "S": "bytes"}.get(labels.dtype.kind, str(labels.dtype))


def paired_truth(truth: xr.DataArray, items: xr.DataArray, field_ndim: int, path,
                 variable: str) -> xr.DataArray:
    """The truth's field of each of the ensemble's ``items`` (its item coordinate), in their
    order and labelled as they are; EvaluationError where one is missing, labelled twice, or
    not one field."""
    item_dim = items.dims[0]
    wanted = same_labels(items.values, truth[item_dim])
    try:
        missing = np.setdiff1d(wanted, truth[item_dim].values)
    except TypeError:  # labels that cannot be compared (cftime dates of two calendars): none
        missing = wanted  # is found, said with the two types

    if missing.size:
        shown = ", ".join(label_text(v) for v in missing[:3])
        more = f" and {missing.size - 3} more" if missing.size > 3 else ""
        theirs = truth[item_dim].values
        # none found: another type, calendar or offset of the same labels is the likely cause
        held = (f" (it holds {theirs.size} labels of type {_label_type(theirs)}, "
                f"{label_text(theirs[0])} .. {label_text(theirs[-1])}, where the ensemble's "
                f"are {_label_type(np.asarray(items.values))})"
                if missing.size == len(wanted) and theirs.size else "")
        raise EvaluationError(f"truth {path} lacks {item_dim} [{shown}]{more} of the "
                              f"ensemble{held}: give the data the ensemble was conditioned on")
    at, repeated = {}, set()
    for i, v in enumerate(truth[item_dim].values):
        if v in at:
            repeated.add(v)
        at.setdefault(v, i)
    clash = [v for v in wanted if v in repeated]
    if clash:  # which of the two is the truth?
        raise EvaluationError(f"truth {path} holds {item_dim} {label_text(clash[0])} more "
                              "than once: give each of its fields one label")
    if truth.ndim != 1 + field_ndim:  # e.g. an ensemble store's (time, member, y, x)
        fields = ", ".join(truth.dims[-field_ndim:])
        raise EvaluationError(f"truth {path}'s {variable!r} is {truth.dims}, not one field "
                              f"per {item_dim} ({item_dim}, {fields}): give the data the "
                              "ensemble was conditioned on, not an ensemble store")
    # by position (another label may repeat), labelled as the ensemble's, which xarray
    # aligns them by
    return truth.isel({item_dim: [at[v] for v in wanted]}).assign_coords(
        {item_dim: items.values})


def truth_in_range(truth: xr.DataArray, truth_range: tuple[str, str], path) -> xr.DataArray:
    """The truth's fields whose labels lie in ``truth_range`` (--truth-range, inclusive)."""
    dim = truth.dims[0]
    try:
        lo, hi = (label_value(t, truth[dim], f"--truth-range {truth_range[0]} {truth_range[1]}")
                  for t in truth_range)
    except InputError as err:  # evaluate's kind of error, with its exit status
        raise EvaluationError(str(err)) from None
    if lo > hi:
        raise EvaluationError(f"--truth-range {truth_range[0]} {truth_range[1]} is reversed: "
                              "give the earlier label first")
    values = truth[dim].values  # by value, not by position: it need not be sorted
    truth = truth.isel({dim: np.flatnonzero((values >= lo) & (values <= hi))})
    if truth.sizes[dim] == 0:
        raise EvaluationError(f"--truth-range {truth_range[0]} {truth_range[1]} selects no "
                              f"{dim} of {path}: its {dim} runs {label_text(min(values))} .. "
                              f"{label_text(max(values))}; pick labels inside it")
    return truth


def same_labels(wanted: np.ndarray, coord: xr.DataArray) -> np.ndarray:
    """``wanted`` item labels as the truth's coordinate ``coord`` spells them: a float label
    ``labels.snapped`` to one of its own, as input.range takes labels, or else, for a store's
    float32 label (0.1 as 0.100000001), the one truth label that rounds to it (where several
    do, none: the truth lacks it); others as they are."""
    have = np.asarray(coord.values)
    if not (np.issubdtype(wanted.dtype, np.floating) and np.issubdtype(have.dtype, np.floating)):
        return wanted
    narrow = have.astype(wanted.dtype)

    def spelt(v):
        near = snapped(float(v), have)
        if near in have or wanted.dtype.itemsize >= have.dtype.itemsize:
            return near
        rounding = have[narrow == v]
        return rounding[0] if rounding.size == 1 else near

    return np.array([spelt(v) for v in wanted], dtype=have.dtype)
