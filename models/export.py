"""Export the EMA weights of a training checkpoint for shipping:

    python -m models.export SRC DST [--data ZARR]

The result holds only the EMA state (a few MB) and the JSON sidecar, and loads with
``torch.load(weights_only=True)`` like any piadm checkpoint. ``--data`` (re)computes S, the
data-covariance bound pc-window uses (``models.bound``), on the training split of ZARR (the
times before the sidecar's ``train.validation`` fraction), and records the data's grid
(``models.grid``) and a conditional model's coarse-field shape and grid, for checkpoints
trained before they were recorded; SRC may be DST."""
from __future__ import annotations

import argparse
import json
import math
import tomllib
from pathlib import Path

import torch

from models.checkpoint import save_checkpoint, save_sidecar, units_problem
from models.fingerprint import data_probe, same_probe
from pipeline.errors import PiadmError


def data_bound(meta: dict, data: str | Path) -> float:
    """S of what the checkpoint was trained on, in its normalised units: the training split of
    ``data`` and every time of the train.extra stores its config records (those still at
    their paths), and never less than the S its sidecar records (a bound over more data)."""
    import xarray as xr

    from models.bound import largest_mode_power

    train = tomllib.loads(meta.get("config", "")).get("train", {})
    fields = xr.open_zarr(data, consolidated=False)[meta["variable"]]
    cut = int(round(fields.sizes["time"] * (1 - train.get("validation", 0.2))))
    extras = meta.get("extra") or train.get("extra", [])  # absolute where the sidecar has them
    parts = [fields[:cut]] + [xr.open_zarr(extra, consolidated=False)[meta["variable"]]
                              for extra in extras if Path(extra).is_dir()]
    chunks = (part[a : a + 256].values for part in parts
              for a in range(0, part.sizes["time"], 256))
    found = largest_mode_power(chunks, meta["mean"], meta["std"])
    if not math.isfinite(found):  # max() would keep a NaN, and S would make pc-window's path NaN
        raise ExportError(f"--data {data}: {meta['variable']} has NaN/Inf in the training split "
                          "(a generate-data run stopped part way leaves its unwritten snapshots "
                          "NaN): give the model's finished training data")
    return max(found, float(meta.get("data_bound", 0.0)))


class ExportError(PiadmError, ValueError):
    """What is wrong with an export's arguments, in one line."""


def _source(src: Path) -> dict:
    """The sidecar of training checkpoint ``src``; raises ExportError when there is none."""
    if not src.is_file():
        raise ExportError(f"{src} is not a file: give a piadm train checkpoint")
    try:
        return json.loads(Path(f"{src}.json").read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{src} has no readable sidecar {src.name}.json ({type(err).__name__}): "
                          "piadm train writes both; copy the .json beside it") from None


def _fields(data: str | Path, meta: dict, src: Path):
    """The dataset ``data`` after checking it holds the checkpoint's variables on its grid."""
    import xarray as xr

    try:
        ds = xr.open_zarr(data, consolidated=False)
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"--data {data} is not a readable Zarr store ({type(err).__name__}): "
                          "give the model's training data") from None
    for name in filter(None, (meta["variable"], meta.get("condition"))):
        if name not in ds.data_vars:
            raise ExportError(f"--data {data} has no variable {name!r}, which {src} was trained "
                              "on: give the model's training data")
    shape = list(ds[meta["variable"]].shape[1:])
    if shape != list(meta["shape"]):
        raise ExportError(f"--data {data}: its {meta['variable']} fields are {shape} but {src} "
                          f"was trained on {list(meta['shape'])}: give the model's training data")
    recorded = meta.get("data_probe")  # a checkpoint trained before it was recorded: unchecked
    if recorded and not same_probe(recorded, data_probe(ds[meta["variable"]])):
        raise ExportError(f"--data {data} holds other {meta['variable']} fields than {src} was "
                          f"trained on (its first and last differ from those its train.data "
                          f"{meta.get('data', '')} held): give the model's training data")
    return ds


def _holds_training_state(path: Path) -> bool:
    """Whether the piadm checkpoint at ``path`` is a training run's (optimiser state beside
    the weights), not an export; an unreadable one is not (it is replaced as before)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged or not torch: nothing to keep that resuming could use
        return False
    return isinstance(state, dict) and "opt" in state


def export(src: str | Path, dst: str | Path, data: str | Path | None = None) -> dict:
    """Copy the EMA weights of ``src`` and its sidecar to ``dst`` (with S from ``data`` when
    given); returns the sidecar written. Raises ExportError before writing anything when an
    argument does not fit: ``dst`` is replaced only when it is ``src`` or a piadm checkpoint."""
    src, dst = Path(src), Path(dst)
    meta = _source(src)
    in_place = dst.exists() and src.resolve() == dst.resolve()
    if dst.exists() and not in_place and not Path(f"{dst}.json").is_file():
        raise ExportError(f"{dst} exists and is not a piadm checkpoint (no {dst.name}.json "
                          "beside it): choose another destination, or move it away")
    if dst.exists() and not in_place and _holds_training_state(dst):
        raise ExportError(f"{dst} holds a training run (its optimiser state and history, which "
                          "resuming needs; an export keeps the EMA weights alone): exporting "
                          "over it would lose them; choose another destination (the order is "
                          "SRC DST)")
    if data is not None:
        from models.grid import grid_of

        ds = _fields(data, meta, src)
        meta["data_bound"] = data_bound(meta, data)
        meta["grid"] = grid_of(ds[meta["variable"]])
        if meta.get("condition"):
            meta["cond_shape"] = list(ds[meta["condition"]].shape[1:])
            meta["cond_grid"] = grid_of(ds[meta["condition"]])  # as piadm train records it
    state = None
    if not in_place:  # in place: only the sidecar changes
        try:
            state = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as err:  # damaged, pickled objects, not torch at all
            raise ExportError(f"{src} is not a readable piadm checkpoint "
                              f"({type(err).__name__}): give a piadm train checkpoint") from None
        if not isinstance(state, dict) or "ema" not in state:
            raise ExportError(f"{src} holds no EMA weights: give a piadm train checkpoint")
        problem = units_problem(src, state, meta)  # else the copy would carry them as agreeing
        if problem:
            raise ExportError(problem)
    if state is None:  # in place: the sidecar alone
        save_sidecar(dst, meta)
    else:  # as piadm train saves: each file atomically, the sidecar first
        step = int(state.get("step", meta.get("step", 0)))
        if meta.get("step") != step:  # a save cut short: the sidecar's figures are a later one's
            meta = {**meta, "step": step, "val_loss": None}
        save_checkpoint(dst, {"ema": state["ema"], "step": step}, meta)
    return meta


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m models.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("src", help="a piadm train checkpoint (or a shipped one)")
    parser.add_argument("dst", help="where the shipped checkpoint goes")
    parser.add_argument("--data", help="the training data, to record S (models.bound), its "
                        "grid and a conditional model's coarse-field shape")
    args = parser.parse_args()
    try:
        meta = export(args.src, args.dst, args.data)
    except ExportError as err:
        print(f"python -m models.export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.dst} (data_bound {meta.get('data_bound', 'not recorded')})")
