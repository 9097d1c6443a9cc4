"""The Python API: dict configs validate like files, and the API's run equals the CLI's (the
example of docs/api.md runs in tests/test_readme.py)."""

import json
import traceback

import numpy as np
import pytest
import zarr

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
    # a factory's argument, as --set model.args.NAME takes it: it became one named "args.seed"
    cfg = api.load_config("jobs/configs/module.toml", {"model.args.seed": 3})
    assert cfg.model.args["seed"] == 3 and "args.seed" not in cfg.model.args


def test_wrong_argument_types_are_config_errors_and_numpy_scalars_are_numbers():
    with pytest.raises(ConfigError, match="overrides are a dict"):
        api.load_config("jobs/configs/grf.toml", ["sampler.steps=5"])
    with pytest.raises(ConfigError, match="a TOML path, a dict"):
        api.load_config(5)
    with pytest.raises(ConfigError, match=r"\[sampler\] must be a table"):
        api.load_config({"sampler": 5})
    with pytest.raises(ConfigError, match="sampler.tol must be float or str, got bool"):
        api.load_config(None, {"sampler.tol": True})
    cfg = api.load_config(None, {"sampler.steps": np.int64(40), "model.length": np.float32(2)})
    assert (cfg.sampler.steps, cfg.model.length) == (40, 2.0) and type(cfg.sampler.steps) is int
    module = {"kind": "module", "target": "byo_nets:float64_out"}
    for source, overrides in (({1: {}}, None), ({"sampler": {1: 2}}, None),
                              ({"model": {**module, "args": {1: 2}}}, None),
                              ({"model": {**module, "args": {"a": {1: 3}}}}, None)):
        with pytest.raises(ConfigError, match=r"the key 1 \(int\) is not a name"):
            api.load_config(source, overrides)
    for key in (1, ("sampler", "steps")):
        with pytest.raises(ConfigError, match=r"keys of load_config's overrides are strings"):
            api.load_config(None, {key: 2})


def test_paths_and_numpy_arrays_from_a_script_are_taken_as_their_values(tmp_path):
    cfg = api.load_config(None, {"output.path": tmp_path / "a.zarr",
                                 "model.shape": np.array([16, 16])})
    assert cfg.output.path == str(tmp_path / "a.zarr") and cfg.model.shape == (16, 16)
    assert all(type(n) is int for n in cfg.model.shape)


def test_a_key_outside_every_section_names_the_sections_it_belongs_to(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'tol' is outside every section: put it under "
                                          r"\[sampler\]"):
        api.load_config({"tol": 1e-3})
    (tmp_path / "c.toml").write_text("steps = 3\n[sampler]\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"put it under \[sampler\] or \[train\]"):
        api.load_config(tmp_path / "c.toml")


def test_an_empty_config_file_is_said_to_set_nothing(tmp_path):
    """As on the command line: a file emptied by mistake would run quietly on the defaults."""
    import warnings

    empty, one = tmp_path / "empty.toml", tmp_path / "one.toml"
    empty.write_text("# nothing yet\n")
    one.write_text("[sampler]\nsteps = 10\n")
    with pytest.warns(UserWarning, match=f"config file {empty} sets no key"):
        assert api.load_config(empty).sampler.steps == api.load_config().sampler.steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert api.load_config(one).sampler.steps == 10
        api.load_config({})  # a dict of no keys is a choice, not a file cut short


def test_a_set_with_spaces_around_the_equals_sign_reads_as_without():
    from pipeline.config import load_config

    cfg = load_config("jobs/configs/grf.toml", ["sampler.steps = 7", " sampler . seed=3 "])
    assert (cfg.sampler.steps, cfg.sampler.seed) == (7, 3)


def test_sample_takes_what_load_config_takes(tmp_path):
    tree = {"model": {"shape": [8, 8]}, "sampler": {"steps": 10, "block_size": 5},
            "ensemble": {"members": 2, "batch_size": 2},
            "output": {"path": str(tmp_path / "d.zarr")}}
    assert api.sample(tree).members == 2


def test_stop_may_be_a_function_asked_between_batches(tmp_path):
    tree = {"model": {"shape": [8, 8]}, "sampler": {"steps": 10, "block_size": 5},
            "ensemble": {"members": 4, "batch_size": 2},
            "output": {"path": str(tmp_path / "d.zarr"), "background": False}}
    def after_one_batch():
        store = tmp_path / "d.zarr"
        return store.exists() and int(zarr.open_group(store, mode="r")["done"][:].sum()) >= 2

    stopped = api.sample(tree, stop=after_one_batch)
    assert stopped.preempted and stopped.members == 2
    history = json.loads(zarr.open_group(tmp_path / "d.zarr", mode="r").attrs["piadm_history"])
    assert history[-1].endswith("piadm stopped on request after 2 members")  # no signal came
    resumed = api.sample(tree, stop=lambda: False)  # a function is not a stop by being one
    assert not resumed.preempted and (resumed.members, resumed.skipped) == (2, 2)


def test_a_store_or_truth_that_is_no_path_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="api.open_ensemble's path is a path .* not int"):
        api.open_ensemble(3)
    with pytest.raises(TypeError, match="api.evaluate's truth is a path .* not ndarray"):
        api.evaluate("e.zarr", np.zeros(3))
    with pytest.raises(TypeError, match="api.evaluate's out is a path .* folder .* not int"):
        api.evaluate("e.zarr", "t.zarr", out=3)
    with pytest.raises(TypeError, match=r"api.evaluate's figures='no': give True .* or False"):
        api.evaluate("e.zarr", "t.zarr", figures="no")


def test_a_comm_that_is_no_communicator_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="an mpi4py communicator .* not dict"):
        api.sample({"output": {"path": str(tmp_path / "d.zarr")}}, comm={})
    assert not (tmp_path / "d.zarr").exists()
    from mpi4py import MPI

    with pytest.raises(TypeError, match="comm is MPI.COMM_NULL, which holds no ranks"):
        api.sample({"output": {"path": str(tmp_path / "d.zarr")}}, comm=MPI.COMM_NULL)
    assert not (tmp_path / "d.zarr").exists()
    for stop in ("yes", True):  # truthy, it would have stopped the run before it began
        with pytest.raises(TypeError, match=f"a function of no arguments or None, not "
                                            f"{type(stop).__name__}"):
            api.sample({"output": {"path": str(tmp_path / "d.zarr")}}, stop=stop)
    assert not (tmp_path / "d.zarr").exists()


def test_a_comm_or_stop_that_only_looks_right_is_a_type_error_naming_it(tmp_path):
    """An object with Get_rank and Allgather, or the communicator class itself, got past the
    check into an AttributeError of the wrapper; a stop function that needs an argument, or
    answers with an array, failed mid start-up with an error of its own."""
    from mpi4py import MPI

    tree = {"model": {"shape": [8, 8]}, "sampler": {"steps": 10},
            "ensemble": {"members": 2}, "output": {"path": str(tmp_path / "d.zarr")}}

    class LooksLikeOne:
        def Get_rank(self):
            return 0

        def Allgather(self, *args):
            pass

    for comm, name in ((LooksLikeOne(), "LooksLikeOne"), (MPI.Intracomm, "type")):
        with pytest.raises(TypeError, match=f"an mpi4py communicator .* not {name}$"):
            api.sample(tree, comm=comm)
    with pytest.raises(TypeError, match=r"stop is a function of no arguments, not .* which "
                                        r"takes \(x\)"):
        api.sample(tree, stop=lambda x: True)
    for said in (np.array([0, 1]), "no"):
        with pytest.raises(TypeError, match=f"stop function returned {type(said).__name__} "
                                            ".*: return True to stop the run"):
            api.sample(tree, stop=lambda said=said: said)
    assert not (tmp_path / "d.zarr").exists()
    assert not api.sample(tree, stop=lambda: np.bool_(False)).preempted  # numpy's bool is one


def test_a_config_whose_section_is_replaced_by_no_section_names_it():
    import dataclasses

    cfg = api.load_config("jobs/configs/grf.toml")
    for bad in (None, "x", {"steps": 5}):
        with pytest.raises(ConfigError, match=f"the Config's sampler is {type(bad).__name__} "
                                              r".*dataclasses.replace\(cfg, sampler="):
            api.load_config(dataclasses.replace(cfg, sampler=bad))


def test_a_stop_request_outside_the_main_thread_says_what_to_give_instead():
    import threading

    from pipeline.signals import StopRequest

    said = []

    def worker():
        try:
            StopRequest().install()
        except RuntimeError as err:
            said.append(str(err))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert said and "give api.sample a function as stop=" in said[0]


def test_open_ensemble_refuses_a_store_piadm_did_not_make(tmp_path):
    import xarray as xr

    xr.Dataset({"a": ("x", np.zeros(3))}).to_zarr(tmp_path / "plain.zarr")
    with pytest.raises(ConfigError, match="is not a piadm ensemble store"):
        api.open_ensemble(tmp_path / "plain.zarr")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for other in ("folder", "file.txt", "plain.zarr/a"):  # an array of a store too
        with pytest.raises(ConfigError, match=f"{other} is not a Zarr store"):
            api.open_ensemble(tmp_path / other)


def test_open_ensemble_warns_of_members_not_yet_written(tmp_path):
    """Statistics over members skip NaN: an unfinished store's would be of its done members
    alone, so opening one says so."""
    import warnings

    import zarr

    cfg = {"model": {"shape": [8, 8]}, "sampler": {"steps": 10, "block_size": 5},
           "ensemble": {"members": 4, "batch_size": 2},
           "output": {"path": str(tmp_path / "d.zarr")}}
    api.sample(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete store: nothing said
        api.open_ensemble(tmp_path / "d.zarr")
    zarr.open_group(tmp_path / "d.zarr", mode="r+")["done"][0, 2:] = 0
    with pytest.warns(UserWarning, match="d.zarr holds 2 of its 4 members"):
        ds = api.open_ensemble(tmp_path / "d.zarr")
    # written but not marked done (a run killed between the two): masked, as it says
    assert np.isnan(ds.field[0, 2:]).all() and np.isfinite(ds.field[0, :2]).all()


def test_evaluate_errors_name_the_keyword_arguments(tmp_path):
    from pipeline.errors import EvaluationError

    cfg = api.load_config("jobs/configs/grf.toml", {
        "model.shape": [8, 8], "sampler.steps": 10, "sampler.block_size": 5,
        "ensemble.members": 2, "ensemble.batch_size": 2, "output.path": str(tmp_path / "e.zarr")})
    path = api.sample(cfg).path
    with pytest.raises(EvaluationError, match=r"^kmax 99 is past the largest shell") as err:
        api.evaluate(path, path, kmax=99)
    assert "--" not in str(err.value)
    with pytest.raises(EvaluationError, match="runs--kmax.zarr"):  # a path keeps its name
        api.evaluate(tmp_path / "runs--kmax.zarr", path)
    for keyword, value in (("kmax", "8"), ("kmax", 8.5), ("cut", "8")):
        with pytest.raises(EvaluationError, match=f"^{keyword} {value!r}: give a whole number"):
            api.evaluate(path, path, **{keyword: value})
    for value in ("35", ("21", "21.5", "22"), (True, False)):  # a string: letter by letter
        with pytest.raises(EvaluationError, match=r"^truth_range .*: give two labels"):
            api.evaluate(path, path, truth_range=value)
    # every bad truth is an EvaluationError, a complex one too (it was the input's own error)
    import xarray as xr

    truth = xr.open_zarr(path).field.isel(member=0).drop_vars("member").astype("complex64")
    xr.Dataset({"field": truth}).to_zarr(tmp_path / "complex.zarr", zarr_format=3)
    with pytest.raises(EvaluationError, match="holds complex64 values"):
        api.evaluate(path, tmp_path / "complex.zarr")


def test_every_error_a_user_causes_is_one_piadm_error_and_keeps_its_builtin_kind(tmp_path):
    """A workflow script catches api.PiadmError for whatever its config, files or stores cause,
    and an older ``except FileExistsError`` (or ValueError, ...) still takes what it took."""
    from models.export import ExportError
    from models.module import WrongShape
    from pipeline.errors import EvaluationError
    from pipeline.samplers.options import PicardDivergence
    from pipeline.status import NotAStore
    from pipeline.store import StoreExists

    kinds = {ConfigError: ValueError, StoreExists: FileExistsError, NotAStore: FileNotFoundError,
             EvaluationError: ValueError, WrongShape: ValueError, ExportError: ValueError,
             PicardDivergence: RuntimeError}
    for error, builtin in kinds.items():
        assert issubclass(error, api.PiadmError) and issubclass(error, builtin), error
    cfg = {"model": {"shape": [8, 8]}, "sampler": {"steps": 10, "block_size": 5},
           "ensemble": {"members": 2, "batch_size": 2},
           "output": {"path": str(tmp_path / "d.zarr")}}
    (tmp_path / "d.zarr").mkdir()
    (tmp_path / "d.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(api.PiadmError, match="is not a piadm store"):
        api.sample(cfg)
    with pytest.raises(api.PiadmError, match="is not a Zarr store"):
        api.open_ensemble(tmp_path / "d.zarr")
    with pytest.raises(api.PiadmError, match="nothing.zarr does not exist: give the output.path"):
        api.open_ensemble(tmp_path / "nothing.zarr")
    with pytest.raises(api.PiadmError):
        api.evaluate(tmp_path / "d.zarr", tmp_path / "d.zarr")
    assert (tmp_path / "d.zarr" / "notes.txt").read_text() == "mine"


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


def test_a_config_changed_with_dataclasses_replace_is_checked_and_recorded_as_changed(tmp_path):
    """Config is frozen, so a script changes one with dataclasses.replace, which keeps the
    old text: the store records the settings it was sampled with, and bad values are
    refused as a config error."""
    import dataclasses
    import tomllib

    import xarray as xr

    cfg = api.load_config({"model": {"shape": [8, 8]}, "sampler": {"steps": 10},
                           "ensemble": {"members": 2, "batch_size": 2},
                           "output": {"path": str(tmp_path / "r.zarr")}})
    changed = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, steps=12))
    api.sample(changed)
    ds = xr.open_zarr(tmp_path / "r.zarr")
    assert ds.attrs["sampler_steps"] == 12 and "steps = 12" in ds.attrs["config"]
    again = api.sample(tomllib.loads(ds.attrs["config"]))  # the store's own config resumes it
    assert (again.members, again.skipped) == (0, 2)
    with pytest.raises(ConfigError, match="sampler.steps"):
        api.sample(dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, steps=-5)))
    with pytest.raises(ConfigError, match=r"\[sampler\] must be a table"):
        api.load_config({"sampler": 5}, {"sampler.steps": 3})


def test_sample_gives_torchs_threads_and_precision_flags_back(tmp_path):
    """A script goes on after the call: its threads and float32 precision are its own (torch's
    older allow_tf32 getters raise once a flag is "ieee", as the run sets them)."""
    import torch

    from test_layout import _cuda_float32_modes

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    before = _cuda_float32_modes()
    try:
        api.sample({"model": {"shape": [8, 8]}, "sampler": {"steps": 10},
                    "ensemble": {"members": 2, "batch_size": 2},
                    "output": {"path": str(tmp_path / "t.zarr")}, "parallel": {"threads": 1}})
        assert torch.get_num_threads() == 3
        assert _cuda_float32_modes() == before
    finally:
        torch.set_num_threads(threads)


def test_a_keyboard_interrupt_leaves_no_writer_thread_behind(tmp_path):
    """A script that catches the KeyboardInterrupt goes on: the background writer's thread
    ends (after the write under way), and a rerun resumes what was written."""
    import threading
    import time

    tree = {"model": {"shape": [8, 8]}, "sampler": {"steps": 10},
            "ensemble": {"members": 8, "batch_size": 1},
            "output": {"path": str(tmp_path / "k.zarr"), "background": True}}
    asked = []

    def interrupt():
        asked.append(1)
        if len(asked) == 6:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        api.sample(tree, stop=interrupt)
    writers = lambda: [t for t in threading.enumerate() if t.name == "piadm-writer"]  # noqa: E731
    for _ in range(100):
        if not writers():
            break
        time.sleep(0.05)
    assert not writers()
    resumed = api.sample(tree)
    assert resumed.members + resumed.skipped == 8 and not resumed.preempted


def test_a_stop_request_in_a_with_block_stops_the_run_and_gives_the_handlers_back(tmp_path):
    import os
    import signal

    from pipeline.signals import StopRequest

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    tree = {"model": {"shape": [8, 8]}, "sampler": {"steps": 10},
            "ensemble": {"members": 4, "batch_size": 2},
            "output": {"path": str(tmp_path / "s.zarr")}}
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the run stops before its first batch
        stopped = api.sample(tree, stop=stop)
    assert stopped.preempted and stopped.members == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert api.sample(tree).members == 4


def test_evaluate_leaves_the_scripts_matplotlib_backend_as_it_was(tmp_path):
    import matplotlib

    cfg = api.load_config("jobs/configs/grf.toml", {
        "model.shape": [8, 8], "sampler.steps": 10, "sampler.method": "sequential-sde",
        "ensemble.members": 2, "ensemble.batch_size": 2, "output.path": str(tmp_path / "m.zarr")})
    path = api.sample(cfg).path
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        api.evaluate(path, path, out=tmp_path / "eval")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "eval" / "spectrum.png").stat().st_size > 0
    finally:
        matplotlib.use(before)


def test_an_error_agreed_on_by_the_ranks_shows_its_message_once(tmp_path):
    """A user error raised while the ranks agree on it (a model the checkpoint was not trained
    for) is one traceback through where it was raised, not the same line twice."""
    cfg = api.load_config("jobs/configs/kolmogorov_down.toml",
                          {"model.shape": [32, 32], "output.path": str(tmp_path / "x.zarr")})
    with pytest.raises(ConfigError, match="was trained on") as caught:
        api.sample(cfg)
    err = caught.value
    assert err.__cause__ is None and err.__suppress_context__
    assert any(frame.name == "load_unet" and frame.filename.endswith("models/learned.py")
               for frame in traceback.extract_tb(err.__traceback__))


def test_memory_run_out_outside_a_batch_is_the_same_user_error_as_on_the_command_line(
        tmp_path, monkeypatch):
    """A field too large to build raised torch's RuntimeError through the API, where piadm
    sample says one line naming what to lower."""
    from models import grf

    def no_room(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 40000800000 bytes")

    monkeypatch.setattr(grf, "wavenumbers", no_room)
    cfg = api.load_config("jobs/configs/grf.toml", {"model.shape": [8, 8], "sampler.tol": 0.1,
                                                    "output.path": str(tmp_path / "m.zarr")})
    with pytest.raises(api.PiadmError, match=r"^sample: out of memory \(\[enforce fail.*\): "
                                             r"lower what runs at once") as raised:
        api.sample(cfg)
    import traceback  # nor does it keep the failed call's frames (a GPU's tensors) alive

    assert raised.value.__context__ is None and raised.value.__cause__ is None
    assert "no_room" not in [f.name for f in traceback.extract_tb(raised.value.__traceback__)]


def test_evaluate_names_an_unknown_option_and_the_closest(tmp_path):
    with pytest.raises(TypeError, match=r"^api.evaluate has no option 'kmaxx' \(did you mean "
                                        r"'kmax'\?\): it takes truth_variable, truth_range, "
                                        r"kmax, cut, out, figures$"):
        api.evaluate(tmp_path / "s.zarr", tmp_path / "t.zarr", kmaxx=3)
