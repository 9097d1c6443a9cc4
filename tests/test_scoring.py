"""``piadm evaluate``: paired scores respond to a right and a wrong truth, the climatological
spectrum score tells a right from a rescaled truth, the outputs are written and readable, and
bad input is a one-line error."""
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline.cli import main
from tests.conftest import conditional_sets, make_input


def _sample(tmp_path, name, *extra):
    inp = tmp_path / "input.zarr"
    if not inp.exists():
        make_input(inp)
    out = tmp_path / name
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(inp, out, *extra)]) == 0
    return out


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """An ensemble conditioned on the input mean, and truths: one drawn like a member (another
    seed) and one shifted by three standard deviations."""
    tmp = tmp_path_factory.mktemp("paired")
    ens = _sample(tmp, "ens.zarr", "sampler.method=pc-window")  # a Picard residual to draw
    other = xr.open_zarr(_sample(tmp, "other.zarr", "sampler.seed=9"))
    good = other.vort.isel(member=0).drop_vars("member")
    xr.Dataset({"vort": good}).to_zarr(tmp / "truth.zarr", zarr_format=3)
    shift = 3 * float(good.std())
    xr.Dataset({"vort": good + shift}).to_zarr(tmp / "shifted.zarr", zarr_format=3)
    return tmp, ens


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_paired_scores_reward_the_right_truth(paired, capsys):
    tmp, ens = paired
    assert main(["evaluate", str(ens), "--truth", str(tmp / "truth.zarr")]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "spread/skill" in table and "CRPS" in table
    assert "items scored 6/6" in captured.err  # its pass over the items shows progress
    good = _metrics(tmp / "ens_eval")
    assert good["pairing"] == "paired" and good["items"] == 6 and good["members"] == 6
    assert 0.7 < good["spread_skill"] < 1.4  # the truth is drawn like a member
    assert sum(good["rank_histogram"]) == 6 * 16 * 16
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp / "shifted.zarr"),
                 "--out", str(tmp / "bad")]) == 0
    bad = _metrics(tmp / "bad")
    assert bad["crps"] > 3 * good["crps"] and bad["spread_skill"] < 0.4
    assert bad["rank_histogram"][-1] > 0.9 * sum(bad["rank_histogram"])  # truth above all members


def test_outputs_are_written_and_open(paired, monkeypatch):
    tmp, ens = paired
    assert main(["evaluate", str(ens), "--truth", str(tmp / "truth.zarr"),
                 "--out", str(tmp / "files")]) == 0
    names = {p.name for p in (tmp / "files").iterdir()} - {".piadm-evaluate"}  # the mark
    assert names == {"metrics.json", "metrics.nc", "fields.png", "spectrum.png",
                     "rank_histogram.png", "residuals.png"}
    for name in names - {"metrics.json", "metrics.nc"}:
        assert (tmp / "files" / name).read_bytes()[:4] == b"\x89PNG"
    nc = xr.open_dataset(tmp / "files" / "metrics.nc", engine="scipy")
    assert nc.attrs["crps"] == pytest.approx(_metrics(tmp / "files")["crps"])
    assert nc.crps.sizes["time"] == 6
    # the counts' coordinate: 0 .. 6 members below the truth
    assert list(nc["rank"].values) == list(range(7)) and nc["rank"].attrs["long_name"]
    # described for an analyst who opens them without piadm
    assert nc.crps.attrs["long_name"].startswith("CRPS of the members")
    assert nc.spectrum_ratio.attrs["units"] == "1" and "spread" in nc.spread.attrs["long_name"]
    assert nc.attrs["Conventions"] == "CF-1.10" and f"evaluate {ens} against " in (
        nc.attrs["history"])  # a CF file, saying what made it
    assert "Conventions" not in _metrics(tmp / "files")  # the JSON document as it was
    from pipeline.eval_output import OUTPUTS

    assert names == set(OUTPUTS)  # what a later evaluation into the folder clears first
    (tmp / "files" / "notes.txt").write_text("mine")
    (tmp / "files" / "spectrum.png").write_bytes(b"an earlier store's")
    # an evaluation that writes no spectrum.png (as of fields that are not square)
    monkeypatch.setattr("pipeline.figures.spectrum_figure", lambda metrics, path: None)
    assert main(["evaluate", str(ens), "--truth", str(tmp / "truth.zarr"),
                 "--out", str(tmp / "files")]) == 0
    assert not (tmp / "files" / "spectrum.png").exists()  # no stale figure of another store
    assert (tmp / "files" / "notes.txt").read_text() == "mine"  # nor is the user's file touched
    # the scores alone: the earlier evaluation's figures go with it, as stale
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp / "truth.zarr"),
                 "--out", str(tmp / "files")]) == 0
    assert {p.name for p in (tmp / "files").iterdir()} == {"metrics.json", "metrics.nc",
                                                           "notes.txt", ".piadm-evaluate"}
    assert _metrics(tmp / "files")["crps"] == pytest.approx(nc.attrs["crps"])


def test_a_truth_stored_with_its_field_dims_swapped_scores_the_same(paired, tmp_path):
    """Fields are compared point by point: a truth stored (time, x, y) is lined up by its
    dims' names, not met by position (that gave another CRPS and rank histogram)."""
    tmp, ens = paired
    swapped = xr.open_zarr(tmp / "truth.zarr").load().transpose("time", "x", "y")
    swapped.to_zarr(tmp_path / "xy.zarr", zarr_format=3)
    # named in capitals, or as a WRF or rotated-pole grid, north to south: met by position,
    # these were scored transposed or flipped (CRPS 4.4 and 3.9 where the truth's is 0.57)
    swapped.rename(x="X", y="Y").to_zarr(tmp_path / "XY.zarr", zarr_format=3)
    wrf = swapped.rename(x="west_east", y="south_north").transpose("time", "south_north", ...)
    wrf.isel(south_north=slice(None, None, -1)).to_zarr(tmp_path / "sn.zarr", zarr_format=3)
    swapped.rename(x="rlon", y="rlat").to_zarr(tmp_path / "rot.zarr", zarr_format=3)
    truths = (tmp / "truth.zarr", tmp_path / "xy.zarr", tmp_path / "XY.zarr",
              tmp_path / "sn.zarr", tmp_path / "rot.zarr")
    for n, truth in enumerate(truths):
        assert main(["evaluate", "--no-figures", str(ens), "--truth", str(truth),
                     "--out", str(tmp_path / f"e{n}")]) == 0
    first = _metrics(tmp_path / "e0")
    for n in range(1, len(truths)):
        other = _metrics(tmp_path / f"e{n}")
        assert other["crps"] == first["crps"], truths[n]
        assert other["rank_histogram"] == first["rank_histogram"]


def test_a_truth_named_otherwise_is_met_by_position_only_where_that_is_safe(paired, tmp_path,
                                                                         capsys):
    """A truth (time, lon, lat) is put in the ensemble's (y, x) order, as its names say; one
    that names one of the ensemble's dims on another axis ((time, x, yy)) is refused: by
    position its x met the ensemble's y, a CRPS of 4.0 where the right one is 0.46."""
    tmp, ens = paired
    truth = xr.open_zarr(tmp / "truth.zarr").load()
    truth.rename(y="lat", x="lon").transpose("time", "lon", "lat").to_zarr(
        tmp_path / "lonlat.zarr", zarr_format=3)
    truth.transpose("time", "x", "y").rename(y="yy").to_zarr(tmp_path / "xyy.zarr",
                                                             zarr_format=3)
    for name in ("truth", "lonlat"):
        where = tmp if name == "truth" else tmp_path
        assert main(["evaluate", "--no-figures", str(ens), "--truth", str(where / f"{name}.zarr"),
                     "--out", str(tmp_path / name)]) == 0
    assert _metrics(tmp_path / "truth")["crps"] == _metrics(tmp_path / "lonlat")["crps"]
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "xyy.zarr"),
                 "--out", str(tmp_path / "xyy")]) == 2
    assert ("fields are ('x', 'yy'), the ensemble's ('y', 'x'): they share x but not the rest"
            in capsys.readouterr().err)
    assert not (tmp_path / "xyy").exists()


def test_a_truth_with_a_field_axis_the_ensemble_lacks_is_refused(paired, tmp_path, capsys):
    """A truth of (time, z, y, x) for members of (y, x) had its z pooled with its times,
    each level scored as another field, exit 0; it is refused, naming the axis."""
    tmp, ens = paired
    truth = xr.open_zarr(tmp / "truth.zarr").load()
    truth.expand_dims(z=2).transpose("time", "z", "y", "x").to_zarr(tmp_path / "z.zarr",
                                                                      zarr_format=3)
    capsys.readouterr()
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "z.zarr"),
                 "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "fields have the axis z, which the ensemble's ('y', 'x') lack" in err
    assert "ds.isel(z=0)" in err and not (tmp_path / "z").exists()
    # the ensemble's own axes under other cases are no extra axis: met by position, as before
    truth.rename(y="Y", x="X").to_zarr(tmp_path / "upper.zarr", zarr_format=3)
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "upper.zarr"),
                 "--out", str(tmp_path / "upper")]) == 0


def test_a_truth_on_another_grid_of_as_many_points_is_refused(tmp_path, capsys):
    import numpy as np

    inp = tmp_path / "grid.zarr"
    ds = xr.open_zarr(make_input(tmp_path / "plain.zarr")).load()
    grid = np.arange(-0.8, 0.8, 0.1)  # 16 points crossing zero
    ds.assign_coords(y=grid, x=grid).to_zarr(inp, zarr_format=3)
    ens = tmp_path / "e.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(inp, ens, "ensemble.members=2")]) == 0
    # the same grid made in float32: 1.2e-7 off where it crosses zero, and scored
    near = np.arange(-0.8, 0.8, 0.1, dtype="float32")
    xr.open_zarr(inp).load().assign_coords(y=near, x=near).to_zarr(tmp_path / "f32.zarr",
                                                                   zarr_format=3)
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "f32.zarr"),
                 "--out", str(tmp_path / "f")]) == 0
    truth = xr.open_zarr(inp).load().assign_coords(x=grid * 0.5)
    truth.to_zarr(tmp_path / "half.zarr", zarr_format=3)
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "half.zarr"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "'s x runs -0.4 .. 0.35 (16 points), the ensemble's -0.8 .. 0.7 (16): give the " \
        "truth on the model's grid" in capsys.readouterr().err
    # the same grid stored the other way round is lined up, and scores the same
    xr.open_zarr(inp).load().isel(y=slice(None, None, -1)).to_zarr(tmp_path / "rev.zarr",
                                                                   zarr_format=3)
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "rev.zarr"),
                 "--out", str(tmp_path / "v")]) == 0
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(inp), "--out",
                 str(tmp_path / "s")]) == 0
    scored = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("v", "s")]
    assert scored[0]["crps"] == scored[1]["crps"]
    # named lat and lon, north to south as ERA5 stores it: taken as y and x, then lined up
    # and checked as they are (by position it scored upside down, another grid unseen)
    geo = xr.open_zarr(inp).load().rename(y="lat", x="lon")
    geo.isel(lat=slice(None, None, -1)).to_zarr(tmp_path / "geo.zarr", zarr_format=3)
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "geo.zarr"),
                 "--out", str(tmp_path / "g")]) == 0
    assert json.loads((tmp_path / "g" / "metrics.json").read_text())["crps"] == scored[1]["crps"]
    geo.assign_coords(lat=geo.lat + 100).to_zarr(tmp_path / "far.zarr", zarr_format=3)
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "far.zarr"),
                 "--out", str(tmp_path / "h")]) == 2
    assert "'s lat runs 99.2 .. 100.7 (16 points)" in capsys.readouterr().err
    # a grid stored north to south is told as stored, first to last (min .. max read as the
    # other way round)
    geo.isel(lat=slice(None, None, -1)).assign_coords(
        lat=lambda d: d.lat + 100).to_zarr(tmp_path / "far_down.zarr", zarr_format=3)
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "far_down.zarr"),
                 "--out", str(tmp_path / "i")]) == 2
    assert "'s lat runs 100.7 .. 99.2 (16 points)" in capsys.readouterr().err


def test_an_empty_truth_range_over_text_labels_says_where_they_run():
    import numpy as np

    from pipeline.errors import EvaluationError
    from pipeline.truth_items import truth_in_range

    truth = xr.DataArray(np.zeros((3, 2)), dims=("run", "x"), coords={"run": ["a", "b", "c"]})
    with pytest.raises(EvaluationError, match=r"its run runs a \.\. c; pick labels inside it"):
        truth_in_range(truth, ("x", "z"), "t.zarr")


def test_a_truth_named_as_the_input_is_lined_up_by_those_names(tmp_path, capsys):
    """An input on (lat, lon) makes a store on (y, x) that remembers the names (input_dim):
    a truth that keeps them is lined up by them, reversed or transposed as it is stored,
    and refused on another grid (it was met by position: another CRPS, another grid
    scored)."""
    import numpy as np

    plain = xr.open_zarr(make_input(tmp_path / "plain.zarr"), consolidated=False).load()
    lat, lon = np.linspace(-10.0, 10.0, 16), np.linspace(0.0, 30.0, 16)
    inp = plain.rename(y="lat", x="lon").assign_coords(lat=lat, lon=lon)
    inp.to_zarr(tmp_path / "ll.zarr", zarr_format=3)
    ens = tmp_path / "e.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(tmp_path / "ll.zarr", ens, "ensemble.members=2")]) == 0
    inp.sortby("lat", ascending=False).transpose("time", "lon", "lat").to_zarr(
        tmp_path / "flip.zarr", zarr_format=3)
    for truth, out in (("ll.zarr", "a"), ("flip.zarr", "b")):
        assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / truth),
                     "--out", str(tmp_path / out)]) == 0
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert a["crps"] == b["crps"] and a["rank_histogram"] == b["rank_histogram"]
    inp.assign_coords(lat=lat * 5).to_zarr(tmp_path / "other.zarr", zarr_format=3)
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "other.zarr"),
                 "--out", str(tmp_path / "c")]) == 2
    assert "other.zarr's lat runs -50 .. 50 (16 points), the ensemble's -10 .. 10 (16)" \
        in capsys.readouterr().err


def test_a_truth_holding_the_stores_grid_indices_the_other_way_round_is_lined_up(tmp_path):
    """A store made from an input without grid coordinates numbers its points (grid index
    0 .. n-1); a truth written from it flipped (indices n-1 .. 0) met it by position: CRPS
    1.85 for 0.66. The same indices reversed are lined up; the truth's own values (a
    physical grid) still meet them by position."""
    import numpy as np

    plain = xr.open_zarr(make_input(tmp_path / "plain.zarr"), consolidated=False).load()
    ens = tmp_path / "e.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(tmp_path / "plain.zarr", ens, "ensemble.members=2")]) == 0
    assert xr.open_zarr(ens)["y"].attrs["long_name"].startswith("grid index")
    n = plain.sizes["y"]
    indexed = plain.assign_coords(y=np.arange(n), x=np.arange(plain.sizes["x"]))
    indexed.isel(y=slice(None, None, -1)).to_zarr(tmp_path / "flip.zarr", zarr_format=3)
    indexed.to_zarr(tmp_path / "same.zarr", zarr_format=3)
    for truth in ("plain", "flip", "same"):
        assert main(["evaluate", "--no-figures", str(ens), "--truth",
                     str(tmp_path / f"{truth}.zarr"), "--out", str(tmp_path / truth)]) == 0
    flat, flip, same = (_metrics(tmp_path / t) for t in ("plain", "flip", "same"))
    assert flat["crps"] == flip["crps"] == same["crps"]
    assert flat["rank_histogram"] == flip["rank_histogram"]


def test_a_truth_with_one_level_field_among_others_is_scored(paired, tmp_path):
    """A calm or dry day (a field of one value) among the items was refused outright, though
    every score is defined for it and the spectra are compared as means over the items."""
    import numpy as np

    tmp, ens = paired
    truth = xr.open_zarr(tmp / "truth.zarr").load()
    truth.vort[2] = 0.0
    truth.to_zarr(tmp_path / "t.zarr")
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "t.zarr"),
                 "--out", str(tmp_path / "e")]) == 0
    scores = _metrics(tmp_path / "e")
    assert np.isfinite(scores["crps"]) and np.isfinite(scores["spread_skill"])


def test_the_ensemble_std_of_fields_far_from_zero_keeps_its_digits(paired, tmp_path):
    """The std was the root of the mean square less the squared mean: for fields around 1e4
    with a spread of 0.01 the two agree in their first eight digits and the difference keeps
    what float64 has left (0.9% off at 1e5). Summed about each item's mean, it is exact."""
    import numpy as np

    tmp, ens = paired
    far = tmp_path / "far.zarr"
    shutil.copytree(ens, far)
    vort = zarr.open_group(far, mode="r+")["vort"]
    vort[:] = 1e4 + 0.01 * vort[:].astype(np.float64)
    truth = xr.open_zarr(tmp / "truth.zarr").load()
    (1e4 + 0.01 * truth).to_zarr(tmp_path / "t.zarr")
    assert main(["evaluate", "--no-figures", str(far), "--truth", str(tmp_path / "t.zarr"),
                 "--out", str(tmp_path / "e")]) == 0
    values = zarr.open_group(far, mode="r")["vort"][:].astype(np.float64)
    assert _metrics(tmp_path / "e")["ensemble_std"] == pytest.approx(values.std(), rel=1e-9)


def test_a_truth_without_the_ensembles_items_is_a_climatology_that_says_why(paired, tmp_path,
                                                                           capsys):
    tmp, ens = paired
    xr.open_zarr(tmp / "truth.zarr").rename(time="t").to_zarr(tmp_path / "t.zarr")
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "t.zarr"),
                 "--out", str(tmp_path / "e")]) == 0
    captured = capsys.readouterr()
    assert "climatological (the truth has no time dim to pair by)" in captured.out + captured.err
    # its members share their item's input: resampled item by item, and said so
    assert _metrics(tmp_path / "e")["ensemble_block"] == xr.open_zarr(ens).sizes["member"]
    assert "the members item by item" in captured.out + captured.err


def test_climatological_spectrum_tells_a_rescaled_truth(tmp_path):
    base = ["model.shape=[16, 16]", "sampler.steps=60", "sampler.block_size=20",
            "sampler.tol=0.05", "ensemble.batch_size=8"]
    sets = lambda *s: sum((["--set", x] for x in base + list(s)), [])
    ens, truth = tmp_path / "ens.zarr", tmp_path / "truth.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *sets("ensemble.members=32", f"output.path={ens}")]) == 0
    assert main(["sample", "jobs/configs/grf.toml", *sets("ensemble.members=32",
                 "sampler.seed=4", f"output.path={truth}")]) == 0
    fields = xr.open_zarr(truth).field.isel(item=0).rename(member="sample")
    xr.Dataset({"field": fields}).to_zarr(tmp_path / "t.zarr", zarr_format=3)
    xr.Dataset({"field": 2 * fields}).to_zarr(tmp_path / "t2.zarr", zarr_format=3)
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "t.zarr"),
                 "--truth-range", "0", "31", "--cut", "6", "--out", str(tmp_path / "a")]) == 0
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "t2.zarr"),
                 "--out", str(tmp_path / "b")]) == 0
    right, scaled = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert right["pairing"] == "climatological" and right["truth_fields"] == 32
    assert right["spectrum_max_deviation"] < 0.35
    assert scaled["spectrum_max_deviation"] > 0.7  # power / 4
    assert "crps" not in right
    assert 1 <= right["truth_block"] <= 8  # independent truth fields: short blocks, <= M / 4
    # per band, with bootstrap intervals over the fields: the right truth's cover 1, the
    # rescaled one's sit at a quarter
    assert right["bands"] == "resolved,beyond" and right["band_resolved_k"] == "1..6"
    assert scaled["bands"] == "resolved" and scaled["headline_band"] == "resolved"
    for band in ("resolved", "beyond"):
        assert right[f"band_{band}_energy_ratio_lo"] < 1 < right[f"band_{band}_energy_ratio_hi"]
    assert 0.2 < scaled["band_resolved_energy_ratio_lo"] < scaled["band_resolved_energy_ratio_hi"] < 0.3


@pytest.mark.parametrize("case, message", [
    ("missing store", "does not exist: give the output.path"),
    ("missing truth", "truth nope.zarr does not exist"),
    ("wrong variable", "has no variable 'nope'"),
    ("incomplete store", "is incomplete (0 of 36 members done): rerun its piadm sample"),
    ("store being filled", "is incomplete (0 of 36 members done): live job(s) slurm-9.0 are "
                           "filling it: wait for them"),
    ("truth lacks items", "lacks time"),
    # every label missing: the same dates as text, say; what the truth holds is told
    ("truth labels as text", "lacks time [2020-01-01, 2020-01-02, 2020-01-03] and 3 more of the "
                             "ensemble (it holds 6 labels of type str, 2020-01-01 .. 2020-01-06, "
                             "where the ensemble's are datetime64[ns])"),
    ("empty range", "selects no sample of"),
    ("empty range", "its sample runs 0 .. 5; pick labels inside it"),
    ("range of no labels", "--truth-range foo 5: label 'foo' is not a valid sample value"),
    ("reversed range", "is reversed: give the earlier label first"),
    ("range on paired truth", "--truth-range selects a climatology, but"),
    ("out into a store", "is a Zarr store: give a folder"),
    ("out inside a store", "/ev is inside the Zarr store "),
    ("out onto a file", "is a file: give a folder"),
    # refused before the scoring, not after it (a store's minutes lost)
    ("out unwritable", "--out /proc/piadm_eval cannot be written (No such file or directory on "
                       "making a folder in /proc): give --out a folder you can write"),
    ("truth not finite", "has 2 of the 6 fields scored not finite (e.g. time 2020-01-03, "
                         "2020-01-05), every point NaN or inf: a generate-data run stopped part "
                         "way"),
    ("truth masked", "has 1 of the 6 fields scored not finite (e.g. time 2020-01-02), NaN or "
                     "inf at some of their points (masked or missing values): piadm scores "
                     "whole fields; fill them"),
    ("truth all zero", "is zero everywhere: it has no spectrum or spread to score against"),
    ("truth constant", "is 1.5 everywhere: it has no spectrum or spread to score against"),
    ("truth level per time", "has 6 of the 6 fields scored that are one value throughout (e.g. "
                             "time 2020-01-01, 2020-01-02, 2020-01-03): they have no spectrum"),
    ("complex truth", "holds complex64 values: piadm's fields are real numbers"),
    ("ensemble as truth", "is ('time', 'member', 'y', 'x'), not one field per time"),
    ("cut past the shells", "--cut 100 is past the largest shell of the store's 16x16 fields: "
                            "give at most 8"),
    ("out into the user's folder", "holds residuals.png, not written by piadm evaluate, which "
                                   "would replace them: give a new or empty folder"),
    ("truth with a label twice", "holds time 2020-01-02 more than once"),
    ("out with a torn metrics.json", "holds a metrics.json that cannot be read: delete it"),
])
def test_bad_evaluate_input_is_a_one_line_error(paired, tmp_path, capsys, case, message):
    tmp, ens = paired
    args = {"missing store": [str(tmp_path / "none.zarr"), "--truth", str(tmp / "truth.zarr")],
            "missing truth": [str(ens), "--truth", "nope.zarr"],
            "wrong variable": [str(ens), "--truth", str(tmp / "truth.zarr"),
                               "--truth-variable", "nope"]}
    if case in ("incomplete store", "store being filled"):  # members not marked done
        shutil.copytree(ens, tmp_path / "undone.zarr")
        zarr.open_group(tmp_path / "undone.zarr", mode="r+")["done"][:] = 0
        args[case] = [str(tmp_path / "undone.zarr"), "--truth", str(tmp / "truth.zarr")]
    beat = None
    if case == "store being filled":
        from pipeline.claims import Heartbeat, claims_dir

        beat = Heartbeat(claims_dir(tmp_path / "undone.zarr"), "slurm-9.0").start()
    if case == "truth labels as text":
        truth = xr.open_zarr(tmp / "truth.zarr").load()
        truth = truth.assign_coords(time=[str(v)[:10] for v in truth.time.values])
        truth.to_zarr(tmp_path / "t.zarr")
        args[case] = [str(ens), "--truth", str(tmp_path / "t.zarr")]
    if case == "truth lacks items":
        xr.open_zarr(tmp / "truth.zarr").isel(time=slice(0, 3)).to_zarr(tmp_path / "t.zarr")
        args[case] = [str(ens), "--truth", str(tmp_path / "t.zarr")]
    if case in ("empty range", "reversed range", "range of no labels"):
        fields = xr.open_zarr(ens).vort.isel(time=0).rename(member="sample")
        xr.Dataset({"vort": fields}).to_zarr(tmp_path / "c.zarr")
        span = {"empty range": ["50", "60"], "reversed range": ["5", "0"],
                "range of no labels": ["foo", "5"]}[case]
        args[case] = [str(ens), "--truth", str(tmp_path / "c.zarr"), "--truth-range", *span]
    if case == "range on paired truth":
        args[case] = [str(ens), "--truth", str(tmp / "truth.zarr"), "--truth-range", "0", "5"]
    if case == "out into a store":
        args[case] = [str(ens), "--truth", str(tmp / "truth.zarr"), "--out", str(ens)]
    if case == "out inside a store":  # among the store's own files
        args[case] = [str(ens), "--truth", str(tmp / "truth.zarr"), "--out", f"{ens}/vort/ev"]
    if case == "out unwritable":
        args[case] = [str(ens), "--truth", str(tmp / "truth.zarr"), "--out", "/proc/piadm_eval"]
    if case == "out onto a file":
        (tmp_path / "notes.txt").write_text("mine")
        args[case] = [str(ens), "--truth", str(tmp / "truth.zarr"), "--out",
                      str(tmp_path / "notes.txt")]
    if case == "truth not finite":  # as a stopped generate-data leaves its unwritten times
        truth = xr.open_zarr(tmp / "truth.zarr").load()
        truth.vort[[2, 4]] = float("nan")
        truth.to_zarr(tmp_path / "t.zarr")
        args[case] = [str(ens), "--truth", str(tmp_path / "t.zarr")]
    if case == "truth masked":  # one point, as a land mask or a missing value gives
        truth = xr.open_zarr(tmp / "truth.zarr").load()
        truth.vort[1, 3, 5] = float("inf")
        truth.to_zarr(tmp_path / "t.zarr")
        args[case] = [str(ens), "--truth", str(tmp_path / "t.zarr")]
    if case == "truth level per time":  # each field uniform, each time another value
        truth = xr.open_zarr(tmp / "truth.zarr").load()
        truth["vort"] = truth.vort * 0 + xr.DataArray(np.arange(6.0), dims="time")
        truth.to_zarr(tmp_path / "t.zarr")
        args[case] = [str(ens), "--truth", str(tmp_path / "t.zarr")]
    if case in ("truth all zero", "truth constant", "complex truth"):
        truth = xr.open_zarr(tmp / "truth.zarr").load()
        truth["vort"] = (truth.vort * 0 + (1.5 if case == "truth constant" else 0)
                         if case != "complex truth" else truth.vort.astype("complex64"))
        truth.to_zarr(tmp_path / "t.zarr")
        args[case] = [str(ens), "--truth", str(tmp_path / "t.zarr")]
    if case == "ensemble as truth":
        args[case] = [str(ens), "--truth", str(ens)]
    if case == "cut past the shells":
        args[case] = [str(ens), "--truth", str(tmp / "truth.zarr"), "--cut", "100"]
    if case == "out with a torn metrics.json":
        (tmp_path / "torn").mkdir()
        (tmp_path / "torn" / "metrics.json").write_text('{"store": "e.zarr", "tru')
        args[case] = [str(ens), "--truth", str(tmp / "truth.zarr"), "--out",
                      str(tmp_path / "torn")]
    if case == "out into the user's folder":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "residuals.png").write_text("my figure")
        args[case] = [str(ens), "--truth", str(tmp / "truth.zarr"), "--out",
                      str(tmp_path / "mine")]
    if case == "truth with a label twice":
        truth = xr.open_zarr(tmp / "truth.zarr").load()
        xr.concat([truth, truth.isel(time=[1])], "time").to_zarr(tmp_path / "t.zarr")
        args[case] = [str(ens), "--truth", str(tmp_path / "t.zarr")]
    out = [] if "--out" in args[case] else ["--out", str(tmp_path / "e")]
    try:
        assert main(["evaluate", *args[case], *out]) == 2
    finally:
        if beat is not None:
            beat.stop()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "e").exists()  # refused before anything is written
    if case == "out onto a file":  # nor where --out pointed
        assert (tmp_path / "notes.txt").read_text() == "mine"
    if case == "out into the user's folder":
        assert (tmp_path / "mine" / "residuals.png").read_text() == "my figure"
    if case in ("out into a store", "out inside a store"):
        assert not (Path(ens) / "metrics.json").exists() and not (Path(ens) / "vort/ev").exists()


def test_metrics_json_holds_no_nan():
    from pipeline.eval_output import as_json

    metrics = xr.Dataset({"crps": (("time",), [0.5, float("nan")])},
                         coords={"time": [0.0, 1.0]},
                         attrs={"spread_skill": float("nan"), "crps": 0.5})
    doc = json.loads(json.dumps(as_json(metrics), allow_nan=False))
    assert doc["spread_skill"] is None and doc["per_item"]["crps"] == [0.5, None]


def test_the_residual_figure_finds_each_sampler_calls_history():
    import numpy as np

    from pipeline.figures import call_starts

    a, b, c = [0.5, 0.1, np.nan], [0.4, 0.2, 0.05], [0.3, np.nan, np.nan]
    # calls of 2, 1 and 2 members (a store resumed in smaller calls than it was made with)
    assert call_starts(np.array([a, a, b, c, c])) == [0, 2, 3]


def test_a_climatology_range_selects_by_value_and_labels_are_dates_in_json(paired, tmp_path):
    """--truth-range on a truth stored newest first takes the labels between its ends; the
    per-item labels of metrics.json are dates, not nanoseconds."""
    tmp, ens = paired
    truth = xr.open_zarr(tmp / "truth.zarr").load()
    climate = truth.rename(time="day").isel(day=slice(None, None, -1))
    climate.to_zarr(tmp_path / "desc.zarr")
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "desc.zarr"),
                 "--truth-range", "2020-01-02", "2020-01-04", "--out", str(tmp_path / "c")]) == 0
    assert _metrics(tmp_path / "c")["truth_fields"] == 3
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp / "truth.zarr"),
                 "--out", str(tmp_path / "p")]) == 0
    assert _metrics(tmp_path / "p")["per_item"]["time"][:2] == ["2020-01-01T00:00:00",
                                                                "2020-01-02T00:00:00"]
    # where the store and the truth are, for a reader in another folder (as given, the
    # paths were the evaluating shell's, the variable joined to the truth's with ":")
    said = _metrics(tmp_path / "c")
    assert said["store_path"] == os.path.abspath(ens) and said["truth_variable"] == "vort"
    assert said["truth_path"] == os.path.abspath(tmp_path / "desc.zarr")
    # a truth repeating a label the ensemble does not take is paired as any other
    extra = truth.isel(time=[0, 1]).assign_coords(time=np.full(2, np.datetime64("2021-01-01")))
    xr.concat([truth, extra], "time").to_zarr(tmp_path / "repeats.zarr")
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(tmp_path / "repeats.zarr"),
                 "--out", str(tmp_path / "r")]) == 0
    assert _metrics(tmp_path / "r")["crps"] == _metrics(tmp_path / "p")["crps"]


def test_one_members_spread_skill_is_said_to_need_two(tmp_path, recwarn):
    inp = make_input(tmp_path / "in.zarr")
    out = tmp_path / "one.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(
        inp, out, "ensemble.members=1", "ensemble.batch_size=1")]) == 0
    from pipeline.scoring import evaluate, table

    metrics, _ = evaluate(out, inp, out=tmp_path / "e", figures=False)
    assert "spread/skill" in table(metrics) and "n/a (needs 2 members)" in table(metrics)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_one_member_climatology_has_no_interval(tmp_path):
    """Every resample of one member is that member: the "90%" interval was the truth's
    spread alone, and on the exact model 3 of 4 seeds' intervals excluded its ratio 1."""
    from pipeline.scoring import evaluate, table

    sets = ["model.shape=[8, 8]", "sampler.steps=20", "sampler.method=sequential-sde"]
    for name, members in (("t.zarr", 12), ("one.zarr", 1)):
        assert main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in [
            *sets, f"ensemble.members={members}", f"sampler.seed={members}",
            f"output.path={tmp_path / name}"]), [])]) == 0
    fields = xr.open_zarr(tmp_path / "t.zarr").field.isel(item=0).rename(member="sample")
    xr.Dataset({"field": fields.drop_vars("item")}).to_zarr(tmp_path / "truth.zarr")
    metrics, _ = evaluate(tmp_path / "one.zarr", tmp_path / "truth.zarr", out=tmp_path / "e",
                          figures=False)
    said = table(metrics)
    assert "(one member: no interval)" in said and "[" not in said.split("band k=")[1]
    assert "intervals" not in said  # no band shows one to explain
    assert np.isnan(metrics.attrs[f"band_{metrics.attrs['headline_band']}_energy_ratio_lo"])


def test_fields_that_are_not_square_say_why_they_have_no_spectra(tmp_path):
    from pipeline.scoring import evaluate, table

    sets = ["model.shape=[8, 12]", "sampler.steps=20", "ensemble.members=2",
            f"output.path={tmp_path / 'r.zarr'}"]
    assert main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]) == 0
    truth = xr.open_zarr(tmp_path / "r.zarr").field.isel(member=0).drop_vars("member")
    xr.Dataset({"field": truth.rename(item="sample")}).to_zarr(tmp_path / "t.zarr")
    metrics, _ = evaluate(tmp_path / "r.zarr", tmp_path / "t.zarr", out=tmp_path / "e",
                          figures=False)
    assert "spectrum_ratio" not in metrics
    assert "the fields (8, 12) are not square" in table(metrics)
    assert "intervals" not in table(metrics)  # no band, so no interval to explain
    from pipeline.errors import EvaluationError

    for flag in ("kmax", "cut"):  # neither reaches a spectrum: refused, not ignored
        with pytest.raises(EvaluationError, match=f"--{flag} 3: the store's fields .8, 12. are "
                                                  f"not square, so no spectrum is scored"):
            evaluate(tmp_path / "r.zarr", tmp_path / "t.zarr", out=tmp_path / "e", **{flag: 3})


def test_one_paired_item_gives_no_interval_rather_than_a_zero_wide_one(tmp_path, capsys):
    """The intervals resample the paired items: with one, every resample is the same."""
    ens = _sample(tmp_path, "one.zarr", "input.items=['2020-01-02']")
    truth = xr.open_zarr(ens).vort.isel(member=0).drop_vars("member")
    xr.Dataset({"vort": truth}).to_zarr(tmp_path / "truth.zarr", zarr_format=3)
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "truth.zarr")]) == 0
    table = capsys.readouterr().out
    assert "(one item: no interval)" in table and "[" not in table.split("band k=")[1]
    # nor in the files: metrics.json had zero-wide bounds, the figure "[795, 795]"
    doc = _metrics(tmp_path / "one_eval")
    band = f"band_{doc['headline_band']}"
    assert doc[f"{band}_energy_ratio"] is not None
    assert doc[f"{band}_energy_ratio_lo"] is None and doc[f"{band}_max_deviation_hi"] is None
    assert all(v is None for v in doc["spectrum_k"]["ratio_lo"])


def test_one_dimensional_fields_are_scored_and_drawn_as_curves(tmp_path, capsys):
    """A gmm store's fields are vectors: the fields figure failed on them with a traceback
    (imshow of a vector) after metrics.json was written."""
    ens = tmp_path / "gmm.zarr"
    assert main(["sample", "jobs/configs/gmm.toml", "--set", "sampler.steps=20", "--set",
                 "ensemble.members=4", "--set", "ensemble.batch_size=4", "--set",
                 f"output.path={ens}"]) == 0
    truth = np.random.default_rng(0).standard_normal((20, 16)).astype("float32")
    xr.Dataset({"field": (("time", "x"), truth)}, coords={"time": np.arange(20.0)}).to_zarr(
        tmp_path / "truth.zarr", zarr_format=3)
    out = tmp_path / "ev"
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "truth.zarr"),
                 "--out", str(out)]) == 0
    assert "the fields (16,) are not square images" in capsys.readouterr().out
    assert {"metrics.json", "fields.png"} <= {p.name for p in out.iterdir()}


def test_a_failed_figure_leaves_the_folder_as_it_was(paired, tmp_path, monkeypatch):
    """The files are drafted aside and moved into place together: a figure that fails
    leaves neither a new metrics.json beside the old figures nor a draft."""
    tmp, ens = paired
    out = tmp_path / "ev"
    args = ["evaluate", str(ens), "--truth", str(tmp / "truth.zarr"), "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fails(metrics, path):
        path.write_bytes(b"half a figure")
        raise RuntimeError("the figure failed")

    monkeypatch.setattr("pipeline.figures.rank_figure", fails)
    with pytest.raises(RuntimeError, match="the figure failed"):
        main([*args, "--kmax", "3"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("earlier", [False, True])
def test_an_evaluation_killed_while_moving_its_files_in_leaves_no_metrics_json(
        paired, tmp_path, monkeypatch, earlier):
    """Killed after its first file moved in: an empty folder kept metrics.nc alone, which
    every rerun refused as no evaluation's; a folder of an earlier evaluation kept its
    metrics.json beside the new metrics.nc, a mix that looked complete. Now metrics.json,
    the sign of a complete evaluation, is gone until the end, and a rerun takes the folder."""
    import pipeline.eval_output as eval_output

    tmp, ens = paired
    out = tmp_path / "ev"
    args = ["evaluate", str(ens), "--truth", str(tmp / "truth.zarr"), "--out", str(out)]
    if earlier:
        assert main([*args, "--no-figures"]) == 0
    moved, replace = [], os.replace

    def killed(src, dst):  # the process dies once its first file is in place
        replace(src, dst)
        if not os.path.basename(dst).startswith("."):  # not a figure's draft being made
            moved.append(dst)
            raise KeyboardInterrupt

    monkeypatch.setattr(eval_output.os, "replace", killed)
    assert main(args) == 130  # as Ctrl-C: the command stops where it is, no cleanup
    monkeypatch.undo()
    assert [os.path.basename(p) for p in moved] == ["metrics.nc"]
    assert not (out / "metrics.json").exists()
    assert main(args) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert {"store", "truth"} <= doc.keys() and (out / "fields.png").exists()


def test_the_drafts_of_an_evaluation_killed_mid_write_go_at_the_next(paired, tmp_path):
    """kill -9 runs no cleanup: its hidden drafts stayed for good beside the files (three
    kills, ten drafts). This host's of a process gone are removed at once (a rerun straight
    after a kill kept them); another host's, or an older piadm's (no host in the name), once
    written long enough ago; a running one's are not."""
    import subprocess

    from pipeline.eval_output import _host_key

    tmp, ens = paired
    out = tmp_path / "ev"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has now
    here, there = f"{gone.pid}-{_host_key()}", f"{gone.pid}-0badc0de"
    old = time.time() - 3600
    left = [out / f".{gone.pid}.metrics.json", out / f".{there}.spectrum.png",
            out / f"..{gone.pid}.fields.png.vm-{gone.pid}-0a1b2c3d.tmp",  # a figure's temp
            out / f".{here}.metrics.nc", out / f"..{here}.fields.png.vm-1-0a1b2c3d.tmp"]
    recent = [out / f".{gone.pid}.fields.png", out / f".{there}.rank_histogram.png"]
    running = out / f".{os.getppid()}-{_host_key()}.metrics.json"
    for path in (*left, *recent, running):
        path.write_text("half")
        if path not in recent and here not in path.name:
            os.utime(path, (old, old))
    assert main(["evaluate", str(ens), "--truth", str(tmp / "truth.zarr"), "--out",
                 str(out)]) == 0
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in recent) and running.exists()


def test_a_figure_written_on_a_full_disk_names_the_folder(paired, tmp_path, monkeypatch,
                                                          capsys):
    """matplotlib's write on a full disk raised an OSError naming no file: the one line
    said 'cannot use: No space left on device', not where."""
    import errno

    tmp, ens = paired
    out = tmp_path / "ev"

    def full(metrics, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.figures.rank_figure", full)
    assert main(["evaluate", str(ens), "--truth", str(tmp / "truth.zarr"), "--out",
                 str(out)]) == 2
    assert f"cannot use {out}: No space left on device" in capsys.readouterr().err
    assert not list(out.iterdir())


def test_a_store_the_disk_fails_to_read_is_an_io_error_not_no_store(paired, tmp_path, capsys,
                                                                    monkeypatch):
    """An EIO opening the ensemble was told as "is not a Zarr store", a wrong lead for a
    failing disk or an NFS mount gone stale."""
    import errno

    from zarr.storage import LocalStore

    tmp, ens = paired
    read = LocalStore.get

    async def failing(self, key, *args, **kwargs):
        if str(self.root) == str(ens):
            raise OSError(errno.EIO, "Input/output error", f"{ens}/{key}")
        return await read(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", failing)
    assert main(["evaluate", str(ens), "--truth", str(tmp / "truth.zarr"),
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "Input/output error" in err and "not a Zarr store" not in err, err


def test_the_fields_figure_draws_an_offset_field_on_its_range_and_north_up(tmp_path,
                                                                          monkeypatch):
    """A temperature in K was drawn on -290 .. 290 (every panel one colour), and latitudes
    stored north to south upside down."""
    import numpy as np
    from matplotlib.axes import Axes

    from pipeline.figures import fields_figure

    drawn = []
    imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, img, **kw: drawn.append(kw) or imshow(
        self, img, **kw))
    rng = np.random.default_rng(0)
    lat = np.linspace(80, -70, 8)
    ens = xr.Dataset({"tas": (("time", "member", "lat", "lon"),
                              280 + rng.standard_normal((1, 3, 8, 8)))},
                     coords={"lat": lat, "lon": np.arange(8.0)})
    truth = xr.DataArray(280 + rng.standard_normal((1, 8, 8)), dims=("time", "lat", "lon"))
    fields_figure(ens, truth, True, tmp_path / "f.png")
    fields = [kw for kw in drawn if kw["cmap"] != "magma"]
    assert fields and all(kw["cmap"] == "viridis" and 275 < kw["vmin"] < kw["vmax"] < 285
                          and kw["origin"] == "upper" for kw in fields)
    drawn.clear()  # a field about 0 (vorticity, an anomaly) on a grid running upwards
    fields_figure(ens.assign(tas=ens.tas - 280).isel(lat=slice(None, None, -1)), truth - 280,
                  True, tmp_path / "g.png")
    fields = [kw for kw in drawn if kw["cmap"] != "magma"]
    assert all(kw["cmap"] == "RdBu_r" and kw["vmin"] == -kw["vmax"] and kw["origin"] == "lower"
               for kw in fields)


def test_evaluate_in_the_stores_own_folder_writes_beside_it(paired, monkeypatch):
    """`piadm evaluate .` inside the store: the default folder was "._eval", refused as inside
    the store; "STORE/.." was refused for its --out before being called no store."""
    from pipeline.errors import EvaluationError

    tmp, ens = paired
    monkeypatch.chdir(ens)
    assert main(["evaluate", ".", "--truth", str(tmp / "truth.zarr")]) == 0
    assert (Path(str(ens).removesuffix(".zarr") + "_eval") / "metrics.json").is_file()
    from pipeline.scoring import evaluate

    with pytest.raises(EvaluationError, match=r"store \.\./\S+/\.\. is not a Zarr store"):
        evaluate(f"../{ens.name}/..", tmp / "truth.zarr")


def test_the_spectra_are_in_the_fields_units_squared():
    """metrics.nc gave the spectra a long_name and no units, where the errors had the
    field's and the ratios 1."""
    from pipeline.scoring import _described

    out = xr.Dataset({"spectrum_truth": ("k", [1.0]), "spectrum_ensemble": ("k", [1.0])})
    power = _described(out.copy(), "K", "t2m")
    assert power.spectrum_truth.attrs["units"] == "(K)^2" and "comment" not in power.spectrum_truth.attrs
    energy = _described(out.copy(), "s-1", "vorticity")
    assert energy.spectrum_ensemble.attrs["units"] == "(s-1)^2"
    assert "kinetic energy" in energy.spectrum_ensemble.attrs["comment"]


def test_an_ensemble_equal_to_the_truth_has_no_spread_skill():
    """Members all equal to the truth scored spread/skill 1.41: rounding over rounding."""
    from pipeline.scoring import score, table

    rng = np.random.default_rng(0)
    truth = xr.DataArray(rng.standard_normal((3, 8, 8)), dims=("time", "y", "x"),
                         coords={"time": np.arange(3.0)})
    members = truth.expand_dims(member=4).transpose("time", "member", "y", "x")
    ens = xr.Dataset({"vort": members + 1e-17 * rng.standard_normal(members.shape),
                      "rounds": (("time", "member"), np.ones((3, 4))),
                      "model_calls": (("time", "member"), np.ones((3, 4)))})
    metrics = score(ens, truth, paired=True)
    assert np.isnan(metrics.attrs["spread_skill"]) and metrics.attrs["crps"] < 1e-12
    assert "n/a (the ensemble mean is the truth)" in table(metrics)


def test_a_store_replaced_while_it_is_scored_is_refused_not_scored(paired, tmp_path, capsys,
                                                                   monkeypatch):
    """A run with output.overwrite = true swapped a new store in while evaluate read the old
    one lazily: its scores came from the new, half-written store ("n/a", "the ensemble mean
    is the truth") and it exited 0 with a metrics.json."""
    import shutil

    from pipeline import scoring

    tmp, ens = paired
    store = tmp_path / "ens.zarr"
    shutil.copytree(ens, store)
    real = scoring.score

    def replaced_meanwhile(*args, **kwargs):
        shutil.move(store, tmp_path / "aside.zarr")  # as output.overwrite renames a new one in
        shutil.copytree(ens, store)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score", replaced_meanwhile)
    out = tmp_path / "ev"
    args = ["evaluate", str(store), "--truth", str(tmp / "truth.zarr"), "--out", str(out),
            "--no-figures"]
    assert main(args) == 2
    assert "was replaced or changed by another run while it was evaluated" in (
        capsys.readouterr().err)
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(scoring, "score", real)
    assert main(args) == 0  # the store as it now is
    # replaced while the figures read it, after the scores: their drafts are not kept either
    import pipeline.figures as figures

    drawn = figures.residual_figure

    def replaced_while_drawn(data, path):
        shutil.move(store, tmp_path / "aside2.zarr")
        shutil.copytree(ens, store)
        return drawn(data, path)

    monkeypatch.setattr(figures, "residual_figure", replaced_while_drawn)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(args[:-1]) == 2  # with the figures
    assert "was replaced or changed by another run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_truth_on_another_model_calendar_is_one_line(tmp_path, capsys):
    """cftime dates of two calendars cannot be compared: evaluate ended in a traceback
    (TypeError from np.setdiff1d) where datetime64 against cftime got its one line."""
    ds = xr.open_zarr(make_input(tmp_path / "in.zarr")).load()
    noleap = ds.assign_coords(time=xr.date_range("2000-01-01", periods=6, calendar="noleap",
                                                 use_cftime=True))
    noleap.to_zarr(tmp_path / "noleap.zarr", zarr_format=3, consolidated=False)
    ens = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(tmp_path / "noleap.zarr", ens, "ensemble.members=2")]) == 0
    ds.assign_coords(time=xr.date_range("2000-01-01", periods=6, calendar="360_day",
                                        use_cftime=True)).to_zarr(tmp_path / "t360.zarr",
                                                                  zarr_format=3)
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "t360.zarr"),
                 "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "labels of type Datetime360Day" in err and "are DatetimeNoLeap" in err


def test_a_stores_float32_labels_meet_the_truths_float64_ones(tmp_path):
    """An input labelled in float32 (0.1 as 0.100000001) makes a store of those labels; the
    truth's float64 0.1 lies 1.5e-9 away, past the labels' tolerance of 1e-9: refused as
    lacking every item, though it is the same data."""
    ds = xr.open_zarr(make_input(tmp_path / "in.zarr")).load()
    times = 0.1 * np.arange(1, 7)
    ds.assign_coords(time=times.astype("float32")).to_zarr(tmp_path / "f32.zarr", zarr_format=3)
    ens = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(tmp_path / "f32.zarr", ens, "ensemble.members=2")]) == 0
    ds.assign_coords(time=times).to_zarr(tmp_path / "t64.zarr", zarr_format=3)
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "t64.zarr"),
                 "--no-figures"]) == 0
    assert _metrics(tmp_path / "ens_eval")["pairing"] == "paired"
    from pipeline.truth_items import same_labels

    # the exact label first, where the truth has it beside another that rounds alike
    near = xr.DataArray(np.array([0.50000001, 0.5]), dims="time")
    assert list(same_labels(np.array([0.5], "float32"), near)) == [0.5]
    # float32 hours since 1970 (steps of 128 s there) against a truth every minute: several
    # round to each, so none is taken (two were paired with the field 60 s before)
    hours = 1.7e9 + 3600 * np.arange(3)
    minutes = xr.DataArray(1.7e9 + 60 * np.arange(200), dims="time")
    taken = same_labels(hours.astype("float32"), minutes)
    assert not np.isin(taken[1:], minutes.values).any()


def test_members_tied_with_the_truth_split_their_ties_anew_at_each_item(paired, tmp_path,
                                                                        monkeypatch):
    """Members all equal to the truth tie at every point: each item must split its ties with
    draws of its own (a generator made anew per item split every item's alike, a bias that
    more items never averaged out), and the figure says why spread/skill is n/a as the table
    does (it said "needs 2 members" of 6)."""
    from pipeline import figures
    from pipeline.scoring import evaluate, table

    tmp, ens = paired
    tied = tmp_path / "tied.zarr"
    shutil.copytree(ens, tied)
    truth = xr.open_zarr(tmp / "truth.zarr").vort.values
    zarr.open_group(tied)["vort"][:] = np.repeat(truth[:, None], 6, axis=1)
    titles, save = [], figures.save

    def saved(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes)
        save(fig, path)

    monkeypatch.setattr(figures, "save", saved)
    metrics, _ = evaluate(tied, tmp / "truth.zarr", out=tmp_path / "e")
    counts = metrics["rank_histogram"].values
    assert counts.sum() == 6 * 16 * 16
    assert (counts % 6).any()  # not six times one item's split
    assert np.abs(counts / counts.sum() - 1 / 7).max() < 0.04  # 4.5 standard errors
    assert re.search(r"spread/skill +n/a \(the ensemble mean is the truth\)", table(metrics))
    assert "rank histogram, spread/skill n/a (the ensemble mean is the truth)" in titles


def test_a_truth_in_other_units_than_the_ensemble_is_refused(paired, tmp_path):
    """K against degC was scored as it stood: a CRPS of 271 labelled K."""
    from pipeline.errors import EvaluationError
    from pipeline.scoring import evaluate

    tmp, ens = paired
    kelvin = tmp_path / "k.zarr"
    shutil.copytree(ens, kelvin)
    zarr.open_group(kelvin)["vort"].attrs["units"] = "K"
    zarr.consolidate_metadata(kelvin)
    truth = xr.open_zarr(tmp / "truth.zarr")
    for units, refused in (("degC", True), (" K", False), ("kelvin", False)):
        path = tmp_path / f"truth_{units.strip()}.zarr"
        truth.vort.attrs["units"] = units
        truth.to_zarr(path, zarr_format=3)
        if refused:
            with pytest.raises(EvaluationError, match=r"truth .*: vort is in 'degC', the "
                               r"ensemble's vort in 'K': convert the truth"):
                evaluate(kelvin, path, out=tmp_path / "e", figures=False)
            assert not (tmp_path / "e").exists()
        else:
            evaluate(kelvin, path, out=tmp_path / "e", figures=False)


def test_an_items_members_scored_in_blocks_score_as_whole(paired, monkeypatch):
    """An item's members were scored whole in float64: 20,000 of 64x64 took 3.3 GB. In
    blocks of members (moments, spectra) and of points (CRPS, RMSE, spread, ranks) every
    figure is the whole item's, the tie-breaks too."""
    from pipeline import scoring

    tmp, ens = paired
    ds = xr.open_zarr(ens)
    truth = xr.open_zarr(tmp / "truth.zarr").vort
    whole = scoring.score(ds, truth, True)
    monkeypatch.setattr(scoring, "BLOCK_BYTES", 8 * 6 * 10)  # 10 points, or 1 member, a block
    blocked = scoring.score(ds, truth, True)
    for name in whole.data_vars:
        np.testing.assert_allclose(blocked[name].values, whole[name].values, rtol=1e-12,
                                   err_msg=name)
    for key, value in whole.attrs.items():
        if isinstance(value, float):
            np.testing.assert_allclose(blocked.attrs[key], value, rtol=1e-12, err_msg=key)
    np.testing.assert_array_equal(blocked.rank_histogram, whole.rank_histogram)


def test_an_items_ties_are_split_alike_in_blocks_and_whole(monkeypatch):
    """Rounded members tie with the truth: the blocks draw their tie-breaks in the order one
    draw of the whole item would, so the rank histogram is the same count for count."""
    from pipeline import scoring

    gen = np.random.default_rng(4)
    e, t = gen.integers(0, 3, (5, 7, 6)).astype("f4"), gen.integers(0, 3, (7, 6)).astype("f8")

    def scored():
        ranks = np.zeros(6, dtype=np.int64)
        figures = scoring._paired_item(e, t, ranks, np.random.default_rng(0))
        return figures, ranks

    whole, ranks_whole = scored()
    monkeypatch.setattr(scoring, "BLOCK_BYTES", 8 * 5 * 4)  # 4 points a block, the last part full
    blocked, ranks_blocked = scored()
    np.testing.assert_allclose(blocked, whole, rtol=1e-14)
    np.testing.assert_array_equal(ranks_blocked, ranks_whole)
    assert ranks_whole.sum() == t.size and (e == t).any()


def test_two_stores_of_one_default_folder_do_not_replace_each_others_scores(paired, tmp_path):
    """pre/a.zarr and pre/a both evaluate into pre/a_eval: the second replaced the first's
    results without a word."""
    import shutil

    from pipeline.errors import EvaluationError
    from pipeline.scoring import evaluate

    tmp, ens = paired
    for name in ("a.zarr", "a"):
        shutil.copytree(ens, tmp_path / name)
    truth = tmp / "truth.zarr"
    evaluate(tmp_path / "a.zarr", truth, figures=False)
    first = (tmp_path / "a_eval" / "metrics.json").read_text()
    with pytest.raises(EvaluationError, match=r"a_eval \(the default --out: the store's name \+ "
                                              r"_eval\) holds the evaluation of another store, "
                                              r".*a\.zarr: give --out"):
        evaluate(tmp_path / "a", truth, figures=False)
    assert (tmp_path / "a_eval" / "metrics.json").read_text() == first
    evaluate(tmp_path / "a.zarr", truth, figures=False)  # its own again, as before
    evaluate(tmp_path / "a", truth, out=tmp_path / "b_eval", figures=False)
    shutil.rmtree(tmp_path / "a.zarr")  # gone (or moved with its folder): the folder is free
    evaluate(tmp_path / "a", truth, figures=False)
    assert _metrics(tmp_path / "a_eval")["store_path"] == str(tmp_path / "a")


@pytest.mark.parametrize("climatology", [False, True])
def test_a_truth_too_large_to_hold_is_refused_before_it_is_read(paired, tmp_path, capsys,
                                                                monkeypatch, climatology):
    """Scoring reads the truth's fields whole: 400000 times of 64 x 64 ended in a MemoryError
    traceback. The fields scored are weighed against the host's memory first, and the line
    says how to score fewer."""
    import pipeline.eval_inputs as eval_inputs

    tmp, ens = paired
    truth = tmp / "truth.zarr"
    if climatology:  # fields along another dim than the ensemble's items: a climatology
        truth = tmp_path / "clim.zarr"
        xr.open_zarr(tmp / "truth.zarr").load().rename(time="sample").to_zarr(truth,
                                                                               zarr_format=3)
    monkeypatch.setattr(eval_inputs, "host_room", lambda sharing=1: (1000, "available on this "
                                                                            "node's host"))
    capsys.readouterr()
    out = tmp_path / "ev"
    assert main(["evaluate", "--no-figures", str(ens), "--truth", str(truth),
                 "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"piadm: error: truth {truth}: the ") and "read at once, and" in line
    assert ("score a stretch of its times (--truth-range FIRST LAST)" if climatology else
            "sample fewer items (input.items or input.range)") in line
    assert not out.exists()


def test_an_allocation_numpy_could_not_make_is_one_line_naming_what_to_lower(monkeypatch):
    """evaluate imports no torch: a MemoryError there was let through as a traceback."""
    import sys

    from pipeline.errors import OutOfMemory, as_user_error

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    err = as_user_error(MemoryError("Unable to allocate 6.25 GiB for an array"), "evaluate")
    assert isinstance(err, OutOfMemory)
    assert str(err) == ("evaluate: out of memory (Unable to allocate 6.25 GiB for an array): "
                        "evaluate holds the truth's fields it scores, and one item's members at "
                        "a time: score fewer truth times (--truth-range), or run it where more "
                        "memory is free")


@pytest.mark.parametrize("command, names", [
    ("plan", "calibrate.members, sampler.window or sampler.block_size"),
    ("bench", "the bench runs bench.members at once (calibrate.members where sampler.tol = "
              "'auto')"),
    ("calibrate", "calibrate runs calibrate.members at once: lower it"),
    ("sample", "lower what runs at once (ensemble.batch_size"),
])
def test_out_of_memory_names_what_the_command_runs_at_once(command, names):
    """plan and bench out of memory gave sample's list (ensemble.batch_size first, which
    neither runs); each names its own now."""
    from pipeline.errors import as_user_error

    err = as_user_error(RuntimeError("DefaultCPUAllocator: can't allocate memory"), command)
    assert str(err).startswith(f"{command}: out of memory (DefaultCPUAllocator: can't allocate "
                               "memory): ") and names in str(err), str(err)
