"""A store's recorded config read by this piadm (``pipeline.stored``)."""
import re

import pytest

from pipeline.config import load_config
from pipeline.stored import stored_settings


def _without(text: str, *keys: str) -> str:
    for key in keys:
        text = re.sub(rf"(?m)^{key} = .*\n", "", text)
    return text


@pytest.mark.parametrize("attrs, theta, tf32, untold", [
    ({"sampler_method": "pc-window", "created": "2026-12-02T00:00:00Z", "model_kind": "grf"},
     "one", False, []),  # before pc-window's revision 2: the whole step lagged
    ({"sampler_method": "pc-window", "created": "2026-12-03T05:00:00Z", "model_kind": "grf"},
     "j_max", False, []),  # revision 2 in the hour before the key: J_max
    ({"sampler_method": "window", "model_kind": "unet", "torch_version": "2.5.1+cpu"},
     "j_max", False, []),  # a CPU build: no GPU, no TF32
    ({"sampler_method": "window", "model_kind": "unet", "torch_version": "2.5.1+cu124"},
     "j_max", False, ["model.tf32"]),  # a build with CUDA, no device recorded: untold
    ({"sampler_method": "window", "model_kind": "unet", "torch_version": "2.5.1"},
     "j_max", False, ["model.tf32"]),
])
def test_keys_an_older_config_lacks_are_read_as_its_piadm_ran(attrs, theta, tf32, untold):
    text = _without(load_config("jobs/configs/grf.toml").text, "theta", "tf32")
    read = stored_settings(text, attrs)
    assert read.lacked == ["model.tf32", "sampler.theta"]
    assert (read.config.sampler.theta, read.config.model.tf32, read.untold) == (theta, tf32,
                                                                              untold)


def test_a_config_of_this_version_lacks_nothing_and_a_broken_one_reads_as_none():
    assert stored_settings(load_config("jobs/configs/grf.toml").text).lacked == []
    assert stored_settings("[sampler]\nsteps = -1\n") is None
    assert stored_settings("not toml [") is None


def _untold_store(out):
    """At ``out``, a network's store as a CUDA build of an older torch left it before
    model.tf32 (which it then ran as cannot be told), of grf.toml's other settings."""
    import json

    import zarr

    from pipeline.settings import _settings_digest

    cfg = load_config("jobs/configs/grf.toml", [f"output.path={json.dumps(str(out))}"])
    settings = cfg.store_settings()
    settings["model"].pop("tf32")
    zarr.open_group(out, mode="w").attrs.update(
        config=_without(cfg.text, "tf32"), model_kind="unet", torch_version="2.5.1",
        piadm_store_digest=_settings_digest(settings))
    return cfg


def test_a_network_store_whose_tf32_cannot_be_told_is_refused_saying_so(tmp_path):
    """Its refusal read 'it differs in it was made by an older piadm ...: rerun its own
    config', which could not resume it."""
    from pipeline.identity import target_fate
    from pipeline.store import StoreExists

    cfg = _untold_store(tmp_path / "s.zarr")
    with pytest.raises(StoreExists, match=(
            r"was made by an older piadm, before model.tf32 existed, and records nothing that "
            r"tells how it ran without it .*: piadm cannot tell whether it is this "
            r"configuration's; read it as it is")):
        target_fate(cfg, None, overwrite=False)


def test_an_untold_store_that_differs_in_what_can_be_told_is_refused_as_another_config(
        tmp_path):
    """The untold refusal came before the settings were compared, hiding that the store's
    sampler.steps differed."""
    import dataclasses

    from pipeline.identity import target_fate
    from pipeline.store import StoreExists

    cfg = _untold_store(tmp_path / "s.zarr")
    other = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, steps=77))
    with pytest.raises(StoreExists, match="was made by a different configuration") as refused:
        target_fate(other, None, overwrite=False)
    assert "cannot tell" not in str(refused.value)


@pytest.mark.parametrize("key, value", [("model_sha256", 5), ("piadm_store_digest", 7),
                                        ("piadm_member_batch", "x"), ("config", ["a"])])
def test_a_piadm_attribute_edited_to_another_type_is_one_line(tmp_path, capsys, key, value):
    """A store whose own attribute was edited to what piadm never writes there failed every
    run in a traceback ('int' object is not subscriptable, invalid literal for int()); it is
    refused in one line, and output.overwrite replaces it."""
    import zarr

    from pipeline.cli import main

    out = tmp_path / "e.zarr"
    sets = sum((["--set", s] for s in ["model.shape=[8, 8]", "sampler.steps=20",
                                       "sampler.tol=0.1", "ensemble.members=2",
                                       f"output.path={out}"]), [])
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    group = zarr.open_group(out, mode="r+")
    group.attrs[key] = value
    zarr.consolidate_metadata(str(out))
    capsys.readouterr()
    if key == "piadm_store_digest":  # the store's mark: said, and never replaced
        for more in ([], ["--set", "output.overwrite=true"]):
            assert main(["sample", "jobs/configs/grf.toml", *sets, *more]) == 2
            err = capsys.readouterr().err
            assert f"its attribute {key} holds {value!r}" in err and "overwrite" not in err
        return
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 2
    assert f"its attribute {key} holds {value!r}, not the " in capsys.readouterr().err
    assert main(["status", str(out)]) == 0  # read as not said: its count is still told
    assert main(["sample", "jobs/configs/grf.toml", *sets, "--set", "output.overwrite=true"]) == 0
    assert "replaced" in capsys.readouterr().err


def test_a_store_another_config_made_while_this_run_started_names_the_difference(
        tmp_path, capsys, monkeypatch):
    """Two jobs of other seeds started together on one path: the one that found the store
    made meanwhile was refused naming only two digests, where a later start names the key."""
    from pipeline import run_start
    from pipeline.cli import main

    out = tmp_path / "m.zarr"
    sets = lambda seed: sum((["--set", s] for s in [  # noqa: E731
        "model.shape=[8, 8]", "sampler.steps=20", "sampler.tol=0.1", "ensemble.members=2",
        f"sampler.seed={seed}", f"output.path={out}"]), [])
    assert main(["sample", "jobs/configs/grf.toml", *sets(0)]) == 0
    monkeypatch.setattr(run_start, "check_output", lambda *a: "create")  # none, it saw then
    capsys.readouterr()
    assert main(["sample", "jobs/configs/grf.toml", *sets(1)]) == 2
    assert "; it differs in sampler.seed: 0 -> 1)" in capsys.readouterr().err


def test_an_older_stores_float32_statistics_of_the_same_input_are_not_a_change():
    """A piadm before 2026-12-04 recorded float32 reductions (a pressure's mean of 101325 Pa
    rounds to 1e-2 there, a hundredth of its std of 100): the same input must not read as
    changed; a field regenerated with a std 3% off must."""
    from types import SimpleNamespace

    import dask.array as da
    import numpy as np

    from pipeline.store_match import StaleStore, _check_same_statistics

    rng = np.random.default_rng(0)
    fields = (101325 + 100 * rng.standard_normal((40, 32, 32))).astype("float32")
    lazy = da.from_array(fields, chunks=(1, 32, 32))
    wide = fields.astype("float64")
    worst = float(np.spacing(np.float32(wide.mean()))) / 2  # its float32 rounding at worst
    held = {"input_mean": float(wide.mean()) + worst, "input_std": float(lazy.std().compute())}
    cfg = SimpleNamespace(output=SimpleNamespace(path="s.zarr"),
                          input=SimpleNamespace(path="in.zarr", variable="p"))
    _check_same_statistics(cfg, held, float(wide.mean()), float(wide.std()))
    with pytest.raises(StaleStore, match="they have changed since"):
        _check_same_statistics(cfg, held, float(wide.mean()), 1.03 * float(wide.std()))
    # an anomaly of std 1 about that mean: its std 10% off was within the mean's allowance
    with pytest.raises(StaleStore, match="they have changed since"):
        _check_same_statistics(cfg, {**held, "input_std": 1.0}, float(wide.mean()), 1.1)
