"""The quality of a trained model's samples (``pipeline.spectrum_quality``): the log-spectral
distance to held-out data, its bootstrap interval, and ``piadm bench --quality`` on a U-Net."""
import json

import numpy as np
import pytest
import xarray as xr

from pipeline.cli import main
from pipeline.settings import TrainConfig
from pipeline.spectrum_quality import (HeldOut, held_out, log_spectral_distance,
                                       sampling_floor, shell_spectra, spectrum_error)


def _fields(rng, n, size=16, scale=1.0):
    return scale * rng.standard_normal((n, size, size))


def test_the_distance_is_the_log_of_a_uniform_energy_ratio():
    rng = np.random.default_rng(0)
    truth = shell_spectra(_fields(rng, 200), "vorticity", 8)
    held = HeldOut(truth, "vorticity")
    for c in (0.5, 1.0, 1.3):  # the ensemble is the truth with every scale's energy times c
        ens = held.spectra_of(np.sqrt(c) * _fields(np.random.default_rng(0), 200))
        assert float(log_spectral_distance(ens, truth)) == pytest.approx(abs(np.log(c)), abs=1e-9)


def test_an_ensemble_of_the_datas_own_law_scores_about_its_sampling_floor():
    """Squared, each shell's sampling noise adds to the distance: an ensemble drawn from the
    data's own law scores above 0, about the floor; one 10% off at every scale well above it."""
    same, off = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        held = HeldOut(shell_spectra(_fields(rng, 320), "field", 8), "field")
        ens = held.spectra_of(_fields(rng, 64))
        floor = sampling_floor(ens, held)
        same.append(float(log_spectral_distance(ens, held.spectra)) / floor)
        wrong = held.spectra_of(_fields(rng, 64, scale=np.sqrt(1.1)))
        off.append(float(log_spectral_distance(wrong, held.spectra)) / sampling_floor(wrong, held))
    assert 0.8 < np.mean(same) < 1.3
    assert np.mean(off) > 2


def test_the_interval_holds_the_distance_and_shrinks_with_members():
    rng = np.random.default_rng(1)
    held = HeldOut(shell_spectra(_fields(rng, 400), "field", 8), "field")
    widths = []
    for members in (16, 256):
        ens = held.spectra_of(_fields(rng, members, scale=np.sqrt(0.8)))
        value, lo, hi = spectrum_error(ens, held)
        assert lo <= value <= hi
        widths.append(hi - lo)
    assert value == pytest.approx(-np.log(0.8), abs=0.05)  # 256 members: close to the truth
    assert widths[1] < widths[0] / 2  # about 1 / sqrt(members)


def test_the_interval_holds_the_true_distance_not_one_above_the_estimate():
    """The bootstrap's own interval of the distance sat above the estimate (every resample's
    shell ratios scatter away from 1, and squared the scatter only adds): for an ensemble of
    the data's own law [0.038, 0.074] about an estimate of 0.038, and an ensemble 10% too
    energetic (true distance ln 1.1 = 0.095) was held in 45% of the tries, not 90%."""
    same_low, held_off = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        held = HeldOut(shell_spectra(_fields(rng, 320), "field", 8), "field")
        value, lo, _ = spectrum_error(held.spectra_of(_fields(rng, 64)), held)
        same_low.append(lo <= 0.2 * value)
        value, lo, hi = spectrum_error(held.spectra_of(_fields(rng, 64, scale=np.sqrt(1.1))), held)
        held_off.append(lo <= np.log(1.1) <= hi)
    assert np.mean(same_low) >= 0.8  # the data's own law: consistent with no distance at all
    assert np.mean(held_off) >= 0.85


def test_correlated_held_out_times_widen_the_interval():
    """Held-out times that follow each other closely hold fewer independent fields than rows:
    resampled in blocks, the interval is several times wider than for the same rows shuffled."""
    rng = np.random.default_rng(3)
    t, rho = 400, 0.97
    amp = np.empty(t)  # a slowly varying field amplitude: neighbouring times alike
    amp[0] = rng.standard_normal()
    for i in range(1, t):
        amp[i] = rho * amp[i - 1] + np.sqrt(1 - rho ** 2) * rng.standard_normal()
    fields = _fields(rng, t) * np.exp(0.2 * amp)[:, None, None]
    spectra = shell_spectra(fields, "field", 8)
    ens = shell_spectra(_fields(rng, 1024), "field", 8)
    _, lo, hi = spectrum_error(ens, HeldOut(spectra, "field"))
    _, lo_s, hi_s = spectrum_error(ens, HeldOut(spectra[rng.permutation(t)], "field"))
    assert hi - lo > 2.5 * (hi_s - lo_s)


def test_held_out_data_are_the_last_share_in_the_models_units(tmp_path):
    rng = np.random.default_rng(2)
    values = 1.0 + 2.0 * _fields(rng, 20)
    data = xr.Dataset({"w": (("time", "y", "x"), values, {"resolved_wavenumber": 5})},
                      coords={"time": np.arange(20.0)})
    data.to_zarr(tmp_path / "d.zarr")
    held = held_out(TrainConfig(data=str(tmp_path / "d.zarr"), variable="w", validation=0.25),
                    1.0, 2.0, (16, 16))
    assert held.spectra.shape == (5, 5)  # the last 5 of 20 times; shells k = 1 .. 5
    assert np.allclose(held.spectra, shell_spectra((values[15:] - 1.0) / 2.0, "w", 5))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-Net trained a few steps on 16x16 Kolmogorov data, and that data."""
    root = tmp_path_factory.mktemp("q")
    data, ckpt = root / "k.zarr", root / "m.pt"
    sets = ["data.resolution=16", "data.spinup=1.0", "data.interval=0.25", "data.snapshots=16",
            "data.chunk=8", f"data.path={data}"]
    assert main(["generate-data", "jobs/configs/kolmogorov.toml",
                 *sum((["--set", s] for s in sets), [])]) == 0
    sets = ["train.steps=6", "train.batch_size=6", "train.channels=[8, 16]",
            "train.val_every=3", "train.log_every=3", "train.validation=0.25",
            f"train.data={data}", f"train.checkpoint={ckpt}"]
    assert main(["train", "jobs/configs/kolmogorov.toml",
                 *sum((["--set", s] for s in sets), [])]) == 0
    return data, ckpt


def test_bench_at_equal_quality_on_a_trained_model(tmp_path, trained, capsys):
    data, ckpt = trained
    sets = ["model.kind=unet", "model.shape=[16, 16]", f"model.checkpoint={ckpt}",
            f"train.data={data}", "train.validation=0.25", "bench.quality_members=8",
            "bench.members=1", "sampler.tol=1e-3", "bench.sizes=[[16, 16]]",
            "bench.methods=['sequential-ode', 'dpmpp-2m', 'dpmpp-2m-window']"]
    args = ["bench", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]
    out = tmp_path / "q.json"
    assert main([*args, "--quality", "100", "--json", str(out)]) == 0  # reached at 1 step
    doc = json.loads(out.read_text())
    assert doc["measure"] == "spectrum error"
    assert {r["method"]: r["steps"] for r in doc["rows"]} == {
        "sequential-ode": 1, "dpmpp-2m": 1, "dpmpp-2m-window": 1}
    quality = doc["curves"]["dpmpp-2m"][0][2] * 0.999  # just under the 1-step error
    assert main([*args, "--quality", str(quality), "--json", str(out)]) == 0
    text = capsys.readouterr().err
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    curve = {n: e for n, _, e in doc["curves"]["dpmpp-2m"]}
    if "dpmpp-2m" in rows:  # reached: the first step count at or under the quality
        n = rows["dpmpp-2m"]["steps"]
        assert curve[n] <= quality < curve[n - 1] and n >= 2
        assert rows["dpmpp-2m"]["error_lo"] <= rows["dpmpp-2m"]["error"] <= rows["dpmpp-2m"]["error_hi"]
    else:  # the tiny network's error converged above the quality: the search says so early
        assert "dpmpp-2m: not reached (the search stopped at" in text and max(curve) < 8192
    assert "dpmpp-2m at 2 steps: spectrum error" in text and "(8 members; " in text
    # each try says it has started before it samples: a long one is not silent
    assert text.index("dpmpp-2m at 2 steps: sampling 8 members ...") < text.index(
        "dpmpp-2m at 2 steps: spectrum error")


def test_bench_quality_refuses_a_conditioned_model(capsys):
    sets = ["model.kind=unet", "model.condition=coarse"]
    assert main(["bench", "jobs/configs/kolmogorov_down.toml", "--quality", "0.1",
                 *sum((["--set", s] for s in sets), [])]) == 2
    assert "unconditioned trained U-Net" in capsys.readouterr().err


def test_auto_quality_plans_a_trained_model_at_its_spectrum_error(tmp_path, trained, capsys):
    data, ckpt = trained
    sets = ["model.kind=unet", "model.shape=[16, 16]", f"model.checkpoint={ckpt}",
            f"train.data={data}", "train.validation=0.25", "bench.quality_members=8",
            "sampler.method=auto-quality", "sampler.steps=16", "sampler.tol=1e-3",
            "ensemble.members=2", "ensemble.batch_size=2", f"output.path={tmp_path / 'x.zarr'}"]
    out = tmp_path / "plan.json"
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "1", "--json", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    err = capsys.readouterr().err
    assert "equal quality: sequential-ode at 16 steps has spectrum error" in err
    steps = {row["method"]: row["steps"] for row in json.loads(out.read_text())["layouts"]}
    assert steps["sequential-ode"] == 16 and steps["dpmpp-2m-window"] == steps["dpmpp-2m"]


@pytest.mark.parametrize("method, reference", [("pc-window", "sequential-sde"),
                                               # a planned method: its family's sequential
                                               # sampler (a KeyError's traceback before)
                                               ("auto-ode", "sequential-ode")])
def test_bench_renoise_tables_a_trained_models_energy_by_starting_level(tmp_path, trained, capsys,
                                                                       method, reference):
    from pipeline.renoise import LEVELS

    data, ckpt = trained
    sets = ["model.kind=unet", "model.shape=[16, 16]", f"model.checkpoint={ckpt}",
            f"train.data={data}", "train.validation=0.25", "bench.quality_members=3",
            f"sampler.method={method}", "sampler.steps=40"]
    out = tmp_path / "r.json"
    assert main(["bench", "jobs/configs/grf.toml", "--renoise", "--json", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    doc = json.loads(out.read_text())
    assert doc["method"] == reference and doc["fields"] == 3  # the method's reference
    assert [r["u"] for r in doc["rows"]] == [*LEVELS, 10.0]
    steps = [r["steps"] for r in doc["rows"]]
    assert steps == sorted(steps) and steps[-1] == 40  # from u_max: the whole grid
    for row in doc["rows"]:
        assert list(row["ratios"])[-1] == "k<=5" and all(v > 0 for v in row["ratios"].values())
    assert "energy over the same fields'" in capsys.readouterr().err


def test_the_held_out_split_is_the_one_the_checkpoint_was_trained_with(tmp_path):
    """A config's own train.validation (0.2) would hold times a model trained with 0.1 was
    trained on: the quality measures take the split its sidecar records."""
    import json

    from pipeline.config import load_config
    from pipeline.spectrum_quality import as_trained

    data = tmp_path / "d.zarr"
    data.mkdir()
    ckpt = tmp_path / "m.pt"
    (tmp_path / "m.pt.json").write_text(json.dumps(
        {"validation": 0.1, "variable": "vorticity", "condition": None, "data": str(data)}))
    cfg = load_config("jobs/configs/kolmogorov_uncond.toml",
                      [f"model.checkpoint={ckpt}", "train.validation=0.2"])
    split = as_trained(cfg)
    assert (split.validation, split.variable, split.data) == (0.1, "vorticity", str(data))
    assert split.condition == cfg.train.condition


def test_a_shell_the_held_out_data_leave_empty_is_left_out():
    """A held-out shell with no energy made the distance inf and its bounds NaN (ln(E / 0)),
    where the bands leave such a shell out."""
    rng = np.random.default_rng(5)
    held = HeldOut(shell_spectra(_fields(rng, 200), "field", 8), "field")
    ens = held.spectra_of(_fields(rng, 64, scale=np.sqrt(0.8)))
    emptied = held.spectra.copy()
    emptied[:, 5] = 0.0
    value, lo, hi = spectrum_error(ens, HeldOut(emptied, "field"))
    kept = np.arange(8) != 5
    assert value == pytest.approx(float(log_spectral_distance(ens[:, kept], held.spectra[:, kept])))
    assert lo <= value <= hi and np.isfinite(sampling_floor(ens, HeldOut(emptied, "field")))
