"""Conditioning inputs: a Zarr store opened lazily (xarray + dask), its work items chosen from
the config, validated before anything is written, normalised with statistics computed once.

Memory does not grow with the store: the selection stays a dask array, the checks and the
statistics stream over its chunks, and each work item loads only its own field. xarray and
dask are imported only where a store is opened: an unconditional run's ranks never need them.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.choices import FIELD_DIMS, GEOGRAPHIC, LONGITUDES
from pipeline.errors import InputError, from_here, is_system_error
from pipeline.labels import label_text, label_value
from pipeline.unreadable import in_groups, not_a_store
from pipeline.warned import catching

if TYPE_CHECKING:
    import xarray as xr


@dataclass(frozen=True)
class Items:
    """The work items: ``labels`` along ``dim``; ``fields`` the lazy selected inputs
    (items, *shape) or None when unconditional; ``mean`` and ``std`` their statistics;
    ``fingerprint`` what tells these fields from others (``fingerprint``; empty: not read)."""

    dim: str
    labels: np.ndarray
    fields: xr.DataArray | None = None
    mean: float = 0.0
    std: float = 1.0
    fingerprint: tuple[float, ...] = ()
    _chunk: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def coords(self, coarse: bool) -> dict:
        """{dim: (values, attrs)} the ensemble store takes over: the item coordinate with its
        attributes (units, axis, ...) and, unless the input is a coarse field on another
        grid, the field coordinates."""
        if self.fields is None:
            return {}
        out = {self.dim: (self.labels, dict(self.fields[self.dim].attrs))}
        if not coarse:  # by position: a field dims named otherwise (lat, lon) are y, x there
            ours = self.fields.dims[1:]
            for d, name in zip(ours, FIELD_DIMS.get(len(ours), ours)):
                if d in self.fields.coords:
                    out[name] = (self.fields[d].values,
                                 renamed_attrs(d, name, dict(self.fields[d].attrs)))
        return out

    def item_encoding(self) -> dict:
        """How the input stores its item labels, where CF time encoding decides their numbers
        (units such as "days since 2000-01-01", calendar, dtype): the store keeps them, so its
        raw times are the input's, not counted anew from its own first item."""
        if self.fields is None:
            return {}
        held = self.fields[self.dim].encoding
        return {k: held[k] for k in ("units", "calendar", "dtype") if k in held} \
            if "units" in held else {}

    def field_attrs(self) -> dict:
        """The input variable's descriptive attributes (units, long_name, standard_name)."""
        if self.fields is None:
            return {}
        return {k: v for k, v in self.fields.attrs.items()
                if k in ("units", "long_name", "standard_name")}

    def field(self, index: int) -> np.ndarray | None:
        """Item ``index``'s input field (float64, *shape), or None. The items of a stored
        chunk are read together and kept until another chunk's item is asked for (the work
        goes item by item): reading one item of a chunk decodes all of it."""
        if self.fields is None:
            return None
        chunks = self.fields.chunks
        if chunks is None:  # held in memory
            return self.fields.isel({self.dim: index}).values.astype(np.float64)
        edges = np.cumsum((0, *chunks[0]))
        at = int(np.searchsorted(edges, index, side="right")) - 1  # the chunk holding it
        lo, hi = int(edges[at]), int(edges[at + 1])
        if self._chunk.get("span") != (lo, hi):
            self._chunk.clear()
            block = self.fields.isel({self.dim: slice(lo, hi)})
            if block.nbytes > KEPT_CHUNK_BYTES:  # too large to keep: this item alone
                return self.fields.isel({self.dim: index}).values.astype(np.float64)
            self._chunk.update(span=(lo, hi), values=block.values)
        return self._chunk["values"][index - lo].astype(np.float64)


def renamed_attrs(dim, name: str, attrs: dict) -> dict:
    """The attributes of field coordinate ``dim`` as the store's ``name`` (y for lat, say):
    the name it had kept in ``input_dim`` (and as the long name, unless it has one)."""
    if dim != name:
        attrs.setdefault("long_name", str(dim))
        attrs["input_dim"] = str(dim)
    return attrs


def unconditional() -> Items:
    """One work item, labelled 0, with no input."""
    return Items("item", np.arange(1))


KEPT_CHUNK_BYTES = 256 * 2**20  # the largest input chunk kept for its other items (``field``)

def check_real(var: xr.DataArray, what: str, error: type = None) -> None:
    """Refuse fields that are not real numbers (complex, boolean, text): taken as floats, a
    complex field would lose its imaginary part unseen. ``error``: the class raised
    (InputError unless the caller's errors are another kind, evaluate's)."""
    if var.dtype.kind not in "fiu":
        raise (error or InputError)(f"{what} holds {var.dtype} values: piadm's fields are real "
                                    "numbers; store the field as floats (e.g. its real part, "
                                    ".real)")


def direction(values) -> int:
    """+1 for coordinate ``values`` that increase throughout, -1 for ones that decrease
    throughout, 0 where neither holds (one value, not numbers, NaN, longitudes rolled to
    start elsewhere)."""
    values = np.asarray(values)
    if values.size < 2 or values.dtype.kind not in "fiu":
        return 0
    steps = np.diff(values.astype(np.float64))  # (an unsigned difference would wrap)
    return 1 if (steps > 0).all() else -1 if (steps < 0).all() else 0


def longitude(dim) -> bool:
    """Whether a field axis named ``dim`` holds longitudes (degrees east, periodic in 360)."""
    return str(dim).lower() in LONGITUDES


def _spacing(a: np.ndarray) -> float:
    """The smallest step between neighbouring values of ``a`` that are apart (NaN and repeats
    left out); where none are, the values' own size (at least 1)."""
    steps = np.abs(np.diff(a.ravel()))
    steps = steps[np.isfinite(steps) & (steps > 0)]
    if steps.size:
        return float(steps.min())
    finite = np.abs(a[np.isfinite(a)])
    return max(1.0, float(finite.max())) if finite.size else 1.0


def _pairs(a: np.ndarray, b: np.ndarray, periodic: bool) -> tuple:
    """``(a, b)``, and for longitudes the two modulo 360 too (-180 .. 180 against 0 .. 360)."""
    return ((a, b), (a % 360, b % 360)) if periodic else ((a, b),)


def _alike(v: np.ndarray, w: np.ndarray, within: float) -> bool:
    return bool(np.isclose(v, w, rtol=0.0, atol=within, equal_nan=True).all())


def same_points(a, b, periodic: bool = False) -> bool:
    """Whether numeric coordinate values ``a`` and ``b`` name the same points in the same
    order: within a thousandth of their spacing (a float32 copy of a float64 grid differs by
    1e-7 near zero, which a tolerance relative to the values refuses); ``periodic``
    (longitudes): relabelled from -180 to 0 too, equal modulo 360."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    within = 1e-3 * _spacing(a)
    return a.size == 0 or any(_alike(v, w, within) for v, w in _pairs(a, b, periodic))


def rolled(a, b, periodic: bool = False) -> bool:
    """Whether coordinate values ``a`` are ``b``'s rolled by one or more places, not the same
    points in the same order (``periodic``, longitudes: from -180 for ``b``'s from 0 too,
    modulo 360), within ``same_points``' closeness."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size < 2 or same_points(a, b, periodic):
        return False
    within = 1e-3 * _spacing(a)
    return any(_alike(np.roll(v, k), w, within) for v, w in _pairs(a, b, periodic)
               for k in range(1, len(a)))


def check_field_order(var: xr.DataArray, what: str) -> None:
    """Refuse fields stored (x, y): piadm's fields are (y, x), in its stores, its training
    and its models, and reading them by position would transpose them all unseen. The same
    for axes that share a suffix (generate-data's coarse fields: y_coarse, x_coarse), and
    for (lon, lat)."""
    names = FIELD_DIMS.get(var.ndim - 1, ())
    dims = tuple(str(d) for d in var.dims[1:])
    if tuple(GEOGRAPHIC.get(d.lower()) for d in dims) == ("x", "y"):  # (lon, lat): the same
        order = ", ".join(repr(str(d)) for d in (var.dims[0], dims[1], dims[0]))
        raise InputError(f"{what} has its fields as {dims}, longitude first; piadm's are "
                         f"(y, x), latitude first: write them in that order, e.g. "
                         f"ds.transpose({order}).to_zarr(...)")
    low = tuple(d.lower() for d in dims)  # (X, Y) as (x, y): case tells no axis apart
    suffix = next((d[1:] for d in low[:1]), "")
    if not names or not all(d[1:] == suffix for d in low):
        return
    wanted = tuple(n + suffix for n in names)
    if set(low) == set(wanted) and low != wanted:
        spelt = dict(zip(low, dims))
        wanted = tuple(spelt[w] for w in wanted)
        order = ", ".join(repr(str(d)) for d in (var.dims[0], *wanted))
        raise InputError(f"{what} has its fields as {dims}, piadm's are {wanted}: "
                         f"write them in that order, e.g. ds.transpose({order}).to_zarr(...)")


def _open(path: str) -> xr.Dataset:
    if not Path(path).exists():
        raise InputError(f"input.path {path} does not exist{from_here(path)}: point it at a "
                         f"Zarr store (piadm "
                         f"generate-data CONFIG writes one at data.path, e.g. "
                         f"jobs/configs/kolmogorov_uncond.toml makes out/kolmogorov_1600.zarr)")
    import xarray as xr

    try:
        # its arrays as they are: consolidated metadata left stale by a tool that added
        # times or variables since would hide them (an input has few arrays to list)
        return xr.open_zarr(path, chunks={}, consolidated=False)
    except Exception as err:  # zarr and xarray raise many kinds for a store they cannot read
        if is_system_error(err):
            raise  # a failing disk, a store it may not read: the I/O error names the file
        raise InputError(not_a_store(path, "input.path", err)) from None


def select_items(var: xr.DataArray, dim: str, items, span) -> xr.DataArray:
    """The items ``items`` (labels, in that order) or ``span`` ([first, last], by value) of
    ``var``, else all; each label must name one item."""
    values = var[dim].values
    ordered = np.sort(values)  # labels of any kind, strings too, in any order
    lo, hi = label_text(ordered[0]), label_text(ordered[-1])
    if items:
        labels = [label_value(t, var[dim], "input.items") for t in items]
        at = [np.flatnonzero(values == v) for v in labels]  # each label's positions
        missing = [t for t, where in zip(items, at) if not len(where)]
        if missing:
            raise InputError(f"input.items {missing} are not in {dim} (it runs {lo} .. {hi}): "
                             "pick labels from the store")
        # the same label written two ways ("21" and "21.0"), which validation's check of
        # the text lets through
        first = {}
        for t, v in zip(items, labels):  # a dict, not a scan: long lists of labels are common
            if v in first:
                raise InputError(f"input.items {list(items)} name one {dim} twice ({t!r} is "
                                 f"{first[v]!r}): list each once")
            first[v] = t
        chosen = np.concatenate(at)
    elif span:
        first_label, last_label = (label_value(t, var[dim], "input.range") for t in span)
        if first_label > last_label:  # as evaluate's --truth-range says it
            raise InputError(f"input.range {list(span)} is reversed: give the earlier label "
                             "first")
        # by value, not by position: a coordinate need not be sorted
        chosen = np.flatnonzero((values >= first_label) & (values <= last_label))
        if len(chosen) == 0:
            raise InputError(f"input.range {list(span)} selects nothing: {dim} runs {lo} .. {hi}")
    else:
        chosen = np.arange(len(values))
    taken = values[chosen]
    twice = _repeated(taken)
    if twice is not None:
        raise InputError(f"input: {var.name}'s {dim} holds {label_text(twice)} more than once: "
                         "the items taken must be labelled uniquely")
    return var.isel({dim: chosen})


def _repeated(values: np.ndarray):
    """The first value of ``values`` that repeats an earlier one, or None."""
    import pandas as pd

    repeated = pd.Index(values).duplicated()
    return values[repeated][0] if repeated.any() else None


def _fits(got: tuple[int, ...], shape: tuple[int, ...], coarse: bool) -> bool:
    if not coarse:
        return got == shape
    if len(shape) == len(got) + 1 and shape[0] == 1:  # a network's channel axis of 1
        shape = shape[1:]
    return len(got) == len(shape) and all(n % g == 0 for g, n in zip(got, shape))


def open_items(path: str, *, variable: str, dim: str, items=(), span=(),
               shape: tuple[int, ...], check: bool = True, coarse: bool = False,
               cond_shape: tuple[int, ...] | None = None) -> Items:
    """Open the conditioning input and check its layout (``cond_shape``: the coarse fields'
    shape the model was trained on, when known); with ``check`` also stream over the
    selection once for NaN/Inf and the normalisation statistics (else mean 0, std 1).
    Raises InputError naming the problem."""
    var = _laid_out(_open(path), path, variable, dim)
    surplus = _surplus_axes(var, tuple(shape), coarse)
    if surplus:  # a pressure level or an ensemble axis of one: not a field size to change
        raise InputError(f"input: {variable} has dims {var.dims}, with {', '.join(surplus)} "
                         f"of size 1 beside the field's: write the fields alone, e.g. "
                         f"ds.isel({', '.join(f'{d}=0' for d in surplus)}).to_zarr(...)")
    if not _fits(tuple(var.shape[1:]), tuple(shape), coarse):
        want = "divide model.shape evenly" if coarse else "equal model.shape"
        raise InputError(f"input: {variable} fields are {list(var.shape[1:])} but must {want} "
                         f"= {list(shape)}: pick the matching variable or set model.shape")
    if coarse and cond_shape is not None and tuple(var.shape[1:]) != tuple(cond_shape):
        raise InputError(f"input: {variable} fields are {list(var.shape[1:])} but the model was "
                         f"trained on coarse fields of {list(cond_shape)}: set input.variable "
                         "to the coarse field of that resolution")
    var = select_items(var, dim, items, span)
    if not check:
        return Items(dim, var[dim].values, var)
    return Items(dim, var[dim].values, var, *_statistics(var, path))


def _surplus_axes(var: xr.DataArray, shape: tuple[int, ...], coarse: bool) -> list[str]:
    """The first axes of size 1 of ``var``'s fields whose removal makes them fit ``shape``
    (the model's, a channel axis of 1 kept where it has one); none where they fit already or
    removing them does not help."""
    ones = [d for d in var.dims[1:] if var.sizes[d] == 1]
    if _fits(tuple(var.shape[1:]), shape, coarse):
        return []
    for surplus in range(1, len(ones) + 1):
        drop = ones[:surplus]
        if _fits(tuple(var.sizes[d] for d in var.dims[1:] if d not in drop), shape, coarse):
            return [str(d) for d in drop]
    return []


def _laid_out(ds: xr.Dataset, path: str, variable: str, dim: str) -> xr.DataArray:
    """``variable`` of ``ds``, once its dims are checked: items first, labelled, at least
    one, the fields (y, x)."""
    if variable not in ds.data_vars:
        raise InputError(f"input.variable {variable!r} is not in {path}: it has "
                         f"{', '.join(map(str, ds.data_vars)) or 'no variables'}"
                         + "".join(f"; {w}" for w in [in_groups(path, "input.path")] if w))
    var = ds[variable]
    if var.dims[:1] != (dim,):
        raise InputError(f"input: {variable} has dims {var.dims}; its first dim must be "
                         f"input.item_dim = {dim!r}: set input.item_dim, or transpose or "
                         "rename the store's dims")
    if dim not in var.coords:
        raise InputError(f"input: {variable}'s {dim} has no coordinate: write one (the labels "
                         "its items are stored and picked by)")
    if var.sizes[dim] == 0:
        raise InputError(f"input: {variable} has no {dim} items: point input.path at a store "
                         "that holds some")
    check_field_order(var, f"input: {variable} of {path}")
    check_real(var, f"input: {variable} of {path}")
    return var


def _statistics(var: xr.DataArray, path: str) -> tuple[float, float, tuple[float, ...]]:
    """The mean, std and fingerprint of the selection ``var`` (items, *field), every value of
    it finite: as kept from an earlier run on the same files (``pipeline.input_cache``), else
    measured in one pass and kept."""
    from pipeline.input_cache import keep_statistics, kept_statistics, selection_key

    key = selection_key(var, path)
    stats = kept_statistics(key)
    if stats is None:
        stats = _measured_statistics(var, path)
        keep_statistics(key, stats)
    return stats


def _measured_statistics(var: xr.DataArray, path: str) -> tuple[float, float, tuple[float, ...]]:
    """One pass over the selection ``var`` (items, *field): its mean, std and fingerprint,
    after checking every value is finite."""
    import dask

    dim, axes = var.dims[0], tuple(range(1, var.ndim))
    finite = np.isfinite(var.data).all(axis=axes)
    try:
        # an Inf or a value near float64's range overflows the moments on the way to the
        # refusal below, and dask's threads would print numpy's warnings before its one line
        with catching(long=True):
            warnings.simplefilter("ignore", RuntimeWarning)
            ok, spreads, *moments = dask.compute(
                finite, var.data.astype("float64").var(axis=axes), *_item_moments(var))
    except (OSError, RuntimeError, ValueError) as err:  # a file or codec failing on a chunk
        said = str(err).splitlines()[0] if str(err) else ""
        raise InputError(f"input.path {path}: reading {var.name} failed ({type(err).__name__}: "
                         f"{said}): a chunk is unreadable; rewrite or restore the store") from None
    if not ok.all():
        bad = var[dim].values[~np.asarray(ok)]
        masked = masked_by_fill(var)
        why = ("masked (its _FillValue or missing_value) or NaN/Inf points" if masked
               else "NaN/Inf")
        made = ("" if masked else " (a generate-data run stopped part way leaves its "
                "unwritten snapshots NaN: rerun it with data.overwrite = true)")
        raise InputError(f"input: {var.name} has {why} at {dim} = {label_text(bad[0])} "
                         f"({len(bad)} item(s)): fix the data or leave those items out{made}")
    moments = np.stack(moments, axis=1)
    huge = ~(np.isfinite(moments).all(1) & np.isfinite(spreads))
    if huge.any():  # finite values whose squares overflow float64 (from about 1.3e154)
        bad = var[dim].values[huge]
        raise InputError(f"input: {var.name} holds values too large to square in float64 at "
                         f"{dim} = {label_text(bad[0])} ({len(bad)} item(s)): fix the data, "
                         "or store it in other units (scale it down)")
    # from each item's float64 mean and variance, whatever the chunks or the dtype stored:
    # items of as many points each, so the whole's variance is the mean of theirs plus the
    # variance of their means
    mean = float(moments[:, 0].mean())
    spread = float(np.sqrt(np.mean(spreads) + moments[:, 0].var()))
    return mean, spread if spread > 0 else 1.0, fingerprint(moments)


def masked_by_fill(var: xr.DataArray) -> bool:
    """Whether ``var`` has a ``_FillValue`` or ``missing_value`` that stands for missing
    points (a mask, such as land's), read as NaN."""
    return any(_stands_for_missing(where[k]) for where in (var.encoding, var.attrs)
               for k in ("_FillValue", "missing_value") if k in where)


def _stands_for_missing(value) -> bool:
    """Whether a ``_FillValue`` or ``missing_value`` is a number that stands for missing
    points, read as NaN (a float store's own fill value is NaN; text is no number)."""
    try:
        return bool(np.isfinite(np.asarray(value, dtype=float)).any())
    except (TypeError, ValueError):
        return False


def _item_moments(var):
    """The three moments of each item of ``var`` (items, *field) that ``fingerprint`` takes,
    as lazy arrays (items,)."""
    axes = tuple(range(1, var.ndim))
    wide = var.data.astype("float64")  # the same sums whatever the chunks or the dtype stored
    ramp = np.linspace(-1.0, 1.0, math.prod(var.shape[1:])).reshape(var.shape[1:])
    return (wide.mean(axis=axes), np.sqrt((wide**2).mean(axis=axes)),
            (wide * ramp).mean(axis=axes))


def selection_fingerprint(var) -> tuple[float, ...]:
    """``fingerprint`` of the fields ``var`` (items, *field), in that order."""
    import dask

    return fingerprint(np.stack(dask.compute(*_item_moments(var)), axis=1))


def fingerprint(moments: np.ndarray) -> tuple[float, ...]:
    """Numbers that tell a selection of fields from another, from each item's moments
    (items, 3), float64: its mean, its root mean square, and its mean weighted by a ramp over
    the grid points (so a field flipped or shifted differs, mean zero or not). Each moment
    averaged over the items, then weighted by the items' positions (so items reordered or
    swapped differ): 6 numbers, the second the mean rms, the scale ``same_fingerprint``
    compares at. The same values give the same numbers to rounding (float64 sums in any
    order: about 1e-16 of the rms, far below its 1e-11) however they are chunked or stored."""
    weights = np.arange(1, len(moments) + 1)[:, None] / len(moments)
    return (*map(float, moments.mean(0)), *map(float, (weights * moments).mean(0)))


def same_fingerprint(a, b, rtol: float = 1e-11) -> bool:
    """Whether two ``fingerprint``s are of the same fields, to ``rtol`` of their mean rms."""
    scale = rtol * max(abs(a[1]), abs(b[1]), 1e-300)
    return len(a) == len(b) and all(abs(x - y) <= scale for x, y in zip(a, b))
