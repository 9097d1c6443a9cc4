"""The Python API: dict configs validate like files, and the API's run equals the CLI's (the
README's example runs in tests/test_readme.py)."""

import numpy as np
import pytest

from pipeline import api
from pipeline.cli import main
from pipeline.config import ConfigError


def test_dict_config_and_overrides_validate_like_the_cli():
    cfg = api.load_config({"model": {"shape": [16, 16]}}, {"sampler.steps": 40})
    assert cfg.model.shape == (16, 16) and cfg.sampler.steps == 40
    with pytest.raises(ConfigError, match="sampler.stpes"):
        api.load_config(None, {"sampler.stpes": 40})
    with pytest.raises(ConfigError, match="must be int"):
        api.load_config({"sampler": {"steps": "many"}})
    with pytest.raises(ConfigError, match="section.key"):
        api.load_config(None, {"steps": 40})


def test_api_run_equals_the_cli_run(tmp_path):
    sets = {"model.shape": [16, 16], "sampler.steps": 40, "sampler.block_size": 20,
            "ensemble.members": 4, "ensemble.batch_size": 2}
    cfg = api.load_config("jobs/configs/grf.toml", sets | {"output.path": str(tmp_path / "a.zarr")})
    summary = api.sample(cfg)
    assert summary.members == 4 and not summary.preempted
    cli = sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])
    assert main(["sample", "jobs/configs/grf.toml", *cli,
                 "--set", f"output.path={tmp_path / 'b.zarr'}"]) == 0
    a, b = api.open_ensemble(summary.path), api.open_ensemble(tmp_path / "b.zarr")
    np.testing.assert_array_equal(a.field.values, b.field.values)
