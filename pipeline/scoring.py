"""Score an ensemble store against the truth, item by item so memory stays one item's worth.

Two cases, told apart by the truth's dimensions:
- paired: the truth has the store's item dimension (e.g. ``time`` for downscaling); each item's
  members are scored against that item's true field: CRPS, ensemble-mean RMSE, spread/skill,
  rank histogram, and for a model conditioned on a coarse input the upsampled-input baseline.
- climatological: it does not (an unconditional store); the members are compared with the
  truth's selection as distributions: spectra, mean and standard deviation.
Both compare radially averaged spectra (kinetic energy for vorticity, power otherwise), per
band of scales (``pipeline.bands``) with bootstrap intervals. The store and the truth are
opened and checked against each other by ``pipeline.eval_inputs``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.bands import band_figures, correlation_block, spectral_bands
from pipeline.done_record import done_members
from pipeline.errors import EvaluationError, naming
from pipeline.eval_output import output_folder, save
from pipeline.evaluation import (crps, energy_spectra, power_spectra, rank_histogram,
                                 spread_variance)
from pipeline.eval_inputs import (INPUT_MISMATCH, check_shell, check_sound, coarse_input,
                                  ensemble_variable, input_mismatch, is_square, open_ensemble,
                                  open_truth, upsampled, without_channel)
from pipeline.figures import spread_skill_text
from pipeline.store_attrs import folder_identity
from pipeline.warned import catching


def spectra_of(variable: str):
    """The per-field spectra used for ``variable``: kinetic energy for vorticity, else power."""
    return energy_spectra if "vorticity" in variable else power_spectra


def score(ens: xr.Dataset, truth: xr.DataArray, paired: bool, *, kmax: int | None = None,
          baseline: xr.DataArray | None = None, input_n: int | None = None,
          cut: int | None = None, progress=None) -> xr.Dataset:
    """Metrics of ``ens`` against ``truth`` as a small dataset: per-item scores (paired, with
    the MAE of ``baseline``, e.g. ``upsampled(coarse_input(ens))``, when given), spectra over
    k with their bands (``pipeline.bands``: the input's ``input_n`` points per side, the
    truth's resolved wavenumber ``cut``), the rank histogram; overall figures are its
    attributes."""
    name = ensemble_variable(ens)
    field = ens[name]
    shape = field.shape[2:]
    spectra = spectra_of(name) if is_square(shape) else None
    truth_values = truth.values.astype(np.float64)  # read once: per item below, then whole
    per_item, ranks, ens_spectra, moments = _item_by_item(field, truth_values, paired, spectra,
                                                          baseline, progress)
    out = xr.Dataset()
    count, mean, squares = moments
    attrs = {"store_variable": name, "pairing": "paired" if paired else "climatological",
             "items": field.shape[0], "members": field.shape[1],
             "ensemble_mean": mean, "ensemble_std": np.sqrt(squares / count),
             "rounds_mean": float(ens["rounds"].mean()),
             "model_calls_mean": float(ens["model_calls"].mean())}
    if paired:
        out, figures = _paired_scores(out, field, per_item, ranks, baseline)
        attrs.update(figures)
    attrs.update(truth_mean=float(truth_values.mean()), truth_std=float(truth_values.std()),
                 truth_fields=int(np.prod(truth.shape[: truth.ndim - len(shape)])))
    if paired and attrs["ensemble_mean_rmse"] <= RMSE_NIL * attrs["truth_std"]:
        attrs["spread_skill"] = float("nan")  # rounding over rounding (members = the truth)
    if spectra is not None:
        # climatological, a conditioned store's members of one item share its input: they
        # are resampled item by item, not as independent draws (its item dim is the input's)
        by_item = (not paired and field.dims[0] != "item" and field.shape[0] > 1)
        out, figures = _spectrum_scores(out, spectra, ens_spectra, truth_values, shape[-1],
                                        paired=paired, kmax=kmax, cut=cut, input_n=input_n,
                                        ens_block=field.shape[1] if by_item else 1)
        attrs.update(figures)
    else:  # radial shells need a square field
        what = "square images" if len(shape) == 1 else "square"
        attrs["spectrum_note"] = f"no spectra: the fields {tuple(shape)} are not {what}"
    out.attrs.update(attrs)
    return _described(out, field.attrs.get("units"), name)


# An ensemble-mean RMSE at most this share of the truth's std is rounding: its spread/skill,
# rounding over rounding, is no figure (an ensemble equal to the truth scored 1.41)
RMSE_NIL = 1e-12

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


SQUARED = ("spectrum_ensemble", "spectrum_truth")  # per shell, in the field's units squared


def _described(out: xr.Dataset, units: str | None, variable: str = "") -> xr.Dataset:
    """``out`` with a ``long_name`` on each metric (``METRICS``) and its units: the field's
    for the errors and the spread, their square for the spectra (a kinetic energy from
    ``variable``'s vorticity: lengths in units of the periodic domain's side over 2 pi), 1 for
    counts, ratios and wavenumbers."""
    for name in set(METRICS) & set(out.variables):
        out[name].attrs["long_name"] = METRICS[name]
        if name in UNITLESS:
            out[name].attrs["units"] = "1"
        elif name in IN_FIELD_UNITS and units:
            out[name].attrs["units"] = str(units)
        elif name in SQUARED and units:
            out[name].attrs["units"] = "1" if str(units) == "1" else f"({units})^2"
            if spectra_of(variable) is energy_spectra:
                out[name].attrs["comment"] = (
                    "kinetic energy 1/2 |u|^2 per shell, u from the vorticity on a periodic "
                    "domain of side 2 pi: lengths in units of the side over 2 pi")
    return out


def _merged(a: tuple, b: tuple) -> tuple:
    """Two parts' (count, mean, sum of squared deviations from the mean) as one (Chan et al.):
    the sum of squares less the squared mean loses the spread of fields far from zero."""
    (n, mean, m2), (k, other, m2b) = a, b
    if n == 0:
        return b
    total = n + k
    delta = other - mean
    return total, mean + delta * k / total, m2 + m2b + delta**2 * n * k / total


# The float64 work on an item's members goes this many bytes at a time: 20,000 members of 64x64
# whole took 3.3 GB (its copy in float64, its spectra's transforms, the CRPS's sorted copy)
BLOCK_BYTES = 64 * 2**20


def _item_by_item(field: xr.DataArray, truth_values: np.ndarray, paired: bool, spectra,
                  baseline: xr.DataArray | None, progress):
    """One pass over ``field`` (items, members, *shape), an item in memory at a time (as
    stored; its float64 work ``BLOCK_BYTES`` at a time): the per-item scores {name: (items,)}
    and rank histogram counts (members + 1,) when ``paired`` (NaN and zeros otherwise), the
    ensemble's spectra (a list of (units, K), when ``spectra``) and the count, mean and sum
    of squared deviations of all its values."""
    items, members = field.shape[0], field.shape[1]
    per_item = {k: np.full(items, np.nan) for k in
                ("crps", "rmse", "spread", "baseline_mae", "baseline_rmse")}
    ranks = np.zeros(members + 1, dtype=np.int64)
    # one generator for all items: each its own draws to split ties (a generator made anew
    # per item split every item's ties alike, a bias more items never averaged out)
    tie_break = np.random.default_rng(0)
    ens_spectra, moments = [], (0, 0.0, 0.0)
    if progress is not None:  # its clock starts now: the first item's time is the pace
        progress(0, items)
    for i in range(items):
        e = field.isel({field.dims[0]: i}).values
        step = max(1, BLOCK_BYTES // (8 * max(e[0].size, 1)))  # members a block
        parts = []
        for m0 in range(0, members, step):
            block = e[m0:m0 + step].astype(np.float64)
            centre = block.mean()
            moments = _merged(moments, (block.size, centre, ((block - centre) ** 2).sum()))
            if spectra is not None:
                parts.append(spectra(block)[1])  # (members, K): each member's own
        if spectra is not None:  # one unit per item when paired, else per field
            s = np.concatenate(parts)
            ens_spectra.append(s.mean(0, keepdims=True) if paired else s)
        if paired:
            t = truth_values[i]
            (per_item["crps"][i], per_item["rmse"][i],
             per_item["spread"][i]) = _paired_item(e, t, ranks, tie_break)
            if baseline is not None:
                b = baseline.isel({baseline.dims[0]: i}).values
                per_item["baseline_mae"][i] = np.abs(b - t).mean()
                per_item["baseline_rmse"][i] = np.sqrt(((b - t) ** 2).mean())
        if progress is not None:
            progress(i + 1, items)
    return per_item, ranks, ens_spectra, moments


def _paired_item(e: np.ndarray, t: np.ndarray, ranks: np.ndarray,
                 tie_break: np.random.Generator) -> tuple[float, float, float]:
    """An item's CRPS, ensemble-mean RMSE and spread (NaN for one member) of its members e
    (M, *S) against its truth t (*S), over blocks of points in float64 (``BLOCK_BYTES``),
    adding the truth's ranks to ``ranks`` (M + 1,): the blocks in order draw the tie-breaks
    one draw of the whole item would."""
    members = e.shape[0]
    flat, truth = e.reshape(members, -1), t.ravel()
    step = max(1, BLOCK_BYTES // (8 * members))  # points a block
    crps_sum = squares = variance = 0.0
    for p0 in range(0, truth.size, step):
        block, tb = flat[:, p0:p0 + step].astype(np.float64), truth[p0:p0 + step]
        crps_sum += crps(block, tb) * tb.size
        squares += ((block.mean(0) - tb) ** 2).sum()
        if members > 1:
            variance += spread_variance(block).sum()
        ranks += rank_histogram(block, tb, tie_break)
    n = truth.size
    return (crps_sum / n, float(np.sqrt(squares / n)),
            float(np.sqrt(variance / n)) if members > 1 else float("nan"))


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
    out = out.assign_coords(rank=("rank", np.arange(ranks.size), {  # what the counts are of
        "long_name": "members below the truth at a point", "units": "1"}))
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 where the mean is the truth
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
                     input_n: int | None, ens_block: int = 1) -> tuple[xr.Dataset, dict]:
    """``out`` with the ensemble's and the truth's mean spectra over k and their ratio with its
    interval, and the overall figures: the deviation up to ``kmax`` and per band of the
    ``n`` x ``n`` grid's scales (``pipeline.bands``); the ensemble's spectra resampled in
    blocks of ``ens_block`` rows (an item's members)."""
    k, truth_spectra = spectra(truth_values)
    ens_spectra = np.concatenate(ens_spectra)
    kmax = max(n // 8, 1) if kmax is None else kmax  # fields under 8 points still score k = 1
    bands = spectral_bands(n, cut=cut, input_n=input_n)
    block = 1 if paired else correlation_block(truth_spectra)
    figs = band_figures(ens_spectra, truth_spectra, bands, paired=paired, block=block,
                        ens_block=ens_block)
    figures = {} if paired else {"truth_block": block, "ensemble_block": ens_block}
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
                       ("rounds_mean", "parallel rounds of a member's call (mean)"),
                       ("model_calls_mean", "model calls / member")]:
        if key == "spread_skill" and key in a:
            rows.append((label, spread_skill_text(a[key], a["members"], "{:.4g}")))
        elif key in a:
            rows.append((label, f"{a[key]:.4g}" if np.isfinite(a[key]) else "n/a"))
    if "spectrum_note" in a:
        rows.append(("spectra", a["spectrum_note"].removeprefix("no spectra: ")))
    intervals = False  # whether a band row shows one, which the intervals row then explains
    if "spectrum_ratio" in metrics:
        kmax = a["kmax"]
        ratios = " ".join(f"{r:.2f}" for r in metrics["spectrum_ratio"].values[:kmax])
        rows.append((f"{a['spectrum']} ratio k=1..{kmax}", ratios))
        rows.append((f"max |ratio - 1|, k <= {kmax}", f"{a['spectrum_max_deviation']:.3f}"))
        # paired items are what the intervals resample, else the members (by item where
        # they share one): a single one gives none
        paired = a["pairing"] == "paired"
        lone = (" (one item: no interval)" if paired or a.get("ensemble_block", 1) > 1
                else " (one member: no interval)")
        for name in a["bands"].split(","):
            b = lambda key: a[f"band_{name}_{key}"]  # noqa: E731
            nil = not np.isfinite(b("energy_ratio_lo")) and np.isfinite(b("energy_ratio"))
            intervals |= bool(np.isfinite(b("energy_ratio_lo")))
            span = lambda key: ("" if nil else  # noqa: E731
                                f" [{b(key + '_lo'):.2f}, {b(key + '_hi'):.2f}]")
            mark = " (headline)" if name == a["headline_band"] else ""
            rows.append((f"{name} band k={b('k')}{mark}",
                         f"energy ratio {b('energy_ratio'):.2f}{span('energy_ratio')}, "
                         f"max |ratio - 1| {b('max_deviation'):.2f}{span('max_deviation')}"
                         + (lone if nil else "")
                         # past the truth's cut its energies are its numerical noise floor
                         + ("; past the truth's resolved scales, where its energy is near "
                            "zero: not part of the headline" if name == "beyond" else "")))
    if intervals and "truth_block" in a:
        members = ("; the members item by item (they share their item's input)"
                   + ("; with so few items narrower than 90%" if a["items"] < 8 else "")
                   if a.get("ensemble_block", 1) > 1 else "")
        rows.append(("intervals", f"90% bootstrap, the truth in blocks of {a['truth_block']} "
                                  f"consecutive fields{members}"))
    elif intervals and a["pairing"] == "paired" and 1 < a["items"]:
        rows.append(("intervals", "90% bootstrap of the items, each with its truth"
                                  + ("; with so few items narrower than 90%"
                                     if a["items"] < 8 else "")))
    if "rank_histogram" in metrics:
        h = metrics["rank_histogram"].values
        rows.append(("rank histogram (share)", " ".join(f"{c / h.sum():.2f}" for c in h)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _scored(store, opened, ens, truth, paired: bool, **scoring) -> xr.Dataset:
    """``score`` of the open store ``ens`` (``opened``: its folder's identity before it was
    opened) against ``truth``, a store replaced or damaged under the reads said as such."""
    # numpy's warnings of NaN figures are held until a damaged store, their likely cause,
    # is ruled out: its one-line error says what they would only hint at
    with catching(record=True, long=True) as held:
        warnings.simplefilter("default")
        try:
            metrics = score(ens, truth, paired, **scoring)
        except EvaluationError:
            raise
        except OSError:  # a chunk gone under the reads: a replacement, said as one
            _check_unchanged(store, opened)
            raise
        except (RuntimeError, ValueError) as err:  # a codec's error on damaged bytes, say
            _check_unchanged(store, opened)
            check_sound(store, err)
            raise
        _check_unchanged(store, opened, record=False)  # before warnings it may have caused
        if not np.isfinite(metrics.attrs.get("ensemble_std", 0.0)):  # a NaN member read back
            check_sound(store, None)
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return metrics


def _note(metrics: xr.Dataset, store, truth_path, ens, truth, paired: bool, coarse) -> None:
    """What ``metrics`` record of where they came from, and what a reader should know: a
    truth far from the coarse input it should match (``coarse``, where a baseline was made),
    a conditioned ensemble scored unpaired."""
    # as given (the "truth" text joins its variable, as before), and absolute with the variable
    # apart, for a reader of metrics.json in another folder (a workflow's next step)
    metrics.attrs.update(store=str(store), truth=f"{truth_path}:{truth.name}",
                         store_path=os.path.abspath(store),
                         truth_path=os.path.abspath(truth_path), truth_variable=str(truth.name))
    if coarse is not None:
        off = input_mismatch(truth, coarse)
        if off > INPUT_MISMATCH:
            metrics.attrs["truth_note"] = (
                f"the truth's block averages are {off:.0%} (rms) off the coarse input the "
                "ensemble was conditioned on: is it the trajectory that input was made from?")
    item_dim = ens[ensemble_variable(ens)].dims[0]
    if not paired and item_dim != "item":  # a conditioned ensemble: pairing may have been meant
        metrics.attrs["pairing_note"] = f"the truth has no {item_dim} dim to pair by"


def evaluate(store: str | Path, truth_path: str | Path, *, truth_variable: str | None = None,
             truth_range: tuple[str, str] | None = None, kmax: int | None = None,
             cut: int | None = None, out: str | Path | None = None, figures: bool = True,
             progress=None) -> tuple[xr.Dataset, list[Path]]:
    """Score ``store`` against the truth and save metrics.json, metrics.nc and the PNG figures
    in ``out`` (default: next to the store, ``<store>_eval``); returns (metrics, files).
    ``cut``: the finest wavenumber the truth resolves (default: its ``resolved_wavenumber``
    attribute, which piadm generate-data writes, else all). ``figures=False``: the scores
    alone, without the PNGs (drawing them takes most of a small store's evaluation)."""
    _check_wavenumbers(cut, kmax)
    truth_range = _checked_range(truth_range)
    opened = folder_identity(store)  # before it is opened: a replacement meanwhile is told after
    ens = without_channel(open_ensemble(store))  # the store's own problem said first
    folder = output_folder(store, out)
    check_shell("--kmax", kmax, ens)
    check_shell("--cut", cut, ens)
    truth, paired = open_truth(truth_path, truth_variable or ensemble_variable(ens), ens,
                               truth_range)
    coarse = coarse_input(ens)
    baseline = upsampled(coarse, ens) if paired and coarse is not None else None
    if cut is None and "resolved_wavenumber" in truth.attrs:
        cut = int(truth.attrs["resolved_wavenumber"])
    if cut is not None and coarse is not None and cut <= coarse.shape[-1] // 2:
        raise EvaluationError(f"--cut {cut} is within the scales the coarse input resolves (k <= "
                              f"{coarse.shape[-1] // 2}), which would leave no band the model "
                              "adds: give the truth's finest resolved wavenumber")
    metrics = _scored(store, opened, ens, truth, paired, kmax=kmax, baseline=baseline,
                      cut=cut, input_n=None if coarse is None else coarse.shape[-1],
                      progress=progress)
    _note(metrics, store, truth_path, ens, truth, paired, coarse if baseline is not None else None)
    with naming(folder):  # matplotlib's and scipy's writes on a full disk name no file
        try:
            return metrics, save(metrics, folder, ens, truth, paired, baseline, figures,
                                 check=lambda: _check_unchanged(store, opened))
        except EvaluationError:
            raise
        except (OSError, RuntimeError, ValueError):  # a figure's read of a store replaced
            _check_unchanged(store, opened)
            raise


def _check_unchanged(store, opened: tuple[int, int] | None, record: bool = True) -> None:
    """Refuse the scores of ``store`` where another run replaced it while they were read (its
    lazy reads then went to the new store, half written: n/a figures said as a result), or,
    with ``record``, its record no longer holds every member done (a read of the whole
    ``done`` array: once, as the files are put in place)."""
    if folder_identity(store) == opened and (not record or done_members(store).all()):
        return
    raise EvaluationError(f"store {store} was replaced or changed by another run while it was "
                          "evaluated (its scores would mix two stores): evaluate it again once "
                          "that run is done (piadm status shows it)")


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


def _checked_range(truth_range) -> tuple[str, str] | None:
    """``truth_range`` as two label texts, or EvaluationError where it is not a pair of
    labels (the API passes what a script has: a string would be taken letter by letter)."""
    if truth_range is None:
        return None
    pair = isinstance(truth_range, (list, tuple)) and len(truth_range) == 2
    if not pair or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                           for v in truth_range):
        raise EvaluationError(f"--truth-range {truth_range!r}: give two labels, the first and "
                              "the last field's (e.g. ('2020-01-01', '2020-01-31'))")
    return tuple(str(v) for v in truth_range)
