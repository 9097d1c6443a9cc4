"""The README stays true to the code: its configuration reference names every key, and its
first two lines of commands are the ones CI and the demo run."""
import dataclasses
from pathlib import Path

from pipeline.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_configuration_reference_names_every_key():
    section = README[README.index("## Configuration reference"):]
    section = section[: section.index("\n## ", 1)]
    missing = [f"{s.name}.{k.name}" for s in dataclasses.fields(Config) if s.name != "text"
               for k in dataclasses.fields(s.default_factory())
               if f"`{s.name}.{k.name}`" not in section]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_readme_opens_with_the_demo_and_the_test_command():
    first = README[README.index("```bash") + 8:].splitlines()[:2]
    assert first[0].startswith("bash jobs/local/demo.sh") and first[1].startswith(
        "bash jobs/local/test.sh")
    assert "bash jobs/local/test.sh" in (ROOT / ".ci" / "run").read_text()
