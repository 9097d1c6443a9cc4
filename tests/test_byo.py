"""Bring your own network: a diffusers folder and a module of one's own sample what their own
library computes (DDPM and DDIM loops fed the same noise), the two doors agree, an EDM
denoiser matches EDM's first-order sampler, and each mistake is a one-line error."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from byo_nets import EDMDenoiser, small_unet  # noqa: E402
from models import build_model  # noqa: E402
from pipeline import api  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.clock import VE  # noqa: E402
from pipeline.comm import SerialComm  # noqa: E402
from pipeline.grids import make_grid  # noqa: E402
from pipeline.noise import Noise  # noqa: E402
from pipeline.run import sampler_grid, sampler_options  # noqa: E402
from pipeline.samplers import SAMPLERS  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """save_pretrained folders of one seeded UNet2DModel with a DDPM and a DDIM scheduler."""
    base = tmp_path_factory.mktemp("byo")
    unet = small_unet()
    out = {}
    for name, scheduler in (("ddpm", diffusers.DDPMScheduler), ("ddim", diffusers.DDIMScheduler)):
        unet.save_pretrained(base / name)
        scheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(base / name)
        out[name] = base / name
    return out


def _run(settings: dict, members=(0, 1), shape=(16, 16)):
    cfg = api.load_config(None, {"sampler.dtype": "float64", **settings})
    model = build_model(cfg.model)
    noise = Noise.members(0, 0, members, shape, torch.float64)
    y, stats = SAMPLERS[cfg.sampler.method](model, noise.prior(), sampler_grid(cfg.sampler, model),
                                            noise, comm=SerialComm(),
                                            options=sampler_options(cfg.sampler))
    return y, stats, noise


def _one_error(err: str, needle: str) -> bool:
    """One error line, naming the problem, and no traceback (the run's header may precede)."""
    errors = [line for line in err.splitlines() if line.startswith("piadm: error:")]
    return len(errors) == 1 and needle in errors[0] and "Traceback" not in err


def _line(name: str) -> int:
    """The line of byo_nets' ``name`` that raises (its last line)."""
    import inspect
    import sys

    sys.path.insert(0, str(TESTS))
    try:
        import byo_nets
    finally:
        sys.path.remove(str(TESTS))
    lines, first = inspect.getsourcelines(getattr(byo_nets, name))
    return first + len(lines) - 1


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _ddpm(folders) -> dict:
    return {"model.kind": "diffusers", "model.path": str(folders["ddpm"]), "model.shape": [16, 16],
            "sampler.grid": "scheduler", "sampler.steps": 1000, "sampler.form": "eps",
            "sampler.tol": 1e-3}


@pytest.fixture(scope="module")
def ddpm_path(folders):
    """piadm's sequential DDPM path on the scheduler's 1000 timesteps, and its noise."""
    y, _, noise = _run({**_ddpm(folders), "sampler.method": "sequential-sde"})
    return y, noise


def test_sequential_sde_on_the_scheduler_grid_is_diffusers_ddpm_loop(ddpm_path):
    y, noise = ddpm_path
    from diffusers.utils.torch_utils import randn_tensor

    unet = small_unet().double()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    # diffusers keeps its alpha bars in float32 and works its step coefficients out in that
    # precision: a 1e-5 drift over 1000 steps that differs from host to host. Promoted to
    # float64 (the same values piadm reads) the two loops must agree to rounding.
    scheduler.alphas_cumprod, scheduler.one = (scheduler.alphas_cumprod.double(),
                                               scheduler.one.double())
    scheduler.set_timesteps(1000)
    x, xi = noise.prior(), noise.path(0, 1000)
    with torch.no_grad():
        for j, t in enumerate(scheduler.timesteps):
            eps = unet(x[:, None], t).sample[:, 0]
            out = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(j)).prev_sample
            if t > 0:  # swap the scheduler's own draw for the noise piadm used at this step
                theirs = randn_tensor(x.shape, generator=torch.Generator().manual_seed(j),
                                      dtype=x.dtype)
                sd = scheduler._get_variance(t) ** 0.5
                out = out - sd * theirs + sd * xi[:, j]
            x = out
    assert float(eps.std()) > 0.1  # a network that answers, not a zero map
    assert _rel(y, x) <= 1e-10


def test_sequential_ode_on_the_scheduler_grid_is_diffusers_ddim_loop(folders):
    y, _, noise = _run({"model.kind": "diffusers", "model.path": str(folders["ddim"]),
                        "model.shape": [16, 16], "sampler.method": "sequential-ode",
                        "sampler.grid": "scheduler", "sampler.steps": 50, "sampler.form": "eps"})
    unet = small_unet().double()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(50)
    x = noise.prior()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x[:, None], t).sample[:, 0], t, x, eta=0.0).prev_sample
    assert _rel(y, x) <= 1e-5


def test_the_module_door_samples_what_the_diffusers_door_does(folders):
    common = {"sampler.method": "sequential-ode", "sampler.steps": 40, "sampler.form": "eps"}
    via_folder, _, _ = _run({"model.kind": "diffusers", "model.path": str(folders["ddim"]),
                             "model.shape": [16, 16], **common})
    sys.path.insert(0, str(TESTS))
    via_module, _, _ = _run({
        "model.kind": "module", "model.target": "byo_nets:small_unet", "model.init": 1,
        "model.weights": str(folders["ddim"] / "diffusion_pytorch_model.safetensors"),
        "model.prediction": "eps", "model.process": "ddpm", "model.shape": [1, 16, 16],
        **common}, shape=(1, 16, 16))
    assert _rel(via_module[:, 0], via_folder) <= 1e-12  # init=1 made other weights: the file's won


def test_pc_window_on_the_unet_stays_within_1e_3_of_the_sequential_path(folders, ddpm_path):
    seq, _ = ddpm_path
    y, stats, _ = _run({**_ddpm(folders), "sampler.method": "pc-window"})
    dist = ((y - seq).flatten(1).norm(dim=1) / seq.flatten(1).norm(dim=1)).max()
    assert float(dist) <= 1e-3 and stats.rounds < 100 and stats.model_calls < 4 * 1000


def test_an_edm_denoiser_matches_edm_first_order_sampler():
    sys.path.insert(0, str(TESTS))
    steps = 18
    y, _, noise = _run({"model.kind": "module", "model.target": "byo_nets:EDMDenoiser",
                        "model.prediction": "x0", "model.process": "edm", "model.shape": [8, 8],
                        "sampler.method": "sequential-ode", "sampler.grid": "edm",
                        "sampler.steps": steps, "sampler.form": "eps",
                        "sampler.u_min": math.log1p(0.002**2), "sampler.u_max": math.log1p(80.0**2)},
                       shape=(8, 8))
    den = EDMDenoiser().double()
    u = make_grid("edm", steps, u_min=math.log1p(0.002**2), u_max=math.log1p(80.0**2),
                  block_size=steps).u
    sigma = VE().t_of_u(u)
    x = noise.prior() * torch.sqrt(1 + sigma[0] ** 2)  # the VE state of piadm's prior draw
    with torch.no_grad():
        for i in range(steps):  # Euler in sigma: dx/dsigma = (x - D(x, sigma)) / sigma
            d = (x - den(x, sigma[i].expand(x.shape[0]))) / sigma[i]
            x = x + (sigma[i + 1] - sigma[i]) * d
    assert _rel(y, x / torch.sqrt(1 + sigma[-1] ** 2)) <= 1e-5


@pytest.mark.parametrize("source, needle", [
    ("raise RuntimeError('no licence file')\n",
     "(RuntimeError: no licence file, at {file}:1 in <module>): fix the module (or what it "
     "imports) so that it imports"),
    ("import no_such_dependency\n", "(ModuleNotFoundError: No module named "
     "'no_such_dependency', at {file}:1 in <module>): it imports 'no_such_dependency', which "
     "is not installed: install that"),
])
def test_a_module_found_but_failing_to_import_is_not_told_to_be_installed(
        source, needle, tmp_path, capsys, monkeypatch):
    """It was told "install it, or put its folder on PYTHONPATH", which it is."""
    (tmp_path / "failing_nets.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "x.zarr"
    sets = ["model.kind=module", "model.target=failing_nets:net", "model.prediction=eps",
            "model.process=ddpm", "model.shape=[1, 16, 16]", f"output.path={out}"]
    rc = main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, needle.format(file=tmp_path / "failing_nets.py")), err
    assert "PYTHONPATH" not in err and not out.exists()


@pytest.mark.parametrize("sets,needle", [
    (["model.target=no_such_package.nets:unet"], "cannot import 'no_such_package.nets'"),
    (["model.target=byo_nets:small_unett"], "did you mean 'small_unet'"),
    (["model.target=byo_nets:"], "must name a factory as 'package.module:function'"),
    # a file's path: told "the 'package' argument is required" or "install it"
    (["model.target=./tests/byo_nets.py:small_unet"], "names a file; it takes a module's name "
     "and a factory in it, e.g. byo_nets:small_unet, with the module's folder (./tests) on "
     "PYTHONPATH"),
    (["model.target=byo_nets:whole_step_embedding"],
     "piadm calls it at fractional timesteps (a float t between the training's whole steps)"),
    # where in the user's own code, since the one line has no traceback
    (["model.target=byo_nets:raising"], "raised RuntimeError: no GPU found, at "
                                         f"{TESTS / 'byo_nets.py'}:{_line('raising')} in raising"),
    # the device's memory, not a mistake in the factory or its keys
    (["model.target=byo_nets:out_of_memory"], "the network ran out of memory before sampling "
                                               "(CUDA out of memory. Tried to allocate"),
    (["model.target=byo_nets:typo"], "failed (AttributeError: 'Tensor' object has no attribute "
                                      f"'scael', at {TESTS / 'byo_nets.py'}:{_line('_Typo')} in "
                                      "forward): fix the code at that line, or check model.shape"),
    (["model.target=byo_nets:wrong_shape", "model.shape=[1, 16, 16]"], "returns shape [2, 2, 16, 16]"),
    # the shape it returns, not what an adapter broadcast it to
    (["model.target=byo_nets:flat_out"], "the network returns shape [2, 256] for input "
                                         "[2, 1, 16, 16]: it must return its input's shape"),
    # a batch of one (1, 16, 16) passes a convolution as one unbatched image: not mistaken
    (["model.target=byo_nets:one_channel", "model.shape=[16, 16]"],
     "calling the network on a (2, 16, 16) input failed"),
    (["model.prediction=noise"], "model.prediction = 'noise' is unknown"),
    # ran as a shift of the network's own samples (and a conditioned one was never given it)
    (["model.condition=mean", "input.path=in.zarr", "input.variable=v"],
     "model.condition = 'mean' is for the exact models (each item's input is their mean): a "
     "network (model.kind = 'module') is conditioned with 'coarse'"),
    # a factory's argument under an exact model's key never reached the factory
    (["model.std=0.2"], "model.std = 0.2 is read by model.kind = 'gmm', not 'module': remove "
                        "it (a factory's own arguments go under [model.args])"),
    (["model.process=ddim"], "model.process = 'ddim' is unknown"),
    (["model.train_steps=-5"], "model.train_steps = -5 must be a whole number in [1, 100000]"),
    (["model.train_steps=0"], "model.train_steps = 0 must be a whole number in [1, 100000]"),
    # 1e9 timesteps' tables took every byte of the host (killed) before a word was said
    (["model.train_steps=1000000000"], "model.train_steps = 1000000000 must be a whole number "
                                       "in [1, 100000]"),
    (["model.beta_end=0.0"], "must satisfy 0 < beta_start <= beta_end < 1"),
    (["model.beta_end=2.0"], "model.beta_end = 2.0 must satisfy 0 < beta_start <= beta_end < 1"),
    # a schedule of less noise than sampler.u_max (Stable Diffusion's): the network would be
    # called at timesteps past its last, extrapolated (up to 1383 of 999)
    (["model.beta_schedule=scaled_linear", "model.beta_start=0.00085", "model.beta_end=0.012"],
     "sampler.u_max = 10 is past the most noise the network was trained at: its schedule "
     "ends at u = 5.3"),
    (["model.train_steps=100"], "sampler.u_max = 10 is past the most noise"),
    (["model.process=vp-linear", "sampler.u_min=1e-3", "sampler.u_max=11"],
     "its schedule ends at u = 10.05"),
    # churn lifts edm-heun's first call above u_max: the bound is on that call
    (["model.beta_schedule=scaled_linear", "model.beta_start=0.00085", "model.beta_end=0.012",
      "sampler.method=edm-heun", "sampler.churn=40", "sampler.u_max=5.3687"],
     "(sampler.churn lifts the first call to u = 6.0"),
])
def test_module_mistakes_are_one_line_errors(sets, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "x.zarr"
    base = ["model.kind=module", "model.target=byo_nets:small_unet", "model.prediction=eps",
            "model.process=ddpm", "model.shape=[1, 16, 16]", "sampler.method=sequential-sde",
            "sampler.steps=4", f"output.path={out}"]
    rc = main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in base + sets), [])])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, needle), err
    assert not out.exists()


def test_bench_sizes_keep_a_networks_channel_axis(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    sets = ["model.kind=module", "model.target=byo_nets:one_channel", "model.prediction=eps",
            "model.process=ddpm", "model.shape=[1, 16, 16]", "sampler.steps=4",
            "sampler.tol=1e-3", "bench.sizes=[[8, 8]]", "bench.members=2",
            'bench.methods=["sequential-sde", "pc-window"]']
    rc = main(["bench", "jobs/configs/grf.toml", "--json", str(tmp_path / "b.json"),
               *sum((["--set", s] for s in sets), [])])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [row["d"] for row in rows] == [64, 64]  # one channel of 8x8


def test_a_module_models_schedule_keys_its_calibration():
    from models.module import SCHEDULE_KEYS
    from pipeline.calibrate import calibration_key

    base = {"model.kind": "module", "model.target": "byo_nets:one_channel",
            "model.prediction": "eps", "model.process": "ddpm", "model.shape": [1, 8, 8],
            "sampler.method": "pc-window", "sampler.tol": "auto"}
    first = calibration_key(api.load_config(None, base), "0" * 64, "cpu")
    changed = {"beta_schedule": "cosine", "beta_start": 2e-4, "beta_end": 0.04,
               "train_steps": 500, "input_scale": "unit"}
    assert set(changed) == set(SCHEDULE_KEYS)
    for key, value in changed.items():
        other = api.load_config(None, {**base, f"model.{key}": value})
        assert calibration_key(other, "0" * 64, "cpu") != first, key


def _module_run(out, *sets):
    base = ["model.kind=module", "model.prediction=eps", "model.process=ddpm",
            "model.shape=[1, 16, 16]", "sampler.method=sequential-sde", "sampler.steps=4",
            "ensemble.members=2", "ensemble.batch_size=2", f"output.path={out}"]
    return main(["sample", "jobs/configs/grf.toml",
                 *sum((["--set", s] for s in base + list(sets)), [])])


def test_a_network_answering_in_float64_samples_with_the_parallel_samplers(tmp_path,
                                                                          monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    assert _module_run(tmp_path / "f.zarr", "model.target=byo_nets:float64_out",
                       "sampler.method=pc-window", "sampler.tol=1e-3", "sampler.window=4") == 0


def test_the_load_check_keeps_a_float64_networks_weights_in_float64(monkeypatch):
    """The check calls the network once in its own dtype: called in float32, its weights were
    cast there and came back to a float64 run rounded."""
    monkeypatch.syspath_prepend(str(TESTS))
    from pipeline.settings import ModelConfig

    model = build_model(ModelConfig(kind="module", target="byo_nets:float64_params",
                                    prediction="eps", process="ddpm", shape=(1, 16, 16)))
    assert {p.dtype for p in model.net.net.parameters()} == {torch.float64}


def test_a_network_returning_a_tuple_is_told_so(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    assert _module_run(tmp_path / "t.zarr", "model.target=byo_nets:tuple_out") == 2
    assert "the network returned a tuple, not a tensor: have it return its prediction alone" \
        in capsys.readouterr().err
    # whole numbers: the prediction cut to them, silently, before
    assert _module_run(tmp_path / "i.zarr", "model.target=byo_nets:int64_out") == 2
    assert "the network returned torch.int64 values: have it return its prediction as " \
        "floating point" in capsys.readouterr().err
    assert not (tmp_path / "i.zarr").exists()


def test_a_network_of_meta_tensors_or_autograd_in_its_forward_is_told_what_to_do(
        tmp_path, monkeypatch, capsys):
    """A network of meta tensors (accelerate's empty weights) was a traceback ("Cannot copy
    out of meta tensor"), and a score computed by autograd was told to check model.shape."""
    monkeypatch.syspath_prepend(str(TESTS))
    assert _module_run(tmp_path / "m.zarr", "model.target=byo_nets:meta_net") == 2
    err = capsys.readouterr().err
    assert _one_error(err, "returned a network of meta tensors") and "assign=True" in err
    assert _module_run(tmp_path / "e.zarr", "model.target=byo_nets:energy_score",
                       "model.prediction=score", "model.process=ve") == 2
    err = capsys.readouterr().err
    assert _one_error(err, "piadm calls the network under torch.no_grad(): wrap the autograd "
                           "in its forward in torch.enable_grad()")
    assert not (tmp_path / "m.zarr").exists() and not (tmp_path / "e.zarr").exists()


def test_a_store_resumes_only_with_the_model_files_it_was_made_with(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    weights, out = tmp_path / "w.pt", tmp_path / "x.zarr"
    net = ["model.target=byo_nets:small_unet", f"model.weights={weights}"]
    torch.save(small_unet(init=0).state_dict(), weights)
    assert _module_run(out, *net) == 0
    made_with = api.open_ensemble(out).attrs["model_sha256"]
    torch.save(small_unet(init=1).state_dict(), weights)  # retrained in place
    assert _module_run(out, *net) == 2
    assert _one_error(capsys.readouterr().err, "was made by this configuration with other model files")
    assert api.open_ensemble(out).attrs["model_sha256"] == made_with  # kept
    assert _module_run(out, *net, "output.overwrite=true") == 0
    assert api.open_ensemble(out).attrs["model_sha256"] != made_with


@pytest.mark.parametrize("case, needle", [
    ("sizes", "does not load into the network (RuntimeError: Error(s) in loading state_dict for "
              "UNet2DModel: size mismatch for"),
    ("nested", "nests its tensors under 'state_dict': save that dict alone"),
    ("pickled", "holds pickled objects, not tensors alone (a whole saved model?)"),
    ("garbage", "is not a readable state dict"),
    ("whole numbers", "holds torch.int64 values for the floating parameter"),
])
def test_weights_that_do_not_fit_say_why_in_one_line(case, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    weights, out = tmp_path / "w.pt", tmp_path / "x.zarr"
    if case == "sizes":
        torch.save(small_unet(channels=4).state_dict(), weights)
    elif case == "nested":
        torch.save({"state_dict": small_unet().state_dict(), "epoch": 3}, weights)
    elif case == "pickled":
        torch.save(small_unet(), weights)
    elif case == "whole numbers":  # load_state_dict would cast them silently
        torch.save({k: (v * 100).long() for k, v in small_unet().state_dict().items()}, weights)
    else:
        weights.write_bytes(bytes(range(256)) * 8)
    rc = _module_run(out, "model.target=byo_nets:small_unet", f"model.weights={weights}")
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, needle) and "\x1b" not in err, err
    assert not out.exists()


def test_float64_weights_for_float32_parameters_are_said_to_be_rounded(tmp_path):
    """Loaded into a factory's float32 parameters, float64 weights are rounded: said, with
    the fix (a float64 network keeps them exact), and the network keeps its own dtypes."""
    from models.module import load_weights

    path = tmp_path / "w64.pt"
    torch.save({"weight": torch.full((1, 1), 1 + 1e-12, dtype=torch.float64),
                "bias": torch.zeros(1, dtype=torch.float64)}, path)
    net = torch.nn.Linear(1, 1)
    with pytest.warns(UserWarning, match=r"float64 values for the factory's float32 "
                                         r"parameters \('weight' among them\)"):
        load_weights(net, str(path))
    assert net.weight.dtype == torch.float32
    exact = torch.nn.Linear(1, 1).double()
    load_weights(exact, str(path))
    assert exact.weight.item() == 1 + 1e-12


def test_safetensors_weights_without_the_package_name_the_package_not_the_file(tmp_path,
                                                                            monkeypatch):
    """The file was said to be no readable state dict, for a ModuleNotFoundError."""
    import sys

    from models.module import load_weights
    from pipeline.errors import ConfigError

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"any")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ConfigError, match=r"^config: model.weights = '.*w.safetensors' needs "
                                          r"the safetensors package: pip install safetensors"):
        load_weights(torch.nn.Linear(1, 1), str(path))


def test_a_store_with_a_channel_axis_is_evaluated_as_its_2d_fields(tmp_path, monkeypatch):
    import numpy as np
    import xarray as xr

    monkeypatch.syspath_prepend(str(TESTS))
    out, truth = tmp_path / "x.zarr", tmp_path / "truth.zarr"
    assert _module_run(out, "model.target=byo_nets:small_unet") == 0
    assert api.open_ensemble(out)["field"].shape[-3:] == (1, 16, 16)
    fields = np.random.default_rng(0).standard_normal((8, 16, 16))
    xr.Dataset({"field": (("time", "y", "x"), fields)},
               coords={"time": np.arange(8.0)}).to_zarr(truth)
    metrics = api.evaluate(out, truth, out=tmp_path / "eval")
    assert metrics.attrs["pairing"] == "climatological"
    assert np.isfinite(metrics.attrs["spectrum_max_deviation"])


def test_a_network_without_weights_is_the_same_network_on_every_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    torch.manual_seed(1)  # whatever the process drew before
    assert _module_run(tmp_path / "a.zarr", "model.target=byo_nets:Unseeded") == 0
    torch.manual_seed(2)
    assert _module_run(tmp_path / "b.zarr", "model.target=byo_nets:Unseeded") == 0
    a, b = (api.open_ensemble(tmp_path / f"{n}.zarr") for n in "ab")
    assert float(abs(a["field"] - b["field"]).max()) == 0.0


def test_a_learned_variance_network_samples_on_its_prediction_channel(tmp_path):
    """Its second channel is the variance, as diffusers' DDPMScheduler reads it: the first is
    the prediction piadm samples with."""
    folder = tmp_path / "lv"
    small_unet(out=2).save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range",
                            clip_sample=False).save_pretrained(folder)
    for shape in ("[16, 16]", "[1, 16, 16]"):  # its channel axis added by piadm, or given
        out = tmp_path / f"lv{len(shape)}.zarr"
        assert main(["sample", "jobs/configs/grf.toml", "--set", "model.kind=diffusers",
                     "--set", f"model.path={folder}", "--set", f"model.shape={shape}",
                     "--set", "sampler.method=sequential-sde", "--set", "sampler.steps=4",
                     "--set", "ensemble.members=2", "--set", f"output.path={out}"]) == 0


def test_a_folder_without_its_scheduler_config_is_a_one_line_error(tmp_path, capsys):
    small_unet().save_pretrained(tmp_path / "net")
    rc = main(["sample", "jobs/configs/grf.toml", "--set", "model.kind=diffusers",
               "--set", f"model.path={tmp_path / 'net'}", "--set", "model.shape=[16, 16]",
               "--set", f"output.path={tmp_path / 'x.zarr'}"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, "has no scheduler_config.json"), err


def test_a_diffusers_folder_refuses_the_keys_its_scheduler_decides(tmp_path, capsys):
    """Its scheduler config says what it predicts and on which schedule: a model.prediction
    meant to correct it was ignored, the store recording the scheduler's."""
    rc = main(["config", "jobs/configs/grf.toml", "--set", "model.kind=diffusers", "--set",
               f"model.path={tmp_path}", "--set", "model.prediction=x0"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, "model.prediction = 'x0' is read by model.kind = "
                                       "'module', not 'diffusers'"), err


def test_a_module_argument_given_twice_is_refused():
    from pipeline.api import load_config
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.mu is given at the top of \[model\] and "
                                          r"under \[model.args\]: give it once"):
        load_config({"model": {"kind": "module", "target": "x:y", "mu": 5.0,
                               "args": {"mu": 3.0}}})


def test_a_zero_terminal_snr_scheduler_is_refused_not_misread(tmp_path, capsys):
    """rescale_betas_zero_snr changes diffusers' alphas_cumprod (0 at the last timestep):
    read as the plain table, the network was called at other noise levels than trained."""
    small_unet().save_pretrained(tmp_path / "z")
    diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False,
                            prediction_type="v_prediction",
                            rescale_betas_zero_snr=True).save_pretrained(tmp_path / "z")
    rc = main(["sample", "jobs/configs/grf.toml", "--set", "model.kind=diffusers",
               "--set", f"model.path={tmp_path / 'z'}", "--set", "model.shape=[16, 16]",
               "--set", f"output.path={tmp_path / 'x.zarr'}"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, "has rescale_betas_zero_snr = true"), err
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("dry", [True, False])
def test_auto_quality_on_a_network_without_a_quality_measure_is_refused_by_its_dry_run_too(
        tmp_path, capsys, monkeypatch, dry):
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "q.zarr"
    rc = main(["sample", "jobs/configs/module.toml", "--set", "sampler.method=auto-quality",
               "--set", f"output.path={out}", *(["--dry-run"] if dry else [])])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, "equal quality (bench --quality, sampler.method = "
                                       "\"auto-quality\") needs the exact W2"), err
    assert not out.exists()


@pytest.mark.parametrize("dry", [True, False])
def test_more_steps_than_the_scheduler_was_trained_with_are_refused_before_any_store(
        folders, tmp_path, capsys, dry):
    out = tmp_path / "d.zarr"
    rc = main(["sample", "jobs/configs/grf.toml", "--set", "model.kind=diffusers",
               "--set", f"model.path={folders['ddpm']}", "--set", "model.shape=[16, 16]",
               "--set", "sampler.grid=scheduler", "--set", "sampler.steps=1200",
               "--set", "sampler.form=eps", "--set", f"output.path={out}",
               *(["--dry-run"] if dry else [])])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, "sampler.steps = 1200 does not fit the scheduler"), err
    line = next(x for x in err.splitlines() if x.startswith("piadm: error:"))
    assert line.startswith("piadm: error: config: sampler.steps = 1200 does not fit")  # once
    assert line.endswith("take at most its num_train_timesteps = 1000 steps, or set "
                         "sampler.grid to one of piadm's own grids") and not out.exists()


def test_the_module_example_config_samples_a_store(tmp_path, capsys):
    out = tmp_path / "m.zarr"
    assert main(["sample", "jobs/configs/module.toml", "--set", f"output.path={out}",
                 "--set", "sampler.steps=10", "--set", "ensemble.members=1"]) == 0
    attrs = api.open_ensemble(out).attrs
    assert attrs["model_target"] == "diffusers:UNet2DModel" and attrs["model_process"] == "ddpm"
    # pc-window without S was not said: it certifies less a round, and data_bound is the fix
    assert "note: field 1x32x32 has no S (model.data_bound unset" in capsys.readouterr().err
    assert main(["sample", "jobs/configs/module.toml", "--set", f"output.path={out}",
                 "--set", "sampler.steps=10", "--set", "ensemble.members=1"]) == 0
    assert "has no S" not in capsys.readouterr().err  # nothing left to sample: not said
    assert main(["sample", "jobs/configs/module.toml", "--set", f"output.path={out}2",
                 "--set", "sampler.steps=10", "--set", "ensemble.members=1", "--set",
                 "model.data_bound=2.0"]) == 0
    assert "has no S" not in capsys.readouterr().err


def _install_kind(folder, monkeypatch, package: str, entry: str) -> None:
    """An installed ``package`` (its dist-info in ``folder``, put on the path) whose entry
    point ``entry`` ("KIND = module:builder") adds a model kind."""
    dist = folder / f"{package}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[piadm.models]\n{entry}\n")
    monkeypatch.syspath_prepend(str(folder))


def test_an_installed_package_registers_a_model_kind(tmp_path, monkeypatch):
    """An entry point in the group piadm.models adds a kind; its own keys reach it in args."""
    _install_kind(tmp_path, monkeypatch, "mynets", "steepgrf = byo_nets:build_plugin")
    monkeypatch.syspath_prepend(str(TESTS))
    cfg = api.load_config(None, {"model.kind": "steepgrf", "model.steepness": 4.0,
                                 "model.shape": [8, 8], "sampler.method": "sequential-sde",
                                 "sampler.steps": 5})
    assert cfg.model.args == {"steepness": 4.0} and "steepness = 4.0" in cfg.text
    model = build_model(cfg.model)
    assert model.slope == 4.0
    with pytest.raises(api.ConfigError, match="model.kind = 'nosuchkind' is unknown"):
        api.load_config(None, {"model.kind": "nosuchkind"})


@pytest.mark.parametrize("fault, said", [
    ("shape", "returns shape [2, 8, 7] for a (2, 8, 8) torch.float32 state"),
    ("tuple", "returns tuple for a (2, 8, 8)"), ("nonfinite", "returns NaN/Inf"),
    ("int", "returns torch.int64 for a (2, 8, 8)"),
    ("none", "its builder returned NoneType, not a score model"),
    ("float64", "")])
def test_a_package_kinds_wrong_score_is_refused_before_its_store(tmp_path, monkeypatch, capsys,
                                                                 fault, said):
    """A package's model was called first by the sampler, its store made: a traceback from
    deep in a sampler (view_as of a tuple), or a NaN refusal mid-run, an empty store left."""
    _install_kind(tmp_path, monkeypatch, "badnets", "faulty = byo_nets:build_bad_plugin")
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "bad.zarr"
    rc = main(["sample", "jobs/configs/grf.toml", "--set", "model.kind=faulty", "--set",
               f"model.fault={fault}", "--set", "model.shape=[8, 8]", "--set",
               "sampler.method=pc-window", "--set", "sampler.steps=6", "--set",
               f"output.path={out}", "--set", "sampler.dtype=" + (
                   "float64" if fault == "float64" else "float32")])
    err = capsys.readouterr().err
    if not said:  # float64 arithmetic keeps the contract in float64: sampled as before
        assert rc == 0 and out.exists(), err
        return
    assert rc == 2 and _one_error(err, f"model.kind = 'faulty': {said}" if fault == "none"
                                  else "model.kind = 'faulty': its model(x, u) " + said)
    assert not out.exists()


@pytest.mark.parametrize("dry", [True, False])
def test_a_conditioned_module_that_takes_no_condition_is_refused_before_any_store(
        tmp_path, monkeypatch, capsys, dry):
    """Unconditioned, the network is called once at load; conditioned, only binding the first
    item's field tells: a network of (x, t) alone crashed at the first batch, its store made."""
    import numpy as np
    import xarray as xr

    monkeypatch.syspath_prepend(str(TESTS))
    coarse = xr.Dataset({"c": (("time", "y", "x"), np.ones((2, 8, 8), "float32"))},
                        coords={"time": [0.0, 1.0]})
    coarse.to_zarr(tmp_path / "in.zarr", zarr_format=3)
    out = tmp_path / "c.zarr"
    sets = ["model.kind=module", "model.prediction=eps", "model.process=ddpm",
            "model.shape=[1, 16, 16]", "sampler.method=sequential-sde", "sampler.steps=4",
            "model.target=byo_nets:one_channel", "model.condition=coarse",
            f"input.path={tmp_path / 'in.zarr'}", "input.variable=c", f"output.path={out}"]
    rc = main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), []),
               *(["--dry-run"] if dry else [])])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, "model.target = 'byo_nets:one_channel' given its coarse "
                                       "input: calling the network on a (2, 1, 16, 16) input "
                                       "failed (TypeError"), err
    assert "and that it takes (x, t, cond), the upsampled coarse field as its third argument" \
        in err  # not "(x, t)", the call of an unconditioned network
    assert not out.exists()


@pytest.mark.parametrize("shape, dtype", [((4, 4), torch.float64), ((1, 4, 4), torch.float32)])
def test_a_conditional_module_gets_the_bound_coarse_field_upsampled(monkeypatch, shape, dtype):
    monkeypatch.syspath_prepend(str(TESTS))
    from pipeline.settings import ModelConfig

    section = ModelConfig(kind="module", target="byo_nets:Conditional", prediction="eps",
                          process="ddpm", shape=shape, condition="coarse")
    coarse = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)  # as inputs give it
    model = build_model(section).conditioned(coarse)
    u = torch.full((2,), 1.0, dtype=dtype)  # the samplers call in the field's dtype
    score = model(torch.zeros(2, *shape, dtype=dtype), u)
    eps = -score * torch.sqrt(-torch.expm1(-u)).reshape(-1, *(1,) * len(shape))  # eps = -s(u) score
    expected = coarse.repeat_interleave(2, 0).repeat_interleave(2, 1).to(dtype)
    assert torch.allclose(eps, expected.expand(2, *shape), atol=1e-6)


def test_a_u_max_within_the_networks_schedule_samples(tmp_path, monkeypatch, capsys):
    """The bound the refusal names is one the run then takes; a module's refusal does not
    offer the scheduler's grid, which only a diffusers folder has; a cosine VP network (t up
    to 1: u up to infinity) and one with the linear schedule's first level above u_min run at
    the defaults."""
    monkeypatch.syspath_prepend(str(TESTS))
    sl = ["model.target=byo_nets:small_unet", "model.beta_schedule=scaled_linear",
          "model.beta_start=0.00085", "model.beta_end=0.012"]
    assert _module_run(tmp_path / "a.zarr", *sl) == 2
    err = capsys.readouterr().err
    assert "set sampler.u_max = 5.3687 or less" in err and "scheduler" not in err
    assert _module_run(tmp_path / "s.zarr", *sl, "sampler.u_max=5.3687") == 0
    gamma = 0.1  # churn 0.4 over 4 steps
    allowed = math.floor(math.log1p(math.expm1(5.36872) / (1 + gamma) ** 2) * 1e4) / 1e4
    assert _module_run(tmp_path / "h.zarr", *sl, "sampler.method=edm-heun", "sampler.churn=0.4",
                       f"sampler.u_max={allowed}") == 0
    assert _module_run(tmp_path / "c.zarr", "model.target=byo_nets:small_unet",
                       "model.process=vp-cosine") == 0
    assert _module_run(tmp_path / "l.zarr", "model.target=byo_nets:small_unet",
                       "model.beta_start=0.0015") == 0


def test_a_schedulers_fractional_timesteps_take_its_interpolated_sigma(tmp_path):
    """EulerDiscrete's timesteps fall between the table's (832.5): the level is the sigma it
    interpolates linearly in t, not the table's entry below."""
    from models.pretrained import scheduler_grid as grid_of_folder
    from pipeline.clock import DiscreteVP, ddpm_alphas_cumprod

    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.save_pretrained(tmp_path)
    process = DiscreteVP(num_steps=1000, alphas_cumprod=ddpm_alphas_cumprod(
        "linear", 1e-4, 0.02, 1000))
    u = grid_of_folder(tmp_path, process)(7)
    scheduler.set_timesteps(7)
    want = torch.log1p(scheduler.sigmas[:-1].double() ** 2)
    assert torch.allclose(u[:-1], want, rtol=1e-5) and float(u[-1]) == 0.0
    assert any(float(t) % 1 for t in scheduler.timesteps)  # the case: some fall between


def test_a_ddim_whose_last_step_does_not_move_says_which_setting_makes_it_move(tmp_path,
                                                                             capsys):
    unet = small_unet()
    unet.save_pretrained(tmp_path / "f")
    diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False,
                            set_alpha_to_one=False).save_pretrained(tmp_path / "f")
    rc = main(["sample", "jobs/configs/grf.toml", "--set", "model.kind=diffusers",
               "--set", f"model.path={tmp_path / 'f'}", "--set", "model.shape=[16, 16]",
               "--set", "sampler.grid=scheduler", "--set", "sampler.steps=20",
               "--set", f"output.path={tmp_path / 'o.zarr'}"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error(err, "so its last step does not move: set steps_offset = 1 "
                                       "or set_alpha_to_one = true"), err
    assert not (tmp_path / "o.zarr").exists()


def test_a_network_embedding_its_timestep_per_sample_passes_the_load_check(tmp_path,
                                                                          monkeypatch):
    """The load check calls the network as sampling does, with a timestep per state."""
    monkeypatch.syspath_prepend(str(TESTS))
    assert _module_run(tmp_path / "p.zarr", "model.target=byo_nets:per_sample_time") == 0


def test_a_conditional_networks_members_are_in_its_own_units_whatever_the_selection(
        tmp_path, monkeypatch, capsys):
    """A user's network takes the condition as the input stores it and returns fields in the
    same units: the input selection's mean and std (which differ between selections) scale
    neither, so an item's members are the same whichever other items a run takes."""
    import numpy as np
    import xarray as xr

    monkeypatch.syspath_prepend(str(TESTS))
    rng = np.random.default_rng(0)
    coarse = 100 + 5 * rng.standard_normal((4, 4, 4)) * np.arange(1, 5)[:, None, None]
    xr.Dataset({"c": (("time", "y", "x"), coarse.astype("float32"))},
               coords={"time": [0.0, 1.0, 2.0, 3.0]}).to_zarr(tmp_path / "in.zarr", zarr_format=3)
    sets = ["model.kind=module", "model.target=byo_nets:ConditionPlusOne", "model.prediction=x0",
            "model.process=edm", "model.shape=[1, 16, 16]", "model.condition=coarse",
            "sampler.method=sequential-ode", "sampler.steps=20", "sampler.grid=edm",
            "ensemble.members=2", f"input.path={tmp_path / 'in.zarr'}", "input.variable=c"]
    means = []
    for span, name in (('["0.0", "0.0"]', "one"), ('["0.0", "3.0"]', "all")):
        out = tmp_path / f"{name}.zarr"
        assert main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in [
            *sets, f"input.range={span}", f"output.path={out}"]), [])]) == 0
        field = xr.open_zarr(out)["c"].isel(time=0).mean("member").values
        means.append(field)
        # cond + 1 but for the noise left at the path's end (scaled by the selection's std
        # the offset was that std, 4 to 6)
        assert np.abs(field - (np.kron(coarse[0], np.ones((4, 4))) + 1)).max() < 0.5
    assert np.array_equal(*means)
    # an older piadm's store scaled them by its selection: grown now, its members would differ
    import zarr

    from pipeline.store import FIELD_SCALE

    older = zarr.open_group(tmp_path / "all.zarr", mode="r+")
    assert older.attrs[FIELD_SCALE] == [0.0, 1.0]
    older.attrs.put({k: v for k, v in older.attrs.asdict().items() if k != FIELD_SCALE})
    assert main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in [
        *sets, 'input.range=["0.0", "3.0"]', f"output.path={tmp_path / 'all.zarr'}",
        "ensemble.members=3"]), [])]) == 2
    assert "was sampled by an older piadm, which scaled the network's condition" in \
        capsys.readouterr().err
    # an older unconditional store was never scaled (its statistics are 0 and 1): it grows
    plain = tmp_path / "plain.zarr"
    assert _module_run(plain, "model.target=byo_nets:small_unet") == 0
    older = zarr.open_group(plain, mode="r+")
    older.attrs.put({k: v for k, v in older.attrs.asdict().items() if k != FIELD_SCALE})
    assert _module_run(plain, "model.target=byo_nets:small_unet", "ensemble.members=4") == 0


def test_a_store_is_not_grown_once_its_networks_code_has_changed(tmp_path, monkeypatch, capsys):
    """Without model.weights a network is its code: an edit of the file that model.target
    names (the forward pass fixed, say) would mix two networks' members in one store."""
    import importlib
    import sys

    code = tmp_path / "my_net.py"
    source = ("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
              "        super().__init__()\n        torch.manual_seed(0)\n"
              "        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)\n\n"
              "    def forward(self, x, t):\n        return 0.1 * self.conv(x)\n")
    code.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "n.zarr"
    run = lambda members: _module_run(out, "model.target=my_net:Net",  # noqa: E731
                                      f"ensemble.members={members}")
    assert run(2) == 0
    code.write_text(source.replace("0.1 *", "5.0 *"))
    sys.modules.pop("my_net", None)
    importlib.invalidate_caches()
    capsys.readouterr()
    assert run(4) == 2
    assert (f"was made by this configuration with other network code ({code} has changed "
            "since") in capsys.readouterr().err
    code.write_text(source)  # put back: the store grows
    sys.modules.pop("my_net", None)
    assert run(4) == 0


def test_a_network_file_edited_in_the_same_process_is_run_as_edited(tmp_path, monkeypatch):
    """A notebook that samples, edits its network's file and samples again runs the edited
    code (Python keeps the module it imported first), the code whose hash the store records."""
    code = tmp_path / "edited_net.py"
    source = ("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
              "        super().__init__()\n        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)\n\n"
              "    def forward(self, x, t):\n        return 0.1 * self.conv(x)\n")
    code.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edited_net", raising=False)
    cfg = api.load_config(None, {"model.kind": "module", "model.target": "edited_net:Net",
                                 "model.prediction": "eps", "model.process": "ddpm",
                                 "model.shape": [1, 8, 8]})
    x = torch.randn(2, 1, 8, 8)
    call = lambda: build_model(cfg.model)(x, torch.full((2,), 1.0))  # noqa: E731 (a score)
    before = call()
    code.write_text(source.replace("0.1 *", "5.0 *"))  # the same size, within the second
    after = call()
    assert torch.allclose(after, 50 * before, rtol=1e-5)
    monkeypatch.delitem(sys.modules, "edited_net")


def test_a_network_defined_in_no_file_is_warned_of(monkeypatch):
    """A factory of a notebook's cell has no file to hash: its stores cannot see an edit."""
    import types

    cell = types.ModuleType("cell_net")
    exec(compile("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                 "        super().__init__()\n        self.conv = torch.nn.Conv2d(1, 1, 1)\n"
                 "    def forward(self, x, t):\n        return self.conv(x)\n",
                 "<cell 1>", "exec"), cell.__dict__)
    monkeypatch.setitem(sys.modules, "cell_net", cell)
    cfg = api.load_config(None, {"model.kind": "module", "model.target": "cell_net:Net",
                                 "model.prediction": "eps", "model.process": "ddpm",
                                 "model.shape": [1, 8, 8]})
    with pytest.warns(UserWarning, match="defined in no file piadm can read"):
        build_model(cfg.model)


def test_a_network_answering_in_lower_precision_is_warned_of_once(monkeypatch):
    """A float16 answer cost pc-window 40 rounds at 5.8x the calls where float32 took 18 at
    2.6x, and nothing said why."""
    monkeypatch.syspath_prepend(str(TESTS))
    cfg = api.load_config(None, {"model.kind": "module", "model.target": "byo_nets:float16_out",
                                 "model.prediction": "eps", "model.process": "ddpm",
                                 "model.shape": [1, 8, 8]})
    with pytest.warns(UserWarning, match="answers in torch.float16 for torch.float32 input") as said:
        model = build_model(cfg.model)
        model(torch.randn(2, 1, 8, 8), torch.full((2,), 1.0))
    assert sum("answers in torch.float16" in str(w.message) for w in said) == 1


def _module_score(target: str):
    """The score function of module network ``target`` (a [1, 8, 8] eps network on DDPM)."""
    cfg = api.load_config(None, {"model.kind": "module", "model.target": target,
                                 "model.prediction": "eps", "model.process": "ddpm",
                                 "model.shape": [1, 8, 8]})
    return build_model(cfg.model)


NET = ("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
       "        super().__init__()\n        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)\n\n"
       "    def forward(self, x, t):\n        return 0.1 * self.conv(x)\n")


def test_a_network_a_package_re_exports_is_run_as_edited(tmp_path, monkeypatch):
    """pkg:Net from pkg/net.py: the package's own file is unchanged, and its name kept the
    old class when only pkg/net.py was imported anew."""
    (tmp_path / "renet").mkdir()
    (tmp_path / "renet" / "__init__.py").write_text("from renet.net import Net\n")
    (tmp_path / "renet" / "net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    x, u = torch.randn(2, 1, 8, 8), torch.full((2,), 1.0)
    before = _module_score("renet:Net")(x, u)
    (tmp_path / "renet" / "net.py").write_text(NET.replace("0.1 *", "5.0 *"))
    after = _module_score("renet:Net")(x, u)
    for name in ("renet", "renet.net"):
        monkeypatch.delitem(sys.modules, name)
    assert torch.allclose(after, 50 * before, rtol=1e-5)


def test_a_network_imported_and_edited_before_the_first_sample_is_run_as_edited(tmp_path,
                                                                                monkeypatch):
    """A notebook imports its network, edits the file, then samples for the first time: the
    module it had imported is not the file's code."""
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "firstnet.py").write_text(NET)
    (tmp_path / "firstnet_ref.py").write_text(NET.replace("0.1 *", "5.0 *"))
    importlib.import_module("firstnet")
    (tmp_path / "firstnet.py").write_text(NET.replace("0.1 *", "5.0 *"))
    x, u = torch.randn(2, 1, 8, 8), torch.full((2,), 1.0)
    got, ref = (_module_score(t)(x, u) for t in ("firstnet:Net", "firstnet_ref:Net"))
    for name in ("firstnet", "firstnet_ref"):
        monkeypatch.delitem(sys.modules, name)
    assert torch.allclose(got, ref, rtol=1e-6)


def test_a_plugin_kinds_weights_retrained_in_place_or_edited_builder_make_another_model(
        tmp_path, monkeypatch, capsys):
    """A plugin kind's identity was its [model] keys alone: weights rewritten in place kept
    the store's and the calibration's model hash, so a resumed store mixed two networks. Its
    package, builder code and the files its keys name are recorded now, and checked where a
    store records them (one made before resumes as it did)."""
    import shutil

    import zarr

    from pipeline.calibrate import calibration_key
    from pipeline.config import load_config

    _install_kind(tmp_path, monkeypatch, "mynets", "steepgrf = mynets_code:build_plugin")
    shutil.copy(TESTS / "byo_nets.py", tmp_path / "mynets_code.py")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"first")
    out = tmp_path / "p.zarr"
    sets = ["model.kind=steepgrf", "model.steepness=4.0", f"model.files={{weights = '{weights}'}}",
            "model.shape=[8, 8]", "sampler.method=sequential-sde", "sampler.steps=5",
            "ensemble.members=2", f"output.path={out}"]
    run = lambda *more: main(["sample", "jobs/configs/grf.toml",  # noqa: E731
                              *sum((["--set", x] for x in sets + list(more)), [])])
    key = lambda: calibration_key(load_config("jobs/configs/grf.toml", sets),  # noqa: E731
                                  "m", "cpu")
    assert run() == 0
    first = key()
    assert run("ensemble.members=3") == 0 and key() == first  # the same files: grown
    weights.write_bytes(b"again")
    capsys.readouterr()
    assert run("ensemble.members=4") == 2 and key() != first
    assert "with another model of kind 'steepgrf'" in capsys.readouterr().err
    weights.write_bytes(b"first")
    with open(tmp_path / "mynets_code.py", "a") as f:
        f.write("\n# edited\n")
    assert run("ensemble.members=4") == 2
    group = zarr.open_group(out, mode="r+")  # a store made before the plugin was recorded
    group.attrs.pop("model_plugin_sha256")
    assert run("ensemble.members=4") == 0

def test_a_store_or_evaluation_written_into_the_models_folder_keeps_its_digest(tmp_path):
    """Every .json under a diffusers folder was hashed: a store written inside it (its
    zarr.json files) changed the model's digest at its first run, and was never resumed."""
    from models.pretrained import pretrained_digest

    folder = tmp_path / "net"
    small_unet().save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(folder)
    settings = {"model.kind": "diffusers", "model.path": str(folder), "model.shape": [16, 16],
                "sampler.grid": "scheduler", "sampler.steps": 20,
                "sampler.method": "sequential-sde", "ensemble.members": 2,
                "output.path": str(folder / "ens.zarr")}
    cfg = api.load_config(None, settings)
    before = pretrained_digest(cfg.model)
    api.sample(cfg)
    (folder / "ens_eval").mkdir()
    (folder / "ens_eval" / ".piadm-evaluate").write_text("")
    (folder / "ens_eval" / "metrics.json").write_text("{}")
    assert pretrained_digest(cfg.model) == before
    grown = api.sample(api.load_config(None, {**settings, "ensemble.members": 4}))
    assert (grown.members, grown.skipped) == (2, 2)  # grown, not refused: "other model files"
    (folder / "notes").mkdir()
    (folder / "notes" / "weights.json").write_text("{}")  # a file of the network's folder
    assert pretrained_digest(cfg.model) != before


def test_a_network_that_fails_mid_run_is_one_line_naming_its_line(tmp_path, capsys):
    """Past the 2-item probe, a network's failure was a 73-line traceback, exit 1, in sample
    and in bench alike."""
    out = tmp_path / "x.zarr"
    sets = ["model.kind=module", "model.target=byo_nets:late_failure", "model.prediction=eps",
            "model.process=ddpm", "model.shape=[1, 16, 16]", "sampler.method=sequential-sde",
            "sampler.steps=10", "ensemble.members=4", "ensemble.batch_size=4",
            f"output.path={out}"]
    rc = main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err
    line = _line("_LateFailure") - 1  # the raise, above its last line
    raised = (f"(RuntimeError: boom at batch 4, at {TESTS / 'byo_nets.py'}:{line} in forward): "
              "fix the code at that line")
    assert rc == 2 and _one_error(err, f"the network failed in a call of 4 member(s) {raised}")
    bench = [*sets, "bench.members=4", "bench.methods=['sequential-sde']"]
    assert main(["bench", "jobs/configs/grf.toml", *sum((["--set", s] for s in bench), [])]) == 2
    assert _one_error(capsys.readouterr().err, f"bench: the model's code failed {raised}")


@pytest.mark.parametrize("settings, said", [
    ({}, "clip_sample = true (x0 clipped to +-1.0)"),  # DDPMScheduler's default
    ({"clip_sample": False, "variance_type": "fixed_large"}, "variance_type = 'fixed_large'"),
    ({"clip_sample": False}, None)])
def test_scheduler_settings_piadm_does_not_apply_are_warned_of(tmp_path, settings, said):
    """A DDPM loop with fixed_large variance lies 7.6e-4 from piadm's sequential-sde, and the
    scheduler's default clipping was dropped unsaid."""
    import warnings

    folder = tmp_path / "net"
    small_unet().save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000, **settings).save_pretrained(folder)
    cfg = api.load_config(None, {"model.kind": "diffusers", "model.path": str(folder),
                                 "model.shape": [16, 16]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(cfg.model)
    texts = [str(w.message) for w in caught if "not applied" in str(w.message)]
    assert (texts == []) if said is None else (len(texts) == 1 and said in texts[0]), texts


def test_a_scheduler_whose_timesteps_repeat_is_told_to_take_piadms_grid(tmp_path, capsys):
    """Heun's timesteps repeat at every sampler.steps: it was told to take other steps."""
    folder = tmp_path / "heun"
    small_unet().save_pretrained(folder)
    diffusers.HeunDiscreteScheduler(num_train_timesteps=1000).save_pretrained(folder)
    sets = ["model.kind=diffusers", f"model.path={folder}", "model.shape=[16, 16]",
            "sampler.grid=scheduler", "sampler.steps=20", "sampler.method=sequential-sde",
            f"output.path={tmp_path / 'o.zarr'}"]
    assert main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]) == 2
    assert _one_error(capsys.readouterr().err, "the scheduler's timesteps repeat (a second-order "
                      "scheduler, such as Heun, KDPM2 or PNDM's PRK steps, calls twice at one): "
                      "take one of piadm's own grids")


def test_a_folder_of_bin_weights_loads_without_diffusers_error_line(tmp_path, capsys):
    """diffusers logged "An error occurred while trying to fetch ..." at error level for a
    folder of .bin weights, which then loaded; a folder without weights says how to mend it."""
    import os
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "bin"
    small_unet().save_pretrained(folder, safe_serialization=False)
    diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(folder)
    sets = sum((["--set", s] for s in ["model.kind=diffusers", "model.shape=[16, 16]",
                                       "sampler.method=sequential-sde", "sampler.steps=10",
                                       "ensemble.members=2"]), [])
    root = Path(__file__).resolve().parents[1]
    # its own process: pytest takes the log records that diffusers' handler would print
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "sample", "jobs/configs/grf.toml",
                           *sets, "--set", f"model.path={folder}", "--set",
                           f"output.path={tmp_path / 'a.zarr'}"], cwd=root, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stderr
    (tmp_path / "none").mkdir()
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(folder / name, tmp_path / "none" / name)
    assert main(["sample", "jobs/configs/grf.toml", *sets, "--set",
                 f"model.path={tmp_path / 'none'}", "--set",
                 f"output.path={tmp_path / 'b.zarr'}"]) == 2
    assert _one_error(capsys.readouterr().err, "does not load (OSError: Error no file named "
                      "diffusion_pytorch_model.bin found")
