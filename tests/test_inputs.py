"""Inputs as other tools write them: field dims in another order or under other names,
unsorted, string, duplicated or lead-time labels, any chunking, metadata left stale, a chunk
that cannot be read. Each is used as it means, or refused in one line."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from conftest import conditional_sets, make_input
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.inputs import open_items

ROOT = Path(__file__).resolve().parents[1]

SHAPE = (16, 16)


def _store(path, times, *, dims=("time", "y", "x"), chunk=None, seed=0) -> str:
    """``vort`` over ``dims`` with the item labels ``times`` and physical field coordinates."""
    rng = np.random.default_rng(seed)
    data = (5 + rng.standard_normal((len(times), *SHAPE))).astype("float32")
    coords = {dims[0]: times, dims[1]: 0.5 * np.arange(SHAPE[0]),
              dims[2]: 100 + np.arange(SHAPE[1])}
    ds = xr.Dataset({"vort": (dims, data)}, coords=coords)
    if chunk:
        ds = ds.chunk({dims[0]: chunk})
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    return str(path)


def _open(path, **kwargs):
    return open_items(str(path), variable="vort", dim="time", shape=SHAPE, **kwargs)


def test_fields_stored_x_first_are_refused_before_anything_is_written(tmp_path, capsys):
    """By position they would be taken transposed, and labelled so: the user is told to
    write them (y, x), for sampling and for training alike."""
    ds = xr.open_zarr(make_input(tmp_path / "yx.zarr")).load()
    ds.transpose("time", "x", "y").to_zarr(tmp_path / "xy.zarr", zarr_format=3,
                                           consolidated=False)
    out = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(tmp_path / "xy.zarr", out)]) == 2
    assert (f"input: vort of {tmp_path / 'xy.zarr'} has its fields as ('x', 'y'), piadm's are "
            "('y', 'x'): write them in that order, e.g. ds.transpose('time', 'y', 'x')"
            ) in capsys.readouterr().err
    assert not out.exists()
    from pipeline.train_data import open_training_store

    with pytest.raises(InputError, match=r"train.data .*xy.zarr: vort has its fields as"):
        open_training_store(str(tmp_path / "xy.zarr"), {"vort": "train.variable"}, "train.data")
    # axes with a suffix, as generate-data names a coarse field's: the same refusal
    coarse = ds.rename(y="y_coarse", x="x_coarse").transpose("time", "x_coarse", "y_coarse")
    coarse.to_zarr(tmp_path / "xyc.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match=r"has its fields as \('x_coarse', 'y_coarse'\), "
                                         r"piadm's are \('y_coarse', 'x_coarse'\)"):
        _open(tmp_path / "xyc.zarr")
    with pytest.raises(InputError, match=r"train.data .*xyc.zarr: vort has its fields as"):
        open_training_store(str(tmp_path / "xyc.zarr"), {"vort": "train.variable"}, "train.data")
    coarse.transpose("time", "y_coarse", "x_coarse").to_zarr(
        tmp_path / "yxc.zarr", zarr_format=3, consolidated=False)
    # (y, x): taken
    open_training_store(str(tmp_path / "yxc.zarr"), {"vort": "train.variable"}, "train.data")
    # (lon, lat) was taken transposed, its longitudes labelling the store's y
    geo = ds.rename(y="lat", x="lon").transpose("time", "lon", "lat")
    geo.to_zarr(tmp_path / "lonlat.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match=r"has its fields as \('lon', 'lat'\), longitude first; "
                                         r"piadm's are \(y, x\), latitude first: .*"
                                         r"ds.transpose\('time', 'lat', 'lon'\)"):
        _open(tmp_path / "lonlat.zarr")
    geo.transpose("time", "lat", "lon").to_zarr(tmp_path / "latlon.zarr", zarr_format=3,
                                                consolidated=False)
    assert len(_open(tmp_path / "latlon.zarr").labels) == 6  # (lat, lon): taken
    # in capitals, or a WRF or rotated-pole grid: taken transposed, unseen
    for name, (y, x) in {"XY": ("Y", "X"), "we": ("south_north", "west_east"),
                         "rot": ("rlat", "rlon")}.items():
        ds.rename(y=y, x=x).transpose("time", x, y).to_zarr(
            tmp_path / f"{name}.zarr", zarr_format=3, consolidated=False)
        with pytest.raises(InputError, match=rf"has its fields as \('{x}', '{y}'\)"):
            _open(tmp_path / f"{name}.zarr")


def test_field_dims_named_otherwise_keep_their_coordinates_by_position(tmp_path):
    path = _store(tmp_path / "ll.zarr", pd.date_range("2020-01-01", periods=2),
                  dims=("time", "lat", "lon"))
    coords = _open(path).coords(coarse=False)
    assert (coords["y"][0] == 0.5 * np.arange(16)).all() and coords["y"][1]["input_dim"] == "lat"
    assert (coords["x"][0] == 100 + np.arange(16)).all() and coords["x"][1]["input_dim"] == "lon"


def test_a_training_grid_named_otherwise_gives_the_store_its_coordinates_by_position(tmp_path):
    """A network trained on (time, lat, lon) fields recorded its grid under those names: the
    store's y and x take it, as they take an input's."""
    from pipeline.config import load_config
    from pipeline.run_items import store_spec
    from pipeline.inputs import unconditional

    cfg = load_config("jobs/configs/grf.toml", ["model.shape=[4, 4]"])
    grid = {"coords": {"lat": {"values": [0.0, 1.0, 2.0, 3.0], "attrs": {"units": "degrees"}},
                       "lon": {"values": [10.0, 11.0, 12.0, 13.0], "attrs": {}}}, "attrs": {}}
    coords = store_spec(cfg, unconditional(), (4, 4), grid=grid).coords
    assert list(coords["y"][0]) == [0.0, 1.0, 2.0, 3.0] and coords["y"][1]["units"] == "degrees"
    assert list(coords["x"][0]) == [10.0, 11.0, 12.0, 13.0]
    assert (coords["y"][1]["input_dim"], coords["x"][1]["input_dim"]) == ("lat", "lon")
    # the sidecar names the dims in order: one coordinate alone lands on its own dim
    grid = {"dims": ["lat", "lon"], "coords": {"lon": grid["coords"]["lon"]}, "attrs": {}}
    coords = store_spec(cfg, unconditional(), (4, 4), grid=grid).coords
    assert "y" not in coords and list(coords["x"][0]) == [10.0, 11.0, 12.0, 13.0]


def test_a_range_selects_by_value_on_unsorted_labels(tmp_path):
    times = pd.to_datetime(["2020-01-01", "2020-01-04", "2020-01-02", "2020-01-03"])
    path = _store(tmp_path / "u.zarr", times)
    picked = _open(path, span=("2020-01-01", "2020-01-02")).labels
    assert list(picked) == list(pd.to_datetime(["2020-01-01", "2020-01-02"]).values)
    descending = _store(tmp_path / "d.zarr", times.sort_values()[::-1])
    assert len(_open(descending, span=("2020-01-02", "2020-01-03")).labels) == 2


def test_string_and_lead_time_labels_are_picked_by_their_text(tmp_path):
    names = _store(tmp_path / "s.zarr", np.array(["a", "c", "b"]))
    assert list(_open(names, items=("b", "a")).labels) == ["b", "a"]
    leads = _store(tmp_path / "lead.zarr", pd.to_timedelta([0, 6, 12], unit="h"))
    assert list(_open(leads, items=("6h",)).labels) == [np.timedelta64(6 * 3600 * 10**9, "ns")]
    # bytes, as a netCDF char array's labels come: no text matched them, a range failed in
    # a traceback (no ufunc >= for bytes and str)
    chars = _store(tmp_path / "b.zarr", np.array([b"a", b"c", b"b"]))
    assert list(_open(chars, items=("b", "a")).labels) == [b"b", b"a"]
    assert list(_open(chars, span=("a", "b")).labels) == [b"a", b"b"]
    with pytest.raises(InputError, match=r"are not in time \(it runs a \.\. c\)"):
        _open(chars, items=("d",))


def test_an_infinite_float_label_is_not_snapped_to_the_first(tmp_path):
    """``inf`` lies within any relative tolerance of every label: input.range [-inf, inf]
    took the first item alone, exit 0. It is an open end now, and a label of its own."""
    path = _store(tmp_path / "f.zarr", np.array([34.0, 38.0, 42.0]))
    assert list(_open(path, span=("-inf", "inf")).labels) == [34.0, 38.0, 42.0]
    assert list(_open(path, span=("36", "1e400")).labels) == [38.0, 42.0]
    with pytest.raises(InputError, match=r"input.items \['inf'\] are not in time"):
        _open(path, items=("inf",))
    ends = _store(tmp_path / "e.zarr", np.array([0.0, 6.0, np.inf]))
    assert list(_open(ends, items=("inf",)).labels) == [np.inf]


def test_model_calendar_times_are_picked_kept_and_printed_as_dates(tmp_path, capsys):
    """A climate model's noleap times: picked and ranged by their text on their calendar,
    kept on it in the store, printed as dates; a date the calendar lacks is one line."""
    import cftime

    times = xr.date_range("2000-02-27", periods=4, calendar="noleap", use_cftime=True)
    path = _store(tmp_path / "noleap.zarr", times)
    assert list(_open(path, items=("2000-03-01",)).labels) == [times[2]]
    assert len(_open(path, span=("2000-02-28", "2000-03-02")).labels) == 3  # no 29 February
    with pytest.raises(InputError, match="label '2000-02-29' is not a valid time value "
                                         r"\(dtype object, a date of its noleap calendar: "
                                         "YYYY-MM-DD, then HH, HH:MM or HH:MM:SS"):
        _open(path, items=("2000-02-29",))
    # the hour alone, as numpy takes it for a datetime64 coordinate
    assert list(_open(path, items=("2000-03-01T00",)).labels) == [times[2]]
    # a 360-day year's 30 February, and a year 0, which numpy's Gregorian dates do not hold
    days = xr.date_range("0000-02-29", periods=3, calendar="360_day", use_cftime=True)
    other = _store(tmp_path / "360.zarr", days)
    assert list(_open(other, items=("0000-02-30", "0000-03-01 00:00")).labels) == list(days[1:])
    out = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(
        path, out, "input.items=['2000-02-28', '2000-03-01']", "ensemble.members=2")]) == 0
    assert "time 2000-03-01:" in capsys.readouterr().err
    stored = xr.open_zarr(out).time.values
    assert list(stored) == [times[1], times[2]] and isinstance(stored[0], cftime.datetime)


@pytest.mark.parametrize("times, needle", [
    (pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-02"]),
     "input: vort's time holds 2020-01-02 more than once"),
    (pd.to_datetime([]), "input: vort has no time items"),
])
def test_repeated_or_no_labels_are_refused_in_one_line(tmp_path, times, needle):
    with pytest.raises(InputError, match=needle):
        _open(_store(tmp_path / "r.zarr", times))


def test_the_statistics_do_not_depend_on_the_chunks(tmp_path):
    times = np.arange(30.0)
    one, many = (_open(_store(tmp_path / f"{c}.zarr", times, chunk=c)) for c in (1, 30))
    assert (one.mean, one.std, one.fingerprint) == (many.mean, many.std, many.fingerprint)
    values = xr.open_zarr(tmp_path / "1.zarr").vort.values.astype("float64")
    assert one.mean == pytest.approx(values.mean(), rel=1e-14)
    assert one.std == pytest.approx(values.std(), rel=1e-12)


def test_times_added_since_the_metadata_was_consolidated_are_seen(tmp_path):
    path = _store(tmp_path / "c.zarr", np.arange(3.0))
    zarr.consolidate_metadata(path)
    group = zarr.open_group(path, mode="r+", use_consolidated=False)  # as another tool grows it
    group["vort"].resize((5, *SHAPE))
    group["time"].resize((5,))
    group["time"][3:] = [3.0, 4.0]
    group["vort"][3:] = 1.0
    assert list(_open(path, items=("4",)).labels) == [4.0]


def test_an_unreadable_chunk_is_one_line_naming_the_input(tmp_path):
    path = _store(tmp_path / "bad.zarr", np.arange(4.0), chunk=2)
    (tmp_path / "bad.zarr" / "vort" / "c" / "1" / "0" / "0").write_bytes(b"not a chunk")
    with pytest.raises(InputError, match=f"input.path {path}: reading vort failed .* a chunk "
                                         "is unreadable; rewrite or restore the store"):
        _open(path)


def test_a_store_is_not_resumed_once_its_selection_holds_other_items(tmp_path, capsys):
    """Times appended to the input inside input.range: the store holds the old selection's
    items, so the rerun is refused, naming both, and the store stays as it was."""
    path = make_input(tmp_path / "in.zarr", times=4)
    out = tmp_path / "ens.zarr"
    sets = conditional_sets(path, out, "input.range=['2020-01-01', '2020-12-31']")
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    make_input(tmp_path / "in.zarr", times=6)  # the same four, and two more
    capsys.readouterr()
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 2
    assert (f"output {out} holds the time items 4 (2020-01-01 .. 2020-01-04) and the selection "
            f"of input {path} is now 6 (2020-01-01 .. 2020-01-06): select the store's items"
            ) in capsys.readouterr().err
    assert xr.open_zarr(out).sizes["time"] == 4


def test_a_selection_spelled_otherwise_resumes_the_store_that_names_the_same_items(tmp_path,
                                                                                 capsys):
    """input.range = ['2020-01-02', '2020-01-03'] and input.items naming those two days are
    the same items with the same noise: the store of one was refused to the other as
    another configuration's. Items of another selection still are."""
    path = make_input(tmp_path / "in.zarr", times=4)
    out = tmp_path / "ens.zarr"

    def run(*sets):
        return main(["sample", "jobs/configs/grf.toml", *conditional_sets(path, out, *sets)])

    assert run("input.range=['2020-01-02', '2020-01-03']", "parallel.items=[0]") == 0
    capsys.readouterr()
    assert run("input.items=['2020-01-02', '2020-01-03']") == 0
    assert "resumed: 6 of 12 members done, 6 to sample" in capsys.readouterr().err
    whole = tmp_path / "whole.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(
        path, whole, "input.range=['2020-01-02', '2020-01-03']")]) == 0
    np.testing.assert_array_equal(xr.open_zarr(out).vort.values, xr.open_zarr(whole).vort.values)
    capsys.readouterr()
    assert run("input.items=['2020-01-02']") == 2  # another selection: another store
    err = capsys.readouterr().err
    assert "it differs in input." in err
    # more items cannot join it: where they go, and the noise trap of the same seed
    assert ("items are not added to a store: sample the new ones into another output.path "
            "with a sampler.seed of its own") in err
    assert run("input.items=['2020-01-02']", "sampler.seed=3") == 2
    assert "rerun its own config to resume it" in capsys.readouterr().err  # not items alone


def test_a_label_repeated_outside_the_selection_does_not_matter(tmp_path):
    times = pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-03"])
    path = _store(tmp_path / "r.zarr", times)
    assert len(_open(path, span=("2020-01-01", "2020-01-02")).labels) == 2
    assert len(_open(path, items=("2020-01-02",)).labels) == 1
    with pytest.raises(InputError, match="holds 2020-01-03 more than once"):
        _open(path, items=("2020-01-03",))


def test_a_resumed_store_keeps_the_input_scale_it_recorded(tmp_path, capsys):
    """Its members so far were drawn with the recorded input_mean and input_std: the rest
    take the same, even where another piadm rounded them otherwise."""
    path = make_input(tmp_path / "in.zarr")
    out = tmp_path / "ens.zarr"
    sets = conditional_sets(path, out, "ensemble.members=4")
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    whole = xr.open_zarr(out).vort.values
    group = zarr.open_group(out, mode="r+")
    group["done"][:, 2:] = 0  # the last members to draw again
    recorded = group.attrs["input_mean"]
    group.attrs["input_mean"] = recorded * (1 + 1e-6)  # as another version would round it
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    again = xr.open_zarr(out).vort.values
    assert not np.array_equal(again[:, 2:], whole[:, 2:])  # drawn with the recorded scale
    np.testing.assert_array_equal(again[:, :2], whole[:, :2])
    np.testing.assert_allclose(again, whole, rtol=0, atol=1e-3)


def test_the_items_of_a_chunk_are_read_from_the_store_once(tmp_path):
    from dask.callbacks import Callback

    class Reads(Callback):
        def __init__(self):
            super().__init__()
            self.count = 0

        def _start(self, dsk):
            self.count += 1

    path = _store(tmp_path / "c.zarr", np.arange(6.0), chunk=3)
    items = _open(path, check=False)
    whole = xr.open_zarr(path).vort.values.astype("float64")
    with Reads() as reads:
        fields = [items.field(i) for i in range(6)]
    assert reads.count == 2  # one a chunk, not one an item
    np.testing.assert_array_equal(np.stack(fields), whole)
    np.testing.assert_array_equal(items.field(1), whole[1])  # back to the first chunk


@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_fields_that_are_not_real_numbers_are_refused(tmp_path, dtype):
    """A complex field taken as floats would lose its imaginary part unseen."""
    from pipeline.train_data import open_training_store

    ds = xr.open_zarr(make_input(tmp_path / "real.zarr")).load()
    odd = ds.assign(vort=ds["vort"].astype(dtype))
    odd.to_zarr(tmp_path / "odd.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match=f"holds {dtype} values: piadm's fields are real"):
        _open(tmp_path / "odd.zarr")
    with pytest.raises(InputError, match=f"train.data .*odd.zarr: vort holds {dtype} values"):
        open_training_store(str(tmp_path / "odd.zarr"), {"vort": "train.variable"}, "train.data")


def test_an_input_in_another_unit_than_the_network_was_trained_in_is_refused(tmp_path, capsys):
    """The shipped downscaler was trained on vorticity of std about 4: an input a million
    times larger (another unit) overflowed the network, and the run's NaN blamed the
    network's parameters after the store was made. Fields of the training scale pass."""
    from models import build_model
    from pipeline.config import load_config
    from pipeline.run_items import check_input_units, load_items

    rng = np.random.default_rng(0)
    coarse = (4 * rng.standard_normal((2, 16, 16))).astype("float32")
    for name, scale in (("same.zarr", 1.0), ("mega.zarr", 1e6), ("tiny.zarr", 1e-4)):
        xr.Dataset({"c": (("time", "y", "x"), scale * coarse),
                    "vorticity_coarse": (("time", "y", "x"), scale * coarse)},
                   coords={"time": [1.0, 2.0]}).to_zarr(tmp_path / name, zarr_format=3,
                                                        consolidated=False)
    sets = ["--set", "input.variable=c", "--set", "input.range=[]", "--set",
            "ensemble.members=1", "--set", "ensemble.batch_size=1"]
    out = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/kolmogorov_down.toml", *sets, "--set",
                 f"input.path={tmp_path / 'mega.zarr'}", "--set", f"output.path={out}"]) == 2
    err = capsys.readouterr().err
    assert "the input is in another unit than the network was trained in" in err
    assert re.search(r"has mean \S+ and std [34]\.\d+e\+06, where the network's training "
                     r"fields had mean \S+ and std 3\.97", err), err
    assert not out.exists()
    cfg = load_config("jobs/configs/kolmogorov_down.toml",
                      [s for s in sets if s != "--set"] + [f"input.path={tmp_path / 'same.zarr'}"])
    model = build_model(cfg.model, "cpu")
    capsys.readouterr()
    check_input_units(cfg, model, load_items(cfg, check=True, model=model))  # taken
    # under another name than its training condition: taken, with a warning to check it
    assert ("piadm: warning: the network was conditioned on 'vorticity_coarse' in training, "
            "and input: c of") in capsys.readouterr().err
    # a unit ten thousand times smaller: fields of almost no spread, warned of too
    named = [s for s in sets if s not in ("--set", "input.variable=c")]
    cfg = load_config("jobs/configs/kolmogorov_down.toml",
                      named + [f"input.path={tmp_path / 'same.zarr'}"])
    check_input_units(cfg, model, load_items(cfg, check=True, model=model))
    assert "warning" not in capsys.readouterr().err  # its own name and scale: nothing said
    cfg = load_config("jobs/configs/kolmogorov_down.toml",
                      named + [f"input.path={tmp_path / 'tiny.zarr'}"])
    check_input_units(cfg, model, load_items(cfg, check=True, model=model))
    assert "of its spread): check that the input is the same quantity" in capsys.readouterr().err


def test_float_labels_are_written_to_their_digits_less_a_sums_rounding():
    """A sum of steps' rounding is not a label's text (0.30000000000000004 is 0.3), but the
    digits of a large label are (a millisecond timestamp kept whole)."""
    from pipeline.labels import label_text

    assert label_text(0.2 + 0.1) == "0.3" and label_text(np.float32(1.7)) == "1.7"
    assert label_text(np.float64(1609459200123.0)) == "1609459200123.0"
    assert label_text(np.float64(1609459200121.0)) == "1609459200121.0"


def test_output_variable_written_out_as_the_name_the_store_took_resumes_it(tmp_path, capsys):
    """A store made without output.variable takes the input's name; the same config naming
    that variable makes the same store, and was refused as another configuration's."""
    path = make_input(tmp_path / "in.zarr", times=2)
    out = tmp_path / "ens.zarr"

    def run(*sets):
        return main(["sample", "jobs/configs/grf.toml", *conditional_sets(path, out, *sets)])

    assert run("parallel.items=[0]") == 0
    capsys.readouterr()
    assert run("output.variable=vort") == 0
    assert "resumed" in capsys.readouterr().err
    assert run("output.variable=other") == 2  # another name: another store
    assert "it differs in output.variable" in capsys.readouterr().err


def test_a_relative_path_not_found_says_the_folder_it_was_read_from(tmp_path, monkeypatch,
                                                                    capsys):
    """A config run from another folder (jobs/, a notebook's) named files that were there
    from the repository's: the message said only that they were not files."""
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(ROOT / "jobs/configs/demo.toml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (f"model.checkpoint = 'models/checkpoints/kolmogorov_down.pt' is not a file (a "
            f"relative path, read from {tmp_path})") in err
    assert main(["sample", str(ROOT / "jobs/configs/grf.toml"), "--dry-run", "--set",
                 "input.path=in.zarr", "--set", "input.variable=v", "--set",
                 "model.condition=mean"]) == 2
    assert f"input.path in.zarr does not exist (a relative path, read from {tmp_path})" in \
        capsys.readouterr().err


def test_training_data_and_truth_are_read_as_listed_not_as_stale_consolidated_metadata(
        tmp_path):
    """Times appended by a tool that left the consolidated metadata as it was: sampling read
    them, but training took the first 4 of 6 times, silently, and evaluate refused them."""
    from pipeline.eval_inputs import open_truth
    from pipeline.train_data import open_training_store

    ds = xr.open_zarr(make_input(tmp_path / "in.zarr")).load()
    for v in ds.variables.values():
        v.encoding = {}  # written anew, as another tool would
    path = tmp_path / "stale.zarr"
    ds.isel(time=slice(0, 4)).to_zarr(path, zarr_format=2, consolidated=True)
    ds.isel(time=slice(4, 6)).to_zarr(path, append_dim="time", zarr_format=2,
                                      consolidated=False)
    assert xr.open_zarr(path).sizes["time"] == 4  # what the stale metadata says
    opened = open_training_store(str(path), {"vort": "train.variable"}, "train.data")
    assert opened.sizes["time"] == 6
    ens = xr.Dataset({"vort": (("time", "member", "y", "x"), np.zeros((6, 1, 16, 16)))},
                     coords={"time": ds.time.values})
    truth, paired = open_truth(path, "vort", ens)
    assert paired and truth.sizes["time"] == 6


def test_a_coarse_input_running_the_other_way_from_the_training_grid_is_refused(tmp_path,
                                                                                capsys):
    """Latitudes stored 90 .. -90, as archives hold them: sampled by position, the members
    came out upside down under the training grid's ascending coordinates, and evaluate then
    scored them against the truth flipped back."""
    rng = np.random.default_rng(0)
    coarse = (4 * rng.standard_normal((2, 16, 16))).astype("float32")
    y = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    for name, ys in (("down.zarr", y[::-1]), ("up.zarr", y)):
        xr.Dataset({"vorticity_coarse": (("time", "y_coarse", "x_coarse"), coarse)},
                   coords={"time": [1.0, 2.0], "y_coarse": ys, "x_coarse": y}).to_zarr(
            tmp_path / name, zarr_format=3, consolidated=False)
    sets = ["--set", "input.range=[]", "--set", "ensemble.members=1", "--set",
            "ensemble.batch_size=1", "--set", f"output.path={tmp_path / 'ens.zarr'}"]
    assert main(["sample", "jobs/configs/kolmogorov_down.toml", *sets, "--set",
                 f"input.path={tmp_path / 'down.zarr'}"]) == 2
    assert re.search(r"has y_coarse descending \(5\.89049 \.\. 0\), the other way from the "
                     r"model's training grid \(y 0 \.\. \S+\): by position its members would "
                     r"come out flipped; write it the training's way, e.g. "
                     r"ds\.isel\(y_coarse=slice\(None, None, -1\)\)", capsys.readouterr().err)
    assert not (tmp_path / "ens.zarr").exists()
    for name, rc in (("down.zarr", 2), ("up.zarr", 0)):  # the dry run refuses it too
        assert main(["sample", "jobs/configs/kolmogorov_down.toml", *sets, "--dry-run",
                     "--set", f"input.path={tmp_path / name}"]) == rc


def test_an_extra_axis_of_one_is_named_not_taken_for_a_field_size(tmp_path):
    """A pressure level of one was told as "fields are [1, 16, 16] but must equal model.shape
    = [16, 16]: ... set model.shape", advice that cannot work."""
    ds = xr.open_zarr(make_input(tmp_path / "in.zarr")).load()
    ds.expand_dims(level=[850.0], axis=1).to_zarr(tmp_path / "lev.zarr", zarr_format=3,
                                                  consolidated=False)
    with pytest.raises(InputError, match=r"input: vort has dims \('time', 'level', 'y', 'x'\), "
                                         r"with level of size 1 beside the field's: write the "
                                         r"fields alone, e.g. ds.isel\(level=0\)"):
        _open(tmp_path / "lev.zarr")
    ds.expand_dims(level=[850.0], ens=[0], axis=(1, 2)).to_zarr(
        tmp_path / "two.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match=r"with level, ens of size 1 .* ds.isel\(level=0, ens=0\)"):
        _open(tmp_path / "two.zarr")


def test_masked_points_are_named_as_masked_not_as_a_generate_data_run_cut_short(tmp_path):
    ds = xr.open_zarr(make_input(tmp_path / "in.zarr")).load()
    v = ds.vort.values.copy()
    v[2, 3, 3] = -999.0
    ds["vort"] = (ds.vort.dims, v, {"missing_value": -999.0})  # read back as NaN
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(tmp_path / "m.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(InputError) as err:
        _open(tmp_path / "m.zarr")
    assert str(err.value) == ("input: vort has masked (its _FillValue or missing_value) or "
                              "NaN/Inf points at time = 2020-01-03 (1 item(s)): fix the data "
                              "or leave those items out")


def test_a_whole_number_written_as_a_float_picks_an_integer_label():
    """"20.0" on an integer coordinate was "not a valid step value", where "25" picks 25.0 on
    a float one."""
    from pipeline.labels import label_value

    coord = xr.DataArray(np.arange(30), dims="step", name="step")
    key = "input.items"
    assert [label_value(t, coord, key) for t in ("20", "20.0", "2e1")] == [20, 20, 20]
    assert label_value("9007199254740993.0", coord, key) == 9007199254740993  # not via a float
    with pytest.raises(InputError, match="label '2.5' is not a valid step value"):
        label_value("2.5", coord, "input.items")


def test_a_time_label_with_a_time_zone_is_refused_naming_its_utc_time():
    """numpy took "...+02:00" with a warning, as a UTC time; the coordinate holds none."""
    import warnings

    from pipeline.labels import label_value

    coord = xr.DataArray(pd.date_range("2020-01-01", periods=3), dims="time", name="time")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (label_value("2020-01-02T06:00", coord, "input.items")
                == np.datetime64("2020-01-02T06:00"))
        for text, zone, utc in (("2020-01-02T00:00+02:00", "+02:00", "2020-01-01T22:00"),
                                ("2020-01-02 00-0530", "-0530", "2020-01-02T05:30"),
                                ("2020-01-02T00:00Z", "Z", "2020-01-02T00:00")):
            with pytest.raises(InputError) as err:
                label_value(text, coord, "input.items")
            assert str(err.value) == (
                f"input.items: label {text!r} has a time zone ({zone}), which the time "
                f"coordinate's times do not hold: give the time as the coordinate counts it, "
                f"e.g. {utc!r} where that is UTC")


def test_an_axis_runs_one_way_only_where_every_step_does():
    """The orientation check's verdict: an unsigned axis's difference wrapped (3 .. 0 read as
    ascending), a NaN at an end was a traceback, longitudes rolled to start at 180 were
    called descending."""
    from pipeline.inputs import direction

    assert direction(np.array([3, 2, 1, 0], dtype="uint16")) == -1
    assert direction([0.0, 1.0, 2.0]) == 1 and direction([2.0, 1.0, 0.0]) == -1
    assert direction([0.0, np.nan, 2.0]) == direction([180, 270, 0, 90]) == 0
    assert direction([5.0]) == direction(np.array(["a", "b"])) == 0


def test_coordinates_rolled_or_the_same_points_relabelled():
    """Longitudes from -180 for a grid from 0 are a roll; relabelled in place ((lon + 180) %
    360 - 180 without sorting) they are the same points, which the extra stores' check
    refused; NaN coordinates alike are alike."""
    from pipeline.inputs import rolled, same_points

    lon = np.arange(0.0, 360.0, 45.0)
    assert rolled(np.roll(lon, 2), lon)
    assert rolled(np.sort((lon + 180) % 360 - 180), lon, periodic=True)
    relabelled = (lon + 180) % 360 - 180
    assert same_points(relabelled, lon, periodic=True) and not rolled(relabelled, lon, True)
    assert not rolled(lon[::-1], lon) and not rolled(lon + 10, lon)
    assert same_points([0.0, np.nan], [0.0, np.nan])
    # 360 apart is the same only for longitudes: an x of 0 .. 2 is not one of 360 .. 362
    assert not same_points([0.0, 1.0, 2.0], [360.0, 361.0, 362.0])
    assert same_points([0.0, 1.0, 2.0], [360.0, 361.0, 362.0], periodic=True)


def test_times_in_units_no_calendar_takes_are_said_as_such(tmp_path, capsys):
    """"months since 2000-01-01" (xarray decodes no such unit): the input was said to need
    cftime, installed already, and the same file as a truth was "not a Zarr store"."""
    ds = xr.Dataset({"vort": (("time", "y", "x"), np.zeros((2, *SHAPE), "float32"))},
                    coords={"time": ("time", [0, 1], {"units": "months since 2000-01-01"})})
    ds.to_zarr(tmp_path / "months.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match=r"its time coordinate cannot be decoded \(unable to "
                                         r"decode time units 'months since 2000-01-01'"):
        _open(tmp_path / "months.zarr")
    made = make_input(tmp_path / "in.zarr")
    ens = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(made, ens, "ensemble.members=2")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "months.zarr")]) == 2
    assert "its time coordinate cannot be decoded" in capsys.readouterr().err


def test_data_in_a_group_of_the_store_is_pointed_at(tmp_path, capsys):
    """xarray's to_zarr(..., group="g1") leaves the store's root empty: the input was "not in"
    it ("it has no variables"), the truth had "no variable 'vort' (it has )"."""
    xr.open_zarr(make_input(tmp_path / "in.zarr")).load().to_zarr(
        tmp_path / "grp.zarr", group="g1", zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match=r"its data lies in the group\(s\) g1: set input.path "
                                         r"to '.*grp.zarr/g1'"):
        _open(tmp_path / "grp.zarr")
    assert len(_open(tmp_path / "grp.zarr" / "g1").labels) == 6
    ens = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(tmp_path / "in.zarr", ens, "ensemble.members=2")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--truth", str(tmp_path / "grp.zarr")]) == 2
    assert "has no variables: its data lies in the group(s) g1: set --truth to" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("value, dtype, needle", [
    (np.inf, "float32", "has NaN/Inf at time = 2020-01-03"),
    (1e200, "float32", "holds values too large to square in float64 at time = 2020-01-03"),
    (1e100, "float32", "would pass what float32 (sampler.dtype, the store's) holds"),
])
def test_values_past_the_stores_range_are_one_line_before_the_store(tmp_path, capsys, value,
                                                                     dtype, needle):
    """An Inf, or finite values whose moments overflow float64 or whose members would overflow
    the store's dtype: one line, with none of numpy's overflow warnings before it, and no
    store made (values of 1e100 were sampled, then failed at the first write)."""
    import warnings

    data = np.random.default_rng(0).standard_normal((6, *SHAPE))
    data[2, 3, 4] = value
    xr.Dataset({"vort": (("time", "y", "x"), data)},
               coords={"time": pd.date_range("2020-01-01", periods=6)}).to_zarr(
        tmp_path / "in.zarr", zarr_format=3, consolidated=False)
    out = tmp_path / "ens.zarr"
    sets = conditional_sets(tmp_path / "in.zarr", out, f"sampler.dtype={dtype}")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert main(["sample", "jobs/configs/grf.toml", *sets]) == 2
    assert not [w for w in said if issubclass(w.category, RuntimeWarning)], said
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1], err
    assert not out.exists()


def test_values_of_1e100_are_sampled_in_float64(tmp_path):
    data = 1e100 * (5 + np.random.default_rng(0).standard_normal((6, *SHAPE)))
    xr.Dataset({"vort": (("time", "y", "x"), data)},
               coords={"time": pd.date_range("2020-01-01", periods=6)}).to_zarr(
        tmp_path / "in.zarr", zarr_format=3, consolidated=False)
    out = tmp_path / "ens.zarr"
    sets = conditional_sets(tmp_path / "in.zarr", out, "sampler.dtype=float64",
                            "parallel.items=[0]", "ensemble.members=2")
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    members = xr.open_zarr(out)["vort"].isel(time=0).values
    assert np.isfinite(members).all() and 1e99 < np.abs(members).mean() < 1e102


def test_an_input_selection_is_read_through_once_until_its_files_change(tmp_path,
                                                                        monkeypatch):
    """A resume, a grown store and every job of an array after the first streamed over the
    whole selection again (a minute per 10 GB): its statistics are kept under its files'
    sizes, times and inodes, and measured again once a file is rewritten."""
    import os
    import shutil

    from pipeline import input_cache, inputs

    monkeypatch.setattr(input_cache, "CACHED_FROM_BYTES", 0)  # kept from 64 MiB: these are tiny
    passes = []
    measured = inputs._measured_statistics
    monkeypatch.setattr(inputs, "_measured_statistics",
                        lambda var, path: passes.append(path) or measured(var, path))
    path = make_input(tmp_path / "in.zarr")
    out = tmp_path / "ens.zarr"

    def run(*extra):
        assert main(["sample", "jobs/configs/grf.toml",
                     *conditional_sets(path, out, "ensemble.members=2", *extra)]) == 0

    run("parallel.items=[0]")
    run("parallel.items=[1]")  # another job of the array
    run("ensemble.members=4")  # the store grown
    assert len(passes) == 1
    chunk = next(p for p in Path(path, "vort").rglob("*") if p.is_file() and "c" in p.parts)
    chunk.write_bytes(chunk.read_bytes())  # rewritten as it was: another mtime
    os.utime(chunk, ns=(1, 1))
    run("ensemble.members=4")
    assert len(passes) == 2
    other = _store(tmp_path / "other.zarr", pd.date_range("2020-01-01", periods=6))
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(other, tmp_path / "o.zarr", "ensemble.members=2")]) == 0
    assert len(passes) == 3
    # chunks in a linked folder (a store put together from parts): followed, so a chunk
    # rewritten there is seen (a second reader found such a change read as the old input)
    shutil.move(Path(other, "vort", "c"), tmp_path / "parts")
    Path(other, "vort", "c").symlink_to(tmp_path / "parts")
    linked = tmp_path / "linked.zarr"
    sample_linked = ["sample", "jobs/configs/grf.toml",
                     *conditional_sets(other, linked, "ensemble.members=2")]
    assert main(sample_linked) == 0 and len(passes) == 3  # the same files, moved
    chunk = next(p for p in (tmp_path / "parts").rglob("*") if p.is_file())
    os.utime(chunk, ns=(2, 2))
    assert main(sample_linked) == 0 and len(passes) == 4
    # a variable of more files than its selection is worth listing, or a small selection:
    # measured, not kept
    var = xr.open_zarr(other, consolidated=False)["vort"]
    assert input_cache.selection_key(var, other) is not None
    monkeypatch.setattr(input_cache, "LISTED_ANYWAY", 0)
    monkeypatch.setattr(input_cache, "FILES_PER_MIB", 0)
    assert input_cache.selection_key(var, other) is None
    monkeypatch.setattr(input_cache, "CACHED_FROM_BYTES", var.nbytes + 1)
    assert input_cache.selection_key(var, other) is None


def test_an_input_cache_that_cannot_be_kept_is_done_without_unsaid(tmp_path, monkeypatch,
                                                                    capsys):
    """A read-only or blocked $PIADM_CACHE (a compute node's HOME) cost every conditioned run
    two warnings where it had none: the input's statistics are a saving it does without."""
    from pipeline import input_cache

    monkeypatch.setattr(input_cache, "CACHED_FROM_BYTES", 0)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("PIADM_CACHE", str(blocked))
    path = make_input(tmp_path / "in.zarr")
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(path, tmp_path / "ens.zarr", "ensemble.members=2")]) == 0
    err = capsys.readouterr().err
    assert "cannot read the cache" not in err and "cannot keep" not in err, err


def test_a_grid_computed_in_float32_names_the_same_points_as_in_float64():
    """Near zero a float32 grid is 1e-7 off its float64 twin, which a tolerance relative to
    the values refused (training's extra stores); evaluate's truth had its own test."""
    from pipeline.inputs import rolled, same_points

    wide = np.arange(64) * 0.1 - 3.2
    steps = np.full(63, 0.1, dtype=np.float32)  # summed in float32, as a model's grid may be
    narrow = np.cumsum(np.r_[np.float32(-3.2), steps], dtype=np.float32)
    assert abs(float(narrow[32]) - wide[32]) > 1e-7 and same_points(narrow, wide)
    assert same_points(np.arange(-180, 180, 10.0), np.r_[np.arange(180, 360, 10.0),
                                                         np.arange(0, 180, 10.0)], periodic=True)
    assert not same_points(wide + 0.05, wide) and not same_points(wide[:-1], wide)
    assert rolled(np.roll(narrow, 5), wide)  # rolled, within the same closeness
    # NaN and repeated values leave the spacing to the points apart
    gappy = np.array([0.1, 0.2, np.nan, 0.4])
    assert same_points(gappy.astype(np.float32), gappy)
    assert same_points(np.float32([0.1, 0.1, 0.2]), [0.1, 0.1, 0.2])


@pytest.mark.parametrize("kwargs, said", [
    ({"items": ("1.0", "banana")}, "input.items: label 'banana' is not a valid time value "
                                   "(dtype float64): give one of its labels, e.g. '1.0'"),
    ({"span": ("x", "3.0")}, "input.range: label 'x' is not a valid time value (dtype "
                             "float64): give one of its labels, e.g. '1.0'"),
])
def test_a_label_that_is_no_value_of_the_items_names_its_setting_and_a_label(
        tmp_path, kwargs, said):
    """It said "input: label 'banana' is not a valid time value (dtype float64)": which
    setting, and what a label looks like, left to guess."""
    path = _store(tmp_path / "v.zarr", np.array([1.0, 2.0, 3.0]))
    with pytest.raises(InputError) as err:
        _open(path, **kwargs)
    assert str(err.value) == said
