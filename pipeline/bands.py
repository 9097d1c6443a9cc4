"""Spectral bands of an ensemble's spectrum, and their figures with bootstrap uncertainty.

A downscaling model is told the scales its coarse input resolves (k up to the input's Nyquist
wavenumber) and must add the rest, up to the finest scale the truth resolves (its dealiasing
cut); past the cut the truth holds little (a square dealiasing keeps the corner modes, whose
round shells lie past it), so the ensemble's energy there is mostly the sampler's noise or the
network's artefact. The figures are therefore reported per band, not over one k range.

Spectra come per unit: for a paired (downscaling) evaluation one spectrum per item for the
ensemble (its members' mean) and one for the truth, resampled together; for a climatological
one every ensemble field and every truth field, resampled independently: the members one by
one (they are independent draws), the truth in blocks of consecutive fields
(``correlation_block``). Consecutive times of a trajectory are correlated, and resampled one by
one they would claim the record holds far more independent fields than it does (the Kolmogorov
flow's held-out 320 times: 2% relative spread of the k = 2 energy, against 11% between
stretches of the same length of another trajectory; in blocks of 36, 8%).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.warned import catching

DRAWS = 1000  # bootstrap resamples: the interval's ends move by < 1% of its width at this size
LEVEL = 0.9  # central interval reported
# Shells whose truth holds less than this share of its largest shell's energy are empty: the
# round-off of a dealiased field (float32 leaves about 1e-14), not a scale to compare.
EMPTY = 1e-9
# a truth block spans this many of its slowest shell's e-folding times: long enough that blocks
# are nearly independent of each other
BLOCK_EFOLDS = 4


@dataclass(frozen=True)
class Band:
    """Shells k = kmin .. kmax (inclusive) under one name: input, added, resolved, beyond."""

    name: str
    kmin: int
    kmax: int

    @property
    def label(self) -> str:
        """The band as a table shows it: ``name k=kmin..kmax``."""
        return f"{self.name} k={self.kmin}..{self.kmax}"


def spectral_bands(n: int, *, cut: int | None = None, input_n: int | None = None) -> list[Band]:
    """The bands of an n x n field whose truth resolves k <= ``cut`` (default n / 2: all):
    with a conditioning input of ``input_n`` points per side, the scales it resolves (k <=
    input_n / 2, "input") and those the model adds ("added"); without one, "resolved"; then
    "beyond" the cut when the grid has shells past it."""
    top = n // 2
    cut = top if cut is None else min(cut, top)
    if input_n:
        nyquist = min(input_n // 2, cut)
        bands = [Band("input", 1, nyquist)]
        if nyquist < cut:
            bands.append(Band("added", nyquist + 1, cut))
    else:
        bands = [Band("resolved", 1, cut)]
    if cut < top:
        bands.append(Band("beyond", cut + 1, top))
    return bands


def interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The central ``LEVEL`` interval of bootstrap ``draws`` (DRAWS, ...) along the first
    axis, NaN where every draw is."""
    tail = 100 * (1 - LEVEL) / 2
    with catching():  # shells the truth leaves empty stay NaN, as intended
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(draws, tail, axis=0), np.nanpercentile(draws, 100 - tail, axis=0)


def correlation_block(series: np.ndarray) -> int:
    """Block length for resampling the rows of ``series`` (M, K), consecutive in time:
    ``BLOCK_EFOLDS`` times the longest lag at which any column's autocorrelation first falls
    below 1/e, between 1 and M // 4 (so that a resample still mixes several blocks)."""
    m = series.shape[0]
    if m < 8:
        return 1
    x = series - series.mean(0)
    var = (x ** 2).sum(0)
    x = x[:, var > EMPTY * var.max()] if var.max() > 0 else x[:, :0]
    if x.shape[1] == 0:
        return 1
    f = np.fft.rfft(x, n=2 * m, axis=0)  # zero-padded: the linear, not circular, correlation
    acf = np.fft.irfft(np.abs(f) ** 2, axis=0)[: m // 2] / (x ** 2).sum(0)
    below = acf < np.exp(-1)
    lags = np.where(below.any(0), below.argmax(0), m // 2)
    return int(min(max(1, m // 4), max(1, BLOCK_EFOLDS * lags.max())))


def block_picks(rng: np.random.Generator, n: int, draws: int, block: int) -> np.ndarray:
    """Row indices (draws, n) of bootstrap resamples of n rows, in circular blocks of
    ``block`` consecutive rows (1: row by row)."""
    if block <= 1:
        return rng.integers(0, n, (draws, n))
    starts = rng.integers(0, n, (draws, -(-n // block)))
    return ((starts[:, :, None] + np.arange(block)) % n).reshape(draws, -1)[:, :n]


def _figures(ens: np.ndarray, truth: np.ndarray, bands: list[Band]) -> np.ndarray:
    """Per band (energy ratio, max |ratio - 1| over its shells) of mean spectra ens (..., K)
    and truth (..., K): (..., bands, 2). Shells where the truth is empty are left out."""
    out = np.full((*ens.shape[:-1], len(bands), 2), np.nan)
    floor = EMPTY * truth.max(-1, keepdims=True)
    for i, b in enumerate(bands):
        sl = slice(b.kmin - 1, b.kmax)
        e, t = ens[..., sl], truth[..., sl]
        held = t > floor
        with np.errstate(divide="ignore", invalid="ignore"), catching():
            warnings.simplefilter("ignore", RuntimeWarning)  # a band the truth leaves empty
            out[..., i, 0] = np.where(held, e, 0).sum(-1) / np.where(held, t, 0).sum(-1)
            out[..., i, 1] = np.nanmax(np.where(held, np.abs(e / t - 1), np.nan), axis=-1)
    return out


def deviation_bounds(ratio: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                     bands: list[Band]) -> np.ndarray:
    """Per band (max |ratio - 1| over its shells, the nearest any shell's interval [lo, hi]
    comes to 1, the farthest it reaches): (bands, 3), from the per-shell ratio and interval
    (K,) each, NaN where the truth is empty.

    Not the bootstrap's own interval of the maximum: resampled, every shell's ratio scatters
    away from 1 and the largest of the scattered ones always grows, so that interval sits above
    the estimate (an ensemble against itself: 0.00, its interval [0.10, 0.34]). The shells'
    own intervals hold the figure: the largest deviation is at least what the shell farthest
    from 1 certainly has, and at most what any shell's interval allows."""
    out = np.full((len(bands), 3), np.nan)
    with catching():  # a band the truth leaves empty stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, b in enumerate(bands):
            sl = slice(b.kmin - 1, b.kmax)
            r, a, z = ratio[sl], lo[sl], hi[sl]
            point = np.nanmax(np.abs(r - 1))
            nearest = np.nanmax(np.maximum(np.maximum(a - 1, 1 - z), 0.0))
            farthest = np.nanmax(np.maximum(np.abs(a - 1), np.abs(z - 1)))
            out[i] = point, min(nearest, point), max(farthest, point)
    return out


@dataclass(frozen=True)
class BandFigures:
    """The per-k ratio with its interval ((K,) each) and, per band, the energy ratio with its
    interval and the largest per-shell deviation |ratio - 1| with its bounds
    (``deviation_bounds``)."""

    bands: list[Band]
    ratio: np.ndarray
    ratio_lo: np.ndarray
    ratio_hi: np.ndarray
    energy_ratio: np.ndarray  # (bands, 3): value, lo, hi
    max_deviation: np.ndarray  # (bands, 3)

    def attrs(self) -> dict:
        """Flat attributes band_<name>_<figure> for a metrics dataset."""
        out = {"bands": ",".join(b.name for b in self.bands)}
        for i, b in enumerate(self.bands):
            out[f"band_{b.name}_k"] = f"{b.kmin}..{b.kmax}"
            for key, values in (("energy_ratio", self.energy_ratio[i]),
                                ("max_deviation", self.max_deviation[i])):
                for suffix, v in zip(("", "_lo", "_hi"), values):
                    out[f"band_{b.name}_{key}{suffix}"] = float(v)
        return out


GATHER_BYTES = 32 * 2**20  # a block of resamples gathered at once (all at once: 1.4 GB)


def _resampled_means(rows: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """The means (draws, K) of ``rows`` (N, K) over each resample's ``picks`` (draws, n), a
    block of resamples at a time: each row's sum the same as gathered whole."""
    step = max(1, GATHER_BYTES // max(1, picks.shape[1] * rows[0].nbytes))
    return np.concatenate([rows[picks[i:i + step]].mean(1)
                           for i in range(0, len(picks), step)])


def band_figures(ens: np.ndarray, truth: np.ndarray, bands: list[Band], *, paired: bool,
                 draws: int = DRAWS, seed: int = 0, block: int = 1,
                 ens_block: int = 1) -> BandFigures:
    """Band figures of spectra ens (N, K) against truth (M, K); ``paired`` (then N == M)
    resamples the rows of both together, else each on its own, the truth's in circular blocks
    of ``block`` consecutive rows, the ensemble's in whole blocks of ``ens_block`` (the
    members of one item, which share its input: resampled one by one they would pass for
    independent draws, and for 16 items of 4 the interval held the truth in 62 to 68% of
    tries, by item 83 to 90%; few items bootstrap poorly either way). With a single row or
    block of the ensemble there is nothing of its own variability to resample: no interval
    (NaN). Deterministic in ``seed``."""
    if paired and ens.shape[0] != truth.shape[0]:
        raise ValueError(f"paired spectra need as many rows: {ens.shape[0]} and {truth.shape[0]}")
    rng = np.random.default_rng(seed)
    e_mean, t_mean = ens.mean(0), truth.mean(0)
    if ens_block > 1:
        units = rng.integers(0, ens.shape[0] // ens_block, (draws, ens.shape[0] // ens_block))
        pick_e = (units[:, :, None] * ens_block + np.arange(ens_block)).reshape(draws, -1)
    else:
        pick_e = rng.integers(0, ens.shape[0], (draws, ens.shape[0]))
    pick_t = pick_e if paired else block_picks(rng, truth.shape[0], draws, block)
    e_draws, t_draws = _resampled_means(ens, pick_e), _resampled_means(truth, pick_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(t_mean > EMPTY * t_mean.max(), e_mean / t_mean, np.nan)
        ratio_draws = np.where(t_draws > EMPTY * t_draws.max(-1, keepdims=True),
                               e_draws / t_draws, np.nan)
    lo, hi = interval(ratio_draws)
    point, spread = _figures(e_mean, t_mean, bands), _figures(e_draws, t_draws, bands)
    flo, fhi = interval(spread)
    if ens.shape[0] // ens_block < 2:  # one member (or one item's, or one paired item): every
        # draw is that one, and an interval of the truth's spread alone would pass for one of
        # the ensemble's (1-member stores of the exact model: 3 of 4 excluded their ratio 1)
        lo, hi, flo, fhi = (np.full_like(v, np.nan) for v in (lo, hi, flo, fhi))
    energy = np.stack([point[:, 0], flo[:, 0], fhi[:, 0]], axis=1)
    deviation = deviation_bounds(ratio, lo, hi, bands)
    if not np.isfinite(lo).any():  # no interval (above): none of its bounds either
        deviation[:, 1:] = np.nan
    return BandFigures(bands, ratio, lo, hi, energy, deviation)
