"""What tells one dataset's fields from another's, cheaply: a few fixed projections of each
field (``probe``), recorded in a checkpoint's sidecar for the fields train.data held, so that
data made anew at its path, or other data given in its place, is told apart. xarray and
numpy only: pipeline and models both read it."""
from __future__ import annotations

import math

import numpy as np
import xarray as xr

PROBE_RTOL = 1e-6  # a float32 copy of a float64 field probes the same to about 6e-8
PROBES = 4  # projections a field is told by (with its norm)


def probe(field: xr.DataArray) -> xr.DataArray:
    """Per time, ``PROBES`` inner products with fixed pseudo-random weights of unit norm, then
    the field's own norm: (PROBES + 1, times), float64, lazy. Two different fields agree in
    every projection by no chance worth counting (fields standardised per time share their
    norms, so norms alone would not tell them apart); a copy in another dtype keeps them all
    to ``PROBE_RTOL`` of the norm. The weights come from PCG64's raw stream, which numpy
    keeps the same across versions (its normal draws it does not promise to)."""
    dims, n = field.dims[1:], math.prod(field.shape[1:])
    raw = np.random.PCG64(0).random_raw(PROBES * n).reshape(PROBES, *field.shape[1:])
    weights = (raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0  # in [-1, 1)
    weights /= np.sqrt((weights ** 2).sum(axis=tuple(range(1, weights.ndim)), keepdims=True))
    values = field.astype("float64")
    projections = (values * xr.DataArray(weights, dims=("probe", *dims))).sum(dims)
    return xr.concat([projections.transpose("probe", ...),
                      np.sqrt((values ** 2).sum(dims)).expand_dims("probe")], "probe")


def data_probe(field: xr.DataArray) -> list[float]:
    """``probe`` of a dataset's first and last fields (``field``: (time, *S)), flat: what a
    sidecar records as ``data_probe``; data made anew at its path with as many times (and no
    history, as stores other tools write) differs in them."""
    return [float(v) for v in np.asarray(probe(field.isel(time=[0, -1])).values).ravel()]


def same_probe(theirs: list[float], ours: list[float]) -> bool:
    """Whether two ``data_probe`` records agree: sums in another numpy or on another CPU
    differ in the last bits."""
    return bool(np.allclose(theirs, ours, rtol=1e-9, atol=1e-9 * max(map(abs, ours))))
