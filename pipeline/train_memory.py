"""Whether a training step can fit in memory, checked before anything is written.

A step draws the whole batch's noise on the host of every rank (each rank then takes its
slice, so that the batch is the same on any number of ranks), and the forward pass of each
sample a rank holds keeps its activations for the backward. Both are counted here: the draws
from their shapes, the activations by measuring what the network's forward pass saves for one
sample more (autograd's saved tensors, told apart by their storage). What is counted is a
floor, the backward's own temporaries and the optimiser's state left out, so a run it refuses
could not have fitted; without it a batch too large was killed by the kernel, with no word,
after taking every byte of the node (23 GiB here, at train.batch_size = 100000 on 16 x 16
fields).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError, is_out_of_memory
from pipeline.host_memory import format_bytes
from pipeline.memory import available_bytes

# A sample's noise drawn in float64 (freed once drawn) and kept in float32, and its time and
# noise level with a temporary each, in float64
DRAWN, KEPT, PER_SAMPLE = 8 + 4, 4, 4 * 8
# Per sample a rank holds, beside its activations: its target and noisy copy in float32
HELD = 8


def saved_per_sample(loss, shape: tuple[int, ...], conditioned: bool, device) -> int:
    """Bytes the forward pass ``loss(x, sigma, noise, cond)`` (the network's training loss on
    x, noise (B, *shape), sigma (B,), cond (B, 1, *shape) where ``conditioned``, else None)
    keeps for the backward per sample, measured as what a batch of two keeps beyond a batch
    of one (the weights, saved by both, drop out). Taken with gradients on, whatever the
    caller's mode; no gradient is taken and no weight changes."""
    def kept(n: int) -> int:
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        x = torch.zeros((n, *shape), device=device)
        cond = torch.zeros((n, 1, *shape), device=device) if conditioned else None
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(x, torch.ones(n, device=device), x, cond)
        return sum(storages.values())

    try:
        return max(0, kept(2) - kept(1))
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise ConfigError(f"config: one training sample of {'x'.join(map(str, shape))} does not "
                          f"fit in {torch.device(device)}'s memory ({str(err).splitlines()[0]}): "
                          "lower train.channels, or train where more memory is free") from None


@dataclass(frozen=True)
class StepFloor:
    """Bytes a training step certainly takes on a rank: on its device (its rows' activations
    and fields; on a CPU the host's draws too) and, on a GPU, on its host (the draws)."""

    device: int
    host: int


def step_floor(batch: int, rows: int, shape: tuple[int, ...], per_sample: int,
               on_gpu: bool) -> StepFloor:
    """The floor of a step on a rank holding ``rows`` of a global batch of ``batch`` samples
    of ``shape``, each keeping ``per_sample`` bytes of activations: the draws' peak is while
    drawn (float64 and float32 at once), the rows' while the forward runs (the float32 kept
    beside them)."""
    field = math.prod(shape)
    drawn, kept = batch * (DRAWN * field + PER_SAMPLE), batch * (KEPT * field + PER_SAMPLE)
    rows_bytes = rows * (per_sample + HELD * field)
    if on_gpu:
        return StepFloor(rows_bytes, drawn)
    return StepFloor(max(drawn, kept + rows_bytes), 0)


def most_batch(room: tuple[int, int], ranks: int, shape, per_sample: int, on_gpu: bool,
               upto: int) -> int:
    """The largest global batch below ``upto`` whose floor fits ``room`` (device, host
    bytes) on the rank holding the most rows of ``ranks``; 0 where none does."""
    def fits(batch: int) -> bool:
        floor = step_floor(batch, -(-batch // ranks), shape, per_sample, on_gpu)
        return floor.device <= room[0] and floor.host <= room[1]

    lo, hi = 0, upto  # fits(lo), not fits(hi): bisect, the floor growing with the batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_train_memory(batch: int, loss, conditioned: bool, shape: tuple[int, ...], device,
                       ranks: int, sharing: int = 1, host_sharing: int = 1) -> None:
    """Refuse a global train.batch_size ``batch`` whose step floor (``step_floor``, on the
    rank with the most rows of ``ranks``) cannot fit in what this rank may allocate:
    ``sharing`` ranks share its device's memory, ``host_sharing`` its host's (on a GPU);
    ``loss`` the network's training loss (``saved_per_sample``). Names the largest batch
    that leaves room for the floor, and half of it as a first try."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    room = available_bytes(device, sharing)
    host = available_bytes(torch.device("cpu"), host_sharing) if on_gpu else None
    if room is None and host is None:
        return
    per_sample = saved_per_sample(loss, shape, conditioned, device)
    rows = -(-batch // ranks)
    floor = step_floor(batch, rows, shape, per_sample, on_gpu)
    rooms = (room[0] if room else math.inf, host[0] if host else math.inf)
    if floor.device <= rooms[0] and floor.host <= rooms[1]:
        return
    fits = most_batch(rooms, ranks, shape, per_sample, on_gpu, batch)
    # ranks on one node share its host's memory: more of them spread a GPU's activations only
    more = (", or add GPUs (each rank holds its slice's activations)"
            if on_gpu and floor.device > rooms[0] else
            ", or spread it over more nodes (each rank holds its slice's activations)"
            if not on_gpu and rows * per_sample > floor.device // 2 else "")
    # the backward's temporaries come on top: peaks measured 1.7 times the floor (U-Net
    # [32, 64, 96], 16 x 16 fields, batches of 1000 and 4000 on the CPU), so half is a first try
    fix = (f"lower train.batch_size: at most {fits} would leave room for that alone, and the "
           f"backward needs more besides, so try {max(1, fits // 2)}{more}" if fits >= 1 else
           "lower train.channels or train where more memory is free")
    short = (f"{format_bytes(floor.device)} per rank on {device} ({rows} samples' "
             f"activations at {format_bytes(per_sample)} each"
             + (")" if on_gpu else ", and the whole batch's noise drawn on every rank)")
             if floor.device > rooms[0] else
             f"{format_bytes(floor.host)} per rank on the host (the whole batch's noise, drawn "
             "on every rank)")
    where = room if floor.device > rooms[0] else host
    shared = sharing if floor.device > rooms[0] else host_sharing
    raise ConfigError(
        f"config: train.batch_size = {batch} on {ranks} rank{'s' if ranks > 1 else ''} needs "
        f"at least {short} for a step, and {format_bytes(where[0])} is {where[1]}"
        + (f" for each of {shared} ranks" if shared > 1 else "") + f": {fix}")
