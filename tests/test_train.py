"""``piadm train``: the same short run on 1 and 2 ranks reaches the same losses; the
checkpoint reloads without pickle and its model samples through the model adapters."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from models.learned import load_unet, unet_score_model
from pipeline.cli import main
from pipeline.comm import SerialComm
from pipeline.labels import label_text
from pipeline.errors import Interrupted
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.samplers import SAMPLERS, Options
from models.checkpoint import load_denoiser

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.steps=6", "train.batch_size=6", "train.channels=[8, 16]", "train.val_every=3",
        "train.log_every=3", "train.validation=0.25"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "k.zarr"
    sets = ["data.resolution=16", "data.spinup=1.0", "data.interval=0.25", "data.snapshots=16",
            "data.chunk=8", f"data.path={path}"]
    assert main(["generate-data", "jobs/configs/kolmogorov.toml", *sum((["--set", s] for s in sets), [])]) == 0
    return path


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second, independent trajectory (data.seed = 1) at the same resolution."""
    path = tmp_path_factory.mktemp("data") / "k1.zarr"
    sets = ["data.resolution=16", "data.spinup=1.0", "data.interval=0.25", "data.snapshots=8",
            "data.chunk=8", "data.seed=1", f"data.path={path}"]
    assert main(["generate-data", "jobs/configs/kolmogorov.toml", *sum((["--set", s] for s in sets), [])]) == 0
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory, dataset):
    """The tiny run's checkpoint, trained once for the tests that only read it."""
    path = tmp_path_factory.mktemp("plain") / "plain.pt"
    assert main(_train_args(dataset, path)) == 0
    return path


@pytest.fixture(scope="module")
def cond(tmp_path_factory, dataset):
    """The tiny downscaler's checkpoint (conditioned on vorticity_coarse), trained once."""
    path = tmp_path_factory.mktemp("cond") / "cond.pt"
    assert main(_train_args(dataset, path, "train.condition=vorticity_coarse")) == 0
    return path


def _train_args(dataset, ckpt, *extra):
    sets = TINY + [f"train.data={dataset}", f"train.checkpoint={ckpt}", *extra]
    return ["train", "jobs/configs/kolmogorov.toml", *sum((["--set", s] for s in sets), [])]


def _history(ckpt):
    return torch.load(ckpt, weights_only=True)["history"].numpy()


def test_one_and_two_ranks_reach_the_same_losses(tmp_path, dataset):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert main(_train_args(dataset, one)) == 0
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec (pip install mpich)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "pipeline.cli",
                           *_train_args(dataset, two)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _history(one), _history(two)
    assert len(a) == 6 and np.allclose(a, b, rtol=1e-4), (a, b)
    assert a[-1] < a[0]  # it learns


def test_training_resumes_from_its_checkpoint(tmp_path, dataset, plain, capsys):
    split = tmp_path / "split.pt"
    assert main(_train_args(dataset, split, "train.steps=3", "train.log_every=2")) == 0
    # the first step is said (its pace and the time left), not only every log_every steps
    first = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in first if line.startswith("step ")] == ["1/3", "2/3", "3/3"]
    assert re.search(r"step 1/3  mean loss .* eta \d+s$", next(
        line for line in first if line.startswith("step 1/3")))
    assert main(_train_args(dataset, split, "train.log_every=2")) == 0  # continues from step 3
    assert np.allclose(_history(plain), _history(split), rtol=1e-5)
    # its first logged loss is step 4's alone, not the two-step window's sum over two
    lines = capsys.readouterr().err.splitlines()
    logged = next(line for line in lines if "step 4/6" in line)
    assert f"mean loss {_history(split)[3]:.4f}" in logged
    # the time left at this run's pace (its own steps: 4 to 6, not from 0), none at the end
    assert re.search(r"elapsed \d+s  eta \d+s$", logged)
    assert next(line for line in lines if "step 6/6" in line).endswith("s") and \
        "eta" not in next(line for line in lines if "step 6/6" in line)
    recorded = json.loads(Path(f"{split}.json").read_text())["val_loss"]
    capsys.readouterr()
    assert main(_train_args(dataset, split)) == 0  # nothing left to train: its validation loss
    err = capsys.readouterr().err
    assert f"validation loss {recorded:.4f}" in err
    assert "already holds step 6, train.steps = 6: nothing to train" in err
    # fewer steps than it holds: still nothing trained, and said so
    assert main(_train_args(dataset, split, "train.steps=4")) == 0
    err = capsys.readouterr().err
    assert "already holds step 6, train.steps = 4: nothing to train (raise train.steps" in err
    assert json.loads(Path(f"{split}.json").read_text())["step"] == 6


def test_a_run_killed_while_saving_its_first_checkpoint_trains_again(tmp_path, dataset, plain,
                                                                     monkeypatch):
    from models.checkpoint import sidecar

    def killed(*args, **kwargs):
        raise SystemExit(137)

    ckpt = tmp_path / "k.pt"
    monkeypatch.setattr(Path, "write_bytes", killed)  # the tensors' file, after the sidecar
    with pytest.raises(SystemExit):
        main(_train_args(dataset, ckpt))
    monkeypatch.undo()
    assert sidecar(ckpt).exists() and not ckpt.exists()  # never tensors without a sidecar
    assert main(_train_args(dataset, ckpt)) == 0  # from step 0, as a run never killed
    assert np.allclose(_history(ckpt), _history(plain), rtol=1e-5)
    # starting anew over it, killed the same way: its sidecar never sits on the old tensors
    monkeypatch.setattr(Path, "write_bytes", killed)
    with pytest.raises(SystemExit):
        main(_train_args(dataset, ckpt, "train.resume=false", "train.lr=1e-3"))
    monkeypatch.undo()
    assert sidecar(ckpt).exists() and not ckpt.exists()


@pytest.mark.parametrize("stop, said, code", [
    (KeyboardInterrupt, "interrupted (Ctrl-C)", 130),
    (lambda: Interrupted(signum=signal.SIGTERM), "stopped by SIGTERM", 143)])  # its handler's
def test_ctrl_c_or_sigterm_says_which_step_the_checkpoint_holds_and_a_rerun_resumes(
        tmp_path, dataset, plain, monkeypatch, capsys, stop, said, code):
    import pipeline.train

    validations = []

    def interrupted_at_the_second(*args):
        validations.append(1)
        if len(validations) == 2:  # step 6, before its save: the checkpoint holds step 3
            raise stop()
        return measured(*args)

    measured = pipeline.train.validation_loss
    monkeypatch.setattr(pipeline.train, "validation_loss", interrupted_at_the_second)
    ckpt = tmp_path / "c.pt"
    assert main(_train_args(dataset, ckpt)) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"piadm: {said}: train.checkpoint {ckpt} holds step 3 of 6 (saved every "
        "train.val_every = 3 steps): rerun the same command to resume from there")
    monkeypatch.undo()
    assert main(_train_args(dataset, ckpt)) == 0
    assert np.allclose(_history(ckpt), _history(plain), rtol=1e-5)


def test_a_checkpoint_inside_a_zarr_store_is_refused_before_writing(dataset, capsys):
    ckpt = dataset / "m.pt"
    assert main(_train_args(dataset, ckpt)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"piadm: error: train.checkpoint {ckpt} is inside the Zarr store {dataset}: choose a "
        "train.checkpoint outside it")
    assert not ckpt.exists() and not Path(f"{ckpt}.json").exists()


def test_a_second_run_on_a_checkpoint_being_trained_is_refused_naming_the_first(
        tmp_path, dataset, capsys):
    """Two runs saving one train.checkpoint would resume and overwrite each other's saves:
    the first holds its lock for the run (released when it ends, killed or not)."""
    import socket

    from pipeline.train import _hold_checkpoint

    ckpt = tmp_path / "m.pt"
    first = _hold_checkpoint(ckpt)
    try:
        assert main(_train_args(dataset, ckpt)) == 2
    finally:
        first.close()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"piadm: error: train.checkpoint {ckpt} is being trained by another piadm train (host "
        f"{socket.gethostname()}, pid {os.getpid()}): wait for it to end, or choose another "
        "train.checkpoint")
    assert not ckpt.exists()
    (tmp_path / "alias").mkdir()  # a link to the checkpoint is the checkpoint: the same lock
    (tmp_path / "alias" / "m.pt").symlink_to(ckpt)
    first = _hold_checkpoint(ckpt)
    try:
        assert main(_train_args(dataset, tmp_path / "alias" / "m.pt")) == 2
        assert "is being trained by another piadm train" in capsys.readouterr().err
    finally:
        first.close()
    assert main(_train_args(dataset, ckpt, "train.steps=3")) == 0  # the lock is free again


def test_a_run_whose_checkpoint_another_run_saved_while_it_started_is_refused(
        tmp_path, dataset, plain, capsys, monkeypatch):
    """The lock is taken once the inputs have passed their checks: a run that read the
    checkpoint, then found it saved anew by another run that has since ended, would write its
    stale state over the other's. It is refused, and the other's checkpoint kept."""
    import shutil

    from pipeline import train as training

    ckpt = tmp_path / "m.pt"
    shutil.copy(plain, ckpt)
    shutil.copy(f"{plain}.json", f"{ckpt}.json")
    prepare = training._prepare

    def meanwhile(*args):
        out = prepare(*args)
        saved = tmp_path / "saved.pt"
        shutil.copy(ckpt, saved)
        os.replace(saved, ckpt)  # the other run's save: a new file renamed in
        return out

    monkeypatch.setattr(training, "_prepare", meanwhile)
    after = _contents_of(ckpt)
    assert main(_train_args(dataset, ckpt, "train.steps=9")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"piadm: error: train.checkpoint {ckpt} was saved by another piadm train while this "
        "one started: rerun to go on from what it holds")
    assert "resuming" not in err  # said only once the run holds the checkpoint
    assert _contents_of(ckpt) == after


def _contents_of(path):
    return path.read_bytes(), Path(f"{path}.json").read_bytes()


def test_saves_at_once_into_one_checkpoint_never_tear_a_file(tmp_path, plain):
    """Each save writes its own temp file (an export in place while a run saves, say): the
    files renamed into place are whole, never one writer's file cut by another's."""
    import threading

    from models.checkpoint import save_checkpoint

    state = torch.load(plain, weights_only=True)
    meta = json.loads(Path(f"{plain}.json").read_text())
    ckpt, errors = tmp_path / "c.pt", []

    def saves():
        try:
            for _ in range(15):
                save_checkpoint(ckpt, state, meta)
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=saves) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert torch.load(ckpt, weights_only=True)["step"] == state["step"]
    assert json.loads(Path(f"{ckpt}.json").read_text()) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.json"]
    # a save killed mid-write left its temp file: the next save on the host sweeps it
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".c.pt.{socket.gethostname()}-{dead.pid}-0a1b2c3d.tmp"
    left.write_bytes(b"half a save")
    other = tmp_path / f".c.pt.{socket.gethostname()}-12-{dead.pid}-0a1b2c3d.tmp"
    other.write_bytes(b"host <this>-12's save")  # another host's, whose name starts as ours
    save_checkpoint(ckpt, state, meta)
    assert not left.exists() and other.exists()


def test_a_save_on_a_full_disk_names_the_file_and_keeps_the_last_checkpoint_whole(
        tmp_path, plain, monkeypatch):
    """torch's writer reported a full disk as a RuntimeError (a traceback, not one line), and
    the sidecar, written first, described a save whose tensors never landed."""
    import errno

    from models.checkpoint import save_checkpoint

    state = torch.load(plain, weights_only=True)
    meta = json.loads(Path(f"{plain}.json").read_text())
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, state, meta)
    kept = _contents_of(ckpt)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left") as raised:
        save_checkpoint(ckpt, {**state, "step": state["step"] + 5}, {**meta, "step": 99})
    assert raised.value.filename == str(ckpt)
    monkeypatch.undo()
    assert _contents_of(ckpt) == kept  # the tensors and the sidecar of the last save, as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.json"]


def test_training_can_start_from_another_checkpoints_ema_weights(tmp_path, dataset, capsys):
    from models.export import export

    first, shipped, tuned = tmp_path / "first.pt", tmp_path / "ship.pt", tmp_path / "tuned.pt"
    assert main(_train_args(dataset, first)) == 0
    export(first, shipped)
    # a vanishing learning rate: the tuned run's networks are the shipped EMA weights
    assert main(_train_args(dataset, tuned, f"train.init={shipped}", "train.steps=1",
                            "train.lr=1e-12")) == 0
    a, _ = load_denoiser(shipped)
    b, _ = load_denoiser(tuned)
    x, s = torch.randn(2, 16, 16), torch.tensor([0.5, 2.0])
    assert torch.allclose(a(x, s), b(x, s), atol=1e-6)
    assert _history(tuned)[0] < _history(first)[0]  # it starts where the first run ended
    assert main(_train_args(dataset, tmp_path / "other.pt", f"train.init={shipped}",
                            "train.channels=[8, 16, 32]")) == 2
    assert "train.init" in capsys.readouterr().err
    # one trained on train.data with a smaller held-out share has seen this run's first
    # held-out times (16 times: it trained on 14, this run holds out the last 4)
    narrow = tmp_path / "narrow.pt"
    assert main(_train_args(dataset, narrow, "train.validation=0.125")) == 0
    capsys.readouterr()
    assert main(_train_args(dataset, tmp_path / "leak.pt", f"train.init={narrow}")) == 2
    assert (f"train.init {narrow} was trained on {dataset} (train.data itself) up to 4.5, "
            "which reaches the times this run holds out (4.25 .. 5.0)") in capsys.readouterr().err
    assert not (tmp_path / "leak.pt").exists()


def test_a_residual_model_is_fine_tuned_on_more_data_with_its_own_sigma_data(tmp_path, dataset,
                                                                            other, capsys):
    """A residual's sigma_data is measured from the data, so train.extra changes it: starting
    from a checkpoint is not refused for it (the user cannot set it), and the run keeps the
    value its own data give, as a resumed run does."""
    res = ["train.condition=vorticity_coarse", "train.residual=true"]
    first, tuned = tmp_path / "first.pt", tmp_path / "tuned.pt"
    assert main(_train_args(dataset, first, *res)) == 0
    assert main(_train_args(dataset, tuned, *res, f"train.init={first}", "train.steps=3",
                            f"train.extra=['{other}']")) == 0
    sigma = {p: json.loads(Path(f"{p}.json").read_text())["unet"]["sigma_data"]
             for p in (first, tuned)}
    assert sigma[first] != sigma[tuned]
    # its extra stores recorded absolute: a later train.init from another folder finds them
    assert json.loads(Path(f"{tuned}.json").read_text())["extra"] == [os.path.abspath(other)]
    # but not a network that learned the field itself: another target
    plain_cond = tmp_path / "plain.pt"
    assert main(_train_args(dataset, plain_cond, "train.condition=vorticity_coarse")) == 0
    capsys.readouterr()
    assert main(_train_args(dataset, tmp_path / "r.pt", *res, f"train.init={plain_cond}")) == 2
    assert "learned the field itself (train.residual = false), this run the remainder" in \
        capsys.readouterr().err


def test_a_dataset_read_into_memory_trains_exactly_as_lazy_reads(tmp_path, dataset):
    from pipeline.settings import TrainConfig
    from pipeline.train_data import open_dataset

    lazy, cached = (open_dataset(TrainConfig(data=str(dataset), condition="vorticity_coarse",
                                             cache_mb=mb))[0] for mb in (0, 64))
    assert lazy.fields.chunks is not None and cached.fields.chunks is None
    times = np.array([5, 0, 9, 5])
    for a, b in zip(lazy.batch(times, "cpu"), cached.batch(times, "cpu")):
        assert torch.equal(a, b)
    one, two = tmp_path / "lazy.pt", tmp_path / "cached.pt"
    assert main(_train_args(dataset, one, "train.cache_mb=0")) == 0
    assert main(_train_args(dataset, two)) == 0
    assert np.allclose(_history(one), _history(two), rtol=1e-6)


def test_a_resumed_run_takes_the_configured_learning_rate(tmp_path, dataset):
    ckpt = tmp_path / "anneal.pt"
    assert main(_train_args(dataset, ckpt, "train.steps=3")) == 0
    assert main(_train_args(dataset, ckpt, "train.lr=1e-4")) == 0
    groups = torch.load(ckpt, weights_only=True)["opt"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-4]


def test_checkpoint_reloads_and_samples(plain):
    den, meta = load_denoiser(plain)
    assert meta["shape"] == [16, 16] and meta["std"] > 0
    model = unet_score_model(den, (16, 16))
    grid = make_grid("ou", 40, u_min=1e-3, u_max=10.0, block_size=20)
    noise = Noise(0, ((0, 0), (0, 1)), (16, 16))
    y, stats = SAMPLERS["piadm-sde"](model, noise.prior(), grid, noise,
                                     comm=SerialComm(), options=Options(tol=0.1))
    assert y.shape == (2, 16, 16) and bool(torch.isfinite(y).all()) and stats.rounds > 0


def test_weights_whose_metadata_a_cut_save_moved_on_are_refused(tmp_path, plain, capsys):
    """A save writes the sidecar, then the weights: killed in between after the data changed
    (train.extra added on resume), the sidecar's normalisation is not the weights'. Sampling
    with it would silently unnormalise in the wrong units."""
    import json
    import shutil

    ckpt = tmp_path / "cut.pt"
    shutil.copy(plain, ckpt)
    shutil.copy(f"{plain}.json", f"{ckpt}.json")
    meta = json.loads(Path(f"{ckpt}.json").read_text())
    Path(f"{ckpt}.json").write_text(json.dumps({**meta, "std": meta["std"] * 0.97,
                                                "step": meta["step"] + 3}))
    assert main(_sample_args(tmp_path / "s.zarr", f"model.checkpoint={ckpt}")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt}: its metadata {ckpt}.json is from a later save than its " \
        "weights" in err and not (tmp_path / "s.zarr").exists()
    from models.export import ExportError, export

    with pytest.raises(ExportError, match="is from a later save than its weights"):
        export(ckpt, tmp_path / "ship.pt")  # nor may a copy carry them as agreeing
    assert not (tmp_path / "ship.pt").exists()
    Path(f"{ckpt}.json").write_text(json.dumps({**meta, "step": meta["step"] + 3,
                                                "val_loss": 0.123}))
    load_denoiser(ckpt)  # the same units: a save cut short that changed nothing they use
    # an export carries the weights' step, not the later save's step and loss
    shipped = export(ckpt, tmp_path / "ship.pt")
    assert (shipped["step"], shipped["val_loss"]) == (meta["step"], None)
    assert torch.load(tmp_path / "ship.pt", weights_only=True)["step"] == meta["step"]
    capsys.readouterr()  # nor does a resumed run report the later save's loss as its own
    assert main(_train_args(meta["data"], ckpt, f"train.steps={meta['step']}")) == 0
    out = capsys.readouterr()
    assert f"already holds step {meta['step']}" in out.out + out.err
    assert "0.123" not in out.out + out.err


def _sample_args(out, *sets):
    base = ["model.kind=unet", "model.shape=[16, 16]", "sampler.steps=40", "sampler.block_size=20",
            "sampler.tol=0.1", "ensemble.members=4", "ensemble.batch_size=2", f"output.path={out}"]
    return ["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in base + list(sets)), [])]


def test_a_coarse_input_on_the_training_grid_rolled_is_refused(tmp_path, dataset, cond, capsys):
    """Longitudes from -180 for a network trained on longitudes from 0: taken by position,
    the members sat rolled under the training grid's coordinates, unseen. The checkpoint
    records its coarse grid for this; another grid of the same size is taken as given."""
    import json

    assert json.loads(Path(f"{cond}.json").read_text())["cond_grid"]["dims"] == [
        "y_coarse", "x_coarse"]
    ds = xr.open_zarr(dataset).load()
    for var in ds.variables.values():
        var.encoding = {}
    ds.roll(x_coarse=2, roll_coords=True).to_zarr(tmp_path / "rolled.zarr", zarr_format=3,
                                                  consolidated=False)
    ds.assign_coords(x_coarse=ds.x_coarse + 10).to_zarr(tmp_path / "moved.zarr", zarr_format=3,
                                                        consolidated=False)
    sets = [f"model.checkpoint={cond}", "model.condition=coarse",
            "input.variable=vorticity_coarse", "input.items=['3.0']"]
    args = _sample_args(tmp_path / "r.zarr", *sets, f"input.path={tmp_path / 'rolled.zarr'}")
    assert main([*args, "--dry-run"]) == 2
    assert re.search(r"has x_coarse \S+ \.\. \S+, the network's training grid rolled "
                     r"\(x_coarse 0\.\d+ \.\. \S+\): by position its members would sit rolled; "
                     r"roll it to the training's \(ds\.roll\(x_coarse=\.\.\., roll_coords=True\)\)",
                     capsys.readouterr().err)
    args = _sample_args(tmp_path / "m.zarr", *sets, f"input.path={tmp_path / 'moved.zarr'}")
    assert main([*args, "--dry-run"]) == 0


def test_piadm_sample_runs_trained_models_unconditional_and_downscaling(tmp_path, dataset,
                                                                       plain, cond, capsys):
    out = tmp_path / "plain.zarr"
    assert main(_sample_args(out, f"model.checkpoint={plain}")) == 0
    ds = xr.open_zarr(out)
    assert ds.vorticity.shape == (1, 4, 16, 16) and bool(np.isfinite(ds.vorticity).all())
    assert len(ds.attrs["model_sha256"]) == 64
    out = tmp_path / "cond.zarr"
    sets = [f"model.checkpoint={cond}", "model.condition=coarse", f"input.path={dataset}",
            "input.variable=vorticity_coarse", "input.items=['3.0', '3.25']"]
    assert main(_sample_args(out, *sets)) == 0
    ds = xr.open_zarr(out)
    assert ds.vorticity.dims == ("time", "member", "y", "x")  # named as the model's data
    assert ds.vorticity.shape == (2, 4, 16, 16) and list(ds.time.values) == [3.0, 3.25]
    assert main(["evaluate", "--no-figures", str(out), "--truth", str(dataset)]) == 0
    metrics = xr.open_dataset(tmp_path / "cond_eval" / "metrics.nc", engine="scipy")
    truth = xr.open_zarr(dataset).sel(time=[3.0, 3.25])
    upsampled = np.repeat(np.repeat(truth.vorticity_coarse.values, 4, 1), 4, 2)
    mae = np.abs(upsampled - truth.vorticity.values).mean()
    assert metrics.attrs["pairing"] == "paired" and "truth_note" not in metrics.attrs
    assert metrics.attrs["baseline_mae"] == pytest.approx(mae, rel=1e-5)
    # a copy of one of its items: the input is checked as the run selected it, then cut to
    # that item (it was refused as "other fields than those it took")
    ds.isel(time=[1]).to_zarr(tmp_path / "part.zarr", zarr_format=3)
    assert main(["evaluate", "--no-figures", str(tmp_path / "part.zarr"), "--truth",
                 str(dataset)]) == 0
    part = xr.open_dataset(tmp_path / "part_eval" / "metrics.nc", engine="scipy")
    assert part.attrs["baseline_mae"] == pytest.approx(
        np.abs(upsampled[1] - truth.vorticity.values[1]).mean(), rel=1e-5)
    # a truth of another trajectory with the same times scores, but the table says so
    other = xr.open_zarr(dataset).load()
    other["vorticity"] = other["vorticity"].roll(x=5, roll_coords=False)
    other.to_zarr(tmp_path / "other.zarr", zarr_format=3, consolidated=False)
    capsys.readouterr()
    assert main(["evaluate", "--no-figures", str(out), "--truth", str(tmp_path / "other.zarr"),
                 "--out", str(tmp_path / "other_eval")]) == 0
    assert "the truth's block averages are" in capsys.readouterr().out
    # a cut at or below the coarse input's resolution (4x4: k <= 2) leaves no added band
    capsys.readouterr()
    assert main(["evaluate", str(out), "--truth", str(dataset), "--cut", "2"]) == 2
    assert "--cut 2 is within the scales the coarse input resolves" in capsys.readouterr().err


def test_evaluate_takes_the_runs_own_input_or_says_why_not(tmp_path, dataset, cond, capsys,
                                                           monkeypatch):
    """A store names its input as its run did, relative to the folder it ran in: evaluated
    from elsewhere, that path is missing (a one-line error, not a disk-space hint) or names
    another store, whose fields its fingerprint tells apart (a refusal, not a wrong
    baseline)."""
    import shutil

    out = tmp_path / "cond.zarr"
    monkeypatch.chdir(dataset.parent)
    sets = [f"model.checkpoint={cond}", "model.condition=coarse", f"input.path={dataset.name}",
            "input.variable=vorticity_coarse", "input.items=['3.0', '3.25']"]
    args = _sample_args(out, *sets)
    args[1] = str(ROOT / args[1])  # the config, found from any folder
    assert main(args) == 0
    evaluate = ["evaluate", "--no-figures", str(out), "--truth", str(dataset), "--out",
                str(tmp_path / "ev")]
    assert main(evaluate) == 0  # from the run's folder
    import zarr

    group = zarr.open_group(out, mode="r+")
    recorded = group.attrs["input_fingerprint"]
    group.attrs["input_fingerprint"] = recorded[:3]  # an older piadm's: not compared
    assert main(evaluate) == 0
    group.attrs["input_fingerprint"] = recorded
    # a truth whose float times were written a rounding apart scores the same
    nudged = xr.open_zarr(dataset).load()
    nudged = nudged.assign_coords(time=nudged.time.values * (1 + 1e-13))
    nudged.to_zarr(tmp_path / "nudged.zarr")
    assert main(["evaluate", "--no-figures", str(out), "--truth", str(tmp_path / "nudged.zarr"),
                 "--out", str(tmp_path / "ev2")]) == 0
    same = [json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("ev", "ev2")]
    assert same[0]["crps"] == same[1]["crps"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(evaluate) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"piadm: error: the store was conditioned on input.path "
                          f"'{dataset.name}' (as its sample run named it), which is not found "
                          "from here: run piadm evaluate from the folder the sample ran in, "
                          f"{dataset.parent}")
    other = elsewhere / dataset.name
    shutil.copytree(dataset, other)
    ds = xr.open_zarr(other).load()
    ds["vorticity_coarse"] = ds.vorticity_coarse * 1.5
    ds.to_zarr(other, mode="w")
    assert main(evaluate) == 2
    assert "and the store found there from here holds other vorticity_coarse fields" in \
        capsys.readouterr().err


def test_a_downscaler_refuses_an_input_of_another_resolution_than_its_training(
        tmp_path, dataset, cond, capsys):
    assert load_unet(str(cond), (16, 16)).cond_shape == (4, 4)
    out = tmp_path / "fine.zarr"
    sets = [f"model.checkpoint={cond}", "model.condition=coarse", f"input.path={dataset}",
            "input.variable=vorticity", "input.items=['3.0']"]
    capsys.readouterr()
    assert main(_sample_args(out, *sets)) == 2  # the fine field divides the grid, but is not
    err = capsys.readouterr().err.strip().splitlines()[-1]  # what the model was trained on
    assert err.startswith("piadm: error: input: vorticity fields are [16, 16]")
    assert "coarse fields of [4, 4]" in err and not out.exists()


def test_bench_renoise_gives_each_downscaled_field_its_own_coarse_input(tmp_path, dataset, cond,
                                                                        capsys):
    import json

    sets = ["model.kind=unet", "model.shape=[16, 16]", f"model.checkpoint={cond}",
            "model.condition=coarse", f"input.path={dataset}", "input.variable=vorticity_coarse",
            f"train.data={dataset}", "train.condition=vorticity_coarse", "train.validation=0.25",
            "bench.quality_members=8", "sampler.method=sequential-sde", "sampler.steps=20"]
    out = tmp_path / "r.json"
    assert main(["bench", "jobs/configs/grf.toml", "--renoise", "--json", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    doc = json.loads(out.read_text())
    assert (doc["fields"], doc["draws"]) == (2, 4)  # 8 samples: 2 held-out times x 4 draws
    assert len(doc["rows"]) == 6 and doc["rows"][-1]["steps"] == 20
    for row in doc["rows"]:
        assert all(np.isfinite(v) and v > 0 for v in row["ratios"].values())
    assert "4 draws each given its coarse field" in capsys.readouterr().err


def test_bench_renoise_starts_only_from_levels_above_the_grids_end(tmp_path, dataset, plain):
    """A u_min above the first starting level (0.03) leaves that level out, not a traceback."""
    sets = ["model.kind=unet", "model.shape=[16, 16]", f"model.checkpoint={plain}",
            f"train.data={dataset}", "train.validation=0.25", "bench.quality_members=4",
            "sampler.method=sequential-sde", "sampler.steps=20", "sampler.u_min=0.05"]
    out = tmp_path / "r.json"
    assert main(["bench", "jobs/configs/grf.toml", "--renoise", "--json", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    levels = [row["u"] for row in json.loads(out.read_text())["rows"]]
    assert levels[0] == 0.1 and min(levels) > 0.05


@pytest.mark.parametrize("channels, needle", [
    ("[8, 12]", "train.channels = [8, 12]: give one width per level, each a multiple of 8"),
    ("[12]", "train.channels = [12]: give one width per level, each a multiple of 8"),
    ("[8, 8, 8, 8, 8, 8]", "train.channels = [8, 8, 8, 8, 8, 8] has 6 levels, but vorticity's "
                           "16x16 fields allow at most 5 (each level halves the grid)"),
])
def test_a_network_the_fields_cannot_hold_is_a_one_line_error(tmp_path, dataset, capsys,
                                                             channels, needle):
    ckpt = tmp_path / "bad.pt"
    assert main(_train_args(dataset, ckpt, f"train.channels={channels}")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # no banner before it
    assert needle in line
    assert not ckpt.exists()


def test_a_batch_too_large_for_memory_is_refused_naming_one_that_leaves_room(
        tmp_path, dataset, capsys, monkeypatch):
    """train.batch_size = 100000 on 16 x 16 fields was killed by the kernel, with no word,
    after taking every byte of the node: refused now before anything is written, naming the
    most that leaves room for a step's floor (the draws and the activations kept)."""
    from pipeline import train_memory

    room = 256 << 20
    monkeypatch.setattr(train_memory, "available_bytes",
                        lambda device, sharing=1: (room, "available on this node's host"))
    ckpt = tmp_path / "c.pt"
    assert main(_train_args(dataset, ckpt, "train.batch_size=100000")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("piadm: error: config: train.batch_size = 100000 on 1 rank needs at "
                           "least "), line
    fits, tried = map(int, re.search(r"at most (\d+) would leave room for that alone, and the "
                                     r"backward needs more besides, so try (\d+)", line).groups())
    assert not list(tmp_path.iterdir())  # no checkpoint, no lock beside it
    # the bound is the floor's: a batch of ``fits`` fits it, one more does not
    from functools import partial

    from models.unet import Denoiser, UNetConfig
    from pipeline.train import edm_loss

    torch.manual_seed(0)
    den = Denoiser(UNetConfig(channels=(8, 16), cond_channels=0, sigma_data=1.0))  # TINY's
    per = train_memory.saved_per_sample(partial(edm_loss, den), (16, 16), False, "cpu")
    floor = lambda batch: train_memory.step_floor(batch, batch, (16, 16), per, False)  # noqa: E731
    assert floor(fits).device <= room < floor(fits + 1).device
    assert tried == fits // 2
    assert main(_train_args(dataset, ckpt, f"train.batch_size={tried}", "train.steps=1",
                            "train.val_every=1")) == 0  # and the batch it suggests trains


def test_a_finished_runs_rerun_needs_no_room_for_a_step(tmp_path, dataset, plain, capsys,
                                                       monkeypatch):
    """A rerun of a training that holds its steps has nothing to train: it says so, wherever
    it runs, rather than weigh a step it will not take."""
    import shutil

    from pipeline import train_memory

    for name in (plain.name, plain.name + ".json"):
        shutil.copy(plain.parent / name, tmp_path / name)
    monkeypatch.setattr(train_memory, "available_bytes",
                        lambda device, sharing=1: (1, "available on this node's host"))
    capsys.readouterr()
    assert main(_train_args(dataset, tmp_path / plain.name)) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert main(_train_args(dataset, tmp_path / plain.name, "train.steps=7")) == 2  # one more
    assert "train.batch_size = 6 on 1 rank needs at least" in capsys.readouterr().err


@pytest.mark.parametrize("sets, said", [
    (["train.data={folder}"], "train.data {folder} is not a readable Zarr store "
                              "(GroupNotFoundError: "),
    (['train.extra=["{folder}"]'], "train.extra {folder} is not a readable Zarr store "),
    (["train.variable=vort"], "train.variable = 'vort' is not in train.data {data}: it has "
                              "vorticity, vorticity_coarse"),
    (["train.condition=coarse"], "train.condition = 'coarse' is not in train.data {data}: "),
])
def test_a_store_or_a_variable_that_is_not_there_is_named_by_its_setting(
        tmp_path, dataset, capsys, sets, said):
    """A folder that is no store said only "cannot read a Zarr store: No group found", and a
    missing variable "train: 'vort' is not in ...": neither said which setting to mend."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a store")
    ckpt = tmp_path / "x.pt"
    sets = [s.format(folder=folder) for s in sets]
    assert main(_train_args(dataset, ckpt, *sets)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("piadm: error: " + said.format(folder=folder, data=dataset)), line
    assert not ckpt.exists() and sorted(os.listdir(folder)) == ["readme.txt"]


def test_extra_stores_are_trained_on_and_the_held_out_split_stays_train_datas(dataset, other):
    from pipeline.settings import TrainConfig
    from pipeline.train_data import open_dataset

    plain = TrainConfig(data=str(dataset), condition="vorticity_coarse", validation=0.25)
    more = TrainConfig(data=str(dataset), condition="vorticity_coarse", validation=0.25,
                       extra=(str(other),))
    (a, held_a), (b, held_b) = open_dataset(plain), open_dataset(more)
    assert a.fields.sizes["time"] == 12 and b.fields.sizes["time"] == 12 + 8
    assert np.array_equal(held_a.fields.values, held_b.fields.values)
    truth = np.concatenate([a.fields.values, xr.open_zarr(other)["vorticity"].values])
    assert np.array_equal(b.fields.values, truth)
    assert b.coarse.sizes["time"] == 20
    assert b.mean == pytest.approx(truth.mean(), abs=1e-6) and b.std == pytest.approx(truth.std(), rel=1e-5)
    x, c = b.batch(np.array([15, 2]), "cpu")  # a time of the extra store, one of train.data's
    assert torch.allclose(x[0], torch.as_tensor((truth[15] - b.mean) / b.std, dtype=torch.float32))


@pytest.mark.parametrize("case", ["same trajectory", "a later stretch", "same store",
                                  "other shape", "a copy"])
def test_a_bad_extra_store_is_a_one_line_error_before_training(tmp_path, dataset, case, capsys):
    store = {"same trajectory": tmp_path / "again.zarr", "same store": dataset,
             "a later stretch": tmp_path / "later.zarr",
             "other shape": tmp_path / "big.zarr", "a copy": tmp_path / "copy.zarr"}[case]
    if case == "a copy":  # in float32, without generate-data's record: its fields tell it
        copy = xr.open_zarr(dataset).load()
        copy = copy.drop_attrs().astype("float32")
        copy.to_zarr(store, zarr_format=3, consolidated=False)
    elif case != "same store":
        # a later stretch: the same flow spun up longer, over train.data's held-out times
        sets = ["data.resolution=32" if case == "other shape" else "data.resolution=16",
                "data.spinup=3.0" if case == "a later stretch" else "data.spinup=1.0",
                "data.interval=0.25", "data.chunk=8", f"data.path={store}",
                "data.snapshots=16" if case == "same trajectory" else "data.snapshots=8"]
        assert main(["generate-data", "jobs/configs/kolmogorov.toml",
                     *sum((["--set", s] for s in sets), [])]) == 0
        capsys.readouterr()
    ckpt = tmp_path / "x.pt"
    assert main(_train_args(dataset, ckpt, f'train.extra=["{store}"]')) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # no banner before it
    assert "train.extra" in line
    assert {"same trajectory": "data.seed", "a later stretch": "at times that reach its "
                                                               "held-out ones", "same store": "repeats",
            "other shape": "resolution", "a copy": "holds fields of train.data's held-out "
                                                   "times"}[case] in line
    assert not ckpt.exists()


@pytest.mark.parametrize("case, needle", [
    ("flipped", "on y 5.89049 .. 0, train.data on y 0 .. 5.89049: the fields are joined by "
                "position; flip it (ds.isel(y=slice(None, None, -1)))"),
    ("rolled", "roll it to train.data's (ds.roll(x=..., roll_coords=True))"),
    ("renamed", "on dims ('lat', 'lon'), train.data on ('y', 'x'): rename them"),
    ("other units", "in 'K', train.data's vorticity in '1/s': convert it")])
def test_an_extra_store_on_another_grid_or_in_other_units_is_refused(tmp_path, dataset, other,
                                                                     case, needle, capsys):
    """Joined by position, a flipped, rolled or renamed grid or other units were trained on
    as train.data's fields (renamed dims broadcast into a traceback)."""
    ds = xr.open_zarr(other).load()
    for var in ds.variables.values():
        var.encoding = {}
    ds["vorticity"].attrs["units"] = "1/s"  # as if train.data's were so too
    if case == "flipped":
        ds = ds.isel(y=slice(None, None, -1))
    elif case == "rolled":
        ds = ds.roll(x=4, roll_coords=True)
    elif case == "renamed":
        ds = ds.rename(y="lat", x="lon")
    else:
        ds["vorticity"].attrs["units"] = "K"
    ours = xr.open_zarr(dataset).load()
    for var in ours.variables.values():
        var.encoding = {}
    ours["vorticity"].attrs["units"] = "1/s"
    ours.to_zarr(tmp_path / "data.zarr", zarr_format=3, consolidated=False)
    ds.to_zarr(tmp_path / "extra.zarr", zarr_format=3, consolidated=False)
    ckpt = tmp_path / "x.pt"
    assert main(_train_args(tmp_path / "data.zarr", ckpt,
                            f'train.extra=["{tmp_path / "extra.zarr"}"]')) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"piadm: error: train.extra {tmp_path / 'extra.zarr'} holds "
                           "vorticity") and needle in last, last
    assert not ckpt.exists()


def test_a_coarse_condition_running_the_other_way_from_its_fields_is_refused(tmp_path, dataset,
                                                                           capsys):
    """Trained on, each coarse field was paired upside down with its fine one, and sampling
    then refused the very data the model was trained on."""
    ds = xr.open_zarr(dataset).load()
    for var in ds.variables.values():
        var.encoding = {}
    ds.isel(y_coarse=slice(None, None, -1)).to_zarr(tmp_path / "mixed.zarr", zarr_format=3,
                                                   consolidated=False)
    ckpt = tmp_path / "x.pt"
    assert main(_train_args(tmp_path / "mixed.zarr", ckpt, "train.condition=vorticity_coarse")) == 2
    assert ("train.condition 'vorticity_coarse' of " f"{tmp_path / 'mixed.zarr'} has y_coarse "
            "running the other way from vorticity's y: write it the same way "
            "(ds.isel(y_coarse=slice(None, None, -1)))") in capsys.readouterr().err
    assert not ckpt.exists()


def test_an_extra_stores_bad_fields_are_named_by_store_and_time(tmp_path, dataset, other,
                                                                capsys):
    """A NaN in the second extra store was "time 13 of train.extra's, counted from 0 in
    their order", and a coarse field of another coarse factor asked for another resolution."""
    bad = xr.open_zarr(other).load()
    bad["vorticity"][5] = np.nan
    bad.to_zarr(tmp_path / "nan.zarr", zarr_format=3, consolidated=False)
    sets = ["data.resolution=16", "data.spinup=1.0", "data.interval=0.25", "data.chunk=8",
            "data.snapshots=8", "data.seed=3", "data.coarse_factor=2",
            f"data.path={tmp_path / 'cf2.zarr'}"]
    assert main(["generate-data", "jobs/configs/kolmogorov.toml",
                 *sum((["--set", s] for s in sets), [])]) == 0
    capsys.readouterr()
    assert main(_train_args(dataset, tmp_path / "x.pt",
                            f"train.extra=['{other}', '{tmp_path / 'nan.zarr'}']")) == 2
    time = label_text(bad["time"].values[5])
    assert (f"(the first: time {time} of train.extra {tmp_path / 'nan.zarr'})"
            in capsys.readouterr().err)
    assert main(_train_args(dataset, tmp_path / "y.pt", "train.condition=vorticity_coarse",
                            f"train.extra=['{tmp_path / 'cf2.zarr'}']")) == 2
    assert ("(made by piadm generate-data: make it with train.data's data.resolution and "
            "data.coarse_factor)" in capsys.readouterr().err)


def test_the_same_flow_before_the_held_out_times_or_another_forcing_is_taken(tmp_path,
                                                                              dataset):
    """An extra store of train.data's flow that ends before its held-out times holds none of
    them, and one of another forcing is another flow: both are trained on."""
    from pipeline.settings import TrainConfig
    from pipeline.train_data import open_dataset

    stores = {"earlier.zarr": ["data.spinup=0.0", "data.snapshots=8"],  # times 0.25 .. 2.0
              "forced.zarr": ["data.spinup=1.0", "data.snapshots=16", "data.forcing=2.0"]}
    for name, sets in stores.items():
        sets = ["data.resolution=16", "data.interval=0.25", "data.chunk=8",
                f"data.path={tmp_path / name}", *sets]
        assert main(["generate-data", "jobs/configs/kolmogorov.toml",
                     *sum((["--set", s] for s in sets), [])]) == 0
    trn, _ = open_dataset(TrainConfig(data=str(dataset), validation=0.25,
                                      extra=tuple(str(tmp_path / n) for n in stores)))
    assert trn.fields.sizes["time"] == 12 + 8 + 16


def test_fields_standardised_per_time_are_no_copy_of_the_held_out_ones(tmp_path, dataset, other):
    """Every field standardised per time has the same norm, and fields of zeros all match:
    only a copy is refused."""
    from pipeline.settings import TrainConfig
    from pipeline.train_data import open_dataset

    for source, name in ((dataset, "z0.zarr"), (other, "z1.zarr")):
        v = xr.open_zarr(source)[["vorticity"]].load().drop_attrs()
        v = (v - v.mean(("y", "x"))) / v.std(("y", "x"))
        v["vorticity"][-1] = 0.0  # a held-out field of zeros in train.data, and one in extra
        v.to_zarr(tmp_path / name, zarr_format=3, consolidated=False)
    trn, _ = open_dataset(TrainConfig(data=str(tmp_path / "z0.zarr"), validation=0.25,
                                      extra=(str(tmp_path / "z1.zarr"),)))
    assert trn.fields.sizes["time"] == 12 + 8


def _refused(args, capsys) -> str:
    """The one-line error of a ``piadm train`` that exits 2 before its first step."""
    capsys.readouterr()
    assert main(args) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()  # no banner, step or resume
    assert err.startswith("piadm: error: ")
    return err


def _files(ckpt) -> tuple[bytes, bytes]:
    return ckpt.read_bytes(), Path(f"{ckpt}.json").read_bytes()


def test_a_checkpoint_of_other_settings_is_refused_and_kept(tmp_path, dataset, capsys):
    ckpt = tmp_path / "v.pt"
    assert main(_train_args(dataset, ckpt, "train.steps=3")) == 0
    kept = _contents_of(ckpt)
    err = _refused(_train_args(dataset, ckpt, "train.variable=vorticity_coarse"), capsys)
    assert "train.variable (checkpoint 'vorticity', this run 'vorticity_coarse')" in err
    assert "the shape of train.variable's fields (checkpoint [16, 16], this run [4, 4])" in err
    assert "set train.resume = false to start anew, replacing it" in err
    # the data's probe is of the variable's fields: another variable's do not say it changed
    assert "made anew" not in err
    err = _refused(_train_args(dataset, ckpt, "train.channels=[8, 16, 32]"), capsys)
    assert "train.channels (checkpoint [8, 16], this run [8, 16, 32])" in err
    err = _refused(_train_args(dataset, ckpt, "train.condition=vorticity_coarse",
                               "train.validation=0.5"), capsys)
    assert "train.condition" in err and "train.validation" in err
    assert _files(ckpt) == kept
    # train.resume = false starts anew, with this run's settings
    assert main(_train_args(dataset, ckpt, "train.channels=[8, 16, 32]", "train.steps=3",
                            "train.resume=false")) == 0
    assert load_denoiser(ckpt)[1]["unet"]["channels"] == [8, 16, 32]


def test_a_checkpoint_of_data_made_anew_at_its_path_is_refused(tmp_path, capsys):
    """train.data regenerated at the same path (another seed, more snapshots): its times and
    normalisation are not those the weights learned, and held-out times may now be trained
    on. The path alone let it resume."""
    data, ckpt = tmp_path / "d.zarr", tmp_path / "m.pt"
    make = ["generate-data", "jobs/configs/kolmogorov.toml", "--set", f"data.path={data}",
            *sum((["--set", s] for s in ["data.resolution=16", "data.spinup=1.0",
                                         "data.interval=0.25", "data.snapshots=16",
                                         "data.chunk=8"]), [])]
    assert main(make) == 0
    assert main(_train_args(data, ckpt, "train.steps=3")) == 0
    kept = _contents_of(ckpt)
    assert main(make + ["--set", "data.overwrite=true", "--set", "data.seed=5",
                        "--set", "data.snapshots=20"]) == 0
    err = _refused(_train_args(data, ckpt), capsys)
    assert "what train.data holds (made anew at its path since?) (checkpoint '16 times; " in err
    assert _files(ckpt) == kept
    # another tool's store, rewritten with as many times and no history: its fields tell
    plain = tmp_path / "plain.zarr"
    fields = xr.open_zarr(data).load().drop_attrs()
    fields.to_zarr(plain, zarr_format=3, consolidated=False)
    assert main(_train_args(plain, tmp_path / "p.pt", "train.steps=3")) == 0
    (fields * 1.5).to_zarr(plain, mode="w", zarr_format=3, consolidated=False)
    err = _refused(_train_args(plain, tmp_path / "p.pt"), capsys)
    assert "what train.data holds (its first and last fields: made anew at its path since?): " \
        "rerun" in err  # named, without the probe's figures


def test_a_resume_may_change_steps_lr_and_extra_stores(tmp_path, dataset, other, capsys):
    import json

    ckpt = tmp_path / "more.pt"
    assert main(_train_args(dataset, ckpt, "train.steps=3")) == 0
    meta = json.loads(Path(f"{ckpt}.json").read_text())
    del meta["validation"]  # a checkpoint from before it was recorded: not compared
    Path(f"{ckpt}.json").write_text(json.dumps(meta))
    assert main(_train_args(dataset, ckpt, "train.steps=4", "train.lr=1e-4",
                            f'train.extra=["{other}"]')) == 0
    assert f"resuming {ckpt} at step 3" in capsys.readouterr().err
    assert len(_history(ckpt)) == 4


def test_a_file_that_is_no_training_checkpoint_is_a_one_line_error(tmp_path, dataset, capsys):
    from models.export import export

    text = tmp_path / "thesis.tex"
    text.write_text("\\documentclass{article}\n")
    err = _refused(_train_args(dataset, text), capsys)
    assert f"train.checkpoint {text} is not a piadm train checkpoint" in err
    assert text.read_text() == "\\documentclass{article}\n"
    # starting anew replaces a training checkpoint only
    err = _refused(_train_args(dataset, text, "train.resume=false"), capsys)
    assert f"train.checkpoint {text} is not a piadm train checkpoint" in err
    assert text.read_text() == "\\documentclass{article}\n"
    ckpt = tmp_path / "t.pt"
    assert main(_train_args(dataset, ckpt, "train.steps=3")) == 0
    Path(f"{text}.json").write_bytes(Path(f"{ckpt}.json").read_bytes())  # a sidecar, no tensors
    assert "is not a readable piadm train checkpoint (UnpicklingError)" in _refused(
        _train_args(dataset, text), capsys)
    shipped = tmp_path / "ship.pt"
    export(ckpt, shipped)
    assert "train.init" in _refused(_train_args(dataset, shipped), capsys)
    before = shipped.read_bytes()  # starting anew does not replace a shipped checkpoint either
    err = _refused(_train_args(dataset, shipped, "train.resume=false"), capsys)
    assert f"train.checkpoint {shipped} is an exported checkpoint" in err
    assert shipped.read_bytes() == before
    # one of other settings (piadm's own downscaler) was offered train.resume = false, which
    # the line above refuses: it is an exported checkpoint first
    theirs = tmp_path / "down.pt"
    for suffix in ("", ".json"):
        Path(f"{theirs}{suffix}").write_bytes(
            (ROOT / f"models/checkpoints/kolmogorov_down.pt{suffix}").read_bytes())
    err = _refused(_train_args(dataset, theirs), capsys)
    assert "holds no training state" in err and "train.resume = false" not in err
    # a folder: it was read as a checkpoint without its sidecar folder.json
    err = _refused(_train_args(dataset, tmp_path), capsys)
    assert err == (f"piadm: error: train.checkpoint {tmp_path} is a folder: give a file path "
                   f"in it, e.g. {tmp_path / 'unet.pt'}")
    # no checkpoint yet, but a file of someone else's where its sidecar goes: it was replaced
    for name in ("notes", "lone.pt"):
        mine = tmp_path / f"{name}.json"
        mine.write_text('{"mine": 1}')
        err = _refused(_train_args(dataset, tmp_path / name, "train.steps=3"), capsys)
        assert err == (f"piadm: error: train.checkpoint {tmp_path / name}: {mine}, where its "
                       "sidecar goes, is another file, not a piadm sidecar, which training "
                       "would replace: move it away, or choose another train.checkpoint")
        assert mine.read_text() == '{"mine": 1}' and not (tmp_path / name).exists()
    # piadm's own sidecar alone (a run killed between its first save's two files): replaced
    Path(f"{ckpt}.json").rename(tmp_path / "killed.pt.json")
    assert main(_train_args(dataset, tmp_path / "killed.pt", "train.steps=3")) == 0


def test_a_dataset_cut_short_stops_training_before_a_nan_checkpoint(tmp_path, dataset, capsys,
                                                                   recwarn):
    ds = xr.open_zarr(dataset).load()
    ds["vorticity"][8:] = np.nan  # a generate-data run killed after its first chunk,
    ds.to_zarr(tmp_path / "cut.zarr", consolidated=False)  # before it consolidates
    ckpt = tmp_path / "t.pt"
    err = _refused(_train_args(tmp_path / "cut.zarr", ckpt, "train.steps=3"), capsys)
    assert "train: vorticity has NaN/Inf in " in err and "of the training split's times" in err
    assert "a generate-data run stopped part way leaves its unwritten snapshots NaN" in err
    assert not ckpt.exists()
    # the one line alone: not xarray's warnings about the missing consolidated metadata
    assert not [w for w in recwarn if "consolidated metadata" in str(w.message)]


def test_held_out_times_cut_short_stop_training_at_its_validation(tmp_path, dataset, capsys):
    """A run stopped after 80% of its snapshots leaves exactly the held-out times NaN: the
    training split is finite, so only the validation loss tells, and no checkpoint may
    record it."""
    from pipeline.train_data import held_out_start

    ds = xr.open_zarr(dataset).load()
    cut = held_out_start(ds.sizes["time"], 0.25)
    ds["vorticity"][cut:] = np.nan
    ds.to_zarr(tmp_path / "cut.zarr", consolidated=False)
    ckpt = tmp_path / "v.pt"
    err = _refused(_train_args(tmp_path / "cut.zarr", ckpt, "train.steps=3"), capsys)
    label = str(ds["time"].values[cut])
    assert (f"train: vorticity has NaN/Inf in {ds.sizes['time'] - cut} of the validation split's "
            f"times (the first: time {label} of {tmp_path / 'cut.zarr'})") in err
    assert not ckpt.exists()


@pytest.mark.parametrize("change, needle", [
    # one NaN that no training step happens to draw made the data bound NaN
    (lambda v: v.__setitem__((3, 2, 2), np.nan), "train: vorticity has NaN/Inf in 1 of the "
                                                 "training split's times"),
    (lambda v: v.__setitem__(slice(None), 1.5), "is the same value everywhere in the training "
                                                "split"),
])
def test_a_nan_or_a_constant_field_is_refused_before_training(tmp_path, dataset, capsys,
                                                             change, needle):
    ds = xr.open_zarr(dataset).load()
    change(ds["vorticity"].values)
    ds.to_zarr(tmp_path / "bad.zarr", consolidated=False)
    err = _refused(_train_args(tmp_path / "bad.zarr", tmp_path / "b.pt", "train.steps=3"), capsys)
    assert needle in err and not (tmp_path / "b.pt").exists()


def test_fields_that_are_not_one_per_time_are_a_one_line_error(tmp_path, dataset, capsys):
    ds = xr.open_zarr(dataset).load()
    ds["vorticity"].expand_dims(member=2, axis=1).to_dataset().to_zarr(tmp_path / "e.zarr")
    err = _refused(_train_args(tmp_path / "e.zarr", tmp_path / "e.pt"), capsys)
    assert "train: 'vorticity' of " in err and "is ('time', 'member', 'y', 'x'): piadm trains " \
        "on one 2-D field per time" in err and "select one 2-D field per time" in err


@pytest.mark.parametrize("change, fix", [
    (lambda v: v.rename(time="t"), 'ds.rename({"t": "time"})'),
    (lambda v: v.rename(time="t").transpose("y", "x", "t"),
     'ds.rename({"t": "time"}).transpose("time", ...)'),
    (lambda v: v.transpose("y", "x", "time"), 'ds.transpose("time", ...)'),
    (lambda v: v.expand_dims(level=1, axis=1), "ds.squeeze(['level'])")])
def test_fields_one_xarray_call_would_line_up_are_told_that_call(tmp_path, dataset, capsys,
                                                                 change, fix):
    ds = xr.open_zarr(dataset).load()
    change(ds["vorticity"].drop_vars("time")).to_dataset().to_zarr(tmp_path / "f.zarr")
    err = _refused(_train_args(tmp_path / "f.zarr", tmp_path / "f.pt"), capsys)
    assert f"as generate-data writes them: write it with {fix}" in err


@pytest.mark.parametrize("residual", ["false", "true"])
def test_a_condition_whose_grid_does_not_divide_the_fields_is_a_one_line_error(
        tmp_path, dataset, capsys, residual):
    """A 5x5 condition for 16x16 fields is no block average of them: refused before training
    (plain conditioning failed in torch.cat, a residual trained on a wrong upsampling)."""
    ds = xr.open_zarr(dataset).load()
    odd = ds.vorticity.coarsen(y=3, x=3, boundary="trim").mean().rename(y="yc", x="xc")
    xr.Dataset({"vorticity": ds.vorticity, "vc": odd}).to_zarr(tmp_path / "o.zarr")
    err = _refused(_train_args(tmp_path / "o.zarr", tmp_path / "o.pt", "train.condition=vc",
                               f"train.residual={residual}"), capsys)
    assert err == (f"piadm: error: train.condition 'vc' of {tmp_path / 'o.zarr'} is 5x5, which "
                   "does not divide vorticity's 16x16 fields: condition on a block average of "
                   "them (generate-data's vorticity_coarse)")
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / ".o.pt.lock").exists()


def test_a_checkpoint_whose_weights_do_not_fit_is_a_one_line_error(tmp_path, dataset, capsys):
    import json

    ckpt = tmp_path / "w.pt"
    assert main(_train_args(dataset, ckpt, "train.steps=3")) == 0
    meta = json.loads(Path(f"{ckpt}.json").read_text())
    meta["unet"]["channels"] = [8, 16, 32]  # a sidecar that disagrees with its tensors
    Path(f"{ckpt}.json").write_text(json.dumps(meta))
    err = _refused(_train_args(dataset, ckpt, "train.channels=[8, 16, 32]"), capsys)
    assert f"train.checkpoint {ckpt} does not fit this run's U-Net (RuntimeError)" in err


def test_two_ranks_refuse_a_checkpoint_of_other_settings_together(tmp_path, dataset):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec (pip install mpich)")
    ckpt = tmp_path / "v.pt"
    assert main(_train_args(dataset, ckpt, "train.steps=3")) == 0
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "pipeline.cli",
                           *_train_args(dataset, ckpt, "train.variable=vorticity_coarse")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("piadm: error: train.checkpoint") and "train.variable" in errors[0]


def test_a_resume_from_another_folder_finds_the_same_data(tmp_path, dataset, monkeypatch,
                                                          capsys):
    """train.data typed relative to where training began names the same store from another
    folder spelt otherwise: the sidecar records it absolute, and its fields tell it."""
    import shutil

    config = str(Path("jobs/configs/kolmogorov.toml").resolve())
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    shutil.copytree(dataset, here / "k.zarr")
    ckpt = tmp_path / "r.pt"
    monkeypatch.chdir(here)
    sets = lambda *s: sum((["--set", x] for x in (*TINY, f"train.checkpoint={ckpt}", *s)), [])  # noqa: E731
    assert main(["train", config, *sets("train.data=k.zarr")]) == 0
    assert json.loads((tmp_path / "r.pt.json").read_text())["data"] == str(here / "k.zarr")
    monkeypatch.chdir(there)
    capsys.readouterr()
    assert main(["train", config, *sets(f"train.data={here / 'k.zarr'}",
                                        "train.steps=8")]) == 0
    assert "cannot be resumed" not in capsys.readouterr().err


def test_a_store_is_not_resumed_once_its_checkpoints_sidecar_has_changed(tmp_path, plain,
                                                                          capsys):
    """``models.export --data`` rewrites a sidecar's data bound S (or a copy brings another
    normalisation) with the weights unchanged: the store resumed, its later members drawn
    on another pc-window path than its first."""
    import shutil

    from models.checkpoint import sidecar

    ckpt = tmp_path / "mine.pt"
    shutil.copy(plain, ckpt)
    shutil.copy(sidecar(plain), sidecar(ckpt))
    out = tmp_path / "s.zarr"
    sets = [f"model.checkpoint={ckpt}", "sampler.method=pc-window", "sampler.window=8",
            "ensemble.members=2"]
    assert main(_sample_args(out, *sets)) == 0
    meta = json.loads(sidecar(ckpt).read_text())
    import zarr

    said = json.loads(zarr.open_group(out, mode="r").attrs["model_sidecar"])[0]
    assert said["data_bound"] == meta["data_bound"] and "step" not in said
    assert "grid" in meta and "grid" not in said  # a list a point: the digest holds it
    sidecar(ckpt).write_text(json.dumps(meta, indent=4))  # written anew, saying the same
    assert main(_sample_args(out, *sets)) == 0
    # its record of training edited (the data moved, a note): the members are the same
    moved = {**meta, "data": "/elsewhere/k.zarr", "note": "moved"}
    sidecar(ckpt).write_text(json.dumps(moved))
    assert main(_sample_args(out, *sets, "ensemble.members=3")) == 2  # a key of its own: refused
    assert "(its note changed since)" in capsys.readouterr().err
    del moved["note"]
    sidecar(ckpt).write_text(json.dumps(moved))
    assert main(_sample_args(out, *sets, "ensemble.members=3")) == 0
    sidecar(ckpt).write_text(json.dumps({**meta, "data_bound": 10 * meta["data_bound"]}))
    capsys.readouterr()
    assert main(_sample_args(out, *sets, "ensemble.members=4")) == 2  # grown: refused
    assert (f"was made by this configuration with another sidecar of {ckpt} (its data_bound "
            "changed since)" in capsys.readouterr().err)
    assert main(_sample_args(out, *sets, "ensemble.members=4", "output.overwrite=true")) == 0
    assert "replaced (its checkpoint's sidecar changed since it was made)" in capsys.readouterr().err
    # a store made before: its digest was the whole sidecar's, and what it said unrecorded
    from pipeline.config import load_config
    from pipeline.run import sidecar_digest

    group = zarr.open_group(out, mode="r+")
    cfg = load_config("jobs/configs/grf.toml", ["model.kind=unet", "model.shape=[16, 16]",
                                                f"model.checkpoint={ckpt}"])
    group.attrs["model_sidecar_sha256"] = sidecar_digest(cfg.model, whole=True)
    del group.attrs["model_sidecar"]
    zarr.consolidate_metadata(str(out))
    assert main(_sample_args(out, *sets, "ensemble.members=5")) == 0
    # its training record edited: refused, saying the whole file was recorded then
    on_disk = json.loads(sidecar(ckpt).read_text())
    sidecar(ckpt).write_text(json.dumps({**on_disk, "step": 1}))
    capsys.readouterr()
    assert main(_sample_args(out, *sets, "ensemble.members=6")) == 2
    assert "made before 2026-12-07, recorded the whole file" in capsys.readouterr().err


@pytest.mark.parametrize("dtype, scale", [("float16", 1.0), ("float32", 1e18), ("float32", 1e-30)])
def test_data_in_float16_or_far_from_unit_size_is_normalised_in_float64(tmp_path, dataset, dtype,
                                                                        scale):
    """Their sums overflowed (std inf: a network that learns nothing and infinite members) or
    underflowed (std 0: refused as constant) in the data's own dtype."""
    from pipeline.settings import TrainConfig
    from pipeline.train_data import open_dataset

    ds = xr.open_zarr(dataset).load()
    path = tmp_path / "scaled.zarr"
    ds[["vorticity"]].assign(vorticity=(ds.vorticity * scale).astype(dtype)).to_zarr(path)
    trn, val = open_dataset(TrainConfig(data=str(path)))
    ref, _ = open_dataset(TrainConfig(data=str(dataset)))
    assert np.isfinite(trn.std) and trn.std > 0
    assert trn.std == pytest.approx(ref.std * scale, rel=1e-2)
    assert trn.data_bound == pytest.approx(ref.data_bound, rel=1e-2)
    x, _ = trn.batch(np.array([0, 3]), "cpu")
    assert bool(torch.isfinite(x).all()) and float(x.std()) == pytest.approx(
        float(ref.batch(np.array([0, 3]), "cpu")[0].std()), rel=1e-2)


def test_a_sidecar_with_no_usable_normalisation_or_bound_is_refused(tmp_path, plain):
    """A sidecar whose std overflowed or whose S is NaN (an export on data holding NaN) would
    sample infinite members or a NaN path that the error blames on the network."""
    import shutil

    from pipeline.errors import ConfigError

    ckpt = tmp_path / "odd.pt"
    shutil.copy(plain, ckpt)
    meta = json.loads(Path(f"{plain}.json").read_text())
    Path(f"{ckpt}.json").write_text(json.dumps({**meta, "data_bound": float("nan")}))
    with pytest.raises(ConfigError, match="its metadata holds data_bound nan, no usable"):
        load_unet(str(ckpt), (16, 16))
    # edited to no number: said as it stands, an edit named among the causes
    Path(f"{ckpt}.json").write_text(json.dumps({**meta, "data_bound": None}))
    with pytest.raises(ConfigError, match=r"holds data_bound None, .*\(its sidecar edited, or"):
        load_unet(str(ckpt), (16, 16))
    Path(f"{ckpt}.json").write_text(json.dumps(meta))
    load_unet(str(ckpt), (16, 16))


def test_a_sidecar_edited_or_another_checkpoints_is_told_apart_from_a_cut_save(tmp_path, plain):
    """The same step, another std: no save was cut short, and resuming cannot mend it."""
    import shutil

    from pipeline.errors import ConfigError

    ckpt = tmp_path / "edited.pt"
    shutil.copy(plain, ckpt)
    meta = json.loads(Path(f"{plain}.json").read_text())
    Path(f"{ckpt}.json").write_text(json.dumps({**meta, "std": meta["std"] * 2}))
    with pytest.raises(ConfigError, match=r"does not go with its weights \(its std differ.*put "
                                          r"back the .json that came with them"):
        load_denoiser(ckpt)


def test_an_export_never_replaces_a_training_run_nor_records_a_nan_bound(tmp_path, plain,
                                                                         dataset, other):
    """SRC and DST swapped would have replaced a run's optimiser state with another's EMA
    weights; --data holding NaN (a generate-data run stopped part way) recorded S = NaN, and
    another trajectory's fields of the same shape another S and grid."""
    import shutil

    from models.export import ExportError, export

    run = tmp_path / "run.pt"
    shutil.copy(plain, run)
    shutil.copy(f"{plain}.json", f"{run}.json")
    shipped = tmp_path / "ship.pt"
    export(run, shipped)
    before = run.read_bytes()
    with pytest.raises(ExportError, match=r"holds a training run .* \(the order is SRC DST\)"):
        export(shipped, run)
    assert run.read_bytes() == before
    ds = xr.open_zarr(dataset).load()
    ds["vorticity"][2] = np.nan
    holed = tmp_path / "holed.zarr"
    ds.to_zarr(holed)
    with pytest.raises(ExportError, match="has NaN/Inf in the training split"):
        export(shipped, tmp_path / "again.pt", data=holed)
    assert not (tmp_path / "again.pt").exists()
    with pytest.raises(ExportError, match=f"holds other vorticity fields than {shipped} was "
                                          "trained on"):
        export(shipped, tmp_path / "again.pt", data=other)
    assert not (tmp_path / "again.pt").exists()
    assert export(shipped, tmp_path / "again.pt", data=dataset)["data_bound"] > 0


def _rank_pid(root: int, rank: int) -> int:
    """The pid of MPI rank ``rank`` among the descendants of process ``root`` (Linux /proc;
    MPICH's launcher gives each rank PMI_RANK in its environment)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            environ = []
        if f"PMI_RANK={rank}".encode() in environ and Path(f"/proc/{pid}/exe").resolve().name \
                .startswith("python"):
            return pid
        todo += children.get(pid, [])
    raise AssertionError(f"no rank {rank} under process {root}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("signalled", ["every rank", "rank 1 only"])
def test_a_stop_signal_under_mpi_ends_every_rank_on_one_saved_step_without_an_abort(
        tmp_path, dataset, signalled):
    """SIGTERM interrupted each rank wherever it stood, so the CLI aborted them all (MPICH's
    "Abort(143)" lines after the stop line) and the steps since the last save were lost; the
    ranks now agree on the stop in the step's own reduction and save that step. A signal that
    reaches one rank only (a kill of its pid) stops the others with it, by the same signal."""
    ckpt = tmp_path / "m.pt"
    args = _train_args(dataset, ckpt, "train.steps=100000", "train.val_every=100000",
                       "train.log_every=5", "parallel.threads=1")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    proc = subprocess.Popen([str(mpiexec), "-n", "2", sys.executable, "-m", "pipeline.cli",
                             *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # a few steps in: the run is under way on both ranks
            if "step 10/" in line:
                break
        if signalled == "every rank":
            proc.send_signal(signal.SIGTERM)
        else:
            os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    said = [line for line in err.splitlines() if line.startswith("piadm: stopped by SIGTERM")]
    assert len(said) == 1 and "Abort" not in err and "Traceback" not in err, err
    step = int(re.search(r"holds step (\d+) of 100000 \(the step it stopped on\)", said[0])[1])
    ranks = 2 if signalled == "every rank" else 1
    assert err.count("received SIGTERM: finishing the step under way") == ranks, err
    assert step >= 10 and torch.load(ckpt, weights_only=True)["step"] == step


def test_training_and_export_read_data_whose_consolidated_metadata_is_stale(tmp_path, dataset):
    """Times appended by another tool without consolidating again: training took the 12 the
    metadata listed, silently, and the sidecar recorded them; export, reading the store as
    listed, then took the model's own data for other data."""
    import json

    import xarray as xr

    from models.export import export

    ds = xr.open_zarr(dataset).load()
    for var in ds.variables.values():
        var.encoding = {}
    stale = tmp_path / "stale.zarr"
    ds.isel(time=slice(0, 12)).to_zarr(stale, zarr_format=2, consolidated=True)
    ds.isel(time=slice(12, 16)).to_zarr(stale, append_dim="time", zarr_format=2,
                                        consolidated=False)
    ckpt = tmp_path / "s.pt"
    assert main(_train_args(stale, ckpt)) == 0
    meta = json.loads(Path(str(ckpt) + ".json").read_text())
    assert meta["data_made"].startswith("16 times")
    export(ckpt, tmp_path / "x.pt", stale)  # its own data: taken


def test_a_mask_is_told_to_be_filled_and_a_generate_data_run_named_only_for_its_store(
        tmp_path, dataset, capsys):
    """A land mask, NaN in every time, was told only to drop those times (none would be
    left) and that a generate-data run may have stopped part way, in data it never made."""
    ds = xr.open_zarr(dataset).load()
    ds["vorticity"][:, 0, 0] = np.nan
    ds.attrs = {}  # another tool's store
    ds.to_zarr(tmp_path / "land.zarr", consolidated=False)
    err = _refused(_train_args(tmp_path / "land.zarr", tmp_path / "m.pt"), capsys)
    assert "train: vorticity has NaN/Inf in 12 of the training split's times" in err
    assert ("or, for a mask such as land's in every time, fill the points "
            "(ds['vorticity'].fillna(...), e.g. with a climatology)") in err
    assert "generate-data" not in err


@pytest.mark.parametrize("edit, said", [
    ("shuffled", r"its times are not in order \(.* after .*\), and the held-out share is its "
                 r"last times by position: sort them \(ds.sortby\('time'\)\)"),
    ("joined", r"its time .* comes more than once .*ds.drop_duplicates\('time'\)")])
def test_training_times_out_of_order_or_repeated_are_refused(tmp_path, dataset, edit, said):
    """The held-out share is the store's last times by position: a shuffled store held out
    times from the whole record (the last days trained on), and files joined where they
    overlap held out copies of trained fields, both unsaid."""
    from pipeline.errors import InputError
    from pipeline.settings import TrainConfig
    from pipeline.train_data import open_dataset

    ds = xr.open_zarr(dataset).load()[["vorticity"]]
    n = ds.sizes["time"]
    bad = (ds.isel(time=np.random.default_rng(0).permutation(n)) if edit == "shuffled" else
           xr.concat([ds.isel(time=slice(0, n - 4)), ds.isel(time=slice(n - 6, n))], "time"))
    bad.to_zarr(tmp_path / "bad.zarr")
    with pytest.raises(InputError, match=said):
        open_dataset(TrainConfig(data=str(tmp_path / "bad.zarr")))
    open_dataset(TrainConfig(data=str(dataset)))  # in order, once each: taken


def test_a_condition_in_another_unit_than_the_target_is_refused_before_training(tmp_path,
                                                                                dataset):
    """The condition is normalised by the target's statistics: one in kelvin for a target in
    Celsius trained to the end, and piadm sample then refused the very field the network was
    trained on ("3.19e+03 of its standard deviations away")."""
    from pipeline.errors import InputError
    from pipeline.settings import TrainConfig
    from pipeline.train_data import open_dataset

    ds = xr.open_zarr(dataset).load()
    ds["vorticity"].attrs["units"] = "1/s"
    ds["vorticity_coarse"] = ds.vorticity_coarse * 1e4
    ds["vorticity_coarse"].attrs["units"] = "1e-4/s"
    ds.to_zarr(tmp_path / "units.zarr")
    config = TrainConfig(data=str(tmp_path / "units.zarr"), condition="vorticity_coarse")
    with pytest.raises(InputError, match=r"train.condition 'vorticity_coarse' of .* standard "
                                         r"deviations away \(units '1e-4/s' against '1/s'\): .*"
                                         r"it must be in the target's unit"):
        open_dataset(config)
    open_dataset(TrainConfig(data=str(dataset), condition="vorticity_coarse"))  # the same unit


def test_a_scientists_own_training_data_is_told_in_its_own_terms(tmp_path, dataset):
    """Messages written for generate-data's stores: a missing train.data said to make it with
    generate-data (not where a relative path was read from), a NetCDF file was "not a Zarr
    store" with no way out, and validation = 0.2 of 2 times named no side and no value."""
    from pipeline.errors import InputError
    from pipeline.settings import TrainConfig
    from pipeline.train_data import open_dataset

    with pytest.raises(InputError, match=r"does not exist \(a relative path, read from .*\): "
                                         r"point it at your Zarr store"):
        open_dataset(TrainConfig(data="no/such.zarr"))
    ds = xr.open_zarr(dataset).load()[["vorticity"]]
    ds.to_netcdf(tmp_path / "k.nc")
    with pytest.raises(InputError, match=r"is a file, not a Zarr store .*xr.open_dataset"):
        open_dataset(TrainConfig(data=str(tmp_path / "k.nc")))
    ds.isel(time=[0, 1]).to_zarr(tmp_path / "two.zarr")
    with pytest.raises(InputError, match=r"leaves no validation time of the 2 of train.data: "
                                         r".*\(e.g. 0.5 to 0.5\)"):
        open_dataset(TrainConfig(data=str(tmp_path / "two.zarr"), validation=0.2))
    open_dataset(TrainConfig(data=str(tmp_path / "two.zarr"), validation=0.5))


def test_a_networks_scale_past_the_stores_dtype_is_refused_before_the_store(tmp_path, dataset,
                                                                            capsys):
    """A network trained on fields of std near float32's largest number (float64 data: its
    statistics are float64) samples members past float32's range: they were sampled, then
    refused at their first write; now refused before the store, and sampled in float64."""
    ds = xr.open_zarr(dataset)
    path = tmp_path / "huge.zarr"
    ds[["vorticity"]].assign(vorticity=ds.vorticity.astype("float64") * 1e38).to_zarr(path)
    ckpt = tmp_path / "huge.pt"
    assert main(_train_args(path, ckpt)) == 0
    out = tmp_path / "s.zarr"
    sets = [f"model.checkpoint={ckpt}", "sampler.method=sequential-sde", "ensemble.members=1"]
    assert main(_sample_args(out, *sets)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the network's training fields have mean" in err and "would pass what float32" in err
    assert not out.exists()
    assert main(_sample_args(out, *sets, "sampler.dtype=float64")) == 0
    assert 1e37 < float(np.abs(xr.open_zarr(out)["vorticity"].values).mean()) < 1e40
