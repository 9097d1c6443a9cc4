"""``piadm generate-data``: a Kolmogorov-flow dataset in Zarr, CF-described, deterministic."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

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
    # the flow's parameters as plain attributes too, not only inside the config's TOML
    assert ds.attrs["viscosity"] == 5e-3 and ds.attrs["forcing_wavenumber"] == 4
    assert ds.attrs["spinup"] == 2.0 and ds.attrs["interval"] == 0.25
    assert "4x4 block average" in ds.attrs["coarse_method"] and "lap psi" in ds.attrs["equation"]


def test_same_seed_same_data_other_seed_other_data(tmp_path, capsys):
    assert _run(tmp_path / "a.zarr") == 0  # b: a sampling job's config, run on one process
    assert _run(tmp_path / "b.zarr", "parallel.time_slices=2") == 0
    assert _run(tmp_path / "c.zarr", "data.seed=1") == 0
    a, b, c = (xr.open_zarr(tmp_path / f"{n}.zarr").vorticity.values for n in "abc")
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert _run(tmp_path / "a.zarr", "data.seed=1") == 2  # another's exists: refused
    assert "data.overwrite" in capsys.readouterr().err


def test_small_chunks_do_not_write_a_line_each_to_a_batch_log(tmp_path, capsys):
    """Each chunk written printed a line: 1280 of them for 12800 snapshots in chunks of 10,
    where every other progress line waits 30 s in a batch log."""
    assert _run(tmp_path / "k.zarr", "data.snapshots=24", "data.chunk=2") == 0
    written = [line for line in capsys.readouterr().err.splitlines() if " written " in line]
    assert written[0].startswith("snapshots 2/24 written")  # the pace
    assert written[-1].startswith("snapshots 24/24 written") and len(written) < 6


SHORT = ("data.spinup=0.5", "data.snapshots=2")  # a dataset made only to be replaced


def test_overwrite_replaces_a_dataset_generate_data_made(tmp_path):
    ours = tmp_path / "k.zarr"
    assert _run(ours, *SHORT, "data.seed=1") == 0
    first = xr.open_zarr(ours).vorticity.values
    assert _run(ours, *SHORT, "data.overwrite=true") == 0
    ds = xr.open_zarr(ours)
    assert ds.attrs["piadm_dataset"].endswith(" 2x16x16")
    assert not np.allclose(ds.vorticity.values, first)
    # an older marker (the version alone), and none (generate-data's source attribute)
    zarr.open_group(ours, mode="r+").attrs["piadm_dataset"] = "0.1.0"
    assert _run(ours, *SHORT, "data.overwrite=true") == 0
    del zarr.open_group(ours, mode="r+").attrs["piadm_dataset"]
    assert _run(ours, *SHORT, "data.overwrite=true") == 0


def _contents(path):
    if path.is_dir():
        return sorted((str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*")
                      if p.is_file())
    return path.read_bytes()


def _kept(path, capsys) -> str:
    """The one-line error of an overwrite of ``path`` refused before any simulation, with what
    was there kept byte for byte."""
    before = _contents(path)
    capsys.readouterr()
    assert _run(path, "data.overwrite=true") == 2
    assert _contents(path) == before
    # the refusal alone: no banner announcing a run that does not happen, no progress
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("piadm: error: ")
    return err


def test_overwrite_refuses_and_keeps_what_generate_data_did_not_make(tmp_path, capsys):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\chapter{Four years}")
    err = _kept(folder, capsys)
    assert f"data.path {folder} exists and is not a dataset piadm generate-data made" in err
    assert "move it away, or choose another data.path" in err
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    assert "is not a dataset" in _kept(plain, capsys)
    # an ensemble store of piadm sample, and a store derived from a dataset (attributes copied)
    ensemble = tmp_path / "ensemble.zarr"
    sets = ["model.shape=[8, 8]", "sampler.method='sequential-sde'", "sampler.steps=10",
            "ensemble.members=2", "ensemble.batch_size=2", f"output.path={ensemble}"]
    assert main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]) == 0
    assert "is not a dataset" in _kept(ensemble, capsys)
    data, derived = tmp_path / "k.zarr", tmp_path / "derived.zarr"
    assert _run(data, *SHORT) == 0
    ds = xr.open_zarr(data)
    ds.assign(mean=ds.vorticity.mean("time")).to_zarr(derived, zarr_format=3, consolidated=False)
    assert "is not a dataset" in _kept(derived, capsys)
    cut = tmp_path / "cut.zarr"  # the same arrays and attributes, fewer times
    ds.isel(time=slice(0, 1)).to_zarr(cut, zarr_format=3, consolidated=False)
    assert "is not a dataset" in _kept(cut, capsys)


@pytest.mark.parametrize("sig, said, code", [(signal.SIGINT, "interrupted (Ctrl-C)", 130),
                                             (signal.SIGTERM, "stopped by SIGTERM", 143)])
def test_ctrl_c_or_sigterm_says_what_the_store_holds_and_exits_128_plus_it(tmp_path, sig, said,
                                                                            code):
    path = tmp_path / "k.zarr"
    sets = sum((["--set", s] for s in SMALL + ["data.snapshots=4000", "data.chunk=2",
                                               f"data.path={path}"]), [])
    root = Path(__file__).resolve().parents[1]
    search = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=search)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "generate-data",
                             "jobs/configs/kolmogorov.toml", *sets], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (path / "vorticity").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)  # SLURM's SIGTERM at a time limit: said, not a silent death
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"piadm: {said}: data.path {path} holds "), last
    assert last.endswith(" of its 4000 snapshots, the rest NaN; generate-data does not resume: "
                         "rerun it with data.overwrite = true to make the dataset anew"), last


# A Ctrl-C landing inside Zarr's sync(), after it made its coroutine and before it scheduled it:
# made to happen at the third such call once the store exists.
CUT_IN_ZARR = """
import asyncio, os, runpy, sys, threading
path, schedule, seen = sys.argv[1], asyncio.run_coroutine_threadsafe, [0]
def cut(coro, loop):
    if threading.current_thread() is threading.main_thread() and os.path.exists(path):
        seen[0] += 1
        if seen[0] == 3:
            raise KeyboardInterrupt
    return schedule(coro, loop)
asyncio.run_coroutine_threadsafe = cut
sys.argv = ["piadm", *sys.argv[2:]]
runpy.run_module("pipeline.cli", run_name="__main__")
"""


def test_a_ctrl_c_inside_a_zarr_call_ends_on_the_stop_line_alone(tmp_path):
    path = tmp_path / "k.zarr"
    sets = sum((["--set", s] for s in SMALL + ["data.snapshots=4000", "data.chunk=2",
                                               f"data.path={path}"]), [])
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CUT_IN_ZARR, str(path / "vorticity"),
                           "generate-data", "jobs/configs/kolmogorov.toml", *sets], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)
    # not followed by Python's warning of the coroutine the cut call never scheduled
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("piadm: interrupted (Ctrl-C): "), \
        proc.stderr


def test_a_data_path_inside_a_zarr_store_is_refused_before_writing(tmp_path, capsys):
    store = tmp_path / "d.zarr"
    assert _run(store, *SHORT) == 0
    before = _contents(store)
    capsys.readouterr()
    assert _run(store / "sub.zarr", *SHORT) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"piadm: error: data.path {store / 'sub.zarr'} is inside the Zarr store {store}: "
        "choose a data.path outside it")
    assert _contents(store) == before


def test_a_simulation_that_blows_up_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import torch

    from pipeline import generate, kolmogorov

    def unstable(sp, w_hat, duration, **kwargs):  # what too large a data.cfl does
        return kolmogorov.advance(sp, w_hat * torch.inf, 0.0, **kwargs)

    monkeypatch.setattr(generate, "advance", unstable)
    assert _run(tmp_path / "b.zarr") == 2
    err = capsys.readouterr().err
    assert ("piadm: error: the vorticity blew up: lower data.cfl or data.forcing, or raise "
            "data.viscosity") in err
    assert "Traceback" not in err
    assert not (tmp_path / "b.zarr").exists()  # blown up in the spin-up: no store to block a rerun


@pytest.mark.parametrize("setting, said", [
    ("data.forcing=1e200", "data.forcing = 1e+200 drives the flow at speeds up to"),
    ("data.forcing=-1", "data.forcing = -1 must be >= 0"),
    ("data.interval=1e-300", "data.interval = 1e-300 is below 1e-06"),
    ("data.spinup=1e300", "data.dt_max = 0.05 takes at least 2e+301 steps"),
    ("data.dt_max=1e-9", "data.dt_max = 1e-09 takes at least"),
    ("data.forcing_wavenumber=0;data.drag=0", "data.forcing_wavenumber must be >= 1"),  # no 0/0
])
def test_data_settings_that_would_never_finish_are_refused(tmp_path, capsys, setting, said):
    from pipeline.cli import main

    out = tmp_path / "d.zarr"
    sets = [arg for item in setting.split(";") for arg in ("--set", item)]
    assert main(["generate-data", "jobs/configs/kolmogorov.toml", *sets,
                 "--set", f"data.path={out}"]) == 2
    assert said in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("failure", ["blow-up", "interrupt"])
def test_an_overwrite_that_fails_keeps_the_dataset_it_was_to_replace(tmp_path, capsys,
                                                                      monkeypatch, failure):
    """The new dataset is made beside the old one and renamed into place once complete: an
    overwrite that blows up or is stopped part way leaves the old dataset whole, and no
    draft."""
    import torch

    from pipeline import generate, kolmogorov

    path = tmp_path / "k.zarr"
    assert _run(path, *SHORT) == 0
    before = _contents(path)
    calls = []

    def failing(sp, w_hat, duration, **kwargs):
        calls.append(1)
        if len(calls) < 4:  # past the spin-up and the first chunk
            return kolmogorov.advance(sp, w_hat, duration, **kwargs)
        if failure == "interrupt":
            raise KeyboardInterrupt
        return kolmogorov.advance(sp, w_hat * torch.inf, 0.0, **kwargs)

    monkeypatch.setattr(generate, "advance", failing)
    capsys.readouterr()
    code = _run(path, "data.overwrite=true", "data.chunk=2", "data.snapshots=6")
    err = capsys.readouterr().err
    assert code == (130 if failure == "interrupt" else 2) and "Traceback" not in err, err
    if failure == "interrupt":
        assert err.strip().splitlines()[-1] == (
            f"piadm: interrupted (Ctrl-C): data.path {path} was not replaced (2 of its 6 new "
            "snapshots made, now deleted) and still holds the dataset it held before: rerun "
            "with data.overwrite = true to replace it")
    assert _contents(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k.zarr.lock", "k.zarr"]  # its lock


@pytest.mark.parametrize("replacing", [False, True])
def test_a_full_disk_part_way_says_what_data_path_holds_and_the_command_that_goes_on(
        tmp_path, capsys, monkeypatch, replacing):
    """A new dataset was left at data.path, every value NaN past the chunks written, under
    "cannot use PATH: No space left on device: check that the path exists"."""
    import errno

    path = tmp_path / "k.zarr"
    if replacing:
        assert _run(path, *SHORT) == 0
    before = _contents(path) if replacing else None
    real, writes = xr.Dataset.to_zarr, []

    def full(self, *args, **kwargs):
        if kwargs.get("region") is not None:
            writes.append(1)
            if len(writes) > 1:  # the first chunk fits
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", full)
    capsys.readouterr()
    extra = ("data.overwrite=true",) if replacing else ()
    assert _run(path, *extra, "data.chunk=2", "data.snapshots=6") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"piadm: error: generate-data: writing failed: No space left on "
                           f"device ({path}); fix the cause (free space, permissions, the "
                           "mount): ")
    if replacing:
        assert line.endswith(f"data.path {path} was not replaced (2 of its 6 new snapshots "
                             "made, now deleted) and still holds the dataset it held before: "
                             "rerun with data.overwrite = true to replace it")
        assert _contents(path) == before
    else:
        assert line.endswith(f"data.path {path} holds 2 of its 6 snapshots, the rest NaN; "
                             "generate-data does not resume: rerun it with data.overwrite = "
                             "true to make the dataset anew")


def test_leftovers_of_a_killed_overwrite_on_this_host_are_deleted(tmp_path):
    """A generate-data killed while replacing leaves its draft (or the dataset it moved aside)
    beside data.path: the next run on the host deletes those whose process is gone, and keeps
    a live process's and another host's."""
    import socket

    path, host = tmp_path / "k.zarr", socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = [tmp_path / f".k.zarr.generating-{host}-{dead.pid}",
            tmp_path / f".k.zarr.replaced-{host}-{dead.pid}"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    kept = [tmp_path / f".k.zarr.generating-{host}-{live.pid}",
            tmp_path / f".k.zarr.generating-another-host-{dead.pid}",
            tmp_path / f".k.zarr.generating-{host}-12-{dead.pid}"]  # host "<this>-12"'s
    assert _run(path, *SHORT) == 0  # in place: nothing for the leftovers to mend
    for folder in left + kept:
        (folder / "vorticity").mkdir(parents=True)
    try:
        assert _run(path, *SHORT, "data.overwrite=true") == 0
    finally:
        live.kill()
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


@pytest.mark.parametrize("draft_left", [True, False])
def test_an_overwrite_killed_between_its_renames_is_put_back_in_place(tmp_path, capsys,
                                                                      draft_left):
    """Killed after moving the old dataset aside, before moving the new one in: the next run
    on the host puts the complete new one in place (the old one, were it gone), and then
    judges data.path as ever: without data.overwrite it is refused and kept."""
    import shutil
    import socket

    path, host = tmp_path / "k.zarr", socket.gethostname()
    assert _run(path, *SHORT) == 0
    old = _contents(path)
    assert _run(tmp_path / "new.zarr", *SHORT, "data.seed=1") == 0
    new = _contents(tmp_path / "new.zarr")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.rename(path, tmp_path / f".k.zarr.replaced-{host}-{dead.pid}")
    if draft_left:
        shutil.move(tmp_path / "new.zarr", tmp_path / f".k.zarr.generating-{host}-{dead.pid}")
    capsys.readouterr()
    # no data.overwrite: put back, then judged: the run's own dataset is done, another refused
    assert _run(path, *SHORT) == (2 if draft_left else 0)
    said = capsys.readouterr().err
    assert ("already holds a dataset of other [data] settings (data.seed 1 there, 0 here): "
            "set data.overwrite = true" if draft_left else "already holds this dataset") in said
    assert _contents(path) == (new if draft_left else old)
    assert [p.name for p in tmp_path.glob(".k.zarr.*")] == [".k.zarr.lock"]  # only its lock


def test_a_rerun_of_a_finished_dataset_has_nothing_to_do_and_a_cut_one_is_named(tmp_path,
                                                                              capsys):
    """A script or a shard loop reruns generate-data: the same settings' finished dataset is
    left as it is (exit 0); other settings', or what an interrupted run left, is refused
    saying which."""
    import json

    path = tmp_path / "k.zarr"
    assert _run(path, *SHORT) == 0
    before = _contents(path)
    capsys.readouterr()
    assert _run(path, *SHORT) == 0
    assert "already holds this dataset" in capsys.readouterr().err and _contents(path) == before
    assert _run(path, *SHORT, "data.seed=4") == 2
    assert ("already holds a dataset of other [data] settings (data.seed 0 there, 4 here): "
            "set data.overwrite = true") in capsys.readouterr().err
    # through a link to it: said so, not "not a dataset piadm made"
    (tmp_path / "link.zarr").symlink_to(path)
    assert _run(tmp_path / "link.zarr", *SHORT, "data.overwrite=true") == 2
    assert (f"data.path {tmp_path / 'link.zarr'} is a symbolic link (to {path}), through which "
            "piadm does not write or replace a dataset") in capsys.readouterr().err
    (tmp_path / "link.zarr").unlink()
    meta = json.loads((path / "zarr.json").read_text())  # as an interrupted run leaves it:
    meta.pop("consolidated_metadata")  # its metadata never consolidated
    (path / "zarr.json").write_text(json.dumps(meta))
    assert _run(path, *SHORT) == 2
    assert "holds what an interrupted run left of a dataset: set data.overwrite = true" in \
        capsys.readouterr().err


def test_a_stop_in_the_spin_up_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    from pipeline import generate

    def stopped(*args, **kwargs):  # Ctrl-C during the spin-up, before the store is made
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "advance", stopped)
    assert _run(tmp_path / "s.zarr") == 130
    err = capsys.readouterr().err
    assert "stopped during the spin-up: nothing was written to data.path" in err
    assert not (tmp_path / "s.zarr").exists()


def test_a_stop_while_the_dataset_is_made_leaves_nothing_overwrite_cannot_tell(tmp_path,
                                                                              monkeypatch):
    """A requeue's SIGTERM while zarr wrote the new dataset's metadata left a group without
    its marker at data.path, which data.overwrite = true then refused to delete as another
    tool's: the requeued job failed (seen once in the SLURM array test)."""
    import xarray as xr
    import zarr

    made = xr.Dataset.to_zarr

    def stopped(self, store, *args, **kwargs):  # the group made, its attributes not yet
        zarr.open_group(store, mode="w")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_zarr", stopped)
    path = tmp_path / "s.zarr"
    assert _run(path) == 130
    assert not path.exists() and not list(tmp_path.glob("*.zarr*generating*"))
    monkeypatch.setattr(xr.Dataset, "to_zarr", made)
    assert _run(path, "data.overwrite=true") == 0


def test_a_second_run_on_a_data_path_being_made_is_refused_naming_the_first(tmp_path, capsys):
    """Two runs on one data.path mixed two trajectories (the first kept writing into the
    store the second had moved into place); the second was told to set data.overwrite."""
    import socket

    from pipeline.processes import hold_lock

    path = tmp_path / "d.zarr"
    first = hold_lock(path)
    try:
        assert _run(path, "data.overwrite=true") == 2
    finally:
        first.close()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"piadm: error: data.path {path} is being made by another piadm generate-data (host "
        f"{socket.gethostname()}, pid {os.getpid()}): wait for it to end, or choose another "
        "data.path")
    assert not path.exists()
    assert _run(path, *SHORT) == 0  # the lock is free again


def test_a_chunk_that_cannot_be_held_until_its_write_is_refused_before_the_spin_up(
        tmp_path, capsys, monkeypatch):
    """1000 snapshots of 1024 x 1024 a chunk ran out of memory after 90 s, leaving a dataset
    of metadata behind: the chunk's fields are weighed against the memory first, naming the
    most snapshots a chunk can hold; nothing is made, not even the lock beside data.path."""
    import pipeline.generate as generate

    points = 16 * 16 + 4 * 4  # SMALL's fine and coarse fields
    room = 5 * points * 12 + 3  # five snapshots, float64 then float32
    monkeypatch.setattr(generate, "available_bytes",
                        lambda device, sharing=1: (room, "available on this node's host"))
    path = tmp_path / "k.zarr"
    assert _run(path, "data.chunk=8") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    # SMALL's 6 snapshots all in one chunk
    assert line == ("piadm: error: config: data.chunk = 8 holds 6 snapshots of 16x16 until "
                    f"their write: at least {6 * points * 12 / 2**20:.1f} MiB, and "
                    f"{room / 2**20:.1f} MiB is available on this node's host: lower data.chunk "
                    "to at most 5 (the snapshots written at once: fewer only make more writes)")
    assert not list(tmp_path.iterdir())
    assert _run(path, "data.chunk=5") == 0  # the chunk it names is made
    monkeypatch.setattr(generate, "available_bytes",
                        lambda device, sharing=1: (1, "available on this node's host"))
    capsys.readouterr()
    assert _run(path, "data.chunk=5") == 0  # made already: a rerun needs no room
    assert "already holds this dataset" in capsys.readouterr().err
