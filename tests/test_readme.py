"""The README and its docs stay true to the code: the configuration reference
(docs/configuration.md) names every key, the README's first two lines of commands are the ones
CI and the demo run, and every command of its "Commands" section and the Python API example
(docs/api.md) runs as written."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import SECTION_TYPES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
API = (ROOT / "docs" / "api.md").read_text()


def test_configuration_reference_names_every_key():
    section = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f"{name}.{k.name}" for name, kind in SECTION_TYPES.items()
               for k in dataclasses.fields(kind) if f"`{name}.{k.name}`" not in section]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_readme_opens_with_the_demo_and_the_test_command():
    first = README[README.index("```bash") + 8:].splitlines()[:2]
    assert first[0].startswith("bash jobs/local/demo.sh") and first[1].startswith(
        "bash jobs/local/test.sh")
    assert "bash jobs/local/test.sh" in (ROOT / ".ci" / "run").read_text()


def _blocks(section: str, lang: str, text: str = README) -> list[str]:
    text = text[text.index(f"## {section}\n"):]
    text = text[: text.index("\n## ", 1)]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_command_and_the_python_api_run_as_written(tmp_path):
    """The "Commands" block line by line, then the "Python API" example, in a fresh working
    folder of the repository's jobs and models, with the small settings the README gives in
    PIADM_SET: each exits 0 and leaves what the next reads."""
    small, commands = _blocks("Commands", "bash")
    (example,) = _blocks("Python API", "python", API)
    assert small.lstrip().startswith("export PIADM_SET=")
    for name in ("jobs", "models"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = str(Path(sys.executable).parent)  # the README's .venv: piadm, mpiexec, python
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PIADM_CACHE=str(tmp_path / "cache"))
    env.pop("PIADM_SET", None)
    lines = [line for line in commands.splitlines() if line.strip()]
    assert len(lines) >= 12
    for line in lines:
        run = subprocess.run(["bash", "-c", f"set -e\n{small}\n{line}"], cwd=tmp_path, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    out = tmp_path / "out"
    scores = json.loads((out / "kolmogorov_down_ensemble_eval" / "metrics.json").read_text())
    # the downscaler is judged on the scales it adds: input Nyquist (16 / 2) to the data's cut
    assert scores["headline_band"] == "added" and scores["band_added_k"] == "9..21"
    assert (out / "bench.png").is_file() and (out / "b2.json").is_file()
    run = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "8 members," in run.stdout and "mean member standard deviation" in run.stdout
    assert (out / "api_grf.zarr").is_dir()
