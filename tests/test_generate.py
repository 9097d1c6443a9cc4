"""``piadm generate-data``: a Kolmogorov-flow dataset in Zarr, CF-described, deterministic."""
import numpy as np
import xarray as xr

from pipeline.cli import main

SMALL = ["data.resolution=16", "data.spinup=2.0", "data.interval=0.25", "data.snapshots=6",
         "data.chunk=4", "data.coarse_factor=4"]


def _run(path, *extra):
    sets = sum((["--set", s] for s in SMALL + [f"data.path={path}", *extra]), [])
    return main(["generate-data", "jobs/configs/kolmogorov.toml", *sets])


def test_dataset_layout_attributes_and_coarse_copy(tmp_path):
    assert _run(tmp_path / "k.zarr") == 0
    ds = xr.open_zarr(tmp_path / "k.zarr")
    assert ds.vorticity.dims == ("time", "y", "x") and ds.vorticity.shape == (6, 16, 16)
    assert ds.vorticity_coarse.shape == (6, 4, 4)
    assert np.allclose(ds.time.values, 2.0 + 0.25 * np.arange(1, 7))
    assert ds.attrs["Conventions"].startswith("CF") and ds.vorticity.attrs["units"] == "1"
    w = ds.vorticity.values
    coarse = w.reshape(6, 4, 4, 4, 4).mean((2, 4))
    assert np.allclose(ds.vorticity_coarse.values, coarse, atol=1e-5)
    assert np.isfinite(w).all() and w.std() > 0.1 and not np.allclose(w[0], w[-1])


def test_same_seed_same_data_other_seed_other_data(tmp_path, capsys):
    assert _run(tmp_path / "a.zarr") == 0 and _run(tmp_path / "b.zarr") == 0
    assert _run(tmp_path / "c.zarr", "data.seed=1") == 0
    a, b, c = (xr.open_zarr(tmp_path / f"{n}.zarr").vorticity.values for n in "abc")
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert _run(tmp_path / "a.zarr") == 2  # exists: refused
    assert "data.overwrite" in capsys.readouterr().err
