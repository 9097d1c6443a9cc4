"""The rank grid: world = groups x time slices (docs/algorithms.md section 3), and where each rank
computes (device, CPU threads).

Consecutive world ranks form one group, so a group's time slices share a node when they can:
their Exscan and Allreduce run every sweep, while groups never talk until the end.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

from pipeline.comm import WAIT_POLL_S
from pipeline.config import ConfigError
from pipeline.decomposition import group_of
from pipeline.memory import keep_freed_memory
from pipeline.settings import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class RankGrid:
    """A rank's place: ``world``, its group's communicator ``slices`` (one rank per time slice),
    ``groups`` in all and this rank's ``group``."""

    world: object
    slices: object
    groups: int
    group: int


def rank_grid(world, time_slices: int) -> RankGrid:
    """Split ``world`` into groups of ``time_slices`` consecutive ranks."""
    if world.size % time_slices:
        raise ConfigError(
            f"config: parallel.time_slices = {time_slices} does not divide the {world.size} "
            f"rank{'s' if world.size != 1 else ''}: launch a multiple of {time_slices} ranks, "
            f"or pick a divisor of {world.size}"
        )
    group, index = group_of(world.rank, time_slices)
    slices = world.split(group, index) if world.size > 1 else world
    return RankGrid(world, slices, world.size // time_slices, group)


def choose_device(local_rank: int) -> torch.device:
    """This rank's device: with ``--gpus-per-task=1`` each rank sees one GPU (cuda:0); with
    every GPU visible, ranks on a node take them in turn by node-local rank; else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# Automatic threads stop at one per this many field points: on a field smaller than 32x32 a
# second thread has little to share (no gain on 16x16 on 2 idle cores) and on a busy core its
# spinning costs far more (threads wait for each other every op).
POINTS_PER_THREAD = 32 * 32


def _cores() -> tuple[int, int]:
    """(cores this rank may run on, cores of the node)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return allowed or 1, os.cpu_count() or 1


def check_threads(requested: int) -> None:
    """Refuse a ``parallel.threads`` past this node's cores: libgomp fails to start the
    threads and torch may hang."""
    total = _cores()[1]
    if requested > total:
        raise ConfigError(f"config: parallel.threads = {requested} is more than this node's "
                          f"{total} cores: give at most {total} (0: the node's cores shared "
                          "among its ranks)")


def cpu_threads(local_size: int, requested: int = 0, field_points: int = 0) -> int:
    """Torch threads per rank so the ranks on a node do not oversubscribe its cores.

    ``requested`` > 0 wins; a launcher that pinned this rank to fewer cores than the node has
    (srun --cpus-per-task) is trusted; otherwise the node's cores are shared evenly. Either
    way a field of ``field_points`` (0: unknown) gets at most one thread per
    ``POINTS_PER_THREAD`` points."""
    check_threads(requested)
    allowed, total = _cores()
    if requested > 0:
        return requested
    share = max(1, allowed) if allowed < total else max(1, total // max(1, local_size))
    if field_points:
        share = min(share, max(1, field_points // POINTS_PER_THREAD))
    return share


def oversubscribed(local_size: int, threads: int) -> bool:
    """Whether the ``local_size`` ranks of a node, ``threads`` each, need more cores than they
    have: a rank pinned to its own cores (srun --cpus-per-task) is judged on those."""
    allowed, total = _cores()
    if allowed < total:
        return threads > allowed
    return local_size * threads > total


def collective_poll(wait: str, local_size: int, threads: int) -> float | None:
    """``parallel.wait`` as the communicator's poll interval: None to spin inside MPI,
    seconds to sleep between polls. A spinning rank holds a core while it waits; on a node
    with more busy threads than cores that core is one a rank still computing needs (8 ranks
    on 2 cores: a round 33 ms instead of 40, docs/planning.md)."""
    if wait == "spin" or (wait == "auto" and not oversubscribed(local_size, threads)):
        return None
    return WAIT_POLL_S


def float32_precision(tf32: bool) -> None:
    """Whether CUDA convolutions and matrix products may round float32 inputs to TensorFloat-32.

    torch lets cuDNN convolutions do so by default. Its 10-bit mantissa rounds each call to
    about 5e-4, and a parallel sampler's batched calls round differently from the sequential
    ones, so the distance between the two paths stops falling near 5e-4 however tight the
    tolerance (seen on an H200 with the shipped U-Net: ``docs/benchmarks.md``). Off by default
    (``model.tf32``); no effect on a CPU."""
    mode = "tf32" if tf32 else "ieee"
    if _per_operation():
        # torch >= 2.9: set per operation, never through the older flags (torch refuses to
        # mix the two)
        for flags in _PRECISION_FLAGS:
            flags().fp32_precision = mode
    else:
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32


# torch >= 2.9's per-operation float32 precision flags that float32_precision sets
_PRECISION_FLAGS = (lambda: torch.backends.cudnn.conv, lambda: torch.backends.cuda.matmul)


def _per_operation() -> bool:
    return hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


@contextlib.contextmanager
def torch_settings_kept():
    """Give torch's CPU threads and float32 precision flags back as they were on leaving:
    ``place_rank`` sets them for the run, and a script that calls the API goes on."""
    threads = torch.get_num_threads()
    owners, name = ((_PRECISION_FLAGS, "fp32_precision") if _per_operation() else
                    ((lambda: torch.backends.cudnn, lambda: torch.backends.cuda.matmul),
                     "allow_tf32"))
    kept = [(owner, getattr(owner(), name)) for owner in owners]
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for owner, value in kept:
            setattr(owner(), name, value)


def place_rank(world, threads: int = ParallelConfig.threads, field_points: int = 0,
               keep_freed: bool = ParallelConfig.keep_freed, wait: str = ParallelConfig.wait,
               tf32: bool = ModelConfig.tf32) -> torch.device:
    """Pick this rank's device, set its torch CPU threads (``cpu_threads``), how it waits
    in collectives (``collective_poll``) and its float32 precision on CUDA
    (``float32_precision``) and, with ``keep_freed``, have the C allocator keep freed memory
    for the next model call (``memory.keep_freed_memory``); returns the device."""
    float32_precision(tf32)
    local_rank, local_size = world.local_layout()
    threads = cpu_threads(local_size, threads, field_points)
    torch.set_num_threads(threads)
    world.poll_s = None
    if world.size > 1:
        # a waiting rank's choice between a blocking collective and a polled nonblocking one
        # must be every rank's: MPI never matches the one kind with the other, and "auto"
        # judges each node on its own (nodes of other core counts, or ranks per node)
        polls = world.allgather_object(collective_poll(wait, local_size, threads) is not None)
        world.poll_s = WAIT_POLL_S if any(polls) else None
    if keep_freed:
        keep_freed_memory()
    device = choose_device(local_rank)
    if device.type == "cuda":  # else what uses the current device makes a context on cuda:0
        torch.cuda.set_device(device)
    return device


def machine_kind(device) -> str:
    """The accelerator's or the CPU's model name and the torch threads: what a planner
    profile's times depend on beyond the config (so that a cache shared by a login node and
    compute nodes of other kinds is not read across them), and a store's ``made_on``."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as info:
                name = next((line.split(":", 1)[1].strip() for line in info
                             if line.startswith("model name")), name)
        except OSError:
            pass
    return f"{name} x{torch.get_num_threads()}"


def arithmetic_kind(device) -> str:
    """``"cpu"``, or ``"cuda: NAME"``: whose kernels compute a path, for keeping apart what
    their rounding changes (a calibrated tolerance). CPUs are taken as one kind; the GPU
    models are not (their libraries choose kernels by model)."""
    device = torch.device(device)
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def made_on(device) -> str:
    """``"TYPE: NAME xTHREADS"``: the device type and ``machine_kind``, as a store records
    where it was made."""
    return f"{torch.device(device).type}: {machine_kind(device)}"
