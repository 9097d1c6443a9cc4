"""Whether a training step can fit in memory, checked before anything is written.

A step draws the whole batch's noise on every rank (each rank then takes its slice, so that
the batch is the same on any number of ranks), and the forward pass of each sample a rank
holds keeps its activations for the backward. Both are counted here: the draws from their
shapes, the activations by measuring what the network's forward pass saves for one sample
more (autograd's saved tensors, told apart by their storage). The sum is a floor, the
backward's own temporaries and the optimiser's state left out, so a run it refuses could
not have fitted; without it a batch too large was killed by the kernel, with no word, after
taking every byte of the node (24 GiB here, at train.batch_size = 100000 on 16 x 16 fields).
"""
from __future__ import annotations

import math

import torch

from pipeline.errors import ConfigError
from pipeline.memory import available_bytes, format_bytes

# Bytes a sample's draws take on every rank: its noise in float64, then in float32, and its
# time, noise level and a temporary of each in float64
DRAW_FIELD_BYTES, DRAW_SAMPLE_BYTES = 8 + 4, 4 * 8


def saved_per_sample(den, shape: tuple[int, ...], conditioned: bool, device) -> int:
    """Bytes the forward pass of ``den`` (a ``models.unet.Denoiser``) keeps for the backward
    for each sample of ``shape`` (H, W) it holds, measured as what a batch of two keeps
    beyond a batch of one (the weights, saved by both, drop out); ``conditioned``: with a
    (B, 1, H, W) condition. No gradient is taken and no weight changes."""
    from pipeline.train import edm_loss

    def kept(n: int) -> int:
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        x = torch.zeros((n, *shape), device=device)
        cond = torch.zeros((n, 1, *shape), device=device) if conditioned else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            edm_loss(den, x, torch.ones(n, device=device), x, cond)
        return sum(storages.values())

    return max(0, kept(2) - kept(1))


def step_floor(batch: int, rows: int, shape: tuple[int, ...], per_sample: int) -> int:
    """Bytes a training step certainly takes on a rank holding ``rows`` of a global batch of
    ``batch`` samples of ``shape``: the whole batch's draws and its own rows' saved
    activations (``per_sample`` each) and fields (float32, the target and its noisy copy)."""
    field = math.prod(shape)
    return batch * (DRAW_FIELD_BYTES * field + DRAW_SAMPLE_BYTES) + rows * (per_sample
                                                                            + 8 * field)


def check_train_memory(t, den, shape: tuple[int, ...], device, ranks: int,
                       sharing: int = 1) -> None:
    """Refuse train.batch_size where one step's floor (``step_floor``, on the rank with the
    most rows of ``ranks``) cannot fit in what this rank may allocate, ``sharing`` ranks of
    the node sharing it, naming the largest batch that would leave room for the floor."""
    room = available_bytes(torch.device(device), sharing)
    if room is None:
        return
    per_sample = saved_per_sample(den, shape, bool(t.condition), device)
    most_rows = -(-t.batch_size // ranks)
    need = step_floor(t.batch_size, most_rows, shape, per_sample)
    if need <= room[0]:
        return
    # the floor grows by at least this much per sample of the batch, spread over the ranks
    per_batch = step_floor(ranks, 1, shape, per_sample) / ranks
    fits = int(room[0] // per_batch)
    draws = t.batch_size * (DRAW_FIELD_BYTES * math.prod(shape) + DRAW_SAMPLE_BYTES)
    # the backward's temporaries come on top: peaks measured 1.7 times the floor (U-Net
    # [32, 64, 96], 16 x 16 fields, batches of 1000 and 4000 on the CPU), so half is a first try
    fix = (f"lower train.batch_size: at most {fits} would leave room for that alone, and the "
           f"backward needs more besides, so try {max(1, fits // 2)}"
           + (", or add ranks (each holds its slice's activations)" if need > 2 * draws else "")
           if fits >= 1 else "lower train.channels or train on a node with more memory")
    raise ConfigError(
        f"config: train.batch_size = {t.batch_size} on {ranks} rank{'s' if ranks > 1 else ''} "
        f"needs at least {format_bytes(need)} per rank for a step ({most_rows} samples' "
        f"activations at {format_bytes(per_sample)} each, and the whole batch's noise drawn "
        f"on every rank), and {format_bytes(room[0])} is {room[1]}"
        + (f" for each of {sharing} ranks" if sharing > 1 else "") + f": {fix}")
