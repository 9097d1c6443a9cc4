"""``piadm generate-data``: Kolmogorov-flow vorticity snapshots written to Zarr as they come.

One trajectory from a seeded random start: ``spinup`` time units are simulated and dropped,
then a snapshot every ``interval``. Each chunk of snapshots is written when it is complete, so
memory stays at one chunk whatever the run length. Variables: ``vorticity(time, y, x)`` and
its block average ``vorticity_coarse(time, y_coarse, x_coarse)``, with CF attributes and the
marker ``piadm_dataset``: ``data.overwrite`` deletes only a store that carries it, and only
once its replacement is complete (it is made beside it, then renamed into place), so a failed or
interrupted overwrite keeps the dataset it was to replace.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import tomllib
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import xarray as xr
import zarr

import pipeline
from pipeline.config import config_from_dict
from pipeline.console import on_terminal
from pipeline.errors import ConfigError, Interrupted, PiadmError, WriteFailed, naming
from pipeline.host_memory import format_bytes
from pipeline.kolmogorov import (Flow, Spectral, advance, coarse_grain, random_vorticity,
                                 resolved_wavenumber)
from pipeline.memory import available_bytes
from pipeline.processes import Held, hold_lock, left_by_dead, own_name
from pipeline.settings import DataConfig
from pipeline.signals import signal_of
from pipeline.store import StoreExists, consolidate, enclosing_store


# says generate-data made the store; its value: piadm's version and the fields' shape as made,
# "0.9.0 1600x64x64" (an older dataset's: the version alone); a string, as netCDF allows
MARKER = "piadm_dataset"
VARIABLES = ("vorticity", "vorticity_coarse")
ARRAYS = {*VARIABLES, "time", "y", "x", "y_coarse", "x_coarse"}  # all a dataset holds


def _axis(n: int) -> np.ndarray:
    return np.arange(n) * (2 * math.pi / n)


def _ours(path: Path) -> zarr.Group | None:
    """The dataset at ``path`` opened to read, where generate-data made it (else None): it
    carries ``MARKER`` or (made before the marker) generate-data's ``source`` attribute and
    both variables, and holds nothing else (a store derived from a dataset keeps its
    attributes, not its arrays alone)."""
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, ValueError, KeyError, NotADirectoryError):
        return None  # a plain folder or file: not a zarr group
    names, source = set(group.array_keys()), str(group.attrs.get("source", ""))
    legacy = source.startswith("piadm ") and source.endswith(" generate-data")
    made = MARKER in group.attrs or (legacy and set(VARIABLES) <= names)
    _, _, shape = str(group.attrs.get(MARKER, "")).partition(" ")
    if shape:  # a cut of a dataset keeps the marker, not the shape it names
        made = "vorticity" in names and "x".join(map(str, group["vorticity"].shape)) == shape
    return group if made and names <= ARRAYS and not set(group.group_keys()) else None


def _check_target(d: DataConfig) -> None:
    """Refuse, before anything is simulated, a data.path that exists and may not be replaced: anything generate-data did not make, and its own datasets
    unless data.overwrite."""
    path = Path(d.path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink():  # rmtree refuses a link: the dataset itself is to be named
        raise StoreExists(f"data.path {path} is a symbolic link (to {os.path.realpath(path)}), "
                          "through which piadm does not write or replace a dataset: point "
                          "data.path at the folder itself, or choose another data.path")
    group = _ours(path)
    if group is None:
        raise StoreExists(f"data.path {path} exists and is not a dataset piadm generate-data "
                          "made, which data.overwrite = true will not delete either: move it "
                          "away, or choose another data.path")
    if not d.overwrite:
        left = ("holds what an interrupted run left of a dataset" if not _complete(group)
                else f"already holds a dataset of other [data] settings{_differences(group, d)}")
        raise StoreExists(f"data.path {path} {left}: set data.overwrite = true to make it "
                          "anew, or choose another data.path")


def _made_with(group: zarr.Group) -> DataConfig | None:
    """The [data] settings the dataset ``group`` records it was made with; None where its
    config cannot be read."""
    try:
        return config_from_dict(tomllib.loads(str(group.attrs.get("config", "")))).data
    except (ValueError, TypeError, KeyError):  # ConfigError and TOMLDecodeError among them
        return None


def _differences(group: zarr.Group, d: DataConfig) -> str:
    """" (data.seed 0 there, 3 here; ...)": the [data] settings in which the dataset of
    ``group`` was made otherwise than ``d`` asks, where its config can be read."""
    then = _made_with(group)
    if then is None:
        return ""
    differ = [f"data.{f.name} {getattr(then, f.name)!r} there, {getattr(d, f.name)!r} here"
              for f in dataclasses.fields(d) if f.name not in ("path", "overwrite")
              and getattr(then, f.name) != getattr(d, f.name)]
    return f" ({'; '.join(differ)})" if differ else ""


def _complete(group: zarr.Group) -> bool:
    """Whether the dataset ``group`` was finished: its metadata is consolidated last."""
    return group.metadata.consolidated_metadata is not None


def already_made(d: DataConfig) -> bool:
    """Whether data.path holds the finished dataset of ``d``'s settings (its path and
    overwrite aside): a rerun (a script's, a shard loop's) has nothing to do."""
    group = None if d.overwrite or not Path(d.path).is_dir() else _ours(Path(d.path))
    if group is None or not _complete(group):
        return False
    then = _made_with(group)
    return then is not None and dataclasses.replace(then, path=d.path, overwrite=False) == d


def _empty(d: DataConfig, config_text: str) -> xr.Dataset:
    n, m = d.resolution, d.resolution // d.coarse_factor
    times = d.spinup + d.interval * np.arange(1, d.snapshots + 1)
    fine = da.zeros((d.snapshots, n, n), dtype="float32", chunks=(d.chunk, n, n))
    coarse = da.zeros((d.snapshots, m, m), dtype="float32", chunks=(d.chunk, m, m))
    # A coarse cell averages fine points c*f .. c*f + f-1: its position is their mean.
    centre = _axis(m) + (d.coarse_factor - 1) / 2 * (2 * math.pi / n)
    ds = xr.Dataset(
        {"vorticity": (("time", "y", "x"), fine),
         "vorticity_coarse": (("time", "y_coarse", "x_coarse"), coarse)},
        coords={"time": times, "y": _axis(n), "x": _axis(n), "y_coarse": centre,
                "x_coarse": centre},
    )
    ds.time.attrs.update(long_name="time", units="1", axis="T",
                         comment="nondimensional: lengths in units of the domain / 2 pi, "
                                 "data.forcing the body force's amplitude in those units")
    for name in ("y", "x", "y_coarse", "x_coarse"):
        ds[name].attrs.update(long_name=f"{name[0]} position on [0, 2 pi)", units="1",
                              axis=name[0].upper())
    # evaluate's spectral bands end here: the solver keeps no finer scale (its 2/3 rule)
    ds.vorticity.attrs.update(long_name="relative vorticity", units="1",
                              resolved_wavenumber=resolved_wavenumber(n))
    ds.vorticity_coarse.attrs.update(long_name=f"relative vorticity, {d.coarse_factor}x"
                                     f"{d.coarse_factor} block average", units="1")
    ds.attrs.update(Conventions="CF-1.10", title="Kolmogorov flow, 2-D incompressible "
                    "Navier-Stokes", source=f"piadm {pipeline.__version__} generate-data",
                    config=config_text, history=f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                    "created by piadm generate-data")
    ds.attrs[MARKER] = f"{pipeline.__version__} {d.snapshots}x{n}x{n}"
    # the flow's parameters as plain attributes, for a reader without piadm's config
    ds.attrs.update(
        equation="d omega/dt + u . grad omega = viscosity lap omega - drag omega "
                 "- forcing forcing_wavenumber cos(forcing_wavenumber y) on [0, 2 pi)^2, "
                 "u = (d psi/dy, -d psi/dx), lap psi = -omega",
        viscosity=d.viscosity, drag=d.drag, forcing=d.forcing,
        forcing_wavenumber=d.forcing_wavenumber, seed=d.seed, spinup=d.spinup,
        interval=d.interval, coarse_method=f"{d.coarse_factor}x{d.coarse_factor} block average "
                                           "at the blocks' centres")
    return ds


# the longest silence between progress lines: on a terminal, and in a batch log, where a
# shard's hours of spin-up and snapshots would otherwise write thousands of lines
PROGRESS_S, LOG_PROGRESS_S = 5.0, 30.0


def _every(seconds: float, progress):
    """``progress``, but passing on at most one line each ``seconds``."""
    last = [time.perf_counter()]

    def say(line: str) -> None:
        now = time.perf_counter()
        if now - last[0] >= seconds:
            last[0] = now
            progress(line)

    return say


DRAFT, ASIDE = "generating", "replaced"  # .NAME.DRAFT-HOST-PID: a replacement being made


def _beside(path: Path, kind: str) -> Path:
    return path.with_name(own_name(f".{path.name}.{kind}-"))


def _delete_leftovers(path: Path) -> None:
    """Mend what a generate-data killed on this host left beside ``path`` (its process gone;
    another host's are left alone): killed between moving the old dataset aside and the new
    one in, the complete new one is moved into place (or, were it gone, the old one back);
    then its drafts and replaced datasets are deleted."""
    for aside in _dead_leftovers(path, ASIDE):
        if not path.exists():
            draft = aside.with_name(aside.name.replace(f".{ASIDE}-", f".{DRAFT}-", 1))
            # a dataset is moved aside only once its replacement is complete
            os.rename(draft if draft.exists() else aside, path)
    for kind in (DRAFT, ASIDE):
        for left in _dead_leftovers(path, kind):
            shutil.rmtree(left, ignore_errors=True)


def _dead_leftovers(path: Path, kind: str) -> list[Path]:
    """The ``kind`` folders beside ``path`` of generate-data processes of this host that are
    gone."""
    return left_by_dead(path.parent, f".{path.name}.{kind}-")


def generate(d: DataConfig, *, config_text: str = "", device="cpu", progress=print,
             banner: str = "") -> str:
    """Simulate and write the dataset of ``d``; returns its path. An existing dataset (with
    ``data.overwrite``) is replaced only once the new one is complete. ``banner``: a line
    given to ``progress`` once the checks have passed (a refusal is then the only line)."""
    path = Path(d.path)
    store = enclosing_store(path)
    if store is not None:  # before the lock, whose file would go inside it
        raise StoreExists(f"data.path {path} is inside the Zarr store {store}: choose a "
                          "data.path outside it")
    if not already_made(d):  # before anything is made; a finished dataset needs no room
        check_chunk_memory(d, torch.device(device))
    try:  # then: a live run's store is neither finished nor an interrupted one's
        lock = hold_lock(path)
    except Held as busy:
        raise StoreExists(f"data.path {path} is being made by another piadm generate-data "
                          f"({busy.holder}): wait for it to end, or choose another "
                          "data.path") from None
    try:
        return _generate(d, path, config_text, device, progress, banner)
    finally:
        if lock is not None:
            lock.close()


# Bytes a chunk holds a point of its fine fields: float64 as simulated (on the device), then
# float32 for the write (on the host)
CHUNK_DEVICE_BYTES, CHUNK_HOST_BYTES = 8, 4


def check_chunk_memory(d: DataConfig, device: torch.device) -> None:
    """Refuse a data.chunk whose snapshots, held until their write, cannot fit in memory (a
    floor: their fine and coarse fields, the solver's own arrays left out): 1000 snapshots of
    1024 x 1024 ran out of memory after 90 s, leaving a dataset of metadata behind."""
    points = d.resolution**2 + (d.resolution // d.coarse_factor) ** 2
    parts = ([(device, CHUNK_DEVICE_BYTES), (torch.device("cpu"), CHUNK_HOST_BYTES)]
             if device.type == "cuda" else
             [(device, CHUNK_DEVICE_BYTES + CHUNK_HOST_BYTES)])
    held = min(d.chunk, d.snapshots)
    for where, per_point in parts:
        room = available_bytes(where)
        need = held * points * per_point
        if room is None or need <= room[0]:
            continue
        fits = room[0] // (points * per_point)
        fix = (f"lower data.chunk to at most {fits} (the snapshots written at once: fewer "
               "only make more writes)" if fits >= 1 else
               "lower data.resolution: one snapshot does not fit")
        raise ConfigError(f"config: data.chunk = {d.chunk} holds {held} snapshot"
                          f"{'s' if held > 1 else ''} of {d.resolution}x{d.resolution} until "
                          f"their write: at least {format_bytes(need)}, and "
                          f"{format_bytes(room[0])} is {room[1]}: {fix}")


def _generate(d: DataConfig, path: Path, config_text: str, device, progress,
              banner: str = "") -> str:
    """``generate`` once it holds data.path's lock."""
    _delete_leftovers(path)  # first: a dataset it puts back is then judged as any other
    if already_made(d):
        progress(f"data.path {path} already holds this dataset (the same [data] settings, "
                 "finished): nothing to do (data.overwrite = true makes it anew)")
        return str(path)
    _check_target(d)  # never delete what generate-data did not make
    if banner:
        progress(banner)
    replacing = path.exists()
    target = _beside(path, DRAFT) if replacing else path
    written = 0
    # a new dataset is made aside and renamed into place: a stop while zarr writes its
    # metadata must not leave at data.path what data.overwrite cannot tell for its own
    made = None if replacing else _beside(path, DRAFT)
    try:
        with naming(path):  # zarr's write on a full disk names no file
            for written in _simulate(d, target, config_text, device, progress, made):
                pass
            consolidate(target)
    except BaseException as err:
        if replacing:  # the dataset it was to replace stays, whole
            shutil.rmtree(target, ignore_errors=True)
        if made is not None:  # stopped while making it, before it was renamed into place
            shutil.rmtree(made, ignore_errors=True)
        left = _left(path, replacing, target, written, d.snapshots)
        if isinstance(err, OSError) and not isinstance(err, PiadmError):
            # a full disk, a lost mount: what data.path holds now, as for a Ctrl-C
            cause = f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
            raise WriteFailed(f"generate-data: writing failed: {cause}; fix the cause (free "
                              f"space, permissions, the mount): {left}", errno=err.errno
                              ) from None
        if not isinstance(err, KeyboardInterrupt):
            raise
        # Ctrl-C, or a stop signal (pipeline.signals)
        spinup = not replacing and not target.exists()  # before the store was made
        raise Interrupted(("generate-data stopped during the spin-up: " if spinup else "")
                          + left, signal_of(err)) from None
    if replacing:  # the old one moved aside, the new one into place, then the old deleted
        aside = _beside(path, ASIDE)
        os.rename(path, aside)
        os.rename(target, path)
        shutil.rmtree(aside, ignore_errors=True)
    return str(path)


def _left(path: Path, replacing: bool, target: Path, written: int, snapshots: int) -> str:
    """What data.path holds after a stop or a failure part way, and the command that goes
    on."""
    if replacing:
        return (f"data.path {path} was not replaced ({written} of its {snapshots} new "
                "snapshots made, now deleted) and still holds the dataset it held before: "
                "rerun with data.overwrite = true to replace it")
    if not target.exists():
        return f"nothing was written to data.path {path}; rerun the same command to start again"
    return (f"data.path {path} holds {written} of its {snapshots} snapshots, the rest NaN; "
            "generate-data does not resume: rerun it with data.overwrite = true to make the "
            "dataset anew")


def _spinup_line(t: float, spinup: float, elapsed: float) -> str:
    """The spin-up's progress at time ``t`` of ``spinup``, with its time left at the pace so
    far (a forcing that makes the steps short shows at once how long it would take)."""
    eta = f"  eta {elapsed / t * (spinup - t):.1f}s" if t > 0 else ""
    return f"spin-up t = {t:.3g} of {spinup:g}  elapsed {elapsed:.1f}s{eta}"


def _simulate(d: DataConfig, path: Path, config_text: str, device, progress,
              made: Path | None = None):
    """Spin the flow up, then create the store at ``path`` (made at ``made`` first, where
    given, and renamed into place whole) and fill it chunk by chunk, yielding the snapshots
    written so far after each chunk: a spin-up that fails (blows up, runs out of memory)
    leaves no store behind to block the rerun."""
    flow = Flow(d.resolution, nu=d.viscosity, drag=d.drag, k_f=d.forcing_wavenumber,
                forcing=d.forcing)
    sp = Spectral(flow, device)
    w_hat = torch.fft.rfft2(random_vorticity(d.resolution, d.seed, device=device))
    start = time.perf_counter()
    say = _every(PROGRESS_S if on_terminal() else LOG_PROGRESS_S, progress)
    w_hat = advance(sp, w_hat, d.spinup, cfl=d.cfl, dt_max=d.dt_max,
                    on_step=lambda t: say(_spinup_line(t, d.spinup, time.perf_counter() - start)))
    _empty(d, config_text).to_zarr(made or path, mode="w", compute=False, zarr_format=3,
                                   consolidated=False)
    if made is not None:
        os.rename(made, path)
    spun = time.perf_counter() - start
    start = time.perf_counter()
    for lo in range(0, d.snapshots, d.chunk):
        hi = min(lo + d.chunk, d.snapshots)
        w = None  # the chunk's fields, each put in place as made (a list and a stack: twice)
        for i in range(lo, hi):
            w_hat = advance(sp, w_hat, d.interval, cfl=d.cfl, dt_max=d.dt_max)
            frame = torch.fft.irfft2(w_hat, s=(d.resolution, d.resolution))
            if w is None:
                w = frame.new_empty((hi - lo, *frame.shape))
            w[i - lo] = frame
            elapsed = time.perf_counter() - start
            say(f"snapshots {i + 1}/{d.snapshots}  elapsed {elapsed:.1f}s (after {spun:.1f}s of "
                f"spin-up)  eta {elapsed / (i + 1) * (d.snapshots - i - 1):.1f}s")
        part = xr.Dataset({
            "vorticity": (("time", "y", "x"), w.cpu().numpy().astype("float32")),
            "vorticity_coarse": (("time", "y_coarse", "x_coarse"),
                                 coarse_grain(w, d.coarse_factor).cpu().numpy().astype("float32")),
        })
        part.to_zarr(path, region={"time": slice(lo, hi)}, mode="r+", consolidated=False)
        elapsed = time.perf_counter() - start
        # the first chunk shows the pace and the last the end; the rest as often as any line
        (progress if lo == 0 or hi == d.snapshots else say)(
            f"snapshots {hi}/{d.snapshots} written  elapsed {elapsed:.1f}s  "
            f"eta {elapsed / hi * (d.snapshots - hi):.1f}s")
        yield hi
