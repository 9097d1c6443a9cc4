"""Autoguidance (models/guidance.py): the guided score, its checks and its identity."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.learned import load_unet
from models.unet import Denoiser, UNetConfig
from pipeline.api import load_config
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.run import model_digest

SHAPE = (8, 8)
ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(path, seed, channels=(4, 8), **meta):
    torch.manual_seed(seed)
    den = Denoiser(UNetConfig(channels=channels, embed=8))
    info = {"unet": den.cfg.to_dict(), "mean": 0.5, "std": 2.0, "variable": "vorticity",
            "condition": "", "residual": False, "shape": list(SHAPE), "data_bound": 10.0}
    info.update(meta)
    save_checkpoint(path, {"ema": den.state_dict()}, info)
    return str(path)


def test_the_guided_score_extrapolates_from_the_guide_through_the_checkpoint(tmp_path):
    strong = _checkpoint(tmp_path / "strong.pt", 0, channels=(8, 16))
    weak = _checkpoint(tmp_path / "weak.pt", 1)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    u = torch.tensor([0.05, 1.0, 6.0])
    s_strong = load_unet(strong, SHAPE)(x, u)
    s_weak = load_unet(weak, SHAPE)(x, u)
    guided = load_unet(strong, SHAPE, guide=weak, guidance=2.5)
    # the score is affine in the denoiser, so the denoisers' combination is the scores'
    torch.testing.assert_close(guided(x, u), s_weak + 2.5 * (s_strong - s_weak),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(guided(x, u), s_strong, atol=1e-3)
    torch.testing.assert_close(load_unet(strong, SHAPE, guide=weak, guidance=1.0)(x, u), s_strong)
    assert guided.data_std == 2.0 and guided.cond_channels == 0


@pytest.mark.parametrize("change, named", [
    ({"std": 2.1}, "normalisation: mean 0.5 std 2.1 against 0.5 2"),
    ({"mean": 0.7}, "normalisation: mean 0.7"), ({"variable": "u"}, "variable: 'u' against"),
    ({"residual": True}, "residual: True against False"), ({"shape": [16, 16]}, "shape:"),
    ({"condition": "coarse_u"}, "condition: 'coarse_u' against ''")])
def test_a_guide_of_other_units_or_another_task_is_refused_naming_what_differs(tmp_path, change,
                                                                                named):
    strong = _checkpoint(tmp_path / "strong.pt", 0)
    weak = _checkpoint(tmp_path / "weak.pt", 1, **change)
    with pytest.raises(ConfigError, match="model.guide = .* was not trained on the same data") as err:
        load_unet(strong, SHAPE, guide=weak, guidance=2.0)
    assert named in str(err.value)


def test_a_checkpoint_and_model_condition_that_disagree_are_refused_at_loading(tmp_path):
    # it showed only at the first model call, after the store was made
    plain = _checkpoint(tmp_path / "plain.pt", 0)
    torch.manual_seed(0)
    den = Denoiser(UNetConfig(channels=(4, 8), embed=8, cond_channels=1))
    save_checkpoint(tmp_path / "down.pt", {"ema": den.state_dict()},
                    {"unet": den.cfg.to_dict(), "mean": 0.5, "std": 2.0, "variable": "vorticity",
                     "condition": "vorticity_coarse", "residual": False, "shape": list(SHAPE)})
    with pytest.raises(ConfigError, match="model.condition = 'none' but .* was trained on coarse"):
        load_unet(str(tmp_path / "down.pt"), SHAPE, condition="none")
    with pytest.raises(ConfigError, match="model.condition = 'coarse' but .* without"):
        load_unet(plain, SHAPE, condition="coarse")
    assert load_unet(str(tmp_path / "down.pt"), SHAPE, condition="coarse").cond_channels == 1
    assert load_unet(str(tmp_path / "down.pt"), SHAPE).cond_channels == 1  # the API binds later


def test_a_guide_trained_on_another_coarse_grid_is_refused_and_one_that_does_not_say_is_not(
        tmp_path):
    strong = _checkpoint(tmp_path / "strong.pt", 0, cond_shape=[2, 2])
    weak = _checkpoint(tmp_path / "weak.pt", 1, cond_shape=[4, 4])
    with pytest.raises(ConfigError, match="model.guide = .* was not trained on the same data"):
        load_unet(strong, SHAPE, guide=weak, guidance=2.0)
    older = _checkpoint(tmp_path / "older.pt", 1)  # trained before cond_shape was recorded
    assert load_unet(strong, SHAPE, guide=older, guidance=2.0).cond_shape == (2, 2)


@pytest.mark.parametrize("sets, needle", [
    ({"model.guide": "", "model.guidance": 2.0}, "model.guidance = 2.0 needs a weaker checkpoint"),
    ({"model.guide": "x.pt", "model.guidance": 1.0}, "is unused at model.guidance = 1"),
    ({"model.guide": "x.pt", "model.guidance": 0.5}, "model.guidance = 0.5 must be a number in [1, 20]"),
    ({"model.guide": "x.pt", "model.guidance": float("nan")}, "must be a number in [1, 20]"),
])
def test_guidance_settings_are_checked(sets, needle):
    with pytest.raises(ConfigError) as err:
        load_config("jobs/configs/kolmogorov_uncond.toml", sets)
    assert needle in str(err.value)


def test_a_guide_with_the_checkpoints_own_weights_is_refused(tmp_path):
    """The checkpoint as its own guide (or a copy of it) gives D + g (D - D) = D: the same
    members at twice the calls, and a store and calibration of their own."""
    import shutil

    strong = _checkpoint(tmp_path / "strong.pt", 0)
    shutil.copy(strong, tmp_path / "copy.pt")
    shutil.copy(f"{strong}.json", tmp_path / "copy.pt.json")
    for guide in (strong, str(tmp_path / "copy.pt")):
        with pytest.raises(ConfigError, match="holds the same weights as .*: guidance by itself "
                                              "changes nothing"):
            load_unet(strong, SHAPE, guide=guide, guidance=2.0)
    load_unet(strong, SHAPE, guide=_checkpoint(tmp_path / "weak.pt", 1), guidance=2.0)


def test_a_guide_needs_a_unet():
    with pytest.raises(ConfigError, match="model.guide = 'x.pt' guides a piadm U-Net"):
        load_config("jobs/configs/grf.toml", {"model.guide": "x.pt", "model.guidance": 2.0})


def test_a_missing_guide_is_one_line_before_anything_is_written(tmp_path, capsys):
    args = ["sample", "jobs/configs/kolmogorov_uncond.toml", "--set",
            f"model.guide={json.dumps(str(tmp_path / 'none.pt'))}", "--set", "model.guidance=2",
            "--set", f"output.path={json.dumps(str(tmp_path / 'out.zarr'))}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "model.guide = " in errors[0] and "is not a file" in errors[0]
    assert not (tmp_path / "out.zarr").exists()


def test_a_shipped_pair_not_found_from_here_is_said_at_once_naming_both(tmp_path, capsys,
                                                                        monkeypatch):
    """Outside the repository (an installed copy) the unconditional config's checkpoint
    and guide were refused one per run: the second only after the first was fixed. The
    config named there is not found either, and says where it comes from."""
    config = str(ROOT / "jobs/configs/kolmogorov_uncond.toml")
    monkeypatch.chdir(tmp_path)
    assert main(["sample", config, "--set", "output.path='out.zarr'"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "model.checkpoint = 'models/checkpoints/kolmogorov_uncond.pt'" \
        " is not a file" in errors[0] and "; and model.guide = 'models/checkpoints/" \
        "kolmogorov_uncond_guide.pt' is not a file" in errors[0]
    assert not (tmp_path / "out.zarr").exists()
    assert main(["config", "jobs/configs/kolmogorov_uncond.toml"]) == 2
    assert "jobs/configs/ comes with piadm's repository" in capsys.readouterr().err


def test_the_model_identity_covers_the_guide_and_its_weight(tmp_path):
    strong = _checkpoint(tmp_path / "strong.pt", 0)
    weak = _checkpoint(tmp_path / "weak.pt", 1)
    other = _checkpoint(tmp_path / "other.pt", 3)
    cfg = load_config("jobs/configs/kolmogorov_uncond.toml", {
        "model.checkpoint": strong, "model.shape": list(SHAPE), "model.guide": weak,
        "model.guidance": 2.0})
    digests = {model_digest(cfg),
               model_digest(dataclasses.replace(cfg, model=dataclasses.replace(
                   cfg.model, guidance=3.0))),
               model_digest(dataclasses.replace(cfg, model=dataclasses.replace(
                   cfg.model, guide=other))),
               model_digest(dataclasses.replace(cfg, model=dataclasses.replace(
                   cfg.model, guide="", guidance=1.0)))}
    assert len(digests) == 4


def test_the_shipped_unconditional_model_is_autoguided_in_its_own_units():
    from models import build_model
    from models.guidance import Guided

    cfg = load_config("jobs/configs/kolmogorov_uncond.toml")
    assert cfg.model.guide and cfg.model.guidance > 1
    model = build_model(cfg.model)  # refuses a guide in other units
    assert isinstance(model.den, Guided) and model.den.guidance == cfg.model.guidance
    assert model.den.strong.cfg.channels != model.den.weak.cfg.channels


def test_the_same_networks_found_elsewhere_resume_their_store_and_others_are_refused(
        tmp_path, capsys):
    """A store's checkpoint paths were compared as text: with the shipped networks in a
    virtual environment made anew (another site-packages path), the store was 'a different
    configuration', and only output.overwrite (losing its members) went on. Files of the same
    bytes are the store's model wherever they are, an "auto" run's too (its plan is applied
    over the config); other bytes at the new path are not; and a store replaced names the
    files where they are now."""
    import shutil

    import zarr

    first, second = tmp_path / "env1", tmp_path / "env2"
    first.mkdir()
    strong = _checkpoint(first / "strong.pt", 0)
    _checkpoint(first / "weak.pt", 1)
    out = tmp_path / "ens.zarr"

    def run(folder, members, **more):
        sets = {"model.checkpoint": f"{folder}/strong.pt", "model.guide": f"{folder}/weak.pt",
                "model.shape": list(SHAPE), "sampler.method": "auto", "sampler.steps": 4,
                "ensemble.members": members, "ensemble.batch_size": 1,
                "output.path": str(out), **more}
        args = ["sample", "jobs/configs/kolmogorov_uncond.toml"]
        for key, value in sets.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        return main(args)

    def config():
        return zarr.open_group(out, mode="r").attrs["config"]

    assert run(first, 2) == 0
    shutil.copytree(first, second)
    shutil.rmtree(first)  # the old environment is gone
    capsys.readouterr()
    assert run(second, 3) == 0, capsys.readouterr().err  # grown, not refused
    assert (zarr.open_group(out, mode="r")["done"][:] == 1).all()
    assert f'checkpoint = "{strong}"' in config()
    assert run(second, 3) == 0  # and resumed again after the growth wrote its config
    assert "0 members written" in capsys.readouterr().err
    _checkpoint(second / "weak.pt", 2)  # another guide at that path
    assert run(second, 3) == 2
    assert "different configuration" in capsys.readouterr().err
    assert (zarr.open_group(out, mode="r")["done"][:] == 1).all()
    _checkpoint(second / "weak.pt", 1)  # the store's guide again, and another seed: replaced
    assert run(second, 3, **{"sampler.seed": 5, "output.overwrite": True}) == 0
    assert f'checkpoint = "{second}/strong.pt"' in config()
    capsys.readouterr()
    assert run(second, 3, **{"sampler.seed": 5}) == 0  # its plan found under its key
    err = capsys.readouterr().err
    assert "0 members written" in err and "not recorded" not in err
