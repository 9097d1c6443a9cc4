"""Export the EMA weights of a training checkpoint for shipping:

    python -m models.export SRC DST [--data ZARR]

The result holds only the EMA state (a few MB) and the JSON sidecar, and loads with
``torch.load(weights_only=True)`` like any piadm checkpoint. ``--data`` (re)computes S, the
data-covariance bound pc-window uses (``models.bound``), on the training split of ZARR (the
times before the sidecar's ``train.validation`` fraction), and records the data's grid
(``models.grid``) and a conditional model's coarse-field shape, for checkpoints trained before
they were recorded; SRC may be DST."""
from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import torch


def data_bound(meta: dict, data: str | Path) -> float:
    """S of the checkpoint's training split of ``data``, in the checkpoint's normalised units."""
    import xarray as xr

    from models.bound import largest_mode_power

    train = tomllib.loads(meta.get("config", "")).get("train", {})
    fields = xr.open_zarr(data)[meta["variable"]]
    cut = int(round(fields.sizes["time"] * (1 - train.get("validation", 0.2))))
    chunks = (fields[a : min(a + 256, cut)].values for a in range(0, cut, 256))
    return largest_mode_power(chunks, meta["mean"], meta["std"])


def export(src: str | Path, dst: str | Path, data: str | Path | None = None) -> dict:
    """Copy the EMA weights of ``src`` and its sidecar to ``dst`` (with S from ``data`` when
    given); returns the sidecar written."""
    src, dst = Path(src), Path(dst)
    meta = json.loads(Path(str(src) + ".json").read_text())
    if data is not None:
        import xarray as xr

        from models.grid import grid_of

        meta["data_bound"] = data_bound(meta, data)
        ds = xr.open_zarr(data)
        meta["grid"] = grid_of(ds[meta["variable"]])
        if meta.get("condition"):
            meta["cond_shape"] = list(ds[meta["condition"]].shape[1:])
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dst.resolve():  # in place: only the sidecar changes
        state = torch.load(src, map_location="cpu", weights_only=True)
        torch.save({"ema": state["ema"], "step": state["step"]}, dst)
    Path(str(dst) + ".json").write_text(json.dumps(meta, indent=2))
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m models.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("src", help="a piadm train checkpoint (or a shipped one)")
    parser.add_argument("dst", help="where the shipped checkpoint goes")
    parser.add_argument("--data", help="the training data, to record S (models.bound)")
    args = parser.parse_args()
    meta = export(args.src, args.dst, args.data)
    print(f"wrote {args.dst} (data_bound {meta.get('data_bound', 'not recorded')})")
