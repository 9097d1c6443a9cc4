"""The repository stands alone: the documents it names are its own, no path in it climbs out
of it, its imports keep their layers, and its set-up script leaves a shell that sources it as
it was."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked(*paths: str) -> list[str]:
    """The files git tracks (under ``paths``); the test skips outside a git work tree (an
    unpacked source distribution), where nothing tells them from what a run left."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT,
                             capture_output=True, text=True)
        listed = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True,
                                text=True)
    except OSError:  # no git installed
        pytest.skip("git cannot be run here: the tracked files cannot be listed")
    # inside another repository's work tree (an unpacked copy in a checkout) nothing is ours
    if listed.returncode != 0 or Path(top.stdout.strip() or "/nowhere").resolve() != ROOT:
        pytest.skip("not the repository's own git work tree: its tracked files cannot be listed")
    return listed.stdout.split()


def _tracked_text():
    for name in _tracked():
        path = ROOT / name
        if path.suffix in (".pt", ".png") or not path.is_file():
            continue
        yield name, path.read_text(errors="ignore")


def test_every_named_document_is_in_the_repository():
    own = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = [f"{name}: {doc}" for name, text in _tracked_text()
               for doc in set(re.findall(r"\b[A-Za-z_][\w-]*\.md\b", text)) if doc not in own]
    assert missing == []


def test_no_path_climbs_out_of_the_repository():
    climbing = [f"{name}: {m}" for name, text in _tracked_text()
                for m in set(re.findall(r"\.\./[\w./-]+", text))
                if not (ROOT / Path(name).parent / m).resolve().is_relative_to(ROOT)]
    assert climbing == []


def _imports() -> dict:
    """{module: the piadm modules it imports anywhere in its file} for pipeline/ and models/."""
    import ast

    mods = {}
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("models/**/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    "pipeline", "models"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "models")}
        mods[name] = deps
    return {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}


def test_the_import_graph_has_no_cycle():
    graph, state = _imports(), {}

    def visit(module, path):
        state[module] = "open"
        for dep in graph[module]:
            assert state.get(dep) != "open", " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_readmes_code_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Code layout"):]
    layout = layout[: layout.index("\n## ", 3)] if "\n## " in layout[3:] else layout
    missing = [str(p.relative_to(ROOT)) for p in sorted(
                   [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("models/**/*.py")])
               if p.name not in ("__init__.py", "__main__.py") and p.name not in layout]
    assert not missing, f"README.md's Code layout does not name {missing}"


def test_models_import_only_leaf_modules_of_the_pipeline():
    graph = _imports()
    leaves = {"pipeline.clock", "pipeline.errors", "pipeline.choices", "pipeline.processes",
              "pipeline.fourier"}
    for module, deps in graph.items():
        if module.startswith("models"):
            assert {d for d in deps if d.startswith("pipeline")} <= leaves, module
    for leaf in leaves:  # a leaf imports nothing of piadm's but other leaves
        assert graph[leaf] <= leaves, leaf
    # and the README's code layout names them all, and no other
    text = (ROOT / "README.md").read_text()
    said = text[text.index("It imports nothing from `pipeline/`"):].split("\n- ")[0]
    named = {f"pipeline.{m}" for m in re.findall(r"`(\w+)\.py`", said)}
    assert named == leaves, f"README's models/ entry names the leaves {sorted(named)}"


def test_samplers_import_only_maths_modules():
    """A sampler takes its communicator, model and noise as arguments: of the pipeline it
    imports the maths (grids, steps, noise, decompositions) and the other samplers, no
    plumbing (the communicator's classes, stores, configs)."""
    maths = {"pipeline.clock", "pipeline.decomposition", "pipeline.errors", "pipeline.fourier",
             "pipeline.grids", "pipeline.integrators", "pipeline.noise"}
    for module, deps in _imports().items():
        if module.startswith("pipeline.samplers"):
            outside = {d for d in deps if not d.startswith("pipeline.samplers")
                       and d.rsplit(".", 1)[0] not in maths}
            assert outside <= maths, (module, outside - maths)


def test_warning_filters_are_changed_only_through_pipeline_warned():
    """``warnings.catch_warnings`` puts back the filters it found: two threads inside at once
    put back each other's (the API called from two threads). piadm's blocks share
    ``warned.catching``'s lock; one outside it (the input's moments) was not."""
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "models").rglob("*.py")):
        if path.name != "warned.py":
            assert "catch_warnings(" not in path.read_text(), path.relative_to(ROOT)


def test_each_sampler_setting_has_one_default():
    """The settings the config shares with the samplers' Options take Options' defaults by
    reference: the default is written once."""
    import ast
    import dataclasses

    from pipeline.settings import SamplerConfig
    from pipeline.samplers import Options

    options = {f.name for f in dataclasses.fields(Options)}
    tree = ast.parse((ROOT / "pipeline" / "settings.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SamplerConfig"]
    shared = {n.target.id: n.value for n in cls.body
              if isinstance(n, ast.AnnAssign) and n.target.id in options and n.target.id != "tol"}
    assert len(shared) >= 9
    for name, value in shared.items():
        assert ast.unparse(value) == f"Options.{name}", name
    config = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
    assert all(config[name] == getattr(Options, name) for name in shared)


def test_sourcing_the_setup_leaves_the_shell_as_it_was_even_when_it_fails():
    # a sourced `set -euo pipefail` would end an interactive shell at its next failing command
    script = ('echo "before $-"; PIADM_VENV=/dev/null/venv source jobs/local/setup.sh; '
              'echo "rc $? after $-"; false; echo "still here"')
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    lines = proc.stdout.splitlines()
    before, after = lines[0].split()[1], lines[1].split()[3]
    assert lines[1].startswith("rc 1 ") and before == after and "e" not in after
    assert lines[2] == "still here" and "setting up /dev/null/venv failed" in proc.stderr


def test_the_local_scripts_refuse_a_count_that_is_not_a_positive_number():
    # mpiexec -n abc (or 0) quietly ran one rank; a shard count of x died on an unbound name
    for script, var, args in (("demo.sh", "PIADM_RANKS", []),
                              ("sample.sh", "PIADM_RANKS", ["jobs/configs/grf.toml"]),
                              ("train.sh", "PIADM_RANKS", ["jobs/configs/kolmogorov.toml"]),
                              ("generate.sh", "PIADM_SHARDS", ["jobs/configs/kolmogorov.toml",
                                                               "/nonexistent/shards"])):
        for value in ("abc", "0", "-3"):
            proc = subprocess.run(["bash", f"jobs/local/{script}", *args], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60,
                                  env={"PATH": "/usr/bin:/bin", var: value, "PIADM": "true"})
            assert proc.returncode == 2, (script, value, proc.stderr)
            assert f"{var}={value}: give a positive whole number" in proc.stderr


def test_a_shards_path_is_a_quoted_toml_string_whatever_its_folder_is_named():
    """A folder "shards #1" was cut at its " #" (every shard then wrote ./shards) and
    "[v2] shards" read as a TOML list."""
    import tomllib

    folder = 'runs/[v2] shards #1/o\'brien "x" \\ y'
    proc = subprocess.run(["bash", "-c", 'source jobs/common.sh; shard_sets 7 "$1"', "-", folder],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.splitlines()[::2] == ["--set", "--set"]
    path, seed = proc.stdout.splitlines()[1::2]
    assert tomllib.loads(path.replace("data.path=", "v = ", 1))["v"] == f"{folder}/shard-007.zarr"
    assert seed == "data.seed=7"


def test_the_shipped_networks_go_into_a_wheel():
    """A wheel held the code alone: installed outside the repository, no shipped network."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # setuptools globs each pattern in the package's folder: "*" does not cross a "/"
    packed = {str(p.relative_to(ROOT)) for pattern in data["package-data"]["models"]
              for p in (ROOT / "models").glob(pattern)}
    shipped = _tracked("models/checkpoints")
    assert shipped and set(shipped) <= packed


def test_a_missing_checkpoint_names_the_shipped_one_of_that_name(tmp_path, monkeypatch):
    from models.learned import _read
    from pipeline.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # outside the repository, as an installed piadm runs
    with pytest.raises(ConfigError, match=r"piadm's own kolmogorov_down.pt is "
                                          + re.escape(str(ROOT / "models" / "checkpoints"))):
        _read("models/checkpoints/kolmogorov_down.pt", "model.checkpoint", "cpu")
    with pytest.raises(ConfigError) as own:  # a user's network of that name is not ours
        _read(str(tmp_path / "runs" / "kolmogorov_down.pt"), "model.checkpoint", "cpu")
    assert "piadm's own" not in str(own.value)
    # a file's path with a trailing "/" (pathlib drops it): not a file, said as such, where
    # the dry run blamed the output store for hashing it
    shipped = str(ROOT / "models" / "checkpoints" / "kolmogorov_down.pt")
    with pytest.raises(ConfigError, match="names a file as a folder: remove the trailing '/'"):
        _read(shipped + "/", "model.checkpoint", "cpu")
