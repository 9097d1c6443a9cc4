"""The Python API: the README's example runs as written, dict configs validate like files,
and the API's run equals the CLI's."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import api
from pipeline.cli import main
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tmp_path):
    code = _readme_example().replace('"out/', f'"{tmp_path}/')
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                           "PIADM_MPI": "0"})
    assert run.returncode == 0, run.stderr
    assert "8 members," in run.stdout and "ensemble spread" in run.stdout
    assert (tmp_path / "api_grf.zarr").is_dir()


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
