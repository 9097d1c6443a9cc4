"""Quality of a learned model's samples: the log-spectral distance of an ensemble to held-out
data (docs/algorithms.md section 7).

A trained network has no exact law to compare with; what its samples should reproduce is the
data's spectrum. The distance of an ensemble's mean radial spectrum E(k) (kinetic energy for
vorticity, power otherwise) to the held-out data's T(k) is the root mean square over the
resolved shells k = 1 .. K of ln(E(k) / T(k)): near 0 for the data's spectrum (an ensemble of
the data's own law scores its sampling floor, ``sampling_floor``), about 0.1 for 10% off at
every scale, and every scale counts alike whatever energy it carries. Its sampling
uncertainty is a bootstrap over the ensemble's members (one by one: independent draws) and the
data's fields (in blocks of consecutive times, ``pipeline.bands.correlation_block``: a
trajectory's neighbouring times are correlated), resampled independently. The held-out data are the last ``train.validation`` share of ``train.data``'s
times, which training never saw, in the model's normalised units.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.checkpoint import sidecar
from pipeline.bands import DRAWS, EMPTY, block_picks, correlation_block, interval
from pipeline.config import ConfigError
from pipeline.settings import Config, TrainConfig


@dataclass(frozen=True)
class HeldOut:
    """Per-field spectra (T, K) of the held-out data over the shells k = 1 .. K."""

    spectra: np.ndarray
    variable: str

    @property
    def kmax(self) -> int:
        """The highest wavenumber shell the held-out spectra reach."""
        return self.spectra.shape[1]

    def spectra_of(self, fields: np.ndarray) -> np.ndarray:
        """The spectra (M, K) of fields (M, H, W) in the model's units, as the data's."""
        return shell_spectra(fields, self.variable, self.kmax)


def shell_spectra(fields: np.ndarray, variable: str, kmax: int) -> np.ndarray:
    """Per-field radial spectra (M, kmax) of fields (M, H, W) over k = 1 .. kmax: kinetic
    energy for vorticity, power otherwise (``pipeline.scoring.spectra_of``)."""
    from pipeline.scoring import spectra_of

    return spectra_of(variable)(np.asarray(fields, dtype=np.float64))[1][:, :kmax]


def log_spectral_distance(ens: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RMS over shells of ln(mean ens / mean truth): spectra (..., M, K) and (..., T, K) give
    (...,); the leading dims are bootstrap draws when present."""
    ratio = ens.mean(-2) / truth.mean(-2)
    return np.sqrt(np.mean(np.log(ratio) ** 2, -1))


def _held_shells(ens: np.ndarray, held: HeldOut) -> tuple[np.ndarray, HeldOut]:
    """The spectra ``ens`` (M, K) and ``held`` on the shells the held-out data fill: one they
    leave empty (a band-limited field) would make ln(E / 0), as ``pipeline.bands`` leaves
    such shells out of its ratios."""
    mean = held.spectra.mean(0)
    kept = mean > EMPTY * mean.max()
    return ens[:, kept], dataclasses.replace(held, spectra=held.spectra[:, kept])


def _resampled(ens: np.ndarray, held: HeldOut, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws (DRAWS, M, K) of the members and (DRAWS, T, K) of the held-out fields,
    the fields in blocks of consecutive times."""
    rng = np.random.default_rng(seed)
    m, t = len(ens), len(held.spectra)
    pick_e = rng.integers(0, m, (DRAWS, m))
    pick_t = block_picks(rng, t, DRAWS, correlation_block(held.spectra))
    return ens[pick_e], held.spectra[pick_t]


def spectrum_error(ens: np.ndarray, held: HeldOut, *, seed: int = 0
                   ) -> tuple[float, float, float]:
    """(log-spectral distance of the ensemble spectra ``ens`` (M, K) to ``held``, and bounds
    from each shell's central ``LEVEL`` bootstrap interval of ln(E(k) / T(k)), the held-out
    times resampled in blocks: the RMS over shells of the nearest each interval comes to 0,
    and of the farthest it reaches).

    Not the bootstrap's own interval of the distance: resampled, every shell's log ratio
    scatters away from 0, and squared, the scatter only adds, so that interval sits above the
    estimate (an ensemble of the data's own law: 0.038, its interval [0.038, 0.074]) and held
    a true distance of 0.095 less than half the time. The shells' intervals hold it, as the
    bands' largest deviation is held (``bands.deviation_bounds``)."""
    ens, held = _held_shells(ens, held)
    ens_draws, held_draws = _resampled(ens, held, seed)
    lo, hi = interval(np.log(ens_draws.mean(-2) / held_draws.mean(-2)))  # (K,) each
    nearest = np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))
    farthest = np.maximum(np.abs(lo), np.abs(hi))
    rms = lambda v: float(np.sqrt(np.mean(v ** 2)))  # noqa: E731
    return float(log_spectral_distance(ens, held.spectra)), rms(nearest), rms(farthest)


def sampling_floor(ens: np.ndarray, held: HeldOut, *, seed: int = 0) -> float:
    """The distance an ensemble of the data's own law would score with as many members and
    held-out fields, about: the RMS over shells of the bootstrap standard deviation of
    ln(E(k) / T(k)). Squared, each shell's sampling noise adds to the distance rather than
    averaging out, so no finite ensemble scores 0."""
    ens_draws, held_draws = _resampled(*_held_shells(ens, held), seed)
    logs = np.log(ens_draws.mean(-2) / held_draws.mean(-2))  # (DRAWS, K)
    return float(np.sqrt(np.mean(logs.var(0))))


def as_trained(cfg: Config) -> TrainConfig:
    """``cfg.train`` with the split its learned model was trained on, as the checkpoint's
    sidecar records it (train.validation, train.variable and train.condition, and
    train.data where that path is found from here): a config's own split could hold times
    the model trained on, and its spectra would flatter it."""
    t = cfg.train
    if cfg.model.kind != "unet" or not cfg.model.checkpoint:
        return t
    try:
        meta = json.loads(sidecar(Path(cfg.model.checkpoint)).read_text())
    except (OSError, ValueError):
        return t
    kept = {key: meta[key] for key in ("validation", "variable") if meta.get(key)}
    if meta.get("condition"):
        kept["condition"] = meta["condition"]
    if meta.get("data") and Path(meta["data"]).exists():
        kept["data"] = meta["data"]
    return dataclasses.replace(t, **kept)


def held_out(train: TrainConfig, mean: float, std: float, shape: tuple[int, ...]) -> HeldOut:
    """The held-out split of ``train.data`` (its ``train.variable``), normalised by the
    model's (mean, std), as spectra over k = 1 .. its ``resolved_wavenumber`` attribute (n / 2
    without one). Raises ConfigError when the data is missing or does not fit the model."""
    values, kmax = held_out_fields(train, mean, std, shape)
    return HeldOut(shell_spectra(values, train.variable, kmax), train.variable)


def held_out_fields(train: TrainConfig, mean: float, std: float, shape: tuple[int, ...]
                    ) -> tuple[np.ndarray, int]:
    """The held-out fields (T, H, W) of ``train.data`` in the model's units, and the largest
    resolved shell K (``held_out``)."""
    fields = _held_out_split(train, train.variable)
    if tuple(fields.shape[1:]) != tuple(shape) or len(shape) != 2 or shape[0] != shape[1]:
        raise ConfigError(f"{train.data} holds {tuple(fields.shape[1:])} fields, the model "
                          f"samples {tuple(shape)}; spectra need square 2-D fields of the "
                          "model's shape", collective=True)
    kmax = int(fields.attrs.get("resolved_wavenumber", shape[-1] // 2))
    return (fields.values.astype(np.float64) - mean) / std, kmax


def held_out_coarse(train: TrainConfig, mean: float, std: float) -> np.ndarray:
    """The coarse fields (T, h, w) a downscaler is given (``train.condition``) at the held-out
    times of ``held_out_fields``, normalised as the fine fields are."""
    return (_held_out_split(train, train.condition).values.astype(np.float64) - mean) / std


def _held_out_split(train: TrainConfig, name: str):
    """Variable ``name`` of ``train.data`` at its held-out times (lazy); raises ConfigError
    when the data or the variable is missing."""
    from pipeline.store import open_store
    from pipeline.train_data import held_out_start

    if not Path(train.data).exists():
        raise ConfigError(f"comparing a learned model's samples with held-out data needs "
                          f"train.data, and {train.data} does not exist (run piadm "
                          "generate-data on the model's config first)", collective=True)
    ds = open_store(train.data, consolidated=False)
    if name not in ds.data_vars:
        raise ConfigError(f"{name!r} (train.variable or train.condition) is not in "
                          f"{train.data}: it has {', '.join(map(str, ds.data_vars))}",
                          collective=True)
    fields = ds[name]
    return fields[held_out_start(fields.sizes[fields.dims[0]], train.validation):]
