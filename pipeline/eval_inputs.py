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
from pipeline.done_record import done_members
from pipeline.errors import EvaluationError, InputError, is_system_error
from pipeline.host_memory import format_bytes, host_room
from pipeline.inputs import (check_real, longitude, same_fingerprint, same_points, select_items,
                             selection_fingerprint)
from pipeline.labels import label_text
from pipeline.store import INPUT_FINGERPRINT, field_variable, open_store
from pipeline.truth_items import paired_truth, truth_in_range
from pipeline.units import same_units
from pipeline.unreadable import in_groups, undecodable_times


def ensemble_variable(ds: xr.Dataset) -> str:
    """The name of the sampled field in the ensemble store ``ds`` (EvaluationError where it
    cannot be told)."""
    try:
        return field_variable(ds)
    except ValueError as err:
        raise EvaluationError(str(err)) from err


def _open_zarr(path: str | Path, what: str, fix: str,
               consolidated: bool | None = None, dask: bool = True) -> xr.Dataset:
    """The Zarr store at ``path``, opened lazily (``store.open_store``); else an error naming
    ``what`` it is for and the ``fix``."""
    try:
        return open_store(path, consolidated, dask)
    except Exception as err:  # zarr's errors for a non-store are many and unspecific
        if is_system_error(err):  # a store we may not read, a failing disk: told as such
            raise
        times = undecodable_times(str(err).splitlines()[0] if str(err) else "")
        if times:
            raise EvaluationError(f"{what}: {times}") from err
        raise EvaluationError(f"{what} is not a Zarr store: {fix}") from err


def open_ensemble(path: str | Path) -> xr.Dataset:
    """The complete store at ``path``, opened lazily, without dask: evaluate reads it an item
    at a time."""
    if not Path(path).exists():
        raise EvaluationError(f"store {path} does not exist: give the output.path of a "
                              "piadm sample run")
    ds = _open_zarr(path, f"store {path}", "give the output.path of a piadm sample run",
                    dask=False)
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
                                  + "".join(f": {w}" for w in [in_groups(str(path), "--truth")]
                                            if w))
        raise EvaluationError(f"truth {path} has no variable {variable!r} (it has "
                              f"{', '.join(map(str, truth_ds.data_vars))}): use --truth-variable")
    check_real(truth_ds[variable], f"truth {path}: {variable}", EvaluationError)
    name = ensemble_variable(ens)
    units = (truth_ds[variable].attrs.get("units"), ens[name].attrs.get("units"))
    if None not in units and not same_units(*units):  # m/s is m s-1, K kelvin
        # scored as they stand, K against degC gave a CRPS of 271 labelled K
        raise EvaluationError(f"truth {path}: {variable} is in {units[0]!r}, the ensemble's "
                              f"{name} in {units[1]!r}: convert the truth to the ensemble's "
                              "units (or, where they are the same units spelt otherwise, set "
                              "its units attribute to the ensemble's)")
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
        truth = paired_truth(truth, ens[item_dim], len(shape), path, variable)
    elif truth_range is not None:
        truth = truth_in_range(truth, truth_range, path)
    _check_fits(truth, path, paired)
    _check_finite(truth, path, len(shape), paired=paired)
    return truth, paired


def _check_fits(truth: xr.DataArray, path, paired: bool) -> None:
    """Refuse a truth whose fields scored cannot be held at once (scoring reads them whole),
    before reading any: a truth of 400000 times of 64 x 64 ended in a MemoryError traceback."""
    room = host_room()
    if room is None or truth.nbytes <= room[0]:
        return
    fewer = ("sample fewer items (input.items or input.range) and score them" if paired else
             "score a stretch of its times (--truth-range FIRST LAST)")
    raise EvaluationError(f"truth {path}: the {truth.sizes[truth.dims[0]]} fields scored take "
                          f"{format_bytes(truth.nbytes)} read at once, and "
                          f"{format_bytes(room[0])} is {room[1]}: {fewer}, or run it where more "
                          "memory is free")


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
            same_points(a, b, longitude(dim)) if a.dtype.kind in "fiu"
            else bool((a == b).all()))
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
    from pipeline.status import item_labels
    from pipeline.verify import damaged

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
