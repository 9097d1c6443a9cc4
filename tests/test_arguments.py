"""Bad command-line arguments are refused with one line before any costly work: bench's
output paths, --compare tables and flags that do not go together, evaluate's --kmax and
a --truth or store that is not a Zarr store; and the sample summary words a ratio right."""
import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.cli import main
from pipeline.failures import explain
from pipeline.sample_report import against_sequential

TINY = ["--set", "model.shape=[8, 8]", "--set", "sampler.steps=10", "--set",
        "bench.sizes=[[8, 8]]", "--set", "bench.repeats=1"]


def _one_error(capsys) -> str:
    """The error line of a refused command, checked to be the only output: no bench ran."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("piadm: error: "), err
    return err


def _bench(*args) -> int:
    return main(["bench", "jobs/configs/grf.toml", *TINY, *args])


@pytest.mark.parametrize("png, message", [
    ("x.txt", "--png {tmp}/x.txt: '.txt' is not a figure format: end it in .png (or any of "),
    ("plot", "--png {tmp}/plot: it has no suffix: end it in .png"),
    ("a.zarr", "--png {tmp}/a.zarr is a directory: give a file path, e.g. {tmp}/a.zarr/bench.png"),
    ("s.zarr", "--png {tmp}/s.zarr is a Zarr store: give a path outside it, e.g. {tmp}/bench.png"),
])
def test_bench_refuses_a_figure_path_it_cannot_save(tmp_path, capsys, png, message):
    (tmp_path / "a.zarr").mkdir()
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    assert _bench("--png", str(tmp_path / png)) == 2
    assert message.format(tmp=tmp_path) in _one_error(capsys)


def test_bench_figure_formats_are_what_matplotlib_saves():
    from pipeline.figures import save_formats

    assert {"png", "pdf", "svg"} <= save_formats() and "txt" not in save_formats()


def test_a_json_path_of_a_dash_is_refused_not_written_as_a_file_named_dash(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", str(Path(__file__).parents[1] / "jobs/configs/grf.toml"), *TINY,
                 "--json", "-"]) == 2
    assert "--json takes a file path, not '-' (standard output)" in _one_error(capsys)
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("json_path, message", [
    ("a.zarr", "--json {tmp}/a.zarr is a directory: give a file path, e.g. "
               "{tmp}/a.zarr/bench.json"),
    ("afile.txt/b.json", "--json {tmp}/afile.txt/b.json: {tmp}/afile.txt is a file, so no "
                         "folder can be made there"),
    ("", "--json is empty: give a file path, e.g. bench.json"),
])
def test_bench_refuses_a_json_path_it_cannot_write(tmp_path, capsys, json_path, message):
    (tmp_path / "a.zarr").mkdir()
    (tmp_path / "afile.txt").write_text("x")
    assert _bench("--json", str(tmp_path / json_path) if json_path else "") == 2
    assert message.format(tmp=tmp_path) in _one_error(capsys)


def test_an_output_file_that_is_a_file_the_command_reads_is_refused_and_kept(tmp_path, capsys):
    """`--json` naming the config (another spelling, a link) replaced it with the results."""
    import shutil

    config = tmp_path / "b.toml"
    shutil.copy(Path(__file__).parents[1] / "jobs/configs/grf.toml", config)
    text = config.read_text()
    (tmp_path / "link.toml").symlink_to(config)
    (tmp_path / "old.json").write_text("[]")
    for argv, said in (
            (["bench", str(config), *TINY, "--json", f"{tmp_path}/./b.toml"],
             f"--json {tmp_path}/./b.toml is the config, which it would replace"),
            (["plan", str(config), "--ranks", "2", *TINY, "--json", str(tmp_path / "link.toml")],
             f"--json {tmp_path}/link.toml is the config, which it would replace"),
            (["bench", str(config), *TINY, "--png", str(tmp_path / "x.png"), "--compare",
              str(tmp_path / "old.json"), "--json", str(tmp_path / "old.json")],
             f"--json {tmp_path}/old.json is a --compare table ({tmp_path}/old.json)"),
            (["bench", str(config), *TINY, "--json", str(tmp_path / "r.pdf"), "--png",
              str(tmp_path / "r.pdf")], f"--png {tmp_path}/r.pdf is the --json file")):
        assert main(argv) == 2
        assert said in _one_error(capsys)
    assert config.read_text() == text and (tmp_path / "old.json").read_text() == "[]"


def test_an_output_file_that_is_the_models_checkpoint_or_its_folder_is_refused_and_kept(
        tmp_path, capsys):
    """`--json` naming the checkpoint a bench read replaced the trained weights with its
    table, exit 0."""
    import shutil

    shipped = Path(__file__).parents[1] / "models/checkpoints"
    for name in ("kolmogorov_uncond.pt", "kolmogorov_uncond.pt.json"):
        shutil.copy(shipped / name, tmp_path / name)
    ckpt = tmp_path / "kolmogorov_uncond.pt"
    before = ckpt.read_bytes(), Path(f"{ckpt}.json").read_bytes()
    sets = ["--set", f"model.checkpoint={ckpt}", "--set", "model.guide=''", "--set",
            "model.guidance=1.0", "--set", "sampler.steps=10", "--set",
            "bench.methods=['sequential-sde']", "--set", "bench.members=1"]
    config = "jobs/configs/kolmogorov_uncond.toml"
    for argv, said in (
            (["bench", config, *sets, "--json", str(ckpt)],
             f"--json {ckpt} is model.checkpoint ({ckpt}), which it would replace"),
            (["bench", config, *sets, "--json", f"{ckpt}.json"],
             f"--json {ckpt}.json is model.checkpoint's sidecar, which it would replace"),
            (["plan", config, "--ranks", "2", *sets, "--json", f"{ckpt}.json"],
             f"--json {ckpt}.json is model.checkpoint's sidecar")):
        assert main(argv) == 2
        assert said in _one_error(capsys)
    assert (ckpt.read_bytes(), Path(f"{ckpt}.json").read_bytes()) == before
    # a network's folder (diffusers' save_pretrained): a file inside it joins its files
    (tmp_path / "net").mkdir()
    assert main(["bench", "jobs/configs/grf.toml", *TINY, "--set", "model.kind=diffusers",
                 "--set", f"model.path={tmp_path / 'net'}",
                 "--json", str(tmp_path / "net" / "b.json")]) == 2
    assert f"is inside model.path ({tmp_path / 'net'})" in capsys.readouterr().err
    # gmm's model.weights are the mixture's numbers, no file: its --json is written
    assert main(["bench", "jobs/configs/gmm.toml", "--set", "sampler.steps=20", "--set",
                 "bench.members=1", "--set", "bench.methods=['sequential-sde']",
                 "--json", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["rows"]


@pytest.mark.parametrize("command,flag", [
    (["bench", "jobs/configs/grf.toml", *TINY], "--json"),
    (["bench", "jobs/configs/grf.toml", *TINY], "--png"),
    (["plan", "jobs/configs/grf.toml", "--ranks", "2", *TINY], "--json")])
def test_a_json_or_figure_inside_a_zarr_store_is_refused_and_the_store_kept(
        tmp_path, capsys, command, flag):
    # written there it replaced the store's own zarr.json: the store was lost, exit 0
    store = tmp_path / "kept.zarr"
    store.mkdir()
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    target = store / ("zarr.json" if flag == "--json" else "b.png")
    assert main([*command, flag, str(target)]) == 2
    assert f"{flag} {target} is inside the Zarr store {store}: give a path outside it" in (
        _one_error(capsys))
    assert json.loads((store / "zarr.json").read_text())["node_type"] == "group"
    # in an array's folder (a zarr.json of its own): the store is the one named, and the
    # path suggested lies beside it, not in the store's folder
    (store / "field").mkdir()
    (store / "field" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}')
    for target in (store / "field" / "b.png", store / "field"):
        assert main([*command, flag, str(target)]) == 2
        assert (f"{flag} {target} is inside the Zarr store {store}: give a path outside it, "
                f"e.g. {tmp_path}/") in _one_error(capsys)
    if flag == "--json":  # beside the store, by way of "..": written, the store kept
        beside = store / ".." / "beside.json"
        assert main([*command, flag, str(beside)]) == 0 and (tmp_path / "beside.json").is_file()
        assert json.loads((store / "zarr.json").read_text())["node_type"] == "group"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("flag", ["--json", "--png"])
def test_bench_refuses_a_folder_where_no_file_can_be_made(capsys, flag):
    # /proc takes no new file even from root, whom a permission check lets through
    assert _bench(flag, "/proc/bench.png") == 2
    assert f"{flag} /proc/bench.png: cannot write there" in _one_error(capsys)


def test_a_bench_of_one_size_draws_both_panels(tmp_path):
    import warnings

    from pipeline.bench_figures import bench_figure

    rows = [{"method": m, "ranks": 1, "d": 256, "rounds": r, "wall_s": w, "wall_med_s": w}
            for m, r, w in (("sequential-sde", 50, 1.6), ("pc-window", 14, 0.76))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a singular axis it cannot draw
        bench_figure(rows, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0


def test_the_ranks_panel_shows_the_field_measured_on_several_rank_counts(tmp_path, monkeypatch):
    """A 1-rank table of 16x16 compared with a 2-rank run of 8x8 and 16x16: the panel against
    ranks shows d = 256, where both counts have rows, and none when no d has two."""
    from pipeline import bench_figures as figures

    drawn = []
    timed = figures._timed
    monkeypatch.setattr(figures, "_timed", lambda ax, x, rows, **k: drawn.append(
        (tuple(x), tuple(r["d"] for r in rows))) or timed(ax, x, rows, **k))
    row = lambda ranks, d: {"method": "pc-window", "ranks": ranks, "d": d, "rounds": 9,  # noqa: E731
                            "wall_s": 0.1 * ranks}
    figures.bench_figure([row(1, 256), row(2, 64), row(2, 256)], tmp_path / "b.png")
    assert ((1, 2), (256, 256)) in drawn  # the ranks panel, at the d both counts measured
    drawn.clear()
    figures.bench_figure([row(1, 256), row(2, 64)], tmp_path / "c.png")
    assert all(len(set(d)) == len(d) for _, d in drawn) and len(drawn) == 1  # no ranks panel


def test_plan_refuses_a_json_path_that_is_a_directory(tmp_path, capsys):
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "2", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a directory: give a file path" in _one_error(capsys)


def test_a_json_path_of_a_pipe_or_in_the_cache_is_refused_and_a_link_is_written_through(
        tmp_path, capsys, monkeypatch):
    """The JSON is written aside and renamed in: a named pipe (its reader hung) or a device
    became a plain file, a link a file in the link's place, and a path in the cache folder
    replaced every measurement kept there."""
    import os

    from pipeline.processes import replace_text

    os.mkfifo(tmp_path / "fifo")
    args = ["plan", "jobs/configs/grf.toml", "--ranks", "2", "--json"]
    assert main([*args, str(tmp_path / "fifo")]) == 2
    assert "is no regular file (a pipe or a device" in _one_error(capsys)
    assert (tmp_path / "fifo").is_fifo()
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    assert main([*args, str(tmp_path / "cache" / "calibration.json")]) == 2
    assert "is in piadm's cache folder" in _one_error(capsys)
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("real.json")
    replace_text(tmp_path / "link.json", '{"new": 1}')
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads((tmp_path / "real.json").read_text()) == {"new": 1}


@pytest.mark.parametrize("content, problem", [
    ({"kmax": 3, "crps": 0.1}, 'is not a bench table (it has no "rows" list)'),  # evaluate's
    ({"rows": 5}, 'is not a bench table (it has no "rows" list)'),
    ([1, 2], 'is not a bench table (it has no "rows" list)'),
    ({"rows": [5]}, "is not a bench table (row 0 is not an object)"),
    ({"rows": [{"method": "pc-window", "ranks": 1}]}, "(row 0 has no d, rounds, wall_s)"),
    ({"rows": [{"method": "pc-window", "ranks": 1, "d": 64, "rounds": "9", "wall_s": 1.0}]},
     "(row 0's rounds is not a number > 0)"),
    # NaN is what json writes for a missing figure: the graph's axes failed after the bench
    ('{"rows": [{"method": "x", "ranks": 1, "d": NaN, "rounds": 1, "wall_s": 1}]}',
     "(row 0's d is not a number > 0)"),
    ("not json", "is not JSON"),
    (None, "is a directory"),
])
def test_bench_refuses_a_compare_file_that_is_not_a_bench_table(tmp_path, capsys, content,
                                                                problem):
    table = tmp_path / "t.json"
    if content is None:
        table.mkdir()
    else:
        table.write_text(content if isinstance(content, str) else json.dumps(content))
    assert _bench("--png", str(tmp_path / "b.png"), "--compare", str(table)) == 2
    err = _one_error(capsys)
    assert f"--compare {table}" in err and problem in err, err
    assert err.endswith("give JSON tables written by piadm bench --json")
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--renoise", "--quality", "0.1"], "--quality and --renoise are different benches: give one"),
    (["--peer", "diffusers", "--quality", "0.1"], "--quality and --peer are different benches"),
    (["--peer", "diffusers", "--renoise"], "--renoise and --peer are different benches"),
    (["--renoise", "--png", "r.png"], "--png: bench --renoise takes only --json: drop --png"),
    (["--peer", "diffusers", "--json", "p.json"], "--json: bench --peer writes no file: drop"),
    (["--quality", "0.1", "--png", "q.png", "--compare", "t.json"],
     "--compare: bench --quality takes only --json and --png: drop --compare"),
    (["--compare", "t.json"], "--compare adds earlier tables to the --png plot: give --png"),
])
def test_bench_refuses_flags_that_do_not_go_together(capsys, args, message):
    assert _bench(*args) == 2
    assert message in _one_error(capsys)


def test_bench_refuses_an_empty_method_list(capsys):
    assert _bench("--set", "bench.methods=[]") == 2
    assert "bench.methods" in _one_error(capsys)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A complete 8 x 8 ensemble store of two members."""
    path = tmp_path_factory.mktemp("store") / "ens.zarr"
    sets = ["model.shape=[8, 8]", "sampler.steps=10", "sampler.method=sequential-sde",
            "ensemble.members=2", f"output.path={path}"]
    assert main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]) == 0
    return path


@pytest.mark.parametrize("kmax", ["-3", "0"])
def test_evaluate_refuses_kmax_below_one_before_reading(tmp_path, capsys, kmax):
    # no store at all: the argument is refused first
    assert main(["evaluate", str(tmp_path / "none.zarr"), "--truth", "t.zarr", "--kmax", kmax]) == 2
    assert f"--kmax {kmax}: the largest wavenumber scored must be >= 1" in _one_error(capsys)


def test_evaluate_refuses_kmax_past_the_largest_shell(store, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(store), "--truth", str(store), "--truth-variable", "field",
                 "--kmax", "1000", "--out", str(tmp_path / "e")]) == 2
    assert ("--kmax 1000 is past the largest shell of the store's 8x8 fields: give at most 4"
            in _one_error(capsys))
    assert not (tmp_path / "e").exists()


def test_evaluate_takes_kmax_up_to_the_largest_shell(store, tmp_path, capsys):
    # the store as its own truth: a climatology with two dims (item, member) before the field
    assert main(["evaluate", str(store), "--truth", str(store), "--truth-variable", "field",
                 "--kmax", "4", "--out", str(tmp_path / "e"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kmax"] == 4 and len(doc["spectrum_k"]["k"]) == 4
    assert (tmp_path / "e" / "fields.png").exists()


@pytest.mark.parametrize("what", ["a plain file", "an empty folder"])
def test_evaluate_names_a_truth_or_store_that_is_not_a_zarr_store(store, tmp_path, capsys,
                                                                    what):
    path = tmp_path / "afile.txt"
    if what == "a plain file":
        path.write_text("x")
    else:
        path.mkdir()
    capsys.readouterr()
    assert main(["evaluate", str(store), "--truth", str(path)]) == 2
    assert _one_error(capsys) == (
        f"piadm: error: --truth {path} is not a Zarr store: give the store written by piadm "
        "generate-data (or any Zarr store with the truth variable)")
    assert main(["evaluate", str(path), "--truth", str(store)]) == 2
    assert _one_error(capsys) == (f"piadm: error: store {path} is not a Zarr store: give the "
                                  "output.path of a piadm sample run")


def test_a_zarr_read_error_is_not_told_to_check_disk_space(tmp_path):
    import xarray as xr

    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(OSError) as read:
        xr.open_zarr(tmp_path / "afile.txt")
    said = explain(read.value)
    assert said.startswith("cannot read a Zarr store: ") and str(tmp_path / "afile.txt") in said
    assert "disk" not in said and "write" not in said
    full = OSError(errno.ENOSPC, "No space left on device", "out/x.zarr")  # a write's: as before
    assert explain(full) == ("cannot use out/x.zarr: No space left on device: check that the "
                             "path exists, that you may write there and that its disk has space")


@pytest.mark.parametrize("rounds, words", [(22, "took at most 22 rounds (1.1x more)"),
                                           (20, "took at most 20 rounds (as many)"),
                                           (5, "took at most 5 rounds (4.0x fewer)")])
def test_the_sample_summary_says_more_rounds_when_there_were_more(rounds, words):
    from pipeline.config import load_config

    cfg = load_config(None, ["sampler.method=piadm-sde", "sampler.steps=20",
                             "sampler.denoise_final=false"])
    summary = SimpleNamespace(members=2, batch_rounds=rounds, model_calls=30.0)
    line = against_sequential(cfg, summary)
    assert "would take 20 rounds" in line and words in line and "1.5x the calls" in line


@pytest.mark.parametrize("members, seconds, pace", [(2400, 77.0, "31.2 members/s"),
                                                    (6, 30.0, "5.0 s a member")])
def test_the_sample_summary_says_the_pace_when_it_ended_and_what_to_run_next(members, seconds,
                                                                               pace):
    """A batch log read the next day: how fast it went, when it ended, what to do with it."""
    import re

    from pipeline.config import load_config
    from pipeline.run_end import Summary
    from pipeline.sample_report import closing

    cfg = load_config(None, ["sampler.method=sequential-sde"])
    text = closing(cfg, Summary("out/s.zarr", members, 0, 1, 1, 1.0, seconds, 0.1, 0.0, False),
                   start_up=2.0)
    long = " (1:17)" if seconds >= 60 else ""  # a long run's as the log's durations read
    assert f"{seconds:.2f} s{long} sampling, {pace} (after 2.0 s" in text
    assert re.search(r"\n  ended            \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n", text)
    assert text.endswith("piadm status out/s.zarr (--verify reads every member back); piadm "
                         "evaluate out/s.zarr --truth TRUTH_STORE scores it")
    # a path to paste into a shell: quoted where it holds a space
    text = closing(cfg, Summary("my runs/s.zarr", members, 0, 1, 1, 1.0, seconds, 0.1, 0.0,
                                False), start_up=2.0)
    assert "piadm status 'my runs/s.zarr' (--verify" in text


@pytest.mark.parametrize("variable", ["PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"])
def test_a_mistyped_command_line_is_said_by_the_launchers_rank_0_alone(variable, monkeypatch,
                                                                       capsys):
    """Parsed before MPI starts, on every rank: under mpiexec -n 4 the usage and error came
    four times."""
    args = ["sample", "jobs/configs/grf.toml", "--sett", "x=1"]
    monkeypatch.setenv(variable, "1")
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and capsys.readouterr() == ("", "")
    monkeypatch.setenv(variable, "0")
    with pytest.raises(SystemExit):
        main(args)
    assert "unrecognized arguments: --sett x=1 (did you mean '--set'?)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["evaluate", "s.zarr", "--truth", "t.zarr", "--out=~/ev"],
    ["evaluate", "s.zarr", "--truth=~/t.zarr"],
    ["bench", "jobs/configs/grf.toml", "--json=~/b.json"],
    ["bench", "jobs/configs/grf.toml", "--png=~/b.png"],
    ["bench", "jobs/configs/grf.toml", "--compare", "a.json", "~/b.json"],
    ["plan", "jobs/configs/grf.toml", "--ranks", "2", "--json=~"],
    ["status", "~/s.zarr"],
    ["sample", "~/c.toml"],
])
def test_a_path_argument_starting_with_a_tilde_is_a_usage_error(tmp_path, monkeypatch, capsys,
                                                                  argv):
    """The shell leaves "~" as written after "=" or in quotes: evaluate --out=~/ev wrote its
    figures to ./~/ev and its NetCDF (expanded by xarray) to $HOME/ev, then failed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "starts with '~', which piadm does not expand" in err
    assert f"e.g. {tmp_path / 'home'}/" in err or err.rstrip().endswith(str(tmp_path / "home"))
    assert list(tmp_path.iterdir()) == []
