"""``piadm train``'s data: the training and held-out splits of train.data (and of the extra
stores train.extra adds to the training split), lazily opened, checked finite, normalised,
with the coarse fields of a conditional model and the bound S the checkpoint records.

The last times of train.data are held out for validation; an extra store must hold none of
them (told by ``probe``, a few fixed projections of each field).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import torch
import xarray as xr

from models.bound import largest_mode_power
from models.fingerprint import PROBE_RTOL, probe
from models.conditioning import spectral_upsample, upsample_blocks
from pipeline.choices import FIELD_DIMS, GEOGRAPHIC, MOST_TRAINING_STDS
from pipeline.errors import InputError, from_here, is_system_error
from pipeline.inputs import (check_field_order, check_real, direction, longitude,
                             masked_by_fill, rolled, same_points)
from pipeline.labels import label_text
from pipeline.settings import TrainConfig
from pipeline.store import open_store
from pipeline.unreadable import not_a_store
from pipeline.units import same_units


@dataclass(frozen=True)
class Dataset:
    """Lazy fields (time, H, W) and optional coarse fields, normalised by (mean, std). With
    ``residual`` the target is the field minus the smooth upsampling of its coarse field."""

    fields: xr.DataArray
    coarse: xr.DataArray | None
    mean: float
    std: float
    data_bound: float  # S of the training split (models.bound), recorded with the checkpoint
    residual: bool = False

    def batch(self, times: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised targets (B, H, W) and upsampled conditioning (B, 1, H, W) or None."""
        order = np.argsort(times)
        back = np.argsort(order)
        x = self.fields.isel(time=times[order]).values[back]
        # in float64: data stored in float16, or far from unit size, would round or overflow
        x = torch.as_tensor((x.astype(np.float64) - self.mean) / self.std, dtype=torch.float32,
                            device=device)
        if self.coarse is None:
            return x, None
        c = self.coarse.isel(time=times[order]).values[back]
        c = torch.as_tensor((c.astype(np.float64) - self.mean) / self.std, dtype=torch.float32,
                            device=device)
        if self.residual:
            smooth = spectral_upsample(c, tuple(x.shape[-2:]))
            return x - smooth, smooth[:, None]
        return x, upsample_blocks(c, tuple(x.shape[-2:]))[:, None]

    def target_std(self, device="cpu") -> float:
        """The standard deviation of the normalised targets over every time."""
        n, total, count = self.fields.sizes["time"], 0.0, 0
        for a in range(0, n, 256):
            x, _ = self.batch(np.arange(a, min(a + 256, n)), device)
            total, count = total + float((x.double() ** 2).sum()), count + x.numel()
        return (total / count) ** 0.5  # about the mean: the targets' mean is ~0 either way


def _check_condition_unit(t: TrainConfig, ds: xr.Dataset, mean: float, std: float,
                          cmean: float, cstd: float) -> None:
    """Refuse a condition (mean ``cmean``, std ``cstd`` over the training split) in another
    unit than the target's (``mean``, ``std``): it is normalised by the target's statistics,
    so the network would learn it so, and piadm sample would then refuse the very field it
    was trained on, after the whole training run."""
    far = max(abs(cmean - mean), cstd) / std
    if not t.condition or far <= MOST_TRAINING_STDS:
        return
    units = [str(ds[name].attrs.get("units", "")) for name in (t.condition, t.variable)]
    said = (f" (units {units[0]!r} against {units[1]!r})"
            if all(units) and not same_units(*units) else "")
    raise InputError(f"train.condition {t.condition!r} of {t.data} has mean {cmean:.4g} and std "
                     f"{cstd:.4g}, where {t.variable}'s training fields have mean {mean:.4g} "
                     f"and std {std:.4g}, {far:.3g} of their standard deviations away{said}: "
                     "the condition is normalised by the target's statistics, so it must be in "
                     "the target's unit; convert it (or check train.condition)")


def _check_time_order(ds: xr.Dataset, path: str) -> None:
    """Refuse train.data whose times repeat or run out of order: the held-out share is its
    last times by position, so a copy of a trained field (files joined where they overlap)
    or a time from the middle of the record (a shuffled store) would be held out, unsaid."""
    if "time" not in ds.coords or ds.sizes["time"] < 2:
        return
    import pandas as pd

    times = pd.Index(ds["time"].values)
    twice = times[times.duplicated()]
    if len(twice):
        raise InputError(f"train.data {path}: its time {label_text(twice[0])} comes more than "
                         "once (files joined where they overlap?), so the held-out times could "
                         "copy trained ones: keep one of each (ds.drop_duplicates('time'))")
    if not times.is_monotonic_increasing:
        at = next(i for i in range(1, len(times)) if times[i] < times[i - 1])
        raise InputError(f"train.data {path}: its times are not in order ({label_text(times[at])} "
                         f"after {label_text(times[at - 1])}), and the held-out share is its "
                         "last times by position: sort them (ds.sortby('time'))")


def held_out_start(n: int, validation: float) -> int:
    """The first held-out time of ``n``: the last ``validation`` share is never trained on."""
    return int(round(n * (1 - validation)))


def open_training_store(path: str, fields: dict[str, str], key: str) -> xr.Dataset:
    """The variables of the store at ``path`` (setting ``key``) that ``fields`` names, each
    mapped to the setting naming it; raises InputError when it lacks one."""
    names = list(fields)
    if not Path(path).exists():
        raise InputError(f"{key} {path} does not exist{from_here(path)}: point it at your Zarr "
                         f"store, or make one with piadm generate-data (data.path = {path})")
    if Path(path).is_file():  # a NetCDF file, most likely: zarr says only "no group found"
        raise InputError(f"{key} {path} is a file, not a Zarr store (a folder): convert it "
                         f"once, e.g. xr.open_dataset({str(path)!r}).to_zarr('data.zarr')")
    try:  # as listed: times added since trained on too
        ds = open_store(path, consolidated=False)
    except Exception as err:  # zarr and xarray raise many kinds for a store they cannot read
        if is_system_error(err):
            raise  # a failing disk, a store it may not read: the I/O error names the file
        raise InputError(not_a_store(path, key, err)) from None
    for name, setting in fields.items():
        if name not in ds.data_vars:
            raise InputError(f"{setting} = {name!r} is not in {key} {path}: it has "
                             f"{', '.join(sorted(map(str, ds.data_vars)))}")
        dims = ds[name].dims
        if len(dims) != 3 or dims[0] != "time":  # e.g. an ensemble store's 4 dims
            raise InputError(f"train: {name!r} of {path} is {dims}: piadm trains on one 2-D "
                             "field per time, (time, y, x), as generate-data writes them"
                             f"{_layout_fix(ds[name])}")
        check_field_order(ds[name], f"{key} {path}: {name}")
        check_real(ds[name], f"{key} {path}: {name}")
    return ds[names]


# the names a field's own dims go by (piadm's y and x, and the geographic ones it reads as them)
FIELD_NAMES = (*FIELD_DIMS[2], *GEOGRAPHIC)


def _layout_fix(var: xr.DataArray) -> str:
    """How to rewrite ``var`` as (time, y, x), where one xarray call does: ": write it with
    ds.transpose("time", ...)" and the like; "" where none does."""
    dims = list(var.dims)
    if len(dims) < 3:
        return ": stack its fields along a time dimension (xr.concat(fields, \"time\"))"
    odd = [d for d in dims if d not in FIELD_NAMES]
    if "time" not in dims and len(dims) == 3 and len(odd) == 1:  # the times, by another name
        return (f': write it with ds.rename({{"{odd[0]}": "time"}})'
                + ('.transpose("time", ...)' if odd[0] != dims[0] else ""))
    if "time" not in dims and len(dims) == 3:
        return ": name its time dimension \"time\" (ds.rename) and put it first"
    single = [d for d in dims if d != "time" and var.sizes[d] == 1]
    if "time" in dims and len(dims) > 3 and len(dims) - len(single) == 3:
        return f': write it with ds.squeeze({single!r})' + \
            ('.transpose("time", ...)' if [d for d in dims if d not in single][0] != "time" else "")
    if "time" in dims and len(dims) == 3:
        return ': write it with ds.transpose("time", ...)'
    return ": select one 2-D field per time (ds.isel(level=0), say) and write that"


def _trajectory(ds: xr.Dataset) -> dict | None:
    """The [data] settings piadm generate-data recorded for a store, or None."""
    try:
        return tomllib.loads(ds.attrs["config"])["data"]
    except (KeyError, TypeError, tomllib.TOMLDecodeError):
        return None


def _extra_stores(t: TrainConfig, first: xr.Dataset, names: list[str],
                  held: np.ndarray) -> list[xr.Dataset]:
    """The stores of ``train.extra`` (coordinates kept, for messages), checked against
    ``train.data``'s (``first``, whose held-out times are ``held``): the same variables and
    field shapes, and not a stretch of the same trajectory reaching its held-out times."""
    extras, mine = [], _trajectory(first)
    for path in t.extra:
        ds = open_training_store(path, training_fields(t), "train.extra")
        for name in names:
            if ds[name].shape[1:] != first[name].shape[1:]:
                fix = ("data.resolution and data.coarse_factor" if name == t.condition
                       else "resolution (data.resolution)")
                grid = "x".join(map(str, first[name].shape[1:]))
                raise InputError(f"train.extra {path} holds {name} of shape "
                                 f"{ds[name].shape[1:]}, train.data {first[name].shape[1:]}: "
                                 f"regrid it to {grid} (made by piadm generate-data: make it "
                                 f"with train.data's {fix})")
            _check_same_grid(path, ds[name], first[name])
        theirs = _trajectory(ds)
        if mine and theirs and all(theirs.get(k) == mine.get(k) for k in SAME_FLOW):
            if _overlap(ds["time"].values, held):
                raise InputError(
                    f"train.extra {path} is train.data's flow (the same data.seed = "
                    f"{mine.get('seed')} and physics) at times that reach its held-out ones "
                    f"({label_text(held[0])} .. {label_text(held[-1])}): generate it with "
                    "another data.seed, or over earlier times only")
        extras.append(ds)
    return extras


def _check_same_grid(path: str, theirs: xr.DataArray, ours: xr.DataArray) -> None:
    """Refuse an extra store's field that is not on train.data's grid in its units: its
    fields are joined to train.data's by position, so other dim names, coordinates (flipped,
    rolled, another region) or units would be trained on as if they were the same."""
    name, where = theirs.name, f"train.extra {path} holds {theirs.name}"
    if theirs.dims[1:] != ours.dims[1:]:
        raise InputError(f"{where} on dims {theirs.dims[1:]}, train.data on {ours.dims[1:]}: "
                         f"rename them to train.data's (ds.rename(...))")
    for dim in ours.dims[1:]:
        if dim not in theirs.coords or dim not in ours.coords:
            continue
        a, b = np.asarray(theirs[dim].values), np.asarray(ours[dim].values)
        if a.dtype.kind not in "fiu" or b.dtype.kind not in "fiu":
            continue
        periodic = longitude(dim)
        if same_points(a, b, periodic):
            continue
        fix = (f"flip it (ds.isel({dim}=slice(None, None, -1)))"
               if same_points(a[::-1], b, periodic)
               else f"roll it to train.data's (ds.roll({dim}=..., roll_coords=True))"
               if rolled(a, b, periodic) else "put it on train.data's grid")
        raise InputError(f"{where} on {dim} {a[0]:g} .. {a[-1]:g}, train.data on {dim} "
                         f"{b[0]:g} .. {b[-1]:g}: the fields are joined by position; {fix}")
    units = (theirs.attrs.get("units"), ours.attrs.get("units"))
    if None not in units and not same_units(*units):  # m/s is m s-1
        raise InputError(f"{where} in {units[0]!r}, train.data's {name} in {units[1]!r}: "
                         "convert it to train.data's units (or, where they are the same "
                         "units spelt otherwise, set its units attribute to train.data's)")


def _overlap(times: np.ndarray, held: np.ndarray) -> bool:
    """Whether ``times`` reach into the span of the ``held`` times (True where they cannot be
    compared: refused rather than risk training on held-out fields)."""
    if not len(times) or not len(held):
        return False
    try:
        return bool(times.min() <= held.max() and times.max() >= held.min())
    except TypeError:
        return True


# The generate-data settings that make one flow: a store that shares them is the same
# trajectory whatever its spin-up (a later stretch of it) and whatever its time step (a
# chaotic flow's step changes it slowly), so it must not reach the held-out times
SAME_FLOW = ("seed", "resolution", "viscosity", "drag", "forcing_wavenumber", "forcing")


def check_init_trained_apart(t: TrainConfig, meta: dict, held: np.ndarray) -> None:
    """Refuse a ``train.init`` checkpoint (its sidecar ``meta``) trained on times this run
    holds out (``held``, of train.data): its training split of its own train.data (the
    first 1 - validation of the times it held then) or any time of its train.extra stores,
    where such a store is train.data itself or the same flow (``SAME_FLOW``) reaching them.
    The validation loss, and any scores on the held-out times, would be of fields it has
    seen. Stores that are gone cannot be read, and are not checked."""
    try:  # absolute where recorded; an older sidecar's as its run typed them, from here
        extra = meta.get("extra") or tomllib.loads(meta.get("config", "")).get(
            "train", {}).get("extra", [])
    except tomllib.TOMLDecodeError:
        extra = []
    count = str(meta.get("data_made", "")).split(" ")[0]  # "N times; ..."
    sources = [(meta.get("data"), float(meta.get("validation", 0.0)),
                int(count) if count.isdigit() else None)]
    sources += [(path, 0.0, None) for path in extra]  # an extra store is trained on whole
    flow = _trajectory(open_store(t.data, consolidated=False))
    for path, share, n in sources:
        if not isinstance(path, str) or not Path(path).exists():
            continue
        theirs = open_store(path, consolidated=False)
        other = _trajectory(theirs)
        itself = os.path.realpath(path) == os.path.realpath(t.data)
        if not (itself or (flow and other and all(other.get(k) == flow.get(k)
                                                  for k in SAME_FLOW))):
            continue
        times = theirs["time"].values
        trained = times[:held_out_start(n or len(times), share)]
        if _overlap(trained, held):
            raise InputError(
                f"train.init {t.init} was trained on {path} ("
                f"{'train.data itself' if itself else 'the flow of train.data'}) up to "
                f"{label_text(trained[-1])}, which reaches the times this run holds out "
                f"({label_text(held[0])} .. {label_text(held[-1])}): its validation would be "
                "of fields the network has seen; start from a checkpoint trained apart from "
                f"them, or hold out what it did (its train.validation = {share:g})")


def _in_extras(t: TrainConfig, extras: list, i: int) -> tuple[str, str]:
    """(path, time label) of the ``i``-th time of the ``extras`` stores in their order."""
    ends = np.cumsum([e.sizes["time"] for e in extras])
    k = int(np.searchsorted(ends, i, side="right"))
    times = extras[k]["time"].values
    at = i - (int(ends[k - 1]) if k else 0)
    return t.extra[k], label_text(times[at]) if len(times) > at else str(at)


def _check_extra_holds_no_held_out(t: TrainConfig, extras: list, held: np.ndarray,
                                   extra: np.ndarray, extra_fields, held_fields) -> None:
    """Refuse a train.extra store holding a field of train.data's held-out split (a copy of
    train.data, in another dtype say): it would be trained on, and the validation loss would
    flatter the network. ``held``, ``extra``: ``probe``s (PROBES + 1, times); a field whose
    probes all match a held-out one's is compared with it itself before the refusal. Fields
    of zeros tell nothing and are passed over."""
    if not held.size:
        return
    order = np.argsort(held[0])
    ranked = held[0][order]
    tol = PROBE_RTOL * extra[-1]
    lo = np.searchsorted(ranked, extra[0] - tol)
    hi = np.searchsorted(ranked, extra[0] + tol, side="right")
    for i in np.flatnonzero((hi > lo) & (extra[-1] > 0)):
        near = order[lo[i]:hi[i]]
        near = near[np.all(np.abs(held[:, near] - extra[:, i:i + 1]) <= tol[i], axis=0)]
        for j in near:
            a, b = extra_fields[i].values, held_fields[j].values
            if np.allclose(a, b, rtol=PROBE_RTOL, atol=tol[i] / np.sqrt(a.size)):
                path, _ = _in_extras(t, extras, i)
                raise InputError(f"train.extra {path} holds fields of train.data's held-out "
                                 f"times (a copy of {t.data}?): they would be trained on and "
                                 "validated on; give train.extra other trajectories")


def _check_finite(t: TrainConfig, ds: xr.Dataset, name: str, split: str, ok: np.ndarray,
                  cut: int, extras: list) -> None:
    """Refuse a split whose fields of ``name`` are not all finite (``ok``: per time), naming
    the first such time: one the training steps happened not to draw would still make the
    normalisation and the data bound NaN, and the held-out ones would end the run late."""
    bad = np.flatnonzero(~ok)
    if bad.size == 0:
        return
    # the training split is train.data's first ``cut`` times, then train.extra's
    first = int(bad[0]) + (cut if split == "validation" else 0)
    if split == "training" and first >= cut:
        path, label = _in_extras(t, extras, first - cut)
        where = f"time {label} of train.extra {path}"
    elif "time" in ds.coords:
        where = f"time {label_text(ds['time'].values[first])} of {t.data}"
    else:
        where = f"time {first} of {t.data}, counted from 0"
    masked = any(masked_by_fill(store[name]) for store in (ds, *extras))
    what = "masked (a _FillValue or missing_value) or NaN/Inf points" if masked else "NaN/Inf"
    # generate-data's own store: a run of it stopped part way leaves its snapshots NaN
    made = ("; a generate-data run stopped part way leaves its unwritten snapshots NaN: rerun "
            "it with data.overwrite = true" if _trajectory(ds) and not masked else "")
    raise InputError(f"train: {name} has {what} in {bad.size} of the {split} split's "
                     f"times (the first: {where}): piadm trains on whole fields: drop "
                     "those times (ds.where(np.isfinite(ds)).dropna('time'); dropna alone keeps "
                     "an Inf) or, for a mask such as land's in every time, fill the points "
                     f"(ds[{name!r}].fillna(...), e.g. with a climatology){made}")


def training_fields(t: TrainConfig) -> dict[str, str]:
    """The variables a training store must hold, each mapped to the setting naming it."""
    return {name: key for name, key in ((t.variable, "train.variable"),
                                        (t.condition, "train.condition")) if name}


def open_dataset(t: TrainConfig) -> tuple[Dataset, Dataset]:
    """(training, validation): train.data split by time, the training split followed by every
    time of the train.extra stores; raises InputError for a bad dataset."""
    fields = training_fields(t)
    names = list(fields)
    ds = open_training_store(t.data, fields, "train.data")
    _check_time_order(ds, t.data)
    n = ds.sizes["time"]
    cut = held_out_start(n, t.validation)
    if cut < 1 or cut >= n:
        side = "training" if cut < 1 else "validation"
        raise InputError(f"train.validation = {t.validation} leaves no {side} time of the {n} "
                         f"of train.data: choose it so that both keep one (e.g. {1 / n:.3g} "
                         f"to {1 - 1 / n:.3g}), or give more times")
    if t.condition:
        fine, coarse = ds[t.variable].shape[1:], ds[t.condition].shape[1:]
        if any(c > f or f % c for f, c in zip(fine, coarse)):  # upsampled by whole blocks
            raise InputError(f"train.condition {t.condition!r} of {t.data} is "
                             f"{'x'.join(map(str, coarse))}, which does not divide "
                             f"{t.variable}'s {'x'.join(map(str, fine))} fields: condition on "
                             "a block average of them (generate-data's vorticity_coarse)")
        for f, c in zip(ds[t.variable].dims[1:], ds[t.condition].dims[1:]):
            if f in ds.coords and c in ds.coords and (
                    direction(ds[f].values) * direction(ds[c].values) < 0):
                # each coarse field would be paired upside down with its fine one
                raise InputError(f"train.condition {t.condition!r} of {t.data} has {c} "
                                 f"running the other way from {t.variable}'s {f}: write it "
                                 f"the same way (ds.isel({c}=slice(None, None, -1)))")
    extras = _extra_stores(t, ds, names, ds["time"].values[cut:])
    trn, val = ds.isel(time=slice(0, cut)), ds.isel(time=slice(cut, n))
    if extras:  # by position: the trajectories' times need not differ
        trn = xr.concat([d.drop_vars(list(d.coords)) for d in (trn, *extras)], "time")
    fields = trn[t.variable]
    splits = [(split, name, part[name]) for split, part in (("training", trn), ("validation", val))
              for name in names]
    held_out, extra = val[t.variable], fields[cut:]
    probes = (probe(held_out), probe(extra)) if extras else ()  # in the same pass
    wide = fields.astype(np.float64)  # a float16 or float32 sum overflows on large data
    coarse = trn[t.condition].astype(np.float64) if t.condition else wide
    mean, std, cmean, cstd, *probed = dask.compute(
        wide.mean(), wide.std(), coarse.mean(), coarse.std(), *probes,
        *(np.isfinite(a).all(a.dims[1:]) for *_, a in splits))
    probed, finite = probed[:len(probes)], probed[len(probes):]
    for (split, name, _), ok in zip(splits, finite):
        _check_finite(t, ds, name, split, np.asarray(ok), cut, extras)
    if extras:
        _check_extra_holds_no_held_out(t, extras, *map(np.asarray, probed), extra, held_out)
    mean, std = float(mean), float(std)
    if not std > 0:
        raise InputError(f"train.data {t.data}: {t.variable} is the same value everywhere in the "
                         "training split (its standard deviation is 0): there is nothing to learn")
    _check_condition_unit(t, ds, mean, std, float(cmean), float(cstd))
    m = fields.sizes["time"]
    bound = largest_mode_power((fields[a : min(a + 256, m)].values for a in range(0, m, 256)),
                               mean, std)
    if trn.nbytes + val.nbytes < t.cache_mb * 2**20:
        # a random batch touches a whole chunk per time: under the budget, read everything once
        trn, val = trn.load(), val.load()
    part = lambda d: Dataset(d[t.variable], d[t.condition] if t.condition else None,  # noqa: E731
                             mean, std, bound, t.residual)
    return part(trn), part(val)
