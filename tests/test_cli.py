"""The ``piadm`` command's surface: every subcommand's --help shows an example, --version,
and the config-file error paths are one-line errors that name the fix."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import __version__
from pipeline.cli import COMMANDS, main, parser
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"example: piadm {command}" in out.replace(
        "mpiexec -n 2 piadm", "piadm")


@pytest.mark.parametrize("args", [["sample", "jobs/configs/grf.toml", "--dry"],
                                  ["bench", "jobs/configs/grf.toml", "--quali", "1e-2"]])
def test_a_flag_is_not_taken_from_its_first_letters(args, capsys):
    # a prefix that names one flag today may name two once a flag is added
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_version_and_the_installed_entry_point():
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"piadm {__version__}"


@pytest.mark.parametrize("args, needle", [
    (["sample", "nope.toml"], "config file nope.toml not found"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.steps"], "use the form section.key=value"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.steps=1.5"], "sampler.steps must be int"),
    # the way to write what was meant
    (["config", "jobs/configs/grf.toml", "--set", "sampler.steps=20.0"],
     "sampler.steps must be int, got float 20.0: write 20 (a whole number, no point)"),
    (["config", "jobs/configs/grf.toml", "--set", 'sampler.u_max="8"'],
     "sampler.u_max must be float, got str '8': write 8 without quotes"),
    (["config", "jobs/configs/grf.toml", "--set", 'sampler.tol="1e-3"'],
     "sampler.tol = '1e-3' must be a finite number >= 0 or \"auto\": write 1e-3 without quotes"),
    (["config", "jobs/configs/grf.toml", "--set", "output.path=2024"],
     "output.path must be str, got int 2024: quote it (\"2024\"; in the shell: "
     "'output.path=\"2024\"')"),
    (["train", "jobs/configs/kolmogorov.toml", "--set", "train.data=none.zarr"], "none.zarr"),
    (["status", "not-a-store"], "not-a-store"),
    (["status", ""], "the store's path is empty: pass the output.path of a run"),
    (["config", ""], "the config file's path is empty: give a TOML file"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.noise=gpu"],
     "sampler.noise = 'gpu': use host"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.theta=max"],
     "sampler.theta = 'max': use one of j_max, one"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.window_split=copies"],
     "sampler.window_split = 'copies': use one of slots, replicated"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.steps=3", "--set",
      "sampler.window=100", "--set", "parallel.time_slices=4"],
     "time_slices = 4 is more than the 3 points of sampler.window (at most sampler.steps = 3): "
     "use at most 3 time slices, or raise sampler.steps"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.steps=10", "--set",
      "sampler.window=10", "--set", "parallel.time_slices=16"],
     "use at most 10 time slices, or raise sampler.steps and sampler.window"),
    # numbers no run can use: past here they ran forever or raised deep inside
    (["generate-data", "jobs/configs/kolmogorov.toml", "--set", "data.spinup=inf"],
     "data.spinup = inf must be finite"),
    (["sample", "jobs/configs/grf.toml", "--set", "calibrate.ladder=[inf, 0.1]"],
     "calibrate.ladder = (inf, 0.1) must be finite"),
    (["sample", "jobs/configs/gmm.toml", "--set", "model.seed=-1"],
     "model.seed = -1 must be in [0, 9223372036854775807]"),
    (["generate-data", "jobs/configs/kolmogorov.toml", "--set", "data.seed=18446744073709551616"],
     "data.seed = 18446744073709551616 must be in"),
    (["sample", "jobs/configs/grf.toml", "--set", "parallel.threads=99999999999999999999"],
     "parallel.threads = 99999999999999999999 must be in [0, 65536]"),
    (["sample", "jobs/configs/grf.toml", "--set", "model.slope=1" + "0" * 400],
     "model.slope = 10000000000000000000... is too large for a number"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.steps=1" + "0" * 5000],
     "--set sampler.steps: the value 10000000000000000000... is too large"),
    (["sample", "jobs/configs/grf.toml", "--set", "model.emulate_ms=[100000000, 0]"],
     "an emulated call of more than 60000 ms (latency or per item) is no accelerator's"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.method=piadm-ode", "--set",
      "sampler.corrector_length=1e300"],
     "sampler.corrector_length = 1e+300 over sampler.corrector_steps = 8 makes steps of"),
    (["train", "jobs/configs/kolmogorov.toml", "--set", "train.checkpoint=w/"],
     "train.checkpoint = 'w/' names a folder: give the checkpoint's file path, e.g. w/unet.pt"),
    # empty, "." and "..": a traceback (". has an empty name"); empty paths named no setting
    (["train", "jobs/configs/kolmogorov.toml", "--set", "train.checkpoint="],
     "train.checkpoint must not be empty"),
    (["train", "jobs/configs/kolmogorov.toml", "--set", "train.checkpoint=."],
     "train.checkpoint = '.' names a folder: give the checkpoint's file path"),
    (["train", "jobs/configs/kolmogorov.toml", "--set", "train.checkpoint=w/."],
     "train.checkpoint = 'w/.' names a folder: give the checkpoint's file path"),
    (["bench", "jobs/configs/grf.toml", "--set", 'bench.methods=["pc-windw"]'],
     "(did you mean 'pc-window'?)"),
    (["train", "jobs/configs/kolmogorov.toml", "--set", "train.data="],
     "train.data must not be empty"),
    (["train", "jobs/configs/kolmogorov.toml", "--set", 'train.extra=[""]'],
     "train.extra = [''] holds an empty path"),
    (["generate-data", "jobs/configs/kolmogorov.toml", "--set", "data.path="],
     "data.path must not be empty"),
    # an empty train.condition equalled an empty train.variable: the condition was blamed
    (["config", "jobs/configs/kolmogorov_uncond.toml", "--set", "train.variable="],
     "train.variable must not be empty"),
    (["plan", "jobs/configs/grf.toml", "--ranks", "1000000000"],
     "plan: --ranks 1000000000 is more than the 131072 ranks a plan weighs"),
    # a quote left open, a list of bare words, a path with a TOML escape in it
    (["sample", "jobs/configs/grf.toml", "--set", 'output.path="unterminated'],
     "the value starts a quoted string that is not one: close its quote"),
    (["bench", "jobs/configs/grf.toml", "--set", "bench.methods=[pc-window]"],
     'not a TOML list or table (Invalid value): quote its words, e.g. ["pc-window", "window"]'),
    # numbers alone: the parser's reason, not advice to quote words
    (["sample", "jobs/configs/grf.toml", "--set", "model.shape=[16,16"],
     "not a TOML list or table (Unclosed array): check its brackets and commas, e.g. [16, 16]"),
    (["sample", "jobs/configs/grf.toml", "--set", "SAMPLER.steps=10"],
     "unknown section [SAMPLER] (did you mean 'sampler'?)"),
    (["sample", "jobs/configs/grf.toml", "--set", 'output.path="out\\new.zarr"'],
     "the value holds a control character"),
    (["sample", "jobs/configs/grf.toml", "--set", "output.path=a.zarr, ensemble.members=2"],
     "this holds another setting: separate PIADM_SET items with ';'"),
    # zarr expanded "~" to $HOME and piadm did not: a draft store was left in $HOME
    (["sample", "jobs/configs/grf.toml", "--set", 'output.path="~/x.zarr"'],
     "output.path = '~/x.zarr' starts with '~', which piadm does not expand"),
    (["generate-data", "jobs/configs/kolmogorov.toml", "--set", 'data.path="~/d.zarr"'],
     "data.path = '~/d.zarr' starts with '~'"),
    (["sample", "jobs/configs/grf.toml", "--set", 'input.items=["2020", "~/x"]'],
     "input.items = ('2020', '~/x') starts with '~', which piadm does not expand (a TOML file "
     f"is not a shell): write the path out, e.g. {Path.home()}/x"),
    (["sample", "jobs/configs/grf.toml", "--set", 'output.path=" "'],
     "output.path must not be empty"),
    # zarr took these through fsspec: a missing package's traceback, a local folder "memory:"
    (["sample", "jobs/configs/grf.toml", "--set", 'output.path="s3://bucket/x.zarr"'],
     "output.path = 's3://bucket/x.zarr' is a URL: piadm works on the files of a local or "
     "mounted file system only"),
    (["generate-data", "jobs/configs/kolmogorov.toml", "--set", 'data.path="memory://d.zarr"'],
     "data.path = 'memory://d.zarr' is a URL"),
    (["train", "jobs/configs/kolmogorov.toml", "--set", 'train.extra=["gs://b/x.zarr"]'],
     "train.extra = ('gs://b/x.zarr',) is a URL"),
    (["sample", "jobs/configs/grf.toml", "--set", 'output.path="simplecache::x.zarr"'],
     "output.path = 'simplecache::x.zarr' holds '://' or '::', which zarr reads as a URL"),
    (["sample", "jobs/configs/module.toml", "--set", "model.args={name=\"lat\udce9\"}"],
     "holds a byte that is not UTF-8 text"),
    # a shell's Latin-1 byte, a lone surrogate: a traceback at the config's digest
    (["sample", "jobs/configs/grf.toml", "--set", "output.path=lat\udce9.zarr"],
     "output.path = 'lat\\udce9.zarr' holds a byte that is not UTF-8 text"),
    # a forcing the grid cannot resolve folds back onto a low wavenumber
    (["generate-data", "jobs/configs/kolmogorov.toml", "--set", "data.forcing_wavenumber=22"],
     "data.forcing_wavenumber = 22 is past the largest wavenumber data.resolution"),
    # spelled as TOML does not, or mistyped
    (["sample", "jobs/configs/grf.toml", "--set", "output.overwrite=True"],
     "got str 'True': write true (TOML's booleans are lower case)"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.u_min=.001"],
     "write 0.001 (a TOML number has a digit before its point)"),
    (["sample", "jobs/configs/grf.toml", "--set", "model.kind=gfr"], "(did you mean 'grf'?)"),
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.method=pc-windw"],
     "(did you mean 'pc-window'?)"),
    (["sample", "jobs/configs/grf.toml", "--set", "parallel.time_slices=2.0"],
     "parallel.time_slices must be int or str, got float 2.0: write 2 (a whole number"),
    # a count past int64 overflowed in numpy or torch (a traceback)
    (["sample", "jobs/configs/grf.toml", "--dry-run", "--set", f"model.shape=[{2**70}]"],
     f"model.shape = ({2**70},) is past the largest integer piadm takes"),
    (["bench", "jobs/configs/grf.toml", "--set", f"bench.sizes=[[{2**70}, 8]]"],
     "bench.sizes = ((1180591620717411303424, 8),) is past the largest integer"),
    # a subnormal u_min drew fields of std 35 where 1 is right, without a word
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.u_min=5e-324"],
     "sampler.u_min = 4.94066e-324 must be at least 1e-10"),
    # a value holding a new line (a shell's $'...') was echoed as two lines
    (["sample", "jobs/configs/grf.toml", "--set", "sampler.steps=a\nb"],
     "--set sampler.steps=a\\nb: the value holds a control character (a new line or tab"),
    # past float32 in Adam's step (a traceback); steps too short to ever end
    (["train", "jobs/configs/kolmogorov.toml", "--set", "train.lr=1e300"],
     "train.lr = 1e+300 must be in (0, 1]"),
    (["generate-data", "jobs/configs/kolmogorov.toml", "--set", "data.cfl=5e-324"],
     "data.cfl = 5e-324 must be in [0.001, 1]"),
    # a config for another command
    (["sample", "jobs/configs/kolmogorov.toml"],
     "config file jobs/configs/kolmogorov.toml has [data] and none of the sections piadm "
     "sample reads"),
])
def test_file_and_override_errors_are_one_line(args, needle, capsys, tmp_path):
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and needle in errors[0] and errors[0].startswith("piadm: error:")


def test_an_empty_config_file_is_said_to_set_nothing(tmp_path, capsys):
    """A config emptied or cut short by mistake ran quietly on the defaults (a grf 64x64 with
    piadm-sde): the run says so, and a file with a key does not."""
    empty, one = tmp_path / "empty.toml", tmp_path / "one.toml"
    empty.write_text("# nothing yet\n")
    one.write_text("[sampler]\nsteps = 10\n")
    for path, said in ((empty, True), (one, False)):
        for command in (["sample", str(path), "--dry-run"], ["config", str(path)]):
            assert main(command) == 0
            err = capsys.readouterr().err
            assert (f"piadm: warning: config file {path} sets no key" in err) == said, err


def test_piadm_set_items_split_at_semicolons_and_lines_but_not_inside_quotes(monkeypatch):
    from pipeline.environment import environment_settings

    monkeypatch.setenv("PIADM_SET", 'a.b=1; output.path="x;y.zarr"\n c.d=[\'p;q\', 2];')
    assert environment_settings() == ["a.b=1", 'output.path="x;y.zarr"', "c.d=['p;q', 2]"]
    # an apostrophe inside a value is text, and an escaped quote does not close the value
    monkeypatch.setenv("PIADM_SET", 'output.path=/runs/o\'brien.zarr; g.h="a\\";b"; e.f=4')
    assert environment_settings() == [
        "output.path=/runs/o'brien.zarr", 'g.h="a\\";b"', "e.f=4"]
    # an escaped backslash ends the value's escapes: its quote closes it
    monkeypatch.setenv("PIADM_SET", 'output.path="a\\\\"; sampler.steps=11')
    assert environment_settings() == ['output.path="a\\\\"', "sampler.steps=11"]
    monkeypatch.setenv("PIADM_SET", 'output.path="runs.zarr; e.f=4')
    with pytest.raises(ConfigError, match="never closed"):
        environment_settings()


def test_a_comment_line_in_piadm_set_is_skipped_and_a_bare_value_with_a_hash_is_refused(
        monkeypatch, capsys, tmp_path):
    """"output.path=run #1.zarr" was cut to "run" as a comment: the run wrote elsewhere."""
    from pipeline.environment import environment_settings

    monkeypatch.setenv("PIADM_SET", "# my settings; for a try\n  sampler.steps=5")
    assert environment_settings() == ["sampler.steps=5"]
    monkeypatch.delenv("PIADM_SET")
    for value in ("run #1.zarr", "out/x.zarr  # mine"):
        assert main(["config", "jobs/configs/grf.toml", "--set", f"output.path={value}"]) == 2
        assert (f"--set output.path={value}: an unquoted value holding ' #' (a comment, or part "
                "of a path?): quote the value") in capsys.readouterr().err
    assert main(["config", "jobs/configs/grf.toml", "--set", 'output.path="run #1.zarr"',
                 "--set", "sampler.steps=20 # a comment TOML drops"]) == 0
    said = capsys.readouterr().out
    assert 'path = "run #1.zarr"' in said and "steps = 20\n" in said


def test_an_error_from_a_piadm_set_item_says_so(monkeypatch, capsys):
    monkeypatch.setenv("PIADM_SET", "ensemble.members=0; sampler.steps=20")
    assert main(["sample", "jobs/configs/grf.toml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ensemble.members" in err and err.endswith("(from PIADM_SET: ensemble.members=0)")


def test_a_piadm_set_item_the_command_line_overrode_is_not_blamed(monkeypatch, capsys):
    monkeypatch.setenv("PIADM_SET", "ensemble.members=4; sampler.u_max=0.5; sampler.u_max=8")
    assert main(["config", "jobs/configs/grf.toml", "--set", "ensemble.members=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "piadm: error: config: ensemble.members = 0 must be >= 1"
    # of two items of one key, the later is the value taken, and the one to name
    assert main(["config", "jobs/configs/grf.toml", "--set", "sampler.u_min=9"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "below sampler.u_max = 8.0 (from PIADM_SET: sampler.u_max=8)")


def test_invalid_toml_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampler\nsteps = 3\n")
    assert main(["sample", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["config", "sample"])
def test_a_config_not_in_utf8_is_named_with_its_byte(tmp_path, capsys, command):
    from pipeline.api import load_config

    latin = tmp_path / "latin.toml"
    latin.write_bytes("[ensemble]\nmembers = 4  # réglages\n".encode("latin-1"))
    needle = f"config file {latin} is not UTF-8: byte 27 (line 2) is 0xe9: save the file as UTF-8"
    assert main([command, str(latin)]) == 2
    assert capsys.readouterr().err.strip() == f"piadm: error: {needle}"
    with pytest.raises(ConfigError, match="byte 27"):
        load_config(latin)


def test_a_byte_order_mark_an_editor_wrote_is_read_past(tmp_path):
    from pipeline.api import load_config

    marked = tmp_path / "marked.toml"
    marked.write_bytes("\ufeff[ensemble]\nmembers = 4\n".encode("utf-8"))
    assert load_config(marked).ensemble.members == 4
    marked.write_bytes(b"\xef\xbb\xbf[ensemble]\n# caf\xe9\n")  # a Latin-1 byte after the mark
    with pytest.raises(ConfigError, match=r"byte 19 \(line 2\) is 0xe9"):  # counted in the file
        load_config(marked)


def test_a_key_outside_every_section_is_named_as_a_key(tmp_path, capsys):
    # the command's own check called it a section: "has [steps] and none of the sections"
    loose = tmp_path / "loose.toml"
    loose.write_text("steps = 3\n")
    assert main(["sample", str(loose)]) == 2
    assert capsys.readouterr().err.strip() == (
        "piadm: error: config: key 'steps' is outside every section: put it under [sampler] "
        "or [train] (valid sections: model, sampler, ensemble, input, output, parallel, data, "
        "train, bench, calibrate)")


def test_a_config_that_is_a_directory_says_so(tmp_path, capsys):
    assert main(["config", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"piadm: error: config file {tmp_path} is a directory: a config must be a TOML file, "
        "e.g. jobs/configs/grf.toml")


@pytest.mark.parametrize("argv, usage, hint", [
    (["sample", "jobs/configs/grf.toml", "--dryrun"], "usage: piadm sample ",
     "unrecognized arguments: --dryrun (did you mean '--dry-run'?)"),
    (["status", "--verfy", "x.zarr"], "usage: piadm status ",
     "unrecognized arguments: --verfy (did you mean '--verify'?)"),
    (["smaple", "jobs/configs/grf.toml"], "usage: piadm ", "(did you mean 'sample'?)"),
    (["--dry-run", "sample", "jobs/configs/grf.toml"], "usage: piadm sample ",
     "unrecognized arguments: --dry-run (a flag of piadm sample: put it after the command)")])
def test_a_misspelt_flag_or_command_gets_its_commands_usage_and_the_nearest_name(
        capsys, argv, usage, hint):
    with pytest.raises(SystemExit) as stop:
        parser().parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(usage) and err.rstrip().endswith(hint)


def test_help_parses_without_importing_the_heavy_libraries():
    code = ("import sys\nfrom pipeline.cli import parser\n"
            "for argv in (['--help'], ['sample', '--help'], ['evaluate', '--help']):\n"
            "    try:\n        parser().parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'xarray', 'zarr', 'scoringrules') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().splitlines()[-1] == "[]", run.stderr


@pytest.mark.parametrize("config", ["grf.toml", "kolmogorov_uncond.toml"])
def test_config_checks_and_prints_without_importing_torch(config):
    # `piadm config` answers at once: validating model.kind, sampler.grid, the window's
    # points and the rest reads names declared without torch (models, pipeline.choices)
    code = ("import sys\nfrom pipeline.cli import main\n"
            "code = main(['config', sys.argv[1], '--set', 'sampler.window=0'])\n"
            "print(code, sorted(m for m in ('torch', 'xarray', 'zarr', 'dask') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, f"jobs/configs/{config}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "[model]" in run.stdout and run.stdout.strip().splitlines()[-1] == "0 []", run.stdout


def test_a_sample_refused_for_its_config_says_so_without_importing_torch(tmp_path):
    # under mpiexec every rank paid torch's seconds of imports before a refusal
    code = ("import sys\nfrom pipeline.cli import main\n"
            "code = main(['sample', 'jobs/configs/grf.toml', '--set', 'sampler.method=pc-windw', "
            "'--set', 'output.path=' + sys.argv[1]])\n"
            "print(code, sorted(m for m in ('torch', 'xarray', 'dask') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.zarr")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert "sampler.method = 'pc-windw' is unknown" in run.stderr
    assert run.stdout.strip().splitlines()[-1] == "2 []", run.stdout + run.stderr


def test_labels_written_unquoted_are_their_text_and_control_characters_print_back(
        tmp_path, capsys):
    from pipeline.config import load_config

    path = tmp_path / "c.toml"
    path.write_text('[input]\npath = "x.zarr"\nvariable = "v"\n'
                    'range = [2020-01-01, 2020-01-31T06:00:00]\n[model]\ncondition = "mean"\n')
    assert load_config(path).input.range == ("2020-01-01", "2020-01-31T06:00:00")
    assert load_config(None, ["input.items=[21.0, 22]"]).input.items == ("21.0", "22")
    # a note after a bare word, or a path's own " #": refused, no longer cut there
    with pytest.raises(ConfigError, match="an unquoted value holding ' #'"):
        load_config(None, ["output.path=x.zarr # a note"])
    assert load_config(None, ['output.path="x.zarr" # a note']).output.path == "x.zarr"
    # a setting with a control character is refused from a file too (a path's trailing new
    # line made a folder whose name ends in one); printed TOML escapes one all the same
    (tmp_path / "odd.toml").write_text('[output]\npath = "a\\tb\\nc"\n')
    assert main(["config", str(tmp_path / "odd.toml")]) == 2
    assert "output.path = 'a\\tb\\nc' holds a control character" in capsys.readouterr().err
    import tomllib

    from pipeline.config import _toml
    assert tomllib.loads("v = " + _toml("a\tb\nc\x7f"))["v"] == "a\tb\nc\x7f"


@pytest.mark.parametrize("value, said", [
    ("$HOME/e.zarr", "names a variable, which piadm does not expand (a TOML file is not a "
                     "shell): write the path out, e.g. "),
    ("${SCRATCH}/e.zarr", "names a variable, which piadm does not expand"),
    ("e.zarr\n", "holds a control character (a new line or tab): remove it"),
])
def test_a_path_naming_a_shell_variable_or_holding_a_new_line_is_refused(tmp_path, value,
                                                                        said):
    """Taken as written, "$HOME/e.zarr" made a folder named "$HOME" in the working folder
    and a trailing new line a folder whose name ends in one."""
    from pipeline.api import load_config

    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config({"output": {"path": value}})


def test_config_prints_toml_that_loads_back_to_the_same_config(capsys):
    import tomllib

    from pipeline.config import config_from_dict, load_config

    assert main(["config", "jobs/configs/grf.toml", "--set", "sampler.steps=200"]) == 0
    again = config_from_dict(tomllib.loads(capsys.readouterr().out))
    want = load_config("jobs/configs/grf.toml", ["sampler.steps=200"])
    assert again.digest == want.digest and again.sampler.steps == 200


def _small_store(path) -> None:
    sets = ["model.shape=[8, 8]", "sampler.steps=20", "sampler.method=sequential-sde",
            "ensemble.members=2", f"output.path={path}"]
    assert main(["sample", "jobs/configs/grf.toml"] + sum((["--set", s] for s in sets), [])) == 0


def test_status_json_is_one_document(tmp_path, capsys):
    import json

    out = tmp_path / "s.zarr"
    _small_store(out)
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["complete"] and state["done"] == state["members"] == 2
    assert state["items"] == [{"label": "0", "done": 2, "members": 2}]


def test_status_reads_a_store_without_the_heavy_libraries(tmp_path):
    # a workflow polls `piadm status`: it must answer in a fraction of a second, so neither
    # the store's done array nor a wrong path may import torch, xarray or dask
    out = tmp_path / "s.zarr"
    _small_store(out)
    code = ("import sys\nfrom pipeline.cli import main\n"
            "codes = [main(['status', sys.argv[1]]), main(['status', sys.argv[1] + '.none'])]\n"
            "print(codes, sorted(m for m in ('torch', 'xarray', 'dask') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "2/2 members done" in run.stdout and "s.zarr.none does not exist" in run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[0, 2] []", run.stdout


@pytest.mark.parametrize("method", ["window", "window-ode", "pc-window", "pc-window-ode"])
def test_a_windowed_sampler_without_tol_is_a_config_error(method):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="sampler.tol must be set"):
        load_config(None, [f"sampler.method={method}"])


def test_a_new_built_in_kind_is_held_to_the_keys_it_reads(monkeypatch):
    """A kind added to models.MODELS that reads none of the kind-specific keys is still
    piadm's own: a grf's key set for it is refused, not ignored as a plugin's would be."""
    import models
    from pipeline.config import ConfigError, load_config

    monkeypatch.setitem(models.MODELS, "plain", models.MODELS["grf"])
    with pytest.raises(ConfigError, match="model.slope = 2.0 is read by model.kind = 'grf', "
                                          "not 'plain'"):
        load_config(None, ["model.kind=plain", "model.slope=2.0"])


def test_evaluate_json_is_the_metrics_document(tmp_path, capsys):
    import json

    from conftest import conditional_sets, make_input

    inp = make_input(tmp_path / "in.zarr")
    out = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(inp, out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--truth", inp, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((tmp_path / "ens_eval" / "metrics.json").read_text())


def test_sample_dry_run_says_what_it_would_do_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "ens.zarr"
    args = ["sample", "jobs/configs/grf.toml", "--dry-run", "--set", f"output.path={out}",
            "--set", "ensemble.members=6", "--set", "ensemble.batch_size=4"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "members    6 per item in 2 batches of up to 4" in err
    assert f"store      {out} would be created" in err and "pc-window, 1000 steps" in err
    assert "nothing was written" in err and not out.exists()
    out.mkdir()  # not a piadm store: the run would refuse it, so the dry run exits 2
    (out / "notes.txt").write_text("keep")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"store      {out} would be refused: output {out} exists and is not a piadm store" in err


def test_a_dry_run_refuses_a_model_the_run_would_refuse(tmp_path, capsys):
    """The dry run loads the model as the run does: a shape the checkpoint was not trained on
    is the run's one-line error, not a plan that the run then refuses."""
    out = tmp_path / "u.zarr"
    assert main(["sample", "jobs/configs/kolmogorov_uncond.toml", "--dry-run", "--set",
                 "model.shape=[32, 32]", "--set", f"output.path={out}"]) == 2
    err = capsys.readouterr().err
    assert "model.shape = [32, 32] but models/checkpoints/kolmogorov_uncond.pt was trained " \
        "on [64, 64]" in err and "Traceback" not in err and not out.exists()


def test_a_dry_run_of_a_sequential_sampler_names_no_tolerance(tmp_path, capsys):
    assert main(["sample", "jobs/configs/grf.toml", "--dry-run", "--set",
                 f"output.path={tmp_path / 'e.zarr'}", "--set", "sampler.method=sequential-sde",
                 "--set", 'sampler.tol="auto"']) == 0
    err = capsys.readouterr().err
    assert "tol none (a sequential sampler)" in err and "tol auto" not in err


@pytest.mark.parametrize("window, steps, shown", [
    (0, 100, "window 65 (its default)"),
    (0, 20, "window 20 (the default window 65 is cut to the 20 steps)"),
    (5000, 100, "window 100 (sampler.window 5000 is cut to the 100 steps)"),
    (16, 100, "window 16"),
])
def test_a_dry_run_names_the_window_the_sampler_slides(window, steps, shown, tmp_path, capsys):
    assert main(["sample", "jobs/configs/grf.toml", "--dry-run", "--set",
                 f"output.path={tmp_path / 'e.zarr'}", "--set", "sampler.method=pc-window",
                 "--set", f"sampler.steps={steps}", "--set", f"sampler.window={window}"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "sampler    " in x)
    assert line.endswith(shown)


def test_a_stop_signal_held_through_start_up_stops_the_command_once(capsys, monkeypatch):
    import signal

    from pipeline import signals

    monkeypatch.setattr(signals, "_early", [signal.SIGUSR1])  # arrived during the imports
    assert main(["config", "jobs/configs/grf.toml"]) == 128 + signal.SIGUSR1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "piadm: stopped by SIGUSR1"
    assert main(["config", "jobs/configs/grf.toml"]) == 0  # taken: the next command runs


def test_a_stop_signal_interrupts_once_and_the_handlers_before_come_back():
    import os
    import signal
    import time

    from pipeline.errors import Interrupted
    from pipeline.signals import interrupted_by_stop_signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err:
        with interrupted_by_stop_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises long before
            finally:
                # a second signal while the first is reported ends the process, no traceback
                assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert err.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_torch_is_loaded_while_stop_signals_are_still_held():
    """A SIGTERM raised inside torch's C++ start-up (the import under the handler that
    raises) aborted calibrate with exit 6, not 143: the commands that load it load it
    before the handler is set; status and config never load it."""
    script = ("import contextlib, sys\n"
              "import pipeline.cli as cli\n"
              "seen = []\n"
              "@contextlib.contextmanager\n"
              "def held():\n"
              "    seen.append('torch' in sys.modules)\n"
              "    yield\n"
              "cli.interrupted_by_stop_signals = held\n"
              "cli.main([sys.argv[1], 'jobs/configs/grf.toml', '--set', 'sampler.steps=0'])\n"
              "print(seen, 'torch' in sys.modules)\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    for command, loaded in (("calibrate", "[True] True"), ("config", "[False] False")):
        done = subprocess.run([sys.executable, "-c", script, command], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == loaded, (command, done.stdout, done.stderr[-2000:])


@pytest.mark.parametrize("code", [143, 1])
def test_a_command_stopped_by_a_signal_ends_on_its_own_line(code):
    """A write a stop signal cut short leaves a coroutine never awaited, which Python warns
    of at exit, after the stop's line: silenced for a stop (128 + the signal), not for a
    failure."""
    script = ("import pipeline.cli as cli\n"
              "async def write(): pass\n"
              "left = write()  # collected at exit, never awaited\n"
              f"cli.main = lambda argv=None: {code}\n"
              "cli.entry()\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert ("was never awaited" in done.stderr) == (code < 128), done.stderr


def test_a_reader_that_closes_early_does_not_stop_the_run(tmp_path):
    """``piadm sample ... 2>&1 | head -1``: the closed pipe ends the output, not the work; the
    store is finished and its history records the run."""
    out = tmp_path / "p.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "sample", "jobs/configs/grf.toml",
         "--set", "model.shape=[8, 8]", "--set", "sampler.steps=30", "--set",
         "ensemble.members=4", "--set", "ensemble.batch_size=1", "--set",
         f"output.path={out}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its lines
    assert proc.wait(timeout=120) == 0
    import zarr

    attrs = zarr.open_group(out, mode="r").attrs
    assert attrs["history"].splitlines()[-1].endswith("piadm wrote 4 members")
    assert (zarr.open_group(out, mode="r")["done"][:] == 1).all()


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_command_whose_output_is_closed_at_start_keeps_its_status(tmp_path, closed):
    """``piadm status PATH 2>&-``: a script that closes a stream still gets the status."""
    fd = 1 if closed == "stdout" else 2
    run = subprocess.run(["bash", "-c", f'"$0" -m pipeline.cli status "$1" {fd}>&-',
                          sys.executable, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "Exception ignored" not in run.stdout + run.stderr


def test_an_error_line_is_one_write_with_its_new_line(monkeypatch):
    """Ranks sharing a log: a line written as text, then its new line, let another rank's
    line in between (``...has spacepiadm: error on rank 0: ...``)."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main(["config", "no/such/config.toml"]) == 2
    assert len(writes) == 1 and writes[0].startswith("piadm: error: ") and \
        writes[0].endswith("\n") and writes[0].count("\n") == 1, writes


def test_status_names_dated_items_by_their_dates(tmp_path, capsys):
    """A store's times are CF numbers on disk ("days since ..."): status, which reads them
    without xarray, prints the dates its run printed (it printed time 0, time 1, ...)."""
    import numpy as np
    import xarray as xr
    from conftest import conditional_sets, make_input

    out = tmp_path / "d.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(make_input(tmp_path / "in.zarr", times=2), out)]) == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "  time 2020-01-01: 6/6\n  time 2020-01-02: 6/6" in capsys.readouterr().out
    # lead times are counts of hours on disk: named as the run named them, not "lead 6"
    ds = xr.open_zarr(tmp_path / "in.zarr").load()
    ds.assign_coords(time=ds.time - ds.time[0] + np.timedelta64(6, "h")).rename(
        time="lead").to_zarr(tmp_path / "lead.zarr", zarr_format=3)
    lead = tmp_path / "l.zarr"
    assert main(["sample", "jobs/configs/grf.toml", "--set", "input.item_dim=lead",
                 *conditional_sets(tmp_path / "lead.zarr", lead)]) == 0
    capsys.readouterr()
    assert main(["status", str(lead)]) == 0
    assert "  lead 0 days 06:00:00: 6/6\n  lead 1 days 06:00:00: 6/6" in capsys.readouterr().out
    # a sum of steps' rounding (0.2 + 0.1 is 0.30000000000000004) is not a label's text
    ds.assign_coords(time=0.2 + 0.1 * np.arange(ds.sizes["time"])).to_zarr(
        tmp_path / "sums.zarr", zarr_format=3)
    sums = tmp_path / "s.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(tmp_path / "sums.zarr", sums)]) == 0
    capsys.readouterr()
    assert main(["status", "--json", str(sums)]) == 0
    assert [i["label"] for i in json.loads(capsys.readouterr().out)["items"]] == ["0.2", "0.3"]


def test_a_config_that_is_no_regular_file_is_read_as_one(tmp_path, capsys):
    """/dev/null is an empty config, the defaults; a pipe (a shell's <(...)) is read."""
    assert main(["config", "/dev/null"]) == 0
    assert 'kind = "grf"' in capsys.readouterr().out
    fifo = tmp_path / "cfg.fifo"
    os.mkfifo(fifo)
    import threading

    writer = threading.Thread(target=lambda: fifo.write_text("[sampler]\nsteps = 7\n"))
    writer.start()
    assert main(["config", str(fifo)]) == 0
    writer.join()
    assert "steps = 7" in capsys.readouterr().out


def test_an_error_in_a_piadm_set_item_says_it_came_from_there(monkeypatch, capsys):
    monkeypatch.setenv("PIADM_SET", "bogus.key=1")
    assert main(["config", "jobs/configs/grf.toml"]) == 2
    assert "unknown section [bogus]" in (err := capsys.readouterr().err)
    assert err.rstrip().endswith("(from PIADM_SET: bogus.key=1)")
    monkeypatch.setenv("PIADM_SET", "sampler.steps=5 sampler.tol=1e-2")
    assert main(["config", "jobs/configs/grf.toml"]) == 2
    assert capsys.readouterr().err.startswith(
        "piadm: error: PIADM_SET: sampler.steps=5 sampler.tol=1e-2: this holds another setting")
    # a malformed PIADM_SET item is named as one, once, though a --set gives the same key
    monkeypatch.setenv("PIADM_SET", "sampler.steps=[3")
    assert main(["config", "jobs/configs/grf.toml", "--set", "sampler.steps=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("piadm: error: PIADM_SET: sampler.steps=[3: not a TOML list")
    assert "from PIADM_SET" not in err and "--set sampler.steps=[3" not in err


def test_a_block_sampler_without_a_tolerance_is_told_it_gains_nothing(tmp_path, capsys):
    """The bare defaults (piadm-sde, sampler.tol unset) sweep every block to its end: the
    run says so, and does not where a tolerance is set."""
    small = ["--set", "model.shape=[8, 8]", "--set", "sampler.steps=10", "--set",
             "sampler.block_size=5", "--set", "ensemble.members=2"]
    assert main(["sample", "/dev/null", *small, "--set", f"output.path={tmp_path / 'a.zarr'}"]) == 0
    assert "note: sampler.tol is unset, so each block of piadm-sde sweeps" in \
        capsys.readouterr().err
    assert main(["sample", "/dev/null", *small, "--set", "sampler.tol=1e-3",
                 "--set", f"output.path={tmp_path / 'b.zarr'}"]) == 0
    assert "sampler.tol is unset" not in capsys.readouterr().err


def test_config_prints_a_modules_own_arguments_so_that_they_read_back(tmp_path, capsys):
    """Arguments named like [model] keys (seed, std) were printed beside them: TOML that
    does not read back (and a store's config text no check could parse)."""
    from pipeline.config import load_config

    (tmp_path / "m.toml").write_text(
        '[model]\nkind = "module"\ntarget = "byo_nets:float64_out"\nshape = [1, 16, 16]\n'
        'prediction = "eps"\nprocess = "ddpm"\nwidth = 4\n'
        '[model.args]\nseed = 3\nstd = 0.7\n"odd key" = 1\n')
    assert main(["config", str(tmp_path / "m.toml")]) == 0
    (tmp_path / "again.toml").write_text(capsys.readouterr().out)
    first, again = (load_config(str(tmp_path / n)) for n in ("m.toml", "again.toml"))
    assert again.model.args == {"seed": 3, "std": 0.7, "odd key": 1, "width": 4}
    assert again.store_settings() == first.store_settings() and again.text == first.text


def test_piadm_config_refuses_a_unet_without_its_checkpoint(tmp_path, capsys):
    """config, which scripts use to check a config before a job, passed model.kind = "unet"
    with no checkpoint, which sample then refused."""
    config = tmp_path / "u.toml"
    config.write_text('[model]\nkind = "unet"\n')
    assert main(["config", str(config)]) == 2
    assert "model.checkpoint must name a piadm train checkpoint for model.kind = 'unet'" in \
        capsys.readouterr().err


def test_a_factorys_argument_is_overridden_in_the_form_its_config_gives_it(tmp_path, capsys):
    """--set model.args.NAME was refused as not section.key, and --set model.NAME of an
    argument the config gives under [model.args] as given twice."""
    config = tmp_path / "m.toml"
    config.write_text('[model]\nkind = "module"\ntarget = "x:y"\nprediction = "eps"\n'
                      'process = "ddpm"\n[model.args]\nafter = 3\n')
    for override in ("model.after=40", "model.args.after=40"):
        assert main(["config", str(config), "--set", override]) == 0
        text = capsys.readouterr().out
        assert "after = 40" in text and "after = 3" not in text
    assert main(["config", "jobs/configs/module.toml", "--set", "model.args.sample_size=32"]) == 0
    assert "sample_size = 32" in capsys.readouterr().out  # its args at the top of [model]
    # an argument named like a piadm key (seed, std) is the factory's, in [model.args]: it
    # crashed without a [model.args], was refused with one, and a table replaced the others
    assert main(["config", "jobs/configs/module.toml", "--set", "model.args.seed=3"]) == 0
    text = capsys.readouterr().out
    assert "[model.args]\nseed = 3" in text and "sample_size = 32" in text
    for override, kept in (("model.args.seed=3", "seed = 3"), ("model.args.std={a = 1}", "a = 1")):
        assert main(["config", str(config), "--set", override]) == 0
        text = capsys.readouterr().out
        assert "after = 3" in text and kept in text


def test_piadm_mpi_takes_0_or_1_only(monkeypatch, capsys):
    """PIADM_MPI=true read as off: under mpiexec every rank then ran as a job of its own."""
    monkeypatch.setenv("PIADM_MPI", "true")
    assert main(["config", "jobs/configs/grf.toml"]) == 2
    assert "PIADM_MPI=true: give 1 (launched by MPI) or 0 (not)" in capsys.readouterr().err


def test_a_working_folder_deleted_meanwhile_is_said_in_one_line(tmp_path):
    """The config check failed on a bare 'No such file or directory', and sample in torch's
    libraries (oneMKL: cannot load libtorch_cpu.so)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = (f"mkdir gone && cd gone && rmdir ../gone && exec {sys.executable} -m pipeline.cli "
              f"sample {ROOT / 'jobs/configs/grf.toml'}")
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == ("piadm: error: the working folder no longer exists (deleted or moved "
                          "since this shell entered it): cd to an existing folder and rerun\n")


def test_status_of_thousands_of_items_counts_them_and_lists_those_left_as_runs():
    """A store of 2,000 dates printed a line for each, then 558 indices on one line; items
    alike in a row, a line each."""
    from pipeline.status import state_text as _text

    items = [{"label": f"d{n}", "done": 8 if n < 1442 and n != 7 else 3 * (n == 1442),
              "members": 8} for n in range(2000)]
    state = {"item_dim": "time", "done": sum(i["done"] for i in items), "members": 16000,
             "complete": False, "filling": [], "items": items}
    lines = _text("s.zarr", state).splitlines()
    assert lines[1:] == [
        "  1441 of 2000 items complete; not yet:", "  time d7: 0/8", "  time d1442: 3/8",
        "  time d1443 .. d1999 (557 items): 0/8 each", lines[-1]]
    assert lines[-1] == ("incomplete: rerun the same config to finish (items still to do: 559 "
                         "items: 7, 1442-1999; a job with parallel.items fills only its own)")
    few = dict(state, items=items[:2], done=16, members=16, complete=True)
    assert _text("s.zarr", few).splitlines()[1:] == ["  time d0: 8/8", "  time d1: 8/8",
                                                     "complete"]
    few = dict(state, items=items[:3], done=24, members=24, complete=True)
    assert _text("s.zarr", few).splitlines()[1:] == ["  time d0 .. d2 (3 items): 8/8 each",
                                                     "complete"]
    # 21 items, one left: all of those not complete shown; every other one left: runs capped
    one = [dict(i, done=8) for i in items[:21]]
    one[20]["done"] = 0
    assert _text("s.zarr", dict(state, items=one)).splitlines()[1:3] == [
        "  20 of 21 items complete; not yet:", "  time d20: 0/8"]
    split = [dict(i, done=8 * (n % 2)) for n, i in enumerate(items)]
    lines = _text("s.zarr", dict(state, items=split)).splitlines()
    assert lines[1] == "  1000 of 2000 items complete; not yet (the first 20 runs of items):"
    assert lines[-2] == "  ... and 980 runs more (piadm status --json lists every item)"
    last = lines[-1]
    assert "(items still to do: 1000 items: 0, 2, 4," in last and len(last) < 400
    assert "38, ... (980 runs more: piadm status --json lists every item)" in last


def test_a_launcher_without_mpi4py_is_one_line_said_by_its_rank_0(monkeypatch, capsys):
    """Started under mpiexec in an environment without mpi4py, every command (and the API's
    world) raised a bare ModuleNotFoundError, a traceback on every rank."""
    from pipeline import api

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # its import fails, as when missing
    monkeypatch.setenv("PMI_RANK", "0")
    assert main(["config", "jobs/configs/grf.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("piadm: error: started by an MPI launcher "
                                                   "(PMI_RANK is set), but mpi4py cannot be")
    assert "pip install 'piadm[mpi]'" in err
    monkeypatch.setenv("PMI_RANK", "1")  # the launcher's other ranks say nothing
    assert main(["config", "jobs/configs/grf.toml"]) == 2
    assert capsys.readouterr().err == ""
    with pytest.raises(api.PiadmError, match="mpi4py cannot be imported"):
        api.world()


def test_the_version_names_the_commit_checked_out_not_the_last_install():
    """An editable install (jobs/local/setup.sh makes one) recorded its version when it was
    set up: `piadm --version` and every store's piadm_version named that commit long after,
    whatever code ran."""
    import pipeline

    if not (ROOT / ".git").exists():
        pytest.skip("not the repository's own git work tree")
    head = subprocess.run(["git", "rev-parse", "--short=9", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("git cannot read this work tree")
    version = pipeline._checked_out("0.2.1.dev5+gdeadbeef0")
    assert f"+g{head.stdout.strip()}" in version and version != "0.2.1.dev5+gdeadbeef0"
    assert pipeline._next("0.3.0") == "0.3.1" and pipeline._next("1") == "1.1"
