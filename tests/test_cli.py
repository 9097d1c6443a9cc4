"""The ``piadm`` command's surface: every subcommand's --help shows an example, --version,
and the config-file error paths are one-line errors that name the fix."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import __version__
from pipeline.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"example: piadm {command}" in out.replace(
        "mpiexec -n 2 piadm", "piadm")


def test_version_and_the_installed_entry_point():
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"piadm {__version__}"


@pytest.mark.parametrize("args, needle", [
    (["sample", "nope.toml"], "config file nope.toml not found"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.steps"], "use the form section.key=value"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.steps=1.5"], "sampler.steps must be int"),
    (["train", "jobs/configs/kolmogorov.toml", "--set", "train.data=none.zarr"], "none.zarr"),
    (["status", "not-a-store"], "not-a-store"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.noise=gpu"],
     "sampler.noise = 'gpu': use host"),
])
def test_file_and_override_errors_are_one_line(args, needle, capsys, tmp_path):
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and needle in errors[0] and errors[0].startswith("piadm: error:")


def test_invalid_toml_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampler\nsteps = 3\n")
    assert main(["sample", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
