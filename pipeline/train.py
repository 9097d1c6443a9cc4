"""``piadm train``: denoising score matching of the EDM U-Net on a Zarr dataset, data-parallel.

Every step draws a global batch of training times and noise from keys (seed, step), so the
run does not depend on the number of ranks: each rank takes a contiguous slice of the batch,
its loss is summed over its samples and divided by the global batch, and the gradients are
summed over ranks (one Allreduce), which is exactly the one-rank gradient. EMA weights are
kept for sampling; the validation loss (held-out last times, fixed noise) uses them.
Its data splits are opened by ``pipeline.train_data``.
Checkpoints hold tensors only (``torch.load(weights_only=True)``) plus a JSON sidecar with the
architecture, normalisation and variables; training resumes from them, once the sidecar shows
the checkpoint was trained as this run would train (``pipeline.train_start``).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from models.grid import grid_of
from models.checkpoint import save_checkpoint
from models.fingerprint import data_probe
from models.unet import Denoiser, UNetConfig
from pipeline.console import on_every_rank, on_rank0, print0
from pipeline.decomposition import slice_bounds
from pipeline.errors import InputError, Interrupted, StoppedTogether
from pipeline.memory import memory_sharing
from pipeline.processes import Held, hold_lock
from pipeline.settings import TrainConfig
from pipeline.signals import signal_of
from pipeline.store import enclosing_store, open_store
from pipeline.train_data import Dataset, open_dataset
from pipeline.train_memory import check_train_memory
from pipeline.train_start import recorded_settings, restore


def _draws(seed: int, step: int, batch: int, n: int, shape, t: TrainConfig):
    """The global batch of step ``step``: times (B,), sigmas (B,), noise (B, *shape)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(step,)))
    times = rng.integers(0, n, batch)
    sigma = np.exp(t.p_mean + t.p_std * rng.standard_normal(batch))
    noise = rng.standard_normal((batch, *shape))
    return (times, torch.as_tensor(sigma, dtype=torch.float32),
            torch.as_tensor(noise, dtype=torch.float32))


def edm_loss(den: Denoiser, x0, sigma, noise, cond) -> torch.Tensor:
    """Sum over the batch of the EDM-weighted denoising error (per-sample mean over pixels):
    x0 and noise (B, H, W), sigma (B,), cond (B, C, H, W) or None; returns a scalar."""
    sd = den.cfg.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    pred = den(x0 + sigma[:, None, None] * noise, sigma, cond)
    return (weight * ((pred - x0) ** 2).flatten(1).mean(1)).sum()


def _allreduce_grads(den: Denoiser, comm) -> None:
    grads = [p.grad for p in den.parameters()]
    flat = comm.allreduce_sum(torch.cat([g.flatten() for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def validation_loss(ema: Denoiser, val: Dataset, t: TrainConfig, comm, device) -> float:
    """Mean EDM loss over the held-out times with fixed noise, split over ranks."""
    n = val.fields.sizes["time"]
    shape = tuple(val.fields.shape[1:])
    times = np.arange(n)  # every held-out time once, with fixed noise levels and noise
    lo, hi = slice_bounds(n, comm.size, comm.rank)
    total = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for a, sigma, noise in held_out_draws(t, n, shape, lo, hi):
            x, c = val.batch(times[a:a + len(sigma)], device)
            total += float(edm_loss(ema, x, sigma.to(device), noise.to(device), c))
    return float(comm.allreduce_sum(total)[0]) / n


# Held-out rows scored at once: their noise is drawn a chunk at a time, so that a large
# held-out split (10000 times of 256 x 256: 7.8 GB drawn at once) costs a chunk
VALIDATION_CHUNK = 64


def held_out_draws(t: TrainConfig, n: int, shape: tuple[int, ...], lo: int, hi: int,
                   chunk: int = VALIDATION_CHUNK):
    """The fixed noise of the ``n`` held-out times, rows lo..hi-1 in chunks of at most
    ``chunk``: (first row, sigma (m,), noise (m, *shape)), each row's the same as ``_draws``
    of all n at once gives it (the stream drawn in order, the rows before lo dropped)."""
    rng = np.random.default_rng(np.random.SeedSequence(t.seed + 1, spawn_key=(0,)))
    rng.integers(0, n, n)  # the times ``_draws`` begins with: validation takes each in order
    sigma = np.exp(t.p_mean + t.p_std * rng.standard_normal(n))
    edges = [*range(0, lo, chunk), *range(lo, hi, chunk), hi]
    for a, b in zip(edges, edges[1:]):
        noise = rng.standard_normal((b - a, *shape))
        if a >= lo:
            yield (a, torch.as_tensor(sigma[a:b], dtype=torch.float32),
                   torch.as_tensor(noise, dtype=torch.float32))


@dataclass
class TrainResult:
    """Where a training run ended: its last step, the losses there and its seconds."""

    step: int
    train_loss: float
    val_loss: float | None  # None: never measured (no step run, none in the checkpoint)
    seconds: float


def _network(t: TrainConfig, trn, shape: tuple[int, ...], device):
    """The U-Net ``t`` describes, seeded, with its EMA copy and optimiser; (config, den, ema,
    opt)."""
    # each level past the first halves the grid, which must split evenly to be doubled back
    most = 1 + min((n & -n).bit_length() - 1 for n in shape)
    if len(t.channels) > most:
        raise InputError(f"train.channels = {list(t.channels)} has {len(t.channels)} levels, but "
                         f"{t.variable}'s {'x'.join(map(str, shape))} fields allow at most {most} "
                         f"(each level halves the grid): give at most {most} widths")
    coarsest = min(shape) // 2 ** (len(t.channels) - 1)
    if 2 * t.global_modes + 1 > coarsest:
        raise InputError(f"train.global_modes = {t.global_modes} needs a coarsest grid of at "
                         f"least {2 * t.global_modes + 1} points, this network's is {coarsest}: "
                         f"set it to at most {(coarsest - 1) // 2}")
    # a residual's scale is far below the field's: the preconditioning is told it
    sd = round(trn.target_std(device), 4) if t.residual else 1.0
    ucfg = UNetConfig(channels=tuple(t.channels), cond_channels=1 if t.condition else 0,
                      sigma_data=sd, global_modes=t.global_modes)
    torch.manual_seed(t.seed)
    den = Denoiser(ucfg).to(device)
    ema = copy.deepcopy(den).requires_grad_(False)
    return ucfg, den, ema, torch.optim.Adam(den.parameters(), lr=t.lr)


def _data_made(data: xr.Dataset) -> str:
    """What tells train.data from a dataset made anew at its path: its times, and the line of
    its history that made it (generate-data's, with its time; none for other data)."""
    made = str(data.attrs.get("history", "")).splitlines()[:1]
    return "; ".join([f"{data.sizes['time']} times", *made])


def _meta(t: TrainConfig, ucfg: UNetConfig, trn: Dataset, shape, config_text: str) -> dict:
    """The sidecar of this run's checkpoints, less the step and validation loss."""
    data = open_store(t.data, consolidated=False)  # as training read it
    return {"unet": ucfg.to_dict(), "mean": trn.mean, "std": trn.std,
            "data_bound": trn.data_bound, "variable": t.variable, "condition": t.condition,
            # absolute: read back from another folder (bench --quality, a resume) it is the same
            "residual": t.residual, "shape": list(shape), "data": os.path.abspath(t.data),
            "extra": [os.path.abspath(p) for p in t.extra],
            # the conditioning grid: sampling refuses an input of another resolution
            "cond_shape": None if trn.coarse is None else list(trn.coarse.shape[1:]),
            "validation": t.validation, "config": config_text, "data_made": _data_made(data),
            "data_probe": data_probe(data[t.variable]),
            "grid": grid_of(data[t.variable]),
            # the coarse grid: sampling refuses an input on it rolled
            **({"cond_grid": grid_of(data[t.condition])} if t.condition else {})}


def loss_text(value: float | None) -> str:
    """A loss for the log: "-" before the first validation."""
    return "-" if value is None else f"{value:.4f}"


def _save(path: Path, nets, step: int, history: list[float], meta: dict, *,
          anew: bool) -> None:
    """Save step ``step`` of ``nets`` (network, EMA copy, optimiser) with its sidecar ``meta``
    (its val_loss set); ``anew``: this run's first save, which starts the checkpoint anew."""
    den, ema, opt = nets
    if anew:  # never the old run's tensors by our sidecar
        path.unlink(missing_ok=True)
    save_checkpoint(path, {"model": den.state_dict(), "ema": ema.state_dict(),
                           "opt": opt.state_dict(), "step": step,
                           "history": torch.tensor(history, dtype=torch.float64)},
                    meta | {"step": step})


def _kept(t: TrainConfig, saved: int, as_stopped: bool = False) -> str:
    """What an interrupted run kept (``as_stopped``: saved at the step it stopped on), and how
    to go on from it."""
    if not saved:
        return (f"no checkpoint of this run was saved yet (the first comes at step "
                f"{min(t.val_every, t.steps)}): rerun the same command to start again")
    how = "the same command" if t.resume else "it with train.resume = true"
    when = ("the step it stopped on" if as_stopped else
            f"saved every train.val_every = {t.val_every} steps")
    return (f"train.checkpoint {t.checkpoint} holds step {saved} of {t.steps} ({when}): "
            f"rerun {how} to resume from there")


def _step(t: TrainConfig, step: int, nets, trn, rows: tuple[int, int], comm, device,
          stopping: int = 0) -> tuple[float, int]:
    """Optimisation step ``step`` (from 0) of ``nets`` (network, its EMA copy, optimiser) on
    this rank's ``rows`` [lo, hi) of the batch: the batch's loss, summed over the ranks (the
    same on every rank, so a NaN stops them all with one line), and the stop signal any rank
    was given (``stopping``: its number, 0 for none), agreed in the same reduction (0: go on)."""
    den, ema, opt = nets
    lo, hi = rows
    times, sigma, noise = _draws(t.seed, step, t.batch_size, trn.fields.sizes["time"],
                                 tuple(trn.fields.shape[1:]), t)
    x, c = trn.batch(times[lo:hi], device)
    opt.zero_grad(set_to_none=False)
    loss = edm_loss(den, x, sigma[lo:hi].to(device), noise[lo:hi].to(device), c) / t.batch_size
    loss.backward()
    _allreduce_grads(den, comm)
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), den.parameters()):
            pe.lerp_(p, 1 - t.ema)
    summed = comm.allreduce_sum(torch.tensor(  # the loss, the ranks stopping, their signals
        [float(loss.detach()), float(stopping > 0), float(stopping)], dtype=torch.float64))
    batch_loss = float(summed[0])
    if not math.isfinite(batch_loss):
        raise InputError(f"train: the loss is {batch_loss} at step {step + 1}, before any "
                         "checkpoint holds it: train.data or train.extra has NaN/Inf fields (a "
                         "generate-data run cut short leaves NaN: rerun it with data.overwrite "
                         "= true), or train.lr is too large", collective=True)
    return batch_loss, int(summed[2] // summed[1]) if summed[1] > 0 else 0


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes whenever checkpoint ``path`` is saved (a save renames a new file in)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _hold_checkpoint(path: Path):
    """``hold_lock`` of train.checkpoint ``path``: two runs saving one checkpoint would each
    resume the other's saves and write over them; the second is refused, naming the first."""
    try:
        return hold_lock(path)
    except Held as busy:
        raise InputError(f"train.checkpoint {path} is being trained by another piadm train "
                         f"({busy.holder}): wait for it to end, or choose another "
                         "train.checkpoint") from None


def train(t: TrainConfig, *, comm, device="cpu", config_text: str = "",
          stop=None, banner: str = "") -> TrainResult:
    """Run (or resume) the training of ``t``; checkpoints on rank 0, which holds
    train.checkpoint's lock for the run once its inputs have passed their checks. ``stop``:
    a ``pipeline.signals.StopRequest``; once any rank's is set, every rank ends after the
    same step, which is saved, and raises ``StoppedTogether``. ``banner``: a line said once
    the checks have passed (a refusal is then the only line)."""
    def outside_stores():
        store = enclosing_store(t.checkpoint)
        if store is not None:
            raise InputError(f"train.checkpoint {t.checkpoint} is inside the Zarr store "
                             f"{store}: choose a train.checkpoint outside it")

    on_every_rank(comm, outside_stores)  # each node's view of the path
    path = Path(t.checkpoint)
    before = _signature(path)  # the checkpoint as _prepare will read it
    # the same config on every rank, and files that should be, unless a node's differ
    # collective: before each rank checks its own (a GPU's ranks, and its host's)
    sharing = (memory_sharing(comm, device), memory_sharing(comm, "cpu"))
    prepared = on_every_rank(comm, _prepare, t, device, config_text, comm.size, sharing)
    held = []  # taken once nothing is refused: a bad input leaves no folder or lock behind

    def hold():
        lock = _hold_checkpoint(path)
        if _signature(path) != before:  # another run saved it meanwhile: ours is stale
            if lock is not None:
                lock.close()
            raise InputError(f"train.checkpoint {path} was saved by another piadm train while "
                             "this one started: rerun to go on from what it holds")
        held.append(lock)

    on_rank0(comm, hold)
    step = prepared[-1][0]  # said once the run holds the checkpoint, not before a refusal
    if banner:
        print0(comm, banner)
    if step:
        print0(comm, f"resuming {path} at step {step}")
    elif t.init:
        print0(comm, f"starting from the EMA weights of {t.init}")
    try:
        return _train(t, comm, device, *prepared, stop=stop)
    finally:
        for lock in held:
            if lock is not None:
                lock.close()


def _prepare(t: TrainConfig, device, config_text: str, ranks: int,
             sharing: tuple[int, int]):
    """(training split, held-out split, network, EMA copy, optimiser, sidecar, (step,
    history)) of ``t``: a new run's, or its checkpoint's restored, once a step of its batch
    split over ``ranks`` is found to fit in memory (``sharing``: the ranks sharing this
    rank's device, and its host); runs no collective and prints nothing."""
    trn, held = open_dataset(t)
    shape = tuple(trn.fields.shape[1:])
    ucfg, den, ema, opt = _network(t, trn, shape, device)
    meta = _meta(t, ucfg, trn, shape, config_text)
    restored = restore(t, meta, den, ema, opt, device, held.fields["time"].values)
    if restored[0] < t.steps:  # a finished run's rerun has no step to fit
        check_train_memory(t.batch_size, partial(edm_loss, den), bool(t.condition), shape,
                           device, ranks, *sharing)
    return trn, held, den, ema, opt, meta, restored


def _train(t: TrainConfig, comm, device, trn, held, den, ema, opt, meta,
           restored: tuple[int, list[float]], stop=None) -> TrainResult:
    """``train``'s steps, validations and saves, from what ``_prepare`` gave."""
    step, history = restored
    if step >= t.steps:  # resumed at or past the steps asked: say so rather than idle
        print0(comm, f"{t.checkpoint} already holds step {step}, train.steps = {t.steps}: "
                     "nothing to train (raise train.steps to train on)")
    path = Path(t.checkpoint)
    # until the next validation, a resumed run's is its checkpoint's (unless the sidecar is
    # a save ahead of the weights: a save cut short)
    recorded = recorded_settings(path) if step else {}
    val_loss = recorded.get("val_loss") if recorded.get("step") == step else None
    start, loss_sum, summed = time.perf_counter(), 0.0, 0
    lo, hi = slice_bounds(t.batch_size, comm.size, comm.rank)
    saved = first = step  # the step train.checkpoint holds of this run (0: none yet)
    try:
        while step < t.steps:
            batch_loss, stopping = _step(t, step, (den, ema, opt), trn, (lo, hi), comm,
                                         device, (stop and stop.signal) or 0)
            step += 1
            history.append(batch_loss)
            loss_sum, summed = loss_sum + batch_loss, summed + 1
            if step % t.val_every == 0 or step == t.steps:
                val_loss = validation_loss(ema, held, t, comm, device)
                if not math.isfinite(val_loss):  # the same on every rank (summed)
                    raise InputError(
                        f"train: the validation loss is {val_loss} at step {step}, before any "
                        "checkpoint holds it: the held-out times of train.data (its last "
                        "train.validation) have NaN/Inf fields (a generate-data run cut short "
                        "leaves NaN: rerun it with data.overwrite = true), or train.lr is too "
                        "large", collective=True)
                # a save that fails (a full disk) stops every rank with its one line
                on_rank0(comm, _save, path, (den, ema, opt), step, history,
                         meta | {"val_loss": val_loss}, anew=saved == first and not t.resume)
                saved = step
            if stopping:  # every rank alike: the step is kept, its validation left for later
                if saved != step:
                    on_rank0(comm, _save, path, (den, ema, opt), step, history,
                             meta | {"val_loss": None}, anew=saved == first and not t.resume)
                saved = step
                # a rank not signalled itself says the signal the others were given
                raise StoppedTogether(_kept(t, saved, as_stopped=True), stopping)
            # the run's first step too: its pace and ETA, before log_every steps of silence
            if step % t.log_every == 0 or step in (t.steps, first + 1):
                elapsed = time.perf_counter() - start
                # the steps summed: a window is short at the end, or after a resume mid-window
                eta = elapsed / (step - first) * (t.steps - step)  # validations included
                print0(comm, f"step {step}/{t.steps}  mean loss {loss_sum / summed:.4f}  "
                             f"val {loss_text(val_loss)}  elapsed {elapsed:.0f}s"
                             + (f"  eta {eta:.0f}s" if step < t.steps else ""))
                loss_sum, summed = 0.0, 0
    except StoppedTogether:
        raise
    except KeyboardInterrupt as err:  # a second Ctrl-C, or a stop where none is handled
        raise Interrupted(_kept(t, saved), signal_of(err)) from None
    comm.barrier()
    return TrainResult(step, history[-1], val_loss, time.perf_counter() - start)
