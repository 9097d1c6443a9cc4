"""What ``piadm evaluate`` scores, opened and checked against each other: the ensemble store
(its field, without a channel axis of one), the truth (on the ensemble's grid, its items
paired with the store's where it has the store's item dimension), and for a downscaler the
coarse input the members were conditioned on, upsampled as the baseline.

Every refusal is an ``EvaluationError`` naming what is wrong and how to fix it.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.choices import FIELD_DIMS, GEOGRAPHIC
from pipeline.errors import EvaluationError, InputError, is_system_error
from pipeline.inputs import (check_real, in_groups, same_fingerprint, select_items,
                             selection_fingerprint, undecodable_times)
from pipeline.labels import label_text, label_value, snapped
from pipeline.store import INPUT_FINGERPRINT, done_members, field_variable, open_store


def ensemble_variable(ds: xr.Dataset) -> str:
    """The name of the sampled field in the ensemble store ``ds`` (EvaluationError where it
    cannot be told)."""
    try:
        return field_variable(ds)
    except ValueError as err:
        raise EvaluationError(str(err)) from err


def _open_zarr(path: str | Path, what: str, fix: str,
               consolidated: bool | None = None) -> xr.Dataset:
    """The Zarr store at ``path``, opened lazily (``store.open_store``); else an error naming
    ``what`` it is for and the ``fix``."""
    try:
        return open_store(path, consolidated)
    except Exception as err:  # zarr's errors for a non-store are many and unspecific
        if is_system_error(err):  # a store we may not read, a failing disk: told as such
            raise
        times = undecodable_times(str(err).splitlines()[0] if str(err) else "")
        if times:
            raise EvaluationError(f"{what}: {times}") from err
        raise EvaluationError(f"{what} is not a Zarr store: {fix}") from err


def open_ensemble(path: str | Path) -> xr.Dataset:
    """The complete store at ``path``, opened lazily."""
    if not Path(path).exists():
        raise EvaluationError(f"store {path} does not exist: give the output.path of a "
                              "piadm sample run")
    ds = _open_zarr(path, f"store {path}", "give the output.path of a piadm sample run")
    if "done" not in ds or "piadm_store_digest" not in ds.attrs:
        raise EvaluationError(f"{path} is not a piadm ensemble store: give the output.path of "
                              "a piadm sample run")
    done = done_members(path)  # a damaged record is said, with its repair
    if not done.all():
        from pipeline.target import filling_jobs, replacing_jobs

        filling, replacing = filling_jobs(path), replacing_jobs(path)
        how = (f"live job(s) {', '.join(filling)} are filling it: wait for them" if filling else
               f"live job(s) {', '.join(replacing)} are replacing or growing it: wait for them"
               if replacing else "rerun its piadm sample command to finish it")
        raise EvaluationError(
            f"store {path} is incomplete ({int(done.sum())} of {done.size} members done): "
            f"{how} (piadm status shows what is left)")
    return ds


def open_truth(path: str | Path, variable: str, ens: xr.Dataset,
               truth_range: tuple[str, str] | None = None) -> tuple[xr.DataArray, bool]:
    """The truth for ``ens`` and whether it is paired item by item (see the module doc)."""
    if not Path(path).exists():
        raise EvaluationError(f"truth {path} does not exist: give the Zarr store of the data "
                              "(e.g. made by piadm generate-data)")
    truth_ds = _open_zarr(path, f"--truth {path}", "give the store written by piadm "
                          "generate-data (or any Zarr store with the truth variable)",
                          consolidated=False)
    if variable not in truth_ds:
        if not truth_ds.data_vars:
            raise EvaluationError(f"truth {path} has no variables"
                                  + in_groups(str(path), "--truth").replace("; its", ": its"))
        raise EvaluationError(f"truth {path} has no variable {variable!r} (it has "
                              f"{', '.join(map(str, truth_ds.data_vars))}): use --truth-variable")
    check_real(truth_ds[variable], f"truth {path}: {variable}", EvaluationError)
    name = ensemble_variable(ens)
    truth = _on_the_ensembles_grid(truth_ds[variable], ens[name], path)
    item_dim = ens[name].dims[0]
    shape = ens[name].shape[2:]
    if tuple(truth.shape[-len(shape):]) != tuple(shape):
        raise EvaluationError(f"the truth's {variable!r} fields are "
                              f"{tuple(truth.shape[-len(shape):])}, "
                              f"the ensemble's {tuple(shape)}: give the truth at the model's "
                              "resolution")
    paired = item_dim in truth.dims and item_dim != "item"
    if paired and truth_range is not None:
        raise EvaluationError(f"--truth-range selects a climatology, but {path} pairs each "
                              f"{item_dim} of the ensemble with its own truth: leave it out")
    if paired:
        truth = _paired(truth, ens[item_dim], len(shape), path, variable)
    elif truth_range is not None:
        truth = _in_range(truth, truth_range, path)
    _check_finite(truth, path, len(shape), paired=paired)
    return truth, paired


def _label_type(labels: np.ndarray) -> str:
    """What kind of labels ``labels`` holds, for a message: the numpy dtype, str, or the
    class of an object array's first (a cftime date)."""
    if labels.dtype.kind == "O" and labels.size:
        return type(labels.flat[0]).__name__
    return {"U": "str", "S": "bytes"}.get(labels.dtype.kind, str(labels.dtype))


def _paired(truth: xr.DataArray, items: xr.DataArray, field_ndim: int, path,
            variable: str) -> xr.DataArray:
    """The truth's field of each of the ensemble's ``items`` (its item coordinate), in their
    order and labelled as they are; EvaluationError where one is missing, labelled twice, or
    not one field."""
    item_dim = items.dims[0]
    wanted = _same_labels(items.values, truth[item_dim])
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


def _in_range(truth: xr.DataArray, truth_range: tuple[str, str], path) -> xr.DataArray:
    """The truth's fields whose labels lie in ``truth_range`` (--truth-range, inclusive)."""
    dim = truth.dims[0]
    try:
        lo, hi = (label_value(t, truth[dim]) for t in truth_range)
    except InputError as err:  # said of input.items: these are --truth-range's
        raise EvaluationError(f"--truth-range {truth_range[0]} {truth_range[1]}: "
                              f"{str(err).removeprefix('input: ')}") from None
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


def _on_the_ensembles_grid(truth: xr.DataArray, field: xr.DataArray, path) -> xr.DataArray:
    """``truth`` with its field dims in the order of the ensemble's ``field`` (item, member,
    *field dims), where it names them alike: fields are compared point by point, so a truth
    stored (time, x, y) must not meet an ensemble's (y, x) by position. Raises
    EvaluationError where a coordinate both carry differs (another grid of as many points);
    a store's grid indices (no physical grid known) are compared by position alone, unless
    the truth carries the same indices the other way round. A truth
    that names a dim as the input did (lat where the store has y: the coordinate's
    ``input_dim``) is renamed to the store's name first."""
    dims = field.dims[2:]
    renamed = {field[dim].attrs["input_dim"]: dim for dim in dims
               if dim in field.coords and field[dim].attrs.get("input_dim") in truth.dims
               and dim not in truth.dims}
    # lat and lon name y and x where the store recorded no name of its own for them, and Y and
    # X do (met by position, a truth stored (X, Y) was scored transposed)
    renamed.update({name: _axis(name) for name in truth.dims
                    if _axis(name) in dims and name not in renamed and name not in dims
                    and _axis(name) not in (*truth.dims, *renamed.values())})
    truth = truth.rename(renamed) if renamed else truth
    theirs = {ours: name for name, ours in renamed.items()}  # for a message: the truth's names
    # a field axis the ensemble lacks (a 2-D truth for 1-D members, a level axis) was pooled
    # with the truth's samples: its fields scored as so many rows, without a word
    axes, ours = {*FIELD_DIMS[3], *GEOGRAPHIC}, {str(d).lower() for d in dims}
    extra = [str(name) for name in truth.dims  # (time, Y, X) still meets (y, x) by position
             if str(name).lower() in axes - ours]
    if extra:
        raise EvaluationError(
            f"truth {path}'s fields have the axis {', '.join(extra)}, which the ensemble's "
            f"{tuple(map(str, dims))} lack: its fields would be scored as so many rows; give "
            f"a truth of fields like the ensemble's, or select one {extra[0]} of it (e.g. "
            f"ds.isel({extra[0]}=0))")
    if not set(dims) <= set(truth.dims):
        return _by_position(truth, dims, path)
    truth = truth.transpose(..., *dims)
    for dim in dims:
        ours = field[dim] if dim in field.coords else None
        if ours is None or dim not in truth.coords:
            continue
        a, b = np.asarray(ours.values), np.asarray(truth[dim].values)
        if str(ours.attrs.get("long_name", "")).startswith("grid index"):
            # the truth's own values (a physical grid) meet the indices by position; the
            # same indices stored the other way round (a truth made from such a store,
            # flipped) are lined up
            if a.shape == b.shape and b.dtype.kind in "iu" and (a[::-1] == b).all() \
                    and not (a == b).all():
                truth = truth.isel({dim: slice(None, None, -1)})
            continue
        alike = lambda a, b: a.shape == b.shape and (  # noqa: E731
            _same_points(a, b) if a.dtype.kind in "fiu" else bool((a == b).all()))
        if not alike(a, b) and alike(a, b[::-1]):  # the same grid, stored the other way round
            truth, b = truth.isel({dim: slice(None, None, -1)}), b[::-1]
        same = alike(a, b)
        if not same:
            show = (lambda v: f"{v:.6g}") if a.dtype.kind in "fiu" else str  # noqa: E731
            # first .. last as stored (min .. max told a grid stored north to south upside down)
            raise EvaluationError(
                f"truth {path}'s {theirs.get(dim, dim)} runs {show(b[0])} .. {show(b[-1])} "
                f"({b.size} points), the ensemble's {show(a[0])} .. {show(a[-1])} ({a.size}): "
                "give the truth on the model's grid")
    return truth




def _axis(name) -> str:
    """The store's name of a truth's field axis ``name``: y and x for the geographic names
    (``GEOGRAPHIC``), any name in lower case (Y, X)."""
    low = str(name).lower()
    return GEOGRAPHIC.get(low, low)


def _by_position(truth: xr.DataArray, dims: tuple, path) -> xr.DataArray:
    """``truth``, whose field dims do not all carry the ensemble's names ``dims``, to be met
    by position; refused where it names some of them: an axis named as one of the
    ensemble's may sit where another is."""
    theirs = truth.dims[truth.ndim - len(dims):]
    shared = sorted(set(map(str, dims)) & set(map(str, truth.dims)))
    if shared:
        raise EvaluationError(
            f"truth {path}'s fields are {tuple(map(str, theirs))}, the ensemble's "
            f"{tuple(map(str, dims))}: they share {', '.join(shared)} but not the rest, so "
            "neither the names nor the positions line them up: rename the truth's field dims "
            "to the ensemble's")
    return truth


def _same_points(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two numeric grid coordinates name the same points: within a thousandth of the
    spacing (a float32 copy of a float64 grid differs by 1e-7 near zero, which an absolute
    tolerance of np.allclose's refuses)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    spacing = np.abs(np.diff(a)).min() if a.size > 1 else max(1.0, abs(float(a[0])))
    return bool(np.abs(a - b).max() <= 1e-3 * spacing)


def _check_finite(truth: xr.DataArray, path, field_ndim: int, *, paired: bool) -> None:
    """Read ``truth`` (fields of ``field_ndim`` dims) and raise EvaluationError when a field
    holds NaN or inf (its scores would be NaN and the figures fail), or when every field is
    one value throughout (no spectrum to score against). Some such fields among others (a
    calm or dry day) are scored: the spectra are compared as means over the items."""
    values = truth.load().values  # score reads it whole anyway: loaded once, here
    lead = values.shape[: values.ndim - field_ndim]
    finite = np.isfinite(values.reshape(*lead, -1))
    bad = ~finite.all(axis=-1)
    dim = truth.dims[0]

    def where(which: np.ndarray) -> str:
        labels = truth[dim].to_index()[which] if which.ndim == 1 else np.nonzero(which)[0]
        return f"{dim} {', '.join(label_text(v) for v in np.asarray(labels)[:3])}"

    choose = ("sample items whose truth is whole (input.range)" if paired else
              "choose its whole fields with --truth-range")
    if not bad.any():
        flat = values.reshape(*lead, -1)
        level = flat.min(axis=-1) == flat.max(axis=-1)  # every ratio to its spectrum: 0 / 0
        if level.all() and values.min() == values.max():
            value = "zero" if not values.any() else f"{values.flat[0]:.6g}"
            raise EvaluationError(f"truth {path} is {value} everywhere: it has no spectrum or "
                                  "spread to score against; give the fields the ensemble "
                                  "should match (--truth-variable names another variable)")
        if level.all():
            raise EvaluationError(
                f"truth {path} has {int(level.sum())} of the {level.size} fields scored that "
                f"are one value throughout (e.g. {where(level)}): they have no spectrum to "
                f"score against; give the fields the ensemble should match, or {choose}")
        return
    head = (f"truth {path} has {int(bad.sum())} of the {bad.size} fields scored not finite "
            f"(e.g. {where(bad)})")
    if (~finite[bad]).all():  # unwritten snapshots read back as the store's fill value, NaN
        raise EvaluationError(f"{head}, every point NaN or inf: a generate-data "
                              "run stopped part way leaves its unwritten snapshots NaN; rerun "
                              f"it with data.overwrite = true (it starts again), or {choose}")
    raise EvaluationError(f"{head}, NaN or inf at some of their points (masked "
                          f"or missing values): piadm scores whole fields; fill them, or {choose}")


def check_sound(store, err: Exception | None) -> None:
    """After ``err`` (or NaN figures) while reading ``store``: raise EvaluationError when
    members marked done are damaged (the likely cause), naming the fix."""
    from pipeline.status import damaged, item_labels

    found = damaged(str(store))
    if found:
        item, member, what = found[0]
        dim, labels = item_labels(str(store))
        raise EvaluationError(f"store {store} has {len(found)} damaged member(s) (e.g. {dim} "
                              f"{labels[item]} (item {item}), member {member}: {what}): run piadm "
                              "status --verify --repair on it, then rerun its sample "
                              "command") from err


def without_channel(ens: xr.Dataset) -> xr.Dataset:
    """The ensemble with a network's channel axis of 1 (``model.shape = [1, H, W]``) dropped,
    so that its fields are scored as the 2-D fields they are."""
    dims = ens[ensemble_variable(ens)].dims  # (item, member, *field)
    if len(dims) == 5 and ens.sizes[dims[2]] == 1:
        return ens.isel({dims[2]: 0})
    return ens


def _same_labels(wanted: np.ndarray, coord: xr.DataArray) -> np.ndarray:
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


def coarse_input(ens: xr.Dataset) -> xr.DataArray | None:
    """The coarse fields (items, h, w) the ensemble was conditioned on, when its model was
    conditioned on a coarse field, else None."""
    cfg = tomllib.loads(ens.attrs.get("config", ""))
    if cfg.get("model", {}).get("condition") != "coarse":
        return None
    name = ensemble_variable(ens)
    inp = cfg["input"]
    # the run's path, relative to the folder it ran in: checked against the fields it took
    where = (f"the store was conditioned on input.path {inp['path']!r} (as its sample run "
             "named it)")
    if not Path(inp["path"]).exists():
        made_in = ens.attrs.get("made_in")
        fix = ("restore it" if Path(inp["path"]).is_absolute() else
               "run piadm evaluate from the folder the sample ran in"
               + (f", {made_in}" if made_in else ""))
        raise EvaluationError(f"{where}, which is not found from here: {fix} (the "
                              "upsampled-input baseline and the added band need that input)")
    item_dim = ens[name].dims[0]
    whole = open_store(inp["path"], consolidated=False)[inp["variable"]]
    try:  # the run's selection, which the fingerprint is of: the store may hold a part of it
        chosen = select_items(whole, item_dim, tuple(inp.get("items", ())),
                              tuple(inp.get("range", ())))
    except InputError:  # its labels are gone from the input: as other fields, below
        chosen = whole
    then = ens.attrs.get(INPUT_FINGERPRINT)
    # an older store's fingerprint (of another length) is not compared, as a resume does not
    now = selection_fingerprint(chosen) if then is not None else None
    if then is not None and len(then) == len(now) and not same_fingerprint(then, now):
        raise EvaluationError(f"{where}, and the store found there from here holds other "
                              f"{inp['variable']} fields than those it took (its attribute "
                              f"{INPUT_FINGERPRINT}): run piadm evaluate from the folder the "
                              "sample ran in, or restore that input")
    return chosen.sel({item_dim: ens[item_dim].values})


# The largest rms difference, over the block averages' rms, between a paired truth's block
# averages and the coarse input before evaluate says the truth may be another trajectory's
# (the input's own truth differs by float32 rounding; another trajectory by about 140%)
INPUT_MISMATCH = 0.05


def input_mismatch(truth: xr.DataArray, coarse: xr.DataArray) -> float:
    """RMS of the difference between ``truth``'s (items, H, W) block averages on ``coarse``'s
    (items, h, w) grid and ``coarse``, over the RMS of those block averages: about 0 when
    the coarse input was made from this truth."""
    blocks = {d: f // c for d, f, c in zip(truth.dims[1:], truth.shape[1:], coarse.shape[1:])}
    means = truth.coarsen(blocks).mean().values.astype(np.float64)
    scale = np.sqrt(np.mean(means ** 2))
    return float(np.sqrt(np.mean((means - coarse.values) ** 2)) / scale) if scale else 0.0


def upsampled(coarse: xr.DataArray, ens: xr.Dataset) -> xr.DataArray:
    """``coarse`` repeated over blocks to the ensemble's grid: the downscaling baseline."""
    field = ens[ensemble_variable(ens)]
    values = coarse.values
    for axis, (f, c) in enumerate(zip(field.shape[2:], coarse.shape[1:]), start=1):
        values = np.repeat(values, f // c, axis=axis)
    return xr.DataArray(values, dims=field.dims[:1] + field.dims[2:])


def is_square(shape) -> bool:
    """Whether ``shape`` is an n x n field: the radial spectra need one."""
    return len(shape) == 2 and shape[0] == shape[1]


def check_shell(flag: str, k: int | None, ens: xr.Dataset) -> None:
    """Refuse a wavenumber ``k`` (``flag``: --kmax or --cut) the store's spectra do not
    reach: they have shells k = 1 .. n / 2, and none unless the fields are square."""
    if k is None:
        return
    shape = ens[ensemble_variable(ens)].shape[2:]
    if not is_square(shape):
        raise EvaluationError(f"{flag} {k}: the store's fields {tuple(shape)} are not square, "
                              f"so no spectrum is scored: drop {flag}")
    if k > shape[-1] // 2:
        raise EvaluationError(f"{flag} {k} is past the largest shell of the store's "
                              f"{shape[0]}x{shape[1]} fields: give at most {shape[-1] // 2} "
                              "(n / 2)")
