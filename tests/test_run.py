import numpy as np
import pytest
import torch
import xarray as xr

from models import build_model
from pipeline.cli import main
from pipeline.comm import SerialComm
from pipeline.config import load_config
from pipeline.noise import Noise
from pipeline.run import DTYPES, member_batches, sample_batch, sampler_grid, sampler_options

SMALL = ["model.shape=[16, 16]", "sampler.steps=60", "sampler.block_size=20",
         "sampler.tol=0.05", "ensemble.members=5"]


@pytest.mark.parametrize("method, source", [("piadm-sde", "host"), ("window", "host"),
                                            ("piadm-ode", "host"), ("piadm-sde", "device")])
def test_same_seed_same_members_whatever_the_batch_size(method, source):
    cfg = load_config(None, SMALL + [f"sampler.method={method}", "sampler.dtype=float64",
                                     f"sampler.noise={source}"])
    model = build_model(cfg.model)
    out = {}
    for bs in (1, 2, 5):
        fields = [sample_batch(model, Noise.members(cfg.sampler.seed, 0, members, model.shape,
                                                    DTYPES["float64"], source=cfg.sampler.noise),
                               method=method, grid=sampler_grid(cfg.sampler),
                               options=sampler_options(cfg.sampler), comm=SerialComm()).fields
                  for members in member_batches(5, bs)]
        out[bs] = torch.cat(fields)
    assert torch.equal(out[1], out[2]) and torch.equal(out[1], out[5])


def test_member_batches_cover_members_once():
    assert member_batches(5, 2) == [(0, 1), (2, 3), (4,)]


def test_sample_command_writes_store_xarray_opens(tmp_path):
    path = tmp_path / "ens.zarr"
    rc = main(["sample", "jobs/configs/grf.toml", "--set", f"output.path={path}", *sum(
        (["--set", s] for s in SMALL), [])])
    assert rc == 0
    ds = xr.open_zarr(path)
    assert ds.field.dims == ("item", "member", "y", "x") and ds.field.shape == (1, 5, 16, 16)
    assert bool((ds.done == 1).all()) and len(set(ds.seed.values.ravel().tolist())) == 5
    assert ds.member.attrs["standard_name"] == "realization"
    assert ds.attrs["sampler_method"] == "pc-window" and "config_sha256" in ds.attrs
    assert ds.attrs["sampler_tol_source"] == "config" and ds.attrs["sampler_tol"] == 0.05
    assert ds.attrs["sampler_noise"] == "host" and ds.attrs["torch_version"] == torch.__version__
    # what else decides the members: host noise is numpy's, the sampler's revision its path
    assert ds.attrs["numpy_version"] == np.__version__ and ds.attrs["sampler_revision"] == 5
    assert ds.attrs["made_on"].startswith("cpu: ") and ds.attrs["zarr_version"]
    assert bool((ds.rounds > 0).all()) and float(ds.field.std()) > 0.5
    # the call's figures, not the member's own: they move with ensemble.batch_size
    assert "(its batch's mean)" in ds.model_calls.attrs["long_name"]
    assert "(its batch's)" in ds.rounds.attrs["long_name"]


def test_a_rerun_on_a_finished_store_says_nothing_was_left_not_zero_rounds(tmp_path, capsys):
    """A rerun on a complete store summed up "parallel rounds 0 in all ... model calls 0 per
    member", figures of nothing, as if the sampler had run for free."""
    sets = ["--set", f"output.path={tmp_path / 'e.zarr'}", *sum((["--set", s] for s in SMALL), [])]
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    first = capsys.readouterr().err
    calls = xr.open_zarr(tmp_path / "e.zarr").model_calls.values.mean()
    assert f"model calls      {calls:.1f}".removesuffix(".0") + " per member" in first
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    again = capsys.readouterr().err
    assert "done: 0 members written" in again and "(5 were already done" in again
    assert "no member was left to sample" in again and "parallel rounds" not in again


def test_existing_store_is_refused_and_untouched(tmp_path, capsys):
    path = tmp_path / "ens.zarr"
    args = ["sample", "jobs/configs/grf.toml", "--set", f"output.path={path}"] + sum(
        (["--set", s] for s in SMALL), [])
    assert main(args) == 0
    before = xr.open_zarr(path).field.values.copy()
    assert main(args + ["--set", "sampler.seed=9"]) == 2
    assert "output.overwrite" in capsys.readouterr().err
    assert (xr.open_zarr(path).field.values == before).all()


@pytest.mark.parametrize("override,needle", [
    ("sampler.stpes=3", "did you mean 'steps'"),
    ("parallel.window_split=replicated", "did you mean sampler.window_split?"),
    ("sampler.block_size=0", "sampler.block_size"),
    ("sampler.method=magic", "sampler.method"),
    ("model.kind=transformer", "model.kind"),
    ("sampler.u_min=20", "sampler.u_min"),
    ("ensemble.members=two", "ensemble.members must be int"),
    ("nosuch.key=1", "unknown section"),
    ("model.emulate_ms=[5]", "model.emulate_ms = [5.0] must be [latency_ms, per_item_ms]"),
    ("bench.seeds=0", "bench.seeds"),
    ("train.p_std=nan", "train.p_std = nan must be in (0, 5]"),
    ("train.p_mean=40", "train.p_mean = 40.0 must be in [-10, 10]"),
    ("train.cache_mb=-5", "train.cache_mb = -5.0 must be >= 0"),
])
def test_bad_config_gives_one_line_error_naming_the_key(tmp_path, capsys, override, needle):
    path = tmp_path / "never.zarr"
    rc = main(["sample", "jobs/configs/grf.toml", "--set", f"output.path={path}", "--set", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1
    assert not path.exists()


def test_bench_reports_rows_and_json(tmp_path, capsys):
    from models.grf import GaussianRandomField

    out = tmp_path / "b.json"
    # grf.toml's tol = "auto" calibrates each parallel method first: one rung that all three
    # pass with margin (the whole ladder, rung by rung, took three quarters of its time)
    rc = main(["bench", "jobs/configs/grf.toml", "--json", str(out), "--set", "bench.sizes=[[16, 16]]",
               "--set", "sampler.steps=100", "--set", "sampler.block_size=20",
               "--set", "bench.repeats=1", "--set", "calibrate.ladder=[2e-3]",
               "--set", "calibrate.refine=0"])
    import json
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [r["method"] for r in rows] == ["sequential-sde", "piadm-sde", "window",
                                                       "pc-window"]
    assert rows[1]["rounds"] < rows[0]["rounds"] and rows[1]["rel_dist"] < 1e-2
    # the field's S, which sets pc-window's rounds, is named once for the shape
    bound = GaussianRandomField((16, 16), slope=3.0, length=8.0).data_bound
    assert capsys.readouterr().err.count(f"field 16x16: S = {bound:.4g}, ") == 1


def test_bench_reports_the_exact_w2_of_sequential_samplers_only(tmp_path):
    import json

    out = tmp_path / "b.json"
    sets = ["bench.sizes=[[16, 16]]", "sampler.steps=40", "sampler.tol=1e-4", "bench.repeats=1",
            "bench.methods=['sequential-ode', 'dpmpp-2m', 'sequential-sde', 'dpmpp-2m-sde', "
            "'pc-window']"]
    assert main(["bench", "jobs/configs/grf.toml", "--json", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    w2 = {r["method"]: r["w2"] for r in json.loads(out.read_text())["rows"]}
    assert w2["pc-window"] is None  # stops on a tolerance: not a linear map, no exact law
    assert 0 < w2["dpmpp-2m"] < w2["sequential-ode"] / 5  # second order at 40 steps
    assert 0 < w2["dpmpp-2m-sde"] < w2["sequential-sde"] / 1.5


def test_bench_reports_calls_ratio_tolerances_and_the_worst_seed(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b.json"
    sets = ["bench.sizes=[[12, 12]]", "sampler.steps=200", "bench.members=1", "bench.seeds=2",
            "bench.repeats=2", "bench.methods=['sequential-sde', 'pc-window']",
            'sampler.tol="auto"', "calibrate.members=2"]
    assert main(["bench", "jobs/configs/grf.toml", "--json", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    rows = json.loads(out.read_text())["rows"]
    # every row has the same keys, for a table reader (window_split was pc-window's alone)
    assert len({tuple(sorted(r)) for r in rows}) == 1 and rows[0]["window_split"] is None
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("sequential-sde", 0), ("sequential-sde", 1), ("pc-window", 0), ("pc-window", 1),
        ("sequential-sde", "worst"), ("pc-window", "worst")]
    seq, pcw, worst = rows[0], rows[2:4], rows[5]
    assert seq["calls_ratio"] == 1.0 and seq["tol"] is None
    for r in pcw:  # a calibrated tolerance, and calls counted against the sequential sampler
        assert r["tol"] == rows[2]["tol"] > 0
        assert r["calls_ratio"] == pytest.approx(r["model_calls"] / 200, abs=1e-3)
        assert r["wall_s"] <= r["wall_med_s"]
    assert worst["rounds"] == max(r["rounds"] for r in pcw)
    assert worst["rel_dist"] == max(r["rel_dist"] for r in pcw) <= 1e-3


def test_bench_peer_runs_diffusers_paradigms_beside_the_piadm_windows(capsys):
    pytest.importorskip("diffusers")
    assert main(["bench", "jobs/configs/grf.toml", "--peer", "diffusers", "--set",
                 "model.shape=[8, 8]", "--set", "bench.members=1"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()
            if line.startswith(("diffusers ParaDiGMS", "piadm window", "piadm pc-window"))
            and "/ diffusers" not in line}
    assert set(rows) == {"diffusers ParaDiGMS", "piadm window", "piadm pc-window"}
    same = float(err.split("piadm's differ by ")[1].split()[0])
    # one map: diffusers works its step coefficients out in float32, so over 1000 float32
    # steps the two drift apart by about 1e-5 (host-dependent): a wrong step would be far off
    assert same < 1e-4
    theirs, ours = rows["diffusers ParaDiGMS"], rows["piadm pc-window"]
    assert float(ours[-1]) <= float(theirs[-1])  # at equal or smaller distance
    assert float(ours[-2]) < float(theirs[-2])  # fewer calls
    assert "p=100" in " ".join(theirs) and "p=65" in " ".join(ours)  # each its own default


def test_bench_peer_runs_pc_window_at_the_configured_window(capsys):
    pytest.importorskip("diffusers")
    assert main(["bench", "jobs/configs/grf.toml", "--peer", "diffusers", "--set",
                 "model.shape=[8, 8]", "--set", "bench.members=1", "--set",
                 "sampler.window=90"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("diffusers ParaDiGMS", "piadm pc-window"))
            and "/ diffusers" not in line]
    assert [row[2] for row in rows] == ["p=100", "p=90"]  # ParaDiGMS keeps its own window


def test_bench_peer_searches_pc_windows_tolerance_as_calibrate_does(capsys):
    """The rungs of calibrate.ladder, then calibrate.refine tolerances halfway to the looser
    rung: on this problem 0.01 stands further from the sequential path than ParaDiGMS does
    (3.5e-4 against 2.7e-4) and 0.005 nearer (2.2e-4), so with one refinement pc-window runs
    at 7.1e-3 (2.4e-4), between them."""
    pytest.importorskip("diffusers")
    sets = ["model.shape=[8, 8]", "bench.members=1", "calibrate.ladder=[0.01, 0.005]"]
    picked = []
    for refine in (0, 1):
        args = [a for s in sets + [f"calibrate.refine={refine}"] for a in ("--set", s)]
        assert main(["bench", "jobs/configs/grf.toml", "--peer", "diffusers", *args]) == 0
        (row,) = [line.split() for line in capsys.readouterr().out.splitlines()
                  if line.startswith("piadm pc-window") and "/ diffusers" not in line]
        picked.append(row[3])
    assert picked == ["tol=0.005", "tol=0.0071"]


def test_bench_peer_without_diffusers_is_one_line_naming_the_install(monkeypatch, capsys):
    """It was an ImportError's traceback, raised once the model was built."""
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    assert main(["bench", "jobs/configs/grf.toml", "--peer", "diffusers", "--set",
                 "model.shape=[8, 8]", "--set", "bench.members=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["piadm: error: piadm bench --peer diffusers needs the diffusers package "
                   "with its DDPMParallelScheduler: pip install 'piadm[bench]' (or pip install "
                   "'diffusers>=0.30')"]


def test_bench_plots_against_d_and_against_ranks(tmp_path, capsys):
    import json

    base = ["--set", "bench.sizes=[[8, 8], [16, 16]]", "--set", "sampler.steps=40",
            "--set", "sampler.block_size=20", "--set", "bench.methods=['piadm-sde']",
            "--set", "bench.repeats=1"]
    first = tmp_path / "one.json"
    assert main(["bench", "jobs/configs/grf.toml", "--json", str(first), *base]) == 0
    other = json.loads(first.read_text())
    for row in other["rows"]:  # stand in for a 2-rank run's table
        row.update(ranks=2, wall_s=row["wall_s"] / 2)
    (tmp_path / "two.json").write_text(json.dumps(other))
    png = tmp_path / "bench.png"
    assert main(["bench", "jobs/configs/grf.toml", "--png", str(png), "--compare",
                 str(tmp_path / "two.json"), *base]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "jobs/configs/grf.toml", "--compare", str(tmp_path / "no.json")]) == 2
    assert "--compare" in capsys.readouterr().err.splitlines()[-1]
    # a table of other steps would draw their walls as a rank count's speed-up: refused
    assert main(["bench", "jobs/configs/grf.toml", "--png", str(tmp_path / "x.png"), "--compare",
                 str(tmp_path / "two.json"), *base, "--set", "sampler.steps=20"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"piadm: error: --compare {tmp_path / 'two.json'} was benched with other settings "
        "(sampler.steps: 40 -> 20): compare tables of these settings on other rank counts")
    assert not (tmp_path / "x.png").exists()
    # one that differs in layout alone (how slices share a window) or sampler.method, which a
    # bench does not run, joins the plot
    assert main(["bench", "jobs/configs/grf.toml", "--png", str(png), "--compare",
                 str(tmp_path / "two.json"), *base, "--set", "sampler.window_split=replicated",
                 "--set", "sampler.method=pc-window", "--set", "sampler.tol=0.1"]) == 2
    assert "(sampler.tol: 'auto' -> 0.1): compare" in capsys.readouterr().err  # that alone
    # a table an earlier revision of a sampler benched: its rounds and calls are not these
    from pipeline.samplers import REGISTRY

    now = REGISTRY["piadm-sde"].revision
    other["revisions"] = {"piadm-sde": now - 1}
    (tmp_path / "old.json").write_text(json.dumps(other))
    assert main(["bench", "jobs/configs/grf.toml", "--png", str(png), "--compare",
                 str(tmp_path / "old.json"), *base]) == 2
    assert f"(piadm-sde revision {now - 1} -> {now})" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["grf", "unet"])
def test_build_model_puts_its_tensors_on_the_sampling_device(kind):
    # "meta" stands in for a GPU here: a model left on the CPU fails there at its first call
    sets = ["model.kind=unet", "model.checkpoint=models/checkpoints/kolmogorov_uncond.pt",
            "model.shape=[64, 64]"] if kind == "unet" else ["model.shape=[8, 8]"]
    model = build_model(load_config(None, sets).model, "meta")
    tensors = [model.spectrum] if kind == "grf" else [*model.den.parameters(),
                                                      *model.den.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    x = torch.zeros(2, *model.shape, device="meta")
    assert model(x, torch.ones(2, device="meta")).device.type == "meta"


def test_a_setting_asked_of_a_method_that_does_not_read_it_is_warned(capsys):
    """sampler.window_split = "replicated" with window ran the split slots without a word, and
    sampler.churn with dpmpp-2m added no churn without one."""
    from pipeline.api import load_config
    from pipeline.config import read_toml
    from pipeline.run_items import check_unread_settings

    # grf.toml as it reads with the default corrector, which a method other than pc-window
    # would be warned of as set (grf.toml sets theta = "secant")
    grf = read_toml("jobs/configs/grf.toml")
    grf["sampler"]["theta"] = "j_max"

    sets = {"sampler.window_split": "replicated", "parallel.time_slices": 2, "sampler.tol": 0.1}
    check_unread_settings(load_config(grf, {**sets, "sampler.method": "window"}))
    assert "is read by pc-window and pc-window-ode only: sampler.method = 'window'" in \
        capsys.readouterr().err
    check_unread_settings(load_config(grf, sets))  # pc-window reads it
    assert capsys.readouterr().err == ""
    check_unread_settings(load_config(grf, {"sampler.method": "dpmpp-2m",
                                             "sampler.churn": 5.0}))
    assert "sampler.churn = 5 is read by edm-heun only: sampler.method = 'dpmpp-2m' adds no " \
        "churn" in capsys.readouterr().err
    check_unread_settings(load_config(grf, {"sampler.method": "edm-heun",
                                             "sampler.churn": 5.0}))
    assert capsys.readouterr().err == ""
    # theta: pc-window's corrector only (pc-window-ode always takes one)
    check_unread_settings(load_config(grf, {"sampler.method": "window",
                                             "sampler.theta": "one"}))
    assert "sampler.theta = 'one' is read by pc-window only: sampler.method = 'window' does " \
        "not read it" in capsys.readouterr().err
    check_unread_settings(load_config(grf, {"sampler.method": "piadm-sde",
                                             "sampler.window": 8}))
    assert ("sampler.window = 8 is read by the sliding windows only (window, window-ode, "
            "pc-window, pc-window-ode): sampler.method = 'piadm-sde' does not read it") in \
        capsys.readouterr().err
    for method in ("pc-window", "pc-window-ode"):
        check_unread_settings(load_config(grf, {"sampler.method": method,
                                                 "sampler.theta": "one"}))
        assert capsys.readouterr().err == ""
    # time slices of a sequential sampler: each runs the whole path, silently
    check_unread_settings(load_config(grf, {"sampler.method": "sequential-sde",
                                             "parallel.time_slices": 2}))
    assert ("sampler.method = 'sequential-sde' runs the whole path on each of the 2 time "
            "slices of a group, which add no speed") in capsys.readouterr().err
    check_unread_settings(load_config(grf, {"sampler.method": "piadm-sde",
                                             "parallel.time_slices": 2}))
    assert capsys.readouterr().err == ""


def test_a_float32_ode_block_spanning_much_of_the_clock_stays_on_its_path(tmp_path):
    """piadm-ode blocks of 16 of 20 steps from u_max = 40 span 37 of the OU clock: float32's
    prefix sums kept no digit and the members came out 1.0 from the sequential path (then
    such a block was refused); its sum now runs in float64 (picard.SCAN_GROWTH)."""
    import json

    sets = ["--set", "sampler.steps=20", "--set", "sampler.u_max=40", "--set",
            "sampler.tol=1e-6", "--set", "model.shape=[8, 8]", "--set", "ensemble.members=2",
            "--set", "sampler.block_size=16", "--set", "sampler.corrector_steps=0",
            "--set", "sampler.theta=one"]
    out = {}
    for method in ("piadm-ode", "sequential-ode"):
        path = tmp_path / f"{method}.zarr"
        assert main(["sample", "jobs/configs/grf.toml", *sets, "--set",
                     f"sampler.method={method}", "--set",
                     f"output.path={json.dumps(str(path))}"]) == 0
        out[method] = xr.open_zarr(path)["field"].values
    gap = np.linalg.norm(out["piadm-ode"] - out["sequential-ode"])
    assert gap / np.linalg.norm(out["sequential-ode"]) < 1e-4


def test_a_store_keeps_a_round_of_residual_a_step_and_none_for_the_corrector():
    """The corrector's sweeps record no residual, yet a store kept a column for each, always
    NaN: corrector_sweeps = 1e9 made piadm-ode's store a 977 MB residual history for two 8 x 8
    members. A sequential sampler keeps none."""
    from pipeline.run import residual_length
    from pipeline.settings import SamplerConfig

    for sweeps in (4, 10**9):
        s = SamplerConfig(method="piadm-ode", steps=100, block_size=50, corrector_steps=8,
                          corrector_sweeps=sweeps)
        assert residual_length(s) == 100
    assert residual_length(SamplerConfig(method="sequential-ode", steps=100)) == 0


def test_a_piadm_ode_history_fits_its_store_with_the_corrector_on(tmp_path):
    """Every round the sampler records lands in the store's history: the corrector's
    sweeps add rounds (and calls) but no residual."""
    out = tmp_path / "ode.zarr"
    assert main(["sample", "jobs/configs/grf.toml", "--set", "model.shape=[8, 8]",
                 "--set", "sampler.method=piadm-ode", "--set", "sampler.steps=40",
                 "--set", "sampler.block_size=20", "--set", "sampler.tol=1e-3",
                 "--set", "ensemble.members=2", "--set", f"output.path={out}"]) == 0
    ds = xr.open_zarr(out)
    history = ds.residual.values.reshape(-1, ds.sizes["sweep"])
    kept = np.isfinite(history).sum(1)
    assert ds.sizes["sweep"] == 40 and kept.min() >= 2  # at least a sweep a block
    assert (ds.rounds.values.reshape(-1) > kept).all()  # the corrector's rounds, unrecorded
