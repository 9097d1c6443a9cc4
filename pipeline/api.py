"""The Python API for workflow scripts: configure, sample, open and evaluate without the CLI.

    from pipeline import api

    cfg = api.load_config("jobs/configs/grf.toml", {"ensemble.members": 8})
    summary = api.sample(cfg)                    # the same run as `piadm sample`
    ds = api.open_ensemble(summary.path)         # xarray.Dataset (item, member, y, x)

Configs come from a TOML file or a nested dict ({"sampler": {"steps": 200}}), and are
validated exactly like the CLI's. Under ``mpiexec`` every rank calls the same functions; the
communicator is taken from the launcher unless one is passed. Every error that a config or
a store causes is a ``PiadmError`` (``ConfigError``, ``StoreExists``, ...) whose message says
what to change; a file the system cannot read or write (a folder that is a file, a full
disk) raises its ``OSError``; Ctrl-C is a ``KeyboardInterrupt`` unless a ``stop`` is given
(``sample``). Under ``mpiexec`` launch scripts with ``python -m mpi4py``, so that an
exception on one rank aborts them all rather than leaving the others waiting.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.comm import MPIComm, SerialComm, world_comm
from pipeline.config import (ConfigError, config_from_dict, place_setting, read_toml,
                             setting_keys)
from pipeline.done_record import done_members
from pipeline.errors import PiadmError, as_user_error, is_system_error  # user errors: PiadmError
from pipeline.settings import SECTION_TYPES, Config
from pipeline.signals import StopRequest
from pipeline.store import StoreExists, field_variable, open_store

__all__ = ["load_config", "sample", "open_ensemble", "evaluate", "world", "PiadmError",
           "ConfigError", "StoreExists"]

# piadm evaluate's flags as its messages name them (not inside a path: "runs/a--kmax.zarr")
EVALUATE_FLAGS = r"(?<![\w./-])--(truth-variable|truth-range|truth|kmax|cut|out)\b"


def load_config(source: str | Path | dict | Config | None = None,
                overrides: dict | None = None) -> Config:
    """A validated ``Config`` from a TOML file, a nested dict {section: {key: value}}, a
    ``Config`` (e.g. one changed with ``dataclasses.replace``) or None (defaults), with
    ``overrides`` {"section.key": value} applied on top."""
    if isinstance(source, Config):  # from its fields: dataclasses.replace keeps the old text
        for name, kind in SECTION_TYPES.items():
            table = getattr(source, name)
            if not isinstance(table, kind):  # e.g. dataclasses.replace(cfg, sampler=None)
                raise ConfigError(
                    f"the Config's {name} is {type(table).__name__} {table!r}, not a "
                    f"{kind.__name__}: change its keys inside it, e.g. dataclasses.replace("
                    f"cfg, {name}=dataclasses.replace(cfg.{name}, KEY=VALUE)), or give "
                    f"load_config(cfg, {{'{name}.KEY': VALUE}})")
        tree = {name: dataclasses.asdict(getattr(source, name)) for name in SECTION_TYPES}
    elif isinstance(source, dict):
        tree = copy.deepcopy(source)
    elif source is None:
        tree = {}
    elif isinstance(source, (str, Path)):
        tree = read_toml(source)
        if not tree:  # a file emptied or cut short by mistake runs on the defaults alone
            warnings.warn(f"config file {source} sets no key: every setting not given in "
                          "overrides takes its default", stacklevel=2)
    else:
        raise ConfigError(f"load_config takes a TOML path, a dict {{section: {{key: value}}}}, a "
                          f"Config or None, not {type(source).__name__}")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"load_config's overrides are a dict {{'section.key': value}}, not "
                          f"{type(overrides).__name__} {overrides!r}")
    for dotted, value in (overrides or {}).items():
        if not isinstance(dotted, str):
            raise ConfigError(f"override {dotted!r} ({type(dotted).__name__}): the keys of "
                              "load_config's overrides are strings 'section.key', e.g. "
                              "'sampler.steps'")
        keys = setting_keys(dotted)
        if keys is None:
            raise ConfigError(f"override {dotted!r}: use 'section.key', e.g. 'sampler.steps' "
                              "(or 'model.args.NAME' for a factory's argument)")
        table = tree.setdefault(keys[0], {})
        if not isinstance(table, dict):
            raise ConfigError(f"override {dotted!r}: [{keys[0]}] must be a table of keys, got "
                              f"{type(table).__name__} {table!r}")
        place_setting(tree, keys, value)
    return config_from_dict(tree)


def world():
    """MPI.COMM_WORLD wrapped when an MPI launcher started this process, else a serial one;
    a ConfigError (a ``PiadmError``) where a launcher did but mpi4py cannot be imported."""
    return world_comm()


class _StopWhen:
    """A ``stop`` given as a function: asked between batches."""

    def __init__(self, ask):
        self.ask = ask

    def __bool__(self) -> bool:
        said = self.ask()
        # "no", or an array, is truthy or ambiguous: a stop on a whim, or numpy's error
        if not (said is None or isinstance(said, (bool, np.bool_))):
            raise TypeError(f"api.sample's stop function returned {type(said).__name__} "
                            f"{said!r}: return True to stop the run, False (or None) to go on")
        return bool(said)


def _communicator(comm):
    """``comm`` as piadm's communicator: ``world()`` for None, an mpi4py one wrapped."""
    if comm is None:
        return world()
    if isinstance(comm, (SerialComm, MPIComm)):
        return comm
    MPI = sys.modules.get("mpi4py.MPI")  # loaded wherever an mpi4py communicator exists
    if MPI is not None and isinstance(comm, MPI.Comm):
        if not comm:  # MPI.COMM_NULL: a rank that Split(MPI.UNDEFINED) left out
            raise TypeError("api.sample's comm is MPI.COMM_NULL, which holds no ranks: call "
                            "api.sample only on the ranks of a communicator (a rank left out "
                            "of a Split gets COMM_NULL)")
        return MPIComm(comm)
    raise TypeError(f"api.sample's comm is an mpi4py communicator (e.g. MPI.COMM_WORLD), "
                    f"api.world() or None, not {type(comm).__name__}")


def sample(cfg: Config | str | Path | dict, *, comm=None, stop=None):
    """Fill ``cfg``'s ensemble store (creating, resuming or growing it) and return the run's
    ``Summary`` (path, members, rounds, model_calls, seconds, ...). ``cfg`` is a ``Config``
    or what ``load_config`` takes, the same on every rank; ``comm`` an mpi4py communicator,
    ``world()`` or None (``world()``); ``stop`` an optional ``pipeline.signals.StopRequest``
    (``.install()`` it for SIGTERM and Ctrl-C; main thread only) or a function of no
    arguments that returns True once the run should stop (False or None until then), asked
    during start-up (between calibration rungs) and before each call; anything else is a
    TypeError."""
    from pipeline.signals import Stopped
    from pipeline.console import on_every_rank
    from pipeline.ensemble import not_begun, sample_to_store
    from pipeline.layout import torch_settings_kept
    from pipeline.startup import start
    from pipeline.console import print0
    from pipeline.plan_store import on_the_stores_plan

    comm = _communicator(comm)
    if callable(stop) and not isinstance(stop, StopRequest):
        try:  # asked with no arguments: a function that needs some failed mid start-up
            inspect.signature(stop).bind()
        except TypeError:
            raise TypeError(f"api.sample's stop is a function of no arguments, not {stop!r}, "
                            f"which takes {inspect.signature(stop)}: e.g. stop=lambda: "
                            "event.is_set()") from None
        except ValueError:  # no signature to read (a builtin): asked as it is
            pass
        stop = _StopWhen(stop)
    elif stop is not None and not isinstance(stop, StopRequest):
        raise TypeError(f"api.sample's stop is a pipeline.signals.StopRequest, a function of "
                        f"no arguments or None, not {type(stop).__name__}")
    # a Config too: checked anew, its text made from its fields; a file that one node lacks
    # fails on every rank, not on that rank alone while the others wait for it
    cfg = on_every_rank(comm, load_config, cfg)

    def once():
        try:
            started = start(comm, cfg, "api.sample", stored=True, plan=True, stop=stop)
        except Stopped:  # as a stop before the first batch: nothing written
            return not_begun(cfg.output.path)
        planned, ranks, device, attrs = started  # the config with the plan's settings
        return sample_to_store(planned, ranks=ranks, device=device, stop=stop, attrs=attrs)

    def run():
        return on_the_stores_plan(once, lambda text: print0(comm, f"api.sample: {text}"))

    with torch_settings_kept():
        return _as_user(run, "sample")


def _as_user(run, command: str):
    """``run()``, memory or a thread run out outside a sampled batch raised as the one-line
    ``OutOfMemory`` the command line gives (``errors.as_user_error``), not torch's error."""
    try:
        return run()
    except Exception as err:
        mended = as_user_error(err, command)
        if mended is err:
            raise
    # raised here, not in the except: neither its context nor its traceback keeps the failed
    # call's frames, whose tensors (on a GPU) a script retrying with less would still hold
    raise mended


def _check_path(what: str, path, to: str = "Zarr store") -> None:
    """Raise TypeError, saying what to give, where ``path`` is no path (pathlib's own error
    names neither the argument nor the fix)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} is a path (str or pathlib.Path) to a {to}, not "
                        f"{type(path).__name__}")


def open_ensemble(path: str | Path) -> xr.Dataset:
    """The ensemble store at ``path`` as a lazy ``xarray.Dataset``; a store that ``piadm
    sample`` did not make is refused (read it with ``xarray.open_zarr``). Members not yet
    marked done are masked as NaN, with a warning."""
    _check_path("api.open_ensemble's path", path)
    if not Path(path).exists():
        raise ConfigError(f"{path} does not exist: give the output.path of a piadm sample run")
    try:
        ds = open_store(path)
    except Exception as err:  # zarr's errors for a non-store (a folder, a file, an array)
        if is_system_error(err):
            raise  # a store it may not read, a failing disk: the I/O error names the file
        raise ConfigError(f"{path} is not a Zarr store: give the output.path of a piadm "
                          "sample run") from None
    if "piadm_store_digest" not in ds.attrs:
        raise ConfigError(f"{path} is not a piadm ensemble store (it has no piadm_store_digest "
                          "attribute): open other Zarr stores with xarray.open_zarr")
    flags = done_members(path)  # a damaged record is said, with its repair
    done, total = int(flags.sum()), int(flags.size)
    if done < total:
        # a member is written before it is marked done: one not marked may hold values (a
        # run killed in between), which statistics over members must not take for its own
        name = field_variable(ds)
        ds[name] = ds[name].where(ds["done"] == 1)
        warnings.warn(f"{path} holds {done} of its {total} members (the rest are masked as "
                      "NaN): rerun its piadm sample to finish it (piadm status says which)",
                      stacklevel=2)
    return ds


def evaluate(store: str | Path, truth: str | Path, **options) -> xr.Dataset:
    """Score ``store`` against ``truth`` as ``piadm evaluate`` does (same options:
    truth_variable, truth_range, kmax, cut, out, figures); returns the metrics dataset, whose
    attributes hold the overall figures."""
    from pipeline.errors import EvaluationError, did_you_mean
    from pipeline.scoring import evaluate as _evaluate

    # its keywords are scoring.evaluate's, whose TypeError would name neither
    known = [k for k, p in inspect.signature(_evaluate).parameters.items()
             if p.kind == p.KEYWORD_ONLY and k != "progress"]
    for name in options:
        if name not in known:
            raise TypeError(f"api.evaluate has no option {name!r}{did_you_mean(name, known)}: "
                            f"it takes {', '.join(known)}")
    _check_path("api.evaluate's store", store)
    _check_path("api.evaluate's truth", truth)
    if options.get("out") is not None:
        _check_path("api.evaluate's out", options["out"], "folder for its files")
    if not isinstance(options.get("figures", True), bool):
        raise TypeError(f"api.evaluate's figures={options['figures']!r}: give True (the PNGs "
                        "too, the default) or False (the scores alone)")
    try:
        metrics, _ = _as_user(lambda: _evaluate(store, truth, **options), "evaluate")
    except EvaluationError as err:  # its messages name the CLI's flags: name the keywords
        raise EvaluationError(re.sub(EVALUATE_FLAGS, lambda m: m[1].replace("-", "_"),
                                     str(err))).with_traceback(err.__traceback__) from None
    return metrics
