"""Tolerance calibration: the ladder picks the loosest tolerance within half the allowed
distance, the choice is cached and reused, and sample records it in the store."""
import json
from pathlib import Path

import pytest
import xarray as xr

from models import build_model
from pipeline.calibrate import cache_file, calibration_key, read_cached
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.run_start import run_tolerance
from pipeline.run import model_digest

SMALL = ["model.shape=[12, 12]", "sampler.steps=200", "sampler.method=pc-window",
         'sampler.tol="auto"', "calibrate.members=2", "ensemble.members=2",
         "ensemble.batch_size=2"]


def _sets(items):
    return sum((["--set", s] for s in items), [])


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _ladder(err: str) -> list[list[str]]:
    lines = err[err.index("worst_dist"):].splitlines()[1:]
    return [line.split() for line in lines if line.strip() and line.split()[0][0].isdigit()]


def _chosen(err: str) -> float:
    return float(err.split("chose tol = ")[1].split(";")[0])


def test_calibrate_takes_the_loosest_tolerance_within_half_the_distance(capsys):
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(SMALL)]) == 0
    out, err = capsys.readouterr()
    rows = _ladder(err)
    chosen = _chosen(err)
    passed = [float(r[0]) for r in rows if float(r[3]) <= 5e-4]
    assert passed and chosen == max(passed)
    cfg = load_config("jobs/configs/grf.toml", SMALL)
    assert read_cached(calibration_key(cfg, model_digest(cfg), "cpu")) == chosen
    # the result, alone on stdout (the ladder is the way there, on stderr)
    assert out.startswith(f"sampler.tol = {chosen:g} for pc-window (measured now)")
    assert len(out.splitlines()) == 1
    # a looser target stops earlier on the ladder: the choice follows sampler.distance
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(SMALL + ["sampler.distance=0.1"])]) == 0
    loose = _ladder(capsys.readouterr().err)
    assert len(loose) < len(rows) and float(loose[-1][0]) > chosen


@pytest.mark.parametrize("refine", [0, 1, 3])
def test_calibrate_refines_between_the_passing_rung_and_the_looser_one_that_failed(
        refine, capsys):
    """Each refinement tries the tolerance halfway (log scale) between the loosest passing
    and tightest failing tolerance measured so far, and keeps it when it passes."""
    ladder = "calibrate.ladder=[0.1, 0.01, 0.001, 0.0001, 1e-05]"
    sets = SMALL + [ladder, f"calibrate.refine={refine}"]
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(sets)]) == 0
    err = capsys.readouterr().err
    rows = _ladder(err)
    tols, worst = [float(r[0]) for r in rows], [float(r[3]) for r in rows]
    first = next(i for i, w in enumerate(worst) if w <= 5e-4)
    assert first > 0 and tols[:first + 1] == [0.1, 0.01, 0.001, 0.0001, 1e-05][:first + 1]
    extra = rows[first + 1:]
    assert len(extra) == refine and all("between rungs" in " ".join(r) for r in extra)
    loose, tight = tols[first - 1], tols[first]
    for tol, w in zip(tols[first + 1:], worst[first + 1:]):
        assert tight < tol < loose and tol == float(f"{(loose * tight) ** 0.5:.1e}")
        loose, tight = (loose, tol) if w <= 5e-4 else (tol, tight)
    assert _chosen(err) == tight == max(t for t, w in zip(tols, worst) if w <= 5e-4)


def test_calibrate_measures_even_when_the_config_holds_a_number(capsys):
    numeric = [s for s in SMALL if not s.startswith("sampler.tol")] + ["sampler.tol=0.5"]
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(numeric)]) == 0
    out, err = capsys.readouterr()
    chosen = _chosen(err)
    assert chosen != 0.5 and f"sampler.tol = {chosen:g} for pc-window (measured now)" in out
    cfg = load_config("jobs/configs/grf.toml", SMALL)  # what sampler.tol = "auto" runs look up
    assert read_cached(calibration_key(cfg, model_digest(cfg), "cpu")) == chosen
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(numeric)]) == 0
    out, again = capsys.readouterr()
    assert "worst_dist" not in again and again.count("calibrated earlier") == 1  # said once
    assert f"sampler.tol = auto: {chosen:g} for pc-window (window 65), calibrated earlier" in again
    assert out.startswith(f"sampler.tol = {chosen:g} for pc-window (from the cache)")


def test_sample_reuses_the_cached_calibration_and_records_it(tmp_path, capsys):
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(SMALL)]) == 0
    capsys.readouterr()
    out = tmp_path / "s.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *_sets(SMALL + [f"output.path={out}"])]) == 0
    err = capsys.readouterr().err
    assert "calibrated earlier" in err and "worst_dist" not in err  # no new ladder
    attrs = xr.open_zarr(out).attrs
    entry = next(iter(json.loads(cache_file().read_text()).values()))
    assert attrs["sampler_tol"] == entry["tol"] and attrs["sampler_tol_source"] == "cache"


def test_a_resumed_store_keeps_its_tolerance_whatever_the_cache_says(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    sets = SMALL + [f"output.path={out}", "ensemble.members=4"]
    assert main(["sample", "jobs/configs/grf.toml", *_sets(sets)]) == 0  # calibrates
    first = xr.open_zarr(out).attrs["sampler_tol"]
    capsys.readouterr()
    cache_file().write_text("{}")  # forget every calibration
    grown = _sets([*sets[:-1], "ensemble.members=6"])
    # its dry run says so too (it said "would be calibrated first")
    assert main(["sample", "jobs/configs/grf.toml", *grown, "--dry-run"]) == 0
    assert f"tol auto: {first:g}, the store's" in capsys.readouterr().err
    assert main(["sample", "jobs/configs/grf.toml", *_sets(sets)]) == 0
    assert "worst_dist" not in capsys.readouterr().err  # the store's tolerance, no ladder
    cfg = load_config("jobs/configs/grf.toml", sets)
    assert run_tolerance(cfg, build_model(cfg.model), "cpu").tol == first


def test_a_method_without_a_tolerance_cannot_be_calibrated(capsys):
    assert main(["calibrate", "jobs/configs/grf.toml", "--set", "sampler.method=sequential-ode"]) == 2
    assert "has no tolerance to calibrate" in capsys.readouterr().err


@pytest.mark.parametrize("override, needle", [
    ('sampler.tol="often"', 'must be a finite number >= 0 or "auto"'),
    ("sampler.distance=2", "sampler.distance = 2.0 must be in (0, 1)"),
    ("calibrate.ladder=[0.1, -1]", "calibrate.ladder"),
    ("calibrate.ladder=[0.001, 0.1]", "calibrate.ladder = [0.001, 0.1]: give tolerances > 0, "
                                      "loosest first"),
    ("calibrate.members=0", "calibrate.members = 0 must be >= 1"),
    ("calibrate.refine=-1", "calibrate.refine = -1 must be >= 0"),
    ("model.data_bound=-1", "model.data_bound = -1.0 must be >= 0"),
])
def test_bad_calibration_settings_are_one_line_errors(override, needle, capsys, tmp_path):
    out = tmp_path / "x.zarr"
    assert main(["sample", "jobs/configs/grf.toml", "--set", override, "--set",
                 f"output.path={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("method", ["window", "window-ode", "pc-window", "pc-window-ode"])
def test_window_samplers_without_a_tolerance_are_refused_before_anything_is_written(
        method, capsys, tmp_path):
    out = tmp_path / "x.zarr"
    config = tmp_path / "c.toml"
    config.write_text(f'[sampler]\nmethod = "{method}"\n[output]\npath = "{out}"\n')
    assert main(["sample", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"sampler.tol must be set for sampler.method = '{method}'" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_a_raised_sampler_revision_measures_its_calibration_again(monkeypatch):
    import dataclasses

    from pipeline.samplers import REGISTRY

    cfg = load_config("jobs/configs/grf.toml", SMALL)
    first = calibration_key(cfg, "0" * 64, "cpu")
    assert calibration_key(cfg, "0" * 64, "cpu") == first  # the same sampler: the same key
    raised = REGISTRY["pc-window"].revision + 1
    monkeypatch.setitem(REGISTRY, "pc-window",
                        dataclasses.replace(REGISTRY["pc-window"], revision=raised))
    assert calibration_key(cfg, "0" * 64, "cpu") != first


def test_a_checkpoints_recorded_s_keys_its_calibration(tmp_path):
    """``models.export --data`` may rewrite a checkpoint's S in its sidecar alone (the
    weights, and so the model digest, unchanged): S moves pc-window's corrector, so a
    tolerance calibrated at the old S is measured again; a model.data_bound override wins."""
    import json
    import shutil

    ckpt = tmp_path / "m.pt"
    shutil.copy("models/checkpoints/kolmogorov_uncond.pt", ckpt)
    meta = json.loads(Path("models/checkpoints/kolmogorov_uncond.pt.json").read_text())
    Path(f"{ckpt}.json").write_text(json.dumps(meta))
    sets = ["model.kind=unet", f"model.checkpoint={ckpt}", "model.guide=", "model.guidance=1",
            "model.shape=[64, 64]"]
    key = lambda *more: calibration_key(load_config("jobs/configs/kolmogorov_uncond.toml",  # noqa: E731
                                                    sets + list(more)), "digest", "cpu")
    first, pinned = key(), key("model.data_bound=50.0")
    Path(f"{ckpt}.json").write_text(json.dumps({**meta, "data_bound": 2 * meta["data_bound"]}))
    assert key() != first and key("model.data_bound=50.0") == pinned


def test_a_window_of_the_same_points_keys_the_same_calibration():
    """sampler.window = 0 is the sampler's own width, and a window wider than the path holds
    the path: the same points, the same tolerance (bench, plan and sample share it)."""
    key = lambda *sets: calibration_key(load_config("jobs/configs/grf.toml",  # noqa: E731
                                                    SMALL + list(sets)), "m", "cpu")
    own = key("sampler.method=pc-window", "sampler.steps=200")
    assert own == key("sampler.method=pc-window", "sampler.steps=200", "sampler.window=65")
    assert own != key("sampler.method=pc-window", "sampler.steps=200", "sampler.window=64")
    assert key("sampler.method=pc-window", "sampler.steps=50", "sampler.window=80") == \
        key("sampler.method=pc-window", "sampler.steps=50", "sampler.window=50")


def test_how_time_slices_share_a_window_keeps_the_calibration():
    """Calibration runs on one rank, where a replicated window is the split one: the key,
    and every tolerance cached before the setting existed, stay."""
    cfg = load_config("jobs/configs/grf.toml", SMALL)
    replicated = load_config("jobs/configs/grf.toml", SMALL + ["sampler.window_split=replicated"])
    assert calibration_key(cfg, "m", "cpu") == calibration_key(replicated, "m", "cpu")


@pytest.mark.parametrize("method, counted", [("piadm-sde", True), ("pc-window", False)])
def test_a_blocks_size_and_sweep_cap_key_a_blocked_samplers_calibration(method, counted):
    """They shape a Picard block's path and its distance (a cap of 2 sweeps left piadm-sde
    90 times sampler.distance from the sequential path at a tolerance cached without it);
    a window sampler uses neither, and keeps its key."""
    key = lambda *sets: calibration_key(load_config(  # noqa: E731
        "jobs/configs/grf.toml", [*SMALL, f"sampler.method={method}", *sets]), "m", "cpu")
    for other in ("sampler.block_size=50", "sampler.max_sweeps=2"):
        assert (key(other) != key()) == counted


def _calibration_refusal(tmp_path, capsys, monkeypatch, *sets: str) -> str:
    """The one-line error of ``piadm calibrate`` on an 8x8 GRF of 60 steps, one member."""
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path))  # measured anew
    args = ["calibrate", "jobs/configs/grf.toml"] + sum((["--set", s] for s in [
        "model.shape=[8, 8]", "sampler.steps=60", "calibrate.members=1", "sampler.tol=auto",
        *sets]), [])
    assert main(args) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_method_that_never_nears_the_sequential_path_is_not_told_to_try_smaller_tolerances(
        tmp_path, capsys, monkeypatch):
    """piadm-ode's corrector moves it off the probability-flow path: more rungs cannot help."""
    err = _calibration_refusal(tmp_path, capsys, monkeypatch, "sampler.method=piadm-ode",
                               "sampler.block_size=20", "calibrate.ladder=[0.1, 0.01, 0.001]")
    assert "its distance stopped falling near 7.9e-01 (tol 0.1) while its rounds rose" in err
    assert "smaller tolerances would not help (its corrector changes the path)" in err
    assert "add smaller tolerances" not in err


def test_a_method_calibrated_on_close_rungs_is_still_told_to_try_smaller_tolerances(
        tmp_path, capsys, monkeypatch):
    """pc-window's distance moves with its rounds, not smoothly: three close rungs may look
    flat (6.3e-3, 3.4e-3, 5.8e-3 here), yet smaller tolerances reach it."""
    err = _calibration_refusal(tmp_path, capsys, monkeypatch, "sampler.method=pc-window",
                               "calibrate.ladder=[0.1, 0.07, 0.05]", "sampler.distance=2e-3")
    assert err.endswith("add smaller tolerances to calibrate.ladder, or raise sampler.distance")


def test_a_calibration_with_tf32_is_kept_apart():
    """TF32 rounding changes how close a parallel path can come to the sequential one: a
    tolerance calibrated with it is not reused without it, and the other way round."""
    cfg = load_config("jobs/configs/grf.toml", SMALL)
    rounded = load_config("jobs/configs/grf.toml", SMALL + ["model.tf32=true"])
    assert calibration_key(cfg, "m", "cpu") != calibration_key(rounded, "m", "cpu")


def test_a_stop_during_the_calibration_ends_it_at_the_next_rung_with_nothing_written(
        tmp_path, capsys):
    from pipeline.api import sample

    asked = []

    def stop():  # SLURM's SIGTERM once the calibration has begun
        asked.append(1)
        return len(asked) > 1

    out = tmp_path / "s.zarr"
    cfg = load_config("jobs/configs/grf.toml", [*SMALL, f"output.path={out}"])
    summary = sample(cfg, stop=stop)
    assert not summary.began and summary.preempted and summary.members == 0
    rows = _ladder(capsys.readouterr().err)
    assert rows == []  # stopped before its first rung: a rung takes as long as a short run
    assert not out.exists() and not cache_file().exists()  # no store, no half a calibration


def test_each_refinement_keys_its_own_calibration():
    keys = {calibration_key(load_config("jobs/configs/grf.toml", [*SMALL, f"calibrate.refine={n}"]),
                            "sha", "cpu") for n in (0, 1, 2)}
    assert len(keys) == 3


def test_a_stop_before_a_refinement_keeps_nothing():
    """A stop before the tolerance between the rungs returned the rung that passed, which the
    run cached as calibrated (and every later run took, at 1.52x the calls where the refined
    0.014 takes 1.47x) though it stopped saying nothing was written: nothing is kept."""
    import torch

    from models.grf import GaussianRandomField
    from pipeline.calibrate import run_ladder
    from pipeline.grids import make_grid
    from pipeline.samplers import Options
    from pipeline.signals import Stopped

    model = GaussianRandomField((12, 12))
    grid = make_grid("ou", 200, u_min=1e-3, u_max=10.0, block_size=200)
    asked = []

    def stop():  # asked before each rung; true from the one after the ladder's three
        asked.append(1)
        return len(asked) > 3

    said = []

    def ladder(refine, stop):
        return run_ladder(model, method="pc-window", grid=grid,
                          options=Options(tol=0.0, data_bound=model.data_bound), seed=0,
                          dtype=torch.float64, device="cpu", noise_source="host", members=2,
                          distance=1e-3, ladder=(0.1, 0.01, 0.001), refine=refine,
                          stopped=stop, say=said.append)

    with pytest.raises(Stopped, match="before the tolerances between the rungs"):
        ladder(1, stop)
    assert [float(r.split()[0]) for r in said[2:]] == [0.1, 0.01, 0.001]  # the rungs, then no more
    # nothing left to measure when the stop comes: the calibration is whole, and kept
    asked.clear()
    got = ladder(0, stop)
    assert got.tol == 0.001 and len(asked) == 3


def test_processes_writing_other_keys_at_once_lose_none(tmp_path):
    """A read-modify-write without a lock kept 193 of 300 keys two processes wrote."""
    import subprocess
    import sys

    from pipeline.cache import read_cache

    path = tmp_path / "c.json"
    code = ("import sys; from pathlib import Path; from pipeline.cache import update_cache\n"
            "for i in range(100): update_cache(Path(sys.argv[1]), f'{sys.argv[2]}{i}', i)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), tag]) for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(read_cache(path)) == 200


def test_a_wait_for_another_process_s_cache_lock_is_said(tmp_path, capsys):
    """A calibration printed its ladder, then nothing while another process held the
    cache's lock: the wait is said, and the entry kept once the lock is let go."""
    import fcntl
    import threading

    from pipeline.cache import read_cache, update_cache

    path = tmp_path / "c.json"
    holder = open(tmp_path / "c.json.lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    writer = threading.Thread(target=update_cache, args=(path, "k", 1.0), daemon=True)
    writer.start()
    try:
        writer.join(timeout=1.0)
        assert writer.is_alive()  # waiting for the lock
        assert "waiting for another process's lock on the cache" in capsys.readouterr().err
    finally:
        holder.close()
    writer.join(timeout=30)
    assert read_cache(path) == {"k": 1.0}


def test_a_cache_that_cannot_be_written_or_read_costs_a_warning_not_the_run(tmp_path, cache,
                                                                          monkeypatch, capsys):
    """What was measured is used whether or not it can be kept; a cache file holding JSON
    that is no object (another tool's) is an empty cache, moved aside when written."""
    cache.mkdir()
    (cache / "calibration.json").write_text("[]")
    out = tmp_path / "s.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *_sets(SMALL + [f"output.path={out}"])]) == 0
    assert "worst_dist" in capsys.readouterr().err  # measured, then cached over the list
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("PIADM_CACHE", str(blocked))
    assert main(["sample", "jobs/configs/grf.toml",
                 *_sets(SMALL + [f"output.path={tmp_path / 't.zarr'}"])]) == 0
    err = capsys.readouterr().err
    assert f"piadm: warning: cannot keep this measurement in {blocked}" in err
    assert f"not cached ({blocked} is a file, not a folder)" in err and "cached in" not in err
    assert xr.open_zarr(tmp_path / "t.zarr").attrs["sampler_tol_source"] == "calibrated"
    # calibrate itself, whose whole purpose is the cache: it said later runs would use it,
    # exit 0; they would measure it again
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(SMALL)]) == 2
    printed, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert (f"could not be cached ({blocked} is a file, not a folder): set sampler.tol = "
            in last and "or give PIADM_CACHE a folder piadm can write" in last)
    # the result where results go, though it was not kept
    tol = last.split("set sampler.tol = ")[1].split()[0]
    assert printed == f"sampler.tol = {tol} for pc-window (measured now; not cached)\n"


def test_two_cache_files_that_cannot_be_written_are_each_said_once(tmp_path, capsys):
    """A plan writes calibrations and profiles in turn: with both files folders, the two
    causes alternated and each was said again at every write (4 to 6 lines a plan)."""
    from pipeline.cache import update_cache

    for name in ("calibration.json", "profiles.json"):
        (tmp_path / name).mkdir()
    for i in range(3):
        for name in ("calibration.json", "profiles.json"):
            assert not update_cache(tmp_path / name, f"k{i}", {"tol": 1.0})
    err = capsys.readouterr().err
    for name in ("calibration.json", "profiles.json"):
        assert err.count(f"({tmp_path / name} is a folder, not a file)") == 1


def test_a_calibration_is_kept_apart_per_kind_of_device(monkeypatch):
    """A GPU's kernels round otherwise than the CPU's: a tolerance calibrated on one is not
    read on the other, nor across GPU models."""
    import torch

    cfg = load_config("jobs/configs/grf.toml", SMALL + ["sampler.method=pc-window"])
    names = iter(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    cpu = calibration_key(cfg, "m", "cpu")
    assert calibration_key(cfg, "m", torch.device("cpu")) == cpu
    h100 = calibration_key(cfg, "m", "cuda:0")
    assert h100 != cpu and calibration_key(cfg, "m", "cuda:1") == h100
    assert calibration_key(cfg, "m", "cuda:0") not in (cpu, h100)


@pytest.mark.parametrize("entry", [{"tol": "abc"}, {"tol": [1]}, {"tol": -1.0}, {"tol": True},
                                   [1], {"tol": None}, {"tol": None, "unreachable": 5},
                                   # a tolerance its own ladder never measured: 1e9 was used
                                   {"tol": 1e9, "ladder": [{"tol": 1e-3, "rounds": 9,
                                                            "calls_ratio": 2.0, "worst": 1e-4}]},
                                   {"tol": 1e-3}])
def test_a_damaged_cache_entry_is_measured_again(entry, capsys):
    """An entry edited or damaged by hand reads as none (a traceback, or tol = -1 taken as
    calibrated, before): the calibration measures it again, says so once (it did so
    unsaid), and writes it back whole."""
    from pipeline import cache
    from pipeline.calibrate import read_unreachable

    cfg = load_config("jobs/configs/grf.toml", SMALL)
    key = calibration_key(cfg, model_digest(cfg), "cpu")
    cache_file().parent.mkdir(parents=True, exist_ok=True)
    cache_file().write_text(json.dumps({key: entry}))
    cache._UNUSABLE.clear()  # another case's entry of the same key was said already
    assert read_cached(key) is None and read_unreachable(key) is None
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(SMALL)]) == 0
    err = capsys.readouterr().err
    assert "chose tol = " in err and read_cached(key) > 0
    assert err.count("holds this measurement's entry in a form piadm cannot use") == 1


def test_the_input_selection_keys_a_conditioned_calibration():
    """A conditioned run is calibrated on its selection's first field: another variable or
    range of the same input.path reused a tolerance measured on other fields."""
    base = SMALL + ["input.path=in.zarr", "input.variable=a", "model.condition=mean"]
    key = lambda *sets: calibration_key(load_config("jobs/configs/grf.toml",  # noqa: E731
                                                    base + list(sets)), "m", "cpu")
    first = key()
    assert key("input.variable=b") != first
    assert key("input.range=['1', '2']") != first and key("input.items=['1']") != first
    assert key("parallel.items=[1]") == first  # which job fills which items: the same fields


def test_a_ladder_whose_blocks_diverge_is_refused_not_taken_as_within_distance(capsys):
    """A rung redone step by step is the sequential path (distance 0) at more calls: taken,
    it made plan and "auto" pick a piadm-sde slower than the sequential sampler."""
    sets = ["model.shape=[8, 8]", "sampler.steps=60", "sampler.block_size=60",
            "sampler.method=piadm-sde", "calibrate.members=2"]
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(sets)]) == 2
    err = capsys.readouterr().err
    assert len(_ladder(err)) == 1  # the tighter rungs would diverge alike
    assert ("piadm-sde's Picard blocks diverged at tol 0.1 and were redone step by step: 60 "
            "rounds, the sequential sampler's 60") in err
    assert "lower sampler.block_size, or use pc-window" in err.strip().splitlines()[-1]
    # a block of 40 diverges too, but the run keeps fewer rounds than the sequential sampler
    fewer = [s.replace("block_size=60", "block_size=40") for s in sets]
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(fewer)]) == 0


def test_a_conditioned_calibration_is_keyed_by_the_input_store_not_its_spelling(tmp_path,
                                                                             monkeypatch):
    """A relative input.path was keyed as written: two projects' coarse.zarr shared one
    calibration, and one store named two ways was calibrated twice."""
    base = SMALL + ["input.variable=a", "model.condition=mean"]
    config = str(Path("jobs/configs/grf.toml").resolve())
    key = lambda path: calibration_key(load_config(config,  # noqa: E731
                                                   base + [f"input.path={path}"]), "m", "cpu")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    here = key("coarse.zarr")
    assert key(str(tmp_path / "a" / "coarse.zarr")) == here
    monkeypatch.chdir(tmp_path / "b")
    assert key("coarse.zarr") != here


def test_a_cache_write_that_fails_leaves_no_partial_copy_beside_it(tmp_path, monkeypatch):
    """A full disk left a .tmp file per failed update in $PIADM_CACHE, each a partial copy of
    the cache, filling the scarce space further."""
    import errno
    from pathlib import Path

    from pipeline.cache import read_cache, update_cache

    path = tmp_path / "c.json"
    assert update_cache(path, "kept", 1)
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert not update_cache(path, "lost", 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.json.lock"]
    assert read_cache(path) == {"kept": 1}


def test_a_missing_home_folder_is_not_made_for_the_default_cache(tmp_path, monkeypatch, capsys):
    """A service account's HOME=/nonexistent: run as root, the cache's mkdir made that folder
    (and its .cache) at the file system's root."""
    from pipeline.cache import cache_path, update_cache

    home = tmp_path / "nonexistent"
    monkeypatch.delenv("PIADM_CACHE")
    monkeypatch.setenv("HOME", str(home))
    assert not update_cache(cache_path("calibration.json"), "lost", 1)
    assert not home.exists()
    assert (f"cannot keep this measurement in {home}/.cache/piadm (the home folder {home} does "
            "not exist)") in capsys.readouterr().err
    # no home known at all (no HOME, a uid without a passwd entry): PIADM_CACHE still serves
    from pathlib import Path

    def unknown():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", unknown)
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    assert update_cache(cache_path("calibration.json"), "kept", 1)
    # nor set: nothing is found, and the write says what to do (a traceback before)
    monkeypatch.delenv("PIADM_CACHE")
    assert read_cached("any key") is None
    assert not update_cache(cache_path("calibration.json"), "lost", 1)
    assert "(no home folder is known)" in capsys.readouterr().err


def test_a_cache_folder_given_with_a_quoted_tilde_is_under_home(monkeypatch, tmp_path):
    """PIADM_CACHE="~/c" (the shell leaves a quoted ~) made a folder named "~" here."""
    from pipeline.cache import cache_path

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PIADM_CACHE", "~/c")
    assert cache_path("calibration.json") == tmp_path / "c" / "calibration.json"


def test_a_cache_file_cut_short_is_moved_aside_not_written_over(tmp_path, capsys):
    """A truncated or garbled calibration.json read as empty and the next write replaced it
    with one entry: every other calibration in it lost, unsaid."""
    from pipeline.cache import read_cache, update_cache

    path = tmp_path / "c.json"
    for key in "abc":
        assert update_cache(path, key, {"tol": 1e-3})
    cut = path.read_text()[:-20]
    path.write_text(cut)
    assert read_cache(path) == {}
    assert "cannot read the cache" in capsys.readouterr().err  # said, measured again
    assert update_cache(path, "d", {"tol": 1e-4})
    (aside,) = tmp_path.glob("c.json.damaged-*")
    assert aside.read_text() == cut and read_cache(path) == {"d": {"tol": 1e-4}}
    assert f"moved to {aside.name}" in capsys.readouterr().err


def test_a_cache_file_that_cannot_be_read_is_not_written_over(tmp_path, monkeypatch, capsys):
    """Another user's 0600 file (or an NFS read error) read as empty, and the write replaced
    it with this run's one entry."""
    import errno

    from pipeline.cache import update_cache

    path = tmp_path / "c.json"
    assert update_cache(path, "a", 1)
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert not update_cache(path, "b", 2)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert "cannot keep this measurement" in capsys.readouterr().err


def test_a_shared_cache_file_keeps_its_mode_its_link_and_read_only_stays_so(tmp_path,
                                                                            monkeypatch):
    """A group's cache (0664) became 0600 after one member's write under umask 077, a cache
    file linked to a shared one was replaced by a plain file, and a file made read-only was
    replaced all the same."""
    import os

    from pipeline.cache import update_cache

    path = tmp_path / "c.json"
    assert update_cache(path, "a", 1)
    os.chmod(path, 0o664)
    old = os.umask(0o077)
    try:
        assert update_cache(path, "b", 2)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o664
    shared, link = tmp_path / "shared.json", tmp_path / "cache" / "c.json"
    shared.write_text(json.dumps({"s": 1}))
    link.parent.mkdir()
    link.symlink_to(shared)
    assert update_cache(link, "t", 2)
    assert link.is_symlink() and json.loads(shared.read_text()) == {"s": 1, "t": 2}
    os.chmod(path, 0o444)
    assert not update_cache(path, "c", 3)
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}


def test_a_cache_folder_that_is_a_file_is_called_one(tmp_path, monkeypatch, capsys):
    """'cannot keep this measurement in X (File exists)' named no cause a user could act on."""
    from pipeline.cache import not_kept, update_cache

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert not update_cache(blocked / "calibration.json", "a", 1)
    assert f"({blocked} is a file, not a folder)" in capsys.readouterr().err
    assert not_kept(blocked / "calibration.json") == f"{blocked} is a file, not a folder"
    # by file, and until a write of it succeeds: another file of the folder that could not be
    # written (input statistics) made calibrate say its tolerance was not cached, exit 2
    folder = tmp_path / "cache"
    (folder / "input_statistics.json").mkdir(parents=True)
    assert not update_cache(folder / "input_statistics.json", "a", 1)
    assert update_cache(folder / "calibration.json", "a", 1)
    assert not_kept(folder / "calibration.json") == ""
    (folder / "input_statistics.json").rmdir()
    assert update_cache(folder / "input_statistics.json", "a", 1)
    assert not_kept(folder / "input_statistics.json") == ""


def test_a_store_whose_recorded_tolerance_is_damaged_is_refused(tmp_path, capsys):
    """A store's sampler_tol edited to -1 was grown at tol -1 (the sequential path at 20x
    the calls), unsaid."""
    import zarr

    from pipeline.store import consolidate

    out = tmp_path / "s.zarr"
    sets = _sets(SMALL + [f"output.path={out}", "sampler.steps=40"])
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    zarr.open_group(out, mode="r+").attrs["sampler_tol"] = -1.0
    consolidate(out)
    capsys.readouterr()
    grown = _sets(SMALL + [f"output.path={out}", "sampler.steps=40", "ensemble.members=3"])
    assert main(["sample", "jobs/configs/grf.toml", *grown, "--dry-run"]) == 2  # says the same
    assert "would be refused: store" in capsys.readouterr().err
    assert main(["sample", "jobs/configs/grf.toml", *grown]) == 2
    assert "its sampler_tol attribute is -1.0, no tolerance" in capsys.readouterr().err


def test_a_calibration_says_what_it_measures_before_the_sequential_path(monkeypatch):
    """The header came after the sequential reference had run: minutes of silence on a
    network at 1000 steps, and in a plan no word of which window was calibrated."""
    from pipeline import calibrate
    from pipeline.samplers import SAMPLERS

    said = []
    samplers = dict(SAMPLERS)
    reference = samplers["sequential-sde"]
    samplers["sequential-sde"] = lambda *a, **k: said.append("reference") or reference(*a, **k)
    monkeypatch.setattr(calibrate, "SAMPLERS", samplers)
    cfg = load_config("jobs/configs/grf.toml", SMALL + ["sampler.window=8", "sampler.steps=40",
                                                        "calibrate.ladder=[0.5]"])
    with pytest.raises(calibrate.Unreachable):  # one loose rung: what is said, not the tol
        calibrate.resolve_tol(cfg, build_model(cfg.model), device="cpu", force=True,
                              say=said.append)
    assert said[0].startswith("calibrating pc-window (window 8): 2 members, 40 steps")
    assert said[0].endswith("sequential-sde first") and said[1] == "reference"


def test_a_cache_folder_that_cannot_be_searched_costs_a_warning_not_a_traceback(tmp_path,
                                                                                monkeypatch,
                                                                                capsys):
    """Explaining why a write failed asked the file system again (Path.exists), which raises
    where a parent folder cannot be searched: a traceback after minutes of calibration."""
    import errno

    from pipeline.cache import update_cache

    real = Path.stat

    def denied(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", denied)
    assert not update_cache(tmp_path / "cache" / "c.json", "a", 1)
    monkeypatch.undo()
    assert "cannot keep this measurement" in capsys.readouterr().err


def test_a_long_calibration_says_it_is_still_going(monkeypatch, capsys):
    """On a network the sequential path and each rung take minutes: a batch log showed
    nothing between 'calibrating' and the first rung's line."""
    from pipeline import watched

    monkeypatch.setattr(watched, "HEARTBEAT_S", 0.0)  # every call is overdue
    assert main(["calibrate", "jobs/configs/grf.toml", *_sets(SMALL)]) == 0
    err = capsys.readouterr().err
    assert "  ... sequential-sde: 1 batched model call so far, 0s" in err
    assert "  ... sequential-sde: 2 batched model calls so far, 0s" in err
    first = float(_ladder(err)[0][0])
    assert f"  ... tol {first:g}: 1 batched model call so far" in err
