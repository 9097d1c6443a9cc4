"""Data safety: a non-finite member is never written as done, and output.overwrite deletes
only a store piadm made."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from models.grf import GaussianRandomField
from pipeline.api import load_config, sample
from pipeline.cli import main
from pipeline.comm import SerialComm
from pipeline.config import ConfigError
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.samplers import SAMPLERS, PicardDivergence


def _small(tmp_path, **extra):
    sets = {"model.shape": [8, 8], "sampler.steps": 40, "sampler.block_size": 10,
            "ensemble.members": 2, "ensemble.batch_size": 2,
            "output.path": str(tmp_path / "out.zarr")}
    sets.update(extra)
    return sets


@pytest.mark.parametrize("key, value, needle", [
    ("model.slope", float("nan"), "model.slope = nan must be a number in [0, 100]"),
    ("model.length", -1e9, "model.length = -1000000000.0 must be a number in (0, 1e6]"),
    ("model.std", 0.0, "model.std = 0.0 must be a number in [1e-6, 1e6]"),
    ("model.spread", 1e300, "model.spread = 1e+300 must be a number in [0, 1e6]"),
    ("model.weights", [1.0, float("inf")], "model.weights"),
    ("bench.methods", [], "bench.methods is empty: name the methods to bench"),
    ("sampler.u_max", float("inf"), "sampler.u_max = inf must be a finite number <= 40"),
    ("sampler.u_max", float("nan"), "sampler.u_max = nan must be a finite number <= 40"),
    ("sampler.u_max", 1e10, "sampler.u_max = 10000000000.0 must be a finite number <= 40"),
    ("sampler.u_min", float("nan"), "sampler.u_min = nan must be > 0"),
    ("sampler.u_max", -1.0, "sampler.u_max = -1.0 must be > 0: the noise level sampling starts"),
    ("model.components", 10**8, "model.components = 100000000 must be in [1, 65536]"),
    ("ensemble.members", 10**23, "ensemble.members = 100000000000000000000000 is more than the "
                                 "store's int64 index holds: use at most 9223372036854775807"),
    ("ensemble.batch_size", 2**63, "ensemble.batch_size = 9223372036854775808 is more than"),
    ("sampler.steps", 10**23, "sampler.steps = 100000000000000000000000 must be >= 1 and at "
                              "most 1000000"),
    ("sampler.steps", 10**8, "sampler.steps = 100000000 must be >= 1 and at most 1000000 "
                             "(samplers take 10 to 10^4"),
    ("sampler.tol", float("inf"), "sampler.tol = inf must be a finite number >= 0"),
])
def test_model_parameters_are_range_checked(tmp_path, key, value, needle):
    with pytest.raises(ConfigError) as err:
        load_config("jobs/configs/grf.toml", _small(tmp_path, **{key: value}))
    assert needle in str(err.value)


def test_the_largest_u_max_samples_finite_fields_in_float32(tmp_path):
    # validation.U_MAX: the window sampler on the edm grid was the first to go NaN as u_max
    # grew past it (at 150, 1000 steps), its float32 window spanning e^{u/2}
    from pipeline.validation import U_MAX

    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.method": "window", "sampler.grid": "edm", "sampler.dtype": "float32",
        "sampler.steps": 1000, "sampler.tol": 1e-3, "sampler.u_max": U_MAX}))
    assert sample(cfg).members == 2
    field = zarr.open_group(cfg.output.path, mode="r")["field"][:]
    assert np.isfinite(field).all()


@pytest.mark.parametrize("method, options", [
    ("piadm-ode", {"block_size": 8, "corrector_steps": 0}),  # every member exactly 0 at 100
    ("pc-window-ode", {"window": 8}),  # 19 times the field's size away at 100
])
def test_at_the_largest_u_max_parallel_odes_keep_to_their_path_in_float32(method, options):
    """A float32 prefix sum over a block or window spanning u carries e^{span/2}: at
    u_max = 80 to 100 (accepted then) it kept no digit and the parallel ODEs certified
    members far from the sequential path, or every member 0, without a word."""
    from pipeline.samplers import Options
    from pipeline.validation import U_MAX

    model = GaussianRandomField((8, 8))
    grid = make_grid("ou", 20, u_min=1e-3, u_max=U_MAX, block_size=options.get("block_size", 20))
    noise = Noise(0, tuple((0, m) for m in range(2)), (8, 8), torch.float32)
    opts = Options(tol=1e-4, data_bound=model.data_bound,
                   **{k: v for k, v in options.items() if k != "block_size"})
    y, _ = SAMPLERS[method](model, noise.prior(), grid, noise, comm=SerialComm(), options=opts)
    ref, _ = SAMPLERS["sequential-ode"](model, noise.prior(), grid, noise, comm=SerialComm())
    assert float((y - ref).norm() / ref.norm()) < 1e-3


def test_a_corrector_damped_past_what_float32_holds_is_refused():
    """corrector_gamma x corrector_length past 87 rounded the corrector's e^-(that) to 0 in
    float32: NaN, blamed on the model or the grid."""
    with pytest.raises(ConfigError, match=r"sampler.corrector_gamma = 120 times "
                                          r"sampler.corrector_length = 1 damps"):
        load_config("jobs/configs/grf.toml", {"sampler.method": "piadm-ode",
                                             "sampler.corrector_gamma": 120})


def test_a_grid_whose_steps_float64_cannot_tell_apart_is_a_one_line_error(tmp_path, capsys):
    """u_min within 1e-13 of u_max in 5000 steps: a ValueError traceback from the grid."""
    assert main(["sample", "jobs/configs/grf.toml", "--dry-run", "--set", "sampler.steps=5000",
                 "--set", "sampler.u_min=9.9999999999999", "--set",
                 f"output.path={json.dumps(str(tmp_path / 'g.zarr'))}"]) == 2
    assert ("piadm: error: config: sampler.u_min = 9.9999999999999 to sampler.u_max = 10.0 in "
            "sampler.steps = 5000 on the 'ou' grid: grid 'ou' with 5000 steps is not strictly "
            "decreasing in u: widen the range or take fewer steps") in capsys.readouterr().err


class NaNAfter:
    """A score model that turns NaN for one batch row once the clock falls below ``u``."""

    def __init__(self, base, u, row):
        self.base, self.u, self.row, self.shape = base, u, row, base.shape

    def __call__(self, x, t):
        out = self.base(x, t).clone()
        out[(t < self.u) & (torch.arange(len(t)) % 2 == self.row)] = float("nan")
        return out


@pytest.mark.parametrize("method", ["sequential-sde", "sequential-ode"])
def test_a_sequential_sampler_names_the_member_and_steps_where_it_went_nan(method):
    model = NaNAfter(GaussianRandomField((8, 8)), u=1.0, row=1)
    grid = make_grid("ou", 60, u_min=1e-3, u_max=10.0, block_size=20)
    noise = Noise(0, ((3, 0), (3, 5)), (8, 8), torch.float64)
    with pytest.raises(PicardDivergence, match=r"member 5 of item 3 went NaN/Inf between steps "
                                               r"\d+ and \d+: the model returns non-finite"):
        SAMPLERS[method](model, noise.prior(), grid, noise, comm=SerialComm())


def test_a_nan_ensemble_stops_with_one_line_and_nothing_marked_done(tmp_path, capsys,
                                                                   monkeypatch):
    # a model that breaks partway (as a damaged checkpoint would) for the second member
    import pipeline.ensemble

    real = pipeline.ensemble.build_model
    monkeypatch.setattr(pipeline.ensemble, "build_model",
                        lambda section, device: NaNAfter(real(section, device), u=1.0, row=1))
    sets = _small(tmp_path, **{"sampler.method": "sequential-sde"})
    args = ["sample", "jobs/configs/grf.toml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "member 1 of item 0 went NaN/Inf" in errors[0]
    assert "model.*" in errors[0]
    assert not zarr.open_group(sets["output.path"], mode="r")["done"][:].any()


@pytest.mark.parametrize("name, needle", [
    ("done", "'done' is a name the store uses itself: use none of done, seed, rounds, "
             "model_calls, residual, item, member, sweep, y, x, level, zarr.json"),
    ("residual", "'residual' is a name the store uses itself"),
    ("member", "'member' is a name the store uses itself"),
    ("level", "'level' is a name the store uses itself"),  # input.item_dim below
    ("x", "'x' is a name the store uses itself"),
    ("zarr.json", "'zarr.json' is a name the store uses itself"),
    ("a/b", "'a/b' is not a name a Zarr store can hold"),
    ("  ", "'  ' is not a name a Zarr store can hold"),
    ("..", "'..' is not a name a Zarr store can hold"),
])
def test_an_output_variable_the_store_cannot_hold_is_refused_before_sampling(
        tmp_path, capsys, name, needle):
    sets = _small(tmp_path, **{"output.variable": name, "input.item_dim": "level"})
    args = ["sample", "jobs/configs/grf.toml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"config: output.variable = {needle}" in err, err
    assert not (tmp_path / "out.zarr").exists()


def test_an_input_variable_the_store_would_be_named_by_is_checked_too(tmp_path, capsys):
    """Without output.variable an exact model's store takes the input's name: one the store
    uses itself is refused before anything is written, as output.variable's would be."""
    from conftest import make_input

    data = make_input(tmp_path / "in.zarr")
    ds = xr.open_zarr(data, consolidated=False).rename({"vort": "seed"})
    for name in ds.variables:
        ds[name].encoding = {}
    ds.to_zarr(tmp_path / "seed.zarr", zarr_format=3, consolidated=False)
    sets = _small(tmp_path, **{"model.shape": [16, 16], "model.condition": "mean",
                               "input.path": str(tmp_path / "seed.zarr"),
                               "input.variable": "seed"})
    args = ["sample", "jobs/configs/grf.toml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("config: input.variable = 'seed' is a name the store uses itself" in err
            and err.endswith("or name the ensemble's field with output.variable")), err
    assert not (tmp_path / "out.zarr").exists()
    assert main([*args, "--set", 'output.variable="vort"']) == 0


def test_an_output_variable_names_only_the_dims_of_the_runs_fields_taken(tmp_path):
    """A 2-D field's store has no "z" dim: a geopotential may keep its usual name there."""
    sets = _small(tmp_path, **{"output.variable": "z"})
    args = ["sample", "jobs/configs/grf.toml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    assert "z" in xr.open_zarr(tmp_path / "out.zarr").data_vars


def test_overwrite_refuses_a_folder_piadm_did_not_make(tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "output.path": str(precious), "output.overwrite": True}))
    with pytest.raises(Exception, match="is not a piadm store, and piadm deletes only stores it "
                                        "made"):
        sample(cfg)
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_an_empty_folder_made_ahead_is_named_as_such(tmp_path):
    empty = tmp_path / "made_ahead.zarr"
    empty.mkdir()
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{"output.path": str(empty)}))
    with pytest.raises(Exception, match=f"output {empty} is an empty folder, not a store: remove "
                                        f"it \\(rmdir {empty}\\)"):
        sample(cfg)
    assert empty.is_dir()


def test_overwrite_refuses_a_plain_file_and_resumes_its_own_store(tmp_path):
    plain = tmp_path / "notes.zarr"
    plain.write_text("not a store")
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "output.path": str(plain), "output.overwrite": True}))
    with pytest.raises(Exception, match="is not a piadm store"):
        sample(cfg)
    assert plain.read_text() == "not a store"
    ours = load_config("jobs/configs/grf.toml", _small(tmp_path, **{"output.overwrite": True}))
    assert sample(ours).members == 2
    before = zarr.open_group(ours.output.path, mode="r")["field"][:]
    # its own store is this config's work (a requeued job, or a second one sharing it): kept
    again = sample(ours)
    assert (again.members, again.skipped) == (0, 2)
    assert (zarr.open_group(ours.output.path, mode="r")["field"][:] == before).all()


def test_overwrite_replaces_another_configurations_store(tmp_path):
    first = load_config("jobs/configs/grf.toml", _small(tmp_path))
    assert sample(first).members == 2
    other = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.seed": 9, "output.overwrite": True}))
    assert sample(other).members == 2
    attrs = zarr.open_group(other.output.path, mode="r").attrs
    assert attrs["piadm_store_digest"] == other.store_digest != first.store_digest


def test_a_replacement_killed_while_deleting_the_old_store_leaves_a_usable_path(
        tmp_path, monkeypatch):
    """The old store is moved aside in one step and deleted after the new one stands: a kill
    while deleting (a long delete on a parallel file system) leaves the new store whole, and
    the next run deletes what is left of the old one."""
    import shutil

    import pipeline.target as target

    first = load_config("jobs/configs/grf.toml", _small(tmp_path))
    assert sample(first).members == 2
    other = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.seed": 9, "output.overwrite": True}))
    deleting = shutil.rmtree

    def killed(path, *args, **kwargs):
        if str(path).endswith(target.DELETING):
            deleting(next(p for p in path.iterdir() if p.name != "zarr.json"))  # part way
            raise KeyboardInterrupt  # as SLURM's kill after its grace time
        deleting(path, *args, **kwargs)

    monkeypatch.setattr(target.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        sample(other)
    monkeypatch.setattr(target.shutil, "rmtree", deleting)
    left = list(tmp_path.glob(".out.zarr.*.deleting"))
    assert len(left) == 1
    assert zarr.open_group(other.output.path, mode="r").attrs["piadm_store_digest"] == \
        other.store_digest  # the new store stands, with no member done yet
    others = tmp_path / ".out.zarr.bak.replacing-host-1-abc.deleting"  # out.zarr.bak's
    others.mkdir()
    assert sample(other).members == 2  # resumed, and the old store's remains deleted
    assert list(tmp_path.glob(".out.zarr.*")) == [others]


def _spec(path, digest):
    import numpy as np

    from pipeline.store import StoreSpec

    return StoreSpec(str(path), "item", np.arange(1), 2, 2, "field", (4, 4), "float32", digest, {})


@pytest.mark.parametrize("racer, outcome", [("a" * 64, "resumed"), ("b" * 64, "refused")])
def test_a_run_that_loses_the_race_to_create_its_store_resumes_only_its_own(
        tmp_path, monkeypatch, racer, outcome):
    import os

    from pipeline import store
    from pipeline.store import StoreExists
    from pipeline.store_attrs import stored_digest
    from pipeline.target import open_or_create

    path, rename = tmp_path / "raced.zarr", os.rename

    def late(src, dst):  # another run creates the store between our check and our rename
        monkeypatch.setattr(store.os, "rename", rename)
        open_or_create(_spec(path, racer), overwrite=False)
        rename(src, dst)

    monkeypatch.setattr(store.os, "rename", late)
    if outcome == "refused":
        # never replaces the winner, and does not ask for the output.overwrite it has set
        with pytest.raises(StoreExists, match=r"made just now by another job \(another "
                                              "configuration") as err:
            open_or_create(_spec(path, "a" * 64), overwrite=True)
        assert "set output.overwrite" not in str(err.value)
    else:
        assert open_or_create(_spec(path, "a" * 64), overwrite=False) == "resumed"
    assert stored_digest(path) == racer and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("first, then", [(2, 4), (4, 2)])
def test_a_run_that_loses_the_race_to_its_own_config_at_other_members_grows_it_or_says_why(
        tmp_path, monkeypatch, first, then):
    """Two runs differing in ensemble.members alone, started together on a new store: the
    one asking more was refused as "a different configuration" instead of growing the
    winner's store, the one asking fewer was not told that piadm never cuts a store."""
    import os

    from pipeline import store
    from pipeline.config import load_config
    from pipeline.store import StoreExists

    out, rename = tmp_path / "m.zarr", os.rename

    def cfg(members):
        return load_config("jobs/configs/grf.toml", ["model.shape=[8, 8]", "sampler.steps=10",
                                                     "sampler.tol=0.1", f"output.path={out}",
                                                     f"ensemble.members={members}"])

    def late(src, dst):  # the other run makes and fills the store before our rename
        monkeypatch.setattr(store.os, "rename", rename)
        sample(cfg(first))
        rename(src, dst)

    monkeypatch.setattr(store.os, "rename", late)
    if then < first:
        with pytest.raises(StoreExists, match=f"holds {first} members of this configuration "
                                              "and this run asks ensemble.members = 2: piadm "
                                              "grows a store but never cuts one"):
            sample(cfg(then))
    else:
        summary = sample(cfg(then))
        assert summary.members == then - first and summary.held == (then, then)


@pytest.mark.parametrize("there", ["a store", "a folder of files", "a file"])
def test_a_claims_folders_name_taken_by_what_piadm_did_not_make_is_refused_and_kept(
        tmp_path, there):
    """piadm keeps a store's claims in STORE.claims beside it, and cleaned up after its runs
    every *.json there whose "job" was not alive: a store named so lost its zarr.json, a
    user's folder its files; a file there failed the run after its store was made."""
    from pipeline.config import load_config
    from pipeline.store import StoreExists

    out, taken = tmp_path / "a.zarr", tmp_path / "a.zarr.claims"

    def cfg(path):
        return load_config("jobs/configs/grf.toml", ["model.shape=[8, 8]", "sampler.steps=10",
                                                     "sampler.tol=0.1", "ensemble.members=2",
                                                     f"output.path={path}"])

    if there == "a store":
        sample(cfg(taken))
    elif there == "a folder of files":
        taken.mkdir()
        (taken / "settings.json").write_text("{}")
        (taken / "run-1.json").write_text('{"step": 1}')
    else:
        taken.write_text("notes")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(StoreExists, match=r"a.zarr.claims (is a file, not piadm's folder|holds "
                                          r"(run-1.json, settings.json|done, field, item and \d+ more), "
                                          "which piadm did not make there)"):
        sample(cfg(out))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if there == "a store":
        assert xr.open_zarr(taken)["field"].shape[:2] == (1, 2)


def test_a_claims_folder_with_hidden_files_is_used_and_one_with_a_strangers_file_named(
        tmp_path):
    """A .DS_Store (the folder browsed in a file manager) or an NFS client's .nfsXXXX in a
    store's claims folder is no stranger's store: the run goes on and leaves them. A file of
    another name among piadm's own claims is named, and the fix is to remove it, not to move
    the folder (its heartbeats keep a replacement off a store being filled)."""
    from pipeline.config import load_config
    from pipeline.store import StoreExists

    out, folder = tmp_path / "a.zarr", tmp_path / "a.zarr.claims"
    cfg = load_config("jobs/configs/grf.toml", ["model.shape=[8, 8]", "sampler.steps=10",
                                                "sampler.tol=0.1", "ensemble.members=2",
                                                f"output.path={out}"])
    folder.mkdir()
    (folder / ".DS_Store").write_text("finder")
    (folder / ".nfs000000001").write_text("")
    assert sample(cfg).held == (2, 2)
    assert sorted(p.name for p in folder.iterdir()) == [".DS_Store", ".nfs000000001"]
    (folder / "job-slurm-9.0.alive").write_text("")  # a job starting this instant
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(StoreExists, match=r"a.zarr.claims holds notes.txt, which piadm did not "
                                          r"make there: remove what piadm did not make from "
                                          r"it$"):
        sample(cfg)


def test_a_store_its_folder_refuses_is_an_error_not_a_resumed_store(tmp_path, monkeypatch):
    from pipeline import store
    from pipeline.target import open_or_create

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(store.os, "rename", refused)
    with pytest.raises(PermissionError):
        open_or_create(_spec(tmp_path / "new.zarr", "a" * 64), overwrite=False)
    assert list(tmp_path.iterdir()) == []  # nor the store built aside


def test_a_store_creation_cut_short_leaves_nothing_beside_it(tmp_path, monkeypatch):
    """A full disk while the store is made aside: the draft is removed, the error names the
    output path; a draft a killed process of this host left is removed by the next creation,
    one of a live process (or another host's) is not."""
    import errno
    import os
    import socket
    import subprocess
    import sys

    from zarr.storage import LocalStore

    from pipeline.target import open_or_create

    write = LocalStore.set

    async def full(self, key, value, *args, **kwargs):
        if key.endswith("zarr.json") and "/" in key:  # after the group's own metadata
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await write(self, key, value, *args, **kwargs)

    path = tmp_path / "new.zarr"
    monkeypatch.setattr(LocalStore, "set", full)
    with pytest.raises(OSError) as raised:
        open_or_create(_spec(path, "a" * 64), overwrite=False)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = tmp_path / f".new.zarr.creating-{host}-{dead.pid}-0a1b2c3d"
    live = tmp_path / f".new.zarr.creating-{host}-{os.getpid()}-0a1b2c3d"
    elsewhere = tmp_path / f".new.zarr.creating-{host}-12-{dead.pid}-0a1b2c3d"
    for draft in (killed, live, elsewhere):
        draft.mkdir()
    assert open_or_create(_spec(path, "a" * 64), overwrite=False) == "created"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, elsewhere.name, path.name])


def test_of_two_jobs_replacing_another_configs_store_the_second_resumes_the_firsts(
        tmp_path, monkeypatch):
    from pipeline import target
    from pipeline.store_attrs import stored_digest
    from pipeline.target import open_or_create

    path, holding = tmp_path / "old.zarr", target.holding
    open_or_create(_spec(path, "c" * 64), overwrite=False)  # another configuration's store

    def first_job_replaces_it_meanwhile(folder, name, job):
        # the other job found the old store too, took the lock first, replaced the store
        # and wrote into it while this one waited for the lock
        monkeypatch.setattr(target, "holding", holding)
        assert open_or_create(_spec(path, "a" * 64), overwrite=True) == "replaced"
        zarr.open_group(path, mode="r+").attrs["written_by_the_first"] = True
        return holding(folder, name, job)

    monkeypatch.setattr(target, "holding", first_job_replaces_it_meanwhile)
    assert open_or_create(_spec(path, "a" * 64), overwrite=True) == "resumed"
    assert stored_digest(path) == "a" * 64
    assert zarr.open_group(path, mode="r").attrs["written_by_the_first"]
    assert not list((tmp_path / "old.zarr.claims").glob("*"))  # the lock and its heartbeat gone


def test_a_store_replaced_after_a_write_is_seen_by_the_next_write_and_claim(tmp_path):
    """The group and done array a batch write or claim opened are kept between batches
    (done_record._opened) only while their metadata files read the same: a store replaced at the
    same path after a write is checked anew, not through what was opened before."""
    from pipeline.done_record import members_left, write_batch
    from pipeline.store import StoreExists
    from pipeline.target import open_or_create

    path = tmp_path / "s.zarr"
    open_or_create(_spec(path, "c" * 64), overwrite=False)
    batch = dict(variable="field", item=0, start=0, field=np.ones((2, 4, 4), "float32"),
                 seed=np.arange(2), rounds=1.0, model_calls=1.0)
    assert members_left(path, 0, (0, 1)) == (0, 1)
    write_batch(path, **batch, digest="c" * 64)  # opened, and kept
    assert members_left(path, 0, (0, 1)) == ()
    assert open_or_create(_spec(path, "a" * 64), overwrite=True) == "replaced"
    assert members_left(path, 0, (0, 1)) == (0, 1)  # the new store's record, not the old's
    with pytest.raises(StoreExists, match="was replaced, grown or deleted by another run"):
        write_batch(path, **batch, digest="c" * 64)
    assert not zarr.open_group(path, mode="r")["done"][:].any()
    write_batch(path, **batch, digest="a" * 64)
    assert members_left(path, 0, (0, 1)) == ()


def test_a_store_a_live_job_fills_is_not_replaced_and_a_replaced_store_is_not_written(tmp_path):
    import errno

    import numpy as np

    from pipeline.claims import Heartbeat, claims_dir
    from pipeline.done_record import write_batch
    from pipeline.store import StoreExists
    from pipeline.store_attrs import stored_digest
    from pipeline.target import open_or_create
    from pipeline.writer import BackgroundWriter

    path = tmp_path / "old.zarr"
    open_or_create(_spec(path, "c" * 64), overwrite=False)
    beat = Heartbeat(claims_dir(path), "old-config-job").start()  # it is filling the store
    try:
        with pytest.raises(StoreExists, match=r"is being filled by a live job \(old-config-job\)"):
            open_or_create(_spec(path, "a" * 64), overwrite=True)
        assert stored_digest(path) == "c" * 64
    finally:
        beat.stop()
    assert open_or_create(_spec(path, "a" * 64), overwrite=True) == "replaced"
    # the old config's job, still running, may not write into the new store
    batch = dict(variable="field", item=0, start=0, field=np.ones((2, 4, 4), "float32"),
                 seed=np.arange(2), rounds=1.0, model_calls=1.0)
    with pytest.raises(StoreExists, match="was replaced, grown or deleted by another run"):
        write_batch(path, **batch, digest="c" * 64)
    assert not zarr.open_group(path, mode="r")["done"][:].any()
    write_batch(path, **batch, digest="a" * 64)
    assert zarr.open_group(path, mode="r")["done"][:].all()
    # a write's own error (a full disk) comes back as it was raised: a one-line OSError
    writer = BackgroundWriter().start()
    writer.submit(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        writer.close()


def test_a_full_disk_names_the_store_and_says_the_members_written_are_kept(
        tmp_path, monkeypatch, capsys):
    import errno

    from conftest import second_write_fails
    from pipeline import ensemble

    real = ensemble.write_batch
    monkeypatch.setattr(ensemble, "write_batch", second_write_fails(real))
    sets = _small(tmp_path, **{"ensemble.members": 4, "sampler.method": "sequential-sde"})
    out = sets["output.path"]
    assert main(["sample", "jobs/configs/grf.toml",
                 *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])]) == 2
    err = capsys.readouterr().err
    assert (f"piadm: error: writing members to {out} failed: No space left on device; the "
            "members written before it are kept") in err and "rerun the same command" in err
    assert int(zarr.open_group(out, mode="r")["done"][:].sum()) == 2
    monkeypatch.setattr(ensemble, "write_batch", second_write_fails(real))  # counted anew
    # through the API: still the OSError a full disk raises, with its errno
    with pytest.raises(OSError) as raised:
        sample(load_config("jobs/configs/grf.toml", {**sets, "output.path": out + "2"}))
    assert raised.value.errno == errno.ENOSPC


def test_a_full_disk_met_recording_the_run_says_the_members_are_written(tmp_path, monkeypatch,
                                                                         capsys):
    """The last write of a run, its history line and consolidated metadata, meeting a full
    disk said "cannot use STORE: No space left on device: check that the path exists", not
    that every member was written and a rerun completes the store."""
    import errno

    from pipeline import run_end

    real = run_end.finalize
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_end, "finalize", lambda *a, **k: (_ for _ in ()).throw(full))
    sets = _small(tmp_path, **{"ensemble.members": 2, "sampler.method": "sequential-sde"})
    args = ["sample", "jobs/configs/grf.toml",
            *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"piadm: error: the members are written to {sets['output.path']}, "
                          "but recording the run there (piadm wrote 2 members: its history "
                          "line and the consolidated metadata readers open) failed: No space "
                          "left on device; fix the cause"), err
    assert zarr.open_group(sets["output.path"], mode="r")["done"][:].all()
    monkeypatch.setattr(run_end, "finalize", real)
    assert main(args) == 0
    assert "wrote 0 members (2 already written)" in zarr.open_group(
        sets["output.path"], mode="r").attrs["history"]


def test_an_output_inside_a_store_or_replacing_one_through_a_link_is_refused(tmp_path, capsys):
    first = load_config("jobs/configs/grf.toml", _small(tmp_path))
    assert sample(first).members == 2
    store = first.output.path
    sets = _small(tmp_path, **{"output.path": f"{store}/sub.zarr"})
    args = ["sample", "jobs/configs/grf.toml",
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]
    assert main([*args, "--dry-run"]) == 2  # the dry run refuses what the run refuses
    assert f"would be refused: output {store}/sub.zarr is inside the Zarr store" in (
        capsys.readouterr().err)
    assert main(args) == 2
    assert f"is inside the Zarr store {store}" in capsys.readouterr().err
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    sets = _small(tmp_path, **{"output.path": str(link), "output.overwrite": True,
                               "sampler.seed": 9})
    args = ["sample", "jobs/configs/grf.toml",
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]
    assert main([*args, "--dry-run"]) == 2
    assert "would be refused" in capsys.readouterr().err
    assert main(args) == 2
    assert "is a symbolic link, and piadm does not replace a store through a link" in (
        capsys.readouterr().err)
    assert zarr.open_group(store, mode="r").attrs["piadm_store_digest"] == first.store_digest
    assert not (tmp_path / "link.zarr.claims").exists()


def test_a_link_to_nowhere_as_the_output_is_refused_naming_the_link(tmp_path, capsys):
    """The rename onto the link failed with the draft's name: "cannot use
    .dangling.zarr.creating-...: Not a directory"."""
    link = tmp_path / "dangling.zarr"
    link.symlink_to(tmp_path / "nowhere" / "x.zarr")
    sets = _small(tmp_path, **{"output.path": str(link)})
    assert main(["sample", "jobs/configs/grf.toml",
                 *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]) == 2
    err = capsys.readouterr().err
    assert (f"piadm: error: output {link} is a symbolic link to {tmp_path}/nowhere/x.zarr, "
            "which does not exist, and piadm does not make a store through a link") in err
    assert link.is_symlink() and [p.name for p in tmp_path.iterdir()] == ["dangling.zarr"]
    loop = tmp_path / "loop.zarr"
    loop.symlink_to("loop.zarr")  # relative, and to itself
    sets["output.path"] = str(loop)
    assert main(["sample", "jobs/configs/grf.toml",
                 *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]) == 2
    assert f"output {loop} is a symbolic link that leads back to itself" in (
        capsys.readouterr().err)


SHIPPED = "models/checkpoints/kolmogorov_uncond.pt"


def _broken_checkpoints(tmp_path):
    data = open(SHIPPED, "rb").read()
    sidecar = open(SHIPPED + ".json").read()
    cases = {"truncated.pt": data[:1000], "random.pt": bytes(range(256)) * 20,
             "alone.pt": data, "other.pt": data}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        if name != "alone.pt":
            (tmp_path / (name + ".json")).write_text(sidecar)
    # a sidecar of another network (its channels edited): the weights do not fit it
    meta = json.loads(sidecar)
    meta["unet"]["channels"] = [c // 2 for c in meta["unet"]["channels"]]
    (tmp_path / "other.pt.json").write_text(json.dumps(meta))
    return cases


@pytest.mark.parametrize("name, needle", [
    ("truncated.pt", "is not a readable piadm checkpoint (truncated, damaged or not one"),
    ("random.pt", "is not a readable piadm checkpoint (truncated, damaged or not one"),
    ("alone.pt", "has no metadata file"),
    # it said "truncated, damaged or not one (Error(s) in loading state_dict for Denoiser:)"
    ("other.pt", "its weights do not fit the network its metadata"),
])
def test_a_broken_checkpoint_is_one_line(tmp_path, capsys, name, needle):
    _broken_checkpoints(tmp_path)
    args = ["sample", "jobs/configs/kolmogorov_uncond.toml", "--set",
            f"model.checkpoint={json.dumps(str(tmp_path / name))}", "--set",
            f"output.path={json.dumps(str(tmp_path / 'out.zarr'))}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out.zarr").exists()


def test_an_output_path_that_cannot_be_made_is_one_line_before_a_calibration(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    sets = _small(tmp_path, **{"output.path": str(tmp_path / "a-file" / "sub" / "out.zarr"),
                               "sampler.tol": "auto"})
    args = ["sample", "jobs/configs/grf.toml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"cannot use {tmp_path / 'a-file'}" in errors[0] and "may write there" in errors[0]
    assert "calibrat" not in err  # refused before the costly start-up


def test_a_folder_that_refuses_new_entries_is_named_with_the_output_it_refuses(
        tmp_path, capsys):
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    sets = _small(tmp_path, **{"output.path": "/proc/x.zarr"})
    args = ["sample", "jobs/configs/grf.toml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot use /proc: " in err  # what the folder said, then what it means
    assert "on making a folder in it, so output.path /proc/x.zarr cannot be made there" in err


def test_the_store_carries_the_inputs_grid_and_cf_metadata(tmp_path):
    import numpy as np
    import xarray as xr

    from conftest import conditional_sets
    from pipeline.store import open_store

    data = np.random.default_rng(0).standard_normal((3, 16, 16)).astype("float32") + 5
    coords = {"time": ("time", [0.5, 1.0, 1.5], {"units": "days since 2020-01-01",
                                                 "axis": "T"}),
              "y": ("y", np.linspace(0, 1.5, 16), {"units": "m", "axis": "Y"}),
              "x": ("x", np.linspace(0, 3.0, 16), {"units": "m", "axis": "X"})}
    src = xr.Dataset({"vort": (("time", "y", "x"), data,
                               {"units": "s-1", "long_name": "relative vorticity"})},
                     coords=coords)
    src.to_zarr(tmp_path / "in.zarr", zarr_format=3, consolidated=False)
    out = tmp_path / "ens.zarr"
    sets = conditional_sets(tmp_path / "in.zarr", out, "sampler.method=piadm-sde")
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    ds = open_store(out)
    truth = xr.open_zarr(tmp_path / "in.zarr", consolidated=False)
    assert np.allclose(ds.x, truth.x) and ds.x.attrs["units"] == "m"
    assert ds.x.attrs["axis"] == "X" and ds.y.attrs["axis"] == "Y"
    raw = xr.open_zarr(out, decode_times=False)  # CF time: xarray re-encodes the same instants
    assert "since" in raw.time.attrs["units"] and raw.time.attrs["axis"] == "T"
    assert (ds.time.values == xr.open_zarr(tmp_path / "in.zarr").time.values).all()
    assert ds.vort.attrs["units"] == "s-1" and ds.vort.attrs["long_name"] == "relative vorticity"
    # the ensemble lines up with its truth point by point
    diff = ds.vort.mean("member") - truth.vort.assign_coords(time=ds.time)
    assert diff.sizes == {"time": 3, "y": 16, "x": 16}
    assert ds.attrs["Conventions"] == "CF-1.10"
    lines = ds.attrs["history"].splitlines()
    assert lines[0].endswith("store created") and lines[-1].endswith("piadm wrote 18 members")  # 3 times x 6
    assert json.loads(ds.attrs["piadm_history"]) == lines
    # the residual is in tol's units: a block stops once it is within sampler.tol = 0.05
    assert list(ds.sweep.values[:3]) == [1, 2, 3] and ds.sweep.attrs["long_name"]
    last = [r[np.isfinite(r)][-1] for r in ds.residual.values.reshape(-1, ds.sizes["sweep"])]
    assert max(last) <= 0.05


def test_a_store_of_grid_indices_names_its_axes_and_exports_to_netcdf(tmp_path):
    """Grid indices carry CF's axis (cf_xarray found none), done its flags, and no attribute
    is null: a sequential sampler's sampler_tol = None failed every NetCDF export."""
    import xarray as xr

    out = tmp_path / "g.zarr"
    assert main(["sample", "jobs/configs/grf.toml", "--set", f"output.path={out}",
                 "--set", "model.shape=[8, 8]", "--set", "sampler.steps=10",
                 "--set", "ensemble.members=2", "--set", "sampler.method=sequential-sde"]) == 0
    ds = xr.open_zarr(out)
    assert (ds.x.attrs["axis"], ds.y.attrs["axis"]) == ("X", "Y")
    assert ds.done.attrs["flag_values"] == [0, 1] and ds.item.attrs["long_name"]
    assert None not in ds.attrs.values() and "sampler_tol" not in ds.attrs
    ds.drop_vars("seed").to_netcdf(tmp_path / "g.nc", engine="scipy")  # NetCDF 3: no int64
    back = xr.open_dataset(tmp_path / "g.nc", engine="scipy")
    assert np.array_equal(back.field.values, ds.field.values)


def test_a_learned_models_store_has_its_training_grid(tmp_path):
    import numpy as np

    from pipeline.store import open_store

    sets = {"model.shape": [64, 64], "sampler.steps": 4, "sampler.method": "sequential-sde",
            "ensemble.members": 1, "ensemble.batch_size": 1, "output.path": str(tmp_path / "u")}
    args = ["sample", "jobs/configs/kolmogorov_uncond.toml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    ds = open_store(tmp_path / "u")
    assert np.allclose(ds.x.values, 2 * np.pi * np.arange(64) / 64)
    assert ds.x.attrs["axis"] == "X" and ds.vorticity.attrs["long_name"] == "relative vorticity"


def test_chunks_stay_under_64_mib_and_writers_keep_whole_chunks():
    from pipeline.store import member_chunk

    assert member_chunk(16, 64 * 64 * 4) == 16  # small fields: the batch is one chunk
    assert member_chunk(64, 1024 * 1024 * 4) == 16  # 4 MiB a member: 16 a chunk
    assert member_chunk(6, 1024 * 1024 * 4) == 6
    assert member_chunk(48, 1024 * 1024 * 4) == 16  # the largest divisor of the batch that fits
    assert member_chunk(8, 4096 * 4096 * 8) == 1  # one member over the cap: one a chunk
    # tiny fields of many rounds: the residual history is the largest array a member has
    # (its chunks of 20000 members x 1000 rounds were 76 MiB)
    from pipeline.config import load_config
    from pipeline.inputs import unconditional
    from pipeline.run_items import store_spec

    cfg = load_config("jobs/configs/grf.toml", [
        "sampler.method=piadm-sde", "sampler.block_size=2", "sampler.steps=1000",
        "model.shape=[8, 8]", "ensemble.batch_size=20000", "ensemble.members=20000"])
    spec = store_spec(cfg, unconditional(), (8, 8))
    assert spec.member_chunk * spec.sweeps * 4 <= 64 * 2**20 and 20000 % spec.member_chunk == 0


@pytest.mark.parametrize("dim", ["member", "sweep", "x", "seed"])
def test_an_input_item_dimension_the_store_uses_itself_is_refused(tmp_path, dim):
    # it became the store's first dimension beside its own 'member': a traceback from xarray
    sets = _small(tmp_path, **{"model.condition": "mean", "input.path": str(tmp_path / "in.zarr"),
                               "input.variable": "vort", "input.item_dim": dim})
    with pytest.raises(ConfigError) as err:
        load_config("jobs/configs/grf.toml", sets)
    assert f"input.item_dim = {dim!r} is a name the ensemble store uses itself" in str(err.value)


def test_blocks_redone_step_by_step_are_said_by_sample_and_bench(tmp_path, capsys):
    # one block of 100 over 50 steps diverges on this field: each batch redoes it sequentially
    sets = sum((["--set", f"{k}={v}"] for k, v in _small(tmp_path, **{
        "model.shape": [16, 16], "sampler.steps": 50, "sampler.block_size": 100,
        "sampler.method": "piadm-sde", "sampler.tol": 0.01}).items()), [])
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    err = capsys.readouterr().err
    assert "note: 1 Picard block diverged and was finished step by step" in err
    bench = ["--set", "bench.methods=['sequential-sde', 'piadm-sde']", "--set",
             "bench.sizes=[[16, 16]]", "--set", "bench.repeats=1"]
    assert main(["bench", "jobs/configs/grf.toml", *sets, *bench]) == 0
    err = capsys.readouterr().err
    assert "    note: 1 Picard block diverged and was finished step by step" in err


def test_blocks_left_above_the_tolerance_at_max_sweeps_are_warned_of(tmp_path, capsys):
    # blocks of 5 swept once at a tolerance none reaches in one sweep: a run ended normally,
    # its members far from the sequential path, and nothing said so
    sets = sum((["--set", f"{k}={v}"] for k, v in _small(tmp_path, **{
        "model.shape": [8, 8], "sampler.steps": 20, "sampler.block_size": 5,
        "sampler.method": "piadm-sde", "sampler.tol": 1e-9,
        "sampler.max_sweeps": 1}).items()), [])
    said = ("4 Picard blocks reached sampler.max_sweeps = 1 sweeps with their residual still "
            "above sampler.tol")
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    assert f"warning: {said}" in capsys.readouterr().err
    bench = ["--set", "bench.methods=['sequential-sde', 'piadm-sde']", "--set",
             "bench.sizes=[[8, 8]]", "--set", "bench.repeats=1"]
    assert main(["bench", "jobs/configs/grf.toml", *sets, *bench]) == 0
    assert f"    warning: {said}" in capsys.readouterr().err
    sets[sets.index("sampler.max_sweeps=1")] = "sampler.max_sweeps=5"  # exact: nothing to say
    assert main(["sample", "jobs/configs/grf.toml", *sets, "--set", "output.overwrite=true"]) == 0
    assert "max_sweeps" not in capsys.readouterr().err


def test_a_full_disk_met_while_making_the_store_names_it(tmp_path, monkeypatch, capsys):
    """Zarr's writes meet a full disk with an OSError that names no file: the line names
    the store ("cannot use: No space left" said nothing of where)."""
    import errno

    from pipeline import run_start

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_start, "open_or_create", full)
    sets = _small(tmp_path, **{"ensemble.members": 2, "sampler.method": "sequential-sde"})
    assert main(["sample", "jobs/configs/grf.toml",
                 *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])]) == 2
    assert f"cannot use {sets['output.path']}: No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("dry", [False, True])
def test_a_store_far_larger_than_its_disk_is_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch, dry):
    """A typo in ensemble.members (1e9) filled a disk for minutes (and a dry run took six to
    count the work) before anything failed."""
    from collections import namedtuple

    from pipeline import target

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(target.shutil, "disk_usage", lambda path: usage(10**6, 0, 10**5))
    sets = [f"--set={k}={json.dumps(v)}" for k, v in _small(tmp_path).items()]
    members = "--set=ensemble.members=1000"  # 1000 fields of 8 x 8 float32: 256 kB
    assert main(["sample", "jobs/configs/grf.toml", *sets, members,
                 *(["--dry-run"] if dry else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # 1000 fields of 256 bytes with 25 bytes of per-member values, in 500 chunks of each of 6
    # arrays (field, seed, rounds, model_calls, done, residual) of a 4 KiB block at least
    assert err.startswith("piadm: error: ensemble.members: the store at output.path") and (
        "would hold 1000 fields (1000 to write), 12.0 MiB with their per-member values and "
        "files, before compression (which keeps most of a field's bytes)" in err
        and "has 0.1 MiB free" in err), err
    assert list(tmp_path.iterdir()) == []
    # what the fields alone took was let through twice over, and filled the disk part way
    needed = 1000 * (256 + 25) + 500 * 6 * 4096
    for free, code in ((needed - 1, 2), (needed, 0)):
        monkeypatch.setattr(target.shutil, "disk_usage", lambda path: usage(10**8, 0, free))
        assert main(["sample", "jobs/configs/grf.toml", *sets, members, "--dry-run"]) == code


@pytest.mark.parametrize("change", [{"ensemble.members": 41},
                                    {"sampler.seed": 9, "output.overwrite": True}])
def test_growing_or_replacing_a_store_counts_only_the_room_it_takes(tmp_path, monkeypatch,
                                                                   change):
    """A grown store's members so far are on the disk already, and a replaced one is deleted
    before a field is written: neither needs the whole store's room again."""
    from collections import namedtuple

    from pipeline import target

    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "ensemble.members": 40, "ensemble.batch_size": 8, "sampler.method": "sequential-sde"}))
    sample(cfg)  # 40 fields of 8 x 8 float32: 10 KiB
    usage = namedtuple("usage", "total used free")
    # one member more is one more chunk file of each of 5 arrays: 20 KiB in blocks
    monkeypatch.setattr(target.shutil, "disk_usage", lambda path: usage(10**6, 0, 30_000))
    sample(load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "ensemble.members": 40, "ensemble.batch_size": 8, "sampler.method": "sequential-sde",
        **change})))
    assert xr.open_zarr(cfg.output.path)["done"].values.all()
    # growing it by 39 or 40 members (5 chunks of 5 arrays: 111 KiB) needs more than is free
    with pytest.raises(ConfigError, match=r"would hold 80 fields \((39|40) to write\)"):
        sample(load_config("jobs/configs/grf.toml", _small(tmp_path, **{
            "ensemble.batch_size": 8, "sampler.method": "sequential-sde",
            **change, "ensemble.members": 80, "output.overwrite": False})))


@pytest.mark.parametrize("recorded", [{"torch_version": "1.0.0"},
                                      {"made_on": "cuda: a GPU x1"}])  # this machine's: cpu
def test_device_noise_is_not_resumed_on_another_torch_or_device_type(tmp_path, capsys,
                                                                    recorded):
    """torch's generator gives other numbers on another device type or torch version: a store
    of device noise grown there would mix two streams under one set of keys."""
    sets = _small(tmp_path, **{"sampler.noise": "device", "sampler.method": "sequential-sde"})
    sample(load_config("jobs/configs/grf.toml", sets))
    zarr.open_group(sets["output.path"], mode="r+").attrs.update(recorded)
    before = xr.open_zarr(sets["output.path"])["field"].values
    with pytest.raises(Exception, match="sampled with sampler.noise = 'device' on"):
        sample(load_config("jobs/configs/grf.toml", {**sets, "ensemble.members": 4}))
    # nor replaced by output.overwrite: a requeue on another node would lose every member
    with pytest.raises(Exception, match="output.overwrite does not replace a store for the "
                                        "machine it runs on"):
        sample(load_config("jobs/configs/grf.toml", {**sets, "ensemble.members": 4,
                                                     "output.overwrite": True}))
    assert np.array_equal(xr.open_zarr(sets["output.path"])["field"].values, before)


def test_host_noise_drawn_differently_here_is_not_resumed(tmp_path):
    """A store records a fixed host draw's hash; where this numpy draws it otherwise (a
    normal sampler changed between versions) new members would come from other numbers
    than the old ones under the same keys, so the store is refused and left as it was."""
    from pipeline.noise import host_fingerprint

    sets = _small(tmp_path, **{"sampler.method": "sequential-sde"})
    sample(load_config("jobs/configs/grf.toml", sets))
    group = zarr.open_group(sets["output.path"], mode="r+")
    assert group.attrs["host_noise_sha256"] == host_fingerprint()
    sample(load_config("jobs/configs/grf.toml", {**sets, "ensemble.members": 3}))  # the same
    group.attrs.update(host_noise_sha256="0" * 64, numpy_version="1.0.0")
    before = xr.open_zarr(sets["output.path"])["field"].values
    for overwrite in (False, True):  # nor replaced: the machine changed, not the store
        with pytest.raises(Exception, match=r"sampled with host noise that this installation "
                                            r"draws differently \(numpy 1.0.0 then"):
            sample(load_config("jobs/configs/grf.toml", {**sets, "ensemble.members": 4,
                                                         "output.overwrite": overwrite}))
    assert np.array_equal(xr.open_zarr(sets["output.path"])["field"].values, before)


def test_an_output_path_stepping_back_out_of_a_missing_folder_is_refused(tmp_path, capsys):
    """zz/../out.zarr through no zz would make zz, and named the store two ways at once (an
    overwrite took its own store for another job's)."""
    sets = _small(tmp_path, **{"output.path": f"{tmp_path}/zz/../out.zarr",
                               "output.overwrite": True})
    args = ["sample", "jobs/configs/grf.toml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"output.path = '{tmp_path}/zz/../out.zarr' steps back out of '{tmp_path}/zz', " \
           "which does not exist: write the path without it" in err
    assert list(tmp_path.iterdir()) == []  # no zz, no store
    (tmp_path / "zz").mkdir()
    assert main(args) == 0  # through a folder that is there, the path is a plain one
    assert (tmp_path / "out.zarr").is_dir()


def test_a_run_whose_store_another_config_replaced_meanwhile_writes_nothing_into_it(
        tmp_path, monkeypatch):
    """Another configuration's run (output.overwrite) replaced the store after this run
    read its done flags and before its heartbeat could hold it off: with nothing left to
    sample, no batch write found out, and the run said it was done and added its history
    line to the other configuration's store. It stops with one line instead."""
    import shutil

    from pipeline import ensemble
    from pipeline.store import StoreExists

    sets = _small(tmp_path, **{"sampler.method": "sequential-sde"})
    other = {**sets, "output.path": str(tmp_path / "other.zarr"), "sampler.seed": 1}
    sample(load_config("jobs/configs/grf.toml", sets))
    sample(load_config("jobs/configs/grf.toml", other))
    opened = ensemble._open_work

    def replaced_meanwhile(*args, **kwargs):
        work = opened(*args, **kwargs)
        shutil.rmtree(sets["output.path"])
        shutil.copytree(other["output.path"], sets["output.path"])
        return work

    monkeypatch.setattr(ensemble, "_open_work", replaced_meanwhile)
    with pytest.raises(StoreExists, match="was replaced, grown or deleted by another run"):
        sample(load_config("jobs/configs/grf.toml", sets))
    history = json.loads(zarr.open_group(sets["output.path"], mode="r").attrs["piadm_history"])
    assert len(history) == 2 and "seed" not in history[-1]  # the other run's lines alone
    assert history == json.loads(zarr.open_group(other["output.path"],
                                                 mode="r").attrs["piadm_history"])


def test_a_store_another_job_grew_between_two_looks_is_looked_at_again(tmp_path,
                                                                         monkeypatch):
    """The growth is read before the store's identity: another job growing the store in
    between made it read as a different configuration's, with no setting named and advice
    to set output.overwrite. The run looks once more, and grows it further."""
    from pipeline import identity
    from pipeline.run import model_digest

    sets = _small(tmp_path, **{"sampler.method": "sequential-sde", "ensemble.members": 4})
    sample(load_config("jobs/configs/grf.toml", sets))
    more = load_config("jobs/configs/grf.toml", {**sets, "ensemble.members": 6})
    real, looks = identity.growth, []

    def stale_at_first(cfg):  # the count as it read before another job grew the store
        looks.append(cfg)
        return None if len(looks) <= 2 else real(cfg)

    monkeypatch.setattr(identity, "growth", stale_at_first)
    fate, _ = identity.target_fate(more, model_digest(more), overwrite=False)
    assert fate == "grow"


def test_a_store_gone_while_a_run_claims_its_batches_is_said_to_be_replaced(tmp_path):
    """Renamed aside by another configuration's replacement while this run looked for its
    next batch: the run's line said "cannot use: ... does not exist: check that the path
    exists", blaming the user's path."""
    from pipeline.done_record import members_left
    from pipeline.store import StoreExists

    with pytest.raises(StoreExists, match="was replaced or deleted by another run while this "
                                          "one worked on it"):
        members_left(tmp_path / "gone.zarr", 0, (0, 1))


def test_a_store_another_job_made_meanwhile_on_another_device_is_not_resumed(tmp_path,
                                                                              monkeypatch):
    """Two jobs of a device-noise config with output.overwrite meet another configuration's
    store: the first replaces it on its GPU, and the second, which checked the old store,
    finds the first's under the lock and resumed it with its own device's noise."""
    import shutil

    from pipeline import run_start
    from pipeline.store import StoreExists

    sets = _small(tmp_path, **{"sampler.method": "sequential-sde", "sampler.noise": "device",
                               "output.overwrite": True})
    firsts = {**sets, "output.path": str(tmp_path / "first.zarr")}
    sample(load_config("jobs/configs/grf.toml", firsts))  # the first job's, on another GPU
    zarr.open_group(firsts["output.path"], mode="r+").attrs.update(made_on="cuda: a GPU x1")
    sample(load_config("jobs/configs/grf.toml", {**sets, "sampler.seed": 1}))  # another's
    real = run_start.open_or_create

    def first_job_replaced_it(spec, **kwargs):
        shutil.rmtree(spec.path)
        shutil.copytree(firsts["output.path"], spec.path)
        return real(spec, **kwargs)

    monkeypatch.setattr(run_start, "open_or_create", first_job_replaced_it)
    with pytest.raises(StoreExists, match="sampled with sampler.noise = 'device' on cuda: a GPU"):
        sample(load_config("jobs/configs/grf.toml", sets))


@pytest.mark.parametrize("method, attrs, refused", [
    # its ring kept a far guess's rounding: members apart from today's
    ("window", {"sampler_revision": 1, "created": "2026-12-05T12:00:00Z"}, True),
    ("window", {"sampler_revision": None, "created": "2026-12-01T12:00:00Z"}, True),  # unsaid
    ("window", {"sampler_revision": 1, "created": "2026-12-05T22:00:00Z"}, False),  # mended
    ("piadm-sde", {"sampler_revision": 1, "created": "2026-12-01T12:00:00Z"}, False),  # joins
])
def test_a_store_that_a_superseded_sampler_revision_filled_is_not_grown(tmp_path, method,
                                                                       attrs, refused):
    """A window store made before the ring's fix grew with members of the mended sampler,
    silently: at coarse steps its members stood 2 to 4 from theirs. Stores recorded their
    sampler's revision only later: one that does not say is as old as its creation."""
    sets = _small(tmp_path, **{"sampler.method": method, "sampler.tol": 1e-2})
    assert sample(load_config("jobs/configs/grf.toml", sets)).members == 2
    group = zarr.open_group(sets["output.path"], mode="r+")
    group.attrs.update({k: v for k, v in attrs.items() if v is not None})
    if attrs["sampler_revision"] is None:
        del group.attrs["sampler_revision"]
    before = zarr.open_group(sets["output.path"], mode="r")["field"][:]
    more = load_config("jobs/configs/grf.toml", {**sets, "ensemble.members": 4})
    if not refused:
        assert sample(more).members == 2
        return
    with pytest.raises(Exception, match=(
            f"holds members that {method} revision 1 made, which kept a far guess's rounding "
            r"in accepted points at coarse steps \(h > 2 ln 2\), up to 1.0 from the sequential "
            rf"path; this piadm's {method} \(revision 2\) would add members apart from them")):
        sample(more)
    assert (zarr.open_group(sets["output.path"], mode="r")["field"][:] == before).all()
    replaced = load_config("jobs/configs/grf.toml", {**sets, "output.overwrite": True})
    assert sample(replaced).members == 2
    attrs = zarr.open_group(sets["output.path"], mode="r").attrs
    assert attrs["sampler_revision"] == 2


def test_a_path_stepping_back_out_of_a_link_or_spaced_at_its_ends_is_refused(tmp_path,
                                                                              monkeypatch, capsys):
    """"deep/../x.zarr" with deep a link: xarray read and wrote ./x.zarr, the file system's
    checks and renames the folder beside the link's target (a draft left behind, another
    input read); " out/x.zarr" made a folder named " out". The link is judged where the
    command runs, not where a config is only read (`piadm config`, a store's own config)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real" / "a" / "b").mkdir(parents=True)
    (tmp_path / "deep").symlink_to(tmp_path / "real" / "a" / "b")
    config = str(Path(__file__).parents[1] / "jobs" / "configs" / "grf.toml")
    (tmp_path / "deep" / "sub").mkdir()
    twice = "/".join(["deep", "sub", "..", "..", "x.zarr"])  # the link named, not deep/sub/..
    for value, through in (("deep/../x.zarr", "deep"), (twice, "deep")):
        assert load_config(config, {"output.path": value}).output.path == value
        capsys.readouterr()
        assert main(["sample", config, "--dry-run", "--set", f"output.path={value}"]) == 2
        assert (f"config: output.path = {value!r} steps back (..) out of {through!r}, a link "
                "to another folder") in capsys.readouterr().err
    assert main(["sample", config, "--set", "model.condition=mean", "--set",
                 "input.variable=v", "--set", "input.path=deep/../in.zarr", "--set",
                 "output.path=o.zarr"]) == 2
    assert "input.path = 'deep/../in.zarr' steps back" in capsys.readouterr().err
    for spaced in (" out/x.zarr", "out/x.zarr "):
        with pytest.raises(ConfigError, match="starts or ends with a space: remove it"):
            load_config(config, {"output.path": spaced})
    # through a link without stepping back, or back out of a plain folder: as written
    for fine in ("deep/x.zarr", "real/a/../x.zarr", "../x.zarr"):
        assert main(["sample", config, "--dry-run", "--set", f"output.path={fine}"]) == 0
    assert not list(tmp_path.glob("**/*.zarr")) and not list(tmp_path.glob(".*"))


def test_the_done_record_read_from_its_chunk_files_is_zarrs_and_damage_falls_back(tmp_path):
    """A store of 100,000 items holds a done chunk an item: zarr read them at 130 to 250 us
    each, 13 to 25 s at every start and end of a run and in `piadm status`. Read from the
    files directly it must be exactly zarr's reading, chunks never written read as not done,
    and a chunk that does not decode leaves the reading (and its naming) to zarr."""
    import numpy as np
    import zarr

    from pipeline.done_record import DamagedRecord, done_members, from_chunk_files

    path = tmp_path / "s.zarr"
    group = zarr.open_group(path, mode="w")
    done = group.create_array("done", shape=(7, 10), chunks=(1, 4), dtype="int8", fill_value=0)
    assert (from_chunk_files(done) == 0).all()  # nothing written yet
    flags = np.zeros((7, 10), np.int8)
    flags[0, :8] = flags[3, 4:] = flags[6, 8:] = 1  # an edge chunk, part full, among them
    done[:] = flags
    assert (from_chunk_files(done) == flags).all() and (done_members(path) == (flags == 1)).all()
    (path / "done" / "c" / "3" / "1").write_bytes(b"cut short")
    assert from_chunk_files(done) is None
    with pytest.raises(DamagedRecord, match="damaged at items 3..3 members 4..7"):
        done_members(path)
    raw = zarr.open_group(tmp_path / "raw.zarr", mode="w").create_array(
        "done", shape=(3, 4), chunks=(1, 4), dtype="int8", fill_value=0, compressors=None)
    raw[1] = 1
    assert (from_chunk_files(raw) == np.array([[0] * 4, [1] * 4, [0] * 4])).all()
    older = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2).create_array(
        "done", shape=(3, 4), chunks=(1, 4), dtype="int8", fill_value=0)
    older[1] = 1
    assert from_chunk_files(older) is None  # its keys and codecs are another format's: zarr's


@pytest.mark.parametrize("chunks", [(1, 4), (3, 4), (2, 10)])
def test_a_batchs_flags_read_from_its_chunk_files_are_zarrs(tmp_path, chunks):
    """members_left reads a batch's flags twice a batch (before and after its claim): zarr
    took about 2 ms a read, a run of many small batches paid it at every one. Read from the
    files it must be zarr's reading for any item and member range, in chunks of several
    items too, and a damaged chunk left to zarr, which names it."""
    import numpy as np
    import zarr

    from pipeline.done_record import DamagedRecord, members_left, row_from_chunk_files

    path = tmp_path / "s.zarr"
    done = zarr.open_group(path, mode="w").create_array(
        "done", shape=(7, 10), chunks=chunks, dtype="int8", fill_value=0)
    rng = np.random.default_rng(1)
    flags = (rng.random((7, 10)) < 0.5).astype(np.int8)
    flags[4] = 0  # a row of chunks never written
    done[:] = flags
    for item in range(7):
        for lo in range(10):
            for hi in range(lo + 1, 11):
                got = row_from_chunk_files(done, item, slice(lo, hi))
                assert got is not None and (got == done[item, lo:hi]).all(), (item, lo, hi)
                assert members_left(path, item, range(lo, hi)) == tuple(
                    m for m in range(lo, hi) if flags[item, m] != 1)
    assert row_from_chunk_files(done, 7, slice(0, 4)) is None  # past the items: zarr's error
    (path / "done" / "c" / "1" / "0").write_bytes(b"cut short")  # the second row of chunks
    item = 3 if chunks[0] == 3 else 1 if chunks[0] == 1 else 2
    assert row_from_chunk_files(done, item, slice(0, 4)) is None
    with pytest.raises(DamagedRecord, match="damaged at items"):
        members_left(path, item, range(0, 4))
