"""Inputs as other tools write them: field dims in another order or under other names,
unsorted, string, duplicated or lead-time labels, any chunking, metadata left stale, a chunk
that cannot be read. Each is used as it means, or refused in one line."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from conftest import conditional_sets, make_input
from pipeline.cli import main
from pipeline.inputs import InputError, open_items

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


def test_fields_stored_x_first_are_sampled_and_labelled_as_the_same_fields_y_first(tmp_path):
    straight = make_input(tmp_path / "yx.zarr")
    ds = xr.open_zarr(straight).load().assign_coords(y=0.5 * np.arange(16), x=np.arange(16.0))
    ds.to_zarr(tmp_path / "yx_grid.zarr", zarr_format=3, consolidated=False)
    ds.transpose("time", "x", "y").to_zarr(tmp_path / "xy.zarr", zarr_format=3,
                                           consolidated=False)
    for name in ("yx_grid", "xy"):
        assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(
            tmp_path / f"{name}.zarr", tmp_path / f"{name}_ens.zarr")]) == 0
    a, b = (xr.open_zarr(tmp_path / f"{n}_ens.zarr") for n in ("yx_grid", "xy"))
    assert a.vort.dims == b.vort.dims == ("time", "member", "y", "x")
    assert (b.y.values == 0.5 * np.arange(16)).all() and (b.x.values == np.arange(16.0)).all()
    np.testing.assert_array_equal(a.vort.values, b.vort.values)


def test_field_dims_named_otherwise_keep_their_coordinates_by_position(tmp_path):
    path = _store(tmp_path / "ll.zarr", pd.date_range("2020-01-01", periods=2),
                  dims=("time", "lat", "lon"))
    coords = _open(path).coords(coarse=False)
    assert (coords["y"][0] == 0.5 * np.arange(16)).all() and coords["y"][1]["input_dim"] == "lat"
    assert (coords["x"][0] == 100 + np.arange(16)).all() and coords["x"][1]["input_dim"] == "lon"


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
