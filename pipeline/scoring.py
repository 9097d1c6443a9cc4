"""Score an ensemble store against the truth, item by item so memory stays one item's worth.

Two cases, told apart by the truth's dimensions:
- paired: the truth has the store's item dimension (e.g. ``time`` for downscaling); each item's
  members are scored against that item's true field: CRPS, ensemble-mean RMSE, spread/skill,
  rank histogram, and for a model conditioned on a coarse input the upsampled-input baseline.
- climatological: it does not (an unconditional store); the members are compared with the
  truth's selection as distributions: spectra, mean and standard deviation.
Both compare radially averaged spectra (kinetic energy for vorticity, power otherwise), per
band of scales (``pipeline.bands``) with bootstrap intervals.
"""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.bands import band_figures, correlation_block, spectral_bands
from pipeline.errors import EvaluationError
from pipeline.evaluation import crps, energy_spectra, power_spectra, rank_histogram
from pipeline.inputs import (InputError, _label, label_text, same_fingerprint,
                             selection_fingerprint, snapped)
from pipeline.store import INPUT_FINGERPRINT, field_variable, open_store


def _field_variable(ds: xr.Dataset) -> str:
    try:
        return field_variable(ds)
    except ValueError as err:
        raise EvaluationError(str(err)) from err


def _open_zarr(path: str | Path, what: str, fix: str) -> xr.Dataset:
    """The Zarr store at ``path``, opened lazily; else an error naming ``what`` it is for and
    the ``fix``."""
    try:
        return open_store(path)
    except PermissionError:  # a store we may not read: the I/O error names the file
        raise
    except Exception as err:  # zarr's errors for a non-store are many and unspecific
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
    done = ds["done"].values == 1
    if not done.all():
        from pipeline.target import filling_jobs

        filling = filling_jobs(path)
        how = (f"live job(s) {', '.join(filling)} are filling it: wait for them" if filling else
               "rerun its piadm sample command to finish it")
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
                          "generate-data (or any Zarr store with the truth variable)")
    if variable not in truth_ds:
        raise EvaluationError(f"truth {path} has no variable {variable!r} (it has "
                              f"{', '.join(map(str, truth_ds.data_vars))}): use --truth-variable")
    name = _field_variable(ens)
    truth = _on_the_ensembles_grid(truth_ds[variable], ens[name], path)
    item_dim = ens[name].dims[0]
    shape = ens[name].shape[2:]
    if tuple(truth.shape[-len(shape):]) != tuple(shape):
        raise EvaluationError(f"the truth's {variable!r} fields are {tuple(truth.shape[-len(shape):])}, "
                              f"the ensemble's {tuple(shape)}: give the truth at the model's "
                              "resolution")
    paired = item_dim in truth.dims and item_dim != "item"
    if paired and truth_range is not None:
        raise EvaluationError(f"--truth-range selects a climatology, but {path} pairs each "
                              f"{item_dim} of the ensemble with its own truth: leave it out")
    if paired:
        wanted = _same_labels(ens[item_dim].values, truth[item_dim])
        missing = np.setdiff1d(wanted, truth[item_dim].values)
        if missing.size:
            shown = ", ".join(label_text(v) for v in missing[:3])
            raise EvaluationError(f"truth {path} lacks {item_dim} [{shown}] of the ensemble: "
                                  "give the data the ensemble was conditioned on")
        at, repeated = {}, set()
        for i, v in enumerate(truth[item_dim].values):
            if v in at:
                repeated.add(v)
            at.setdefault(v, i)
        clash = [v for v in wanted if v in repeated]
        if clash:  # which of the two is the truth?
            raise EvaluationError(f"truth {path} holds {item_dim} {label_text(clash[0])} more "
                                  "than once: give each of its fields one label")
        if truth.ndim != 1 + len(shape):  # e.g. an ensemble store's (time, member, y, x)
            fields = ", ".join(truth.dims[-len(shape):])
            raise EvaluationError(f"truth {path}'s {variable!r} is {truth.dims}, not one field "
                                  f"per {item_dim} ({item_dim}, {fields}): give the data the "
                                  "ensemble was conditioned on, not an ensemble store")
        # by position (another label may repeat), labelled as the ensemble's, which xarray
        # aligns them by
        truth = truth.isel({item_dim: [at[v] for v in wanted]}).assign_coords(
            {item_dim: ens[item_dim].values})
        _check_finite(truth, path, len(shape), paired=True)
        return truth, True
    if truth_range is not None:
        dim = truth.dims[0]
        try:
            lo, hi = (_label(t, truth[dim]) for t in truth_range)
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
                                  f"{dim} of {path}: pick labels inside its coordinate")
    _check_finite(truth, path, len(shape), paired=False)
    return truth, False


def _on_the_ensembles_grid(truth: xr.DataArray, field: xr.DataArray, path) -> xr.DataArray:
    """``truth`` with its field dims in the order of the ensemble's ``field`` (item, member,
    *field dims), where it names them alike: fields are compared point by point, so a truth
    stored (time, x, y) must not meet an ensemble's (y, x) by position. Raises
    EvaluationError where a coordinate both carry differs (another grid of as many points);
    a store's grid indices (no physical grid known) are compared by position alone."""
    dims = field.dims[2:]
    if not set(dims) <= set(truth.dims):
        return truth  # named otherwise: by position, as the shapes are checked
    truth = truth.transpose(..., *dims)
    for dim in dims:
        ours = field[dim] if dim in field.coords else None
        if (ours is None or dim not in truth.coords
                or str(ours.attrs.get("long_name", "")).startswith("grid index")):
            continue
        a, b = np.asarray(ours.values), np.asarray(truth[dim].values)
        alike = lambda a, b: a.shape == b.shape and (  # noqa: E731
            _same_points(a, b) if a.dtype.kind in "fiu" else bool((a == b).all()))
        if not alike(a, b) and alike(a, b[::-1]):  # the same grid, stored the other way round
            truth, b = truth.isel({dim: slice(None, None, -1)}), b[::-1]
        same = alike(a, b)
        if not same:
            show = (lambda v: f"{v:.6g}") if a.dtype.kind in "fiu" else str  # noqa: E731
            raise EvaluationError(
                f"truth {path}'s {dim} runs {show(b.min())} .. {show(b.max())} ({b.size} "
                f"points), the ensemble's {show(a.min())} .. {show(a.max())} ({a.size}): give "
                "the truth on the model's grid")
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
    holds NaN or inf: its scores would be NaN and the figures fail."""
    values = truth.load().values  # score reads it whole anyway: loaded once, here
    lead = values.shape[: values.ndim - field_ndim]
    bad = ~np.isfinite(values.reshape(*lead, -1)).all(axis=-1)
    if not bad.any():
        return
    dim = truth.dims[0]
    labels = truth[dim].to_index()[bad] if bad.ndim == 1 else np.nonzero(bad)[0]
    where = f"{dim} {', '.join(label_text(v) for v in np.asarray(labels)[:3])}"
    # unwritten snapshots read back as the store's fill value, NaN
    choose = ("sample items whose truth was written (input.range)" if paired else
              "choose its finite fields with --truth-range")
    raise EvaluationError(f"truth {path} has {int(bad.sum())} of the {bad.size} fields scored "
                          f"not finite (e.g. {where}): a generate-data run stopped part way "
                          "leaves its unwritten snapshots NaN; rerun it with data.overwrite = "
                          f"true (it starts again), or {choose}")


def _check_sound(store, err: Exception | None) -> None:
    """After ``err`` (or NaN figures) while reading ``store``: raise EvaluationError when
    members marked done are damaged (the likely cause), naming the fix."""
    from pipeline.status import damaged

    found = damaged(str(store))
    if found:
        raise EvaluationError(f"store {store} has {len(found)} damaged member(s) (e.g. item "
                              f"{found[0][0]}, member {found[0][1]}: {found[0][2]}): run piadm "
                              "status --verify --repair on it, then rerun its sample command") from err


def _without_channel(ens: xr.Dataset) -> xr.Dataset:
    """The ensemble with a network's channel axis of 1 (``model.shape = [1, H, W]``) dropped,
    so that its fields are scored as the 2-D fields they are."""
    dims = ens[_field_variable(ens)].dims  # (item, member, *field)
    if len(dims) == 5 and ens.sizes[dims[2]] == 1:
        return ens.isel({dims[2]: 0})
    return ens


def spectra_of(variable: str):
    """The per-field spectra used for ``variable``: kinetic energy for vorticity, else power."""
    return energy_spectra if "vorticity" in variable else power_spectra


# every file evaluate writes into its folder (the figures but fields.png only where they apply)
OUTPUTS = ("metrics.json", "metrics.nc", "fields.png", "spectrum.png", "rank_histogram.png",
           "residuals.png")


def _same_labels(wanted: np.ndarray, coord: xr.DataArray) -> np.ndarray:
    """``wanted`` item labels as the truth's coordinate ``coord`` spells them: a float label
    ``inputs.snapped`` to one of its own, as input.range takes labels; others as they are."""
    have = np.asarray(coord.values)
    if not (np.issubdtype(wanted.dtype, np.floating) and np.issubdtype(have.dtype, np.floating)):
        return wanted
    return np.array([snapped(float(v), have) for v in wanted], dtype=have.dtype)


def coarse_input(ens: xr.Dataset) -> xr.DataArray | None:
    """The coarse fields (items, h, w) the ensemble was conditioned on, when its model was
    conditioned on a coarse field, else None."""
    cfg = tomllib.loads(ens.attrs.get("config", ""))
    if cfg.get("model", {}).get("condition") != "coarse":
        return None
    name = _field_variable(ens)
    inp = cfg["input"]
    # the run's path, relative to the folder it ran in: checked against the fields it took
    where = (f"the store was conditioned on input.path {inp['path']!r} (as its sample run "
             "named it)")
    if not Path(inp["path"]).exists():
        fix = ("restore it" if Path(inp["path"]).is_absolute() else
               "run piadm evaluate from the folder the sample ran in")
        raise EvaluationError(f"{where}, which is not found from here: {fix} (the "
                              "upsampled-input baseline and the added band need that input)")
    coarse = open_store(inp["path"])[inp["variable"]]
    item_dim = ens[name].dims[0]
    coarse = coarse.sel({item_dim: ens[item_dim].values})
    then = ens.attrs.get(INPUT_FINGERPRINT)
    # an older store's fingerprint (of another length) is not compared, as a resume does not
    now = selection_fingerprint(coarse) if then is not None else None
    if then is not None and len(then) == len(now) and not same_fingerprint(then, now):
        raise EvaluationError(f"{where}, and the store found there from here holds other "
                              f"{inp['variable']} fields than those it took (its attribute "
                              f"{INPUT_FINGERPRINT}): run piadm evaluate from the folder the "
                              "sample ran in, or restore that input")
    return coarse


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
    field = ens[_field_variable(ens)]
    values = coarse.values
    for axis, (f, c) in enumerate(zip(field.shape[2:], coarse.shape[1:]), start=1):
        values = np.repeat(values, f // c, axis=axis)
    return xr.DataArray(values, dims=field.dims[:1] + field.dims[2:])


def _square(shape) -> bool:
    return len(shape) == 2 and shape[0] == shape[1]


def _check_kmax(kmax: int | None, ens: xr.Dataset) -> None:
    """Refuse a ``kmax`` the store's spectra do not reach: they have shells k = 1 .. n / 2,
    and none unless the fields are square."""
    if kmax is None:
        return
    shape = ens[_field_variable(ens)].shape[2:]
    if not _square(shape):
        raise EvaluationError(f"--kmax {kmax}: the store's fields {tuple(shape)} are not square, "
                              "so no spectrum is scored: drop --kmax")
    if kmax > shape[-1] // 2:
        raise EvaluationError(f"--kmax {kmax} is past the largest shell of the store's "
                              f"{shape[0]}x{shape[1]} fields: give at most {shape[-1] // 2} "
                              "(n / 2)")


def score(ens: xr.Dataset, truth: xr.DataArray, paired: bool, *, kmax: int | None = None,
          baseline: xr.DataArray | None = None, input_n: int | None = None,
          cut: int | None = None, progress=None) -> xr.Dataset:
    """Metrics of ``ens`` against ``truth`` as a small dataset: per-item scores (paired, with
    the MAE of ``baseline``, e.g. ``upsampled(coarse_input(ens))``, when given), spectra over
    k with their bands (``pipeline.bands``: the input's ``input_n`` points per side, the
    truth's resolved wavenumber ``cut``), the rank histogram; overall figures are its
    attributes."""
    name = _field_variable(ens)
    field = ens[name]
    shape = field.shape[2:]
    spectra = spectra_of(name) if _square(shape) else None
    truth_values = truth.values.astype(np.float64)  # read once: per item below, then whole
    per_item, ranks, ens_spectra, moments = _item_by_item(field, truth_values, paired, spectra,
                                                          baseline, progress)
    out = xr.Dataset()
    mean = moments[0] / moments[2]
    attrs = {"store_variable": name, "pairing": "paired" if paired else "climatological",
             "items": field.shape[0], "members": field.shape[1],
             "ensemble_mean": mean, "ensemble_std": np.sqrt(moments[1] / moments[2] - mean ** 2),
             "rounds_mean": float(ens["rounds"].mean()),
             "model_calls_mean": float(ens["model_calls"].mean())}
    if paired:
        out, figures = _paired_scores(out, field, per_item, ranks, baseline)
        attrs.update(figures)
    attrs.update(truth_mean=float(truth_values.mean()), truth_std=float(truth_values.std()),
                 truth_fields=int(np.prod(truth.shape[: truth.ndim - len(shape)])))
    if spectra is not None:
        out, figures = _spectrum_scores(out, spectra, ens_spectra, truth_values, shape[-1],
                                        paired=paired, kmax=kmax, cut=cut, input_n=input_n)
        attrs.update(figures)
    else:  # radial shells need a square field
        attrs["spectrum_note"] = f"no spectra: the fields {tuple(shape)} are not square"
    out.attrs.update(attrs)
    return _described(out, field.attrs.get("units"))


# What each metric is (its long_name); those in the field's own units are named apart
METRICS = {
    "crps": "CRPS of the members against the truth, averaged over the field",
    "rmse": "root mean square error of the ensemble mean",
    "spread": "ensemble spread: the square root of (M + 1) / M times the members' variance "
              "(ddof 1) averaged over the field",
    "baseline_mae": "mean absolute error of the upsampled coarse input",
    "baseline_rmse": "root mean square error of the upsampled coarse input",
    "rank_histogram": "points at which the truth ranks r among the members",
    "spectrum_ensemble": "the members' radially averaged spectrum, their mean",
    "spectrum_truth": "the truth's radially averaged spectrum, its mean",
    "spectrum_ratio": "ensemble spectrum over the truth's",
    "spectrum_ratio_lo": "lower end of the spectrum ratio's interval",
    "spectrum_ratio_hi": "upper end of the spectrum ratio's interval",
    "k": "radial wavenumber (cycles per domain)",
}
IN_FIELD_UNITS = ("crps", "rmse", "spread", "baseline_mae", "baseline_rmse")
UNITLESS = ("rank_histogram", "spectrum_ratio", "spectrum_ratio_lo", "spectrum_ratio_hi", "k")


def _described(out: xr.Dataset, units: str | None) -> xr.Dataset:
    """``out`` with a ``long_name`` on each metric (``METRICS``) and its units: the field's
    for the errors and the spread, 1 for counts, ratios and wavenumbers."""
    for name in set(METRICS) & set(out.variables):
        out[name].attrs["long_name"] = METRICS[name]
        if name in UNITLESS:
            out[name].attrs["units"] = "1"
        elif name in IN_FIELD_UNITS and units:
            out[name].attrs["units"] = str(units)
    return out


def _item_by_item(field: xr.DataArray, truth_values: np.ndarray, paired: bool, spectra,
                  baseline: xr.DataArray | None, progress):
    """One pass over ``field`` (items, members, *shape), an item in memory at a time: the
    per-item scores {name: (items,)} and rank histogram counts (members + 1,) when ``paired``
    (NaN and zeros otherwise), the ensemble's spectra (a list of (units, K), when ``spectra``)
    and the sum, sum of squares and count of all its values."""
    items, members = field.shape[0], field.shape[1]
    per_item = {k: np.full(items, np.nan) for k in
                ("crps", "rmse", "spread", "baseline_mae", "baseline_rmse")}
    ranks = np.zeros(members + 1, dtype=np.int64)
    ens_spectra, moments = [], np.zeros(3)
    for i in range(items):
        e = field.isel({field.dims[0]: i}).values.astype(np.float64)
        moments += [e.sum(), (e ** 2).sum(), e.size]
        if spectra is not None:
            _, s = spectra(e)  # (members, K): one unit per item when paired, else per field
            ens_spectra.append(s.mean(0, keepdims=True) if paired else s)
        if paired:
            t = truth_values[i]
            per_item["crps"][i] = crps(e, t)
            per_item["rmse"][i] = np.sqrt(((e.mean(0) - t) ** 2).mean())
            if members > 1:  # one member has no spread (NaN: "n/a" in the table)
                per_item["spread"][i] = np.sqrt(e.var(0, ddof=1).mean() * (members + 1)
                                                / members)
            ranks += rank_histogram(e, t)
            if baseline is not None:
                b = baseline.isel({baseline.dims[0]: i}).values
                per_item["baseline_mae"][i] = np.abs(b - t).mean()
                per_item["baseline_rmse"][i] = np.sqrt(((b - t) ** 2).mean())
        if progress is not None:
            progress(i + 1, items)
    return per_item, ranks, ens_spectra, moments


def _paired_scores(out: xr.Dataset, field: xr.DataArray, per_item: dict, ranks: np.ndarray,
                   baseline: xr.DataArray | None) -> tuple[xr.Dataset, dict]:
    """``out`` with the per-item scores along ``field``'s item dim and the rank histogram, and
    the overall figures: CRPS, ensemble-mean RMSE, spread/skill (and the baseline's)."""
    item_dim = field.dims[0]
    for key, values in per_item.items():
        if not np.isnan(values).all():
            out[key] = ((item_dim,), values)
    # with its attributes (units, calendar, axis): an analyst lines the metrics up by them
    out = out.assign_coords({item_dim: (item_dim, field[item_dim].values,
                                        dict(field[item_dim].attrs))})
    out["rank_histogram"] = (("rank",), ranks.astype(np.int32))
    figures = dict(crps=float(np.mean(per_item["crps"])),
                   ensemble_mean_rmse=float(np.sqrt(np.mean(per_item["rmse"] ** 2))),
                   spread_skill=float(np.sqrt(np.mean(per_item["spread"] ** 2)) /
                                      np.sqrt(np.mean(per_item["rmse"] ** 2))))
    if baseline is not None:
        figures.update(baseline_mae=float(np.mean(per_item["baseline_mae"])),
                       baseline_rmse=float(np.sqrt(np.mean(per_item["baseline_rmse"] ** 2))))
    return out, figures


def _spectrum_scores(out: xr.Dataset, spectra, ens_spectra: list, truth_values: np.ndarray,
                     n: int, *, paired: bool, kmax: int | None, cut: int | None,
                     input_n: int | None) -> tuple[xr.Dataset, dict]:
    """``out`` with the ensemble's and the truth's mean spectra over k and their ratio with its
    interval, and the overall figures: the deviation up to ``kmax`` and per band of the
    ``n`` x ``n`` grid's scales (``pipeline.bands``)."""
    k, truth_spectra = spectra(truth_values)
    ens_spectra = np.concatenate(ens_spectra)
    kmax = max(n // 8, 1) if kmax is None else kmax  # fields under 8 points still score k = 1
    bands = spectral_bands(n, cut=cut, input_n=input_n)
    block = 1 if paired else correlation_block(truth_spectra)
    figs = band_figures(ens_spectra, truth_spectra, bands, paired=paired, block=block)
    figures = {} if paired else {"truth_block": block}
    out = out.assign_coords(k=k.astype(np.int32))  # NetCDF 3 has no int64
    out["spectrum_ensemble"] = (("k",), ens_spectra.mean(0))
    out["spectrum_truth"] = (("k",), truth_spectra.mean(0))
    out["spectrum_ratio"] = (("k",), figs.ratio)
    out["spectrum_ratio_lo"] = (("k",), figs.ratio_lo)
    out["spectrum_ratio_hi"] = (("k",), figs.ratio_hi)
    # what a model is judged on: the scales it adds when it is given coarse ones
    headline = "added" if any(b.name == "added" for b in bands) else bands[0].name
    figures.update(spectrum="kinetic energy" if spectra is energy_spectra else "power",
                   kmax=int(kmax), spectrum_max_deviation=float(
                       np.nanmax(np.abs(figs.ratio[:kmax] - 1))),
                   headline_band=headline, **figs.attrs())
    return out, figures


def table(metrics: xr.Dataset) -> str:
    """The overall figures as an aligned two-column text table."""
    a = metrics.attrs
    note = f" ({a['pairing_note']})" if "pairing_note" in a else ""
    rows = [("pairing", a["pairing"] + note),
            *((("truth", a["truth_note"]),) if "truth_note" in a else ()),
            ("items x members", f"{a['items']} x {a['members']}")]
    for key, label in [("crps", "CRPS"), ("baseline_mae", "baseline MAE (upsampled input)"),
                       ("ensemble_mean_rmse", "ensemble-mean RMSE"),
                       ("baseline_rmse", "baseline RMSE"), ("spread_skill", "spread/skill"),
                       ("ensemble_mean", "ensemble mean"), ("truth_mean", "truth mean"),
                       ("ensemble_std", "ensemble std"), ("truth_std", "truth std"),
                       ("rounds_mean", "parallel rounds / call (member mean)"),
                       ("model_calls_mean", "model calls / member")]:
        if key in a:
            rows.append((label, f"{a[key]:.4g}" if np.isfinite(a[key]) else
                         "n/a (needs 2 members)" if key == "spread_skill" else "n/a"))
    if "spectrum_note" in a:
        rows.append(("spectra", a["spectrum_note"].removeprefix("no spectra: ")))
    if "spectrum_ratio" in metrics:
        kmax = a["kmax"]
        ratios = " ".join(f"{r:.2f}" for r in metrics["spectrum_ratio"].values[:kmax])
        rows.append((f"{a['spectrum']} ratio k=1..{kmax}", ratios))
        rows.append((f"max |ratio - 1|, k <= {kmax}", f"{a['spectrum_max_deviation']:.3f}"))
        # paired items are what the intervals resample: one item gives none
        lone = a["pairing"] == "paired" and a["items"] == 1
        for name in a["bands"].split(","):
            b = lambda key: a[f"band_{name}_{key}"]  # noqa: E731
            span = lambda key: ("" if lone else  # noqa: E731
                                f" [{b(key + '_lo'):.2f}, {b(key + '_hi'):.2f}]")
            mark = " (headline)" if name == a["headline_band"] else ""
            rows.append((f"{name} band k={b('k')}{mark}",
                         f"energy ratio {b('energy_ratio'):.2f}{span('energy_ratio')}, "
                         f"max |ratio - 1| {b('max_deviation'):.2f}{span('max_deviation')}"
                         + (" (one item: no interval)" if lone else "")
                         # past the truth's cut its energies are its numerical noise floor
                         + ("; past the truth's resolved scales, where its energy is near "
                            "zero: not part of the headline" if name == "beyond" else "")))
    if "truth_block" in a:
        rows.append(("intervals", f"90% bootstrap, the truth in blocks of {a['truth_block']} "
                                  "consecutive fields"))
    if "rank_histogram" in metrics:
        h = metrics["rank_histogram"].values
        rows.append(("rank histogram (share)", " ".join(f"{c / h.sum():.2f}" for c in h)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _check_ours(folder: Path) -> None:
    """Refuse a folder holding files of the names evaluate writes that no evaluation wrote
    (its metrics.json, naming a store and a truth, tells one): they would be replaced or
    removed."""
    there = [name for name in OUTPUTS if (folder / name).exists()]
    if not there:
        return
    try:
        earlier = json.loads((folder / "metrics.json").read_text())
        ours = isinstance(earlier, dict) and {"store", "truth"} <= earlier.keys()
    except FileNotFoundError:
        ours = False
    except (OSError, ValueError):
        raise EvaluationError(f"--out {folder} holds a metrics.json that cannot be read: "
                              "delete it if it is an evaluation's, or give another folder"
                              ) from None
    if not ours:
        raise EvaluationError(f"--out {folder} holds {', '.join(there)}, not written by piadm "
                              "evaluate, which would replace them: give a new or empty folder")


def _as_json(metrics: xr.Dataset) -> dict:
    """The overall figures at the top level; per-item scores, spectra and ranks below."""
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.attrs.items()}
    per_item = [v for v in metrics.data_vars if metrics[v].dims == metrics["crps"].dims] \
        if "crps" in metrics else []
    if per_item:
        dim = metrics["crps"].dims[0]
        labels = metrics[dim].values
        # dates as text: tolist gives a datetime64[ns]'s nanoseconds
        out["per_item"] = {dim: ([label_text(v) for v in labels] if labels.dtype.kind in "mM"
                                 else labels.tolist()),
                           **{v: metrics[v].values.tolist() for v in per_item}}
    if "k" in metrics.coords:
        out["spectrum_k"] = {"k": metrics["k"].values.tolist(),
                             **{v.removeprefix("spectrum_"): metrics[v].values.tolist()
                                for v in ("spectrum_ensemble", "spectrum_truth",
                                          "spectrum_ratio", "spectrum_ratio_lo",
                                          "spectrum_ratio_hi")}}
    if "rank_histogram" in metrics:
        out["rank_histogram"] = metrics["rank_histogram"].values.tolist()
    return _finite_or_null(out)


def _finite_or_null(value):
    """``value`` with every NaN or infinite number as None: JSON has no NaN, and a reader
    that follows the standard refuses a file holding one."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def evaluate(store: str | Path, truth_path: str | Path, *, truth_variable: str | None = None,
             truth_range: tuple[str, str] | None = None, kmax: int | None = None,
             cut: int | None = None, out: str | Path | None = None,
             progress=None) -> tuple[xr.Dataset, list[Path]]:
    """Score ``store`` against the truth and save metrics.json, metrics.nc and the PNG figures
    in ``out`` (default: next to the store, ``<store>_eval``); returns (metrics, files).
    ``cut``: the finest wavenumber the truth resolves (default: its ``resolved_wavenumber``
    attribute, which piadm generate-data writes, else all)."""
    _check_wavenumbers(cut, kmax)
    folder = _output_folder(store, out)
    ens = _without_channel(open_ensemble(store))
    _check_kmax(kmax, ens)
    shape = ens[_field_variable(ens)].shape[2:]
    if cut is not None and _square(shape) and cut > shape[-1] // 2:  # as --kmax
        raise EvaluationError(f"--cut {cut} is past the largest shell of the store's "
                              f"{shape[0]}x{shape[1]} fields: give at most {shape[-1] // 2} "
                              "(n / 2), or leave it out")
    truth, paired = open_truth(truth_path, truth_variable or _field_variable(ens), ens,
                               truth_range)
    coarse = coarse_input(ens)
    baseline = upsampled(coarse, ens) if paired and coarse is not None else None
    if cut is None and "resolved_wavenumber" in truth.attrs:
        cut = int(truth.attrs["resolved_wavenumber"])
    if cut is not None and coarse is not None and cut <= coarse.shape[-1] // 2:
        raise EvaluationError(f"--cut {cut} is within the scales the coarse input resolves (k <= "
                              f"{coarse.shape[-1] // 2}), which would leave no band the model "
                              "adds: give the truth's finest resolved wavenumber")
    try:
        metrics = score(ens, truth, paired, kmax=kmax, baseline=baseline, cut=cut,
                        input_n=None if coarse is None else coarse.shape[-1], progress=progress)
    except EvaluationError:
        raise
    except (RuntimeError, ValueError) as err:  # a codec's error on damaged bytes, say
        _check_sound(store, err)
        raise
    if not np.isfinite(metrics.attrs.get("ensemble_std", 0.0)):  # a NaN member read back
        _check_sound(store, None)
    metrics.attrs.update(store=str(store), truth=f"{truth_path}:{truth.name}")
    if baseline is not None:
        off = input_mismatch(truth, coarse)
        if off > INPUT_MISMATCH:
            metrics.attrs["truth_note"] = (
                f"the truth's block averages are {off:.0%} (rms) off the coarse input the "
                "ensemble was conditioned on: is it the trajectory that input was made from?")
    item_dim = ens[_field_variable(ens)].dims[0]
    if not paired and item_dim != "item":  # a conditioned ensemble: pairing may have been meant
        metrics.attrs["pairing_note"] = f"the truth has no {item_dim} dim to pair by"
    return metrics, _save(metrics, folder, ens, truth, paired, baseline)


def _check_wavenumbers(cut, kmax) -> None:
    """Refuse a ``cut`` or ``kmax`` that is not a whole number >= 1 (the API passes what a
    script has)."""
    for flag, value in (("cut", cut), ("kmax", kmax)):
        if value is not None and not (isinstance(value, (int, np.integer))
                                      and not isinstance(value, bool)):
            raise EvaluationError(f"--{flag} {value!r}: give a whole number of wavenumbers")
    if cut is not None and cut < 1:
        raise EvaluationError(f"--cut {cut}: the truth's finest resolved wavenumber must be >= 1")
    if kmax is not None and kmax < 1:
        raise EvaluationError(f"--kmax {kmax}: the largest wavenumber scored must be >= 1 "
                              "(leave it out for n / 8)")


def _output_folder(store, out) -> Path:
    """The folder the evaluation writes (``out``, else ``<store>_eval``), refused where it is a
    file, a Zarr store, or a folder whose files of the names it writes no evaluation wrote."""
    folder = Path(out) if out else Path(str(store).rstrip("/").removesuffix(".zarr") + "_eval")
    if folder.is_file() or any((folder / name).exists() for name in ("zarr.json", ".zgroup")):
        kind = "a file" if folder.is_file() else "a Zarr store"
        raise EvaluationError(f"--out {folder} is {kind}: give a folder for the table and "
                              "figures (default: the store's name + _eval)")
    _check_ours(folder)
    return folder


def _save(metrics: xr.Dataset, folder: Path, ens, truth, paired: bool, baseline) -> list[Path]:
    """Write metrics.json (whole or not at all: it marks the folder as ours), metrics.nc and
    the figures into ``folder``, removing an earlier evaluation's files this one does not
    make; the files written."""
    from pipeline.figures import fields_figure, rank_figure, residual_figure, spectrum_figure

    folder.mkdir(parents=True, exist_ok=True)
    document = json.dumps(_as_json(metrics), indent=2, default=str, allow_nan=False)
    draft = folder / f".metrics.json.{os.getpid()}"
    draft.write_text(document)
    os.replace(draft, folder / "metrics.json")
    # scipy: NetCDF 3, no extra library
    metrics.to_netcdf(str(folder / "metrics.nc"), engine="scipy")
    files = [folder / "metrics.json", folder / "metrics.nc",
             fields_figure(ens, truth, paired, folder / "fields.png", inputs=baseline)]
    if "spectrum_ratio" in metrics:
        files.append(spectrum_figure(metrics, folder / "spectrum.png"))
    if "rank_histogram" in metrics:
        files.append(rank_figure(metrics, folder / "rank_histogram.png"))
    residuals = residual_figure(ens, folder / "residuals.png")
    files += [residuals] if residuals else []
    for name in set(OUTPUTS) - {Path(f).name for f in files}:  # an earlier evaluation's
        (folder / name).unlink(missing_ok=True)  # (after this one's, which replace the rest)
    return files
