"""Trained U-Net checkpoints (``pipeline.train``) as score models on the OU clock."""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from models.adapters import NetworkAdapter
from models.conditioning import MeanShift, spectral_upsample, upsample_blocks
from models.guidance import Guided
from pipeline.clock import VE


def unet_score_model(den, shape: tuple[int, ...], cond: torch.Tensor | None = None) -> NetworkAdapter:
    """The score of EDM denoiser ``den`` (x0 prediction in the VE convention) on fields of
    ``shape``, in the normalised units it was trained in; ``cond`` (1, H, W) binds a
    conditioning field for every call."""

    @torch.no_grad()
    def net(x_native: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c = None if cond is None else cond[None].expand(x_native.shape[0], *cond.shape)
        return den(x_native.float(), sigma.float(), c).to(x_native.dtype)

    return NetworkAdapter(net, VE(), "x0", tuple(shape))


@dataclass(frozen=True)
class LearnedUNet:
    """A trained denoiser as a score model (``models.contract``) in the normalised units it
    was trained in: data = ``data_mean`` + ``data_std`` * model units. ``cond`` (1, H, W) is
    the bound conditioning field, already upsampled and normalised. A ``residual`` model
    learned the field minus the smooth upsampling of its coarse field: bound, it is that
    upsampling plus the learned remainder (an exact shift, ``MeanShift``)."""

    den: object
    shape: tuple[int, ...]
    data_mean: float
    data_std: float
    cond_channels: int
    variable: str = "field"  # the dataset variable it was trained on
    cond: torch.Tensor | None = None
    # S: the largest mode variance of the normalised training data (pc-window); inf when the
    # checkpoint does not record it, which keeps pc-window's acceptance safe.
    data_bound: float = float("inf")
    residual: bool = False
    # the training data's grid (models.grid): coordinates and attributes for the stores
    grid: dict = field(default_factory=dict)
    # the conditioning fields' shape in training; None when the checkpoint does not record it
    cond_shape: tuple[int, ...] | None = None
    # their grid (models.grid), where the checkpoint records it (trained since 2026-12-06)
    cond_grid: dict = field(default_factory=dict)
    condition: str = ""  # the dataset variable it was conditioned on in training, if any
    _score: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        # built once per binding (replace() makes a new model for a new cond), not per call
        score = unet_score_model(self.den, self.shape, self.cond)
        if self.residual and self.cond is not None:
            score = MeanShift(score, self.cond[0])
        object.__setattr__(self, "_score", score)

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.cond_channels and self.cond is None:
            raise ValueError("this model is conditional: set model.condition = 'coarse' and an input")
        return self._score(x, u)

    def conditioned(self, coarse: torch.Tensor) -> "LearnedUNet":
        """Bind a coarse field (h, w), in model units, upsampled to the grid (smoothly for a
        residual model, by blocks otherwise: as in training). Raises ValueError for a field
        of another shape than the training's conditioning fields."""
        if self.cond_shape is not None and tuple(coarse.shape) != self.cond_shape:
            raise ValueError(f"the conditioning field is {list(coarse.shape)} but this model was "
                             f"trained on {list(self.cond_shape)}")
        up = spectral_upsample if self.residual else upsample_blocks
        return replace(self, cond=up(coarse.float(), self.shape)[None])


def _missing(checkpoint: str, key: str) -> str | None:
    """What is wrong with ``checkpoint`` (config key ``key``) as a file, in one line; None
    where it is one."""
    from pipeline.errors import from_here

    if checkpoint and os.path.isfile(checkpoint):  # Path drops a trailing "/"
        return None
    # a shipped config's path, run outside the repository (an installed wheel): the
    # shipped networks are here
    given = Path(checkpoint)
    shipped = Path(__file__).parent / "checkpoints" / given.name
    ours = given.parent == Path("models", "checkpoints") and shipped.is_file()
    where = f"; piadm's own {shipped.name} is {shipped}" if checkpoint and ours else ""
    example = "kolmogorov_uncond_guide.pt" if key == "model.guide" else "kolmogorov_uncond.pt"
    if checkpoint.endswith(("/", os.sep)) and os.path.isfile(checkpoint.rstrip("/" + os.sep)):
        return f"config: {key} = {checkpoint!r} names a file as a folder: remove the trailing '/'"
    return (f"config: {key} = {checkpoint!r} is not a file"
            f"{from_here(checkpoint) if checkpoint else ''}: point it at a piadm "
            f"train checkpoint (e.g. models/checkpoints/{example}, from the repository's "
            f"folder){where}")


def _read(checkpoint: str, key: str, device):
    """(denoiser, metadata) of a piadm train checkpoint; raises ConfigError naming config key
    ``key`` when it is missing or unreadable."""
    from models.checkpoint import load_denoiser
    from pipeline.errors import ConfigError

    said = _missing(checkpoint, key)
    if said:
        raise ConfigError(said)
    try:
        den, meta = load_denoiser(checkpoint, device)
    except ConfigError:  # it names its fix
        raise
    except FileNotFoundError as err:  # the weights without their sidecar
        raise ConfigError(f"config: {key} = {checkpoint!r} has no metadata file "
                          f"{err.filename}: piadm train writes both; copy the .json beside "
                          "the checkpoint") from None
    except (RuntimeError, ValueError, KeyError, TypeError, EOFError, OSError,
            pickle.UnpicklingError) as err:
        first = ("not a tensors-only torch file" if isinstance(err, pickle.UnpicklingError)
                 else (str(err).strip().splitlines() or [type(err).__name__])[0])
        raise ConfigError(f"config: {key} = {checkpoint!r} is not a readable piadm "
                          f"checkpoint (truncated, damaged or not one: {first[:120]}): train it "
                          "again or point at another") from None
    _check_units(meta, checkpoint, key)
    return den, meta


def _check_units(meta: dict, checkpoint: str, key: str) -> None:
    """Refuse a checkpoint whose sidecar's normalisation or data bound S is not a usable
    number (data that overflowed, or held NaN, when it was trained or exported): its members
    would come out infinite, or pc-window's path NaN, and the run would blame the network."""
    from pipeline.errors import ConfigError

    def number(name):
        try:
            return float(meta.get(name, math.inf if name == "data_bound" else math.nan))
        except (TypeError, ValueError):
            return math.nan

    def said(name, value):  # a value that is no number at all as it stands
        raw = meta.get(name, 0.0)
        return f"{name} {raw!r}" if raw is None or isinstance(raw, (str, list, dict)) else \
            f"{name} {value}"

    mean, std, bound = number("mean"), number("std"), number("data_bound")
    bad = ([said("mean", mean)] if not math.isfinite(mean) else []) \
        + ([said("std", std)] if not (math.isfinite(std) and std > 0) else []) \
        + ([said("data_bound", bound)] if not bound > 0 else [])
    if bad:
        raise ConfigError(f"config: {key} = {checkpoint!r}: its metadata holds {', '.join(bad)}, "
                          "no usable normalisation or data bound (its sidecar edited, or its "
                          "training data overflowed or held NaN/Inf): put back the sidecar "
                          "piadm wrote, train it again on finite data, or re-export it with "
                          "python -m models.export CHECKPOINT OUT --data on finite data")


def _unit_differences(meta: dict, guide_meta: dict) -> list[str]:
    """What differs between two checkpoints' training (units, task), as "key: guide's against
    the model's"; empty when they were trained in the same normalised units on the same task."""
    close = lambda a, b: abs(a - b) <= 1e-6 * max(abs(b), 1e-12)  # noqa: E731
    out = [f"{k}: {guide_meta.get(k)!r} against {meta.get(k)!r}"
           for k in ("shape", "variable", "condition", "residual")
           if guide_meta.get(k) != meta.get(k)]
    if None not in (guide_meta.get("cond_shape"), meta.get("cond_shape")):  # when recorded
        if guide_meta["cond_shape"] != meta["cond_shape"]:
            out.append(f"cond_shape: {guide_meta['cond_shape']} against {meta['cond_shape']}")
    if not (close(guide_meta["std"], meta["std"])
            and abs(guide_meta["mean"] - meta["mean"]) <= 1e-6 * meta["std"]):
        out.append(f"normalisation: mean {guide_meta['mean']:.6g} std {guide_meta['std']:.6g} "
                   f"against {meta['mean']:.6g} {meta['std']:.6g}")
    return out


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two networks hold the same parameters and buffers, name by name."""
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in ours)


def load_unet(checkpoint: str, shape: tuple[int, ...], device="cpu", guide: str = "",
              guidance: float = 1.0, condition: str | None = None) -> LearnedUNet:
    """The EMA model of ``checkpoint``, autoguided (``models.guidance``) by the weaker
    checkpoint ``guide`` with weight ``guidance`` when ``guide`` is set; raises ConfigError
    naming model.checkpoint, model.guide, model.shape or model.condition (``condition``, the
    config's; None for a caller that binds conditioning fields itself) when they do not fit."""
    from pipeline.errors import ConfigError

    both = [_missing(checkpoint, "model.checkpoint"), guide and _missing(guide, "model.guide")]
    if all(both):  # both said at once: one fix, not one a run
        raise ConfigError(f"{both[0]}; and {both[1].removeprefix('config: ')}")
    den, meta = _read(checkpoint, "model.checkpoint", device)
    if tuple(meta["shape"]) != tuple(shape):
        raise ConfigError(f"config: model.shape = {list(shape)} but {checkpoint} was trained on "
                          f"{meta['shape']}: set model.shape = {meta['shape']}")
    # found now, before a store is made: a mismatch only showed at the first model call
    if condition is not None and den.cfg.cond_channels and condition != "coarse":
        raise ConfigError(f"config: model.condition = {condition!r} but {checkpoint} was trained "
                          "on coarse conditioning fields: set model.condition = 'coarse' with "
                          "input.path and input.variable, or use an unconditional checkpoint")
    if not den.cfg.cond_channels and condition == "coarse":
        raise ConfigError(f"config: model.condition = 'coarse' but {checkpoint} was trained "
                          "without conditioning fields: set model.condition = 'none' and "
                          "input.path = '', or use a downscaling checkpoint")
    if guide:
        weak, guide_meta = _read(guide, "model.guide", device)
        differ = _unit_differences(meta, guide_meta)
        if differ:
            raise ConfigError(
                f"config: model.guide = {guide!r} was not trained on the same data as "
                f"{checkpoint} ({'; '.join(differ)}): train the guide on the same "
                "train.data and train.extra, at the same shape and conditioning")
        if _same_weights(den, weak):  # D + g (D - D) = D, at twice the calls
            raise ConfigError(
                f"config: model.guide = {guide!r} holds the same weights as {checkpoint}: "
                "guidance by itself changes nothing and doubles the model calls; give a "
                "weaker checkpoint of the same data (fewer training steps, fewer channels), "
                "or drop model.guide")
        den = Guided(den, weak, guidance)
    return LearnedUNet(den, tuple(shape), meta["mean"], meta["std"], den.cfg.cond_channels,
                       meta["variable"], data_bound=float(meta.get("data_bound", float("inf"))),
                       residual=bool(meta.get("residual", False)),
                       grid=meta.get("grid", {}),
                       cond_shape=tuple(meta["cond_shape"]) if meta.get("cond_shape") else None,
                       cond_grid=meta.get("cond_grid", {}),
                       condition=str(meta.get("condition") or ""))
